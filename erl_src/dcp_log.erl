%% @doc The log of a replication: logger reports (maps, never format strings with names pasted in)
%% with the connection's metadata (`connection', `side', `bucket') and domain `[dcp_proxy]'.
%%
%% Where they show. OTP's default handler logs only events without a domain or under `[otp, sasl]',
%% so an event with domain `[dcp_proxy]' never reaches it. The application (`dcp_proxy_app') adds a
%% handler of its own, `dcp_proxy', that logs exactly the `[dcp_proxy]' domain to standard_io with
%% OTP's default formatter: under a default logger configuration the lines show once, at the primary
%% level (notice by default; `logger:set_primary_config(level, debug)' shows each setup step), and
%% a user who wants them elsewhere sets `{dcp_proxy, [{log_handler, false}]}' and adds a domain
%% filter on their own handler (README, "Logs").
%%
%% Expected failures (a refused connect, failed authentication, a peer that closed, a protocol
%% violation) end a process with `{shutdown, Reason}' (`exit_reason/1') and one line, not a crash
%% report.
-module(dcp_log).

-export([ctx/3, set_process_metadata/1, metadata/1, who/1, errors/1,
         debug/2, info/2, notice/2, warning/2, error/2, log/3,
         vbuckets/1, ranges/1, is_expected/1, exit_reason/1, cause/1, stopped/2,
         format_report/1, add_handler/0, remove_handler/0,
         hide_tls_start_args/0, redact_tls_progress/2]).

-export_type([ctx/0]).

-type ctx() :: #{connection := binary() | string(), side => consumer | producer | replicator,
                 bucket => binary() | string()}.

-define(DOMAIN, [dcp_proxy]).
-define(HANDLER, dcp_proxy).
%% a summary lists at most this many ranges of a vbucket list
-define(MAX_RANGES, 8).

%% ---- metadata ----

-spec ctx(binary() | string(), consumer | producer | replicator, binary() | string()) -> ctx().
ctx(Name, Side, Bucket) ->
    #{connection => to_bin(Name), side => Side, bucket => to_bin(Bucket)}.

