%% @doc Every cut point of a mixed stream (forwarded, reported, forwarded-and-reported, alt-magic
%% frames with framing extras) gives the same forwarded bytes and events as the stream fed whole.
-module(mcbp_03_chunk_boundary_tests).

-include_lib("eunit/include/eunit.hrl").

stream() ->
    Frames = [#{magic => req, opcode => dcp_snapshot_marker, vbucket => 4,
                extras => <<1:64, 9:64, 1:32>>},
              #{magic => req, opcode => dcp_mutation, vbucket => 4,
                extras => <<1:64, 1:64, 0:32, 0:32, 0:32, 0:16, 0:8>>,
                key => <<"key">>, value => binary:copy(<<"v">>, 100)},
              #{magic => res, opcode => dcp_add_stream, status => 0, opaque => 4,
                extras => <<77:32>>},
              #{magic => alt_req, opcode => dcp_stream_end, vbucket => 4, opaque => 77,
                framing_extras => [{2, <<0, 1>>}, {20, binary:copy(<<1>>, 17)}],
                extras => <<1:32>>},
              #{magic => res, opcode => dcp_close_stream, status => 1, opaque => 5},
              #{magic => req, opcode => dcp_stream_req, vbucket => 5, opaque => 88,
                extras => <<0:384>>},
              #{magic => req, opcode => dcp_noop, opaque => 9}],
    iolist_to_binary([mcbp:encode(F) || F <- Frames]).

feed_chunks(Side, Chunks) ->
    S = mcbp:splitter_new(#{side => Side}),
    Results = [mcbp:feed(S, C) || C <- Chunks],
    {iolist_to_binary([F || {ok, F, _} <- Results]),
     lists:append([E || {ok, _, E} <- Results]),
     maps:remove(held_bytes, mcbp:splitter_stats(S))}.

every_single_cut_matches_the_whole_stream_test_() ->
    Stream = stream(),
    [{atom_to_list(Side),
      fun() ->
              Whole = feed_chunks(Side, [Stream]),
              {_, Events, _} = Whole,
              ?assertNotEqual([], Events),
              [?assertEqual({Cut, Whole},
                            {Cut, feed_chunks(Side, [binary:part(Stream, 0, Cut),
                                                     binary:part(Stream, Cut,
                                                                 byte_size(Stream) - Cut)])})
               || Cut <- lists:seq(0, byte_size(Stream))]
      end} || Side <- [consumer, producer]].

byte_by_byte_matches_the_whole_stream_test() ->
    Stream = stream(),
    Bytes = [<<B>> || <<B>> <= Stream],
    [?assertEqual(feed_chunks(Side, [Stream]), feed_chunks(Side, Bytes))
     || Side <- [consumer, producer]].
