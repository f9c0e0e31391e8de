%% @doc End to end: two kv_sim nodes on loopback, a dcp_replicator between them, real sockets. Each test
%% gets fresh nodes and a fresh replicator from a fixture that stops them all, whatever the test did.
%% Sections: replication and digests, the MB-53445 matrix, setup that must not hang, takeover and shut,
%% TLS and credentials, the pure-Erlang baseline splitter.
-module(dcp_e2e_tests).

-include_lib("eunit/include/eunit.hrl").

-define(BUCKET, "default").
-define(USER, "Administrator").
-define(PASSWORD, "e2e-Pa55word!").
-define(NAME, "replication:p_1@127.0.0.1->c_0@127.0.0.1:default").
%% EUnit timeouts are only a backstop: each test ends in seconds.
-define(BACKSTOP, 60).
%% A setup deadline that no test should reach (it would show up as `setup_timeout' in a reply).
-define(LONG_SETUP_TIMEOUT, 20000).
-define(SHORT_SETUP_TIMEOUT, 300).

%% Every stream-end reason of PROTOCOL.md by its code, plus one no version defines.
-define(REASONS, [{0, ok}, {1, closed}, {2, state_changed}, {3, disconnected}, {4, too_slow},
                  {5, backfill_fail}, {6, rollback}, {7, filter_empty}, {8, lost_privileges},
                  {42, {unknown, 42}}]).

%% ---- harness ----

%% A test: `Body(Env)' with `Env = #{producer, consumer, rep, keeper}' (`rep' is `none' and `keeper'
%% absent when `Opts' has `rep => none'). `Opts' may hold `producer', `consumer' (kv_sim options) and `rep' (replicator
%% options), merged over the defaults below.
e2e(Title, Opts, Body) ->
    {Title, {setup, fun() -> start_env(Opts) end, fun stop_env/1,
             fun(Env) -> {timeout, ?BACKSTOP, ?_test(Body(Env))} end}}.

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
                {ok, {Keeper, Rep}} -> Env#{rep := Rep, keeper => {Keeper, Rep}};
                Failed -> stop_env(Env), error({replicator_failed, Failed})
            end
    end.

rep_opts(#{producer := Producer, consumer := Consumer}) ->
    #{consumer => {{127, 0, 0, 1}, kv_sim:port(Consumer)},
      producer => {{127, 0, 0, 1}, kv_sim:port(Producer)},
      bucket => ?BUCKET, connection_name => ?NAME,
      user => ?USER, password => ?PASSWORD,
      features => [xattr, snappy, del_times, json],
      setup_timeout => ?LONG_SETUP_TIMEOUT}.

%% The replicator's parent is a keeper process that traps exits: a replicator that stops (as some tests
%% make it), or fails to start, never takes the test process along, and the keeper stops it the way a
%% supervisor would (an exit signal from its parent: the orderly stop). Returns `{ok, {Keeper, Rep}}'.
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

%% Stops the replicator through its keeper; the replicator's exit reason.
stop_replicator({Keeper, _Rep}) ->
    Ref = erlang:monitor(process, Keeper),
    Keeper ! {stop, self()},
    receive
        {Keeper, stopped, Reason} -> erlang:demonitor(Ref, [flush]), Reason;
        {'DOWN', Ref, process, Keeper, _} -> keeper_gone
    end.

%% Waits until the replicator stopped on its own; its exit reason.
wait_exit({Keeper, _Rep}) ->
    Keeper ! {wait_exit, self()},
    receive {Keeper, exited, Reason} -> Reason end.

stop_env(#{producer := Producer, consumer := Consumer} = Env) ->
    _ = case Env of
            #{keeper := Keeper} -> stop_replicator(Keeper);
            _ -> ok
        end,
    stop_node(Consumer),
    stop_node(Producer).

stop_node(Node) ->
    try kv_sim:stop(Node) catch exit:_ -> ok end.

%% Polls the replicator's stats until `Pred(Stats)' holds.
wait_stats(Rep, Pred) ->
    case Pred(dcp_replicator:stats(Rep)) of
        true -> ok;
        false -> timer:sleep(10), wait_stats(Rep, Pred)
    end.

frames(Side, Opcode, Stats) ->
    #{Side := #{splitter := Splitter}} = Stats,
    maps:get(frames, maps:get(Opcode, maps:get(by_opcode, Splitter, #{}), #{}), 0).

%% The producer ends the stream of `VB' with `Code' in the same write as its acceptance.
fail_stream(#{producer := Producer}, VB, Code) ->
    ok = kv_sim:set_fault(Producer, VB, {stream_end_on_accept, Code}).

%% The kv_engine error path behind MB-53445: an add whose stream ended is never answered.
never_answer_after_stream_end(#{consumer := Consumer}, VB) ->
    ok = kv_sim:set_fault(Consumer, VB, no_add_stream_answer_after_stream_end).

stream_end_error(Reason, VB) ->
    {errors, [{{stream_end, Reason}, {vbucket, VB}}]}.

%% ---- replication: every document arrives, whatever the chunking ----

many_vbuckets_replicate_with_equal_digests_through_random_write_chunks_test_() ->
    VBs = lists:seq(0, 63),
    e2e("64 vbuckets x 300 docs, both nodes write in random chunks",
        #{producer => #{vbuckets => 64, docs_per_vbucket => 300, value_size => 200},
          consumer => #{vbuckets => 64}},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                %% producer chunks cut mutations anywhere; tiny consumer chunks cut every answer
                ok = kv_sim:set_fault(Producer, all, {chunked_writes, 1500}),
                ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 5}),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, VBs)),
                ?assertEqual(VBs, dcp_replicator:get_partitions(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, VBs),
                ?assertEqual({300, element(2, kv_sim:digest(Producer, 17))},
                             kv_sim:digest(Consumer, 17)),
                ?assertEqual(64 * 300, frames(producer, dcp_mutation, dcp_replicator:stats(Rep)))
        end).

tiny_write_chunks_split_every_header_and_still_replicate_test_() ->
    VBs = lists:seq(0, 7),
    e2e("8 vbuckets, writes of 1..7 bytes on both nodes",
        #{producer => #{vbuckets => 8, docs_per_vbucket => 50, value_size => 100},
          consumer => #{vbuckets => 8}},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                ok = kv_sim:set_fault(Producer, all, {chunked_writes, 7}),
                ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 7}),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, VBs)),
                dcp_test_lib:assert_replicated(Producer, Consumer, VBs)
        end).

