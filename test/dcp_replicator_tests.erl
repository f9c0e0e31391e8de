%% @doc dcp_replicator end to end: two kv_sim nodes on loopback, a replicator between them, real
%% sockets. Every MB-53445 case of DESIGN.md is checked through setup_replication's reply.
-module(dcp_replicator_tests).

-include_lib("eunit/include/eunit.hrl").

-define(PASSWORD, "s3cret-Pa55word").
-define(NAME, "replication:n_1@127.0.0.1->n_0@127.0.0.1:default").
%% EUnit timeouts are only a backstop: each test ends in seconds.
-define(BACKSTOP, 60).

%% ---- harness ----

start_nodes(ProducerOpts, ConsumerOpts) ->
    Common = #{password => ?PASSWORD, vbuckets => 16},
    {ok, Producer} = kv_sim:start(maps:merge(Common#{role => producer, docs_per_vbucket => 20,
                                                     value_size => 64}, ProducerOpts)),
    {ok, Consumer} = kv_sim:start(maps:merge(Common#{role => consumer}, ConsumerOpts)),
    {Producer, Consumer}.

rep_opts(Producer, Consumer) ->
    #{consumer => {{127, 0, 0, 1}, kv_sim:port(Consumer)},
      producer => {{127, 0, 0, 1}, kv_sim:port(Producer)},
      bucket => "default", connection_name => ?NAME,
      user => "Administrator", password => ?PASSWORD,
      features => [xattr, snappy, del_times],
      setup_timeout => 10000}.

%% Runs `Fun(Rep, Producer, Consumer)' with a fresh pair of nodes and a replicator; the replicator is
%% linked to this process, which traps exits so that a replicator that stops does not take it along.
with_replication(Fun) ->
    with_replication(#{}, #{}, #{}, Fun).

with_replication(ProducerOpts, ConsumerOpts, RepOpts, Fun) ->
    process_flag(trap_exit, true),
    {Producer, Consumer} = start_nodes(ProducerOpts, ConsumerOpts),
    try
        {ok, Rep} = dcp_replicator:start_link(maps:merge(rep_opts(Producer, Consumer), RepOpts)),
        try
            Fun(Rep, Producer, Consumer)
        after
            stop_replicator(Rep)
        end
    after
        kv_sim:stop(Producer),
        kv_sim:stop(Consumer)
    end.

stop_replicator(Rep) ->
    Ref = erlang:monitor(process, Rep),
    unlink(Rep),
    exit(Rep, shutdown),
    receive {'DOWN', Ref, process, Rep, _} -> ok end,
    dcp_test_lib:flush_exits().

%% Waits (polling the nodes, no time limit but EUnit's backstop) until the consumer holds what the
%% producer has for every vbucket.
wait_exit(Rep) ->
    receive {'EXIT', Rep, Reason} -> Reason end.

%% Waits until the consumer side's splitter has seen `N' answers to ADD_STREAM.
wait_add_stream_answers(Rep, N) ->
    #{consumer := #{splitter := #{by_opcode := ByOpcode}}} = dcp_replicator:stats(Rep),
    case maps:get(dcp_add_stream, ByOpcode, #{frames => 0}) of
        #{frames := F} when F >= N -> ok;
        _ -> timer:sleep(10), wait_add_stream_answers(Rep, N)
    end.

%% ---- replication ----

replicates_every_document_of_every_vbucket_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, Producer, Consumer) ->
                       VBs = lists:seq(0, 15),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, VBs)),
                       ?assertEqual(VBs, dcp_replicator:get_partitions(Rep)),
                       dcp_test_lib:assert_replicated(Producer, Consumer, VBs),
                       ?assertEqual({20, element(2, kv_sim:digest(Producer, 7))},
                                    kv_sim:digest(Consumer, 7))
               end)
     end}.

