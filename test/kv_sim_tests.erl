%% Tests for kv_sim on its own: a plain gen_tcp (or ssl) client speaking to it through dcp_commands and
%% mcbp, as memcached's peers do. Receive timeouts are backstops only: every check waits for a frame.
-module(kv_sim_tests).

-include_lib("dcp_proxy/include/mcbp.hrl").

-include_lib("eunit/include/eunit.hrl").

-define(RECV_TIMEOUT, 5000).

%% ---- helpers ----

sim(Role) ->
    sim(Role, #{}).

sim(Role, Extra) ->
    {ok, Node} = kv_sim:start_link(maps:merge(#{role => Role, vbuckets => 8, docs_per_vbucket => 20,
                                                value_size => 64, user => "admin",
                                                password => "pw", bucket => "default"},
                                              Extra)),
    Node.

connect(Node) ->
    {ok, Sock} = gen_tcp:connect({127, 0, 0, 1}, kv_sim:port(Node),
                                 [binary, {active, false}, {packet, raw}, {nodelay, true}]),
    {gen_tcp, Sock}.

send({Mod, Sock}, IoData) ->
    ok = Mod:send(Sock, IoData).

%% One frame: the header, then exactly what the codec says is missing, so nothing is over-read.
recv({Mod, Sock} = Conn) ->
    {ok, Header} = Mod:recv(Sock, 24, ?RECV_TIMEOUT),
    case mcbp:decode(Header) of
        {ok, Frame, <<>>} ->
            Frame;
        {more, N} ->
            {ok, Body} = Mod:recv(Sock, N, ?RECV_TIMEOUT),
            recv_rest(Conn, <<Header/binary, Body/binary>>)
    end.

recv_rest({Mod, Sock} = Conn, Bin) ->
    case mcbp:decode(Bin) of
        {ok, Frame, <<>>} ->
            Frame;
        {more, N} ->
            {ok, More} = Mod:recv(Sock, N, ?RECV_TIMEOUT),
            recv_rest(Conn, <<Bin/binary, More/binary>>)
    end.

call(Conn, IoData) ->
    send(Conn, IoData),
    recv(Conn).

status(Frame) ->
    maps:get(status, Frame).

handshake(Conn, Type) ->
    ?assertEqual(0, status(call(Conn, dcp_commands:sasl_auth_plain("admin", "pw", 1)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:select_bucket("default", 2)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:hello("test", [xattr, json], 3)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:dcp_open("replication:test", Type, [xattr], 4)))),
    Conn.

open(Node, Type) ->
    handshake(connect(Node), Type).

