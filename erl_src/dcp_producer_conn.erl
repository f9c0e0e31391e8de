%% @doc The producer half of a replication: the connection to the producer node's memcached. It
%% forwards the producer's stream to the consumer node and passes what the stream-setup machine must
%% see (stream ends, vbucket state changes, answers to our CLOSE_STREAM) to the consumer conn.
-module(dcp_producer_conn).

-behaviour(dcp_proxy).

-include_lib("kernel/include/logger.hrl").

-export([start_link/1, close_stream/2]).

%% dcp_proxy callbacks
-export([init/2, handle_event/3, handle_call/4, handle_info/3, terminate/3]).

-define(LOG_META, #{domain => [dcp_proxy]}).

%% ---- API ----

%% @doc Connects to the producer node. `Opts' as for `dcp_proxy:start_link/3' (side producer).
-spec start_link(dcp_proxy:opts()) -> {ok, pid()} | {error, term()}.
start_link(Opts) ->
    dcp_proxy:start_link(?MODULE, Opts#{side => producer}, []).

%% @doc Closes `VBucket''s stream on the producer; the answer goes to the consumer conn. Stream
%% closes that belong to a setup are sent by `dcp_consumer_conn' (its machine expects their answers);
%% this is for a connection that is shut, where the machine ignores the answer. Before that, an
%% answer the machine did not ask for is a protocol violation that stops the pair.
-spec close_stream(pid(), 0..1023) -> ok.
close_stream(Pid, VBucket) ->
    gen_server:call(Pid, {close_stream, VBucket}, 5000).

%% ---- connect ----

init(_Args, _Conn) ->
    {ok, #{}}.

%% ---- stream ----

handle_event({stream_end, VB, Opaque, Reason} = Event, St, Conn) ->
    dcp_log:info(stream_end, (dcp_log:who(Conn))#{vbucket => VB, opaque => Opaque,
                                                  reason => Reason}),
    ok = dcp_events:emit(Conn, stream_end, #{vbucket => VB, reason => Reason}),
    ok = to_consumer(Event, Conn),
    {ok, St};
%% set_vbucket_state and close_stream_response: the consumer conn's machine decides.
handle_event(Event, St, Conn) ->
    ok = to_consumer(Event, Conn),
    {ok, St}.

to_consumer(Event, #{partner := {Consumer, _}}) ->
    Consumer ! {'$dcp_producer_event', Event},
    ok.

handle_call({close_stream, VBucket}, _From, St, Conn) ->
    {reply, dcp_proxy:send_own(Conn, dcp_commands:close_stream(VBucket, VBucket)), St};
handle_call(Request, _From, St, #{name := Name}) ->
    ?LOG_WARNING("~s: unexpected call ~p", [Name, Request], ?LOG_META),
    {reply, {error, {unknown_request, Request}}, St}.

handle_info(Info, St, #{name := Name}) ->
    ?LOG_WARNING("~s: unexpected message ~0p", [Name, Info], ?LOG_META),
    {noreply, St}.

%% ---- stop ----

terminate(Reason, _St, Conn) ->
    dcp_events:connection_lost(Conn, Reason).
