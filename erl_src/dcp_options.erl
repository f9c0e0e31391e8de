%% @doc The options of the public start functions (`dcp_replicator:start_link/1',
%% `dcp_sup:start_link/1'), checked before anything connects. An unknown key or a bad value is
%% `{error, {bad_option, Key, Value}}' (a bad password's value is never echoed: it is
%% `dcp_secret:redacted()'); a required key that is missing is `{error, {missing_option, Key}}'.
%% The checked options come back normalised: the password wrapped (`dcp_secret'), the user a UTF-8
%% binary, the bucket a string, the features a sorted list of the names that are on. The README's options table lists the same keys, types and defaults as `specs/0'.
-module(dcp_options).

-export([replicator/1, sup/1, check/2, defaults/0]).

-export_type([error/0]).

-type error() :: {bad_option, atom() | term(), term()} | {missing_option, atom()}
               | {bad_options, not_a_map}.

%% The defaults the connection processes apply when a key is absent (README, "Options"); the buffers
%% as dcp_proxy's, chosen by the end-to-end benchmark.
-define(DEFAULT_BUF, 1024 * 1024).
-define(DEFAULTS, #{features => [], ssl => false, setup_timeout => 60000, shut_timeout => 10000,
                    connect_timeout => 30000, send_timeout => 60000,
                    max_frame_size => 30 * 1024 * 1024 + 24, splitter => nif,
                    recbuf => ?DEFAULT_BUF, sndbuf => ?DEFAULT_BUF, connections => 1}).
%% What `mcbp:splitter_new/1' takes (mcbp::MAX_FRAME_SIZE_RANGE): a header at least, a u32 body
%% at most.
-define(MIN_FRAME, 24).
-define(MAX_FRAME, 16#FFFFFFFF + 24).
%% Kernel socket buffers: below 4 KiB a read is smaller than most frames; the kernel caps the top.
-define(MIN_BUF, 4096).
-define(MAX_BUF, 64 * 1024 * 1024).
-define(MAX_BUCKET_NAME, 100).
-define(MAX_CONNECTIONS, 1024).

%% ---- API ----

%% @doc Checks `dcp_replicator:start_link/1''s options.
-spec replicator(term()) -> {ok, map()} | {error, error()}.
replicator(Opts) ->
    check(replicator, Opts).

%% @doc Checks `dcp_sup:start_link/1''s options: the replicator's without `connection_name' (made
%% per connection), plus `consumer_node', `producer_node' and `connections'.
-spec sup(term()) -> {ok, map()} | {error, error()}.
sup(Opts) ->
    check(sup, Opts).

