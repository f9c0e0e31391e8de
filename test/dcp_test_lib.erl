%% @doc The one harness of the tests that run kv_sim nodes: a fixture with fresh nodes (and a
%% replicator) per test that stops them all whatever the test did, the options to reach them, the
%% kv_sim faults the tests combine, waiting for replication or a condition, TLS configurations.
-module(dcp_test_lib).

-include_lib("eunit/include/eunit.hrl").

-export([with_nodes/3, with_pair/4, start_env/1, stop_env/1, stop_node/1,
         rep_opts/1, proxy_opts/2, password/0, connection_name/0,
         start_replicator/1, stop_replicator/1, wait_exit/1, start_failure/1, conn_failure/1,
         fail_stream/3, never_answer_after_stream_end/2, stream_end_error/2,
         assert_replicated/3, wait_until/1, wait_connected/1, wait_stats/2, frames/3, async/1,
         tls_configs/0, flush_exits/0]).

-export_type([env/0]).

-define(PASSWORD, "Never-Log-Me-7f3a").
-define(NAME, "replication:p_1@127.0.0.1->c_0@127.0.0.1:default").
%% EUnit timeouts are only a backstop: each test ends in seconds.
-define(BACKSTOP, 60).
%% A setup deadline that no test should reach (it would show up as `setup_timeout' in a reply).
-define(LONG_SETUP_TIMEOUT, 20000).
%% How long the consumer may take to hold what the producer has before the test fails.
-define(REPLICATION_WAIT_MS, 45000).

%% `rep' is `none' and `keeper' absent when the test starts no replicator.
-type env() :: #{producer := pid(), consumer := pid(), rep := pid() | none,
                 keeper => keeper()}.
-type keeper() :: {pid(), pid()}.

%% ---- the fixture ----

%% @doc A test: `Body(Env)' with fresh nodes and a replicator. `Opts' may hold `producer',
%% `consumer' (kv_sim options) and `rep' (replicator options, or `none' for no replicator), merged
%% over the defaults below.
-spec with_nodes(string(), map(), fun((env()) -> any())) -> {string(), tuple()}.
with_nodes(Title, Opts, Body) ->
    {Title, {setup, fun() -> start_env(Opts) end, fun stop_env/1,
             fun(Env) -> {timeout, ?BACKSTOP, ?_test(Body(Env))} end}}.

%% @doc Fresh nodes and a consumer conn and a producer conn proxying each other, without a
%% replicator: `Fun(C, P, ProducerNode, ConsumerNode)', then both conns and the nodes stopped.
-spec with_pair(map(), map(), timeout(), fun((pid(), pid(), pid(), pid()) -> any())) -> any().
with_pair(ProducerOpts, ConsumerOpts, SetupTimeout, Fun) ->
    process_flag(trap_exit, true),
    #{producer := Producer, consumer := Consumer} = Env =
        start_env(#{producer => ProducerOpts, consumer => ConsumerOpts, rep => none}),
    try
        {ok, C} = dcp_consumer_conn:start_link(proxy_opts(Consumer, #{}), SetupTimeout),
        {ok, P} = dcp_producer_conn:start_link(proxy_opts(Producer, #{})),
        ok = dcp_proxy:connect_proxies(C, P),
        try
            Fun(C, P, Producer, Consumer)
        after
            dcp_proxy:terminate_and_wait([C, P], shutdown, 5000),
            flush_exits()
        end
    after
        stop_env(Env)
    end.

%% @doc Starts the two nodes (16 vbuckets; the producer with 20 documents of 64 bytes in each)
%% and, unless `rep => none', a replicator between them.
-spec start_env(map()) -> env().
start_env(Opts) ->
    ProducerOpts = maps:merge(#{role => producer, password => ?PASSWORD, vbuckets => 16,
                                docs_per_vbucket => 20, value_size => 64},
                              maps:get(producer, Opts, #{})),
    ConsumerOpts = maps:merge(#{role => consumer, password => ?PASSWORD, vbuckets => 16},
                              maps:get(consumer, Opts, #{})),
    {ok, Producer} = kv_sim:start(ProducerOpts),
    Consumer = case kv_sim:start(ConsumerOpts) of
                   {ok, C} -> C;
                   Error -> kv_sim:stop(Producer), error({consumer_node_failed, Error})
               end,
    Env = #{producer => Producer, consumer => Consumer, rep => none},
    case maps:get(rep, Opts, #{}) of
        none ->
            Env;
        RepOpts ->
            case start_replicator(maps:merge(rep_opts(Env), RepOpts)) of
                {ok, {_, Rep} = Keeper} ->
                    %% connecting is in the background: the tests start from a connected pair
                    wait_connected(Rep),
                    Env#{rep := Rep, keeper => Keeper};
                Failed -> stop_env(Env), error({replicator_failed, Failed})
            end
    end.

-spec stop_env(env()) -> ok.
stop_env(#{producer := Producer, consumer := Consumer} = Env) ->
    _ = case Env of
            #{keeper := Keeper} -> stop_replicator(Keeper);
            _ -> ok
        end,
    stop_node(Consumer),
    stop_node(Producer).

%% @doc Stops a node that may be gone already.
-spec stop_node(pid()) -> ok.
stop_node(Node) ->
    try kv_sim:stop(Node) catch exit:_ -> ok end,
    ok.

%% @doc Replicator options for the env's nodes.
-spec rep_opts(env()) -> dcp_replicator:opts().
rep_opts(#{producer := Producer, consumer := Consumer}) ->
    #{consumer => {{127, 0, 0, 1}, kv_sim:port(Consumer)},
      producer => {{127, 0, 0, 1}, kv_sim:port(Producer)},
      bucket => "default", connection_name => ?NAME,
      user => "Administrator", password => ?PASSWORD,
      features => [xattr, snappy, del_times, json],
      setup_timeout => ?LONG_SETUP_TIMEOUT}.

%% @doc Options of one connection (`dcp_consumer_conn' / `dcp_producer_conn') to `Node'.
-spec proxy_opts(pid(), map()) -> dcp_proxy:opts().
proxy_opts(Node, Extra) ->
    maps:merge(#{host => {127, 0, 0, 1}, port => kv_sim:port(Node), bucket => "default",
                 connection_name => ?NAME, user => "Administrator",
                 password => fun() -> ?PASSWORD end, connect_timeout => 5000},
               Extra).

-spec password() -> string().
password() ->
    ?PASSWORD.

-spec connection_name() -> string().
connection_name() ->
    ?NAME.

%% ---- the replicator's keeper ----

%% @doc Starts a replicator whose parent is a keeper process that traps exits: a replicator that
%% stops (as some tests make it), or fails to start, never takes the test process along, and the
%% keeper stops it the way a supervisor would (an exit signal from its parent: the orderly stop).
-spec start_replicator(dcp_replicator:opts()) -> {ok, keeper()} | {error, term()}.
start_replicator(Opts) ->
    Test = self(),
    Keeper = spawn(fun() ->
                           process_flag(trap_exit, true),
                           Result = dcp_replicator:start_link(Opts),
                           Test ! {self(), Result},
                           case Result of
                               {ok, Rep} -> keep(Test, Rep);
                               _ -> ok
                           end
                   end),
    receive
        {Keeper, {ok, Rep}} -> {ok, {Keeper, Rep}};
        {Keeper, Error} -> Error
    end.

keep(Test, Rep) ->
    keep(Test, erlang:monitor(process, Test), Rep, running).

%% Also remembers why the replicator stopped, for tests that make it stop.
keep(Test, TestRef, Rep, running) ->
    receive
        {'EXIT', Rep, Reason} ->
            keep(Test, TestRef, Rep, {exited, Reason});
        {stop, From} ->
            From ! {self(), stopped, stop_child(Rep)};
        {'DOWN', TestRef, process, Test, _} ->
            stop_child(Rep)
    end;
keep(Test, TestRef, Rep, {exited, Reason} = Exited) ->
    receive
        {wait_exit, From} ->
            From ! {self(), exited, Reason},
            keep(Test, TestRef, Rep, Exited);
        {stop, From} ->
            From ! {self(), stopped, Reason};
        {'DOWN', TestRef, process, Test, _} ->
            ok
    end.

stop_child(Rep) ->
    exit(Rep, shutdown),
    receive
        {'EXIT', Rep, Reason} -> Reason
    after 30000 ->
            %% an orderly stop is bounded by shut_timeout; never leave one behind for the next test
            exit(Rep, kill),
            receive {'EXIT', Rep, _} -> killed_after_30_s end
    end.

%% @doc A replicator expected not to connect: it starts (connecting is in the background), then
%% stops on its own; its exit reason.
-spec start_failure(dcp_replicator:opts()) -> term().
start_failure(Opts) ->
    {ok, Keeper} = start_replicator(Opts),
    wait_exit(Keeper).

%% @doc A connection process (the result of its start_link, called by this process, which traps
%% exits) expected not to connect: the reason it stopped with.
-spec conn_failure({ok, pid()}) -> term().
conn_failure({ok, Pid}) ->
    receive {'EXIT', Pid, Reason} -> expected_cause(Reason) after 30000 -> still_running end.

%% @doc Stops the replicator through its keeper; the replicator's exit reason.
-spec stop_replicator(keeper()) -> term().
stop_replicator({Keeper, _Rep}) ->
    Ref = erlang:monitor(process, Keeper),
    Keeper ! {stop, self()},
    receive
        {Keeper, stopped, Reason} -> erlang:demonitor(Ref, [flush]), Reason;
        {'DOWN', Ref, process, Keeper, _} -> keeper_gone
    end.

%% @doc Waits until the replicator stopped on its own; its exit reason.
-spec wait_exit(keeper()) -> term().
wait_exit({Keeper, _Rep}) ->
    Keeper ! {wait_exit, self()},
    receive {Keeper, exited, Reason} -> expected_cause(Reason) end.

%% An expected failure ends a process with `{shutdown, Why}' (no crash report, dcp_log): the tests
%% compare `Why'; dcp_11_secrets_tests checks the wrapping itself.
expected_cause({shutdown, Why}) -> Why;
expected_cause(Reason) -> Reason.

%% ---- faults ----

%% @doc The producer ends the stream of `VB' with `Code' in the same write as its acceptance.
-spec fail_stream(env(), non_neg_integer(), term()) -> ok.
fail_stream(#{producer := Producer}, VB, Code) ->
    ok = kv_sim:set_fault(Producer, VB, {stream_end_on_accept, Code}).

%% @doc The kv_engine error path behind MB-53445: an add whose stream ended is never answered.
-spec never_answer_after_stream_end(env(), non_neg_integer()) -> ok.
never_answer_after_stream_end(#{consumer := Consumer}, VB) ->
    ok = kv_sim:set_fault(Consumer, VB, no_add_stream_answer_after_stream_end).

-spec stream_end_error(term(), non_neg_integer()) -> dcp_consumer_conn:setup_reply().
stream_end_error(Reason, VB) ->
    {errors, [{{stream_end, Reason}, {vbucket, VB}}]}.

%% ---- waiting and reading ----

%% @doc Polls the nodes until the consumer holds what the producer has for every vbucket, then
%% compares them (so a test that lost data fails naming the vbuckets whose digests differ, not by
%% its EUnit backstop).
-spec assert_replicated(pid(), pid(), [non_neg_integer()]) -> ok.
assert_replicated(Producer, Consumer, VBuckets) ->
    wait_replicated(Producer, Consumer, VBuckets,
                    erlang:monotonic_time(millisecond) + ?REPLICATION_WAIT_MS),
    Differ = [{VB, kv_sim:digest(Producer, VB), kv_sim:digest(Consumer, VB)}
              || VB <- VBuckets, kv_sim:digest(Producer, VB) =/= kv_sim:digest(Consumer, VB)],
    ?assertEqual([], Differ).

wait_replicated(Producer, Consumer, VBuckets, Deadline) ->
    Pending = [VB || VB <- VBuckets, kv_sim:digest(Producer, VB) =/= kv_sim:digest(Consumer, VB)],
    case Pending =/= [] andalso erlang:monotonic_time(millisecond) < Deadline of
        true -> timer:sleep(20), wait_replicated(Producer, Consumer, Pending, Deadline);
        false -> ok
    end.

%% @doc Polls the replicator's stats until both sides are connected and paired.
-spec wait_connected(pid()) -> ok.
wait_connected(Rep) ->
    wait_until(fun() ->
                       case dcp_replicator:stats(Rep) of
                           #{setup := #{state := connecting}} -> false;
                           #{consumer := #{reading := true}, producer := #{reading := true}} -> true;
                           _ -> false
                       end
               end).

%% @doc Polls `Cond()' until it holds (EUnit's backstop ends a wait that never does).
-spec wait_until(fun(() -> boolean())) -> ok.
wait_until(Cond) ->
    case Cond() of
        true -> ok;
        false -> timer:sleep(5), wait_until(Cond)
    end.

%% @doc Polls the replicator's stats until `Pred(Stats)' holds.
-spec wait_stats(pid(), fun((map()) -> boolean())) -> ok.
wait_stats(Rep, Pred) ->
    wait_until(fun() -> Pred(dcp_replicator:stats(Rep)) end).

%% @doc Frames of `Opcode' the splitter of `Side' saw, in replicator stats.
-spec frames(consumer | producer, atom() | {unknown, byte()}, map()) -> non_neg_integer().
frames(Side, Opcode, Stats) ->
    #{Side := #{splitter := Splitter}} = Stats,
    maps:get(frames, maps:get(Opcode, maps:get(by_opcode, Splitter, #{}), #{}), 0).

%% @doc Calls `Fun' in another process; returns a function that waits for its result.
-spec async(fun(() -> term())) -> fun(() -> term()).
async(Fun) ->
    Self = self(),
    Ref = make_ref(),
    _ = spawn(fun() -> Self ! {Ref, Fun()} end),
    fun() -> receive {Ref, Result} -> Result end end.

%% ---- TLS and exits ----

%% @doc `{ServerOpts, ClientOpts}' from a fresh test CA, both sides verifying their peer. RSA 2048
%% keys: OTP 25's default test keys are refused by its own TLS 1.3 server (insufficient_security).
-spec tls_configs() -> {[ssl:tls_server_option()], [ssl:tls_client_option()]}.
tls_configs() ->
    {ok, _} = application:ensure_all_started(ssl),
    Rsa = [{key, {rsa, 2048, 65537}}],
    Chain = #{root => Rsa, intermediates => [], peer => Rsa},
    #{server_config := Server, client_config := Client} =
        public_key:pkix_test_data(#{server_chain => Chain, client_chain => Chain}),
    %% the test certificates name no host: the client verifies the chain, not the name
    {[{verify, verify_peer}, {fail_if_no_peer_cert, true} | Server],
     [{verify, verify_peer}, {server_name_indication, disable} | Client]}.

%% @doc Drops the exit signals a trapping test process collected (a failed start_link leaves one).
-spec flush_exits() -> ok.
flush_exits() ->
    receive {'EXIT', _, _} -> flush_exits() after 0 -> ok end.
