%% @doc One replication from a producer node to a consumer node for one bucket: a consumer conn and a
%% producer conn proxying each other's bytes, and the calls a cluster manager makes on them.
-module(dcp_replicator).

-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/1, setup_replication/2, takeover/2, get_partitions/1, stats/1,
         get_connection_name/4]).

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

-type endpoint() :: {inet:socket_address() | inet:hostname(), inet:port_number()}.
-type opts() :: #{consumer := endpoint(),
                  producer := endpoint(),
                  bucket := string(),
                  connection_name := string(),
                  user := string(),
                  password := string() | fun(() -> iodata()),
                  features => [dcp_proxy:feature()],
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
                %% processes waiting for the consumer conn's answer to a caller
                helpers = #{} :: #{reference() => pid()}}).

%% ---- API ----

%% @doc Connects both sides and starts proxying. Returns `{error, {consumer | producer, Why}}' when a
%% side cannot connect or handshake (e.g. `{sasl_auth, {mcbp_status, auth_error}}').
%% Options are checked first (`dcp_options'): a bad one is `{error, {bad_option, Key, Value}}' and
%% nothing connects.
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
              restart => transient,
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

%% @doc Replicates exactly `VBuckets' from now on. Never hangs: the answer comes at the latest when
%% `setup_timeout' passes.
-spec setup_replication(pid() | atom(), [0..1023]) ->
          dcp_consumer_conn:setup_reply() | {error, term()}.
setup_replication(Rep, VBuckets) when is_list(VBuckets) ->
    call_or_lost(Rep, {setup_replication, VBuckets}, VBuckets).

-spec takeover(pid() | atom(), 0..1023) -> dcp_consumer_conn:setup_reply() | {error, term()}.
takeover(Rep, VBucket) ->
    call_or_lost(Rep, {takeover, VBucket}, [VBucket]).

%% The consumer conn answers before the pair goes away; should the replicator be gone first (or
%% never have run), the caller still gets the contract's reply.
call_or_lost(Rep, Request, VBuckets) ->
    try
        gen_server:call(Rep, Request, infinity)
    catch
        exit:{Reason, {gen_server, call, _}} -> lost(Reason, VBuckets)
    end.

lost(Reason, VBuckets) ->
    {errors, [{{connection_lost, Reason}, {vbucket, VB}} || VB <- VBuckets]}.

-spec get_partitions(pid() | atom()) -> [0..1023].
get_partitions(Rep) ->
    gen_server:call(Rep, get_partitions, infinity).

%% @doc Both sides' splitter counters and the setup machine's state.
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

%% ---- connect ----

init(#{connection_name := Name} = Opts) ->
    process_flag(trap_exit, true),
    SetupTimeout = maps:get(setup_timeout, Opts, dcp_consumer_conn:default_setup_timeout()),
    case dcp_consumer_conn:start_link(proxy_opts(consumer, Opts), SetupTimeout) of
        {ok, Consumer} ->
            case dcp_producer_conn:start_link(proxy_opts(producer, Opts)) of
                {ok, Producer} ->
                    try dcp_proxy:connect_proxies(Consumer, Producer) of
                        ok ->
                            ?LOG_INFO("~s: replicating ~p -> ~p",
                                      [Name, maps:get(producer, Opts), maps:get(consumer, Opts)],
                                      ?LOG_META),
                            {ok, #state{consumer = Consumer, producer = Producer,
                                        connection_name = Name,
                                        shut_timeout = maps:get(shut_timeout, Opts,
                                                                ?DEFAULT_SHUT_TIMEOUT)}}
                    catch
                        exit:{Reason, {gen_server, call, _}} ->
                            %% a side went away between its handshake and the pairing
                            dcp_proxy:terminate_and_wait([Consumer, Producer], shutdown,
                                                         ?STOP_TIMEOUT),
                            flush_exit(),
                            {stop, {connect_proxies, Reason}}
                    end;
                {error, Reason} ->
                    flush_exit(),
                    dcp_proxy:terminate_and_wait([Consumer], shutdown, ?STOP_TIMEOUT),
                    {stop, Reason}
            end;
        {error, Reason} ->
            flush_exit(),
            {stop, Reason}
    end.

%% A child that failed to start or was stopped here leaves its exit signal in our mailbox.
flush_exit() ->
    receive {'EXIT', _, _} -> flush_exit() after 0 -> ok end.

proxy_opts(Side, #{bucket := Bucket, connection_name := Name, user := User,
                   password := Password} = Opts) ->
    {Host, Port} = maps:get(Side, Opts),
    Base = #{side => Side, host => Host, port => Port, bucket => Bucket,
             connection_name => Name, user => User, password => Password},
    maps:merge(Base, maps:with([features, ssl, splitter, max_frame_size, traffic_monitor,
                                connect_timeout, send_timeout, recbuf, sndbuf], Opts)).

