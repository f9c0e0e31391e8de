%% @doc The incoming replications of one bucket on the consumer node: the layer ns_server's rebalancer
%% and janitor drive (ns_server's `replication_manager' and `dcp_replication_manager' in one process).
%%
%% It holds the desired replications `[{ProducerNode, [VBucket]}]' and applies each change: a `dcp_sup'
%% per producer node (N connections, vbucket V on connection `V rem N') is started for a producer that
%% appears and stopped for one that goes, and every producer whose vbuckets changed gets its connections
%% set up in parallel. The reply is merged over every connection of every producer: `ok' or
%% `{errors, [{Why, {vbucket, VB}}]}', `Why' as `dcp_replicator:setup_replication/2' gives it. Every
%% setup is bounded by its replicator's `setup_timeout', so no call here waits on a stuck stream (the
%% MB-53445 failure stopped a whole bucket's rebalance behind one hung setup).
%%
%% Nodes become endpoints through the user's `resolve' callback and credentials come from a fun, read
%% at each connection start (a changed password is used by the next connection).
%%
%% The manager serializes changes: each call is answered once its setups settled, and the next one
%% starts from what the connections then hold.
-module(dcp_replication_manager).

-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/1, start_link/2, server_name/1, set_desired_replications/2,
         get_actual_replications/1, get_connection_count/1, set_connection_count/2, takeover/3,
         nuke/1, producers/1, replicator_for/3, consumer_node/1, stop/1, endpoint/3]).

-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([opts/0, endpoint_info/0, resolver/0, replications/0, manager/0]).

-define(LOG_META, #{domain => [dcp_proxy]}).

%% What `resolve' says of a node: its memcached's host, plain port, TLS port, and whether it is the
%% local node (reached over plain TCP whatever `ssl', as ns_server reaches its own memcached; absent:
%% whether it is `node()'). With `ssl' set, every node not local is reached on its `tls_port'; see
%% `endpoint/3'.
-type endpoint_info() :: #{host := inet:socket_address() | inet:hostname(),
                           port := inet:port_number(),
                           tls_port => inet:port_number(),
                           local => boolean()}.
-type resolver() :: fun((node()) -> endpoint_info()).
-type replications() :: [{node(), [0..1023]}].
%% The manager itself, its registered name, or (as ns_server's callers name it) the bucket.
-type manager() :: pid() | atom() | string().

%% `bucket', `resolve', `credentials' (a fun giving `{User, Password}') are required. `connections' (1)
%% is N; `consumer_node' (`node()') the node whose memcached consumes; `name' the registered name
%% (ns_server's `dcp_replication_manager-Bucket' by default, `undefined' for none); `ssl' (`false' or
%% TLS options: nodes that are not local are reached on their TLS port); `replicator' extra
%% `dcp_replicator' options (features, setup_timeout, splitter, ...).
-type opts() :: #{bucket := string(),
                  resolve := resolver(),
                  credentials := fun(() -> {string(), string() | fun(() -> iodata())}),
                  connections => pos_integer(),
                  consumer_node => node(),
                  name => atom() | undefined,
                  ssl => false | [ssl:tls_client_option()],
                  replicator => map()}.

-record(state, {bucket :: string(),
                consumer_node :: node(),
                resolve :: resolver(),
                credentials :: fun(() -> {string(), string() | fun(() -> iodata())}),
                connections :: pos_integer(),
                ssl :: false | dcp_secret:secret(),     % the TLS options, wrapped
                rep_opts :: map(),
                desired = #{} :: #{node() => [0..1023]},
                sups = #{} :: #{node() => pid()}}).

%% ---- API ----

%% @doc ns_server's shape: the bucket's manager, with the resolver and credentials `dcp_ns:configure/1'
%% stored.
-spec start_link(string()) -> {ok, pid()} | {error, term()}.
start_link(Bucket) ->
    start_link(Bucket, dcp_ns:config()).

-spec start_link(string(), map()) -> {ok, pid()} | {error, term()}.
start_link(Bucket, Opts) ->
    %% TLS options hold a private key: from here on (start arguments, state, crash reports) they
    %% travel wrapped, and are revealed only to build a replicator's endpoint.
    Opts1 = case Opts of
                #{ssl := Tls} when is_list(Tls) ->
                    Opts#{bucket => Bucket, ssl => dcp_secret:wrap_term(Tls)};
                _ -> Opts#{bucket => Bucket}
            end,
    case maps:get(name, Opts1, server_name(Bucket)) of
        undefined -> gen_server:start_link(?MODULE, Opts1, []);
        Name -> gen_server:start_link({local, Name}, ?MODULE, Opts1, [])
    end.

%% @doc ns_server's registered name of a bucket's manager.
-spec server_name(string()) -> atom().
server_name(Bucket) ->
    list_to_atom("dcp_replication_manager-" ++ Bucket).

-spec stop(manager()) -> ok.
stop(Mgr) ->
    gen_server:stop(ref(Mgr), shutdown, infinity).

%% @doc Replicate exactly `Desired' from now on; producers with an empty list (or absent) are dropped.
%% A map that is not `[{node(), [0..1023]}]' is refused with `{error, {bad_replications, Map}}'.
-spec set_desired_replications(manager(), replications()) ->
          dcp_consumer_conn:setup_reply() | {error, term()}.
set_desired_replications(Mgr, Desired) ->
    gen_server:call(ref(Mgr), {set_desired, Desired}, infinity).

%% @doc What the connections hold, by producer node (sorted; producers with nothing left out), or
%% `not_running' when there is no manager.
-spec get_actual_replications(manager()) -> replications() | not_running.
get_actual_replications(Mgr) ->
    try
        gen_server:call(ref(Mgr), get_actual, infinity)
    catch
        exit:{noproc, _} -> not_running
    end.

-spec get_connection_count(manager()) -> pos_integer().
get_connection_count(Mgr) ->
    gen_server:call(ref(Mgr), get_connection_count, infinity).

%% @doc Changes N. Every producer's connections are stopped (an orderly stop closes each consumer
%% stream) and started again N wide, and the desired vbuckets set up again on their new connections:
%% none is lost, none held twice. The reply is that setup's.
-spec set_connection_count(manager(), pos_integer()) -> dcp_consumer_conn:setup_reply().
set_connection_count(Mgr, N) when is_integer(N), N > 0 ->
    gen_server:call(ref(Mgr), {set_connection_count, N}, infinity).

%% @doc Takes `VBucket' over from `ProducerNode' (which must replicate it here): once it answers `ok'
%% this node's memcached owns the vbucket and the manager no longer asks `ProducerNode' for it.
-spec takeover(manager(), node(), 0..1023) -> dcp_consumer_conn:setup_reply() | {error, term()}.
takeover(Mgr, ProducerNode, VBucket) ->
    gen_server:call(ref(Mgr), {takeover, ProducerNode, VBucket}, infinity).

%% @doc Stops every replication of the bucket and forgets the desired map.
-spec nuke(manager()) -> ok.
nuke(Mgr) ->
    gen_server:call(ref(Mgr), nuke, infinity).

%% @doc The running per-producer supervisors.
-spec producers(manager()) -> [{node(), pid()}].
producers(Mgr) ->
    gen_server:call(ref(Mgr), producers, infinity).

%% @doc The replicator that carries `VBucket' from `ProducerNode' (connection `VBucket rem N').
-spec replicator_for(manager(), node(), 0..1023) -> pid() | undefined.
replicator_for(Mgr, ProducerNode, VBucket) ->
    gen_server:call(ref(Mgr), {replicator_for, ProducerNode, VBucket}, infinity).

-spec consumer_node(manager()) -> node().
consumer_node(Mgr) ->
    gen_server:call(ref(Mgr), consumer_node, infinity).

ref(Bucket) when is_list(Bucket) -> server_name(Bucket);
ref(Mgr) -> Mgr.

%% ---- gen_server ----

init(#{bucket := Bucket, resolve := Resolve, credentials := Credentials} = Opts) ->
    process_flag(trap_exit, true),
    {ok, #state{bucket = Bucket,
                consumer_node = maps:get(consumer_node, Opts, node()),
                resolve = Resolve,
                credentials = Credentials,
                connections = maps:get(connections, Opts, 1),
                ssl = maps:get(ssl, Opts, false),
                rep_opts = maps:get(replicator, Opts, #{})}}.

handle_call({set_desired, Desired}, _From, State) ->
    case valid(Desired) of
        true ->
            {Reply, State1} = apply_desired(normalize(Desired), State),
            {reply, Reply, State1};
        false ->
            {reply, {error, {bad_replications, Desired}}, State}
    end;
handle_call(get_actual, _From, State) ->
    {reply, actual(State), State};
handle_call(get_connection_count, _From, #state{connections = N} = State) ->
    {reply, N, State};
handle_call({set_connection_count, N}, _From, #state{connections = N} = State) ->
    {reply, ok, State};
handle_call({set_connection_count, N}, _From, #state{desired = Desired} = State) ->
    ?LOG_INFO(#{what => dcp_connection_count_changing, bucket => State#state.bucket,
                from => State#state.connections, to => N}, ?LOG_META),
    State1 = stop_all(State),
    {Reply, State2} = apply_desired(Desired, State1#state{connections = N, desired = #{}}),
    {reply, Reply, State2};
handle_call({takeover, Producer, VB}, _From, State) ->
    case rep_for(Producer, VB, State) of
        undefined ->
            {reply, {errors, [{{connection_lost, {not_running, Producer}}, {vbucket, VB}}]}, State};
        Rep ->
            Reply = dcp_replicator:takeover(Rep, VB),
            %% taken over or not, this node no longer replicates VB from the old active: a failed
            %% takeover is retried by the rebalancer, which sets the replications again
            Desired = maps:update_with(Producer, fun(VBs) -> lists:delete(VB, VBs) end, [],
                                       State#state.desired),
            {reply, Reply, State#state{desired = Desired}}
    end;
handle_call(nuke, _From, State) ->
    {reply, ok, (stop_all(State))#state{desired = #{}}};
handle_call(producers, _From, #state{sups = Sups} = State) ->
    {reply, lists:sort(maps:to_list(Sups)), State};
handle_call({replicator_for, Producer, VB}, _From, State) ->
    {reply, rep_for(Producer, VB, State), State};
handle_call(consumer_node, _From, State) ->
    {reply, State#state.consumer_node, State}.

handle_cast(_Msg, State) ->
    {noreply, State}.

%% A producer's supervisor that gave up (its node is gone, or its connections kept failing) leaves the
%% running set; the next change starts it again.
handle_info({'EXIT', Pid, Reason}, #state{sups = Sups} = State) ->
    case [Node || {Node, P} <- maps:to_list(Sups), P =:= Pid] of
        [Node] ->
            ?LOG_WARNING(#{what => dcp_producer_replications_stopped, bucket => State#state.bucket,
                           producer_node => Node, reason => Reason}, ?LOG_META),
            {noreply, State#state{sups = maps:remove(Node, Sups)}};
        [] ->
            {noreply, State}
    end;
handle_info(_Info, State) ->
    {noreply, State}.

terminate(_Reason, State) ->
    _ = stop_all(State),
    ok.

%% ---- applying a change ----

valid(Desired) when is_list(Desired) ->
    lists:all(fun({Node, VBs}) when is_atom(Node), is_list(VBs) ->
                      lists:all(fun(VB) -> is_integer(VB) andalso VB >= 0 andalso VB =< 1023 end, VBs);
                 (_) ->
                      false
              end, Desired);
valid(_) ->
    false.

normalize(Desired) ->
    maps:from_list([{Node, lists:usort(VBs)} || {Node, VBs} <- Desired, VBs =/= []]).

apply_desired(Desired, #state{sups = Sups} = State) ->
    %% producers that are no longer wanted go first, so a vbucket moving between producers is never
    %% held twice on this node's memcached
    Gone = [Node || Node <- maps:keys(Sups), not maps:is_key(Node, Desired)],
    State1 = lists:foldl(fun stop_producer/2, State, Gone),
    Changed = [{Node, VBs} || {Node, VBs} <- maps:to_list(Desired),
                              maps:get(Node, State#state.desired, undefined) =/= VBs
                                  orelse not maps:is_key(Node, State1#state.sups)
                                  orelse actual_of(Node, State1) =/= VBs],
    %% vbuckets leaving a producer that stays are closed before any producer adds them
    {Shrinking, Growing} = lists:partition(
                             fun({Node, VBs}) ->
                                     Old = maps:get(Node, State#state.desired, []),
                                     Old -- VBs =/= []
                             end, Changed),
    {Replies1, State2} = setup_parallel([{N, VBs -- added(N, VBs, State)} || {N, VBs} <- Shrinking],
                                        State1),
    {Replies2, State3} = setup_parallel(Growing ++ [{N, VBs} || {N, VBs} <- Shrinking,
                                                                 added(N, VBs, State) =/= []],
                                        State2),
    Reply = merge(Replies1 ++ Replies2),
    case Reply of
        ok -> ok;
        {errors, Errors} ->
            ?LOG_WARNING(#{what => dcp_setup_replications_failed, bucket => State#state.bucket,
                           errors => Errors}, ?LOG_META)
    end,
    {Reply, State3#state{desired = Desired}}.

added(Node, VBs, State) ->
    VBs -- maps:get(Node, State#state.desired, []).

%% Each producer's connections set up at once; a producer whose connections cannot start answers
%% `connection_lost' for its vbuckets only.
setup_parallel(Changes, State) ->
    {Started, State1} = lists:foldl(fun({Node, VBs}, {Acc, S}) ->
                                            case ensure_producer(Node, S) of
                                                {ok, Sup, S1} -> {[{Node, {ok, Sup}, VBs} | Acc], S1};
                                                {error, Why, S1} -> {[{Node, {error, Why}, VBs} | Acc], S1}
                                            end
                                    end, {[], State}, Changes),
    Self = self(),
    Tag = make_ref(),
    Workers = [{Node, VBs, spawn_monitor(fun() -> Self ! {Tag, Node, setup(Sup, VBs)} end)}
               || {Node, {ok, Sup}, VBs} <- Started],
    Failed = [lost(Why, VBs) || {_Node, {error, Why}, VBs} <- Started],
    Replies = [receive
                   {Tag, Node, Reply} ->
                       erlang:demonitor(Ref, [flush]),
                       Reply;
                   {'DOWN', Ref, process, Pid, Reason} ->
                       lost(Reason, VBs)
               end || {Node, VBs, {Pid, Ref}} <- Workers],
    {Failed ++ Replies, State1}.

setup(Sup, VBs) ->
    try
        dcp_sup:setup_replication(Sup, VBs)
    catch
        exit:Reason -> lost(Reason, VBs)
    end.

lost(Reason, VBs) ->
    dcp_sup:lost(Reason, VBs).

%% dcp_sup's merge, with the errors in vbucket order
merge(Replies) ->
    case dcp_sup:merge_replies(Replies) of
        {errors, Errors} -> {errors, lists:keysort(2, Errors)};
        Other -> Other
    end.

ensure_producer(Node, #state{sups = Sups} = State) ->
    case Sups of
        #{Node := Sup} ->
            {ok, Sup, State};
        _ ->
            case start_producer(Node, State) of
                {ok, Sup} -> {ok, Sup, State#state{sups = Sups#{Node => Sup}}};
                {error, Why} -> {error, {start_failed, Why}, State}
            end
    end.

start_producer(Node, State) ->
    #state{bucket = Bucket, consumer_node = Consumer, resolve = Resolve, credentials = Credentials,
           connections = N, ssl = Ssl, rep_opts = RepOpts} = State,
    try
        {User, Password} = Credentials(),
        Tls = case Ssl of
                  false -> false;
                  Wrapped -> dcp_secret:reveal_term(Wrapped)
              end,
        Opts = maps:merge(RepOpts, #{consumer => endpoint(Consumer, Resolve(Consumer), Tls),
                                     producer => endpoint(Node, Resolve(Node), Tls),
                                     bucket => Bucket, user => User, password => Password,
                                     consumer_node => Consumer, producer_node => Node,
                                     connections => N}),
        dcp_sup:start_link(Opts)
    catch
        error:{no_tls_port, NoTls} -> {error, {no_tls_port, NoTls}};
        Class:Reason -> {error, {Class, Reason}}
    end.

%% @doc The replicator endpoint of `Node' from what the resolver says of it: its plain `port' when
%% `Ssl' is `false' or the node is local, else its `tls_port' with `Ssl' as that endpoint's own TLS
%% options (ns_server's rule: TLS when cluster encryption is on and the node is not this one). A node
%% is local when its info says `local => true', or, without `local', when it is `node()'. Each side
%% of a replication gets its own: a local consumer stays plain while the producer is TLS. A node to
%% be reached over TLS without a `tls_port' raises `error({no_tls_port, Node})'.
-spec endpoint(node(), endpoint_info(), false | [ssl:tls_client_option()]) ->
          #{host := inet:socket_address() | inet:hostname(), port := inet:port_number(),
            ssl := false | [ssl:tls_client_option()]}.
endpoint(Node, #{host := Host, port := Port} = Info, Ssl) ->
    case {Ssl, maps:get(local, Info, Node =:= node()), Info} of
        {false, _, _} -> #{host => Host, port => Port, ssl => false};
        {_, true, _} -> #{host => Host, port => Port, ssl => false};
        {Tls, false, #{tls_port := TlsPort}} -> #{host => Host, port => TlsPort, ssl => Tls};
        {_, false, _} -> erlang:error({no_tls_port, Node})
    end.

stop_producer(Node, #state{sups = Sups} = State) ->
    case maps:take(Node, Sups) of
        {Sup, Sups1} ->
            stop_sup(Sup),
            State#state{sups = Sups1};
        error ->
            State
    end.

stop_all(#state{sups = Sups} = State) ->
    lists:foreach(fun stop_sup/1, maps:values(Sups)),
    State#state{sups = #{}}.

%% An orderly stop: each replicator shuts its consumer first, so the streams it held are closed on this
%% node's memcached before anything else may add them.
stop_sup(Sup) ->
    Ref = erlang:monitor(process, Sup),
    unlink(Sup),
    exit(Sup, shutdown),
    receive
        {'DOWN', Ref, process, Sup, _} -> ok
    end,
    receive
        {'EXIT', Sup, _} -> ok
    after 0 -> ok
    end.

%% ---- what the connections hold ----

actual(#state{sups = Sups} = State) ->
    lists:sort([{Node, VBs} || Node <- maps:keys(Sups),
                               VBs <- [actual_of(Node, State)], VBs =/= []]).

actual_of(Node, #state{sups = Sups}) ->
    case Sups of
        #{Node := Sup} ->
            lists:usort(lists:append([partitions(Rep) || {_, Rep} <- replicators(Sup)]));
        _ ->
            []
    end.

replicators(Sup) ->
    try dcp_sup:replicators(Sup) catch exit:_ -> [] end.

partitions(Rep) when is_pid(Rep) ->
    try dcp_replicator:get_partitions(Rep)
    catch
        exit:_ -> []
    end;
partitions(_NotRunning) ->
    [].

rep_for(Producer, VB, #state{sups = Sups, connections = N}) ->
    case Sups of
        #{Producer := Sup} ->
            ConnNum = dcp_sup:connection_for_vbucket(N, VB),
            case lists:keyfind(ConnNum, 1, replicators(Sup)) of
                {_, Rep} when is_pid(Rep) -> Rep;
                _ -> undefined
            end;
        _ ->
            undefined
    end.
