%% @doc The splitter interface of dcp_proxy: what a connection needs from the code that cuts the
%% bytes read from one memcached into frames to forward and frames to report. Implemented by
%% `dcp_splitter_mcbp' (the NIF, the default) and by bench/dcp_baseline_splitter (ns_server's loop).
-module(dcp_splitter).

-export([new/3, feed/2, stats/1]).

-export_type([option/0, side/0, splitter/0]).

-type side() :: consumer | producer.
%% `nif', or `{Module, Args}': Module implements this behaviour and gets `Args' plus
%% `max_frame_size' when the connection was given one.
-type option() :: nif | {module(), map()}.
-opaque splitter() :: {module(), term()}.

%% A splitter for the bytes read from `Side''s memcached. `Opts' may hold `max_frame_size'
%% (header included); a bad option raises.
-callback new(Side :: side(), Opts :: map()) -> State :: term().
%% `Forward' is what to write to the partner's socket, `Events' the reported frames in stream
%% order (passed to the side module as they are), `ForwardRemaining' the bytes of the frame being
%% cut through that are not forwarded yet (0 at a frame boundary). An error means the stream cannot
%% be resynchronised.
-callback feed(State :: term(), Chunk :: binary()) ->
    {ok, Forward :: iodata(), Events :: [term()], ForwardRemaining :: non_neg_integer(),
     State :: term()}
        | {error, Reason :: term()}.
-callback stats(State :: term()) -> map().

%% @doc The splitter chosen by `Option', with `Opts' (`max_frame_size') for its `new/2'.
-spec new(side(), option(), map()) -> {ok, splitter()} | {error, {bad_splitter_option, term()}}.
new(Side, nif, Opts) ->
    new(Side, {dcp_splitter_mcbp, #{}}, Opts);
new(Side, {Module, Args}, Opts) when is_atom(Module), is_map(Args) ->
    {ok, {Module, Module:new(Side, maps:merge(Args, Opts))}};
new(_Side, Other, _Opts) ->
    {error, {bad_splitter_option, Other}}.

-spec feed(splitter(), binary()) ->
          {ok, iodata(), [term()], non_neg_integer(), splitter()} | {error, term()}.
feed({Module, State}, Chunk) ->
    case Module:feed(State, Chunk) of
        {ok, Forward, Events, Remaining, State1} ->
            {ok, Forward, Events, Remaining, {Module, State1}};
        {error, _} = Error ->
            Error
    end.

-spec stats(splitter()) -> map().
stats({Module, State}) ->
    Module:stats(State).
