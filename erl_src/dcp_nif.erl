%% @doc The NIF loader and its stubs, nothing else. Callers use `mcbp' and the connection modules.
-module(dcp_nif).

-on_load(init/0).

%% Codec and name tables (native/dcp_nif/src/codec.rs)
-export([decode/1, encode_head/2, dcp_fields/1, decode_event/1,
         splitter_new/2, feed/3, splitter_forward_remaining/1, splitter_stats/1,
         default_max_frame_size/0,
         names/1, name_of/2, code_of/2]).

%% Stream-setup machine (native/dcp_nif/src/setup.rs)
-export([setup_new/0, setup_request/2, setup_event/2, setup_partitions/1, setup_info/1]).
-export_type([setup/0, setup_request/0, setup_event/0, setup_reply/0, setup_outcome/0,
              setup_action/0, setup_start/0, name_kind/0]).

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
encode_head(_Frame, _ValueSize) -> ?NOT_LOADED.
dcp_fields(_Frame) -> ?NOT_LOADED.
decode_event(_Bin) -> ?NOT_LOADED.
splitter_new(_Side, _MaxFrameSize) -> ?NOT_LOADED.
feed(_Splitter, _Chunk, _Offset) -> ?NOT_LOADED.
splitter_forward_remaining(_Splitter) -> ?NOT_LOADED.
splitter_stats(_Splitter) -> ?NOT_LOADED.
default_max_frame_size() -> ?NOT_LOADED.

%% ---- name tables (native/mcbp/src/names.rs, the only copy) ----

-type name_kind() :: opcode | server_opcode | status | stream_end_reason | vbucket_state
                   | hello_feature.

-spec names(name_kind()) -> [{non_neg_integer(), atom()}].
names(_Kind) -> ?NOT_LOADED.
-spec name_of(name_kind(), non_neg_integer()) -> atom() | {unknown, non_neg_integer()}.
name_of(_Kind, _Code) -> ?NOT_LOADED.
-spec code_of(name_kind(), atom()) -> non_neg_integer() | undefined.
code_of(_Kind, _Name) -> ?NOT_LOADED.

%% ---- stream-setup machine ----
%% One machine per consumer connection; see docs/interfaces.md "Setup machine NIF".

-type setup() :: reference().
-type vbucket() :: 0..1023.
-type side() :: consumer | producer.
-type why() :: {mcbp_status, non_neg_integer()} | {stream_end, mcbp:stream_end_reason()}
             | setup_timeout | {connection_lost, term()}.
-type setup_reply() :: ok | {errors, [{why(), {vbucket, vbucket()}}]}.
%% `{noreply, absorbed}': an answer to a request no caller waits for any more (late or
%% superseded); the machine applied it, nobody is to be answered.
-type setup_outcome() :: noreply | {noreply, absorbed} | {reply, setup_reply()}
                       | {stop, {unexpected_response, add_stream | {close_stream, side()},
                                 non_neg_integer()}}.
%% What to send, with the opaque (and ADD_STREAM flags word) to send it with. The opaque names
%% the request (a generation in the high 22 bits, the vbucket in the low 10): send it as given.
-type setup_action() :: {add_stream, vbucket(), Opaque :: non_neg_integer(),
                         Flags :: non_neg_integer()}
                      | {close_stream, side(), vbucket(), Opaque :: non_neg_integer()}.
-type setup_start() :: {send, [setup_action()]} | {reply, ok}.
%% dcp_consumer_conn's own request terms.
-type setup_request() :: {setup_streams, [vbucket()]} | {takeover, vbucket()}
                       | {maybe_close_stream, vbucket()} | shut_connection.
%% A splitter event (mcbp:event()) tagged with the side whose splitter reported it, the setup
%% deadline, or the loss of the connection (its reason goes into the errors of the reply).
-type setup_event() :: {side(), mcbp:event()} | deadline | {connection_lost, term()}.

-spec setup_new() -> setup().
setup_new() -> ?NOT_LOADED.
%% A vbucket list is checked here too, whoever calls: more than 1024 elements is
%% `{too_many_vbuckets, 1024}' (refused after reading at most a few thousand cells), an element out
%% of 0..1023 `{bad_vbucket, Element}', a term that is not a proper list `{bad_vbucket, Term}', a
%% vbucket named twice `{duplicate_vbucket, VBucket}'.
-spec setup_request(setup(), setup_request()) ->
          setup_start() | {error, busy | shut | {bad_vbucket, term()}
                                | {too_many_vbuckets, 1024} | {duplicate_vbucket, vbucket()}}.
setup_request(_Setup, _Request) -> ?NOT_LOADED.
-spec setup_event(setup(), setup_event()) -> setup_outcome().
setup_event(_Setup, _Event) -> ?NOT_LOADED.
-spec setup_partitions(setup()) -> [vbucket()].
setup_partitions(_Setup) -> ?NOT_LOADED.
-spec setup_info(setup()) -> #{state := idle | setting_up | takeover | shut,
                               active := [vbucket()],
                               pending_adds := [vbucket()],
                               pending_closes_consumer := [vbucket()],
                               pending_closes_producer := [vbucket()],
                               errors := [{why(), {vbucket, vbucket()}}],
                               next_state := idle | shut | undefined,
                               takeover := undefined | map(),
                               owed := non_neg_integer(),
                               absorbed := non_neg_integer()}.
setup_info(_Setup) -> ?NOT_LOADED.
