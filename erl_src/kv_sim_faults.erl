%% @doc The faults of a `kv_sim' node (see `kv_sim' for the list): how a fault is keyed in the node's
%% fault table when it is set, and how a connection looks one up for a vbucket.
-module(kv_sim_faults).

-export([key/2, for_turn/1, lookup/3]).

-export_type([table/0]).

%% A connection's view of the table for one turn: `none' when no fault was set as the turn began.
-type table() :: ets:tid() | none.

%% @doc Faults are keyed by vbucket (or `all') and the fault's name, so a connection looks one up in
%% O(1); answer and close faults also key on the opcode so several can be set at once. Names of
%% opcodes and statuses are resolved here, so a bad name is refused when the fault is set.
-spec key(dcp_commands:vbucket() | all, kv_sim:fault()) ->
          {ok, Key :: {dcp_commands:vbucket() | all, term()}, kv_sim:fault()} | {error, term()}.
key(VBucket, Fault) ->
    case Fault of
        {drop_answer, Op} -> by_opcode(VBucket, drop_answer, Op, Fault);
        {delay_answer, Op, Ms} when is_integer(Ms), Ms >= 0 -> by_opcode(VBucket, delay_answer, Op, Fault);
        {close_socket_on, Op} -> by_opcode(VBucket, close_socket_on, Op, Fault);
        {chunked_writes, Max} when is_integer(Max), Max > 0 -> {ok, {all, chunked_writes}, Fault};
        {stream_end_on_accept, _Reason} -> {ok, {VBucket, stream_end_on_accept}, Fault};
        {add_stream_status, Status} -> with_status(VBucket, add_stream_status, Status);
        {stream_req_status, Status} -> with_status(VBucket, stream_req_status, Status);
        {close_socket_after_mutations, N} when is_integer(N), N > 0 ->
            {ok, {VBucket, close_socket_after_mutations}, Fault};
        {unknown_opcodes, Op} when is_integer(Op), Op >= 0, Op =< 255 ->
            {ok, {VBucket, unknown_opcodes}, Fault};
        no_add_stream_answer_after_stream_end -> {ok, {VBucket, Fault}, Fault};
        stop_reading -> {ok, {all, stop_reading}, Fault};
        {flood_stream_ends, N, EndVB} when is_integer(N), N > 0, is_integer(EndVB), EndVB >= 0,
                                           EndVB =< 16#ffff ->
            {ok, {VBucket, flood_stream_ends}, Fault};
        flexible_framing -> {ok, {VBucket, Fault}, Fault};
        _ -> {error, {unknown_fault, Fault}}
    end.

by_opcode(VBucket, Name, Op, Fault) ->
    case code(Op, fun mcbp:opcode_name/1, 16#ff) of
        {ok, Opcode} -> {ok, {VBucket, {Name, Opcode}}, Fault};
        error -> {error, {unknown_opcode_name, Op}}
    end.

%% The status is stored as its code, the form the answer is built with.
with_status(VBucket, Name, Status) ->
    case code(Status, fun mcbp:status_name/1, 16#ffff) of
        {ok, Code} -> {ok, {VBucket, Name}, {Name, Code}};
        error -> {error, {unknown_status_name, Status}}
    end.

%% A code given as a number, or the first code the codec gives this name (the codec's table is the
%% only one; setting a fault is rare enough to search it).
code(N, _NameOf, Max) when is_integer(N), N >= 0, N =< Max ->
    {ok, N};
code(Name, NameOf, Max) when is_atom(Name), Name =/= unknown ->
    search(Name, NameOf, 0, Max);
code(_Other, _NameOf, _Max) ->
    error.

search(_Name, _NameOf, Code, Max) when Code > Max ->
    error;
search(Name, NameOf, Code, Max) ->
    case NameOf(Code) of
        Name -> {ok, Code};
        _ -> search(Name, NameOf, Code + 1, Max)
    end.

%% @doc Faults are set between turns (by tests); a turn without any skips the lookups of every frame.
-spec for_turn(ets:tid()) -> table().
for_turn(Faults) ->
    case ets:info(Faults, size) of
        0 -> none;
        _ -> Faults
    end.

%% @doc The fault set under `Name' for this vbucket, or else for all of them.
-spec lookup(table(), dcp_commands:vbucket() | all, term()) -> kv_sim:fault() | none.
lookup(none, _VB, _Name) ->
    none;
lookup(Faults, VB, Name) ->
    case ets:lookup(Faults, {VB, Name}) of
        [{_, Fault}] ->
            Fault;
        [] when VB =/= all ->
            case ets:lookup(Faults, {all, Name}) of
                [{_, Fault}] -> Fault;
                [] -> none
            end;
        [] ->
            none
    end.
