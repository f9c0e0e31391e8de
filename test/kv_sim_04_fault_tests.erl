%% The faults a test sets on a node at run time, each as it shows on the wire.
-module(kv_sim_04_fault_tests).

-include_lib("eunit/include/eunit.hrl").

-import(kv_sim_test_client, [sim/1, sim/2, send/2, recv/1, call/2, status/1, open/2,
                             assert_nothing_sent_before_noop/1, recv_until/2, mutations/1,
                             digest_of_mutations/1, recv_timeout/0, recv_until_stream_end/1]).

%% ---- faults of the connection: answers, socket, writes ----

fault_drop_answer_never_answers_and_delay_answer_answers_later_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    ok = kv_sim:set_fault(Node, 1, {drop_answer, dcp_close_stream}),
    ok = kv_sim:set_fault(Node, 2, {delay_answer, dcp_close_stream, 50}),
    Conn = open(Node, consumer),
    send(Conn, dcp_commands:close_stream(1, 1)),
    assert_nothing_sent_before_noop(Conn),
    %% Sent in one write and read in one turn: the noop's answer goes out with the turn, the delayed
    %% one only later.
    send(Conn, [dcp_commands:close_stream(2, 2), dcp_commands:request(16#0a, #{opaque => 16#abcd})]),
    ?assertMatch(#{opcode_name := noop, opaque := 16#abcd}, recv(Conn)),
    ?assertMatch(#{opcode_name := dcp_close_stream, opaque := 2, status := 16#01}, recv(Conn)),
    kv_sim:stop(Node).

fault_close_socket_on_closes_when_the_request_arrives_test() ->
    Node = sim(consumer),
    ok = kv_sim:set_fault(Node, 3, {close_socket_on, dcp_add_stream}),
    {gen_tcp, Sock} = Conn = open(Node, consumer),
    send(Conn, dcp_commands:add_stream(3, 0, 3)),
    ?assertEqual({error, closed}, gen_tcp:recv(Sock, 0, recv_timeout())),
    kv_sim:stop(Node).

fault_chunked_writes_still_deliver_every_frame_test() ->
    Node = sim(producer),
    ok = kv_sim:set_fault(Node, 0, {chunked_writes, 7}),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(5, #{end_seqno => 20}, 5)))),
    Frames = recv_until_stream_end(Conn),
    ?assertEqual(kv_sim:digest(Node, 5), digest_of_mutations(Frames)),
    kv_sim:stop(Node).

%% ---- consumer faults ----

fault_no_add_stream_answer_after_stream_end_leaves_the_add_unanswered_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    ok = kv_sim:set_fault(Node, 2, no_add_stream_answer_after_stream_end),
    Conn = open(Node, consumer),
    #{opaque := SO} = call(Conn, dcp_commands:add_stream(2, 0, 2)),
    send(Conn, [dcp_commands:stream_req_response(SO, 0, [{1, 0}]),
                dcp_commands:stream_end(2, SO, state_changed)]),
    assert_nothing_sent_before_noop(Conn),
    kv_sim:stop(Node).

without_the_fault_a_stream_ended_during_setup_is_still_answered_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    Conn = open(Node, consumer),
    #{opaque := SO} = call(Conn, dcp_commands:add_stream(2, 0, 2)),
    send(Conn, [dcp_commands:stream_req_response(SO, 0, [{1, 0}]),
                dcp_commands:stream_end(2, SO, state_changed)]),
    ?assertMatch(#{opcode_name := dcp_add_stream, status := 0, opaque := 2}, recv(Conn)),
    kv_sim:stop(Node).

fault_add_stream_status_answers_with_that_status_test() ->
    Node = sim(consumer),
    ok = kv_sim:set_fault(Node, 6, {add_stream_status, etmpfail}),
    Conn = open(Node, consumer),
    ?assertMatch(#{opcode_name := dcp_add_stream, status := 16#86, opaque := 6},
                 call(Conn, dcp_commands:add_stream(6, 0, 6))),
    ok = kv_sim:clear_faults(Node),
    ?assertMatch(#{opcode_name := dcp_control}, call(Conn, dcp_commands:add_stream(6, 0, 6))),
    kv_sim:stop(Node).

%% ---- producer faults ----

fault_stream_end_on_accept_ends_the_stream_right_after_its_answer_test() ->
    Node = sim(producer),
    ok = kv_sim:set_fault(Node, 3, {stream_end_on_accept, state_changed}),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(3, #{}, 30)))),
    End = recv(Conn),
    ?assertMatch(#{opcode_name := dcp_stream_end, vbucket := 3, opaque := 30}, End),
    ?assertEqual(#{reason => state_changed}, mcbp:dcp_fields(End)),
    %% Other vbuckets stream as usual.
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(4, #{end_seqno => 20}, 40)))),
    ?assertEqual(20, length(mutations(recv_until_stream_end(Conn)))),
    kv_sim:stop(Node).

fault_stream_req_status_answers_with_that_status_test() ->
    Node = sim(producer),
    ok = kv_sim:set_fault(Node, all, {stream_req_status, 16#23}),
    Conn = open(Node, producer),
    ?assertEqual(16#23, status(call(Conn, dcp_commands:stream_req(1, #{}, 1)))),
    kv_sim:stop(Node).

fault_close_socket_after_mutations_closes_mid_stream_test() ->
    Node = sim(producer),
    ok = kv_sim:set_fault(Node, 1, {close_socket_after_mutations, 5}),
    {gen_tcp, Sock} = Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(1, #{}, 1)))),
    Frames = recv_until(Conn, fun(F) -> maps:get(by_seqno, mcbp:dcp_fields(F), 0) =:= 5 end),
    ?assertEqual(5, length(mutations(Frames))),
    ?assertEqual({error, closed}, gen_tcp:recv(Sock, 0, recv_timeout())),
    kv_sim:stop(Node).

fault_flexible_framing_and_unknown_opcodes_change_the_frames_not_the_data_test() ->
    Node = sim(producer),
    ok = kv_sim:set_fault(Node, 2, flexible_framing),
    ok = kv_sim:set_fault(Node, 2, {unknown_opcodes, 16#ee}),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(2, #{end_seqno => 20}, 2)))),
    Frames = recv_until_stream_end(Conn),
    ?assert(lists:all(fun(#{magic := M}) -> M =:= alt_req end, mutations(Frames))),
    ?assert(lists:all(fun(#{framing_extras := Infos}) -> Infos =:= [{2, <<1:16>>}] end,
                      mutations(Frames))),
    ?assertMatch([_ | _], [F || #{opcode := 16#ee} = F <- Frames]),
    ?assertEqual(kv_sim:digest(Node, 2), digest_of_mutations(Frames)),
    kv_sim:stop(Node).

%% ---- setting faults ----

set_fault_refuses_unknown_faults_and_opcode_names_test() ->
    Node = sim(producer),
    ?assertMatch({error, {unknown_opcode_name, nonsense}},
                 kv_sim:set_fault(Node, 1, {drop_answer, nonsense})),
    ?assertEqual({error, {unknown_fault, flexible_frames}},
                 kv_sim:set_fault(Node, 1, flexible_frames)),
    ?assertMatch({error, {unknown_status_name, nope}},
                 kv_sim:set_fault(Node, 1, {add_stream_status, nope})),
    kv_sim:stop(Node).
