%% @doc MB-53445 and the add's answers: a stream end for a vbucket whose add is pending, for every
%% reason code and every way the consumer node answers the add afterwards (or never); adds and
%% stream requests refused with a status.
-module(dcp_05_stream_end_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dcp_test_lib, [with_nodes/3, fail_stream/3, never_answer_after_stream_end/2,
                       stream_end_error/2, wait_stats/2, frames/3]).

-define(SHORT_SETUP_TIMEOUT, 300).
%% Every stream-end reason of PROTOCOL.md by its code, plus one no version defines.
-define(REASONS, [{0, ok}, {1, closed}, {2, state_changed}, {3, disconnected}, {4, too_slow},
                  {5, backfill_fail}, {6, rollback}, {7, filter_empty}, {8, lost_privileges},
                  {42, {unknown, 42}}]).

%% ---- MB-53445: a stream end for a vbucket whose add is pending ----

%% For each reason code: the consumer node answers the add after the stream end went through it
%% (`same_turn': at the end of the chunk that held both, as kv_engine; `delayed': 150 ms later), or
%% never answers it. Reason ok is not a failure: the add stays pending and its answer (or, when it
%% never comes, the short deadline) settles it; the stream has ended all the same, so the vbucket
%% is not active afterwards (the consumer holds no stream for it).
mb53445_matrix_test_() ->
    [mb53445_case(Code, Reason, Answer) || {Code, Reason} <- ?REASONS,
                                          Answer <- [same_turn, delayed, never]].

mb53445_case(Code, Reason, Answer) ->
    VB = 3,
    Expected = case {Reason, Answer} of
                   {ok, never} -> {errors, [{setup_timeout, {vbucket, VB}}]};
                   {ok, _} -> ok;
                   _ -> stream_end_error(Reason, VB)
               end,
    RepOpts = case {Reason, Answer} of
                  {ok, never} -> #{setup_timeout => ?SHORT_SETUP_TIMEOUT};
                  _ -> #{}
              end,
    Title = lists:flatten(io_lib:format("stream end ~p (~0p), add answered ~p -> ~0p",
                                        [Code, Reason, Answer, Expected])),
    with_nodes(Title, #{rep => RepOpts},
        fun(#{rep := Rep, consumer := Consumer} = Env) ->
                fail_stream(Env, VB, Code),
                case Answer of
                    same_turn -> ok;
                    delayed -> ok = kv_sim:set_fault(Consumer, VB,
                                                     {delay_answer, dcp_add_stream, 150});
                    never -> never_answer_after_stream_end(Env, VB)
                end,
                ?assertEqual(Expected, dcp_replicator:setup_replication(Rep, [VB])),
                ?assertEqual([], dcp_replicator:get_partitions(Rep)),
                %% the replicator keeps working, whatever the answer did
                ok = kv_sim:clear_faults(Consumer),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [VB + 1])),
                ?assertEqual([VB + 1], dcp_replicator:get_partitions(Rep))
        end).

