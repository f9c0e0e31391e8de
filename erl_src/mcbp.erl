%% @doc The memcached binary protocol / DCP codec and the cut-through frame splitter.
%% A thin layer over the Rust NIF (native/mcbp, native/dcp_nif/src/codec.rs).
-module(mcbp).

-export([decode/1, encode/1, dcp_fields/1,
         splitter_new/1, feed/2, splitter_stats/1,
         status_name/1, opcode_name/1]).

-export_type([magic/0, frame/0, frame_spec/0, reason/0, stream_end_reason/0,
              event/0, splitter/0, splitter_opts/0, stats/0]).

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
                | {bad_value, u8(), non_neg_integer()}.

-type stream_end_reason() :: ok | closed | state_changed | disconnected | too_slow
                           | backfill_fail | rollback | filter_empty | lost_privileges
                           | {unknown, non_neg_integer()}.

-type event() :: {stream_end, u16(), u32(), stream_end_reason()} | frame().

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

%% memcached's default max_packet_size.
-define(DEFAULT_MAX_FRAME_SIZE, 30 * 1024 * 1024).
-define(HEADER_LEN, 24).
%% The body length is a u32.
-define(MAX_MAX_FRAME_SIZE, 16#ffffffff + ?HEADER_LEN).

%% @doc Decodes the frame at the front of `Bin'. Large extras, keys and values are sub-binaries
%% of `Bin'. `{more, N}': at least N more bytes are needed. Header errors are reported as soon as
%% the header is complete.
-spec decode(binary()) -> {ok, frame(), Rest :: binary()} | {more, pos_integer()}
                              | {error, reason()}.
decode(Bin) when is_binary(Bin) ->
    dcp_nif:decode(Bin).

%% @doc Encodes a frame; `decode(iolist_to_binary(encode(F)))' gives `F' back.
%% Raises `error({bad_frame, Why})' for a map that cannot be encoded.
-spec encode(frame_spec()) -> iodata().
encode(Frame) when is_map(Frame) ->
    case dcp_nif:encode(flatten_part(value, flatten_part(key, flatten_part(extras, Frame)))) of
        Bin when is_binary(Bin) ->
            Bin;
        {error, Why} ->
            error({bad_frame, Why})
    end;
encode(Other) ->
    error({bad_frame, {not_a_map, Other}}).

%% Only the three iodata parts can need it; a simulated node encodes a frame per mutation, so the
%% other fields are not visited.
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
%% `max_frame_size' bytes (header included; default 30 MiB) are refused.
-spec splitter_new(splitter_opts()) -> splitter().
splitter_new(#{side := Side} = Opts) ->
    case Side of
        consumer -> ok;
        producer -> ok;
        _ -> error({badarg, {side, Side, expected_consumer_or_producer}})
    end,
    Max = maps:get(max_frame_size, Opts, ?DEFAULT_MAX_FRAME_SIZE),
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

%% @doc Frames and bytes per opcode, forwarded / blocked / reported counts, the largest frame and
%% the bytes held for an incomplete header or reported frame.
-spec splitter_stats(splitter()) -> stats().
splitter_stats(Splitter) ->
    dcp_nif:splitter_stats(Splitter).

%% @doc The name of a response status (`success', `key_enoent', ...) or `{unknown, N}'.
-spec status_name(u16()) -> atom() | {unknown, u16()}.
status_name(Status) when is_integer(Status), Status >= 0, Status =< 16#ffff ->
    dcp_nif:status_name(Status).

%% @doc The name of a client opcode (`dcp_mutation', `hello', ...) or `unknown'.
-spec opcode_name(u8()) -> atom().
opcode_name(Opcode) when is_integer(Opcode), Opcode >= 0, Opcode =< 16#ff ->
    dcp_nif:opcode_name_of(Opcode).
