%% @doc `make bench', end to end at the limit: `load_driver' (a native program, native/load_driver)
%% plays both memcached nodes on loopback at full speed and checks every byte it receives, and this
%% VM runs what sits between them: a raw relay (receive a chunk, send it: the limit for a BEAM
%% proxy), the proxy with the NIF splitter, or the proxy with the pure-Erlang baseline. Every
%% combination of frame size and socket buffer size runs once per round, rounds interleaved, and
%% the CPU per GB is this VM's own (the driver is another OS process), so the ratios compare like
%% with like. It measures; it asserts nothing about time.
-module(dcp_bench_e2e).

-export([run/1, vm_cpu_ns/0]).

-export_type([opts/0]).

-define(KIB, 1024).
-define(MIB, (1024 * 1024)).
-define(MB, 1000000).
-define(GB, 1.0e9).
-define(LINE_TIMEOUT, 120000).
-define(DRIVER, "target/release/load_driver").
%% The relay_n mode's {active, N}.
-define(ACTIVE_N, 8).

-type opts() :: #{rounds => pos_integer(),
                  bytes => #{pos_integer() => pos_integer()},
                  buffers => [pos_integer()],
                  vbuckets => pos_integer(),
                  driver => file:filename()}.

%% @doc Runs the rounds and prints the tables; returns the figures for the JSON file. Each run's
%% `cpu_ms_per_gb' is this VM's user+sys CPU over the stream (from the first byte the driver sends
%% to the last one it receives), per GB through it.
-spec run(opts()) -> map().
run(Opts0) ->
    Defaults = #{rounds => 5, bytes => #{256 => 512 * ?MIB, 4 * ?KIB => 512 * ?MIB},
                 buffers => [256 * ?KIB, ?MIB],
                 vbuckets => 64, driver => ?DRIVER},
    Opts = maps:merge(Defaults, Opts0),
    #{rounds := Rounds, bytes := Bytes, buffers := Buffers, vbuckets := VBuckets,
      driver := Driver} = Opts,
    case filelib:is_regular(Driver) of
        true -> ok;
        false -> error({load_driver_missing, Driver, "cargo build --release -p load_driver"})
    end,
    Frames = lists:sort(maps:keys(Bytes)),
    Modes = [relay, relay_n, nif, baseline],
    io:format("~n== End to end at the limit: load_driver (native, both nodes) -> this VM -> "
              "load_driver, loopback, ~p vbuckets, ~p interleaved rounds ==~n"
              "modes: relay = raw BEAM relay (no parsing, the proxy's socket options, {active, once}),~n"
              "       relay_n = the same with {active, ~p}, nif = dcp_replicator with "
              "splitter => nif,~n       baseline = dcp_replicator with "
              "splitter => {dcp_baseline_splitter, #{}}; buf = recbuf = sndbuf~n"
              "CPU: this VM's user+sys (~s) over the stream, per GB; load average ~s~n",
              [VBuckets, Rounds, ?ACTIVE_N, cpu_source(), dcp_bench:load_average()]),
    Level = maps:get(level, logger:get_primary_config()),
    %% each run stops a replicator: its connections' stop notices are not results
    ok = logger:set_primary_config(level, warning),
    Runs = try
               [begin
                    Run = run_once(Driver, Mode, Frame, Buf, maps:get(Frame, Bytes), VBuckets),
                    Run#{round => Round}
                end
                || Round <- lists:seq(1, Rounds), Frame <- Frames, Buf <- Buffers,
                   Mode <- rotate(Round, Modes)]
           after
               logger:set_primary_config(level, Level)
           end,
    Cases = [summarise(Frame, Buf, Modes, Runs) || Frame <- Frames, Buf <- Buffers],
    print(Cases),
    Choice = buffer_choice(Frames, Buffers, Cases),
    #{vbuckets => VBuckets, rounds => Rounds, cpu_source => list_to_binary(cpu_source()),
      cases => Cases, buffers => Choice}.

%% The mode order moves each round, so no mode always runs right after the same other one.
rotate(Round, Modes) ->
    N = (Round - 1) rem length(Modes),
    {A, B} = lists:split(N, Modes),
    B ++ A.

%% ---- one run ----

run_once(Driver, Mode, Frame, Buf, Bytes, VBuckets) ->
    Args = ["--frame-bytes", integer_to_list(Frame), "--total-bytes", integer_to_list(Bytes),
            "--vbuckets", integer_to_list(VBuckets)],
    Port = open_port({spawn_executable, Driver},
                     [{args, Args}, {line, 4096}, binary, exit_status, use_stdio, hide]),
    try
        [CPort, PPort] = [binary_to_integer(P) || P <- expect(Port, <<"ports">>)],
        Middle = start_middle(Mode, CPort, PPort, Buf, VBuckets),
        try
            _ = expect(Port, <<"ready">>),
            erlang:garbage_collect(),
            Cpu0 = vm_cpu_ns(),
            Stat0 = dcp_bench:os_cpu_ms(),
            true = port_command(Port, <<"go\n">>),
            Done = fields(expect(Port, <<"done">>)),
            Cpu1 = vm_cpu_ns(),
            Stat1 = dcp_bench:os_cpu_ms(),
            #{chunks := Chunks, bytes_in := BytesIn} = middle_stats(Middle),
            #{<<"bytes">> := Streamed, <<"ns">> := Ns, <<"mismatches">> := Mismatches,
              <<"driver_cpu_ns">> := DriverNs} = Done,
            Gb = Streamed / ?GB,
            #{mode => Mode, frame_bytes => Frame, buffer => Buf, bytes => Streamed,
              wall_s => Ns / 1.0e9, mb_per_s => Streamed / ?MB / (Ns / 1.0e9),
              cpu_ms => (Cpu1 - Cpu0) / 1.0e6, cpu_ms_per_gb => (Cpu1 - Cpu0) / 1.0e6 / Gb,
              stat_cpu_ms_per_gb => (Stat1 - Stat0) / Gb,
              driver_cpu_ms_per_gb => DriverNs / 1.0e6 / Gb,
              busy => (Cpu1 - Cpu0) / Ns,
              mismatches => Mismatches, producer_chunks => Chunks,
              mean_chunk_bytes => BytesIn / max(1, Chunks)}
        after
            stop_middle(Middle)
        end
    after
        catch port_close(Port)
    end.

%% The next line of the driver that starts with `Tag': its other words.
expect(Port, Tag) ->
    receive
        {Port, {data, {eol, Line}}} ->
            case binary:split(Line, <<" ">>, [global, trim_all]) of
                [Tag | Words] -> Words;
                [<<"error">> | _] -> error({load_driver, Line});
                _ -> expect(Port, Tag)
            end;
        {Port, {exit_status, Status}} ->
            error({load_driver_exited, Status, waiting_for, Tag})
    after ?LINE_TIMEOUT ->
            error({load_driver_timeout, waiting_for, Tag})
    end.

