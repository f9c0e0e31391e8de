%% @doc The connection processes without a replicator: the consumer conn's callers (queueing, shut,
%% a protocol violation, a lost partner), then our own frames and cut-through forwarding against
%% scripted nodes whose sockets the test holds.
-module(dcp_07_conn_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dcp_test_lib, [async/1]).

-define(BACKSTOP, 60).

%% ---- harness ----

%% A consumer conn and a producer conn proxying each other, without a replicator:
%% `Fun(C, P, ProducerNode, ConsumerNode)'.
pair_test(ProducerOpts, ConsumerOpts, SetupTimeout, Fun) ->
    {timeout, ?BACKSTOP,
     fun() -> dcp_test_lib:with_pair(ProducerOpts, ConsumerOpts, SetupTimeout, Fun) end}.

%% Waits until `Pred(Info)' holds for the consumer conn's setup_info.
wait_setup_info(C, Pred) ->
    dcp_test_lib:wait_until(fun() -> Pred(dcp_consumer_conn:setup_info(C)) end).

%% A scripted node: accepts one connection, answers the handshake (SASL, SELECT_BUCKET, HELLO with
%% every feature granted when one is asked for, DCP_OPEN) with success, then hands the socket to
%% the test.
fake_node() ->
    {ok, L} = gen_tcp:listen(0, [binary, {active, false}, {ip, loopback}]),
    {ok, Port} = inet:port(L),
    Test = self(),
    _ = spawn_link(fun() ->
                           {ok, S} = gen_tcp:accept(L),
                           ok = answer_handshake(S),
                           ok = gen_tcp:controlling_process(S, Test),
                           Test ! {fake_node, Port, S}
                   end),
    {Port, L}.

answer_handshake(S) ->
    #{opcode := Opcode, opaque := Opaque, value := Value} = recv_frame(S),
    Name = dcp_commands:command_2_atom(Opcode),
    Fields = case Name of
                 hello -> #{value => Value};
                 _ -> #{}
             end,
    ok = gen_tcp:send(S, dcp_commands:response(Opcode, 0, Opaque, Fields)),
    case Name of
        dcp_open -> ok;
        _ -> answer_handshake(S)
    end.

recv_frame(S) ->
    {ok, <<_:8/binary, BodyLen:32, _/binary>> = Header} = gen_tcp:recv(S, 24),
    Body = case BodyLen of
               0 -> <<>>;
               _ -> {ok, B} = gen_tcp:recv(S, BodyLen), B
           end,
    {ok, Frame, <<>>} = mcbp:decode(<<Header/binary, Body/binary>>),
    Frame.

fake_socket(Port) ->
    receive {fake_node, Port, S} -> S end.