hide_password(#{password := P} = Opts) when is_function(P, 0) ->
    Opts;
hide_password(#{password := P} = Opts) ->
    Opts#{password => fun() -> P end}.

%% ---- set up and take over ----

%% The consumer conn answers (it never hangs); a helper waits for it so that stats and
%% get_partitions stay answerable meanwhile, and turns a lost conn into the contract's errors.
handle_call({setup_replication, VBuckets}, From, #state{consumer = C} = State) ->
    {noreply, answer_later(From, fun() -> dcp_consumer_conn:setup_streams(C, VBuckets) end,
                           VBuckets, State)};
handle_call({takeover, VBucket}, From, #state{consumer = C} = State) ->
    {noreply, answer_later(From, fun() ->
                                         case dcp_consumer_conn:maybe_close_stream(C, VBucket) of
                                             ok -> dcp_consumer_conn:takeover(C, VBucket);
                                             Error -> Error
                                         end
                                 end, [VBucket], State)};
handle_call(get_partitions, _From, #state{consumer = C} = State) ->
    {reply, dcp_consumer_conn:get_partitions(C), State};
handle_call(stats, _From, #state{consumer = C, producer = P} = State) ->
    {reply, #{consumer => dcp_proxy:stats(C), producer => dcp_proxy:stats(P),
              setup => dcp_consumer_conn:setup_info(C)}, State};
handle_call(Request, _From, #state{connection_name = Name} = State) ->
    ?LOG_WARNING("~s: unexpected call ~p", [Name, Request], ?LOG_META),
    {reply, {error, {unknown_request, Request}}, State}.

answer_later(From, Fun, VBuckets, #state{helpers = Helpers} = State) ->
    {Pid, Ref} = spawn_monitor(fun() ->
                                       Reply = try
                                                   Fun()
                                               catch
                                                   exit:{Reason, {gen_server, call, _}} ->
                                                       lost(Reason, VBuckets)
                                               end,
                                       gen_server:reply(From, Reply)
                               end),
    State#state{helpers = Helpers#{Ref => Pid}}.

handle_cast(Msg, #state{connection_name = Name} = State) ->
    ?LOG_WARNING("~s: unexpected cast ~p", [Name, Msg], ?LOG_META),
    {noreply, State}.

%% ---- stop: a lost side ends the replication ----

handle_info({'EXIT', Pid, Reason}, #state{consumer = C, producer = P} = State)
  when Pid =:= C; Pid =:= P ->
    {stop, Reason, State};
handle_info({'DOWN', Ref, process, _Pid, _Reason}, #state{helpers = Helpers} = State)
  when is_map_key(Ref, Helpers) ->
    {noreply, State#state{helpers = maps:remove(Ref, Helpers)}};
handle_info(Info, #state{connection_name = Name} = State) ->
    ?LOG_WARNING("~s: unexpected message ~0p", [Name, Info], ?LOG_META),
    {noreply, State}.

%% On an orderly stop the consumer's streams are closed first (bounded), so that a replicator
%% started next for the same vbuckets does not meet "stream exists"; only the consumer, so that
%% a failed-over producer cannot slow this down.
terminate(Reason, #state{consumer = C, producer = P, connection_name = Name,
                         shut_timeout = ShutTimeout, helpers = Helpers}) ->
    case is_orderly(Reason) andalso is_process_alive(C) of
        true ->
            Shut = try dcp_consumer_conn:shut_connection(C, ShutTimeout)
                   catch exit:{Why, _} -> {error, Why}
                   end,
            ?LOG_INFO("~s: consumer shut: ~0p", [Name, Shut], ?LOG_META);
        false ->
            ok
    end,
    dcp_proxy:terminate_and_wait([C, P], Reason, ?STOP_TIMEOUT),
    %% the consumer conn answered its callers before it went; let those answers reach them
    %% before our own exit does (a caller seeing our exit first would get the fallback reply)
    wait_helpers(maps:keys(Helpers), erlang:monotonic_time(millisecond) + ?STOP_TIMEOUT),
    ?LOG_INFO("~s: replicator stopped: ~0p", [Name, Reason], ?LOG_META).

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
