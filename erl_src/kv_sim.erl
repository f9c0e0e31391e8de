%% @doc A simulated kv_engine node: a loopback listener speaking the memcached binary protocol and DCP
%% through `mcbp', as the peer of the replication processes in the demo and the end-to-end tests.
%%
%% One `kv_sim' process owns the listening socket and the node's tables; each accepted connection is one
%% `kv_sim_conn' process. A producer node streams seeded documents (deterministic from `seed', so two
%% runs and two nodes agree); a consumer node stores what it is sent, and `digest/2' compares the two.
%%
%% Options (a map): `role' (`consumer' | `producer', required), `port' (0 = ephemeral, the default),
%% `bucket' ("default"), `user' ("Administrator"), `password' ("password"), `vbuckets' (a count N for
%% 0..N-1, or a list; default 64), `docs_per_vbucket' (producer, default 100), `value_size' (default 256),
%% `seed' (default 42), `ssl' (`false' or `[ssl:tls_server_option()]': the listener speaks TLS),
%% `tls_port' (with `ssl': the node listens on `port' in plain TCP and on `tls_port' (0 = ephemeral)
%% in TLS over the same store, as memcached serves 11210 and 11207; `tls_port/1' gives it,
%% `transports/1' which transport each DCP connection came over), `hello_features' (the HELLO
%% features the node accepts; default all the replication ones), `consumer_buffer_size' (consumer: the
%% flow-control window it asks the producer for with DCP_CONTROL `connection_buffer_size' and acknowledges
%% with DCP_BUFFER_ACKNOWLEDGEMENT; 0 = no flow control; default 10 MiB), `collections' (producer: the
%% collection ids of the bucket, default `[0]'; each other collection is created by a system event at
%% seqnos 1..K of every vbucket, K their number, and the `docs_per_vbucket' documents at seqnos
%% K+1..K+N go round the collections in order; a connection that negotiated HELLO collections gets
%% the system events and every document, its key prefixed by the collection id as unsigned LEB128;
%% one that did not gets only the default collection's documents, keys unprefixed),
%% `durable_writes' (producer and node: `#{committed => C, aborted => A, pending => P}', default
%% none; after the documents of every vbucket, C durable writes each a DCP_PREPARE and, at the next
%% seqno, its DCP_COMMIT, then A each a prepare and its DCP_ABORT, then P prepares never resolved;
%% keys `dur-<vb>-<prepared seqno>', round the collections in order like the documents. A connection
%% whose consumer sent DCP_CONTROL `enable_sync_writes' `true' gets them so; any other gets only
%% the committed ones, each a DCP_MUTATION at its commit's seqno, as kv_engine streams them),
%% `accept_alt_requests' (default `false': see below).
%%
%% Sync writes, as kv_engine's consumer and producer do them: a consumer connection whose DCP_OPEN
%% value named a `consumer_name' sends the producer (through the proxy) DCP_CONTROL `consumer_name'
%% and `enable_sync_writes' right after the open's answer; it keeps prepares pending per
%% (vbucket, collection, key), makes one live at its commit's seqno on DCP_COMMIT and drops it on
%% DCP_ABORT, and once it holds a snapshot's prepares (the snapshot marker's end reached) sends
%% DCP_SEQNO_ACKNOWLEDGED with the highest prepared seqno, which the producer records
%% (`seqno_acks/2'). `durable_state/2' gives a node's pending prepares and its durable counts.
%%
%% Every connection checks what it receives as memcached does (`kv_sim_validate': extras, key,
%% value, cas and datatype rules per opcode, the negotiated datatypes and collection keys, the JSON
%% value of DCP_OPEN, the DCP connection's state, the responses a DCP producer or consumer takes); a
%% violation closes the connection with `{invalid_frame, Opcode, Why}' or
%% `{invalid_response, Opcode, Why}' logged. `closes(Node)' lists why the node closed connections
%% (these and every other reason it logs). kv_engine refuses DCP stream ids on a consumer
%% connection, and kv_sim the alternative request magic without HELLO `alt_request_support': a node
%% started with `accept_alt_requests => true' takes both (for a producer's `flexible_framing'
%% fault through the proxy).
%%
%% Faults, set per vbucket at run time with `set_fault(Node, VBucket | all, Fault)' (a fault under `all'
%% applies to every vbucket; the connection-wide `chunked_writes' is always stored under `all'):
%% <ul>
%% <li>`{stream_end_on_accept, Reason}' (producer): answer the STREAM_REQ with success and end the stream
%%     at once with `Reason' (an atom of PROTOCOL.md's table or an integer), in the same write.</li>
%% <li>`no_add_stream_answer_after_stream_end' (consumer): an ADD_STREAM whose stream was ended before it
%%     was answered is never answered (the kv_engine error path behind MB-53445).</li>
%% <li>`{add_stream_status, Status}' (consumer): answer ADD_STREAM with `Status' without opening a stream.</li>
%% <li>`{stream_req_status, Status}' (producer): answer STREAM_REQ with `Status'.</li>
%% <li>`{drop_answer, Opcode}' / `{delay_answer, Opcode, Ms}': never send / send `Ms' later the answer to
%%     requests with `Opcode' (a name from `dcp_commands:command_2_atom/1' or a number).</li>
%% <li>`{close_socket_on, Opcode}': close the socket when a request with `Opcode' arrives.</li>
%% <li>`{close_socket_after_mutations, N}' (producer): close the socket once `N' mutations of the
%%     vbucket were sent.</li>
%% <li>`{chunked_writes, MaxBytes}' (connection-wide): cut every write into random chunks of 1..MaxBytes.</li>
%% <li>`flexible_framing' (producer): send the stream's frames with the alt-request magic and a DCP
%%     stream-id framing extra.</li>
%% <li>`stop_reading' (connection-wide, either role): the node's connections stop reading their
%%     sockets while it is set (their writes go on).</li>
%% <li>`{flood_stream_ends, N, EndVB}' (producer): with the acceptance of the vbucket's STREAM_REQ,
%%     N DCP_STREAM_ENDs for vbucket `EndVB' (reason `closed', opaque 0) in the same write.</li>
%% <li>`{unknown_opcodes, Opcode}' (producer): send a request with this (unknown) opcode before each
%%     snapshot marker and each batch of mutations; a consumer node ignores it.</li>
%% </ul>
%%
%% Role `node' (a cluster node for the rebalance demo) plays both parts on one store: it accepts producer
%% and consumer DCP opens, seeds `docs_per_vbucket' documents into each of `active_vbuckets' (state
%% `active') and `replica_vbuckets' (state `replica'), every other vbucket of `vbuckets' starting `dead';
%% what it stores as a consumer it serves as a producer once the vbucket is `active' (after a takeover).
%% `set_vbucket_state/3' and `delete_vbucket/2' are the janitor's part; `connections/1' lists the live
%% DCP connections; `STATS dcp-vbtakeover <vb> <name>' is answered on any role (estimate and status).
%%
%% `digest(Node, VBucket) -> {DocCount, Hash}': the hash is a SHA-256 over every live document's key,
%% by-seqno and value, in key order; a consumer's digest after replication equals the producer's.
-module(kv_sim).