%% A memcached NOOP is answered in order, so its answer arriving next proves nothing else was sent
%% before it.
assert_nothing_sent_before_noop(Conn) ->
    send(Conn, dcp_commands:request(16#0a, #{opaque => 16#abcd})),
    ?assertMatch(#{magic := res, opcode_name := noop, opaque := 16#abcd}, recv(Conn)).

%% Frames until (and including) the first that `Stop' accepts.
recv_until(Conn, Stop) ->
    recv_until(Conn, Stop, []).

recv_until(Conn, Stop, Acc) ->
    Frame = recv(Conn),
    case Stop(Frame) of
        true -> lists:reverse([Frame | Acc]);
        false -> recv_until(Conn, Stop, [Frame | Acc])
    end.

is_stream_end(#{opcode_name := dcp_stream_end}) -> true;
is_stream_end(_) -> false.

mutations(Frames) ->
    [F || #{opcode_name := dcp_mutation} = F <- Frames].

%% The digest kv_sim computes, over frames a client received.
digest_of_mutations(Frames) ->
    Docs = [{K, maps:get(by_seqno, mcbp:dcp_fields(F)), V}
            || #{key := K, value := V} = F <- mutations(Frames)],
    Ctx = lists:foldl(fun({K, S, V}, Acc) ->
                              crypto:hash_update(Acc, [<<(byte_size(K)):32>>, K, <<S:64>>,
                                                       <<(byte_size(V)):32>>, V])
                      end, crypto:hash_init(sha256), lists:keysort(1, Docs)),
    {length(Docs), crypto:hash_final(Ctx)}.

%% ---- handshake ----

sasl_plain_with_the_right_password_is_accepted_test() ->
    Node = sim(producer),
    Conn = connect(Node),
    ?assertMatch(#{opcode_name := sasl_auth, status := 0, opaque := 1},
                 call(Conn, dcp_commands:sasl_auth_plain("admin", "pw", 1))),
    kv_sim:stop(Node).

sasl_plain_with_a_wrong_password_is_auth_error_and_nothing_else_is_allowed_test() ->
    Node = sim(producer),
    Conn = connect(Node),
    ?assertEqual(16#20, status(call(Conn, dcp_commands:sasl_auth_plain("admin", "nope", 1)))),
    ?assertEqual(16#24, status(call(Conn, dcp_commands:select_bucket("default", 2)))),
    kv_sim:stop(Node).

select_of_another_bucket_is_refused_and_open_needs_a_bucket_test() ->
    Node = sim(producer),
    Conn = connect(Node),
    ?assertEqual(0, status(call(Conn, dcp_commands:sasl_auth_plain("admin", "pw", 1)))),
    ?assertEqual(16#01, status(call(Conn, dcp_commands:select_bucket("other", 2)))),
    ?assertEqual(16#08, status(call(Conn, dcp_commands:dcp_open("replication:x", producer, [], 3)))),
    kv_sim:stop(Node).

hello_grants_only_the_features_the_node_supports_test() ->
    Node = sim(producer, #{hello_features => [xattr, json]}),
    Conn = connect(Node),
    Answer = call(Conn, dcp_commands:hello("test", [xattr, snappy, json], 1)),
    ?assertEqual([xattr, json], dcp_commands:hello_features(maps:get(value, Answer))),
    kv_sim:stop(Node).

dcp_open_of_the_other_kind_is_not_supported_test() ->
    Node = sim(producer),
    Conn = connect(Node),
    ?assertEqual(0, status(call(Conn, dcp_commands:sasl_auth_plain("admin", "pw", 1)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:select_bucket("default", 2)))),
    ?assertEqual(16#83, status(call(Conn, dcp_commands:dcp_open("replication:x", consumer, [], 3)))),
    kv_sim:stop(Node).

dcp_noop_is_answered_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    ?assertMatch(#{magic := res, opcode_name := dcp_noop, opaque := 77, status := 0},
                 call(Conn, dcp_commands:noop_request(77))),
    kv_sim:stop(Node).

%% ---- producer node ----

producer_streams_marker_mutations_and_stream_end_ok_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    Answer = call(Conn, dcp_commands:stream_req(3, #{end_seqno => 20}, 1003)),
    ?assertMatch(#{opcode_name := dcp_stream_req, status := 0, opaque := 1003}, Answer),
    ?assertMatch([{_, 0}], dcp_commands:failover_log(maps:get(value, Answer))),
    Frames = recv_until(Conn, fun is_stream_end/1),
    [Marker | _] = Frames,
    ?assertMatch(#{opcode_name := dcp_snapshot_marker, vbucket := 3, opaque := 1003}, Marker),
    ?assertMatch(#{start_seqno := 0, end_seqno := 20}, mcbp:dcp_fields(Marker)),
    Seqnos = [maps:get(by_seqno, mcbp:dcp_fields(F)) || F <- mutations(Frames)],
    ?assertEqual(lists:seq(1, 20), Seqnos),
    ?assertEqual(#{reason => ok}, mcbp:dcp_fields(lists:last(Frames))),
    ?assertEqual(kv_sim:digest(Node, 3), digest_of_mutations(Frames)),
    kv_sim:stop(Node).

producer_stream_from_a_seqno_sends_only_what_follows_test() ->
    Node = sim(producer),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(2, #{start_seqno => 15,
                                                                   end_seqno => 20}, 9)))),
    Frames = recv_until(Conn, fun is_stream_end/1),
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

%% ---- consumer node ----

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
    Frames = recv_until(P, fun is_stream_end/1),
    send(C, [mcbp:encode(F) || F <- [Answer | Frames]]),
    ?assertMatch(#{opcode_name := dcp_add_stream, status := 0, opaque := VB}, recv(C)),
    %% Everything relayed was applied once the consumer answered a later noop.
    assert_nothing_sent_before_noop(C).

consumer_deletion_and_expiration_remove_documents_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    Conn = open(Node, consumer),
    #{opaque := SO} = call(Conn, dcp_commands:add_stream(1, 0, 1)),
    send(Conn, dcp_commands:stream_req_response(SO, 0, [{1, 0}])),
    ?assertEqual(0, status(recv(Conn))),
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
    #{opaque := SO} = call(Conn, dcp_commands:add_stream(1, 0, 1)),
    send(Conn, dcp_commands:stream_req_response(SO, 0, [{1, 0}])),
    ?assertEqual(0, status(recv(Conn))),
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
    #{opaque := SO} = call(Conn, dcp_commands:add_stream(3, 1, 3)),
    send(Conn, dcp_commands:stream_req_response(SO, 0, [{1, 0}])),
    ?assertEqual(0, status(recv(Conn))),
    ?assertMatch(#{opcode_name := dcp_set_vbucket_state, status := 0, opaque := SO},
                 call(Conn, dcp_commands:set_vbucket_state(3, SO, active))),
    ?assertEqual(active, kv_sim:vbucket_state(Node, 3)),
    kv_sim:stop(Node).

consumer_close_stream_is_success_then_key_enoent_and_stream_end_forgets_the_stream_test() ->
    Node = sim(consumer, #{consumer_buffer_size => 0}),
    Conn = open(Node, consumer),
    #{opaque := SO} = call(Conn, dcp_commands:add_stream(4, 0, 4)),
    send(Conn, dcp_commands:stream_req_response(SO, 0, [{1, 0}])),
    ?assertEqual(0, status(recv(Conn))),
    ?assertEqual(16#02, status(call(Conn, dcp_commands:add_stream(4, 0, 4)))),
    ?assertEqual(0, status(call(Conn, dcp_commands:close_stream(4, 4)))),
    ?assertEqual(16#01, status(call(Conn, dcp_commands:close_stream(4, 4)))),
    #{opaque := SO2} = call(Conn, dcp_commands:add_stream(4, 0, 4)),
    ?assertNotEqual(SO, SO2),
    send(Conn, dcp_commands:stream_req_response(SO2, 0, [{1, 0}])),
    ?assertEqual(0, status(recv(Conn))),
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

%% ---- faults ----

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
    ?assertEqual(20, length(mutations(recv_until(Conn, fun is_stream_end/1)))),
    kv_sim:stop(Node).

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

fault_stream_req_status_answers_with_that_status_test() ->
    Node = sim(producer),
    ok = kv_sim:set_fault(Node, all, {stream_req_status, 16#23}),
    Conn = open(Node, producer),
    ?assertEqual(16#23, status(call(Conn, dcp_commands:stream_req(1, #{}, 1)))),
    kv_sim:stop(Node).

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
    ?assertEqual({error, closed}, gen_tcp:recv(Sock, 0, ?RECV_TIMEOUT)),
    kv_sim:stop(Node).

fault_close_socket_after_mutations_closes_mid_stream_test() ->
    Node = sim(producer),
    ok = kv_sim:set_fault(Node, 1, {close_socket_after_mutations, 5}),
    {gen_tcp, Sock} = Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(1, #{}, 1)))),
    Frames = recv_until(Conn, fun(F) -> maps:get(by_seqno, mcbp:dcp_fields(F), 0) =:= 5 end),
    ?assertEqual(5, length(mutations(Frames))),
    ?assertEqual({error, closed}, gen_tcp:recv(Sock, 0, ?RECV_TIMEOUT)),
    kv_sim:stop(Node).

fault_chunked_writes_still_deliver_every_frame_test() ->
    Node = sim(producer),
    ok = kv_sim:set_fault(Node, 0, {chunked_writes, 7}),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(5, #{end_seqno => 20}, 5)))),
    Frames = recv_until(Conn, fun is_stream_end/1),
    ?assertEqual(kv_sim:digest(Node, 5), digest_of_mutations(Frames)),
    kv_sim:stop(Node).

fault_flexible_framing_and_unknown_opcodes_change_the_frames_not_the_data_test() ->
    Node = sim(producer),
    ok = kv_sim:set_fault(Node, 2, flexible_framing),
    ok = kv_sim:set_fault(Node, 2, {unknown_opcodes, 16#ee}),
    Conn = open(Node, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(2, #{end_seqno => 20}, 2)))),
    Frames = recv_until(Conn, fun is_stream_end/1),
    ?assert(lists:all(fun(#{magic := M}) -> M =:= alt_req end, mutations(Frames))),
    ?assertMatch([_ | _], [F || #{opcode := 16#ee} = F <- Frames]),
    ?assertEqual(kv_sim:digest(Node, 2), digest_of_mutations(Frames)),
    kv_sim:stop(Node).

set_fault_refuses_unknown_faults_and_opcode_names_test() ->
    Node = sim(producer),
    ?assertMatch({error, {unknown_opcode_name, nonsense}},
                 kv_sim:set_fault(Node, 1, {drop_answer, nonsense})),
    ?assertEqual({error, {unknown_fault, flexible_frames}},
                 kv_sim:set_fault(Node, 1, flexible_frames)),
    ?assertMatch({error, {unknown_status_name, nope}},
                 kv_sim:set_fault(Node, 1, {add_stream_status, nope})),
    kv_sim:stop(Node).

%% ---- determinism and TLS ----

producer_data_is_determined_by_the_seed_test() ->
    A = sim(producer, #{seed => 7}),
    B = sim(producer, #{seed => 7}),
    C = sim(producer, #{seed => 8}),
    ?assertEqual(kv_sim:digest(A, 3), kv_sim:digest(B, 3)),
    ?assertNotEqual(kv_sim:digest(A, 3), kv_sim:digest(C, 3)),
    ?assertMatch({20, _}, kv_sim:digest(A, 3)),
    [kv_sim:stop(N) || N <- [A, B, C]].

tls_with_peer_verification_serves_the_handshake_test() ->
    Key = [{key, {namedCurve, secp256r1}}],
    Chain = #{root => Key, intermediates => [Key], peer => Key},
    #{server_config := ServerOpts, client_config := ClientOpts} =
        public_key:pkix_test_data(#{server_chain => Chain, client_chain => Chain}),
    Node = sim(producer, #{ssl => [{verify, verify_peer}, {fail_if_no_peer_cert, true}
                                    | ServerOpts]}),
    {ok, Sock} = ssl:connect({127, 0, 0, 1}, kv_sim:port(Node),
                             [binary, {active, false}, {packet, raw}, {verify, verify_peer},
                              {server_name_indication, disable} | ClientOpts], ?RECV_TIMEOUT),
    Conn = handshake({ssl, Sock}, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(1, #{end_seqno => 20}, 1)))),
    ?assertEqual(20, length(mutations(recv_until(Conn, fun is_stream_end/1)))),
    ok = ssl:close(Sock),
    kv_sim:stop(Node).
