%% A producer's data is fixed by its seed; a node serves TLS with peer verification.
-module(kv_sim_05_seed_and_tls_tests).

-include_lib("eunit/include/eunit.hrl").

-import(kv_sim_test_client, [sim/2, call/2, status/1, handshake/2, mutations/1, recv_timeout/0,
                             recv_until_stream_end/1]).

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
                              {server_name_indication, disable} | ClientOpts], recv_timeout()),
    Conn = handshake({ssl, Sock}, producer),
    ?assertEqual(0, status(call(Conn, dcp_commands:stream_req(1, #{end_seqno => 20}, 1)))),
    ?assertEqual(20, length(mutations(recv_until_stream_end(Conn)))),
    ok = ssl:close(Sock),
    kv_sim:stop(Node).