%% `Fun(C, P, ConsumerNodeSock, ProducerNodeSock)'
fake_nodes_test(Fun) ->
    {timeout, ?BACKSTOP, fun() -> with_fake_nodes(Fun) end}.

with_fake_nodes(Fun) ->
    process_flag(trap_exit, true),
    {CPort, CL} = fake_node(),
    {PPort, PL} = fake_node(),
    Opts = #{host => {127, 0, 0, 1}, bucket => "default",
             connection_name => dcp_test_lib:connection_name(), user => "Administrator",
             password => fun() -> dcp_test_lib:password() end},
    {ok, C} = dcp_consumer_conn:start_link(Opts#{port => CPort}, 10000),
    {ok, P} = dcp_producer_conn:start_link(Opts#{port => PPort}),
    ok = dcp_proxy:connect_proxies(C, P),
    try
        Fun(C, P, fake_socket(CPort), fake_socket(PPort))
    after
        dcp_proxy:terminate_and_wait([C, P], shutdown, 5000),
        gen_tcp:close(CL),
        gen_tcp:close(PL),
        dcp_test_lib:flush_exits()
    end.

wait_stats(Pid, Pred) ->
    dcp_test_lib:wait_until(fun() -> Pred(dcp_proxy:stats(Pid)) end).

%% ---- the consumer conn's callers ----

setup_close_and_partitions_through_the_consumer_conn_test_() ->
    pair_test(#{}, #{}, 10000,
              fun(C, _P, _Producer, _Consumer) ->
                      ?assertEqual(ok, dcp_consumer_conn:setup_streams(C, [1, 2, 3])),
                      ?assertEqual([1, 2, 3], dcp_consumer_conn:get_partitions(C)),
                      ?assertEqual(ok, dcp_consumer_conn:maybe_close_stream(C, 2)),
                      ?assertEqual(ok, dcp_consumer_conn:maybe_close_stream(C, 2)),
                      ?assertEqual([1, 3], dcp_consumer_conn:get_partitions(C)),
                      %% a takeover of an active vbucket closes its stream in the same step
                      ?assertEqual(ok, dcp_consumer_conn:takeover(C, 1)),
                      ?assertEqual([3], dcp_consumer_conn:get_partitions(C)),
                      ?assertEqual({error, {bad_vbucket, 5000}},
                                   dcp_consumer_conn:setup_streams(C, [5000]))
              end).

setup_asked_for_while_another_runs_waits_its_turn_test_() ->
    pair_test(#{}, #{}, 500,
              fun(C, _P, _Producer, Consumer) ->
                      ok = kv_sim:set_fault(Consumer, 4, {drop_answer, dcp_add_stream}),
                      First = async(fun() -> dcp_consumer_conn:setup_streams(C, [4]) end),
                      wait_setup_info(C, fun(#{pending_adds := P}) -> P =:= [4] end),
                      Second = async(fun() -> dcp_consumer_conn:setup_streams(C, [5]) end),
                      ?assertEqual({errors, [{setup_timeout, {vbucket, 4}}]}, First()),
                      %% the second one ran after the first settled, towards [5] only
                      ?assertEqual(ok, Second()),
                      ?assertEqual([5], dcp_consumer_conn:get_partitions(C))
              end).

%% The consumer answers the shut's CLOSE_STREAM for the stuck vbucket, which settles its add: both
%% callers are answered then, long before the (30 s) setup deadline.
shut_during_a_stuck_setup_answers_both_callers_test_() ->
    pair_test(#{}, #{}, 30000,
              fun(C, _P, _Producer, Consumer) ->
                      ok = dcp_consumer_conn:setup_streams(C, [1]),
                      ok = kv_sim:set_fault(Consumer, 2, {drop_answer, dcp_add_stream}),
                      Setup = async(fun() ->
                                            dcp_consumer_conn:setup_streams(C, [1, 2])
                                    end),
                      wait_setup_info(C, fun(#{pending_adds := P}) -> P =:= [2] end),
                      Shut = dcp_consumer_conn:shut_connection(C, 5000),
                      Closed = {errors, [{{stream_end, closed}, {vbucket, 2}}]},
                      ?assertEqual(Closed, Setup()),
                      ?assertEqual(Closed, Shut),
                      ?assertMatch(#{state := shut}, dcp_consumer_conn:setup_info(C)),
                      ?assertEqual({error, shut}, dcp_consumer_conn:setup_streams(C, [3]))
              end).

%% A setup accepted while the connection was up and queued behind the stuck one never runs: the shut
%% came first, so its caller gets the contract's per-vbucket errors rather than a refusal.
setup_queued_behind_a_stuck_setup_is_answered_as_lost_when_shut_test_() ->
    pair_test(#{}, #{}, 30000,
              fun(C, _P, _Producer, Consumer) ->
                      ok = kv_sim:set_fault(Consumer, 2, {drop_answer, dcp_add_stream}),
                      Stuck = async(fun() -> dcp_consumer_conn:setup_streams(C, [2]) end),
                      wait_setup_info(C, fun(#{pending_adds := P}) -> P =:= [2] end),
                      Queued = async(fun() ->
                                             dcp_consumer_conn:setup_streams(C, [2, 5])
                                     end),
                      wait_setup_info(C, fun(#{queued_requests := Q}) -> Q =:= 1 end),
                      Closed = {errors, [{{stream_end, closed}, {vbucket, 2}}]},
                      ?assertEqual(Closed, dcp_consumer_conn:shut_connection(C, 5000)),
                      ?assertEqual(Closed, Stuck()),
                      Lost = {connection_lost, shut},
                      ?assertEqual({errors, [{Lost, {vbucket, 2}}, {Lost, {vbucket, 5}}]},
                                   Queued())
              end).

shut_from_idle_closes_every_stream_test_() ->
    pair_test(#{}, #{}, 10000,
              fun(C, _P, _Producer, _Consumer) ->
                      ok = dcp_consumer_conn:setup_streams(C, [0, 6]),
                      ?assertEqual(ok, dcp_consumer_conn:shut_connection(C, 5000)),
                      ?assertEqual([], dcp_consumer_conn:get_partitions(C)),
                      ?assertEqual(ok, dcp_consumer_conn:shut_connection(C, 5000))
              end).

answer_matching_nothing_stops_the_conn_after_answering_the_caller_test_() ->
    pair_test(#{docs_per_vbucket => 0}, #{}, 10000,
              fun(C, _P, _Producer, Consumer) ->
                      ok = kv_sim:set_fault(Consumer, 2, {drop_answer, dcp_add_stream}),
                      Setup = async(fun() -> dcp_consumer_conn:setup_streams(C, [2]) end),
                      wait_setup_info(C, fun(#{pending_adds := P}) -> P =:= [2] end),
                      %% an ADD_STREAM we never sent: its answer's opaque matches nothing
                      {gen_tcp, Sock} = gen_server:call(C, '$dcp_socket'),
                      ok = gen_tcp:send(Sock, dcp_commands:add_stream(3, 0, 99999)),
                      Violation = {unexpected_response, add_stream, 99999},
                      ?assertEqual({errors, [{{connection_lost, Violation},
                                              {vbucket, 2}}]}, Setup()),
                      %% an expected failure: {shutdown, Why}, no crash report
                      ?assertEqual({shutdown, Violation}, receive {'EXIT', C, R} -> R end)
              end).

producer_conn_going_away_answers_the_waiting_caller_test_() ->
    pair_test(#{}, #{}, 10000,
              fun(C, P, _Producer, Consumer) ->
                      ok = kv_sim:set_fault(Consumer, 1, {drop_answer, dcp_add_stream}),
                      Setup = async(fun() -> dcp_consumer_conn:setup_streams(C, [1]) end),
                      wait_setup_info(C, fun(#{pending_adds := Pd}) -> Pd =:= [1] end),
                      exit(P, kill),
                      ?assertEqual({errors, [{{connection_lost, killed}, {vbucket, 1}}]},
                                   Setup())
              end).

%% ---- own frames and cut-through forwarding ----

own_frame_waits_for_the_end_of_the_frame_being_cut_through_test_() ->
    fake_nodes_test(
      fun(C, P, ConsumerNode, ProducerNode) ->
              Value = binary:copy(<<"v">>, 1000),
              Mutation = iolist_to_binary(
                           dcp_commands:mutation(5, 77, #{key => <<"k">>, by_seqno => 1,
                                                          value => Value})),
              Marker = iolist_to_binary(dcp_commands:snapshot_marker(5, 77, 2, 2, 1)),
              {Head, Tail} = split_binary(Mutation, 100),
              ok = gen_tcp:send(ProducerNode, Head),
              wait_stats(P, fun(#{bytes_in := In}) -> In =:= 100 end),
              %% the producer proxy is inside the mutation when our ADD_STREAM comes
              Setup = async(fun() -> dcp_consumer_conn:setup_streams(C, [5]) end),
              wait_stats(P, fun(#{own_batches_waiting := W, own_batches_sent := S}) ->
                                    W + S =:= 1
                            end),
              ok = gen_tcp:send(ProducerNode, [Tail, Marker]),
              AddSize = iolist_to_binary(dcp_commands:add_stream(5, 0, 5)),
              {ok, Got} = gen_tcp:recv(ConsumerNode, byte_size(Mutation)
                                       + byte_size(AddSize) + byte_size(Marker)),
              %% the opaque is the machine's own for this request (it names the request)
              <<_:(byte_size(Mutation))/binary, _:12/binary, Opaque:32, _/binary>> = Got,
              AddStream = iolist_to_binary(dcp_commands:add_stream(5, 0, Opaque)),
              ?assertEqual(<<Mutation/binary, AddStream/binary, Marker/binary>>, Got),
              ok = gen_tcp:send(ConsumerNode, dcp_commands:add_stream_response(Opaque, 0, 9)),
              ?assertEqual(ok, Setup()),
              ?assertMatch(#{own_batches_sent := 1, own_batches_waiting := 0},
                           dcp_proxy:stats(P))
      end).

own_frame_at_a_frame_boundary_goes_out_at_once_test_() ->
    fake_nodes_test(
      fun(C, P, ConsumerNode, ProducerNode) ->
              Noop = iolist_to_binary(dcp_commands:noop_request(1)),
              ok = gen_tcp:send(ProducerNode, Noop),
              {ok, Noop} = gen_tcp:recv(ConsumerNode, byte_size(Noop)),
              Setup = async(fun() -> dcp_consumer_conn:setup_streams(C, [2]) end),
              #{opcode_name := dcp_add_stream, vbucket := 2, opaque := Opaque} =
                  recv_frame(ConsumerNode),
              ok = gen_tcp:send(ConsumerNode, dcp_commands:add_stream_response(Opaque, 0, 9)),
              ?assertEqual(ok, Setup()),
              ?assertMatch(#{own_batches_sent := 1}, dcp_proxy:stats(P))
      end).

shut_consumer_stops_forwarding_but_still_sends_own_frames_test_() ->
    fake_nodes_test(
      fun(C, P, ConsumerNode, ProducerNode) ->
              ?assertEqual(ok, dcp_consumer_conn:shut_connection(C, 5000)),
              Noop = iolist_to_binary(dcp_commands:noop_request(1)),
              ok = gen_tcp:send(ConsumerNode, Noop),
              wait_stats(C, fun(#{bytes_in := In}) -> In =:= byte_size(Noop) end),
              ok = dcp_producer_conn:close_stream(P, 3),
              %% the producer sees our CLOSE_STREAM, not the consumer's noop
              ?assertMatch(#{opcode_name := dcp_close_stream, vbucket := 3},
                           recv_frame(ProducerNode))
      end).
