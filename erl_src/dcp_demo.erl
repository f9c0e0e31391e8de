%% @doc The main job (`make demo'): two simulated kv_engine nodes on loopback and a replicator between
%% them; replicates seeded vbuckets, verifies every digest, then replays MB-53445 and shows the reply.
-module(dcp_demo).

-export([main/0, main/1, cli/1, run/1, check_opts/1]).

-define(COLLECTIONS, [0, 8, 9]).
%% durable writes per vbucket, after its documents
-define(DURABLE, #{committed => 10, aborted => 5, pending => 2}).
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

%% @doc `make demo': `erl -run dcp_demo cli VBUCKETS DOCS VALUE_SIZE'. A value that is not a number
%% in its range is refused at once (exit status 2).
-spec cli([string()]) -> no_return().
cli(Args) ->
    Keys = [vbuckets, docs, value_size],
    Opts = maps:from_list([{K, parse_int(V)} || {K, V} <- lists:zip(Keys, lists:sublist(Args, 3))]),
    main(Opts),
    erlang:halt(0).

parse_int(S) ->
    case string:to_integer(S) of
        {N, ""} -> N;
        _ -> S
    end.

%% @doc Refuses options the demo cannot run: vbuckets 1..1024, docs 1..10000000 per vbucket,
%% value_size 1..20 MiB.
-spec check_opts(map()) -> ok | {error, string()}.
check_opts(Opts) ->
    Bad = [io_lib:format("~s must be an integer in ~b..~b, not ~tp", [Name, Min, Max, V])
           || {Key, Name, Min, Max} <- [{vbuckets, "VBUCKETS", 1, 1024},
                                        {docs, "DOCS", 1, 10000000},
                                        {value_size, "VALUE_SIZE", 1, 20 * 1024 * 1024}],
              V <- [maps:get(Key, Opts, Min)],
              not (is_integer(V) andalso V >= Min andalso V =< Max)],
    case Bad of
        [] -> ok;
        _ -> {error, lists:flatten(lists:join("; ", Bad))}
    end.

%% @doc Runs the demo and halts the VM with status 1 if a check failed (for `make demo'), 2 if an
%% option is refused.
-spec main(opts()) -> ok.
main(Opts) ->
    ok = logger:set_primary_config(level, warning),
    case check_opts(Opts) of
        ok -> ok;
        {error, Why} -> io:format("demo refused: ~s~n", [Why]), erlang:halt(2)
    end,
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
    %% The MB-53445 replay needs a vbucket that is not replicated yet: the one after the last, or,
    %% with all 1024, the last one (then 1023 are replicated).
    {VBuckets, FaultVB} = case NumVBs of
                              1024 -> {lists:seq(0, 1022), 1023};
                              _ -> {lists:seq(0, NumVBs - 1), NumVBs}
                          end,
    NodeOpts = #{bucket => ?BUCKET, user => ?USER, password => ?PASSWORD,
                 vbuckets => FaultVB + 1, docs_per_vbucket => Docs, value_size => ValueSize,
                 %% the default collection and two more, and some durable writes (issue 12)
                 collections => ?COLLECTIONS, durable_writes => ?DURABLE},
    %% the simulated nodes run in a peer VM: this VM's CPU is the proxy's alone
    Peer = start_peer(),
    {ok, P} = node_call(Peer, start, [NodeOpts#{role => producer}]),
    {ok, C} = node_call(Peer, start, [NodeOpts#{role => consumer}]),
    {Producer, Consumer} = {{Peer, P}, {Peer, C}},
    Name = dcp_replicator:get_connection_name('consumer@127.0.0.1', 'producer@127.0.0.1',
                                               ?BUCKET, 0),
    io:format("dcp_proxy demo: ~b vbuckets x ~b documents of ~b bytes~n"
              "  producer kv_sim on 127.0.0.1:~b, consumer kv_sim on 127.0.0.1:~b~n"
              "  connection ~s~n~n",
              [NumVBs, Docs, ValueSize, kv(port, Producer, []), kv(port, Consumer, []), Name]),
    {ok, Rep} = dcp_replicator:start_link(
                  #{consumer => {"127.0.0.1", kv(port, Consumer, [])},
                    producer => {"127.0.0.1", kv(port, Producer, [])},
                    bucket => ?BUCKET, connection_name => Name,
                    user => ?USER, password => ?PASSWORD,
                    %% set_consumer_name (with json): the consumer asks for sync writes
                    features => [xattr, snappy, del_times, json, collections, set_consumer_name],
                    setup_timeout => 30000, splitter => Splitter}),
    unlink(Rep),
    try
        replicate_and_verify(Rep, Producer, Consumer, VBuckets, Docs, ValueSize, FaultVB)
    after
        exit(Rep, shutdown),
        kv(stop, Consumer, []),
        kv(stop, Producer, []),
        peer:stop(Peer)
    end.

replicate_and_verify(Rep, Producer, Consumer, VBuckets, Docs, ValueSize, FaultVB) ->
    CpuStart = cpu_ms(),
    PeerCpuStart = peer_cpu_ms(Producer),
    T0 = erlang:monotonic_time(microsecond),
    SetupReply = dcp_replicator:setup_replication(Rep, VBuckets),
    SetupUs = erlang:monotonic_time(microsecond) - T0,
    io:format("setup_replication(~b vbuckets) -> ~p in ~.1f ms~n",
              [length(VBuckets), SetupReply, SetupUs / 1000]),
    Total = length(VBuckets) * Docs,
    StreamUs = wait_for_mutations(Rep, Total, T0, erlang:monotonic_time(millisecond) + 120000,
                                  is_terminal(), T0),
    CpuMs = cpu_ms() - CpuStart,
    PeerCpuMs = peer_cpu_ms(Producer) - PeerCpuStart,
    Mismatches = verify_digests(Producer, Consumer, VBuckets, erlang:monotonic_time(millisecond) + 10000),
    io:format("digests: ~b of ~b vbuckets identical on both nodes~n",
              [length(VBuckets) - length(Mismatches), length(VBuckets)]),
    print_collection_counts(Producer, Consumer, VBuckets),
    DurableMismatches = verify_durable(Producer, Consumer, VBuckets,
                                       erlang:monotonic_time(millisecond) + 10000),
    print_durable(Producer, Consumer, VBuckets, DurableMismatches),
    Stats = dcp_replicator:stats(Rep),
    Mb53445 = replay_mb53445(Rep, Producer, Consumer, VBuckets, FaultVB),
    Bytes = splitter_stat(Stats, producer, bytes),
    Summary = [{"vbuckets replicated", integer_to_list(length(VBuckets))},
               {"documents", count(Total)},
               {"value size", bytes(ValueSize)},
               {"bytes proxied producer->consumer", bytes(Bytes)},
               {"throughput", io_lib:format("~.1f MiB/s",
                                            [Bytes / (1 bsl 20) / max(StreamUs / 1.0e6, 1.0e-6)])},
               {"proxy CPU (this VM) during replication", ms(CpuMs)},
               {"simulated nodes' CPU (peer VM)", ms(PeerCpuMs)},
               {"frames proxied (producer side)", count(splitter_stat(Stats, producer, frames))},
               {"frames proxied (consumer side)", count(splitter_stat(Stats, consumer, frames))},
               {"setup latency", ms(SetupUs / 1000)},
               {"MB-53445 setup reply", io_lib:format("~p", [maps:get(reply, Mb53445)])},
               {"MB-53445 answered in", ms(maps:get(ms, Mb53445))}],
    io:format("~n~s~n", [table(Summary)]),
    Ok = SetupReply =:= ok andalso Mismatches =:= [] andalso DurableMismatches =:= []
        andalso StreamUs =/= timeout
        andalso maps:get(expected, Mb53445),
    #{ok => Ok, setup_reply => SetupReply, mismatches => Mismatches, bytes => Bytes,
      stream_us => StreamUs, cpu_ms => CpuMs, peer_cpu_ms => PeerCpuMs, mb53445 => Mb53445}.

%% The proxy has seen every mutation; the consumer node may still be applying the last ones.
%% Documents per collection over the replicated vbuckets, on each node.
print_collection_counts(Producer, Consumer, VBuckets) ->
    Sum = fun(Node) ->
                  lists:foldl(fun(VB, Acc) ->
                                      maps:merge_with(fun(_, A, B) -> A + B end, Acc,
                                                      kv(collection_counts, Node, [VB]))
                              end, #{}, VBuckets)
          end,
    {PCounts, CCounts} = {Sum(Producer), Sum(Consumer)},
    io:format("documents per collection (producer / consumer):~n"),
    [io:format("  collection ~b: ~b / ~b~n",
               [Cid, maps:get(Cid, PCounts, 0), maps:get(Cid, CCounts, 0)])
     || Cid <- ?COLLECTIONS],
    ok.

%% Every vbucket's durable writes (counts and pending prepares) agree on both nodes.
verify_durable(Producer, Consumer, VBuckets, Deadline) ->
    Mismatches = [VB || VB <- VBuckets,
                        kv(durable_state, Producer, [VB]) =/= kv(durable_state, Consumer, [VB])],
    case Mismatches =/= [] andalso erlang:monotonic_time(millisecond) < Deadline of
        true ->
            timer:sleep(50),
            verify_durable(Producer, Consumer, Mismatches, Deadline);
        false ->
            Mismatches
    end.

print_durable(Producer, Consumer, VBuckets, Mismatches) ->
    Sum = fun(Node) ->
                  lists:foldl(fun(VB, Acc) ->
                                      #{pending := Pending} = D = kv(durable_state, Node, [VB]),
                                      Counts = (maps:with([prepares, commits, aborts], D))#{
                                                 pending => length(Pending)},
                                      maps:merge_with(fun(_, A, B) -> A + B end, Acc, Counts)
                              end, #{}, VBuckets)
          end,
    {P, C} = {Sum(Producer), Sum(Consumer)},
    Acks = lists:sum([length(kv(seqno_acks, Producer, [VB])) || VB <- VBuckets]),
    io:format("durable writes (producer / consumer): ~s~n"
              "  ~b DCP_SEQNO_ACKNOWLEDGED reached the producer; ~b of ~b vbuckets agree~n",
              [lists:join(", ", [io_lib:format("~s ~b / ~b", [K, maps:get(K, P), maps:get(K, C)])
                                 || K <- [prepares, commits, aborts, pending]]),
               Acks, length(VBuckets) - length(Mismatches), length(VBuckets)]).

verify_digests(Producer, Consumer, VBuckets, Deadline) ->
    Mismatches = [VB || VB <- VBuckets, kv(digest, Producer, [VB]) =/= kv(digest, Consumer, [VB])],
    case Mismatches =/= [] andalso erlang:monotonic_time(millisecond) < Deadline of
        true ->
            timer:sleep(50),
            verify_digests(Producer, Consumer, Mismatches, Deadline);
        false ->
            Mismatches
    end.

%% Progress comes from the proxy's own counters: mutations seen on the producer side.
wait_for_mutations(Rep, Total, T0, Deadline, Terminal, LastLine) ->
    Seen = mutations(dcp_replicator:stats(Rep)),
    Now = erlang:monotonic_time(microsecond),
    Line = io_lib:format("  streaming: ~s / ~s mutations (~.1f s)",
                         [count(Seen), count(Total), (Now - T0) / 1.0e6]),
    Done = Seen >= Total,
    LastLine1 = case Terminal of
                    true ->
                        io:format("\r~s   ", [Line]),
                        Now;
                    false when Done; Now - LastLine >= 1000000 ->
                        io:format("~s~n", [Line]),
                        Now;
                    false ->
                        LastLine
                end,
    if
        Done ->
            Terminal andalso io:format("~n"),
            Now - T0;
        Now div 1000 > Deadline ->
            io:format("~n  gave up waiting for mutations~n"),
            timeout;
        true ->
            timer:sleep(100),
            wait_for_mutations(Rep, Total, T0, Deadline, Terminal, LastLine1)
    end.

mutations(Stats) ->
    ByOpcode = maps:get(by_opcode, splitter(Stats, producer), #{}),
    maps:get(frames, maps:get(dcp_mutation, ByOpcode, #{}), 0).

%% MB-53445: the producer ends the new stream with state_changed as soon as it accepts it, and the
%% consumer then never answers the ADD_STREAM (kv_engine's error path). ns_server waited forever here.
replay_mb53445(Rep, Producer, Consumer, VBuckets, FaultVB) ->
    ok = kv(set_fault, Producer, [FaultVB, {stream_end_on_accept, state_changed}]),
    ok = kv(set_fault, Consumer, [FaultVB, no_add_stream_answer_after_stream_end]),
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

%% ---- the simulated nodes' VM ----

start_peer() ->
    Paths = lists:usort([filename:dirname(code:which(M)) || M <- [kv_sim, dcp_nif, ?MODULE]]),
    %% no busy-waiting schedulers on the peer: they would take CPU from the proxy
    NoSpin = ["+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"],
    {ok, Peer, _} = peer:start_link(#{connection => standard_io,
                                      args => NoSpin ++ lists:append([["-pa", P] || P <- Paths])}),
    Peer.

node_call(Peer, Fun, Args) ->
    peer:call(Peer, kv_sim, Fun, Args, 60000).

kv(Fun, {Peer, Node}, Args) ->
    node_call(Peer, Fun, [Node | Args]).

peer_cpu_ms({Peer, _}) ->
    {Total, _} = peer:call(Peer, erlang, statistics, [runtime]),
    Total.

%% ---- human units ----

bytes(B) when B >= 1 bsl 30 -> io_lib:format("~.2f GiB", [B / (1 bsl 30)]);
bytes(B) when B >= 1 bsl 20 -> io_lib:format("~.1f MiB", [B / (1 bsl 20)]);
bytes(B) when B >= 1 bsl 10 -> io_lib:format("~.1f KiB", [B / (1 bsl 10)]);
bytes(B) -> io_lib:format("~b B", [B]).

count(N) when N >= 1000000 -> io_lib:format("~.2f M", [N / 1.0e6]);
count(N) when N >= 10000 -> io_lib:format("~.1f k", [N / 1.0e3]);
count(N) -> integer_to_list(N).

ms(Ms) when Ms >= 1000 -> io_lib:format("~.2f s", [Ms / 1000]);
ms(Ms) -> io_lib:format("~.1f ms", [Ms / 1]).

%% A terminal gets one progress line rewritten in place; a pipe or a file a line per second.
is_terminal() ->
    case io:columns() of
        {ok, _} -> true;
        {error, _} -> false
    end.
