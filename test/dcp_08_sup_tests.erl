%% @doc dcp_sup: N replicators for one producer node, vbucket V on connection `V rem N', merged
%% replies, a failed replicator restarted and given its vbuckets back.
-module(dcp_08_sup_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dcp_test_lib, [with_nodes/3]).

start_sup(Env, Connections) ->
    Opts = maps:remove(connection_name, dcp_test_lib:rep_opts(Env)),
    {ok, Sup} = dcp_sup:start_link(Opts#{consumer_node => 'n_0@127.0.0.1',
                                         producer_node => 'n_1@127.0.0.1',
                                         connections => Connections}),
    Sup.

stop_sup(Sup) ->
    unlink(Sup),
    Ref = erlang:monitor(process, Sup),
    exit(Sup, shutdown),
    receive {'DOWN', Ref, process, Sup, _} -> ok end.

partitions(Sup) ->
    [{N, dcp_replicator:get_partitions(Rep)} || {N, Rep} <- dcp_sup:replicators(Sup)].

sup_gives_vbucket_v_to_connection_v_rem_n_and_merges_replies_test_() ->
    with_nodes("three connections, vbucket 4 ended with rollback", #{rep => none},
               fun(#{producer := Producer, consumer := Consumer} = Env) ->
                       process_flag(trap_exit, true),
                       Sup = start_sup(Env, 3),
                       ok = kv_sim:set_fault(Producer, 4, {stream_end_on_accept, rollback}),
                       ok = kv_sim:set_fault(Consumer, 4, no_add_stream_answer_after_stream_end),
                       ?assertEqual({errors, [{{stream_end, rollback}, {vbucket, 4}}]},
                                    dcp_sup:setup_replication(Sup, lists:seq(0, 8))),
                       ?assertEqual([{0, [0, 3, 6]}, {1, [1, 7]}, {2, [2, 5, 8]}], partitions(Sup)),
                       ?assertEqual(ok, dcp_sup:setup_replication(Sup, [0, 1])),
                       ?assertEqual([{0, [0]}, {1, [1]}, {2, []}], partitions(Sup)),
                       stop_sup(Sup)
               end).

sup_restarts_a_failed_replicator_which_takes_its_vbuckets_back_on_the_next_setup_test_() ->
    with_nodes("two connections, the consumer node closes connection 1's socket", #{rep => none},
               fun(#{consumer := Consumer} = Env) ->
                       process_flag(trap_exit, true),
                       Sup = start_sup(Env, 2),
                       ?assertEqual(ok, dcp_sup:setup_replication(Sup, [0, 1, 2, 3])),
                       [{0, Rep0}, {1, Rep1}] = dcp_sup:replicators(Sup),
                       Ref = erlang:monitor(process, Rep1),
                       ok = kv_sim:set_fault(Consumer, 5, {close_socket_on, dcp_add_stream}),
                       ?assertMatch({errors, [{{connection_lost, {socket_closed, consumer}},
                                               {vbucket, 5}}]},
                                    dcp_sup:setup_replication(Sup, [0, 1, 2, 3, 5])),
                       receive {'DOWN', Ref, process, Rep1, _} -> ok end,
                       ok = kv_sim:clear_faults(Consumer),
                       %% connection 1 came back without streams and got 1, 3, 5 again;
                       %% connection 0 (the same process) kept 0 and 2
                       ?assertEqual([0, 2, 1, 3, 5], wait_setup_ok(Sup, [0, 1, 2, 3, 5])),
                       [{0, Rep0}, {1, NewRep1}] = dcp_sup:replicators(Sup),
                       ?assertNotEqual(Rep1, NewRep1),
                       stop_sup(Sup)
               end).

%% The restarted replicator may not be up yet: until it is, its vbuckets come back as not running.
wait_setup_ok(Sup, VBuckets) ->
    case dcp_sup:setup_replication(Sup, VBuckets) of
        ok ->
            lists:append([dcp_replicator:get_partitions(Rep)
                          || {_, Rep} <- dcp_sup:replicators(Sup), is_pid(Rep)]);
        {errors, _} ->
            timer:sleep(10),
            wait_setup_ok(Sup, VBuckets)
    end.
