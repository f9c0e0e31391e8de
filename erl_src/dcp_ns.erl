%% @doc ns_server's call shapes over this application, so its callers change little: the replicator
%% started by (producer node, bucket, features, connection number) under ns_server's registered name,
%% `setup_replication/4' and `takeover/3' by node and bucket, `get_partitions/1', `get_connections/1',
%% `get_docs_estimate/3' and `wait_for_data_move/3' over memcached's `STATS dcp-vbtakeover', the
%% connection naming rule with `trim_common_prefix/2' (MB-47866), and `nuke/1' / `get_children/1' of
%% ns_server's `dcp_sup'. The README's compatibility table lists each function and every difference.
%%
%% The node's settings (how a node resolves to an endpoint, the credentials, N, the data-move limits)
%% are given once with `configure/1'; each bucket's incoming replications are its
%% `dcp_replication_manager', registered under ns_server's name for it.
-module(dcp_ns).

-export([configure/1, config/0, server_name/3, start_link/4, setup_replication/4, takeover/3,
         get_partitions/1, get_connections/1, get_docs_estimate/3, wait_for_data_move/3,
         get_connection_name/4, trim_common_prefix/2, nuke/1, get_children/1,
         replication_features/1, memcached_stats/3]).

-export_type([config/0]).

-define(CONFIG_KEY, {?MODULE, config}).
-define(MIN_NODE_NAME, 35).
%% ns_server's `dcp_move_done_limit' and its poll interval (?VBUCKET_POLL_INTERVAL)
-define(DEFAULT_DONE_LIMIT, 1000).
-define(DEFAULT_POLL_MS, 100).
-define(STAT, 16#10).
-define(MC_TIMEOUT, 10000).

%% `resolve' and `credentials' as `dcp_replication_manager:opts()'; `connections' (1), `ssl',
%% `replicator' likewise; `move_done_limit' (1000: an estimate below it ends the wait, as ns_server's
%% `dcp_move_done_limit'), `poll_interval' (100 ms), `move_timeout' (infinity: ns_server waits forever).
-type config() :: #{resolve := dcp_replication_manager:resolver(),
                    credentials := fun(() -> {string(), string() | fun(() -> iodata())}),
                    connections => pos_integer(),
                    ssl => false | [ssl:tls_client_option()],
                    replicator => map(),
                    move_done_limit => pos_integer(),
                    poll_interval => pos_integer(),
                    move_timeout => timeout()}.

