%% @doc Stream setup never diverges from the consumer node (issue 11), end to end against kv_sim:
%% an ADD_STREAM answer delayed past the setup deadline (then the retry), a re-add while the old
%% answer is still owed, a close and re-add while it is owed, and a takeover whose stream ends
%% before the switch to active, for every stream-end reason.
-module(dcp_13_setup_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dcp_test_lib, [with_nodes/3, fail_stream/3, stream_end_error/2]).

%% The deadline, and an answer delay past it (the retry's deadline is still ahead when it comes).
-define(DEADLINE, 700).
-define(DELAY, 1000).
-define(REASONS, [{0, ok}, {1, closed}, {2, state_changed}, {3, disconnected}, {4, too_slow},
                  {5, backfill_fail}, {6, rollback}, {7, filter_empty}, {8, lost_privileges},
                  {42, {unknown, 42}}]).

timeout_error(VB) ->
    {errors, [{setup_timeout, {vbucket, VB}}]}.

delay_add(Consumer, VB) ->
    ok = kv_sim:set_fault(Consumer, VB, {delay_answer, dcp_add_stream, ?DELAY}).

%% Case 1: the late success arrives after the caller was told setup_timeout; the retry must
%% succeed (not `{mcbp_status, 2}' from a second ADD_STREAM) and the stream replicates.
late_success_after_the_deadline_then_the_retry_is_ok_test_() ->
    VB = 4,
    with_nodes("add answered after the deadline; the retry after the answer is ok",
               #{rep => #{setup_timeout => ?DEADLINE}},
        fun(#{rep := Rep, consumer := Consumer, producer := Producer}) ->
                delay_add(Consumer, VB),
                ?assertEqual(timeout_error(VB), dcp_replicator:setup_replication(Rep, [VB])),
                ok = kv_sim:clear_faults(Consumer),
                %% the late answer arrives and is applied: the consumer holds the stream
                dcp_test_lib:wait_until(fun() -> dcp_replicator:get_partitions(Rep) =:= [VB] end),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [VB])),
                ?assertEqual([VB], dcp_replicator:get_partitions(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [VB])
        end).

%% Case 2a: the retry begins while the first answer is still owed: no second ADD_STREAM (kv_sim
%% would refuse it with key_eexists); the owed answer settles the retry.
retry_while_the_answer_is_owed_takes_that_answer_test_() ->
    VB = 5,
    with_nodes("re-add while the first add's answer is delayed",
               #{rep => #{setup_timeout => ?DEADLINE}},
        fun(#{rep := Rep, consumer := Consumer, producer := Producer}) ->
                delay_add(Consumer, VB),
                ?assertEqual(timeout_error(VB), dcp_replicator:setup_replication(Rep, [VB])),
                ok = kv_sim:clear_faults(Consumer),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [VB])),
                ?assertEqual([VB], dcp_replicator:get_partitions(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [VB])
        end).

%% Case 2b: the vbucket is closed and re-added while the first add's answer is owed: the close
%% ends whatever the owed add opened, and the late answer is not applied to the new add.
close_and_re_add_while_the_answer_is_owed_test_() ->
    VB = 6,
    with_nodes("close and re-add while the first add's answer is delayed",
               #{rep => #{setup_timeout => ?DEADLINE}},
        fun(#{rep := Rep, consumer := Consumer, producer := Producer}) ->
                delay_add(Consumer, VB),
                ?assertEqual(timeout_error(VB), dcp_replicator:setup_replication(Rep, [VB])),
                ok = kv_sim:clear_faults(Consumer),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [])),
                ?assertEqual([], dcp_replicator:get_partitions(Rep)),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [VB])),
                ?assertEqual([VB], dcp_replicator:get_partitions(Rep)),
                %% the old answer comes in meanwhile and changes nothing
                timer:sleep(?DELAY),
                ?assertEqual([VB], dcp_replicator:get_partitions(Rep)),
                ?assertMatch(#{setup := #{state := idle, active := [VB]}},
                             dcp_replicator:stats(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [VB])
        end).

%% Case 3: a takeover stream that ends before the switch to active did not take over: the
%% takeover answers at once with the stream end, whatever its reason, and a later takeover works.
takeover_stream_end_before_the_switch_test_() ->
    [takeover_case(Code, Reason) || {Code, Reason} <- ?REASONS].

takeover_case(Code, Reason) ->
    VB = 7,
    Title = lists:flatten(io_lib:format("takeover, stream end ~p (~0p) before the switch",
                                        [Code, Reason])),
    %% a deadline the test would notice: the answer must come from the stream end
    with_nodes(Title, #{rep => #{setup_timeout => 10000}},
        fun(#{rep := Rep, producer := Producer} = Env) ->
                fail_stream(Env, VB, Code),
                T0 = erlang:monotonic_time(millisecond),
                ?assertEqual(stream_end_error(Reason, VB), dcp_replicator:takeover(Rep, VB)),
                ?assert(erlang:monotonic_time(millisecond) - T0 < 5000),
                ?assertEqual([], dcp_replicator:get_partitions(Rep)),
                ok = kv_sim:clear_faults(Producer),
                ?assertEqual(ok, dcp_replicator:takeover(Rep, VB)),
                %% a completed takeover is not a replica stream of this connection
                ?assertEqual([], dcp_replicator:get_partitions(Rep))
        end).

%% shut_connection ends a running (here stuck) takeover: the takeover's caller and the shut's get
%% one reply, and the connection is shut.
shut_ends_a_stuck_takeover_and_answers_its_caller_test_() ->
    {timeout, 60, fun() ->
        dcp_test_lib:with_pair(#{}, #{}, 30000, fun(C, _P, _Producer, Consumer) ->
            %% the takeover add is never answered: the takeover cannot complete
            ok = kv_sim:set_fault(Consumer, 9, {drop_answer, dcp_add_stream}),
            Takeover = dcp_test_lib:async(fun() -> dcp_consumer_conn:takeover(C, 9) end),
            dcp_test_lib:wait_until(
              fun() ->
                      case dcp_consumer_conn:setup_info(C) of
                          #{takeover := #{stage := Stage}} -> Stage =/= requested;
                          _ -> false
                      end
              end),
            Closed = stream_end_error(closed, 9),
            ?assertEqual(Closed, dcp_consumer_conn:shut_connection(C, 5000)),
            ?assertEqual(Closed, Takeover()),
            ?assertMatch(#{state := shut}, dcp_consumer_conn:setup_info(C))
        end)
    end}.
