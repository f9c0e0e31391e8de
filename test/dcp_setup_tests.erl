%% @doc The stream-setup machine through dcp_nif: the MB-53445 cases with their exact reply terms,
%% takeover, shut, deadline, and bad arguments (never a crash of the VM, never a changed machine).
-module(dcp_setup_tests).

-include_lib("proper/include/proper.hrl").
-include_lib("eunit/include/eunit.hrl").

%% A machine with VBs active (set up and answered).
with_active(VBs) ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_begin(S, VBs),
    [noreply = dcp_nif:setup_add_stream_response(S, VB, 0) || VB <- lists:droplast(VBs)],
    {reply, ok} = dcp_nif:setup_add_stream_response(S, lists:last(VBs), 0),
    S.

%% ---- MB-53445: stream ends during setup ----

stream_end_with_state_changed_before_add_answer_fails_that_vbucket_test() ->
    S = dcp_nif:setup_new(),
    ?assertEqual({send, [{add_stream, 5, 0}]}, dcp_nif:setup_begin(S, [5])),
    ?assertEqual({reply, {errors, [{{stream_end, state_changed}, {vbucket, 5}}]}},
                 dcp_nif:setup_stream_end(S, 5, 5, state_changed)),
    ?assertEqual([], dcp_nif:setup_partitions(S)),
    ?assertMatch(#{state := idle}, dcp_nif:setup_info(S)).

reply_waits_for_answered_vbucket_and_reports_only_the_ended_one_test() ->
    S = dcp_nif:setup_new(),
    ?assertEqual({send, [{add_stream, 0, 0}, {add_stream, 1, 0}]}, dcp_nif:setup_begin(S, [0, 1])),
    ?assertEqual(noreply, dcp_nif:setup_stream_end(S, 0, 0, state_changed)),
    ?assertEqual({reply, {errors, [{{stream_end, state_changed}, {vbucket, 0}}]}},
                 dcp_nif:setup_add_stream_response(S, 1, 0)),
    ?assertEqual([1], dcp_nif:setup_partitions(S)).

stream_end_is_matched_by_vbucket_not_by_its_opaque_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_begin(S, [3, 7]),
    %% The frame's opaque is the consumer's own; here it even equals the other pending vbucket.
    ?assertEqual(noreply, dcp_nif:setup_stream_end(S, 3, 7, backfill_fail)),
    ?assertMatch(#{pending_adds := [7]}, dcp_nif:setup_info(S)),
    ?assertEqual({reply, {errors, [{{stream_end, backfill_fail}, {vbucket, 3}}]}},
                 dcp_nif:setup_add_stream_response(S, 7, 0)).

stream_end_with_reason_ok_then_success_answer_replies_ok_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_begin(S, [2]),
    ?assertEqual(noreply, dcp_nif:setup_stream_end(S, 2, 16#1234, ok)),
    ?assertEqual({reply, ok}, dcp_nif:setup_add_stream_response(S, 2, 0)),
    ?assertEqual([2], dcp_nif:setup_partitions(S)).

late_add_answer_after_a_failure_is_absorbed_not_a_violation_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_begin(S, [0]),
    ?assertEqual({reply, {errors, [{{stream_end, rollback}, {vbucket, 0}}]}},
                 dcp_nif:setup_stream_end(S, 0, 99, rollback)),
    ?assertEqual(noreply, dcp_nif:setup_add_stream_response(S, 0, 0)),
    ?assertMatch(#{absorbed := 1}, dcp_nif:setup_info(S)),
    ?assertEqual([], dcp_nif:setup_partitions(S)).

every_failing_reason_comes_back_as_the_term_given_test_() ->
    Reasons = [closed, state_changed, disconnected, too_slow, backfill_fail, rollback,
               filter_empty, lost_privileges, {unknown, 9}, {unknown, 4294967295}],
    [{lists:flatten(io_lib:format("~p", [R])),
      fun() ->
              S = dcp_nif:setup_new(),
              {send, _} = dcp_nif:setup_begin(S, [1]),
              ?assertEqual({reply, {errors, [{{stream_end, R}, {vbucket, 1}}]}},
                           dcp_nif:setup_stream_end(S, 1, 0, R))
      end} || R <- Reasons].

stream_end_of_an_active_stream_removes_it_test() ->
    S = with_active([1, 2]),
    ?assertEqual(noreply, dcp_nif:setup_stream_end(S, 1, 0, ok)),
    ?assertEqual(noreply, dcp_nif:setup_stream_end(S, 60000, 0, closed)),
    ?assertEqual([2], dcp_nif:setup_partitions(S)).

%% ---- answers ----

add_failure_and_close_key_enoent_give_exact_reply_test() ->
    S = with_active([0]),
    ?assertEqual({send, [{add_stream, 1, 0}, {add_stream, 2, 0},
                         {close_stream, consumer, 0}, {close_stream, producer, 0}]},
                 dcp_nif:setup_begin(S, [1, 2])),
    ?assertEqual(noreply, dcp_nif:setup_close_stream_response(S, consumer, 0, 1)),
    ?assertEqual(noreply, dcp_nif:setup_close_stream_response(S, producer, 0, 0)),
    ?assertEqual(noreply, dcp_nif:setup_add_stream_response(S, 2, 16#07)),
    ?assertEqual({reply, {errors, [{{mcbp_status, 16#07}, {vbucket, 2}}]}},
                 dcp_nif:setup_add_stream_response(S, 1, 0)),
    ?assertEqual([1], dcp_nif:setup_partitions(S)).

unknown_opaque_stops_and_connection_lost_answers_the_caller_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_begin(S, [4]),
    Why = {unexpected_response, add_stream, 77},
    ?assertEqual({stop, Why}, dcp_nif:setup_add_stream_response(S, 77, 0)),
    ?assertEqual({stop, {unexpected_response, {close_stream, producer}, 4}},
                 dcp_nif:setup_close_stream_response(S, producer, 4, 0)),
    ?assertEqual({reply, {errors, [{{connection_lost, Why}, {vbucket, 4}}]}},
                 dcp_nif:setup_connection_lost(S, Why)),
    ?assertEqual({error, shut}, dcp_nif:setup_begin(S, [4])).

deadline_fails_pending_vbuckets_with_setup_timeout_test() ->
    S = dcp_nif:setup_new(),
    ?assertEqual(noreply, dcp_nif:setup_deadline(S)),
    {send, _} = dcp_nif:setup_begin(S, [0, 1]),
    noreply = dcp_nif:setup_add_stream_response(S, 1, 0),
    ?assertEqual({reply, {errors, [{setup_timeout, {vbucket, 0}}]}}, dcp_nif:setup_deadline(S)),
    ?assertEqual(noreply, dcp_nif:setup_add_stream_response(S, 0, 0)).

%% ---- takeover, maybe-close, shut ----

takeover_completes_after_add_ack_and_switch_to_active_ack_test() ->
    S = dcp_nif:setup_new(),
    ?assertEqual({send, [{add_stream, 6, 1}]}, dcp_nif:setup_takeover_begin(S, 6)),
    ?assertEqual({error, busy}, dcp_nif:setup_begin(S, [1])),
    ?assertEqual(noreply, dcp_nif:setup_stream_req(S, 6, 16#5000)),
    ?assertEqual(noreply, dcp_nif:setup_set_vbucket_state(S, 16#5000, pending)),
    ?assertEqual(noreply, dcp_nif:setup_set_vbucket_state_response(S, 16#5000, 0)),
    ?assertEqual(noreply, dcp_nif:setup_add_stream_response(S, 6, 0)),
    ?assertEqual(noreply, dcp_nif:setup_set_vbucket_state(S, 16#5000, active)),
    ?assertMatch(#{state := takeover,
                   takeover := #{vbucket := 6, stage := opaque_known, opaque := 16#5000,
                                 requested_state := active, add_acked := true}},
                 dcp_nif:setup_info(S)),
    ?assertEqual({reply, ok}, dcp_nif:setup_set_vbucket_state_response(S, 16#5000, 0)),
    ?assertEqual([6], dcp_nif:setup_partitions(S)),
    ?assertEqual({error, already_active}, dcp_nif:setup_takeover_begin(S, 6)).

maybe_close_stream_closes_an_active_stream_on_both_sides_test() ->
    S = with_active([5]),
    ?assertEqual({reply, ok}, dcp_nif:setup_maybe_close_stream(S, 6)),
    ?assertEqual({send, [{close_stream, consumer, 5}, {close_stream, producer, 5}]},
                 dcp_nif:setup_maybe_close_stream(S, 5)),
    ?assertEqual(noreply, dcp_nif:setup_close_stream_response(S, consumer, 5, 0)),
    ?assertEqual({reply, ok}, dcp_nif:setup_close_stream_response(S, producer, 5, 1)),
    ?assertEqual([], dcp_nif:setup_partitions(S)).

shut_from_a_stuck_setup_answers_the_setup_caller_then_is_shut_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_begin(S, [0, 1]),
    ?assertEqual({send, [{close_stream, consumer, 0}, {close_stream, consumer, 1}]},
                 dcp_nif:setup_shut(S)),
    ?assertMatch(#{state := setting_up, next_state := shut}, dcp_nif:setup_info(S)),
    %% both adds settle before their closes are answered: the closes' answers then complete the setup
    noreply = dcp_nif:setup_stream_end(S, 0, 0, state_changed),
    noreply = dcp_nif:setup_add_stream_response(S, 1, 4),
    noreply = dcp_nif:setup_close_stream_response(S, consumer, 0, 0),
    ?assertEqual({reply, {errors, [{{stream_end, state_changed}, {vbucket, 0}},
                                   {{mcbp_status, 4}, {vbucket, 1}}]}},
                 dcp_nif:setup_close_stream_response(S, consumer, 1, 1)),
    ?assertMatch(#{state := shut}, dcp_nif:setup_info(S)),
    ?assertEqual({reply, ok}, dcp_nif:setup_shut(S)).

%% The consumer answers the shut's CLOSE_STREAM but never the ADD_STREAM: the close settles the add.
shut_closes_a_stuck_add_and_answers_its_caller_at_once_test() ->
    S = dcp_nif:setup_new(),
    ?assertEqual({send, [{add_stream, 3, 0}]}, dcp_nif:setup_begin(S, [3])),
    ?assertEqual({send, [{close_stream, consumer, 3}]}, dcp_nif:setup_shut(S)),
    ?assertEqual({reply, {errors, [{{stream_end, closed}, {vbucket, 3}}]}},
                 dcp_nif:setup_close_stream_response(S, consumer, 3, 0)),
    ?assertMatch(#{state := shut, pending_adds := []}, dcp_nif:setup_info(S)),
    ?assertEqual(noreply, dcp_nif:setup_add_stream_response(S, 3, 0)),
    ?assertEqual([], dcp_nif:setup_partitions(S)).

shut_close_failure_settles_a_stuck_add_with_its_status_and_owes_the_add_answer_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_begin(S, [2, 5]),
    {send, _} = dcp_nif:setup_shut(S),
    ?assertEqual(noreply, dcp_nif:setup_close_stream_response(S, consumer, 2, 7)),
    ?assertMatch(#{pending_adds := [5], absorbed := 0}, dcp_nif:setup_info(S)),
    %% the settled add's late answer is absorbed, not a protocol violation
    ?assertEqual(noreply, dcp_nif:setup_add_stream_response(S, 2, 0)),
    ?assertMatch(#{pending_adds := [5], absorbed := 1}, dcp_nif:setup_info(S)),
    ?assertEqual({reply, {errors, [{{mcbp_status, 7}, {vbucket, 2}},
                                   {{stream_end, closed}, {vbucket, 5}}]}},
                 dcp_nif:setup_close_stream_response(S, consumer, 5, 1)).

shut_from_idle_without_streams_is_immediate_test() ->
    S = dcp_nif:setup_new(),
    ?assertEqual({reply, ok}, dcp_nif:setup_shut(S)),
    ?assertEqual({error, shut}, dcp_nif:setup_takeover_begin(S, 1)).

%% ---- bad arguments: {error, ...} for caller-named vbuckets, badarg otherwise ----

bad_vbuckets_are_refused_with_the_term_given_test() ->
    S = dcp_nif:setup_new(),
    ?assertEqual({error, {bad_vbucket, 1024}}, dcp_nif:setup_begin(S, [1, 1024])),
    ?assertEqual({error, {bad_vbucket, -1}}, dcp_nif:setup_begin(S, [-1])),
    ?assertEqual({error, {bad_vbucket, foo}}, dcp_nif:setup_begin(S, [foo])),
    ?assertEqual({error, {bad_vbucket, 1 bsl 70}}, dcp_nif:setup_takeover_begin(S, 1 bsl 70)),
    ?assertEqual({error, {bad_vbucket, <<"1">>}}, dcp_nif:setup_maybe_close_stream(S, <<"1">>)),
    ?assertMatch(#{state := idle, pending_adds := []}, dcp_nif:setup_info(S)).

bad_terms_raise_badarg_and_leave_the_machine_unchanged_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_begin(S, [0]),
    Before = dcp_nif:setup_info(S),
    Calls = [fun() -> dcp_nif:setup_begin(S, not_a_list) end,
             fun() -> dcp_nif:setup_begin(S, [1 | 2]) end,
             fun() -> dcp_nif:setup_stream_end(S, 0, 0, nonsense) end,
             fun() -> dcp_nif:setup_stream_end(S, 0, 0, {unknown, 3}) end,
             fun() -> dcp_nif:setup_stream_end(S, 0, 0, {unknown, -1}) end,
             fun() -> dcp_nif:setup_stream_end(S, 70000, 0, closed) end,
             fun() -> dcp_nif:setup_stream_end(S, 0, -1, closed) end,
             fun() -> dcp_nif:setup_add_stream_response(S, 0, 70000) end,
             fun() -> dcp_nif:setup_add_stream_response(S, 1 bsl 32, 0) end,
             fun() -> dcp_nif:setup_close_stream_response(S, sideways, 0, 0) end,
             fun() -> dcp_nif:setup_set_vbucket_state(S, 0, sideways) end,
             fun() -> dcp_nif:setup_set_vbucket_state(S, 0, 256) end,
             fun() -> dcp_nif:setup_add_stream_response(make_ref(), 0, 0) end,
             fun() -> dcp_nif:setup_info(<<"not a setup">>) end],
    [?assertError(badarg, Call()) || Call <- Calls],
    ?assertEqual(Before, dcp_nif:setup_info(S)).

%% ---- any term in, a well-formed answer or badarg out ----

junk() ->
    oneof([integer(), integer(-5, 1100), range(0, 7), atom(), binary(), list(integer(0, 8)),
           {unknown, integer()}, ok, closed, state_changed, consumer, producer, active, pending,
           improper_list(), any()]).

improper_list() ->
    ?LET({H, T}, {integer(0, 3), integer(0, 3)}, [H | T]).

call() ->
    oneof([{setup_begin, [junk()]},
           {setup_add_stream_response, [junk(), junk()]},
           {setup_close_stream_response, [junk(), junk(), junk()]},
           {setup_stream_end, [junk(), junk(), junk()]},
           {setup_takeover_begin, [junk()]},
           {setup_stream_req, [junk(), junk()]},
           {setup_set_vbucket_state, [junk(), junk()]},
           {setup_set_vbucket_state_response, [junk(), junk()]},
           {setup_maybe_close_stream, [junk()]},
           {setup_shut, []},
           {setup_deadline, []},
           {setup_connection_lost, [junk()]}]).

well_formed(noreply) -> true;
well_formed({reply, ok}) -> true;
well_formed({reply, {errors, L}}) when is_list(L) -> true;
well_formed({send, L}) when is_list(L) -> true;
well_formed({stop, {unexpected_response, _, Opaque}}) when is_integer(Opaque) -> true;
well_formed({error, _}) -> true;
well_formed(_) -> false.

prop_any_call_gives_a_well_formed_answer_or_badarg() ->
    ?FORALL(Calls, list(call()),
            begin
                S = dcp_nif:setup_new(),
                lists:all(
                  fun({F, Args}) ->
                          try apply(dcp_nif, F, [S | Args]) of
                              Result -> well_formed(Result)
                          catch
                              error:badarg -> true
                          end
                  end, Calls)
                    andalso is_map(dcp_nif:setup_info(S))
            end).

any_call_gives_a_well_formed_answer_or_badarg_test() ->
    ?assert(proper:quickcheck(prop_any_call_gives_a_well_formed_answer_or_badarg(),
                              [{numtests, 1000}, {to_file, user}])).
