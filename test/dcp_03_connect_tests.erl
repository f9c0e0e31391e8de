%% @doc Connecting to the nodes: the handshake and the errors that name its step, TLS with peer
%% verification, passwords kept out of replies and logs, the traffic monitor.
-module(dcp_03_connect_tests).

-include_lib("eunit/include/eunit.hrl").

%% logger handler callback (collects events for the credentials test)
-export([log/2]).

-import(dcp_test_lib, [with_nodes/3, proxy_opts/2, rep_opts/1]).

%% ---- the handshake ----

unknown_bucket_is_a_select_bucket_error_test_() ->
    with_nodes("the producer conn asks for a bucket the node has not", #{rep => none},
               fun(#{producer := Producer}) ->
                       process_flag(trap_exit, true),
                       ?assertMatch({producer, {select_bucket, {mcbp_status, _}}},
                                    dcp_test_lib:conn_failure(dcp_producer_conn:start_link(
                                      proxy_opts(Producer, #{bucket => "no-such-bucket"})))),
                       dcp_test_lib:flush_exits()
               end).

refused_snappy_is_tolerated_but_refused_xattr_is_an_error_test_() ->
    with_nodes("the producer node grants json only",
               #{producer => #{hello_features => [json]}, rep => none},
               fun(#{producer := Producer}) ->
                       process_flag(trap_exit, true),
                       {ok, P} = dcp_producer_conn:start_link(
                                   proxy_opts(Producer, #{features => [snappy, del_times]})),
                       ?assertMatch(#{state := connected}, connected(P)),
                       dcp_proxy:terminate_and_wait([P], shutdown, 5000),
                       ?assertEqual({producer, {hello, {features_refused, [xattr]}}},
                                    dcp_test_lib:conn_failure(dcp_producer_conn:start_link(
                                      proxy_opts(Producer, #{features => [xattr, snappy]})))),
                       dcp_test_lib:flush_exits()
               end).

connection_refused_is_a_connect_error_test() ->
    process_flag(trap_exit, true),
    {ok, L} = gen_tcp:listen(0, [{ip, loopback}]),
    {ok, Port} = inet:port(L),
    ok = gen_tcp:close(L),
    ?assertEqual({consumer, {connect_failed, econnrefused}},
                 dcp_test_lib:conn_failure(
                   dcp_consumer_conn:start_link(#{host => {127, 0, 0, 1}, port => Port,
                                                  bucket => "default",
                                                  connection_name => dcp_test_lib:connection_name(),
                                                  user => "u", password => fun() -> "p" end},
                                                1000))),
    dcp_test_lib:flush_exits().

wrong_password_gives_a_clear_error_from_start_link_test_() ->
    with_nodes("the replicator's password is wrong for both nodes", #{rep => none},
               fun(Env) ->
                       Wrong = "not-the-Pa55word",
                       Result = dcp_test_lib:start_failure((rep_opts(Env))#{password => Wrong}),
                       %% both sides connect at once: either may be the first to fail
                       ?assertMatch({_, {sasl_auth, {mcbp_status, auth_error}}}, Result),
                       %% neither password appears in what the caller gets
                       Text = lists:flatten(io_lib:format("~p", [Result])),
                       ?assertEqual(nomatch, string:find(Text, Wrong)),
                       ?assertEqual(nomatch, string:find(Text, dcp_test_lib:password()))
               end).

wrong_password_on_the_producer_only_names_the_producer_test_() ->
    with_nodes("the producer node has another password",
               #{producer => #{password => "other"}, rep => none},
               fun(Env) ->
                       ?assertEqual({producer, {sasl_auth, {mcbp_status, auth_error}}},
                                    dcp_test_lib:start_failure(rep_opts(Env)))
               end).

connected(Pid) ->
    dcp_test_lib:wait_until(fun() -> maps:get(state, dcp_proxy:stats(Pid)) =:= connected end),
    dcp_proxy:stats(Pid).

%% ---- TLS ----

tls_on_both_sides_with_peer_verification_replicates_with_equal_digests_test_() ->
    {"TLS on both nodes, both ends verify the peer",
     {setup,
      fun() ->
              {ServerTls, ClientTls} = dcp_test_lib:tls_configs(),
              dcp_test_lib:start_env(#{producer => #{ssl => ServerTls, docs_per_vbucket => 100},
                                       consumer => #{ssl => ServerTls},
                                       rep => #{ssl => ClientTls}})
      end,
      fun dcp_test_lib:stop_env/1,
      fun(#{rep := Rep, producer := Producer, consumer := Consumer} = Env) ->
              {timeout, 60,
               ?_test(begin
                          VBs = lists:seq(0, 15),
                          dcp_test_lib:fail_stream(Env, 15, state_changed),
                          dcp_test_lib:never_answer_after_stream_end(Env, 15),
                          ?assertEqual(dcp_test_lib:stream_end_error(state_changed, 15),
                                       dcp_replicator:setup_replication(Rep, VBs)),
                          dcp_test_lib:assert_replicated(Producer, Consumer, lists:seq(0, 14)),
                          ?assertEqual(ok, dcp_replicator:takeover(Rep, 2)),
                          ?assertEqual(dead, kv_sim:vbucket_state(Producer, 2))
                      end)}
      end}}.

tls_client_without_a_certificate_is_refused_test_() ->
    tls_nodes_test("TLS: a replicator with no client certificate cannot start", same_ca,
                   fun(Env, ClientTls) ->
                           NoCert = [O || O <- ClientTls, not is_tuple(O)
                                              orelse not lists:member(element(1, O),
                                                                      [cert, key, certs_keys])],
                           Result = dcp_test_lib:start_failure((rep_opts(Env))#{ssl => NoCert}),
                           ?assertMatch({Side, _} when Side =:= consumer; Side =:= producer,
                                        Result)
                   end).

tls_peer_that_cannot_be_verified_is_refused_test_() ->
    tls_nodes_test("TLS: a replicator trusting another CA refuses the nodes", other_ca,
                   fun(Env, ClientTls) ->
                           ?assertMatch({_, {connect_failed, {tls, _}}},
                                        dcp_test_lib:start_failure(
                                          (rep_opts(Env))#{ssl => ClientTls}))
                   end).

tls_without_a_ca_is_refused_unless_verify_none_is_asked_for_test_() ->
    tls_nodes_test("TLS: no CA to verify the nodes is an error; verify_none only by name", same_ca,
                   fun(Env, ClientTls) ->
                           ?assertMatch({_, {connect_failed, {tls, no_ca_given_to_verify_the_server}}},
                                        dcp_test_lib:start_failure((rep_opts(Env))#{ssl => []})),
                           NoCa = [O || O <- ClientTls, not is_tuple(O)
                                            orelse not lists:member(element(1, O),
                                                                    [cacerts, cacertfile, verify])],
                           ?assertMatch({_, {connect_failed, {tls, no_ca_given_to_verify_the_server}}},
                                        dcp_test_lib:start_failure((rep_opts(Env))#{ssl => NoCa}))
                   end).

%% Nodes that speak TLS only, no replicator: `Body(Env, ClientTls)', the client options of the
%% nodes' test CA (`same_ca') or of another one that the nodes' certificates do not chain to.
tls_nodes_test(Title, Ca, Body) ->
    {Title,
     {setup,
      fun() ->
              {ServerTls, ClientTls} = dcp_test_lib:tls_configs(),
              Client = case Ca of
                           same_ca -> ClientTls;
                           other_ca -> element(2, dcp_test_lib:tls_configs())
                       end,
              {dcp_test_lib:start_env(#{producer => #{ssl => ServerTls},
                                        consumer => #{ssl => ServerTls}, rep => none}),
               Client}
      end,
      fun({Env, _}) -> dcp_test_lib:stop_env(Env) end,
      fun({Env, Client}) -> {timeout, 60, ?_test(Body(Env, Client))} end}}.

%% ---- credentials and liveliness ----

log(Event, #{config := #{collector := Pid}}) ->
    Pid ! {logged, Event}.

collect_logs(Acc) ->
    receive {logged, Event} -> collect_logs([Event | Acc]) after 200 -> lists:reverse(Acc) end.

password_never_appears_in_logs_or_crash_reports_test_() ->
    with_nodes("a failed handshake, a replication and a crash of the pair, all logged",
               #{rep => none},
               fun(#{consumer := Consumer} = Env) ->
                       process_flag(trap_exit, true),
                       ok = logger:add_handler(dcp_03_connect_tests_capture, ?MODULE,
                                               #{level => all, config => #{collector => self()}}),
                       OldLevel = maps:get(level, logger:get_primary_config()),
                       ok = logger:set_primary_config(level, all),
                       try
                           Opts = maps:without([features, setup_timeout], rep_opts(Env)),
                           {ok, Failing} = dcp_replicator:start_link(
                                             Opts#{producer => {{127, 0, 0, 1}, 1}}),
                           receive {'EXIT', Failing, _} -> ok end,
                           {ok, Rep} = dcp_replicator:start_link(Opts),
                           ok = dcp_replicator:setup_replication(Rep, [0]),
                           ok = kv_sim:set_fault(Consumer, 1, {close_socket_on, dcp_add_stream}),
                           {errors, _} = dcp_replicator:setup_replication(Rep, [0, 1]),
                           receive {'EXIT', Rep, _} -> ok end,
                           Logged = [lists:flatten(io_lib:format("~p", [E]))
                                     || E <- collect_logs([])],
                           ?assert(length(Logged) > 0),
                           ?assertEqual([], [L || L <- Logged,
                                                  string:find(L, dcp_test_lib:password())
                                                      =/= nomatch])
                       after
                           ok = logger:set_primary_config(level, OldLevel),
                           ok = logger:remove_handler(dcp_03_connect_tests_capture),
                           dcp_test_lib:flush_exits()
                       end
               end).

traffic_monitor_hears_from_both_sides_while_frames_flow_test_() ->
    with_nodes("both conns given this process as traffic monitor", #{rep => none},
               fun(#{producer := Producer, consumer := Consumer}) ->
                       process_flag(trap_exit, true),
                       Self = self(),
                       {ok, C} = dcp_consumer_conn:start_link(
                                   proxy_opts(Consumer, #{traffic_monitor => Self}), 10000),
                       {ok, P} = dcp_producer_conn:start_link(
                                   proxy_opts(Producer, #{traffic_monitor => Self})),
                       ok = dcp_proxy:connect_proxies(C, P),
                       ok = dcp_consumer_conn:setup_streams(C, [0, 1]),
                       Name = list_to_binary(dcp_test_lib:connection_name()),
                       [receive {dcp_traffic, Name, Side, T} -> ?assert(is_integer(T)) end
                        || Side <- [consumer, producer]],
                       dcp_proxy:terminate_and_wait([C, P], shutdown, 5000),
                       dcp_test_lib:flush_exits()
               end).
