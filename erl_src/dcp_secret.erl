%% @doc A password that no log line, crash report, supervisor report or `sys:get_status/1' can
%% show: it is wrapped (`wrap/1') before it enters any start argument, child spec, state or message,
%% and only the SASL step unwraps it (`reveal/1').
%%
%% The wrapped value is a fun of arity 0 that returns the password as UTF-8 (so code that calls
%% `Password()' keeps working). A fun prints as `#Fun<dcp_secret.N.M>'; its environment holds the
%% password XORed with a random pad of its own length, so not even `term_to_binary/1' of a state or
%% a child spec carries the password's bytes.
-module(dcp_secret).

-export([wrap/1, reveal/1, is_secret/1, redact/1, format_status/1, redacted/0,
         wrap_term/1, reveal_term/1]).

-export_type([secret/0]).

%% What the callers hold: call it (or `reveal/1') to get the password.
-type secret() :: fun(() -> binary()).

-define(REDACTED, '*redacted*').

%% @doc Wraps a password: a string (any Unicode characters), a UTF-8 binary, a fun returning
%% iodata (called once, now) or a secret already (returned as it is). Raises `badarg' (with the
%% argument redacted) for anything else, e.g. a list that is not a string.
-spec wrap(string() | binary() | fun(() -> iodata()) | secret()) -> secret().
wrap(Password) when is_function(Password, 0) ->
    case is_secret(Password) of
        true -> Password;
        false -> mask(to_utf8(Password()))
    end;
wrap(Password) ->
    mask(to_utf8(Password)).

mask(Plain) ->
    Pad = crypto:strong_rand_bytes(byte_size(Plain)),
    Masked = crypto:exor(Plain, Pad),
    fun() -> crypto:exor(Masked, Pad) end.

to_utf8(Bin) when is_binary(Bin) ->
    Bin;
to_utf8(Chars) ->
    case catch unicode:characters_to_binary(Chars) of
        Bin when is_binary(Bin) -> Bin;
        _ -> erlang:error(badarg, [?REDACTED])
    end.

%% @doc The password as UTF-8 bytes.
-spec reveal(secret()) -> binary().
reveal(Secret) when is_function(Secret, 0) ->
    iolist_to_binary(Secret()).

%% @doc Any term wrapped the same way: TLS options, which hold a private key and may hold a key
%% file's password, travel through start arguments, child specs and states as a secret.
-spec wrap_term(term()) -> secret().
wrap_term(Term) ->
    mask(term_to_binary(Term)).

%% @doc The term `wrap_term/1' wrapped.
-spec reveal_term(secret()) -> term().
reveal_term(Secret) ->
    binary_to_term(reveal(Secret)).

%% @doc True for a value made by `wrap/1' or `wrap_term/1'.
-spec is_secret(term()) -> boolean().
is_secret(F) when is_function(F, 0) ->
    {module, M} = erlang:fun_info(F, module),
    M =:= ?MODULE;
is_secret(_) ->
    false.

%% @doc The marker that stands for a password wherever one would be shown.
-spec redacted() -> '*redacted*'.
redacted() ->
    ?REDACTED.

%% @doc `Term' with every value under a `password' key (map key or `{password, V}' tuple) replaced
%% by the redacted marker, at any depth in maps, lists and tuples.
-spec redact(term()) -> term().
redact(#{} = Map) ->
    maps:map(fun(password, _) -> ?REDACTED;
                (_, V) -> redact(V)
             end, Map);
redact({password, _}) ->
    {password, ?REDACTED};
redact([H | T]) ->
    [redact(H) | redact_tail(T)];
redact(T) when is_tuple(T) ->
    list_to_tuple([redact(E) || E <- tuple_to_list(T)]);
redact(Other) ->
    Other.

%% improper lists stay improper
redact_tail([H | T]) -> [redact(H) | redact_tail(T)];
redact_tail([]) -> [];
redact_tail(Tail) -> redact(Tail).

%% @doc A `format_status/1' callback body: the state, the last message and the log with passwords
%% redacted (`gen_server:format_status/1''s map).
-spec format_status(map()) -> map().
format_status(Status) ->
    maps:map(fun(Key, V) when Key =:= state; Key =:= message; Key =:= log; Key =:= reason ->
                     redact(V);
                (_, V) ->
                     V
             end, Status).
