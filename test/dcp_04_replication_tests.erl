%% @doc Replication end to end: every document arrives (equal digests) whatever the write chunks,
%% framing or splitter; setups towards other vbucket sets; takeover; stats; the orderly stop.
-module(dcp_04_replication_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dcp_test_lib, [with_nodes/3, assert_replicated/3, frames/3]).

%% ---- every document arrives, whatever the chunking ----

many_vbuckets_replicate_with_equal_digests_through_random_write_chunks_test_() ->
    VBs = lists:seq(0, 63),
    with_nodes("64 vbuckets x 300 docs, both nodes write in random chunks",
               #{producer => #{vbuckets => 64, docs_per_vbucket => 300, value_size => 200},
                 consumer => #{vbuckets => 64}},
               fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                       %% producer chunks cut mutations anywhere; tiny consumer chunks cut every
                       %% answer
                       ok = kv_sim:set_fault(Producer, all, {chunked_writes, 1500}),
                       ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 5}),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, VBs)),
                       ?assertEqual(VBs, dcp_replicator:get_partitions(Rep)),
                       assert_replicated(Producer, Consumer, VBs),
                       ?assertEqual({300, element(2, kv_sim:digest(Producer, 17))},
                                    kv_sim:digest(Consumer, 17)),
                       ?assertEqual(64 * 300,
                                    frames(producer, dcp_mutation, dcp_replicator:stats(Rep)))
               end).

tiny_write_chunks_split_every_header_and_still_replicate_test_() ->
    VBs = lists:seq(0, 7),
    with_nodes("8 vbuckets, writes of 1..7 bytes on both nodes",
               #{producer => #{vbuckets => 8, docs_per_vbucket => 50, value_size => 100},
                 consumer => #{vbuckets => 8}},
               fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                       ok = kv_sim:set_fault(Producer, all, {chunked_writes, 7}),
                       ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 7}),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, VBs)),
                       assert_replicated(Producer, Consumer, VBs)
               end).

flexible_framing_and_unknown_opcodes_in_the_stream_replicate_with_equal_digests_test_() ->
    VBs = lists:seq(0, 31),
    with_nodes("32 vbuckets, alt_req frames with stream ids and unknown opcodes, chunked",
               %% kv_engine's consumer refuses stream ids (and kv_sim the alt magic without HELLO
               %% alt_request_support): this consumer takes them, to test the proxy's splitting
               #{producer => #{vbuckets => 32, docs_per_vbucket => 200, value_size => 128},
                 consumer => #{vbuckets => 32, accept_alt_requests => true}},
               fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                       ok = kv_sim:set_fault(Producer, all, flexible_framing),
                       ok = kv_sim:set_fault(Producer, all, {unknown_opcodes, 16#ee}),
                       ok = kv_sim:set_fault(Producer, all, {chunked_writes, 700}),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, VBs)),
                       assert_replicated(Producer, Consumer, VBs),
                       Stats = dcp_replicator:stats(Rep),
                       %% the unknown opcode really went through the proxy
                       ?assert(maps:is_key({unknown, 16#ee},
                                           maps:get(by_opcode,
                                                    maps:get(splitter,
                                                             maps:get(producer, Stats))))),
                       ?assertEqual(32 * 200, frames(producer, dcp_mutation, Stats))
               end).

setups_while_data_flows_replicate_byte_identical_through_small_write_chunks_test_() ->
    with_nodes("three setups while 3000-byte mutations flow in chunks of 700 and 5 bytes",
               #{producer => #{docs_per_vbucket => 300, value_size => 3000}},
               fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                       ok = kv_sim:set_fault(Producer, all, {chunked_writes, 700}),
                       ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 5}),
                       %% our ADD_STREAMs go into the consumer socket between cut-through frames
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1, 2, 3])),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, lists:seq(0, 11))),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, lists:seq(0, 15))),
                       assert_replicated(Producer, Consumer, lists:seq(0, 15))
               end).

%% bench/dcp_baseline_splitter: the same proxy with ns_server's splitting loop.
baseline_splitter_replicates_with_equal_digests_test_() ->
    VBs = lists:seq(0, 63),
    with_nodes("64 vbuckets x 300 docs through dcp_baseline_splitter, random write chunks",
               #{producer => #{vbuckets => 64, docs_per_vbucket => 300, value_size => 200},
                 consumer => #{vbuckets => 64},
                 rep => #{splitter => {dcp_baseline_splitter, #{}}}},
               fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                       ?assertMatch({module, _}, code:ensure_loaded(dcp_baseline_splitter)),
                       ok = kv_sim:set_fault(Producer, all, {chunked_writes, 1500}),
                       ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 5}),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, VBs)),
                       assert_replicated(Producer, Consumer, VBs),
                       %% the NIF splitter's counters are absent: the baseline did the splitting
                       #{producer := #{splitter := Counters, chunks := Chunks}} =
                           dcp_replicator:stats(Rep),
                       ?assertEqual(#{}, Counters),
                       ?assert(Chunks > 0)
               end).

