%% @doc Building and interpreting DCP command frames, in ns_server's words.
%%
%% Every frame is built as an `mcbp' frame map and encoded by `mcbp:encode/1'; this module only lays out
%% the extras, keys and values of each command (the one codec owns the header). Builders return iodata.
-module(dcp_commands).

-include("mcbp.hrl").

%% The frames kv_sim sends (the section at the end of this file; Erlang wants exports before functions)
-export([hello_response/2, stream_req_rollback/2, failover_log_response/2, node_stream_req/4,
         stream_id_framing/1, stream_req_takeover/1]).

%% Handshake frames as ns_server sends them, and the collection / sync-write frames (the section at
%% the very end of this file)
-export([dcp_open_json/5, system_event/3, create_collection_event/5, create_collection_value/1, prepare/3, commit/3, abort/3,
         seqno_acknowledged/3, collection_key/2, split_collection_key/1, leb128/1]).

%% Handshake and stream setup (what a connection to memcached sends)
-export([sasl_auth_plain/3, select_bucket/2, hello/3, dcp_open/4,
         add_stream/3, close_stream/2, stream_req/3, control/3, buffer_ack/2,
         noop_request/1, noop_response/1]).

%% What a DCP producer or consumer node sends (kv_sim and tests)
-export([snapshot_marker/5, snapshot_marker_v2/3, mutation/3, deletion/3, expiration/3, stream_end/3,
         set_vbucket_state/3, stream_req_response/3, add_stream_response/3,
         response/3, response/4, request/2]).

%% Interpreting frames
-export([process_response/1, command_2_atom/1, opcode/1, status/1,
         hello_feature_code/1, hello_feature_name/1, hello_features/1,
         open_flags/2, failover_log/1, format_packet_nicely/1, format_packet_nicely/2]).

-export_type([opaque/0, vbucket/0, feature/0, open_flag/0, stream_end_reason/0,
              vbucket_state/0, frame/0]).

