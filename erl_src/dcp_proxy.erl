%% @doc The socket process shared by both sides of a replication: connects and handshakes with one
%% memcached, feeds every chunk it reads through its side's splitter, writes what must be forwarded
%% straight to its partner's socket and hands the reported frames to its side module
%% (`dcp_consumer_conn' or `dcp_producer_conn').
%%
%% Cut-through forwarding means a proxy may have written only part of a frame to its partner's socket.
%% A frame of our own (ADD_STREAM, CLOSE_STREAM) going to that socket must not land inside it, so it is
%% written by the one process that forwards into that socket, and only at a frame boundary: a side
%% module asks for it with `send_own/2' (our own socket: the partner writes it) or `send_partner/2'.
-module(dcp_proxy).

-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/3, connect_proxies/2, send_own/2, send_partner/2, discard_reads/1,
         stats/1, terminate_and_wait/3]).

%% gen_server callbacks
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2, format_status/1]).

-export_type([opts/0, conn/0, side/0, splitter_opt/0, socket/0, feature/0]).

-type side() :: consumer | producer.
-type feature() :: xattr | snappy | del_times | del_user_xattr | json.
-type splitter_opt() :: nif | {module(), map()}.
%% The password travels wrapped in a fun so that no crash report or log line can print it.
-type secret() :: fun(() -> iodata()).
%% `side' is set by the side module's start_link.
-type opts() :: #{side => side(),
                  host := inet:socket_address() | inet:hostname(),
                  port := inet:port_number(),
                  bucket := string() | binary(),
                  connection_name := string() | binary(),
                  user := string() | binary(),
                  password := secret(),
                  features => [feature()],
                  ssl => false | [ssl:tls_client_option()],
                  splitter => splitter_opt(),
                  max_frame_size => pos_integer(),
                  traffic_monitor => pid() | undefined,
                  connect_timeout => timeout(),
                  send_timeout => timeout(),
                  recbuf => pos_integer(),
                  sndbuf => pos_integer()}.
-type socket() :: {gen_tcp, gen_tcp:socket()} | {ssl, ssl:sslsocket()}.
%% What a side module's callbacks get to talk to the sockets.
-type conn() :: #{side := side(),
                  name := binary(),
                  socket := socket(),
                  partner := undefined | {pid(), socket()}}.
-type splitter() :: {nif, reference()} | {module(), term()}.

%% A side module: the protocol half of a connection process.
-callback init(Args :: term(), conn()) -> {ok, State :: term()}.
-callback handle_event(Event :: term(), State :: term(), conn()) ->
    {ok, State :: term()} | {stop, Reason :: term(), State :: term()}.
-callback handle_call(Request :: term(), gen_server:from(), State :: term(), conn()) ->
    {reply, Reply :: term(), State :: term()} | {noreply, State :: term()}
        | {stop, Reason :: term(), Reply :: term(), State :: term()}.
-callback handle_info(Info :: term(), State :: term(), conn()) ->
    {noreply, State :: term()} | {stop, Reason :: term(), State :: term()}.
-callback terminate(Reason :: term(), State :: term(), conn()) -> any().

-define(DEFAULT_MAX_FRAME_SIZE, 30 * 1024 * 1024).
%% Kernel buffers and the driver's read buffer: a chunk of up to 256 KiB per feed and send. Against
%% 64 KiB, fewer and larger chunks raised end-to-end throughput with either splitter (make bench).
-define(DEFAULT_BUF, 1024 * 1024). % make bench (end to end at the limit): 1 MiB beat 256 KiB
-define(DEFAULT_CONNECT_TIMEOUT, 30000).
%% a peer that stops reading for this long ends the replication instead of blocking it forever
-define(DEFAULT_SEND_TIMEOUT, 60000).
-define(TRAFFIC_INTERVAL_MS, 100).
-define(AGENT, <<"dcp_proxy">>).
-define(LOG_META, #{domain => [dcp_proxy]}).

-record(state, {module :: module(),
                mod_state :: term(),
                conn :: conn(),
                splitter :: splitter(),
                partner_ref :: undefined | reference(),
                %% our own frames for the partner's socket, newest first, held until a frame boundary
                inject = [] :: [iodata()],
                %% a shut consumer drops what it reads: `pending' until the frame being forwarded
                %% is complete, then `active'
                discard = false :: false | pending | active,
                traffic_monitor :: undefined | pid(),
                last_traffic :: undefined | integer(),
                chunks = 0 :: non_neg_integer(),
                bytes_in = 0 :: non_neg_integer(),
                injected = 0 :: non_neg_integer()}).

%% ---- API ----

%% @doc Connects, handshakes and starts the side module `Module' with `Args'. The socket is read only
%% once the partner is known (`connect_proxies/2').
-spec start_link(module(), opts(), term()) -> {ok, pid()} | {error, term()}.
start_link(Module, Opts, Args) ->
    gen_server:start_link(?MODULE, {Module, Opts, Args}, []).

%% @doc Gives each proxy the other's pid and socket, then both start reading.
-spec connect_proxies(pid(), pid()) -> ok.
connect_proxies(Consumer, Producer) ->
    ConsumerSock = gen_server:call(Consumer, '$dcp_socket', infinity),
    ProducerSock = gen_server:call(Producer, '$dcp_socket', infinity),
    ok = gen_server:call(Consumer, {'$dcp_partner', Producer, ProducerSock}, infinity),
    ok = gen_server:call(Producer, {'$dcp_partner', Consumer, ConsumerSock}, infinity).

%% @doc Writes our own frames to the socket of this connection. Once the pair is connected the
%% partner forwards into that socket, so the partner writes them at its next frame boundary.
-spec send_own(conn(), iodata()) -> ok | {error, term()}.
send_own(#{partner := undefined, socket := Sock}, Frames) ->
    socket_send(Sock, Frames);
send_own(#{partner := {Pid, _}}, Frames) ->
    Pid ! {'$dcp_inject', Frames},
    ok.

%% @doc Writes our own frames to the partner's socket, at this proxy's next frame boundary. Only the
%% proxy process itself (its side module) may call it.
-spec send_partner(conn(), iodata()) -> ok.
send_partner(#{partner := {_, _}}, Frames) ->
    self() ! {'$dcp_inject', Frames},
    ok.

%% @doc From now on what this connection reads is no longer forwarded (reported frames still are
%% handled). Only the proxy process itself may call it.
-spec discard_reads(conn()) -> ok.
discard_reads(_Conn) ->
    self() ! '$dcp_discard',
    ok.

%% @doc The splitter counters and this proxy's own counters.
-spec stats(pid()) -> map().
stats(Pid) ->
    gen_server:call(Pid, '$dcp_stats', infinity).

%% @doc Stops the given processes with `Reason' and waits (at most `Timeout' ms each) until they are gone.
-spec terminate_and_wait([pid()], term(), timeout()) -> ok.
terminate_and_wait(Pids, Reason, Timeout) ->
    Refs = [{Pid, erlang:monitor(process, Pid)} || Pid <- Pids],
    [exit(Pid, Reason) || Pid <- Pids],
    lists:foreach(
      fun({Pid, Ref}) ->
              receive
                  {'DOWN', Ref, process, Pid, _} -> ok
              after Timeout ->
                      exit(Pid, kill),
                      receive {'DOWN', Ref, process, Pid, _} -> ok end
              end
      end, Refs).