-behaviour(gen_server).

-export([start_link/1, start/1, stop/1, port/1, tls_port/1, transports/1, set_fault/3, clear_faults/1,
         digest/2, vbucket_state/2, docs/3, doc/3, connections/1, set_vbucket_state/3, delete_vbucket/2,
         handshakes/1, closes/1, collection_counts/2, collection_of/2, high_seqno/1, system_events/2,
         seqno_item/2, durable_doc/3, durable_state/2, seqno_acks/2, collection_name/1]).

-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([opts/0, fault/0, node_config/0]).

-type opts() :: #{role := consumer | producer | node,
                  active_vbuckets => [dcp_commands:vbucket()],
                  replica_vbuckets => [dcp_commands:vbucket()], port => inet:port_number(), bucket => string(),
                  user => string(), password => string(),
                  vbuckets => non_neg_integer() | [dcp_commands:vbucket()],
                  docs_per_vbucket => non_neg_integer(), value_size => non_neg_integer(),
                  seed => integer(), ssl => false | [ssl:tls_server_option()],
                  tls_port => inet:port_number(),
                  hello_features => [dcp_commands:feature()],
                  consumer_buffer_size => non_neg_integer(),
                  collections => [non_neg_integer()],
                  durable_writes => #{committed => non_neg_integer(), aborted => non_neg_integer(),
                                      pending => non_neg_integer()},
                  accept_alt_requests => boolean()}.