-type opaque() :: 0..16#ffffffff.
-type vbucket() :: 0..16#ffff.
%% A HELLO feature name of native/mcbp/src/names.rs (`xattr', `json', `collections', ...).
-type feature() :: atom().
-type open_flag() :: xattr | del_times | del_user_xattr.
%% What `stream_end/3' takes: a reason (mcbp's type) or its code.
-type stream_end_reason() :: mcbp:stream_end_reason() | non_neg_integer().
-type vbucket_state() :: mcbp:vbucket_state().
-type frame() :: #{atom() => term()}.

%% ---- handshake ----

%% @doc SASL_AUTH with mechanism PLAIN: the value is `authzid NUL authcid NUL password' (empty authzid).
-spec sasl_auth_plain(iodata(), iodata(), opaque()) -> iodata().
sasl_auth_plain(User, Password, Opaque) ->
    Value = iolist_to_binary([0, User, 0, Password]),
    request(?SASL_AUTH, #{opaque => Opaque, key => <<"PLAIN">>, value => Value}).

-spec select_bucket(iodata(), opaque()) -> iodata().
select_bucket(Bucket, Opaque) ->
    request(?SELECT_BUCKET, #{opaque => Opaque, key => iolist_to_binary(Bucket)}).

%% @doc HELLO: the key is the agent name, the value the wanted feature codes (u16 each).
-spec hello(iodata(), [feature()], opaque()) -> iodata().
hello(AgentName, Features, Opaque) ->
    Value = << <<(hello_feature_code(F)):16>> || F <- Features >>,
    request(?HELLO, #{opaque => Opaque, key => iolist_to_binary(AgentName), value => Value}).

-spec dcp_open(iodata(), consumer | producer, [open_flag()], opaque()) -> iodata().
dcp_open(Name, Type, Flags, Opaque) ->
    Extras = <<0:32, (open_flags(Type, Flags)):32>>,
    request(?DCP_OPEN, #{opaque => Opaque, extras => Extras, key => iolist_to_binary(Name)}).

%% @doc The DCP_OPEN flags word for a connection type and its feature flags.
-spec open_flags(consumer | producer, [open_flag()]) -> non_neg_integer().
open_flags(Type, Flags) ->
    Base = case Type of
               producer -> ?OPEN_PRODUCER;
               consumer -> 0
           end,
    lists:foldl(fun(F, Acc) -> Acc bor open_flag_bit(F) end, Base, Flags).

open_flag_bit(xattr) -> ?OPEN_XATTR;
open_flag_bit(del_times) -> ?OPEN_DEL_TIMES;
open_flag_bit(del_user_xattr) -> ?OPEN_DEL_USER_XATTR;
open_flag_bit(Other) -> error({bad_open_flag, Other}).

%% ---- stream setup ----

%% @doc DCP_ADD_STREAM; `Flags' is the flags word (1 = takeover) or a list of `takeover'.
-spec add_stream(vbucket(), non_neg_integer() | [takeover], opaque()) -> iodata().
add_stream(VBucket, Flags, Opaque) ->
    request(?DCP_ADD_STREAM, #{vbucket => VBucket, opaque => Opaque,
                               extras => <<(add_stream_flags(Flags)):32>>}).

add_stream_flags(Flags) when is_integer(Flags) -> Flags;
add_stream_flags(Flags) when is_list(Flags) ->
    case lists:member(takeover, Flags) of
        true -> ?ADD_STREAM_TAKEOVER;
        false -> 0
    end.

-spec close_stream(vbucket(), opaque()) -> iodata().
close_stream(VBucket, Opaque) ->
    request(?DCP_CLOSE_STREAM, #{vbucket => VBucket, opaque => Opaque}).

%% @doc DCP_STREAM_REQ. Missing parameters default to a stream from 0 to the end of time, flags 0,
%% vbucket_uuid 0, and a snapshot range equal to the start seqno.
-spec stream_req(vbucket(), #{flags => non_neg_integer(), start_seqno => non_neg_integer(),
                              end_seqno => non_neg_integer(), vbucket_uuid => non_neg_integer(),
                              snap_start_seqno => non_neg_integer(),
                              snap_end_seqno => non_neg_integer()},
                 opaque()) -> iodata().
stream_req(VBucket, Params, Opaque) ->
    Start = maps:get(start_seqno, Params, 0),
    Extras = <<(maps:get(flags, Params, 0)):32, 0:32, Start:64,
               (maps:get(end_seqno, Params, ?MAX_SEQNO)):64,
               (maps:get(vbucket_uuid, Params, 0)):64,
               (maps:get(snap_start_seqno, Params, Start)):64,
               (maps:get(snap_end_seqno, Params, Start)):64>>,
    request(?DCP_STREAM_REQ, #{vbucket => VBucket, opaque => Opaque, extras => Extras}).

-spec control(iodata(), iodata(), opaque()) -> iodata().
control(Key, Value, Opaque) ->
    request(?DCP_CONTROL, #{opaque => Opaque, key => iolist_to_binary(Key),
                            value => iolist_to_binary(Value)}).

%% @doc DCP_BUFFER_ACKNOWLEDGEMENT (ns_server's DCP_WINDOW_UPDATE): `Bytes' processed since the last one.
-spec buffer_ack(non_neg_integer(), opaque()) -> iodata().
buffer_ack(Bytes, Opaque) ->
    request(?DCP_BUFFER_ACK, #{opaque => Opaque, extras => <<Bytes:32>>}).

-spec noop_request(opaque()) -> iodata().
noop_request(Opaque) ->
    request(?DCP_NOOP, #{opaque => Opaque}).

-spec noop_response(opaque()) -> iodata().
noop_response(Opaque) ->
    response(?DCP_NOOP, 0, Opaque).

%% ---- what a node sends on a stream ----

%% @doc A v1 snapshot marker covering `Start'..`End'; `Type' is the marker flags word (1 memory, 2 disk,
%% 4 checkpoint, 8 ack).
-spec snapshot_marker(vbucket(), opaque(), non_neg_integer(), non_neg_integer(),
                      non_neg_integer()) -> iodata().
snapshot_marker(VBucket, Opaque, Start, End, Type) ->
    request(?DCP_SNAPSHOT_MARKER, #{vbucket => VBucket, opaque => Opaque,
                                    extras => <<Start:64, End:64, Type:32>>}).

%% @doc A v2.0 snapshot marker (extras: the version byte 0; value: start, end, flags, max visible
%% seqno, high completed seqno), which kv_engine sends on a connection with sync replication (DCP_CONTROL
%% enable_sync_writes after consumer_name). `max_visible_seqno' is the snapshot's highest committed,
%% visible seqno (not a prepare or an abort); `high_completed_seqno' the vbucket's highest completed
%% prepare, meaningful only in a disk snapshot (type 2), 0 otherwise.
-spec snapshot_marker_v2(vbucket(), opaque(), #{start := non_neg_integer(), 'end' := non_neg_integer(),
                                                type := non_neg_integer(),
                                                max_visible_seqno := non_neg_integer(),
                                                high_completed_seqno := non_neg_integer()}) ->
          iodata().
snapshot_marker_v2(VBucket, Opaque, #{start := Start, 'end' := End, type := Type,
                                      max_visible_seqno := Mvs, high_completed_seqno := Hcs}) ->
    request(?DCP_SNAPSHOT_MARKER, #{vbucket => VBucket, opaque => Opaque, extras => <<0>>,
                                    value => <<Start:64, End:64, Type:32, Mvs:64, Hcs:64>>}).

-type doc_params() :: #{key := binary(), value => binary(), by_seqno := non_neg_integer(),
                        rev_seqno => non_neg_integer(), flags => non_neg_integer(),
                        expiry => non_neg_integer(), lock_time => non_neg_integer(),
                        delete_time => non_neg_integer(), cas => non_neg_integer(),
                        datatype => non_neg_integer(), framing_extras => [{byte(), binary()}],
                        magic => req | alt_req,
                        %% DCP_PREPARE only: 1 majority, 2 majority and persist on the active,
                        %% 3 persist to majority
                        durability_level => 1..3}.

%% @doc DCP_MUTATION; `framing_extras' (with `magic => alt_req') sends it in the flexible format.
-spec mutation(vbucket(), opaque(), doc_params()) -> iodata().
mutation(VBucket, Opaque, #{key := Key, by_seqno := BySeqno} = Doc) ->
    Extras = <<BySeqno:64, (maps:get(rev_seqno, Doc, 1)):64, (maps:get(flags, Doc, 0)):32,
               (maps:get(expiry, Doc, 0)):32, (maps:get(lock_time, Doc, 0)):32, 0:16, 0:8>>,
    request(?DCP_MUTATION, doc_frame(VBucket, Opaque, Key, Extras, Doc)).

%% @doc DCP_DELETION: v2 extras (with the delete time) when `delete_time' is given, else v1.
-spec deletion(vbucket(), opaque(), doc_params()) -> iodata().
deletion(VBucket, Opaque, #{key := Key, by_seqno := BySeqno} = Doc) ->
    RevSeqno = maps:get(rev_seqno, Doc, 1),
    Extras = case Doc of
                 #{delete_time := DeleteTime} -> <<BySeqno:64, RevSeqno:64, DeleteTime:32, 0:8>>;
                 _ -> <<BySeqno:64, RevSeqno:64, 0:16>>
             end,
    request(?DCP_DELETION, doc_frame(VBucket, Opaque, Key, Extras, Doc)).

-spec expiration(vbucket(), opaque(), doc_params()) -> iodata().
expiration(VBucket, Opaque, #{key := Key, by_seqno := BySeqno} = Doc) ->
    Extras = <<BySeqno:64, (maps:get(rev_seqno, Doc, 1)):64, (maps:get(delete_time, Doc, 0)):32>>,
    request(?DCP_EXPIRATION, doc_frame(VBucket, Opaque, Key, Extras, Doc)).

doc_frame(VBucket, Opaque, Key, Extras, Doc) ->
    Base = #{vbucket => VBucket, opaque => Opaque, extras => Extras, key => Key,
             value => maps:get(value, Doc, <<>>), cas => maps:get(cas, Doc, 0),
             datatype => maps:get(datatype, Doc, 0)},
    case Doc of
        #{framing_extras := FramingExtras} ->
            Base#{magic => alt_req, framing_extras => FramingExtras};
        _ ->
            Base
    end.

-spec stream_end(vbucket(), opaque(), stream_end_reason()) -> iodata().
stream_end(VBucket, Opaque, Reason) ->
    request(?DCP_STREAM_END, #{vbucket => VBucket, opaque => Opaque,
                               extras => <<(stream_end_code(Reason)):32>>}).

stream_end_code({unknown, N}) when is_integer(N), N >= 0 -> N;
stream_end_code(N) when is_integer(N), N >= 0 -> N;
stream_end_code(Reason) -> code(stream_end_reason, Reason, unknown_stream_end_reason).

-spec set_vbucket_state(vbucket(), opaque(), vbucket_state()) -> iodata().
set_vbucket_state(VBucket, Opaque, State) ->
    request(?DCP_SET_VBUCKET_STATE, #{vbucket => VBucket, opaque => Opaque,
                                      extras => <<(vbucket_state_code(State)):8>>}).

vbucket_state_code({unknown, N}) when is_integer(N), N >= 0 -> N;
vbucket_state_code(State) -> code(vbucket_state, State, unknown_vbucket_state).

%% @doc A successful STREAM_REQ answer carries the failover log, newest entry first.
-spec stream_req_response(opaque(), 0..16#ffff,
                          [{VbUuid :: non_neg_integer(), Seqno :: non_neg_integer()}] | binary())
                         -> iodata().
stream_req_response(Opaque, Status, Value) when is_binary(Value) ->
    response(?DCP_STREAM_REQ, Status, Opaque, #{value => Value});
stream_req_response(Opaque, Status, FailoverLog) when is_list(FailoverLog) ->
    Value = << <<Uuid:64, Seqno:64>> || {Uuid, Seqno} <- FailoverLog >>,
    stream_req_response(Opaque, Status, Value).

%% @doc The consumer's ADD_STREAM answer: on success the extras are the consumer's own stream opaque.
-spec add_stream_response(opaque(), 0..16#ffff, opaque() | none) -> iodata().
add_stream_response(Opaque, Status, none) ->
    response(?DCP_ADD_STREAM, Status, Opaque);
add_stream_response(Opaque, Status, StreamOpaque) ->
    response(?DCP_ADD_STREAM, Status, Opaque, #{extras => <<StreamOpaque:32>>}).

%% ---- generic frames ----

-spec response(0..255, 0..16#ffff, opaque()) -> iodata().
response(Opcode, Status, Opaque) ->
    response(Opcode, Status, Opaque, #{}).

%% @doc A response frame; `Fields' may set `extras', `key', `value', `datatype', `cas'.
-spec response(0..255, 0..16#ffff, opaque(), map()) -> iodata().
response(Opcode, Status, Opaque, Fields) ->
    mcbp:encode(maps:merge(#{magic => res, opcode => Opcode, datatype => 0, status => Status,
                             opaque => Opaque, cas => 0, framing_extras => [], extras => <<>>,
                             key => <<>>, value => <<>>},
                           Fields#{opcode => Opcode, status => Status, opaque => Opaque})).

%% @doc A request frame with any opcode (unknown ones included); unset fields are zero or empty.
-spec request(0..255, map()) -> iodata().
request(Opcode, Fields) ->
    mcbp:encode(maps:merge(#{magic => req, opcode => Opcode, datatype => 0, vbucket => 0,
                             opaque => 0, cas => 0, framing_extras => [], extras => <<>>,
                             key => <<>>, value => <<>>},
                           Fields#{opcode => Opcode})).

%% ---- interpreting ----

%% @doc `ok' for a successful answer, else the status as ns_server reports it.
-spec process_response(frame() | binary()) ->
          ok | {error, {mcbp_status, non_neg_integer()}} | {error, {not_a_response, term()}}.
process_response(Bin) when is_binary(Bin) ->
    case mcbp:decode(Bin) of
        {ok, Frame, _Rest} -> process_response(Frame);
        {more, N} -> {error, {not_a_response, {incomplete, N}}};
        {error, Reason} -> {error, {not_a_response, Reason}}
    end;
process_response(#{status := 0}) ->
    ok;
process_response(#{status := Status}) ->
    {error, {mcbp_status, Status}};
process_response(Other) ->
    {error, {not_a_response, maps:get(opcode_name, Other, Other)}}.

%% @doc The opcode's name as an atom (`dcp_mutation', `hello', ...), `unknown' for opcodes the codec does
%% not name. The names are the codec's own, so logs and events agree.
-spec command_2_atom(0..255) -> atom().
command_2_atom(Opcode) ->
    mcbp:opcode_name(Opcode).

%% @doc The opcode number of a name `command_2_atom/1' gives; integers pass through.
-spec opcode(atom() | 0..255) -> 0..255.
opcode(Opcode) when is_integer(Opcode), Opcode >= 0, Opcode =< 255 ->
    Opcode;
opcode(Name) ->
    code(opcode, Name, unknown_opcode_name).

%% @doc The status code of a name (`mcbp:names(status)'); integers pass through.
-spec status(atom() | 0..16#ffff) -> 0..16#ffff.
status(Status) when is_integer(Status) -> Status;
status(Name) -> code(status, Name, unknown_status_name).

-spec hello_feature_code(feature()) -> 0..16#ffff.
hello_feature_code(Feature) ->
    code(hello_feature, Feature, unknown_hello_feature).

-spec hello_feature_name(0..16#ffff) -> feature() | {unknown, 0..16#ffff}.
hello_feature_name(Code) ->
    mcbp:name(hello_feature, Code).

%% A name's code in the codec's table, or error({Error, Name}).
code(Kind, Name, Error) ->
    case is_atom(Name) andalso mcbp:code(Kind, Name) of
        Code when is_integer(Code) -> Code;
        _ -> error({Error, Name})
    end.

%% @doc The features named in a HELLO request or answer value (a sequence of u16 codes).
-spec hello_features(binary()) -> [feature() | {unknown, 0..16#ffff}].
hello_features(Value) ->
    [hello_feature_name(Code) || <<Code:16>> <= Value].

%% @doc The failover log in a STREAM_REQ answer value, `[{VbUuid, Seqno}]' newest first.
-spec failover_log(binary()) -> [{non_neg_integer(), non_neg_integer()}].
failover_log(Value) ->
    [{Uuid, Seqno} || <<Uuid:64, Seqno:64>> <= Value].

%% ---- formatting ----

%% @doc ns_server's one-line summary of a frame followed by a hex dump of its bytes.
-spec format_packet_nicely(binary() | frame()) -> string().
format_packet_nicely(Packet) ->
    format_packet_nicely(undefined, Packet).

%% @doc As `format_packet_nicely/1', prefixed with the direction (e.g. `sent', `received').
-spec format_packet_nicely(atom(), binary() | frame()) -> string().
format_packet_nicely(Direction, Packet) when is_binary(Packet) ->
    case mcbp:decode(Packet) of
        {ok, Frame, _Rest} ->
            format_frame(Direction, Frame, Packet);
        Other ->
            lists:flatten(io_lib:format("~sundecodable packet (~0p)~n~s",
                                        [direction(Direction), Other, hex_dump(Packet)]))
    end;
format_packet_nicely(Direction, Frame) when is_map(Frame) ->
    format_packet_nicely(Direction, iolist_to_binary(mcbp:encode(Frame))).

format_frame(Direction, #{magic := Magic, opcode := Opcode, opaque := Opaque} = Frame, Bytes) ->
    {Kind, Field} = case Frame of
                        #{status := Status} ->
                            {"RESPONSE", io_lib:format("status = ~p (~.16#)",
                                                       [mcbp:status_name(Status), Status])};
                        #{vbucket := VBucket} ->
                            {"REQUEST", io_lib:format("vbucket = ~b", [VBucket])};
                        _ ->
                            {"FRAME", ""}
                    end,
    lists:flatten(
      io_lib:format("~s~s (~p): ~p (~.16#) ~s opaque = ~b size = ~b~n~s",
                    [direction(Direction), Kind, Magic, command_2_atom(Opcode), Opcode, Field,
                     Opaque, byte_size(Bytes), hex_dump(Bytes)])).

direction(undefined) -> "";
direction(Direction) -> io_lib:format("~p ", [Direction]).

%% 16 bytes a line: offset, hex bytes, printable characters. Large values are cut so a log line stays
%% readable.
-define(MAX_DUMP, 512).

hex_dump(Bytes) when byte_size(Bytes) > ?MAX_DUMP ->
    [hex_dump(binary:part(Bytes, 0, ?MAX_DUMP), 0, []),
     io_lib:format("... ~b more bytes~n", [byte_size(Bytes) - ?MAX_DUMP])];
hex_dump(Bytes) ->
    hex_dump(Bytes, 0, []).

hex_dump(<<>>, _Offset, Acc) ->
    lists:reverse(Acc);
hex_dump(Bytes, Offset, Acc) ->
    N = min(16, byte_size(Bytes)),
    <<Line:N/binary, Rest/binary>> = Bytes,
    Hex = [io_lib:format("~2.16.0b ", [B]) || <<B>> <= Line],
    Pad = lists:duplicate(16 - N, "   "),
    Chars = [printable(B) || <<B>> <= Line],
    Text = io_lib:format("~8.16.0b  ~s~s ~s~n", [Offset, Hex, Pad, Chars]),
    hex_dump(Rest, Offset + N, [Text | Acc]).

printable(B) when B >= 32, B < 127 -> B;
printable(_) -> $..

%% ---- frames kv_sim sends (the node's side of the protocol) ----

%% The flags bit a STREAM_REQ (as an ADD_STREAM) asks for a takeover with.
-define(STREAM_FLAG_TAKEOVER, 16#01).
%% The frame info id of a DCP stream id in flexible framing extras.
-define(FRAME_INFO_STREAM_ID, 2).

%% @doc The successful HELLO answer granting `Features' (the value is their u16 codes).
-spec hello_response(opaque(), [feature()]) -> iodata().
hello_response(Opaque, Features) ->
    Value = << <<(hello_feature_code(F)):16>> || F <- Features >>,
    response(?HELLO, ?SUCCESS, Opaque, #{value => Value}).

%% @doc A STREAM_REQ refused with `rollback': the value is the seqno the consumer must roll back to.
-spec stream_req_rollback(opaque(), non_neg_integer()) -> iodata().
stream_req_rollback(Opaque, Seqno) ->
    response(?DCP_STREAM_REQ, ?ROLLBACK, Opaque, #{value => <<Seqno:64>>}).

%% @doc The answer to DCP_GET_FAILOVER_LOG: the log, newest entry first.
-spec failover_log_response(opaque(), [{VbUuid :: non_neg_integer(), Seqno :: non_neg_integer()}])
                           -> iodata().
failover_log_response(Opaque, FailoverLog) ->
    Value = << <<Uuid:64, Seqno:64>> || {Uuid, Seqno} <- FailoverLog >>,
    response(?DCP_GET_FAILOVER_LOG, ?SUCCESS, Opaque, #{value => Value}).

%% @doc The STREAM_REQ a consumer node sends for an ADD_STREAM: from its high seqno on, open-ended,
%% with the ADD_STREAM's takeover flag.
-spec node_stream_req(vbucket(), non_neg_integer(), boolean(), opaque()) -> iodata().
node_stream_req(VBucket, StartSeqno, Takeover, Opaque) ->
    Flags = case Takeover of
                true -> ?STREAM_FLAG_TAKEOVER;
                false -> 0
            end,
    stream_req(VBucket, #{flags => Flags, start_seqno => StartSeqno}, Opaque).

%% @doc The framing extras that put a frame on DCP stream `StreamId' (for `doc_params()'
%% `framing_extras').
-spec stream_id_framing(0..16#ffff) -> [{byte(), binary()}].
stream_id_framing(StreamId) ->
    [{?FRAME_INFO_STREAM_ID, <<StreamId:16>>}].

%% @doc Whether a STREAM_REQ's fields (`mcbp:dcp_fields/1') ask for a takeover stream.
-spec stream_req_takeover(#{flags := non_neg_integer(), atom() => term()}) -> boolean().
stream_req_takeover(#{flags := Flags}) ->
    Flags band ?STREAM_FLAG_TAKEOVER =/= 0.

%% ---- handshake frames as ns_server sends them ----

%% The datatype bit of a JSON value (mcbp.hrl holds only what the codec's tables check).
-define(DATATYPE_JSON, 16#01).

%% DCP_SYSTEM_EVENT event codes.
-define(EVENT_CREATE_COLLECTION, 0).

%% @doc DCP_OPEN whose value is a JSON document (datatype JSON): ns_server's consumer sends
%% `{"consumer_name":"<node>"}' this way when json and set_consumer_name are on.
-spec dcp_open_json(iodata(), consumer | producer, [open_flag()], iodata(), opaque()) -> iodata().
dcp_open_json(Name, Type, Flags, Json, Opaque) ->
    Extras = <<0:32, (open_flags(Type, Flags)):32>>,
    request(?DCP_OPEN, #{opaque => Opaque, extras => Extras, key => iolist_to_binary(Name),
                         value => iolist_to_binary(Json), datatype => ?DATATYPE_JSON}).

%% @doc DCP_SYSTEM_EVENT: extras by_seqno u64, event u32, version u8; the key names what changed.
-spec system_event(vbucket(), opaque(), #{by_seqno := non_neg_integer(), event := non_neg_integer(),
                                          version => 0..255, key := iodata(), value => iodata()})
                  -> iodata().
system_event(VBucket, Opaque, #{by_seqno := Seqno, event := Event, key := Key} = Params) ->
    request(?DCP_SYSTEM_EVENT,
            #{vbucket => VBucket, opaque => Opaque,
              extras => <<Seqno:64, Event:32, (maps:get(version, Params, 0)):8>>,
              key => iolist_to_binary(Key), value => iolist_to_binary(maps:get(value, Params, <<>>))}).

%% @doc The system event that creates collection `Cid' (named `Name', in the default scope): the
%% value is the manifest uid, the scope id and the collection id.
-spec create_collection_event(vbucket(), opaque(), non_neg_integer(), non_neg_integer(), iodata())
                             -> iodata().
create_collection_event(VBucket, Opaque, Seqno, Cid, Name) ->
    system_event(VBucket, Opaque, #{by_seqno => Seqno, event => ?EVENT_CREATE_COLLECTION,
                                    key => Name, value => create_collection_value(Cid)}).

%% @doc The value of the system event creating collection `Cid' in the default scope: the manifest
%% uid (the collection id here), the scope id and the collection id.
-spec create_collection_value(non_neg_integer()) -> binary().
create_collection_value(Cid) ->
    <<Cid:64, 0:32, Cid:32>>.

%% @doc DCP_PREPARE: a durable write pending its commit or abort; extras as a mutation's, ending with
%% nru u8, deleted u8, durability level u8 (1 majority, the default here).
-spec prepare(vbucket(), opaque(), doc_params()) -> iodata().
prepare(VBucket, Opaque, #{key := Key, by_seqno := BySeqno} = Doc) ->
    Extras = <<BySeqno:64, (maps:get(rev_seqno, Doc, 1)):64, (maps:get(flags, Doc, 0)):32,
               (maps:get(expiry, Doc, 0)):32, (maps:get(lock_time, Doc, 0)):32, 0:8, 0:8,
               (maps:get(durability_level, Doc, 1)):8>>,
    request(?DCP_PREPARE, doc_frame(VBucket, Opaque, Key, Extras, maps:remove(durability_level, Doc))).

%% @doc DCP_COMMIT of the prepare at `prepared_seqno', committed at `commit_seqno'.
-spec commit(vbucket(), opaque(), #{key := binary(), prepared_seqno := non_neg_integer(),
                                    commit_seqno := non_neg_integer()}) -> iodata().
commit(VBucket, Opaque, #{key := Key, prepared_seqno := Prepared, commit_seqno := Commit}) ->
    request(?DCP_COMMIT, #{vbucket => VBucket, opaque => Opaque, key => Key,
                           extras => <<Prepared:64, Commit:64>>}).

%% @doc DCP_ABORT of the prepare at `prepared_seqno', aborted at `abort_seqno'.
-spec abort(vbucket(), opaque(), #{key := binary(), prepared_seqno := non_neg_integer(),
                                   abort_seqno := non_neg_integer()}) -> iodata().
abort(VBucket, Opaque, #{key := Key, prepared_seqno := Prepared, abort_seqno := Abort}) ->
    request(?DCP_ABORT, #{vbucket => VBucket, opaque => Opaque, key => Key,
                          extras => <<Prepared:64, Abort:64>>}).

%% @doc DCP_SEQNO_ACKNOWLEDGED: the consumer has the prepares of `VBucket' up to `PreparedSeqno'.
-spec seqno_acknowledged(vbucket(), opaque(), non_neg_integer()) -> iodata().
seqno_acknowledged(VBucket, Opaque, PreparedSeqno) ->
    request(?DCP_SEQNO_ACKNOWLEDGED, #{vbucket => VBucket, opaque => Opaque,
                                       extras => <<PreparedSeqno:64>>}).

%% @doc A document key on a collections-aware connection: the collection id (unsigned LEB128), then
%% the key.
-spec collection_key(non_neg_integer(), binary()) -> binary().
collection_key(Cid, Key) ->
    <<(leb128(Cid))/binary, Key/binary>>.

%% @doc The collection id and key of a collections-aware key; `error' when the prefix is not a
%% complete LEB128 of at most 32 bits or no key follows it (memcached refuses such a key).
-spec split_collection_key(binary()) -> {ok, non_neg_integer(), binary()} | error.
split_collection_key(Bin) ->
    split_leb128(Bin, 0, 0).

split_leb128(<<1:1, Low:7, Rest/binary>>, Shift, Acc) when Shift < 28 ->
    split_leb128(Rest, Shift + 7, Acc bor (Low bsl Shift));
split_leb128(<<0:1, Low:7, Key/binary>>, Shift, Acc) when byte_size(Key) > 0 ->
    case Acc bor (Low bsl Shift) of
        Cid when Cid =< 16#ffffffff -> {ok, Cid, Key};
        _ -> error
    end;
split_leb128(_, _, _) ->
    error.

%% @doc Unsigned LEB128: 7 bits a byte, least significant first, the high bit set on all but the last.
-spec leb128(non_neg_integer()) -> binary().
leb128(N) when N < 16#80 ->
    <<N>>;
leb128(N) ->
    <<1:1, (N band 16#7f):7, (leb128(N bsr 7))/binary>>.
