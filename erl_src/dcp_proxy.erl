%% @doc The connection process shared by both sides of a replication: connects and handshakes with
%% one memcached in the background, feeds every chunk it reads through its side's splitter, hands
%% what must be forwarded to the writer of its partner's socket and the reported frames to its side
%% module (`dcp_consumer_conn' or `dcp_producer_conn').
%%
%% Processes and messages. A connection process never sends on a socket: each socket has one
%% writer (`dcp_proxy_writer', linked to the connection process that owns the socket) that does the
%% blocking sends. The connection process reading socket A passes what it forwards to the writer of
%% socket B and counts those bytes until the writer acknowledges them; while more than
%% `?MAX_UNACKED_BYTES' are unacknowledged it stops reading A (backpressure through the kernel
%% buffers, not a mailbox), so a node that stops reading stalls the stream, never a caller or a
%% deadline. Events passed to the partner (the producer conn's stream ends and vbucket states for
%% the consumer conn's machine) are followed by a `'$dcp_sync'' the partner acknowledges once it has
%% handled them; at most `?MAX_EVENT_BATCHES' batches may be unacknowledged before this process
%% stops reading. Connecting and the handshake run in a linked connector process under one deadline
%% (`connect_timeout'); until it reports, calls for the side module wait (they are answered once
%% connected, or with `{error, {connection_lost, Reason}}' when connecting failed).
%%
%% Cut-through forwarding means a writer may have written only part of a frame to its socket. A
%% frame of our own (ADD_STREAM, CLOSE_STREAM) going to that socket must not land inside it, so it is
%% queued by the one process that forwards into that socket, and only at a frame boundary: a side
%% module asks for it with `send_own/2' (our own socket: the partner queues it) or `send_partner/2'.
-module(dcp_proxy).

-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/3, connect_proxies/2, connect_proxies/3, send_own/2, send_partner/2, discard_reads/1,
         stats/1, terminate_and_wait/3, memory_bound/1]).

%% gen_server callbacks
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2, format_status/1]).

-export_type([opts/0, conn/0, side/0, splitter_opt/0, socket/0, feature/0]).

-type side() :: consumer | producer.
-type feature() :: dcp_features:feature().
-type splitter_opt() :: dcp_splitter:option().
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
                  features => dcp_features:features(),
                  consumer_node => atom() | string() | binary(),
                  %% wrapped (dcp_secret:wrap_term/1) by the public start functions
                  ssl => false | [ssl:tls_client_option()] | secret(),
                  splitter => splitter_opt(),
                  max_frame_size => pos_integer(),
                  traffic_monitor => pid() | undefined,
                  event_handler => dcp_events:handler(),
                  connect_timeout => timeout(),
                  send_timeout => timeout(),
                  recbuf => pos_integer(),
                  sndbuf => pos_integer()}.
-type socket() :: {gen_tcp, gen_tcp:socket()} | {ssl, ssl:sslsocket()}.
%% What a side module's callbacks get to talk to the sockets. `partner' holds the partner
%% connection process and its socket.
-type conn() :: #{side := side(),
                  name := binary(),
                  socket := socket(),
                  partner := undefined | {pid(), socket()},
                  %% for logs and events (dcp_log, dcp_events)
                  bucket => binary(),
                  handlers => dcp_events:handlers()}.
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

