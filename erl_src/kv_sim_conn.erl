%% @doc One connection to a `kv_sim' node: the socket, the memcached handshake, the node's faults and
%% the writes. Once DCP_OPEN opened the node's kind of connection, DCP requests go to its engine,
%% `kv_sim_consumer' or `kv_sim_producer'. Frames are read with `mcbp:decode/1' and built with
%% `dcp_commands' (one codec).
%%
%% Everything a turn writes (the answers to one socket chunk, or one batch of a producer's stream) goes
%% out in one write, so frames that kv_engine sends back to back also reach the peer back to back.
-module(kv_sim_conn).

-include("mcbp.hrl").

-behaviour(gen_server).

-export([start/3]).

%% What an engine asks of its connection.
-export([answer/4, out/2, own_opaque/1, fault/3, later/2, log_info/2, collections/1]).

-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([conn/0, engine/0, control/0, turn/1]).

-define(DOMAIN, #{domain => [dcp_proxy, kv_sim]}).

%% An engine's own stream opaques start above every vbucket id, so they never equal one.
-define(FIRST_OWN_OPAQUE, 16#10000).
%% memcached's STAT opcode (ns_server's `dcp-vbtakeover' group is read with it).
-define(STAT_OPCODE, 16#10).
%% How long a STATS call waits for the producer connection it asks about.
-define(STATS_WAIT_MS, 5000).

-record(conn, {config :: kv_sim:node_config(),
               transport :: gen_tcp | ssl,
               sock :: term(),
               buf = <<>> :: binary(),
               authenticated = false :: boolean(),
               bucket_selected = false :: boolean(),
               opened = false :: boolean(),
               %% HELLO granted collections: keys carry their collection id
               collections = false :: boolean(),
               %% what HELLO granted and DCP_OPEN's flags word (for kv_sim_validate)
               features = [] :: [dcp_commands:feature() | {unknown, 0..16#ffff}],
               open_flags = 0 :: non_neg_integer(),
               engine_mod :: kv_sim_consumer | kv_sim_producer,
               engine :: engine(),
               out = [] :: [iodata()],              % this turn's writes, newest first
               rand :: rand:state(),
               faults = none :: kv_sim_faults:table(), % as the turn began
               next_opaque = ?FIRST_OWN_OPAQUE :: non_neg_integer()}).

-opaque conn() :: #conn{}.
-type engine() :: kv_sim_consumer:consumer() | kv_sim_producer:producer().
%% A DCP_CONTROL the connection accepted, as an engine reads it.
-type control() :: {connection_buffer_size, non_neg_integer()}
                 | {send_stream_end_on_client_close_stream, boolean()}
                 | {enable_noop, boolean()}
                 | {set_noop_interval, pos_integer()}
                 | {enable_sync_writes, boolean()}
                 | {consumer_name, binary()}
                 | other.
%% What an engine's step gives back: go on, or close the socket (after writing what the turn wrote).
-type turn(Engine) :: {ok, Engine, conn()} | {close, term(), Engine, conn()}.

%% An engine: the DCP side of the node's role, over its own state. Its steps thread the connection
%% through for the writes, faults and own opaques they need (the exports below).
-callback new(kv_sim:node_config()) -> engine().
%% DCP_OPEN opened the connection (its answer is in this turn's write); `consumer_name' is what its
%% JSON value named, if it did.
-callback open(engine(), #{consumer_name := binary() | undefined}, conn()) -> {engine(), conn()}.
-callback control(control(), engine(), conn()) -> {engine(), conn()}.
%% A DCP request once the connection is open (`Size': its bytes on the wire).
-callback request(0..255, mcbp:frame(), non_neg_integer(), engine(), conn()) -> turn(engine()).
-callback response(mcbp:frame(), engine(), conn()) -> turn(engine()).
%% A message the engine sent itself with `later/2'.
-callback info(term(), engine(), conn()) -> turn(engine()).
%% The turn's frames were all read: what the engine writes at its end (before the write goes out).
-callback end_turn(engine(), conn()) -> {engine(), conn()}.
%% The socket closes after this turn's write.
-callback closing(engine()) -> engine().

%% ---- connect ----

%% @doc Starts the process for an accepted socket; it waits for `{kv_sim_socket_ready, Sock}' (sent once
%% the acceptor made it the socket's owner) before reading.
-spec start(kv_sim:node_config(), gen_tcp | ssl, term()) -> {ok, pid()} | {error, term()}.
start(Config, Transport, Sock) ->
    gen_server:start(?MODULE, {Config, Transport, Sock}, []).

%% The engine of a consumer or producer node is made up front; a `node' picks its engine at DCP_OPEN.
init({#{node := Node, seed := Seed, role := Role} = Config, Transport, Sock}) ->
    _ = erlang:monitor(process, Node),
    %% a `node' picks its engine when DCP_OPEN says which kind of connection this is
    Mod = case Role of
              consumer -> kv_sim_consumer;
              producer -> kv_sim_producer;
              node -> kv_sim_producer
          end,
    {ok, #conn{config = Config, transport = Transport, sock = Sock, engine_mod = Mod,
               engine = Mod:new(Config),
               rand = rand:seed_s(exsss, erlang:phash2({Seed, erlang:unique_integer()}))}}.

handle_call({takeover_stats, VB}, _From, #conn{engine_mod = kv_sim_producer, engine = E} = C) ->
    {reply, kv_sim_producer:takeover_stats(VB, E), C};
handle_call({takeover_stats, _VB}, _From, C) ->
    {reply, {0, <<"does_not_exist">>}, C};
handle_call(_Request, _From, C) ->
    {reply, {error, unknown_call}, C}.

handle_cast(_Msg, C) ->
    {noreply, C}.

handle_info({kv_sim_socket_ready, _}, #conn{transport = ssl, sock = Sock} = C) ->
    case ssl:handshake(Sock, 10000) of
        {ok, SslSock} ->
            activate(C#conn{sock = SslSock}),
            {noreply, C#conn{sock = SslSock}};
        {error, Reason} ->
            {stop, normal, log_close({tls_handshake_failed, Reason}, C)}
    end;
handle_info({kv_sim_socket_ready, _}, C) ->
    activate(C),
    {noreply, C};
handle_info(kv_sim_read_again, C) ->
    %% the `stop_reading' fault: reads on once it is cleared
    activate(C),
    {noreply, C};
handle_info({Tag, _Sock, Data}, C) when Tag =:= tcp; Tag =:= ssl ->
    received(Data, C);
handle_info({Tag, _Sock}, C) when Tag =:= tcp_closed; Tag =:= ssl_closed ->
    {stop, normal, C};
handle_info({Tag, _Sock, Reason}, C) when Tag =:= tcp_error; Tag =:= ssl_error ->
    {stop, normal, log_close({socket_error, Reason}, C)};
handle_info({send_later, Bytes}, C) ->
    finish_turn({ok, refresh_faults(out(Bytes, C))});
handle_info({'DOWN', _Ref, process, _Node, _Reason}, C) ->
    {stop, normal, C};
handle_info({kv_sim_engine, Msg}, #conn{engine_mod = Mod, engine = E} = C) ->
    %% An engine's own timers (a producer's next batch, its noops).
    finish_turn(engine(Mod:info(Msg, E, refresh_faults(C))));
handle_info(_Info, C) ->
    {noreply, C}.

terminate(_Reason, #conn{transport = Transport, sock = Sock}) ->
    _ = Transport:close(Sock),
    ok.

%% A failure here means the socket is gone, and its closed message is already on its way. While the
%% connection-wide `stop_reading' fault is set the socket is not read (looked at every 20 ms).
activate(#conn{config = #{faults := Faults}} = C) ->
    case kv_sim_faults:lookup(kv_sim_faults:for_turn(Faults), all, stop_reading) of
        stop_reading ->
            _ = erlang:send_after(20, self(), kv_sim_read_again),
            ok;
        none ->
            arm(C)
    end.

arm(#conn{transport = gen_tcp, sock = Sock}) ->
    _ = inet:setopts(Sock, [{active, once}]),
    ok;
arm(#conn{transport = ssl, sock = Sock}) ->
    _ = ssl:setopts(Sock, [{active, once}]),
    ok.

log_close(Reason, #conn{config = #{node := Node}} = C) ->
    logger:info(#{what => kv_sim_connection_closed, reason => Reason}, ?DOMAIN),
    Node ! {kv_sim_closed, self(), Reason},
    C.

%% @doc Logs an engine's event in the node's log domain.
-spec log_info(map(), conn()) -> conn().
log_info(Report, C) ->
    logger:info(Report, ?DOMAIN),
    C.

%% ---- reading: one socket chunk is one turn ----

received(Data, #conn{buf = <<>>} = C) ->
    activate(C),
    finish_turn(frames(Data, refresh_faults(C)));
received(Data, #conn{buf = Buf} = C) ->
    activate(C),
    finish_turn(frames(<<Buf/binary, Data/binary>>, refresh_faults(C#conn{buf = <<>>}))).

frames(Bin, C) ->
    case mcbp:decode(Bin) of
        {ok, Frame, Rest} ->
            case checked_frame(Frame, byte_size(Bin) - byte_size(Rest), C) of
                {ok, C1} -> frames(Rest, C1);
                {close, _, _} = Close -> Close
            end;
        {more, _} ->
            {ok, C#conn{buf = Bin}};
        {error, Reason} ->
            {close, {bad_frame, Reason}, C}
    end.

%% memcached's checks (kv_sim_validate) before anything acts on a frame: a violation closes.
checked_frame(Frame, Size, C) ->
    Dcp = case C of
              #conn{opened = false} -> none;
              #conn{engine_mod = kv_sim_consumer} -> consumer;
              #conn{engine_mod = kv_sim_producer} -> producer
          end,
    Context = #{authenticated => C#conn.authenticated, features => C#conn.features, dcp => Dcp,
                open_flags => C#conn.open_flags,
                accept_alt_requests => maps:get(accept_alt_requests, C#conn.config)},
    case kv_sim_validate:check(Frame, Context) of
        ok -> frame(Frame, Size, C);
        {error, Reason} -> {close, Reason, C}
    end.

%% Writes what the turn produced, then either goes on or closes the socket as a fault or an error said.
finish_turn({ok, #conn{engine_mod = Mod, engine = E} = C}) ->
    {E1, C1} = Mod:end_turn(E, C),
    case flush(C1#conn{engine = E1}) of
        {ok, C2} -> {noreply, C2};
        {error, Reason} -> {stop, normal, log_close({send_failed, Reason}, C1)}
    end;
finish_turn({close, Reason, #conn{engine_mod = Mod, engine = E} = C}) ->
    _ = flush(C#conn{engine = Mod:closing(E)}),
    {stop, normal, log_close(Reason, C)}.

%% An engine's step, back in the connection's terms.
engine({ok, E, C}) -> {ok, C#conn{engine = E}};
engine({close, Reason, E, C}) -> {close, Reason, C#conn{engine = E}}.

frame(#{magic := Magic} = Frame, Size, C) when Magic =:= req; Magic =:= alt_req ->
    #{opcode := Opcode, vbucket := VB} = Frame,
    case fault(C, VB, {close_socket_on, Opcode}) of
        {close_socket_on, _} ->
            {close, {fault, close_socket_on, mcbp:opcode_name(Opcode)}, C};
        none ->
            request(Opcode, Frame, Size, C)
    end;
frame(#{magic := Magic} = Frame, _Size, #conn{engine_mod = Mod, engine = E} = C)
  when Magic =:= res; Magic =:= alt_res ->
    engine(Mod:response(Frame, E, C));
frame(_ServerFrame, _Size, C) ->
    {ok, C}.

%% memcached's order: authenticate, select a bucket, open DCP, then the DCP commands of the type opened.
request(Opcode, #{opaque := Opaque, vbucket := VB} = Frame, Size, C) ->
    case stage(Opcode, C) of
        handshake ->
            handshake(Opcode, Frame, C);
        {refuse, Status} ->
            answer(Opcode, VB, dcp_commands:response(Opcode, Status, Opaque), C);
        engine ->
            #conn{engine_mod = Mod, engine = E} = C,
            engine(Mod:request(Opcode, Frame, Size, E, C))
    end.

stage(Op, _C) when Op =:= ?HELLO; Op =:= ?SASL_LIST_MECHS; Op =:= ?SASL_AUTH -> handshake;
stage(_Op, #conn{authenticated = false}) -> {refuse, ?EACCESS};
stage(Op, _C) when Op =:= ?SELECT_BUCKET; Op =:= ?NOOP -> handshake;
stage(_Op, #conn{bucket_selected = false}) -> {refuse, ?NO_BUCKET};
stage(?STAT_OPCODE, _C) -> handshake;
stage(Op, _C) when Op =:= ?DCP_OPEN; Op =:= ?DCP_CONTROL; Op =:= ?DCP_NOOP -> handshake;
stage(_Op, #conn{opened = false}) -> {refuse, ?EINVAL};
stage(_Op, _C) -> engine.

%% @doc Whether the connection's HELLO negotiated collections (keys are collection-prefixed).
-spec collections(conn()) -> boolean().
collections(#conn{collections = Collections}) ->
    Collections.

%% ---- handshake ----

%% What the client sent in its handshake, for `kv_sim:handshakes/1'.
record(Fields, #conn{config = #{node := Node}}) ->
    Node ! {kv_sim_record, self(), Fields},
    ok.

handshake(?HELLO, #{opaque := Opaque, vbucket := VB, key := Key, value := Value}, C) ->
    Supported = maps:get(hello_features, C#conn.config),
    Asked = dcp_commands:hello_features(Value),
    record(#{hello_key => Key, hello_features => Asked, hello_value => Value}, C),
    Granted = [F || F <- Asked, lists:member(F, Supported)],
    answer(?HELLO, VB, dcp_commands:hello_response(Opaque, Granted),
           C#conn{collections = lists:member(collections, Granted), features = Granted});
handshake(?SASL_LIST_MECHS, #{opaque := Opaque, vbucket := VB}, C) ->
    answer(?SASL_LIST_MECHS, VB,
           dcp_commands:response(?SASL_LIST_MECHS, ?SUCCESS, Opaque, #{value => <<"PLAIN">>}), C);
handshake(?SASL_AUTH, #{opaque := Opaque, vbucket := VB, key := Mech, value := Value}, C) ->
    #{user := User, password := Password} = C#conn.config,
    Valid = Mech =:= <<"PLAIN">> andalso
        case binary:split(Value, <<0>>, [global]) of
            [_AuthzId, User, Password] -> true;
            _ -> false
        end,
    Status = case Valid of
                 true -> ?SUCCESS;
                 false -> ?AUTH_ERROR
             end,
    answer(?SASL_AUTH, VB, dcp_commands:response(?SASL_AUTH, Status, Opaque),
           C#conn{authenticated = Valid});
handshake(?SELECT_BUCKET, #{opaque := Opaque, vbucket := VB, key := Bucket}, C) ->
    case Bucket =:= maps:get(bucket, C#conn.config) of
        true ->
            answer(?SELECT_BUCKET, VB, dcp_commands:response(?SELECT_BUCKET, ?SUCCESS, Opaque),
                   C#conn{bucket_selected = true});
        false ->
            answer(?SELECT_BUCKET, VB,
                   dcp_commands:response(?SELECT_BUCKET, ?KEY_ENOENT, Opaque), C)
    end;
handshake(?NOOP, #{opaque := Opaque, vbucket := VB}, C) ->
    answer(?NOOP, VB, dcp_commands:response(?NOOP, ?SUCCESS, Opaque), C);
handshake(?DCP_OPEN, Frame, #conn{opened = false} = C) ->
    %% kv_sim_validate has checked it as memcached does (extras, name, the JSON value)
    open(Frame, kv_sim_validate:consumer_name(Frame), C);
handshake(?DCP_OPEN, #{opaque := Opaque, vbucket := VB}, C) ->
    answer(?DCP_OPEN, VB, dcp_commands:response(?DCP_OPEN, ?EINVAL, Opaque), C);
handshake(Op, Frame, C) ->
    handshake_rest(Op, Frame, C).

open(#{opaque := Opaque, vbucket := VB} = Frame, ConsumerName, C) ->
    <<_:32, Flags:32>> = maps:get(extras, Frame),
    record(#{open_name => maps:get(key, Frame, <<>>), open_flags => Flags,
             open_value => maps:get(value, Frame, <<>>),
             open_datatype => maps:get(datatype, Frame, 0)}, C),
    Type = case mcbp:dcp_fields(Frame) of
               #{producer := true} -> producer;
               #{producer := false} -> consumer
           end,
    %% A producer node streams its seeded documents and a consumer node stores what it is sent; a
    %% connection of the other kind would have nothing to work on.
    #{role := Role, node := Node} = Config = C#conn.config,
    case Type =:= Role orelse Role =:= node of
        true ->
            {Mod, E} = case {Role, Type} of
                           {node, consumer} -> {kv_sim_consumer, kv_sim_consumer:new(Config)};
                           _ -> {C#conn.engine_mod, C#conn.engine}
                       end,
            Node ! {kv_sim_dcp_open, self(), Type, maps:get(key, Frame)},
            {ok, C1} = answer(?DCP_OPEN, VB, dcp_commands:response(?DCP_OPEN, ?SUCCESS, Opaque),
                              C#conn{opened = true, engine_mod = Mod,
                                     open_flags = Flags}),
            {E1, C2} = Mod:open(E, #{consumer_name => ConsumerName}, C1),
            {ok, C2#conn{engine = E1}};
        false ->
            answer(?DCP_OPEN, VB, dcp_commands:response(?DCP_OPEN, ?NOT_SUPPORTED, Opaque), C)
    end.

handshake_rest(?DCP_CONTROL, #{opaque := Opaque, vbucket := VB, key := Key, value := Value}, C) ->
    case control(Key, Value) of
        {ok, Control} ->
            #conn{engine_mod = Mod, engine = E} = C,
            {E1, C1} = Mod:control(Control, E, C),
            answer(?DCP_CONTROL, VB, dcp_commands:response(?DCP_CONTROL, ?SUCCESS, Opaque),
                   C1#conn{engine = E1});
        einval ->
            answer(?DCP_CONTROL, VB, dcp_commands:response(?DCP_CONTROL, ?EINVAL, Opaque), C)
    end;
handshake_rest(?DCP_NOOP, #{opaque := Opaque, vbucket := VB}, C) ->
    answer(?DCP_NOOP, VB, dcp_commands:noop_response(Opaque), C);
handshake_rest(?STAT_OPCODE, #{opaque := Opaque, vbucket := VB, key := Key}, C) ->
    answer(?STAT_OPCODE, VB, stats(Key, Opaque, C), C).

%% memcached answers a STATS group with one response per stat and an empty one to end it. Only
%% `dcp-vbtakeover <vb> <connection>' is known here: the named producer connection's estimate of what
%% it has left to send of the vbucket and its stream's status, as kv_engine reports them.
stats(<<"dcp-vbtakeover ", Args/binary>>, Opaque, C) ->
    #{vbucket_states := Table, node := Node} = C#conn.config,
    [VBText, Name] = case binary:split(Args, <<" ">>) of
                         [V, N] -> [V, N];
                         [V] -> [V, <<>>]
                     end,
    VB = try binary_to_integer(VBText) catch error:badarg -> -1 end,
    case VB >= 0 andalso kv_sim_vbuckets:state(Table, VB) =/= undefined of
        false ->
            dcp_commands:response(?STAT_OPCODE, ?NOT_MY_VBUCKET, Opaque);
        true ->
            {Estimate, Status} =
                case gen_server:call(Node, {dcp_connection, Name}) of
                    [Pid | _] when Pid =:= self() -> {0, <<"does_not_exist">>};
                    [Pid | _] ->
                        try gen_server:call(Pid, {takeover_stats, VB}, ?STATS_WAIT_MS)
                        catch exit:_ -> {0, <<"calculating-item-count">>}
                        end;
                    [] -> {0, <<"does_not_exist">>}
                end,
            [stat(<<"estimate">>, integer_to_binary(Estimate), Opaque),
             stat(<<"chk_items">>, <<"0">>, Opaque),
             stat(<<"status">>, Status, Opaque),
             stat(<<>>, <<>>, Opaque)]
    end;
stats(<<"dcp">>, Opaque, C) ->
    %% kv_engine's per-connection type stat, which ns_server's get_connections reads
    #{node := Node} = C#conn.config,
    [[stat(<<"eq_dcpq:", Name/binary, ":type">>, atom_to_binary(Type), Opaque)
      || {Type, Name} <- gen_server:call(Node, connections)],
     stat(<<>>, <<>>, Opaque)];
stats(_Group, Opaque, _C) ->
    dcp_commands:response(?STAT_OPCODE, ?KEY_ENOENT, Opaque).

stat(Key, Value, Opaque) ->
    dcp_commands:response(?STAT_OPCODE, ?SUCCESS, Opaque, #{key => Key, value => Value}).

%% Every control is accepted (as kv_engine accepts the ones ns_server sends); the ones a producer acts
%% on are read, and refused when their value is not one.
control(<<"connection_buffer_size">>, Value) ->
    integer_control(connection_buffer_size, Value, 0);
control(<<"send_stream_end_on_client_close_stream">>, Value) ->
    {ok, {send_stream_end_on_client_close_stream, Value =:= <<"true">>}};
control(<<"enable_noop">>, Value) ->
    {ok, {enable_noop, Value =:= <<"true">>}};
control(<<"set_noop_interval">>, Value) ->
    integer_control(set_noop_interval, Value, 1);
control(<<"enable_sync_writes">>, <<"true">>) ->
    {ok, {enable_sync_writes, true}};
control(<<"enable_sync_writes">>, <<"false">>) ->
    {ok, {enable_sync_writes, false}};
control(<<"enable_sync_writes">>, _Value) ->
    einval;
control(<<"consumer_name">>, <<>>) ->
    einval;
control(<<"consumer_name">>, Name) ->
    {ok, {consumer_name, Name}};
control(_Key, _Value) ->
    {ok, other}.

integer_control(Name, Value, Min) ->
    try binary_to_integer(Value) of
        N when N >= Min -> {ok, {Name, N}};
        _ -> einval
    catch
        error:badarg -> einval
    end.

%% ---- what an engine asks of its connection ----

%% @doc Adds a frame to this turn's write.
-spec out(iodata(), conn()) -> conn().
out(Bytes, C) ->
    C#conn{out = [Bytes | C#conn.out]}.

%% @doc The answer to a request, unless a fault drops or delays it.
-spec answer(0..255, dcp_commands:vbucket(), iodata(), conn()) -> {ok, conn()}.
answer(Opcode, VB, Bytes, C) ->
    case fault(C, VB, {drop_answer, Opcode}) of
        {drop_answer, _} ->
            {ok, C};
        none ->
            case fault(C, VB, {delay_answer, Opcode}) of
                {delay_answer, _, Ms} ->
                    _ = erlang:send_after(Ms, self(), {send_later, Bytes}),
                    {ok, C};
                none ->
                    {ok, out(Bytes, C)}
            end
    end.

%% @doc An opaque for a request the node itself sends (stream requests, controls, acks, noops).
-spec own_opaque(conn()) -> {dcp_commands:opaque(), conn()}.
own_opaque(#conn{next_opaque = Opaque} = C) ->
    Next = case Opaque of
               16#ffffffff -> ?FIRST_OWN_OPAQUE;
               _ -> Opaque + 1
           end,
    {Opaque, C#conn{next_opaque = Next}}.

%% @doc The fault set under `Name' for this vbucket (or all), as this turn began; `none' if none is.
-spec fault(conn(), dcp_commands:vbucket() | all, term()) -> kv_sim:fault() | none.
fault(#conn{faults = Faults}, VB, Name) ->
    kv_sim_faults:lookup(Faults, VB, Name).

%% @doc Sends the engine `Msg' (to its `info/3') in `Ms' milliseconds, after what is already queued.
-spec later(non_neg_integer(), term()) -> ok.
later(0, Msg) ->
    self() ! {kv_sim_engine, Msg},
    ok;
later(Ms, Msg) ->
    _ = erlang:send_after(Ms, self(), {kv_sim_engine, Msg}),
    ok.

refresh_faults(#conn{config = #{faults := Faults}} = C) ->
    C#conn{faults = kv_sim_faults:for_turn(Faults)}.

%% ---- writing ----

flush(#conn{out = []} = C) ->
    {ok, C};
flush(#conn{out = Out} = C) ->
    Data = lists:reverse(Out),
    Result = case fault(C, all, chunked_writes) of
                 {chunked_writes, Max} -> send_chunks(iolist_to_binary(Data), Max, C);
                 none -> {send(C, Data), C}
             end,
    case Result of
        {ok, C1} -> {ok, C1#conn{out = []}};
        {{error, _} = Error, _} -> Error
    end.

send_chunks(<<>>, _Max, C) ->
    {ok, C};
send_chunks(Bin, Max, C) ->
    {Len, Rand} = rand:uniform_s(max(1, Max), C#conn.rand),
    N = min(Len, byte_size(Bin)),
    <<Chunk:N/binary, Rest/binary>> = Bin,
    case send(C, Chunk) of
        ok -> send_chunks(Rest, Max, C#conn{rand = Rand});
        {error, _} = Error -> {Error, C}
    end.

send(#conn{transport = gen_tcp, sock = Sock}, Data) -> gen_tcp:send(Sock, Data);
send(#conn{transport = ssl, sock = Sock}, Data) -> ssl:send(Sock, Data).
