%% @doc The producer engine of a `kv_sim' connection: kv_engine's DCP producer streaming the node's
%% seeded documents (`kv_sim:doc/3'), in batches under the consumer's flow-control window, with takeover
%% and noops as kv_engine does them.
-module(kv_sim_producer).

-include("mcbp.hrl").

-behaviour(kv_sim_conn).

-export([new/1, open/3, control/3, request/5, response/3, info/3, end_turn/2, closing/1]).

%% memcached's `STATS dcp-vbtakeover' for this connection.
-export([takeover_stats/2]).

-export_type([producer/0]).

%% A producer turn sends at most this many frames (or bytes) before reading its socket again.
-define(BATCH_FRAMES, 1024).
-define(BATCH_BYTES, 1024 * 1024).
%% Frames in a row from one stream before the producer moves to the next (interleaving vbuckets).
-define(STREAM_TURN, 64).
%% The stream id the `flexible_framing' fault puts in a frame's framing extras.
-define(FAULT_STREAM_ID, 1).
%% Snapshot marker flags.
-define(MARKER_MEMORY, 16#01).
-define(MARKER_DISK, 16#02).
-define(MARKER_CHECKPOINT, 16#04).

%% What a node holds at each seqno of a vbucket (read at the STREAM_REQ): its live documents, its
%% system events and its durable writes (a commit at the seqno of the live document it made).
-type stored() :: {mutation, kv_sim_consumer:store_key(), binary()}
                | {prepare, kv_sim_consumer:store_key(), binary()}
                | {commit, kv_sim_consumer:store_key(), pos_integer(), binary() | undefined}
                | {abort, kv_sim_consumer:store_key(), pos_integer()}
                | {event, non_neg_integer(), binary(), binary()}.

%% One stream, from `next' to `last': a snapshot marker, the mutations, then the finish (a STREAM_END,
%% the takeover's state changes, or staying open when open-ended).
-record(stream, {opaque :: dcp_commands:opaque(),
                 next :: pos_integer(),
                 last :: non_neg_integer(),
                 finite :: boolean(),
                 takeover :: boolean(),
                 phase = marker :: marker | mutations | finish | wait_pending_ack | wait_active_ack
                                 | idle,
                 sent = 0 :: non_neg_integer(),         % mutations sent (for a close fault)
                 %% a `node' streams what its store holds (read at the request), others their seeds
                 docs = seeded :: seeded | #{pos_integer() => stored()}}).

-record(producer, {config :: kv_sim:node_config(),
                   opened = false :: boolean(),
                   flow_limit = 0 :: non_neg_integer(),     % 0 = no flow control
                   tx_unacked = 0 :: non_neg_integer(),
                   streams = #{} :: #{dcp_commands:vbucket() => #stream{}},
                   runnable = queue:new() :: queue:queue(dcp_commands:vbucket()),
                   pump_scheduled = false :: boolean(),
                   stream_end_on_close = false :: boolean(),
                   noop_enabled = false :: boolean(),
                   noop_interval = 0 :: non_neg_integer(),  % seconds; 0 = not set
                   noop_timer = false :: boolean(),
                   %% DCP_CONTROL enable_sync_writes: durable writes go as prepares, commits, aborts
                   sync_writes = false :: boolean(),
                   consumer_name = undefined :: binary() | undefined}).

-opaque producer() :: #producer{}.

-type conn() :: kv_sim_conn:conn().
%% The stream faults of a vbucket, looked up once per stream turn.
-type faults() :: #{flexible := boolean(), unknown := kv_sim:fault() | none,
                    close_after := kv_sim:fault() | none}.

-spec new(kv_sim:node_config()) -> producer().
new(Config) ->
    #producer{config = Config}.

-spec open(producer(), #{consumer_name := binary() | undefined}, conn()) -> {producer(), conn()}.
open(P, _Open, C) ->
    {P#producer{opened = true}, C}.

-spec control(kv_sim_conn:control(), producer(), conn()) -> {producer(), conn()}.
control({connection_buffer_size, Size}, P, C) ->
    {P#producer{flow_limit = Size}, C};
control({send_stream_end_on_client_close_stream, On}, P, C) ->
    {P#producer{stream_end_on_close = On}, C};
control({enable_noop, On}, P, C) ->
    {maybe_start_noops(P#producer{noop_enabled = On}), C};
control({set_noop_interval, Seconds}, P, C) ->
    {maybe_start_noops(P#producer{noop_interval = Seconds}), C};
control({enable_sync_writes, On}, P, C) ->
    {P#producer{sync_writes = On}, C};
control({consumer_name, Name}, P, C) ->
    {P#producer{consumer_name = Name}, C};
control(other, P, C) ->
    {P, C}.

%% ---- noops ----

%% A producer with noops enabled sends a DCP_NOOP every interval, as kv_engine does to check its peer.
maybe_start_noops(#producer{opened = true, noop_enabled = true, noop_interval = Seconds,
                            noop_timer = false} = P) when Seconds > 0 ->
    ok = kv_sim_conn:later(Seconds * 1000, send_noop),
    P#producer{noop_timer = true};
maybe_start_noops(P) ->
    P.

send_noop(#producer{noop_enabled = true} = P, C) ->
    {Opaque, C1} = kv_sim_conn:own_opaque(C),
    {ok, maybe_start_noops(P#producer{noop_timer = false}),
     kv_sim_conn:out(dcp_commands:noop_request(Opaque), C1)};
send_noop(P, C) ->
    {ok, P#producer{noop_timer = false}, C}.

-spec info(pump | send_noop, producer(), conn()) -> kv_sim_conn:turn(producer()).
info(pump, P, C) ->
    pump(P#producer{pump_scheduled = false}, C);
info(send_noop, P, C) ->
    send_noop(P, C).

%% ---- requests: stream setup and flow control ----

-spec request(0..255, mcbp:frame(), non_neg_integer(), producer(), conn()) ->
          kv_sim_conn:turn(producer()).
request(?DCP_STREAM_REQ, #{vbucket := VB, opaque := Opaque} = Frame, _Size, P, C) ->
    #{start_seqno := Start, end_seqno := End} = Fields = mcbp:dcp_fields(Frame),
    case stream_req_refusal(VB, Start, P, C) of
        none ->
            {High, Docs} = held(VB, Start, P),
            Accept = dcp_commands:stream_req_response(Opaque, ?SUCCESS, failover_log(P, VB)),
            {ok, P, C0} = answer(?DCP_STREAM_REQ, VB, Accept, P, C),
            C1 = flood_stream_ends(VB, C0),
            case kv_sim_conn:fault(C1, VB, stream_end_on_accept) of
                {stream_end_on_accept, Reason} ->
                    emit(dcp_commands:stream_end(VB, Opaque, Reason), P, C1);
                none ->
                    Stream = #stream{opaque = Opaque, next = Start + 1, last = min(End, High),
                                     finite = End =< High, docs = Docs,
                                     takeover = dcp_commands:stream_req_takeover(Fields)},
                    {ok, P#producer{streams = (P#producer.streams)#{VB => Stream},
                                    runnable = queue:in(VB, P#producer.runnable)}, C1}
            end;
        rollback ->
            %% The consumer is ahead of this node: it must roll back to what the node has.
            answer(?DCP_STREAM_REQ, VB, dcp_commands:stream_req_rollback(Opaque, high_seqno(VB, P)),
                   P, C);
        Status ->
            answer(?DCP_STREAM_REQ, VB, dcp_commands:stream_req_response(Opaque, Status, <<>>), P, C)
    end;
request(?DCP_CLOSE_STREAM, #{vbucket := VB, opaque := Opaque}, _Size, P, C) ->
    case maps:take(VB, P#producer.streams) of
        {#stream{opaque = StreamOpaque}, Streams} ->
            P1 = P#producer{streams = Streams, runnable = queue:delete(VB, P#producer.runnable)},
            {ok, P2, C1} = answer(?DCP_CLOSE_STREAM, VB,
                                  dcp_commands:response(?DCP_CLOSE_STREAM, ?SUCCESS, Opaque), P1, C),
            case P2#producer.stream_end_on_close of
                true -> emit(dcp_commands:stream_end(VB, StreamOpaque, closed), P2, C1);
                false -> {ok, P2, C1}
            end;
        error ->
            answer(?DCP_CLOSE_STREAM, VB,
                   dcp_commands:response(?DCP_CLOSE_STREAM, ?KEY_ENOENT, Opaque), P, C)
    end;
request(?DCP_BUFFER_ACK, Frame, _Size, P, C) ->
    #{bytes := Bytes} = mcbp:dcp_fields(Frame),
    {ok, P#producer{tx_unacked = max(0, P#producer.tx_unacked - Bytes)}, C};
request(?DCP_SEQNO_ACKNOWLEDGED, #{vbucket := VB, opaque := Opaque, extras := Extras}, _Size, P, C) ->
    %% kv_engine takes acks only from a consumer that enabled sync writes and gave its name; a
    %% success is not answered
    case {P#producer.sync_writes, P#producer.consumer_name, Extras} of
        {true, Name, <<Seqno:64>>} when is_binary(Name) ->
            #producer{config = #{acks := Acks}} = P,
            true = ets:insert(Acks, {VB, Seqno}),
            {ok, P, C};
        _ ->
            answer(?DCP_SEQNO_ACKNOWLEDGED, VB,
                   dcp_commands:response(?DCP_SEQNO_ACKNOWLEDGED, ?EINVAL, Opaque), P, C)
    end;
request(?DCP_GET_FAILOVER_LOG, #{vbucket := VB, opaque := Opaque}, _Size, P, C) ->
    answer(?DCP_GET_FAILOVER_LOG, VB, dcp_commands:failover_log_response(Opaque, failover_log(P, VB)),
           P, C);
request(Opcode, #{vbucket := VB, opaque := Opaque}, _Size, P, C) ->
    answer(Opcode, VB, dcp_commands:response(Opcode, ?UNKNOWN_COMMAND, Opaque), P, C).

%% The vbucket's high seqno and where its documents come from: a producer's seeds, or what a `node'
%% holds in its store.
held(VB, Start, #producer{config = #{role := node} = Config} = P) ->
    {high_seqno(VB, P), stored_items(Config, VB, Start)};
held(VB, _Start, P) ->
    {high_seqno(VB, P), seeded}.

high_seqno(VB, #producer{config = #{role := node, vbucket_states := Table}}) ->
    kv_sim_vbuckets:high_seqno(Table, VB);
high_seqno(_VB, #producer{config = Config}) ->
    kv_sim:high_seqno(Config).

%% @doc What the connection's stream of `VB' has left to send and its status, as kv_engine's
%% `dcp-vbtakeover' stats give them: `backfilling' while documents remain, then `in-memory'.
-spec takeover_stats(dcp_commands:vbucket(), producer()) -> {non_neg_integer(), binary()}.
takeover_stats(VB, #producer{streams = Streams}) ->
    case Streams of
        #{VB := #stream{phase = Phase, next = Next, last = Last}}
          when Phase =:= marker; Phase =:= mutations ->
            case max(0, Last - Next + 1) of
                0 -> {0, <<"in-memory">>};
                Left -> {Left, <<"backfilling">>}
            end;
        #{VB := _} ->
            {0, <<"in-memory">>};
        _ ->
            {0, <<"does_not_exist">>}
    end.

%% Why a STREAM_REQ is refused (a status, or `rollback'), or `none'.
stream_req_refusal(VB, Start, P, C) ->
    #producer{config = #{role := Role, vbuckets := VBuckets, vbucket_states := Table}} = P,
    High = high_seqno(VB, P),
    State = kv_sim_vbuckets:state(Table, VB),
    %% a node streams only the vbuckets it holds as active (ns_server replicates from actives)
    Live = lists:member(VB, VBuckets) andalso State =/= dead
        andalso (Role =/= node orelse State =:= active),
    case {Live, maps:is_key(VB, P#producer.streams), kv_sim_conn:fault(C, VB, stream_req_status)} of
        {false, _, _} -> ?NOT_MY_VBUCKET;
        {true, true, _} -> ?KEY_EEXISTS;
        {true, false, {stream_req_status, Status}} -> Status;
        {true, false, none} when Start > High -> rollback;
        {true, false, none} -> none
    end.

answer(Opcode, VB, Bytes, P, C) ->
    {ok, C1} = kv_sim_conn:answer(Opcode, VB, Bytes, C),
    {ok, P, C1}.

%% The `{flood_stream_ends, N, EndVB}' fault: N stream ends for `EndVB' (reason closed, opaque 0)
%% right behind the acceptance, outside the flow control a stream's bytes count against.
flood_stream_ends(VB, C) ->
    case kv_sim_conn:fault(C, VB, flood_stream_ends) of
        {flood_stream_ends, N, EndVB} ->
            End = iolist_to_binary(dcp_commands:stream_end(EndVB, 0, closed)),
            kv_sim_conn:out(binary:copy(End, N), C);
        none ->
            C
    end.

%% One entry: the vbucket's uuid (fixed by the seed) since seqno 0.
failover_log(#producer{config = #{seed := Seed}}, VB) ->
    [{erlang:phash2({Seed, VB}) + 1, 0}].

%% ---- responses: takeover ----

%% Takeover: the consumer acknowledged `pending', so this node gives the vbucket up and tells the
%% consumer to become active; its acknowledgement of `active' ends the stream.
-spec response(mcbp:frame(), producer(), conn()) -> kv_sim_conn:turn(producer()).
response(#{opcode := ?DCP_SET_VBUCKET_STATE, opaque := Opaque}, P, C) ->
    case [VB || {VB, #stream{opaque = O}} <- maps:to_list(P#producer.streams), O =:= Opaque] of
        [VB] -> takeover_acknowledged(VB, P, C);
        [] -> {ok, P, C}
    end;
response(_Other, P, C) ->
    %% Noop answers need nothing from this node.
    {ok, P, C}.

takeover_acknowledged(VB, P, C) ->
    #{VB := #stream{opaque = Opaque, phase = Phase} = Stream} = P#producer.streams,
    case Phase of
        wait_pending_ack ->
            #producer{config = #{vbucket_states := Table}} = P,
            ok = kv_sim_vbuckets:set_state(Table, VB, dead),
            {ok, P1, C1} = emit(dcp_commands:set_vbucket_state(VB, Opaque, active), P, C),
            {ok, put_stream(VB, Stream#stream{phase = wait_active_ack}, P1), C1};
        wait_active_ack ->
            {ok, P1, C1} = emit(dcp_commands:stream_end(VB, Opaque, ok), P, C),
            {ok, P1#producer{streams = maps:remove(VB, P1#producer.streams)}, C1};
        _ ->
            {ok, P, C}
    end.

%% ---- streaming in batches ----

%% @doc Schedules the next batch, if a stream has something to send and the window room for it.
-spec end_turn(producer(), conn()) -> {producer(), conn()}.
end_turn(#producer{pump_scheduled = false} = P, C) ->
    case queue:is_empty(P#producer.runnable) orelse flow_blocked(P) of
        true ->
            {P, C};
        false ->
            ok = kv_sim_conn:later(0, pump),
            {P#producer{pump_scheduled = true}, C}
    end;
end_turn(P, C) ->
    {P, C}.

-spec closing(producer()) -> producer().
closing(P) ->
    P.

%% One turn sends at most a batch, taking a few frames from each runnable stream in turn; the next turn
%% is a message to itself, so the socket is read between turns and a large backlog never blocks it.
pump(P, C) ->
    pump(P, C, ?BATCH_FRAMES, ?BATCH_BYTES).

pump(P, C, Frames, Bytes) when Frames =< 0; Bytes =< 0 ->
    {ok, P, C};
pump(P, C, Frames, Bytes) ->
    case flow_blocked(P) orelse queue:out(P#producer.runnable) of
        true ->
            {ok, P, C};
        {empty, _} ->
            {ok, P, C};
        {{value, VB}, Runnable} ->
            Before = P#producer.tx_unacked,
            case stream_turn(VB, min(?STREAM_TURN, Frames), P#producer{runnable = Runnable}, C) of
                {ok, P1, C1, Sent} ->
                    pump(P1, C1, Frames - max(Sent, 1), Bytes - (P1#producer.tx_unacked - Before));
                {close, _, _, _} = Close ->
                    Close
            end
    end.

flow_blocked(#producer{flow_limit = Limit, tx_unacked = Unacked}) ->
    Limit > 0 andalso Unacked >= Limit.

stream_turn(VB, N, P, C) ->
    Faults = #{flexible => kv_sim_conn:fault(C, VB, flexible_framing) =:= flexible_framing,
               unknown => kv_sim_conn:fault(C, VB, unknown_opcodes),
               close_after => kv_sim_conn:fault(C, VB, close_socket_after_mutations)},
    #{VB := Stream} = P#producer.streams,
    {P1, C1} = case Stream of
                   #stream{phase = mutations} -> unknown_opcode(VB, Stream, Faults, P, C);
                   _ -> {P, C}
               end,
    stream_steps(VB, Stream, N, 0, Faults, P1, C1).

%% The `unknown_opcodes' fault's request, before a snapshot marker or a batch of mutations.
unknown_opcode(VB, #stream{opaque = Opaque}, #{unknown := {unknown_opcodes, Op}}, P, C) ->
    {ok, P1, C1} = emit(dcp_commands:request(Op, #{vbucket => VB, opaque => Opaque}), P, C),
    {P1, C1};
unknown_opcode(_VB, _Stream, _Faults, P, C) ->
    {P, C}.

stream_steps(VB, Stream, N, Sent, Faults, P, C) ->
    %% The window is checked before every frame: the producer stops at the frame that fills it.
    case Sent >= N orelse flow_blocked(P) of
        true ->
            P1 = put_stream(VB, Stream, P),
            {ok, P1#producer{runnable = queue:in(VB, P1#producer.runnable)}, C, Sent};
        false ->
            stream_step(VB, Stream, N, Sent, Faults, P, C)
    end.

stream_step(VB, Stream, N, Sent, Faults, P, C) ->
    case step(VB, Stream, N - Sent, Faults, P, C) of
        {continue, Stream1, P1, C1, Frames} ->
            stream_steps(VB, Stream1, N, Sent + Frames, Faults, P1, C1);
        {park, Stream1, P1, C1} ->
            {ok, put_stream(VB, Stream1, P1), C1, Sent + 1};
        {done, P1, C1} ->
            {ok, P1#producer{streams = maps:remove(VB, P1#producer.streams)}, C1, Sent + 1};
        {close, _, _, _} = Close ->
            Close
    end.

put_stream(VB, Stream, P) ->
    P#producer{streams = (P#producer.streams)#{VB => Stream}}.

-spec step(dcp_commands:vbucket(), #stream{}, pos_integer(), faults(), producer(), conn()) ->
          {continue, #stream{}, producer(), conn(), non_neg_integer()}
              | {park, #stream{}, producer(), conn()} | {done, producer(), conn()}
              | {close, term(), producer(), conn()}.
step(VB, #stream{phase = marker, next = Next, last = Last} = Stream, _Budget, Faults,
     P, C) ->
    {P1, C1} = unknown_opcode(VB, Stream, Faults, P, C),
    case Next =< Last of
        true ->
            {ok, P2, C2} = emit(marker(VB, Stream, P1, C1), P1, C1),
            {continue, Stream#stream{phase = mutations}, P2, C2, 1};
        false ->
            {continue, Stream#stream{phase = finish}, P1, C1, 1}
    end;
step(_VB, #stream{phase = mutations, next = Next, last = Last} = Stream, _Budget, _Faults, P, C)
  when Next > Last ->
    {continue, Stream#stream{phase = finish}, P, C, 1};
step(VB, #stream{phase = mutations, next = Seqno, last = Last, sent = Sent} = Stream, Budget, Faults,
     P, C) ->
    %% Up to `Budget' mutations in one run; as everywhere, a frame goes out only while the window
    %% is open (the run stops at the frame that fills it).
    Run = case Faults of
              #{close_after := {close_socket_after_mutations, CloseAfter}} ->
                  min(Budget, CloseAfter - Sent);
              _ ->
                  Budget
          end,
    #producer{flow_limit = Limit, tx_unacked = Unacked} = P,
    Window = case Limit of
                 0 -> unlimited;
                 _ -> Limit - Unacked
             end,
    {Next, Frames, Bytes} = mutations(VB, Stream, min(Last, Seqno + Run - 1), Window, Faults, P, C),
    Count = Next - Seqno,
    P1 = P#producer{tx_unacked = Unacked + Bytes},
    C1 = kv_sim_conn:out(lists:reverse(Frames), C),
    case Faults of
        #{close_after := {close_socket_after_mutations, Max}} when Sent + Count >= Max ->
            {close, {fault, close_socket_after_mutations, VB, Sent + Count}, P1, C1};
        _ ->
            {continue, Stream#stream{next = Next, sent = Sent + Count}, P1, C1, Count}
    end;
step(VB, #stream{phase = finish, opaque = Opaque, takeover = true} = Stream, _Budget, _Faults, P, C) ->
    {ok, P1, C1} = emit(dcp_commands:set_vbucket_state(VB, Opaque, pending), P, C),
    {park, Stream#stream{phase = wait_pending_ack}, P1, C1};
step(VB, #stream{phase = finish, opaque = Opaque, finite = true}, _Budget, _Faults, P, C) ->
    {ok, P1, C1} = emit(dcp_commands:stream_end(VB, Opaque, ok), P, C),
    {done, P1, C1};
step(_VB, #stream{phase = finish} = Stream, _Budget, _Faults, P, C) ->
    %% An open-ended stream stays open with nothing more to send, until it is closed.
    {park, Stream#stream{phase = idle}, P, C}.

%% The stream's one snapshot marker, `Next - 1'..`Last'. kv_engine sends it as v2.0 on a connection
%% with sync replication (DCP_CONTROL enable_sync_writes with a consumer name: a stream then carries
%% its max visible seqno, and its high completed seqno in a disk snapshot); v1 otherwise. What kv_sim
%% streams is read from its store at the request, as a backfill is: kv_engine marks that a disk
%% snapshot (with the checkpoint flag). kv_engine's v2.2 (purge seqno, high prepared seqno) needs a
%% DCP_CONTROL snapshot_max_marker_version 2.2 on a collections connection; kv_sim does not build it
%% (the control is refused as any unknown one).
marker(VB, #stream{opaque = Opaque, next = Next, last = Last} = Stream, P, C) ->
    case sync_replication(P) of
        false ->
            dcp_commands:snapshot_marker(VB, Opaque, Next - 1, Last, ?MARKER_MEMORY);
        true ->
            dcp_commands:snapshot_marker_v2(
              VB, Opaque, #{start => Next - 1, 'end' => Last,
                            type => ?MARKER_DISK bor ?MARKER_CHECKPOINT,
                            max_visible_seqno => max_visible_seqno(VB, Stream, P, C),
                            high_completed_seqno => high_completed_seqno(VB, Stream, P)})
    end.

sync_replication(#producer{sync_writes = Sync, consumer_name = Name}) ->
    Sync andalso is_binary(Name) andalso Name =/= <<>>.

%% The highest seqno of the snapshot that this connection gets as a visible item: a mutation, a
%% commit or a system event (a prepare or an abort is not visible); 0 if it has none.
max_visible_seqno(_VB, #stream{next = Next, last = Last, docs = Docs}, #producer{config = Config},
                  C) ->
    Collections = kv_sim_conn:collections(C),
    case Docs of
        seeded ->
            seeded_max_visible(Config, Last, Next, Collections);
        _ ->
            maps:fold(fun(Seqno, Item, Max) when Seqno > Max, Seqno >= Next, Seqno =< Last ->
                              case stored_visible(Item, Collections) of
                                  true -> Seqno;
                                  false -> Max
                              end;
                         (_, _, Max) ->
                              Max
                      end, 0, Docs)
    end.

seeded_max_visible(_Config, Seqno, Next, _Collections) when Seqno < Next ->
    0;
seeded_max_visible(Config, Seqno, Next, Collections) ->
    Visible = case kv_sim:seqno_item(Config, Seqno) of
                  {create, _} -> Collections;
                  {doc, Cid} -> Collections orelse Cid =:= 0;
                  {commit, Cid, _} -> Collections orelse Cid =:= 0;
                  _ -> false
              end,
    case Visible of
        true -> Seqno;
        false -> seeded_max_visible(Config, Seqno - 1, Next, Collections)
    end.

stored_visible({event, _, _, _}, Collections) -> Collections;
stored_visible({mutation, SKey, _}, Collections) -> Collections orelse is_binary(SKey);
stored_visible({commit, SKey, _, _}, Collections) -> Collections orelse is_binary(SKey);
stored_visible(_Item, _Collections) -> false.

%% The vbucket's highest prepared seqno completed (committed or aborted) by the snapshot's end; 0 if
%% none.
high_completed_seqno(_VB, #stream{last = Last, docs = seeded}, #producer{config = Config}) ->
    seeded_high_completed(Config, Last);
high_completed_seqno(VB, #stream{last = Last}, #producer{config = #{durable := Durable}}) ->
    lists:max([0 | [Prepared || {_, Prepared, _, {_, At}} <- ets:match_object(Durable,
                                                                             {{VB, '_'}, '_', '_', '_'}),
                                At =< Last]]).

%% A seeded vbucket's durable writes follow its documents, each completed right after its prepare:
%% the first commit or abort below the end is the highest completed; a document means none.
seeded_high_completed(_Config, 0) ->
    0;
seeded_high_completed(Config, Seqno) ->
    case kv_sim:seqno_item(Config, Seqno) of
        {Outcome, _, Prepared} when Outcome =:= commit; Outcome =:= abort -> Prepared;
        {prepare, _, _} -> seeded_high_completed(Config, Seqno - 1);
        _ -> 0
    end.

%% The stream's frames up to `To' (newest first) while the window has room, with the next seqno and
%% their bytes.
mutations(VB, #stream{opaque = Opaque, next = From, docs = Docs}, To, Window, Faults,
          #producer{config = Config, sync_writes = Sync}, C) ->
    Framing = case Faults of
                  #{flexible := true} ->
                      #{framing_extras => dcp_commands:stream_id_framing(?FAULT_STREAM_ID)};
                  _ -> #{}
              end,
    Source = case Docs of
                 seeded -> {seeded, Config};
                 _ -> {store, Docs}
             end,
    Wire = {Framing, kv_sim_conn:collections(C), Sync},
    mutations(VB, Opaque, From, To, Window, Wire, Source, [], 0).

mutations(VB, Opaque, Seqno, To, Window, Wire, {store, Docs} = Source, Frames, Bytes)
  when Seqno =< To, not is_map_key(Seqno, Docs) ->
    %% a seqno the node's store does not hold (a later write of its key replaced it)
    mutations(VB, Opaque, Seqno + 1, To, Window, Wire, Source, Frames, Bytes);
mutations(VB, Opaque, Seqno, To, Window, Wire, Source, Frames, Bytes)
  when Seqno =< To, (Window =:= unlimited orelse Bytes < Window) ->
    Frame = case Source of
                {store, Docs} ->
                    #{Seqno := Item} = Docs,
                    stored_frame(VB, Opaque, Seqno, Item, Wire);
                {seeded, Config} ->
                    seeded_frame(VB, Opaque, Seqno, Wire, Config)
            end,
    mutations(VB, Opaque, Seqno + 1, To, Window, Wire, Source, [Frame | Frames],
              Bytes + iolist_size(Frame));
mutations(_VB, _Opaque, Seqno, _To, _Window, _Wire, _Source, Frames, Bytes) ->
    {Seqno, Frames, Bytes}.

%% Only the seqnos after the stream's start are read.
-spec stored_items(kv_sim:node_config(), dcp_commands:vbucket(), non_neg_integer()) ->
          #{pos_integer() => stored()}.
stored_items(#{store := Store, events := Events, durable := Durable}, VB, Start) ->
    Live = maps:from_list(
             [{Seqno, {mutation, SKey, Value}}
              || {SKey, Seqno, Value} <- ets:select(Store, [{{{VB, '$1'}, '$2', '$3'},
                                                             [{'>', '$2', Start}],
                                                             [{{'$1', '$2', '$3'}}]}])]),
    WithEvents = lists:foldl(fun({{_, Seqno}, Event, Key, Value}, Acc) when Seqno > Start ->
                                     Acc#{Seqno => {event, Event, Key, Value}};
                                (_, Acc) ->
                                     Acc
                             end, Live, ets:match_object(Events, {{VB, '_'}, '_', '_', '_'})),
    lists:foldl(fun({{_, SKey}, Prepared, Value, Outcome}, Acc) ->
                        Acc1 = case Prepared > Start of
                                   true -> Acc#{Prepared => {prepare, SKey, Value}};
                                   false -> Acc
                               end,
                        case Outcome of
                            pending ->
                                Acc1;
                            {_, At} when At =< Start ->
                                Acc1;
                            {aborted, At} ->
                                Acc1#{At => {abort, SKey, Prepared}};
                            {committed, At} ->
                                LiveValue = case Acc1 of
                                                #{At := {mutation, SKey, V}} -> V;
                                                _ -> undefined
                                            end,
                                Acc1#{At => {commit, SKey, Prepared, LiveValue}}
                        end
                end, WithEvents, ets:match_object(Durable, {{VB, '_'}, '_', '_', '_'})).

%% A node's stored seqno on a connection: without HELLO collections only the default collection's
%% documents, keys unprefixed, and no system events; without sync writes only committed writes.
stored_frame(_VB, _Opaque, _Seqno, {event, _, _, _}, {_, false, _}) ->
    [];
stored_frame(VB, Opaque, Seqno, {event, Event, Key, Value}, {_, true, _}) ->
    dcp_commands:system_event(VB, Opaque, #{by_seqno => Seqno, event => Event, key => Key,
                                            value => Value});
stored_frame(VB, Opaque, Seqno, Item, {_, Collections, _} = Wire) ->
    SKey = element(2, Item),
    case wire_key(SKey, Collections) of
        skip -> [];
        WireKey -> stored_doc_frame(VB, Opaque, Seqno, WireKey, Item, Wire)
    end.

stored_doc_frame(VB, Opaque, Seqno, Key, {mutation, _, Value}, {Framing, _, _}) ->
    mutation_frame(VB, Opaque, Seqno, Key, Value, Framing);
stored_doc_frame(VB, Opaque, Seqno, Key, {prepare, _, Value}, {Framing, _, true}) ->
    dcp_commands:prepare(VB, Opaque, Framing#{key => Key, by_seqno => Seqno, value => Value,
                                              cas => Seqno});
stored_doc_frame(VB, Opaque, Seqno, Key, {commit, _, Prepared, _}, {_, _, true}) ->
    dcp_commands:commit(VB, Opaque, #{key => Key, prepared_seqno => Prepared, commit_seqno => Seqno});
stored_doc_frame(VB, Opaque, Seqno, Key, {commit, _, _, Value}, {Framing, _, false})
  when is_binary(Value) ->
    mutation_frame(VB, Opaque, Seqno, Key, Value, Framing);
stored_doc_frame(VB, Opaque, Seqno, Key, {abort, _, Prepared}, {_, _, true}) ->
    dcp_commands:abort(VB, Opaque, #{key => Key, prepared_seqno => Prepared, abort_seqno => Seqno});
stored_doc_frame(_VB, _Opaque, _Seqno, _Key, _Item, _Wire) ->
    %% a prepare, an abort or a commit no longer live, to a connection without sync writes
    [].

wire_key({Cid, Key}, true) -> dcp_commands:collection_key(Cid, Key);
wire_key({_Cid, _Key}, false) -> skip;
wire_key(Key, true) -> dcp_commands:collection_key(0, Key);
wire_key(Key, false) -> Key.

%% The cas is the seqno: unique per document, as a cas must be.
mutation_frame(VB, Opaque, Seqno, Key, Value, Framing) ->
    dcp_commands:mutation(VB, Opaque, Framing#{key => Key, by_seqno => Seqno, value => Value,
                                               cas => Seqno}).

%% A seeded producer's seqno on a connection: a collection's create event, a document or a durable
%% write's step; a connection without HELLO collections is served as a legacy client (the default
%% collection's only, keys unprefixed), one without sync writes gets only the committed writes (a
%% mutation at the commit's seqno).
seeded_frame(VB, Opaque, Seqno, {_Framing, Collections, _Sync} = Wire, Config) ->
    case kv_sim:seqno_item(Config, Seqno) of
        {create, Cid} when Collections ->
            dcp_commands:create_collection_event(VB, Opaque, Seqno, Cid, kv_sim:collection_name(Cid));
        {create, _} ->
            [];
        Item ->
            Cid = element(2, Item),
            case Collections orelse Cid =:= 0 of
                false ->
                    [];
                true ->
                    Key = fun(K) when Collections -> dcp_commands:collection_key(Cid, K);
                             (K) -> K
                          end,
                    seeded_doc_frame(VB, Opaque, Seqno, Item, Key, Wire, Config)
            end
    end.

seeded_doc_frame(VB, Opaque, Seqno, {doc, _}, Key, {Framing, _, _}, Config) ->
    {K, Seqno, Value} = kv_sim:doc(Config, VB, Seqno),
    mutation_frame(VB, Opaque, Seqno, Key(K), Value, Framing);
seeded_doc_frame(VB, Opaque, Seqno, {prepare, _, _}, Key, {Framing, _, true}, Config) ->
    {K, Value} = kv_sim:durable_doc(Config, VB, Seqno),
    dcp_commands:prepare(VB, Opaque, Framing#{key => Key(K), by_seqno => Seqno, value => Value,
                                              cas => Seqno});
seeded_doc_frame(VB, Opaque, Seqno, {commit, _, Prepared}, Key, {Framing, _, Sync}, Config) ->
    {K, Value} = kv_sim:durable_doc(Config, VB, Prepared),
    case Sync of
        true -> dcp_commands:commit(VB, Opaque, #{key => Key(K), prepared_seqno => Prepared,
                                                  commit_seqno => Seqno});
        false -> mutation_frame(VB, Opaque, Seqno, Key(K), Value, Framing)
    end;
seeded_doc_frame(VB, Opaque, Seqno, {abort, _, Prepared}, Key, {_, _, true}, Config) ->
    {K, _} = kv_sim:durable_doc(Config, VB, Prepared),
    dcp_commands:abort(VB, Opaque, #{key => Key(K), prepared_seqno => Prepared, abort_seqno => Seqno});
seeded_doc_frame(_VB, _Opaque, _Seqno, _Item, _Key, _Wire, _Config) ->
    %% a prepare or an abort, to a connection without sync writes
    [].

%% ---- writing ----

%% A producer's stream frames count toward the consumer's flow-control window.
emit(Bytes, P, C) ->
    {ok, P#producer{tx_unacked = P#producer.tx_unacked + iolist_size(Bytes)}, kv_sim_conn:out(Bytes, C)}.