-type opcode() :: atom() | 0..255.
-type fault() :: {stream_end_on_accept, dcp_commands:stream_end_reason()}
               | no_add_stream_answer_after_stream_end
               | {add_stream_status, atom() | 0..16#ffff}
               | {stream_req_status, atom() | 0..16#ffff}
               | {drop_answer, opcode()}
               | {delay_answer, opcode(), non_neg_integer()}
               | {close_socket_on, opcode()}
               | {close_socket_after_mutations, non_neg_integer()}
               | {chunked_writes, pos_integer()}
               | flexible_framing
               | {unknown_opcodes, 0..255}
               | stop_reading
               | {flood_stream_ends, pos_integer(), dcp_commands:vbucket()}.

%% What a connection process needs of its node.
-type node_config() :: #{role := consumer | producer | node, bucket := binary(), user := binary(),
                         password := binary(), vbuckets := [dcp_commands:vbucket()],
                         docs_per_vbucket := non_neg_integer(), value_size := non_neg_integer(),
                         seed := integer(), value_block := binary(),
                         hello_features := [dcp_commands:feature()],
                         consumer_buffer_size := non_neg_integer(),
                         collections := [non_neg_integer()],
                         accept_alt_requests := boolean(),
                         %% committed, aborted, pending
                         durable_writes := {non_neg_integer(), non_neg_integer(), non_neg_integer()},
                         events := ets:tid(), durable := ets:tid(), acks := ets:tid(),
                         faults := ets:tid(), store := ets:tid(),
                         vbucket_states := kv_sim_vbuckets:table(),
                         node := pid()}.

%% The driver's read buffer of an accepted socket: the largest chunk one turn takes.
-define(SOCKET_BUFFER, 256 * 1024).

-define(DEFAULT_FEATURES, [tcp_nodelay, mutation_seqno, xattr, xerror, select_bucket, snappy, json,
                           duplex, alt_request_support, collections]).

%% ---- API ----

-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(Opts) ->
    gen_server:start_link(?MODULE, Opts, []).

%% @doc As `start_link/1' without a link (for the demo's shell and tests that outlive a crash).
-spec start(opts()) -> {ok, pid()} | {error, term()}.
start(Opts) ->
    gen_server:start(?MODULE, Opts, []).

-spec stop(pid()) -> ok.
stop(Node) ->
    gen_server:stop(Node).

%% @doc What each accepted connection sent in its handshake, oldest connection first (closed ones
%% too): `hello_key', `hello_features' (the names asked, in order) and `hello_value' (the raw
%% codes) once it sent HELLO; `open_name', `open_flags' (the flags word), `open_value' and
%% `open_datatype' once it sent DCP_OPEN.
-spec handshakes(pid()) -> [#{atom() => term()}].
handshakes(Node) ->
    gen_server:call(Node, handshakes).

%% @doc Why the node closed connections, oldest first: `{Name, Reason}', `Name' the connection's
%% DCP_OPEN name, else its HELLO key, else `undefined'; `Reason' as logged (an invalid frame is
%% `{invalid_frame, Opcode, Why}', see `kv_sim_validate').
-spec closes(pid()) -> [{binary() | undefined, term()}].
closes(Node) ->
    gen_server:call(Node, closes).

-spec port(pid()) -> inet:port_number().
port(Node) ->
    gen_server:call(Node, port).

%% @doc The TLS listener's port of a node started with `tls_port', else `undefined'.
-spec tls_port(pid()) -> inet:port_number() | undefined.
tls_port(Node) ->
    gen_server:call(Node, tls_port).

%% @doc The node's live DCP connections (as `connections/1') with the transport each was accepted on.
-spec transports(pid()) -> [{producer | consumer, binary(), gen_tcp | ssl}].
transports(Node) ->
    gen_server:call(Node, transports).

-spec set_fault(pid(), dcp_commands:vbucket() | all, fault()) -> ok | {error, term()}.
set_fault(Node, VBucket, Fault) ->
    gen_server:call(Node, {set_fault, VBucket, Fault}).

-spec clear_faults(pid()) -> ok.
clear_faults(Node) ->
    gen_server:call(Node, clear_faults).

%% @doc The live document count and a hash over the documents of one vbucket.
-spec digest(pid(), dcp_commands:vbucket()) -> {non_neg_integer(), binary()}.
digest(Node, VBucket) ->
    Config = gen_server:call(Node, config),
    case Config of
        #{role := producer} ->
            digest_of([{hash_key(Cid, Key), Seqno, Value}
                       || {Cid, Key, Seqno, Value} <- live_docs(Config, VBucket)]);
        #{role := Role, store := Store} when Role =:= consumer; Role =:= node ->
            Docs = ets:select(Store, [{{{VBucket, '$1'}, '$2', '$3'}, [], [{{'$1', '$2', '$3'}}]}]),
            digest_of([{hash_key(K), Seqno, Value} || {K, Seqno, Value} <- Docs])
    end.

%% A consumer stores a default-collection document under its key, another under {Cid, Key}; the
%% digest hashes both as the collection-prefixed key of the wire (the default's unprefixed).
hash_key({Cid, Key}) -> hash_key(Cid, Key);
hash_key(Key) -> Key.

hash_key(0, Key) -> Key;
hash_key(Cid, Key) -> dcp_commands:collection_key(Cid, Key).

%% The store's key of a document of collection `Cid'.
store_key(0, Key) -> Key;
store_key(Cid, Key) -> {Cid, Key}.

split_store_key({Cid, Key}) -> {Cid, Key};
split_store_key(Key) -> {0, Key}.

%% @doc The live documents of a vbucket per collection id (every collection of the bucket for a
%% producer; those it holds for a consumer).
-spec collection_counts(pid(), dcp_commands:vbucket()) -> #{non_neg_integer() => non_neg_integer()}.
collection_counts(Node, VBucket) ->
    case gen_server:call(Node, config) of
        #{role := producer, collections := Cs} = Config ->
            lists:foldl(fun({Cid, _Key, _Seqno, _}, Acc) ->
                                maps:update_with(Cid, fun(N) -> N + 1 end, 1, Acc)
                        end, maps:from_list([{C, 0} || C <- Cs]), live_docs(Config, VBucket));
        #{role := Role, store := Store} when Role =:= consumer; Role =:= node ->
            Keys = ets:select(Store, [{{{VBucket, '$1'}, '_', '_'}, [], ['$1']}]),
            lists:foldl(fun({Cid, _}, Acc) -> maps:update_with(Cid, fun(N) -> N + 1 end, 1, Acc);
                           (_, Acc) -> maps:update_with(0, fun(N) -> N + 1 end, 1, Acc)
                        end, #{}, Keys)
    end.

%% @doc A node's system events of a vbucket, as `{Seqno, Event, Key}' in seqno order (a consumer's:
%% those it received; a producer's: those it streams to a collection-aware connection).
-spec system_events(pid(), dcp_commands:vbucket()) -> [{non_neg_integer(), non_neg_integer(), binary()}].
system_events(Node, VBucket) ->
    case gen_server:call(Node, config) of
        #{role := producer} = Config ->
            [{Seqno, 0, collection_name(Cid)}
             || Seqno <- lists:seq(1, events_per_vbucket(Config)),
                {create, Cid} <- [seqno_item(Config, Seqno)]];
        #{events := Events} ->
            lists:sort([{Seqno, Event, Key}
                        || {{_, Seqno}, Event, Key, _Value}
                               <- ets:match_object(Events, {{VBucket, '_'}, '_', '_', '_'})])
    end.

%% @doc The name a seeded collection has in its create event.
-spec collection_name(non_neg_integer()) -> binary().
collection_name(Cid) ->
    <<"c", (integer_to_binary(Cid))/binary>>.

%% @doc The durable writes of a vbucket. `pending': the prepares not (yet) committed or aborted, as
%% `{Cid, Key, PreparedSeqno}' in key order; `prepares', `commits', `aborts': how many of each the
%% node holds (a seeded producer: all it has; a consumer: what it received, a commit or an abort
%% received also counting its prepare only if the prepare came).
-spec durable_state(pid(), dcp_commands:vbucket()) ->
          #{pending := [{non_neg_integer(), binary(), pos_integer()}], prepares := non_neg_integer(),
            commits := non_neg_integer(), aborts := non_neg_integer()}.
durable_state(Node, VBucket) ->
    case gen_server:call(Node, config) of
        #{role := producer, durable_writes := {Committed, Aborted, Pending}} = Config ->
            K = events_per_vbucket(Config) + maps:get(docs_per_vbucket, Config),
            First = K + 2 * (Committed + Aborted) + 1,
            PendingWrites = [begin
                                 {prepare, Cid, pending} = seqno_item(Config, Seqno),
                                 {Key, _} = durable_doc(Config, VBucket, Seqno),
                                 {Cid, Key, Seqno}
                             end || Seqno <- lists:seq(First, First + Pending - 1)],
            #{pending => lists:sort(PendingWrites), prepares => Committed + Aborted + Pending,
              commits => Committed, aborts => Aborted};
        #{durable := Durable} ->
            Pending = [begin {Cid, Key} = split_store_key(SKey), {Cid, Key, Seqno} end
                       || {{_, SKey}, Seqno, _Value, pending}
                              <- ets:match_object(Durable, {{VBucket, '_'}, '_', '_', pending})],
            {P, C, A} = case ets:lookup(Durable, {count, VBucket}) of
                            [{_, P0, C0, A0}] -> {P0, C0, A0};
                            [] -> {0, 0, 0}
                        end,
            #{pending => lists:sort(Pending), prepares => P, commits => C, aborts => A}
    end.

%% @doc The prepared seqnos a node's producer connections received in DCP_SEQNO_ACKNOWLEDGEDs for
%% a vbucket, in arrival order.
-spec seqno_acks(pid(), dcp_commands:vbucket()) -> [non_neg_integer()].
seqno_acks(Node, VBucket) ->
    #{acks := Acks} = gen_server:call(Node, config),
    [Seqno || {_, Seqno} <- ets:lookup(Acks, VBucket)].

%% @doc What seqno `Seqno' of a producer's vbucket holds: `{create, Cid}' (a system event) at
%% seqnos 1..K, else the collection of its document.
-spec collection_of(node_config(), pos_integer()) -> non_neg_integer() | {create, non_neg_integer()}.
collection_of(Config, Seqno) ->
    case seqno_item(Config, Seqno) of
        {create, Cid} -> {create, Cid};
        {_, Cid} -> Cid;
        {_, Cid, _} -> Cid
    end.

%% @doc What seqno `Seqno' of a seeded vbucket holds (the layout of the module doc): a collection's
%% create event, a document, the prepare of a durable write (and how it ends), or the commit or
%% abort of the prepare at `PreparedSeqno'.
-spec seqno_item(node_config(), pos_integer()) ->
          {create, non_neg_integer()} | {doc, non_neg_integer()}
              | {prepare, non_neg_integer(), committed | aborted | pending}
              | {commit | abort, non_neg_integer(), pos_integer()}.
seqno_item(#{collections := Cs, docs_per_vbucket := N,
             durable_writes := {Committed, Aborted, _Pending}}, Seqno) ->
    Others = [C || C <- Cs, C =/= 0],
    K = length(Others),
    if
        Seqno =< K ->
            {create, lists:nth(Seqno, Others)};
        Seqno =< K + N ->
            {doc, lists:nth((Seqno - K - 1) rem length(Cs) + 1, Cs)};
        true ->
            %% the durable writes: two seqnos each for the committed then the aborted ones, one
            %% each for the pending ones; their collections go round in order too
            D = Seqno - K - N - 1,
            Resolved = 2 * (Committed + Aborted),
            Index = case D < Resolved of
                        true -> D div 2;
                        false -> Committed + Aborted + D - Resolved
                    end,
            Cid = lists:nth(Index rem length(Cs) + 1, Cs),
            if
                D >= Resolved -> {prepare, Cid, pending};
                D rem 2 =:= 0, Index < Committed -> {prepare, Cid, committed};
                D rem 2 =:= 0 -> {prepare, Cid, aborted};
                Index < Committed -> {commit, Cid, Seqno - 1};
                true -> {abort, Cid, Seqno - 1}
            end
    end.

%% @doc A producer's vbucket high seqno: its system events, its documents and its durable writes.
-spec high_seqno(node_config()) -> non_neg_integer().
high_seqno(#{docs_per_vbucket := N, durable_writes := {Committed, Aborted, Pending}} = Config) ->
    N + events_per_vbucket(Config) + 2 * (Committed + Aborted) + Pending.

events_per_vbucket(#{collections := Cs}) ->
    length([C || C <- Cs, C =/= 0]).

%% The live documents of a seeded vbucket, `{Cid, Key, Seqno, Value}': the documents and the
%% committed durable writes (at their commit's seqno).
live_docs(Config, VB) ->
    lists:filtermap(fun(Seqno) ->
                            case seqno_item(Config, Seqno) of
                                {doc, Cid} ->
                                    {Key, Seqno, Value} = doc(Config, VB, Seqno),
                                    {true, {Cid, Key, Seqno, Value}};
                                {commit, Cid, Prepared} ->
                                    {Key, Value} = durable_doc(Config, VB, Prepared),
                                    {true, {Cid, Key, Seqno, Value}};
                                _ ->
                                    false
                            end
                    end, lists:seq(events_per_vbucket(Config) + 1, high_seqno(Config))).

%% @doc The node's state of a vbucket: a producer's vbuckets start `active' (`dead' after a takeover),
%% a consumer's `replica' until a DCP_SET_VBUCKET_STATE changes it.
-spec vbucket_state(pid(), dcp_commands:vbucket()) -> dcp_commands:vbucket_state() | undefined.
vbucket_state(Node, VBucket) ->
    #{vbucket_states := Table} = gen_server:call(Node, config),
    kv_sim_vbuckets:state(Table, VBucket).

%% @doc The node's live DCP connections (those that sent DCP_OPEN), by type and name.
-spec connections(pid()) -> [{producer | consumer, binary()}].
connections(Node) ->
    gen_server:call(Node, connections).

%% @doc Sets a vbucket's state on the node, as ns_server's janitor does before a replica is built.
-spec set_vbucket_state(pid(), dcp_commands:vbucket(), dcp_commands:vbucket_state()) -> ok.
set_vbucket_state(Node, VBucket, State) ->
    #{vbucket_states := Table} = gen_server:call(Node, config),
    kv_sim_vbuckets:set_state(Table, VBucket, State).

%% @doc Drops the node's copy of a vbucket: its documents and high seqno go, its state becomes `dead'.
-spec delete_vbucket(pid(), dcp_commands:vbucket()) -> ok.
delete_vbucket(Node, VBucket) ->
    #{vbucket_states := Table, store := Store, events := Events, durable := Durable} =
        gen_server:call(Node, config),
    ets:match_delete(Store, {{VBucket, '_'}, '_', '_'}),
    ets:match_delete(Events, {{VBucket, '_'}, '_', '_', '_'}),
    ets:match_delete(Durable, {{VBucket, '_'}, '_', '_', '_'}),
    ets:delete(Durable, {count, VBucket}),
    ok = kv_sim_vbuckets:set_high_seqnos(Table, #{VBucket => 0}),
    kv_sim_vbuckets:set_state(Table, VBucket, dead).

%% @doc A producer node's documents (not its durable writes) of a vbucket from seqno `From' on, as
%% `{Key, Seqno, Value}'.
-spec docs(node_config(), dcp_commands:vbucket(), pos_integer()) -> [{binary(), pos_integer(), binary()}].
docs(Config, VBucket, From) ->
    #{docs_per_vbucket := N} = Config,
    [doc(Config, VBucket, Seqno)
     || Seqno <- lists:seq(max(From, events_per_vbucket(Config) + 1),
                           events_per_vbucket(Config) + N)].

%% @doc Document `Seqno' of a vbucket: a zero-padded key (so key order is seqno order) and a value cut
%% from the node's seeded random block at an offset that depends on the key.
-spec doc(node_config(), dcp_commands:vbucket(), pos_integer()) -> {binary(), pos_integer(), binary()}.
doc(#{value_size := Size, value_block := Block}, VBucket, Seqno) ->
    Key = <<"doc-", (pad(VBucket, 4))/binary, "-", (pad(Seqno, 8))/binary>>,
    Offset = erlang:phash2({VBucket, Seqno}, Size + 1),
    {Key, Seqno, binary:part(Block, Offset, Size)}.

%% @doc The key and value of the durable write prepared at `PreparedSeqno' (keys `dur-...', apart
%% from the documents').
-spec durable_doc(node_config(), dcp_commands:vbucket(), pos_integer()) -> {binary(), binary()}.
durable_doc(#{value_size := Size, value_block := Block}, VBucket, Seqno) ->
    Key = <<"dur-", (pad(VBucket, 4))/binary, "-", (pad(Seqno, 8))/binary>>,
    Offset = erlang:phash2({VBucket, Seqno}, Size + 1),
    {Key, binary:part(Block, Offset, Size)}.

%% The digits of 10^Width + N after its leading 1 are N zero-padded to Width: one conversion per key
%% on the producer's hot path.
pad(N, Width) ->
    case pow10(Width) of
        Limit when N < Limit ->
            <<_One, Padded/binary>> = integer_to_binary(Limit + N),
            Padded;
        _ ->
            integer_to_binary(N)
    end.

pow10(4) -> 10000;
pow10(8) -> 100000000.

digest_of(Docs) ->
    Sorted = lists:keysort(1, Docs),
    Ctx = lists:foldl(fun({Key, Seqno, Value}, Acc) ->
                              crypto:hash_update(Acc, [<<(byte_size(Key)):32>>, Key, <<Seqno:64>>,
                                                       <<(byte_size(Value)):32>>, Value])
                      end, crypto:hash_init(sha256), Sorted),
    {length(Sorted), crypto:hash_final(Ctx)}.

%% ---- gen_server ----

init(Opts) ->
    process_flag(trap_exit, true),
    case config(Opts) of
        {ok, Config} ->
            listen(Opts, Config);
        {error, Reason} ->
            {stop, Reason}
    end.

config(#{role := Role} = Opts) when Role =:= consumer; Role =:= producer; Role =:= node ->
    Seed = maps:get(seed, Opts, 42),
    ValueSize = maps:get(value_size, Opts, 256),
    {Block, _} = rand:bytes_s(2 * ValueSize + 1, rand:seed_s(exsss, Seed)),
    VBuckets = case maps:get(vbuckets, Opts, 64) of
                   N when is_integer(N) -> lists:seq(0, N - 1);
                   List when is_list(List) -> List
               end,
    InitialState = case Role of
                       producer -> active;
                       consumer -> replica;
                       node -> dead
                   end,
    Docs = case Role of
               consumer -> 0;
               _ -> maps:get(docs_per_vbucket, Opts, 100)
           end,
    Config = #{role => Role,
           bucket => iolist_to_binary(maps:get(bucket, Opts, "default")),
           user => iolist_to_binary(maps:get(user, Opts, "Administrator")),
           password => iolist_to_binary(maps:get(password, Opts, "password")),
           vbuckets => VBuckets,
           docs_per_vbucket => Docs,
           value_size => ValueSize,
           seed => Seed,
           value_block => Block,
           hello_features => maps:get(hello_features, Opts, ?DEFAULT_FEATURES),
           consumer_buffer_size => maps:get(consumer_buffer_size, Opts, 10 * 1024 * 1024),
           collections => lists:usort([0 | maps:get(collections, Opts, [0])]),
           accept_alt_requests => maps:get(accept_alt_requests, Opts, false),
           durable_writes => durable_writes(Role, maps:get(durable_writes, Opts, #{})),
           %% ordered: a vbucket's rows are read by a key prefix, not a scan of the table
           events => ets:new(kv_sim_events, [public, ordered_set]),
           durable => ets:new(kv_sim_durable, [public, ordered_set]),
           acks => ets:new(kv_sim_seqno_acks, [public, duplicate_bag]),
           faults => ets:new(kv_sim_faults, [public, set, {read_concurrency, true}]),
           store => ets:new(kv_sim_store, [public, ordered_set, {write_concurrency, true}]),
           vbucket_states => kv_sim_vbuckets:new(VBuckets, InitialState),
           node => self()},
    ok = seed_node(Role, Opts, Config),
    {ok, Config};
config(Opts) ->
    {error, {bad_role, maps:get(role, Opts, missing)}}.

durable_writes(consumer, _) ->
    {0, 0, 0};
durable_writes(_Role, Counts) ->
    {maps:get(committed, Counts, 0), maps:get(aborted, Counts, 0), maps:get(pending, Counts, 0)}.

%% A `node' holds its seeded active and replica vbuckets in its store, as a collection-aware consumer
%% with sync writes would after a full replication from a producer with the same seed: the live
%% documents (committed durable writes at their commit's seqno), the system events, and every
%% durable write's prepare with how it ended.
seed_node(node, Opts, #{vbucket_states := Table} = Config) ->
    Held = [{VB, active} || VB <- maps:get(active_vbuckets, Opts, [])]
        ++ [{VB, replica} || VB <- maps:get(replica_vbuckets, Opts, [])],
    lists:foreach(fun({VB, State}) ->
                          seed_vbucket(Config, VB),
                          ok = kv_sim_vbuckets:set_state(Table, VB, State)
                  end, Held),
    High = high_seqno(Config),
    kv_sim_vbuckets:set_high_seqnos(Table, maps:from_list([{VB, High} || {VB, _} <- Held]));
seed_node(_Role, _Opts, _Config) ->
    ok.

seed_vbucket(#{store := Store, events := Events, durable := Durable} = Config, VB) ->
    Items = [{Seqno, seqno_item(Config, Seqno)} || Seqno <- lists:seq(1, high_seqno(Config))],
    ets:insert(Events, [{{VB, Seqno}, 0, collection_name(Cid),
                         dcp_commands:create_collection_value(Cid)}
                        || {Seqno, {create, Cid}} <- Items]),
    ets:insert(Store, [{{VB, store_key(Cid, Key)}, Seqno, Value}
                       || {Cid, Key, Seqno, Value} <- live_docs(Config, VB)]),
    Ends = maps:from_list([{Prepared, {Kind, Seqno}}
                           || {Seqno, {Kind, _, Prepared}} <- Items, Kind =/= prepare]),
    Prepares = [begin
                    {Key, Value} = durable_doc(Config, VB, Seqno),
                    Outcome = case maps:find(Seqno, Ends) of
                                  {ok, {commit, At}} -> {committed, At};
                                  {ok, {abort, At}} -> {aborted, At};
                                  error -> pending
                              end,
                    {{VB, store_key(Cid, Key)}, Seqno, Value, Outcome}
                end || {Seqno, {prepare, Cid, _}} <- Items],
    ets:insert(Durable, Prepares),
    {Committed, Aborted, Pending} = maps:get(durable_writes, Config),
    ets:insert(Durable, {{count, VB}, Committed + Aborted + Pending, Committed, Aborted}).

listen(Opts, Config) ->
    Port = maps:get(port, Opts, 0),
    Ssl = maps:get(ssl, Opts, false),
    %% with `tls_port' the main listener is plain and TLS has its own
    {Main, Tls} = case maps:find(tls_port, Opts) of
                      {ok, TlsPort} when Ssl =/= false -> {{Port, false}, {TlsPort, Ssl}};
                      {ok, _} -> {{Port, false}, none};
                      error -> {{Port, Ssl}, none}
                  end,
    case open_listener(Main, Config) of
        {ok, {Transport, LSock, ActualPort, Acceptor}} ->
            case open_listener(Tls, Config) of
                {ok, TlsListener} ->
                    {ok, #{config => Config, lsock => LSock, transport => Transport,
                           port => ActualPort, acceptor => Acceptor, tls => TlsListener,
                           connections => #{}, dcp_names => #{}, records => [], transports => #{},
                           closes => []}};
                {error, Reason} ->
                    _ = Transport:close(LSock),
                    {stop, Reason}
            end;
        {error, Reason} ->
            {stop, Reason}
    end.

open_listener(none, _Config) ->
    {ok, none};
open_listener({Port, Ssl}, Config) ->
    %% Without `buffer' the driver reads 1460 bytes at a time: a consumer node would take a turn per
    %% few hundred bytes of a fast stream.
    Common = [binary, {active, false}, {ip, loopback}, {reuseaddr, true}, {nodelay, true},
              {backlog, 128}, {buffer, ?SOCKET_BUFFER}],
    {Transport, Listen} = case Ssl of
                              false -> {gen_tcp, gen_tcp:listen(Port, Common)};
                              SslOpts -> {ssl, ssl:listen(Port, Common ++ SslOpts)}
                          end,
    case Listen of
        {ok, LSock} ->
            {ok, {_, ActualPort}} = sockname(Transport, LSock),
            Self = self(),
            Acceptor = spawn_link(fun() -> accept_loop(Self, Transport, LSock, Config) end),
            {ok, {Transport, LSock, ActualPort, Acceptor}};
        {error, Reason} ->
            {error, {listen_failed, Port, Reason}}
    end.

sockname(gen_tcp, Sock) -> inet:sockname(Sock);
sockname(ssl, Sock) -> ssl:sockname(Sock).

%% Accepting in its own process keeps the node answering calls; each connection gets its own process,
%% which does the TLS handshake itself so a slow client never stalls the acceptor.
accept_loop(Node, Transport, LSock, Config) ->
    case accept(Transport, LSock) of
        {ok, Sock} ->
            ok = hand_over(Node, Transport, Sock, Config),
            accept_loop(Node, Transport, LSock, Config);
        {error, closed} ->
            ok;
        {error, Reason} ->
            logger:warning(#{what => kv_sim_accept_failed, reason => Reason},
                           #{domain => [dcp_proxy, kv_sim]}),
            accept_loop(Node, Transport, LSock, Config)
    end.

%% The node learns of each connection (to stop it first when it stops); the connection reads only once
%% it owns the socket.
hand_over(Node, Transport, Sock, Config) ->
    case kv_sim_conn:start(Config, Transport, Sock) of
        {ok, Pid} ->
            Node ! {kv_sim_connection, Pid, Transport},
            case controlling_process(Transport, Sock, Pid) of
                ok ->
                    Pid ! {kv_sim_socket_ready, Sock},
                    ok;
                {error, _} ->
                    exit(Pid, kill),
                    ok
            end;
        {error, Reason} ->
            _ = Transport:close(Sock),
            logger:error(#{what => kv_sim_connection_start_failed, reason => Reason},
                         #{domain => [dcp_proxy, kv_sim]})
    end.

accept(gen_tcp, LSock) -> gen_tcp:accept(LSock);
accept(ssl, LSock) -> ssl:transport_accept(LSock).

controlling_process(gen_tcp, Sock, Pid) -> gen_tcp:controlling_process(Sock, Pid);
controlling_process(ssl, Sock, Pid) -> ssl:controlling_process(Sock, Pid).

handle_call(handshakes, _From, #{records := Records} = State) ->
    {reply, [R || {_Pid, R} <- lists:reverse(Records)], State};
handle_call(closes, _From, #{closes := Closes} = State) ->
    {reply, lists:reverse(Closes), State};
handle_call(port, _From, #{port := Port} = State) ->
    {reply, Port, State};
handle_call(tls_port, _From, #{tls := Tls} = State) ->
    {reply, case Tls of {_, _, TlsPort, _} -> TlsPort; none -> undefined end, State};
handle_call(transports, _From, #{dcp_names := Names, transports := Transports} = State) ->
    {reply, lists:sort([{Type, Name, maps:get(Pid, Transports, gen_tcp)}
                        || {Pid, {Type, Name}} <- maps:to_list(Names)]), State};
handle_call(config, _From, #{config := Config} = State) ->
    {reply, Config, State};
handle_call({set_fault, VBucket, Fault}, _From, #{config := #{faults := Faults}} = State) ->
    case kv_sim_faults:key(VBucket, Fault) of
        {ok, Key, Stored} ->
            ets:insert(Faults, {Key, Stored}),
            {reply, ok, State};
        {error, _} = Error ->
            {reply, Error, State}
    end;
handle_call(connections, _From, #{dcp_names := Names} = State) ->
    {reply, lists:sort(maps:values(Names)), State};
handle_call({dcp_connection, Name}, _From, #{dcp_names := Names} = State) ->
    {reply, [Pid || {Pid, {_, N}} <- maps:to_list(Names), N =:= Name], State};
handle_call(clear_faults, _From, #{config := #{faults := Faults}} = State) ->
    ets:delete_all_objects(Faults),
    {reply, ok, State};
handle_call(Request, _From, State) ->
    {reply, {error, {unknown_call, Request}}, State}.

handle_cast(_Msg, State) ->
    {noreply, State}.

handle_info({kv_sim_record, Pid, Fields}, #{records := Records} = State) ->
    %% newest connection first
    Updated = case lists:keyfind(Pid, 1, Records) of
                  {Pid, Old} -> lists:keyreplace(Pid, 1, Records, {Pid, maps:merge(Old, Fields)});
                  false -> [{Pid, Fields} | Records]
              end,
    {noreply, State#{records := Updated}};
handle_info({kv_sim_closed, Pid, Reason}, #{closes := Closes, dcp_names := Names,
                                          records := Records} = State) ->
    %% sent before the connection ends, so its names are still known
    Name = case {Names, lists:keyfind(Pid, 1, Records)} of
               {#{Pid := {_Type, DcpName}}, _} -> DcpName;
               {_, {Pid, #{hello_key := Key}}} -> Key;
               _ -> undefined
           end,
    {noreply, State#{closes := [{Name, Reason} | Closes]}};
handle_info({kv_sim_connection, Pid, Transport}, #{connections := Conns, transports := Ts} = State) ->
    {noreply, State#{connections := Conns#{Pid => erlang:monitor(process, Pid)},
                     transports := Ts#{Pid => Transport}}};
handle_info({kv_sim_dcp_open, Pid, Type, Name}, #{dcp_names := Names} = State) ->
    {noreply, State#{dcp_names := Names#{Pid => {Type, Name}}}};
handle_info({'DOWN', _Ref, process, Pid, _Reason},
            #{connections := Conns, dcp_names := Names, transports := Ts} = State) ->
    {noreply, State#{connections := maps:remove(Pid, Conns), dcp_names := maps:remove(Pid, Names),
                     transports := maps:remove(Pid, Ts)}};
handle_info({'EXIT', Acceptor, Reason}, #{acceptor := Acceptor} = State) ->
    {stop, {acceptor_died, Reason}, State};
handle_info({'EXIT', Acceptor, Reason}, #{tls := {_, _, _, Acceptor}} = State) ->
    {stop, {acceptor_died, Reason}, State};
handle_info(_Info, State) ->
    {noreply, State}.

%% The connections use the node's tables, which go with this process: they are stopped first.
terminate(_Reason, #{transport := Transport, lsock := LSock, tls := Tls, connections := Conns}) ->
    _ = Transport:close(LSock),
    _ = case Tls of
            {TlsTransport, TlsLSock, _, _} -> TlsTransport:close(TlsLSock);
            none -> ok
        end,
    maps:foreach(fun(Pid, _Ref) -> exit(Pid, kill) end, Conns),
    maps:foreach(fun(Pid, Ref) ->
                         receive
                             {'DOWN', Ref, process, Pid, _} -> ok
                         end
                 end, Conns).
