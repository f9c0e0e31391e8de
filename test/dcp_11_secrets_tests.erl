%% @doc No password in any log event (SASL crash reports and supervisor reports included) or in
%% `sys:get_status/1' of any replication process, through the fault matrix: authentication failed,
%% a bad peer, lost sockets, a supervisor's start error and restarts.
-module(dcp_11_secrets_tests).

-include_lib("eunit/include/eunit.hrl").

-export([log/2]).

-import(dcp_test_lib, [with_nodes/3]).

%% the password the tests give the replicator when the node expects another one
-define(WRONG, "Wrong-Pass-Word-9c1e").
-define(HANDLER, dcp_11_capture).

%% ---- capturing ----

%% logger handler: every event, formatted as the default handler would and as a raw term
log(Event, #{collector := Pid}) ->
    Text = try logger_formatter:format(Event, #{single_line => false, depth => unlimited,
                                                chars_limit => unlimited})
           catch _:_ -> <<>>
           end,
    Pid ! {log, iolist_to_binary([unicode:characters_to_binary(Text),
                                  io_lib:format("~n~p~n", [Event])])}.

capture(Body) ->
    Self = self(),
    Collector = spawn_link(fun() -> collect(Self, []) end),
    ok = logger:add_handler(?HANDLER, ?MODULE, #{level => all, collector => Collector}),
    PrimaryLevel = maps:get(level, logger:get_primary_config()),
    ok = logger:set_primary_config(level, all),
    %% the reports these faults cause on purpose are captured, not printed
    {ok, #{level := DefaultLevel}} = logger:get_handler_config(default),
    ok = logger:set_handler_config(default, level, none),
    try
        Statuses = Body(),
        %% reports of processes that just stopped are on their way
        timer:sleep(300),
        Collector ! {done, Self},
        Logs = receive {logs, L} -> L end,
        {Logs, Statuses}
    after
        logger:set_primary_config(level, PrimaryLevel),
        logger:set_handler_config(default, level, DefaultLevel),
        logger:remove_handler(?HANDLER)
    end.

collect(Test, Acc) ->
    receive
        {log, Text} -> collect(Test, [Text | Acc]);
        {done, Test} -> Test ! {logs, lists:reverse(Acc)}
    end.

%% sys:get_status of the process and every process linked to it, transitively (not the test's
%% own processes, not the kv_sim nodes')
statuses(Roots, Exclude) ->
    statuses(Roots, Exclude, []).

statuses([], _Exclude, Acc) ->
    Acc;
statuses([Pid | Pids], Exclude, Acc) ->
    case lists:member(Pid, Exclude) orelse lists:keymember(Pid, 1, Acc) orelse not is_pid(Pid) of
        true ->
            statuses(Pids, Exclude, Acc);
        false ->
            Status = try sys:get_status(Pid, 2000) catch _:Why -> {no_status, Why} end,
            Links = case process_info(Pid, links) of
                        {links, L} -> [P || P <- L, is_pid(P)];
                        undefined -> []
                    end,
            statuses(Pids ++ Links, Exclude, [{Pid, Status} | Acc])
    end.

assert_nowhere(Secret, {Logs, Statuses}) ->
    ?assertNotEqual([], Logs),
    Bin = unicode:characters_to_binary(Secret),
    LeakedLogs = [L || L <- Logs, binary:match(L, Bin) =/= nomatch],
    ?assertEqual([], LeakedLogs),
    StatusText = iolist_to_binary(io_lib:format("~p", [Statuses])),
    ?assertEqual(nomatch, binary:match(StatusText, Bin)),
    ?assertEqual(nomatch, binary:match(term_to_binary(Statuses), Bin)).

excluded(#{producer := P, consumer := C}) ->
    [self(), P, C, whereis(logger), whereis(application_controller)]
        ++ [Pid || {links, L} <- [process_info(P, links), process_info(C, links)], Pid <- L].

%% ---- the matrix ----

authentication_failure_shows_no_password_test_() ->
    with_nodes("the replicator's password is refused by both nodes", #{rep => none},
        fun(Env) ->
                process_flag(trap_exit, true),
                Opts = (dcp_test_lib:rep_opts(Env))#{password => ?WRONG},
                Result = capture(fun() ->
                                         R = dcp_test_lib:start_replicator(Opts),
                                         case R of
                                             {ok, {_, Rep} = Keeper} ->
                                                 S = statuses([Rep], excluded(Env)),
                                                 _ = dcp_test_lib:wait_exit(Keeper),
                                                 S;
                                             _ ->
                                                 []
                                         end
                                 end),
                assert_nowhere(?WRONG, Result),
                dcp_test_lib:flush_exits()
        end).

bad_peer_shows_no_password_test_() ->
    {timeout, 30, fun() ->
        process_flag(trap_exit, true),
        %% a "node" that answers anything with bytes that are no frame
        {ok, L} = gen_tcp:listen(0, [binary, {active, false}, {reuseaddr, true}]),
        {ok, Port} = inet:port(L),
        Peer = spawn_link(fun() -> bad_peer(L) end),
        Opts = #{consumer => {{127, 0, 0, 1}, Port}, producer => {{127, 0, 0, 1}, Port},
                 bucket => "default", connection_name => dcp_test_lib:connection_name(),
                 user => "Administrator", password => dcp_test_lib:password(),
                 connect_timeout => 2000},
        Result = capture(fun() ->
                                 case dcp_test_lib:start_replicator(Opts) of
                                     {ok, Keeper} -> _ = dcp_test_lib:wait_exit(Keeper);
                                     _ -> ok
                                 end,
                                 []
                         end),
        assert_nowhere(dcp_test_lib:password(), Result),
        unlink(Peer),
        exit(Peer, kill),
        gen_tcp:close(L),
        dcp_test_lib:flush_exits()
    end}.

bad_peer(L) ->
    case gen_tcp:accept(L) of
        {ok, S} ->
            _ = gen_tcp:recv(S, 0, 2000),
            _ = gen_tcp:send(S, <<16#42, 0:(23 * 8)>>),
            bad_peer(L);
        {error, _} ->
            ok
    end.

lost_sockets_show_no_password_test_() ->
    with_nodes("the consumer, then (a new replicator) the producer close their sockets",
               #{rep => none},
        fun(#{consumer := Consumer, producer := Producer} = Env) ->
                process_flag(trap_exit, true),
                Opts = dcp_test_lib:rep_opts(Env),
                Result = capture(
                           fun() ->
                                   ok = kv_sim:set_fault(Consumer, 1, {close_socket_on, dcp_add_stream}),
                                   ok = kv_sim:set_fault(Producer, 2, {close_socket_on, dcp_stream_req}),
                                   lists:append(
                                     [begin
                                          {ok, {_, Rep} = Keeper} = dcp_test_lib:start_replicator(Opts),
                                          _ = dcp_replicator:setup_replication(Rep, [0]),
                                          S = statuses([Rep], excluded(Env)),
                                          _ = dcp_replicator:setup_replication(Rep, [VB]),
                                          _ = dcp_test_lib:wait_exit(Keeper),
                                          S
                                      end || VB <- [1, 2]])
                           end),
                assert_nowhere(dcp_test_lib:password(), Result),
                dcp_test_lib:flush_exits()
        end).

supervisor_start_error_and_restarts_show_no_password_test_() ->
    with_nodes("dcp_sup: a restart after a lost socket, then a producer that is down",
               #{rep => none},
        fun(#{consumer := Consumer} = Env) ->
                process_flag(trap_exit, true),
                SupOpts = (maps:remove(connection_name, dcp_test_lib:rep_opts(Env)))#{
                            consumer_node => 'n_0@127.0.0.1', producer_node => 'n_1@127.0.0.1',
                            connections => 2},
                Result = capture(
                           fun() ->
                                   {ok, Sup} = dcp_sup:start_link(SupOpts),
                                   ok = dcp_sup:setup_replication(Sup, [0, 1]),
                                   S = statuses([Sup], excluded(Env)),
                                   [{1, Rep1} | _] = lists:reverse(dcp_sup:replicators(Sup)),
                                   Ref = erlang:monitor(process, Rep1),
                                   ok = kv_sim:set_fault(Consumer, 3, {close_socket_on, dcp_add_stream}),
                                   _ = dcp_sup:setup_replication(Sup, [0, 1, 3]),
                                   receive {'DOWN', Ref, process, Rep1, _} -> ok end,
                                   timer:sleep(200),
                                   S2 = statuses([Sup], excluded(Env)),
                                   ok = dcp_sup:stop(Sup),
                                   %% a producer that is down: start errors or failed children
                                   {ok, Closed} = gen_tcp:listen(0, []),
                                   {ok, DownPort} = inet:port(Closed),
                                   ok = gen_tcp:close(Closed),
                                   Down = SupOpts#{producer => {{127, 0, 0, 1}, DownPort},
                                                   connect_timeout => 1000},
                                   case dcp_sup:start_link(Down) of
                                       {ok, Sup2} ->
                                           timer:sleep(1500),
                                           S3 = statuses([Sup2], excluded(Env)),
                                           catch dcp_sup:stop(Sup2),
                                           S ++ S2 ++ S3;
                                       {error, _} ->
                                           S ++ S2
                                   end
                           end),
                assert_nowhere(dcp_test_lib:password(), Result),
                dcp_test_lib:flush_exits()
        end).