%% ---- setups towards other sets ----

setup_towards_fewer_vbuckets_closes_the_others_on_both_sides_test_() ->
    with_nodes("setups of [0..3], [1, 3] twice, then []", #{},
               fun(#{rep := Rep}) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1, 2, 3])),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [1, 3])),
                       ?assertEqual([1, 3], dcp_replicator:get_partitions(Rep)),
                       %% the same set again: nothing to do
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [1, 3])),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [])),
                       ?assertEqual([], dcp_replicator:get_partitions(Rep))
               end).

%% ---- takeover ----

takeover_makes_the_vbucket_active_on_the_consumer_and_dead_on_the_producer_test_() ->
    with_nodes("takeover of a replicated vbucket and of a fresh one", #{},
               fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [13])),
                       assert_replicated(Producer, Consumer, [13]),
                       ?assertEqual(ok, dcp_replicator:takeover(Rep, 13)),
                       ?assertEqual(active, kv_sim:vbucket_state(Consumer, 13)),
                       ?assertEqual(dead, kv_sim:vbucket_state(Producer, 13)),
                       assert_replicated(Producer, Consumer, [13]),
                       %% a vbucket never replicated before: the takeover stream carries all its
                       %% data
                       ?assertEqual(ok, dcp_replicator:takeover(Rep, 14)),
                       ?assertEqual(active, kv_sim:vbucket_state(Consumer, 14)),
                       ?assertEqual(dead, kv_sim:vbucket_state(Producer, 14)),
                       assert_replicated(Producer, Consumer, [14]),
                       %% untouched vbuckets stay as they were
                       ?assertEqual(replica, kv_sim:vbucket_state(Consumer, 15)),
                       ?assertEqual(active, kv_sim:vbucket_state(Producer, 15))
               end).

takeover_with_chunked_writes_completes_test_() ->
    with_nodes("takeover while both nodes write in chunks of 1..11 bytes", #{},
               fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                       ok = kv_sim:set_fault(Producer, all, {chunked_writes, 11}),
                       ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 11}),
                       ?assertEqual(ok, dcp_replicator:takeover(Rep, 6)),
                       ?assertEqual(active, kv_sim:vbucket_state(Consumer, 6)),
                       ?assertEqual(dead, kv_sim:vbucket_state(Producer, 6)),
                       assert_replicated(Producer, Consumer, [6])
               end).

%% ---- stats and the orderly stop ----

stats_give_both_splitters_and_the_setup_state_test_() ->
    with_nodes("two vbuckets of 20 docs replicated", #{},
               fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                       ok = dcp_replicator:setup_replication(Rep, [0, 1]),
                       assert_replicated(Producer, Consumer, [0, 1]),
                       #{consumer := C, producer := P, setup := Setup} = dcp_replicator:stats(Rep),
                       ?assertMatch(#{side := consumer, splitter := #{frames := _}}, C),
                       #{splitter := #{by_opcode := ByOpcode}} = P,
                       ?assertMatch(#{side := producer}, P),
                       ?assertMatch(#{dcp_mutation := #{frames := 40}}, ByOpcode),
                       ?assertMatch(#{state := idle, active := [0, 1], pending_adds := []}, Setup)
               end).

orderly_stop_closes_the_consumer_streams_so_the_next_replicator_can_add_them_test_() ->
    with_nodes("two replicators one after the other for the same vbuckets", #{rep => none},
               fun(Env) ->
                       {ok, Rep1} = dcp_test_lib:start_replicator(dcp_test_lib:rep_opts(Env)),
                       ?assertEqual(ok, dcp_replicator:setup_replication(element(2, Rep1),
                                                                         [0, 1, 2])),
                       ?assertEqual(shutdown, dcp_test_lib:stop_replicator(Rep1)),
                       {ok, Rep2} = dcp_test_lib:start_replicator(dcp_test_lib:rep_opts(Env)),
                       %% no key_eexists: the first replicator closed its streams on the consumer
                       ?assertEqual(ok, dcp_replicator:setup_replication(element(2, Rep2),
                                                                         [0, 1, 2])),
                       ?assertEqual(shutdown, dcp_test_lib:stop_replicator(Rep2))
               end).
