%% @doc One replication from a producer node to a consumer node for one bucket: a consumer conn and a
%% producer conn proxying each other's bytes, and the calls a cluster manager makes on them.
-module(dcp_replicator).

-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/1, setup_replication/2, takeover/2, get_partitions/1, stats/1,
         get_connection_name/4, check_vbuckets/1, real_cause/1]).

%% embedding: a child spec for the user's supervisor, an orderly stop
-export([child_spec/1, stop/1]).

%% gen_server callbacks
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([opts/0]).

-define(LOG_META, #{domain => [dcp_proxy]}).
-define(MAX_CONNECTION_NAME, 200).
-define(MIN_NODE_NAME, 35).
-define(MAX_BUCKET_IN_NAME, 60).
-define(DEFAULT_SHUT_TIMEOUT, 10000).
-define(STOP_TIMEOUT, 5000).

%% A node to connect to: `{Host, Port}' (TLS as the replicator's `ssl' option says), or a map whose
%% `ssl' sets TLS for this node alone; `local => true' (the replicator's own node's memcached, on
%% localhost as ns_server talks to it) is plain TCP whatever the `ssl' option.
-type endpoint() :: {inet:socket_address() | inet:hostname(), inet:port_number()}
                  | #{host := inet:socket_address() | inet:hostname(),
                      port := inet:port_number(),
                      ssl => false | [ssl:tls_client_option()],
                      local => boolean()}.
-type opts() :: #{consumer := endpoint(),
                  producer := endpoint(),
                  bucket := string(),
                  connection_name := string(),
                  user := string(),
                  password := string() | fun(() -> iodata()),
                  features => dcp_features:features(),
                  consumer_node => atom() | string() | binary(),
                  ssl => false | [ssl:tls_client_option()],
                  setup_timeout => timeout(),
                  shut_timeout => timeout(),
                  traffic_monitor => pid(),
                  name => atom(),
                  splitter => dcp_proxy:splitter_opt(),
                  max_frame_size => pos_integer(),
                  connect_timeout => timeout(),
                  send_timeout => timeout(),
                  recbuf => pos_integer(),
                  sndbuf => pos_integer()}.

-record(state, {consumer :: pid(),
                producer :: pid(),
                connection_name :: string(),
                shut_timeout :: timeout(),
                setup_timeout :: timeout(),
                %% `connecting' until both sides are connected and paired
                %% lost: a side (or the pairing) went; the replicator is stopping
                status = connecting :: connecting | connected | lost,
                pairer :: undefined | pid(),
                %% processes waiting for the consumer conn's answer to a caller; while connecting
                %% they wait for the pair first
                helpers = #{} :: #{reference() => {pid(), connecting | connected}}}).

%% Past the setup deadline an answer is owed within this many ms more, whatever the peers do.
-define(ANSWER_MARGIN, 1000).
%% Calls to the replication's own processes (they never block on a socket).
-define(CALL_TIMEOUT, 5000).
-define(MAX_VBUCKET, 1023).

%% ---- API ----

%% @doc Starts the replicator and returns at once (MB-50442): both sides connect and handshake in
%% the background, each within `connect_timeout'. A setup or takeover asked for meanwhile waits for
%% the pair (within its `setup_timeout'). A side that cannot connect or handshake ends the
%% replicator with exit reason `{consumer | producer, Why}' (e.g. `{consumer, {sasl_auth,
%% {mcbp_status, auth_error}}}', `{producer, {connect_failed, econnrefused}}'); the setups that were
%% waiting are answered `{errors, [{{connection_lost, {Side, Why}}, {vbucket, V}}, ...]}'.
%% Options are checked first (`dcp_options'): a bad one is `{error, {bad_option, Key, Value}}'
%% returned at once, and nothing connects (features not ns_server's: `{error, {bad_option,
%% features, V}}', `dcp_features:parse/1').
-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(Opts) ->
    case dcp_options:replicator(Opts) of
        {ok, Checked} -> start_checked(Checked);
        {error, _} = Error -> Error
    end.