%% @doc The defaults applied to absent optional keys (the README's table).
-spec defaults() -> map().
defaults() ->
    ?DEFAULTS.

-spec check(replicator | sup, term()) -> {ok, map()} | {error, error()}.
check(Kind, Opts) when is_map(Opts) ->
    Specs = specs(Kind),
    Checked = [check_key(K, V, Specs) || {K, V} <- lists:sort(maps:to_list(Opts))],
    case [E || {error, _} = E <- Checked] of
        [Error | _] ->
            Error;
        [] ->
            case [K || {K, required} <- maps:to_list(Specs), not is_map_key(K, Opts)] of
                [] -> {ok, maps:from_list([KV || {ok, KV} <- Checked])};
                Missing -> {error, {missing_option, hd(lists:sort(Missing))}}
            end
    end;
check(_Kind, _Opts) ->
    {error, {bad_options, not_a_map}}.

check_key(Key, Value, Specs) ->
    case is_map_key(Key, Specs) of
        false ->
            {error, {bad_option, Key, shown(Key, Value)}};
        true ->
            case value(Key, Value) of
                {ok, Normal} -> {ok, {Key, Normal}};
                error -> {error, {bad_option, Key, shown(Key, Value)}}
            end
    end.

shown(password, _) -> dcp_secret:redacted();
%% TLS options hold the private key: only an atom (`true') is shown
shown(ssl, Ssl) when not is_atom(Ssl) -> dcp_secret:redacted();
shown(Side, #{ssl := Ssl} = E) when not is_atom(Ssl), Side =:= consumer orelse Side =:= producer ->
    E#{ssl => dcp_secret:redacted()};
shown(_, Value) -> Value.

%% Which keys each start function takes: required or optional.
specs(replicator) ->
    maps:merge(common(), #{consumer => required, producer => required,
                           connection_name => required, name => optional,
                           %% the consumer's DCP_OPEN names it (dcp_features:plan/3)
                           consumer_node => optional});
specs(sup) ->
    maps:merge(common(), #{consumer => required, producer => required,
                           consumer_node => required, producer_node => required,
                           connections => optional, name => optional}).

common() ->
    #{bucket => required, user => required, password => required,
      features => optional, ssl => optional, setup_timeout => optional,
      shut_timeout => optional, connect_timeout => optional, send_timeout => optional,
      max_frame_size => optional, recbuf => optional, sndbuf => optional,
      splitter => optional, traffic_monitor => optional, event_handler => optional}.

%% ---- values ----

value(Side, Endpoint) when Side =:= consumer; Side =:= producer ->
    ok_if(is_endpoint(Endpoint), hide_ssl(Endpoint));
value(bucket, Bucket) ->
    %% a string: it goes into connection names
    ok_if(is_bucket_name(Bucket), unicode:characters_to_list(Bucket));
value(connection_name, Name) ->
    %% ep-engine and ns_server depend on the prefix
    ok_if(is_ascii(Name) andalso lists:prefix("replication:", Name), Name);
value(user, User) ->
    utf8(User);
value(password, Password) ->
    case is_function(Password, 0) orelse is_binary(Password) orelse io_lib:char_list(Password) of
        true ->
            try {ok, dcp_secret:wrap(Password)}
            catch _:_ -> error
            end;
        false ->
            error
    end;
value(features, Features) ->
    features(Features);
value(ssl, false) ->
    {ok, false};
value(ssl, SslOpts) ->
    ok_if(is_ssl(SslOpts), wrap_ssl(SslOpts));
value(Key, T) when Key =:= setup_timeout; Key =:= connect_timeout; Key =:= send_timeout ->
    ok_if(T =:= infinity orelse (is_integer(T) andalso T >= 0), T);
value(shut_timeout, T) ->
    %% an integer: a supervisor's shutdown time is derived from it
    ok_if(is_integer(T) andalso T >= 0, T);
value(max_frame_size, N) ->
    ok_if(is_integer(N) andalso N >= ?MIN_FRAME andalso N =< ?MAX_FRAME, N);
value(Buf, N) when Buf =:= recbuf; Buf =:= sndbuf ->
    ok_if(is_integer(N) andalso N >= ?MIN_BUF andalso N =< ?MAX_BUF, N);
value(splitter, nif) ->
    {ok, nif};
value(splitter, {Module, Args} = S) ->
    ok_if(is_atom(Module) andalso is_map(Args) andalso exports(Module, feed, 2), S);
value(splitter, _) ->
    error;
value(traffic_monitor, Pid) ->
    ok_if(is_pid(Pid), Pid);
value(event_handler, Handler) ->
    ok_if(dcp_events:is_handler(Handler), Handler);
value(name, Name) ->
    ok_if(is_atom(Name) andalso Name =/= undefined, Name);
value(Node, N) when Node =:= consumer_node; Node =:= producer_node ->
    ok_if((is_atom(N) andalso N =/= undefined) orelse (is_ascii(N) andalso N =/= []), N);
value(connections, N) ->
    ok_if(is_integer(N) andalso N >= 1 andalso N =< ?MAX_CONNECTIONS, N).

ok_if(true, V) -> {ok, V};
ok_if(false, _) -> error.

%% `{Host, Port}', or (TLS per endpoint) a map with `host', `port' and optionally `ssl' and `local'.
is_endpoint({Host, Port}) ->
    is_host(Host) andalso is_port_number(Port);
is_endpoint(#{host := Host, port := Port} = E) ->
    is_host(Host) andalso is_port_number(Port)
        andalso [] =:= maps:keys(maps:without([host, port, ssl, local], E))
        andalso (maps:get(ssl, E, false) =:= false orelse is_ssl(maps:get(ssl, E)))
        andalso is_boolean(maps:get(local, E, false));
is_endpoint(_) ->
    false.

is_host(Host) when is_tuple(Host) ->
    case inet:ntoa(Host) of
        {error, einval} -> false;
        _ -> true
    end;
is_host(Host) when is_atom(Host) ->
    Host =/= undefined andalso Host =/= '';
is_host(Host) ->
    is_ascii(Host) andalso Host =/= [].

is_port_number(P) -> is_integer(P) andalso P >= 1 andalso P =< 65535.

%% a flat string of printable ASCII
is_ascii(S) when is_list(S) ->
    lists:all(fun(C) -> is_integer(C) andalso C >= 32 andalso C =< 126 end, S);
is_ascii(_) ->
    false.

%% Couchbase bucket names: 1..100 of A-Z a-z 0-9 . _ % -
is_bucket_name(B) when is_binary(B) ->
    is_bucket_name(binary_to_list(B));
is_bucket_name(B) when is_list(B) ->
    B =/= [] andalso length(B) =< ?MAX_BUCKET_NAME
        andalso lists:all(fun(C) -> (C >= $a andalso C =< $z) orelse (C >= $A andalso C =< $Z)
                                        orelse (C >= $0 andalso C =< $9)
                                        orelse lists:member(C, "._%-")
                          end, B);
is_bucket_name(_) ->
    false.

%% TLS options: a list (wrapped once checked: they hold the private key) or the wrapped list.
is_ssl(SslOpts) ->
    dcp_secret:is_secret(SslOpts) orelse is_option_list(SslOpts).

wrap_ssl(false) -> false;
wrap_ssl(SslOpts) when is_list(SslOpts) -> dcp_secret:wrap_term(SslOpts);
wrap_ssl(Wrapped) -> Wrapped.

hide_ssl(#{ssl := SslOpts} = Endpoint) -> Endpoint#{ssl => wrap_ssl(SslOpts)};
hide_ssl(Endpoint) -> Endpoint.

%% A proper list of options (atoms or tuples); ssl itself checks each one when it connects.
is_option_list(L) when is_list(L) ->
    try lists:all(fun(O) -> is_atom(O) orelse is_tuple(O) end, L)
    catch error:_ -> false
    end;
is_option_list(_) ->
    false.

%% A string of any Unicode characters or a UTF-8 binary, as a non-empty UTF-8 binary.
utf8(<<>>) ->
    error;
utf8(B) when is_binary(B) ->
    case unicode:characters_to_binary(B) of
        B -> {ok, B};
        _ -> error
    end;
utf8(S) when is_list(S), S =/= [] ->
    case io_lib:char_list(S) andalso unicode:characters_to_binary(S) of
        B when is_binary(B) -> {ok, B};
        _ -> error
    end;
utf8(_) ->
    error.

%% ns_server's proplist (`[{xattr, true}, {snappy, false}]') or a list of names, as a sorted list
%% of the names that are on (`dcp_features:parse/1' reads both forms).
features(Features) ->
    case dcp_features:parse(Features) of
        {ok, #{features := On}} -> {ok, lists:usort(On)};
        {error, _} -> error
    end.

exports(Module, Fun, Arity) ->
    case code:ensure_loaded(Module) of
        {module, Module} -> erlang:function_exported(Module, Fun, Arity);
        _ -> false
    end.
