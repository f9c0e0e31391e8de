%% @doc Options are checked before anything connects: each bad option of the issue's list, and the
%% others, with the exact error; the checked options come back normalised.
-module(dcp_12_options_tests).

-include_lib("eunit/include/eunit.hrl").

good() ->
    #{consumer => {"127.0.0.1", 12000}, producer => {{127, 0, 0, 1}, 12001},
      bucket => "default", connection_name => "replication:p->c:default",
      user => "Administrator", password => "TopSecret1"}.

sup_good() ->
    maps:merge(maps:remove(connection_name, good()),
               #{consumer_node => 'c@127.0.0.1', producer_node => "p@127.0.0.1"}).

bad(Key, Value) ->
    dcp_options:replicator(maps:put(Key, Value, good())).

%% ---- the issue's list ----

ssl_true_is_a_bad_option_test() ->
    ?assertEqual({error, {bad_option, ssl, true}}, bad(ssl, true)).

port_as_a_string_is_a_bad_option_test() ->
    ?assertEqual({error, {bad_option, producer, {"127.0.0.1", "11210"}}},
                 bad(producer, {"127.0.0.1", "11210"})).

max_frame_size_zero_is_a_bad_option_test() ->
    ?assertEqual({error, {bad_option, max_frame_size, 0}}, bad(max_frame_size, 0)),
    ?assertEqual({error, {bad_option, max_frame_size, 23}}, bad(max_frame_size, 23)),
    ?assertEqual({error, {bad_option, max_frame_size, 16#FFFFFFFF + 25}},
                 bad(max_frame_size, 16#FFFFFFFF + 25)),
    ?assertMatch({ok, #{max_frame_size := 24}}, bad(max_frame_size, 24)).

unknown_feature_is_a_bad_option_test() ->
    ?assertEqual({error, {bad_option, features, [bogus]}}, bad(features, [bogus])),
    ?assertEqual({error, {bad_option, features, [{xattr, yes}]}}, bad(features, [{xattr, yes}])),
    ?assertEqual({error, {bad_option, features, xattr}}, bad(features, xattr)),
    ?assertEqual({error, {bad_option, features, [xattr | snappy]}}, bad(features, [xattr | snappy])).

misspelt_key_is_a_bad_option_test() ->
    ?assertEqual({error, {bad_option, setup_timout, 5000}}, bad(setup_timout, 5000)).

setup_timeout_string_is_a_bad_option_test() ->
    ?assertEqual({error, {bad_option, setup_timeout, "x"}}, bad(setup_timeout, "x")),
    ?assertEqual({error, {bad_option, setup_timeout, -1}}, bad(setup_timeout, -1)),
    ?assertMatch({ok, #{setup_timeout := infinity}}, bad(setup_timeout, infinity)).

%% ---- the other keys ----

endpoints_test() ->
    ?assertEqual({error, {bad_option, consumer, {"h", 0}}}, bad(consumer, {"h", 0})),
    ?assertEqual({error, {bad_option, consumer, {"h", 65536}}}, bad(consumer, {"h", 65536})),
    ?assertEqual({error, {bad_option, consumer, "h:11210"}}, bad(consumer, "h:11210")),
    ?assertEqual({error, {bad_option, consumer, {{1, 2, 3}, 1}}}, bad(consumer, {{1, 2, 3}, 1})),
    ?assertEqual({error, {bad_option, consumer, {"", 1}}}, bad(consumer, {"", 1})),
    %% TLS per endpoint: a map with host, port, ssl, local
    ?assertMatch({ok, _}, bad(producer, #{host => "h", port => 11207, ssl => [{verify, verify_peer}]})),
    ?assertMatch({ok, _}, bad(consumer, #{host => localhost, port => 11210, local => true})),
    ?assertEqual({error, {bad_option, producer, #{host => "h", port => 1, ssl => true}}},
                 bad(producer, #{host => "h", port => 1, ssl => true})),
    ?assertEqual({error, {bad_option, producer, #{host => "h", port => 1, tls => true}}},
                 bad(producer, #{host => "h", port => 1, tls => true})).

names_test() ->
    ?assertEqual({error, {bad_option, connection_name, "ns_server:x"}},
                 bad(connection_name, "ns_server:x")),
    ?assertEqual({error, {bad_option, connection_name, <<"replication:x">>}},
                 bad(connection_name, <<"replication:x">>)),
    ?assertEqual({error, {bad_option, bucket, ""}}, bad(bucket, "")),
    ?assertEqual({error, {bad_option, bucket, "a b"}}, bad(bucket, "a b")),
    ?assertEqual({error, {bad_option, bucket, lists:duplicate(101, $b)}},
                 bad(bucket, lists:duplicate(101, $b))),
    ?assertMatch({ok, #{bucket := "travel-sample"}}, bad(bucket, <<"travel-sample">>)),
    ?assertEqual({error, {bad_option, name, "rep"}}, bad(name, "rep")),
    ?assertEqual({error, {bad_option, name, undefined}}, bad(name, undefined)).

timeouts_and_buffers_test() ->
    ?assertEqual({error, {bad_option, shut_timeout, infinity}}, bad(shut_timeout, infinity)),
    ?assertEqual({error, {bad_option, connect_timeout, 1.5}}, bad(connect_timeout, 1.5)),
    ?assertEqual({error, {bad_option, send_timeout, "60"}}, bad(send_timeout, "60")),
    ?assertEqual({error, {bad_option, recbuf, 0}}, bad(recbuf, 0)),
    ?assertEqual({error, {bad_option, sndbuf, 1 bsl 30}}, bad(sndbuf, 1 bsl 30)),
    ?assertMatch({ok, #{recbuf := 1048576, sndbuf := 1048576}},
                 dcp_options:replicator((good())#{recbuf => 1048576, sndbuf => 1048576})).

handlers_and_splitter_test() ->
    ?assertEqual({error, {bad_option, traffic_monitor, self_name}}, bad(traffic_monitor, self_name)),
    ?assertEqual({error, {bad_option, event_handler, no_such_module}},
                 bad(event_handler, no_such_module)),
    ?assertEqual({error, {bad_option, event_handler, lists}}, bad(event_handler, lists)),
    F2 = fun(_, _) -> ok end,
    ?assertEqual({error, {bad_option, event_handler, F2}}, bad(event_handler, F2)),
    ?assertMatch({ok, _}, bad(event_handler, fun(_) -> ok end)),
    ?assertEqual({error, {bad_option, splitter, erlang}}, bad(splitter, erlang)),
    ?assertEqual({error, {bad_option, splitter, {no_such_module, #{}}}},
                 bad(splitter, {no_such_module, #{}})),
    ?assertMatch({ok, #{splitter := {dcp_splitter_mcbp, #{}}}},
                 bad(splitter, {dcp_splitter_mcbp, #{}})).

%% ---- credentials ----

bad_password_value_is_never_echoed_test() ->
    ?assertEqual({error, {bad_option, password, '*redacted*'}}, bad(password, {"TopSecret1"})),
    ?assertEqual({error, {bad_option, password, '*redacted*'}}, bad(password, ["TopSecret1", 1.0])),
    ?assertEqual({error, {bad_option, password, '*redacted*'}}, bad(password, fun(_) -> x end)).

password_is_wrapped_and_unicode_is_fine_test() ->
    {ok, #{password := P}} = bad(password, "pässwörd€"),
    ?assert(dcp_secret:is_secret(P)),
    ?assertEqual(unicode:characters_to_binary("pässwörd€"), dcp_secret:reveal(P)),
    {ok, #{password := P2}} = bad(password, fun() -> [<<"Top">>, "Secret1"] end),
    ?assertEqual(<<"TopSecret1">>, dcp_secret:reveal(P2)).

user_is_utf8_and_a_char_over_255_does_not_crash_test() ->
    ?assertMatch({ok, #{user := <<"Administrator">>}}, dcp_options:replicator(good())),
    ?assertEqual({ok, unicode:characters_to_binary([16#1F600, $u])},
                 maps:find(user, element(2, bad(user, [16#1F600, $u])))),
    ?assertEqual({error, {bad_option, user, ""}}, bad(user, "")),
    ?assertEqual({error, {bad_option, user, <<255, 0>>}}, bad(user, <<255, 0>>)),
    ?assertEqual({error, {bad_option, user, admin}}, bad(user, admin)).

features_come_back_as_the_names_that_are_on_test() ->
    ?assertMatch({ok, #{features := [del_times, xattr]}},
                 bad(features, [{xattr, true}, {snappy, false}, {del_times, true}])),
    ?assertMatch({ok, #{features := [json, snappy]}}, bad(features, [snappy, json])).

%% ---- shape of the map ----

missing_and_non_map_test() ->
    ?assertEqual({error, {missing_option, password}},
                 dcp_options:replicator(maps:remove(password, good()))),
    ?assertEqual({error, {missing_option, bucket}},
                 dcp_options:replicator(maps:without([bucket, user], good()))),
    ?assertEqual({error, {bad_options, not_a_map}}, dcp_options:replicator([{bucket, "b"}])).

first_bad_key_in_key_order_is_reported_test() ->
    ?assertEqual({error, {bad_option, bucket, ""}},
                 dcp_options:replicator((good())#{bucket => "", ssl => true})).

%% ---- dcp_sup ----

sup_options_test() ->
    ?assertMatch({ok, #{consumer_node := 'c@127.0.0.1'}}, dcp_options:sup(sup_good())),
    ?assertEqual({error, {bad_option, connection_name, "replication:x"}},
                 dcp_options:sup((sup_good())#{connection_name => "replication:x"})),
    ?assertEqual({error, {bad_option, connections, 0}},
                 dcp_options:sup((sup_good())#{connections => 0})),
    ?assertEqual({error, {bad_option, connections, 1025}},
                 dcp_options:sup((sup_good())#{connections => 1025})),
    ?assertEqual({error, {bad_option, consumer_node, 42}},
                 dcp_options:sup((sup_good())#{consumer_node => 42})),
    ?assertEqual({error, {missing_option, producer_node}},
                 dcp_options:sup(maps:remove(producer_node, sup_good()))),
    ?assertEqual({error, {bad_option, ssl, true}}, dcp_options:sup((sup_good())#{ssl => true})).

%% ---- at the public start functions: refused at once, nothing connects ----

start_functions_refuse_bad_options_before_connecting_test() ->
    %% a listener that would see any connection attempt
    {ok, L} = gen_tcp:listen(0, [binary, {active, false}]),
    {ok, Port} = inet:port(L),
    Opts = (good())#{consumer => {{127, 0, 0, 1}, Port}, producer => {{127, 0, 0, 1}, Port}},
    Before = length(processes()),
    ?assertEqual({error, {bad_option, ssl, true}}, dcp_replicator:start_link(Opts#{ssl => true})),
    ?assertEqual({error, {bad_option, setup_timout, 1}},
                 dcp_replicator:start_link(Opts#{setup_timout => 1})),
    ?assertEqual({error, {bad_option, password, '*redacted*'}},
                 dcp_replicator:start_link(Opts#{password => 42})),
    SupOpts = maps:merge(maps:remove(connection_name, Opts),
                         #{consumer_node => c, producer_node => p}),
    ?assertEqual({error, {bad_option, max_frame_size, 0}},
                 dcp_sup:start_link(SupOpts#{max_frame_size => 0})),
    ?assertEqual({error, {bad_option, connections, 0}},
                 dcp_sup:start_link(SupOpts#{connections => 0})),
    ?assertError({bad_option, recbuf, 1}, dcp_replicator:child_spec(Opts#{recbuf => 1})),
    ?assertError({bad_option, features, [bogus]}, dcp_sup:child_spec(SupOpts#{features => [bogus]})),
    ?assertEqual({error, timeout}, gen_tcp:accept(L, 100)),
    ?assert(length(processes()) =< Before + 1),
    gen_tcp:close(L).

child_specs_hold_the_password_wrapped_test() ->
    #{id := {dcp_replicator, "replication:p->c:default"},
      start := {dcp_replicator, start_link, [Args]}, restart := permanent} =
        dcp_replicator:child_spec(good()),
    ?assert(dcp_secret:is_secret(maps:get(password, Args))),
    #{start := {dcp_sup, start_link, [SupArgs]}, type := supervisor} = dcp_sup:child_spec(sup_good()),
    ?assert(dcp_secret:is_secret(maps:get(password, SupArgs))),
    ?assertEqual(nomatch, string:find(lists:flatten(io_lib:format("~p", [SupArgs])), "TopSecret1")).
