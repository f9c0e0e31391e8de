%% @doc `make bench', BEAM level: end to end at the limit (`dcp_bench_e2e': a native load driver
%% for both nodes, a raw relay against the proxy with the NIF and with the baseline), the NIF
%% splitter (`mcbp:feed/2') against the pure-Erlang baseline (`dcp_baseline_splitter', ns_server's
%% loop) at the chunk sizes the proxy really read end to end and at 64 KiB, the scheduler-slice
%% check (huge inputs included; `make bench-slice' runs it alone) and the cost of stream setup at 256
%% and 1024 vbuckets; optionally (`kv_sim') end to end
%% with kv_sim as the nodes. Prints tables and writes the same figures as JSON to
%% `_build/bench/dcp_bench.json'. It measures; it asserts nothing about time.
-module(dcp_bench).

-export([main/0, main/1]).

%% Called on the kv_sim peer VM.
-export([consumer_doc_count/1]).

%% Shared with dcp_bench_e2e.
-export([load_average/0, os_cpu_ms/0, median/1, size_name/1]).

-define(MB, 1000000).
-define(KIB, 1024).
-define(MIB, (1024 * 1024)).
-define(MAX_FRAME_SIZE, (30 * ?MIB)).
-define(JSON_FILE, "_build/bench/dcp_bench.json").

-type opts() :: #{reps => pos_integer(),
                  stream_bytes => pos_integer(),
                  sections => [end_to_end | feed | slice | setup | kv_sim],
                  end_to_end => dcp_bench_e2e:opts(),
                  e2e_bytes => pos_integer(),
                  e2e_reps => pos_integer(),
                  json_file => file:filename()}.

%% @doc Runs the default sections (all but `kv_sim') with the default sizes: about three
%% minutes on 2 quiet cores.
-spec main() -> ok.
main() ->
    main(#{}).

%% @doc As `main/0'; `Opts' shrinks or picks sections, e.g. `#{reps => 3, sections => [feed]}'.
-spec main(opts()) -> ok.
main(Opts0) ->
    Defaults = #{reps => 7, stream_bytes => 64 * ?MIB, e2e_bytes => 384 * ?MIB, e2e_reps => 5,
                 end_to_end => #{}, sections => [end_to_end, feed, slice, setup],
                 json_file => ?JSON_FILE},
    Opts = maps:merge(Defaults, Opts0),
    LoadBefore = load_average(),
    io:format("~ndcp_bench: BEAM-level benchmarks (OTP ~s, ~p schedulers online, "
              "load average ~s)~n",
              [erlang:system_info(otp_release), erlang:system_info(schedulers_online), LoadBefore]),
    Results = lists:foldl(
                fun(Section, Acc) ->
                        T0 = erlang:monotonic_time(),
                        Result = run_section(Section, Opts, Acc),
                        Took = to_s(erlang:monotonic_time() - T0),
                        io:format("[~p: ~.1f s, load average ~s]~n",
                                  [Section, Took, load_average()]),
                        Acc#{Section => Result#{section_s => Took}}
                end, #{}, maps:get(sections, Opts)),
    LoadAfter = load_average(),
    targets(Results),
    File = maps:get(json_file, Opts),
    ok = filelib:ensure_dir(File),
    Info = #{otp_release => list_to_binary(erlang:system_info(otp_release)),
             schedulers_online => erlang:system_info(schedulers_online),
             load_average_before => LoadBefore, load_average_after => LoadAfter},
    ok = file:write_file(File, [json(maps:merge(Results, Info)), "\n"]),
    io:format("~nload average at the end ~s~nJSON: ~s~n", [LoadAfter, File]).

%% @doc The figures are only as good as the machine is quiet: what else was running.
-spec load_average() -> binary().
load_average() ->
    case file:read_file("/proc/loadavg") of
        {ok, Text} ->
            iolist_to_binary(lists:join(" ", lists:sublist(string:lexemes(Text, " \n"), 3)));
        {error, _} -> <<"unknown">>
    end.

%% The targets of DESIGN.md next to what this run measured, for the reader: nothing fails on them.
targets(Results) ->
    io:format("~n== Targets (DESIGN.md) against this run ==~n"),
    Feed = [C || #{frame_bytes := _} = C <- maps:get(cases, maps:get(feed, Results, #{}), [])],
    Ratios = fun(Size, Real) ->
                     [M || #{frame_bytes := S, chunk_label := L,
                             ratio_per_run := #{median := M}} <- Feed,
                           S =:= Size, Real =:= lists:prefix("e2e@", binary_to_list(L))]
             end,
    line(">= 25x at 256 B, e2e chunk (median)", Ratios(256, true), fun(R) -> R >= 25 end),
    line(">= 25x at 256 B, 64 KiB (median)", Ratios(256, false), fun(R) -> R >= 25 end),
    line(">= 5x at 4 KiB (median)", Ratios(4 * ?KIB, true) ++ Ratios(4 * ?KIB, false),
         fun(R) -> R >= 5 end),
    line("never slower at 1 MiB (median)", Ratios(?MIB, false), fun(R) -> R >= 1 end),
    line("no NIF call over ~1 ms (longest, us)",
         [M || #{max_nif_call_us := M} <- [maps:get(slice, Results, #{})]],
         fun(M) -> M =< 1000 end),
    line("huge inputs: no NIF call over ~1 ms (us)",
         [M || #{max_nif_call_us_bounded_inputs := M} <- [maps:get(slice, Results, #{})]],
         fun(M) -> M =< 1000 end),
    line("setup: 1024 vb about 4x 256 vb (<= 5x)",
         [R || #{ratio_1024_to_256 := R} <- [maps:get(setup, Results, #{})]],
         fun(R) -> R =< 5 end),
    Limit = maps:get(cases, maps:get(end_to_end, Results, #{}), []),
    RatioOf = fun(Key, Frames) ->
                      [M || #{frame_bytes := F, ratios := #{Key := #{median := M}}} <- Limit,
                            lists:member(F, Frames)]
              end,
    line("e2e: nif/relay CPU per GB <= 1.15 (median)",
         RatioOf(nif_to_relay_cpu_per_gb, [256, 4 * ?KIB]), fun(R) -> R =< 1.15 end),
    line("e2e: baseline/nif CPU per GB >= 2 at 256 B",
         RatioOf(baseline_to_nif_cpu_per_gb, [256]), fun(R) -> R >= 2 end),
    KvSim = maps:get(cases, maps:get(kv_sim, Results, #{}), []),
    line("kv_sim e2e: higher throughput (ratio)",
         [R || #{throughput_ratio := R} <- KvSim, R =/= null], fun(R) -> R > 1 end),
    line("kv_sim e2e: lower CPU per GB (ratio)",
         [R || #{cpu_per_gb_ratio_baseline_to_nif := R} <- KvSim, R =/= null],
         fun(R) -> R > 1 end).

line(Target, [], _Met) ->
    io:format("  ~-46s not measured~n", [Target]);
line(Target, Values, Met) ->
    Verdict = case lists:all(Met, Values) of
                  true -> "met";
                  false -> "MISSED"
              end,
    Figures = lists:join(", ", [io_lib:format("~.2f", [float(V)]) || V <- Values]),
    io:format("  ~-46s ~-6s ~s~n", [Target, Verdict, Figures]).

%% A section that cannot run (a module not there yet, a NIF not loaded) is reported and skipped.
run_section(Section, Opts, Before) ->
    try
        section(Section, Opts, Before)
    catch
        Class:Reason:Stack ->
            Where = case Stack of [{M, F, A, _} | _] -> {M, F, arity(A)}; _ -> unknown end,
            Why = iolist_to_binary(io_lib:format("~P at ~p", [{Class, Reason}, 12, Where])),
            io:format("[~p] skipped: ~s~n", [Section, Why]),
            #{skipped => Why}
    end.

arity(Args) when is_list(Args) -> length(Args);
arity(Arity) -> Arity.

section(end_to_end, Opts, _Before) -> dcp_bench_e2e:run(maps:get(end_to_end, Opts));
section(feed, Opts, Before) -> feed_section(Opts, real_chunks(Before));
section(slice, Opts, _Before) -> slice_section(Opts);
section(setup, Opts, _Before) -> setup_section(Opts);
section(kv_sim, Opts, _Before) -> end_to_end_section(Opts).

%% The mean chunk the proxy (NIF) read from the producer's socket end to end, per frame size and
%% buffer size: the chunk sizes the feed comparison must hold at.
real_chunks(#{end_to_end := #{cases := Cases}}) ->
    [{F, B, round(C)} || #{frame_bytes := F, buffer := B,
                           modes := #{nif := #{mean_chunk_bytes := #{median := C}}}} <- Cases];
real_chunks(_) ->
    [].

%% ---- feed level ----

feed_section(#{reps := Reps, stream_bytes := StreamBytes}, RealChunks) ->
    io:format("~n== Feed: mcbp:feed/2 (NIF) vs dcp_baseline_splitter (ns_server loop), "
              "producer side, ~p MiB per stream, ~p interleaved runs each ==~n",
              [StreamBytes div ?MIB, Reps]),
    io:format("~-7s ~-25s | ~12s ~9s | ~12s ~9s | ~-26s | ~16s ~16s~n",
              ["frame", "chunk", "base fr/s", "base MB/s", "nif fr/s", "nif MB/s",
               "ratio min/med/max", "nif p99/max us", "base p99/max us"]),
    io:format("(rates from the median runs; ratio: baseline time / NIF time of each pair of runs;~n"
              " a run's time: the mean time per byte of its fastest 90% of ~~1 MiB batches times "
              "its bytes;~n each side in one long-lived process, one warm-up run not counted;~n"
              " chunk \"e2e@B\": the mean chunk the proxy read from the producer socket end to end "
              "with buffers of B;~n p99/max us: feed call durations, mcbp:feed/2 for the NIF, "
              "wall clock)~n"),
    Rows = [feed_case(FrameSize, Chunk, StreamBytes, Reps)
            || FrameSize <- [256, 4 * ?KIB, ?MIB], Chunk <- feed_chunks(FrameSize, RealChunks)],
    #{cases => Rows}.

%% {Label, Bytes}: the real end-to-end chunks of this frame size, then 64 KiB; 1 MiB frames (and
%% any size without an end-to-end figure) at 64 KiB and 1 MiB.
feed_chunks(FrameSize, RealChunks) ->
    case [{"e2e@" ++ size_name(B), C} || {F, B, C} <- RealChunks, F =:= FrameSize, C > 0] of
        [] -> [{size_name(64 * ?KIB), 64 * ?KIB}, {size_name(?MIB), ?MIB}];
        Real -> Real ++ [{size_name(64 * ?KIB), 64 * ?KIB}]
    end.

feed_case(FrameSize, {ChunkLabel, ChunkSize}, StreamBytes, Reps) ->
    {Stream, Frames} = mutation_stream(FrameSize, StreamBytes),
    Chunks = {Stream, ChunkSize},
    %% Each side runs in a process of its own that lives for the whole case, as a proxy's
    %% connection process lives for the whole replication. One warm-up run each, not counted.
    BaseWorker = worker(),
    NifWorker = worker(),
    BaseRun = fun(How) -> fun() -> on_worker(BaseWorker, fun() -> baseline_run(Chunks, How) end) end end,
    NifRun = fun(How) -> fun() -> on_worker(NifWorker, fun() -> nif_run(Chunks, How) end) end end,
    _ = interleave(1, BaseRun(throughput), NifRun(throughput)),
    {BaseRuns, NifRuns} = lists:unzip(interleave(Reps, BaseRun(throughput), NifRun(throughput))),
    [{{BaseP99, BaseMax}, {NifP99, NifMax}}] =
        interleave(1, BaseRun(longest_call), NifRun(longest_call)),
    [exit(W, kill) || W <- [BaseWorker, NifWorker]],
    Base = (summary(BaseRuns, Frames, byte_size(Stream)))#{p99_call_us => BaseP99,
                                                          max_call_us => BaseMax},
    Nif = (summary(NifRuns, Frames, byte_size(Stream)))#{p99_call_us => NifP99,
                                                        max_call_us => NifMax},
    Ratio = maps:get(frames_per_s, Nif) / maps:get(frames_per_s, Base),
    BestRatio = maps:get(best_s, Base) / maps:get(best_s, Nif),
    PerRun = [B / N || {B, N} <- lists:zip(BaseRuns, NifRuns)],
    Spread = #{min => lists:min(PerRun), median => median(PerRun), max => lists:max(PerRun)},
    io:format("~-7s ~-25s | ~12s ~9.1f | ~12s ~9.1f | ~-26s | ~16s ~16s~n",
              [size_name(FrameSize), ChunkLabel ++ " " ++ size_label(ChunkSize),
               count(maps:get(frames_per_s, Base)), maps:get(mb_per_s, Base),
               count(maps:get(frames_per_s, Nif)), maps:get(mb_per_s, Nif),
               io_lib:format("~.1f / ~.1f / ~.1fx", [lists:min(PerRun), median(PerRun),
                                                      lists:max(PerRun)]),
               p99_max(Nif), p99_max(Base)]),
    #{frame_bytes => FrameSize, chunk_bytes => ChunkSize,
      chunk_label => list_to_binary(ChunkLabel), frames => Frames,
      stream_bytes => byte_size(Stream), baseline => Base, nif => Nif, ratio => Ratio,
      ratio_best_runs => BestRatio, ratio_per_run => Spread}.

%% A chunk size in bytes, or "" when the label already says it.
size_label(B) when B rem ?KIB =:= 0 -> "";
size_label(B) -> "(" ++ integer_to_list(B) ++ " B)".

p99_max(#{p99_call_us := P99, max_call_us := Max}) ->
    io_lib:format("~.1f/~.1f", [P99, Max]).

%% Alternating runs, so drift in machine load hits both sides alike.
interleave(Reps, RunA, RunB) ->
    [begin A = RunA(), B = RunB(), {A, B} end || _ <- lists:seq(1, Reps)].

summary(Runs, Frames, Bytes) ->
    Seconds = median(Runs),
    #{median_s => Seconds,
      frames_per_s => Frames / Seconds,
      mb_per_s => Bytes / ?MB / Seconds,
      best_s => lists:min(Runs),
      runs_s => Runs}.

baseline_run(Chunks, How) ->
    State = dcp_baseline_splitter:new(producer, #{}),
    Feed = fun(S, Chunk) ->
                   {ok, _Forward, _Events, 0, S2} = dcp_baseline_splitter:feed(S, Chunk),
                   S2
           end,
    timed_feeds(How, Chunks, State, Feed).

nif_run(Chunks, How) ->
    Splitter = mcbp:splitter_new(#{side => producer}),
    Feed = fun(S, Chunk) ->
                   {ok, _Forward, _Events} = mcbp:feed(S, Chunk),
                   S
           end,
    timed_feeds(How, Chunks, Splitter, Feed).

%% Each chunk is handed over as a fresh binary, just written, as gen_tcp hands over what it read,
%% so it is as warm in the cache as a received chunk is; it is cut from the stream only then, so
%% the process holds little more than a proxy's connection process does (a list of every chunk
%% would be live data that each garbage collection of the baseline's busy heap has to keep).
%% `throughput': the seconds spent feeding, timed per batch of about 1 MiB of fresh chunks,
%% because reading the clock costs ~0.3 us here, as much as a NIF call on a 64 KiB chunk.
%% `longest_call': each call timed alone, the longest, in us.
timed_feeds(throughput, {Stream, Size}, State0, Feed) ->
    PerBatch = max(1, ?MIB div Size),
    Timed = timed_batches(Stream, 0, Size, PerBatch, State0, Feed, []),
    %% The batches are alike (one stream of 256 distinct frames repeated), so the time of a run is
    %% the mean time per byte of its fastest 90% of batches, over all its bytes: an OS preemption
    %% (a few ms, on a shared machine) lands in one of the slowest batches and is left out instead
    %% of doubling a 4 ms run, while costs that come every few batches (garbage collection) stay.
    Bytes = lists:sum([B || {_, B} <- Timed]),
    PerByte = lists:sort([to_s(T) / B || {T, B} <- Timed]),
    Kept = lists:sublist(PerByte, max(1, (length(PerByte) * 9) div 10)),
    lists:sum(Kept) / length(Kept) * Bytes;
timed_feeds(longest_call, {Stream, Size}, State0, Feed) ->
    call_stats(timed_calls(Stream, 0, Size, State0, Feed, [])).

timed_batches(Stream, Offset, _Size, _PerBatch, _State, _Feed, Acc)
  when Offset >= byte_size(Stream) ->
    Acc;
timed_batches(Stream, Offset, Size, PerBatch, State, Feed, Acc) ->
    Received = fresh_chunks(Stream, Offset, Size, PerBatch),
    T0 = erlang:monotonic_time(),
    State2 = lists:foldl(fun(C, S) -> Feed(S, C) end, State, Received),
    Took = erlang:monotonic_time() - T0,
    Bytes = iolist_size(Received),
    timed_batches(Stream, Offset + Bytes, Size, PerBatch, State2, Feed, [{Took, Bytes} | Acc]).

timed_calls(Stream, Offset, _Size, _State, _Feed, Acc) when Offset >= byte_size(Stream) ->
    Acc;
timed_calls(Stream, Offset, Size, State, Feed, Acc) ->
    [Received] = fresh_chunks(Stream, Offset, Size, 1),
    T0 = erlang:monotonic_time(),
    State2 = Feed(State, Received),
    Took = erlang:monotonic_time() - T0,
    timed_calls(Stream, Offset + byte_size(Received), Size, State2, Feed, [Took | Acc]).

%% Up to N chunks of Size from Offset on, each a fresh copy.
fresh_chunks(Stream, Offset, Size, N) when N > 0, Offset < byte_size(Stream) ->
    Len = min(Size, byte_size(Stream) - Offset),
    [binary:copy(binary:part(Stream, Offset, Len))
     | fresh_chunks(Stream, Offset + Len, Size, N - 1)];
fresh_chunks(_Stream, _Offset, _Size, _N) ->
    [].

%% The 99th percentile and the longest of some call durations, in us. Durations are wall clock: on a
%% loaded machine the OS can preempt the VM inside any call, which the longest one shows and the
%% 99th percentile mostly does not.
call_stats(Native) ->
    Sorted = lists:sort(Native),
    P99 = lists:nth(max(1, ceil(length(Sorted) * 0.99)), Sorted),
    {to_s(P99) * 1.0e6, to_s(lists:last(Sorted)) * 1.0e6}.

%% ---- scheduler-slice check ----

%% One 16 MiB chunk of 128-byte frames: mcbp:feed/2 must come back to Erlang at least every ~1 ms
%% (dcp_nif:feed/3 returns `continue'), so each NIF call is timed on its own here, and the VM's
%% long_schedule monitor (1 ms) watches the process.
slice_section(#{reps := Reps}) ->
    ChunkBytes = 16 * ?MIB,
    FrameBytes = 128,
    {Chunk, Frames} = mutation_stream(FrameBytes, ChunkBytes),
    io:format("~n== Scheduler slice: one ~p MiB chunk of ~p B frames (~p frames), ~p runs ==~n",
              [ChunkBytes div ?MIB, FrameBytes, Frames, Reps]),
    %% The chunks are copied (as a socket hands them over) before the monitor starts: a 16 MiB
    %% copy is itself a long schedule and would be counted against the NIF.
    Runs = [begin
                Received = {binary:copy(Chunk), binary:copy(Chunk)},
                isolated_monitored(fun() -> slice_run(Received) end)
            end || _ <- lists:seq(1, Reps)],
    AllCalls = lists:append([maps:get(call_us, R) || R <- Runs]),
    %% The longest call of a typical run: one preemption by the OS in one run does not move it.
    Longest = median([lists:max(maps:get(call_us, R)) || R <- Runs]),
    Calls = median([length(maps:get(call_us, R)) || R <- Runs]),
    Whole = median([maps:get(whole_feed_us, R) || R <- Runs]),
    LongSchedules = lists:sum([maps:get(long_schedules, R) || R <- Runs]),
    io:format("dcp_nif:feed/3 calls per 16 MiB feed: ~p (~p frames each at most); call duration "
              "median ~.1f us, longest per run (median) ~.1f us, longest of all ~.1f us~n"
              "whole mcbp:feed/2: ~.1f us (median); long_schedule (> 1 ms) monitor events: ~p~n",
              [Calls, ceil(Frames / Calls), median(AllCalls), Longest, lists:max(AllCalls), Whole,
               LongSchedules]),
    Bounded = bounded_inputs(Reps),
    #{chunk_bytes => ChunkBytes, frame_bytes => FrameBytes, frames => Frames,
      nif_calls_median => Calls, median_nif_call_us => median(AllCalls),
      max_nif_call_us => Longest, max_nif_call_all_runs_us => lists:max(AllCalls),
      whole_feed_us_median => Whole, long_schedule_events => LongSchedules,
      bounded_inputs => Bounded,
      max_nif_call_us_bounded_inputs => lists:max([M || #{max_nif_call_us := M} <- Bounded])}.

%% The inputs a peer or a caller can make huge, each NIF call timed on its own (the longest of
%% `Reps' runs, median of the runs' longest): a 30 MiB frame of a reported opcode in 256 KiB
%% chunks (refused from its header), a STREAM_REQ answer's 30 MiB failover log (refused by its
%% size), a 1 M-element vbucket list (refused after a bounded read),
%% a 30 MiB encode (the NIF writes the head only), and a full 1024-vbucket setup for scale.
bounded_inputs(Reps) ->
    io:format("~n== Scheduler slice: inputs made huge, each NIF call timed (~p runs) ==~n", [Reps]),
    StreamEnd = iolist_to_binary(mcbp:encode(#{magic => req, opcode => dcp_stream_end,
                                               extras => <<0:32>>,
                                               value => binary:copy(<<0>>, ?MAX_FRAME_SIZE - 28)})),
    Chunks = [binary:part(StreamEnd, Off, min(256 * ?KIB, byte_size(StreamEnd) - Off))
              || Off <- lists:seq(0, byte_size(StreamEnd) - 1, 256 * ?KIB)],
    Million = lists:seq(1, 1000000),
    Value = binary:copy(<<7>>, ?MAX_FRAME_SIZE - 100),
    Mutation = #{magic => req, opcode => dcp_mutation, vbucket => 3, extras => <<0:(31 * 8)>>,
                 key => <<"key">>, value => Value},
    %% a STREAM_REQ answer whose failover log fills the largest frame (2 M entries)
    {ok, LogAnswer, <<>>} = mcbp:decode(iolist_to_binary(
                                          mcbp:encode(#{magic => res, opcode => dcp_stream_req,
                                                        status => 0,
                                                        value => binary:copy(
                                                                   <<0>>, ?MAX_FRAME_SIZE - 32)}))),
    Cases = [{"30 MiB stream_end frame, 256 KiB chunks", fun() -> feed_refused(Chunks) end},
             {"dcp_fields of a 30 MiB failover log", fun() -> fields_refused(LogAnswer) end},
             {"setup_request, 1 M-element vbucket list", fun() -> setup_refused(Million) end},
             {"encode of a 30 MiB mutation", fun() -> encode_head(Mutation, byte_size(Value)) end},
             {"setup of 1024 vbuckets (request + answers)", fun() -> setup_timed(1024) end}],
    io:format("~-44s ~8s ~12s ~12s ~8s  ~s~n",
              ["input", "calls", "longest us", "all runs us", "verdict", "answer"]),
    [begin
         Runs = [isolated(Run) || _ <- lists:seq(1, Reps)],
         Longest = median([lists:max(Us) || {Us, _} <- Runs]),
         Worst = lists:max([lists:max(Us) || {Us, _} <- Runs]),
         {Us1, Answer} = hd(Runs),
         Verdict = case Longest =< 1000 of true -> "met"; false -> "MISSED" end,
         io:format("~-44s ~8w ~12.1f ~12.1f ~8s  ~0P~n",
                   [Name, length(Us1), Longest, Worst, Verdict, Answer, 6]),
         #{input => list_to_binary(Name), nif_calls => length(Us1), max_nif_call_us => Longest,
           max_nif_call_all_runs_us => Worst,
           answer => iolist_to_binary(io_lib:format("~0P", [Answer, 6]))}
     end || {Name, Run} <- Cases].

%% Each call's duration in microseconds (`timed/1'), and the answer that ends the run.
timed(Fun) ->
    T0 = erlang:monotonic_time(),
    Result = Fun(),
    {to_s(erlang:monotonic_time() - T0) * 1.0e6, Result}.

feed_refused(Chunks) ->
    Splitter = dcp_nif:splitter_new(producer, ?MAX_FRAME_SIZE),
    feed_refused(Splitter, Chunks, []).

feed_refused(_Splitter, [], Us) ->
    {lists:reverse(Us), not_refused};
feed_refused(Splitter, [Chunk | Chunks], Us) ->
    case timed(fun() -> dcp_nif:feed(Splitter, Chunk, 0) end) of
        {T, {error, Why}} -> {lists:reverse(Us, [T]), Why};
        {T, _} -> feed_refused(Splitter, Chunks, [T | Us])
    end.

fields_refused(Frame) ->
    {T, Answer} = timed(fun() -> mcbp:dcp_fields(Frame) end),
    {[T], Answer}.

setup_refused(VBuckets) ->
    {T, Answer} = timed(fun() -> dcp_nif:setup_request(dcp_nif:setup_new(),
                                                       {setup_streams, VBuckets}) end),
    {[T], Answer}.

encode_head(Frame, ValueSize) ->
    {T, Head} = timed(fun() -> dcp_nif:encode_head(Frame, ValueSize) end),
    {[T], {head_bytes, byte_size(Head)}}.

setup_timed(N) ->
    Setup = dcp_nif:setup_new(),
    {T, {send, Actions}} = timed(fun() -> dcp_nif:setup_request(Setup, {setup_streams,
                                                                        lists:seq(0, N - 1)}) end),
    Answers = [timed(fun() -> dcp_nif:setup_event(Setup, {consumer, {add_stream_response,
                                                                     Opaque, 0, Opaque}}) end)
               || {add_stream, _VB, Opaque, _Flags} <- Actions],
    {[T | [A || {A, _} <- Answers]], element(2, lists:last(Answers))}.

slice_run({Received1, Received}) ->
    %% The NIF's own loop, as mcbp:feed/2 runs it, with each call timed.
    Splitter = dcp_nif:splitter_new(producer, ?MAX_FRAME_SIZE),
    Calls = slice_loop(Splitter, Received1, 0, []),
    %% And the public call as a whole, on a fresh splitter.
    Splitter2 = mcbp:splitter_new(#{side => producer}),
    T0 = erlang:monotonic_time(),
    {ok, _, _} = mcbp:feed(Splitter2, Received),
    Whole = erlang:monotonic_time() - T0,
    #{call_us => [to_s(C) * 1.0e6 || C <- Calls], whole_feed_us => to_s(Whole) * 1.0e6}.

slice_loop(Splitter, Chunk, Offset, Took) ->
    T0 = erlang:monotonic_time(),
    Result = dcp_nif:feed(Splitter, Chunk, Offset),
    Took2 = [erlang:monotonic_time() - T0 | Took],
    case Result of
        {ok, _Forward, _Events} ->
            lists:reverse(Took2);
        {continue, Next, _Forward, _Events} ->
            slice_loop(Splitter, Chunk, Next, Took2)
    end.

isolated_monitored(Fun) ->
    Previous = erlang:system_monitor(self(), [{long_schedule, 1}]),
    {Pid, Result} = try isolated_pid(Fun)
                    after _ = restore_system_monitor(Previous)
                    end,
    Result#{long_schedules => flush_long_schedules(Pid, 0)}.

restore_system_monitor(undefined) -> erlang:system_monitor(undefined);
restore_system_monitor({Pid, Opts}) -> erlang:system_monitor(Pid, Opts).

flush_long_schedules(Pid, N) ->
    receive
        {monitor, Pid, long_schedule, _Info} -> flush_long_schedules(Pid, N + 1);
        {monitor, _Other, long_schedule, _Info} -> flush_long_schedules(Pid, N)
    after 0 ->
            N
    end.

%% ---- setup level ----

%% A full setup through the dcp_setup NIFs: begin with N vbuckets, then one successful ADD_STREAM
%% answer per vbucket (opaque = vbucket). The bookkeeping is O(1) per event: 1024 should cost
%% about 4x what 256 cost.
setup_section(#{reps := Reps}) ->
    Batch = 100,
    io:format("~n== Setup: dcp_nif:setup_request + one add_stream answer per vbucket, "
              "median of ~p interleaved batches of ~p setups ==~n", [Reps, Batch]),
    Runs = interleave(Reps, fun() -> isolated(fun() -> setup_batch(256, Batch) end) end,
                      fun() -> isolated(fun() -> setup_batch(1024, Batch) end) end),
    {Small, Large} = lists:unzip(Runs),
    SmallUs = median(Small),
    LargeUs = median(Large),
    Ratio = LargeUs / SmallUs,
    io:format("~-10s ~14s ~14s~n", ["vbuckets", "us per setup", "ns per vbucket"]),
    io:format("~-10w ~14.1f ~14.1f~n", [256, SmallUs, SmallUs * 1000 / 256]),
    io:format("~-10w ~14.1f ~14.1f~n", [1024, LargeUs, LargeUs * 1000 / 1024]),
    io:format("1024 / 256: ~.2fx (O(1) per event means about 4x)~n", [Ratio]),
    #{us_per_setup_256 => SmallUs, us_per_setup_1024 => LargeUs, ratio_1024_to_256 => Ratio,
      batch => Batch}.

setup_batch(N, Batch) ->
    VBuckets = lists:seq(0, N - 1),
    T0 = erlang:monotonic_time(),
    lists:foreach(fun(_) -> ok = setup_once(VBuckets) end, lists:seq(1, Batch)),
    to_s(erlang:monotonic_time() - T0) * 1.0e6 / Batch.

setup_once(VBuckets) ->
    Setup = dcp_nif:setup_new(),
    {send, Actions} = dcp_nif:setup_request(Setup, {setup_streams, VBuckets}),
    true = length(Actions) =:= length(VBuckets),
    %% each answer carries the opaque its request was sent with (it names the request)
    answer_adds(Setup, [Opaque || {add_stream, _VB, Opaque, _Flags} <- Actions]).

answer_adds(Setup, [Opaque]) ->
    {reply, ok} = dcp_nif:setup_event(Setup, {consumer, {add_stream_response, Opaque, 0, Opaque}}),
    ok;
answer_adds(Setup, [Opaque | Rest]) ->
    noreply = dcp_nif:setup_event(Setup, {consumer, {add_stream_response, Opaque, 0, Opaque}}),
    answer_adds(Setup, Rest).

%% ---- end to end ----

%% kv_sim producer -> proxy (dcp_replicator) -> kv_sim consumer on loopback, the NIF splitter
%% against the baseline, same data. Both kv_sim nodes run in a peer VM, so this VM's runtime is the
%% proxy's own CPU (plus the bench's polling, the same for both).
end_to_end_section(#{e2e_reps := Reps, e2e_bytes := Bytes}) ->
    case [M || M <- [kv_sim, dcp_replicator], code:ensure_loaded(M) =/= {module, M}] of
        [] ->
            end_to_end(Reps, Bytes);
        Missing ->
            io:format("~n== End to end: skipped, ~p not available yet ==~n", [Missing]),
            #{skipped => iolist_to_binary(io_lib:format("missing modules ~p", [Missing]))}
    end.

end_to_end(Reps, Bytes) ->
    VBuckets = 64,
    io:format("~n== End to end: kv_sim producer -> dcp_replicator -> kv_sim consumer (loopback, "
              "kv_sim in a peer VM), ~p vbuckets, median of ~p interleaved runs each ==~n",
              [VBuckets, Reps]),
    io:format("~-7s ~-8s | ~9s ~11s | ~9s ~11s | ~10s ~12s~n",
              ["value", "docs", "base MB/s", "base ms/GB", "nif MB/s", "nif ms/GB",
               "MB/s ratio", "CPU/GB ratio"]),
    Paths = lists:usort([filename:dirname(code:which(M)) || M <- [kv_sim, dcp_bench, dcp_nif]]),
    %% No scheduler busy-waiting on the peer: on a small machine its spinning schedulers would take
    %% CPU from the proxy and count as kv_sim's work.
    NoSpin = ["+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"],
    {ok, Peer, _} = peer:start_link(#{connection => standard_io,
                                      args => NoSpin ++ lists:append([["-pa", P] || P <- Paths])}),
    try
        Cases = [e2e_case(Peer, VBuckets, ValueSize, Bytes div Div, Reps)
                 || {ValueSize, Div} <- [{4096, 1}, {256, 4}]],
        #{vbuckets => VBuckets, cases => Cases}
    after
        peer:stop(Peer)
    end.

e2e_case(Peer, VBuckets, ValueSize, Bytes, Reps) ->
    %% A mutation on the wire: header, extras, a 17-byte key, the value.
    Docs = max(1, Bytes div (VBuckets * (24 + 31 + 17 + ValueSize))),
    Run = fun(Splitter) -> fun() -> e2e_run(Peer, VBuckets, Docs, ValueSize, Splitter) end end,
    Runs = interleave(Reps, Run({dcp_baseline_splitter, #{}}), Run(nif)),
    {BaseRuns, NifRuns} = lists:unzip(Runs),
    Base = e2e_summary(BaseRuns),
    Nif = e2e_summary(NifRuns),
    Throughput = ratio(maps:get(mb_per_s, Nif), maps:get(mb_per_s, Base)),
    CpuRatio = ratio(maps:get(cpu_ms_per_gb, Base), maps:get(cpu_ms_per_gb, Nif)),
    io:format("~-7s ~-8w | ~9.1f ~11.1f | ~9.1f ~11.1f | ~10s ~12s~n",
              [size_name(ValueSize), VBuckets * Docs,
               maps:get(mb_per_s, Base), maps:get(cpu_ms_per_gb, Base),
               maps:get(mb_per_s, Nif), maps:get(cpu_ms_per_gb, Nif),
               ratio_text(Throughput), ratio_text(CpuRatio)]),
    io:format("~-16s | user+sys CPU ms/GB (/proc): base ~.1f, nif ~.1f; proxy VM busy: "
              "base ~w%, nif ~w%; mean chunk ~w B; digests equal: ~p~n"
              "~-16s | kv_sim VM CPU ms/GB (the peer, not the proxy): base ~.1f, nif ~.1f; "
              "user+sys (/proc): base ~.1f, nif ~.1f~n",
              ["", maps:get(os_cpu_ms_per_gb, Base), maps:get(os_cpu_ms_per_gb, Nif),
               round(100 * maps:get(cpu_utilisation, Base)),
               round(100 * maps:get(cpu_utilisation, Nif)),
               round(maps:get(mean_producer_chunk_bytes, Nif)),
               maps:get(verified, Base) andalso maps:get(verified, Nif),
               "", maps:get(kv_sim_cpu_ms_per_gb, Base), maps:get(kv_sim_cpu_ms_per_gb, Nif),
               maps:get(kv_sim_os_cpu_ms_per_gb, Base), maps:get(kv_sim_os_cpu_ms_per_gb, Nif)]),
    #{value_bytes => ValueSize, docs => VBuckets * Docs, baseline => Base, nif => Nif,
      throughput_ratio => Throughput, cpu_per_gb_ratio_baseline_to_nif => CpuRatio}.

e2e_summary(Runs) ->
    Wall = median([W || #{wall_s := W} <- Runs]),
    Cpu = median([C || #{cpu_ms := C} <- Runs]),
    Bytes = median([B || #{bytes := B} <- Runs]),
    OsCpu = median([C || #{os_cpu_ms := C} <- Runs]),
    Chunks = median([C || #{producer_chunks := C} <- Runs]),
    PeerCpu = median([C || #{kv_sim_cpu_ms := C} <- Runs]),
    PeerOsCpu = median([C || #{kv_sim_os_cpu_ms := C} <- Runs]),
    #{median_wall_s => Wall, median_cpu_ms => Cpu, bytes => Bytes,
      mb_per_s => Bytes / ?MB / Wall, cpu_ms_per_gb => Cpu / (Bytes / 1.0e9),
      median_os_cpu_ms => OsCpu, os_cpu_ms_per_gb => OsCpu / (Bytes / 1.0e9),
      cpu_utilisation => Cpu / 1000 / Wall,
      mean_producer_chunk_bytes => Bytes / max(1, Chunks),
      kv_sim_cpu_ms_per_gb => PeerCpu / (Bytes / 1.0e9),
      kv_sim_os_cpu_ms_per_gb => PeerOsCpu / (Bytes / 1.0e9),
      verified => lists:all(fun(#{verified := V}) -> V end, Runs),
      runs => Runs}.

%% One replication of fresh nodes; the proxy runs in a fresh process of this VM.
e2e_run(Peer, VBuckets, Docs, ValueSize, Splitter) ->
    Common = #{vbuckets => VBuckets, value_size => ValueSize},
    {ok, Producer} = peer:call(Peer, kv_sim, start,
                               [Common#{role => producer, docs_per_vbucket => Docs}]),
    {ok, Consumer} = peer:call(Peer, kv_sim, start, [Common#{role => consumer}]),
    try
        Endpoint = fun(Node) -> {{127, 0, 0, 1}, peer:call(Peer, kv_sim, port, [Node])} end,
        RepOpts = #{consumer => Endpoint(Consumer), producer => Endpoint(Producer),
                    bucket => "default",
                    connection_name => "replication:bench-producer->bench-consumer:default",
                    user => "Administrator", password => "password",
                    features => [xattr, del_times], splitter => Splitter},
        Expected = VBuckets * Docs,
        All = lists:seq(0, VBuckets - 1),
        Run = isolated(fun() -> replicate(RepOpts, All, Peer, Consumer, Expected) end),
        Verified = lists:all(fun(VB) ->
                                     peer:call(Peer, kv_sim, digest, [Producer, VB])
                                         =:= peer:call(Peer, kv_sim, digest, [Consumer, VB])
                             end, All),
        Run#{verified => Verified}
    after
        peer:call(Peer, kv_sim, stop, [Producer]),
        peer:call(Peer, kv_sim, stop, [Consumer])
    end.

replicate(RepOpts, VBuckets, Peer, Consumer, Expected) ->
    process_flag(trap_exit, true),
    erlang:garbage_collect(),
    {Cpu0, _} = erlang:statistics(runtime),
    Os0 = os_cpu_ms(),
    {PeerCpu0, _} = peer:call(Peer, erlang, statistics, [runtime]),
    PeerOs0 = peer_os_cpu_ms(Peer),
    T0 = erlang:monotonic_time(),
    {ok, Rep} = dcp_replicator:start_link(RepOpts),
    ok = dcp_replicator:setup_replication(Rep, VBuckets),
    ok = wait_for_docs(Peer, Consumer, Expected),
    Wall = to_s(erlang:monotonic_time() - T0),
    {Cpu1, _} = erlang:statistics(runtime),
    Os1 = os_cpu_ms(),
    {PeerCpu1, _} = peer:call(Peer, erlang, statistics, [runtime]),
    PeerOs1 = peer_os_cpu_ms(Peer),
    #{producer := #{bytes_in := Bytes, chunks := Chunks}} = dcp_replicator:stats(Rep),
    unlink(Rep),
    Ref = erlang:monitor(process, Rep),
    exit(Rep, shutdown),
    receive {'DOWN', Ref, process, Rep, _} -> ok end,
    #{wall_s => Wall, cpu_ms => Cpu1 - Cpu0, os_cpu_ms => Os1 - Os0, bytes => Bytes,
      kv_sim_cpu_ms => PeerCpu1 - PeerCpu0, kv_sim_os_cpu_ms => PeerOs1 - PeerOs0,
      producer_chunks => Chunks}.

%% @doc This VM's user + system CPU from /proc (statistics(runtime) is user time only, and the socket
%% copies are system time); 0 where /proc is missing. Ticks are taken as 10 ms (USER_HZ 100).
-spec os_cpu_ms() -> non_neg_integer().
os_cpu_ms() ->
    os_cpu_ms(file:read_file("/proc/self/stat")).

%% The same for the kv_sim peer VM (its socket work is system time too).
peer_os_cpu_ms(Peer) ->
    os_cpu_ms(peer:call(Peer, file, read_file, ["/proc/self/stat"])).

os_cpu_ms(ReadStat) ->
    case ReadStat of
        {ok, Stat} ->
            %% The fields after the command name (which may hold spaces) end with ")".
            [_, After] = string:split(Stat, ")", trailing),
            Fields = string:lexemes(After, " "),
            %% utime and stime are fields 14 and 15; After starts at field 3.
            UserTicks = binary_to_integer(lists:nth(12, Fields)),
            SystemTicks = binary_to_integer(lists:nth(13, Fields)),
            (UserTicks + SystemTicks) * 10;
        {error, _} ->
            0
    end.

wait_for_docs(Peer, Consumer, Expected) ->
    case peer:call(Peer, ?MODULE, consumer_doc_count, [Consumer]) of
        N when N >= Expected ->
            ok;
        _ ->
            timer:sleep(10),
            wait_for_docs(Peer, Consumer, Expected)
    end.

%% @private Runs on the kv_sim peer: documents a consumer node holds, all vbuckets (its store is an
%% ets table of one row per document; reading its size is O(1), unlike a digest).
-spec consumer_doc_count(pid()) -> non_neg_integer().
consumer_doc_count(Node) ->
    #{store := Store} = gen_server:call(Node, config),
    ets:info(Store, size).

%% ---- streams ----

%% A stream of about Bytes of DCP mutations, each exactly FrameSize bytes on the wire, built with
%% mcbp:encode/1; 256 distinct frames repeated. Returns {Stream, FrameCount}.
mutation_stream(FrameSize, Bytes) ->
    Frames = max(1, Bytes div FrameSize),
    Distinct = min(Frames, 256),
    Block = iolist_to_binary([mutation(I, FrameSize) || I <- lists:seq(1, Distinct)]),
    Copies = Frames div Distinct,
    {binary:copy(Block, Copies), Distinct * Copies}.

mutation(Seqno, FrameSize) ->
    Key = iolist_to_binary(io_lib:format("bench-key-~6..0w", [Seqno])),
    Extras = <<Seqno:64, 1:64, 0:32, 0:32, 0:32, 0:16, 0:8>>,
    ValueLen = FrameSize - 24 - byte_size(Extras) - byte_size(Key),
    Frame = iolist_to_binary(
              mcbp:encode(#{magic => req, opcode => 16#57, datatype => 0, vbucket => Seqno rem 1024,
                            opaque => 16#dcb, cas => Seqno, framing_extras => [], extras => Extras,
                            key => Key, value => binary:copy(<<"v">>, ValueLen)})),
    FrameSize = byte_size(Frame),
    Frame.

%% ---- helpers ----

%% A process that runs funs for the caller, one at a time, its garbage collected before each (a
%% proxy's connection process holds little live data between chunks, so its heap stays small).
worker() ->
    spawn(fun worker_loop/0).

worker_loop() ->
    receive
        {run, Fun, From, Ref} ->
            erlang:garbage_collect(),
            From ! {Ref, run(Fun)},
            worker_loop()
    end.

on_worker(Worker, Fun) ->
    Ref = erlang:monitor(process, Worker),
    Worker ! {run, Fun, self(), Ref},
    receive
        {Ref, {result, Result}} ->
            erlang:demonitor(Ref, [flush]),
            Result;
        {Ref, {failed, Class, Reason, Stack}} ->
            erlang:demonitor(Ref, [flush]),
            erlang:raise(Class, Reason, Stack);
        {'DOWN', Ref, process, Worker, Why} ->
            error({bench_worker_down, Why})
    end.

%% Each run in a fresh process: no garbage from the previous run is collected on its time.
isolated(Fun) ->
    {_Pid, Result} = isolated_pid(Fun),
    Result.

isolated_pid(Fun) ->
    Parent = self(),
    {Pid, Ref} = spawn_monitor(fun() -> Parent ! {self(), bench_result, run(Fun)} end),
    receive
        {Pid, bench_result, Outcome} ->
            erlang:demonitor(Ref, [flush]),
            case Outcome of
                {result, Result} -> {Pid, Result};
                {failed, Class, Reason, Stack} -> erlang:raise(Class, Reason, Stack)
            end;
        {'DOWN', Ref, process, Pid, Why} ->
            error({bench_run_failed, Why})
    end.

run(Fun) ->
    try
        {result, Fun()}
    catch
        Class:Reason:Stack -> {failed, Class, Reason, Stack}
    end.

%% A ratio of two measurements; a run too short to register CPU time gives none.
ratio(_, Zero) when Zero == 0 -> null;
ratio(A, B) -> A / B.

ratio_text(null) -> "n/a";
ratio_text(R) -> io_lib:format("~.2fx", [R]).

to_s(Native) ->
    erlang:convert_time_unit(Native, native, nanosecond) / 1.0e9.

-spec median([number(), ...]) -> number().
median(Values) ->
    Sorted = lists:sort(Values),
    N = length(Sorted),
    case N rem 2 of
        1 -> lists:nth(N div 2 + 1, Sorted);
        0 -> (lists:nth(N div 2, Sorted) + lists:nth(N div 2 + 1, Sorted)) / 2
    end.

-spec size_name(non_neg_integer()) -> string().
size_name(B) when B >= ?MIB, B rem ?MIB =:= 0 -> integer_to_list(B div ?MIB) ++ " MiB";
size_name(B) when B >= ?KIB, B rem ?KIB =:= 0 -> integer_to_list(B div ?KIB) ++ " KiB";
size_name(B) -> integer_to_list(B) ++ " B".

count(N) when N >= 1.0e6 -> io_lib:format("~.2fM", [N / 1.0e6]);
count(N) when N >= 1.0e3 -> io_lib:format("~.1fk", [N / 1.0e3]);
count(N) -> io_lib:format("~.1f", [float(N)]).

%% ---- a small JSON encoder (OTP 25 has no json module) ----

json(Map) when is_map(Map) ->
    Members = [[json_string(Key), ":", json(Value)]
               || {Key, Value} <- lists:sort(maps:to_list(Map))],
    ["{", lists:join(",", Members), "}"];
json(List) when is_list(List) ->
    ["[", lists:join(",", [json(V) || V <- List]), "]"];
json(true) -> "true";
json(false) -> "false";
json(null) -> "null";
json(Int) when is_integer(Int) -> integer_to_list(Int);
json(Float) when is_float(Float) -> float_to_list(Float, [{decimals, 4}, compact]);
json(Other) -> json_string(Other).

json_string(Atom) when is_atom(Atom) -> json_string(atom_to_binary(Atom));
json_string(Bin) when is_binary(Bin) -> [$", [json_char(C) || <<C>> <= Bin], $"];
json_string(Term) -> json_string(iolist_to_binary(io_lib:format("~p", [Term]))).

json_char($") -> "\\\"";
json_char($\\) -> "\\\\";
json_char(C) when C < 16#20 -> io_lib:format("\\u~4.16.0b", [C]);
json_char(C) -> C.
