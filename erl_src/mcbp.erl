%% @doc The memcached binary protocol / DCP codec and the cut-through frame splitter.
%% A thin layer over the Rust NIF (native/mcbp, native/dcp_nif/src/codec.rs).
-module(mcbp).

-export([decode/1, encode/1, dcp_fields/1, decode_event/1,
         splitter_new/1, feed/2, feed_with_remaining/2, splitter_stats/1,
         default_max_frame_size/0,
         names/1, name/2, code/2, status_name/1, opcode_name/1]).

-export_type([magic/0, frame/0, frame_spec/0, reason/0, stream_end_reason/0,
              vbucket_state/0, event/0, splitter/0, splitter_opts/0, stats/0]).

-type magic() :: req | res | alt_req | alt_res | server_req | server_res.
-type u8() :: 0..16#ff.
-type u16() :: 0..16#ffff.
-type u32() :: 0..16#ffffffff.
-type u64() :: 0..16#ffffffffffffffff.

%% A decoded frame: `vbucket' for requests, `status' for responses.
-type frame() :: #{magic := magic(),
                   opcode := u8(),
                   opcode_name := atom(),
                   datatype := u8(),
                   vbucket => u16(),
                   status => u16(),
                   opaque := u32(),
                   cas := u64(),
                   framing_extras := [{non_neg_integer(), binary()}],
                   extras := binary(),
                   key := binary(),
                   value := binary()}.

%% What `encode/1' takes: a frame, or a sparser map (missing fields are 0 or empty, the opcode
%% may be its name, binaries may be iodata). `opcode_name' is ignored.
-type frame_spec() :: #{magic := magic(),
                        opcode := u8() | atom(),
                        opcode_name => atom(),
                        datatype => u8(),
                        vbucket => u16(),
                        status => u16(),
                        opaque => u32(),
                        cas => u64(),
                        framing_extras => [{non_neg_integer(), binary()}],
                        extras => iodata(),
                        key => iodata(),
                        value => iodata()}.

-type reason() :: {bad_magic, u8()}
                | {frame_too_large, non_neg_integer(), non_neg_integer()}
                | {bad_lengths, #{framing := non_neg_integer(), extras := non_neg_integer(),
                                  key := non_neg_integer(), body := non_neg_integer()}}
                | {bad_framing_extras, non_neg_integer()}
                | {bad_extras, u8(), non_neg_integer()}
                | {bad_value, u8(), non_neg_integer()}
                | {failover_log_too_long, u8(), Entries :: non_neg_integer(), Max :: non_neg_integer()}.

%% The one Erlang type of a DCP_STREAM_END reason: its name (native/mcbp/src/names.rs), or
%% `{unknown, Code}' for a code without one.
-type stream_end_reason() :: ok | closed | state_changed | disconnected | too_slow
                           | backfill_fail | rollback | filter_empty | lost_privileges
                           | {unknown, non_neg_integer()}.

-type vbucket_state() :: active | replica | pending | dead | {unknown, u8()}.

%% A reported frame, decoded once by the splitter (native/mcbp/src/splitter.rs, `Event`).
%% Producer side: stream_end, set_vbucket_state, close_stream_response. Consumer side:
%% add_stream_response (StreamOpaque: the consumer's own stream opaque, `undefined' when the
%% answer has none), close_stream_response, stream_req, set_vbucket_state_response.
-type event() :: {stream_end, VBucket :: u16(), Opaque :: u32(), stream_end_reason()}
               | {add_stream_response, Opaque :: u32(), Status :: u16(), StreamOpaque :: u32() | undefined}
               | {close_stream_response, Opaque :: u32(), Status :: u16()}
               | {stream_req, VBucket :: u16(), Opaque :: u32()}
               | {set_vbucket_state, VBucket :: u16(), Opaque :: u32(), vbucket_state()}
               | {set_vbucket_state_response, Opaque :: u32(), Status :: u16()}.

-opaque splitter() :: reference().

-type splitter_opts() :: #{side := consumer | producer, max_frame_size => pos_integer()}.

-type stats() :: #{frames := non_neg_integer(),
                   bytes := non_neg_integer(),
                   forwarded_frames := non_neg_integer(),
                   blocked_frames := non_neg_integer(),
                   reported_frames := non_neg_integer(),
                   largest_frame := non_neg_integer(),
                   held_bytes := non_neg_integer(),
                   forward_remaining := non_neg_integer(),
                   by_opcode := #{atom() | {unknown, u8()} =>
                                      #{frames := non_neg_integer(),
                                        bytes := non_neg_integer()}}}.

