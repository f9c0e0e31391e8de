%% @doc The NIF loader and its stubs, nothing else. Callers use `mcbp' and the connection modules.
-module(dcp_nif).

-on_load(init/0).

%% Codec (native/dcp_nif/src/codec.rs)
-export([decode/1, encode/1, dcp_fields/1,
         splitter_new/2, feed/3, splitter_stats/1,
         status_name/1, opcode_name_of/1]).

%% Stream-setup machine (native/dcp_nif/src/setup.rs)
-export([setup_new/0, setup_begin/2, setup_add_stream_response/3,
         setup_close_stream_response/4, setup_stream_end/4,
         setup_takeover_begin/2, setup_stream_req/3, setup_set_vbucket_state/3,
         setup_set_vbucket_state_response/3, setup_maybe_close_stream/2, setup_shut/1,
         setup_deadline/1, setup_connection_lost/2, setup_partitions/1, setup_info/1]).
-export_type([setup/0, setup_reply/0, setup_outcome/0, setup_action/0, stream_end_reason/0]).

-define(NOT_LOADED, erlang:nif_error({not_loaded, ?MODULE})).

init() ->
    erlang:load_nif(filename:join(priv_dir(), "dcp_nif"), 0).

%% code:priv_dir/1 works in a release or under rebar3; a bare `erl -pa .../ebin' falls back to ../priv.
priv_dir() ->
    case code:priv_dir(dcp_proxy) of
        {error, bad_name} ->
            filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
        Dir ->
            Dir
    end.

%% ---- codec ----
decode(_Bin) -> ?NOT_LOADED.
encode(_Frame) -> ?NOT_LOADED.
dcp_fields(_Frame) -> ?NOT_LOADED.
splitter_new(_Side, _MaxFrameSize) -> ?NOT_LOADED.
feed(_Splitter, _Chunk, _Offset) -> ?NOT_LOADED.
splitter_stats(_Splitter) -> ?NOT_LOADED.
status_name(_Status) -> ?NOT_LOADED.
opcode_name_of(_Opcode) -> ?NOT_LOADED.

%% ---- stream-setup machine ----
%% One machine per consumer connection; see docs/interfaces.md "Setup machine NIF".

-type setup() :: reference().
-type vbucket() :: 0..1023.
-type side() :: consumer | producer.
-type stream_end_reason() :: ok | closed | state_changed | disconnected | too_slow
                           | backfill_fail | rollback | filter_empty | lost_privileges
                           | {unknown, non_neg_integer()}.
-type why() :: {mcbp_status, non_neg_integer()} | {stream_end, stream_end_reason()}
             | setup_timeout | {connection_lost, term()}.
-type setup_reply() :: ok | {errors, [{why(), {vbucket, vbucket()}}]}.
-type setup_outcome() :: noreply | {reply, setup_reply()}
                       | {stop, {unexpected_response, add_stream | {close_stream, side()},
                                 non_neg_integer()}}.
-type setup_action() :: {add_stream, vbucket(), 0 | 1} | {close_stream, side(), vbucket()}.
-type setup_start() :: {send, [setup_action()]} | {reply, ok}.
-type vbucket_state() :: active | replica | pending | dead | 0..255 | {unknown, 0..255}.

-spec setup_new() -> setup().
setup_new() -> ?NOT_LOADED.
-spec setup_begin(setup(), [vbucket()]) ->
          setup_start() | {error, busy | shut | {bad_vbucket, term()}}.
setup_begin(_Setup, _VBuckets) -> ?NOT_LOADED.
-spec setup_add_stream_response(setup(), non_neg_integer(), non_neg_integer()) -> setup_outcome().
setup_add_stream_response(_Setup, _Opaque, _Status) -> ?NOT_LOADED.
-spec setup_close_stream_response(setup(), side(), non_neg_integer(), non_neg_integer()) ->
          setup_outcome().
setup_close_stream_response(_Setup, _Side, _Opaque, _Status) -> ?NOT_LOADED.
-spec setup_stream_end(setup(), 0..65535, non_neg_integer(), stream_end_reason()) ->
          setup_outcome().
setup_stream_end(_Setup, _VBucket, _Opaque, _Reason) -> ?NOT_LOADED.
-spec setup_takeover_begin(setup(), vbucket()) ->
          {send, [setup_action()]}
              | {error, busy | shut | already_active | {bad_vbucket, term()}}.
setup_takeover_begin(_Setup, _VBucket) -> ?NOT_LOADED.
-spec setup_stream_req(setup(), 0..65535, non_neg_integer()) -> noreply.
setup_stream_req(_Setup, _VBucket, _Opaque) -> ?NOT_LOADED.
-spec setup_set_vbucket_state(setup(), non_neg_integer(), vbucket_state()) -> noreply.
setup_set_vbucket_state(_Setup, _Opaque, _State) -> ?NOT_LOADED.
-spec setup_set_vbucket_state_response(setup(), non_neg_integer(), non_neg_integer()) ->
          setup_outcome().
setup_set_vbucket_state_response(_Setup, _Opaque, _Status) -> ?NOT_LOADED.
-spec setup_maybe_close_stream(setup(), vbucket()) ->
          setup_start() | {error, busy | shut | {bad_vbucket, term()}}.
setup_maybe_close_stream(_Setup, _VBucket) -> ?NOT_LOADED.
-spec setup_shut(setup()) -> setup_start() | {error, busy}.
setup_shut(_Setup) -> ?NOT_LOADED.
-spec setup_deadline(setup()) -> setup_outcome().
setup_deadline(_Setup) -> ?NOT_LOADED.
-spec setup_connection_lost(setup(), term()) -> setup_outcome().
setup_connection_lost(_Setup, _Reason) -> ?NOT_LOADED.
-spec setup_partitions(setup()) -> [vbucket()].
setup_partitions(_Setup) -> ?NOT_LOADED.
-spec setup_info(setup()) -> #{state := idle | setting_up | takeover | shut,
                               active := [vbucket()],
                               pending_adds := [vbucket()],
                               pending_closes_consumer := [vbucket()],
                               pending_closes_producer := [vbucket()] | ignore,
                               errors := [{why(), {vbucket, vbucket()}}],
                               next_state := idle | shut | undefined,
                               takeover := undefined | map(),
                               absorbed := non_neg_integer()}.
setup_info(_Setup) -> ?NOT_LOADED.
