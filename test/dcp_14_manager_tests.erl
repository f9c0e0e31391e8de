%% @doc The per-bucket replication manager against kv_sim nodes: map changes start and stop exactly
%% the right connections and streams, a connection-count change re-spreads the vbuckets, a failing
%% stream end on one connection shows in the merged reply while the others settle, a dead producer
%% costs only its own vbuckets, two- and three-node maps up and down with the connections counted on
%% each node; the streams each producer connection holds, read on the producer node (STATS
%% dcp-vbtakeover); TLS per endpoint (remote producers on their TLS port, the local consumer plain,
%% checked on what each node accepted; an untrusted node fails alone and fast); ns_server's call
%% shapes (dcp_ns); the rebalance demo with faults at a small size.
-module(dcp_14_manager_tests).

-include_lib("eunit/include/eunit.hrl").

-define(PASSWORD, "Mgr-Secret-14").
-define(BUCKET, "default").
-define(VBS, 16).
-define(BACKSTOP, 60).

%% ---- helpers ----

start_kv(Role, Extra) ->
    {ok, Pid} = kv_sim:start(maps:merge(#{role => Role, password => ?PASSWORD, vbuckets => ?VBS,
                                          docs_per_vbucket => 20, value_size => 64}, Extra)),
    Pid.

stop_kv(Pid) ->
    try kv_sim:stop(Pid) catch exit:_ -> ok end.

%% Node names resolve to the kv_sim nodes of `Nodes' (`#{NodeName => Pid}').
resolver(Nodes) ->
    Ports = maps:map(fun(_, Pid) -> kv_sim:port(Pid) end, Nodes),
    fun(Node) -> #{host => {127, 0, 0, 1}, port => maps:get(Node, Ports), local => false} end.

%% A manager whose link goes to a holder process, so a manager that stops never takes the test along.
start_manager(ConsumerNode, Nodes, Extra) ->
    Self = self(),
    Holder = spawn(fun() ->
                           process_flag(trap_exit, true),
                           Opts = maps:merge(#{resolve => resolver(Nodes),
                                               credentials => fun() -> {"Administrator", ?PASSWORD} end,
                                               consumer_node => ConsumerNode, name => undefined,
                                               replicator => #{setup_timeout => 10000}},
                                             Extra),
                           Self ! {manager, self(), dcp_replication_manager:start_link(?BUCKET, Opts)},
                           receive stop -> ok end
                   end),
    receive {manager, Holder, {ok, Mgr}} -> Mgr end.

stop_manager(Mgr) ->
    catch dcp_replication_manager:stop(Mgr),
    ok.

count(Type, KvPid) ->
    length([N || {T, N} <- kv_sim:connections(KvPid), T =:= Type]).

wait_connections(KvPid, Producers, Consumers) ->
    dcp_test_lib:wait_until(fun() -> {count(producer, KvPid), count(consumer, KvPid)}
                                         =:= {Producers, Consumers} end).

%% Every replicator holds only its own vbuckets (V rem N) and no vbucket is held twice.
assert_spread(Mgr, N) ->
    Held = lists:append(
             [begin
                  VBs = dcp_replicator:get_partitions(Rep),
                  [?assertEqual(ConnNum, VB rem N) || VB <- VBs],
                  VBs
              end || {_Node, Sup} <- dcp_replication_manager:producers(Mgr),
                     {ConnNum, Rep} <- dcp_sup:replicators(Sup)]),
    ?assertEqual(lists:usort(Held), lists:sort(Held)),
    lists:sort(Held).

%% The vbuckets each producer connection of node `Node' streams, as its memcached reports them to
%% `STATS dcp-vbtakeover <vb> <connection>' (any status but `does_not_exist'): `[{Name, [VB]}]'.
%% `dcp_ns' must be configured with a resolver that knows `Node'.
producer_streams(Node, Kv) ->
    lists:sort([{binary_to_list(Name), [VB || VB <- lists:seq(0, ?VBS - 1),
                                             stream_status(Node, VB, Name) =/= <<"does_not_exist">>]}
                || {producer, Name} <- kv_sim:connections(Kv)]).

stream_status(Node, VB, Name) ->
    Group = iolist_to_binary(["dcp-vbtakeover ", integer_to_list(VB), " ", Name]),
    {ok, Stats} = dcp_ns:memcached_stats(Node, ?BUCKET, Group),
    proplists:get_value(<<"status">>, Stats).

%% What producer node `P' should stream to consumer node `C' with `N' connections: connection I holds
%% the vbuckets V with V rem N = I (connections with none left out).
expected_streams(C, P, N, VBs) ->
    lists:sort([{dcp_ns:get_connection_name(C, P, ?BUCKET, I), Held}
                || I <- lists:seq(0, N - 1), Held <- [[V || V <- VBs, V rem N =:= I]], Held =/= []]).

