%% @doc A user's supervisor for dcp_13_operating_tests: the child specs it is given.
-module(dcp_13_sup).

-behaviour(supervisor).

-export([init/1]).

init(Specs) ->
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, Specs}}.
