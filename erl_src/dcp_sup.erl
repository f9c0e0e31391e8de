%% @doc The replicators from one producer node for one bucket: N connections, vbucket V on
%% connection `V rem N', each named by `dcp_replicator:get_connection_name/4'.
-module(dcp_sup).

-behaviour(supervisor).

-export([merge_replies/1, lost/2, start_link/1, setup_replication/2, replicators/1, connection_for_vbucket/2]).

%% embedding: a child spec for the user's supervisor, an orderly stop
-export([child_spec/1, stop/1]).

%% supervisor callback
-export([init/1]).

-export_type([opts/0]).

%% Replicator options without `connection_name' (made per connection) and `name', plus the node
%% names that go into the connection names and the number of connections.
-type opts() :: #{consumer_node := atom() | string(),
                  producer_node := atom() | string(),
                  connections => pos_integer(),
                  atom() => term()}.

%% @doc Starts one replicator per connection.
%% Options are checked first (`dcp_options'): a bad one is `{error, {bad_option, Key, Value}}'.
%% `name => Atom' registers the supervisor locally.
-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(Opts) ->
    case dcp_options:sup(Opts) of
        {ok, #{name := Name} = Checked} -> supervisor:start_link({local, Name}, ?MODULE, Checked);
        {ok, Checked} -> supervisor:start_link(?MODULE, Checked);
        {error, _} = Error -> Error
    end.

%% @doc A child spec (a supervisor child) for `start_link(Opts)', id `{dcp_sup, ProducerNode,
%% Bucket}'. Raises `error({bad_option, Key, Value})' for options `start_link/1' would refuse.
-spec child_spec(opts()) -> supervisor:child_spec().
child_spec(Opts) ->
    case dcp_options:sup(Opts) of
        {ok, #{producer_node := Producer, bucket := Bucket} = Checked} ->
            #{id => {?MODULE, Producer, Bucket},
              start => {?MODULE, start_link, [Checked]},
              restart => permanent,
              shutdown => infinity,
              type => supervisor,
              modules => [?MODULE]};
        {error, Reason} ->
            erlang:error(Reason)
    end.

%% @doc Stops the supervisor and its replicators (each the orderly way).
-spec stop(pid() | atom()) -> ok.
stop(Sup) ->
    gen_server:stop(Sup, shutdown, infinity).

%% @doc Connection `V rem N' replicates vbucket V. Every connection gets its full list (an empty one
%% closes what it had), and the answers are merged: `ok', or every error from every connection.
%% A `VBuckets' that is not a proper list of 0..1023 is `{error, {bad_vbucket, X}}' (nothing is
%% asked of any connection).
-spec setup_replication(pid(), [0..1023]) -> dcp_consumer_conn:setup_reply() | {error, term()}.
setup_replication(Sup, VBuckets) ->
    case dcp_replicator:check_vbuckets(VBuckets) of
        {ok, Unique} -> setup_checked(Sup, Unique);
        {error, _} = Error -> Error
    end.

setup_checked(Sup, VBuckets) ->
    Replicators = replicators(Sup),
    N = length(Replicators),
    Callers = [{ConnNum, Rep, [VB || VB <- VBuckets,
                                     connection_for_vbucket(N, VB) =:= ConnNum]}
               || {ConnNum, Rep} <- Replicators],
    %% the connections set up in parallel; each one answers by its own deadline
    Self = self(),
    Tag = make_ref(),
    Workers = [spawn_monitor(fun() -> Self ! {Tag, ConnNum, call(Rep, Wanted)} end)
               || {ConnNum, Rep, Wanted} <- Callers],
    Replies = [collect(Tag, ConnNum, Wanted, Worker)
               || {{ConnNum, _, Wanted}, Worker} <- lists:zip(Callers, Workers)],
    merge_replies(Replies).

call(undefined, []) ->
    ok;
call(Rep, Wanted) when is_pid(Rep) ->
    %% a replicator that goes away answers with the contract's errors itself
    dcp_replicator:setup_replication(Rep, Wanted);
call(NotRunning, Wanted) ->
    lost({not_running, NotRunning}, Wanted).

collect(Tag, ConnNum, Wanted, {Pid, Ref}) ->
    receive
        {Tag, ConnNum, Reply} ->
            erlang:demonitor(Ref, [flush]),
            Reply;
        {'DOWN', Ref, process, Pid, Reason} ->
            lost(Reason, Wanted)
    end.

%% @doc Every vbucket of `Wanted' lost for `Reason', as a setup reply.
-spec lost(term(), [0..1023]) -> dcp_consumer_conn:setup_reply().
lost(Reason, Wanted) ->
    {errors, [{{connection_lost, Reason}, {vbucket, VB}} || VB <- Wanted]}.

%% @doc Setup replies merged into one: `ok', or every error of every reply.
-spec merge_replies([dcp_consumer_conn:setup_reply() | term()]) -> term().
merge_replies(Replies) ->
    case lists:append([Errors || {errors, Errors} <- Replies]) of
        [] ->
            case [Other || Other <- Replies, Other =/= ok] of
                [] -> ok;
                [Error | _] -> Error
            end;
        Errors ->
            {errors, Errors}
    end.

%% @doc The running replicators by connection number.
-spec replicators(pid()) -> [{non_neg_integer(), pid() | undefined | restarting}].
replicators(Sup) ->
    lists:sort([{ConnNum, Pid} || {ConnNum, Pid, _, _} <- supervisor:which_children(Sup)]).

-spec connection_for_vbucket(pos_integer(), 0..1023) -> non_neg_integer().
connection_for_vbucket(Connections, VBucket) ->
    VBucket rem Connections.

%% A replicator that fails is restarted with no streams; the next setup_replication gives it back its
%% vbuckets. The child specs stay, so the number of connections (the vbucket map) never changes.
init(#{consumer_node := ConsumerNode, producer_node := ProducerNode, bucket := Bucket} = Opts) ->
    N = maps:get(connections, Opts, 1),
    RepOpts = maps:without([consumer_node, producer_node, connections, name], Opts),
    Children = [#{id => ConnNum,
                  start => {dcp_replicator, start_link,
                            [RepOpts#{connection_name =>
                                          dcp_replicator:get_connection_name(
                                            ConsumerNode, ProducerNode, Bucket, ConnNum)}]},
                  %% permanent: an expected failure ends a replicator with {shutdown, Why}
                  restart => permanent,
                  %% the replicator's own stop: the consumer shut, then at most 15 s more
                  shutdown => maps:get(shut_timeout, Opts, 10000) + 20000,
                  type => worker,
                  modules => [dcp_replicator]}
                || ConnNum <- lists:seq(0, N - 1)],
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, Children}}.
