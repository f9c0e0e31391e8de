%% @doc Sync writes end to end (issue 12, items 5 and 7): with json and set_consumer_name the
%% consumer's DCP_OPEN names it, kv_sim's consumer then asks the producer (through the proxy) for
%% sync writes, durable writes flow as DCP_PREPARE / DCP_COMMIT / DCP_ABORT and the consumer's
%% DCP_SEQNO_ACKNOWLEDGED reach the producer node; without a consumer name only committed writes
%% arrive. Also the kv_sim side of it over a plain socket (no proxy).
-module(dcp_15_durability_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dcp_test_lib, [with_nodes/3]).

-define(VBS, [0, 1, 2, 3]).
-define(DOCS, 12).
-define(COLLECTIONS, [0, 8, 9]).
-define(DURABLE, #{committed => 4, aborted => 2, pending => 1}).
%% 2 create events, 12 documents, 6 resolved writes of two seqnos each, 1 pending prepare
-define(HIGH_SEQNO, 2 + ?DOCS + 2 * 6 + 1).
%% The longest a test waits for one thing the nodes do in well under a second (a node's replication
%% after a manager's change included).
-define(WAIT_MS, 5000).

env_opts(Features) ->
    #{producer => #{collections => ?COLLECTIONS, vbuckets => 4, docs_per_vbucket => ?DOCS,
                    durable_writes => ?DURABLE},
      consumer => #{vbuckets => 4},
      rep => #{features => Features}}.

%% ---- through the proxy ----

sync_writes_replicate_test_() ->
    with_nodes("json + set_consumer_name: prepares, commits and aborts replicate, acks come back",
               env_opts([{xattr, true}, {collections, true}, {json, true},
                      {set_consumer_name, true}]),
               fun(#{rep := Rep, producer := P, consumer := C}) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, ?VBS)),
                       %% the consumer node's two controls (consumer_name, enable_sync_writes)
                       %% go through the proxy first thing: a consumer that never sends them
                       %% fails here, in seconds
                       wait_for(consumer_sent_sync_write_controls,
                                fun() -> dcp_test_lib:frames(consumer, dcp_control,
                                                             dcp_replicator:stats(Rep)) >= 2 end),
                       dcp_test_lib:assert_replicated(P, C, ?VBS),
                       %% the acks (the consumer's, through the proxy) come once it holds all
                       [wait_for({seqno_ack, VB, ?HIGH_SEQNO},
                                 fun() -> lists:last([0 | kv_sim:seqno_acks(P, VB)]) =:= ?HIGH_SEQNO
                                 end)
                        || VB <- ?VBS],
                       %% sync replication: kv_engine's v2.0 markers, forwarded as they are
                       ?assertEqual([v2_0], marker_versions(C)),
                       [?assertEqual(kv_sim:durable_state(P, VB), kv_sim:durable_state(C, VB))
                        || VB <- ?VBS],
                       ?assertMatch(#{prepares := 7, commits := 4, aborts := 2,
                                      pending := [{_, <<"dur-0002-", _/binary>>, ?HIGH_SEQNO}]},
                                    kv_sim:durable_state(C, 2)),
                       %% committed writes are live in their collections, aborted ones are not
                       ?assertEqual(#{0 => 4 + 2, 8 => 4 + 1, 9 => 4 + 1},
                                    kv_sim:collection_counts(C, 0)),
                       ?assertEqual(kv_sim:collection_counts(P, 1), kv_sim:collection_counts(C, 1)),
                       Stats = dcp_replicator:stats(Rep),
                       ?assertEqual(4 * 7, dcp_test_lib:frames(producer, dcp_prepare, Stats)),
                       ?assertEqual(4 * 4, dcp_test_lib:frames(producer, dcp_commit, Stats)),
                       ?assertEqual(4 * 2, dcp_test_lib:frames(producer, dcp_abort, Stats)),
                       ?assert(dcp_test_lib:frames(consumer, dcp_seqno_acknowledged, Stats) >= 4),
                       %% the two controls went from the consumer node through the proxy
                       ?assert(dcp_test_lib:frames(consumer, dcp_control, Stats) >= 2)
               end).

%% The same, with both nodes writing in random 1..7-byte pieces and a flow-control window of
%% 1 KiB (a buffer acknowledgement every few frames, between the seqno acks and the controls).
sync_writes_through_chunked_writes_and_a_small_window_test_() ->
    Opts = env_opts([{xattr, true}, {collections, true}, {json, true}, {set_consumer_name, true}]),
    with_nodes("sync writes replicate through 1..7-byte writes both ways and a 1 KiB window",
               Opts#{consumer => #{vbuckets => 4, consumer_buffer_size => 1024}},
               fun(#{rep := Rep, producer := P, consumer := C}) ->
                       ok = kv_sim:set_fault(P, all, {chunked_writes, 7}),
                       ok = kv_sim:set_fault(C, all, {chunked_writes, 7}),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, ?VBS)),
                       dcp_test_lib:assert_replicated(P, C, ?VBS),
                       [wait_for({seqno_ack, VB, ?HIGH_SEQNO},
                                 fun() -> lists:last([0 | kv_sim:seqno_acks(P, VB)]) =:= ?HIGH_SEQNO
                                 end)
                        || VB <- ?VBS],
                       [?assertEqual(kv_sim:durable_state(P, VB), kv_sim:durable_state(C, VB))
                        || VB <- ?VBS],
                       ?assertEqual([v2_0], marker_versions(C)),
                       Stats = dcp_replicator:stats(Rep),
                       ?assert(dcp_test_lib:frames(consumer, dcp_buffer_acknowledgement, Stats) >= 4),
                       %% nothing either node received broke memcached's rules
                       ?assertEqual([], kv_sim:closes(P)),
                       ?assertEqual([], kv_sim:closes(C))
               end).

no_consumer_name_no_sync_writes_test_() ->
    with_nodes("json without set_consumer_name: only committed writes, as mutations",
               env_opts([xattr, collections, json]),
               fun(#{rep := Rep, producer := P, consumer := C}) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, ?VBS)),
                       %% the live documents (committed writes at their commit's seqno) agree
                       dcp_test_lib:assert_replicated(P, C, ?VBS),
                       ?assertEqual(kv_sim:collection_counts(P, 3), kv_sim:collection_counts(C, 3)),
                       %% the difference: no prepare, commit, abort or ack on the consumer side
                       [?assertEqual(#{pending => [], prepares => 0, commits => 0, aborts => 0},
                                     kv_sim:durable_state(C, VB)) || VB <- ?VBS],
                       ?assertMatch(#{pending := [_]}, kv_sim:durable_state(P, 0)),
                       Stats = dcp_replicator:stats(Rep),
                       ?assertEqual(0, dcp_test_lib:frames(producer, dcp_prepare, Stats)),
                       ?assertEqual(0, dcp_test_lib:frames(producer, dcp_commit, Stats)),
                       ?assertEqual(0, dcp_test_lib:frames(consumer, dcp_seqno_acknowledged, Stats)),
                       [?assertEqual([], kv_sim:seqno_acks(P, VB)) || VB <- ?VBS],
                       ?assertEqual([v1], marker_versions(C))
               end).

pending_prepares_test_() ->
    with_nodes("prepares never resolved stay pending on the consumer, acknowledged, not live",
               #{producer => #{vbuckets => 2, docs_per_vbucket => 5,
                               durable_writes => #{pending => 3}},
                 consumer => #{vbuckets => 2},
                 rep => #{features => [json, set_consumer_name]}},
               fun(#{rep := Rep, producer := P, consumer := C}) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1])),
                       wait_for(seqno_acks_of_8,
                                fun() -> kv_sim:seqno_acks(P, 1) =:= [8] andalso
                                             kv_sim:seqno_acks(P, 0) =:= [8] end),
                       ?assertEqual({5, element(2, kv_sim:digest(P, 1))}, kv_sim:digest(C, 1)),
                       ?assertEqual(#{pending => [{0, <<"dur-0001-00000006">>, 6},
                                                  {0, <<"dur-0001-00000007">>, 7},
                                                  {0, <<"dur-0001-00000008">>, 8}],
                                      prepares => 3, commits => 0, aborts => 0},
                                    kv_sim:durable_state(C, 1))
               end).

%% ---- a cluster node serves what it stored (the rebalance's nodes) ----

-define(SYNC_FEATURES, [{xattr, true}, {collections, true}, {json, true}, {set_consumer_name, true}]).

start_kv(Extra) ->
    {ok, Pid} = kv_sim:start(maps:merge(#{role => node, password => dcp_test_lib:password(),
                                          vbuckets => 8, docs_per_vbucket => ?DOCS,
                                          value_size => 64}, Extra)),
    Pid.

start_manager(ConsumerNode, Nodes, Features) ->
    Ports = maps:map(fun(_, Pid) -> kv_sim:port(Pid) end, Nodes),
    Resolve = fun(Node) -> #{host => {127, 0, 0, 1}, port => maps:get(Node, Ports), local => false} end,
    Self = self(),
    Holder = spawn(fun() ->
                           process_flag(trap_exit, true),
                           Opts = #{resolve => Resolve, consumer_node => ConsumerNode, name => undefined,
                                    credentials => fun() -> {"Administrator",
                                                             dcp_test_lib:password()} end,
                                    replicator => #{setup_timeout => 10000, features => Features}},
                           Self ! {manager, self(), dcp_replication_manager:start_link("default", Opts)},
                           receive stop -> ok end
                   end),
    receive {manager, Holder, {ok, Mgr}} -> Mgr after 10000 -> error(no_manager) end.

wait_digest(From, To, VB) ->
    wait_for({digest, VB}, fun() -> kv_sim:digest(To, VB) =:= kv_sim:digest(From, VB) end).

node_store_serves_collections_and_durable_writes_test_() ->
    {"a node replicates collections and durable writes, and serves them from its store after takeover",
     {setup,
      fun() ->
              X = start_kv(#{active_vbuckets => [3], collections => ?COLLECTIONS,
                             durable_writes => ?DURABLE}),
              [Y, Z, W] = [start_kv(#{}) || _ <- [y, z, w]],
              Nodes = #{'x@h' => X, 'y@h' => Y, 'z@h' => Z, 'w@h' => W},
              Managers = #{y => start_manager('y@h', Nodes, ?SYNC_FEATURES),
                           z => start_manager('z@h', Nodes, ?SYNC_FEATURES),
                           %% a legacy consumer: no collections, no consumer name
                           w => start_manager('w@h', Nodes, [xattr, json])},
              {Nodes, Managers}
      end,
      fun({Nodes, Managers}) ->
              [catch dcp_replication_manager:stop(M) || M <- maps:values(Managers)],
              [catch kv_sim:stop(K) || K <- maps:values(Nodes)]
      end,
      fun({#{'x@h' := X, 'y@h' := Y, 'z@h' := Z, 'w@h' := W}, #{y := MY, z := MZ, w := MW}}) ->
              {timeout, 60,
               ?_test(begin
                          Seeded = kv_sim:durable_state(X, 3),
                          ?assertMatch(#{prepares := 7, commits := 4, aborts := 2, pending := [_]},
                                       Seeded),
                          ?assertEqual(#{0 => 6, 8 => 5, 9 => 5}, kv_sim:collection_counts(X, 3)),
                          ok = kv_sim:set_vbucket_state(Y, 3, replica),
                          ?assertEqual(ok, dcp_replication_manager:set_desired_replications(
                                             MY, [{'x@h', [3]}])),
                          wait_digest(X, Y, 3),
                          wait_for(seqno_acks_x, fun() -> kv_sim:seqno_acks(X, 3) =/= [] end),
                          ?assertEqual(Seeded, kv_sim:durable_state(Y, 3)),
                          ?assertEqual(kv_sim:system_events(X, 3), kv_sim:system_events(Y, 3)),
                          ?assertEqual(ok, dcp_replication_manager:takeover(MY, 'x@h', 3)),
                          ?assertEqual(active, kv_sim:vbucket_state(Y, 3)),
                          %% y serves what it stored: prepares, commits and aborts to z
                          ok = kv_sim:set_vbucket_state(Z, 3, replica),
                          ?assertEqual(ok, dcp_replication_manager:set_desired_replications(
                                             MZ, [{'y@h', [3]}])),
                          wait_digest(Y, Z, 3),
                          wait_for(durable_state_z,
                                   fun() -> kv_sim:durable_state(Z, 3) =:= Seeded end),
                          ?assertEqual(kv_sim:collection_counts(X, 3), kv_sim:collection_counts(Z, 3)),
                          ?assertEqual([{1, 0, <<"c8">>}, {2, 0, <<"c9">>}], kv_sim:system_events(Z, 3)),
                          wait_for(seqno_acks_y,
                                   fun() -> lists:last([0 | kv_sim:seqno_acks(Y, 3)]) =:= ?HIGH_SEQNO
                                   end),
                          %% and to a legacy consumer: the default collection's live documents
                          ok = kv_sim:set_vbucket_state(W, 3, replica),
                          ?assertEqual(ok, dcp_replication_manager:set_desired_replications(
                                             MW, [{'y@h', [3]}])),
                          wait_for(legacy_counts_w,
                                   fun() -> kv_sim:collection_counts(W, 3) =:= #{0 => 6} end),
                          ?assertMatch(#{prepares := 0, pending := []}, kv_sim:durable_state(W, 3)),
                          ?assertEqual([], kv_sim:system_events(W, 3)),
                          %% v2.0 markers to the nodes with sync replication, v1 to the legacy one
                          ?assertEqual([v2_0], marker_versions(Y)),
                          ?assertEqual([v2_0], marker_versions(Z)),
                          ?assertEqual([v1], marker_versions(W))
                      end)}
      end}}.

%% ---- kv_sim over a plain socket ----

consumer_asks_for_sync_writes_test() ->
    Node = kv_sim_test_client:sim(consumer),
    try
        Conn = kv_sim_test_client:connect(Node),
        ok = auth(Conn),
        %% a JSON value on DCP_OPEN needs HELLO json first (memcached refuses it otherwise)
        ?assertEqual(0, kv_sim_test_client:status(
                          kv_sim_test_client:call(Conn, dcp_commands:hello(<<"t">>, [json], 3)))),
        Value = dcp_features:consumer_name_value(<<"n_1@10.0.0.1">>),
        kv_sim_test_client:send(Conn, dcp_commands:dcp_open_json(<<"rep">>, consumer, [], Value, 4)),
        ?assertMatch(#{opcode_name := dcp_open, status := 0}, kv_sim_test_client:recv(Conn)),
        ?assertMatch(#{opcode_name := dcp_control, key := <<"consumer_name">>,
                       value := <<"n_1@10.0.0.1">>}, kv_sim_test_client:recv(Conn)),
        ?assertMatch(#{opcode_name := dcp_control, key := <<"enable_sync_writes">>,
                       value := <<"true">>}, kv_sim_test_client:recv(Conn)),
        %% a consumer opened without a name asks for nothing
        Plain = kv_sim_test_client:open(Node, consumer),
        kv_sim_test_client:assert_nothing_sent_before_noop(Plain)
    after
        kv_sim:stop(Node)
    end.

producer_streams_by_its_controls_test() ->
    Node = kv_sim_test_client:sim(producer, #{docs_per_vbucket => 2,
                                              durable_writes => #{committed => 1, aborted => 1}}),
    try
        Sync = kv_sim_test_client:open(Node, producer),
        %% acks before sync writes are enabled are refused, as kv_engine does
        ?assertEqual(16#04, kv_sim_test_client:status(
                              kv_sim_test_client:call(Sync, dcp_commands:seqno_acknowledged(0, 9, 1)))),
        [?assertEqual(0, kv_sim_test_client:status(kv_sim_test_client:call(Sync, F)))
         || F <- [dcp_commands:control(<<"consumer_name">>, <<"c">>, 5),
                  dcp_commands:control(<<"enable_sync_writes">>, <<"true">>, 6)]],
        ?assertEqual(16#04, kv_sim_test_client:status(
                              kv_sim_test_client:call(
                                Sync, dcp_commands:control(<<"enable_sync_writes">>, <<"yes">>, 7)))),
        SyncFrames = stream(Sync),
        ?assertEqual([dcp_snapshot_marker, dcp_mutation, dcp_mutation, dcp_prepare, dcp_commit,
                      dcp_prepare, dcp_abort, dcp_stream_end], opcodes(SyncFrames)),
        %% sync replication: a v2.0 marker (1 byte of extras, version 0, a 36-byte value), a disk
        %% snapshot whose last visible item is the commit at 4 and whose last completed prepare
        %% is the aborted one at 5
        [SyncMarker | _] = SyncFrames,
        ?assertMatch(#{extras := <<0>>, value := <<_:36/binary>>}, SyncMarker),
        ?assertEqual(#{version => v2_0, start_seqno => 0, end_seqno => 6, snapshot_type => 6,
                       max_visible_seqno => 4, high_completed_seqno => 5},
                     mcbp:dcp_fields(SyncMarker)),
        kv_sim_test_client:send(Sync, dcp_commands:seqno_acknowledged(0, 9, 5)),
        %% taken without an answer
        kv_sim_test_client:assert_nothing_sent_before_noop(Sync),
        Plain = kv_sim_test_client:open(Node, producer),
        Frames = stream(Plain),
        ?assertEqual([dcp_snapshot_marker, dcp_mutation, dcp_mutation, dcp_mutation, dcp_stream_end],
                     opcodes(Frames)),
        %% without sync writes: v1 (20 bytes of extras, no value)
        ?assertMatch(#{extras := <<0:64, 6:64, 1:32>>, value := <<>>}, hd(Frames)),
        %% the committed write as a mutation at its commit's seqno
        ?assertEqual(4, maps:get(by_seqno, mcbp:dcp_fields(lists:nth(4, Frames)))),
        ?assertEqual([5], kv_sim:seqno_acks(Node, 0))
    after
        kv_sim:stop(Node)
    end.

%% A node streams from its store (as a backfill): the same v2.0 values, computed from what it holds.
node_store_marker_values_test() ->
    Node = kv_sim_test_client:sim(node, #{docs_per_vbucket => 2, active_vbuckets => [0],
                                          durable_writes => #{committed => 1, aborted => 1}}),
    try
        Sync = kv_sim_test_client:open(Node, producer),
        [?assertEqual(0, kv_sim_test_client:status(kv_sim_test_client:call(Sync, F)))
         || F <- [dcp_commands:control(<<"consumer_name">>, <<"c">>, 5),
                  dcp_commands:control(<<"enable_sync_writes">>, <<"true">>, 6)]],
        [Marker | _] = stream(Sync),
        ?assertEqual(#{version => v2_0, start_seqno => 0, end_seqno => 6, snapshot_type => 6,
                       max_visible_seqno => 4, high_completed_seqno => 5},
                     mcbp:dcp_fields(Marker)),
        %% enable_sync_writes alone (no consumer name) is sync writes without sync replication: v1
        Writes = kv_sim_test_client:open(Node, producer),
        ?assertEqual(0, kv_sim_test_client:status(
                          kv_sim_test_client:call(
                            Writes, dcp_commands:control(<<"enable_sync_writes">>, <<"true">>, 6)))),
        [WritesMarker | _] = stream(Writes),
        ?assertMatch(#{version := v1, end_seqno := 6}, mcbp:dcp_fields(WritesMarker))
    after
        kv_sim:stop(Node)
    end.

%% The snapshot marker versions a node's consumer connections received (`kv_sim:handshakes/1').
marker_versions(Node) ->
    lists:usort(lists:append([maps:get(marker_versions, R, []) || R <- kv_sim:handshakes(Node)])).

%% Polls `Cond()' for at most ?WAIT_MS, then fails naming what it waited for.
wait_for(What, Cond) ->
    wait_for(What, Cond, erlang:monotonic_time(millisecond) + ?WAIT_MS).

wait_for(What, Cond, Deadline) ->
    case Cond() of
        true ->
            ok;
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> erlang:error({not_within_ms, ?WAIT_MS, What});
                false -> timer:sleep(5), wait_for(What, Cond, Deadline)
            end
    end.

auth(Conn) ->
    ?assertEqual(0, kv_sim_test_client:status(
                      kv_sim_test_client:call(Conn, dcp_commands:sasl_auth_plain("admin", "pw", 1)))),
    ?assertEqual(0, kv_sim_test_client:status(
                      kv_sim_test_client:call(Conn, dcp_commands:select_bucket("default", 2)))),
    ok.

stream(Conn) ->
    Answer = kv_sim_test_client:call(Conn, dcp_commands:stream_req(0, #{end_seqno => 6}, 20)),
    ?assertMatch(#{opcode_name := dcp_stream_req, status := 0}, Answer),
    kv_sim_test_client:recv_until_stream_end(Conn).

opcodes(Frames) ->
    [Name || #{opcode_name := Name} <- Frames].