two_vbuckets_one_ended_waits_for_the_other_and_reports_only_the_failure_test_() ->
    with_nodes("vbucket 0 ended (rollback, never answered), vbucket 1 answered 200 ms late", #{},
        fun(#{rep := Rep, consumer := Consumer, producer := Producer} = Env) ->
                fail_stream(Env, 0, rollback),
                never_answer_after_stream_end(Env, 0),
                ok = kv_sim:set_fault(Consumer, 1, {delay_answer, dcp_add_stream, 200}),
                ?assertEqual(stream_end_error(rollback, 0),
                             dcp_replicator:setup_replication(Rep, [0, 1])),
                %% vbucket 1 is active: the reply came only after its answer
                ?assertEqual([1], dcp_replicator:get_partitions(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [1])
        end).

vbucket_1024_setup_with_one_ended_reports_only_that_one_test_() ->
    VBs = lists:seq(0, 1023),
    with_nodes("1024 vbuckets, vbucket 777 ended with state_changed and never answered",
        #{producer => #{vbuckets => 1024, docs_per_vbucket => 3, value_size => 16},
          consumer => #{vbuckets => 1024}},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer} = Env) ->
                fail_stream(Env, 777, state_changed),
                never_answer_after_stream_end(Env, 777),
                ?assertEqual(stream_end_error(state_changed, 777),
                             dcp_replicator:setup_replication(Rep, VBs)),
                ?assertEqual(VBs -- [777], dcp_replicator:get_partitions(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, VBs -- [777]),
                ?assertEqual({0, crypto:hash(sha256, <<>>)}, kv_sim:digest(Consumer, 777))
        end).

every_failing_reason_at_once_is_reported_per_vbucket_in_order_test_() ->
    with_nodes("ten vbuckets, one per reason code, in one setup", #{},
        fun(#{rep := Rep} = Env) ->
                Cases = lists:zip(lists:seq(0, length(?REASONS) - 1), ?REASONS),
                [begin
                     fail_stream(Env, VB, Code),
                     never_answer_after_stream_end(Env, VB)
                 end || {VB, {Code, Reason}} <- Cases, Reason =/= ok],
                %% reason ok: answered after the stream end, so it completes (and the stream
                %% has ended: the consumer holds none)
                fail_stream(Env, 0, 0),
                Expected = [{{stream_end, Reason}, {vbucket, VB}}
                            || {VB, {_, Reason}} <- Cases, Reason =/= ok],
                ?assertEqual({errors, Expected},
                             dcp_replicator:setup_replication(Rep, [VB || {VB, _} <- Cases])),
                ?assertEqual([], dcp_replicator:get_partitions(Rep))
        end).

late_answer_is_absorbed_and_the_replicator_keeps_working_test_() ->
    with_nodes("vbucket 5 ended with too_slow, its success answer comes 300 ms later", #{},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer} = Env) ->
                fail_stream(Env, 5, too_slow),
                ok = kv_sim:set_fault(Consumer, 5, {delay_answer, dcp_add_stream, 300}),
                ?assertEqual(stream_end_error(too_slow, 5),
                             dcp_replicator:setup_replication(Rep, [5])),
                wait_stats(Rep, fun(#{setup := #{absorbed := N}}) -> N >= 1 end),
                %% neither a crash nor forwarded to the producer
                Stats = dcp_replicator:stats(Rep),
                ?assertEqual(0, frames(producer, dcp_add_stream, Stats)),
                ?assertMatch(#{state := idle, pending_adds := [], active := []},
                             maps:get(setup, Stats)),
                ok = kv_sim:clear_faults(Producer),
                ok = kv_sim:clear_faults(Consumer),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [5, 6])),
                ?assertEqual([5, 6], dcp_replicator:get_partitions(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [5, 6])
        end).

%% ---- adds refused with a status ----

add_answered_with_a_failure_status_reports_that_status_test_() ->
    with_nodes("adds answered with not_my_vbucket, etmpfail and 0x1234", #{},
        fun(#{rep := Rep, consumer := Consumer}) ->
                ok = kv_sim:set_fault(Consumer, 4, {add_stream_status, not_my_vbucket}),
                ok = kv_sim:set_fault(Consumer, 5, {add_stream_status, 16#86}),
                ok = kv_sim:set_fault(Consumer, 7, {add_stream_status, 16#1234}),
                ?assertEqual({errors, [{{mcbp_status, 16#07}, {vbucket, 4}},
                                       {{mcbp_status, 16#86}, {vbucket, 5}},
                                       {{mcbp_status, 16#1234}, {vbucket, 7}}]},
                             dcp_replicator:setup_replication(Rep, [4, 5, 6, 7])),
                ?assertEqual([6], dcp_replicator:get_partitions(Rep))
        end).

producer_refusing_the_stream_fails_the_add_with_its_status_test_() ->
    with_nodes("the producer answers the consumer's STREAM_REQ with not_my_vbucket", #{},
        fun(#{rep := Rep, producer := Producer}) ->
                ok = kv_sim:set_fault(Producer, 2, {stream_req_status, not_my_vbucket}),
                ?assertEqual({errors, [{{mcbp_status, 16#07}, {vbucket, 2}}]},
                             dcp_replicator:setup_replication(Rep, [2, 3])),
                ?assertEqual([3], dcp_replicator:get_partitions(Rep))
        end).
