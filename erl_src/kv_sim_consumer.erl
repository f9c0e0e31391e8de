%% @doc The consumer engine of a `kv_sim' connection: kv_engine's DCP consumer as the proxy sees it.
%% An ADD_STREAM makes it request the stream itself (with its own opaque); what the producer then sends
%% through the proxy goes into the node's store, and it acknowledges it for flow control. With a
%% consumer name (DCP_OPEN's JSON value) it asks the producer for sync writes, as kv_engine's consumer
%% does: prepares wait in the node's durable table until their commit or abort, and the highest
%% prepared seqno of each complete snapshot is acknowledged with DCP_SEQNO_ACKNOWLEDGED.
-module(kv_sim_consumer).

-include("mcbp.hrl").

-behaviour(kv_sim_conn).

-export([new/1, open/3, control/3, request/5, response/3, info/3, end_turn/2, closing/1]).

-export_type([consumer/0, store_key/0]).

%% One ADD_STREAM's stream: `requested' until the producer answered its STREAM_REQ, `accepted' until
%% the ADD_STREAM is answered (at the end of that turn), then `active'. `ended': a STREAM_END came
%% while it was not yet active.
-record(stream, {add_opaque :: dcp_commands:opaque(),
                 stream_opaque :: dcp_commands:opaque(),
                 state = requested :: requested | accepted | active,
                 ended = false :: boolean(),
                 %% the end seqno of the last snapshot marker
                 snap_end = 0 :: non_neg_integer()}).

-record(consumer, {vbuckets :: [dcp_commands:vbucket()],
                   vbucket_table :: kv_sim_vbuckets:table(),
                   store :: ets:tid(),
                   events :: ets:tid(),
                   durable :: ets:tid(),
                   %% sync writes: `off' (no consumer name), `asked' (the controls sent, the opaque
                   %% of enable_sync_writes), `on' once the producer accepted it, or `refused'
                   sync = off :: off | {asked, dcp_commands:opaque()} | on | refused,
                   %% per vbucket: the highest prepared seqno received and the last acknowledged
                   prepared = #{} :: #{dcp_commands:vbucket() =>
                                           {non_neg_integer(), non_neg_integer()}},
                   %% the vbuckets with prepares not yet acknowledged
                   ack_due = [] :: [dcp_commands:vbucket()],
                   buffer_size :: non_neg_integer(),   % the window it asks for; 0 = no flow control
                   streams = #{} :: #{dcp_commands:vbucket() => #stream{}},
                   by_opaque = #{} :: #{dcp_commands:opaque() => dcp_commands:vbucket()},
                   answer_adds = [] :: [dcp_commands:vbucket()], % accepted, answered at the turn's end
                   flow_control = false :: boolean(),
                   rx_unacked = 0 :: non_neg_integer(),
                   %% this turn's, not yet stored
                   high_seqnos = #{} :: #{dcp_commands:vbucket() => non_neg_integer()},
                   rows = [] :: [{{dcp_commands:vbucket(), store_key()}, non_neg_integer(),
                                  binary()}],
                   %% the snapshot marker versions received (`v1', `v2_0', ...), recorded for
                   %% `kv_sim:handshakes/1' as `marker_versions'
                   marker_versions = [] :: [atom() | {unknown, non_neg_integer()}],
                   node :: pid()}).

%% A default-collection document is stored under its key, another under {CollectionId, Key}.
-type store_key() :: binary() | {pos_integer(), binary()}.

-opaque consumer() :: #consumer{}.

-type conn() :: kv_sim_conn:conn().

-spec new(kv_sim:node_config()) -> consumer().
new(#{vbuckets := VBuckets, vbucket_states := Table, store := Store, events := Events,
      durable := Durable, consumer_buffer_size := Size, node := Node}) ->
    #consumer{vbuckets = VBuckets, vbucket_table = Table, store = Store, events = Events,
              durable = Durable, buffer_size = Size, node = Node}.

