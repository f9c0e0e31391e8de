%% @doc The handshake as ns_server speaks it (issue 12): the features in either form, exactly the
%% HELLO asked for, the HELLO key, the consumer's DCP_OPEN `consumer_name' value, TLS per endpoint.
%% kv_sim records what each accepted connection sent; the tests compare it byte for byte.
-module(dcp_10_protocol_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dcp_test_lib, [with_nodes/3, rep_opts/1, connection_name/0]).

-define(NAME_BIN, <<"replication:p_1@127.0.0.1->c_0@127.0.0.1:default">>).
-define(ALL_ATOMS, [xattr, del_times, snappy, json, collections, set_consumer_name]).
-define(ALL_PROPLIST, [{xattr, true}, {collections, true}, {snappy, true}, {json, true},
                       {del_times, true}, {del_user_xattr, false}, {set_consumer_name, true},
                       {ssl, false}]).

%% ---- what the peers receive ----

%% xattr 0x06, snappy 0x0a, json 0x0b, collections 0x12; producer flag 0x01, xattr 0x04,
%% del_times 0x20.
expected(Side) ->
    Flags = case Side of
                producer -> 16#01 bor 16#04 bor 16#20;
                consumer -> 16#04 bor 16#20
            end,
    {Value, Datatype} = case Side of
                            producer -> {<<>>, 0};
                            consumer -> {<<"{\"consumer_name\":\"c_0@127.0.0.1\"}">>, 1}
                        end,
    #{hello_key => <<"ns_server:proxy-", (atom_to_binary(Side))/binary, "/", ?NAME_BIN/binary>>,
      hello_value => <<16#06:16, 16#0a:16, 16#0b:16, 16#12:16>>,
      hello_features => [xattr, snappy, json, collections],
      open_name => ?NAME_BIN, open_flags => Flags, open_value => Value, open_datatype => Datatype}.

connections(Node) ->
    %% the replicator is connected once both answered DCP_OPEN: the records are in
    kv_sim:handshakes(Node).

