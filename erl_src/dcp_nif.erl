%% @doc The NIF loader and its stubs, nothing else. Callers use `mcbp' and the connection modules.
-module(dcp_nif).

-on_load(init/0).

%% Codec (native/dcp_nif/src/codec.rs)
-export([decode/1, encode/1, dcp_fields/1,
         splitter_new/2, feed/3, splitter_stats/1]).

%% Stream-setup machine (native/dcp_nif/src/setup.rs)
-export([setup_new/0, setup_begin/2, setup_add_stream_response/3,
         setup_close_stream_response/4, setup_stream_end/4,
         setup_takeover_begin/2, setup_stream_req/3, setup_set_vbucket_state/3,
         setup_set_vbucket_state_response/3, setup_maybe_close_stream/2, setup_shut/1,
         setup_deadline/1, setup_connection_lost/2, setup_partitions/1, setup_info/1]).

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

%% ---- stream-setup machine ----
setup_new() -> ?NOT_LOADED.
setup_begin(_Setup, _VBuckets) -> ?NOT_LOADED.
setup_add_stream_response(_Setup, _Opaque, _Status) -> ?NOT_LOADED.
setup_close_stream_response(_Setup, _Side, _Opaque, _Status) -> ?NOT_LOADED.
setup_stream_end(_Setup, _VBucket, _Opaque, _Reason) -> ?NOT_LOADED.
setup_takeover_begin(_Setup, _VBucket) -> ?NOT_LOADED.
setup_stream_req(_Setup, _VBucket, _Opaque) -> ?NOT_LOADED.
setup_set_vbucket_state(_Setup, _Opaque, _State) -> ?NOT_LOADED.
setup_set_vbucket_state_response(_Setup, _Opaque, _Status) -> ?NOT_LOADED.
setup_maybe_close_stream(_Setup, _VBucket) -> ?NOT_LOADED.
setup_shut(_Setup) -> ?NOT_LOADED.
setup_deadline(_Setup) -> ?NOT_LOADED.
setup_connection_lost(_Setup, _Reason) -> ?NOT_LOADED.
setup_partitions(_Setup) -> ?NOT_LOADED.
setup_info(_Setup) -> ?NOT_LOADED.