fields(Words) ->
    maps:from_list([begin
                        [K, V] = binary:split(W, <<"=">>),
                        {K, binary_to_integer(V)}
                    end || W <- Words]).

%% ---- what sits between the nodes ----

start_middle(relay, CPort, PPort, Buf, VBuckets) ->
    relay_start(CPort, PPort, Buf, VBuckets, once);
start_middle(relay_n, CPort, PPort, Buf, VBuckets) ->
    relay_start(CPort, PPort, Buf, VBuckets, ?ACTIVE_N);
start_middle(Mode, CPort, PPort, Buf, VBuckets) ->
    Splitter = case Mode of
                   nif -> nif;
                   baseline -> {dcp_baseline_splitter, #{}}
               end,
    RepOpts = #{consumer => {{127, 0, 0, 1}, CPort}, producer => {{127, 0, 0, 1}, PPort},
                bucket => "default",
                connection_name => "replication:bench-producer->bench-consumer:default",
                user => "Administrator", password => "password", splitter => Splitter,
                recbuf => Buf, sndbuf => Buf, shut_timeout => 5000},
    {ok, Rep} = dcp_replicator:start_link(RepOpts),
    unlink(Rep),
    ok = dcp_replicator:setup_replication(Rep, lists:seq(0, VBuckets - 1)),
    {proxy, Rep}.

