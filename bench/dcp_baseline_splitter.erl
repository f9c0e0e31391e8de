%% @doc The pure-Erlang baseline the NIF splitter is measured against: a port, behaviour for
%% behaviour, of ns_server's `dcp_proxy:process_data' loop, with the same side policy as
%% `mcbp:feed/2'.
%%
%% Per socket chunk it does what ns_server does: append the chunk to the bytes held from the
%% previous chunk, read the body length from each 24-byte header, cut the frame off with
%% `split_binary/2', classify it by magic and opcode, and append each forwarded frame to a send
%% buffer (a list, sent as iodata at the end). A frame is only handled once it is complete, so a
%% large mutation is held and re-appended chunk after chunk: the cost the NIF's cut-through
%% forwarding avoids. Reported frames (rare) are decoded with `mcbp'; the forwarding path is pure
%% Erlang. The side policy is a local function, where ns_server makes a call into the connection
%% module for every frame, so if anything this baseline is a little faster than ns_server.
%%
%% It implements `dcp_splitter': the proxy takes it as `splitter => {dcp_baseline_splitter, Args}'
%% (Args as for `new/2', plus the connection's `max_frame_size' when it has one).
-module(dcp_baseline_splitter).

-behaviour(dcp_splitter).

-include_lib("dcp_proxy/include/mcbp.hrl").

-export([new/2, feed/2, stats/1, held_bytes/1]).

-export_type([state/0, event/0]).

-define(HEADER_LEN, 24).
%% memcached's default max_packet_size (PROTOCOL.md).

%% Client requests and responses, classic or flexible framing; server-initiated frames
%% (0x82/0x83) have their own opcode space and are never DCP.
-define(IS_REQ(M), (M =:= ?REQ orelse M =:= ?ALT_REQ)).
-define(IS_RES(M), (M =:= ?RES orelse M =:= ?ALT_RES)).
-define(IS_MAGIC(M), (?IS_REQ(M) orelse ?IS_RES(M)
                      orelse M =:= ?SERVER_REQ orelse M =:= ?SERVER_RES)).

-record(splitter, {side :: consumer | producer,
                   max_frame_size :: pos_integer(),
                   %% bytes of an incomplete frame, carried to the next chunk
                   held = <<>> :: binary()}).

-opaque state() :: #splitter{}.
%% The same events and header errors as mcbp:feed/2.
-type event() :: mcbp:event().
-type reason() :: mcbp:reason() | {bad_stream_end, term()} | {undecodable_frame, term()}.

%% What the side policy does with a frame.
-type action() :: forward | report | forward_report | stream_end.

%% @doc A splitter for one side of the proxy. `max_frame_size' defaults to 30 MiB.
-spec new(consumer | producer, #{max_frame_size => pos_integer()}) -> state().
new(Side, Opts) when Side =:= consumer; Side =:= producer ->
    case maps:get(max_frame_size, Opts, mcbp:default_max_frame_size()) of
        Max when is_integer(Max), Max >= ?HEADER_LEN ->
            #splitter{side = Side, max_frame_size = Max};
        Bad ->
            error({bad_max_frame_size, Bad})
    end.

%% @doc Takes the next socket chunk; returns the iodata to forward and the events, in stream order.
%% It forwards whole frames only, so nothing of a frame is left to forward after a feed (0).
%% An error means the stream cannot be resynchronised: the connection must close.
-spec feed(state(), binary()) -> {ok, iodata(), [event()], 0, state()} | {error, reason()}.
feed(#splitter{held = Held} = State, Chunk) when is_binary(Chunk) ->
    %% As ns_server: one binary of everything not yet handled.
    Data = <<Held/binary, Chunk/binary>>,
    split(Data, State, [], []).

%% @doc No counters: the hot loop stays ns_server's.
-spec stats(state()) -> #{}.
stats(#splitter{}) ->
    #{}.

%% @doc Bytes held for an incomplete frame.
-spec held_bytes(state()) -> non_neg_integer().
held_bytes(#splitter{held = Held}) ->
    byte_size(Held).

split(<<Magic:8, _/binary>>, _State, _Fwd, _Events) when not ?IS_MAGIC(Magic) ->
    {error, {bad_magic, Magic}};
split(<<Magic:8, Opcode:8, _:6/binary, BodyLen:32, _:12/binary, _/binary>> = Data,
      #splitter{side = Side, max_frame_size = Max} = State, Fwd, Events) ->
    FrameLen = ?HEADER_LEN + BodyLen,
    if
        FrameLen > Max ->
            {error, {frame_too_large, FrameLen, Max}};
        byte_size(Data) >= FrameLen ->
            {Frame, Rest} = split_binary(Data, FrameLen),
            case action(Side, Magic, Opcode) of
                forward ->
                    split(Rest, State, [Frame | Fwd], Events);
                Action ->
                    case event(Action, Frame) of
                        {ok, Event} when Action =:= report ->
                            split(Rest, State, Fwd, [Event | Events]);
                        {ok, Event} ->
                            split(Rest, State, [Frame | Fwd], [Event | Events]);
                        {error, _} = Error ->
                            Error
                    end
            end;
        true ->
            done(Data, State, Fwd, Events)
    end;
split(Data, State, Fwd, Events) ->
    done(Data, State, Fwd, Events).

done(Held, State, Fwd, Events) ->
    {ok, lists:reverse(Fwd), lists:reverse(Events), 0, State#splitter{held = Held}}.

%% The side policy of DESIGN.md "Events and side policies"; everything else is forwarded silently.
-spec action(consumer | producer, byte(), byte()) -> action().
action(producer, Magic, ?DCP_STREAM_END) when ?IS_REQ(Magic) -> stream_end;
action(producer, Magic, ?DCP_SET_VBUCKET_STATE) when ?IS_REQ(Magic) -> forward_report;
action(producer, Magic, ?DCP_CLOSE_STREAM) when ?IS_RES(Magic) -> report;
action(consumer, Magic, ?DCP_ADD_STREAM) when ?IS_RES(Magic) -> report;
action(consumer, Magic, ?DCP_CLOSE_STREAM) when ?IS_RES(Magic) -> report;
action(consumer, Magic, ?DCP_STREAM_REQ) when ?IS_REQ(Magic) -> forward_report;
action(consumer, Magic, ?DCP_SET_VBUCKET_STATE) when ?IS_RES(Magic) -> forward_report;
action(_Side, _Magic, _Opcode) -> forward.

%% Reported frames are rare: the one codec decodes them into the splitter's own events.
event(_Action, Frame) ->
    case mcbp:decode_event(Frame) of
        {ok, Event} -> {ok, Event};
        Other -> decode_error(Other)
    end.

%% The frame was cut by its own header, so only a codec error can land here.
decode_error({error, _} = Error) -> Error;
decode_error(Other) -> {error, {undecodable_frame, Other}}.
