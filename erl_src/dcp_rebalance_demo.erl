%% @doc The main job (`make demo'): a cluster rebalance. This module is demo code, not library: it
%% plays ns_server's rebalancer (the orchestrator that ns_rebalancer and ns_single_vbucket_mover are),
%% driving on every node the per-bucket `dcp_replication_manager' and ns_server's calls in `dcp_ns'.
%%
%% Four cluster nodes, each a distributed Erlang node started with OTP's `peer' running its own dcp_proxy
%% application with the manager of its incoming replications, as on an ns_server node, beside its
%% memcached: a kv_sim (role `node': the active vbuckets it serves, the replicas it stores) in a peer VM
%% of its own, as memcached is a process of its own beside ns_server. One bucket of
%% 1024 vbuckets with one replica lives on three nodes; the rebalance brings in the fourth:
%% <ol>
%% <li>build the new replicas on the new node (its manager's desired map grows),</li>
%% <li>wait for the data move on each old active (`dcp_ns:wait_for_data_move/3' over
%%     `STATS dcp-vbtakeover'),</li>
%% <li>move a quarter of the actives by takeover (`dcp_ns:takeover/3' on the new node),</li>
%% <li>set every node's replications to the new map and drop the copies that are no longer in it.</li>
%% </ol>
%% On the first attempt kv_sim injects the MB-53445 fault (`{stream_end_on_accept, state_changed}' on
%% the producer, `no_add_stream_answer_after_stream_end' on the consumer) into a few builds: each fails
%% fast with `{stream_end, state_changed}', the orchestrator reports it, clears the fault and retries,
%% and the rebalance completes. Then every vbucket's active and replica digests are compared on every
%% node. The bucket has four collections (the default and three more, each created by a system event
%% on every vbucket) and in every vbucket some durable writes (committed, aborted and one left
%% pending); the replicators negotiate what ns_server's do (its feature proplist: xattr, collections,
%% snappy, json, del_times, set_consumer_name), so the collections travel with their system events
%% and the durable writes as DCP_PREPARE / COMMIT / ABORT, the consumers acknowledging the prepares
%% (DCP_SEQNO_ACKNOWLEDGED) through the proxies. The check covers each vbucket's live documents,
%% its durable writes (pending prepares included), and a per-collection table of the cluster.
-module(dcp_rebalance_demo).

-export([main/0, main/1, run/1]).

%% called on the cluster nodes
-export([node_setup/1, node_start/1, node_kv/2, node_digests/1, node_collections/1, node_acks/1,
         node_cpu_ms/0, node_bytes/0,
         node_wait_moves/2, node_takeovers/2, node_stop/1]).

-define(USER, "Administrator").
-define(PASSWORD, "password").
-define(BUCKET, "default").
-define(SEED, 42).
-define(CALL_TIMEOUT, 120000).
%% the default collection and three more
-define(COLLECTIONS, [0, 8, 9, 10]).
%% per vbucket
-define(DURABLE, #{committed => 4, aborted => 2, pending => 1}).
%% ns_server's replication features (a proplist, as it passes them)
-define(FEATURES, [{xattr, true}, {collections, true}, {snappy, true}, {json, true}, {del_times, true},
                   {del_user_xattr, false}, {set_consumer_name, true}, {ssl, false}]).

-type opts() :: #{vbuckets => pos_integer(), docs => non_neg_integer(), value_size => pos_integer(),
                  connections => pos_integer(), faults => non_neg_integer(),
                  batch => pos_integer(), quiet => boolean(),
                  durable_writes => #{committed => non_neg_integer(), aborted => non_neg_integer(),
                                      pending => non_neg_integer()}}.
-export_type([opts/0]).

%% ---- the orchestrator ----

-spec main() -> ok.
main() ->
    main(#{}).

%% @doc Runs the rebalance and halts the VM with status 1 if a check failed (for `make demo').
-spec main(opts()) -> ok.
main(Opts) ->
    ok = logger:set_primary_config(level, error),
    case catch run(Opts) of
        #{ok := true} -> ok;
        Other -> io:format("~nrebalance demo FAILED: ~p~n", [Other]), erlang:halt(1)
    end.

%% @doc Runs the rebalance; `ok' is true when it completed and every digest matched.
-spec run(opts()) -> #{ok := boolean(), atom() => term()}.
run(Opts) ->
    NumVBs = maps:get(vbuckets, Opts, 1024),
    Docs = maps:get(docs, Opts, 100),
    ValueSize = maps:get(value_size, Opts, 256),
    Conns = maps:get(connections, Opts, 2),
    NumFaults = maps:get(faults, Opts, 4),
    Batch = maps:get(batch, Opts, 128),
    Quiet = maps:get(quiet, Opts, false),
    Durable = maps:get(durable_writes, Opts, ?DURABLE),
    Say = fun(Fmt, Args) -> Quiet orelse io:format(Fmt, Args) end,
    T0 = now_ms(),
    ok = ensure_distributed(),
    Peers = start_nodes(4),
    Nodes = [Node || {_, Node, _, _} <- Peers],
    persistent_term:put({?MODULE, kv_nodes}, maps:from_list([{N, K} || {_, N, _, K} <- Peers])),
    try
        [N0, N1, N2, N3] = Nodes,
        Old = [N0, N1, N2],
        VBs = lists:seq(0, NumVBs - 1),
        OldMap = maps:from_list([{V, chain(Old, V)} || V <- VBs]),
        NewMap = maps:from_list([{V, new_chain(N3, V, maps:get(V, OldMap))} || V <- VBs]),
        Say("dcp_proxy rebalance demo: bucket ~s, ~b vbuckets x ~b documents of ~b bytes, 1 replica, "
            "~b connections per node pair~n  collections ~w (ids), durable writes per vbucket ~w~n"
            "  features ~w~n  nodes ~p (peer VMs)~n",
            [?BUCKET, NumVBs, Docs, ValueSize, Conns, ?COLLECTIONS, Durable,
             [F || {F, true} <- ?FEATURES], Nodes]),
        %% every node: its kv_sim (holding its part of the old map) and its dcp_proxy
        Ports = maps:from_list(
                  pmap(fun(Node) ->
                               Held = fun(Pos) -> [V || V <- VBs, nth(Pos, maps:get(V, OldMap)) =:= Node] end,
                               {Node, kvcall(Node, node_setup,
                                           [#{vbuckets => NumVBs, docs => Docs, value_size => ValueSize,
                                              durable_writes => Durable,
                                              active => Held(1), replica => Held(2)}])}
                       end, Nodes)),
        _ = pmap(fun(Node) -> ok = call(Node, node_start, [#{ports => Ports, connections => Conns}]) end,
                 Nodes),
        Cpu0 = cpu(Nodes),
        %% each vbucket's digest on its active before the rebalance: the rebalance must keep it
        Before = maps:from_list(
                   lists:append(pmap(fun(N) ->
                                             Mine = [V || V <- VBs, hd(maps:get(V, OldMap)) =:= N],
                                             [{V, D} || {V, {_, D}} <- maps:to_list(
                                                                         kvcall(N, node_digests, [Mine]))]
                                     end, Nodes))),
        BeforeCounts = counts_by_node(Nodes, VBs),
        %% the cluster before the rebalance: every replica streaming from its active
        {TInit, ok} = timed(fun() -> apply_map(Nodes, OldMap, VBs) end),
        Say("  phase 0  replications of the 3-node map set up            ~6b ms~n", [TInit]),
        %% ---- 1: build the new replicas ----
        Builds = [{V, hd(maps:get(V, OldMap)), N}
                  || V <- VBs, N <- maps:get(V, NewMap), not lists:member(N, maps:get(V, OldMap))],
        Faulted = lists:sublist([B || B <- Builds, element(1, B) rem 7 =:= 5], NumFaults),
        [begin
             ok = kvcall(Src, node_kv, [set_fault, [V, {stream_end_on_accept, state_changed}]]),
             ok = kvcall(Dest, node_kv, [set_fault, [V, no_add_stream_answer_after_stream_end]])
         end || {V, Src, Dest} <- Faulted],
        [ok = kvcall(Dest, node_kv, [set_vbucket_state, [V, replica]]) || {V, _, Dest} <- Builds],
        {TBuild, {Failures, Retries}} =
            timed(fun() -> build_replicas(Nodes, OldMap, Builds, Faulted, Batch, Say) end),
        Say("  phase 1  ~b replicas built on ~p (~b failed fast, ~b retried)   ~6b ms~n",
            [length(Builds), N3, length(Failures), Retries, TBuild]),
        %% ---- 2: wait for the data move, on each producer ----
        {TWait, ok} = timed(fun() ->
                                    BySrc = group([{Src, {Dest, V}} || {V, Src, Dest} <- Builds]),
                                    _ = pmap(fun({Src, Moves}) ->
                                                     ok = call(Src, node_wait_moves, [Moves, 0])
                                             end, BySrc),
                                    ok
                            end),
        Say("  phase 2  data move done (dcp-vbtakeover estimates 0)        ~6b ms~n", [TWait]),
        Bytes = lists:sum(pmap(fun(N) -> call(N, node_bytes, []) end, Nodes)),
        %% ---- 3: move the actives by takeover ----
        Takeovers = [{V, hd(maps:get(V, OldMap)), hd(maps:get(V, NewMap))}
                     || V <- VBs, hd(maps:get(V, NewMap)) =/= hd(maps:get(V, OldMap))],
        {TTake, {TakeFailures, TakeRetries}} = timed(fun() -> takeovers(Takeovers) end),
        Say("  phase 3  ~b actives moved by takeover (~b retried)          ~6b ms~n",
            [length(Takeovers), TakeRetries, TTake]),
        %% ---- 4: the new map's replications; old copies dropped ----
        {TDrop, Dropped} = timed(fun() -> finish_map(Nodes, OldMap, NewMap, VBs) end),
        Say("  phase 4  new map's replications set, ~b old copies dropped   ~6b ms~n",
            [Dropped, TDrop]),
        %% ---- verify ----
        {TCheck, {Mismatches, Checked}} = timed(fun() -> verify(Nodes, NewMap, VBs, Before) end),
        Say("  verify   ~b vbuckets x 4 nodes: active = replica = pre-rebalance digest and durable "
            "writes, no stray copies   ~6b ms~n", [Checked, TCheck]),
        Collections = collection_table(Nodes, NewMap, VBs, OldMap, BeforeCounts, N3),
        Acks = lists:sum(pmap(fun(N) -> kvcall(N, node_acks, [VBs]) end, Nodes)),
        Cpu1 = cpu(Nodes),
        Total = now_ms() - T0,
        AllFailures = Failures ++ TakeFailures,
        Ok = Mismatches =:= [] andalso TakeFailures =:= [] andalso length(Failures) =:= length(Faulted)
            andalso collections_agree(Collections),
        Result = #{ok => Ok, builds => length(Builds), takeovers => length(Takeovers),
                   dropped => Dropped, docs_moved => lists:sum([element(1, maps:get(V, Before)) || {V, _, _} <- Builds]), bytes => Bytes,
                   failures => AllFailures, retries => Retries + TakeRetries,
                   mismatches => Mismatches, total_ms => Total,
                   collections => Collections, seqno_acks => Acks,
                   phases_ms => #{init => TInit, build => TBuild, wait => TWait, takeover => TTake,
                                  drop => TDrop, verify => TCheck},
                   cpu_ms => maps:map(fun(N, {P1, K1}) ->
                                              {P0, K0} = maps:get(N, Cpu0),
                                              {P1 - P0, K1 - K0}
                                      end, Cpu1)},
        Quiet orelse print_table(Result, Nodes),
        Result
    after
        %% every node's replications stop before any kv_sim does
        _ = pmap(fun(N) -> catch call(N, node_stop, [manager]) end, Nodes),
        _ = pmap(fun(N) -> catch kvcall(N, node_stop, [kv]) end, Nodes),
        _ = [catch peer:stop(X) || {P, _, KP, _} <- Peers, X <- [P, KP]],
        persistent_term:erase({?MODULE, kv_nodes})
    end.

%% V's chain on the three old nodes: active V rem 3, replica on the next node.
chain(Nodes, V) ->
    N = length(Nodes),
    [lists:nth(V rem N + 1, Nodes), lists:nth((V + 1) rem N + 1, Nodes)].

%% The new node takes every fourth vbucket's active (the old active stays as its replica) and every
%% fourth vbucket's replica: a quarter of the actives and of the replicas move to it.
new_chain(New, V, [Active, _Replica]) when V rem 4 =:= 3 -> [New, Active];
new_chain(New, V, [Active, _Replica]) when V rem 4 =:= 1 -> [Active, New];
new_chain(_New, _V, Chain) -> Chain.

nth(I, L) -> lists:nth(I, L).

%% Each node's incoming replications under a map: from each active, the vbuckets it replicates.
incoming(Map, VBs, Node) ->
    group([{Active, V} || V <- VBs, [Active, Replica] <- [maps:get(V, Map)], Replica =:= Node]).

apply_map(Nodes, Map, VBs) ->
    Replies = pmap(fun(Node) ->
                           dcp_set(Node, incoming(Map, VBs, Node))
                   end, Nodes),
    [] = [R || R <- Replies, R =/= ok],
    ok.

dcp_set(Node, Desired) ->
    erpc:call(Node, dcp_replication_manager, set_desired_replications,
              [dcp_replication_manager:server_name(?BUCKET), Desired], ?CALL_TIMEOUT).

%% The builds go to the new node's manager in batches (its desired map grows by a batch per call); a
%% batch whose reply names failed vbuckets has them retried once the fault is cleared, as a rebalancer
%% retries a failed move.
build_replicas(Nodes, OldMap, Builds, Faulted, Batch, Say) ->
    ByDest = group([{Dest, {Src, V}} || {V, Src, Dest} <- Builds]),
    Results = pmap(fun({Dest, Moves}) ->
                           Base = [{S, VBs} || {S, VBs} <- incoming(OldMap, maps:keys(OldMap), Dest)],
                           build_batches(Dest, Base, chunks(Moves, Batch), [], 0, Nodes, Faulted, Say)
                   end, ByDest),
    {lists:append([F || {F, _} <- Results]), lists:sum([R || {_, R} <- Results])}.

build_batches(_Dest, _Desired, [], Failures, Retries, _Nodes, _Faulted, _Say) ->
    {lists:reverse(Failures), Retries};
build_batches(Dest, Desired, [Moves | Rest], Failures, Retries, Nodes, Faulted, Say) ->
    Desired1 = merge_desired(Desired, Moves),
    T0 = now_ms(),
    case dcp_set(Dest, Desired1) of
        ok ->
            build_batches(Dest, Desired1, Rest, Failures, Retries, Nodes, Faulted, Say);
        {errors, Errors} ->
            Took = now_ms() - T0,
            New = [{Why, V, Took} || {Why, {vbucket, V}} <- Errors],
            [Say("           build of vbucket ~b on ~s failed after ~b ms: ~0p; retrying~n",
                 [V, short(Dest), Took, Why]) || {Why, V, _} <- New],
            %% the first attempt's faults are gone for the retry
            [begin
                 ok = kvcall(Src, node_kv, [clear_faults, []]),
                 ok = kvcall(D, node_kv, [clear_faults, []])
             end || {_, Src, D} <- Faulted],
            case dcp_set(Dest, Desired1) of
                ok ->
                    build_batches(Dest, Desired1, Rest, lists:reverse(New, Failures),
                                  Retries + length(New),
                                  Nodes, Faulted, Say);
                Again ->
                    error({build_retry_failed, Dest, Again})
            end
    end.

merge_desired(Desired, Moves) ->
    Adds = group(Moves),
    Keys = lists:usort([K || {K, _} <- Desired ++ Adds]),
    [{K, lists:usort(proplists:get_value(K, Desired, []) ++ proplists:get_value(K, Adds, []))}
     || K <- Keys].

%% Takeovers run on the new active, one worker per old active (each connection takes over one
%% vbucket at a time); a failed one is retried once.
takeovers(Takeovers) ->
    ByPair = group([{{Dest, Src}, V} || {V, Src, Dest} <- Takeovers]),
    Results = pmap(fun({{Dest, Src}, VBs}) -> call(Dest, node_takeovers, [Src, VBs]) end, ByPair),
    {lists:append([F || {F, _} <- Results]), lists:sum([R || {_, R} <- Results])}.

%% Every node's replications become the new map's (the old streams of moved vbuckets close), the old
%% actives that stay as replicas become `replica' again, and copies outside the new map are dropped.
finish_map(Nodes, OldMap, NewMap, VBs) ->
    [ok = kvcall(Replica, node_kv, [set_vbucket_state, [V, replica]])
     || V <- VBs, [_, Replica] <- [maps:get(V, NewMap)], Replica =:= hd(maps:get(V, OldMap))],
    ok = apply_map(Nodes, NewMap, VBs),
    Drops = [{Node, V} || V <- VBs, Node <- maps:get(V, OldMap),
                          not lists:member(Node, maps:get(V, NewMap))],
    [ok = kvcall(Node, node_kv, [delete_vbucket, [V]]) || {Node, V} <- Drops],
    length(Drops).

%% Every vbucket: the active's and the replica's digests agree and hold every document; the other
%% nodes hold nothing of it; the states are the new map's.
verify(Nodes, NewMap, VBs, Before) ->
    wait_replicas(Nodes, NewMap, VBs, 200),
    Digests = maps:from_list(pmap(fun(N) -> {N, kvcall(N, node_digests, [VBs])} end, Nodes)),
    Bad = [{V, Node, State, element(1, D)}
           || V <- VBs, [Active, Replica] <- [maps:get(V, NewMap)],
              Node <- Nodes,
              {State, D} <- [maps:get(V, maps:get(Node, Digests))],
              not case Node of
                      Active -> State =:= active andalso D =:= maps:get(V, Before)
                                    andalso D =:= element(2, maps:get(V, maps:get(Replica, Digests)));
                      Replica -> State =:= replica andalso D =:= maps:get(V, Before);
                      _ -> element(1, D) =:= 0 andalso State =/= active
                               andalso maps:get(prepares, element(3, D)) =:= 0
                  end],
    {Bad, length(VBs)}.

%% Each node's per-collection document counts and durable-write counts of every vbucket.
counts_by_node(Nodes, VBs) ->
    maps:from_list(pmap(fun(N) -> {N, kvcall(N, node_collections, [VBs])} end, Nodes)).

%% The cluster's per-collection table: for each collection (and each kind of durable write), the
%% sum over the vbuckets of their actives and of their replicas, before and after the rebalance, and
%% what the new node holds of it (actives and replicas) after.
collection_table(Nodes, NewMap, VBs, OldMap, Before, New) ->
    After = counts_by_node(Nodes, VBs),
    Rows = [{collection, C} || C <- ?COLLECTIONS]
        ++ [{durable, K} || K <- [prepares, commits, aborts, pending]],
    Count = fun({collection, C}, {_State, Counts, _}) -> maps:get(C, Counts, 0);
               ({durable, K}, {_State, _, Durable}) -> maps:get(K, Durable)
            end,
    Sum = fun(Row, Counts, Map, Pos) ->
                  lists:sum([Count(Row, maps:get(V, maps:get(lists:nth(Pos, maps:get(V, Map)), Counts)))
                             || V <- VBs])
          end,
    [{Row, Sum(Row, Before, OldMap, 1), Sum(Row, Before, OldMap, 2), Sum(Row, After, NewMap, 1),
      Sum(Row, After, NewMap, 2),
      lists:sum([Count(Row, maps:get(V, maps:get(New, After))) || V <- VBs])}
     || Row <- Rows].

collections_agree(Table) ->
    lists:all(fun({_Row, BA, BR, AA, AR, _OnNew}) -> BA =:= BR andalso BR =:= AA andalso AA =:= AR end,
              Table).

%% Replicas set up in phase 4 may still be receiving; the check waits a little for them.
wait_replicas(_Nodes, _NewMap, _VBs, 0) ->
    ok;
wait_replicas(Nodes, NewMap, VBs, Tries) ->
    Digests = maps:from_list(pmap(fun(N) -> {N, kvcall(N, node_digests, [VBs])} end, Nodes)),
    Behind = [V || V <- VBs, [A, R] <- [maps:get(V, NewMap)],
                   element(2, maps:get(V, maps:get(A, Digests)))
                       =/= element(2, maps:get(V, maps:get(R, Digests)))],
    case Behind of
        [] -> ok;
        _ -> timer:sleep(25), wait_replicas(Nodes, NewMap, VBs, Tries - 1)
    end.

print_table(#{builds := Builds, takeovers := Takeovers, dropped := Dropped, docs_moved := DocsMoved,
              bytes := Bytes, failures := Failures, retries := Retries, total_ms := Total,
              phases_ms := Phases, cpu_ms := Cpu, mismatches := Mismatches, ok := Ok,
              collections := Collections, seqno_acks := Acks}, Nodes) ->
    Line = "  +" ++ lists:duplicate(40, $-) ++ "+" ++ lists:duplicate(54, $-) ++ "+~n",
    io:format("~n" ++ Line),
    Row = fun(K, V) -> io:format("  | ~-38s | ~-52s |~n", [K, V]) end,
    F = fun(Fmt, A) -> lists:flatten(io_lib:format(Fmt, A)) end,
    Row("vbuckets moved", F("~b replicas built, ~b actives taken over", [Builds, Takeovers])),
    Row("old copies dropped", F("~b", [Dropped])),
    Row("documents moved", F("~b (~.1f MiB through the proxies)", [DocsMoved, Bytes / 1048576])),
    Row("time", F("~.1f s in all (peers, seeding and checks included)", [Total / 1000])),
    Row("", F("build ~b ms, wait for data move ~b ms,", [maps:get(build, Phases), maps:get(wait, Phases)])),
    Row("", F("takeover ~b ms, drop ~b ms, verify ~b ms",
              [maps:get(takeover, Phases), maps:get(drop, Phases), maps:get(verify, Phases)])),
    _ = [Row(F("proxy CPU ~s", [short(N)]), F("~b ms (its memcached, a kv_sim VM: ~b ms)",
                                          tuple_to_list(maps:get(N, Cpu))))
     || N <- Nodes],
    ByReason = group([{Why, Took} || {Why, _V, Took} <- Failures]),
    _ = case ByReason of
        [] -> Row("failures", "none");
        _ -> [Row(F("failures ~0p", [Why]),
                  F("~b, surfaced in ~b..~b ms (setup deadline 10 s)", [length(Ts), lists:min(Ts),
                                                                         lists:max(Ts)]))
              || {Why, Ts} <- ByReason]
    end,
    Row("retries", F("~b moves retried, all completed", [Retries])),
    Row("digest mismatches", F("~b", [length(Mismatches)])),
    Row("durable writes acknowledged", F("~b DCP_SEQNO_ACKNOWLEDGED received by producers", [Acks])),
    io:format(Line),
    print_collections(Collections, Nodes),
    case Ok of
        true ->
            io:format("~nverdict: rebalance 3 -> 4 nodes COMPLETED in ~.1f s; ~b injected MB-53445 "
                      "failures failed fast and were retried; every vbucket's active and replica "
                      "digests and durable writes match, ~b collections agree~n",
                      [Total / 1000, length(Failures), length(?COLLECTIONS)]);
        false ->
            io:format("~nverdict: rebalance FAILED (~b mismatches, failures ~p)~n",
                      [length(Mismatches), Failures])
    end.

%% Documents per collection and durable writes over the cluster: actives and replicas agree, before
%% and after, and the new node holds its share.
print_collections(Table, Nodes) ->
    New = short(lists:last(Nodes)),
    Line = "  +" ++ lists:duplicate(28, $-) ++ "+" ++ lists:duplicate(25, $-) ++ "+"
        ++ lists:duplicate(25, $-) ++ "+" ++ lists:duplicate(16, $-) ++ "+~n",
    io:format("~n" ++ Line),
    io:format("  | ~-26s | ~23s | ~23s | ~14s |~n",
              ["documents over the cluster", "before: active  replica", "after: active  replica",
               "on " ++ New ++ " (new)"]),
    io:format(Line),
    lists:foreach(fun({Row, BA, BR, AA, AR, OnNew}) ->
                          Name = case Row of
                                     {collection, 0} -> "collection _default (0)";
                                     {collection, C} -> io_lib:format("collection ~s (~b)",
                                                                      [kv_sim:collection_name(C), C]);
                                     {durable, K} -> io_lib:format("durable ~s", [K])
                                 end,
                          io:format("  | ~-26s | ~14b ~8b | ~14b ~8b | ~14b |~n",
                                    [lists:flatten(Name), BA, BR, AA, AR, OnNew])
                  end, Table),
    io:format(Line).

short(Node) ->
    hd(string:split(atom_to_list(Node), "@")).

%% ---- peers ----

ensure_distributed() ->
    case node() of
        nonode@nohost ->
            _ = os:cmd("epmd -daemon"),
            Name = list_to_atom("rebalance_demo_" ++ integer_to_list(erlang:unique_integer([positive]))
                                ++ "@127.0.0.1"),
            case net_kernel:start([Name, longnames]) of
                {ok, _} -> ok;
                {error, Reason} -> error({distribution_failed, Reason})
            end;
        _ ->
            ok
    end.

%% Each cluster node is two peer VMs, as an ns_server node is an Erlang VM beside its memcached
%% process: `nI' runs the node's dcp_proxy (its replication manager and replicators), `kvI' its
%% kv_sim. So `nI''s CPU is the proxy's alone.
start_nodes(Count) ->
    Paths = lists:append([["-pa", P] || P <- code:get_path(), string:find(P, "_build") =/= nomatch]),
    Cookie = atom_to_list(erlang:get_cookie()),
    Tag = integer_to_list(erlang:unique_integer([positive])),
    Start = fun(Name) ->
                    {ok, Peer, Node} = peer:start(
                                         #{name => list_to_atom(Name ++ "_" ++ Tag),
                                           host => "127.0.0.1", longnames => true,
                                           connection => standard_io,
                                           %% the peers only talk to the orchestrator
                                           args => ["-setcookie", Cookie, "-connect_all", "false",
                                                    "+sbwt", "none", "+sbwtdcpu", "none",
                                                    "+sbwtdio", "none" | Paths]}),
                    {Peer, Node}
            end,
    pmap(fun(I) ->
                 {Peer, Node} = Start("n" ++ integer_to_list(I)),
                 {KvPeer, KvNode} = Start("kv" ++ integer_to_list(I)),
                 {Peer, Node, KvPeer, KvNode}
         end, lists:seq(0, Count - 1)).

call(Node, F, A) ->
    erpc:call(Node, ?MODULE, F, A, ?CALL_TIMEOUT).

%% A call on the cluster node's memcached (its kv_sim VM).
kvcall(Node, F, A) ->
    call(maps:get(Node, persistent_term:get({?MODULE, kv_nodes})), F, A).

cpu(Nodes) ->
    maps:from_list(pmap(fun(N) -> {N, {call(N, node_cpu_ms, []), kvcall(N, node_cpu_ms, [])}} end,
                        Nodes)).

%% ---- on a cluster node ----

%% @private Starts the node's kv_sim holding its active and replica vbuckets; returns its port.
-spec node_setup(map()) -> inet:port_number().
node_setup(#{vbuckets := NumVBs, docs := Docs, value_size := ValueSize, active := Active,
             replica := Replica} = Setup) ->
    ok = logger:set_primary_config(level, error),
    {ok, Kv} = kv_sim:start(#{role => node, bucket => ?BUCKET, user => ?USER, password => ?PASSWORD,
                              vbuckets => NumVBs, docs_per_vbucket => Docs, value_size => ValueSize,
                              seed => ?SEED, active_vbuckets => Active, replica_vbuckets => Replica,
                              collections => ?COLLECTIONS,
                              durable_writes => maps:get(durable_writes, Setup)}),
    persistent_term:put({?MODULE, kv}, Kv),
    kv_sim:port(Kv).

%% @private The node's dcp_proxy application and its bucket's replication manager (ns_server's name).
-spec node_start(map()) -> ok.
node_start(#{ports := Ports, connections := Conns}) ->
    ok = logger:set_primary_config(level, error),
    {ok, _} = application:ensure_all_started(dcp_proxy),
    Self = node(),
    Config = #{resolve => fun(N) -> #{host => {127, 0, 0, 1}, port => maps:get(N, Ports),
                                      local => N =:= Self} end,
               credentials => fun() -> {?USER, ?PASSWORD} end,
               connections => Conns, move_done_limit => 1, poll_interval => 5, move_timeout => 60000,
               replicator => #{setup_timeout => 10000, features => ?FEATURES}},
    ok = dcp_ns:configure(Config),
    Parent = self(),
    %% the manager's link goes to a holder that lives as long as the node
    Holder = spawn(fun() ->
                           process_flag(trap_exit, true),
                           Parent ! {started, self(), dcp_replication_manager:start_link(?BUCKET)},
                           receive stop -> ok end
                   end),
    receive {started, Holder, {ok, _}} -> ok end,
    persistent_term:put({?MODULE, holder}, Holder),
    ok.

%% @private A kv_sim call on this node's kv_sim.
-spec node_kv(atom(), list()) -> term().
node_kv(F, Args) ->
    apply(kv_sim, F, [persistent_term:get({?MODULE, kv}) | Args]).

%% @private Each vbucket's state and digest on this node: its live documents' count and hash, and
%% its durable writes.
-spec node_digests([0..1023]) -> #{0..1023 => {atom(), {non_neg_integer(), binary(), map()}}}.
node_digests(VBs) ->
    Kv = persistent_term:get({?MODULE, kv}),
    maps:from_list([{V, {kv_sim:vbucket_state(Kv, V),
                         erlang:append_element(kv_sim:digest(Kv, V), kv_sim:durable_state(Kv, V))}}
                    || V <- VBs]).

%% @private Each vbucket's state, documents per collection and durable-write counts on this node.
-spec node_collections([0..1023]) -> #{0..1023 => {atom(), #{non_neg_integer() => non_neg_integer()},
                                                   #{atom() => non_neg_integer()}}}.
node_collections(VBs) ->
    Kv = persistent_term:get({?MODULE, kv}),
    maps:from_list([{V, {kv_sim:vbucket_state(Kv, V), kv_sim:collection_counts(Kv, V),
                         durable_counts(kv_sim:durable_state(Kv, V))}} || V <- VBs]).

durable_counts(#{pending := Pending} = Durable) ->
    (maps:with([prepares, commits, aborts], Durable))#{pending => length(Pending)}.

%% @private The DCP_SEQNO_ACKNOWLEDGEDs this node's producer connections received.
-spec node_acks([0..1023]) -> non_neg_integer().
node_acks(VBs) ->
    Kv = persistent_term:get({?MODULE, kv}),
    lists:sum([length(kv_sim:seqno_acks(Kv, V)) || V <- VBs]).

%% @private This VM's user + system CPU (ms) from /proc; 0 where it is missing.
-spec node_cpu_ms() -> non_neg_integer().
node_cpu_ms() ->
    case file:read_file("/proc/self/stat") of
        {ok, Stat} ->
            [_, After] = string:split(Stat, ")", trailing),
            Fields = string:lexemes(After, " "),
            (binary_to_integer(lists:nth(12, Fields)) + binary_to_integer(lists:nth(13, Fields))) * 10;
        _ ->
            0
    end.

%% @private Bytes the node's replicators read from their producers so far.
-spec node_bytes() -> non_neg_integer().
node_bytes() ->
    lists:sum([try
                   #{producer := #{bytes_in := B}} = dcp_replicator:stats(Pid),
                   B
               catch _:_ -> 0
               end || {_, Pid, _, _} <- dcp_ns:get_children(?BUCKET)]).

%% @private On a producer: waits for the data move of each `{ConsumerNode, VB}' (ns_server's mover).
-spec node_wait_moves([{node(), 0..1023}], non_neg_integer()) -> ok.
node_wait_moves(Moves, _) ->
    lists:foreach(fun({Dest, V}) -> ok = dcp_ns:wait_for_data_move([Dest], ?BUCKET, V) end, Moves).

%% @private On the new active: takes each vbucket over from `Src', retrying a failed one once.
-spec node_takeovers(node(), [0..1023]) -> {[{term(), 0..1023, non_neg_integer()}], non_neg_integer()}.
node_takeovers(Src, VBs) ->
    lists:foldl(fun(V, {Failures, Retries}) ->
                        T0 = now_ms(),
                        case dcp_ns:takeover(Src, ?BUCKET, V) of
                            ok ->
                                {Failures, Retries};
                            {errors, [{Why, _} | _]} ->
                                Took = now_ms() - T0,
                                ok = dcp_ns:takeover(Src, ?BUCKET, V),
                                {[{Why, V, Took} | Failures], Retries + 1}
                        end
                end, {[], 0}, VBs).

%% @private Stops the node's manager (its replications) or its kv_sim.
-spec node_stop(manager | kv) -> ok.
node_stop(manager) ->
    catch dcp_replication_manager:stop(dcp_replication_manager:server_name(?BUCKET)),
    ok;
node_stop(kv) ->
    catch kv_sim:stop(persistent_term:get({?MODULE, kv})),
    ok.

%% ---- small things ----

now_ms() ->
    erlang:monotonic_time(millisecond).

timed(Fun) ->
    T0 = now_ms(),
    R = Fun(),
    {now_ms() - T0, R}.

pmap(Fun, List) ->
    Self = self(),
    Refs = [{spawn_monitor(fun() -> Self ! {self(), pmap, Fun(X)} end), X} || X <- List],
    [receive
         {Pid, pmap, R} -> erlang:demonitor(Ref, [flush]), R;
         {'DOWN', Ref, process, Pid, Reason} -> error({pmap_failed, X, Reason})
     end || {{Pid, Ref}, X} <- Refs].

group(Pairs) ->
    lists:sort(maps:to_list(lists:foldl(fun({K, V}, Acc) ->
                                                maps:update_with(K, fun(L) -> L ++ [V] end, [V], Acc)
                                        end, #{}, Pairs))).

chunks([], _N) -> [];
chunks(L, N) when length(L) =< N -> [L];
chunks(L, N) -> {H, T} = lists:split(N, L), [H | chunks(T, N)].