replicates_byte_identical_through_random_small_write_chunks_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               #{docs_per_vbucket => 300, value_size => 3000}, #{}, #{},
               fun(Rep, Producer, Consumer) ->
                       ok = kv_sim:set_fault(Producer, all, {chunked_writes, 700}),
                       ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 5}),
                       %% setups while data flows: our ADD_STREAMs go into the consumer socket
                       %% between cut-through frames
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1, 2, 3])),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, lists:seq(0, 11))),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, lists:seq(0, 15))),
                       dcp_test_lib:assert_replicated(Producer, Consumer, lists:seq(0, 15))
               end)
     end}.

replicates_with_the_pure_erlang_splitter_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             %% bench/dcp_baseline_splitter: the same proxy with ns_server's splitting loop
             ?assertMatch({module, _}, code:ensure_loaded(dcp_baseline_splitter)),
             with_replication(
               #{}, #{}, #{splitter => {dcp_baseline_splitter, #{}}},
               fun(Rep, Producer, Consumer) ->
                       ok = kv_sim:set_fault(Producer, all, {chunked_writes, 100}),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, lists:seq(0, 15))),
                       dcp_test_lib:assert_replicated(Producer, Consumer, lists:seq(0, 15)),
                       #{producer := #{chunks := Chunks}} = dcp_replicator:stats(Rep),
                       ?assert(Chunks > 0)
               end)
     end}.

setup_towards_fewer_vbuckets_closes_the_others_on_both_sides_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, _Producer, _Consumer) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1, 2, 3])),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [1, 3])),
                       ?assertEqual([1, 3], dcp_replicator:get_partitions(Rep)),
                       %% the same set again: nothing to do
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [1, 3])),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [])),
                       ?assertEqual([], dcp_replicator:get_partitions(Rep))
               end)
     end}.

%% ---- MB-53445: a stream end during setup ----

stream_ended_with_state_changed_before_its_answer_fails_that_vbucket_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, Producer, Consumer) ->
                       ok = kv_sim:set_fault(Producer, 3, {stream_end_on_accept, state_changed}),
                       ok = kv_sim:set_fault(Consumer, 3, no_add_stream_answer_after_stream_end),
                       ?assertEqual({errors, [{{stream_end, state_changed}, {vbucket, 3}}]},
                                    dcp_replicator:setup_replication(Rep, [3])),
                       ?assertEqual([], dcp_replicator:get_partitions(Rep))
               end)
     end}.

one_vbucket_ended_and_the_other_answered_gives_only_the_failure_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, Producer, Consumer) ->
                       ok = kv_sim:set_fault(Producer, 0, {stream_end_on_accept, state_changed}),
                       ok = kv_sim:set_fault(Consumer, 0, no_add_stream_answer_after_stream_end),
                       ?assertEqual({errors, [{{stream_end, state_changed}, {vbucket, 0}}]},
                                    dcp_replicator:setup_replication(Rep, [0, 1])),
                       ?assertEqual([1], dcp_replicator:get_partitions(Rep))
               end)
     end}.

every_failing_stream_end_reason_is_reported_and_ok_is_not_a_failure_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             Reasons = [ok, closed, state_changed, disconnected, too_slow, backfill_fail,
                        rollback, filter_empty, lost_privileges, {unknown, 42}],
             VBs = lists:seq(0, length(Reasons) - 1),
             with_replication(
               fun(Rep, Producer, Consumer) ->
                       [begin
                            Code = case Reason of
                                       {unknown, N} -> N;
                                       _ -> Reason
                                   end,
                            ok = kv_sim:set_fault(Producer, VB, {stream_end_on_accept, Code}),
                            ok = kv_sim:set_fault(Consumer, VB,
                                                  no_add_stream_answer_after_stream_end)
                        end || {VB, Reason} <- lists:zip(VBs, Reasons), Reason =/= ok],
                       ok = kv_sim:set_fault(Producer, 0, {stream_end_on_accept, ok}),
                       Expected = [{{stream_end, Reason}, {vbucket, VB}}
                                   || {VB, Reason} <- lists:zip(VBs, Reasons), Reason =/= ok],
                       ?assertEqual({errors, Expected},
                                    dcp_replicator:setup_replication(Rep, VBs)),
                       %% reason ok: the add's own answer completed it
                       ?assertEqual([0], dcp_replicator:get_partitions(Rep))
               end)
     end}.

