%% @doc The `event_handler' option: what a replication tells its owner as it happens (no
%% telemetry dependency). A handler is a module exporting `handle_event/2' or a fun of arity 1;
%% it is called in the replication's own processes, so it must be quick and must not call back
%% into the replication. A handler that raises is logged and ignored: it never stops a replication.
%%
%% Every event is a name and a map that always holds `connection_name' and `bucket' (and `side'
%% where one side is meant):
%% <ul>
%% <li>`setup_begun': `request' (`setup_streams' | `takeover' | `maybe_close_stream' |
%%     `shut_connection'), `vbuckets' (a `dcp_log:vbuckets/1' summary), `adds', `closes'.</li>
%% <li>`setup_settled': `request', `duration_us', `result' (`ok' | `errors'), `reasons'
%%     (`[{VBucket, Why}]', empty when ok).</li>
%% <li>`stream_end': `vbucket', `reason' (the producer ended a stream).</li>
%% <li>`takeover': `vbucket', `state' (the producer switched the vbucket's state).</li>
%% <li>`connection_lost': `side', `reason'.</li>
%% <li>`traffic': `side', `bytes', `frames' (since the last one), `interval_ms', `time' (monotonic
%%     ms); at most every 100 ms per side while frames flow.</li>
%% </ul>
%% A module is called `Module:handle_event(Name, Map)', a fun `Fun({Name, Map})'.
%% `traffic_monitor => Pid' is one such handler (`traffic_monitor/1'): ns_server's message
%% `{dcp_traffic, ConnectionName, Side, MonotonicMs}' on each `traffic' event.
-module(dcp_events).

-include_lib("kernel/include/logger.hrl").

-export([is_handler/1, handlers/1, notify/3, emit/3, connection_lost/2, traffic_monitor/1,
         traffic_new/0, traffic_note/4]).

-export_type([handler/0, handlers/0, name/0, traffic/0]).

-type handler() :: module() | fun(({name(), map()}) -> any()).
-type handlers() :: [handler()].
-type name() :: setup_begun | setup_settled | stream_end | takeover | connection_lost | traffic.
%% Counts since the last `traffic' event.
-opaque traffic() :: #{last := undefined | integer(), bytes := non_neg_integer(),
                       frames := non_neg_integer()}.

-define(TRAFFIC_INTERVAL_MS, 100).

%% @doc True for a module that exports `handle_event/2' (loaded now if need be) or a fun/1.
-spec is_handler(term()) -> boolean().
is_handler(Fun) when is_function(Fun, 1) ->
    true;
is_handler(Module) when is_atom(Module) ->
    case code:ensure_loaded(Module) of
        {module, Module} -> erlang:function_exported(Module, handle_event, 2);
        _ -> false
    end;
is_handler(_) ->
    false.

%% @doc The handlers that start options name: `event_handler' and `traffic_monitor'.
-spec handlers(map()) -> handlers().
handlers(Opts) ->
    [H || H <- [maps:get(event_handler, Opts, undefined),
                case maps:get(traffic_monitor, Opts, undefined) of
                    Pid when is_pid(Pid) -> traffic_monitor(Pid);
                    _ -> undefined
                end],
          H =/= undefined].

%% @doc Calls the handlers a connection holds (`handlers' in its `dcp_proxy:conn()') with the
%% event, its connection name, side and bucket added.
-spec emit(map(), name(), map()) -> ok.
emit(#{handlers := [_ | _] = Handlers} = Conn, Name, Data) ->
    notify(Handlers, Name,
           maps:merge(#{connection_name => maps:get(name, Conn, undefined),
                        side => maps:get(side, Conn, undefined),
                        bucket => maps:get(bucket, Conn, undefined)}, Data));
emit(_Conn, _Name, _Data) ->
    ok.

%% @doc `connection_lost' for a connection that stops for `Reason', unless the stop is orderly
%% (`normal', `shutdown', or a `{shutdown, _}' the owner asked for).
-spec connection_lost(map(), term()) -> ok.
connection_lost(_Conn, normal) -> ok;
connection_lost(_Conn, shutdown) -> ok;
connection_lost(Conn, {shutdown, Why}) when Why =/= shut -> emit(Conn, connection_lost, #{reason => Why});
connection_lost(_Conn, {shutdown, _}) -> ok;
connection_lost(Conn, Reason) -> emit(Conn, connection_lost, #{reason => Reason}).

%% @doc Calls every handler with the event.
-spec notify(handlers(), name(), map()) -> ok.
notify([], _Name, _Data) ->
    ok;
notify(Handlers, Name, Data) ->
    lists:foreach(fun(H) -> call(H, Name, Data) end, Handlers).

call(Handler, Name, Data) ->
    try
        case Handler of
            Fun when is_function(Fun, 1) -> Fun({Name, Data});
            Module -> Module:handle_event(Name, Data)
        end
    catch
        Class:Why ->
            %% only the class and reason: the stack's arguments could be anything
            ?LOG_WARNING(#{what => event_handler_failed, event => Name, class => Class,
                           reason => Why},
                         #{domain => [dcp_proxy], connection => maps:get(connection_name, Data,
                                                                         undefined)})
    end,
    ok.

%% @doc ns_server's traffic monitor as a handler: `{dcp_traffic, Name, Side, MonotonicMs}' to
%% `Pid' on each `traffic' event.
-spec traffic_monitor(pid()) -> fun(({name(), map()}) -> any()).
traffic_monitor(Pid) ->
    fun({traffic, #{connection_name := Name, side := Side, time := Time}}) ->
            Pid ! {dcp_traffic, Name, Side, Time};
       (_) ->
            ok
    end.

-spec traffic_new() -> traffic().
traffic_new() ->
    #{last => undefined, bytes => 0, frames => 0}.

%% @doc Counts `Bytes' and `Frames' read at `NowMs'; once 100 ms passed since the last report
%% (or at the first traffic) returns the `traffic' event's counts and starts counting again.
-spec traffic_note(traffic(), non_neg_integer(), non_neg_integer(), integer()) ->
          {report, map(), traffic()} | {wait, traffic()}.
traffic_note(#{last := Last, bytes := B, frames := F}, Bytes, Frames, NowMs) ->
    B1 = B + Bytes,
    F1 = F + Frames,
    case Last =:= undefined orelse NowMs - Last >= ?TRAFFIC_INTERVAL_MS of
        true ->
            Interval = case Last of
                           undefined -> 0;
                           _ -> NowMs - Last
                       end,
            {report, #{bytes => B1, frames => F1, interval_ms => Interval, time => NowMs},
             #{last => NowMs, bytes => 0, frames => 0}};
        false ->
            {wait, #{last => Last, bytes => B1, frames => F1}}
    end.
