%% @doc A `kv_sim' node's vbucket table: each vbucket's state and, on a consumer node, the high seqno
%% it has stored. Both outlive a connection (a new stream starts from the high seqno).
-module(kv_sim_vbuckets).

-export([new/2, state/2, set_state/3, high_seqno/2, set_high_seqnos/2]).

-export_type([table/0]).

-type table() :: ets:tid().

%% @doc A table in which every vbucket of `VBuckets' is in `State'.
-spec new([dcp_commands:vbucket()], dcp_commands:vbucket_state()) -> table().
new(VBuckets, State) ->
    Table = ets:new(kv_sim_vbucket_states, [public, set]),
    ets:insert(Table, [{{state, VB}, State} || VB <- VBuckets]),
    Table.

-spec state(table(), dcp_commands:vbucket()) -> dcp_commands:vbucket_state() | undefined.
state(Table, VB) ->
    case ets:lookup(Table, {state, VB}) of
        [{_, State}] -> State;
        [] -> undefined
    end.

-spec set_state(table(), dcp_commands:vbucket(), dcp_commands:vbucket_state()) -> ok.
set_state(Table, VB, State) ->
    true = ets:insert(Table, {{state, VB}, State}),
    ok.

-spec high_seqno(table(), dcp_commands:vbucket()) -> non_neg_integer().
high_seqno(Table, VB) ->
    case ets:lookup(Table, {high, VB}) of
        [{_, Seqno}] -> Seqno;
        [] -> 0
    end.

%% @doc Stores several vbuckets' high seqnos in one insert (a consumer does it once per turn).
-spec set_high_seqnos(table(), #{dcp_commands:vbucket() => non_neg_integer()}) -> ok.
set_high_seqnos(Table, Seqnos) ->
    true = ets:insert(Table, [{{high, VB}, Seqno} || {VB, Seqno} <- maps:to_list(Seqnos)]),
    ok.