middle_stats({proxy, Rep}) ->
    #{producer := #{chunks := Chunks, bytes_in := Bytes}} = dcp_replicator:stats(Rep),
    #{chunks => Chunks, bytes_in => Bytes};
middle_stats({relay, Down, _Up}) ->
    Ref = make_ref(),
    Down ! {stats, self(), Ref},
    receive {Ref, Stats} -> Stats after 5000 -> error(relay_stats_timeout) end.

stop_middle({proxy, Rep}) ->
    Ref = erlang:monitor(process, Rep),
    exit(Rep, shutdown),
    receive {'DOWN', Ref, process, Rep, _} -> ok end;
stop_middle({relay, Down, Up}) ->
    [begin
         Ref = erlang:monitor(process, Pid),
         Pid ! stop,
         receive {'DOWN', Ref, process, Pid, _} -> ok end
     end || Pid <- [Down, Up]],
    ok.

%% The raw relay: what any BEAM proxy must at least do. One process per direction reads a chunk
%% ({active, once}, as dcp_proxy, or {active, N}) and writes it to the other socket, nothing else;
%% the sockets have dcp_proxy's options. It sends the ADD_STREAMs itself (the nodes then stream as they do
%% for the proxy); the consumer's answers simply go to the producer, which drops them.
relay_start(CPort, PPort, Buf, VBuckets, Active) ->
    SockOpts = [binary, {active, false}, {packet, raw}, {nodelay, true}, {keepalive, true},
                {send_timeout, 60000}, {send_timeout_close, true}, {recbuf, Buf}, {sndbuf, Buf}],
    {ok, C} = gen_tcp:connect({127, 0, 0, 1}, CPort, SockOpts, 5000),
    {ok, P} = gen_tcp:connect({127, 0, 0, 1}, PPort, SockOpts, 5000),
    Up = spawn(fun() -> relay_wait(C, P, Active) end),
    Down = spawn(fun() -> relay_wait(P, C, Active) end),
    ok = gen_tcp:controlling_process(C, Up),
    ok = gen_tcp:controlling_process(P, Down),
    Adds = [mcbp:encode(#{magic => req, opcode => dcp_add_stream, vbucket => VB, opaque => VB,
                          extras => <<0:32>>})
            || VB <- lists:seq(0, VBuckets - 1)],
    ok = gen_tcp:send(C, Adds),
    Up ! go,
    Down ! go,
    {relay, Down, Up}.

relay_wait(In, Out, Active) ->
    receive go -> ok end,
    ok = inet:setopts(In, [{active, Active}]),
    relay_loop(In, Out, Active, 0, 0).

relay_loop(In, Out, once, Chunks, Bytes) ->
    receive
        {tcp, In, Data} ->
            ok = gen_tcp:send(Out, Data),
            ok = inet:setopts(In, [{active, once}]),
            relay_loop(In, Out, once, Chunks + 1, Bytes + byte_size(Data));
        Other ->
            relay_other(Other, In, Out, once, Chunks, Bytes)
    end;
relay_loop(In, Out, N, Chunks, Bytes) ->
    receive
        {tcp, In, Data} ->
            ok = gen_tcp:send(Out, Data),
            relay_loop(In, Out, N, Chunks + 1, Bytes + byte_size(Data));
        {tcp_passive, In} ->
            ok = inet:setopts(In, [{active, N}]),
            relay_loop(In, Out, N, Chunks, Bytes);
        Other ->
            relay_other(Other, In, Out, N, Chunks, Bytes)
    end.