%% kv_engine's consumer with a name asks for sync replication first thing: its name, then
%% enable_sync_writes (both go through the proxy to the producer).
-spec open(consumer(), #{consumer_name := binary() | undefined}, conn()) -> {consumer(), conn()}.
open(S, #{consumer_name := Name}, C) when is_binary(Name), Name =/= <<>> ->
    {NameOpaque, C1} = kv_sim_conn:own_opaque(C),
    {SyncOpaque, C2} = kv_sim_conn:own_opaque(C1),
    C3 = kv_sim_conn:out([dcp_commands:control(<<"consumer_name">>, Name, NameOpaque),
                          dcp_commands:control(<<"enable_sync_writes">>, <<"true">>, SyncOpaque)],
                         C2),
    {S#consumer{sync = {asked, SyncOpaque}}, C3};
open(S, _Open, C) ->
    {S, C}.

%% A consumer node has no use for the controls a producer acts on.
-spec control(kv_sim_conn:control(), consumer(), conn()) -> {consumer(), conn()}.
control(_Control, S, C) ->
    {S, C}.

%% ---- requests: the proxy's stream setup, then the producer's stream ----

-spec request(0..255, mcbp:frame(), non_neg_integer(), consumer(), conn()) ->
          kv_sim_conn:turn(consumer()).
request(?DCP_ADD_STREAM, #{vbucket := VB, opaque := Opaque} = Frame, _Size, S, C) ->
    Known = lists:member(VB, S#consumer.vbuckets),
    case {kv_sim_conn:fault(C, VB, add_stream_status), Known, maps:is_key(VB, S#consumer.streams)} of
        {{add_stream_status, Status}, _, _} ->
            add_stream_answer(VB, Opaque, Status, none, S, C);
        {none, false, _} ->
            add_stream_answer(VB, Opaque, ?NOT_MY_VBUCKET, none, S, C);
        {none, true, true} ->
            add_stream_answer(VB, Opaque, ?KEY_EEXISTS, none, S, C);
        {none, true, false} ->
            request_stream(VB, Opaque, Frame, S, C)
    end;
request(?DCP_CLOSE_STREAM, #{vbucket := VB, opaque := Opaque}, _Size, S, C) ->
    case maps:is_key(VB, S#consumer.streams) of
        true ->
            S1 = forget_stream(VB, S),
            {ok, C1} = kv_sim_conn:answer(?DCP_CLOSE_STREAM, VB,
                                          dcp_commands:response(?DCP_CLOSE_STREAM, ?SUCCESS, Opaque),
                                          C),
            {ok, S1#consumer{answer_adds = lists:delete(VB, S1#consumer.answer_adds)}, C1};
        false ->
            {ok, C1} = kv_sim_conn:answer(?DCP_CLOSE_STREAM, VB,
                                          dcp_commands:response(?DCP_CLOSE_STREAM, ?KEY_ENOENT,
                                                                Opaque), C),
            {ok, S, C1}
    end;
request(Opcode, Frame, Size, S, C) ->
    %% Everything else comes from the producer through the proxy and counts toward flow control.
    stream_message(Opcode, Frame, count_received(Size, S), C).

count_received(Size, #consumer{flow_control = true, rx_unacked = Unacked} = S) ->
    S#consumer{rx_unacked = Unacked + Size};
count_received(_Size, S) ->
    S.

%% kv_engine answers ADD_STREAM only once the producer answered the consumer's own STREAM_REQ, whose
%% opaque is the consumer's and not the proxy's.
request_stream(VB, AddOpaque, Frame, S, C) ->
    #{takeover := Takeover} = mcbp:dcp_fields(Frame),
    {S1, C1} = maybe_enable_flow_control(S, C),
    {StreamOpaque, C2} = kv_sim_conn:own_opaque(C1),
    Req = dcp_commands:node_stream_req(VB, high_seqno(S1, VB), Takeover, StreamOpaque),
    Stream = #stream{add_opaque = AddOpaque, stream_opaque = StreamOpaque},
    {ok, S1#consumer{streams = (S1#consumer.streams)#{VB => Stream},
                     by_opaque = (S1#consumer.by_opaque)#{StreamOpaque => VB}},
     kv_sim_conn:out(Req, C2)}.

maybe_enable_flow_control(#consumer{flow_control = false, buffer_size = Size} = S, C) when Size > 0 ->
    {Opaque, C1} = kv_sim_conn:own_opaque(C),
    Control = dcp_commands:control(<<"connection_buffer_size">>, integer_to_binary(Size), Opaque),
    {S#consumer{flow_control = true}, kv_sim_conn:out(Control, C1)};
maybe_enable_flow_control(S, C) ->
    {S, C}.

%% A marker version not seen before on this connection is recorded with the node (v1, or v2.0 on a
%% connection with sync replication: the test of what the proxy forwarded).
marker_version(Version, #consumer{marker_versions = Seen} = S) ->
    case lists:member(Version, Seen) of
        true ->
            S;
        false ->
            All = lists:sort([Version | Seen]),
            S#consumer.node ! {kv_sim_record, self(), #{marker_versions => All}},
            S#consumer{marker_versions = All}
    end.

add_stream_answer(VB, Opaque, Status, StreamOpaque, S, C) ->
    {ok, C1} = kv_sim_conn:answer(?DCP_ADD_STREAM, VB,
                                  dcp_commands:add_stream_response(Opaque, Status, StreamOpaque), C),
    {ok, S, C1}.

stream_message(?DCP_SNAPSHOT_MARKER, #{vbucket := VB, opaque := Opaque} = Frame, S, C) ->
    case {owns_stream(VB, Opaque, S), mcbp:dcp_fields(Frame)} of
        {true, #{version := Version, end_seqno := End}} ->
            #{VB := Stream} = S#consumer.streams,
            S1 = marker_version(Version, S),
            {ok, S1#consumer{streams = (S1#consumer.streams)#{VB => Stream#stream{snap_end = End}}},
             C};
        _ ->
            {ok, S, C}
    end;
stream_message(?DCP_PREPARE, #{vbucket := VB, opaque := Opaque, key := WireKey, value := Value} = Frame,
               S, C) ->
    with_key(dcp_prepare, VB, Opaque, WireKey, S, C,
             fun(Key) ->
                     Seqno = by_seqno(Frame),
                     true = ets:insert(S#consumer.durable, {{VB, Key}, Seqno, Value, pending}),
                     count(S, VB, 2),
                     Due = case lists:member(VB, S#consumer.ack_due) of
                               true -> S#consumer.ack_due;
                               false -> [VB | S#consumer.ack_due]
                           end,
                     S1 = S#consumer{prepared = (S#consumer.prepared)#{VB => {Seqno, acked(S, VB)}},
                                     ack_due = Due},
                     {ok, set_high_seqno(S1, VB, Seqno), C}
             end);
stream_message(Opcode, #{vbucket := VB, opaque := Opaque, key := WireKey,
                         extras := <<Prepared:64, Seqno:64>>}, S, C)
  when Opcode =:= ?DCP_COMMIT; Opcode =:= ?DCP_ABORT ->
    with_key(Opcode, VB, Opaque, WireKey, S, C,
             fun(Key) -> resolve(Opcode, VB, Key, Prepared, Seqno, S, C) end);
stream_message(?DCP_MUTATION, #{vbucket := VB, opaque := Opaque, key := WireKey, value := Value} = Frame,
               S, C) ->
    with_key(dcp_mutation, VB, Opaque, WireKey, S, C,
             fun(Key) ->
                     Seqno = by_seqno(Frame),
                     Rows = [{{VB, Key}, Seqno, Value} | S#consumer.rows],
                     {ok, set_high_seqno(S#consumer{rows = Rows}, VB, Seqno), C}
             end);
stream_message(Opcode, #{vbucket := VB, opaque := Opaque, key := WireKey} = Frame, S, C)
  when Opcode =:= ?DCP_DELETION; Opcode =:= ?DCP_EXPIRATION ->
    with_key(Opcode, VB, Opaque, WireKey, S, C,
             fun(Key) ->
                     S1 = store_rows(S),
                     ets:delete(S1#consumer.store, {VB, Key}),
                     {ok, set_high_seqno(S1, VB, by_seqno(Frame)), C}
             end);
stream_message(?DCP_SYSTEM_EVENT, #{vbucket := VB, opaque := Opaque, key := Key, value := Value,
                                    extras := <<Seqno:64, Event:32, _Version:8>>}, S, C) ->
    case owns_stream(VB, Opaque, S) of
        true ->
            ets:insert(S#consumer.events, {{VB, Seqno}, Event, Key, Value}),
            {ok, set_high_seqno(S, VB, Seqno), C};
        false ->
            {ok, S, C}
    end;
stream_message(?DCP_STREAM_END, #{vbucket := VB, opaque := Opaque}, S, C) ->
    case maps:find(VB, S#consumer.streams) of
        {ok, #stream{stream_opaque = Opaque, state = active}} ->
            {ok, forget_stream(VB, S), C};
        {ok, #stream{stream_opaque = Opaque} = Stream} ->
            %% Ended before its ADD_STREAM was answered: remembered for that answer.
            {ok, S#consumer{streams = (S#consumer.streams)#{VB => Stream#stream{ended = true}}}, C};
        _ ->
            {ok, S, C}
    end;
stream_message(?DCP_SET_VBUCKET_STATE, #{vbucket := VB, opaque := Opaque} = Frame, S, C) ->
    #{state := State} = mcbp:dcp_fields(Frame),
    ok = kv_sim_vbuckets:set_state(S#consumer.vbucket_table, VB, State),
    {ok, C1} = kv_sim_conn:answer(?DCP_SET_VBUCKET_STATE, VB,
                                  dcp_commands:response(?DCP_SET_VBUCKET_STATE, ?SUCCESS, Opaque), C),
    {ok, S, C1};
stream_message(_Unknown, _Frame, S, C) ->
    %% A proxy passes opcodes it does not know through; this consumer has no use for them.
    {ok, S, C}.

%% A commit makes its prepare live at the commit's seqno (a commit without its prepare is a broken
%% stream, as kv_engine's replica treats it); an abort drops the prepare (kv_engine also takes an
%% abort whose prepare a disk snapshot never sent).
resolve(?DCP_COMMIT, VB, Key, Prepared, Seqno, S, C) ->
    case ets:lookup(S#consumer.durable, {VB, Key}) of
        [{_, Prepared, Value, pending}] ->
            true = ets:insert(S#consumer.durable, {{VB, Key}, Prepared, Value, {committed, Seqno}}),
            count(S, VB, 3),
            {ok, set_high_seqno(S#consumer{rows = [{{VB, Key}, Seqno, Value} | S#consumer.rows]},
                                VB, Seqno), C};
        _ ->
            {close, {commit_without_prepare, VB, Key, Prepared}, S, C}
    end;
resolve(?DCP_ABORT, VB, Key, Prepared, Seqno, S, C) ->
    Value = case ets:lookup(S#consumer.durable, {VB, Key}) of
                [{_, Prepared, V, pending}] -> V;
                _ -> <<>>
            end,
    true = ets:insert(S#consumer.durable, {{VB, Key}, Prepared, Value, {aborted, Seqno}}),
    count(S, VB, 4),
    {ok, set_high_seqno(S, VB, Seqno), C}.

%% The vbucket's durable counts: prepares (position 2), commits (3), aborts (4).
count(#consumer{durable = Durable}, VB, Pos) ->
    _ = ets:update_counter(Durable, {count, VB}, {Pos, 1}, {{count, VB}, 0, 0, 0}),
    ok.

acked(#consumer{prepared = Prepared}, VB) ->
    case Prepared of
        #{VB := {_, Acked}} -> Acked;
        _ -> 0
    end.

%% A document frame of a stream this connection owns goes to `Fun' with its store key; one of
%% another stream is ignored, and a bad collection prefix closes the connection.
with_key(Opcode, VB, Opaque, WireKey, S, C, Fun) ->
    case owns_stream(VB, Opaque, S) andalso store_key(WireKey, C) of
        false -> {ok, S, C};
        error -> {close, {bad_collection_key, Opcode, VB, WireKey}, S, C};
        {ok, Key} -> Fun(Key)
    end.

%% The store's key of a document key off the wire: collection-prefixed when HELLO negotiated
%% collections.
store_key(WireKey, C) ->
    case kv_sim_conn:collections(C) of
        false ->
            {ok, WireKey};
        true ->
            case dcp_commands:split_collection_key(WireKey) of
                {ok, 0, Key} -> {ok, Key};
                {ok, Cid, Key} -> {ok, {Cid, Key}};
                error -> error
            end
    end.

%% Mutations, deletions and expirations all start their extras with the by-seqno. It is read there
%% rather than with `mcbp:dcp_fields/1', which costs about 2 us a call against 0.02 us: once per
%% document, that was 1.4 s more CPU (and half the throughput) in `make demo'.
by_seqno(#{extras := <<Seqno:64, _/binary>>}) ->
    Seqno.

owns_stream(VB, Opaque, S) ->
    case maps:find(VB, S#consumer.streams) of
        {ok, #stream{stream_opaque = Opaque}} -> true;
        _ -> false
    end.

forget_stream(VB, S) ->
    case maps:take(VB, S#consumer.streams) of
        {#stream{stream_opaque = StreamOpaque}, Streams} ->
            S#consumer{streams = Streams, by_opaque = maps:remove(StreamOpaque, S#consumer.by_opaque)};
        error ->
            S
    end.

%% ---- responses: the answer to its own STREAM_REQ ----

-spec response(mcbp:frame(), consumer(), conn()) -> kv_sim_conn:turn(consumer()).
response(#{opcode := ?DCP_STREAM_REQ, opaque := Opaque, status := Status}, S, C) ->
    stream_req_answered(Opaque, Status, S, C);
response(#{opcode := ?DCP_CONTROL, opaque := Opaque, status := Status},
         #consumer{sync = {asked, Opaque}} = S, C) ->
    %% the producer's answer to enable_sync_writes (through the proxy)
    case Status of
        ?SUCCESS ->
            {ok, S#consumer{sync = on}, C};
        _ ->
            {ok, S#consumer{sync = refused},
             kv_sim_conn:log_info(#{what => kv_sim_sync_writes_refused, status => Status}, C)}
    end;
response(_Other, S, C) ->
    %% Control and buffer answers need nothing from this node.
    {ok, S, C}.

%% The answer to the consumer's own STREAM_REQ decides its ADD_STREAM answer. A success is answered at
%% the end of the turn, so a STREAM_END that came in the same chunk is seen first (the MB-53445 race).
stream_req_answered(StreamOpaque, Status, S, C) ->
    case maps:find(StreamOpaque, S#consumer.by_opaque) of
        {ok, VB} ->
            #{VB := #stream{add_opaque = AddOpaque} = Stream} = S#consumer.streams,
            case Status of
                ?SUCCESS ->
                    {ok, S#consumer{streams = (S#consumer.streams)#{VB => Stream#stream{state = accepted}},
                                    answer_adds = [VB | S#consumer.answer_adds]}, C};
                _ ->
                    add_stream_answer(VB, AddOpaque, Status, none, forget_stream(VB, S), C)
            end;
        error ->
            {ok, S, C}
    end.

-spec info(term(), consumer(), conn()) -> kv_sim_conn:turn(consumer()).
info(_Msg, S, C) ->
    {ok, S, C}.

%% ---- the end of a turn ----

%% @doc Stores the turn's documents, answers the ADD_STREAMs whose stream was accepted in it and
%% acknowledges what it received.
-spec end_turn(consumer(), conn()) -> {consumer(), conn()}.
end_turn(S, C) ->
    {S1, C1} = answer_accepted_adds(closing(S), C),
    {S2, C2} = ack_prepared(S1, C1),
    ack_received(S2, C2).

%% kv_engine's replica acknowledges its high prepared seqno once it holds a whole snapshot: each
%% vbucket with prepares not yet acknowledged whose snapshot is complete (or whose stream is gone).
ack_prepared(#consumer{sync = on, ack_due = [_ | _] = Due} = S, C) ->
    lists:foldl(fun(VB, {SAcc, CAcc}) ->
                        #{VB := {High, _}} = SAcc#consumer.prepared,
                        case maps:find(VB, SAcc#consumer.streams) of
                            {ok, #stream{snap_end = End}} ->
                                case high_seqno(SAcc, VB) >= End of
                                    true -> send_ack(VB, High, SAcc, CAcc);
                                    false -> {SAcc#consumer{ack_due = [VB | SAcc#consumer.ack_due]},
                                              CAcc}
                                end;
                            error ->
                                send_ack(VB, High, SAcc, CAcc)
                        end
                end, {S#consumer{ack_due = []}, C}, lists:reverse(Due));
ack_prepared(S, C) ->
    {S, C}.

send_ack(VB, High, S, C) ->
    Opaque = case maps:find(VB, S#consumer.streams) of
                 {ok, #stream{stream_opaque = O}} -> O;
                 error -> 0
             end,
    {S#consumer{prepared = (S#consumer.prepared)#{VB => {High, High}}},
     kv_sim_conn:out(dcp_commands:seqno_acknowledged(VB, Opaque, High), C)}.

%% @doc Stores the turn's documents (the connection is closing).
-spec closing(consumer()) -> consumer().
closing(S) ->
    store_high_seqnos(store_rows(S)).

answer_accepted_adds(#consumer{answer_adds = []} = S, C) ->
    {S, C};
answer_accepted_adds(#consumer{answer_adds = VBs} = S, C) ->
    lists:foldl(fun answer_accepted_add/2, {S#consumer{answer_adds = []}, C}, lists:reverse(VBs)).

answer_accepted_add(VB, {S, C}) ->
    #{VB := #stream{add_opaque = AddOpaque, stream_opaque = StreamOpaque, ended = Ended} = Stream} =
        S#consumer.streams,
    case {Ended, kv_sim_conn:fault(C, VB, no_add_stream_answer_after_stream_end)} of
        {true, no_add_stream_answer_after_stream_end} ->
            {forget_stream(VB, S),
             kv_sim_conn:log_info(#{what => kv_sim_add_stream_left_unanswered, vbucket => VB}, C)};
        {true, none} ->
            {ok, S1, C1} = add_stream_answer(VB, AddOpaque, ?SUCCESS, StreamOpaque,
                                             forget_stream(VB, S), C),
            {S1, C1};
        {false, _} ->
            S1 = S#consumer{streams = (S#consumer.streams)#{VB => Stream#stream{state = active}}},
            {ok, S2, C1} = add_stream_answer(VB, AddOpaque, ?SUCCESS, StreamOpaque, S1, C),
            {S2, C1}
    end.

%% Acknowledges what was received once a fifth of the window is used, as kv_engine's consumer does.
ack_received(#consumer{flow_control = true, rx_unacked = Unacked, buffer_size = Size} = S, C)
  when Unacked > 0, Unacked >= Size div 5 ->
    {Opaque, C1} = kv_sim_conn:own_opaque(C),
    {S#consumer{rx_unacked = 0}, kv_sim_conn:out(dcp_commands:buffer_ack(Unacked, Opaque), C1)};
ack_received(S, C) ->
    {S, C}.

%% A turn's mutations go into the store in one insert, before any deletion of the turn (which must
%% follow them). The list is in arrival order: a key written twice in one turn keeps the later value
%% (the table inserts a list in order; a producer does not repeat a key within a snapshot anyway).
store_rows(#consumer{rows = []} = S) ->
    S;
store_rows(#consumer{store = Store, rows = Rows} = S) ->
    ets:insert(Store, lists:reverse(Rows)),
    S#consumer{rows = []}.

%% A vbucket's high seqno survives the connection (a new stream starts from it); it is stored once per
%% turn rather than once per mutation.
high_seqno(#consumer{vbucket_table = Table, high_seqnos = Turn}, VB) ->
    case Turn of
        #{VB := Seqno} -> Seqno;
        _ -> kv_sim_vbuckets:high_seqno(Table, VB)
    end.

set_high_seqno(S, VB, Seqno) ->
    S#consumer{high_seqnos = (S#consumer.high_seqnos)#{VB => Seqno}}.

store_high_seqnos(#consumer{high_seqnos = Turn} = S) when map_size(Turn) =:= 0 ->
    S;
store_high_seqnos(#consumer{vbucket_table = Table, high_seqnos = Turn} = S) ->
    ok = kv_sim_vbuckets:set_high_seqnos(Table, Turn),
    S#consumer{high_seqnos = #{}}.