wait_streams(Node, Kv, Expected) ->
    dcp_test_lib:wait_until(fun() ->
                                    [S || {_, VBs} = S <- producer_streams(Node, Kv), VBs =/= []]
                                        =:= Expected
                            end).

wait_digests(From, To, VBs) ->
    [dcp_test_lib:wait_until(fun() -> kv_sim:digest(To, VB) =:= kv_sim:digest(From, VB) end)
     || VB <- VBs],
    ok.

with(Title, Setup, Body) ->
    {Title, {setup, Setup, fun({_, Cleanup}) -> Cleanup() end,
             fun({Env, _}) -> {timeout, ?BACKSTOP, ?_test(Body(Env))} end}}.

%% Two producers and a consumer as in ns_server's incoming replications of one node.
two_producers(Extra) ->
    fun() ->
            P1 = start_kv(producer, #{}),
            P2 = start_kv(producer, #{seed => 7}),
            C = start_kv(consumer, #{}),
            Nodes = #{'p1@h' => P1, 'p2@h' => P2, 'c@h' => C},
            ok = dcp_ns:configure(#{resolve => resolver(Nodes),
                                    credentials => fun() -> {"Administrator", ?PASSWORD} end}),
            Mgr = start_manager('c@h', Nodes, Extra),
            {#{p1 => P1, p2 => P2, c => C, mgr => Mgr},
             fun() -> stop_manager(Mgr), [stop_kv(P) || P <- [C, P1, P2]] end}
    end.

%% ---- the manager ----

manager_test_() ->
    [with("map changes start and stop exactly the right connections and streams",
          two_producers(#{connections => 2}),
          fun(#{p1 := P1, p2 := P2, c := C, mgr := Mgr}) ->
                  ?assertEqual([], dcp_replication_manager:get_actual_replications(Mgr)),
                  ?assertEqual({error, {bad_replications, [{'p1@h', [1024]}]}},
                               dcp_replication_manager:set_desired_replications(Mgr, [{'p1@h', [1024]}])),
                  Map1 = [{'p1@h', [0, 1, 2, 3, 4, 5]}, {'p2@h', [8, 9]}],
                  ?assertEqual(ok, dcp_replication_manager:set_desired_replications(Mgr, Map1)),
                  ?assertEqual(Map1, dcp_replication_manager:get_actual_replications(Mgr)),
                  wait_connections(P1, 2, 0), wait_connections(P2, 2, 0),
                  wait_connections(C, 0, 4),
                  wait_digests(P1, C, [0, 1, 2, 3, 4, 5]),
                  %% each producer connection streams exactly its vbuckets
                  wait_streams('p1@h', P1, expected_streams('c@h', 'p1@h', 2, [0, 1, 2, 3, 4, 5])),
                  wait_streams('p2@h', P2, expected_streams('c@h', 'p2@h', 2, [8, 9])),
                  %% p2 goes, p1 gives up 0..3 and gains 6: p2's two connections close
                  Map2 = [{'p1@h', [4, 5, 6]}],
                  ?assertEqual(ok, dcp_replication_manager:set_desired_replications(Mgr, Map2)),
                  ?assertEqual(Map2, dcp_replication_manager:get_actual_replications(Mgr)),
                  wait_connections(P2, 0, 0), wait_connections(C, 0, 2),
                  ?assertEqual(2, count(producer, P1)),
                  ?assertEqual([4, 5, 6], assert_spread(Mgr, 2)),
                  wait_streams('p1@h', P1, expected_streams('c@h', 'p1@h', 2, [4, 5, 6])),
                  %% a vbucket moves between producers
                  Map3 = [{'p1@h', [5, 6]}, {'p2@h', [4]}],
                  ?assertEqual(ok, dcp_replication_manager:set_desired_replications(Mgr, Map3)),
                  ?assertEqual(Map3, dcp_replication_manager:get_actual_replications(Mgr)),
                  wait_streams('p1@h', P1, expected_streams('c@h', 'p1@h', 2, [5, 6])),
                  wait_streams('p2@h', P2, expected_streams('c@h', 'p2@h', 2, [4])),
                  ?assertEqual(ok, dcp_replication_manager:set_desired_replications(Mgr, [])),
                  ?assertEqual([], dcp_replication_manager:get_actual_replications(Mgr)),
                  wait_connections(P1, 0, 0), wait_connections(P2, 0, 0),
                  wait_connections(C, 0, 0)
          end),
     with("a connection-count change re-spreads with no vbucket lost or doubled",
          two_producers(#{connections => 2}),
          fun(#{p1 := P1, c := C, mgr := Mgr}) ->
                  VBs = lists:seq(0, ?VBS - 1),
                  ?assertEqual(ok, dcp_replication_manager:set_desired_replications(
                                     Mgr, [{'p1@h', VBs}])),
                  ?assertEqual(VBs, assert_spread(Mgr, 2)),
                  [begin
                       ?assertEqual(ok, dcp_replication_manager:set_connection_count(Mgr, N)),
                       ?assertEqual(N, dcp_replication_manager:get_connection_count(Mgr)),
                       ?assertEqual(VBs, assert_spread(Mgr, N)),
                       ?assertEqual([{'p1@h', VBs}],
                                    dcp_replication_manager:get_actual_replications(Mgr)),
                       wait_connections(P1, N, 0),
                       %% on the producer node too: every vbucket streamed once, on V rem N
                       wait_streams('p1@h', P1, expected_streams('c@h', 'p1@h', N, VBs))
                   end || N <- [3, 1, 4]],
                  wait_digests(P1, C, VBs)
          end),
     with("a failing stream end on one of three connections shows in the merged reply",
          two_producers(#{connections => 3}),
          fun(#{p1 := P1, c := C, mgr := Mgr}) ->
                  ok = kv_sim:set_fault(P1, 4, {stream_end_on_accept, state_changed}),
                  ok = kv_sim:set_fault(C, 4, no_add_stream_answer_after_stream_end),
                  T0 = erlang:monotonic_time(millisecond),
                  Reply = dcp_replication_manager:set_desired_replications(
                            Mgr, [{'p1@h', lists:seq(0, 8)}, {'p2@h', [10, 11]}]),
                  Took = erlang:monotonic_time(millisecond) - T0,
                  ?assertEqual({errors, [{{stream_end, state_changed}, {vbucket, 4}}]}, Reply),
                  %% fails fast: far below the 10 s setup deadline
                  ?assert(Took < 5000),
                  ?assertEqual([{'p1@h', [0, 1, 2, 3, 5, 6, 7, 8]}, {'p2@h', [10, 11]}],
                               dcp_replication_manager:get_actual_replications(Mgr)),
                  %% the retry without the fault completes
                  ok = kv_sim:clear_faults(P1),
                  ok = kv_sim:clear_faults(C),
                  ?assertEqual(ok, dcp_replication_manager:set_desired_replications(
                                     Mgr, [{'p1@h', lists:seq(0, 8)}, {'p2@h', [10, 11]}]))
          end),
     with("a dead producer gives connection_lost for its vbuckets only",
          two_producers(#{connections => 2}),
          fun(#{p2 := P2, mgr := Mgr}) ->
                  ?assertEqual(ok, dcp_replication_manager:set_desired_replications(
                                     Mgr, [{'p1@h', [0, 1]}])),
                  stop_kv(P2),
                  {errors, Errors} = dcp_replication_manager:set_desired_replications(
                                       Mgr, [{'p1@h', [0, 1, 2, 3]}, {'p2@h', [8, 9, 10]}]),
                  ?assertEqual([8, 9, 10], lists:sort([VB || {_, {vbucket, VB}} <- Errors])),
                  [?assertMatch({connection_lost, _}, Why) || {Why, _} <- Errors],
                  ?assertEqual([{'p1@h', [0, 1, 2, 3]}],
                               dcp_replication_manager:get_actual_replications(Mgr))
          end),
     with("a producer that dies while replicating costs only its own vbuckets",
          two_producers(#{connections => 2}),
          fun(#{p1 := P1, p2 := P2, c := C, mgr := Mgr}) ->
                  Map = [{'p1@h', [0, 1, 2, 3]}, {'p2@h', [8, 9, 10]}],
                  ?assertEqual(ok, dcp_replication_manager:set_desired_replications(Mgr, Map)),
                  wait_digests(P2, C, [8, 9, 10]),
                  wait_connections(C, 0, 4),
                  stop_kv(P2),
                  %% its connections on the consumer node go with it; p1's stay
                  wait_connections(C, 0, 2),
                  T0 = erlang:monotonic_time(millisecond),
                  {errors, Errors} = dcp_replication_manager:set_desired_replications(
                                       Mgr, [{'p1@h', [0, 1, 2, 3, 4]}, {'p2@h', [8, 9, 10]}]),
                  ?assert(erlang:monotonic_time(millisecond) - T0 < 5000),
                  ?assertEqual([8, 9, 10], lists:sort([VB || {_, {vbucket, VB}} <- Errors])),
                  [?assertMatch({connection_lost, _}, Why) || {Why, _} <- Errors],
                  ?assertEqual([{'p1@h', [0, 1, 2, 3, 4]}],
                               dcp_replication_manager:get_actual_replications(Mgr)),
                  wait_digests(P1, C, [0, 1, 2, 3, 4]),
                  wait_streams('p1@h', P1, expected_streams('c@h', 'p1@h', 2, [0, 1, 2, 3, 4]))
          end)].

%% ---- TLS: remote producers on their TLS port, the local consumer plain ----

%% Producer nodes listen on a plain and a TLS port over one store (memcached's 11210 and 11207); the
%% consumer node is local and has no TLS port at all, so a TLS attempt at it could not even start.
%% `p3' presents a certificate of another CA than the one the manager trusts.
tls_env() ->
    {ServerTls, ClientTls} = dcp_test_lib:tls_configs(),
    {UntrustedTls, _} = dcp_test_lib:tls_configs(),
    P1 = start_kv(producer, #{tls_port => 0, ssl => ServerTls}),
    P2 = start_kv(producer, #{seed => 7, tls_port => 0, ssl => ServerTls}),
    P3 = start_kv(producer, #{seed => 9, tls_port => 0, ssl => UntrustedTls}),
    C = start_kv(consumer, #{}),
    Remote = fun(Kv) -> #{host => {127, 0, 0, 1}, port => kv_sim:port(Kv),
                          tls_port => kv_sim:tls_port(Kv), local => false}
             end,
    Infos = #{'p1@h' => Remote(P1), 'p2@h' => Remote(P2), 'p3@h' => Remote(P3),
              'p4@h' => maps:remove(tls_port, Remote(P1)),
              'c@h' => #{host => {127, 0, 0, 1}, port => kv_sim:port(C), local => true}},
    Mgr = start_manager('c@h', #{}, #{resolve => fun(Node) -> maps:get(Node, Infos) end,
                                      ssl => ClientTls, connections => 2}),
    {#{p1 => P1, p2 => P2, p3 => P3, c => C, mgr => Mgr},
     fun() -> stop_manager(Mgr), [stop_kv(K) || K <- [C, P1, P2, P3]] end}.

tls_test_() ->
    with("TLS: remote producers over TLS, the local consumer plain; an untrusted node fails alone",
         fun tls_env/0,
         fun(#{p1 := P1, p2 := P2, p3 := P3, c := C, mgr := Mgr}) ->
                 ?assertEqual(undefined, kv_sim:tls_port(C)),
                 Map = [{'p1@h', [0, 1, 2, 3, 4, 5]}, {'p2@h', [8, 9, 10, 11]}],
                 ?assertEqual(ok, dcp_replication_manager:set_desired_replications(Mgr, Map)),
                 ?assertEqual(Map, dcp_replication_manager:get_actual_replications(Mgr)),
                 wait_digests(P1, C, [0, 1, 2, 3, 4, 5]),
                 wait_digests(P2, C, [8, 9, 10, 11]),
                 %% what each node accepted: the producers' connections came over TLS, the
                 %% consumer's over plain TCP
                 ?assertMatch([{producer, _, ssl}, {producer, _, ssl}], kv_sim:transports(P1)),
                 ?assertMatch([{producer, _, ssl}, {producer, _, ssl}], kv_sim:transports(P2)),
                 ?assertEqual([gen_tcp, gen_tcp, gen_tcp, gen_tcp],
                              [T || {consumer, _, T} <- kv_sim:transports(C)]),
                 ?assertEqual(4, length(kv_sim:transports(C))),
                 %% a node whose certificate is not trusted: a TLS error for its vbuckets only,
                 %% fast (far below the 10 s setup deadline), while the others stay settled
                 T0 = erlang:monotonic_time(millisecond),
                 Reply = dcp_replication_manager:set_desired_replications(
                           Mgr, Map ++ [{'p3@h', [12, 13]}]),
                 Took = erlang:monotonic_time(millisecond) - T0,
                 ?assert(Took < 5000),
                 {errors, Errors} = Reply,
                 ?assertEqual([12, 13], [VB || {_, {vbucket, VB}} <- Errors]),
                 [?assertMatch({connection_lost, {producer, {connect_failed, {tls, _}}}}, Why)
                  || {Why, _} <- Errors],
                 ?assertEqual(Map, dcp_replication_manager:get_actual_replications(Mgr)),
                 ?assertEqual([], kv_sim:connections(P3)),
                 %% a remote node the resolver gives no TLS port: named, its vbuckets only
                 ?assertEqual({errors, [{{connection_lost, {start_failed, {no_tls_port, 'p4@h'}}},
                                         {vbucket, 14}}]},
                              dcp_replication_manager:set_desired_replications(
                                Mgr, Map ++ [{'p4@h', [14]}])),
                 ?assertEqual(2, length(kv_sim:transports(P1))),
                 %% and nothing is left hanging: dropping the nodes answers at once
                 ?assertEqual(ok, dcp_replication_manager:set_desired_replications(Mgr, Map)),
                 ?assertEqual(Map, dcp_replication_manager:get_actual_replications(Mgr)),
                 ?assertEqual(2, length(kv_sim:transports(P1)))
         end).

%% The endpoint rule: plain when no TLS is set or the node is local (`node()' when not said), else
%% the TLS port with the options; a node to be reached over TLS without a TLS port is named.
endpoint_test() ->
    Tls = [{verify, verify_peer}, {cacerts, []}],
    Info = #{host => "h", port => 11210, tls_port => 11207},
    ?assertEqual(#{host => "h", port => 11210, ssl => false},
                 dcp_replication_manager:endpoint('a@h', Info, false)),
    ?assertEqual(#{host => "h", port => 11207, ssl => Tls},
                 dcp_replication_manager:endpoint('a@h', Info, Tls)),
    ?assertEqual(#{host => "h", port => 11210, ssl => false},
                 dcp_replication_manager:endpoint('a@h', Info#{local => true}, Tls)),
    ?assertEqual(#{host => "h", port => 11210, ssl => false},
                 dcp_replication_manager:endpoint(node(), Info, Tls)),
    ?assertEqual(#{host => "h", port => 11207, ssl => Tls},
                 dcp_replication_manager:endpoint(node(), Info#{local => false}, Tls)),
    ?assertError({no_tls_port, 'a@h'},
                 dcp_replication_manager:endpoint('a@h', maps:remove(tls_port, Info), Tls)).

%% ---- cluster maps over `node' kv_sims ----

%% `Count' nodes, vbucket V active on node V rem Count and its replica on the next node; one manager
%% per node for its incoming replications.
cluster(Count, Connections) ->
    fun() ->
            Names = [list_to_atom("n" ++ integer_to_list(I) ++ "@h") || I <- lists:seq(0, Count - 1)],
            Kvs = [start_kv(node, #{active_vbuckets => [V || V <- lists:seq(0, ?VBS - 1),
                                                             V rem Count =:= I],
                                    replica_vbuckets => []})
                   || I <- lists:seq(0, Count - 1)],
            Nodes = maps:from_list(lists:zip(Names, Kvs)),
            Mgrs = [{Name, start_manager(Name, Nodes, #{connections => Connections})}
                    || Name <- Names],
            {#{names => Names, kvs => Nodes, mgrs => Mgrs, count => Count, n => Connections},
             fun() -> [stop_manager(M) || {_, M} <- Mgrs], [stop_kv(K) || K <- Kvs] end}
    end.

%% The incoming replications of node I: from each active, its vbuckets whose replica is I.
incoming(Names, Count, I) ->
    Map = [{lists:nth(P + 1, Names), [V || V <- lists:seq(0, ?VBS - 1), V rem Count =:= P,
                                          (V + 1) rem Count =:= I]}
           || P <- lists:seq(0, Count - 1), P =/= I],
    [{Node, VBs} || {Node, VBs} <- Map, VBs =/= []].

cluster_up_and_down(#{names := Names, kvs := Kvs, mgrs := Mgrs, count := Count, n := N}) ->
    Indexed = lists:zip(lists:seq(0, Count - 1), Mgrs),
    [?assertEqual(ok, dcp_replication_manager:set_desired_replications(
                        Mgr, [{P, [V || V <- VBs]} || {P, VBs} <- incoming(Names, Count, I)]))
     || {I, {_, Mgr}} <- Indexed],
    %% each node: N producer connections per node replicating from it, N consumer ones per source
    [begin
         Sources = length(incoming(Names, Count, I)),
         Readers = length([J || J <- lists:seq(0, Count - 1), J =/= I,
                                lists:keymember(Name, 1, incoming(Names, Count, J))]),
         wait_connections(maps:get(Name, Kvs), N * Readers, N * Sources)
     end || {I, {Name, _}} <- Indexed],
    %% every replica equals its active
    [wait_digests(maps:get(lists:nth(V rem Count + 1, Names), Kvs),
                  maps:get(lists:nth((V + 1) rem Count + 1, Names), Kvs), [V])
     || V <- lists:seq(0, ?VBS - 1)],
    [?assertEqual(ok, dcp_replication_manager:set_desired_replications(Mgr, []))
     || {_, Mgr} <- Mgrs],
    [wait_connections(Kv, 0, 0) || Kv <- maps:values(Kvs)],
    ok.

cluster_test_() ->
    [with("a two-node map up and down, connections counted on each node", cluster(2, 2),
          fun cluster_up_and_down/1),
     with("a three-node map up and down, connections counted on each node", cluster(3, 2),
          fun cluster_up_and_down/1)].

%% A `node' serves what it stored once it took the vbucket over: x's vbucket goes to y by replica
%% build and takeover, then z builds its replica from y and holds x's documents.
node_serves_what_it_stored_test_() ->
    with("a node kv_sim serves a taken-over vbucket from its store",
         fun() ->
                 X = start_kv(node, #{active_vbuckets => [3]}),
                 Y = start_kv(node, #{}),
                 Z = start_kv(node, #{}),
                 Nodes = #{'x@h' => X, 'y@h' => Y, 'z@h' => Z},
                 MY = start_manager('y@h', Nodes, #{}),
                 MZ = start_manager('z@h', Nodes, #{}),
                 {#{x => X, y => Y, z => Z, my => MY, mz => MZ},
                  fun() -> stop_manager(MY), stop_manager(MZ), [stop_kv(K) || K <- [X, Y, Z]] end}
         end,
         fun(#{x := X, y := Y, z := Z, my := MY, mz := MZ}) ->
                 Original = kv_sim:digest(X, 3),
                 ?assertMatch({20, _}, Original),
                 ok = kv_sim:set_vbucket_state(Y, 3, replica),
                 ?assertEqual(ok, dcp_replication_manager:set_desired_replications(MY, [{'x@h', [3]}])),
                 wait_digests(X, Y, [3]),
                 %% z cannot replicate from a replica
                 ok = kv_sim:set_vbucket_state(Z, 3, replica),
                 ?assertMatch({errors, [{{mcbp_status, _}, {vbucket, 3}}]},
                              dcp_replication_manager:set_desired_replications(MZ, [{'y@h', [3]}])),
                 ?assertEqual(ok, dcp_replication_manager:takeover(MY, 'x@h', 3)),
                 ?assertEqual({active, dead}, {kv_sim:vbucket_state(Y, 3), kv_sim:vbucket_state(X, 3)}),
                 ?assertEqual(ok, dcp_replication_manager:set_desired_replications(MZ, [{'y@h', [3]}])),
                 dcp_test_lib:wait_until(fun() -> kv_sim:digest(Z, 3) =:= Original end),
                 ?assertEqual(Original, kv_sim:digest(Y, 3))
         end).

%% ---- ns_server's call shapes ----

%% The manager is registered under ns_server's name and this VM is the producer node (`node()'),
%% so `dcp_ns' finds the connection names both sides use.
ns_env() ->
    P = start_kv(producer, #{docs_per_vbucket => 200}),
    C = start_kv(consumer, #{}),
    Nodes = #{node() => P, 'c@h' => C},
    Config = #{resolve => resolver(Nodes),
               credentials => fun() -> {"Administrator", ?PASSWORD} end,
               move_done_limit => 1, poll_interval => 10, move_timeout => 20000},
    ok = dcp_ns:configure(Config),
    Mgr = start_manager('c@h', Nodes, #{name => dcp_replication_manager:server_name(?BUCKET),
                                         connections => 2}),
    {#{p => P, c => C, mgr => Mgr},
     fun() -> stop_manager(Mgr), stop_kv(C), stop_kv(P) end}.

ns_test_() ->
    [with("dcp_ns: setup_replication/4, estimates, wait_for_data_move, takeover/3, nuke",
          fun ns_env/0,
          fun(#{p := P, c := C, mgr := Mgr}) ->
                  Bucket = ?BUCKET,
                  ?assertEqual(not_running, dcp_ns:get_partitions(dcp_ns:server_name(node(), Bucket, 0))),
                  %% ns_server's callers name the manager by its bucket
                  ?assertEqual(not_running,
                               dcp_replication_manager:get_actual_replications("no-such-bucket")),
                  ?assertEqual(2, dcp_replication_manager:get_connection_count(Bucket)),
                  ?assertEqual(ok, dcp_replication_manager:set_desired_replications(
                                     Mgr, [{node(), [0, 1, 2, 3]}])),
                  ?assertEqual(ok, dcp_ns:setup_replication(node(), Bucket, [0, 1, 2, 3, 5], 2)),
                  ?assertEqual({error, {connection_count, 2}},
                               dcp_ns:setup_replication(node(), Bucket, [0], 3)),
                  ?assertEqual(ok, dcp_ns:wait_for_data_move(['c@h'], Bucket, 5)),
                  {ok, {Estimate, 0, Status}} = dcp_ns:get_docs_estimate(Bucket, 5, 'c@h'),
                  ?assert(Estimate =:= 0 andalso Status =:= <<"in-memory">>),
                  wait_digests(P, C, [0, 1, 2, 3, 5]),
                  %% no stream of vbucket 9 on that connection: ns_server's wait errors
                  ?assertMatch({error, {unexpected_status, <<"does_not_exist">>}, _},
                               dcp_ns:wait_for_data_move(['c@h'], Bucket, 9)),
                  %% the consumer node's memcached lists the replication connections
                  ?assertEqual(lists:sort([dcp_ns:get_connection_name('c@h', node(), Bucket, 0),
                                           dcp_ns:get_connection_name('c@h', node(), Bucket, 1)]),
                               lists:sort([N || {consumer, N0} <- kv_sim:connections(C),
                                                N <- [binary_to_list(N0)]])),
                  ?assertEqual(2, length(dcp_ns:get_children(Bucket))),
                  ?assertEqual(ok, dcp_ns:takeover(node(), Bucket, 3)),
                  ?assertEqual(active, kv_sim:vbucket_state(C, 3)),
                  ?assertEqual(dead, kv_sim:vbucket_state(P, 3)),
                  %% the takeover stream's end (after the reply) leaves the vbucket out
                  dcp_test_lib:wait_until(
                    fun() -> dcp_replication_manager:get_actual_replications(Bucket)
                                 =:= [{node(), [0, 1, 2, 5]}] end),
                  ?assertEqual(ok, dcp_ns:nuke(Bucket)),
                  ?assertEqual([], dcp_ns:get_children(Bucket)),
                  wait_connections(C, 0, 0)
          end)].

%% ns_server's replicator start: (producer node, bucket, features, connection number), its registered
%% name and connection name; this VM is the consumer node.
ns_start_link_test_() ->
    with("dcp_ns:start_link/4 registers ns_server's name and names the connection",
         fun() ->
                 P = start_kv(producer, #{}),
                 C = start_kv(consumer, #{}),
                 ok = dcp_ns:configure(#{resolve => resolver(#{node() => C, 'p@h' => P}),
                                         credentials => fun() -> {"Administrator", ?PASSWORD} end}),
                 {#{p => P, c => C}, fun() -> stop_kv(C), stop_kv(P) end}
         end,
         fun(#{p := P}) ->
                 process_flag(trap_exit, true),
                 Name = dcp_ns:server_name('p@h', ?BUCKET, 1),
                 {ok, Rep} = dcp_ns:start_link('p@h', ?BUCKET, [{xattr, true}, {snappy, false},
                                                               {collections, true}], 1),
                 ?assertEqual(Rep, whereis(Name)),
                 %% no manager for the bucket: ns_server's setup_replication/4 over the
                 %% registered replicators (connection 0 has none)
                 ?assertEqual(ok, dcp_ns:setup_replication('p@h', ?BUCKET, [1, 3], 2)),
                 ?assertEqual({errors, [{{connection_lost, {not_running, 'p@h'}}, {vbucket, 0}}]},
                              dcp_ns:setup_replication('p@h', ?BUCKET, [0, 1, 3], 2)),
                 ?assertEqual([1, 3], dcp_ns:get_partitions(Name)),
                 ConnName = list_to_binary(dcp_ns:get_connection_name(node(), 'p@h', ?BUCKET, 1)),
                 ?assertEqual(<<"replication:p@h->", (atom_to_binary(node()))/binary, ":default/1">>,
                              ConnName),
                 ?assertEqual([{producer, ConnName}], kv_sim:connections(P)),
                 %% ns_server's features are negotiated: collections in HELLO, xattr in DCP_OPEN
                 [#{hello_features := Hello}] = kv_sim:handshakes(P),
                 ?assert(lists:member(collections, Hello) andalso lists:member(xattr, Hello)),
                 %% no `{ssl, true}': plain TCP to both nodes
                 ?assertEqual([{producer, ConnName, gen_tcp}], kv_sim:transports(P)),
                 %% this node's memcached (STATS dcp) lists the consumer side
                 ?assertEqual([binary_to_list(ConnName)], dcp_ns:get_connections(?BUCKET)),
                 exit(Rep, shutdown),
                 receive {'EXIT', Rep, _} -> ok end,
                 ?assertEqual(not_running, dcp_ns:get_partitions(Name))
         end).

trim_common_prefix_test() ->
    Long = fun(Host) -> list_to_atom("ns_1@" ++ lists:duplicate(80, $a) ++ Host) end,
    Consumer = Long(".consumer.example.com"),
    Producer = Long(".producer.example.com"),
    {C, P} = dcp_ns:trim_common_prefix(Consumer, Producer),
    ?assertEqual({"consumer.example.com", "producer.example.com"},
                 {lists:nthtail(length(C) - 20, C), lists:nthtail(length(P) - 20, P)}),
    ?assertEqual(35, length(C)),
    Name = dcp_ns:get_connection_name(Consumer, Producer, "bucket", 3),
    ?assert(lists:prefix("replication:" ++ P ++ "->" ++ C ++ ":bucket:", Name)),
    ?assert(length(Name) =< 200),
    %% short names are kept whole; distinct nodes with no common prefix are cut at 35
    ?assertEqual({"a@h", "b@h"}, dcp_ns:trim_common_prefix('a@h', 'b@h')),
    ?assertEqual('dcp_replicator-default-n1@h/2', dcp_ns:server_name('n1@h', "default", 2)),
    ?assertEqual([del_times, xattr], dcp_ns:replication_features([{xattr, true}, {snappy, false},
                                                                  {del_times, true},
                                                                  {cert_auth, true}])),
    %% ns_server's dcp_sup:get_replication_features/0 list, cluster encryption on
    ?assertEqual([collections, del_times, del_user_xattr, json, set_consumer_name, xattr],
                 dcp_ns:replication_features([{cert_auth, false}, {collections, true},
                                              {del_times, true}, {del_user_xattr, true},
                                              {json, true}, {set_consumer_name, true},
                                              {snappy, false}, {ssl, true}, {xattr, true}])).

%% ns_server's `{ssl, true}' feature: the replicator reaches the (remote) producer on its TLS port
%% and this VM's own node, local by default, over plain TCP; without TLS options it is named.
ns_start_link_tls_test_() ->
    with("dcp_ns:start_link/4 with {ssl, true}: TLS to the producer, plain to the local node",
         fun() ->
                 {ServerTls, ClientTls} = dcp_test_lib:tls_configs(),
                 P = start_kv(producer, #{tls_port => 0, ssl => ServerTls}),
                 C = start_kv(consumer, #{}),
                 Infos = #{node() => #{host => {127, 0, 0, 1}, port => kv_sim:port(C)},
                           'p@h' => #{host => {127, 0, 0, 1}, port => kv_sim:port(P),
                                      tls_port => kv_sim:tls_port(P)}},
                 Config = #{resolve => fun(Node) -> maps:get(Node, Infos) end,
                            credentials => fun() -> {"Administrator", ?PASSWORD} end},
                 {#{p => P, c => C, config => Config, tls => ClientTls},
                  fun() -> stop_kv(C), stop_kv(P) end}
         end,
         fun(#{p := P, c := C, config := Config, tls := ClientTls}) ->
                 process_flag(trap_exit, true),
                 Features = [{collections, true}, {ssl, true}, {xattr, true}],
                 ok = dcp_ns:configure(Config),
                 ?assertEqual({error, {tls, no_tls_options_configured}},
                              dcp_ns:start_link('p@h', ?BUCKET, Features, 0)),
                 ok = dcp_ns:configure(Config#{ssl => ClientTls}),
                 {ok, Rep} = dcp_ns:start_link('p@h', ?BUCKET, Features, 0),
                 ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [2, 5])),
                 wait_digests(P, C, [2, 5]),
                 ?assertMatch([{producer, _, ssl}], kv_sim:transports(P)),
                 ?assertMatch([{consumer, _, gen_tcp}], kv_sim:transports(C)),
                 exit(Rep, shutdown),
                 receive {'EXIT', Rep, _} -> ok end
         end).

%% ---- the rebalance, end to end at a small size ----

%% Four peer nodes, 64 vbuckets: the injected MB-53445 builds fail fast with `{stream_end, _}', are
%% retried, and the rebalance ends with every digest equal.
rebalance_with_faults_test_() ->
    {timeout, 120,
     fun() ->
             Distributed = node() =/= nonode@nohost,
             try
                 R = dcp_rebalance_demo:run(#{vbuckets => 64, docs => 5, faults => 3, quiet => true}),
                 ?assertMatch(#{ok := true, builds := 32, takeovers := 16, dropped := 32,
                                mismatches := [], retries := 3}, R),
                 #{failures := Failures} = R,
                 ?assertEqual(3, length(Failures)),
                 [?assertMatch({{stream_end, state_changed}, _, _}, F) || F <- Failures],
                 %% fast: far below the 10 s setup deadline
                 [?assert(Took < 5000) || {_, _, Took} <- Failures]
             after
                 Distributed orelse net_kernel:stop()
             end
     end}.
