%% @doc No password in any log event (SASL crash reports and supervisor reports included) or in
%% `sys:get_status/1' of any replication process, through the fault matrix: authentication failed,
%% a bad peer, lost sockets, a supervisor's start error and restarts. And no TLS client private
%% key (nor its key file's password) anywhere either, through TLS success, an untrusted server, a
%% server closing in the handshake, a handshake timeout and bad TLS options.
-module(dcp_11_secrets_tests).

-include_lib("eunit/include/eunit.hrl").
-include_lib("public_key/include/public_key.hrl").

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
    %% and as the external term format, for secrets as raw bytes
    Pid ! {log, iolist_to_binary([unicode:characters_to_binary(Text),
                                  io_lib:format("~n~p~n", [Event]), term_to_binary(Event)])}.

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
            Status = status(Pid),
            Links = case process_info(Pid, links) of
                        {links, L} -> [P || P <- L, is_pid(P)];
                        undefined -> []
                    end,
            statuses(Pids ++ Links, Exclude, [{Pid, Status} | Acc])
    end.

%% sys:get_status of a proc_lib process; of a plain one (a connector, a writer), what
%% process_info shows (it answers no system message)
status(Pid) ->
    case process_info(Pid, dictionary) of
        {dictionary, Dict} ->
            case lists:keymember('$initial_call', 1, Dict) of
                true -> try sys:get_status(Pid, 2000) catch _:Why -> {no_status, Why} end;
                false -> {plain_process, process_info(Pid, [dictionary, current_stacktrace,
                                                            messages])}
            end;
        undefined ->
            gone
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

%% ---- TLS: the client's private key ----

-define(KEY_PASSWORD, "Tls-Key-Pass-Word-51d0").

%% The test CA's configs, the client key as a key file encrypted with ?KEY_PASSWORD, and the key in
%% every form a log or a status could show it (whitespace removed, as the search is):
%% raw DER bytes, those bytes as ~p/~w prints them, the base64 of its PEM, the encrypted PEM's
%% base64, the private exponent's digits, the key file's password.
tls_material() ->
    {Server, Client} = dcp_test_lib:tls_configs(),
    {key, {'RSAPrivateKey', Der}} = lists:keyfind(key, 1, Client),
    Key = public_key:der_decode('RSAPrivateKey', Der),
    Encrypted = public_key:pem_encode(
                  [public_key:pem_entry_encode('RSAPrivateKey', Key,
                                               {{"AES-128-CBC", crypto:strong_rand_bytes(16)},
                                                ?KEY_PASSWORD})]),
    File = filename:join(filename:basedir(user_cache, "dcp_proxy_tests"),
                         "client_key_" ++ integer_to_list(erlang:unique_integer([positive]))
                         ++ ".pem"),
    ok = filelib:ensure_dir(File),
    ok = file:write_file(File, Encrypted),
    Body = << <<Line/binary>> || Line <- binary:split(Encrypted, <<"\n">>, [global]),
                                 Line =/= <<>>, binary:match(Line, [<<"-">>, <<":">>]) =:= nomatch >>,
    Decimal = io_lib:format("~w", [binary:bin_to_list(Der, 100, 24)]),
    Secrets = [{der_bytes, binary:part(Der, 100, 48)},
               {der_decimals, strip(string:trim(Decimal, both, "[]"))},
               {pem_base64, binary:part(base64:encode(Der), 100, 40)},
               {encrypted_pem_base64, binary:part(Body, 100, 40)},
               {private_exponent, list_to_binary(lists:sublist(
                                     integer_to_list(Key#'RSAPrivateKey'.privateExponent), 40))},
               {key_password, <<?KEY_PASSWORD>>}],
    #{server => Server, client => Client, key_file => File, secrets => Secrets}.

strip(Text) ->
    << <<C>> || <<C>> <= iolist_to_binary(Text), not lists:member(C, " \t\r\n") >>.

%% No secret in any captured log event, status, start return or exit reason.
assert_no_key(Secrets, {Logs, Terms}) ->
    ?assertNotEqual([], Logs),
    TermText = [iolist_to_binary(io_lib:format("~p", [Terms])), term_to_binary(Terms)],
    Leaks = [{Name, binary:part(Where, 0, min(300, byte_size(Where)))}
             || Where <- [strip(L) || L <- Logs ++ TermText] ++ Logs ++ TermText,
                {Name, Secret} <- Secrets, binary:match(Where, Secret) =/= nomatch],
    ?assertEqual([], Leaks).

%% A replicator to `Env''s nodes, the producer over TLS with `Tls' (and `Extra'); what it did:
%% start_link's return, the exit reason, the statuses while it lived.
tls_replication(Env, Producer, Tls, Extra) ->
    Base = dcp_test_lib:rep_opts(Env),
    {CHost, CPort} = maps:get(consumer, Base),
    Opts = maps:merge(Base#{producer => Producer#{ssl => Tls},
                            consumer => #{host => CHost, port => CPort, local => true},
                            connect_timeout => 2000}, Extra),
    case dcp_test_lib:start_replicator(Opts) of
        {ok, {_, Rep} = Keeper} = Started ->
            %% connected (a status of the working pair) or failed, whichever comes first
            dcp_test_lib:wait_until(
              fun() ->
                      try maps:get(state, maps:get(setup, dcp_replicator:stats(Rep))) of
                          State -> State =/= connecting
                      catch
                          exit:_ -> true
                      end
              end),
            case is_process_alive(Rep) of
                true ->
                    Setup = dcp_replicator:setup_replication(Rep, [0]),
                    S = statuses([Rep], excluded(Env)),
                    [Started, {S, Setup, dcp_test_lib:stop_replicator(Keeper)}];
                false ->
                    [Started, [], dcp_test_lib:wait_exit(Keeper)]
            end;
        Other ->
            [Other]
    end.

