%% @doc Never hangs, whatever the peers do: a regression test per failure of issue 10 (a setup stuck
%% behind a socket nobody reads, a flood of stream ends, a caller's bad vbucket list, a slow
%% handshake), then a bounded chaos run of bad peers under concurrent callers.
-module(dcp_09_chaos_tests).

-include_lib("eunit/include/eunit.hrl").

%% logger handler callback (collects the chaos run's events)
-export([log/2]).

-import(dcp_test_lib, [with_nodes/3, async/1]).

%% what a call may take past its own deadline
-define(ANSWER_MARGIN_MS, 1000).
-define(SLACK_MS, 700).
%% stats and get_partitions: answered at once, whatever a socket does
-define(QUICK_CALL_MS, 1000).

%% ---- measuring ----

timed(Fun) ->
    T0 = erlang:monotonic_time(millisecond),
    Result = Fun(),
    {erlang:monotonic_time(millisecond) - T0, Result}.

%% The replicator and the processes of its connections: the conns (linked to it) and their writers
%% (linked to them).
replication_processes(Rep) ->
    Conns = [P || P <- links(Rep), is_pid(P), is_conn(P)],
    Writers = [W || C <- Conns, W <- links(C), is_pid(W), W =/= Rep, not lists:member(W, Conns)],
    [Rep | Conns] ++ Writers.

links(Pid) ->
    case erlang:process_info(Pid, links) of
        {links, L} -> L;
        undefined -> []
    end.

is_conn(Pid) ->
    case erlang:process_info(Pid, dictionary) of
        {dictionary, D} -> proplists:get_value('$initial_call', D) =:= {dcp_proxy, init, 1};
        undefined -> false
    end.

%% Heap, stack and mailbox of each process plus the off-heap binaries they refer to (each counted
%% once), and the longest mailbox.
footprint(Pids) ->
    Infos = [I || P <- Pids,
                  I <- [erlang:process_info(P, [memory, message_queue_len, binary])],
                  I =/= undefined],
    Bins = maps:from_list([{Id, Size} || I <- Infos, {Id, Size, _} <- proplists:get_value(binary, I)]),
    Memory = lists:sum([proplists:get_value(memory, I) || I <- Infos])
        + lists:sum(maps:values(Bins)),
    Queue = lists:max([0 | [proplists:get_value(message_queue_len, I) || I <- Infos]]),
    {Memory, Queue}.

%% Samples the footprint every 10 ms while `Fun' runs; `{Result, MaxMemory, MaxQueue}'.
sampled(Rep, Fun) ->
    Self = self(),
    Ref = make_ref(),
    Sampler = spawn_link(fun() -> sample(Self, Ref, Rep, {0, 0}) end),
    Result = Fun(),
    Sampler ! {Ref, stop},
    receive {Ref, {Memory, Queue}} -> {Result, Memory, Queue} end.

sample(Test, Ref, Rep, {M0, Q0}) ->
    {M, Q} = case is_process_alive(Rep) of
                 true -> footprint(replication_processes(Rep));
                 false -> {0, 0}
             end,
    Acc = {max(M0, M), max(Q0, Q)},
    receive
        {Ref, stop} -> Test ! {Ref, Acc}
    after 10 ->
            sample(Test, Ref, Rep, Acc)
    end.

%% ---- failure 1: a setup stuck behind a socket nobody reads ----

%% The consumer node stops reading while the producer streams (4 MB for vbucket 0), with
%% send_timeout infinity: the proxy's writer of the consumer socket blocks for good. Before: a stats
%% call blocked the replicator behind the send and setup_replication never answered. Now: stats
%% answers at once and the setup by its deadline (setup_timeout 1500 ms).
stuck_consumer_socket_does_not_hold_stats_or_the_setup_test_() ->
    with_nodes("consumer stops reading, send_timeout infinity",
        #{producer => #{docs_per_vbucket => 4000, value_size => 1024},
          rep => #{setup_timeout => 1500, send_timeout => infinity}},
        fun(#{rep := Rep, consumer := Consumer}) ->
                ok = dcp_replicator:setup_replication(Rep, [0]),
                ok = kv_sim:set_fault(Consumer, all, stop_reading),
                %% the producer side stops reading its node once the writer is behind
                dcp_test_lib:wait_stats(Rep, fun(#{producer := #{reading := R,
                                                                  unacked_bytes := U}}) ->
                                                     not R andalso U > 0
                                             end),
                {StatsMs, #{producer := #{}}} = timed(fun() -> dcp_replicator:stats(Rep) end),
                {PartsMs, [0]} = timed(fun() -> dcp_replicator:get_partitions(Rep) end),
                {SetupMs, Reply} = timed(fun() -> dcp_replicator:setup_replication(Rep, [0, 1])
                                         end),
                ?assertEqual({errors, [{setup_timeout, {vbucket, 1}}]}, Reply),
                ?assert(StatsMs < ?QUICK_CALL_MS),
                ?assert(PartsMs < ?QUICK_CALL_MS),
                ?assert(SetupMs < 1500 + ?ANSWER_MARGIN_MS),
                {TakeoverMs, TReply} = timed(fun() -> dcp_replicator:takeover(Rep, 2) end),
                ?assertMatch({errors, [{setup_timeout, {vbucket, 2}}]}, TReply),
                ?assert(TakeoverMs < 1500 + ?ANSWER_MARGIN_MS),
                ?debugFmt("stuck consumer socket: stats ~b ms, get_partitions ~b ms, setup ~b ms, "
                          "takeover ~b ms (setup_timeout 1500)",
                          [StatsMs, PartsMs, SetupMs, TakeoverMs]),
                ok = kv_sim:clear_faults(Consumer)
        end).

%% With a finite send_timeout the stuck writer gives up: the caller's connection_lost names the
%% real cause, not a nested call exit.
stuck_consumer_socket_with_send_timeout_names_the_cause_test_() ->
    with_nodes("consumer stops reading, send_timeout 300 ms",
        #{producer => #{docs_per_vbucket => 4000, value_size => 1024},
          rep => #{setup_timeout => 10000, send_timeout => 300}},
        fun(#{rep := Rep, consumer := Consumer, keeper := Keeper}) ->
                ok = kv_sim:set_fault(Consumer, all, stop_reading),
                Reply = dcp_replicator:setup_replication(Rep, [0]),
                Lost = {connection_lost, {send_failed, consumer, timeout}},
                ?assertEqual({errors, [{Lost, {vbucket, 0}}]}, Reply),
                ?assertEqual({send_failed, consumer, timeout}, dcp_test_lib:wait_exit(Keeper))
        end).

%% The other direction: the producer node stops reading while the consumer side sends (its
%% answers, acknowledgements and our CLOSE_STREAMs): the consumer conn, which holds the machine,
%% still fires its deadline.
stuck_producer_socket_does_not_hold_the_deadline_test_() ->
    with_nodes("producer stops reading, send_timeout infinity",
        #{rep => #{setup_timeout => 800, send_timeout => infinity}},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                ok = dcp_replicator:setup_replication(Rep, [3]),
                ok = kv_sim:set_fault(Producer, all, stop_reading),
                ok = kv_sim:set_fault(Consumer, 4, {drop_answer, dcp_add_stream}),
                {Ms, Reply} = timed(fun() -> dcp_replicator:setup_replication(Rep, [4]) end),
                %% the close of 3 goes to the producer, which does not read it: both time out
                ?assertMatch({errors, _}, Reply),
                ?assert(Ms < 800 + ?ANSWER_MARGIN_MS),
                ok = kv_sim:clear_faults(Producer)
        end).

%% ---- failure 2: a flood of stream ends ----

%% 300000 stream ends (8.4 MB) for a vbucket nobody replicates, right behind the acceptance of
%% vbucket 5's stream. Before: 12.9 M messages in the consumer conn's mailbox, 2.2 GB. Now: at most
%% two reads' worth of events wait, and the replication's processes stay under the README's bound.
stream_end_flood_is_bounded_test_() ->
    with_nodes("the producer floods stream ends",
        #{rep => #{setup_timeout => 20000, recbuf => 256 * 1024}},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                ok = kv_sim:set_fault(Producer, 5, {flood_stream_ends, 300000, 1000}),
                {Reply, Memory, Queue} =
                    sampled(Rep, fun() ->
                                         R = dcp_replicator:setup_replication(Rep, [5, 6]),
                                         dcp_test_lib:wait_stats(
                                           Rep, fun(S) ->
                                                        dcp_test_lib:frames(producer,
                                                                            dcp_stream_end, S)
                                                            >= 300000
                                                end),
                                         R
                                 end),
                ?assertEqual(ok, Reply),
                Bound = dcp_proxy:memory_bound(#{recbuf => 256 * 1024}),
                ?debugFmt("stream end flood: max footprint ~b bytes (bound ~b), longest mailbox ~b",
                          [Memory, Bound, Queue]),
                ?assert(Memory < Bound),
                %% two batches of one 256 KiB read of 28-byte frames
                ?assert(Queue =< 2 * (256 * 1024 div 28) + 100),
                dcp_test_lib:assert_replicated(Producer, Consumer, [5, 6])
        end).

%% ---- failure 4: a NIF call per huge reported frame ----

%% A 30 MiB DCP_STREAM_END fed in 256 KiB chunks. Before: each feed call held a scheduler 3.8-4.4 ms
%% gathering it. Now: refused from its header, one call well under a millisecond.
huge_reported_frame_is_refused_at_once_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    Len = 30 * 1024 * 1024,
    Header = <<16#80, 16#55, 0:16, 4, 0, 3:16, (Len - 24):32, 0:32, 0:64>>,
    Chunk = <<Header/binary, (binary:copy(<<0>>, 256 * 1024 - 24))/binary>>,
    {Us, Result} = timer:tc(fun() -> mcbp:feed(S, Chunk) end),
    ?assertEqual({error, {reported_frame_too_large, 16#55, Len, 64 * 1024}}, Result),
    ?debugFmt("30 MiB stream end: refused in ~b us", [Us]),
    ?assert(Us < 1000).

%% ---- failure 3: a caller's bad vbucket list ----

bad_vbuckets_are_refused_at_the_api_test_() ->
    with_nodes("improper, out-of-range and non-integer vbuckets", #{},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                ?assertEqual({error, {bad_vbucket, [1, 2 | 3]}},
                             dcp_replicator:setup_replication(Rep, [1, 2 | 3])),
                ?assertEqual({error, {bad_vbucket, 1024}},
                             dcp_replicator:setup_replication(Rep, [1, 1024])),
                ?assertEqual({error, {bad_vbucket, -1}},
                             dcp_replicator:setup_replication(Rep, [-1])),
                ?assertEqual({error, {bad_vbucket, a}},
                             dcp_replicator:setup_replication(Rep, [a])),
                ?assertEqual({error, {bad_vbucket, 1.0}},
                             dcp_replicator:setup_replication(Rep, [1.0])),
                ?assertEqual({error, {bad_vbucket, 7}},
                             dcp_replicator:setup_replication(Rep, 7)),
                ?assertEqual({error, {bad_vbucket, x}}, dcp_replicator:takeover(Rep, x)),
                ?assertEqual({error, {bad_vbucket, 4096}}, dcp_replicator:takeover(Rep, 4096)),
                %% a million duplicates are one vbucket
                ?assertEqual(ok, dcp_replicator:setup_replication(
                                   Rep, lists:duplicate(1000000, 1))),
                %% the replication is unharmed
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [1, 2])),
                dcp_test_lib:assert_replicated(Producer, Consumer, [1, 2])
        end).

bad_vbuckets_are_refused_by_dcp_sup_test_() ->
    with_nodes("dcp_sup with an improper list", #{rep => none},
        fun(Env) ->
                process_flag(trap_exit, true),
                Opts = maps:without([connection_name], dcp_test_lib:rep_opts(Env)),
                {ok, Sup} = dcp_sup:start_link(Opts#{consumer_node => 'c@h', producer_node => 'p@h',
                                                     connections => 2}),
                ?assertEqual({error, {bad_vbucket, [1 | 2]}},
                             dcp_sup:setup_replication(Sup, [1 | 2])),
                ?assertEqual({error, {bad_vbucket, 2000}},
                             dcp_sup:setup_replication(Sup, [2000])),
                ?assertEqual(ok, dcp_sup:setup_replication(Sup, [0, 1])),
                exit(Sup, shutdown),
                receive {'EXIT', Sup, _} -> ok end
        end).

%% ---- failure 5: a slow handshake; async start ----

%% A node that answers each handshake step 600 ms late (each inside a 1000 ms receive timeout).
%% Before: start_link waited 4 x 600 ms and more (22 s for connect_timeout 3 s). Now: one deadline
%% for connect and handshake, and start_link returns at once.
slow_handshake_is_bounded_by_connect_timeout_test() ->
    process_flag(trap_exit, true),
    {Port, L} = scripted_node(fun(S) -> answer_steps(S, 600, fun ok_answer/1) end),
    try
        {StartMs, {ok, C}} = timed(fun() -> dcp_consumer_conn:start_link(
                                              conn_opts(Port, 1000), 5000) end),
        ?assert(StartMs < 500),
        {FailMs, Reason} = timed(fun() -> dcp_test_lib:conn_failure({ok, C}) end),
        ?assertMatch({consumer, {_, connect_timeout}}, Reason),
        ?assert(FailMs < 1000 + 300),
        ?debugFmt("slow handshake: start_link ~b ms, failed after ~b ms with ~0p",
                  [StartMs, FailMs, Reason])
    after
        gen_tcp:close(L),
        dcp_test_lib:flush_exits()
    end.

%% A NOOP success is not the answer to SASL_AUTH.
handshake_answer_of_another_opcode_is_refused_test() ->
    refused_handshake_answer(fun(#{opaque := Opaque}) ->
                                     dcp_commands:response(16#0a, 0, Opaque, #{})
                             end,
                             {consumer, {sasl_auth, {unexpected_answer, noop, 1}}}).

%% An answer with the right opcode and another opaque is refused too.
handshake_answer_with_another_opaque_is_refused_test() ->
    refused_handshake_answer(fun(#{opcode := Op}) -> dcp_commands:response(Op, 0, 77, #{}) end,
                             {consumer, {sasl_auth, {unexpected_answer, sasl_auth, 77}}}).

%% A node answering the first handshake step with `Answer(Request)': the consumer conn fails with
%% `Expected'.
refused_handshake_answer(Answer, Expected) ->
    process_flag(trap_exit, true),
    {Port, L} = scripted_node(fun(S) -> answer_steps(S, 0, Answer) end),
    try
        ?assertEqual(Expected, dcp_test_lib:conn_failure(
                                 dcp_consumer_conn:start_link(conn_opts(Port, 2000), 5000)))
    after
        gen_tcp:close(L),
        dcp_test_lib:flush_exits()
    end.

%% A node that accepts and never answers: the replicator starts at once, a setup asked for while it
%% connects waits, and is answered connection_lost with the cause when the connect fails.
setup_while_connecting_is_answered_when_the_connect_fails_test() ->
    process_flag(trap_exit, true),
    {Port, L} = scripted_node(fun(_S) -> timer:sleep(infinity) end),
    try
        Opts = #{consumer => {{127, 0, 0, 1}, Port}, producer => {{127, 0, 0, 1}, Port},
                 bucket => "default", connection_name => dcp_test_lib:connection_name(),
                 user => "u", password => "p", connect_timeout => 500, setup_timeout => 5000},
        {StartMs, {ok, Rep}} = timed(fun() -> dcp_replicator:start_link(Opts) end),
        ?assert(StartMs < 500),
        ?assertMatch(#{setup := #{state := connecting}}, dcp_replicator:stats(Rep)),
        {SetupMs, Reply} = timed(fun() -> dcp_replicator:setup_replication(Rep, [1, 2]) end),
        ?assertMatch({errors, [{{connection_lost, {_, {sasl_auth, connect_timeout}}},
                                {vbucket, 1}},
                               {{connection_lost, {_, {sasl_auth, connect_timeout}}},
                                {vbucket, 2}}]}, Reply),
        ?assert(SetupMs < 500 + ?SLACK_MS),
        receive {'EXIT', Rep, Why} ->
                ?assertMatch({shutdown, {_, {sasl_auth, connect_timeout}}}, Why)
        end
    after
        gen_tcp:close(L),
        dcp_test_lib:flush_exits()
    end.

%% A setup asked for while connecting to nodes that do answer waits for the pair and succeeds.
setup_while_connecting_waits_for_the_pair_test_() ->
    with_nodes("setup asked for right after start_link", #{rep => none},
        fun(#{producer := Producer, consumer := Consumer} = Env) ->
                {ok, Keeper} = dcp_test_lib:start_replicator(dcp_test_lib:rep_opts(Env)),
                {_, Rep} = Keeper,
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [0, 1])),
                dcp_test_lib:assert_replicated(Producer, Consumer, [0, 1]),
                shutdown = dcp_test_lib:stop_replicator(Keeper)
        end).

conn_opts(Port, ConnectTimeout) ->
    #{host => {127, 0, 0, 1}, port => Port, bucket => "default",
      connection_name => dcp_test_lib:connection_name(), user => "Administrator",
      password => fun() -> dcp_test_lib:password() end, connect_timeout => ConnectTimeout}.

%% A listener whose every connection runs `Script(Socket)'.
scripted_node(Script) ->
    {ok, L} = gen_tcp:listen(0, [binary, {active, false}, {ip, loopback}]),
    {ok, Port} = inet:port(L),
    _ = spawn_link(fun() -> accept_loop(L, Script) end),
    {Port, L}.

accept_loop(L, Script) ->
    case gen_tcp:accept(L) of
        {ok, S} ->
            Pid = spawn(fun() -> receive go -> Script(S) end end),
            ok = gen_tcp:controlling_process(S, Pid),
            Pid ! go,
            accept_loop(L, Script);
        {error, _} ->
            ok
    end.

%% Answers each request `Answer(Frame)' after `DelayMs' (header and body sent apart, each late).
answer_steps(S, DelayMs, Answer) ->
    case recv_request(S) of
        {ok, Frame} ->
            Bin = iolist_to_binary(Answer(Frame)),
            {Header, Body} = split_binary(Bin, 24),
            timer:sleep(DelayMs div 2),
            _ = gen_tcp:send(S, Header),
            timer:sleep(DelayMs - DelayMs div 2),
            _ = gen_tcp:send(S, Body),
            answer_steps(S, DelayMs, Answer);
        error ->
            ok
    end.

ok_answer(#{opcode := Opcode, opaque := Opaque, value := Value}) ->
    Fields = case mcbp:opcode_name(Opcode) of
                 hello -> #{value => Value};
                 _ -> #{}
             end,
    %% a non-empty body, so that header and body go apart
    dcp_commands:response(Opcode, 0, Opaque, maps:merge(#{key => <<"k">>}, Fields)).

recv_request(S) ->
    case gen_tcp:recv(S, 24) of
        {ok, <<_:8/binary, BodyLen:32, _/binary>> = Header} ->
            Body = case BodyLen of
                       0 -> {ok, <<>>};
                       _ -> gen_tcp:recv(S, BodyLen)
                   end,
            case Body of
                {ok, B} ->
                    {ok, Frame, <<>>} = mcbp:decode(<<Header/binary, B/binary>>),
                    {ok, Frame};
                _ ->
                    error
            end;
        _ ->
            error
    end.

%% ---- chaos ----

log(Event, #{config := #{collector := Pid}}) ->
    Pid ! {logged, Event}.

%% Rounds of fresh nodes and a replicator, about 30 s in all: in each, random faults on the "chaos"
%% vbuckets (8..15) and sometimes on whole nodes (stop reading, close on a request), and concurrent
%% callers: setups, takeovers, stats, get_partitions, sometimes a stop of the replicator. Each call
%% must be answered within its bound, the replication's footprint must stay under the bound, and no
%% process may be left. The clean vbuckets (0..7) are set up last with the node faults cleared:
%% when that succeeds their digests must be equal.
chaos_test_() ->
    {timeout, 120, fun chaos/0}.

chaos() ->
    ok = logger:add_handler(dcp_09_chaos_capture, ?MODULE,
                            #{level => all, config => #{collector => self()}}),
    OldLevel = maps:get(level, logger:get_primary_config()),
    ok = logger:set_primary_config(level, all),
    Before = erlang:processes(),
    rand:seed(exsss, {10, 20, 30}),
    End = erlang:monotonic_time(millisecond) + 30000,
    try
        Stats = chaos_rounds(End, #{rounds => 0, calls => 0, replicated => 0}),
        ?debugFmt("chaos: ~0p", [Stats]),
        ?assert(maps:get(rounds, Stats) >= 5)
    after
        ok = logger:set_primary_config(level, OldLevel),
        ok = logger:remove_handler(dcp_09_chaos_capture)
    end,
    %% no process left behind (the nodes and replicators of every round are gone)
    timer:sleep(300),
    Left = [P || P <- erlang:processes() -- Before, is_process_alive(P), is_ours(P)],
    ?assertEqual([], Left),
    Logged = collect_logs([]),
    ?assert(length(Logged) > 0),
    Password = dcp_test_lib:password(),
    ?assertEqual([], [L || E <- Logged, L <- [lists:flatten(io_lib:format("~0p", [E]))],
                           string:find(L, Password) =/= nomatch]).

%% A process of the replication or of kv_sim.
is_ours(P) ->
    case erlang:process_info(P, [dictionary, current_function]) of
        [{dictionary, D}, {current_function, {M, _, _}}] ->
            {Mod, _, _} = proplists:get_value('$initial_call', D, {M, x, 0}),
            lists:member(Mod, [dcp_proxy, dcp_replicator, kv_sim, kv_sim_conn,
                               dcp_proxy_writer])
                orelse lists:member(M, [dcp_proxy_writer]);
        _ ->
            false
    end.

collect_logs(Acc) ->
    receive {logged, Event} -> collect_logs([Event | Acc]) after 100 -> lists:reverse(Acc) end.

chaos_rounds(End, Stats) ->
    case erlang:monotonic_time(millisecond) < End of
        true -> chaos_rounds(End, chaos_round(Stats));
        false -> Stats
    end.

pick(List) ->
    lists:nth(rand:uniform(length(List)), List).

chaos_round(#{rounds := Rounds, calls := Calls, replicated := Replicated} = Stats) ->
    SetupTimeout = pick([300, 600]),
    SendTimeout = pick([infinity, 400]),
    Env = dcp_test_lib:start_env(
            #{producer => #{docs_per_vbucket => pick([20, 500]), value_size => 256},
              rep => #{setup_timeout => SetupTimeout, send_timeout => SendTimeout,
                       shut_timeout => 500}}),
    #{rep := Rep, producer := Producer, consumer := Consumer, keeper := Keeper} = Env,
    try
        ChaosVBs = lists:seq(8, 15),
        [ok = kv_sim:set_fault(pick([Producer, Consumer]), VB, chaos_fault(VB))
         || VB <- ChaosVBs, rand:uniform(3) =:= 1],
        NodeFault = pick([none, none, stop_reading_consumer, stop_reading_producer, close]),
        ok = node_fault(NodeFault, Producer, Consumer),
        Bound = SetupTimeout + ?ANSWER_MARGIN_MS + ?SLACK_MS,
        Stop = rand:uniform(4) =:= 1,
        {Results, Memory, _Queue} =
            sampled(Rep, fun() ->
                                 Waits = [async(chaos_call(Rep, Bound)) || _ <- lists:seq(1, 8)]
                                     ++ [async(fun() -> timer:sleep(rand:uniform(300)),
                                                        dcp_test_lib:stop_replicator(Keeper),
                                                        {stop, 0, ok}
                                               end) || Stop],
                                 [W() || W <- Waits]
                         end),
        %% every call answered within its bound (the late ones named, with the round's faults)
        ?assertEqual({NodeFault, []},
                     {NodeFault, [R || {_What, Ms, Limit} = R <- Results, Ms > Limit]}),
        ?assert(Memory < dcp_proxy:memory_bound(#{})),
        Ok = case Stop orelse NodeFault =/= none of
                 true ->
                     0;
                 false ->
                     ok = kv_sim:clear_faults(Consumer),
                     case dcp_replicator:setup_replication(Rep, lists:seq(0, 7)) of
                         ok ->
                             dcp_test_lib:assert_replicated(Producer, Consumer, lists:seq(0, 7)),
                             1;
                         _ ->
                             0
                     end
             end,
        Stats#{rounds := Rounds + 1, calls := Calls + length(Results),
               replicated := Replicated + Ok}
    after
        dcp_test_lib:stop_env(Env)
    end.

chaos_fault(_VB) ->
    pick([{drop_answer, dcp_add_stream}, {delay_answer, dcp_add_stream, 200},
          {delay_answer, dcp_add_stream, 2000}, {stream_end_on_accept, state_changed},
          {flood_stream_ends, 50000, 1000}, {drop_answer, dcp_close_stream},
          {drop_answer, dcp_stream_req}, {close_socket_after_mutations, 5}]).

node_fault(none, _P, _C) -> ok;
node_fault(stop_reading_consumer, _P, C) -> kv_sim:set_fault(C, all, stop_reading);
node_fault(stop_reading_producer, P, _C) -> kv_sim:set_fault(P, all, stop_reading);
node_fault(close, P, C) -> kv_sim:set_fault(pick([P, C]), all, {close_socket_on, dcp_add_stream}).

%% One caller: a random request, timed against its bound.
chaos_call(Rep, Bound) ->
    fun() ->
            timer:sleep(rand:uniform(200)),
            case rand:uniform(5) of
                1 ->
                    {Ms, _} = timed(fun() -> catch dcp_replicator:stats(Rep) end),
                    {stats, Ms, ?QUICK_CALL_MS};
                2 ->
                    {Ms, _} = timed(fun() -> catch dcp_replicator:get_partitions(Rep) end),
                    {get_partitions, Ms, ?QUICK_CALL_MS};
                3 ->
                    {Ms, R} = timed(fun() -> dcp_replicator:takeover(Rep, 8 + rand:uniform(8) - 1)
                                    end),
                    true = is_reply(R),
                    {takeover, Ms, Bound};
                _ ->
                    VBs = [VB || VB <- lists:seq(0, 15), rand:uniform(2) =:= 1],
                    {Ms, R} = timed(fun() -> dcp_replicator:setup_replication(Rep, VBs) end),
                    true = is_reply(R),
                    {setup, Ms, Bound}
            end
    end.

is_reply(ok) -> true;
is_reply({errors, [_ | _]}) -> true;
is_reply({error, _}) -> true;
is_reply(_) -> false.
