%% A producer node: streams, rollback, close, flow control, takeover and noops.
-module(kv_sim_02_producer_tests).

-include_lib("eunit/include/eunit.hrl").

-import(kv_sim_test_client, [sim/1, sim/2, send/2, recv/1, call/2, status/1, open/2,
                             assert_nothing_sent_before_noop/1, recv_until/2, is_stream_end/1,
                             mutations/1, digest_of_mutations/1, recv_until_stream_end/1]).

producer_streams_marker_mutations_and_stream_end_ok_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    Answer = call(Conn, dcp_commands:stream_req(3, #{end_seqno => 20}, 1003)),
    ?assertMatch(#{opcode_name := dcp_stream_req, status := 0, opaque := 1003}, Answer),
    ?assertMatch([{_, 0}], dcp_commands:failover_log(maps:get(value, Answer))),
    Frames = recv_until_stream_end(Conn),
    [Marker | _] = Frames,
    ?assertMatch(#{opcode_name := dcp_snapshot_marker, vbucket := 3, opaque := 1003}, Marker),
    ?assertMatch(#{start_seqno := 0, end_seqno := 20}, mcbp:dcp_fields(Marker)),
    Seqnos = [maps:get(by_seqno, mcbp:dcp_fields(F)) || F <- mutations(Frames)],
    ?assertEqual(lists:seq(1, 20), Seqnos),
    ?assertEqual(#{reason => ok}, mcbp:dcp_fields(lists:last(Frames))),
    ?assertEqual(kv_sim:digest(Node, 3), digest_of_mutations(Frames)),
    kv_sim:stop(Node).

producer_answers_get_failover_log_with_the_log_its_streams_start_with_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    Answer = call(Conn, dcp_commands:request(16#54, #{vbucket => 3, opaque => 8})),
    ?assertMatch(#{opcode_name := dcp_get_failover_log, status := 0, opaque := 8}, Answer),
    Log = dcp_commands:failover_log(maps:get(value, Answer)),
    ?assertMatch([{_, 0}], Log),
    StreamAnswer = call(Conn, dcp_commands:stream_req(3, #{end_seqno => 20}, 9)),
    ?assertEqual(Log, dcp_commands:failover_log(maps:get(value, StreamAnswer))),
    kv_sim:stop(Node).

producer_stream_from_a_seqno_sends_only_what_follows_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(2, #{start_seqno => 15,
                                                                   end_seqno => 20}, 9)))),
    Frames = recv_until_stream_end(Conn),
    ?assertEqual(lists:seq(16, 20),
                 [maps:get(by_seqno, mcbp:dcp_fields(F)) || F <- mutations(Frames)]),
    kv_sim:stop(Node).

producer_refuses_unknown_vbucket_existing_stream_and_a_start_past_its_data_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    ?assertEqual(16#07, status(call(Conn, dcp_commands:stream_req(100, #{}, 1)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(1, #{}, 2)))),
    %% The open-ended stream sends its 20 mutations and stays open.
    _ = recv_until(Conn, fun(F) -> maps:get(by_seqno, mcbp:dcp_fields(F), 0) =:= 20 end),
    ?assertEqual(16#02, status(call(Conn, dcp_commands:stream_req(1, #{}, 3)))),
    Rollback = call(Conn, dcp_commands:stream_req(4, #{start_seqno => 50}, 4)),
    ?assertMatch(#{status := 16#23, value := <<20:64>>}, Rollback),
    kv_sim:stop(Node).

producer_close_stream_stops_it_and_a_second_close_is_key_enoent_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(1, #{}, 2)))),
    _ = recv_until(Conn, fun(F) -> maps:get(by_seqno, mcbp:dcp_fields(F), 0) =:= 20 end),
    ?assertMatch(#{opcode_name := dcp_close_stream, status := 0},
                 call(Conn, dcp_commands:close_stream(1, 1))),
    ?assertMatch(#{opcode_name := dcp_close_stream, status := 16#01},
                 call(Conn, dcp_commands:close_stream(1, 1))),
    kv_sim:stop(Node).

producer_sends_stream_end_closed_on_close_when_asked_to_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:control("send_stream_end_on_client_close_stream",
                                                           "true", 5)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(1, #{}, 2)))),
    _ = recv_until(Conn, fun(F) -> maps:get(by_seqno, mcbp:dcp_fields(F), 0) =:= 20 end),
    ?assertEqual(0, status(call(Conn, dcp_commands:close_stream(1, 1)))),
    End = recv(Conn),
    ?assertMatch(#{opcode_name := dcp_stream_end, vbucket := 1, opaque := 2}, End),
    ?assertEqual(#{reason => closed}, mcbp:dcp_fields(End)),
    kv_sim:stop(Node).

producer_stops_at_the_flow_control_window_until_acknowledged_test() ->
    Node = sim(producer, #{docs_per_vbucket => 200, value_size => 100}),
    Conn = open(Node, producer),
    Window = 2000,
    ?assertEqual(0, status(call(Conn, dcp_commands:control("connection_buffer_size",
                                                           integer_to_list(Window), 5)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(0, #{end_seqno => 200}, 7)))),
    {Sent, Frames} = recv_window(Conn, Window, 0, []),
    %% The window is full: the producer sends nothing more until it is acknowledged.
    assert_nothing_sent_before_noop(Conn),
    send(Conn, dcp_commands:buffer_ack(Sent, 8)),
    Rest = recv_acking(Conn, []),
    ?assertEqual(200, length(mutations(Frames ++ Rest))),
    kv_sim:stop(Node).

%% Frames until their sizes fill the window (the producer stops at the first frame that fills it).
recv_window(_Conn, Window, Bytes, Acc) when Bytes >= Window ->
    {Bytes, lists:reverse(Acc)};
recv_window(Conn, Window, Bytes, Acc) ->
    Frame = recv(Conn),
    Size = iolist_size(mcbp:encode(Frame)),
    recv_window(Conn, Window, Bytes + Size, [Frame | Acc]).

%% Acknowledges every frame as it arrives, until the stream end.
recv_acking(Conn, Acc) ->
    Frame = recv(Conn),
    send(Conn, dcp_commands:buffer_ack(iolist_size(mcbp:encode(Frame)), 9)),
    case is_stream_end(Frame) of
        true -> lists:reverse([Frame | Acc]);
        false -> recv_acking(Conn, [Frame | Acc])
    end.

producer_takeover_sends_pending_then_active_then_stream_end_ok_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(6, #{flags => 1}, 60)))),
    Frames = recv_until(Conn, fun(F) -> maps:get(opcode_name, F) =:= dcp_set_vbucket_state end),
    ?assertEqual(20, length(mutations(Frames))),
    Pending = lists:last(Frames),
    ?assertMatch(#{vbucket := 6, opaque := 60}, Pending),
    ?assertEqual(#{state => pending}, mcbp:dcp_fields(Pending)),
    ?assertEqual(active, kv_sim:vbucket_state(Node, 6)),
    Active = call(Conn, dcp_commands:response(16#5b, 0, 60)),
    ?assertEqual(#{state => active}, mcbp:dcp_fields(Active)),
    ?assertEqual(dead, kv_sim:vbucket_state(Node, 6)),
    End = call(Conn, dcp_commands:response(16#5b, 0, 60)),
    ?assertMatch(#{opcode_name := dcp_stream_end, vbucket := 6, opaque := 60}, End),
    ?assertEqual(#{reason => ok}, mcbp:dcp_fields(End)),
    %% A dead vbucket is no longer this node's.
    ?assertEqual(16#07, status(call(Conn, dcp_commands:stream_req(6, #{}, 61)))),
    kv_sim:stop(Node).

producer_sends_noops_once_enabled_and_accepts_their_answers_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:control("enable_noop", "true", 1)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:control("set_noop_interval", "1", 2)))),
    Noop = recv(Conn),
    ?assertMatch(#{magic := req, opcode_name := dcp_noop}, Noop),
    send(Conn, [dcp_commands:noop_response(maps:get(opaque, Noop)),
                dcp_commands:request(16#0a, #{opaque => 16#abcd})]),
    %% Still serving (a further DCP noop may come first).
    ?assertMatch(#{opcode_name := noop, opaque := 16#abcd},
                 lists:last(recv_until(Conn, fun(F) -> maps:get(opcode_name, F) =:= noop end))),
    kv_sim:stop(Node).
