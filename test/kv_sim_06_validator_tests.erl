%% kv_sim checks what it receives as memcached does (kv_sim_validate): the frames the proxy and
%% kv_sim build pass, each violation gives its named reason, and over a socket a bad frame closes
%% the connection with the reason kv_sim:closes/1 records.
-module(kv_sim_06_validator_tests).

-include_lib("eunit/include/eunit.hrl").

-import(kv_sim_test_client, [sim/1, connect/1, send/2, call/2, status/1, open/2,
                             recv_until_stream_end/1, mutations/1]).

%% ---- helpers ----

frame(IoData) ->
    {ok, Frame, <<>>} = mcbp:decode(iolist_to_binary(IoData)),
    Frame.

%% A connection in the handshake (authenticated, nothing opened), with `Features' granted.
handshake(Features) ->
    #{authenticated => true, features => Features, dcp => none, open_flags => 0}.

consumer(Features) ->
    (handshake(Features))#{dcp := consumer}.

producer(Features) ->
    (handshake(Features))#{dcp := producer}.

ok(IoData, Context) ->
    ?assertEqual(ok, kv_sim_validate:check(frame(IoData), Context)).

%% The reason's `Why' for a request (`invalid_frame') of opcode `Name'.
why(Name, IoData, Context) ->
    case kv_sim_validate:check(frame(IoData), Context) of
        {error, {invalid_frame, Name, Why}} -> Why;
        Other -> {unexpected, Other}
    end.

response_why(Name, IoData, Context) ->
    case kv_sim_validate:check(frame(IoData), Context) of
        {error, {invalid_response, Name, Why}} -> Why;
        Other -> {unexpected, Other}
    end.

req(Opcode, Fields) ->
    dcp_commands:request(Opcode, Fields).

mutation_extras(Seqno) ->
    <<Seqno:64, 1:64, 0:32, 0:32, 0:32, 0:16, 0:8>>.

doc(Key) ->
    #{key => Key, by_seqno => 7, value => <<"v">>, cas => 7}.

%% ---- the frames the proxy sends pass ----

proxy_handshake_frames_pass_test() ->
    All = [xattr, snappy, json, duplex, collections, del_times, del_user_xattr, set_consumer_name],
    Name = <<"replication:n_0@127.0.0.1->n_1@127.0.0.1:default">>,
    lists:foreach(
      fun({Side, Features}) ->
              {ok, #{hello := Hello} = Plan} = dcp_features:plan(Side, Name, #{features => Features}),
              Granted = [F || F <- Hello, F =/= duplex],
              [{hello, HelloFrame} | _] = Frames = dcp_features:handshake_frames(Plan, 3),
              ok(HelloFrame, handshake([])),
              {dcp_open, Open} = lists:last(Frames),
              ok(Open, handshake(Granted))
      end, [{consumer, All}, {producer, All}, {consumer, [json, set_consumer_name]},
            {consumer, [xattr]}]),
    ok(dcp_commands:sasl_auth_plain("admin", "pw", 1), (handshake([]))#{authenticated := false}),
    ok(dcp_commands:select_bucket("default", 2), handshake([])),
    ok(dcp_commands:dcp_open(Name, consumer, [], 4), handshake([])),
    %% ns_server's HELLO key, cut at 250 bytes
    LongKey = dcp_features:hello_key(consumer, binary:copy(<<"x">>, 400)),
    ok(dcp_commands:hello(LongKey, [xattr, json], 3), handshake([])),
    %% STATS dcp-vbtakeover as dcp_ns sends it
    ok(req(16#10, #{key => <<"dcp-vbtakeover 3 replication:a->b:default">>, opaque => 3}),
       handshake([])),
    ok(req(16#10, #{key => <<"dcp">>}), handshake([])).

proxy_stream_setup_frames_pass_test() ->
    C = consumer([xattr, json, collections]),
    ok(dcp_commands:add_stream(5, 0, 5), C),
    ok(dcp_commands:add_stream(5, [takeover], 5), C),
    ok(dcp_commands:close_stream(5, 9), C),
    ok(dcp_commands:close_stream(5, 9), producer([])),
    %% the consumer's answers the proxy passes to the producer
    P = producer([xattr, json]),
    ok(dcp_commands:response(16#5b, 0, 77), P),
    ok(dcp_commands:noop_response(12), P),
    ok(dcp_commands:response(16#55, 16#01, 77), P).

%% ---- kv_sim's own stream passes ----

node_stream_frames_pass_test() ->
    C = consumer([xattr, json]),
    CC = consumer([xattr, json, collections]),
    ok(dcp_commands:snapshot_marker(3, 9, 0, 20, 1), C),
    ok(dcp_commands:snapshot_marker_v2(3, 9, #{start => 0, 'end' => 20, type => 6,
                                               max_visible_seqno => 19,
                                               high_completed_seqno => 17}), C),
    ok(dcp_commands:mutation(3, 9, doc(<<"doc-1">>)), C),
    ok(dcp_commands:mutation(3, 9, (doc(<<"doc-1">>))#{datatype => 1}), C),
    ok(dcp_commands:mutation(3, 9, doc(dcp_commands:collection_key(0, <<"doc-1">>))), CC),
    ok(dcp_commands:mutation(3, 9, doc(dcp_commands:collection_key(300, <<"doc-1">>))), CC),
    ok(dcp_commands:deletion(3, 9, doc(<<"doc-1">>)), C),
    ok(dcp_commands:deletion(3, 9, (doc(<<"doc-1">>))#{delete_time => 5}), C#{open_flags := 16#20}),
    ok(dcp_commands:deletion(3, 9, (doc(dcp_commands:collection_key(8, <<"d">>)))#{delete_time => 5}),
       CC),
    ok(dcp_commands:expiration(3, 9, doc(<<"doc-1">>)), C),
    ok(dcp_commands:stream_end(3, 9, closed), C),
    ok(dcp_commands:set_vbucket_state(3, 9, pending), C),
    ok(dcp_commands:noop_request(99), C),
    ok(dcp_commands:create_collection_event(3, 9, 1, 8, <<"c8">>), CC),
    ok(dcp_commands:prepare(3, 9, doc(<<"doc-1">>)), C),
    ok(dcp_commands:commit(3, 9, #{key => <<"doc-1">>, prepared_seqno => 7, commit_seqno => 8}), C),
    ok(dcp_commands:abort(3, 9, #{key => <<"doc-1">>, prepared_seqno => 7, abort_seqno => 8}), C),
    ok(dcp_commands:stream_req_response(16#10000, 0, [{5, 0}]), C),
    ok(dcp_commands:stream_req_rollback(16#10000, 3), C),
    ok(dcp_commands:response(16#5e, 0, 16#10001), C),
    %% what a consumer node sends its producer
    P = producer([xattr, json]),
    ok(dcp_commands:node_stream_req(3, 0, true, 16#10000), P),
    ok(dcp_commands:stream_req(3, #{end_seqno => 20}, 16#10000), P),
    ok(dcp_commands:control(<<"connection_buffer_size">>, <<"1048576">>, 1), P),
    ok(dcp_commands:buffer_ack(4096, 1), P),
    ok(dcp_commands:seqno_acknowledged(3, 1, 7), P),
    ok(req(16#54, #{vbucket => 3}), P),
    ok(req(16#54, #{vbucket => 3}), handshake([])),
    ok(dcp_commands:response(16#57, 0, 9), P),
    %% unknown opcodes are memcached's unknown_command, not a violation
    ok(req(16#ee, #{vbucket => 3, opaque => 9, extras => <<1, 2, 3>>}), C).

%% ---- each violation has its name ----

extras_key_value_cas_test() ->
    C = consumer([xattr, json]),
    ?assertEqual({extras_length, 10, expected, 31},
                 why(dcp_mutation, req(16#57, #{extras => <<7:80>>, key => <<"k">>}), C)),
    ?assertEqual({key_length, 0, expected, non_zero},
                 why(dcp_mutation, req(16#57, #{extras => mutation_extras(7)}), C)),
    ?assertEqual({key_length, 1, expected, zero},
                 why(dcp_stream_end, req(16#55, #{extras => <<0:32>>, key => <<"k">>}), C)),
    ?assertEqual({value_length, 1, expected, zero},
                 why(dcp_set_vbucket_state, req(16#5b, #{extras => <<1>>, value => <<"v">>}), C)),
    ?assertEqual({extras_length, 4, expected, 0},
                 why(dcp_control, req(16#5e, #{extras => <<0:32>>, key => <<"k">>, value => <<"v">>}),
                     C)),
    ?assertEqual({key_length, 0, expected, non_zero},
                 why(dcp_control, dcp_commands:control(<<>>, <<"true">>, 1), C)),
    ?assertEqual({value_length, 0, expected, non_zero},
                 why(dcp_control, dcp_commands:control(<<"enable_noop">>, <<>>, 1), C)),
    ?assertEqual({cas, 0, expected, non_zero},
                 why(dcp_prepare, dcp_commands:prepare(3, 9, (doc(<<"k">>))#{cas => 0}), C)),
    ?assertEqual({cas, 5, expected, zero},
                 why(dcp_commit, req(16#62, #{extras => <<1:64, 2:64>>, key => <<"k">>, cas => 5}), C)),
    ?assertEqual({cas, 5, expected, zero},
                 why(hello, req(16#1f, #{key => <<"a">>, cas => 5}), handshake([]))),
    ?assertEqual({value_length, 3, expected, even},
                 why(hello, req(16#1f, #{key => <<"a">>, value => <<0, 6, 0>>}), handshake([]))),
    ?assertEqual({key_length, 251, expected, {at_most, 250}},
                 why(dcp_mutation, dcp_commands:mutation(3, 9, doc(binary:copy(<<"k">>, 251))), C)),
    ?assertEqual({extras_length, 18, expected, 21},
                 why(dcp_deletion, dcp_commands:deletion(3, 9, doc(<<"k">>)), C#{open_flags := 16#20})),
    ?assertEqual({extras_length, 21, expected, 18},
                 why(dcp_deletion, dcp_commands:deletion(3, 9, (doc(<<"k">>))#{delete_time => 1}), C)),
    ?assertEqual({extras_length, 8, expected, [20, 1]},
                 why(dcp_snapshot_marker, req(16#56, #{extras => <<0:64>>}), C)),
    ?assertEqual({value_length, 0, expected, 36},
                 why(dcp_snapshot_marker, req(16#56, #{extras => <<0>>}), C)),
    ?assertEqual({snapshot_marker_version, 1},
                 why(dcp_snapshot_marker, req(16#56, #{extras => <<1>>, value => <<0:288>>}), C)),
    ok(req(16#56, #{extras => <<2>>, value => <<0:416>>}), C),
    ?assertEqual({value_length, 16, expected, zero},
                 why(dcp_stream_req, req(16#53, #{extras => <<0:384>>, value => <<0:128>>}),
                     producer([]))),
    %% with collections a stream request may carry a filter
    ok(req(16#53, #{extras => <<0:384>>, value => <<"{}">>}), producer([collections])).

opcode_rules_test() ->
    C = consumer([xattr, json]),
    ?assertEqual({by_seqno, 0},
                 why(dcp_mutation, dcp_commands:mutation(3, 9, (doc(<<"k">>))#{by_seqno => 0}), C)),
    ?assertEqual({nmeta, 2},
                 why(dcp_mutation, req(16#57, #{extras => <<7:64, 1:64, 0:96, 2:16, 0:8>>,
                                                key => <<"k">>}), C)),
    ?assertEqual({vbucket_state, 7},
                 why(dcp_set_vbucket_state, req(16#5b, #{extras => <<7>>}), C)),
    ?assertEqual({vbucket_state, 0},
                 why(dcp_set_vbucket_state, req(16#5b, #{extras => <<0>>}), C)),
    ?assertEqual({system_event_id, 2},
                 why(dcp_system_event, dcp_commands:system_event(3, 9, #{by_seqno => 1, event => 2,
                                                                         key => <<"c">>}), C)),
    ?assertEqual({system_event_version, 3},
                 why(dcp_system_event, dcp_commands:system_event(3, 9, #{by_seqno => 1, event => 0,
                                                                         version => 3,
                                                                         key => <<"c">>}), C)),
    ?assertEqual({durability_level, 0},
                 why(dcp_prepare, dcp_commands:prepare(3, 9, (doc(<<"k">>))#{durability_level => 0}),
                     C)),
    ?assertEqual({deletion_datatype, 1},
                 why(dcp_deletion, dcp_commands:deletion(3, 9, (doc(<<"k">>))#{datatype => 1}), C)),
    ?assertEqual({stream_flags, no_value_is_no_longer_used},
                 why(dcp_add_stream, dcp_commands:add_stream(3, 8, 3), C)),
    ?assertEqual({stream_flags, unknown, 16#1000},
                 why(dcp_stream_req, dcp_commands:stream_req(3, #{flags => 16#1001}, 3), producer([]))),
    ?assertEqual({stream_flags, cache_transfer_combined_with, 16#102},
                 why(dcp_stream_req, dcp_commands:stream_req(3, #{flags => 16#102}, 3), producer([]))),
    ?assertEqual({value_datatype, 0, expected, json},
                 why(stat, req(16#10, #{key => <<"x">>, value => <<"{}">>}), handshake([json]))),
    ?assertEqual(value_not_json,
                 why(stat, req(16#10, #{key => <<"x">>, value => <<"{">>, datatype => 1}),
                     handshake([json]))).

dcp_open_test() ->
    Open = fun(Flags, Value, Datatype) ->
                   req(16#50, #{extras => <<0:32, Flags:32>>, key => <<"n">>, value => Value,
                                datatype => Datatype})
           end,
    H = handshake([json, xattr]),
    ok(Open(0, dcp_features:consumer_name_value(<<"n_1@127.0.0.1">>), 1), H),
    ok(Open(0, <<" { \"consumer_name\" : \"a\\\"b\\u00e9\" } ">>, 1), H),
    ok(Open(0, <<"{}">>, 1), H),
    ?assertEqual({extras_length, 4, expected, 8},
                 why(dcp_open, req(16#50, #{extras => <<0:32>>, key => <<"n">>}), H)),
    ?assertEqual({key_length, 0, expected, non_zero},
                 why(dcp_open, req(16#50, #{extras => <<0:64>>}), H)),
    ?assertEqual({value_datatype, 0, expected, json}, why(dcp_open, Open(0, <<"{}">>, 0), H)),
    ?assertEqual({value_datatype, 1, expected, raw}, why(dcp_open, Open(0, <<>>, 1), H)),
    ?assertEqual(value_not_a_json_object, why(dcp_open, Open(0, <<"[1]">>, 1), H)),
    ?assertEqual(value_not_json, why(dcp_open, Open(0, <<"{\"consumer_name\":\"a\"">>, 1), H)),
    ?assertEqual(value_not_json, why(dcp_open, Open(0, <<"{\"a\":01}">>, 1), H)),
    ?assertEqual(consumer_name_not_a_string,
                 why(dcp_open, Open(0, <<"{\"consumer_name\":1}">>, 1), H)),
    ?assertEqual(consumer_name_on_a_producer,
                 why(dcp_open, Open(1, <<"{\"consumer_name\":\"a\"}">>, 1), H)),
    ?assertEqual({unsupported_json_property, <<"name">>},
                 why(dcp_open, Open(0, <<"{\"name\":\"a\"}">>, 1), H)),
    %% JSON must have been negotiated by HELLO
    ?assertEqual({datatype_not_negotiated, [json]},
                 why(dcp_open, Open(0, <<"{}">>, 1), handshake([xattr]))),
    ?assertEqual({datatype, 4, expected_within, 1}, why(dcp_open, Open(0, <<"{}">>, 4), H)),
    ?assertEqual({open_flags, unknown, 2}, why(dcp_open, Open(2, <<>>, 0), H)),
    ?assertEqual({open_flags, skip_deletes_in_initial_backfill_on_a_consumer},
                 why(dcp_open, Open(16#200, <<>>, 0), H)),
    ok(Open(16#201, <<>>, 0), H),
    ?assertEqual({open_flags, include_deleted_user_xattrs_without_include_xattrs},
                 why(dcp_open, Open(16#101, <<>>, 0), H)),
    ?assertEqual({open_flags, no_value_with_no_value_with_underlying_datatype},
                 why(dcp_open, Open(16#49, <<>>, 0), H)),
    ?assertEqual(already_a_dcp_connection, why(dcp_open, Open(0, <<>>, 0), consumer([]))).

datatype_test() ->
    Mutation = fun(Datatype) -> dcp_commands:mutation(3, 9, (doc(<<"k">>))#{datatype => Datatype}) end,
    ?assertEqual({invalid_datatype, 8}, why(dcp_mutation, Mutation(8), consumer([json]))),
    %% JSON comes with DCP_OPEN, snappy and xattr only with HELLO
    ok(Mutation(1), consumer([])),
    ?assertEqual({datatype_not_negotiated, [snappy]}, why(dcp_mutation, Mutation(3), consumer([xattr]))),
    ?assertEqual({datatype_not_negotiated, [snappy, xattr]},
                 why(dcp_mutation, Mutation(6), consumer([json]))),
    ok(Mutation(2), consumer([snappy])),
    ?assertEqual({datatype, 1, expected_within, 0},
                 why(dcp_stream_end, req(16#55, #{extras => <<0:32>>, datatype => 1}), consumer([json]))),
    %% an xattr blob: its length, then length-prefixed key NUL value NUL pairs
    Pair = <<"_sync", 0, "{\"a\":1}", 0>>,
    Blob = <<(byte_size(Pair) + 4):32, (byte_size(Pair)):32, Pair/binary>>,
    X = consumer([xattr]),
    XattrDoc = fun(Value) -> dcp_commands:mutation(3, 9, (doc(<<"k">>))#{datatype => 4,
                                                                         value => Value}) end,
    ok(XattrDoc(<<Blob/binary, "body">>), X),
    ?assertEqual({xattr_blob, bad_length}, why(dcp_mutation, XattrDoc(<<99:32, Pair/binary>>), X)),
    BadJson = <<"k", 0, "{", 0>>,
    ?assertEqual({xattr_blob, {value_not_json, <<"k">>}},
                 why(dcp_mutation, XattrDoc(<<(byte_size(BadJson) + 4):32, (byte_size(BadJson)):32,
                                              BadJson/binary>>), X)).

collection_key_test() ->
    CC = consumer([collections]),
    M = fun(Key) -> dcp_commands:mutation(3, 9, doc(Key)) end,
    ?assertEqual({collection_key, no_stop_byte}, why(dcp_mutation, M(<<16#80, 16#81>>), CC)),
    ?assertEqual({collection_key, no_stop_byte},
                 why(dcp_mutation, M(<<16#80, 16#80, 16#80, 16#80, 16#80, 0, "k">>), CC)),
    ?assertEqual({collection_key, non_canonical_leb128}, why(dcp_mutation, M(<<16#88, 0, "k">>), CC)),
    ?assertEqual({collection_key, too_short}, why(dcp_mutation, M(<<0>>), CC)),
    ?assertEqual({collection_key, no_logical_key}, why(dcp_mutation, M(<<16#88, 16#01>>), CC)),
    ?assertEqual({collection_key, {reserved_collection, 1}}, why(dcp_mutation, M(<<1, "k">>), CC)),
    ?assertEqual({collection_key, {logical_key_too_long, 247, 246}},
                 why(dcp_mutation, M(<<8, (binary:copy(<<"k">>, 247))/binary>>), CC)),
    %% the default collection keeps the 250 bytes of a legacy key: 251 in all
    ok(M(<<0, (binary:copy(<<"k">>, 250))/binary>>), CC),
    ?assertEqual({key_length, 252, expected, {at_most, 251}},
                 why(dcp_mutation, M(<<0, (binary:copy(<<"k">>, 251))/binary>>), CC)),
    %% without collections the key is not a collection key
    ok(M(<<1, "k">>), consumer([])),
    %% deletions and expirations too; commit and abort keys are not checked as document keys
    ?assertEqual({collection_key, {reserved_collection, 2}},
                 why(dcp_expiration, dcp_commands:expiration(3, 9, doc(<<2, "k">>)), CC)),
    ok(dcp_commands:commit(3, 9, #{key => <<2, "k">>, prepared_seqno => 7, commit_seqno => 8}), CC).

framing_and_connection_state_test() ->
    Alt = dcp_commands:mutation(3, 9, (doc(<<"k">>))#{framing_extras =>
                                                          dcp_commands:stream_id_framing(1)}),
    ?assertEqual(alt_request_not_negotiated, why(dcp_mutation, Alt, consumer([]))),
    ?assertEqual(stream_id_on_a_consumer, why(dcp_mutation, Alt, consumer([alt_request_support]))),
    ok(Alt, (consumer([]))#{accept_alt_requests => true}),
    ?assertEqual({frame_info, dcp_stream_id, {size, 1}},
                 why(dcp_mutation, dcp_commands:mutation(3, 9, (doc(<<"k">>))#{framing_extras =>
                                                                                   [{2, <<1>>}]}),
                     consumer([alt_request_support]))),
    ?assertEqual({frame_info, {unknown, 3}},
                 why(dcp_mutation, dcp_commands:mutation(3, 9, (doc(<<"k">>))#{framing_extras =>
                                                                                   [{3, <<>>}]}),
                     consumer([alt_request_support]))),
    ?assertEqual({frame_info, durability_requirement, not_supported},
                 why(dcp_mutation, dcp_commands:mutation(3, 9, (doc(<<"k">>))#{framing_extras =>
                                                                                   [{1, <<1>>}]}),
                     consumer([alt_request_support]))),
    %% DCP commands before DCP_OPEN
    ?assertEqual(not_a_dcp_connection,
                 why(dcp_control, dcp_commands:control(<<"enable_noop">>, <<"true">>, 1), handshake([]))),
    ?assertEqual(not_a_dcp_connection, why(dcp_add_stream, dcp_commands:add_stream(3, 0, 3),
                                           handshake([]))),
    %% before authentication only the handshake is checked (the rest is answered eaccess)
    Unauthenticated = (handshake([]))#{authenticated := false},
    ok(req(16#57, #{extras => <<1>>}), Unauthenticated),
    ?assertEqual({key_length, 0, expected, non_zero},
                 why(sasl_auth, req(16#21, #{value => <<0, "a", 0, "b">>}), Unauthenticated)).

responses_test() ->
    C = consumer([]),
    P = producer([]),
    ?assertEqual(not_authenticated,
                 response_why(dcp_noop, dcp_commands:noop_response(1),
                              (handshake([]))#{authenticated := false})),
    ok(dcp_commands:response(16#0a, 0, 1), handshake([])),
    ?assertEqual(not_a_dcp_connection, response_why(dcp_control, dcp_commands:response(16#5e, 0, 1),
                                                    handshake([]))),
    ?assertEqual(unsupported_response, response_why(hello, dcp_commands:hello_response(1, []), P)),
    ?assertEqual({rollback_value_length, 0, expected, 8},
                 response_why(dcp_stream_req, dcp_commands:response(16#53, 16#23, 1), C)),
    ?assertEqual({failover_log_length, 10},
                 response_why(dcp_stream_req, dcp_commands:stream_req_response(1, 0, <<0:80>>), C)),
    ?assertEqual({failover_log_length, 0},
                 response_why(dcp_stream_req, dcp_commands:stream_req_response(1, 0, []), C)),
    ?assertEqual(unknown_response_on_a_consumer,
                 response_why(dcp_mutation, dcp_commands:response(16#57, 0, 1), C)),
    ?assertEqual({status, einval}, response_why(dcp_mutation, dcp_commands:response(16#57, 4, 1), P)),
    ?assertEqual({status, key_enoent},
                 response_why(dcp_commit, dcp_commands:response(16#62, 1, 1), P)),
    ok(dcp_commands:response(16#57, 16#07, 1), P),
    ?assertEqual({status, einval},
                 response_why(dcp_stream_end, dcp_commands:response(16#55, 4, 1), P)),
    ?assertEqual(unknown_response_on_a_producer,
                 response_why(dcp_seqno_acknowledged, dcp_commands:response(16#61, 0, 1), P)).

%% ---- over a socket ----

closed(Sock) ->
    gen_tcp:recv(Sock, 0, kv_sim_test_client:recv_timeout()).

%% The node's recorded closes, once one is there.
closes(Node) ->
    closes(Node, 50).

closes(Node, 0) ->
    kv_sim:closes(Node);
closes(Node, N) ->
    case kv_sim:closes(Node) of
        [] -> timer:sleep(10), closes(Node, N - 1);
        Closes -> Closes
    end.

a_bad_mutation_closes_the_consumer_connection_with_its_reason_test_() ->
    {timeout, 20,
     fun() ->
             Node = sim(consumer),
             try
                 {gen_tcp, Sock} = Conn = open(Node, consumer),
                 send(Conn, req(16#57, #{vbucket => 3, opaque => 9, extras => <<7:80>>,
                                         key => <<"k">>})),
                 ?assertEqual({error, closed}, closed(Sock)),
                 ?assertEqual([{<<"replication:test">>,
                                {invalid_frame, dcp_mutation, {extras_length, 10, expected, 31}}}],
                              closes(Node))
             after
                 kv_sim:stop(Node)
             end
     end}.

a_datatype_not_negotiated_and_a_control_before_open_close_test_() ->
    {timeout, 20,
     fun() ->
             Node = sim(consumer),
             try
                 {gen_tcp, Sock} = Conn = open(Node, consumer),
                 %% the test client's HELLO asked xattr and json, not snappy
                 send(Conn, dcp_commands:mutation(3, 9, (doc(<<"k">>))#{datatype => 3})),
                 ?assertEqual({error, closed}, closed(Sock)),
                 {gen_tcp, Sock2} = Conn2 = connect(Node),
                 ?assertEqual(0, status(call(Conn2, dcp_commands:sasl_auth_plain("admin", "pw", 1)))),
                 ?assertEqual(0, status(call(Conn2, dcp_commands:select_bucket("default", 2)))),
                 ?assertEqual(0, status(call(Conn2, dcp_commands:hello("early", [json], 3)))),
                 send(Conn2, dcp_commands:control(<<"enable_noop">>, <<"true">>, 4)),
                 ?assertEqual({error, closed}, closed(Sock2)),
                 ?assertEqual([{<<"replication:test">>,
                                {invalid_frame, dcp_mutation, {datatype_not_negotiated, [snappy]}}},
                               {<<"early">>, {invalid_frame, dcp_control, not_a_dcp_connection}}],
                              kv_sim:closes(Node))
             after
                 kv_sim:stop(Node)
             end
     end}.

a_bad_collection_key_closes_and_a_bad_response_closes_test_() ->
    {timeout, 20,
     fun() ->
             Node = sim(consumer),
             Producer = sim(producer),
             try
                 {gen_tcp, Sock} = Conn = connect(Node),
                 ?assertEqual(0, status(call(Conn, dcp_commands:sasl_auth_plain("admin", "pw", 1)))),
                 ?assertEqual(0, status(call(Conn, dcp_commands:select_bucket("default", 2)))),
                 ?assertEqual(0, status(call(Conn, dcp_commands:hello("c", [collections], 3)))),
                 ?assertEqual(0, status(call(Conn, dcp_commands:dcp_open("c", consumer, [], 4)))),
                 send(Conn, dcp_commands:mutation(3, 9, doc(<<16#80, 16#80>>))),
                 ?assertEqual({error, closed}, closed(Sock)),
                 ?assertEqual([{<<"c">>, {invalid_frame, dcp_mutation,
                                          {collection_key, no_stop_byte}}}], closes(Node)),
                 %% a producer takes no error answer to a mutation
                 {gen_tcp, PSock} = P = open(Producer, producer),
                 send(P, dcp_commands:response(16#57, 4, 9)),
                 ?assertEqual({error, closed}, closed(PSock)),
                 ?assertEqual([{<<"replication:test">>,
                                {invalid_response, dcp_mutation, {status, einval}}}], closes(Producer))
             after
                 kv_sim:stop(Node),
                 kv_sim:stop(Producer)
             end
     end}.

a_good_handshake_and_stream_still_work_test_() ->
    {timeout, 20,
     fun() ->
             Producer = sim(producer),
             try
                 P = open(Producer, producer),
                 ?assertEqual(0, status(call(P, dcp_commands:control(<<"enable_noop">>, <<"true">>, 5)))),
                 Answer = call(P, dcp_commands:stream_req(3, #{end_seqno => 20}, 6)),
                 ?assertMatch(#{opcode_name := dcp_stream_req, status := 0}, Answer),
                 Frames = recv_until_stream_end(P),
                 ?assertEqual(20, length(mutations(Frames))),
                 kv_sim_test_client:assert_nothing_sent_before_noop(P),
                 ?assertEqual([], kv_sim:closes(Producer))
             after
                 kv_sim:stop(Producer)
             end
     end}.
