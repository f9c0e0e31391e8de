%% The client side of the kv_sim tests: a plain gen_tcp (or ssl) client speaking to a node through
%% dcp_commands and mcbp, as memcached's peers do. Receive timeouts are backstops only: every check waits
%% for a frame.
-module(kv_sim_test_client).

-include_lib("eunit/include/eunit.hrl").

-export([sim/1, sim/2, connect/1, send/2, recv/1, call/2, status/1, handshake/2, open/2,
         assert_nothing_sent_before_noop/1, recv_until/2, is_stream_end/1, mutations/1,
         digest_of_mutations/1, recv_until_stream_end/1, recv_timeout/0]).

-define(RECV_TIMEOUT, 5000).

recv_timeout() ->
    ?RECV_TIMEOUT.

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
recv(Conn) ->
    recv_rest(Conn, recv_bytes(Conn, 24)).

recv_rest(Conn, Bin) ->
    case mcbp:decode(Bin) of
        {ok, Frame, <<>>} ->
            Frame;
        {more, N} ->
            recv_rest(Conn, <<Bin/binary, (recv_bytes(Conn, N))/binary>>)
    end.

recv_bytes({Mod, Sock}, N) ->
    {ok, Bytes} = Mod:recv(Sock, N, ?RECV_TIMEOUT),
    Bytes.

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

%% Frames until (and including) the stream end.
recv_until_stream_end(Conn) ->
    recv_until(Conn, fun is_stream_end/1).

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
