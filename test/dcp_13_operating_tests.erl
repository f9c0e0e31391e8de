%% @doc The operator's library modules on their own: secrets that print as nothing, log reports and
%% vbucket summaries, which failures are expected, event handlers, and the application refusing to
%% start without its NIF.
-module(dcp_13_operating_tests).

-include_lib("eunit/include/eunit.hrl").

%% a logger handler that captures, and an event handler module
-export([log/2, handle_event/2]).

-define(PW, "TopSecret1-ünï€").

%% ---- dcp_secret ----

secret_prints_as_a_fun_and_its_bytes_are_nowhere_in_the_term_test() ->
    S = dcp_secret:wrap(?PW),
    Utf8 = unicode:characters_to_binary(?PW),
    ?assertEqual(Utf8, dcp_secret:reveal(S)),
    ?assertEqual(Utf8, S()),
    Printed = lists:flatten(io_lib:format("~p ~w", [#{password => S}, {S}])),
    ?assertEqual(nomatch, string:find(Printed, "TopSecret1")),
    ?assertEqual(nomatch, binary:match(term_to_binary(#{password => S}), <<"TopSecret1">>)),
    ?assertEqual(S, dcp_secret:wrap(S)),
    ?assert(dcp_secret:is_secret(S)),
    ?assertNot(dcp_secret:is_secret(fun() -> <<"x">> end)).

secret_refuses_a_non_string_without_echoing_it_test() ->
    ?assertError(badarg, dcp_secret:wrap({?PW})),
    try dcp_secret:wrap([?PW, 1.5]) of
        _ -> ?assert(false)
    catch error:badarg:Stack ->
            ?assertEqual(nomatch, string:find(lists:flatten(io_lib:format("~p", [Stack])),
                                              "TopSecret1"))
    end.

redact_replaces_every_password_value_test() ->
    ?assertEqual(#{a => [{password, '*redacted*'}, #{password => '*redacted*', b => 1}]},
                 dcp_secret:redact(#{a => [{password, ?PW}, #{password => ?PW, b => 1}]})),
    ?assertEqual(#{state => {s, #{password => '*redacted*'}}, reason => x, log => []},
                 dcp_secret:format_status(#{state => {s, #{password => ?PW}}, reason => x,
                                            log => []})).

%% ---- dcp_log ----

vbucket_lists_are_a_count_and_ranges_test() ->
    ?assertEqual(#{count => 1024, ranges => <<"0-1023">>}, dcp_log:vbuckets(lists:seq(1023, 0, -1))),
    ?assertEqual(#{count => 4, ranges => <<"1-2,5,7">>}, dcp_log:vbuckets([7, 5, 2, 1, 2])),
    ?assertEqual(#{count => 0, ranges => <<>>}, dcp_log:vbuckets([])),
    #{count := 512, ranges := Many} = dcp_log:vbuckets(lists:seq(0, 1023, 2)),
    ?assertEqual(<<"0,2,4,6,8,10,12,14,... (504 more ranges)">>, Many).

setup_errors_are_grouped_by_reason_test() ->
    ?assertEqual([{setup_timeout, #{count => 2, ranges => <<"3-4">>}},
                  {{stream_end, closed}, #{count => 1, ranges => <<"9">>}}],
                 dcp_log:errors([{setup_timeout, {vbucket, 4}}, {{stream_end, closed}, {vbucket, 9}},
                                 {setup_timeout, {vbucket, 3}}])).

expected_failures_end_with_shutdown_test() ->
    Expected = [{consumer, {connect_failed, econnrefused}},
                {producer, {sasl_auth, {mcbp_status, auth_error}}},
                {socket_closed, producer}, {partner_down, {socket_closed, consumer}},
                {splitter_error, producer, {frame_too_large, 100, 64}},
                {stop, {unexpected_response, add_stream, 7}}],
    [?assertEqual({shutdown, R}, dcp_log:exit_reason(R)) || R <- Expected],
    [?assertEqual(R, dcp_log:exit_reason(R))
     || R <- [normal, shutdown, {shutdown, x}, {badmatch, 1}, {function_clause, []}]],
    ?assertEqual({shutdown, {partner_down, killed}}, dcp_log:exit_reason({partner_down, killed})).

reports_read_as_one_line_with_the_connection_first_test() ->
    {Format, Args} = dcp_log:format_report(#{what => setup_begun, connection => <<"replication:a->b:c">>,
                                             side => consumer, adds => 3,
                                             vbuckets => dcp_log:vbuckets([0, 1, 2])}),
    ?assertEqual("replication:a->b:c consumer: setup_begun adds=3 "
                 "vbuckets=#{count => 3,ranges => <<\"0-2\">>}",
                 lists:flatten(io_lib:format(Format, Args))).

log_events_carry_the_domain_and_the_process_metadata_test() ->
    Self = self(),
    ok = logger:add_handler(dcp_13_capture, ?MODULE, #{level => all, pid => Self}),
    try
        logger:update_process_metadata(dcp_log:metadata(dcp_log:ctx("replication:x", producer, "b"))),
        ok = dcp_log:notice(connected, #{port => 1}),
        receive
            {captured, #{msg := {report, #{what := connected, port := 1}},
                         meta := #{domain := [dcp_proxy], connection := <<"replication:x">>,
                                   side := producer, bucket := <<"b">>}}} -> ok
        after 1000 -> ?assert(false)
        end
    after
        logger:remove_handler(dcp_13_capture),
        logger:unset_process_metadata()
    end.

%% the capture handler
log(Event, #{pid := Pid}) -> Pid ! {captured, Event}.

the_domain_handler_shows_dcp_proxy_events_only_test() ->
    ok = dcp_log:add_handler(),
    try
        {ok, #{filter_default := stop, filters := [{_, {Fun, Arg}}]}} =
            logger:get_handler_config(dcp_proxy),
        ?assertNotEqual(stop, Fun(#{meta => #{domain => [dcp_proxy]}, level => info,
                                    msg => {string, "x"}}, Arg)),
        ?assertEqual(ignore, Fun(#{meta => #{domain => [otp, sasl]}, level => info,
                                   msg => {string, "x"}}, Arg)),
        ?assertEqual(ok, dcp_log:add_handler())
    after
        dcp_log:remove_handler()
    end.

%% ---- dcp_events ----

handle_event(Name, Data) ->
    maps:get(pid, Data) ! {module_handler, Name, maps:remove(pid, Data)}.

handlers_get_the_event_as_a_module_and_as_a_fun_test() ->
    Self = self(),
    Fun = fun(Event) -> Self ! {fun_handler, Event} end,
    ?assert(dcp_events:is_handler(?MODULE)),
    ?assert(dcp_events:is_handler(Fun)),
    ?assertNot(dcp_events:is_handler(no_such_module)),
    Conn = #{name => <<"replication:x">>, side => producer, handlers => [?MODULE, Fun]},
    ok = dcp_events:emit(Conn, stream_end, #{vbucket => 3, reason => closed, pid => Self}),
    receive {module_handler, stream_end, #{vbucket := 3, reason := closed, side := producer,
                                           connection_name := <<"replication:x">>}} -> ok
    after 1000 -> ?assert(false)
    end,
    receive {fun_handler, {stream_end, #{vbucket := 3}}} -> ok after 1000 -> ?assert(false) end.

a_handler_that_raises_is_ignored_test() ->
    Self = self(),
    Conn = #{name => <<"n">>, side => consumer,
             handlers => [fun(_) -> error(boom) end, fun(E) -> Self ! {second, E} end]},
    ?assertEqual(ok, dcp_events:emit(Conn, takeover, #{vbucket => 1, state => active})),
    receive {second, {takeover, _}} -> ok after 1000 -> ?assert(false) end.

connection_lost_is_not_emitted_for_an_orderly_stop_test() ->
    Self = self(),
    Conn = #{name => <<"n">>, side => consumer, handlers => [fun(E) -> Self ! E end]},
    [ok = dcp_events:connection_lost(Conn, R) || R <- [normal, shutdown, {shutdown, shut}]],
    ok = dcp_events:connection_lost(Conn, {shutdown, {socket_closed, consumer}}),
    receive {connection_lost, #{reason := {socket_closed, consumer}}} -> ok
    after 1000 -> ?assert(false)
    end,
    receive {connection_lost, _} = Other -> ?assertEqual(nothing_else, Other) after 0 -> ok end.

traffic_monitor_keeps_ns_servers_message_shape_test() ->
    [TM] = dcp_events:handlers(#{traffic_monitor => self()}),
    ok = dcp_events:notify([TM], traffic, #{connection_name => <<"n">>, side => consumer,
                                            time => 42, bytes => 10, frames => 1}),
    receive {dcp_traffic, _, _, _} = Msg -> ?assertEqual({dcp_traffic, <<"n">>, consumer, 42}, Msg)
    after 1000 -> ?assert(false)
    end,
    ?assertEqual([], dcp_events:handlers(#{})).

traffic_counts_are_reported_at_most_every_100_ms_test() ->
    T0 = dcp_events:traffic_new(),
    {report, #{bytes := 10, frames := 1, interval_ms := 0}, T1} = dcp_events:traffic_note(T0, 10, 1, 1000),
    {wait, T2} = dcp_events:traffic_note(T1, 5, 2, 1050),
    {report, #{bytes := 12, frames := 3, interval_ms := 100, time := 1100}, _} =
        dcp_events:traffic_note(T2, 7, 1, 1100).

%% ---- the application ----

check_nif_is_ok_when_the_nif_is_loaded_test() ->
    ?assertEqual(ok, dcp_proxy_app:check_nif()).

%% A copy of the ebin without priv/: the application must refuse to start, saying why.
application_refuses_to_start_without_its_nif_test_() ->
    {timeout, 60, fun() ->
        Dir = filename:join(["/tmp", "dcp_13_" ++ os:getpid(), "dcp_proxy", "ebin"]),
        ok = filelib:ensure_dir(filename:join(Dir, "x")),
        Ebin = filename:dirname(code:which(dcp_proxy_app)),
        [{ok, _} = file:copy(F, filename:join(Dir, filename:basename(F)))
         || F <- filelib:wildcard(filename:join(Ebin, "*"))],
        {ok, Peer, _} = peer:start_link(#{connection => standard_io,
                                          args => ["-pa", Dir]}),
        try
            Result = peer:call(Peer, application, ensure_all_started, [dcp_proxy]),
            ?assertMatch({error, {dcp_proxy, {{nif_not_loaded, #{expected_at := _}}, _}}}, Result),
            ?assertEqual(undefined, peer:call(Peer, erlang, whereis, [dcp_proxy_sup]))
        after
            peer:stop(Peer)
        end
    end}.

application_starts_with_its_nif_test() ->
    _ = application:stop(dcp_proxy),
    {ok, _} = application:ensure_all_started(dcp_proxy),
    try
        ?assert(is_pid(whereis(dcp_proxy_sup))),
        ?assertMatch({ok, _}, logger:get_handler_config(dcp_proxy))
    after
        ok = application:stop(dcp_proxy)
    end,
    ?assertMatch({error, _}, logger:get_handler_config(dcp_proxy)).

%% ---- end to end: events and embedding with kv_sim nodes ----

events_of(Tag) ->
    receive {Tag, Event} -> [Event | events_of(Tag)] after 300 -> [] end.

event_handler_reports_setups_stream_ends_traffic_and_the_lost_connection_test_() ->
    dcp_test_lib:with_nodes("an event_handler fun and a traffic monitor", #{rep => none},
        fun(#{consumer := Consumer} = Env) ->
                Self = self(),
                Tag = make_ref(),
                Handler = fun(Event) -> Self ! {Tag, Event} end,
                {ok, {_, Rep} = Keeper} = dcp_test_lib:start_replicator(
                                            (dcp_test_lib:rep_opts(Env))#{event_handler => Handler,
                                                                          traffic_monitor => Self}),
                dcp_test_lib:wait_connected(Rep),
                dcp_test_lib:fail_stream(Env, 5, rollback),
                dcp_test_lib:never_answer_after_stream_end(Env, 5),
                ?assertEqual({errors, [{{stream_end, rollback}, {vbucket, 5}}]},
                             dcp_replicator:setup_replication(Rep, [1, 2, 3, 5])),
                Events = events_of(Tag),
                Names = [N || {N, _} <- Events],
                ?assertMatch([{setup_begun, #{request := setup_streams, adds := 4,
                                              vbuckets := #{count := 4, ranges := <<"1-3,5">>},
                                              side := consumer, bucket := <<"default">>}}],
                             [E || {setup_begun, _} = E <- Events]),
                [{setup_settled, Settled}] = [E || {setup_settled, _} = E <- Events],
                ?assertMatch(#{result := errors, reasons := [{5, {stream_end, rollback}}],
                               duration_us := D} when is_integer(D), Settled),
                ?assertMatch([#{vbucket := 5, reason := rollback, side := producer}],
                             [E || {stream_end, E} <- Events]),
                ?assert(lists:member(traffic, Names)),
                [#{bytes := B} | _] = [E || {traffic, E} <- Events],
                ?assert(B > 0),
                %% the traffic monitor's ns_server message
                receive {dcp_traffic, Name, Side, T} ->
                        ?assert(is_binary(Name) andalso is_atom(Side) andalso is_integer(T))
                after 1000 -> ?assert(false)
                end,
                ok = kv_sim:set_fault(Consumer, 7, {close_socket_on, dcp_add_stream}),
                _ = dcp_replicator:setup_replication(Rep, [1, 2, 3, 7]),
                ?assertEqual({socket_closed, consumer}, dcp_test_lib:wait_exit(Keeper)),
                Lost = [E || {connection_lost, E} <- events_of(Tag)],
                ?assertMatch([#{side := consumer, reason := {socket_closed, consumer}} | _], Lost)
        end).

expected_failure_is_shutdown_and_one_line_without_crash_report_test_() ->
    dcp_test_lib:with_nodes("the consumer node closes its socket; every log event captured",
        #{},
        fun(#{rep := Rep, consumer := Consumer}) ->
                Self = self(),
                ok = logger:add_handler(dcp_13_capture, ?MODULE, #{level => all, pid => Self}),
                {ok, #{level := DefaultLevel}} = logger:get_handler_config(default),
                ok = logger:set_handler_config(default, level, none),
                Ref = erlang:monitor(process, Rep),
                try
                    ok = kv_sim:set_fault(Consumer, 7, {close_socket_on, dcp_add_stream}),
                    _ = dcp_replicator:setup_replication(Rep, [7]),
                    receive {'DOWN', Ref, process, Rep, Reason} ->
                            ?assertEqual({shutdown, {socket_closed, consumer}}, Reason)
                    end,
                    timer:sleep(200)
                after
                    logger:set_handler_config(default, level, DefaultLevel),
                    logger:remove_handler(dcp_13_capture)
                end,
                Captured = captured(),
                Crashes = [E || #{msg := {report, #{label := {proc_lib, crash}}}} = E <- Captured],
                ?assertEqual([], Crashes),
                Notices = [R || #{level := L, msg := {report, #{what := connection_stopped} = R}}
                                    <- Captured, L =/= info, L =/= debug],
                ?assertMatch([#{reason := {shutdown, {socket_closed, consumer}}}], Notices)
        end).

captured() ->
    receive {captured, E} -> [E | captured()] after 0 -> [] end.

child_spec_and_stop_embed_a_replicator_in_a_users_supervisor_test_() ->
    dcp_test_lib:with_nodes("a replicator under a plain OTP supervisor", #{rep => none},
        fun(Env) ->
                process_flag(trap_exit, true),
                Spec = dcp_replicator:child_spec(dcp_test_lib:rep_opts(Env)),
                {ok, Sup} = supervisor:start_link(dcp_13_sup, [Spec]),
                [{_, Rep, worker, _}] = supervisor:which_children(Sup),
                dcp_test_lib:wait_connected(Rep),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [1, 2])),
                ok = supervisor:terminate_child(Sup, maps:get(id, Spec)),
                ?assertEqual([{maps:get(id, Spec), undefined, worker, [dcp_replicator]}],
                             supervisor:which_children(Sup)),
                {ok, Rep2} = supervisor:restart_child(Sup, maps:get(id, Spec)),
                ok = supervisor:terminate_child(Sup, maps:get(id, Spec)),
                ?assertNot(is_process_alive(Rep2)),
                exit(Sup, shutdown),
                receive {'EXIT', Sup, shutdown} -> ok end,
                {ok, Rep3} = dcp_replicator:start_link(dcp_test_lib:rep_opts(Env)),
                ?assertEqual(ok, dcp_replicator:stop(Rep3)),
                ?assertNot(is_process_alive(Rep3)),
                dcp_test_lib:flush_exits()
        end).