atom_list_test_() ->
    with_nodes("the atom list: HELLO key, features and DCP_OPEN as ns_server's",
               #{rep => #{features => ?ALL_ATOMS}},
               fun(#{producer := P, consumer := C}) ->
                       ?assertEqual([expected(producer)], connections(P)),
                       ?assertEqual([expected(consumer)], connections(C))
               end).

proplist_test_() ->
    with_nodes("ns_server's proplist negotiates the same as the atom list",
               #{rep => #{features => ?ALL_PROPLIST}},
               fun(#{producer := P, consumer := C}) ->
                       ?assertEqual([expected(producer)], connections(P)),
                       ?assertEqual([expected(consumer)], connections(C))
               end).

consumer_node_option_test_() ->
    with_nodes("consumer_node names the consumer in DCP_OPEN's value",
               #{rep => #{features => [json, set_consumer_name], consumer_node => 'n_9@10.0.0.9'}},
               fun(#{producer := P, consumer := C}) ->
                       [#{open_value := <<>>, open_datatype := 0,
                          hello_value := <<16#0b:16>>}] = connections(P),
                       [#{open_value := V, open_datatype := 1}] = connections(C),
                       ?assertEqual(<<"{\"consumer_name\":\"n_9@10.0.0.9\"}">>, V)
               end).

json_without_consumer_name_test_() ->
    with_nodes("json alone: no consumer_name value",
               #{rep => #{features => [{json, true}, {set_consumer_name, false}]}},
               fun(#{consumer := C}) ->
                       ?assertMatch([#{open_value := <<>>, open_datatype := 0,
                                       hello_value := <<16#0b:16>>}], connections(C))
               end).

no_features_no_hello_test_() ->
    with_nodes("nothing asked: no HELLO at all",
               #{rep => #{features => []}},
               fun(#{producer := P, consumer := C}) ->
                       [RP] = connections(P),
                       [RC] = connections(C),
                       ?assertNot(maps:is_key(hello_key, RP)),
                       ?assertNot(maps:is_key(hello_key, RC)),
                       ?assertEqual(16#01, maps:get(open_flags, RP)),
                       ?assertEqual(0, maps:get(open_flags, RC))
               end).

refused_snappy_tolerated_test_() ->
    with_nodes("a node that refuses snappy still replicates",
               #{producer => #{hello_features => [xattr, json, collections]},
                 rep => #{features => [xattr, snappy, json]}},
               fun(#{rep := Rep, producer := P, consumer := C}) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1])),
                       dcp_test_lib:assert_replicated(P, C, [0, 1])
               end).

refused_collections_test_() ->
    with_nodes("a refused collections is a named error",
               #{producer => #{hello_features => [xattr, snappy, json]}, rep => none},
               fun(Env) ->
                       Opts = (rep_opts(Env))#{features => [xattr, collections]},
                       ?assertEqual({producer, {hello, {features_refused, [collections]}}},
                                    dcp_test_lib:start_failure(Opts))
               end).

unknown_feature_test_() ->
    with_nodes("an unknown feature is an error before connecting",
               #{rep => none},
               fun(#{producer := P, consumer := C} = Env) ->
                       Base = rep_opts(Env),
                       ?assertEqual({error, {bad_option, features, [xattr, bogus]}},
                                    dcp_replicator:start_link(Base#{features => [xattr, bogus]})),
                       ?assertEqual({error, {bad_option, features, [{json, yes}]}},
                                    dcp_replicator:start_link(Base#{features => [{json, yes}]})),
                       ?assertEqual({error, {bad_option, features, json}},
                                    dcp_replicator:start_link(Base#{features => json})),
                       timer:sleep(50),
                       ?assertEqual([], kv_sim:handshakes(P)),
                       ?assertEqual([], kv_sim:handshakes(C))
               end).

%% ---- TLS per endpoint ----

tls_producer_local_consumer_test_() ->
    {Server, Client} = dcp_test_lib:tls_configs(),
    with_nodes("TLS to the remote producer, plain TCP to the local consumer",
               #{producer => #{ssl => Server}, rep => none},
               fun(#{producer := P, consumer := C} = Env) ->
                       Base = rep_opts(Env),
                       {PHost, PPort} = maps:get(producer, Base),
                       {CHost, CPort} = maps:get(consumer, Base),
                       %% the global ssl would apply to both; the local consumer overrides it
                       Opts = Base#{producer => #{host => PHost, port => PPort},
                                    consumer => #{host => CHost, port => CPort, local => true},
                                    ssl => Client},
                       {ok, {_, Rep} = Keeper} = dcp_test_lib:start_replicator(Opts),
                       try
                           dcp_test_lib:wait_connected(Rep),
                           ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1])),
                           dcp_test_lib:assert_replicated(P, C, [0, 1])
                       after
                           dcp_test_lib:stop_replicator(Keeper)
                       end
               end).

tls_per_endpoint_option_test_() ->
    {Server, Client} = dcp_test_lib:tls_configs(),
    with_nodes("an endpoint's own ssl, without a global one",
               #{producer => #{ssl => Server}, rep => none},
               fun(#{producer := P, consumer := C} = Env) ->
                       Base = rep_opts(Env),
                       {PHost, PPort} = maps:get(producer, Base),
                       Opts = Base#{producer => #{host => PHost, port => PPort, ssl => Client}},
                       {ok, {_, Rep} = Keeper} = dcp_test_lib:start_replicator(Opts),
                       try
                           dcp_test_lib:wait_connected(Rep),
                           ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [2])),
                           dcp_test_lib:assert_replicated(P, C, [2])
                       after
                           dcp_test_lib:stop_replicator(Keeper)
                       end
               end).

%% ---- pure parts ----

hello_key_cut_at_250_test() ->
    Long = lists:duplicate(300, $x),
    Key = dcp_features:hello_key(consumer, Long),
    ?assertEqual(250, byte_size(Key)),
    ?assertEqual(<<"ns_server:proxy-consumer/xxx">>, binary:part(Key, 0, 28)),
    ?assertEqual(<<"ns_server:proxy-producer/", ?NAME_BIN/binary>>,
                 dcp_features:hello_key(producer, connection_name())).

consumer_of_test() ->
    ?assertEqual(<<"c_0@127.0.0.1">>, dcp_features:consumer_of(?NAME_BIN)),
    ?assertEqual(<<"n_1@::1">>,
                 dcp_features:consumer_of(<<"replication:n_0@::1->n_1@::1:default/2">>)),
    ?assertEqual(atom_to_binary(node()), dcp_features:consumer_of(<<"other">>)).

consumer_name_value_escapes_test() ->
    ?assertEqual(<<"{\"consumer_name\":\"a\\\"b\\\\c\"}">>,
                 dcp_features:consumer_name_value(<<"a\"b\\c">>)).

parse_test() ->
    {ok, A} = dcp_features:parse(?ALL_ATOMS),
    {ok, B} = dcp_features:parse(?ALL_PROPLIST),
    ?assertEqual(maps:without([features, ssl], A), maps:without([features, ssl], B)),
    ?assertMatch({ok, #{hello := [], consumer_name := false}}, dcp_features:parse([])),
    %% the first value of a name given twice, as proplists:get_value/2
    ?assertMatch({ok, #{hello := []}}, dcp_features:parse([{json, false}, {json, true}])),
    ?assertEqual({error, {bad_option, features, [{nope, true}]}},
                 dcp_features:parse([{nope, true}])).

%% ---- the collection and sync-write frames (layouts of kv_engine's docs/dcp/commands) ----

decode(IoData) ->
    {ok, Frame, <<>>} = mcbp:decode(iolist_to_binary(IoData)),
    Frame.

leb128_test() ->
    ?assertEqual(<<0>>, dcp_commands:leb128(0)),
    ?assertEqual(<<16#7f>>, dcp_commands:leb128(127)),
    ?assertEqual(<<16#80, 16#01>>, dcp_commands:leb128(128)),
    ?assertEqual(<<16#ff, 16#ff, 16#ff, 16#ff, 16#0f>>, dcp_commands:leb128(16#ffffffff)),
    ?assertEqual(<<8, "k1">>, dcp_commands:collection_key(8, <<"k1">>)),
    ?assertEqual({ok, 300, <<"doc">>},
                 dcp_commands:split_collection_key(dcp_commands:collection_key(300, <<"doc">>))),
    %% no key after the prefix, an unfinished prefix, a prefix over 32 bits
    ?assertEqual(error, dcp_commands:split_collection_key(<<8>>)),
    ?assertEqual(error, dcp_commands:split_collection_key(<<16#80>>)),
    ?assertEqual(error, dcp_commands:split_collection_key(<<16#ff, 16#ff, 16#ff, 16#ff, 16#1f, $k>>)).

dcp_open_json_test() ->
    F = decode(dcp_commands:dcp_open_json(<<"n">>, consumer, [xattr], <<"{\"a\":1}">>, 4)),
    ?assertMatch(#{opcode := 16#50, datatype := 1, key := <<"n">>, value := <<"{\"a\":1}">>,
                   extras := <<0:32, 16#04:32>>, opaque := 4}, F).

system_event_test() ->
    F = decode(dcp_commands:create_collection_event(3, 7, 11, 9, <<"c9">>)),
    ?assertMatch(#{opcode := 16#5f, vbucket := 3, opaque := 7, key := <<"c9">>,
                   extras := <<11:64, 0:32, 0:8>>, value := <<9:64, 0:32, 9:32>>}, F).

sync_write_frames_test() ->
    P = decode(dcp_commands:prepare(1, 2, #{key => <<"k">>, by_seqno => 5, value => <<"v">>})),
    ?assertMatch(#{opcode := 16#60, key := <<"k">>, value := <<"v">>,
                   extras := <<5:64, 1:64, 0:32, 0:32, 0:32, 0:8, 0:8, 1:8>>}, P),
    C = decode(dcp_commands:commit(1, 2, #{key => <<"k">>, prepared_seqno => 5,
                                           commit_seqno => 6})),
    ?assertMatch(#{opcode := 16#62, key := <<"k">>, extras := <<5:64, 6:64>>}, C),
    A = decode(dcp_commands:abort(1, 2, #{key => <<"k">>, prepared_seqno => 5,
                                          abort_seqno => 7})),
    ?assertMatch(#{opcode := 16#63, key := <<"k">>, extras := <<5:64, 7:64>>}, A),
    S = decode(dcp_commands:seqno_acknowledged(1, 2, 5)),
    ?assertMatch(#{opcode := 16#61, vbucket := 1, extras := <<5:64>>, key := <<>>}, S).

%% ---- collections (kv_sim collection-aware) ----

collections_on_test_() ->
    with_nodes("collections negotiated: every collection replicates, system events first",
               #{producer => #{collections => [0, 8, 9], vbuckets => 4, docs_per_vbucket => 30},
                 consumer => #{vbuckets => 4},
                 rep => #{features => [{xattr, true}, {collections, true}, {json, true}]}},
               fun(#{rep := Rep, producer := P, consumer := C}) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1, 2, 3])),
                       dcp_test_lib:assert_replicated(P, C, [0, 1, 2, 3]),
                       ?assertEqual(#{0 => 10, 8 => 10, 9 => 10}, kv_sim:collection_counts(P, 0)),
                       [?assertEqual(kv_sim:collection_counts(P, VB),
                                     kv_sim:collection_counts(C, VB)) || VB <- [0, 1, 2, 3]],
                       ?assertEqual([{1, 0, <<"c8">>}, {2, 0, <<"c9">>}],
                                    kv_sim:system_events(C, 3))
               end).

collections_off_test_() ->
    with_nodes("collections not negotiated: only the default collection arrives",
               #{producer => #{collections => [0, 8, 9], vbuckets => 2, docs_per_vbucket => 30},
                 consumer => #{vbuckets => 2},
                 rep => #{features => [xattr, json]}},
               fun(#{rep := Rep, producer := P, consumer := C}) ->
                       ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1])),
                       dcp_test_lib:wait_until(
                         fun() -> kv_sim:collection_counts(C, 1) =:= #{0 => 10} end),
                       ?assertEqual(#{0 => 10}, kv_sim:collection_counts(C, 0)),
                       ?assertEqual([], kv_sim:system_events(C, 0)),
                       %% the difference is visible in the digests
                       ?assertMatch({10, _}, kv_sim:digest(C, 0)),
                       ?assertMatch({30, _}, kv_sim:digest(P, 0))
               end).

%% ---- kv_sim checks DCP_OPEN as memcached's validator does ----

open_answer(Node, Frame) ->
    Conn = {gen_tcp, Sock} = kv_sim_test_client:connect(Node),
    ?assertEqual(0, kv_sim_test_client:status(
                      kv_sim_test_client:call(Conn, dcp_commands:sasl_auth_plain("admin", "pw", 1)))),
    ?assertEqual(0, kv_sim_test_client:status(
                      kv_sim_test_client:call(Conn, dcp_commands:select_bucket("default", 2)))),
    %% a JSON value needs HELLO json (memcached checks the datatype is enabled)
    ?assertEqual(0, kv_sim_test_client:status(
                      kv_sim_test_client:call(Conn, dcp_commands:hello("t", [json], 3)))),
    kv_sim_test_client:send(Conn, Frame),
    Answer = case gen_tcp:recv(Sock, 24, 5000) of
                 {ok, _} -> answered;
                 {error, closed} -> closed
             end,
    gen_tcp:close(Sock),
    Answer.

dcp_open_validation_test() ->
    Node = kv_sim_test_client:sim(consumer),
    try
        Good = dcp_features:consumer_name_value(<<"c_0@127.0.0.1">>),
        ?assertEqual(answered, open_answer(Node, dcp_commands:dcp_open_json(
                                                   <<"n">>, consumer, [], Good, 4))),
        ?assertEqual(answered, open_answer(Node, dcp_commands:dcp_open(<<"n">>, consumer, [], 4))),
        %% a value without datatype JSON, a value that is not a JSON object, a non-string name,
        %% no name, extras of the wrong size
        ?assertEqual(closed, open_answer(Node, dcp_commands:request(
                                                 16#50, #{extras => <<0:64>>, key => <<"n">>,
                                                          value => Good}))),
        ?assertEqual(closed, open_answer(Node, dcp_commands:dcp_open_json(
                                                 <<"n">>, consumer, [], <<"[1]">>, 4))),
        ?assertEqual(closed, open_answer(Node, dcp_commands:dcp_open_json(
                                                 <<"n">>, consumer, [], <<"{\"consumer_name\":1}">>, 4))),
        ?assertEqual(closed, open_answer(Node, dcp_commands:request(
                                                 16#50, #{extras => <<0:64>>, key => <<>>}))),
        ?assertEqual(closed, open_answer(Node, dcp_commands:request(
                                                 16#50, #{extras => <<0:32>>, key => <<"n">>})))
    after
        kv_sim:stop(Node)
    end.
