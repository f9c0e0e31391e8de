%% @doc The application callback: refuses to start, with a reason that says what to do, when the
%% NIF cannot be loaded (instead of starting and failing every call with `undef' or `not_loaded'),
%% and adds the log handler that shows the `[dcp_proxy]' domain (`dcp_log'). The application has no
%% processes of its own: replications are started by their owner (`dcp_replicator:child_spec/1',
%% `dcp_sup:child_spec/1').
-module(dcp_proxy_app).

-behaviour(application).
-behaviour(supervisor).

-export([start/2, stop/1, check_nif/0]).

%% supervisor callback (the application's top process, which supervises nothing)
-export([init/1]).

%% @doc `ok' when `dcp_nif' is loaded with its native code, else why not.
-spec check_nif() -> ok | {error, {nif_not_loaded, map()}}.
check_nif() ->
    case code:ensure_loaded(dcp_nif) of
        {module, dcp_nif} ->
            %% the stubs raise `{not_loaded, dcp_nif}' until the .so replaced them
            try dcp_nif:default_max_frame_size() of
                _ -> ok
            catch
                error:Why -> {error, {nif_not_loaded, nif_detail(Why)}}
            end;
        {error, Why} ->
            {error, {nif_not_loaded, (nif_detail(Why))#{module => dcp_nif}}}
    end.

nif_detail(Why) ->
    #{reason => Why, expected_at => expected_path(),
      hint => "build it with `rebar3 compile` (scripts/build_nif.sh) or copy dcp_nif.so into "
              "the dcp_proxy application's priv directory"}.

expected_path() ->
    case code:priv_dir(dcp_proxy) of
        {error, _} -> "priv/dcp_nif.so (the dcp_proxy application is not in the code path)";
        Dir -> filename:join(Dir, "dcp_nif.so")
    end.

-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    case check_nif() of
        ok ->
            case application:get_env(dcp_proxy, log_handler, true) of
                true -> ok = dcp_log:add_handler();
                false -> ok
            end,
            %% an application needs a top process; this one supervises nothing
            supervisor:start_link({local, dcp_proxy_sup}, ?MODULE, []);
        {error, _} = Error ->
            Error
    end.

-spec stop(term()) -> ok.
stop(_State) ->
    dcp_log:remove_handler().

init([]) ->
    {ok, {#{strategy => one_for_one, intensity => 1, period => 5}, []}}.
