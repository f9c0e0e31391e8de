%% A consumer node: its own STREAM_REQ for an ADD_STREAM, applying the stream, flow-control acks.
-module(kv_sim_03_consumer_tests).

-include_lib("eunit/include/eunit.hrl").

-import(kv_sim_test_client, [sim/1, sim/2, send/2, recv/1, call/2, status/1, open/2,
                             assert_nothing_sent_before_noop/1, recv_until_stream_end/1]).

consumer_add_stream_sends_its_own_stream_req_with_an_opaque_not_the_vbucket_test() ->
    Node = sim(consumer),
    Conn = open(Node, consumer),
    send(Conn, dcp_commands:add_stream(5, 0, 5)),
    Control = recv(Conn),
    ?assertMatch(#{opcode_name := dcp_control, key := <<"connection_buffer_size">>}, Control),
    Req = recv(Conn),
    ?assertMatch(#{magic := req, opcode_name := dcp_stream_req, vbucket := 5}, Req),
    StreamOpaque = maps:get(opaque, Req),
    ?assert(StreamOpaque > 1023),
    ?assertMatch(#{start_seqno := 0, flags := 0}, mcbp:dcp_fields(Req)),
    %% The ADD_STREAM is answered only once the stream request is.
    assert_nothing_sent_before_noop(Conn),
    send(Conn, dcp_commands:stream_req_response(StreamOpaque, 0, [{1, 0}])),
    Answer = recv(Conn),
    ?assertMatch(#{opcode_name := dcp_add_stream, status := 0, opaque := 5}, Answer),
    ?assertEqual(<<StreamOpaque:32>>, maps:get(extras, Answer)),
    kv_sim:stop(Node).

consumer_add_stream_answers_the_stream_req_failure_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    Conn = open(Node, consumer),
    Req = call(Conn, dcp_commands:add_stream(2, 0, 2)),
    ?assertMatch(#{opcode_name := dcp_stream_req}, Req),
    send(Conn, dcp_commands:stream_req_response(maps:get(opaque, Req), 16#07, <<>>)),
    ?assertMatch(#{opcode_name := dcp_add_stream, status := 16#07, opaque := 2}, recv(Conn)),
    %% The stream is gone: a close finds nothing.
    ?assertEqual(16#01, status(call(Conn, dcp_commands:close_stream(2, 2)))),
    kv_sim:stop(Node).

consumer_applies_the_stream_and_its_digest_matches_the_producer_test() ->
    Producer = sim(producer),
    Consumer = sim(consumer),
    P = open(Producer, producer),
    C = open(Consumer, consumer),
    [begin
         send(C, dcp_commands:add_stream(VB, 0, VB)),
         _Control = case VB of 0 -> recv(C); _ -> skip end,
         Req = recv(C),
         relay_stream(P, C, Req),
         ?assertEqual(kv_sim:digest(Producer, VB), kv_sim:digest(Consumer, VB))
     end || VB <- [0, 1, 7]],
    ?assertEqual({0, crypto:hash(sha256, <<>>)}, kv_sim:digest(Consumer, 2)),
    kv_sim:stop(Producer),
    kv_sim:stop(Consumer).

%% What a proxy does for one stream: the consumer's STREAM_REQ (given a finite end) to the producer,
%% then every frame back until the stream end; the consumer answers the ADD_STREAM on the way.
relay_stream(P, C, #{vbucket := VB, opaque := Opaque}) ->
    Answer = call(P, dcp_commands:stream_req(VB, #{end_seqno => 20}, Opaque)),
    Frames = recv_until_stream_end(P),
    send(C, [mcbp:encode(F) || F <- [Answer | Frames]]),
    ?assertMatch(#{opcode_name := dcp_add_stream, status := 0, opaque := VB}, recv(C)),
    %% Everything relayed was applied once the consumer answered a later noop.
    assert_nothing_sent_before_noop(C).

consumer_deletion_and_expiration_remove_documents_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    Conn = open(Node, consumer),
    SO = accepted_stream(Conn, 1, 0),
    Doc = fun(K, S) -> #{key => K, value => <<"v">>, by_seqno => S} end,
    send(Conn, [dcp_commands:snapshot_marker(1, SO, 0, 5, 1),
                dcp_commands:mutation(1, SO, Doc(<<"a">>, 1)),
                dcp_commands:mutation(1, SO, Doc(<<"b">>, 2)),
                dcp_commands:mutation(1, SO, Doc(<<"c">>, 3)),
                dcp_commands:deletion(1, SO, #{key => <<"a">>, by_seqno => 4}),
                dcp_commands:expiration(1, SO, #{key => <<"b">>, by_seqno => 5})]),
    assert_nothing_sent_before_noop(Conn),
    ?assertMatch({1, _}, kv_sim:digest(Node, 1)),
    kv_sim:stop(Node).

consumer_stream_restarts_from_its_high_seqno_on_a_new_connection_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    Conn = open(Node, consumer),
    SO = accepted_stream(Conn, 1, 0),
    send(Conn, [dcp_commands:mutation(1, SO, #{key => <<"a">>, by_seqno => 4}),
                dcp_commands:mutation(1, SO, #{key => <<"b">>, by_seqno => 9})]),
    assert_nothing_sent_before_noop(Conn),
    Conn2 = open(Node, consumer),
    Req = call(Conn2, dcp_commands:add_stream(1, 0, 1)),
    ?assertMatch(#{start_seqno := 9}, mcbp:dcp_fields(Req)),
    kv_sim:stop(Node).

consumer_answers_set_vbucket_state_and_records_it_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    Conn = open(Node, consumer),
    ?assertEqual(replica, kv_sim:vbucket_state(Node, 3)),
    SO = accepted_stream(Conn, 3, 1),
    ?assertMatch(#{opcode_name := dcp_set_vbucket_state, status := 0, opaque := SO},
                 call(Conn, dcp_commands:set_vbucket_state(3, SO, active))),
    ?assertEqual(active, kv_sim:vbucket_state(Node, 3)),
    kv_sim:stop(Node).

consumer_close_stream_is_success_then_key_enoent_and_stream_end_forgets_the_stream_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    Conn = open(Node, consumer),
    SO = accepted_stream(Conn, 4, 0),
    ?assertEqual(16#02, status(call(Conn, dcp_commands:add_stream(4, 0, 4)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:close_stream(4, 4)))),
    ?assertEqual(16#01, status(call(Conn, dcp_commands:close_stream(4, 4)))),
    SO2 = accepted_stream(Conn, 4, 0),
    ?assertNotEqual(SO, SO2),
    send(Conn, dcp_commands:stream_end(4, SO2, ok)),
    ?assertEqual(16#01, status(call(Conn, dcp_commands:close_stream(4, 4)))),
    kv_sim:stop(Node).

consumer_acknowledges_received_bytes_when_flow_control_is_on_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 1000}),
    Conn = open(Node, consumer),
    send(Conn, dcp_commands:add_stream(1, 0, 1)),
    ?assertMatch(#{key := <<"connection_buffer_size">>, value := <<"1000">>}, recv(Conn)),
    #{opaque := SO} = recv(Conn),
    send(Conn, dcp_commands:stream_req_response(SO, 0, [{1, 0}])),
    ?assertEqual(0, status(recv(Conn))),
    Mutations = [dcp_commands:mutation(1, SO, #{key => integer_to_binary(S), by_seqno => S,
                                                value => binary:copy(<<"v">>, 100)})
                 || S <- lists:seq(1, 3)],
    send(Conn, Mutations),
    ?assertEqual(iolist_size(Mutations), recv_acks(Conn, iolist_size(Mutations), 0)),
    kv_sim:stop(Node).

%% Sums the acknowledgements until they cover `Bytes' (a chunk boundary may split them).
recv_acks(_Conn, Bytes, Acked) when Acked >= Bytes ->
    Acked;
recv_acks(Conn, Bytes, Acked) ->
    Ack = recv(Conn),
    ?assertMatch(#{opcode_name := dcp_buffer_acknowledgement}, Ack),
    #{bytes := N} = mcbp:dcp_fields(Ack),
    recv_acks(Conn, Bytes, Acked + N).

%% An ADD_STREAM (with the vbucket as its opaque) whose STREAM_REQ the producer accepted, answered with
%% success; the consumer's stream opaque.
accepted_stream(Conn, VB, Flags) ->
    #{opaque := StreamOpaque} = call(Conn, dcp_commands:add_stream(VB, Flags, VB)),
    send(Conn, dcp_commands:stream_req_response(StreamOpaque, 0, [{1, 0}])),
    ?assertEqual(0, status(recv(Conn))),
    StreamOpaque.