-define(HEADER_LEN, 24).
%% The body length is a u32.
-define(MAX_MAX_FRAME_SIZE, 16#ffffffff + ?HEADER_LEN).
%% Values up to this size are copied behind the head into one binary (a few microseconds at most);
%% larger ones are appended uncopied.
-define(COPY_VALUE_MAX, 65536).

%% @doc Decodes the frame at the front of `Bin'. Large extras, keys and values are sub-binaries
%% of `Bin'. `{more, N}': at least N more bytes are needed. Header errors are reported as soon as
%% the header is complete.
-spec decode(binary()) -> {ok, frame(), Rest :: binary()} | {more, pos_integer()}
                              | {error, reason()}.
decode(Bin) when is_binary(Bin) ->
    dcp_nif:decode(Bin).

%% @doc Encodes a frame; `decode(iolist_to_binary(encode(F)))' gives `F' back.
%% The NIF encodes the header, framing extras, extras and key (at most 64 KiB and some) and never
%% sees the value: a value up to 64 KiB is copied after them into one binary, a larger
%% one is appended as it is, `[Head, Value]', so a 30 MiB encode
%% costs what a small one does. Raises `error({bad_frame, Why})' for a map that cannot be
%% encoded (`{body_too_large, Len}' beyond the u32 body length).
-spec encode(frame_spec()) -> iodata().
encode(Frame) when is_map(Frame) ->
    {Value, Size, Rest} = value_part(Frame),
    Head = case dcp_nif:encode_head(flatten_part(key, flatten_part(extras, Rest)), Size) of
               Bin when is_binary(Bin) -> Bin;
               {error, Why} -> error({bad_frame, Why})
           end,
    if
        Size =:= 0 -> Head;
        Size > ?COPY_VALUE_MAX -> [Head, Value];
        is_binary(Value) -> <<Head/binary, Value/binary>>;
        true -> iolist_to_binary([Head, Value])
    end;
encode(Other) ->
    error({bad_frame, {not_a_map, Other}}).

%% The value, its size and the map for the NIF, which does not use the map's `value' (an iolist
%% is taken out, so that the NIF does not even read it).
value_part(#{value := Value} = Frame) when is_binary(Value) ->
    {Value, byte_size(Value), Frame};
value_part(#{value := Value} = Frame) ->
    try
        {Value, iolist_size(Value), maps:remove(value, Frame)}
    catch
        error:badarg -> error({bad_frame, {bad_field, value}})
    end;
value_part(Frame) ->
    {<<>>, 0, Frame}.

%% Only the two small iodata parts (a key fits 16 bits, extras 8) are flattened; a simulated
%% node encodes a frame per mutation, so the other fields are not visited.
flatten_part(Part, Frame) ->
    case Frame of
        #{Part := Data} when is_list(Data) ->
            try
                Frame#{Part := iolist_to_binary(Data)}
            catch
                error:badarg -> error({bad_frame, {bad_field, Part}})
            end;
        _ ->
            Frame
    end.

%% @doc The extras (and fixed-layout values) of a DCP frame by name, e.g. `#{reason => closed}'
%% for a stream end. Non-DCP frames give `#{}'.
-spec dcp_fields(frame() | frame_spec()) -> map() | {error, reason() | term()}.
dcp_fields(Frame) when is_map(Frame) ->
    dcp_nif:dcp_fields(Frame).

%% @doc A splitter for the bytes read from one memcached (`side'). Frames larger than
%% `max_frame_size' bytes (header included; default `default_max_frame_size/0') are refused.
-spec splitter_new(splitter_opts()) -> splitter().
splitter_new(#{side := Side} = Opts) ->
    case Side of
        consumer -> ok;
        producer -> ok;
        _ -> error({badarg, {side, Side, expected_consumer_or_producer}})
    end,
    Max = case Opts of
              #{max_frame_size := M} -> M;
              _ -> default_max_frame_size()
          end,
    case is_integer(Max) andalso Max >= ?HEADER_LEN andalso Max =< ?MAX_MAX_FRAME_SIZE of
        true -> ok;
        false -> error({badarg, {max_frame_size, Max, {between, ?HEADER_LEN, ?MAX_MAX_FRAME_SIZE}}})
    end,
    case maps:keys(maps:without([side, max_frame_size], Opts)) of
        [] -> ok;
        Unknown -> error({badarg, {unknown_options, Unknown}})
    end,
    dcp_nif:splitter_new(Side, Max);
splitter_new(Opts) ->
    error({badarg, {splitter_opts, Opts, side_required}}).

%% @doc Takes the next socket chunk: `Forward' is what to write to the partner socket (sub-binaries
%% of `Chunk'), `Events' the frames this side reports, in stream order. After an error the
%% splitter stays failed.
-spec feed(splitter(), binary()) -> {ok, Forward :: iodata(), Events :: [event()]}
                                        | {error, reason()}.
feed(Splitter, Chunk) when is_binary(Chunk) ->
    feed(Splitter, Chunk, 0, [], []).

%% The NIF stops after about 1 ms of work; carry on from where it stopped.
feed(Splitter, Chunk, Offset, ForwardAcc, EventAcc) ->
    case dcp_nif:feed(Splitter, Chunk, Offset) of
        {ok, Forward, Events} when ForwardAcc =:= [] ->
            {ok, Forward, Events};
        {ok, Forward, Events} ->
            {ok, lists:reverse(ForwardAcc, [Forward]),
             lists:append(lists:reverse(EventAcc, [Events]))};
        {continue, Next, Forward, Events} ->
            feed(Splitter, Chunk, Next, [Forward | ForwardAcc], [Events | EventAcc]);
        {error, _} = Error ->
            Error
    end.

%% @doc As `feed/2', plus the bytes of the frame being forwarded still to come (0 at a frame
%% boundary; `splitter_stats/1''s `forward_remaining'), without building the stats map: the
%% proxy's hot path.
-spec feed_with_remaining(splitter(), binary()) ->
          {ok, Forward :: iodata(), Events :: [event()], ForwardRemaining :: non_neg_integer()}
              | {error, reason()}.
feed_with_remaining(Splitter, Chunk) ->
    case feed(Splitter, Chunk) of
        {ok, Forward, Events} ->
            {ok, Forward, Events, dcp_nif:splitter_forward_remaining(Splitter)};
        {error, _} = Error ->
            Error
    end.

%% @doc The event the splitter reports for the whole frame at the front of `Bin' (for a caller
%% that holds whole frames, such as the pure-Erlang baseline splitter); `undefined' for a frame
%% no side reports.
-spec decode_event(binary()) -> {ok, event()} | undefined | {more, pos_integer()}
                                    | {error, reason()}.
decode_event(Bin) when is_binary(Bin) ->
    dcp_nif:decode_event(Bin).

%% @doc The one default max frame size (30 MiB, memcached's max_packet_size), defined in
%% native/mcbp/src/header.rs.
-spec default_max_frame_size() -> pos_integer().
default_max_frame_size() ->
    dcp_nif:default_max_frame_size().

%% @doc Frames and bytes per opcode, forwarded / blocked / reported counts, the largest frame and
%% the bytes held for an incomplete header or reported frame.
-spec splitter_stats(splitter()) -> stats().
splitter_stats(Splitter) ->
    dcp_nif:splitter_stats(Splitter).

%% @doc One protocol name table, `[{Code, Name}]' ascending (native/mcbp/src/names.rs, the only
%% copy; include/mcbp.hrl names some of its codes for patterns).
-spec names(dcp_nif:name_kind()) -> [{non_neg_integer(), atom()}].
names(Kind) ->
    dcp_nif:names(Kind).

%% @doc A code's name in a table, `{unknown, Code}' when it has none.
-spec name(dcp_nif:name_kind(), non_neg_integer()) -> atom() | {unknown, non_neg_integer()}.
name(Kind, Code) when is_integer(Code), Code >= 0 ->
    dcp_nif:name_of(Kind, Code).

%% @doc A name's code in a table, `undefined' when the table has no such name.
-spec code(dcp_nif:name_kind(), atom()) -> non_neg_integer() | undefined.
code(Kind, Name) when is_atom(Name) ->
    dcp_nif:code_of(Kind, Name).

%% @doc The name of a response status (`success', `key_enoent', ...) or `{unknown, N}'.
-spec status_name(u16()) -> atom() | {unknown, u16()}.
status_name(Status) when is_integer(Status), Status >= 0, Status =< 16#ffff ->
    dcp_nif:name_of(status, Status).

%% @doc The name of a client opcode (`dcp_mutation', `hello', ...) or `unknown'.
-spec opcode_name(u8()) -> atom().
opcode_name(Opcode) when is_integer(Opcode), Opcode >= 0, Opcode =< 16#ff ->
    case dcp_nif:name_of(opcode, Opcode) of
        {unknown, _} -> unknown;
        Name -> Name
    end.
