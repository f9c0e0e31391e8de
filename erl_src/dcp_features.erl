%% @doc Replication features as ns_server passes them, and what they ask of each socket's handshake:
%% the HELLO features and key, the DCP_OPEN flags, and the consumer's DCP_OPEN `consumer_name' value.
%%
%% ns_server hands its replicator a proplist (`[{xattr, true}, {collections, true}, ...]'); the older
%% form here was a list of names. Both are read the same way; anything else is an error named before
%% any socket is opened.
-module(dcp_features).

-export([parse/1, hello_key/2, consumer_name_value/1, plan/3, handshake_frames/2, check_hello/2,
         consumer_of/1]).

-export_type([feature/0, features/0, parsed/0, plan/0]).

%% The replication features ns_server knows.
-type feature() :: xattr | collections | snappy | json | duplex | del_times | del_user_xattr
                 | set_consumer_name | ssl.
-type features() :: [feature() | {feature(), boolean()}].
-type hello_feature() :: xattr | snappy | json | duplex | collections.
-type parsed() :: #{hello := [hello_feature()],
                    open_flags := [dcp_commands:open_flag()],
                    consumer_name := boolean(),
                    ssl := boolean(),
                    features := [feature()]}.
%% What one socket's handshake sends after SASL and SELECT_BUCKET.
-type plan() :: #{side := consumer | producer,
                  connection_name := binary(),
                  hello := [hello_feature()],
                  hello_key := binary(),
                  open_flags := [dcp_commands:open_flag()],
                  open_value := none | binary()}.

%% ns_server cuts the HELLO key at memcached's limit for an agent name.
-define(MAX_HELLO_KEY, 250).
%% HELLO asks in this order (the codes ascending).
-define(HELLO_ORDER, [xattr, snappy, json, duplex, collections]).
-define(OPEN_ORDER, [xattr, del_times, del_user_xattr]).
-define(KNOWN, [xattr, collections, snappy, json, duplex, del_times, del_user_xattr,
                set_consumer_name, ssl]).

%% @doc Reads the features. A name with `false' is as if absent; a name given twice takes its first
%% value, as `proplists:get_value/2' does in ns_server. The error holds the whole value (as every
%% `dcp_options' error does) when an entry is an unknown name or has a value that is not a boolean,
%% or the list is improper, or the term is not a list at all.
-spec parse(term()) -> {ok, parsed()} | {error, {bad_option, features, term()}}.
parse(Features) when is_list(Features) ->
    case entries(Features, []) of
        {ok, On} ->
            {ok, #{hello => [F || F <- ?HELLO_ORDER, lists:member(F, On)],
                   open_flags => [F || F <- ?OPEN_ORDER, lists:member(F, On)],
                   consumer_name => lists:member(json, On) andalso
                       lists:member(set_consumer_name, On),
                   ssl => lists:member(ssl, On),
                   features => [F || F <- ?KNOWN, lists:member(F, On)]}};
        error ->
            {error, {bad_option, features, Features}}
    end;
parse(Other) ->
    {error, {bad_option, features, Other}}.

entries([], Acc) ->
    {ok, [Name || Name <- lists:reverse(Acc), is_atom(Name)]};
entries([Entry | Rest], Acc) ->
    case entry(Entry) of
        {ok, Name, Value} ->
            Seen = lists:member(Name, Acc) orelse lists:member({off, Name}, Acc),
            case {Seen, Value} of
                {true, _} -> entries(Rest, Acc);
                {false, true} -> entries(Rest, [Name | Acc]);
                {false, false} -> entries(Rest, [{off, Name} | Acc])
            end;
        error ->
            error
    end;
entries(_Improper, _Acc) ->
    error.

entry({Name, Value}) when is_boolean(Value) ->
    known(Name, Value);
entry(Name) when is_atom(Name) ->
    known(Name, true);
entry(_) ->
    error.

known(Name, Value) ->
    case lists:member(Name, ?KNOWN) of
        true -> {ok, Name, Value};
        false -> error
    end.

%% @doc The HELLO key ns_server sends: memcached names the connection by it in logs and stats.
-spec hello_key(consumer | producer, iodata()) -> binary().
hello_key(Side, ConnectionName) ->
    Key = iolist_to_binary(["ns_server:proxy-", atom_to_binary(Side), "/", ConnectionName]),
    case byte_size(Key) > ?MAX_HELLO_KEY of
        true -> binary:part(Key, 0, ?MAX_HELLO_KEY);
        false -> Key
    end.

