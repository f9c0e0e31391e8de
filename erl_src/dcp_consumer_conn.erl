%% @doc The consumer half of a replication: the connection to the consumer node's memcached, which
%% owns the stream-setup machine (`dcp_nif:setup_request/2', `dcp_nif:setup_event/2'). It sends what the machine says, answers callers
%% when the machine says, and arms the setup deadline. All setup bookkeeping lives in the machine.
-module(dcp_consumer_conn).

-behaviour(dcp_proxy).

-include_lib("kernel/include/logger.hrl").

-export([start_link/2, setup_streams/2, maybe_close_stream/2, takeover/2,
         shut_connection/2, get_partitions/1, setup_info/1, default_setup_timeout/0]).

%% dcp_proxy callbacks
-export([init/2, handle_event/3, handle_call/4, handle_info/3, terminate/3]).

-export_type([setup_reply/0, why/0]).

-define(LOG_META, #{domain => [dcp_proxy]}).
%% The one default setup timeout (ms), also dcp_replicator's.
-define(DEFAULT_SETUP_TIMEOUT, 60000).

-type vbucket() :: 0..1023.
-type why() :: {mcbp_status, non_neg_integer()} | {stream_end, mcbp:stream_end_reason()}
             | setup_timeout | {connection_lost, term()}.
-type setup_reply() :: dcp_nif:setup_reply().
-type request() :: {setup_streams, [vbucket()]} | {takeover, vbucket()}
                 | {maybe_close_stream, vbucket()} | shut_connection.

-record(consumer, {setup :: reference(),
                   setup_timeout :: timeout(),
                   %% callers whose request the machine is working on: the request, and any
                   %% shut asked for meanwhile; a `{reply, _}' outcome answers them all
                   waiting = [] :: [{request(), gen_server:from()}],
                   %% requests held until the machine is free (it runs one at a time)
                   queued = queue:new() :: queue:queue({request(), gen_server:from()}),
                   deadline :: undefined | reference(),
                   %% when the machine began the request it works on (for its duration)
                   begun_at :: undefined | integer()}).

%% ---- API ----

%% @doc Connects to the consumer node. `Opts' as for `dcp_proxy:start_link/3' (side consumer), plus
%% `setup_timeout'.
-spec start_link(dcp_proxy:opts(), timeout()) -> {ok, pid()} | {error, term()}.
start_link(Opts, SetupTimeout) ->
    dcp_proxy:start_link(?MODULE, Opts#{side => consumer}, SetupTimeout).

%% @doc Replicate exactly `VBuckets': adds the new ones, closes (on both sides) the ones no longer
%% wanted. Answers when every add and close is settled, or the deadline passed.
-spec setup_streams(pid(), [vbucket()]) -> setup_reply() | {error, term()}.
setup_streams(Pid, VBuckets) when is_list(VBuckets) ->
    gen_server:call(Pid, {setup_streams, VBuckets}, infinity).

-spec maybe_close_stream(pid(), vbucket()) -> setup_reply() | {error, term()}.
maybe_close_stream(Pid, VBucket) ->
    gen_server:call(Pid, {maybe_close_stream, VBucket}, infinity).

%% @doc Adds `VBucket' with the takeover flag, closing (on both sides, in the same step) a stream
%% it may have, so no other request runs in between; answers when the consumer took it over, or at
%% once with `{stream_end, Reason}' when the takeover stream ends before the switch to active. A
%% completed takeover is not in `get_partitions/1' (the consumer owns the vbucket).
-spec takeover(pid(), vbucket()) -> setup_reply() | {error, term()}.
takeover(Pid, VBucket) ->
    gen_server:call(Pid, {takeover, VBucket}, infinity).

%% @doc Closes every stream; from then on nothing the consumer sends is forwarded. A setup or
%% takeover in progress is ended: its caller and this one get the same reply.
-spec shut_connection(pid(), timeout()) -> setup_reply() | {error, term()}.
shut_connection(Pid, Timeout) ->
    gen_server:call(Pid, shut_connection, Timeout).

-spec get_partitions(pid()) -> [vbucket()].
get_partitions(Pid) ->
    %% answered at once: the conn never blocks on a socket
    gen_server:call(Pid, get_partitions, 5000).

%% @doc The default of `start_link/2''s `SetupTimeout', in milliseconds.
-spec default_setup_timeout() -> pos_integer().
default_setup_timeout() ->
    ?DEFAULT_SETUP_TIMEOUT.

-spec setup_info(pid()) -> map().
setup_info(Pid) ->
    gen_server:call(Pid, setup_info, 5000).

%% ---- connect ----

init(SetupTimeout, _Conn) ->
    {ok, #consumer{setup = dcp_nif:setup_new(),
                   setup_timeout = setup_timeout(SetupTimeout)}}.

setup_timeout(T) when T =:= infinity; is_integer(T), T >= 0 -> T;
setup_timeout(_) -> ?DEFAULT_SETUP_TIMEOUT.

%% ---- set up, take over, shut: the callers ----

handle_call(get_partitions, _From, #consumer{setup = Setup} = St, _Conn) ->
    {reply, dcp_nif:setup_partitions(Setup), St};
handle_call(setup_info, _From, #consumer{setup = Setup, waiting = Waiting} = St, _Conn) ->
    Info = dcp_nif:setup_info(Setup),
    {reply, Info#{waiting_callers => length(Waiting),
                  queued_requests => queue:len(St#consumer.queued)}, St};
handle_call(shut_connection, From, St, Conn) ->
    %% not queued behind a stuck setup: shutting is how a stuck setup is cleared
    start_request(shut_connection, From, St, Conn);
handle_call({setup_streams, VBuckets} = Request, From, St, Conn) when is_list(VBuckets) ->
    start_or_queue(Request, From, St, Conn);
handle_call({takeover, _VBucket} = Request, From, St, Conn) ->
    start_or_queue(Request, From, St, Conn);
handle_call({maybe_close_stream, _VBucket} = Request, From, St, Conn) ->
    start_or_queue(Request, From, St, Conn);
handle_call(Request, _From, St, #{name := Name}) ->
    ?LOG_WARNING("~s: unexpected call ~p", [Name, Request], ?LOG_META),
    {reply, {error, {unknown_request, Request}}, St}.

start_or_queue(Request, From, #consumer{waiting = [], queued = Queued} = St, Conn) ->
    case queue:is_empty(Queued) of
        true -> start_request(Request, From, St, Conn);
        false -> {noreply, St#consumer{queued = queue:in({Request, From}, Queued)}}
    end;
start_or_queue(Request, From, #consumer{queued = Queued} = St, _Conn) ->
    {noreply, St#consumer{queued = queue:in({Request, From}, Queued)}}.

start_request(Request, From, #consumer{setup = Setup} = St, Conn) ->
    case dcp_nif:setup_request(Setup, Request) of
        {send, Actions} ->
            log_begun(Request, Actions, Conn),
            ok = send_actions(Actions, Conn),
            St1 = maybe_discard(Request, Conn, St),
            Waiting = St1#consumer.waiting ++ [{Request, From}],
            BegunAt = case St1#consumer.begun_at of
                          undefined -> erlang:monotonic_time(microsecond);
                          Earlier -> Earlier
                      end,
            {noreply, arm_deadline(St1#consumer{waiting = Waiting, begun_at = BegunAt})};
        {reply, Reply} ->
            St1 = maybe_discard(Request, Conn, St),
            {reply, Reply, St1};
        {error, Reason} ->
            {reply, {error, Reason}, St}
    end.

maybe_discard(shut_connection, Conn, St) ->
    ok = dcp_proxy:discard_reads(Conn),
    St;
maybe_discard(_Request, _Conn, St) ->
    St.

%% ADD_STREAM and consumer CLOSE_STREAM go to the consumer socket, producer CLOSE_STREAM to the
%% producer socket, each with the opaque (and flags) the machine chose: it matches the answers.
send_actions(Actions, Conn) ->
    Own = [own_frame(A) || A <- Actions, element(1, A) =:= add_stream orelse
                                            element(2, A) =:= consumer],
    Partner = [dcp_commands:close_stream(VB, Opaque)
               || {close_stream, producer, VB, Opaque} <- Actions],
    ok = case Own of
             [] -> ok;
             _ -> dcp_proxy:send_own(Conn, Own)
         end,
    case Partner of
        [] -> ok;
        _ -> dcp_proxy:send_partner(Conn, Partner)
    end.

own_frame({add_stream, VB, Opaque, Flags}) -> dcp_commands:add_stream(VB, Flags, Opaque);
own_frame({close_stream, consumer, VB, Opaque}) -> dcp_commands:close_stream(VB, Opaque).

arm_deadline(#consumer{deadline = undefined, setup_timeout = infinity} = St) ->
    St;
arm_deadline(#consumer{deadline = undefined, setup_timeout = Timeout} = St) ->
    St#consumer{deadline = erlang:start_timer(Timeout, self(), setup_deadline)};
arm_deadline(St) ->
    St.

disarm_deadline(#consumer{deadline = undefined} = St) ->
    St;
disarm_deadline(#consumer{deadline = Ref} = St) ->
    _ = erlang:cancel_timer(Ref),
    St#consumer{deadline = undefined}.

%% ---- stream: what the consumer node and (through the producer conn) the producer say ----

%% What the consumer's splitter reports (mcbp:event()): the answers to our ADD_STREAM and
%% CLOSE_STREAM (reported, not forwarded), and for a takeover its STREAM_REQ and its answer to the
%% switch to active (forwarded and reported). The machine decides what each means.
handle_event(Event, St, Conn) ->
    dcp_log:debug(consumer_answer, (dcp_log:who(Conn))#{event => Event}),
    outcome(dcp_nif:setup_event(St#consumer.setup, {consumer, Event}), St, Conn).

handle_info({'$dcp_producer_event', Event}, St, Conn) ->
    log_producer_event(Event, Conn),
    to_noreply(outcome(dcp_nif:setup_event(St#consumer.setup, {producer, Event}), St, Conn));
handle_info({timeout, Ref, setup_deadline}, #consumer{deadline = Ref} = St, Conn) ->
    #{pending_adds := Adds} = Info = dcp_nif:setup_info(St#consumer.setup),
    dcp_log:warning(setup_deadline_passed,
                    (dcp_log:who(Conn))#{state => maps:get(state, Info),
                                         pending_adds => dcp_log:vbuckets(Adds)}),
    to_noreply(outcome(dcp_nif:setup_event(St#consumer.setup, deadline),
                       St#consumer{deadline = undefined}, Conn));
handle_info({timeout, _StaleRef, setup_deadline}, St, _Conn) ->
    {noreply, St};
handle_info(Info, St, #{name := Name}) ->
    ?LOG_WARNING("~s: unexpected message ~0p", [Name, Info], ?LOG_META),
    {noreply, St}.

%% The stream end is matched to a pending add by its vbucket in the machine (its opaque is the
%% consumer's own stream opaque, MB-53445); a takeover's state change is worth a log line.
log_producer_event({set_vbucket_state, VB, _Opaque, State}, Conn) ->
    dcp_log:info(takeover_vbucket_state, (dcp_log:who(Conn))#{vbucket => VB, state => State}),
    dcp_events:emit(Conn, takeover, #{vbucket => VB, state => State});
log_producer_event(_Event, _Conn) ->
    ok.

%% What the machine decided: nothing yet, answer the oldest waiting caller, or stop (an answer
%% that matches nothing is a protocol violation; terminate/3 answers the caller first).
outcome(noreply, St, _Conn) ->
    {ok, St};
outcome({noreply, absorbed}, St, Conn) ->
    %% a late answer (after the deadline, a shut or a stream end) or one to a superseded request:
    %% the machine applied it to what it knows of the consumer; counted in setup_info's `absorbed'
    dcp_log:info(late_setup_answer_absorbed, dcp_log:who(Conn)),
    {ok, St};
outcome({reply, Reply}, #consumer{waiting = []} = St, Conn) ->
    dcp_log:info(setup_settled_with_nobody_waiting, (dcp_log:who(Conn))#{result => result(Reply)}),
    {ok, St};
outcome({reply, Reply}, #consumer{waiting = Waiting, begun_at = BegunAt} = St, Conn) ->
    %% a shut asked for during a setup joins that setup: its caller is answered with it
    [begin
         log_settled(Request, Reply, BegunAt, Conn),
         gen_server:reply(From, Reply)
     end || {Request, From} <- Waiting],
    {ok, next_request(disarm_deadline(St#consumer{waiting = [], begun_at = undefined}), Conn)};
outcome({stop, Reason}, St, _Conn) ->
    {stop, Reason, St}.

to_noreply({ok, St}) -> {noreply, St};
to_noreply({stop, _, _} = Stop) -> Stop.

next_request(#consumer{waiting = [], queued = Queued} = St, Conn) ->
    case queue:out(Queued) of
        {empty, _} ->
            St;
        {{value, {Request, From}}, Queued1} ->
            case start_request(Request, From, St#consumer{queued = Queued1}, Conn) of
                {noreply, St1} ->
                    St1;
                {reply, {error, shut}, St1} ->
                    %% accepted while the connection was up, then shut under it: to this caller
                    %% the connection is lost (the contract's per-vbucket errors, not a refusal)
                    gen_server:reply(From, lost_reply(Request, shut)),
                    next_request(St1, Conn);
                {reply, Reply, St1} ->
                    gen_server:reply(From, Reply),
                    next_request(St1, Conn)
            end
    end;
next_request(St, _Conn) ->
    St.

%% One line per request begun and settled (vbucket lists as summaries), a debug line per step sent,
%% and the event handler's setup_begun / setup_settled.
log_begun(Request, Actions, Conn) ->
    Adds = [VB || {add_stream, VB, _, _} <- Actions],
    CloseC = [VB || {close_stream, consumer, VB, _} <- Actions],
    CloseP = [VB || {close_stream, producer, VB, _} <- Actions],
    Summary = #{request => request_kind(Request),
                vbuckets => dcp_log:vbuckets(request_vbuckets(Request)),
                adds => length(Adds), closes => length(CloseC) + length(CloseP)},
    dcp_log:info(setup_begun, maps:merge(dcp_log:who(Conn), Summary)),
    [dcp_log:debug(Step, (dcp_log:who(Conn))#{vbuckets => dcp_log:vbuckets(VBs)})
     || {Step, VBs} <- [{add_stream_sent, Adds}, {close_stream_sent_consumer, CloseC},
                        {close_stream_sent_producer, CloseP}], VBs =/= []],
    dcp_events:emit(Conn, setup_begun, Summary).

log_settled(Request, Reply, BegunAt, Conn) ->
    DurationUs = case BegunAt of
                     undefined -> 0;
                     _ -> erlang:monotonic_time(microsecond) - BegunAt
                 end,
    Errors = case Reply of
                 {errors, E} -> E;
                 _ -> []
             end,
    Fields = (dcp_log:who(Conn))#{request => request_kind(Request),
                                  vbuckets => dcp_log:vbuckets(request_vbuckets(Request)),
                                  result => result(Reply), duration_ms => DurationUs div 1000},
    case Errors of
        [] -> dcp_log:info(setup_settled, Fields);
        _ -> dcp_log:notice(setup_settled, Fields#{errors => dcp_log:errors(Errors)})
    end,
    dcp_events:emit(Conn, setup_settled,
                    #{request => request_kind(Request), duration_us => DurationUs,
                      result => result(Reply),
                      reasons => [{VB, Why} || {Why, {vbucket, VB}} <- Errors]}).

request_kind({Kind, _}) -> Kind;
request_kind(shut_connection) -> shut_connection.

request_vbuckets({setup_streams, VBs}) -> VBs;
request_vbuckets({_, VB}) when is_integer(VB) -> [VB];
request_vbuckets(shut_connection) -> [].

result(ok) -> ok;
result({errors, _}) -> errors.

%% ---- stop: every caller is answered before the process goes ----

terminate(Reason, #consumer{setup = Setup, waiting = Waiting, queued = Queued,
                            begun_at = BegunAt}, Conn) ->
    ok = dcp_events:connection_lost(Conn, Reason),
    Lost = lost_reason(Reason),
    Answered = case dcp_nif:setup_event(Setup, {connection_lost, Lost}) of
                   {reply, Reply} ->
                       [begin
                            log_settled(Request, Reply, BegunAt, Conn),
                            gen_server:reply(From, Reply)
                        end || {Request, From} <- Waiting],
                       Waiting;
                   _ ->
                       []
               end,
    [gen_server:reply(From, lost_reply(Request, Lost))
     || {Request, From} <- (Waiting -- Answered) ++ queue:to_list(Queued)],
    ok.

%% The partner's reason is the one that says what was lost.
lost_reason({shutdown, Reason}) -> lost_reason(Reason);
lost_reason({partner_down, Reason}) -> lost_reason(Reason);
lost_reason(Reason) -> Reason.

lost_reply({setup_streams, VBuckets}, Lost) ->
    {errors, [{{connection_lost, Lost}, {vbucket, VB}} || VB <- VBuckets]};
lost_reply({takeover, VB}, Lost) ->
    {errors, [{{connection_lost, Lost}, {vbucket, VB}}]};
lost_reply({maybe_close_stream, VB}, Lost) ->
    {errors, [{{connection_lost, Lost}, {vbucket, VB}}]};
lost_reply(shut_connection, Lost) ->
    {error, {connection_lost, Lost}}.
