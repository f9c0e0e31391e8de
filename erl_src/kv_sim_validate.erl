%% @doc memcached's checks of what a connection receives, as kv_engine's `daemon/mcbp_validators.cc'
%% (requests) and its DCP response handlers (`DcpProducer::handleResponse',
%% `DcpConsumer::handleResponse', `execute_client_response_packet') make them, for `kv_sim'.
%%
%% `check(Frame, Context)': `Frame' is a frame as `mcbp:decode/1' gives it, `Context' what the
%% connection is so far (authenticated, the HELLO features it was granted, what DCP_OPEN opened it as
%% and with which flags). `ok', or `{error, Reason}' with
%% `Reason = {invalid_frame, OpcodeName, Why} | {invalid_response, OpcodeName, Why}', e.g.
%% `{invalid_frame, dcp_mutation, {extras_length, 10, expected, 31}}'. A request kv_engine answers
%% without validating (an unknown opcode, anything but the handshake before authentication, an
%% opcode this module has no rules for) is `ok': the caller answers it as memcached does.
%%
%% Per request, as `McbpValidator::verify_header' does, in its order: the datatype is one of the
%% three bits; the extras length is the opcode's; the key is absent, present, or either, never longer
%% than 250 bytes (251 once collections are on); the value absent, present, or either; the cas unset,
%% set, or either; the datatype within the opcode's mask and every bit of it enabled on the
%% connection (JSON by HELLO json or an open DCP connection, snappy by HELLO snappy, xattr by HELLO
%% xattr); an xattr blob well formed; every framing extra known and well sized; a document key, with
%% collections on, a canonical unsigned LEB128 collection id (not a reserved one, 1..7) followed by a
%% logical key of 1..250 bytes (246 outside the default collection). Then each opcode's own rules,
%% then the DCP ones (`verify_common_dcp_restrictions'): a DCP command only on a DCP connection
%% (DCP_OPEN only on one that is not, DCP_GET_FAILOVER_LOG on either), no DCP stream id on a
%% consumer connection.
%%
%% Beyond kv_engine's code, as docs/BinaryProtocol.md describes the alternative request magic ("if
%% enabled"): an `alt_req' frame needs HELLO `alt_request_support' (a node started with
%% `accept_alt_requests' takes both that and stream ids, for the producer's `flexible_framing' fault).
-module(kv_sim_validate).

-include("mcbp.hrl").

-export([check/2, consumer_name/1]).

-export_type([context/0, reason/0]).

-type context() :: #{authenticated := boolean(),
                     features := [dcp_commands:feature() | {unknown, 0..16#ffff}],
                     dcp := none | consumer | producer,
                     open_flags := non_neg_integer(),
                     accept_alt_requests => boolean()}.
-type reason() :: {invalid_frame, atom(), term()} | {invalid_response, atom(), term()}.

%% Datatype bits
-define(RAW, 0).
-define(JSON, 1).
-define(SNAPPY, 2).
-define(XATTR, 4).
-define(ALL_DATATYPES, 7).

%% Opcodes the hrl does not name
-define(STAT, 16#10).
-define(SASL_STEP, 16#22).
-define(GET_ERROR_MAP, 16#fe).

%% Key limits (include/memcached/limits.h, include/memcached/dockey_view.h)
-define(MAX_KEY, 250).
-define(MAX_COLLECTIONS_KEY, 251).
-define(MAX_LOGICAL_KEY_NON_DEFAULT, 246).

%% DCP_OPEN flags (include/memcached/protocol_binary.h DcpOpenFlag)
-define(OPEN_NO_VALUE, 16#08).
-define(OPEN_NO_VALUE_WITH_DATATYPE, 16#40).
-define(OPEN_SKIP_DELETES, 16#200).
-define(OPEN_KNOWN, (?OPEN_PRODUCER bor ?OPEN_XATTR bor ?OPEN_NO_VALUE bor ?OPEN_DEL_TIMES
                     bor ?OPEN_NO_VALUE_WITH_DATATYPE bor ?OPEN_DEL_USER_XATTR
                     bor ?OPEN_SKIP_DELETES)).

%% DCP_ADD_STREAM / DCP_STREAM_REQ flags (include/mcbp/protocol/dcp_add_stream_flags.h)
-define(STREAM_TAKEOVER, 16#01).
-define(STREAM_NO_VALUE, 16#08).
-define(STREAM_ACTIVE_VB_ONLY, 16#10).
-define(STREAM_CACHE_TRANSFER, 16#100).
-define(STREAM_KNOWN, 16#1f7).

%% Request frame info ids (include/mcbp/protocol/request.h FrameInfoId)
-define(FI_BARRIER, 0).
-define(FI_DURABILITY, 1).
-define(FI_STREAM_ID, 2).
-define(FI_IMPERSONATE, 4).
-define(FI_PRESERVE_TTL, 5).
-define(FI_EXTRA_PRIVILEGE, 6).
-define(FI_TOKEN_AUTH_ID, 7).

%% The next check once this one passed.
-define(THEN(Check, Next), case Check of ok -> Next; {error, _} = Error__ -> Error__ end).

%% What verify_header checks of one opcode: extras length, key, value, cas, whether the key is a
%% document key, the datatype mask.
-record(layout, {extras :: non_neg_integer(),
                 key :: zero | non_zero | any,
                 value :: zero | non_zero | any,
                 cas :: not_set | set | any,
                 doc_key = false :: boolean(),
                 datatypes = ?RAW :: 0..7}).

%% @doc `ok' when memcached would take `Frame' on a connection in `Context', else the named reason.
-spec check(mcbp:frame(), context()) -> ok | {error, reason()}.
check(#{magic := Magic} = Frame, Context) when Magic =:= req; Magic =:= alt_req ->
    case request(Frame, Context) of
        ok -> ok;
        {error, Why} -> {error, {invalid_frame, maps:get(opcode_name, Frame), Why}}
    end;
check(#{magic := Magic} = Frame, Context) when Magic =:= res; Magic =:= alt_res ->
    case response(Frame, Context) of
        ok -> ok;
        {error, Why} -> {error, {invalid_response, maps:get(opcode_name, Frame), Why}}
    end;
check(_ServerFrame, _Context) ->
    %% memcached answers a server request "not supported" and takes server responses (duplex)
    ok.

%% ---- requests ----

request(#{opcode := Op} = Frame, Context) ->
    case admitted(Op, Context) of
        false -> ok;
        true -> request(Op, layout(Op, Frame, Context), Frame, Context)
    end.

request(_Op, none, _Frame, _Context) ->
    ok;
request(Op, Layout, Frame, Context) ->
    ?THEN(magic(Frame, Context),
    ?THEN(pre_header(Op, Frame),
    ?THEN(header(Layout, Frame, Context),
    ?THEN(specific(Op, Frame, Context),
          dcp_restrictions(Op, Frame, Context))))).

%% Before authentication memcached answers everything but the handshake with EACCESS unvalidated.
admitted(Op, #{authenticated := false}) ->
    lists:member(Op, [?HELLO, ?SASL_LIST_MECHS, ?SASL_AUTH, ?SASL_STEP, ?GET_ERROR_MAP]);
admitted(_Op, _Context) ->
    true.

magic(#{magic := alt_req}, Context) ->
    case feature(alt_request_support, Context) orelse maps:get(accept_alt_requests, Context, false) of
        true -> ok;
        false -> {error, alt_request_not_negotiated}
    end;
magic(_Frame, _Context) ->
    ok.

%% The layout of each opcode (mcbp_validators.cc, the validator named after it); `none' for an
%% opcode without rules here.
layout(?HELLO, _F, _C) -> #layout{extras = 0, key = any, value = any, cas = not_set};
layout(?SASL_LIST_MECHS, _F, _C) -> #layout{extras = 0, key = zero, value = zero, cas = not_set};
layout(Op, _F, _C) when Op =:= ?SASL_AUTH; Op =:= ?SASL_STEP ->
    #layout{extras = 0, key = non_zero, value = any, cas = not_set};
layout(?NOOP, _F, _C) -> #layout{extras = 0, key = zero, value = zero, cas = not_set};
layout(?SELECT_BUCKET, _F, _C) -> #layout{extras = 0, key = any, value = zero, cas = any};
layout(?STAT, _F, _C) ->
    #layout{extras = 0, key = any, value = any, cas = not_set, datatypes = ?RAW bor ?JSON};
layout(?DCP_OPEN, _F, _C) ->
    #layout{extras = 8, key = non_zero, value = any, cas = any, datatypes = ?RAW bor ?JSON};
layout(?DCP_ADD_STREAM, _F, _C) -> #layout{extras = 4, key = zero, value = zero, cas = any};
layout(?DCP_CLOSE_STREAM, _F, _C) -> #layout{extras = 0, key = zero, value = zero, cas = any};
layout(?DCP_STREAM_REQ, _F, C) ->
    %% with collections the value may carry a stream filter
    Value = case feature(collections, C) of
                true -> any;
                false -> zero
            end,
    #layout{extras = 48, key = zero, value = Value, cas = any};
layout(?DCP_GET_FAILOVER_LOG, _F, _C) -> #layout{extras = 0, key = zero, value = zero, cas = any};
layout(?DCP_STREAM_END, _F, _C) -> #layout{extras = 4, key = zero, value = zero, cas = any};
layout(?DCP_SNAPSHOT_MARKER, #{extras := Extras}, _C) ->
    %% v1 (20 bytes) or v2.x (1 byte, the version; its fields in the value), checked first
    Value = case byte_size(Extras) of
                1 -> any;
                _ -> zero
            end,
    #layout{extras = byte_size(Extras), key = zero, value = Value, cas = any};
layout(?DCP_MUTATION, _F, _C) ->
    #layout{extras = 31, key = non_zero, value = any, cas = any, doc_key = true,
            datatypes = ?ALL_DATATYPES};
layout(?DCP_DELETION, _F, C) ->
    %% v2 (with the delete time) once collections or DCP_OPEN's delete times are on
    Extras = case delete_v2(C) of
                 true -> 21;
                 false -> 18
             end,
    #layout{extras = Extras, key = non_zero, value = any, cas = any, doc_key = true,
            datatypes = ?ALL_DATATYPES};
layout(?DCP_EXPIRATION, _F, _C) ->
    #layout{extras = 20, key = non_zero, value = any, cas = any, doc_key = true,
            datatypes = ?ALL_DATATYPES};
layout(?DCP_SET_VBUCKET_STATE, _F, _C) -> #layout{extras = 1, key = zero, value = zero, cas = any};
layout(?DCP_NOOP, _F, _C) -> #layout{extras = 0, key = zero, value = zero, cas = any};
layout(?DCP_BUFFER_ACK, _F, _C) -> #layout{extras = 4, key = zero, value = zero, cas = any};
layout(?DCP_CONTROL, _F, _C) -> #layout{extras = 0, key = non_zero, value = non_zero, cas = any};
layout(?DCP_SYSTEM_EVENT, _F, _C) ->
    #layout{extras = 13, key = any, value = any, cas = any, datatypes = ?ALL_DATATYPES};
layout(?DCP_PREPARE, _F, _C) ->
    #layout{extras = 31, key = non_zero, value = any, cas = set, doc_key = true,
            datatypes = ?ALL_DATATYPES};
layout(?DCP_SEQNO_ACKNOWLEDGED, _F, _C) ->
    #layout{extras = 8, key = zero, value = zero, cas = not_set};
layout(Op, _F, _C) when Op =:= ?DCP_COMMIT; Op =:= ?DCP_ABORT ->
    #layout{extras = 16, key = non_zero, value = zero, cas = not_set};
layout(_Op, _F, _C) ->
    none.

%% The snapshot marker's extras are checked before the header: 20 (v1) or 1 (v2.x, version 0 with a
%% 36-byte value or 2 with a 52-byte one).
pre_header(?DCP_SNAPSHOT_MARKER, #{extras := Extras, value := Value}) ->
    case Extras of
        <<_:20/binary>> -> ok;
        <<Version>> when Version =/= 0, Version =/= 2 -> {error, {snapshot_marker_version, Version}};
        <<0>> -> value_size(Value, 36);
        <<2>> -> value_size(Value, 52);
        _ -> {error, {extras_length, byte_size(Extras), expected, [20, 1]}}
    end;
pre_header(_Op, _Frame) ->
    ok.

value_size(Value, Size) when byte_size(Value) =:= Size -> ok;
value_size(Value, Size) -> {error, {value_length, byte_size(Value), expected, Size}}.

header(#layout{} = L, #{datatype := Datatype, extras := Extras, key := Key, value := Value,
                        cas := Cas} = Frame, Context) ->
    ?THEN(valid_datatype(Datatype),
    ?THEN(extras_length(byte_size(Extras), L#layout.extras),
    ?THEN(key_length(byte_size(Key), L#layout.key, Context),
    ?THEN(presence(value_length, byte_size(Value), L#layout.value),
    ?THEN(cas(Cas, L#layout.cas),
    ?THEN(datatype_mask(Datatype, L#layout.datatypes),
    ?THEN(datatype_enabled(Datatype, Context),
    ?THEN(xattr_blob(Datatype, Value),
    ?THEN(framing_extras(Frame),
          document_key(L#layout.doc_key, Key, Context)))))))))).

valid_datatype(D) when D =< ?ALL_DATATYPES -> ok;
valid_datatype(D) -> {error, {invalid_datatype, D}}.

extras_length(N, N) -> ok;
extras_length(N, Want) -> {error, {extras_length, N, expected, Want}}.

key_length(N, zero, _Context) when N > 0 -> {error, {key_length, N, expected, zero}};
key_length(0, non_zero, _Context) -> {error, {key_length, 0, expected, non_zero}};
key_length(N, _, Context) ->
    Max = case feature(collections, Context) of
              true -> ?MAX_COLLECTIONS_KEY;
              false -> ?MAX_KEY
          end,
    case N =< Max of
        true -> ok;
        false -> {error, {key_length, N, expected, {at_most, Max}}}
    end.

presence(What, N, zero) when N > 0 -> {error, {What, N, expected, zero}};
presence(What, 0, non_zero) -> {error, {What, 0, expected, non_zero}};
presence(_What, _N, _Rule) -> ok.

cas(Cas, not_set) when Cas =/= 0 -> {error, {cas, Cas, expected, zero}};
cas(0, set) -> {error, {cas, 0, expected, non_zero}};
cas(_Cas, _Rule) -> ok.

datatype_mask(D, Mask) when D band bnot Mask =:= 0 -> ok;
datatype_mask(D, Mask) -> {error, {datatype, D, expected_within, Mask}}.

%% Every datatype bit must be enabled on the connection (`Connection::isDatatypeEnabled'); JSON is
%% also enabled by DCP_OPEN (dcp_open_executor.cc).
datatype_enabled(?RAW, _Context) ->
    ok;
datatype_enabled(D, Context) ->
    Off = [Name || {Bit, Name, On} <- [{?JSON, json, feature(json, Context)
                                                          orelse maps:get(dcp, Context) =/= none},
                                       {?SNAPPY, snappy, feature(snappy, Context)},
                                       {?XATTR, xattr, feature(xattr, Context)}],
                   D band Bit =/= 0, not On],
    case Off of
        [] -> ok;
        _ -> {error, {datatype_not_negotiated, Off}}
    end.

%% xattr/utils.cc validate: a 4-byte length of the xattrs, then pairs of a 4-byte length, a key,
%% NUL, a JSON value, NUL, every key once. A compressed value is not inflated here.
xattr_blob(D, _Value) when D band ?XATTR =:= 0; D band ?SNAPPY =/= 0 ->
    ok;
xattr_blob(_D, <<Len:32, Blob:Len/binary, _Body/binary>>) ->
    xattr_pairs(Blob, []);
xattr_blob(_D, _Value) ->
    {error, {xattr_blob, bad_length}}.

xattr_pairs(<<>>, _Keys) ->
    ok;
xattr_pairs(<<Len:32, Pair:Len/binary, Rest/binary>>, Keys) ->
    case binary:split(Pair, <<0>>) of
        [Key, ValueNul] when Key =/= <<>>, byte_size(ValueNul) > 0 ->
            Size = byte_size(ValueNul) - 1,
            case ValueNul of
                <<Value:Size/binary, 0>> ->
                    case {lists:member(Key, Keys), json_valid(Value)} of
                        {false, true} -> xattr_pairs(Rest, [Key | Keys]);
                        {true, _} -> {error, {xattr_blob, {duplicate_key, Key}}};
                        {false, false} -> {error, {xattr_blob, {value_not_json, Key}}}
                    end;
                _ ->
                    {error, {xattr_blob, {bad_pair, Key}}}
            end;
        _ ->
            {error, {xattr_blob, bad_pair}}
    end;
xattr_pairs(_Bin, _Keys) ->
    {error, {xattr_blob, bad_length}}.

%% parseFrameExtras: each frame info known and well formed; a DCP stream id on a consumer
%% connection is refused later (`dcp_restrictions/3').
framing_extras(#{framing_extras := Infos}) ->
    frame_infos(Infos);
framing_extras(_Frame) ->
    ok.

frame_infos([]) -> ok;
frame_infos([{Id, Data} | Rest]) -> ?THEN(frame_info(Id, Data), frame_infos(Rest)).

frame_info(?FI_BARRIER, <<>>) -> ok;
frame_info(?FI_BARRIER, _) -> {error, {frame_info, barrier, has_value}};
%% no DCP or handshake command takes a durability requirement or preserve-ttl
frame_info(?FI_DURABILITY, _) -> {error, {frame_info, durability_requirement, not_supported}};
frame_info(?FI_STREAM_ID, <<_:16>>) -> ok;
frame_info(?FI_STREAM_ID, Data) -> {error, {frame_info, dcp_stream_id, {size, byte_size(Data)}}};
frame_info(?FI_IMPERSONATE, <<>>) -> {error, {frame_info, impersonate, empty}};
frame_info(?FI_IMPERSONATE, _) -> ok;
frame_info(?FI_PRESERVE_TTL, _) -> {error, {frame_info, preserve_ttl, not_supported}};
frame_info(?FI_EXTRA_PRIVILEGE, <<>>) -> {error, {frame_info, impersonate_extra_privilege, empty}};
frame_info(?FI_EXTRA_PRIVILEGE, _) -> ok;
frame_info(?FI_TOKEN_AUTH_ID, <<_:16>>) -> ok;
frame_info(?FI_TOKEN_AUTH_ID, Data) ->
    {error, {frame_info, impersonate_with_token_auth_data_id, {size, byte_size(Data)}}};
frame_info(Id, _) -> {error, {frame_info, {unknown, Id}}}.

%% McbpValidator::is_document_key_valid: only with collections on.
document_key(false, _Key, _Context) ->
    ok;
document_key(true, Key, Context) ->
    case feature(collections, Context) of
        false -> ok;
        true -> collection_key(Key)
    end.

collection_key(Key) when byte_size(Key) =< 1 ->
    {error, {collection_key, too_short}};
collection_key(Key) ->
    case leb128(Key, 0, 0, 0) of
        {ok, Cid, Logical} when Cid >= 1, Cid =< 7 ->
            _ = Logical,
            {error, {collection_key, {reserved_collection, Cid}}};
        {ok, _Cid, <<>>} ->
            {error, {collection_key, no_logical_key}};
        {ok, Cid, Logical} ->
            Max = case Cid of
                      0 -> ?MAX_KEY;
                      _ -> ?MAX_LOGICAL_KEY_NON_DEFAULT
                  end,
            case byte_size(Logical) =< Max of
                true -> ok;
                false -> {error, {collection_key, {logical_key_too_long, byte_size(Logical), Max}}}
            end;
        {error, Why} ->
            {error, {collection_key, Why}}
    end.

%% An unsigned LEB128 u32 (at most 5 bytes), canonical: no redundant last byte (a zero stop byte
%% after the first).
leb128(<<1:1, Low:7, Rest/binary>>, Shift, Acc, N) when N < 4 ->
    leb128(Rest, Shift + 7, Acc bor (Low bsl Shift), N + 1);
leb128(<<0:1, 0:7, _/binary>>, _Shift, _Acc, N) when N > 0 ->
    {error, non_canonical_leb128};
leb128(<<0:1, Low:7, Rest/binary>>, Shift, Acc, _N) ->
    case Acc bor (Low bsl Shift) of
        Cid when Cid =< 16#ffffffff -> {ok, Cid, Rest};
        _ -> {error, leb128_exceeds_32_bits}
    end;
leb128(_Bin, _Shift, _Acc, _N) ->
    {error, no_stop_byte}.

%% ---- each opcode's own rules ----

specific(?HELLO, #{value := Value}, _C) when byte_size(Value) rem 2 =/= 0 ->
    {error, {value_length, byte_size(Value), expected, even}};
specific(?STAT, #{value := Value, datatype := D}, _C) when Value =/= <<>> ->
    case D band ?JSON =/= 0 andalso json_valid(Value) of
        true -> ok;
        false when D band ?JSON =:= 0 -> {error, {value_datatype, D, expected, json}};
        false -> {error, value_not_json}
    end;
specific(?DCP_OPEN, Frame, _C) ->
    open(Frame);
specific(Op, #{extras := <<Flags:32, _/binary>>}, _C)
  when Op =:= ?DCP_ADD_STREAM; Op =:= ?DCP_STREAM_REQ ->
    stream_flags(Flags);
specific(?DCP_SYSTEM_EVENT, #{extras := <<_Seqno:64, Event:32, Version:8>>}, _C) ->
    %% begin collection, end collection, create scope, drop scope, modify collection; versions 0..2
    case {lists:member(Event, [0, 1, 3, 4, 5]), Version =< 2} of
        {true, true} -> ok;
        {false, _} -> {error, {system_event_id, Event}};
        {true, false} -> {error, {system_event_version, Version}}
    end;
specific(?DCP_MUTATION, #{extras := <<Seqno:64, _:20/binary, NMeta:16, _Nru:8>>}, _C) ->
    if
        Seqno =:= 0 -> {error, {by_seqno, 0}};
        NMeta =/= 0 -> {error, {nmeta, NMeta}};
        true -> ok
    end;
specific(?DCP_DELETION, #{extras := Extras, datatype := D}, _C) ->
    %% MB-29040 / MB-31141: the datatypes a deletion may carry
    case lists:member(D, [?RAW, ?RAW bor ?SNAPPY, ?XATTR, ?XATTR bor ?SNAPPY, ?XATTR bor ?JSON,
                          ?XATTR bor ?SNAPPY bor ?JSON]) of
        false -> {error, {deletion_datatype, D}};
        true ->
            case Extras of
                <<_:16/binary, NMeta:16>> when NMeta =/= 0 -> {error, {nmeta, NMeta}};
                _ -> ok
            end
    end;
specific(?DCP_SET_VBUCKET_STATE, #{extras := <<State>>}, _C) when State < 1; State > 4 ->
    {error, {vbucket_state, State}};
specific(?DCP_PREPARE, #{extras := <<Seqno:64, _:22/binary, Level:8>>}, _C) ->
    if
        Seqno =:= 0 -> {error, {by_seqno, 0}};
        Level < 1; Level > 3 -> {error, {durability_level, Level}};
        true -> ok
    end;
specific(_Op, _Frame, _C) ->
    ok.

%% dcp_open_validator: known flags in sound combinations; an empty value with datatype raw, or a
%% JSON object (datatype JSON) whose only member may be a `consumer_name' string, on a consumer.
open(#{extras := <<_Seqno:32, Flags:32>>, value := Value, datatype := D}) ->
    Producer = Flags band ?OPEN_PRODUCER =/= 0,
    if
        Flags band bnot ?OPEN_KNOWN =/= 0 ->
            {error, {open_flags, unknown, Flags band bnot ?OPEN_KNOWN}};
        Flags band ?OPEN_SKIP_DELETES =/= 0, not Producer ->
            {error, {open_flags, skip_deletes_in_initial_backfill_on_a_consumer}};
        Flags band ?OPEN_NO_VALUE =/= 0, Flags band ?OPEN_NO_VALUE_WITH_DATATYPE =/= 0 ->
            {error, {open_flags, no_value_with_no_value_with_underlying_datatype}};
        Flags band ?OPEN_DEL_USER_XATTR =/= 0, Flags band ?OPEN_XATTR =:= 0 ->
            {error, {open_flags, include_deleted_user_xattrs_without_include_xattrs}};
        Value =:= <<>>, D =/= ?RAW ->
            {error, {value_datatype, D, expected, raw}};
        Value =:= <<>> ->
            ok;
        D =/= ?JSON ->
            {error, {value_datatype, D, expected, json}};
        true ->
            case json(Value) of
                {ok, {object, Members}} -> open_members(Members, Producer);
                {ok, _} -> {error, value_not_a_json_object};
                error -> {error, value_not_json}
            end
    end.

open_members([], _Producer) -> ok;
open_members([{<<"consumer_name">>, _} | _], true) -> {error, consumer_name_on_a_producer};
open_members([{<<"consumer_name">>, Name} | Rest], false) when is_binary(Name) ->
    open_members(Rest, false);
open_members([{<<"consumer_name">>, _} | _], false) -> {error, consumer_name_not_a_string};
open_members([{Key, _} | _], _Producer) -> {error, {unsupported_json_property, Key}}.

%% verify_common_dcp_stream_restrictions
stream_flags(Flags) when Flags band bnot ?STREAM_KNOWN =/= 0 ->
    case Flags band ?STREAM_NO_VALUE of
        0 -> {error, {stream_flags, unknown, Flags band bnot ?STREAM_KNOWN}};
        _ -> {error, {stream_flags, no_value_is_no_longer_used}}
    end;
stream_flags(Flags) when Flags band ?STREAM_CACHE_TRANSFER =/= 0,
                         Flags band bnot (?STREAM_CACHE_TRANSFER bor ?STREAM_TAKEOVER
                                          bor ?STREAM_ACTIVE_VB_ONLY) =/= 0 ->
    {error, {stream_flags, cache_transfer_combined_with, Flags}};
stream_flags(_Flags) ->
    ok.

%% verify_common_dcp_restrictions
dcp_restrictions(Op, Frame, Context) when Op >= ?DCP_OPEN, Op =< ?DCP_ABORT ->
    #{dcp := Dcp} = Context,
    StreamId = lists:keymember(?FI_STREAM_ID, 1, maps:get(framing_extras, Frame, [])),
    if
        Dcp =:= consumer, StreamId ->
            case maps:get(accept_alt_requests, Context, false) of
                true -> open_state(Op, Dcp);
                false -> {error, stream_id_on_a_consumer}
            end;
        true ->
            open_state(Op, Dcp)
    end;
dcp_restrictions(_Op, _Frame, _Context) ->
    ok.

open_state(?DCP_OPEN, none) -> ok;
open_state(?DCP_OPEN, _) -> {error, already_a_dcp_connection};
open_state(?DCP_GET_FAILOVER_LOG, _) -> ok;
open_state(_Op, none) -> {error, not_a_dcp_connection};
open_state(_Op, _) -> ok.

%% ---- responses ----

%% What memcached does with a response from its peer: none before authentication; NOOP's anywhere;
%% the DCP ones (and GET_ERROR_MAP's) on a DCP connection, by what it is; any other is unsupported.
response(#{opcode := Op} = Frame, Context) ->
    Dcp = dcp_response_opcode(Op),
    case Context of
        #{authenticated := false} -> {error, not_authenticated};
        _ when Op =:= ?NOOP -> ok;
        _ when not Dcp -> {error, unsupported_response};
        #{dcp := none} -> {error, not_a_dcp_connection};
        #{dcp := consumer} -> consumer_response(Op, Frame);
        #{dcp := producer} -> producer_response(Op, Frame)
    end.

dcp_response_opcode(Op) ->
    (Op >= ?DCP_OPEN andalso Op =< ?DCP_ABORT andalso Op =/= 16#5a)
        orelse Op =:= 16#66 orelse Op =:= 16#67 orelse Op =:= ?GET_ERROR_MAP.

%% DcpConsumer::handleResponse: the answers to its own stream requests, controls, buffer and seqno
%% acknowledgements; a stream request's rollback carries a u64 seqno, its success a failover log.
consumer_response(?DCP_STREAM_REQ, #{status := ?ROLLBACK, value := Value}) ->
    case byte_size(Value) of
        8 -> ok;
        N -> {error, {rollback_value_length, N, expected, 8}}
    end;
consumer_response(?DCP_STREAM_REQ, #{status := ?SUCCESS, value := Value}) ->
    case byte_size(Value) of
        N when N > 0, N rem 16 =:= 0 -> ok;
        N -> {error, {failover_log_length, N}}
    end;
consumer_response(Op, _Frame)
  when Op =:= ?DCP_STREAM_REQ; Op =:= ?DCP_BUFFER_ACK; Op =:= ?DCP_CONTROL;
       Op =:= ?DCP_SEQNO_ACKNOWLEDGED ->
    ok;
consumer_response(_Op, _Frame) ->
    {error, unknown_response_on_a_consumer}.

%% DcpProducer::handleResponse: any status of a vbucket state or snapshot marker answer; a stream
%% end's success or key_enoent; the others' success, or a status that concerns one stream only
%% (not_my_vbucket, dcp_stream_not_found, opaque_no_match, and without v7 status codes key_eexists and,
%% but for commit and abort, key_enoent). A seqno acknowledgement answer is not a producer's.
producer_response(Op, _Frame) when Op =:= ?DCP_SET_VBUCKET_STATE; Op =:= ?DCP_SNAPSHOT_MARKER;
                                   Op =:= ?DCP_NOOP ->
    ok;
producer_response(?DCP_STREAM_END, #{status := S}) when S =:= ?SUCCESS; S =:= ?KEY_ENOENT ->
    ok;
producer_response(?DCP_SEQNO_ACKNOWLEDGED, _Frame) ->
    {error, unknown_response_on_a_producer};
producer_response(_Op, #{status := ?SUCCESS}) ->
    ok;
producer_response(Op, #{status := S}) ->
    Tolerated = S =:= ?NOT_MY_VBUCKET orelse S =:= 16#0a orelse S =:= 16#0b
        orelse S =:= ?KEY_EEXISTS
        orelse (S =:= ?KEY_ENOENT andalso Op =/= ?DCP_COMMIT andalso Op =/= ?DCP_ABORT),
    case Tolerated of
        true -> ok;
        false -> {error, {status, mcbp:status_name(S)}}
    end.

%% ---- the connection ----

feature(Name, #{features := Features}) ->
    lists:member(Name, Features).

delete_v2(#{open_flags := Flags} = Context) ->
    feature(collections, Context) orelse Flags band ?OPEN_DEL_TIMES =/= 0.

%% @doc The `consumer_name' of a DCP_OPEN that passed `check/2' (its JSON value), `undefined' when it
%% names none.
-spec consumer_name(map()) -> binary() | undefined.
consumer_name(#{value := Value}) ->
    case json(Value) of
        {ok, {object, Members}} ->
            case lists:keyfind(<<"consumer_name">>, 1, Members) of
                {_, Name} when is_binary(Name) -> Name;
                _ -> undefined
            end;
        _ ->
            undefined
    end.

%% ---- JSON (RFC 8259), as much as the checks need: objects keep their members ----

json_valid(Bin) ->
    json(Bin) =/= error.

%% `{ok, Term}' for a whole JSON text: `{object, [{Key, Value}]}', `{array, [Value]}', a binary, a
%% number, `true', `false' or `null'; `error' for anything else.
json(Bin) ->
    try value(ws(Bin)) of
        {Term, Rest} ->
            case ws(Rest) of
                <<>> -> {ok, Term};
                _ -> error
            end
    catch
        throw:bad_json -> error
    end.

value(<<"{", Rest/binary>>) -> object(ws(Rest), []);
value(<<"[", Rest/binary>>) -> array(ws(Rest), []);
value(<<"\"", Rest/binary>>) -> string(Rest, []);
value(<<"true", Rest/binary>>) -> {true, Rest};
value(<<"false", Rest/binary>>) -> {false, Rest};
value(<<"null", Rest/binary>>) -> {null, Rest};
value(<<C, _/binary>> = Bin) when C =:= $-; C >= $0, C =< $9 -> number(Bin);
value(_) -> throw(bad_json).

object(<<"}", Rest/binary>>, []) ->
    {{object, []}, Rest};
object(<<"\"", Bin/binary>>, Acc) ->
    {Key, AfterKey} = string(Bin, []),
    case ws(AfterKey) of
        <<":", AfterColon/binary>> ->
            {Value, AfterValue} = value(ws(AfterColon)),
            case ws(AfterValue) of
                <<",", More/binary>> -> object(ws(More), [{Key, Value} | Acc]);
                <<"}", Rest/binary>> -> {{object, lists:reverse([{Key, Value} | Acc])}, Rest};
                _ -> throw(bad_json)
            end;
        _ ->
            throw(bad_json)
    end;
object(_, _) ->
    throw(bad_json).

array(<<"]", Rest/binary>>, []) ->
    {{array, []}, Rest};
array(Bin, Acc) ->
    {Value, After} = value(Bin),
    case ws(After) of
        <<",", More/binary>> -> array(ws(More), [Value | Acc]);
        <<"]", Rest/binary>> -> {{array, lists:reverse([Value | Acc])}, Rest};
        _ -> throw(bad_json)
    end.

string(<<"\"", Rest/binary>>, Acc) ->
    {iolist_to_binary(lists:reverse(Acc)), Rest};
string(<<"\\u", Hex:4/binary, Rest/binary>>, Acc) ->
    case lists:all(fun is_hex/1, binary_to_list(Hex)) of
        true -> string(Rest, [<<"\\u", Hex/binary>> | Acc]);
        false -> throw(bad_json)
    end;
string(<<"\\", C, Rest/binary>>, Acc)
  when C =:= $"; C =:= $\\; C =:= $/; C =:= $b; C =:= $f; C =:= $n; C =:= $r; C =:= $t ->
    string(Rest, [unescape(C) | Acc]);
string(<<C, _/binary>>, _Acc) when C < 16#20; C =:= $\\ ->
    throw(bad_json);
string(<<C, Rest/binary>>, Acc) ->
    string(Rest, [C | Acc]);
string(<<>>, _Acc) ->
    throw(bad_json).

is_hex(C) -> (C >= $0 andalso C =< $9) orelse (C >= $a andalso C =< $f) orelse (C >= $A andalso C =< $F).

unescape($b) -> $\b;
unescape($f) -> $\f;
unescape($n) -> $\n;
unescape($r) -> $\r;
unescape($t) -> $\t;
unescape(C) -> C.

%% -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?
number(<<"-", Rest/binary>>) -> int(Rest);
number(Bin) -> int(Bin).

int(<<"0", Rest/binary>>) -> frac(Rest);
int(<<C, Rest/binary>>) when C >= $1, C =< $9 -> frac(digits(Rest));
int(_) -> throw(bad_json).

frac(<<".", C, Rest/binary>>) when C >= $0, C =< $9 -> exp(digits(Rest));
frac(<<".", _/binary>>) -> throw(bad_json);
frac(Bin) -> exp(Bin).

exp(<<E, Rest/binary>>) when E =:= $e; E =:= $E ->
    case Rest of
        <<S, C, More/binary>> when (S =:= $+ orelse S =:= $-), C >= $0, C =< $9 -> {number, digits(More)};
        <<C, More/binary>> when C >= $0, C =< $9 -> {number, digits(More)};
        _ -> throw(bad_json)
    end;
exp(Bin) ->
    {number, Bin}.

digits(<<C, Rest/binary>>) when C >= $0, C =< $9 -> digits(Rest);
digits(Bin) -> Bin.

ws(<<C, Rest/binary>>) when C =:= $\s; C =:= $\t; C =:= $\n; C =:= $\r -> ws(Rest);
ws(Bin) -> Bin.
