%% @doc One connection to a `kv_sim' node: the memcached handshake, then a DCP consumer or producer as
%% kv_engine behaves on the wire. Frames are read with `mcbp:decode/1' and built with `dcp_commands'
%% or, for a producer's mutations, `mcbp:encode/1' (one codec).
%%
%% Everything a turn writes (the answers to one socket chunk, or one batch of a producer's stream) goes
%% out in one write, so frames that kv_engine sends back to back also reach the peer back to back.
-module(kv_sim_conn).

-include("mcbp.hrl").

-behaviour(gen_server).

-export([start/3]).

-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(DOMAIN, #{domain => [dcp_proxy, kv_sim]}).

%% The consumer's own stream opaques start above every vbucket id, so they never equal one.
-define(FIRST_OWN_OPAQUE, 16#10000).
%% A producer turn sends at most this many frames (or bytes) before reading its socket again.
-define(BATCH_FRAMES, 1024).
-define(BATCH_BYTES, 1024 * 1024).
%% Frames in a row from one stream before the producer moves to the next (interleaving vbuckets).
-define(STREAM_TURN, 64).
%% The stream id put in a frame's framing extras by the `flexible_framing' fault (FrameInfo id 2).
-define(STREAM_ID_FRAME_INFO, 2).

-record(conn, {config :: kv_sim:node_config(),
               transport :: gen_tcp | ssl,
               sock :: term(),
               buf = <<>> :: binary(),
               authenticated = false :: boolean(),
               bucket_selected = false :: boolean(),
               type = none :: none | consumer | producer,
               out = [] :: [iodata()],             % this turn's writes, newest first
               rand :: rand:state(),
               faults_set = true :: boolean(),      % any fault set when this turn began
               %% consumer
               streams = #{} :: #{non_neg_integer() => map()},
               by_opaque = #{} :: #{non_neg_integer() => non_neg_integer()},
               next_opaque = ?FIRST_OWN_OPAQUE :: non_neg_integer(),
               answer_adds = [] :: [non_neg_integer()], % accepted adds, answered at the end of the turn
               flow_control = false :: boolean(),
               rx_unacked = 0 :: non_neg_integer(),
               high_seqnos = #{} :: #{non_neg_integer() => non_neg_integer()}, % this turn's, not yet stored
               rows = [] :: [{{non_neg_integer(), binary()}, non_neg_integer(), binary()}], % likewise
               %% producer
               flow_limit = 0 :: non_neg_integer(),     % 0 = no flow control
               tx_unacked = 0 :: non_neg_integer(),
               pstreams = #{} :: #{non_neg_integer() => map()},
               runnable = queue:new() :: queue:queue(non_neg_integer()),
               pump_scheduled = false :: boolean(),
               stream_end_on_close = false :: boolean(),
               noop_enabled = false :: boolean(),
               noop_interval = 0 :: non_neg_integer(),  % seconds; 0 = not set
               noop_timer = false :: boolean()}).

%% ---- connect ----

%% @doc Starts the process for an accepted socket; it waits for `{kv_sim_socket_ready, Sock}' (sent once
%% the acceptor made it the socket's owner) before reading.
-spec start(kv_sim:node_config(), gen_tcp | ssl, term()) -> {ok, pid()} | {error, term()}.
start(Config, Transport, Sock) ->
    gen_server:start(?MODULE, {Config, Transport, Sock}, []).

init({#{node := Node, seed := Seed} = Config, Transport, Sock}) ->
    _ = erlang:monitor(process, Node),
    {ok, #conn{config = Config, transport = Transport, sock = Sock,
               rand = rand:seed_s(exsss, erlang:phash2({Seed, erlang:unique_integer()}))}}.

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
handle_info({Tag, _Sock, Data}, C) when Tag =:= tcp; Tag =:= ssl ->
    received(Data, C);
handle_info({Tag, _Sock}, C) when Tag =:= tcp_closed; Tag =:= ssl_closed ->
    {stop, normal, C};
handle_info({Tag, _Sock, Reason}, C) when Tag =:= tcp_error; Tag =:= ssl_error ->
    {stop, normal, log_close({socket_error, Reason}, C)};
handle_info(pump, C) ->
    finish_turn(pump(refresh_faults(C#conn{pump_scheduled = false})));
handle_info(send_noop, C) ->
    finish_turn(send_noop(refresh_faults(C)));
handle_info({send_later, Bytes}, C) ->
    finish_turn({ok, refresh_faults(C#conn{out = [Bytes | C#conn.out]})});
handle_info({'DOWN', _Ref, process, _Node, _Reason}, C) ->
    {stop, normal, C};
handle_info(_Info, C) ->
    {noreply, C}.

terminate(_Reason, #conn{transport = Transport, sock = Sock}) ->
    _ = Transport:close(Sock),
    ok.

%% A failure here means the socket is gone, and its closed message is already on its way.
activate(#conn{transport = gen_tcp, sock = Sock}) ->
    _ = inet:setopts(Sock, [{active, once}]),
    ok;
activate(#conn{transport = ssl, sock = Sock}) ->
    _ = ssl:setopts(Sock, [{active, once}]),
    ok.

log_close(Reason, C) ->
    logger:info(#{what => kv_sim_connection_closed, reason => Reason}, ?DOMAIN),
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
            case frame(Frame, byte_size(Bin) - byte_size(Rest), C) of
                {ok, C1} -> frames(Rest, C1);
                {close, _, _} = Close -> Close
            end;
        {more, _} ->
            {ok, C#conn{buf = Bin}};
        {error, Reason} ->
            {close, {bad_frame, Reason}, C}
    end.

%% Writes what the turn produced, then either goes on or closes the socket as a fault or an error said.
finish_turn({ok, C}) ->
    C1 = ack_received(answer_accepted_adds(store_high_seqnos(store_rows(C)))),
    case flush(C1) of
        {ok, C2} -> {noreply, maybe_schedule_pump(C2)};
        {error, Reason} -> {stop, normal, log_close({send_failed, Reason}, C1)}
    end;
finish_turn({close, Reason, C}) ->
    _ = flush(store_high_seqnos(store_rows(C))),
    {stop, normal, log_close(Reason, C)}.

frame(#{magic := Magic} = Frame, Size, C) when Magic =:= req; Magic =:= alt_req ->
    #{opcode := Opcode, vbucket := VB} = Frame,
    case fault(C, VB, {close_socket_on, Opcode}) of
        {close_socket_on, _} ->
            {close, {fault, close_socket_on, dcp_commands:command_2_atom(Opcode)}, C};
        none ->
            request(Opcode, Frame, Size, C)
    end;
frame(#{magic := Magic} = Frame, _Size, C) when Magic =:= res; Magic =:= alt_res ->
    response(Frame, C);
frame(_ServerFrame, _Size, C) ->
    {ok, C}.

%% memcached's order: authenticate, select a bucket, open DCP, then the DCP commands of the type opened.
request(Opcode, #{opaque := Opaque, vbucket := VB} = Frame, Size, C) ->
    case stage(Opcode, C) of
        handshake -> handshake(Opcode, Frame, C);
        {refuse, Status} -> answer(Opcode, VB, dcp_commands:response(Opcode, Status, Opaque), C);
        consumer -> consumer_request(Opcode, Frame, Size, C);
        producer -> producer_request(Opcode, Frame, C)
    end.

stage(Op, _C) when Op =:= ?HELLO; Op =:= ?SASL_LIST_MECHS; Op =:= ?SASL_AUTH -> handshake;
stage(_Op, #conn{authenticated = false}) -> {refuse, ?EACCESS};
stage(Op, _C) when Op =:= ?SELECT_BUCKET; Op =:= ?NOOP -> handshake;
stage(_Op, #conn{bucket_selected = false}) -> {refuse, ?NO_BUCKET};
stage(Op, _C) when Op =:= ?DCP_OPEN; Op =:= ?DCP_CONTROL; Op =:= ?DCP_NOOP -> handshake;
stage(_Op, #conn{type = none}) -> {refuse, ?EINVAL};
stage(_Op, #conn{type = Type}) -> Type.

%% ---- handshake ----

handshake(?HELLO, #{opaque := Opaque, vbucket := VB, value := Value}, C) ->
    Supported = maps:get(hello_features, C#conn.config),
    Granted = [F || F <- dcp_commands:hello_features(Value), lists:member(F, Supported)],
    Codes = << <<(dcp_commands:hello_feature_code(F)):16>> || F <- Granted >>,
    answer(?HELLO, VB, dcp_commands:response(?HELLO, ?SUCCESS, Opaque, #{value => Codes}), C);
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
    {Status, C1} = case Valid of
                       true -> {?SUCCESS, C#conn{authenticated = true}};
                       false -> {?AUTH_ERROR, C#conn{authenticated = false}}
                   end,
    answer(?SASL_AUTH, VB, dcp_commands:response(?SASL_AUTH, Status, Opaque), C1);
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
handshake(?DCP_OPEN, #{opaque := Opaque, vbucket := VB} = Frame, #conn{type = none} = C) ->
    #{flags := Flags} = mcbp:dcp_fields(Frame),
    Type = case Flags band 1 of
               1 -> producer;
               0 -> consumer
           end,
    %% A producer node streams its seeded documents and a consumer node stores what it is sent; a
    %% connection of the other kind would have nothing to work on.
    case Type =:= maps:get(role, C#conn.config) of
        true ->
            answer(?DCP_OPEN, VB, dcp_commands:response(?DCP_OPEN, ?SUCCESS, Opaque),
                   C#conn{type = Type});
        false ->
            answer(?DCP_OPEN, VB, dcp_commands:response(?DCP_OPEN, ?NOT_SUPPORTED, Opaque), C)
    end;
handshake(?DCP_OPEN, #{opaque := Opaque, vbucket := VB}, C) ->
    answer(?DCP_OPEN, VB, dcp_commands:response(?DCP_OPEN, ?EINVAL, Opaque), C);
handshake(?DCP_CONTROL, #{opaque := Opaque, vbucket := VB, key := Key, value := Value}, C) ->
    {Status, C1} = control(Key, Value, C),
    answer(?DCP_CONTROL, VB, dcp_commands:response(?DCP_CONTROL, Status, Opaque), C1);
handshake(?DCP_NOOP, #{opaque := Opaque, vbucket := VB}, C) ->
    answer(?DCP_NOOP, VB, dcp_commands:noop_response(Opaque), C).

%% Every control is accepted (as kv_engine accepts the ones ns_server sends); the two a producer acts on
%% are read.
control(<<"connection_buffer_size">>, Value, C) ->
    try binary_to_integer(Value) of
        Size when Size >= 0 -> {?SUCCESS, C#conn{flow_limit = Size}};
        _ -> {?EINVAL, C}
    catch
        error:badarg -> {?EINVAL, C}
    end;
control(<<"send_stream_end_on_client_close_stream">>, Value, C) ->
    {?SUCCESS, C#conn{stream_end_on_close = Value =:= <<"true">>}};
control(<<"enable_noop">>, Value, C) ->
    {?SUCCESS, maybe_start_noops(C#conn{noop_enabled = Value =:= <<"true">>})};
control(<<"set_noop_interval">>, Value, C) ->
    try binary_to_integer(Value) of
        Seconds when Seconds > 0 -> {?SUCCESS, maybe_start_noops(C#conn{noop_interval = Seconds})};
        _ -> {?EINVAL, C}
    catch
        error:badarg -> {?EINVAL, C}
    end;
control(_Key, _Value, C) ->
    {?SUCCESS, C}.

%% A producer with noops enabled sends a DCP_NOOP every interval, as kv_engine does to check its peer.
maybe_start_noops(#conn{type = producer, noop_enabled = true, noop_interval = Seconds,
                        noop_timer = false} = C) when Seconds > 0 ->
    _ = erlang:send_after(Seconds * 1000, self(), send_noop),
    C#conn{noop_timer = true};
maybe_start_noops(C) ->
    C.

send_noop(#conn{noop_enabled = true} = C) ->
    {Opaque, C1} = own_opaque(C),
    {ok, maybe_start_noops(out(dcp_commands:noop_request(Opaque), C1#conn{noop_timer = false}))};
send_noop(C) ->
    {ok, C#conn{noop_timer = false}}.

%% ---- consumer node ----

consumer_request(?DCP_ADD_STREAM, #{vbucket := VB, opaque := Opaque} = Frame, _Size, C) ->
    Known = lists:member(VB, maps:get(vbuckets, C#conn.config)),
    case {fault(C, VB, add_stream_status), Known, maps:is_key(VB, C#conn.streams)} of
        {{add_stream_status, Status}, _, _} ->
            add_stream_answer(VB, Opaque, dcp_commands:status(Status), none, C);
        {none, false, _} ->
            add_stream_answer(VB, Opaque, ?NOT_MY_VBUCKET, none, C);
        {none, true, true} ->
            add_stream_answer(VB, Opaque, ?KEY_EEXISTS, none, C);
        {none, true, false} ->
            request_stream(VB, Opaque, Frame, C)
    end;
consumer_request(?DCP_CLOSE_STREAM, #{vbucket := VB, opaque := Opaque}, _Size, C) ->
    case maps:take(VB, C#conn.streams) of
        {#{stream_opaque := StreamOpaque}, Streams} ->
            C1 = C#conn{streams = Streams,
                        by_opaque = maps:remove(StreamOpaque, C#conn.by_opaque),
                        answer_adds = lists:delete(VB, C#conn.answer_adds)},
            answer(?DCP_CLOSE_STREAM, VB,
                   dcp_commands:response(?DCP_CLOSE_STREAM, ?SUCCESS, Opaque), C1);
        error ->
            answer(?DCP_CLOSE_STREAM, VB,
                   dcp_commands:response(?DCP_CLOSE_STREAM, ?KEY_ENOENT, Opaque), C)
    end;
consumer_request(Opcode, Frame, Size, C) ->
    %% Everything else comes from the producer through the proxy and counts toward flow control.
    stream_message(Opcode, Frame, count_received(Size, C)).

count_received(Size, #conn{flow_control = true, rx_unacked = Unacked} = C) ->
    C#conn{rx_unacked = Unacked + Size};
count_received(_Size, C) ->
    C.

%% kv_engine answers ADD_STREAM only once the producer answered the consumer's own STREAM_REQ, whose
%% opaque is the consumer's and not the proxy's.
request_stream(VB, AddOpaque, Frame, C) ->
    #{flags := Flags} = mcbp:dcp_fields(Frame),
    C1 = maybe_enable_flow_control(C),
    {StreamOpaque, C2} = own_opaque(C1),
    Start = high_seqno(C2, VB),
    Req = dcp_commands:stream_req(VB, #{flags => Flags band 1, start_seqno => Start}, StreamOpaque),
    Stream = #{add_opaque => AddOpaque, stream_opaque => StreamOpaque, state => requested,
               ended => false},
    {ok, out(Req, C2#conn{streams = (C2#conn.streams)#{VB => Stream},
                          by_opaque = (C2#conn.by_opaque)#{StreamOpaque => VB}})}.

maybe_enable_flow_control(#conn{flow_control = false, config = #{consumer_buffer_size := Size}} = C)
  when Size > 0 ->
    {Opaque, C1} = own_opaque(C),
    Control = dcp_commands:control(<<"connection_buffer_size">>, integer_to_binary(Size), Opaque),
    out(Control, C1#conn{flow_control = true});
maybe_enable_flow_control(C) ->
    C.

own_opaque(#conn{next_opaque = Opaque} = C) ->
    Next = case Opaque of
               16#ffffffff -> ?FIRST_OWN_OPAQUE;
               _ -> Opaque + 1
           end,
    {Opaque, C#conn{next_opaque = Next}}.

add_stream_answer(VB, Opaque, Status, StreamOpaque, C) ->
    answer(?DCP_ADD_STREAM, VB, dcp_commands:add_stream_response(Opaque, Status, StreamOpaque), C).

%% The answer to the consumer's own STREAM_REQ decides its ADD_STREAM answer. A success is answered at
%% the end of the turn, so a STREAM_END that came in the same chunk is seen first (the MB-53445 race).
stream_req_answered(StreamOpaque, Status, C) ->
    case maps:find(StreamOpaque, C#conn.by_opaque) of
        {ok, VB} ->
            #{VB := #{add_opaque := AddOpaque} = Stream} = C#conn.streams,
            case Status of
                ?SUCCESS ->
                    {ok, C#conn{streams = (C#conn.streams)#{VB => Stream#{state => accepted}},
                                answer_adds = [VB | C#conn.answer_adds]}};
                _ ->
                    add_stream_answer(VB, AddOpaque, Status, none, forget_stream(VB, C))
            end;
        error ->
            {ok, C}
    end.

answer_accepted_adds(#conn{answer_adds = []} = C) ->
    C;
answer_accepted_adds(#conn{answer_adds = VBs} = C) ->
    lists:foldl(fun answer_accepted_add/2, C#conn{answer_adds = []}, lists:reverse(VBs)).

answer_accepted_add(VB, C) ->
    #{VB := #{add_opaque := AddOpaque, stream_opaque := StreamOpaque, ended := Ended} = Stream} =
        C#conn.streams,
    case {Ended, fault(C, VB, no_add_stream_answer_after_stream_end)} of
        {true, no_add_stream_answer_after_stream_end} ->
            logger:info(#{what => kv_sim_add_stream_left_unanswered, vbucket => VB}, ?DOMAIN),
            forget_stream(VB, C);
        {true, none} ->
            {ok, C1} = add_stream_answer(VB, AddOpaque, ?SUCCESS, StreamOpaque, forget_stream(VB, C)),
            C1;
        {false, _} ->
            C1 = C#conn{streams = (C#conn.streams)#{VB => Stream#{state => active}}},
            {ok, C2} = add_stream_answer(VB, AddOpaque, ?SUCCESS, StreamOpaque, C1),
            C2
    end.

forget_stream(VB, C) ->
    case maps:take(VB, C#conn.streams) of
        {#{stream_opaque := StreamOpaque}, Streams} ->
            C#conn{streams = Streams, by_opaque = maps:remove(StreamOpaque, C#conn.by_opaque)};
        error ->
            C
    end.

stream_message(?DCP_SNAPSHOT_MARKER, _Frame, C) ->
    {ok, C};
stream_message(?DCP_MUTATION, #{vbucket := VB, opaque := Opaque, key := Key, value := Value} = Frame,
               C) ->
    {ok, mutation(VB, Opaque, Key, by_seqno(Frame), Value, C)};
stream_message(Opcode, #{vbucket := VB, opaque := Opaque, key := Key} = Frame, C)
  when Opcode =:= ?DCP_DELETION; Opcode =:= ?DCP_EXPIRATION ->
    case owns_stream(VB, Opaque, C) of
        true ->
            Seqno = by_seqno(Frame),
            C1 = store_rows(C),
            #{store := Store} = C1#conn.config,
            ets:delete(Store, {VB, Key}),
            {ok, set_high_seqno(C1, VB, Seqno)};
        false ->
            {ok, C}
    end;
stream_message(?DCP_STREAM_END, #{vbucket := VB, opaque := Opaque}, C) ->
    case maps:find(VB, C#conn.streams) of
        {ok, #{stream_opaque := Opaque, state := active}} ->
            {ok, forget_stream(VB, C)};
        {ok, #{stream_opaque := Opaque} = Stream} ->
            %% Ended before its ADD_STREAM was answered: remembered for that answer.
            {ok, C#conn{streams = (C#conn.streams)#{VB => Stream#{ended => true}}}};
        _ ->
            {ok, C}
    end;
stream_message(?DCP_SET_VBUCKET_STATE, #{vbucket := VB, opaque := Opaque} = Frame, C) ->
    #{state := State} = mcbp:dcp_fields(Frame),
    #{vbucket_states := States} = C#conn.config,
    ets:insert(States, {{state, VB}, State}),
    answer(?DCP_SET_VBUCKET_STATE, VB,
           dcp_commands:response(?DCP_SET_VBUCKET_STATE, ?SUCCESS, Opaque), C);
stream_message(_Unknown, _Frame, C) ->
    %% A proxy passes opcodes it does not know through; this consumer has no use for them.
    {ok, C}.

%% Mutations, deletions and expirations all start their extras with the by-seqno; reading it there
%% spares decoding the rest of the extras into a map for every document.
by_seqno(#{extras := <<Seqno:64, _/binary>>}) ->
    Seqno.

%% A turn's mutations go into the store in one insert, before any deletion of the turn (which must
%% follow them). The list is in arrival order: a key written twice in one turn keeps the later value
%% (the table inserts a list in order; a producer does not repeat a key within a snapshot anyway).
store_rows(#conn{rows = []} = C) ->
    C;
store_rows(#conn{config = #{store := Store}, rows = Rows} = C) ->
    ets:insert(Store, lists:reverse(Rows)),
    C#conn{rows = []}.

mutation(VB, Opaque, Key, Seqno, Value, C) ->
    case owns_stream(VB, Opaque, C) of
        true -> set_high_seqno(C#conn{rows = [{{VB, Key}, Seqno, Value} | C#conn.rows]}, VB, Seqno);
        false -> C
    end.

owns_stream(VB, Opaque, C) ->
    case maps:find(VB, C#conn.streams) of
        {ok, #{stream_opaque := Opaque}} -> true;
        _ -> false
    end.

%% A vbucket's high seqno survives the connection (a new stream starts from it); it is stored once per
%% turn rather than once per mutation.
high_seqno(#conn{config = #{vbucket_states := States}, high_seqnos = Turn}, VB) ->
    case Turn of
        #{VB := Seqno} ->
            Seqno;
        _ ->
            case ets:lookup(States, {high, VB}) of
                [{_, Seqno}] -> Seqno;
                [] -> 0
            end
    end.

set_high_seqno(C, VB, Seqno) ->
    C#conn{high_seqnos = (C#conn.high_seqnos)#{VB => Seqno}}.

store_high_seqnos(#conn{high_seqnos = Turn} = C) when map_size(Turn) =:= 0 ->
    C;
store_high_seqnos(#conn{config = #{vbucket_states := States}, high_seqnos = Turn} = C) ->
    ets:insert(States, [{{high, VB}, Seqno} || {VB, Seqno} <- maps:to_list(Turn)]),
    C#conn{high_seqnos = #{}}.

%% Acknowledges what was received once a fifth of the window is used, as kv_engine's consumer does.
ack_received(#conn{flow_control = true, rx_unacked = Unacked,
                   config = #{consumer_buffer_size := Size}} = C)
  when Unacked > 0, Unacked >= Size div 5 ->
    {Opaque, C1} = own_opaque(C),
    out(dcp_commands:buffer_ack(Unacked, Opaque), C1#conn{rx_unacked = 0});
ack_received(C) ->
    C.

%% ---- producer node ----

producer_request(?DCP_STREAM_REQ, #{vbucket := VB, opaque := Opaque} = Frame, C) ->
    #conn{config = #{docs_per_vbucket := High, vbuckets := VBuckets}} = C,
    #{flags := Flags, start_seqno := Start, end_seqno := End} = mcbp:dcp_fields(Frame),
    Live = lists:member(VB, VBuckets) andalso vbucket_state(C, VB) =/= dead,
    Refuse = fun(Status, Value) ->
                     answer(?DCP_STREAM_REQ, VB,
                            dcp_commands:stream_req_response(Opaque, Status, Value), C)
             end,
    case {Live, maps:is_key(VB, C#conn.pstreams), fault(C, VB, stream_req_status)} of
        {false, _, _} ->
            Refuse(?NOT_MY_VBUCKET, <<>>);
        {true, true, _} ->
            Refuse(?KEY_EEXISTS, <<>>);
        {true, false, {stream_req_status, Status}} ->
            Refuse(dcp_commands:status(Status), <<>>);
        {true, false, none} when Start > High ->
            %% The consumer is ahead of this node: it must roll back to what the node has.
            Refuse(?ROLLBACK, <<High:64>>);
        {true, false, none} ->
            Accept = dcp_commands:stream_req_response(Opaque, ?SUCCESS, failover_log(C, VB)),
            {ok, C1} = answer(?DCP_STREAM_REQ, VB, Accept, C),
            case fault(C, VB, stream_end_on_accept) of
                {stream_end_on_accept, Reason} ->
                    {ok, emit(dcp_commands:stream_end(VB, Opaque, Reason), C1)};
                none ->
                    Stream = #{opaque => Opaque, next => Start + 1, last => min(End, High),
                               finite => End =< High, takeover => Flags band 1 =:= 1,
                               phase => marker, sent => 0},
                    {ok, C1#conn{pstreams = (C1#conn.pstreams)#{VB => Stream},
                                 runnable = queue:in(VB, C1#conn.runnable)}}
            end
    end;
producer_request(?DCP_CLOSE_STREAM, #{vbucket := VB, opaque := Opaque}, C) ->
    case maps:take(VB, C#conn.pstreams) of
        {#{opaque := StreamOpaque}, Streams} ->
            C1 = C#conn{pstreams = Streams,
                        runnable = queue:delete(VB, C#conn.runnable)},
            {ok, C2} = answer(?DCP_CLOSE_STREAM, VB,
                              dcp_commands:response(?DCP_CLOSE_STREAM, ?SUCCESS, Opaque), C1),
            case C2#conn.stream_end_on_close of
                true -> {ok, emit(dcp_commands:stream_end(VB, StreamOpaque, closed), C2)};
                false -> {ok, C2}
            end;
        error ->
            answer(?DCP_CLOSE_STREAM, VB,
                   dcp_commands:response(?DCP_CLOSE_STREAM, ?KEY_ENOENT, Opaque), C)
    end;
producer_request(?DCP_BUFFER_ACK, Frame, C) ->
    #{bytes := Bytes} = mcbp:dcp_fields(Frame),
    {ok, C#conn{tx_unacked = max(0, C#conn.tx_unacked - Bytes)}};
producer_request(?DCP_GET_FAILOVER_LOG, #{vbucket := VB, opaque := Opaque}, C) ->
    Value = << <<Uuid:64, Seqno:64>> || {Uuid, Seqno} <- failover_log(C, VB) >>,
    answer(?DCP_GET_FAILOVER_LOG, VB,
           dcp_commands:response(?DCP_GET_FAILOVER_LOG, ?SUCCESS, Opaque, #{value => Value}), C);
producer_request(Opcode, #{vbucket := VB, opaque := Opaque}, C) ->
    answer(Opcode, VB, dcp_commands:response(Opcode, ?UNKNOWN_COMMAND, Opaque), C).

%% One entry: the vbucket's uuid (fixed by the seed) since seqno 0.
failover_log(#conn{config = #{seed := Seed}}, VB) ->
    [{erlang:phash2({Seed, VB}) + 1, 0}].

vbucket_state(#conn{config = #{vbucket_states := States}}, VB) ->
    case ets:lookup(States, {state, VB}) of
        [{_, State}] -> State;
        [] -> undefined
    end.

set_vbucket_state(#conn{config = #{vbucket_states := States}}, VB, State) ->
    ets:insert(States, {{state, VB}, State}).

%% Takeover: the consumer acknowledged `pending', so this node gives the vbucket up and tells the
%% consumer to become active; its acknowledgement of `active' ends the stream.
response(#{opcode := ?DCP_SET_VBUCKET_STATE, opaque := Opaque}, #conn{type = producer} = C) ->
    case [VB || {VB, #{opaque := O}} <- maps:to_list(C#conn.pstreams), O =:= Opaque] of
        [VB] -> takeover_acknowledged(VB, C);
        [] -> {ok, C}
    end;
response(#{opcode := ?DCP_STREAM_REQ, opaque := Opaque, status := Status}, #conn{type = consumer} = C) ->
    stream_req_answered(Opaque, Status, C);
response(_Other, C) ->
    %% Control, noop and buffer answers need nothing from this node.
    {ok, C}.

takeover_acknowledged(VB, C) ->
    #{VB := #{opaque := Opaque, phase := Phase} = Stream} = C#conn.pstreams,
    case Phase of
        wait_pending_ack ->
            set_vbucket_state(C, VB, dead),
            C1 = emit(dcp_commands:set_vbucket_state(VB, Opaque, active), C),
            {ok, C1#conn{pstreams = (C1#conn.pstreams)#{VB => Stream#{phase => wait_active_ack}}}};
        wait_active_ack ->
            C1 = emit(dcp_commands:stream_end(VB, Opaque, ok), C),
            {ok, C1#conn{pstreams = maps:remove(VB, C1#conn.pstreams)}};
        _ ->
            {ok, C}
    end.

%% ---- producer: streaming in batches ----

%% One turn sends at most a batch, taking a few frames from each runnable stream in turn; the next turn
%% is a message to itself, so the socket is read between turns and a large backlog never blocks it.
pump(C) ->
    pump(C, ?BATCH_FRAMES, ?BATCH_BYTES).

pump(C, Frames, Bytes) when Frames =< 0; Bytes =< 0 ->
    {ok, C};
pump(C, Frames, Bytes) ->
    case flow_blocked(C) orelse queue:out(C#conn.runnable) of
        true ->
            {ok, C};
        {empty, _} ->
            {ok, C};
        {{value, VB}, Runnable} ->
            Before = C#conn.tx_unacked,
            case stream_turn(VB, min(?STREAM_TURN, Frames), C#conn{runnable = Runnable}) of
                {ok, C1, Sent} ->
                    pump(C1, Frames - max(Sent, 1), Bytes - (C1#conn.tx_unacked - Before));
                {close, _, _} = Close ->
                    Close
            end
    end.

flow_blocked(#conn{flow_limit = Limit, tx_unacked = Unacked}) ->
    Limit > 0 andalso Unacked >= Limit.

stream_turn(VB, N, C) ->
    Faults = #{flexible => fault(C, VB, flexible_framing) =:= flexible_framing,
               unknown => fault(C, VB, unknown_opcodes),
               close_after => fault(C, VB, close_socket_after_mutations)},
    #{VB := Stream} = C#conn.pstreams,
    C1 = case {Stream, Faults} of
             {#{phase := mutations, opaque := Opaque}, #{unknown := {unknown_opcodes, Op}}} ->
                 emit(dcp_commands:request(Op, #{vbucket => VB, opaque => Opaque}), C);
             _ ->
                 C
         end,
    stream_steps(VB, Stream, N, 0, Faults, C1).

stream_steps(VB, Stream, N, Sent, Faults, C) ->
    %% The window is checked before every frame: the producer stops at the frame that fills it.
    case Sent >= N orelse flow_blocked(C) of
        true -> {ok, requeue(VB, Stream, C), Sent};
        false -> stream_step(VB, Stream, N, Sent, Faults, C)
    end.

stream_step(VB, Stream, N, Sent, Faults, C) ->
    case step(VB, Stream, N - Sent, Faults, C) of
        {continue, Stream1, C1, Frames} -> stream_steps(VB, Stream1, N, Sent + Frames, Faults, C1);
        {park, Stream1, C1} -> {ok, C1#conn{pstreams = (C1#conn.pstreams)#{VB => Stream1}}, Sent + 1};
        {done, C1} -> {ok, C1#conn{pstreams = maps:remove(VB, C1#conn.pstreams)}, Sent + 1};
        {close, _, _} = Close -> Close
    end.

requeue(VB, Stream, C) ->
    C#conn{pstreams = (C#conn.pstreams)#{VB => Stream}, runnable = queue:in(VB, C#conn.runnable)}.

step(VB, #{phase := marker, opaque := Opaque, next := Next, last := Last} = Stream, _Budget, Faults,
     C) ->
    C1 = case Faults of
             #{unknown := {unknown_opcodes, Op}} ->
                 emit(dcp_commands:request(Op, #{vbucket => VB, opaque => Opaque}), C);
             _ ->
                 C
         end,
    case Next =< Last of
        true ->
            Marker = dcp_commands:snapshot_marker(VB, Opaque, Next - 1, Last, 1),
            {continue, Stream#{phase => mutations}, emit(Marker, C1), 1};
        false ->
            {continue, Stream#{phase => finish}, C1, 1}
    end;
step(_VB, #{phase := mutations, next := Next, last := Last} = Stream, _Budget, _Faults, C)
  when Next > Last ->
    {continue, Stream#{phase => finish}, C, 1};
step(VB, #{phase := mutations, opaque := Opaque, next := Seqno, last := Last, sent := Sent} = Stream,
     Budget, Faults, C) ->
    %% Up to `Budget' mutations in one run; as everywhere, a frame goes out only while the window
    %% is open (the run stops at the frame that fills it).
    Run = case Faults of
              #{close_after := {close_socket_after_mutations, CloseAfter}} ->
                  min(Budget, CloseAfter - Sent);
              _ ->
                  Budget
          end,
    #conn{flow_limit = Limit, tx_unacked = Unacked, config = Config} = C,
    Window = case Limit of
                 0 -> unlimited;
                 _ -> Limit - Unacked
             end,
    {Next, Frames, Bytes} = mutations(VB, Opaque, Seqno, min(Last, Seqno + Run - 1), Window, Faults,
                                      Config, [], 0),
    Count = Next - Seqno,
    C1 = C#conn{out = [lists:reverse(Frames) | C#conn.out], tx_unacked = Unacked + Bytes},
    case Faults of
        #{close_after := {close_socket_after_mutations, Max}} when Sent + Count >= Max ->
            {close, {fault, close_socket_after_mutations, VB, Sent + Count}, C1};
        _ ->
            {continue, Stream#{next => Next, sent => Sent + Count}, C1, Count}
    end;
step(VB, #{phase := finish, opaque := Opaque, takeover := true} = Stream, _Budget, _Faults, C) ->
    {park, Stream#{phase => wait_pending_ack},
     emit(dcp_commands:set_vbucket_state(VB, Opaque, pending), C)};
step(VB, #{phase := finish, opaque := Opaque, finite := true}, _Budget, _Faults, C) ->
    {done, emit(dcp_commands:stream_end(VB, Opaque, ok), C)};
step(_VB, #{phase := finish} = Stream, _Budget, _Faults, C) ->
    %% An open-ended stream stays open with nothing more to send, until it is closed.
    {park, Stream#{phase => idle}, C}.

%% Mutations `Seqno'..`To' (newest first) while the window has room, with the next seqno and their bytes.
mutations(VB, Opaque, Seqno, To, Window, Faults, Config, Frames, Bytes)
  when Seqno =< To, (Window =:= unlimited orelse Bytes < Window) ->
    {Key, Seqno, Value} = kv_sim:doc(Config, VB, Seqno),
    Frame = mcbp:encode(mutation_spec(VB, Opaque, Key, Seqno, Value, Faults)),
    mutations(VB, Opaque, Seqno + 1, To, Window, Faults, Config, [Frame | Frames],
              Bytes + iolist_size(Frame));
mutations(_VB, _Opaque, Seqno, _To, _Window, _Faults, _Config, Frames, Bytes) ->
    {Seqno, Frames, Bytes}.

%% A document as DCP_MUTATION (rev seqno 1, no flags, expiry or lock time) for `mcbp:encode/1': the
%% frame `dcp_commands:mutation/3' builds, without its defaulting of every field, as this is done for
%% every document a producer sends.
mutation_spec(VB, Opaque, Key, Seqno, Value, Faults) ->
    Spec = #{magic => req, opcode => ?DCP_MUTATION, vbucket => VB, opaque => Opaque, cas => Seqno,
             extras => <<Seqno:64, 1:64, 0:32, 0:32, 0:32, 0:16, 0:8>>, key => Key, value => Value},
    case Faults of
        #{flexible := true} ->
            Spec#{magic := alt_req, framing_extras => [{?STREAM_ID_FRAME_INFO, <<1:16>>}]};
        _ ->
            Spec
    end.

maybe_schedule_pump(#conn{pump_scheduled = false, type = producer} = C) ->
    case queue:is_empty(C#conn.runnable) orelse flow_blocked(C) of
        true ->
            C;
        false ->
            self() ! pump,
            C#conn{pump_scheduled = true}
    end;
maybe_schedule_pump(C) ->
    C.

%% ---- writing ----

%% A producer's stream frames count toward the consumer's flow-control window.
emit(Bytes, C) ->
    out(Bytes, C#conn{tx_unacked = C#conn.tx_unacked + iolist_size(Bytes)}).

out(Bytes, C) ->
    C#conn{out = [Bytes | C#conn.out]}.

%% The answer to a request, unless a fault drops or delays it.
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

%% Faults are set between turns (by tests); a turn without any skips the lookups of every frame.
refresh_faults(#conn{config = #{faults := Faults}} = C) ->
    C#conn{faults_set = ets:info(Faults, size) > 0}.

%% A fault set for this vbucket, or else for all of them.
fault(#conn{faults_set = false}, _VB, _Name) ->
    none;
fault(#conn{config = #{faults := Faults}}, VB, Name) ->
    case ets:lookup(Faults, {VB, Name}) of
        [{_, Fault}] ->
            Fault;
        [] when VB =/= all ->
            case ets:lookup(Faults, {all, Name}) of
                [{_, Fault}] -> Fault;
                [] -> none
            end;
        [] ->
            none
    end.
