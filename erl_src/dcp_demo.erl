%% @doc The main job (`make demo'): two simulated kv_engine nodes on loopback and a replicator between
%% them; replicates seeded vbuckets, verifies every digest, then replays MB-53445 and shows the reply.
-module(dcp_demo).

-export([main/0, main/1, run/1]).

-define(USER, "Administrator").
-define(PASSWORD, "password").
-define(BUCKET, "default").

-type opts() :: #{vbuckets => pos_integer(), docs => pos_integer(), value_size => pos_integer(),
                  splitter => nif | {module(), term()}}.
-export_type([opts/0]).

%% @doc Runs the demo with the defaults (64 vbuckets of 10000 documents of 256 bytes).
-spec main() -> ok.
main() ->
    main(#{}).

%% @doc Runs the demo and halts the VM with status 1 if a check failed (for `make demo').
-spec main(opts()) -> ok.
main(Opts) ->
    ok = logger:set_primary_config(level, warning),
    case catch run(Opts) of
        #{ok := true} ->
            ok;
        Other ->
            io:format("~ndemo FAILED: ~p~n", [Other]),
            erlang:halt(1)
    end.

%% @doc Runs the demo and returns what it measured; `ok' is true when every check held.
-spec run(opts()) -> #{ok := boolean(), atom() => term()}.
run(Opts) ->
    NumVBs = maps:get(vbuckets, Opts, 64),
    Docs = maps:get(docs, Opts, 10000),
    ValueSize = maps:get(value_size, Opts, 256),
    Splitter = maps:get(splitter, Opts, nif),
    VBuckets = lists:seq(0, NumVBs - 1),
    %% One more vbucket than we replicate: the MB-53445 replay uses the last one.
    FaultVB = NumVBs,
    NodeOpts = #{bucket => ?BUCKET, user => ?USER, password => ?PASSWORD,
                 vbuckets => NumVBs + 1, docs_per_vbucket => Docs, value_size => ValueSize},
    {ok, Producer} = kv_sim:start(NodeOpts#{role => producer}),
    {ok, Consumer} = kv_sim:start(NodeOpts#{role => consumer}),
    Name = dcp_replicator:get_connection_name('consumer@127.0.0.1', 'producer@127.0.0.1',
                                               ?BUCKET, 0),
    io:format("dcp_proxy demo: ~b vbuckets x ~b documents of ~b bytes~n"
              "  producer kv_sim on 127.0.0.1:~b, consumer kv_sim on 127.0.0.1:~b~n"
              "  connection ~s~n~n",
              [NumVBs, Docs, ValueSize, kv_sim:port(Producer), kv_sim:port(Consumer), Name]),
    {ok, Rep} = dcp_replicator:start_link(
                  #{consumer => {"127.0.0.1", kv_sim:port(Consumer)},
                    producer => {"127.0.0.1", kv_sim:port(Producer)},
                    bucket => ?BUCKET, connection_name => Name,
                    user => ?USER, password => ?PASSWORD,
                    features => [xattr, snappy, del_times, json],
                    setup_timeout => 30000, splitter => Splitter}),
    unlink(Rep),
    try
        replicate_and_verify(Rep, Producer, Consumer, VBuckets, Docs, ValueSize, FaultVB)
    after
        exit(Rep, shutdown),
        kv_sim:stop(Consumer),
        kv_sim:stop(Producer)
    end.

replicate_and_verify(Rep, Producer, Consumer, VBuckets, Docs, ValueSize, FaultVB) ->
    CpuStart = cpu_ms(),
    T0 = erlang:monotonic_time(microsecond),
    SetupReply = dcp_replicator:setup_replication(Rep, VBuckets),
    SetupUs = erlang:monotonic_time(microsecond) - T0,
    io:format("setup_replication(~b vbuckets) -> ~p in ~.1f ms~n",
              [length(VBuckets), SetupReply, SetupUs / 1000]),
    Total = length(VBuckets) * Docs,
    StreamUs = wait_for_mutations(Rep, Total, T0, erlang:monotonic_time(millisecond) + 120000),
    CpuMs = cpu_ms() - CpuStart,
    Mismatches = verify_digests(Producer, Consumer, VBuckets, erlang:monotonic_time(millisecond) + 10000),
    io:format("digests: ~b of ~b vbuckets identical on both nodes~n",
              [length(VBuckets) - length(Mismatches), length(VBuckets)]),
    Stats = dcp_replicator:stats(Rep),
    Mb53445 = replay_mb53445(Rep, Producer, Consumer, VBuckets, FaultVB),
    Bytes = splitter_stat(Stats, producer, bytes),
    Summary = [{"vbuckets", integer_to_list(length(VBuckets))},
               {"documents", integer_to_list(Total)},
               {"value size", integer_to_list(ValueSize) ++ " B"},
               {"bytes proxied producer->consumer", integer_to_list(Bytes)},
               {"throughput", io_lib:format("~.1f MB/s", [Bytes / max(StreamUs, 1)])},
               {"VM CPU during replication", io_lib:format("~b ms", [CpuMs])},
               {"frames proxied (producer side)",
                integer_to_list(splitter_stat(Stats, producer, frames))},
               {"frames proxied (consumer side)",
                integer_to_list(splitter_stat(Stats, consumer, frames))},
               {"setup latency", io_lib:format("~.1f ms", [SetupUs / 1000])},
               {"MB-53445 setup reply", io_lib:format("~p", [maps:get(reply, Mb53445)])},
               {"MB-53445 answered in", io_lib:format("~.1f ms", [maps:get(ms, Mb53445)])}],
    io:format("~n~s~n", [table(Summary)]),
    Ok = SetupReply =:= ok andalso Mismatches =:= [] andalso StreamUs =/= timeout
        andalso maps:get(expected, Mb53445),
    #{ok => Ok, setup_reply => SetupReply, mismatches => Mismatches, bytes => Bytes,
      stream_us => StreamUs, cpu_ms => CpuMs, mb53445 => Mb53445}.

%% The proxy has seen every mutation; the consumer node may still be applying the last ones.
verify_digests(Producer, Consumer, VBuckets, Deadline) ->
    Mismatches = [VB || VB <- VBuckets, kv_sim:digest(Producer, VB) =/= kv_sim:digest(Consumer, VB)],
    case Mismatches =/= [] andalso erlang:monotonic_time(millisecond) < Deadline of
        true ->
            timer:sleep(50),
            verify_digests(Producer, Consumer, Mismatches, Deadline);
        false ->
            Mismatches
    end.

%% Progress comes from the proxy's own counters: mutations seen on the producer side.
wait_for_mutations(Rep, Total, T0, Deadline) ->
    Seen = mutations(dcp_replicator:stats(Rep)),
    Now = erlang:monotonic_time(microsecond),
    io:format("\r  streaming: ~b / ~b mutations (~.1f s)   ", [Seen, Total, (Now - T0) / 1.0e6]),
    if
        Seen >= Total ->
            io:format("~n"),
            Now - T0;
        Now div 1000 > Deadline ->
            io:format("~n  gave up waiting for mutations~n"),
            timeout;
        true ->
            timer:sleep(100),
            wait_for_mutations(Rep, Total, T0, Deadline)
    end.

mutations(Stats) ->
    ByOpcode = maps:get(by_opcode, splitter(Stats, producer), #{}),
    maps:get(frames, maps:get(dcp_mutation, ByOpcode, #{}), 0).

%% MB-53445: the producer ends the new stream with state_changed as soon as it accepts it, and the
%% consumer then never answers the ADD_STREAM (kv_engine's error path). ns_server waited forever here.
replay_mb53445(Rep, Producer, Consumer, VBuckets, FaultVB) ->
    ok = kv_sim:set_fault(Producer, FaultVB, {stream_end_on_accept, state_changed}),
    ok = kv_sim:set_fault(Consumer, FaultVB, no_add_stream_answer_after_stream_end),
    io:format("~nMB-53445 replay: vbucket ~b ends with state_changed before its ADD_STREAM is "
              "answered,~n  and the consumer never answers it.~n", [FaultVB]),
    T0 = erlang:monotonic_time(microsecond),
    Reply = dcp_replicator:setup_replication(Rep, VBuckets ++ [FaultVB]),
    Ms = (erlang:monotonic_time(microsecond) - T0) / 1000,
    io:format("  setup_replication -> ~p after ~.1f ms (no hang)~n", [Reply, Ms]),
    Expected = Reply =:= {errors, [{{stream_end, state_changed}, {vbucket, FaultVB}}]},
    #{reply => Reply, ms => Ms, expected => Expected}.

splitter(Stats, Side) ->
    maps:get(splitter, maps:get(Side, Stats), #{}).

splitter_stat(Stats, Side, Key) ->
    maps:get(Key, splitter(Stats, Side), 0).

cpu_ms() ->
    {Total, _} = erlang:statistics(runtime),
    Total.

table(Rows) ->
    Width = lists:max([length(K) || {K, _} <- Rows]),
    Line = lists:duplicate(Width + 30, $-),
    [Line, "\n",
     [io_lib:format("~-*s  ~s~n", [Width, K, V]) || {K, V} <- Rows],
     Line].