%% @doc The consumer's DCP_OPEN value `{"consumer_name":"<name>"}' (sent with datatype JSON).
-spec consumer_name_value(iodata() | atom()) -> binary().
consumer_name_value(Name) when is_atom(Name) ->
    consumer_name_value(atom_to_binary(Name));
consumer_name_value(Name) ->
    iolist_to_binary([<<"{\"consumer_name\":\"">>, json_escape(iolist_to_binary(Name)), <<"\"}">>]).

json_escape(Bin) ->
    << <<(json_char(C))/binary>> || <<C>> <= Bin >>.

json_char($") -> <<"\\\"">>;
json_char($\\) -> <<"\\\\">>;
json_char(C) when C < 16#20 -> iolist_to_binary(io_lib:format("\\u~4.16.0b", [C]));
json_char(C) -> <<C>>.

%% @doc The handshake of one side's socket from its proxy options: `features' (either form) and,
%% for the consumer's `consumer_name' value, `consumer_node' (a node name). ns_server's consumer sends
%% its own node, which is the consumer of `replication:<producer>-><consumer>:<bucket>': without the
%% option that part of the connection name is used, and this node's name when the name has no such
%% part (a cut long name).
-spec plan(consumer | producer, iodata(), map()) ->
          {ok, plan()} | {error, {bad_option, features, term()}}.
plan(Side, ConnectionName, Opts) ->
    case parse(maps:get(features, Opts, [])) of
        {ok, #{hello := Hello, open_flags := Flags, consumer_name := WantName}} ->
            Value = case Side =:= consumer andalso WantName of
                        true -> consumer_name_value(consumer_node(ConnectionName, Opts));
                        false -> none
                    end,
            {ok, #{side => Side, connection_name => iolist_to_binary(ConnectionName),
                   hello => Hello, hello_key => hello_key(Side, ConnectionName),
                   open_flags => Flags, open_value => Value}};
        {error, _} = Error ->
            Error
    end.

consumer_node(ConnectionName, Opts) ->
    case maps:find(consumer_node, Opts) of
        {ok, Node} -> Node;
        error -> consumer_of(iolist_to_binary(ConnectionName))
    end.

%% @doc The consumer node of a connection name `replication:<producer>-><consumer>:<bucket>[/N]';
%% this node's name when the name has no such part.
-spec consumer_of(binary()) -> binary().
consumer_of(<<"replication:", Rest/binary>>) ->
    case binary:split(Rest, <<"->">>) of
        [_Producer, ConsumerAndBucket] ->
            %% the bucket cannot hold a colon, a node (an IPv6 host) can
            case string:split(ConsumerAndBucket, <<":">>, trailing) of
                [Consumer, _Bucket] when Consumer =/= <<>> -> iolist_to_binary(Consumer);
                _ -> atom_to_binary(node())
            end;
        _ ->
            atom_to_binary(node())
    end;
consumer_of(_) ->
    atom_to_binary(node()).

%% @doc The frames after SELECT_BUCKET, each named by its step: HELLO only when a feature is asked
%% for, then DCP_OPEN. Opaques count up from `FirstOpaque'.
-spec handshake_frames(plan(), dcp_commands:opaque()) -> [{hello | dcp_open, iodata()}].
handshake_frames(#{side := Side, connection_name := Name, hello := Hello, hello_key := Key,
                   open_flags := Flags, open_value := Value}, FirstOpaque) ->
    HelloFrames = case Hello of
                      [] -> [];
                      _ -> [{hello, dcp_commands:hello(Key, Hello, FirstOpaque)}]
                  end,
    Open = case Value of
               none -> dcp_commands:dcp_open(Name, Side, Flags, FirstOpaque + 1);
               _ -> dcp_commands:dcp_open_json(Name, Side, Flags, Value, FirstOpaque + 1)
           end,
    HelloFrames ++ [{dcp_open, Open}].

%% @doc The HELLO answer's value against what was asked: a refused snappy only costs compression;
%% any other refused feature changes what the peer sends, so it is an error.
-spec check_hello(plan(), binary()) -> ok | {error, {hello, {features_refused, [hello_feature()]}}}.
check_hello(#{hello := Wanted}, Value) ->
    Granted = dcp_commands:hello_features(Value),
    case [F || F <- Wanted, F =/= snappy, not lists:member(F, Granted)] of
        [] -> ok;
        Refused -> {error, {hello, {features_refused, Refused}}}
    end.