%% The same through dcp_sup (its child specs, its reports): two connections, both TLS producers.
tls_sup(Env, Producer, Tls) ->
    Base = maps:remove(connection_name, dcp_test_lib:rep_opts(Env)),
    {CHost, CPort} = maps:get(consumer, Base),
    Opts = Base#{producer => Producer#{ssl => Tls},
                 consumer => #{host => CHost, port => CPort, local => true},
                 consumer_node => 'n_0@127.0.0.1', producer_node => 'n_1@127.0.0.1',
                 connections => 2},
    {ok, Sup} = dcp_sup:start_link(Opts),
    Setup = dcp_sup:setup_replication(Sup, [0, 1]),
    S = statuses([Sup], excluded(Env)),
    ok = dcp_sup:stop(Sup),
    %% and a bad TLS option value, refused before anything connects
    Refused = dcp_sup:start_link(Opts#{ssl => {not_a_list, Tls}}),
    [Setup, S, Refused].

%% The same through a replication manager given the TLS options (its start arguments, its state,
%% the supervisors it starts): the local consumer plain, the producer node on its TLS port.
tls_manager(Env, Node, Tls) ->
    #{consumer := {CHost, CPort}, user := User, password := Password} = dcp_test_lib:rep_opts(Env),
    Infos = #{'c@h' => #{host => CHost, port => CPort, local => true},
              'p@h' => #{host => maps:get(host, Node), port => 1, tls_port => maps:get(port, Node)}},
    {ok, Mgr} = dcp_replication_manager:start_link(
                  "default", #{resolve => fun(N) -> maps:get(N, Infos) end,
                               credentials => fun() -> {User, Password} end,
                               consumer_node => 'c@h', name => undefined, ssl => Tls}),
    Setup = dcp_replication_manager:set_desired_replications(Mgr, [{'p@h', [0, 1]}]),
    S = statuses([Mgr], excluded(Env)),
    ok = dcp_replication_manager:stop(Mgr),
    [Setup, S].