%% Kernel buffers and the driver's read buffer: a chunk of up to 1 MiB per feed and send. make bench
%% (end to end at the limit, load_driver) measured 1 MiB cheaper per GB than 256 KiB in every run.
-define(DEFAULT_BUF, 1024 * 1024).
-define(DEFAULT_CONNECT_TIMEOUT, 30000).
%% a peer that stops reading for this long ends the replication instead of blocking it forever
-define(DEFAULT_SEND_TIMEOUT, 60000).
%% the connector reports by the deadline; this much later it is killed
-define(CONNECT_GRACE_MS, 200).
-define(TRAFFIC_INTERVAL_MS, 100).
%% Bytes handed to the partner's writer and not yet written: above this the socket is not read.
-define(MAX_UNACKED_BYTES, 1024 * 1024).
%% Event batches handed to the partner and not yet handled: at this many the socket is not read.
-define(MAX_EVENT_BATCHES, 2).
%% The NIF splitter's cap on a reported frame (mcbp::splitter::MAX_REPORTED_FRAME).
-define(MAX_REPORTED_FRAME, 64 * 1024).
%% Calls between the replication's own processes (answered by processes that never block).
-define(CALL_TIMEOUT, 5000).
-define(LOG_META, #{domain => [dcp_proxy]}).

-record(state, {module :: module(),
                mod_state :: term(),
                side :: side(),
                name :: binary(),
                args :: term(),
                opts :: map(),
                %% `connecting' until the connector hands over the socket
                status = connecting :: connecting | connected,
                connector :: undefined | pid(),
                connect_timer :: undefined | reference(),
                %% calls that arrived while connecting, oldest first
                deferred = [] :: [{term(), gen_server:from()}],
                conn :: undefined | conn(),
                splitter :: undefined | dcp_splitter:splitter(),
                %% the writer of our own socket, and of the partner's
                writer :: undefined | pid(),
                partner_writer :: undefined | pid(),
                %% what the last feed left of the frame being cut through: 0 at a frame boundary
                forward_remaining = 0 :: non_neg_integer(),
                partner_ref :: undefined | reference(),
                %% our own frames for the partner's socket, newest first, held until a frame boundary
                inject = [] :: [iodata()],
                %% a shut consumer drops what it reads: `pending' until the frame being forwarded
                %% is complete, then `active'
                discard = false :: false | pending | active,
                %% backpressure: bytes at the partner's writer, event batches at the partner, and
                %% whether the socket is armed ({active, once} outstanding)
                unacked_bytes = 0 :: non_neg_integer(),
                unacked_batches = 0 :: non_neg_integer(),
                armed = false :: boolean(),
                %% event handlers (dcp_events), the traffic counts since the last traffic event
                handlers = [] :: dcp_events:handlers(),
                traffic = dcp_events:traffic_new() :: dcp_events:traffic(),
                frames_reported = 0 :: non_neg_integer(),
                chunks = 0 :: non_neg_integer(),
                bytes_in = 0 :: non_neg_integer(),
                injected = 0 :: non_neg_integer()}).

%% ---- API ----

%% @doc Starts the connection process and returns at once: it connects and handshakes in the
%% background (one deadline, `connect_timeout', for all of it) and starts the side module `Module'
%% with `Args' once connected. A connection that fails stops the process with `{Side, Why}'
%% (`{connect_failed, R}', `{Step, R}' for a handshake step, `{Step, connect_timeout}'). The socket is
%% read only once the partner is known (`connect_proxies/2').
-spec start_link(module(), opts(), term()) -> {ok, pid()} | {error, term()}.
start_link(Module, Opts, Args) ->
    gen_server:start_link(?MODULE, {Module, Opts, Args}, []).

%% @doc Gives each proxy the other's pid, socket and writer, then both start reading. Waits until
%% both are connected (at most `Timeout' ms); exits when a side failed to connect.
-spec connect_proxies(pid(), pid()) -> ok.
connect_proxies(Consumer, Producer) ->
    connect_proxies(Consumer, Producer, infinity).

-spec connect_proxies(pid(), pid(), timeout()) -> ok.
connect_proxies(Consumer, Producer, Timeout) ->
    ConsumerEnd = gen_server:call(Consumer, '$dcp_endpoint', Timeout),
    ProducerEnd = gen_server:call(Producer, '$dcp_endpoint', Timeout),
    ok = gen_server:call(Consumer, {'$dcp_partner', Producer, ProducerEnd}, ?CALL_TIMEOUT),
    ok = gen_server:call(Producer, {'$dcp_partner', Consumer, ConsumerEnd}, ?CALL_TIMEOUT).

%% @doc Writes our own frames to the socket of this connection. Once the pair is connected the
%% partner forwards into that socket, so the partner queues them at its next frame boundary.
%% Never blocks.
-spec send_own(conn(), iodata()) -> ok | {error, term()}.
send_own(#{partner := undefined}, Frames) ->
    self() ! {'$dcp_write_own', Frames},
    ok;
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

%% @doc The splitter counters and this proxy's own counters (`#{state := connecting}' before it
%% is connected). Answered even while a socket is stuck.
-spec stats(pid()) -> map().
stats(Pid) ->
    gen_server:call(Pid, '$dcp_stats', ?CALL_TIMEOUT).

%% @doc What a flooding peer can make one connection hold, in bytes, for connection options
%% `Opts' (README, "Memory bounds"), with the NIF splitter: per direction the unacknowledged bytes at
%% a writer plus one read, and per side one reported frame being assembled (at most 64 KiB) plus two
%% event batches of one read each (an event costs at most 16 times its bytes on the wire).
-spec memory_bound(map()) -> pos_integer().
memory_bound(Opts) ->
    Read = read_size(Opts),
    %% the NIF splitter gathers only reported frames, capped (mcbp MAX_REPORTED_FRAME)
    MaxFrame = min(maps:get(max_frame_size, Opts, ?MAX_REPORTED_FRAME), ?MAX_REPORTED_FRAME),
    Direction = ?MAX_UNACKED_BYTES + Read,
    Events = ?MAX_EVENT_BATCHES * Read * 16,
    2 * (Direction + MaxFrame + Events).

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

%% ---- connect and handshake: in a connector process, under one deadline ----

init({Module, #{side := Side, connection_name := Name} = Opts, Args}) ->
    %% trap exits so that terminate/2 runs and a waiting setup caller is always answered
    process_flag(trap_exit, true),
    dcp_log:set_process_metadata(dcp_log:ctx(Name, Side, maps:get(bucket, Opts, <<>>))),
    Timeout = maps:get(connect_timeout, Opts, ?DEFAULT_CONNECT_TIMEOUT),
    Self = self(),
    Deadline = case Timeout of
                   infinity -> infinity;
                   _ -> erlang:monotonic_time(millisecond) + Timeout
               end,
    Connector = spawn_link(fun() -> connector(Self, Opts, Deadline) end),
    Timer = case Timeout of
                infinity -> undefined;
                _ -> erlang:start_timer(Timeout + ?CONNECT_GRACE_MS, self(), connect_deadline)
            end,
    {ok, #state{module = Module, side = Side, name = iolist_to_binary(Name), args = Args,
                opts = maps:without([password], Opts), connector = Connector,
                connect_timer = Timer, handlers = dcp_events:handlers(Opts)}}.

%% Connects and handshakes, then hands the socket to the connection process; or reports why not.
connector(Owner, Opts, Deadline) ->
    Result = try connect_and_handshake(Opts, Deadline)
             catch
                 %% never the stack (its arguments hold the credentials): only what failed
                 Class:Why:_ -> {error, {handshake_crashed, Class, crash_summary(Why)}}
             end,
    case Result of
        {ok, Sock} ->
            case socket_controlling_process(Sock, Owner) of
                ok ->
                    Owner ! {'$dcp_connected', self(), Sock};
                {error, Reason} ->
                    _ = socket_close(Sock),
                    Owner ! {'$dcp_connect_failed', self(), {connect_failed, Reason}}
            end;
        {error, Reason} ->
            Owner ! {'$dcp_connect_failed', self(), Reason}
    end.

crash_summary(Why) when is_atom(Why) -> Why;
crash_summary(Why) when is_tuple(Why), tuple_size(Why) > 0, is_atom(element(1, Why)) ->
    element(1, Why);
crash_summary(_) -> other.

connect_and_handshake(Opts, Deadline) ->
    case connect(Opts, Deadline) of
        {ok, Sock} ->
            case handshake(Sock, Opts, Deadline) of
                ok ->
                    {ok, Sock};
                {error, _} = Error ->
                    _ = socket_close(Sock),
                    Error
            end;
        {error, Reason} ->
            {error, {connect_failed, Reason}}
    end.

left(infinity) -> infinity;
left(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).

%% The driver's read buffer (the largest chunk one read delivers) is the receive buffer.
read_size(Opts) ->
    maps:get(recbuf, Opts, ?DEFAULT_BUF).

connect(#{host := Host, port := Port} = Opts, Deadline) ->
    SockOpts = [binary, {active, false}, {packet, raw}, {nodelay, true}, {keepalive, true},
                {send_timeout, maps:get(send_timeout, Opts, ?DEFAULT_SEND_TIMEOUT)},
                {send_timeout_close, true},
                {recbuf, maps:get(recbuf, Opts, ?DEFAULT_BUF)},
                {buffer, read_size(Opts)},
                {sndbuf, maps:get(sndbuf, Opts, ?DEFAULT_BUF)}],
    case maps:get(ssl, Opts, false) of
        false ->
            case gen_tcp:connect(Host, Port, SockOpts, left(Deadline)) of
                {ok, S} -> {ok, {gen_tcp, S}};
                {error, _} = Error -> Error
            end;
        Ssl ->
            %% wrapped by dcp_options (dcp_secret) until here: they hold the private key
            SslOpts = case is_list(Ssl) of
                          true -> Ssl;
                          false -> dcp_secret:reveal_term(Ssl)
                      end,
            case tls_client_opts(SslOpts) of
                {ok, TlsOpts} ->
                    ok = dcp_log:hide_tls_start_args(),
                    case ssl:connect(Host, Port, SockOpts ++ TlsOpts, left(Deadline)) of
                        {ok, S} -> {ok, {ssl, S}};
                        {error, Reason} -> {error, {tls, tls_error(Reason)}}
                    end;
                {error, _} = Error ->
                    Error
            end
    end.

%% ssl names a bad option with its value: for the options that hold a secret (a private key, a
%% key file's password) the value is not repeated into exit reasons and logs.
tls_error({options, {Option, _Value}}) when Option =:= key; Option =:= password;
                                            Option =:= certs_keys; Option =:= psk_identity;
                                            Option =:= user_lookup_fun ->
    {options, {Option, dcp_secret:redacted()}};
tls_error(Reason) ->
    Reason.

%% TLS verifies the server unless `{verify, verify_none}' is asked for by name (OTP 25's own
%% default is verify_none): without a CA to verify against that is an error, not a silent
%% unverified connection. OTP's TLS progress reports print the client options (the private key
%% among them) at info and debug level, so they are kept at warning unless a `log_level' is given.
tls_client_opts(SslOpts) ->
    Verify = proplists:get_value(verify, SslOpts, verify_peer),
    HasCa = proplists:is_defined(cacerts, SslOpts) orelse proplists:is_defined(cacertfile, SslOpts),
    Log = case proplists:is_defined(log_level, SslOpts) of
              true -> [];
              false -> [{log_level, warning}]
          end,
    case {Verify, HasCa} of
        {verify_none, _} -> {ok, Log ++ SslOpts};
        {verify_peer, true} -> {ok, Log ++ [{verify, verify_peer} | proplists:delete(verify, SslOpts)]};
        {verify_peer, false} -> {error, {tls, no_ca_given_to_verify_the_server}}
    end.

%% SASL PLAIN, SELECT_BUCKET, HELLO (only when a feature is asked for), DCP_OPEN: each step's
%% failure names the step. What HELLO and DCP_OPEN carry is `dcp_features:plan/3''s.
handshake(Sock, #{side := Side, user := User, password := Password, bucket := Bucket,
                  connection_name := Name} = Opts, Deadline) ->
    case dcp_features:plan(Side, Name, Opts) of
        {ok, Plan} ->
            Steps = [{sasl_auth, dcp_commands:sasl_auth_plain(User, Password(), 1)},
                     {select_bucket, dcp_commands:select_bucket(Bucket, 2)}
                     | dcp_features:handshake_frames(Plan, 3)],
            run_handshake(Steps, Sock, Plan, Deadline);
        {error, _} = Error ->
            Error
    end.

run_handshake([], _Sock, _Plan, _Deadline) ->
    ok;
run_handshake([{Step, Frame} | Rest], Sock, Plan, Deadline) ->
    Request = iolist_to_binary(Frame),
    %% the answer must be a response to this very request: same opcode, same opaque
    {ok, #{opcode := Opcode, opaque := Opaque}, <<>>} = mcbp:decode(Request),
    case socket_send(Sock, Request) of
        ok ->
            case recv_frame(Sock, <<>>, Deadline) of
                {ok, #{magic := Magic, opcode := Opcode, opaque := Opaque, status := 0} = Answer}
                  when Magic =:= res; Magic =:= alt_res ->
                    case check_step(Step, Answer, Plan) of
                        ok -> run_handshake(Rest, Sock, Plan, Deadline);
                        {error, _} = Error -> Error
                    end;
                {ok, #{magic := Magic, opcode := Opcode, opaque := Opaque, status := Status}}
                  when Magic =:= res; Magic =:= alt_res ->
                    {error, {Step, {mcbp_status, mcbp:status_name(Status)}}};
                {ok, #{opcode := Opcode, opaque := Opaque} = Other} ->
                    {error, {Step, {unexpected_frame, maps:get(opcode_name, Other, unknown)}}};
                {ok, #{} = Other} ->
                    {error, {Step, {unexpected_answer, maps:get(opcode_name, Other, unknown),
                                    maps:get(opaque, Other, undefined)}}};
                {error, timeout} ->
                    {error, {Step, connect_timeout}};
                {error, Reason} ->
                    {error, {Step, Reason}}
            end;
        {error, Reason} ->
            {error, {Step, {send_failed, Reason}}}
    end.

%% A node that refuses snappy still replicates (uncompressed); any other refused feature would
%% change what the consumer receives, so it is an error.
check_step(hello, #{value := Value}, Plan) ->
    dcp_features:check_hello(Plan, Value);
check_step(_Step, _Frame, _Plan) ->
    ok.

%% Every receive is bounded by what is left of the one deadline.
recv_frame(Sock, Buf, Deadline) ->
    case mcbp:decode(Buf) of
        {ok, Frame, _Rest} ->
            {ok, Frame};
        {more, N} ->
            case left(Deadline) of
                0 ->
                    {error, timeout};
                Left ->
                    case socket_recv(Sock, N, Left) of
                        {ok, Data} -> recv_frame(Sock, <<Buf/binary, Data/binary>>, Deadline);
                        {error, timeout} -> {error, timeout};
                        {error, Reason} -> {error, {recv_failed, Reason}}
                    end
            end;
        {error, Reason} ->
            {error, {bad_frame, Reason}}
    end.

%% The splitter's own default applies when no max_frame_size is given.
new_splitter(Side, Opts) ->
    dcp_splitter:new(Side, maps:get(splitter, Opts, nif), maps:with([max_frame_size], Opts)).

%% The connector handed over the socket: the writer, the splitter and the side module start, then
%% the calls that waited run.
connected(Sock, #state{module = Module, side = Side, name = Name, args = Args, opts = Opts} = State) ->
    State0 = cancel_connect_timer(State#state{connector = undefined}),
    case new_splitter(Side, Opts) of
        {ok, Splitter} ->
            Writer = dcp_proxy_writer:start_link(Sock, Side),
            Conn = #{side => Side, name => Name, socket => Sock, partner => undefined,
                     bucket => iolist_to_binary(maps:get(bucket, Opts, <<>>)),
                     handlers => State#state.handlers},
            {ok, ModState} = Module:init(Args, Conn),
            State1 = State0#state{status = connected, conn = Conn, splitter = Splitter,
                                  writer = Writer, mod_state = ModState, deferred = []},
            replay(State0#state.deferred, State1);
        {error, Reason} ->
            _ = socket_close(Sock),
            {stop, {Side, Reason}, State0}
    end.

cancel_connect_timer(#state{connect_timer = undefined} = State) ->
    State;
cancel_connect_timer(#state{connect_timer = Ref} = State) ->
    _ = erlang:cancel_timer(Ref),
    State#state{connect_timer = undefined}.

replay([], State) ->
    {noreply, State};
replay([{Request, From} | Rest], State) ->
    case handle_call(Request, From, State) of
        {reply, Reply, State1} ->
            gen_server:reply(From, Reply),
            replay(Rest, State1);
        {noreply, State1} ->
            replay(Rest, State1);
        {stop, Reason, Reply, State1} ->
            gen_server:reply(From, Reply),
            {stop, Reason, State1#state{deferred = Rest}}
    end.

connect_failed(Reason, #state{side = Side} = State) ->
    {stop, {Side, Reason}, cancel_connect_timer(State#state{connector = undefined})}.

%% ---- calls: the pair, stats, then the side module's own ----

handle_call('$dcp_stats', _From, State) ->
    {reply, stats_map(State), State};
handle_call(Request, From, #state{status = connecting, deferred = Deferred} = State) ->
    {noreply, State#state{deferred = Deferred ++ [{Request, From}]}};
handle_call('$dcp_socket', _From, #state{conn = #{socket := Sock}} = State) ->
    {reply, Sock, State};
handle_call('$dcp_endpoint', _From, #state{conn = #{socket := Sock}, writer = W} = State) ->
    {reply, {Sock, W}, State};
handle_call({'$dcp_partner', Pid, {PartnerSock, PartnerWriter}}, _From,
            #state{conn = Conn} = State) ->
    Ref = erlang:monitor(process, Pid),
    State1 = State#state{conn = Conn#{partner => {Pid, PartnerSock}}, partner_ref = Ref,
                         partner_writer = PartnerWriter},
    case maybe_activate(State1) of
        {ok, State2} -> {reply, ok, State2};
        {error, Reason} -> {stop, socket_stop_reason(State1, Reason), ok, State1}
    end;
handle_call(Request, From, #state{module = Module, mod_state = ModState, conn = Conn} = State) ->
    case Module:handle_call(Request, From, ModState, Conn) of
        {reply, Reply, ModState1} ->
            {reply, Reply, State#state{mod_state = ModState1}};
        {noreply, ModState1} ->
            {noreply, State#state{mod_state = ModState1}};
        {stop, Reason, Reply, ModState1} ->
            {stop, Reason, Reply, State#state{mod_state = ModState1}}
    end.

handle_cast(Msg, #state{name = Name} = State) ->
    ?LOG_WARNING("~s: unexpected cast ~p", [Name, Msg], ?LOG_META),
    {noreply, State}.

%% ---- streaming: the hot path ----

%% An expected failure (a peer closed, a refused connect or login, a protocol violation) ends the
%% process with `{shutdown, Reason}': one log line (terminate/2), no crash report (dcp_log).
handle_info(Info, State) ->
    case info(Info, State) of
        {stop, Reason, State1} -> {stop, dcp_log:exit_reason(Reason), State1};
        Other -> Other
    end.

info({Tag, S, Chunk}, #state{conn = #{socket := {_, S}}} = State)
  when Tag =:= tcp; Tag =:= ssl ->
    case process_chunk(Chunk, State#state{armed = false}) of
        {ok, State1} -> activate_or_stop(State1);
        {stop, Reason, State1} -> {stop, Reason, State1}
    end;
info({Tag, S}, #state{conn = #{socket := {_, S}}, side = Side} = State)
  when Tag =:= tcp_closed; Tag =:= ssl_closed ->
    {stop, {socket_closed, Side}, State};
info({Tag, S, Reason}, #state{conn = #{socket := {_, S}}} = State)
  when Tag =:= tcp_error; Tag =:= ssl_error ->
    {stop, socket_stop_reason(State, Reason), State};
info({'$dcp_written', W, Size}, #state{partner_writer = W, unacked_bytes = U} = State) ->
    activate_or_stop(State#state{unacked_bytes = max(0, U - Size)});
info({'$dcp_written', _OwnWriter, _Size}, State) ->
    %% our own frames written to our own socket before the pair was connected
    {noreply, State};
info({'$dcp_sync', From}, State) ->
    %% every event the partner sent before this is handled
    From ! '$dcp_synced',
    {noreply, State};
info('$dcp_synced', #state{unacked_batches = B} = State) ->
    activate_or_stop(State#state{unacked_batches = max(0, B - 1)});
info({'$dcp_write_own', Frames}, #state{conn = #{partner := undefined},
                                               writer = W} = State) ->
    ok = dcp_proxy_writer:write(W, Frames, 0),
    {noreply, State#state{injected = State#state.injected + 1}};
info({'$dcp_write_own', Frames}, #state{conn = #{partner := {Pid, _}}} = State) ->
    %% paired meanwhile: the partner forwards into our socket now
    Pid ! {'$dcp_inject', Frames},
    {noreply, State};
info({'$dcp_inject', Frames}, #state{inject = Inject} = State) ->
    flush_after_callback(State#state{inject = [Frames | Inject]});
info('$dcp_discard', #state{discard = false} = State) ->
    Discard = case State#state.forward_remaining of
                  0 -> active;
                  _ -> pending
              end,
    flush_after_callback(State#state{discard = Discard});
info('$dcp_discard', State) ->
    {noreply, State};
info({'$dcp_connected', Pid, Sock}, #state{connector = Pid} = State) ->
    connected(Sock, State);
info({'$dcp_connect_failed', Pid, Reason}, #state{connector = Pid} = State) ->
    connect_failed(Reason, State);
info({timeout, Ref, connect_deadline}, #state{connect_timer = Ref,
                                                     connector = Pid} = State) ->
    %% the connector missed its own deadline (a send stuck in the handshake): it goes
    exit(Pid, kill),
    connect_failed(connect_timeout, State#state{connect_timer = undefined});
info({timeout, _Stale, connect_deadline}, State) ->
    {noreply, State};
info({'DOWN', Ref, process, _Pid, Reason}, #state{partner_ref = Ref} = State) ->
    {stop, {partner_down, dcp_log:cause(Reason)}, State};
info({'EXIT', _PortOrPid, normal}, State) ->
    %% our socket's port, or the connector that handed over the socket
    {noreply, State};
info({'EXIT', Pid, Reason}, #state{connector = Pid} = State) when is_pid(Pid) ->
    connect_failed({connector_down, Reason}, State);
info({'EXIT', _PortOrPid, Reason}, State) ->
    %% our writer (a send failed: `{send_failed, Side, Why}') or our parent
    {stop, Reason, State};
info(Info, #state{status = connecting, name = Name} = State) ->
    ?LOG_WARNING("~s: unexpected message while connecting ~0p", [Name, Info], ?LOG_META),
    {noreply, State};
info(Info, #state{module = Module, mod_state = ModState, conn = Conn} = State) ->
    case Module:handle_info(Info, ModState, Conn) of
        {noreply, ModState1} ->
            flush_after_callback(State#state{mod_state = ModState1});
        {stop, Reason, ModState1} ->
            {stop, Reason, State#state{mod_state = ModState1}}
    end.

%% Reads on only while the partner's writer and the partner keep up.
activate_or_stop(State) ->
    case maybe_activate(State) of
        {ok, State1} -> {noreply, State1};
        {error, Reason} -> {stop, socket_stop_reason(State, Reason), State}
    end.

maybe_activate(#state{armed = true} = State) ->
    {ok, State};
maybe_activate(#state{partner_writer = undefined} = State) ->
    {ok, State};
maybe_activate(#state{unacked_bytes = U, unacked_batches = B} = State)
  when U > ?MAX_UNACKED_BYTES; B >= ?MAX_EVENT_BATCHES ->
    {ok, State};
maybe_activate(State) ->
    case activate(State) of
        ok -> {ok, State#state{armed = true}};
        {error, _} = Error -> Error
    end.

%% One feed, the events in order, one write to the partner's writer. Our own frames waiting for a
%% boundary, or a pending discard, take the slow path that cuts the chunk where the frame being
%% forwarded ends.
process_chunk(Chunk, #state{inject = [], discard = false} = State) ->
    feed_and_forward(Chunk, count_chunk(State));
process_chunk(Chunk, #state{discard = active} = State) ->
    %% a shut consumer: our own frames still go out, what the node sends does not
    case feed(count_chunk(State), Chunk) of
        {ok, _Dropped, Events, State1} -> handle_frames([], 0, Events, State1);
        {error, Reason, State1} -> {stop, Reason, State1}
    end;
process_chunk(Chunk, State) ->
    State1 = count_chunk(State),
    Remaining = State1#state.forward_remaining,
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
                            handle_frames(Out, byte_size(Chunk) + iolist_size(Own),
                                          Events1 ++ Events2, State4);
                        {error, Reason, State4} ->
                            {stop, Reason, State4}
                    end;
                {error, Reason, State2} ->
                    {stop, Reason, State2}
            end
    end.

feed_and_forward(Chunk, State) ->
    case feed(State, Chunk) of
        {ok, Forward, Events, State1} ->
            handle_frames(Forward, byte_size(Chunk), Events, State1);
        {error, Reason, State1} ->
            {stop, Reason, State1}
    end.

%% Events before the write: the side module (and through the producer conn, the consumer conn)
%% learns of a frame before the node it goes to can answer it, so an answer arriving on the other
%% socket never overtakes the frame it answers (a takeover's set-vbucket-state, a stream end
%% racing an add's answer). What is forwarded is accounted as the whole chunk it came from (its
%% sub-binaries keep the chunk alive until written).
handle_frames(Forward, Size, Events, State) ->
    case dispatch(Events, State) of
        {ok, State1} ->
            State2 = sync_partner(Events, State1),
            flush_inject(note_traffic(Size, forward(Forward, Size, State2)));
        {stop, _, _} = Stop ->
            Stop
    end.

%% After a batch of events the partner may have been sent messages: it acknowledges this marker
%% once it has handled them, which bounds what waits in its mailbox.
sync_partner([], State) ->
    State;
sync_partner(_Events, #state{conn = #{partner := {Pid, _}}, unacked_batches = B} = State) ->
    Pid ! {'$dcp_sync', self()},
    State#state{unacked_batches = B + 1};
sync_partner(_Events, State) ->
    State.

feed_head(<<>>, State) ->
    {ok, [], [], State};
feed_head(Head, State) ->
    feed(State, Head).

count_chunk(#state{chunks = C} = State) ->
    State#state{chunks = C + 1}.

feed(#state{splitter = Splitter, side = Side, bytes_in = In} = State, Chunk) ->
    State1 = State#state{bytes_in = In + byte_size(Chunk)},
    case dcp_splitter:feed(Splitter, Chunk) of
        {ok, Forward, Events, Remaining, Splitter1} ->
            {ok, Forward, Events,
             State1#state{splitter = Splitter1, forward_remaining = Remaining}};
        {error, Reason} ->
            {error, {splitter_error, Side, Reason}, State1}
    end.

forward([], _Size, State) ->
    State;
forward(<<>>, _Size, State) ->
    State;
forward(IoData, Size, #state{partner_writer = W, unacked_bytes = U} = State) ->
    ok = dcp_proxy_writer:write(W, IoData, Size),
    State#state{unacked_bytes = U + Size}.

dispatch([], State) ->
    {ok, State};
dispatch([Event | Events], #state{module = Module, mod_state = ModState, conn = Conn} = State) ->
    case Module:handle_event(Event, ModState, Conn) of
        {ok, ModState1} -> dispatch(Events, State#state{mod_state = ModState1});
        {stop, Reason, ModState1} -> {stop, Reason, State#state{mod_state = ModState1}}
    end.

%% Queues our own frames now if the partner's socket is at a frame boundary; else the next chunk
%% does it.
flush_inject(#state{inject = []} = State) ->
    {ok, State};
flush_inject(#state{inject = Inject, discard = Discard} = State) ->
    case Discard =:= active orelse State#state.forward_remaining =:= 0 of
        true ->
            Own = lists:reverse(Inject),
            State1 = State#state{inject = [], injected = State#state.injected + length(Own)},
            {ok, forward(Own, iolist_size(Own), State1)};
        false ->
            {ok, State}
    end.

flush_after_callback(State) ->
    {ok, State1} = flush_inject(State),
    {noreply, State1}.

%% The `traffic' event (dcp_events; the traffic monitor is one of its handlers) at most every
%% 100 ms while frames flow: bytes read since the last one, and the frames the splitter counted.
note_traffic(_Size, #state{handlers = []} = State) ->
    State;
note_traffic(Size, #state{traffic = T, conn = Conn} = State) ->
    case dcp_events:traffic_note(T, Size, 0, erlang:monotonic_time(millisecond)) of
        {wait, T1} ->
            State#state{traffic = T1};
        {report, Counts, T1} ->
            Frames = maps:get(frames, dcp_splitter:stats(State#state.splitter), 0),
            ok = dcp_events:emit(Conn, traffic,
                                 Counts#{frames => max(0, Frames - State#state.frames_reported)}),
            State#state{traffic = T1, frames_reported = Frames}
    end.

activate(#state{conn = #{socket := {gen_tcp, S}}}) ->
    inet:setopts(S, [{active, once}]);
activate(#state{conn = #{socket := {ssl, S}}}) ->
    ssl:setopts(S, [{active, once}]).

socket_stop_reason(#state{side = Side}, Reason) ->
    {socket_error, Side, Reason}.

stats_map(#state{status = connecting, side = Side, name = Name, deferred = Deferred}) ->
    #{side => Side, connection_name => Name, state => connecting,
      waiting_calls => length(Deferred)};
stats_map(#state{splitter = Splitter, chunks = Chunks, bytes_in = BytesIn, injected = Injected,
                 inject = Inject, side = Side, name = Name} = State) ->
    #{side => Side, connection_name => Name, state => connected, chunks => Chunks,
      bytes_in => BytesIn, own_batches_sent => Injected, own_batches_waiting => length(Inject),
      unacked_bytes => State#state.unacked_bytes,
      unacked_event_batches => State#state.unacked_batches,
      reading => State#state.armed,
      splitter => dcp_splitter:stats(Splitter)}.

%% ---- shut and stop ----

terminate(Reason, #state{status = connecting, side = Side, deferred = Deferred,
                         connector = Connector}) ->
    _ = is_pid(Connector) andalso exit(Connector, kill),
    log_stopped(Reason),
    [gen_server:reply(From, {error, {connection_lost, lost_reason(Side, Reason)}})
     || {_Request, From} <- Deferred],
    ok;
terminate(Reason, #state{module = Module, mod_state = ModState, conn = Conn, writer = Writer,
                         deferred = Deferred}) ->
    #{socket := Sock} = Conn,
    Module:terminate(Reason, ModState, Conn),
    [gen_server:reply(From, {error, {connection_lost, Reason}}) || {_Request, From} <- Deferred],
    log_stopped(Reason),
    %% the writer may be stuck in a send: it goes first, then the socket
    unlink(Writer),
    exit(Writer, kill),
    socket_close(Sock).

%% Only a stop on its own is worth a notice: a partner's is the partner's line.
log_stopped({shutdown, {partner_down, _}} = Reason) ->
    dcp_log:info(connection_stopped, #{reason => Reason});
log_stopped(Reason) ->
    dcp_log:stopped(connection_stopped, Reason).

lost_reason(Side, {shutdown, Reason}) -> lost_reason(Side, Reason);
lost_reason(_Side, {_, _} = Reason) -> Reason;
lost_reason(Side, Reason) -> {Side, Reason}.

%% No credentials are kept in the state; crash reports get a summary without the queued frames
%% and the splitter resource.
format_status(#{state := #state{} = State} = Status) ->
    #state{module = Module, mod_state = ModState, side = Side, name = Name, conn = Conn,
           inject = Inject, discard = Discard, chunks = Chunks, bytes_in = BytesIn,
           status = St} = State,
    Partner = case Conn of
                  #{partner := P} -> P;
                  _ -> undefined
              end,
    Status#{state => #{module => Module, side => Side, connection_name => Name, status => St,
                       partner => Partner, discard => Discard,
                       own_batches_waiting => length(Inject), chunks => Chunks,
                       bytes_in => BytesIn, unacked_bytes => State#state.unacked_bytes,
                       mod_state => ModState}};
format_status(Status) ->
    Status.

%% ---- sockets ----

socket_send({gen_tcp, S}, Data) -> gen_tcp:send(S, Data);
socket_send({ssl, S}, Data) -> ssl:send(S, Data).

socket_recv({gen_tcp, S}, N, Timeout) -> gen_tcp:recv(S, N, Timeout);
socket_recv({ssl, S}, N, Timeout) -> ssl:recv(S, N, Timeout).

socket_close({gen_tcp, S}) -> gen_tcp:close(S);
socket_close({ssl, S}) -> ssl:close(S).

socket_controlling_process({gen_tcp, S}, Pid) -> gen_tcp:controlling_process(S, Pid);
socket_controlling_process({ssl, S}, Pid) -> ssl:controlling_process(S, Pid).