%% @doc Stores the node's settings (read by every call below and by `dcp_replication_manager:start_link/1').
-spec configure(config()) -> ok.
configure(#{resolve := R, credentials := C} = Config) when is_function(R, 1), is_function(C, 0) ->
    persistent_term:put(?CONFIG_KEY, Config).

-spec config() -> config().
config() ->
    case persistent_term:get(?CONFIG_KEY, undefined) of
        undefined -> error(dcp_ns_not_configured);
        Config -> Config
    end.

%% ---- the replicator by node, bucket, features, connection number ----

%% @doc ns_server's registered name of a replicator: `dcp_replicator-Bucket-Node' (`/N' for N > 0).
-spec server_name(node(), string(), non_neg_integer()) -> atom().
server_name(ProducerNode, Bucket, ConnNum) ->
    Suffix = case ConnNum of
                 0 -> "";
                 _ -> "/" ++ integer_to_list(ConnNum)
             end,
    list_to_atom("dcp_replicator-" ++ Bucket ++ "-" ++ atom_to_list(ProducerNode) ++ Suffix).

%% @doc ns_server's `dcp_replicator:start_link/4': a replication from `ProducerNode' into this node's
%% memcached, registered as `server_name/3' says, named by `get_connection_name/4'. As in ns_server,
%% `{ssl, true}' among the features makes the replication TLS (with the configured `ssl' options) to
%% every node that is not local (`dcp_replication_manager:endpoint/3'); without it both sides are
%% plain. `{ssl, true}' with no `ssl' options configured is `{error, {tls, no_tls_options_configured}}'.
-spec start_link(node(), string(), [{atom(), boolean()}] | [atom()], non_neg_integer()) ->
          {ok, pid()} | {error, term()}.
start_link(ProducerNode, Bucket, RepFeatures, ConnNum) ->
    Config = config(),
    case {wants_tls(RepFeatures), maps:get(ssl, Config, false)} of
        {true, false} -> {error, {tls, no_tls_options_configured}};
        {true, Tls} -> start_replicator(ProducerNode, Bucket, RepFeatures, ConnNum, Tls, Config);
        {false, _} -> start_replicator(ProducerNode, Bucket, RepFeatures, ConnNum, false, Config)
    end.

wants_tls(RepFeatures) ->
    proplists:get_bool(ssl, RepFeatures).

start_replicator(ProducerNode, Bucket, RepFeatures, ConnNum, Ssl, Config) ->
    #{resolve := Resolve, credentials := Credentials} = Config,
    {User, Password} = Credentials(),
    Opts = maps:merge(maps:get(replicator, Config, #{}),
                      #{consumer => dcp_replication_manager:endpoint(node(), Resolve(node()), Ssl),
                        producer => dcp_replication_manager:endpoint(ProducerNode,
                                                                     Resolve(ProducerNode), Ssl),
                        bucket => Bucket, user => User, password => Password,
                        consumer_node => node(),
                        features => replication_features(RepFeatures),
                        name => server_name(ProducerNode, Bucket, ConnNum),
                        connection_name => get_connection_name(node(), ProducerNode, Bucket,
                                                               ConnNum)}),
    dcp_replicator:start_link(Opts).

%% @doc ns_server's feature proplist (or a list of names) as the replicator's features: the ones the
%% handshakes negotiate (`dcp_features'), sorted; `ssl' picks the endpoints (`start_link/4') and
%% `cert_auth' only restarts ns_server's connections, so neither is passed on.
-spec replication_features([{atom(), boolean()}] | [atom()]) -> [dcp_features:feature()].
replication_features(RepFeatures) ->
    Enabled = [F || {F, true} <- RepFeatures] ++ [F || F <- RepFeatures, is_atom(F)],
    lists:usort([F || F <- Enabled, lists:member(F, [xattr, collections, snappy, json, duplex,
                                                     del_times, del_user_xattr,
                                                     set_consumer_name])]).

%% @doc ns_server's `dcp_replicator:setup_replication/4': `Partitions' from `ProducerNode' spread over
%% the connections (V on `V rem ConnectionCount'), all set up at once, the replies merged. The
%% connections are the bucket manager's when it runs one for `ProducerNode' (then `ConnectionCount'
%% must be its count: `{error, {connection_count, N}}' otherwise); else, as in ns_server, the
%% replicators registered by `start_link/4' (`server_name/3'). A connection with vbuckets to set up
%% and no replicator gives `connection_lost' for them (ns_server: a badmatch crash).
-spec setup_replication(node(), string(), [0..1023], pos_integer()) ->
          dcp_consumer_conn:setup_reply() | {error, term()}.
setup_replication(ProducerNode, Bucket, Partitions, ConnectionCount) ->
    case manager_sup(Bucket, ProducerNode) of
        {ok, Sup, ConnectionCount} ->
            dcp_sup:setup_replication(Sup, Partitions);
        {ok, _Sup, Other} ->
            {error, {connection_count, Other}};
        none ->
            setup_registered(ProducerNode, Bucket, Partitions, ConnectionCount)
    end.

manager_sup(Bucket, ProducerNode) ->
    Mgr = dcp_replication_manager:server_name(Bucket),
    try lists:keyfind(ProducerNode, 1, dcp_replication_manager:producers(Mgr)) of
        {_, Sup} -> {ok, Sup, dcp_replication_manager:get_connection_count(Mgr)};
        false -> none
    catch
        exit:{noproc, _} -> none
    end.

setup_registered(ProducerNode, Bucket, Partitions, ConnectionCount) ->
    case dcp_replicator:check_vbuckets(Partitions) of
        {ok, VBs} ->
            Self = self(),
            Tag = make_ref(),
            Calls = [{ConnNum, Wanted, whereis(server_name(ProducerNode, Bucket, ConnNum))}
                     || ConnNum <- lists:seq(0, ConnectionCount - 1),
                        Wanted <- [[VB || VB <- VBs,
                                          dcp_sup:connection_for_vbucket(ConnectionCount, VB)
                                              =:= ConnNum]]],
            Workers = [{Wanted, spawn_monitor(fun() ->
                                                      Self ! {Tag, self(),
                                                              registered_setup(ProducerNode, Rep,
                                                                               Wanted)}
                                              end)}
                       || {_, Wanted, Rep} <- Calls, Wanted =/= []],
            dcp_sup:merge_replies([receive
                                       {Tag, Pid, Reply} ->
                                           erlang:demonitor(Ref, [flush]),
                                           Reply;
                                       {'DOWN', Ref, process, Pid, Reason} ->
                                           dcp_sup:lost(Reason, Wanted)
                                   end || {Wanted, {Pid, Ref}} <- Workers]);
        {error, _} = Error ->
            Error
    end.

registered_setup(ProducerNode, undefined, Wanted) ->
    dcp_sup:lost({not_running, ProducerNode}, Wanted);
registered_setup(ProducerNode, Rep, Wanted) ->
    try
        dcp_replicator:setup_replication(Rep, Wanted)
    catch
        exit:_ -> dcp_sup:lost({not_running, ProducerNode}, Wanted)
    end.

%% @doc ns_server's `dcp_replicator:takeover/3': the vbucket's connection from `ProducerNode' (its
%% registered replicator if `start_link/4' started one, else the bucket manager's) takes it over.
-spec takeover(node(), string(), 0..1023) -> dcp_consumer_conn:setup_reply() | {error, term()}.
takeover(ProducerNode, Bucket, Partition) ->
    Mgr = dcp_replication_manager:server_name(Bucket),
    ConnNum = dcp_sup:connection_for_vbucket(dcp_replication_manager:get_connection_count(Mgr),
                                             Partition),
    Rep = case whereis(server_name(ProducerNode, Bucket, ConnNum)) of
              undefined -> dcp_replication_manager:replicator_for(Mgr, ProducerNode, Partition);
              Pid -> Pid
          end,
    case Rep of
        undefined ->
            {errors, [{{connection_lost, {not_running, ProducerNode}}, {vbucket, Partition}}]};
        _ ->
            dcp_replicator:takeover(Rep, Partition)
    end.

%% @doc ns_server's `dcp_replicator:get_partitions/1': `not_running' where there is no replicator.
-spec get_partitions(pid() | atom()) -> [0..1023] | not_running.
get_partitions(Rep) ->
    try
        dcp_replicator:get_partitions(Rep)
    catch
        exit:{noproc, _} -> not_running;
        exit:{normal, _} -> not_running;
        exit:{{shutdown, _}, _} -> not_running;
        exit:{shutdown, _} -> not_running
    end.

%% @doc ns_server's `dcp_replicator:get_connections/1': the replication consumer connections this
%% node's memcached has for the bucket (from `STATS dcp').
-spec get_connections(string()) -> [string()].
get_connections(Bucket) ->
    {ok, Stats} = memcached_stats(node(), Bucket, <<"dcp">>),
    lists:sort([binary_to_list(binary:part(K, 8, byte_size(K) - 13))
                || {<<"eq_dcpq:replication:", _/binary>> = K, <<"consumer">>} <- Stats,
                   binary:longest_common_suffix([K, <<":type">>]) =:= 5]).

%% ---- the data move (called on the producer node, as ns_server's mover does) ----

%% @doc ns_server's `dcp_replicator:get_docs_estimate/3': this (producer) node's memcached's estimate
%% of what it has left to send of `Partition' to `ConsumerNode', its checkpoint items and status.
-spec get_docs_estimate(string(), 0..1023, node()) ->
          {ok, {non_neg_integer(), non_neg_integer(), binary()}}.
get_docs_estimate(Bucket, Partition, ConsumerNode) ->
    Connection = producer_connection(Bucket, Partition, ConsumerNode),
    {ok, Sock} = mc_connect(node(), Bucket),
    try docs_estimate(Sock, Partition, Connection) after gen_tcp:close(Sock) end.

%% @doc ns_server's `dcp_replicator:wait_for_data_move/3': waits until, for each consumer node, the
%% estimate is below `move_done_limit' with status `backfilling' or `in-memory'
%% (`calculating-item-count' waits on; any other status is an error, as in ns_server).
-spec wait_for_data_move([node()], string(), 0..1023) -> ok | {error, term(), string()}.
wait_for_data_move(Nodes, Bucket, Partition) ->
    Config = config(),
    Limit = maps:get(move_done_limit, Config, ?DEFAULT_DONE_LIMIT),
    Poll = maps:get(poll_interval, Config, ?DEFAULT_POLL_MS),
    Deadline = case maps:get(move_timeout, Config, infinity) of
                   infinity -> infinity;
                   Ms -> erlang:monotonic_time(millisecond) + Ms
               end,
    {ok, Sock} = mc_connect(node(), Bucket),
    try
        wait_loop(Nodes, Sock, Bucket, Partition, Limit, Poll, Deadline)
    after
        gen_tcp:close(Sock)
    end.

wait_loop([], _Sock, _Bucket, _Partition, _Limit, _Poll, _Deadline) ->
    ok;
wait_loop([Node | Rest] = Nodes, Sock, Bucket, Partition, Limit, Poll, Deadline) ->
    Connection = producer_connection(Bucket, Partition, Node),
    {ok, Estimate} = docs_estimate(Sock, Partition, Connection),
    case check_move_done(Estimate, Limit) of
        ok ->
            wait_loop(Rest, Sock, Bucket, Partition, Limit, Poll, Deadline);
        retry ->
            case Deadline =/= infinity andalso erlang:monotonic_time(millisecond) >= Deadline of
                true ->
                    move_error({move_timeout, Estimate}, Bucket, Partition, Connection);
                false ->
                    timer:sleep(Poll),
                    wait_loop(Nodes, Sock, Bucket, Partition, Limit, Poll, Deadline)
            end;
        {error, Context} ->
            move_error(Context, Bucket, Partition, Connection)
    end.

move_error(Context, Bucket, Partition, Connection) ->
    Msg = lists:flatten(io_lib:format("Error getting dcp stats on ~p for bucket ~p, partition ~p, "
                                      "connection ~p: ~p",
                                      [node(), Bucket, Partition, Connection, Context])),
    logger:error(#{what => dcp_wait_for_data_move_failed, bucket => Bucket, vbucket => Partition,
                   connection => Connection, context => Context}, #{domain => [dcp_proxy]}),
    {error, Context, Msg}.

check_move_done({_, _, <<"calculating-item-count">>}, _Limit) ->
    retry;
check_move_done({N, _, Status}, Limit) when Status =:= <<"backfilling">>; Status =:= <<"in-memory">> ->
    case N < Limit of
        true -> ok;
        false -> retry
    end;
check_move_done({_, _, Unexpected}, _Limit) ->
    {error, {unexpected_status, Unexpected}}.

%% The connection the consumer node's replicator opened on this node: the same name both sides use,
%% on the connection the vbucket maps to.
producer_connection(Bucket, Partition, ConsumerNode) ->
    N = dcp_replication_manager:get_connection_count(dcp_replication_manager:server_name(Bucket)),
    get_connection_name(ConsumerNode, node(), Bucket, dcp_sup:connection_for_vbucket(N, Partition)).

docs_estimate(Sock, Partition, Connection) ->
    Key = iolist_to_binary(["dcp-vbtakeover ", integer_to_list(Partition), $\s, Connection]),
    Default = {0, 0, <<"no_status_stat_seen">>},
    case mc_stats(Sock, Key) of
        {ok, Stats} ->
            {ok, lists:foldl(fun({<<"estimate">>, V}, {_, Chk, St}) -> {binary_to_integer(V), Chk, St};
                                ({<<"chk_items">>, V}, {E, _, St}) -> {E, binary_to_integer(V), St};
                                ({<<"status">>, V}, {E, Chk, _}) -> {E, Chk, V};
                                (_, Acc) -> Acc
                             end, Default, Stats)};
        {error, not_my_vbucket} ->
            {ok, Default}
    end.

%% ---- names ----

%% @doc ns_server's connection name (`dcp_replicator:get_connection_name/4').
-spec get_connection_name(node(), node(), string(), non_neg_integer()) -> string().
get_connection_name(ConsumerNode, ProducerNode, Bucket, ConnNum) ->
    dcp_replicator:get_connection_name(ConsumerNode, ProducerNode, Bucket, ConnNum).

%% @doc ns_server's rule for names over 200 characters (MB-47866): the nodes' longest common prefix is
%% cut off both, but no name below 35 characters, and 35 are kept.
-spec trim_common_prefix(node(), node()) -> {string(), string()}.
trim_common_prefix(Consumer, Producer) ->
    C = atom_to_list(Consumer),
    P = atom_to_list(Producer),
    Common = binary:longest_common_prefix([list_to_binary(C), list_to_binary(P)]),
    {cut_name(C, Common), cut_name(P, Common)}.

cut_name(Name, MaxToChop) ->
    Start = case length(Name) - MaxToChop >= ?MIN_NODE_NAME of
                true -> MaxToChop;
                false -> max(0, length(Name) - ?MIN_NODE_NAME)
            end,
    string:slice(Name, Start, ?MIN_NODE_NAME).

%% ---- ns_server's dcp_sup ----

%% @doc ns_server's `dcp_sup:nuke/1': every replication of the bucket stops (each consumer shut in
%% order) and the manager forgets its desired map.
-spec nuke(string()) -> ok.
nuke(Bucket) ->
    try
        dcp_replication_manager:nuke(dcp_replication_manager:server_name(Bucket))
    catch
        exit:{noproc, _} -> ok
    end.

%% @doc ns_server's `dcp_sup:get_children/1': `[{ProducerNode, Pid, worker, [dcp_replicator]}]'.
-spec get_children(string()) -> [{node(), pid(), worker, [dcp_replicator]}].
get_children(Bucket) ->
    Producers = try dcp_replication_manager:producers(dcp_replication_manager:server_name(Bucket))
                catch exit:{noproc, _} -> []
                end,
    [{Node, Pid, worker, [dcp_replicator]}
     || {Node, Sup} <- Producers,
        {_, Pid} <- try dcp_sup:replicators(Sup) catch exit:_ -> [] end,
        is_pid(Pid)].

%% ---- a memcached client for stats ----

%% @doc A stats group of `Node''s memcached (authenticated, bucket selected), as `[{Key, Value}]'.
-spec memcached_stats(node(), string(), binary()) -> {ok, [{binary(), binary()}]} | {error, term()}.
memcached_stats(Node, Bucket, Group) ->
    case mc_connect(Node, Bucket) of
        {ok, Sock} ->
            try mc_stats(Sock, Group) after gen_tcp:close(Sock) end;
        Error ->
            Error
    end.

mc_connect(Node, Bucket) ->
    #{resolve := Resolve, credentials := Credentials} = config(),
    #{host := Host, port := Port} = Resolve(Node),
    {User, Password} = Credentials(),
    Secret = case Password of
                 F when is_function(F, 0) -> F();
                 P -> P
             end,
    case gen_tcp:connect(Host, Port, [binary, {active, false}, {packet, raw}, {nodelay, true}],
                         ?MC_TIMEOUT) of
        {ok, Sock} ->
            Steps = [dcp_commands:sasl_auth_plain(User, Secret, 1),
                     dcp_commands:select_bucket(Bucket, 2)],
            case mc_steps(Sock, Steps) of
                ok -> {ok, Sock};
                Error -> gen_tcp:close(Sock), Error
            end;
        Error ->
            Error
    end.

mc_steps(_Sock, []) ->
    ok;
mc_steps(Sock, [Frame | Rest]) ->
    ok = gen_tcp:send(Sock, Frame),
    case mc_recv(Sock, <<>>) of
        {ok, #{status := 0}, <<>>} -> mc_steps(Sock, Rest);
        {ok, #{status := Status}, _} -> {error, {mcbp_status, mcbp:status_name(Status)}};
        Error -> Error
    end.

mc_stats(Sock, Key) ->
    ok = gen_tcp:send(Sock, dcp_commands:request(?STAT, #{key => Key, opaque => 3})),
    mc_stat_frames(Sock, <<>>, []).

mc_stat_frames(Sock, Buf, Acc) ->
    case mc_recv(Sock, Buf) of
        {ok, #{status := 0, key := <<>>}, _Rest} ->
            {ok, lists:reverse(Acc)};
        {ok, #{status := 0, key := K, value := V}, Rest} ->
            mc_stat_frames(Sock, Rest, [{K, V} | Acc]);
        {ok, #{status := 7}, _} ->
            {error, not_my_vbucket};
        {ok, #{status := Status}, _} ->
            {error, {mcbp_status, Status}};
        Error ->
            Error
    end.

mc_recv(Sock, Buf) ->
    case mcbp:decode(Buf) of
        {ok, Frame, Rest} ->
            {ok, Frame, Rest};
        {more, _} ->
            case gen_tcp:recv(Sock, 0, ?MC_TIMEOUT) of
                {ok, Data} -> mc_recv(Sock, <<Buf/binary, Data/binary>>);
                {error, Reason} -> {error, {recv_failed, Reason}}
            end;
        {error, Reason} ->
            {error, Reason}
    end.