%% A "server" at a port of its own: `close' closes each connection once the ClientHello is in,
%% `silent' never answers.
start_peer(Mode) ->
    {ok, L} = gen_tcp:listen(0, [binary, {active, false}, {reuseaddr, true}]),
    {ok, Port} = inet:port(L),
    Peer = spawn_link(fun() -> peer(L, Mode, []) end),
    {Peer, L, #{host => {127, 0, 0, 1}, port => Port}}.

peer(L, Mode, Held) ->
    case gen_tcp:accept(L) of
        {ok, S} when Mode =:= close ->
            _ = gen_tcp:recv(S, 0, 2000),
            ok = gen_tcp:close(S),
            peer(L, Mode, Held);
        {ok, S} ->
            peer(L, Mode, [S | Held]);
        {error, _} ->
            ok
    end.

stop_peer({Peer, L, _}) ->
    unlink(Peer),
    exit(Peer, kill),
    gen_tcp:close(L).

tls_cases_show_no_private_key_test_() ->
    #{server := Server, client := Client, key_file := File, secrets := Secrets} = tls_material(),
    %% the client trusting the wrong CA: a root that signed nothing here
    #{cert := OtherRoot} = public_key:pkix_test_root_cert("other root",
                                                          [{key, {rsa, 2048, 65537}}]),
    WrongCa = lists:keyreplace(cacerts, 1, Client, {cacerts, [OtherRoot]}),
    WithKeyFile = [{keyfile, File}, {password, ?KEY_PASSWORD} | lists:keydelete(key, 1, Client)],
    {key, {_, Der}} = lists:keyfind(key, 1, Client),
    BadOption = lists:keyreplace(key, 1, Client, {key, {not_a_key_type, Der}}),
    WrongPassword = lists:keyreplace(password, 1, WithKeyFile, {password, "not-it"}),
    {"the TLS producer with a client key (DER, then an encrypted key file): connected, an untrusted "
     "server, a server closing in the handshake, a handshake timeout, bad options",
     {setup,
      fun() -> dcp_test_lib:start_env(#{producer => #{ssl => Server}, rep => none}) end,
      fun(Env) -> dcp_test_lib:stop_env(Env), file:delete(File) end,
      fun(#{producer := P} = Env) ->
              {timeout, 120,
               ?_test(
                  begin
                      process_flag(trap_exit, true),
                      Node = #{host => {127, 0, 0, 1}, port => kv_sim:port(P)},
                      Closing = start_peer(close),
                      Silent = start_peer(silent),
                      Runs = [{connected, Node, Client, #{}},
                              {connected_with_key_file, Node, WithKeyFile, #{}},
                              {server_not_trusted, Node, WrongCa, #{}},
                              {closed_in_handshake, element(3, Closing), Client, #{}},
                              {handshake_timeout, element(3, Silent), Client,
                               #{connect_timeout => 500}},
                              {bad_key_option, Node, BadOption, #{}},
                              {wrong_key_password, Node, WrongPassword, #{}}],
                      Result = capture(
                                 fun() ->
                                         [{Name, tls_replication(Env, To, Tls, Extra)}
                                          || {Name, To, Tls, Extra} <- Runs]
                                             ++ [{sup, tls_sup(Env, Node, Client)},
                                                 {manager, tls_manager(Env, Node, Client)}]
                                 end),
                      stop_peer(Closing),
                      stop_peer(Silent),
                      {_Logs, Done} = Result,
                      %% each case went the way it names (the failures as named errors)
                      [?assertMatch([{ok, _}, {[_ | _], ok, shutdown}],
                                    proplists:get_value(Connected, Done))
                       || Connected <- [connected, connected_with_key_file]],
                      ?assertMatch([ok, [_ | _], {error, {bad_option, ssl, _}}],
                                   proplists:get_value(sup, Done)),
                      ?assertMatch([ok, [_ | _]], proplists:get_value(manager, Done)),
                      [?assertMatch([{ok, _}, [], {producer, {connect_failed, _}}],
                                    proplists:get_value(Failed, Done))
                       || Failed <- [server_not_trusted, closed_in_handshake, handshake_timeout,
                                     bad_key_option, wrong_key_password]],
                      assert_no_key(Secrets, Result),
                      dcp_test_lib:flush_exits()
                  end)}
      end}}.
