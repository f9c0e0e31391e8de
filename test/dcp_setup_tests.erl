%% @doc The stream-setup machine through dcp_nif: what Rust cannot test, the terms. Each event
%% tuple, action, reply and info shape, the reason and state names both ways, and bad terms (never
%% a crash of the VM, never a changed machine). The rules themselves are pinned in
%% native/dcp_setup/tests/*.rs.
-module(dcp_setup_tests).

-include_lib("proper/include/proper.hrl").
-include_lib("eunit/include/eunit.hrl").

ev(S, Side, Event) -> dcp_nif:setup_event(S, {Side, Event}).
add_answer(S, Opaque, Status) -> ev(S, consumer, {add_stream_response, Opaque, Status, undefined}).
close_answer(S, Side, Opaque, Status) -> ev(S, Side, {close_stream_response, Opaque, Status}).
stream_end(S, VB, Opaque, Reason) -> ev(S, producer, {stream_end, VB, Opaque, Reason}).

%% Sends a request; its actions, with the opaques by {add | consumer | producer, VB}.
send(S, Request) ->
    {send, Actions} = dcp_nif:setup_request(S, Request),
    {Actions, maps:from_list([{key(A), op(A)} || A <- Actions])}.

key({add_stream, VB, _Opaque, _Flags}) -> {add, VB};
key({close_stream, Side, VB, _Opaque}) -> {Side, VB}.

op(A) -> opaque(A).

%% The opaque names the request: its vbucket in the low 10 bits, a generation above them.
opaque_names_its_vbucket(Actions) ->
    [?assertEqual(vb(A), opaque(A) band 16#3ff) || A <- Actions],
    [?assert(opaque(A) > 16#3ff) || A <- Actions],
    ?assertEqual(length(Actions), length(lists:usort([opaque(A) || A <- Actions]))).

vb(A) -> element(case element(1, A) of add_stream -> 2; close_stream -> 3 end, A).
opaque(A) -> element(case element(1, A) of add_stream -> 3; close_stream -> 4 end, A).

%% A machine with VBs active (set up and answered).
with_active(VBs) ->
    S = dcp_nif:setup_new(),
    {_, Op} = send(S, {setup_streams, VBs}),
    [noreply = add_answer(S, maps:get({add, VB}, Op), 0) || VB <- lists:droplast(VBs)],
    {reply, ok} = add_answer(S, maps:get({add, lists:last(VBs)}, Op), 0),
    S.

%% ---- actions carry their opaque and flags ----

actions_carry_the_machines_opaque_and_flags_test() ->
    S = with_active([0]),
    {Actions, Op} = send(S, {setup_streams, [1, 2]}),
    ?assertMatch([{add_stream, 1, _, 0}, {add_stream, 2, _, 0},
                  {close_stream, consumer, 0, _}, {close_stream, producer, 0, _}], Actions),
    opaque_names_its_vbucket(Actions),
    ?assertEqual(noreply, close_answer(S, consumer, maps:get({consumer, 0}, Op), 1)),
    ?assertEqual(noreply, close_answer(S, producer, maps:get({producer, 0}, Op), 0)),
    %% an answer with the vbucket as its opaque answers no request (and changes nothing)
    ?assertEqual({stop, {unexpected_response, add_stream, 2}}, add_answer(S, 2, 0)),
    ?assertEqual(noreply, ev(S, consumer, {add_stream_response, maps:get({add, 2}, Op), 16#07,
                                           undefined})),
    ?assertEqual({reply, {errors, [{{mcbp_status, 16#07}, {vbucket, 2}}]}},
                 ev(S, consumer, {add_stream_response, maps:get({add, 1}, Op), 0, 16#10001})),
    ?assertEqual([1], dcp_nif:setup_partitions(S)),
    {Closes, Op2} = send(S, {maybe_close_stream, 1}),
    ?assertMatch([{close_stream, consumer, 1, _}, {close_stream, producer, 1, _}], Closes),
    opaque_names_its_vbucket(Closes),
    ?assertEqual(noreply, close_answer(S, consumer, maps:get({consumer, 1}, Op2), 0)),
    ?assertEqual({reply, ok}, close_answer(S, producer, maps:get({producer, 1}, Op2), 0)),
    ?assertEqual({reply, ok}, dcp_nif:setup_request(S, {maybe_close_stream, 1})).

%% ---- reply terms ----

every_failing_reason_comes_back_as_the_term_given_test_() ->
    Reasons = [closed, state_changed, disconnected, too_slow, backfill_fail, rollback,
               filter_empty, lost_privileges, {unknown, 9}, {unknown, 4294967295}],
    [{lists:flatten(io_lib:format("~p", [R])),
      fun() ->
              S = dcp_nif:setup_new(),
              {send, _} = dcp_nif:setup_request(S, {setup_streams, [1]}),
              ?assertEqual({reply, {errors, [{{stream_end, R}, {vbucket, 1}}]}},
                           stream_end(S, 1, 0, R))
      end} || R <- Reasons].

%% The splitter's own event terms go in as they come out.
splitter_events_go_in_as_the_splitter_reports_them_test() ->
    Bin = iolist_to_binary(dcp_commands:stream_end(5, 16#10001, state_changed)),
    {ok, _, [Event]} = mcbp:feed(mcbp:splitter_new(#{side => producer}), Bin),
    ?assertEqual({stream_end, 5, 16#10001, state_changed}, Event),
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_request(S, {setup_streams, [5]}),
    ?assertEqual({reply, {errors, [{{stream_end, state_changed}, {vbucket, 5}}]}},
                 ev(S, producer, Event)).

unknown_opaque_stops_and_connection_lost_answers_with_its_reason_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_request(S, {setup_streams, [4]}),
    Why = {unexpected_response, add_stream, 77},
    ?assertEqual({stop, Why}, add_answer(S, 77, 0)),
    ?assertEqual({stop, {unexpected_response, {close_stream, producer}, 4}},
                 close_answer(S, producer, 4, 0)),
    ?assertEqual({reply, {errors, [{{connection_lost, Why}, {vbucket, 4}}]}},
                 dcp_nif:setup_event(S, {connection_lost, Why})),
    ?assertEqual({error, shut}, dcp_nif:setup_request(S, {setup_streams, [4]})).

deadline_gives_setup_timeout_and_info_counts_absorbed_answers_test() ->
    S = dcp_nif:setup_new(),
    ?assertEqual(noreply, dcp_nif:setup_event(S, deadline)),
    {_, Op} = send(S, {setup_streams, [0, 1]}),
    noreply = add_answer(S, maps:get({add, 1}, Op), 0),
    ?assertEqual({reply, {errors, [{setup_timeout, {vbucket, 0}}]}},
                 dcp_nif:setup_event(S, deadline)),
    ?assertMatch(#{owed := 1}, dcp_nif:setup_info(S)),
    %% the late success is applied: the consumer holds the stream, so it is active
    ?assertEqual({noreply, absorbed}, add_answer(S, maps:get({add, 0}, Op), 0)),
    ?assertMatch(#{state := idle, active := [0, 1], absorbed := 1, errors := [], owed := 0,
                   next_state := undefined, takeover := undefined}, dcp_nif:setup_info(S)),
    ?assertEqual({reply, ok}, dcp_nif:setup_request(S, {setup_streams, [0, 1]})).

%% ---- takeover and shut: the event and info terms ----

takeover_terms_test() ->
    S = dcp_nif:setup_new(),
    {[{add_stream, 6, Add, 1}] = Actions, _} = send(S, {takeover, 6}),
    opaque_names_its_vbucket(Actions),
    ?assertEqual({error, busy}, dcp_nif:setup_request(S, {setup_streams, [1]})),
    ?assertEqual(noreply, ev(S, consumer, {stream_req, 6, 16#5000})),
    ?assertEqual(noreply, ev(S, producer, {set_vbucket_state, 6, 16#5000, pending})),
    ?assertEqual(noreply, ev(S, consumer, {set_vbucket_state_response, 16#5000, 0})),
    ?assertEqual(noreply, add_answer(S, Add, 0)),
    ?assertEqual(noreply, ev(S, producer, {set_vbucket_state, 6, 16#5000, active})),
    ?assertMatch(#{state := takeover,
                   takeover := #{vbucket := 6, stage := opaque_known, opaque := 16#5000,
                                 requested_state := active, add_acked := true}},
                 dcp_nif:setup_info(S)),
    ?assertEqual({reply, ok}, ev(S, consumer, {set_vbucket_state_response, 16#5000, 0})),
    %% the consumer owns the vbucket now: no replica stream on this connection
    ?assertEqual([], dcp_nif:setup_partitions(S)).

takeover_stream_end_before_the_switch_answers_at_once_test() ->
    S = dcp_nif:setup_new(),
    {_, _} = send(S, {takeover, 3}),
    noreply = ev(S, consumer, {stream_req, 3, 16#77}),
    ?assertEqual({reply, {errors, [{{stream_end, ok}, {vbucket, 3}}]}},
                 stream_end(S, 3, 16#77, ok)),
    ?assertMatch(#{state := idle, owed := 1}, dcp_nif:setup_info(S)).

takeover_of_an_active_vbucket_closes_it_in_the_same_step_test() ->
    S = with_active([4]),
    {Actions, _} = send(S, {takeover, 4}),
    ?assertMatch([{close_stream, consumer, 4, _}, {close_stream, producer, 4, _},
                  {add_stream, 4, _, 1}], Actions),
    opaque_names_its_vbucket(Actions).

shut_ends_a_takeover_and_answers_its_caller_test() ->
    S = dcp_nif:setup_new(),
    {_, _} = send(S, {takeover, 2}),
    {[{close_stream, consumer, 2, Close}], _} = send(S, shut_connection),
    ?assertEqual({reply, {errors, [{{stream_end, closed}, {vbucket, 2}}]}},
                 close_answer(S, consumer, Close, 1)),
    ?assertMatch(#{state := shut}, dcp_nif:setup_info(S)).

unknown_vbucket_state_term_round_trips_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_request(S, {takeover, 2}),
    noreply = ev(S, consumer, {stream_req, 2, 9}),
    ?assertEqual(noreply, ev(S, producer, {set_vbucket_state, 2, 9, {unknown, 7}})),
    ?assertMatch(#{takeover := #{requested_state := {unknown, 7}}}, dcp_nif:setup_info(S)).

shut_terms_test() ->
    S = dcp_nif:setup_new(),
    {_, Op} = send(S, {setup_streams, [0, 1]}),
    {Closes, Cl} = send(S, shut_connection),
    ?assertMatch([{close_stream, consumer, 0, _}, {close_stream, consumer, 1, _}], Closes),
    ?assertMatch(#{state := setting_up, next_state := shut, pending_closes_producer := [],
                   pending_adds := [0, 1], pending_closes_consumer := [0, 1]},
                 dcp_nif:setup_info(S)),
    noreply = stream_end(S, 0, 0, state_changed),
    noreply = add_answer(S, maps:get({add, 1}, Op), 4),
    noreply = close_answer(S, consumer, maps:get({consumer, 0}, Cl), 0),
    ?assertEqual({reply, {errors, [{{stream_end, state_changed}, {vbucket, 0}},
                                   {{mcbp_status, 4}, {vbucket, 1}}]}},
                 close_answer(S, consumer, maps:get({consumer, 1}, Cl), 1)),
    ?assertMatch(#{state := shut}, dcp_nif:setup_info(S)),
    ?assertEqual({reply, ok}, dcp_nif:setup_request(S, shut_connection)),
    ?assertEqual({error, shut}, dcp_nif:setup_request(S, {takeover, 1})).

%% ---- bad arguments: {error, ...} for caller-named vbuckets, badarg otherwise ----

bad_vbuckets_are_refused_with_the_term_given_test() ->
    S = dcp_nif:setup_new(),
    ?assertEqual({error, {bad_vbucket, 1024}}, dcp_nif:setup_request(S, {setup_streams, [1, 1024]})),
    ?assertEqual({error, {bad_vbucket, -1}}, dcp_nif:setup_request(S, {setup_streams, [-1]})),
    ?assertEqual({error, {bad_vbucket, foo}}, dcp_nif:setup_request(S, {setup_streams, [foo]})),
    ?assertEqual({error, {bad_vbucket, 1 bsl 70}}, dcp_nif:setup_request(S, {takeover, 1 bsl 70})),
    ?assertEqual({error, {bad_vbucket, <<"1">>}},
                 dcp_nif:setup_request(S, {maybe_close_stream, <<"1">>})),
    ?assertMatch(#{state := idle, pending_adds := []}, dcp_nif:setup_info(S)).

%% The NIF checks a vbucket list itself (dcp_replicator's check is not relied on): a huge list is
%% refused after reading a few thousand cells, within the ~1 ms a NIF call may take.
vbucket_lists_too_long_duplicated_or_improper_are_named_errors_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_request(S, {setup_streams, [0]}),
    Before = dcp_nif:setup_info(S),
    TooMany = {error, {too_many_vbuckets, 1024}},
    Million = lists:seq(1, 1000000),
    T0 = erlang:monotonic_time(microsecond),
    ?assertEqual(TooMany, dcp_nif:setup_request(S, {setup_streams, Million})),
    Took = erlang:monotonic_time(microsecond) - T0,
    %% a generous bound: the read stops after mcbp::term::MAX_ITEMS cells (~0.2 ms here)
    ?assert(Took < 20000),
    ?assertEqual(TooMany, dcp_nif:setup_request(S, {setup_streams, lists:seq(0, 1024)})),
    ?assertEqual(TooMany, dcp_nif:setup_request(S, {setup_streams, Million ++ improper})),
    ?assertEqual({error, {duplicate_vbucket, 3}},
                 dcp_nif:setup_request(S, {setup_streams, [3, 4, 3]})),
    ?assertEqual({error, {bad_vbucket, [1, 2 | 3]}},
                 dcp_nif:setup_request(S, {setup_streams, [1, 2 | 3]})),
    ?assertEqual({error, {bad_vbucket, not_a_list}},
                 dcp_nif:setup_request(S, {setup_streams, not_a_list})),
    ?assertEqual({error, {bad_vbucket, [1, 2]}},
                 dcp_nif:setup_request(S, {setup_streams, [[1, 2]]})),
    %% none of them changed the machine (which is busy with the setup of [0])
    ?assertEqual(Before, dcp_nif:setup_info(S)),
    %% all 1024 are one list the machine takes
    {send, Actions} = dcp_nif:setup_request(dcp_nif:setup_new(),
                                            {setup_streams, lists:seq(0, 1023)}),
    ?assertEqual(1024, length(Actions)).

%% A vbucket from a frame header is any u16: one the machine does not track changes nothing.
wire_vbuckets_outside_the_machine_are_ignored_test() ->
    S = with_active([1, 2]),
    ?assertEqual(noreply, stream_end(S, 1, 0, ok)),
    ?assertEqual(noreply, stream_end(S, 60000, 0, closed)),
    ?assertEqual([2], dcp_nif:setup_partitions(S)).

bad_terms_raise_badarg_and_leave_the_machine_unchanged_test() ->
    S = dcp_nif:setup_new(),
    {send, _} = dcp_nif:setup_request(S, {setup_streams, [0]}),
    Before = dcp_nif:setup_info(S),
    Calls = [fun() -> dcp_nif:setup_request(S, {sideways, 1}) end,
             fun() -> dcp_nif:setup_request(S, shut) end,
             fun() -> stream_end(S, 0, 0, nonsense) end,
             fun() -> stream_end(S, 0, 0, {unknown, 3}) end,
             fun() -> stream_end(S, 0, 0, {unknown, -1}) end,
             fun() -> stream_end(S, 70000, 0, closed) end,
             fun() -> stream_end(S, 0, -1, closed) end,
             fun() -> add_answer(S, 0, 70000) end,
             fun() -> add_answer(S, 1 bsl 32, 0) end,
             fun() -> ev(S, consumer, {add_stream_response, 0, 0, nope}) end,
             fun() -> ev(S, consumer, {add_stream_response, 0, 0}) end,
             fun() -> close_answer(S, sideways, 0, 0) end,
             fun() -> ev(S, producer, {set_vbucket_state, 0, 0, sideways}) end,
             fun() -> ev(S, producer, {set_vbucket_state, 0, 0, 256}) end,
             fun() -> ev(S, producer, {set_vbucket_state, 0, 0, {unknown, 1}}) end,
             fun() -> ev(S, producer, {set_vbucket_state, 0, 0, {unknown, 256}}) end,
             fun() -> ev(S, producer, #{opcode_name => dcp_stream_end}) end,
             fun() -> dcp_nif:setup_event(S, {deadline}) end,
             fun() -> dcp_nif:setup_event(S, shut) end,
             fun() -> add_answer(make_ref(), 0, 0) end,
             fun() -> dcp_nif:setup_info(<<"not a setup">>) end],
    [?assertError(badarg, Call()) || Call <- Calls],
    ?assertEqual(Before, dcp_nif:setup_info(S)).

%% ---- any term in, a well-formed answer or badarg out ----

junk() ->
    oneof([integer(), integer(-5, 1100), range(0, 7), atom(), binary(), list(integer(0, 8)),
           {unknown, integer()}, ok, closed, state_changed, consumer, producer, active, pending,
           undefined, improper_list(), any()]).

improper_list() ->
    ?LET({H, T}, {integer(0, 3), integer(0, 3)}, [H | T]).

side() -> oneof([consumer, producer, junk()]).

event() ->
    oneof([{stream_end, junk(), junk(), junk()},
           {add_stream_response, junk(), junk(), junk()},
           {close_stream_response, junk(), junk()},
           {stream_req, junk(), junk()},
           {set_vbucket_state, junk(), junk(), junk()},
           {set_vbucket_state_response, junk(), junk()},
           junk()]).

call() ->
    oneof([{setup_request, [{setup_streams, junk()}]},
           {setup_request, [{takeover, junk()}]},
           {setup_request, [{maybe_close_stream, junk()}]},
           {setup_request, [shut_connection]},
           {setup_request, [junk()]},
           {setup_event, [{side(), event()}]},
           {setup_event, [deadline]},
           {setup_event, [{connection_lost, junk()}]},
           {setup_event, [junk()]}]).

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