%% ---- connect and handshake ----

init({Module, #{side := Side, connection_name := Name} = Opts, Args}) ->
    %% trap exits so that terminate/2 runs and a waiting setup caller is always answered
    process_flag(trap_exit, true),
    case connect(Opts) of
        {ok, Sock} ->
            case handshake(Sock, Opts) of
                ok ->
                    start_side(Module, Args, Sock, Opts);
                {error, Reason} ->
                    _ = socket_close(Sock),
                    ?LOG_ERROR("~s: ~p handshake failed: ~p", [Name, Side, Reason], ?LOG_META),
                    {stop, {Side, Reason}}
            end;
        {error, Reason} ->
            ?LOG_ERROR("~s: ~p connect failed: ~p", [Name, Side, Reason], ?LOG_META),
            {stop, {Side, {connect_failed, Reason}}}
    end.

start_side(Module, Args, Sock, #{side := Side, connection_name := Name} = Opts) ->
    case new_splitter(Side, Opts) of
        {ok, Splitter} ->
            Conn = #{side => Side, name => iolist_to_binary(Name), socket => Sock,
                     partner => undefined},
            {ok, ModState} = Module:init(Args, Conn),
            {ok, #state{module = Module, mod_state = ModState, conn = Conn, splitter = Splitter,
                        traffic_monitor = maps:get(traffic_monitor, Opts, undefined)}};
        {error, Reason} ->
            _ = socket_close(Sock),
            {stop, {Side, Reason}}
    end.

connect(#{host := Host, port := Port} = Opts) ->
    Timeout = maps:get(connect_timeout, Opts, ?DEFAULT_CONNECT_TIMEOUT),
    SockOpts = [binary, {active, false}, {packet, raw}, {nodelay, true}, {keepalive, true},
                {send_timeout, maps:get(send_timeout, Opts, ?DEFAULT_SEND_TIMEOUT)},
                {send_timeout_close, true},
                {recbuf, maps:get(recbuf, Opts, ?DEFAULT_BUF)},
                {sndbuf, maps:get(sndbuf, Opts, ?DEFAULT_BUF)}],
    case maps:get(ssl, Opts, false) of
        false ->
            case gen_tcp:connect(Host, Port, SockOpts, Timeout) of
                {ok, S} -> {ok, {gen_tcp, S}};
                {error, _} = Error -> Error
            end;
        SslOpts when is_list(SslOpts) ->
            case ssl:connect(Host, Port, SockOpts ++ SslOpts, Timeout) of
                {ok, S} -> {ok, {ssl, S}};
                {error, Reason} -> {error, {tls, Reason}}
            end
    end.

%% SASL PLAIN, SELECT_BUCKET, HELLO, DCP_OPEN: each step's failure names the step.
handshake(Sock, #{side := Side, user := User, password := Password, bucket := Bucket,
                  connection_name := Name} = Opts) ->
    Timeout = maps:get(connect_timeout, Opts, ?DEFAULT_CONNECT_TIMEOUT),
    Features = maps:get(features, Opts, []),
    HelloFeatures = [F || F <- [xattr, snappy, json], lists:member(F, Features)],
    OpenFlags = [F || F <- [xattr, del_times, del_user_xattr], lists:member(F, Features)],
    Steps = [{sasl_auth, fun() -> dcp_commands:sasl_auth_plain(User, Password(), 1) end},
             {select_bucket, fun() -> dcp_commands:select_bucket(Bucket, 2) end},
             {hello, fun() -> dcp_commands:hello(?AGENT, HelloFeatures, 3) end},
             {dcp_open, fun() -> dcp_commands:dcp_open(Name, Side, OpenFlags, 4) end}],
    run_handshake(Steps, Sock, HelloFeatures, Timeout).

run_handshake([], _Sock, _HelloFeatures, _Timeout) ->
    ok;
run_handshake([{Step, Build} | Rest], Sock, HelloFeatures, Timeout) ->
    case socket_send(Sock, Build()) of
        ok ->
            case recv_frame(Sock, <<>>, Timeout) of
                {ok, #{status := 0} = Frame} ->
                    case check_step(Step, Frame, HelloFeatures) of
                        ok -> run_handshake(Rest, Sock, HelloFeatures, Timeout);
                        {error, _} = Error -> Error
                    end;
                {ok, #{status := Status}} ->
                    {error, {Step, {mcbp_status, mcbp:status_name(Status)}}};
                {ok, Other} ->
                    {error, {Step, {unexpected_frame, maps:get(opcode_name, Other, unknown)}}};
                {error, Reason} ->
                    {error, {Step, Reason}}
            end;
        {error, Reason} ->
            {error, {Step, {send_failed, Reason}}}
    end.

%% A node that refuses snappy still replicates (uncompressed); any other refused feature would
%% change what the consumer receives, so it is an error.
check_step(hello, #{value := Value}, Wanted) ->
    Granted = dcp_commands:hello_features(Value),
    case [F || F <- Wanted, F =/= snappy, not lists:member(F, Granted)] of
        [] -> ok;
        Refused -> {error, {hello, {features_refused, Refused}}}
    end;
check_step(_Step, _Frame, _Wanted) ->
    ok.

recv_frame(Sock, Buf, Timeout) ->
    case mcbp:decode(Buf) of
        {ok, Frame, _Rest} ->
            {ok, Frame};
        {more, N} ->
            case socket_recv(Sock, N, Timeout) of
                {ok, Data} -> recv_frame(Sock, <<Buf/binary, Data/binary>>, Timeout);
                {error, Reason} -> {error, {recv_failed, Reason}}
            end;
        {error, Reason} ->
            {error, {bad_frame, Reason}}
    end.

new_splitter(Side, Opts) ->
    Max = maps:get(max_frame_size, Opts, ?DEFAULT_MAX_FRAME_SIZE),
    case maps:get(splitter, Opts, nif) of
        nif ->
            {ok, {nif, mcbp:splitter_new(#{side => Side, max_frame_size => Max})}};
        {Mod, InitArgs} when is_atom(Mod), is_map(InitArgs) ->
            {ok, {Mod, Mod:new(InitArgs#{side => Side, max_frame_size => Max})}};
        Other ->
            {error, {bad_splitter_option, Other}}
    end.

%% ---- calls: the pair, stats, then the side module's own ----

handle_call('$dcp_socket', _From, #state{conn = #{socket := Sock}} = State) ->
    {reply, Sock, State};
handle_call({'$dcp_partner', Pid, PartnerSock}, _From, #state{conn = Conn} = State) ->
    Ref = erlang:monitor(process, Pid),
    State1 = State#state{conn = Conn#{partner => {Pid, PartnerSock}}, partner_ref = Ref},
    case activate(State1) of
        ok -> {reply, ok, State1};
        {error, Reason} -> {stop, socket_stop_reason(State1, Reason), ok, State1}
    end;
handle_call('$dcp_stats', _From, State) ->
    {reply, stats_map(State), State};
handle_call(Request, From, #state{module = Module, mod_state = ModState, conn = Conn} = State) ->
    case Module:handle_call(Request, From, ModState, Conn) of
        {reply, Reply, ModState1} ->
            {reply, Reply, State#state{mod_state = ModState1}};
        {noreply, ModState1} ->
            {noreply, State#state{mod_state = ModState1}};
        {stop, Reason, Reply, ModState1} ->
            {stop, Reason, Reply, State#state{mod_state = ModState1}}
    end.

handle_cast(Msg, #state{conn = #{name := Name}} = State) ->
    ?LOG_WARNING("~s: unexpected cast ~p", [Name, Msg], ?LOG_META),
    {noreply, State}.

%% ---- streaming: the hot path ----

handle_info({Tag, S, Chunk}, #state{conn = #{socket := {_, S}}} = State)
  when Tag =:= tcp; Tag =:= ssl ->
    case process_chunk(Chunk, State) of
        {ok, State1} ->
            case activate(State1) of
                ok -> {noreply, State1};
                {error, Reason} -> {stop, socket_stop_reason(State1, Reason), State1}
            end;
        {stop, Reason, State1} ->
            {stop, Reason, State1}
    end;
handle_info({Tag, S}, #state{conn = #{socket := {_, S}, side := Side}} = State)
  when Tag =:= tcp_closed; Tag =:= ssl_closed ->
    {stop, {socket_closed, Side}, State};
handle_info({Tag, S, Reason}, #state{conn = #{socket := {_, S}}} = State)
  when Tag =:= tcp_error; Tag =:= ssl_error ->
    {stop, socket_stop_reason(State, Reason), State};
handle_info({'$dcp_inject', Frames}, #state{inject = Inject} = State) ->
    flush_after_callback(State#state{inject = [Frames | Inject]});
handle_info('$dcp_discard', #state{discard = false} = State) ->
    Discard = case forward_remaining(State) of
                  0 -> active;
                  _ -> pending
              end,
    flush_after_callback(State#state{discard = Discard});
handle_info('$dcp_discard', State) ->
    {noreply, State};
handle_info({'DOWN', Ref, process, _Pid, Reason}, #state{partner_ref = Ref} = State) ->
    {stop, {partner_down, Reason}, State};
handle_info({'EXIT', _PortOrPid, normal}, State) ->
    %% our socket's port; the parent's exit is handled by gen_server itself
    {noreply, State};
handle_info({'EXIT', _PortOrPid, Reason}, State) ->
    {stop, Reason, State};
handle_info(Info, #state{module = Module, mod_state = ModState, conn = Conn} = State) ->
    case Module:handle_info(Info, ModState, Conn) of
        {noreply, ModState1} ->
            flush_after_callback(State#state{mod_state = ModState1});
        {stop, Reason, ModState1} ->
            {stop, Reason, State#state{mod_state = ModState1}}
    end.

%% One feed, the events in order, one send to the partner's socket. Our own frames waiting for a
%% boundary, or a pending discard, take the slow path that cuts the chunk where the frame being
%% forwarded ends.
process_chunk(Chunk, #state{inject = [], discard = false} = State) ->
    feed_and_forward(Chunk, count_chunk(State));
process_chunk(Chunk, #state{discard = active} = State) ->
    %% a shut consumer: our own frames still go out, what the node sends does not
    case feed(count_chunk(State), Chunk) of
        {ok, _Dropped, Events, State1} -> handle_frames([], Events, State1);
        {error, Reason, State1} -> {stop, Reason, State1}
    end;
process_chunk(Chunk, State) ->
    State1 = count_chunk(State),
    Remaining = forward_remaining(State1),
    case Remaining >= byte_size(Chunk) of
        true ->
            %% the whole chunk belongs to the frame being forwarded
            feed_and_forward(Chunk, State1);
        false ->
            {Head, Tail} = split_binary(Chunk, Remaining),
            case feed_head(Head, State1) of
                {ok, Forward1, Events1, State2} ->
                    %% now at a frame boundary: our frames go between the two parts
                    Discard = case State2#state.discard of
                                  false -> false;
                                  _ -> active
                              end,
                    Own = lists:reverse(State2#state.inject),
                    State3 = State2#state{inject = [], discard = Discard,
                                          injected = State2#state.injected + length(Own)},
                    case feed(State3, Tail) of
                        {ok, Forward2, Events2, State4} ->
                            Out = case Discard of
                                      false -> [Forward1, Own, Forward2];
                                      active -> [Forward1, Own]
                                  end,
                            handle_frames(Out, Events1 ++ Events2, State4);
                        {error, Reason, State4} ->
                            {stop, Reason, State4}
                    end;
                {error, Reason, State2} ->
                    {stop, Reason, State2}
            end
    end.

feed_and_forward(Chunk, State) ->
    case feed(State, Chunk) of
        {ok, Forward, Events, State1} -> handle_frames(Forward, Events, State1);
        {error, Reason, State1} -> {stop, Reason, State1}
    end.

%% Events before the send: the side module (and through the producer conn, the consumer conn)
%% learns of a frame before the node it goes to can answer it, so an answer arriving on the other
%% socket never overtakes the frame it answers (a takeover's set-vbucket-state, a stream end
%% racing an add's answer).
handle_frames(Forward, Events, State) ->
    case dispatch(Events, State) of
        {ok, State1} ->
            case forward(Forward, State1) of
                ok -> flush_inject(note_traffic(State1));
                {error, Reason} -> {stop, Reason, State1}
            end;
        {stop, _, _} = Stop ->
            Stop
    end.

feed_head(<<>>, State) ->
    {ok, [], [], State};
feed_head(Head, State) ->
    feed(State, Head).

count_chunk(#state{chunks = C} = State) ->
    State#state{chunks = C + 1}.

feed(#state{splitter = {nif, Ref}, conn = #{side := Side}, bytes_in = In} = State, Chunk) ->
    State1 = State#state{bytes_in = In + byte_size(Chunk)},
    case mcbp:feed(Ref, Chunk) of
        {ok, Forward, Events} -> {ok, Forward, Events, State1};
        {error, Reason} -> {error, {splitter_error, Side, Reason}, State1}
    end;
feed(#state{splitter = {Mod, St}, conn = #{side := Side}, bytes_in = In} = State, Chunk) ->
    State1 = State#state{bytes_in = In + byte_size(Chunk)},
    case Mod:feed(St, Chunk) of
        {ok, Forward, Events, St1} -> {ok, Forward, Events, State1#state{splitter = {Mod, St1}}};
        {error, Reason} -> {error, {splitter_error, Side, Reason}, State1}
    end.

%% Bytes of the frame being cut through that are not yet forwarded; 0 at a frame boundary.
%% A splitter that forwards only whole frames is always at a boundary between chunks.
forward_remaining(#state{splitter = {nif, Ref}}) ->
    #{forward_remaining := Remaining} = mcbp:splitter_stats(Ref),
    Remaining;
forward_remaining(#state{splitter = {Mod, St}}) ->
    case erlang:function_exported(Mod, forward_remaining, 1) of
        true -> Mod:forward_remaining(St);
        false -> 0
    end.

forward([], _State) ->
    ok;
forward(<<>>, _State) ->
    ok;
forward(IoData, #state{conn = #{partner := {_, PartnerSock}, side := Side}}) ->
    case socket_send(PartnerSock, IoData) of
        ok -> ok;
        {error, Reason} -> {error, {send_failed, partner_side(Side), Reason}}
    end.

dispatch([], State) ->
    {ok, State};
dispatch([Event | Events], #state{module = Module, mod_state = ModState, conn = Conn} = State) ->
    case Module:handle_event(Event, ModState, Conn) of
        {ok, ModState1} -> dispatch(Events, State#state{mod_state = ModState1});
        {stop, Reason, ModState1} -> {stop, Reason, State#state{mod_state = ModState1}}
    end.

%% Writes our own frames now if the partner's socket is at a frame boundary; else the next chunk
%% does it.
flush_inject(#state{inject = []} = State) ->
    {ok, State};
flush_inject(#state{inject = Inject, discard = Discard} = State) ->
    case Discard =:= active orelse forward_remaining(State) =:= 0 of
        true ->
            Own = lists:reverse(Inject),
            State1 = State#state{inject = [], injected = State#state.injected + length(Own)},
            case forward(Own, State1) of
                ok -> {ok, State1};
                {error, Reason} -> {stop, Reason, State1}
            end;
        false ->
            {ok, State}
    end.

flush_after_callback(State) ->
    case flush_inject(State) of
        {ok, State1} -> {noreply, State1};
        {stop, Reason, State1} -> {stop, Reason, State1}
    end.

note_traffic(#state{traffic_monitor = undefined} = State) ->
    State;
note_traffic(#state{traffic_monitor = Pid, last_traffic = Last,
                    conn = #{name := Name, side := Side}} = State) ->
    Now = erlang:monotonic_time(millisecond),
    case Last =:= undefined orelse Now - Last >= ?TRAFFIC_INTERVAL_MS of
        true ->
            Pid ! {dcp_traffic, Name, Side, Now},
            State#state{last_traffic = Now};
        false ->
            State
    end.

activate(#state{conn = #{socket := {gen_tcp, S}}}) ->
    inet:setopts(S, [{active, once}]);
activate(#state{conn = #{socket := {ssl, S}}}) ->
    ssl:setopts(S, [{active, once}]).

socket_stop_reason(#state{conn = #{side := Side}}, Reason) ->
    {socket_error, Side, Reason}.

partner_side(consumer) -> producer;
partner_side(producer) -> consumer.

stats_map(#state{splitter = Splitter, chunks = Chunks, bytes_in = BytesIn, injected = Injected,
                 inject = Inject, conn = #{side := Side, name := Name}}) ->
    SplitterStats = case Splitter of
                        {nif, Ref} ->
                            mcbp:splitter_stats(Ref);
                        {Mod, St} ->
                            case erlang:function_exported(Mod, stats, 1) of
                                true -> Mod:stats(St);
                                false -> #{}
                            end
                    end,
    #{side => Side, connection_name => Name, chunks => Chunks, bytes_in => BytesIn,
      own_batches_sent => Injected, own_batches_waiting => length(Inject),
      splitter => SplitterStats}.

%% ---- shut and stop ----

terminate(Reason, #state{module = Module, mod_state = ModState, conn = Conn}) ->
    #{name := Name, side := Side, socket := Sock} = Conn,
    Module:terminate(Reason, ModState, Conn),
    case Reason of
        normal -> ok;
        _ -> ?LOG_NOTICE("~s: ~p connection stopped: ~p", [Name, Side, Reason], ?LOG_META)
    end,
    socket_close(Sock).

%% No credentials are kept in the state; crash reports get a summary without the queued frames
%% and the splitter resource.
format_status(#{state := #state{} = State} = Status) ->
    #state{module = Module, mod_state = ModState, conn = #{side := Side, name := Name} = Conn,
           inject = Inject, discard = Discard, chunks = Chunks, bytes_in = BytesIn} = State,
    Status#{state => #{module => Module, side => Side, connection_name => Name,
                       partner => maps:get(partner, Conn), discard => Discard,
                       own_batches_waiting => length(Inject), chunks => Chunks,
                       bytes_in => BytesIn, mod_state => ModState}};
format_status(Status) ->
    Status.

%% ---- sockets ----

socket_send({gen_tcp, S}, Data) -> gen_tcp:send(S, Data);
socket_send({ssl, S}, Data) -> ssl:send(S, Data).

socket_recv({gen_tcp, S}, N, Timeout) -> gen_tcp:recv(S, N, Timeout);
socket_recv({ssl, S}, N, Timeout) -> ssl:recv(S, N, Timeout).

socket_close({gen_tcp, S}) -> gen_tcp:close(S);
socket_close({ssl, S}) -> ssl:close(S).