stream_end_ok_then_success_answer_is_a_successful_setup_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, Producer, _Consumer) ->
                       ok = kv_sim:set_fault(Producer, 2, {stream_end_on_accept, ok}),
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [2])),
                       ?assertEqual([2], dcp_replicator:get_partitions(Rep))
               end)
     end}.

late_add_stream_answer_after_a_stream_end_is_absorbed_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, Producer, Consumer) ->
                       ok = kv_sim:set_fault(Producer, 5, {stream_end_on_accept, too_slow}),
                       %% the consumer answers, but only well after the stream end went through
                       ok = kv_sim:set_fault(Consumer, 5, {delay_answer, dcp_add_stream, 300}),
                       ?assertEqual({errors, [{{stream_end, too_slow}, {vbucket, 5}}]},
                                    dcp_replicator:setup_replication(Rep, [5])),
                       wait_add_stream_answers(Rep, 1),
                       %% still replicating: the late answer was neither a crash nor forwarded
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [6])),
                       ?assertEqual([6], dcp_replicator:get_partitions(Rep)),
                       #{producer := #{splitter := ProducerStats}} = dcp_replicator:stats(Rep),
                       ?assertNot(maps:is_key(dcp_add_stream,
                                              maps:get(by_opcode, ProducerStats)))
               end)
     end}.

add_stream_answered_with_a_failure_reports_its_status_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, _Producer, Consumer) ->
                       ok = kv_sim:set_fault(Consumer, 4, {add_stream_status, not_my_vbucket}),
                       ?assertEqual({errors, [{{mcbp_status, 16#07}, {vbucket, 4}}]},
                                    dcp_replicator:setup_replication(Rep, [4, 8])),
                       ?assertEqual([8], dcp_replicator:get_partitions(Rep))
               end)
     end}.

%% ---- setup never hangs ----

consumer_that_never_answers_gives_setup_timeout_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               #{}, #{}, #{setup_timeout => 300},
               fun(Rep, _Producer, Consumer) ->
                       ok = kv_sim:set_fault(Consumer, 9, {drop_answer, dcp_add_stream}),
                       ?assertEqual({errors, [{setup_timeout, {vbucket, 9}}]},
                                    dcp_replicator:setup_replication(Rep, [9, 10])),
                       ?assertEqual([10], dcp_replicator:get_partitions(Rep))
               end)
     end}.

consumer_socket_closed_during_setup_gives_connection_lost_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, _Producer, Consumer) ->
                       ok = kv_sim:set_fault(Consumer, 11, {close_socket_on, dcp_add_stream}),
                       ?assertEqual(
                          {errors, [{{connection_lost, {socket_closed, consumer}}, {vbucket, 11}}]},
                          dcp_replicator:setup_replication(Rep, [11])),
                       ?assertEqual({socket_closed, consumer}, wait_exit(Rep))
               end)
     end}.

producer_socket_closed_during_setup_gives_connection_lost_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, Producer, _Consumer) ->
                       ok = kv_sim:set_fault(Producer, 12, {close_socket_on, dcp_stream_req}),
                       ?assertEqual(
                          {errors, [{{connection_lost, {socket_closed, producer}}, {vbucket, 12}}]},
                          dcp_replicator:setup_replication(Rep, [12])),
                       ?assertEqual({socket_closed, producer}, wait_exit(Rep))
               end)
     end}.

splitter_error_stops_the_pair_and_answers_the_caller_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             %% mutations of 64-byte values exceed a 64-byte frame cap on the producer side
             with_replication(
               #{}, #{}, #{max_frame_size => 64},
               fun(Rep, _Producer, _Consumer) ->
                       Reply = dcp_replicator:setup_replication(Rep, [1]),
                       ?assertMatch({errors, [{{connection_lost,
                                                {splitter_error, _, {frame_too_large, _, 64}}},
                                               {vbucket, 1}}]}, Reply),
                       ?assertMatch({splitter_error, _, {frame_too_large, _, 64}}, wait_exit(Rep))
               end)
     end}.