relay_other(Msg, In, Out, Active, Chunks, Bytes) ->
    case Msg of
        {stats, From, Ref} ->
            From ! {Ref, #{chunks => Chunks, bytes_in => Bytes}},
            relay_loop(In, Out, Active, Chunks, Bytes);
        {tcp_closed, In} ->
            relay_stopped(In, Out);
        stop ->
            relay_stopped(In, Out);
        _ ->
            relay_loop(In, Out, Active, Chunks, Bytes)
    end.

relay_stopped(In, Out) ->
    _ = gen_tcp:close(In),
    _ = gen_tcp:close(Out),
    ok.

%% ---- CPU of this VM ----

%% @doc This OS process's CPU time in ns, user + system, all threads: the sum of the per-thread
%% run times in /proc/self/task/*/schedstat (ns resolution), or, where the kernel keeps none,
%% utime + stime from /proc/self/stat (10 ms ticks).
-spec vm_cpu_ns() -> non_neg_integer().
vm_cpu_ns() ->
    case schedstat_ns() of
        N when N > 0 -> N;
        _ -> dcp_bench:os_cpu_ms() * 1000000
    end.

schedstat_ns() ->
    case file:list_dir("/proc/self/task") of
        {ok, Tasks} ->
            lists:sum([task_ns(T) || T <- Tasks]);
        {error, _} ->
            0
    end.

task_ns(Task) ->
    case file:read_file(["/proc/self/task/", Task, "/schedstat"]) of
        {ok, Text} ->
            case string:lexemes(Text, " \n") of
                [Ns | _] -> binary_to_integer(Ns);
                [] -> 0
            end;
        {error, _} ->
            0
    end.

cpu_source() ->
    case schedstat_ns() of
        N when N > 0 -> "/proc/self/task/*/schedstat";
        _ -> "/proc/self/stat utime+stime"
    end.

%% ---- the tables ----

summarise(Frame, Buf, Modes, Runs) ->
    Mine = [R || #{frame_bytes := F, buffer := B} = R <- Runs, F =:= Frame, B =:= Buf],
    ByMode = maps:from_list(
               [{Mode, mode_summary([R || #{mode := M} = R <- Mine, M =:= Mode])}
                || Mode <- Modes]),
    Rounds = lists:usort([Round || #{round := Round} <- Mine]),
    PerRound = fun(Key, A, B) ->
                       spread([maps:get(Key, run_of(A, Round, Mine))
                               / maps:get(Key, run_of(B, Round, Mine)) || Round <- Rounds])
               end,
    #{frame_bytes => Frame, buffer => Buf, modes => ByMode,
      ratios => #{nif_to_relay_cpu_per_gb => PerRound(cpu_ms_per_gb, nif, relay),
                  baseline_to_nif_cpu_per_gb => PerRound(cpu_ms_per_gb, baseline, nif),
                  nif_to_relay_mb_per_s => PerRound(mb_per_s, nif, relay),
                  nif_to_baseline_mb_per_s => PerRound(mb_per_s, nif, baseline),
                  relay_n_to_relay_cpu_per_gb => PerRound(cpu_ms_per_gb, relay_n, relay)}}.

run_of(Mode, Round, Runs) ->
    [Run] = [R || #{mode := M, round := N} = R <- Runs, M =:= Mode, N =:= Round],
    Run.

mode_summary(Runs) ->
    Get = fun(Key) -> [maps:get(Key, R) || R <- Runs] end,
    #{cpu_ms_per_gb => spread(Get(cpu_ms_per_gb)), mb_per_s => spread(Get(mb_per_s)),
      stat_cpu_ms_per_gb => spread(Get(stat_cpu_ms_per_gb)),
      driver_cpu_ms_per_gb => spread(Get(driver_cpu_ms_per_gb)),
      busy => spread(Get(busy)), mean_chunk_bytes => spread(Get(mean_chunk_bytes)),
      mismatches => lists:sum(Get(mismatches)), bytes_per_run => hd(Get(bytes)),
      runs => [maps:without([mode, frame_bytes, buffer], R) || R <- Runs]}.

spread(Values) ->
    #{min => lists:min(Values), median => dcp_bench:median(Values), max => lists:max(Values)}.

print(Cases) ->
    io:format("~-6s ~-8s ~-8s | ~-18s | ~-21s | ~6s | ~9s | ~9s | ~s~n",
              ["frame", "buf", "mode", "MB/s min/med/max", "CPU ms/GB min/med/max", "busy",
               "chunk B", "drv ms/GB", "mismatches"]),
    lists:foreach(fun print_case/1, Cases),
    io:format("~nratios per round (min / median / max over the rounds; targets: nif/relay CPU "
              "per GB <= 1.15, baseline/nif CPU per GB >= 2 at 256 B):~n"),
    io:format("~-6s ~-8s | ~-23s | ~-23s | ~-23s | ~-24s~n",
              ["frame", "buf", "nif/relay CPU per GB", "baseline/nif CPU per GB",
               "nif/relay MB/s", "relay_n/relay CPU per GB"]),
    lists:foreach(
      fun(#{frame_bytes := F, buffer := B, ratios := R}) ->
              io:format("~-6s ~-8s | ~-23s | ~-23s | ~-23s | ~-24s~n",
                        [dcp_bench:size_name(F), dcp_bench:size_name(B),
                         triple(maps:get(nif_to_relay_cpu_per_gb, R), "~.2f"),
                         triple(maps:get(baseline_to_nif_cpu_per_gb, R), "~.2f"),
                         triple(maps:get(nif_to_relay_mb_per_s, R), "~.2f"),
                         triple(maps:get(relay_n_to_relay_cpu_per_gb, R), "~.2f")])
      end, Cases).

print_case(#{frame_bytes := F, buffer := B, modes := Modes}) ->
    lists:foreach(
      fun(Mode) ->
              #{mb_per_s := MBs, cpu_ms_per_gb := Cpu, busy := #{median := Busy},
                mean_chunk_bytes := #{median := Chunk}, driver_cpu_ms_per_gb := #{median := Drv},
                mismatches := Mismatches} = maps:get(Mode, Modes),
              io:format("~-6s ~-8s ~-8s | ~-18s | ~-21s | ~5w% | ~9w | ~9w | ~w~n",
                        [dcp_bench:size_name(F), dcp_bench:size_name(B), Mode,
                         triple(MBs, int), triple(Cpu, int), round(100 * Busy),
                         round(Chunk), round(Drv), Mismatches])
      end, [relay, relay_n, nif, baseline]).

triple(#{min := Min, median := Med, max := Max}, int) ->
    lists:flatten(io_lib:format("~w / ~w / ~w", [round(Min), round(Med), round(Max)]));
triple(#{min := Min, median := Med, max := Max}, Fmt) ->
    lists:flatten(io_lib:format(Fmt ++ " / " ++ Fmt ++ " / " ++ Fmt, [Min, Med, Max])).

%% Which buffer size this measurement favours: the proxy's (nif) median CPU per GB at each size.
buffer_choice(Frames, Buffers, Cases) ->
    Cpu = fun(F, B, Mode) ->
                  [#{modes := #{Mode := #{cpu_ms_per_gb := #{median := M}}}}] =
                      [C || #{frame_bytes := F1, buffer := B1} = C <- Cases, F1 =:= F, B1 =:= B],
                  M
          end,
    PerFrame = [#{frame_bytes => F,
                  nif_cpu_ms_per_gb => maps:from_list([{B, Cpu(F, B, nif)} || B <- Buffers]),
                  relay_cpu_ms_per_gb => maps:from_list([{B, Cpu(F, B, relay)} || B <- Buffers]),
                  best => element(2, lists:min([{Cpu(F, B, nif), B} || B <- Buffers]))}
                || F <- Frames],
    io:format("~nsocket buffers (recbuf = sndbuf), proxy with the NIF, median CPU ms per GB: ~s~n",
              [lists:join("; ",
                          [io_lib:format("~s frames: ~s (best ~s)",
                                         [dcp_bench:size_name(F),
                                          lists:join(", ",
                                                     [io_lib:format("~s ~w",
                                                                    [dcp_bench:size_name(B),
                                                                     round(V)])
                                                      || {B, V} <- lists:sort(maps:to_list(N))]),
                                          dcp_bench:size_name(Best)])
                           || #{frame_bytes := F, nif_cpu_ms_per_gb := N, best := Best}
                                  <- PerFrame])]),
    PerFrame.