%% @doc A child spec for `start_link(Opts)' (id `{dcp_replicator, ConnectionName}'); its start
%% arguments hold the password wrapped (`dcp_secret'), so no supervisor report can show it. Raises
%% `error({bad_option, Key, Value})' for options `start_link/1' would refuse.
-spec child_spec(opts()) -> supervisor:child_spec().
child_spec(Opts) ->
    case dcp_options:replicator(Opts) of
        {ok, #{connection_name := Name} = Checked} ->
            #{id => {?MODULE, Name},
              start => {?MODULE, start_link, [Checked]},
              %% an expected failure ends a replicator with {shutdown, Why}: restart it anyway
              restart => permanent,
              %% the orderly stop: the consumer shut (shut_timeout), then the pair's own stop
              shutdown => maps:get(shut_timeout, Checked, ?DEFAULT_SHUT_TIMEOUT) + 4 * ?STOP_TIMEOUT,
              type => worker,
              modules => [?MODULE]};
        {error, Reason} ->
            erlang:error(Reason)
    end.

%% @doc Stops the replicator the orderly way (its consumer streams closed within shut_timeout) and
%% waits until it is gone.
-spec stop(pid() | atom()) -> ok.
stop(Rep) ->
    gen_server:stop(Rep, shutdown, infinity).

start_checked(#{connection_name := Name} = Opts) ->
    %% ep-engine and ns_server depend on this prefix
    case lists:prefix("replication:", Name) of
        true ->
            Opts1 = hide_password(Opts),
            case maps:get(name, Opts, undefined) of
                undefined -> gen_server:start_link(?MODULE, Opts1, []);
                Reg -> gen_server:start_link({local, Reg}, ?MODULE, Opts1, [])
            end;
        false ->
            {error, {bad_connection_name, Name}}
    end.

%% @doc Replicates exactly `VBuckets' from now on. Never hangs: the answer comes at the latest about a
%% second after `setup_timeout' passes, whatever the peers do. A list that is not a proper list of
%% integers in 0..1023 is `{error, {bad_vbucket, X}}' (`X' the first bad element, or the whole term
%% when it is not a proper list); duplicates count once.
-spec setup_replication(pid() | atom(), [0..1023]) ->
          dcp_consumer_conn:setup_reply() | {error, term()}.
setup_replication(Rep, VBuckets) ->
    case check_vbuckets(VBuckets) of
        {ok, Unique} -> call_or_lost(Rep, {setup_replication, Unique}, Unique);
        {error, _} = Error -> Error
    end.

-spec takeover(pid() | atom(), 0..1023) -> dcp_consumer_conn:setup_reply() | {error, term()}.
takeover(Rep, VBucket) when is_integer(VBucket), VBucket >= 0, VBucket =< ?MAX_VBUCKET ->
    call_or_lost(Rep, {takeover, VBucket}, [VBucket]);
takeover(_Rep, VBucket) ->
    {error, {bad_vbucket, VBucket}}.

%% @doc `{ok, SortedUnique}' for a proper list of vbuckets, else `{error, {bad_vbucket, X}}'.
-spec check_vbuckets(term()) -> {ok, [0..1023]} | {error, {bad_vbucket, term()}}.
check_vbuckets(VBuckets) ->
    case is_proper_list(VBuckets) of
        true ->
            case [VB || VB <- VBuckets,
                        not (is_integer(VB) andalso VB >= 0 andalso VB =< ?MAX_VBUCKET)] of
                [] -> {ok, lists:usort(VBuckets)};
                [Bad | _] -> {error, {bad_vbucket, Bad}}
            end;
        false ->
            {error, {bad_vbucket, VBuckets}}
    end.

is_proper_list([]) -> true;
is_proper_list([_ | T]) -> is_proper_list(T);
is_proper_list(_) -> false.

%% The consumer conn answers before the pair goes away; should the replicator be gone first (or
%% never have run), the caller still gets the contract's reply.
call_or_lost(Rep, Request, VBuckets) when is_pid(Rep); is_atom(Rep) ->
    try
        gen_server:call(Rep, Request, infinity)
    catch
        exit:{Reason, {gen_server, call, _}} -> lost(real_cause(Reason), VBuckets)
    end;
call_or_lost(Rep, _Request, _VBuckets) ->
    {error, {bad_replicator, Rep}}.

lost(Reason, VBuckets) ->
    {errors, [{{connection_lost, Reason}, {vbucket, VB}} || VB <- VBuckets]}.

%% What was lost, without the call-exit wrapping (`{Reason, {gen_server, call, Args}}') or the
%% partner's (`{partner_down, Reason}').
-spec real_cause(term()) -> term().
real_cause({Reason, {gen_server, call, _}}) -> real_cause(Reason);
real_cause({partner_down, Reason}) -> real_cause(Reason);
real_cause({shutdown, Reason}) when Reason =/= shut -> real_cause(Reason);
real_cause(Reason) -> Reason.

%% @doc The vbuckets replicated now (`[]' while connecting).
-spec get_partitions(pid() | atom()) -> [0..1023].
get_partitions(Rep) ->
    gen_server:call(Rep, get_partitions, infinity).

%% @doc Both sides' splitter counters and the setup machine's state. Answered while a socket is
%% stuck; a part that cannot be had in time is `#{error => Why}'.
-spec stats(pid() | atom()) -> #{consumer := map(), producer := map(), setup := map()}.
stats(Rep) ->
    gen_server:call(Rep, stats, infinity).

%% @doc ns_server's connection name: `replication:Producer->Consumer:Bucket' (plus `/N' for
%% connection N > 0). A name over 200 characters drops the nodes' common prefix (keeping 35
%% characters of each), keeps 60 characters of the bucket and ends with the base64 SHA-1 of the long
%% name, so distinct long names stay distinct.
-spec get_connection_name(atom() | string(), atom() | string(), string(), non_neg_integer()) ->
          string().
get_connection_name(ConsumerNode, ProducerNode, Bucket, ConnNum) ->
    Consumer = node_string(ConsumerNode),
    Producer = node_string(ProducerNode),
    Suffix = case ConnNum of
                 0 -> "";
                 _ -> "/" ++ integer_to_list(ConnNum)
             end,
    LongName = "replication:" ++ Producer ++ "->" ++ Consumer ++ ":" ++ Bucket ++ Suffix,
    case length(LongName) =< ?MAX_CONNECTION_NAME of
        true ->
            LongName;
        false ->
            Common = common_prefix_length(Consumer, Producer),
            Hash = base64:encode_to_string(crypto:hash(sha, LongName)),
            "replication:" ++ cut_node_name(Producer, Common) ++ "->"
                ++ cut_node_name(Consumer, Common) ++ ":"
                ++ lists:sublist(Bucket, ?MAX_BUCKET_IN_NAME) ++ ":" ++ Hash
    end.

node_string(Node) when is_atom(Node) -> atom_to_list(Node);
node_string(Node) when is_list(Node) -> Node.

common_prefix_length([C | Rest1], [C | Rest2]) -> 1 + common_prefix_length(Rest1, Rest2);
common_prefix_length(_, _) -> 0.

%% Drops up to `Common' leading characters, never leaving fewer than 35, then keeps 35.
cut_node_name(Name, Common) ->
    Drop = min(Common, max(0, length(Name) - ?MIN_NODE_NAME)),
    lists:sublist(lists:nthtail(Drop, Name), ?MIN_NODE_NAME).

%% ---- connect: in the background ----

init(#{connection_name := Name} = Opts) ->
    process_flag(trap_exit, true),
    dcp_log:set_process_metadata(dcp_log:ctx(Name, replicator, maps:get(bucket, Opts))),
    SetupTimeout = maps:get(setup_timeout, Opts, dcp_consumer_conn:default_setup_timeout()),
    %% both return at once; each connects in its own connector process
    {ok, Consumer} = dcp_consumer_conn:start_link(proxy_opts(consumer, Opts), SetupTimeout),
    {ok, Producer} = dcp_producer_conn:start_link(proxy_opts(producer, Opts)),
    Self = self(),
    Pairer = spawn_link(fun() ->
                                ok = dcp_proxy:connect_proxies(Consumer, Producer, infinity),
                                Self ! {paired, self()}
                        end),
    dcp_log:info(connecting, #{connection => Name, producer => shown(maps:get(producer, Opts)),
                               consumer => shown(maps:get(consumer, Opts))}),
    {ok, #state{consumer = Consumer, producer = Producer, connection_name = Name,
                pairer = Pairer, setup_timeout = setup_timeout(SetupTimeout),
                shut_timeout = maps:get(shut_timeout, Opts, ?DEFAULT_SHUT_TIMEOUT)}}.

setup_timeout(T) when T =:= infinity; is_integer(T), T >= 0 -> T;
setup_timeout(_) -> dcp_consumer_conn:default_setup_timeout().

%% An endpoint as a log shows it: its TLS options (a private key among them) as `tls'.
shown(#{ssl := Ssl} = Endpoint) when Ssl =/= false -> Endpoint#{ssl => tls};
shown(Endpoint) -> Endpoint.

proxy_opts(Side, #{bucket := Bucket, connection_name := Name, user := User,
                   password := Password} = Opts) ->
    {Host, Port, Ssl} = endpoint(maps:get(Side, Opts), maps:get(ssl, Opts, false)),
    Base = #{side => Side, host => Host, port => Port, bucket => Bucket, ssl => Ssl,
             connection_name => Name, user => User, password => Password},
    maps:merge(Base, maps:with([features, consumer_node, splitter, max_frame_size,
                                traffic_monitor, event_handler, connect_timeout, send_timeout,
                                recbuf, sndbuf], Opts)).

%% An endpoint's host, port and TLS: its own `ssl', else plain when `local', else the global one.
endpoint({Host, Port}, Ssl) ->
    {Host, Port, Ssl};
endpoint(#{host := Host, port := Port} = Endpoint, Ssl) ->
    case Endpoint of
        #{ssl := Own} -> {Host, Port, Own};
        #{local := true} -> {Host, Port, false};
        _ -> {Host, Port, Ssl}
    end.

hide_password(#{password := P} = Opts) when is_function(P, 0) ->
    Opts;
hide_password(#{password := P} = Opts) ->
    Opts#{password => fun() -> P end}.

%% ---- set up and take over ----

%% The consumer conn answers (it never hangs); a helper waits for it so that stats and
%% get_partitions stay answerable meanwhile, and turns a lost conn into the contract's errors.
handle_call({setup_replication, VBuckets}, From, State) ->
    {noreply, answer_later(From, {setup, VBuckets}, VBuckets, State)};
handle_call({takeover, VBucket}, From, State) ->
    {noreply, answer_later(From, {takeover, VBucket}, [VBucket], State)};
handle_call(get_partitions, _From, #state{status = connecting} = State) ->
    {reply, [], State};
handle_call(get_partitions, From, #state{consumer = C} = State) ->
    reply_later(From, fun() -> bounded(fun() -> dcp_consumer_conn:get_partitions(C) end, []) end),
    {noreply, State};
handle_call(stats, From, #state{consumer = C, producer = P, status = Status} = State) ->
    reply_later(
      From,
      fun() ->
              Setup = case Status of
                          connecting -> #{state => connecting};
                          connected -> bounded(fun() -> dcp_consumer_conn:setup_info(C) end, error)
                      end,
              #{consumer => bounded(fun() -> dcp_proxy:stats(C) end, error),
                producer => bounded(fun() -> dcp_proxy:stats(P) end, error),
                setup => Setup}
      end),
    {noreply, State};
handle_call(Request, _From, #state{connection_name = Name} = State) ->
    ?LOG_WARNING("~s: unexpected call ~p", [Name, Request], ?LOG_META),
    {reply, {error, {unknown_request, Request}}, State}.

%% Answers `From' with `Answer()' from a process of its own: a caller waiting on a busy connection
%% process (a flood of stream ends ahead of it in the consumer conn's mailbox) holds up neither
%% this process nor the callers behind it.
reply_later(From, Answer) ->
    _ = spawn(fun() -> gen_server:reply(From, Answer()) end),
    ok.

%% A call to one of our processes, answered in at most ?CALL_TIMEOUT ms (they never block on a
%% socket; the bound is for a process that is going away).
bounded(Fun, Default) ->
    Self = self(),
    Ref = make_ref(),
    {Pid, MRef} = spawn_monitor(fun() -> Self ! {Ref, Fun()} end),
    receive
        {Ref, Result} ->
            erlang:demonitor(MRef, [flush]),
            Result;
        {'DOWN', MRef, process, Pid, Reason} ->
            fallback(Default, real_cause(Reason))
    after ?CALL_TIMEOUT ->
            exit(Pid, kill),
            erlang:demonitor(MRef, [flush]),
            fallback(Default, timeout)
    end.

fallback(error, Why) -> #{error => Why};
fallback(Default, _Why) -> Default.

%% The helper answers by `setup_timeout' plus ?ANSWER_MARGIN from now, whatever happens: while
%% connecting it waits for the pair, then asks the consumer conn, and past the deadline answers
%% `setup_timeout' for each vbucket itself.
answer_later(From, Work, VBuckets, #state{helpers = Helpers, setup_timeout = Timeout,
                                          status = Status, consumer = C} = State) ->
    Deadline = case Timeout of
                   infinity -> infinity;
                   _ -> erlang:monotonic_time(millisecond) + Timeout + ?ANSWER_MARGIN
               end,
    {Pid, Ref} = spawn_monitor(
                   fun() ->
                           Reply = case Status of
                                       connected -> run(Work, C, VBuckets, Deadline);
                                       connecting -> wait_pair(Work, C, VBuckets, Deadline)
                                   end,
                           gen_server:reply(From, Reply)
                   end),
    State#state{helpers = Helpers#{Ref => {Pid, Status}}}.

wait_pair(Work, C, VBuckets, Deadline) ->
    receive
        paired -> run(Work, C, VBuckets, Deadline);
        {lost, Reason} -> lost(Reason, VBuckets)
    after left(Deadline) ->
            timed_out(VBuckets)
    end.

run(Work, C, VBuckets, Deadline) ->
    try
        do(Work, C, Deadline)
    catch
        exit:{timeout, {gen_server, call, _}} -> timed_out(VBuckets);
        exit:{Reason, {gen_server, call, _}} -> lost(real_cause(Reason), VBuckets)
    end.

do({setup, VBuckets}, C, Deadline) ->
    gen_server:call(C, {setup_streams, VBuckets}, left(Deadline));
do({takeover, VBucket}, C, Deadline) ->
    case gen_server:call(C, {maybe_close_stream, VBucket}, left(Deadline)) of
        ok -> gen_server:call(C, {takeover, VBucket}, left(Deadline));
        Error -> Error
    end.

timed_out(VBuckets) ->
    {errors, [{setup_timeout, {vbucket, VB}} || VB <- VBuckets]}.

left(infinity) -> infinity;
left(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).

handle_cast(Msg, #state{connection_name = Name} = State) ->
    ?LOG_WARNING("~s: unexpected cast ~p", [Name, Msg], ?LOG_META),
    {noreply, State}.

%% ---- paired; stop: a lost side ends the replication ----

handle_info({paired, Pid}, #state{pairer = Pid, helpers = Helpers,
                                  connection_name = Name} = State) ->
    dcp_log:notice(replicating, #{connection => Name}),
    _ = [H ! paired || {H, connecting} <- maps:values(Helpers)],
    {noreply, State#state{status = connected,
                          helpers = maps:map(fun(_, {H, _}) -> {H, connected} end, Helpers)}};
handle_info({'EXIT', Pid, normal}, #state{pairer = Pid} = State) ->
    {noreply, State#state{pairer = undefined}};
handle_info({'EXIT', Pid, {_, {gen_server, call, [Side | _]}}},
            #state{pairer = Pid, consumer = C, producer = P} = State) when Side =:= C; Side =:= P ->
    %% the pairing failed because a side went (`noproc' if it was gone before the call): that
    %% side's own exit, which comes too (it is linked), names the cause
    {noreply, State#state{pairer = undefined}};
handle_info({'EXIT', Pid, Reason}, #state{consumer = C, producer = P, pairer = Pairer} = State)
  when Pid =:= C; Pid =:= P; Pid =:= Pairer ->
    %% an expected failure of a side ends us the same way: {shutdown, Why}, no crash report.
    %% Lost, not connected: terminate must not shut the consumer conn, which is going down with
    %% its partner anyway (its node drops the streams with the connection). A shut call reaching
    %% it before its partner's 'DOWN' would join a setup in progress and change what that setup's
    %% caller is told (the vbuckets the shut closes instead of the one lost with the partner).
    {stop, dcp_log:exit_reason(real_cause(Reason)), State#state{status = lost}};
handle_info({'DOWN', Ref, process, _Pid, _Reason}, #state{helpers = Helpers} = State)
  when is_map_key(Ref, Helpers) ->
    {noreply, State#state{helpers = maps:remove(Ref, Helpers)}};
handle_info(Info, #state{connection_name = Name} = State) ->
    ?LOG_WARNING("~s: unexpected message ~0p", [Name, Info], ?LOG_META),
    {noreply, State}.

%% On an orderly stop (asked for, not a lost side) the consumer's streams are closed first
%% (bounded), so that a replicator
%% started next for the same vbuckets does not meet "stream exists"; only the consumer, so that
%% a failed-over producer cannot slow this down.
terminate(Reason, #state{consumer = C, producer = P, connection_name = Name, status = Status,
                         shut_timeout = ShutTimeout, helpers = Helpers, pairer = Pairer}) ->
    case Status =:= connected andalso is_orderly(Reason) andalso is_process_alive(C) of
        true ->
            Shut = try dcp_consumer_conn:shut_connection(C, ShutTimeout)
                   catch exit:{Why, _} -> {error, Why}
                   end,
            ?LOG_INFO("~s: consumer shut: ~0p", [Name, Shut], ?LOG_META);
        false ->
            ok
    end,
    _ = is_pid(Pairer) andalso exit(Pairer, kill),
    %% helpers still waiting for the pair: the connection is lost
    _ = [H ! {lost, real_cause(Reason)} || {H, connecting} <- maps:values(Helpers)],
    dcp_proxy:terminate_and_wait([C, P], Reason, ?STOP_TIMEOUT),
    %% the consumer conn answered its callers before it went; let those answers reach them
    %% before our own exit does (a caller seeing our exit first would get the fallback reply)
    wait_helpers(maps:keys(Helpers), erlang:monotonic_time(millisecond) + ?STOP_TIMEOUT),
    dcp_log:stopped(replicator_stopped, Reason).

wait_helpers([], _Deadline) ->
    ok;
wait_helpers([Ref | Refs], Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {'DOWN', Ref, process, _, _} -> wait_helpers(Refs, Deadline)
    after Left ->
            ok
    end.

is_orderly(normal) -> true;
is_orderly(shutdown) -> true;
is_orderly({shutdown, _}) -> true;
is_orderly(_) -> false.