%% ---- takeover, stats, shut ----

takeover_completes_when_the_consumer_has_taken_the_vbucket_over_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, Producer, Consumer) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [13])),
                       ?assertEqual(ok, dcp_replicator:takeover(Rep, 13)),
                       ?assertEqual(active, kv_sim:vbucket_state(Consumer, 13)),
                       ?assertEqual(dead, kv_sim:vbucket_state(Producer, 13))
               end)
     end}.

stats_give_both_splitters_and_the_setup_state_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_replication(
               fun(Rep, Producer, Consumer) ->
                       ok = dcp_replicator:setup_replication(Rep, [0, 1]),
                       dcp_test_lib:assert_replicated(Producer, Consumer, [0, 1]),
                       #{consumer := C, producer := P, setup := Setup} = dcp_replicator:stats(Rep),
                       ?assertMatch(#{side := consumer, splitter := #{frames := _}}, C),
                       #{splitter := #{by_opcode := ByOpcode}} = P,
                       ?assertMatch(#{side := producer}, P),
                       ?assertMatch(#{dcp_mutation := #{frames := 40}}, ByOpcode),
                       ?assertMatch(#{state := idle, active := [0, 1], pending_adds := []}, Setup)
               end)
     end}.

orderly_stop_closes_the_consumer_streams_so_the_next_replicator_can_add_them_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             process_flag(trap_exit, true),
             {Producer, Consumer} = start_nodes(#{}, #{}),
             try
                 {ok, Rep1} = dcp_replicator:start_link(rep_opts(Producer, Consumer)),
                 ?assertEqual(ok, dcp_replicator:setup_replication(Rep1, [0, 1, 2])),
                 stop_replicator(Rep1),
                 {ok, Rep2} = dcp_replicator:start_link(rep_opts(Producer, Consumer)),
                 %% no key_eexists: the first replicator closed its streams on the consumer
                 ?assertEqual(ok, dcp_replicator:setup_replication(Rep2, [0, 1, 2])),
                 stop_replicator(Rep2)
             after
                 kv_sim:stop(Producer),
                 kv_sim:stop(Consumer)
             end
     end}.

%% ---- dcp_sup ----

sup_gives_vbucket_v_to_connection_v_rem_n_and_merges_replies_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             process_flag(trap_exit, true),
             {Producer, Consumer} = start_nodes(#{}, #{}),
             try
                 Opts = maps:remove(connection_name, rep_opts(Producer, Consumer)),
                 {ok, Sup} = dcp_sup:start_link(Opts#{consumer_node => 'n_0@127.0.0.1',
                                                      producer_node => 'n_1@127.0.0.1',
                                                      connections => 3}),
                 ok = kv_sim:set_fault(Producer, 4, {stream_end_on_accept, rollback}),
                 ok = kv_sim:set_fault(Consumer, 4, no_add_stream_answer_after_stream_end),
                 ?assertEqual({errors, [{{stream_end, rollback}, {vbucket, 4}}]},
                              dcp_sup:setup_replication(Sup, lists:seq(0, 8))),
                 Parts = [{N, dcp_replicator:get_partitions(Rep)}
                          || {N, Rep} <- dcp_sup:replicators(Sup)],
                 ?assertEqual([{0, [0, 3, 6]}, {1, [1, 7]}, {2, [2, 5, 8]}], Parts),
                 ?assertEqual(ok, dcp_sup:setup_replication(Sup, [0, 1])),
                 ?assertEqual([{0, [0]}, {1, [1]}, {2, []}],
                              [{N, dcp_replicator:get_partitions(Rep)}
                               || {N, Rep} <- dcp_sup:replicators(Sup)]),
                 unlink(Sup),
                 Ref = erlang:monitor(process, Sup),
                 exit(Sup, shutdown),
                 receive {'DOWN', Ref, process, Sup, _} -> ok end
             after
                 kv_sim:stop(Producer),
                 kv_sim:stop(Consumer)
             end
     end}.

%% ---- TLS ----

replicates_over_tls_with_peer_verification_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             {ServerTls, ClientTls} = dcp_test_lib:tls_configs(),
             with_replication(
               #{ssl => ServerTls}, #{ssl => ServerTls}, #{ssl => ClientTls},
               fun(Rep, Producer, Consumer) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1, 2])),
                       dcp_test_lib:assert_replicated(Producer, Consumer, [0, 1, 2])
               end)
     end}.