%% @doc Every later log event of this process carries `Ctx' (and the domain) as metadata.
-spec set_process_metadata(ctx()) -> ok.
set_process_metadata(Ctx) ->
    logger:update_process_metadata(metadata(Ctx)).

%% @doc The metadata of an event about `Ctx'.
-spec metadata(ctx()) -> logger:metadata().
metadata(Ctx) ->
    maps:merge(maps:with([connection, side, bucket], Ctx), #{domain => ?DOMAIN}).

to_bin(B) when is_binary(B) -> B;
to_bin(S) -> unicode:characters_to_binary(S).

%% ---- events ----

-spec debug(atom(), map()) -> ok.
debug(What, Fields) -> log(debug, What, Fields).
-spec info(atom(), map()) -> ok.
info(What, Fields) -> log(info, What, Fields).
-spec notice(atom(), map()) -> ok.
notice(What, Fields) -> log(notice, What, Fields).
-spec warning(atom(), map()) -> ok.
warning(What, Fields) -> log(warning, What, Fields).
-spec error(atom(), map()) -> ok.
error(What, Fields) -> log(error, What, Fields).

%% @doc A report `#{what => What, ...Fields}' at `Level' with the process's metadata (set by
%% `set_process_metadata/1') and the domain. Nothing is built when the level is off.
-spec log(logger:level(), atom(), map()) -> ok.
log(Level, What, Fields) ->
    case logger:allow(Level, ?MODULE) of
        true ->
            %% logger adds the process metadata (set_process_metadata/1)
            Who = case logger:get_process_metadata() of
                      #{} = M -> maps:with([connection, side], M);
                      undefined -> #{}
                  end,
            logger:log(Level, maps:merge(Who, maps:put(what, What, Fields)),
                       #{domain => ?DOMAIN, report_cb => fun ?MODULE:format_report/1});
        false ->
            ok
    end.

%% @doc How a report reads: `connection side: what key=value ...'; vbucket lists are summaries.
-spec format_report(logger:report()) -> {io:format(), [term()]}.
format_report(#{what := What} = Report) ->
    Fields = maps:without([what, connection, side], Report),
    Pairs = [io_lib:format(" ~s=~0tp", [K, V]) || {K, V} <- lists:sort(maps:to_list(Fields))],
    Who = case Report of
              #{connection := C, side := S} -> io_lib:format("~ts ~s: ", [C, S]);
              #{connection := C} -> io_lib:format("~ts: ", [C]);
              _ -> ""
          end,
    {"~ts~s~ts", [Who, What, Pairs]};
format_report(Report) ->
    {"~0tp", [Report]}.

%% ---- vbucket lists ----

%% @doc A vbucket list as a log shows it: its length and its ranges, at most 8 of them (then the
%% number of ranges not shown), e.g. `#{count => 512, ranges => <<"0-511">>}'.
-spec vbuckets([non_neg_integer()]) -> #{count := non_neg_integer(), ranges := binary()}.
vbuckets(VBuckets) ->
    Ranges = ranges(VBuckets),
    Shown = lists:sublist(Ranges, ?MAX_RANGES),
    Text = lists:join(",", [range_text(R) || R <- Shown]),
    More = case length(Ranges) - length(Shown) of
               0 -> [];
               N -> io_lib:format(",... (~b more ranges)", [N])
           end,
    #{count => length(lists:usort(VBuckets)), ranges => iolist_to_binary([Text, More])}.

%% @doc The sorted, unique vbuckets as `{First, Last}' runs.
-spec ranges([non_neg_integer()]) -> [{non_neg_integer(), non_neg_integer()}].
ranges(VBuckets) ->
    lists:reverse(lists:foldl(fun(V, [{F, L} | Acc]) when V =:= L + 1 -> [{F, V} | Acc];
                                 (V, Acc) -> [{V, V} | Acc]
                              end, [], lists:usort(VBuckets))).

range_text({V, V}) -> integer_to_list(V);
range_text({F, L}) -> [integer_to_list(F), $-, integer_to_list(L)].

%% @doc The fields that name a connection in a report, from a `dcp_proxy:conn()' (the bucket is in
%% the metadata).
-spec who(map()) -> map().
who(Conn) ->
    maps:filter(fun(_, V) -> V =/= undefined end,
                #{connection => maps:get(name, Conn, undefined),
                  side => maps:get(side, Conn, undefined)}).

%% @doc A setup reply's errors as a log shows them: per reason, the vbuckets' summary.
-spec errors([{term(), {vbucket, non_neg_integer()}}]) -> [{term(), map()}].
errors(Errors) ->
    ByWhy = lists:foldl(fun({Why, {vbucket, VB}}, Acc) ->
                                maps:update_with(Why, fun(L) -> [VB | L] end, [VB], Acc)
                        end, #{}, Errors),
    [{Why, vbuckets(VBs)} || {Why, VBs} <- lists:sort(maps:to_list(ByWhy))].

%% ---- how a process ends ----

%% @doc True for a reason that a peer or the network causes, which the replication reports and
%% its owner handles (retry, rebalance): not a bug, so not a crash report.
-spec is_expected(term()) -> boolean().
is_expected({shutdown, _}) -> true;
is_expected({Side, Why}) when Side =:= consumer; Side =:= producer -> is_expected(Why);
%% the partner's own end (crash or not) is the partner's report
is_expected({partner_down, _}) -> true;
is_expected({connect_failed, _}) -> true;
is_expected({tls, _}) -> true;
is_expected({socket_closed, _}) -> true;
is_expected({socket_error, _, _}) -> true;
is_expected({send_failed, _, _}) -> true;
is_expected({splitter_error, _, _}) -> true;
is_expected({unexpected_response, _, _}) -> true;
is_expected({stop, {unexpected_response, _, _}}) -> true;
is_expected({bad_set_vbucket_state, _}) -> true;
is_expected(connect_timeout) -> true;
is_expected(handshake_timeout) -> true;
is_expected({Step, _}) when Step =:= sasl_auth; Step =:= select_bucket; Step =:= hello;
                            Step =:= dcp_open ->
    true;
is_expected(_) -> false.

%% @doc The exit reason for `Reason': `{shutdown, Reason}' when it is expected (no crash report,
%% no supervisor child_terminated report), else `Reason' itself.
-spec exit_reason(term()) -> term().
exit_reason(normal) -> normal;
exit_reason(shutdown) -> shutdown;
exit_reason({shutdown, _} = R) -> R;
exit_reason(Reason) ->
    case is_expected(Reason) of
        true -> {shutdown, Reason};
        false -> Reason
    end.

%% @doc What `exit_reason/1' wrapped: `Reason' without `{shutdown, _}'.
-spec cause(term()) -> term().
cause({shutdown, Reason}) -> cause(Reason);
cause(Reason) -> Reason.

%% @doc The one line of a process that stops: notice for an orderly or expected stop, error for
%% anything else (which also gets OTP's crash report).
-spec stopped(atom(), term()) -> ok.
stopped(What, Reason) ->
    Level = case Reason of
                normal -> info;
                shutdown -> info;
                {shutdown, _} -> notice;
                _ -> error
            end,
    log(Level, What, #{reason => Reason}).

%% ---- the handler that shows the domain by default ----

%% @doc Adds the `dcp_proxy' handler (standard_io, OTP's default formatter, only domain
%% `[dcp_proxy]'), unless one of that name exists. Called by the application's start.
-spec add_handler() -> ok | {error, term()}.
add_handler() ->
    Config = #{level => all,
               filter_default => stop,
               filters => [{dcp_proxy_domain,
                            {fun logger_filters:domain/2, {log, sub, ?DOMAIN}}}],
               formatter => {logger_formatter, #{single_line => true, legacy_header => false}}},
    case logger:add_handler(?HANDLER, logger_std_h, Config) of
        ok -> ok;
        {error, {already_exist, ?HANDLER}} -> ok;
        {error, _} = Error -> Error
    end.

-spec remove_handler() -> ok.
remove_handler() ->
    _ = logger:remove_handler(?HANDLER),
    ok.

%% ---- OTP's TLS start reports ----

%% @doc Installs (once per node) the primary logger filter `redact_tls_progress/2'. OTP's
%% supervisor progress reports (info level) for ssl's per-connection supervisors print the
%% connection's start arguments, and with them every TLS option: the private key, the key file's
%% password. The proxy installs it before it opens a TLS connection.
-spec hide_tls_start_args() -> ok.
hide_tls_start_args() ->
    case logger:add_primary_filter(dcp_proxy_tls_start_args,
                                   {fun ?MODULE:redact_tls_progress/2, []}) of
        ok -> ok;
        {error, {already_exist, _}} -> ok
    end.

%% @doc The filter: a progress report of an ssl supervisor (`tls_*', `dtls_*', `ssl_*') keeps its
%% child's module and function; the arguments become `dcp_secret:redacted()'. Other events pass.
-spec redact_tls_progress(logger:log_event(), term()) -> logger:log_event().
redact_tls_progress(#{msg := {report, #{label := {supervisor, progress},
                                        report := Report} = Msg}} = Event, _) when is_list(Report) ->
    case is_tls_supervisor(proplists:get_value(supervisor, Report)) of
        true ->
            Started = [redact_args(Item) || Item <- proplists:get_value(started, Report, [])],
            Event#{msg := {report, Msg#{report := lists:keystore(started, 1, Report,
                                                                  {started, Started})}}};
        false ->
            Event
    end;
redact_tls_progress(Event, _) ->
    Event.

%% a dynamic supervisor is named {Pid, Module}, a registered one {local, Name}
is_tls_supervisor({_, Name}) -> is_tls_supervisor(Name);
is_tls_supervisor(Name) when is_atom(Name) ->
    lists:any(fun(Prefix) -> lists:prefix(Prefix, atom_to_list(Name)) end,
              ["tls_", "dtls_", "ssl_"]);
is_tls_supervisor(_) -> false.

redact_args({mfargs, {M, F, _Args}}) -> {mfargs, {M, F, dcp_secret:redacted()}};
redact_args(Item) -> Item.
