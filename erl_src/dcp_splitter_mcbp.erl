%% @doc The default splitter of dcp_proxy: `mcbp''s cut-through splitter (the NIF) behind the
%% `dcp_splitter' behaviour.
-module(dcp_splitter_mcbp).

-behaviour(dcp_splitter).

-export([new/2, feed/2, stats/1]).

%% @doc `Opts' as `mcbp:splitter_new/1' takes them, without `side'.
-spec new(dcp_splitter:side(), map()) -> mcbp:splitter().
new(Side, Opts) ->
    mcbp:splitter_new(Opts#{side => Side}).

-spec feed(mcbp:splitter(), binary()) ->
          {ok, iodata(), [mcbp:event()], non_neg_integer(), mcbp:splitter()}
              | {error, mcbp:reason()}.
feed(Splitter, Chunk) ->
    case mcbp:feed_with_remaining(Splitter, Chunk) of
        {ok, Forward, Events, Remaining} -> {ok, Forward, Events, Remaining, Splitter};
        {error, _} = Error -> Error
    end.

-spec stats(mcbp:splitter()) -> mcbp:stats().
stats(Splitter) ->
    mcbp:splitter_stats(Splitter).