tls_peer_that_cannot_be_verified_is_refused_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             {Server, _} = dcp_test_lib:tls_configs(),
             %% a client of another test CA: it trusts that CA only
             {_, ClientTls} = dcp_test_lib:tls_configs(),
             process_flag(trap_exit, true),
             {Producer, Consumer} = start_nodes(#{ssl => Server}, #{ssl => Server}),
             try
                 ?assertMatch({error, {consumer, {connect_failed, {tls, _}}}},
                              dcp_replicator:start_link(
                                (rep_opts(Producer, Consumer))#{ssl => ClientTls})),
                 dcp_test_lib:flush_exits()
             after
                 kv_sim:stop(Producer),
                 kv_sim:stop(Consumer)
             end
     end}.

sup_restarts_a_failed_replicator_which_takes_its_vbuckets_back_on_the_next_setup_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             process_flag(trap_exit, true),
             {Producer, Consumer} = start_nodes(#{}, #{}),
             try
                 Opts = maps:remove(connection_name, rep_opts(Producer, Consumer)),
                 {ok, Sup} = dcp_sup:start_link(Opts#{consumer_node => 'n_0@127.0.0.1',
                                                      producer_node => 'n_1@127.0.0.1',
                                                      connections => 2}),
                 ?assertEqual(ok, dcp_sup:setup_replication(Sup, [0, 1, 2, 3])),
                 [{0, Rep0}, {1, Rep1}] = dcp_sup:replicators(Sup),
                 Ref = erlang:monitor(process, Rep1),
                 ok = kv_sim:set_fault(Consumer, 5, {close_socket_on, dcp_add_stream}),
                 ?assertMatch({errors, [{{connection_lost, {socket_closed, consumer}},
                                         {vbucket, 5}}]},
                              dcp_sup:setup_replication(Sup, [0, 1, 2, 3, 5])),
                 receive {'DOWN', Ref, process, Rep1, _} -> ok end,
                 ok = kv_sim:clear_faults(Consumer),
                 %% connection 1 came back without streams and got 1, 3, 5 again; connection 0
                 %% (the same process) kept 0 and 2
                 ?assertEqual([0, 2, 1, 3, 5], wait_setup_ok(Sup, [0, 1, 2, 3, 5])),
                 [{0, Rep0}, {1, NewRep1}] = dcp_sup:replicators(Sup),
                 ?assertNotEqual(Rep1, NewRep1),
                 unlink(Sup),
                 SupRef = erlang:monitor(process, Sup),
                 exit(Sup, shutdown),
                 receive {'DOWN', SupRef, process, Sup, _} -> ok end
             after
                 kv_sim:stop(Producer),
                 kv_sim:stop(Consumer)
             end
     end}.

%% The restarted replicator may not be up yet: until it is, its vbuckets come back as not running.
wait_setup_ok(Sup, VBuckets) ->
    case dcp_sup:setup_replication(Sup, VBuckets) of
        ok ->
            lists:append([dcp_replicator:get_partitions(Rep)
                          || {_, Rep} <- dcp_sup:replicators(Sup), is_pid(Rep)]);
        {errors, _} ->
            timer:sleep(10),
            wait_setup_ok(Sup, VBuckets)
    end.
