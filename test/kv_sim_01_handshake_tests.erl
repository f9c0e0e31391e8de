%% kv_sim's memcached handshake: SASL PLAIN, SELECT_BUCKET, HELLO, DCP_OPEN and noops.
-module(kv_sim_01_handshake_tests).

-include_lib("eunit/include/eunit.hrl").

-import(kv_sim_test_client, [sim/1, sim/2, connect/1, call/2, status/1, open/2]).

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