flexible_framing_and_unknown_opcodes_in_the_stream_replicate_with_equal_digests_test_() ->
    VBs = lists:seq(0, 31),
    e2e("32 vbuckets, alt_req frames with stream ids and unknown opcodes, chunked",
        #{producer => #{vbuckets => 32, docs_per_vbucket => 200, value_size => 128},
          consumer => #{vbuckets => 32}},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                ok = kv_sim:set_fault(Producer, all, flexible_framing),
                ok = kv_sim:set_fault(Producer, all, {unknown_opcodes, 16#ee}),
                ok = kv_sim:set_fault(Producer, all, {chunked_writes, 700}),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, VBs)),
                dcp_test_lib:assert_replicated(Producer, Consumer, VBs),
                Stats = dcp_replicator:stats(Rep),
                %% the unknown opcode really went through the proxy, once per marker at least
                ?assert(maps:is_key({unknown, 16#ee},
                                    maps:get(by_opcode, maps:get(splitter,
                                                                 maps:get(producer, Stats))))),
                ?assertEqual(32 * 200, frames(producer, dcp_mutation, Stats))
        end).

%% ---- MB-53445: a stream end for a vbucket whose add is pending ----

%% For each reason code: the consumer node answers the add after the stream end went through it
%% (`same_turn': at the end of the chunk that held both, as kv_engine; `delayed': 150 ms later), or
%% never answers it. Reason ok is not a failure: the add stays pending and its answer (or, when it
%% never comes, the short deadline) settles it.
mb53445_matrix_test_() ->
    [mb53445_case(Code, Reason, Answer) || {Code, Reason} <- ?REASONS,
                                          Answer <- [same_turn, delayed, never]].

mb53445_case(Code, Reason, Answer) ->
    VB = 3,
    Expected = case {Reason, Answer} of
                   {ok, never} -> {errors, [{setup_timeout, {vbucket, VB}}]};
                   {ok, _} -> ok;
                   _ -> stream_end_error(Reason, VB)
               end,
    SetupTimeout = case {Reason, Answer} of
                       {ok, never} -> ?SHORT_SETUP_TIMEOUT;
                       _ -> ?LONG_SETUP_TIMEOUT
                   end,
    Title = lists:flatten(io_lib:format("stream end ~p (~0p), add answered ~p -> ~0p",
                                        [Code, Reason, Answer, Expected])),
    e2e(Title, #{rep => #{setup_timeout => SetupTimeout}},
        fun(#{rep := Rep, consumer := Consumer} = Env) ->
                fail_stream(Env, VB, Code),
                case Answer of
                    same_turn -> ok;
                    delayed -> ok = kv_sim:set_fault(Consumer, VB,
                                                     {delay_answer, dcp_add_stream, 150});
                    never -> never_answer_after_stream_end(Env, VB)
                end,
                ?assertEqual(Expected, dcp_replicator:setup_replication(Rep, [VB])),
                ?assertEqual(case Expected of ok -> [VB]; _ -> [] end,
                             dcp_replicator:get_partitions(Rep)),
                %% the replicator keeps working, whatever the answer did
                ok = kv_sim:clear_faults(Consumer),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [VB + 1])),
                ?assertEqual([VB + 1], dcp_replicator:get_partitions(Rep))
        end).

two_vbuckets_one_ended_waits_for_the_other_and_reports_only_the_failure_test_() ->
    e2e("vbucket 0 ended (rollback, never answered), vbucket 1 answered 200 ms late", #{},
        fun(#{rep := Rep, consumer := Consumer, producer := Producer} = Env) ->
                fail_stream(Env, 0, rollback),
                never_answer_after_stream_end(Env, 0),
                ok = kv_sim:set_fault(Consumer, 1, {delay_answer, dcp_add_stream, 200}),
                ?assertEqual(stream_end_error(rollback, 0),
                             dcp_replicator:setup_replication(Rep, [0, 1])),
                %% vbucket 1 is active: the reply came only after its answer
                ?assertEqual([1], dcp_replicator:get_partitions(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [1])
        end).

vbucket_1024_setup_with_one_ended_reports_only_that_one_test_() ->
    VBs = lists:seq(0, 1023),
    e2e("1024 vbuckets, vbucket 777 ended with state_changed and never answered",
        #{producer => #{vbuckets => 1024, docs_per_vbucket => 3, value_size => 16},
          consumer => #{vbuckets => 1024}},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer} = Env) ->
                fail_stream(Env, 777, state_changed),
                never_answer_after_stream_end(Env, 777),
                ?assertEqual(stream_end_error(state_changed, 777),
                             dcp_replicator:setup_replication(Rep, VBs)),
                ?assertEqual(VBs -- [777], dcp_replicator:get_partitions(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, VBs -- [777]),
                ?assertEqual({0, crypto:hash(sha256, <<>>)}, kv_sim:digest(Consumer, 777))
        end).

every_failing_reason_at_once_is_reported_per_vbucket_in_order_test_() ->
    e2e("ten vbuckets, one per reason code, in one setup", #{},
        fun(#{rep := Rep} = Env) ->
                Cases = lists:zip(lists:seq(0, length(?REASONS) - 1), ?REASONS),
                [begin
                     fail_stream(Env, VB, Code),
                     never_answer_after_stream_end(Env, VB)
                 end || {VB, {Code, Reason}} <- Cases, Reason =/= ok],
                %% reason ok: answered after the stream end, so it completes
                fail_stream(Env, 0, 0),
                Expected = [{{stream_end, Reason}, {vbucket, VB}}
                            || {VB, {_, Reason}} <- Cases, Reason =/= ok],
                ?assertEqual({errors, Expected},
                             dcp_replicator:setup_replication(Rep, [VB || {VB, _} <- Cases])),
                ?assertEqual([0], dcp_replicator:get_partitions(Rep))
        end).

late_answer_is_absorbed_and_the_replicator_keeps_working_test_() ->
    e2e("vbucket 5 ended with too_slow, its success answer comes 300 ms later", #{},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer} = Env) ->
                fail_stream(Env, 5, too_slow),
                ok = kv_sim:set_fault(Consumer, 5, {delay_answer, dcp_add_stream, 300}),
                ?assertEqual(stream_end_error(too_slow, 5),
                             dcp_replicator:setup_replication(Rep, [5])),
                wait_stats(Rep, fun(#{setup := #{absorbed := N}}) -> N >= 1 end),
                %% neither a crash nor forwarded to the producer
                Stats = dcp_replicator:stats(Rep),
                ?assertEqual(0, frames(producer, dcp_add_stream, Stats)),
                ?assertMatch(#{state := idle, pending_adds := [], active := []},
                             maps:get(setup, Stats)),
                ok = kv_sim:clear_faults(Producer),
                ok = kv_sim:clear_faults(Consumer),
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [5, 6])),
                ?assertEqual([5, 6], dcp_replicator:get_partitions(Rep)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [5, 6])
        end).

%% ---- setup never hangs ----

consumer_never_answering_without_stream_end_gets_setup_timeout_test_() ->
    e2e("the add of vbucket 9 is never answered, no stream end",
        #{rep => #{setup_timeout => ?SHORT_SETUP_TIMEOUT}},
        fun(#{rep := Rep, consumer := Consumer}) ->
                ok = kv_sim:set_fault(Consumer, 9, {drop_answer, dcp_add_stream}),
                ?assertEqual({errors, [{setup_timeout, {vbucket, 9}}]},
                             dcp_replicator:setup_replication(Rep, [9, 10])),
                ?assertEqual([10], dcp_replicator:get_partitions(Rep))
        end).

add_answered_with_a_failure_status_reports_that_status_test_() ->
    e2e("adds answered with not_my_vbucket, etmpfail and 0x1234", #{},
        fun(#{rep := Rep, consumer := Consumer}) ->
                ok = kv_sim:set_fault(Consumer, 4, {add_stream_status, not_my_vbucket}),
                ok = kv_sim:set_fault(Consumer, 5, {add_stream_status, 16#86}),
                ok = kv_sim:set_fault(Consumer, 7, {add_stream_status, 16#1234}),
                ?assertEqual({errors, [{{mcbp_status, 16#07}, {vbucket, 4}},
                                       {{mcbp_status, 16#86}, {vbucket, 5}},
                                       {{mcbp_status, 16#1234}, {vbucket, 7}}]},
                             dcp_replicator:setup_replication(Rep, [4, 5, 6, 7])),
                ?assertEqual([6], dcp_replicator:get_partitions(Rep))
        end).

producer_refusing_the_stream_fails_the_add_with_its_status_test_() ->
    e2e("the producer answers the consumer's STREAM_REQ with not_my_vbucket", #{},
        fun(#{rep := Rep, producer := Producer}) ->
                ok = kv_sim:set_fault(Producer, 2, {stream_req_status, not_my_vbucket}),
                ?assertEqual({errors, [{{mcbp_status, 16#07}, {vbucket, 2}}]},
                             dcp_replicator:setup_replication(Rep, [2, 3])),
                ?assertEqual([3], dcp_replicator:get_partitions(Rep))
        end).

consumer_socket_closed_during_setup_gives_connection_lost_test_() ->
    e2e("the consumer node closes its socket when the ADD_STREAM arrives", #{},
        fun(#{rep := Rep, consumer := Consumer, keeper := Keeper}) ->
                ok = kv_sim:set_fault(Consumer, 11, {close_socket_on, dcp_add_stream}),
                Lost = {connection_lost, {socket_closed, consumer}},
                ?assertEqual({errors, [{Lost, {vbucket, 11}}, {Lost, {vbucket, 12}}]},
                             dcp_replicator:setup_replication(Rep, [11, 12])),
                ?assertEqual({socket_closed, consumer}, wait_exit(Keeper)),
                %% a call after the loss still gets the contract's reply, no hang
                ?assertMatch({errors, [{{connection_lost, _}, {vbucket, 1}}]},
                             dcp_replicator:setup_replication(Rep, [1]))
        end).

producer_socket_closed_during_setup_gives_connection_lost_test_() ->
    e2e("the producer node closes its socket when the STREAM_REQ arrives", #{},
        fun(#{rep := Rep, producer := Producer, keeper := Keeper}) ->
                ok = kv_sim:set_fault(Producer, 12, {close_socket_on, dcp_stream_req}),
                ?assertEqual(
                   {errors, [{{connection_lost, {socket_closed, producer}}, {vbucket, 12}}]},
                   dcp_replicator:setup_replication(Rep, [12])),
                ?assertEqual({socket_closed, producer}, wait_exit(Keeper))
        end).

producer_socket_closed_while_closing_streams_gives_connection_lost_test_() ->
    e2e("the producer node closes its socket on our CLOSE_STREAM", #{},
        fun(#{rep := Rep, producer := Producer, keeper := Keeper}) ->
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [1, 2])),
                ok = kv_sim:set_fault(Producer, 1, {close_socket_on, dcp_close_stream}),
                ?assertEqual(
                   {errors, [{{connection_lost, {socket_closed, producer}}, {vbucket, 1}}]},
                   dcp_replicator:setup_replication(Rep, [2])),
                ?assertEqual({socket_closed, producer}, wait_exit(Keeper))
        end).

%% The replicator answers setup_replication through a helper process that waits for the consumer
%% conn; if the replicator's own exit reaches the caller before the helper's reply, the caller gets
%% the fallback `lost(Reason, RequestedVBuckets)' instead of the consumer conn's answer, so the
%% vbuckets named depend on scheduling. Here the setup of [2] is closing vbucket 1 when the producer
%% goes: the answer is about vbucket 1. Holding the helper back (as a busy scheduler may) until the
%% pair is gone makes the race certain. FAILS today (reply names vbucket 2): see the e2e report.
reply_is_the_consumer_conns_answer_even_if_the_replicator_goes_first_test_() ->
    e2e("setup of [2] closing vbucket 1, producer lost, the answering helper held back", #{},
        fun(#{rep := Rep, producer := Producer, keeper := {Keeper, _}}) ->
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [1, 2])),
                ok = kv_sim:set_fault(Producer, 1, {drop_answer, dcp_close_stream}),
                Caller = async_setup(Rep, [2]),
                wait_stats(Rep, fun(#{setup := #{pending_closes_consumer := C,
                                                 pending_closes_producer := P}}) ->
                                        C =:= [] andalso P =:= [1]
                                end),
                {links, Links} = process_info(Rep, links),
                Pair = Links -- [Keeper, Caller],
                [Helper] = [Pid || Pid <- processes() -- Pair,
                                   process_info(Pid, parent) =:= {parent, Rep}],
                true = erlang:suspend_process(Helper),
                Refs = [erlang:monitor(process, Pid) || Pid <- Pair],
                stop_node(Producer),
                [receive {'DOWN', Ref, process, _, _} -> ok end || Ref <- Refs],
                %% the replicator needs no more than this to follow its pair today
                timer:sleep(200),
                true = erlang:resume_process(Helper),
                ?assertEqual(
                   {errors, [{{connection_lost, {socket_closed, producer}}, {vbucket, 1}}]},
                   await_setup_reply(Caller))
        end).

%% ---- takeover and shut ----

takeover_makes_the_vbucket_active_on_the_consumer_and_dead_on_the_producer_test_() ->
    e2e("takeover of a replicated vbucket and of a fresh one", #{},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                ?assertEqual(ok, dcp_replicator:setup_replication(Rep, [13])),
                dcp_test_lib:assert_replicated(Producer, Consumer, [13]),
                ?assertEqual(ok, dcp_replicator:takeover(Rep, 13)),
                ?assertEqual(active, kv_sim:vbucket_state(Consumer, 13)),
                ?assertEqual(dead, kv_sim:vbucket_state(Producer, 13)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [13]),
                %% a vbucket never replicated before: the takeover stream carries all its data
                ?assertEqual(ok, dcp_replicator:takeover(Rep, 14)),
                ?assertEqual(active, kv_sim:vbucket_state(Consumer, 14)),
                ?assertEqual(dead, kv_sim:vbucket_state(Producer, 14)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [14]),
                %% untouched vbuckets stay as they were
                ?assertEqual(replica, kv_sim:vbucket_state(Consumer, 15)),
                ?assertEqual(active, kv_sim:vbucket_state(Producer, 15))
        end).

takeover_with_chunked_writes_completes_test_() ->
    e2e("takeover while both nodes write in chunks of 1..11 bytes", #{},
        fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                ok = kv_sim:set_fault(Producer, all, {chunked_writes, 11}),
                ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 11}),
                ?assertEqual(ok, dcp_replicator:takeover(Rep, 6)),
                ?assertEqual(active, kv_sim:vbucket_state(Consumer, 6)),
                ?assertEqual(dead, kv_sim:vbucket_state(Producer, 6)),
                dcp_test_lib:assert_replicated(Producer, Consumer, [6])
        end).

%% Starts `setup_replication(Rep, VBs)' in another process; its reply comes as `{setup_reply, Pid, R}'.
async_setup(Rep, VBs) ->
    Self = self(),
    spawn_link(fun() -> Self ! {setup_reply, self(), dcp_replicator:setup_replication(Rep, VBs)} end).

await_setup_reply(Caller) ->
    receive {setup_reply, Caller, Reply} -> Reply end.

%% The shut of an orderly stop joins the stuck setup and closes vbucket 3 on the consumer, which answers:
%% that answer settles the add, so the stuck caller is answered at once with what happened to its
%% stream, and the shut completes without waiting for shut_timeout (30 s here: a wait would show as a
%% connection_lost reply). The queued setup never ran: the shut came while it waited, so it is
%% answered as lost to the shut ({connection_lost, shut}), not refused.
replicator_stopped_with_a_stuck_setup_answers_the_waiting_and_queued_callers_test_() ->
    e2e("setup of vbucket 3 stuck (add never answered, no deadline), replicator shut down",
        #{rep => #{setup_timeout => infinity, shut_timeout => 30000}},
        fun(#{rep := Rep, consumer := Consumer, keeper := Keeper}) ->
                ok = kv_sim:set_fault(Consumer, 3, {drop_answer, dcp_add_stream}),
                Stuck = async_setup(Rep, [3]),
                wait_stats(Rep, fun(#{setup := #{pending_adds := P}}) -> P =:= [3] end),
                Queued = async_setup(Rep, [3, 4]),
                wait_stats(Rep, fun(#{setup := #{queued_requests := Q}}) -> Q =:= 1 end),
                ?assertEqual(shutdown, stop_replicator(Keeper)),
                ?assertEqual({errors, [{{stream_end, closed}, {vbucket, 3}}]},
                             await_setup_reply(Stuck)),
                Lost = {connection_lost, shut},
                ?assertEqual({errors, [{Lost, {vbucket, 3}}, {Lost, {vbucket, 4}}]},
                             await_setup_reply(Queued))
        end).

replicator_stopped_with_a_stuck_setup_and_a_silent_consumer_still_answers_test_() ->
    e2e("setup stuck and the consumer answers no CLOSE_STREAM either",
        #{rep => #{setup_timeout => infinity, shut_timeout => 200}},
        fun(#{rep := Rep, consumer := Consumer, keeper := Keeper}) ->
                ok = kv_sim:set_fault(Consumer, 3, {drop_answer, dcp_add_stream}),
                ok = kv_sim:set_fault(Consumer, 3, {drop_answer, dcp_close_stream}),
                Caller = async_setup(Rep, [3]),
                wait_stats(Rep, fun(#{setup := #{pending_adds := P}}) -> P =:= [3] end),
                ?assertEqual(shutdown, stop_replicator(Keeper)),
                ?assertEqual({errors, [{{connection_lost, shutdown}, {vbucket, 3}}]},
                             await_setup_reply(Caller))
        end).

%% ---- TLS and credentials ----

%% OTP 25's default test keys are refused by its own TLS 1.3 server (insufficient_security).
tls_on_both_sides_with_peer_verification_replicates_with_equal_digests_test_() ->
    {"TLS on both nodes, both ends verify the peer",
     {setup,
      fun() ->
              {ServerTls, ClientTls} = dcp_test_lib:tls_configs(),
              start_env(#{producer => #{ssl => ServerTls, docs_per_vbucket => 100},
                          consumer => #{ssl => ServerTls},
                          rep => #{ssl => ClientTls}})
      end,
      fun stop_env/1,
      fun(#{rep := Rep, producer := Producer, consumer := Consumer} = Env) ->
              {timeout, ?BACKSTOP,
               ?_test(begin
                          VBs = lists:seq(0, 15),
                          fail_stream(Env, 15, state_changed),
                          never_answer_after_stream_end(Env, 15),
                          ?assertEqual(stream_end_error(state_changed, 15),
                                       dcp_replicator:setup_replication(Rep, VBs)),
                          dcp_test_lib:assert_replicated(Producer, Consumer, lists:seq(0, 14)),
                          ?assertEqual(ok, dcp_replicator:takeover(Rep, 2)),
                          ?assertEqual(dead, kv_sim:vbucket_state(Producer, 2))
                      end)}
      end}}.

tls_client_without_a_certificate_is_refused_test_() ->
    {"TLS: a replicator with no client certificate cannot start",
     {setup,
      fun() ->
              {ServerTls, ClientTls} = dcp_test_lib:tls_configs(),
              {start_env(#{producer => #{ssl => ServerTls}, consumer => #{ssl => ServerTls},
                           rep => none}), ClientTls}
      end,
      fun({Env, _}) -> stop_env(Env) end,
      fun({Env, ClientTls}) ->
              {timeout, ?BACKSTOP,
               ?_test(begin
                          NoCert = [O || O <- ClientTls, not is_tuple(O)
                                             orelse not lists:member(element(1, O),
                                                                     [cert, key, certs_keys])],
                          Result = start_replicator((rep_opts(Env))#{ssl => NoCert}),
                          ?assertMatch({error, {consumer, _}}, Result)
                      end)}
      end}}.

wrong_password_gives_a_clear_error_from_start_link_test_() ->
    e2e("the replicator's password is wrong for both nodes", #{rep => none},
        fun(Env) ->
                Wrong = "not-the-Pa55word",
                Result = start_replicator((rep_opts(Env))#{password => Wrong}),
                ?assertEqual({error, {consumer, {sasl_auth, {mcbp_status, auth_error}}}}, Result),
                %% neither password appears in what the caller gets
                Text = lists:flatten(io_lib:format("~p", [Result])),
                ?assertEqual(nomatch, string:find(Text, Wrong)),
                ?assertEqual(nomatch, string:find(Text, ?PASSWORD))
        end).

wrong_password_on_the_producer_only_names_the_producer_test_() ->
    e2e("the producer node has another password", #{producer => #{password => "other"},
                                                    rep => none},
        fun(Env) ->
                ?assertEqual({error, {producer, {sasl_auth, {mcbp_status, auth_error}}}},
                             start_replicator(rep_opts(Env)))
        end).

%% ---- the pure-Erlang baseline splitter (bench/) ----

baseline_splitter_replicates_with_equal_digests_test_() ->
    case code:ensure_loaded(dcp_baseline_splitter) of
        {module, _} ->
            VBs = lists:seq(0, 63),
            e2e("64 vbuckets x 300 docs through dcp_baseline_splitter, random write chunks",
                #{producer => #{vbuckets => 64, docs_per_vbucket => 300, value_size => 200},
                  consumer => #{vbuckets => 64},
                  rep => #{splitter => {dcp_baseline_splitter, #{}}}},
                fun(#{rep := Rep, producer := Producer, consumer := Consumer}) ->
                        ok = kv_sim:set_fault(Producer, all, {chunked_writes, 1500}),
                        ok = kv_sim:set_fault(Consumer, all, {chunked_writes, 5}),
                        ?assertEqual(ok, dcp_replicator:setup_replication(Rep, VBs)),
                        dcp_test_lib:assert_replicated(Producer, Consumer, VBs),
                        %% the NIF splitter's counters are absent: the baseline did the splitting
                        #{producer := #{splitter := Counters}} = dcp_replicator:stats(Rep),
                        ?assertEqual(#{}, Counters)
                end);
        {error, Why} ->
            {"dcp_baseline_splitter not built (" ++ atom_to_list(Why) ++ "): skipped", []}
    end.

