%% @doc dcp_proxy, dcp_consumer_conn and dcp_producer_conn against kv_sim over real sockets: the
%% handshake and its errors, the consumer conn's callers (queueing, shut, protocol violations), the
%% traffic monitor, and credentials kept out of logs.
-module(dcp_conn_tests).

-include_lib("eunit/include/eunit.hrl").

%% logger handler callback (collects events for the credentials test)
-export([log/2]).

-define(PASSWORD, "Never-Log-Me-7f3a").
-define(NAME, "replication:n_1->n_0:default").
-define(BACKSTOP, 60).

%% ---- harness ----

start_nodes(ProducerOpts, ConsumerOpts) ->
    Common = #{password => ?PASSWORD, vbuckets => 8},
    {ok, Producer} = kv_sim:start(maps:merge(Common#{role => producer, docs_per_vbucket => 10,
                                                     value_size => 32}, ProducerOpts)),
    {ok, Consumer} = kv_sim:start(maps:merge(Common#{role => consumer}, ConsumerOpts)),
    {Producer, Consumer}.

proxy_opts(Node, Extra) ->
    maps:merge(#{host => {127, 0, 0, 1}, port => kv_sim:port(Node), bucket => "default",
                 connection_name => ?NAME, user => "Administrator",
                 password => fun() -> ?PASSWORD end, connect_timeout => 5000},
               Extra).

%% A consumer conn and a producer conn proxying each other, without a replicator.
with_pair(ProducerOpts, ConsumerOpts, SetupTimeout, Fun) ->
    process_flag(trap_exit, true),
    {Producer, Consumer} = start_nodes(ProducerOpts, ConsumerOpts),
    try
        {ok, C} = dcp_consumer_conn:start_link(proxy_opts(Consumer, #{}), SetupTimeout),
        {ok, P} = dcp_producer_conn:start_link(proxy_opts(Producer, #{})),
        ok = dcp_proxy:connect_proxies(C, P),
        try
            Fun(C, P, Producer, Consumer)
        after
            dcp_proxy:terminate_and_wait([C, P], shutdown, 5000),
            dcp_test_lib:flush_exits()
        end
    after
        kv_sim:stop(Producer),
        kv_sim:stop(Consumer)
    end.

%% Calls `Fun' in another process; returns a function that waits for its result.
async(Fun) ->
    Self = self(),
    Ref = make_ref(),
    spawn(fun() -> Self ! {Ref, Fun()} end),
    fun() -> receive {Ref, Result} -> Result end end.

%% Waits until `Pred(Info)' holds for the consumer conn's setup_info.
wait_setup_info(C, Pred) ->
    case Pred(dcp_consumer_conn:setup_info(C)) of
        true -> ok;
        false -> timer:sleep(5), wait_setup_info(C, Pred)
    end.

%% ---- the splitter fact the proxy relies on ----

%% dcp_proxy inserts its own frames only at a frame boundary of what it forwards; it finds the
%% boundary from `bytes' (a frame's full length counts once its header is read) minus what it fed.
splitter_counts_a_frames_full_length_as_soon_as_its_header_is_read_test() ->
    Splitter = mcbp:splitter_new(#{side => producer}),
    Value = binary:copy(<<"v">>, 1000),
    Mutation = iolist_to_binary(dcp_commands:mutation(3, 7, #{key => <<"k">>, by_seqno => 1,
                                                              value => Value})),
    {Head, _} = split_binary(Mutation, 100),
    {ok, Forward, []} = mcbp:feed(Splitter, Head),
    ?assertEqual(Head, iolist_to_binary(Forward)),
    ?assertMatch(#{bytes := Len} when Len =:= byte_size(Mutation), mcbp:splitter_stats(Splitter)),
    %% a partial header only: nothing of that frame counted (or forwarded) yet
    Splitter2 = mcbp:splitter_new(#{side => producer}),
    {ok, Forward2, []} = mcbp:feed(Splitter2, binary:part(Mutation, 0, 10)),
    ?assertEqual(<<>>, iolist_to_binary(Forward2)),
    ?assertMatch(#{bytes := 0}, mcbp:splitter_stats(Splitter2)).

%% ---- handshake ----

wrong_password_is_a_clear_sasl_error_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             process_flag(trap_exit, true),
             {Producer, Consumer} = start_nodes(#{}, #{}),
             try
                 ?assertEqual({error, {consumer, {sasl_auth, {mcbp_status, auth_error}}}},
                              dcp_consumer_conn:start_link(
                                proxy_opts(Consumer, #{password => fun() -> "wrong" end}),
                                1000)),
                 dcp_test_lib:flush_exits()
             after
                 kv_sim:stop(Producer),
                 kv_sim:stop(Consumer)
             end
     end}.

unknown_bucket_is_a_select_bucket_error_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             process_flag(trap_exit, true),
             {Producer, Consumer} = start_nodes(#{}, #{}),
             try
                 ?assertMatch({error, {producer, {select_bucket, {mcbp_status, _}}}},
                              dcp_producer_conn:start_link(
                                proxy_opts(Producer, #{bucket => "no-such-bucket"}))),
                 dcp_test_lib:flush_exits()
             after
                 kv_sim:stop(Producer),
                 kv_sim:stop(Consumer)
             end
     end}.

refused_snappy_is_tolerated_but_refused_xattr_is_an_error_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             process_flag(trap_exit, true),
             {Producer, Consumer} = start_nodes(#{hello_features => [json]}, #{}),
             try
                 {ok, P} = dcp_producer_conn:start_link(
                             proxy_opts(Producer, #{features => [snappy, del_times]})),
                 dcp_proxy:terminate_and_wait([P], shutdown, 5000),
                 ?assertEqual({error, {producer, {hello, {features_refused, [xattr]}}}},
                              dcp_producer_conn:start_link(
                                proxy_opts(Producer, #{features => [xattr, snappy]}))),
                 dcp_test_lib:flush_exits()
             after
                 kv_sim:stop(Producer),
                 kv_sim:stop(Consumer)
             end
     end}.

connection_refused_is_a_connect_error_test() ->
    process_flag(trap_exit, true),
    {ok, L} = gen_tcp:listen(0, [{ip, loopback}]),
    {ok, Port} = inet:port(L),
    ok = gen_tcp:close(L),
    ?assertEqual({error, {consumer, {connect_failed, econnrefused}}},
                 dcp_consumer_conn:start_link(#{host => {127, 0, 0, 1}, port => Port,
                                                bucket => "default", connection_name => ?NAME,
                                                user => "u", password => fun() -> "p" end},
                                              1000)),
    dcp_test_lib:flush_exits().

%% ---- the consumer conn's callers ----

setup_close_and_partitions_through_the_consumer_conn_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_pair(#{}, #{}, 10000,
                       fun(C, _P, _Producer, _Consumer) ->
                               ?assertEqual(ok, dcp_consumer_conn:setup_streams(C, [1, 2, 3])),
                               ?assertEqual([1, 2, 3], dcp_consumer_conn:get_partitions(C)),
                               ?assertEqual(ok, dcp_consumer_conn:maybe_close_stream(C, 2)),
                               ?assertEqual(ok, dcp_consumer_conn:maybe_close_stream(C, 2)),
                               ?assertEqual([1, 3], dcp_consumer_conn:get_partitions(C)),
                               ?assertEqual({error, already_active},
                                            dcp_consumer_conn:takeover(C, 1)),
                               ?assertEqual({error, {bad_vbucket, 5000}},
                                            dcp_consumer_conn:setup_streams(C, [5000]))
                       end)
     end}.

setup_asked_for_while_another_runs_waits_its_turn_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_pair(#{}, #{}, 500,
                       fun(C, _P, _Producer, Consumer) ->
                               ok = kv_sim:set_fault(Consumer, 4, {drop_answer, dcp_add_stream}),
                               First = async(fun() -> dcp_consumer_conn:setup_streams(C, [4]) end),
                               wait_setup_info(C, fun(#{pending_adds := P}) -> P =:= [4] end),
                               Second = async(fun() -> dcp_consumer_conn:setup_streams(C, [5]) end),
                               ?assertEqual({errors, [{setup_timeout, {vbucket, 4}}]}, First()),
                               %% the second one ran after the first settled, towards [5] only
                               ?assertEqual(ok, Second()),
                               ?assertEqual([5], dcp_consumer_conn:get_partitions(C))
                       end)
     end}.

%% The consumer answers the shut's CLOSE_STREAM for the stuck vbucket, which settles its add: both
%% callers are answered then, long before the (30 s) setup deadline.
shut_during_a_stuck_setup_answers_both_callers_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_pair(#{}, #{}, 30000,
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
                       end)
     end}.

%% A setup accepted while the connection was up and queued behind the stuck one never runs: the shut
%% came first, so its caller gets the contract's per-vbucket errors rather than a refusal.
setup_queued_behind_a_stuck_setup_is_answered_as_lost_when_shut_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_pair(#{}, #{}, 30000,
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
                       end)
     end}.

shut_from_idle_closes_every_stream_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_pair(#{}, #{}, 10000,
                       fun(C, _P, _Producer, _Consumer) ->
                               ok = dcp_consumer_conn:setup_streams(C, [0, 6]),
                               ?assertEqual(ok, dcp_consumer_conn:shut_connection(C, 5000)),
                               ?assertEqual([], dcp_consumer_conn:get_partitions(C)),
                               ?assertEqual(ok, dcp_consumer_conn:shut_connection(C, 5000))
                       end)
     end}.

answer_matching_nothing_stops_the_conn_after_answering_the_caller_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_pair(#{docs_per_vbucket => 0}, #{}, 10000,
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
                               ?assertEqual(Violation, receive {'EXIT', C, R} -> R end)
                       end)
     end}.

producer_conn_going_away_answers_the_waiting_caller_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_pair(#{}, #{}, 10000,
                       fun(C, P, _Producer, Consumer) ->
                               ok = kv_sim:set_fault(Consumer, 1, {drop_answer, dcp_add_stream}),
                               Setup = async(fun() -> dcp_consumer_conn:setup_streams(C, [1]) end),
                               wait_setup_info(C, fun(#{pending_adds := Pd}) -> Pd =:= [1] end),
                               exit(P, kill),
                               ?assertEqual({errors, [{{connection_lost, killed}, {vbucket, 1}}]},
                                            Setup())
                       end)
     end}.

%% ---- liveliness and credentials ----

traffic_monitor_hears_from_both_sides_while_frames_flow_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             process_flag(trap_exit, true),
             {Producer, Consumer} = start_nodes(#{}, #{}),
             Self = self(),
             try
                 {ok, C} = dcp_consumer_conn:start_link(
                             proxy_opts(Consumer, #{traffic_monitor => Self}), 10000),
                 {ok, P} = dcp_producer_conn:start_link(
                             proxy_opts(Producer, #{traffic_monitor => Self})),
                 ok = dcp_proxy:connect_proxies(C, P),
                 ok = dcp_consumer_conn:setup_streams(C, [0, 1]),
                 Name = list_to_binary(?NAME),
                 [receive {dcp_traffic, Name, Side, T} -> ?assert(is_integer(T)) end
                  || Side <- [consumer, producer]],
                 dcp_proxy:terminate_and_wait([C, P], shutdown, 5000),
                 dcp_test_lib:flush_exits()
             after
                 kv_sim:stop(Producer),
                 kv_sim:stop(Consumer)
             end
     end}.

log(Event, #{config := #{collector := Pid}}) ->
    Pid ! {logged, Event}.

collect_logs(Acc) ->
    receive {logged, Event} -> collect_logs([Event | Acc]) after 200 -> lists:reverse(Acc) end.

password_never_appears_in_logs_or_crash_reports_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             process_flag(trap_exit, true),
             ok = logger:add_handler(dcp_conn_tests_capture, ?MODULE,
                                     #{level => all, config => #{collector => self()}}),
             OldLevel = maps:get(level, logger:get_primary_config()),
             ok = logger:set_primary_config(level, all),
             {Producer, Consumer} = start_nodes(#{}, #{}),
             try
                 %% a failed handshake, a replication, a crash of the pair
                 {error, _} = dcp_replicator:start_link(
                                #{consumer => {{127, 0, 0, 1}, kv_sim:port(Consumer)},
                                  producer => {{127, 0, 0, 1}, 1},
                                  bucket => "default", connection_name => ?NAME,
                                  user => "Administrator", password => ?PASSWORD}),
                 {ok, Rep} = dcp_replicator:start_link(
                               #{consumer => {{127, 0, 0, 1}, kv_sim:port(Consumer)},
                                 producer => {{127, 0, 0, 1}, kv_sim:port(Producer)},
                                 bucket => "default", connection_name => ?NAME,
                                 user => "Administrator", password => ?PASSWORD}),
                 ok = dcp_replicator:setup_replication(Rep, [0]),
                 ok = kv_sim:set_fault(Consumer, 1, {close_socket_on, dcp_add_stream}),
                 {errors, _} = dcp_replicator:setup_replication(Rep, [0, 1]),
                 receive {'EXIT', Rep, _} -> ok end,
                 Logged = [lists:flatten(io_lib:format("~p", [E])) || E <- collect_logs([])],
                 ?assert(length(Logged) > 0),
                 ?assertEqual([], [L || L <- Logged, string:find(L, ?PASSWORD) =/= nomatch])
             after
                 ok = logger:set_primary_config(level, OldLevel),
                 ok = logger:remove_handler(dcp_conn_tests_capture),
                 kv_sim:stop(Producer),
                 kv_sim:stop(Consumer),
                 dcp_test_lib:flush_exits()
             end
     end}.

%% ---- own frames and cut-through forwarding (scripted nodes: the test holds the node sockets) ----

%% A scripted node: accepts one connection, answers the handshake (SASL, SELECT_BUCKET, HELLO with
%% every feature granted, DCP_OPEN) with success, then hands the socket to the test.
fake_node() ->
    {ok, L} = gen_tcp:listen(0, [binary, {active, false}, {ip, loopback}]),
    {ok, Port} = inet:port(L),
    Test = self(),
    _ = spawn_link(fun() ->
                           {ok, S} = gen_tcp:accept(L),
                           ok = answer_handshake(S, 4),
                           ok = gen_tcp:controlling_process(S, Test),
                           Test ! {fake_node, Port, S}
                   end),
    {Port, L}.

answer_handshake(_S, 0) ->
    ok;
answer_handshake(S, N) ->
    #{opcode := Opcode, opaque := Opaque, value := Value} = recv_frame(S),
    Fields = case dcp_commands:command_2_atom(Opcode) of
                 hello -> #{value => Value};
                 _ -> #{}
             end,
    ok = gen_tcp:send(S, dcp_commands:response(Opcode, 0, Opaque, Fields)),
    answer_handshake(S, N - 1).

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
with_fake_nodes(Fun) ->
    process_flag(trap_exit, true),
    {CPort, CL} = fake_node(),
    {PPort, PL} = fake_node(),
    Opts = #{host => {127, 0, 0, 1}, bucket => "default", connection_name => ?NAME,
             user => "Administrator", password => fun() -> ?PASSWORD end},
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
    case Pred(dcp_proxy:stats(Pid)) of
        true -> ok;
        false -> timer:sleep(5), wait_stats(Pid, Pred)
    end.

own_frame_waits_for_the_end_of_the_frame_being_cut_through_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_fake_nodes(
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
                       AddStream = iolist_to_binary(dcp_commands:add_stream(5, 0, 5)),
                       {ok, Got} = gen_tcp:recv(ConsumerNode, byte_size(Mutation)
                                                + byte_size(AddStream) + byte_size(Marker)),
                       ?assertEqual(<<Mutation/binary, AddStream/binary, Marker/binary>>, Got),
                       ok = gen_tcp:send(ConsumerNode, dcp_commands:add_stream_response(5, 0, 9)),
                       ?assertEqual(ok, Setup()),
                       ?assertMatch(#{own_batches_sent := 1, own_batches_waiting := 0},
                                    dcp_proxy:stats(P))
               end)
     end}.

own_frame_at_a_frame_boundary_goes_out_at_once_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_fake_nodes(
               fun(C, P, ConsumerNode, ProducerNode) ->
                       Noop = iolist_to_binary(dcp_commands:noop_request(1)),
                       ok = gen_tcp:send(ProducerNode, Noop),
                       {ok, Noop} = gen_tcp:recv(ConsumerNode, byte_size(Noop)),
                       Setup = async(fun() -> dcp_consumer_conn:setup_streams(C, [2]) end),
                       #{opcode_name := dcp_add_stream, vbucket := 2, opaque := 2} =
                           recv_frame(ConsumerNode),
                       ok = gen_tcp:send(ConsumerNode, dcp_commands:add_stream_response(2, 0, 9)),
                       ?assertEqual(ok, Setup()),
                       ?assertMatch(#{own_batches_sent := 1}, dcp_proxy:stats(P))
               end)
     end}.

shut_consumer_stops_forwarding_but_still_sends_own_frames_test_() ->
    {timeout, ?BACKSTOP,
     fun() ->
             with_fake_nodes(
               fun(C, P, ConsumerNode, ProducerNode) ->
                       ?assertEqual(ok, dcp_consumer_conn:shut_connection(C, 5000)),
                       Noop = iolist_to_binary(dcp_commands:noop_request(1)),
                       ok = gen_tcp:send(ConsumerNode, Noop),
                       wait_stats(C, fun(#{bytes_in := In}) -> In =:= byte_size(Noop) end),
                       ok = dcp_producer_conn:close_stream(P, 3),
                       %% the producer sees our CLOSE_STREAM, not the consumer's noop
                       ?assertMatch(#{opcode_name := dcp_close_stream, vbucket := 3},
                                    recv_frame(ProducerNode))
               end)
     end}.
