%% @doc The splitters behind `dcp_splitter': the mcbp adapter's forward_remaining (what the proxy
%% reads to find a frame boundary), the option that picks a splitter, and the pure-Erlang baseline
%% (bench/): its side policy, and that it forwards the same bytes and reports the same events as
%% `mcbp:feed/2' for any stream cut into any chunks.
-module(dcp_02_splitter_tests).

-include_lib("proper/include/proper.hrl").
-include_lib("eunit/include/eunit.hrl").

%% ---- frames, built with the one codec ----

mutation(VBucket, Key, Value) ->
    request(16#57, VBucket, 16#1000 + VBucket,
            <<1:64, 1:64, 0:32, 0:32, 0:32, 0:16, 0:8>>, Key, Value).

stream_end(VBucket, Opaque, ReasonCode) ->
    request(16#55, VBucket, Opaque, <<ReasonCode:32>>, <<>>, <<>>).

set_vbucket_state(VBucket, Opaque, StateCode) ->
    request(16#5b, VBucket, Opaque, <<StateCode:8>>, <<>>, <<>>).

stream_req(VBucket, Opaque) ->
    request(16#53, VBucket, Opaque, <<0:32, 0:32, 0:64, -1:64, 0:64, 0:64, 0:64>>, <<>>, <<>>).

noop(Opaque) ->
    request(16#5c, 0, Opaque, <<>>, <<>>, <<>>).

request(Opcode, VBucket, Opaque, Extras, Key, Value) ->
    encode(#{magic => req, opcode => Opcode, datatype => 0, vbucket => VBucket, opaque => Opaque,
             cas => 0, framing_extras => [], extras => Extras, key => Key, value => Value}).

response(Opcode, Status, Opaque, Extras) ->
    encode(#{magic => res, opcode => Opcode, datatype => 0, status => Status, opaque => Opaque,
             cas => 0, framing_extras => [], extras => Extras, key => <<>>, value => <<>>}).

encode(Frame) ->
    iolist_to_binary(mcbp:encode(Frame)).

feed_all(Side, Chunks) ->
    lists:foldl(
      fun(Chunk, {S, Fwd, Events}) ->
              {ok, F, E, 0, S2} = dcp_baseline_splitter:feed(S, Chunk),
              {S2, [Fwd, F], Events ++ E}
      end,
      {dcp_baseline_splitter:new(Side, #{}), [], []}, Chunks).

%% ---- the mcbp adapter and the splitter option ----

%% dcp_proxy writes its own frames only at a frame boundary of what it forwards: the boundary is
%% where forward_remaining, returned by every feed, is 0.
mcbp_adapter_returns_what_is_left_of_the_frame_being_cut_through_test() ->
    Frame = mutation(3, <<"k">>, binary:copy(<<"v">>, 1000)),
    Noop = noop(1),
    {Head, Tail} = split_binary(Frame, 100),
    S = dcp_splitter_mcbp:new(producer, #{}),
    {ok, F1, [], Left, S} = dcp_splitter_mcbp:feed(S, Head),
    ?assertEqual(Head, iolist_to_binary(F1)),
    ?assertEqual(byte_size(Frame) - 100, Left),
    ?assertMatch(#{forward_remaining := Left}, dcp_splitter_mcbp:stats(S)),
    {ok, F2, [], 0, S} = dcp_splitter_mcbp:feed(S, <<Tail/binary, Noop/binary>>),
    ?assertEqual(<<Tail/binary, Noop/binary>>, iolist_to_binary(F2)),
    %% a partial header: nothing of that frame is forwarded or owed yet
    {ok, F3, [], 0, S} = dcp_splitter_mcbp:feed(S, binary:part(Noop, 0, 10)),
    ?assertEqual(<<>>, iolist_to_binary(F3)).

%% The `bytes' stat counts a frame's full length as soon as its header is read.
splitter_counts_a_frames_full_length_as_soon_as_its_header_is_read_test() ->
    Splitter = mcbp:splitter_new(#{side => producer}),
    Value = binary:copy(<<"v">>, 1000),
    Mutation = iolist_to_binary(dcp_commands:mutation(3, 7, #{key => <<"k">>, by_seqno => 1,
                                                              value => Value})),
    {Head, _} = split_binary(Mutation, 100),
    {ok, Forward, []} = mcbp:feed(Splitter, Head),
    ?assertEqual(Head, iolist_to_binary(Forward)),
    ?assertMatch(#{bytes := Len} when Len =:= byte_size(Mutation), mcbp:splitter_stats(Splitter)),
    %% a partial header only: nothing of that frame counted (or forwarded) yet
    Splitter2 = mcbp:splitter_new(#{side => producer}),
    {ok, Forward2, []} = mcbp:feed(Splitter2, binary:part(Mutation, 0, 10)),
    ?assertEqual(<<>>, iolist_to_binary(Forward2)),
    ?assertMatch(#{bytes := 0}, mcbp:splitter_stats(Splitter2)).

splitter_option_picks_the_splitter_and_passes_max_frame_size_test() ->
    {ok, Nif} = dcp_splitter:new(producer, nif, #{max_frame_size => 1024}),
    ?assertMatch(#{frames := 0}, dcp_splitter:stats(Nif)),
    {ok, Base} = dcp_splitter:new(producer, {dcp_baseline_splitter, #{}},
                                  #{max_frame_size => 1024}),
    ?assertEqual(#{}, dcp_splitter:stats(Base)),
    {Header, _} = split_binary(mutation(1, <<"k">>, binary:copy(<<"v">>, 2000)), 24),
    ?assertMatch({error, {frame_too_large, _, 1024}}, dcp_splitter:feed(Nif, Header)),
    ?assertMatch({error, {frame_too_large, _, 1024}}, dcp_splitter:feed(Base, Header)),
    ?assertEqual({error, {bad_splitter_option, {dcp_baseline_splitter, []}}},
                 dcp_splitter:new(producer, {dcp_baseline_splitter, []}, #{})).

%% ---- the baseline's side policy ----

mutations_are_forwarded_whole_and_silently_test() ->
    Stream = <<(mutation(1, <<"a">>, <<"x">>))/binary, (mutation(2, <<"b">>, <<"yy">>))/binary>>,
    {S, Fwd, Events} = feed_all(producer, [Stream]),
    ?assertEqual(Stream, iolist_to_binary(Fwd)),
    ?assertEqual([], Events),
    ?assertEqual(0, dcp_baseline_splitter:held_bytes(S)).

frame_cut_across_chunks_is_held_until_complete_test() ->
    Frame = mutation(7, <<"key">>, binary:copy(<<"v">>, 1000)),
    {A, B} = split_binary(Frame, 100),
    S0 = dcp_baseline_splitter:new(producer, #{}),
    {ok, F1, [], 0, S1} = dcp_baseline_splitter:feed(S0, A),
    ?assertEqual(<<>>, iolist_to_binary(F1)),
    ?assertEqual(100, dcp_baseline_splitter:held_bytes(S1)),
    {ok, F2, [], 0, S2} = dcp_baseline_splitter:feed(S1, B),
    ?assertEqual(Frame, iolist_to_binary(F2)),
    ?assertEqual(0, dcp_baseline_splitter:held_bytes(S2)).

producer_stream_end_is_forwarded_and_reported_with_its_reason_test() ->
    Frame = stream_end(12, 99, 2),
    {_, Fwd, Events} = feed_all(producer, [Frame]),
    ?assertEqual(Frame, iolist_to_binary(Fwd)),
    ?assertEqual([{stream_end, 12, 99, state_changed}], Events).

producer_close_stream_response_is_reported_not_forwarded_test() ->
    Frame = response(16#52, 0, 5, <<>>),
    {_, Fwd, [Event]} = feed_all(producer, [Frame]),
    ?assertEqual(<<>>, iolist_to_binary(Fwd)),
    ?assertMatch({close_stream_response, 5, 0}, Event).

producer_set_vbucket_state_is_forwarded_and_reported_test() ->
    Frame = set_vbucket_state(3, 77, 1),
    {_, Fwd, [Event]} = feed_all(producer, [Frame]),
    ?assertEqual(Frame, iolist_to_binary(Fwd)),
    ?assertMatch({set_vbucket_state, 3, 77, active}, Event).

consumer_add_stream_response_is_reported_not_forwarded_test() ->
    Frame = response(16#51, 0, 4, <<1234:32>>),
    Noop = noop(1),
    {_, Fwd, [Event]} = feed_all(consumer, [<<Frame/binary, Noop/binary>>]),
    ?assertEqual(Noop, iolist_to_binary(Fwd)),
    ?assertMatch({add_stream_response, 4, 0, 1234}, Event).

consumer_stream_req_is_forwarded_and_reported_test() ->
    Frame = stream_req(9, 4242),
    {_, Fwd, [Event]} = feed_all(consumer, [Frame]),
    ?assertEqual(Frame, iolist_to_binary(Fwd)),
    ?assertMatch({stream_req, 9, 4242}, Event).

consumer_forwards_stream_end_silently_test() ->
    Frame = stream_end(12, 99, 2),
    ?assertMatch({_, _, []}, feed_all(consumer, [Frame])).

bad_magic_is_an_error_test() ->
    S = dcp_baseline_splitter:new(producer, #{}),
    ?assertEqual({error, {bad_magic, 16#42}},
                 dcp_baseline_splitter:feed(S, <<16#42, 0:(23 * 8)>>)).

frame_over_max_frame_size_is_an_error_before_it_arrives_test() ->
    S = dcp_baseline_splitter:new(producer, #{max_frame_size => 1024}),
    Frame = mutation(1, <<"k">>, binary:copy(<<"v">>, 2000)),
    {Header, _} = split_binary(Frame, 24),
    ?assertMatch({error, {frame_too_large, _, 1024}}, dcp_baseline_splitter:feed(S, Header)).

%% ---- the baseline and mcbp:feed/2 agree ----

same_forward_and_events_as_mcbp_feed_test_() ->
    {"random frame streams in random chunks: same forwarded bytes and events as mcbp:feed/2",
     {timeout, 120,
      fun() ->
              ?assertEqual(true, proper:quickcheck(prop_same_as_mcbp_feed(),
                                                   [{numtests, 300}, {to_file, user}]))
      end}}.

prop_same_as_mcbp_feed() ->
    ?FORALL({Side, Frames, Cuts}, {oneof([consumer, producer]), list(frame()), list(cut())},
            begin
                Stream = iolist_to_binary(Frames),
                Chunks = chunks(Stream, Cuts),
                %% PropEr from Debian cannot print an exception on OTP 25: catch it here.
                try
                    compare(Side, Chunks)
                catch
                    Class:Reason:Stack ->
                        io:format(user, "~p:~p~n~p~n", [Class, Reason, Stack]),
                        false
                end
            end).

%% At every chunk both report the same events; the NIF may forward a frame's bytes before the
%% baseline does (cut-through), so what the baseline forwarded so far is a prefix of what the NIF
%% forwarded; once the stream ends on a frame boundary, both forwarded the same bytes.
compare(Side, Chunks) ->
    Base0 = dcp_baseline_splitter:new(Side, #{}),
    Nif0 = mcbp:splitter_new(#{side => Side}),
    {_, _, BaseFwd, NifFwd, Agree} =
        lists:foldl(
          fun(_Chunk, {_, _, _, _, false} = Acc) ->
                  Acc;
             (Chunk, {Base, Nif, BaseAcc, NifAcc, true}) ->
                  {ok, BF, BE, 0, Base2} = dcp_baseline_splitter:feed(Base, Chunk),
                  {ok, NF, NE} = mcbp:feed(Nif, Chunk),
                  BaseAcc2 = <<BaseAcc/binary, (iolist_to_binary(BF))/binary>>,
                  NifAcc2 = <<NifAcc/binary, (iolist_to_binary(NF))/binary>>,
                  Prefix = binary:longest_common_prefix([BaseAcc2, NifAcc2])
                      =:= byte_size(BaseAcc2),
                  {Base2, Nif, BaseAcc2, NifAcc2, BE =:= NE andalso Prefix}
          end,
          {Base0, Nif0, <<>>, <<>>, true}, Chunks),
    ?WHENFAIL(io:format(user, "side ~p~nbaseline ~p bytes, nif ~p bytes~n",
                        [Side, byte_size(BaseFwd), byte_size(NifFwd)]),
              Agree andalso BaseFwd =:= NifFwd).

%% A stream that goes bad (a byte that is no magic where a header should start) fails in the same
%% chunk with the same reason on both paths.
same_error_as_mcbp_feed_on_a_bad_magic_test_() ->
    {"a bad magic byte fails both splitters in the same chunk with the same reason",
     {timeout, 120,
      fun() ->
              ?assertEqual(true, proper:quickcheck(prop_same_error_as_mcbp_feed(),
                                                   [{numtests, 200}, {to_file, user}]))
      end}}.

prop_same_error_as_mcbp_feed() ->
    ?FORALL({Side, Before, Bad, After, Cuts},
            {oneof([consumer, producer]), list(frame()), bad_magic(), list(frame()), list(cut())},
            begin
                Stream = iolist_to_binary([Before, <<Bad, 0:(23 * 8)>>, After]),
                Chunks = chunks(Stream, Cuts),
                Base = first_error(fun dcp_baseline_splitter:feed/2,
                                   dcp_baseline_splitter:new(Side, #{}), Chunks, 0),
                Nif = first_error(fun dcp_splitter_mcbp:feed/2,
                                  dcp_splitter_mcbp:new(Side, #{}), Chunks, 0),
                Expected = {error_at, chunk_of(Chunks, iolist_size(Before)), {bad_magic, Bad}},
                ?WHENFAIL(io:format(user, "baseline ~p~nnif ~p~nexpected ~p~n",
                                    [Base, Nif, Expected]),
                          Base =:= Expected andalso Nif =:= Expected)
            end).

first_error(_Feed, _State, [], _N) ->
    no_error;
first_error(Feed, State, [Chunk | Chunks], N) ->
    case Feed(State, Chunk) of
        {ok, _, _, _, State2} -> first_error(Feed, State2, Chunks, N + 1);
        {error, Reason} -> {error_at, N, Reason}
    end.

%% The index of the chunk that holds byte Offset of the stream.
chunk_of([Chunk | Chunks], Offset) when Offset >= byte_size(Chunk) ->
    1 + chunk_of(Chunks, Offset - byte_size(Chunk));
chunk_of(_Chunks, _Offset) ->
    0.

bad_magic() ->
    ?SUCHTHAT(B, range(0, 255), not lists:member(B, [16#80, 16#81, 16#08, 16#18, 16#82, 16#83])).

chunks(<<>>, _Cuts) ->
    [];
chunks(Stream, []) ->
    [Stream];
chunks(Stream, [Cut | _]) when Cut >= byte_size(Stream) ->
    [Stream];
chunks(Stream, [Cut | Cuts]) ->
    {Chunk, Rest} = split_binary(Stream, Cut),
    [Chunk | chunks(Rest, Cuts ++ [Cut])].

cut() ->
    oneof([range(1, 30), range(1, 300), range(1, 5000)]).

frame() ->
    frequency(
      [{10, ?LET({VB, Key, Size}, {vbucket(), binary(), oneof([range(0, 300), range(1000, 6000)])},
                 mutation(VB, Key, binary:copy(<<"v">>, Size)))},
       {2, ?LET({VB, Opaque, Reason}, {vbucket(), opaque(), range(0, 10)},
                stream_end(VB, Opaque, Reason))},
       {1, ?LET({VB, Opaque, St}, {vbucket(), opaque(), range(1, 4)},
                set_vbucket_state(VB, Opaque, St))},
       {1, ?LET({Opaque, Status}, {opaque(), status()},
                response(16#5b, Status, Opaque, <<>>))},
       {1, ?LET({VB, Opaque}, {vbucket(), opaque()}, stream_req(VB, Opaque))},
       {1, ?LET({Opaque, Status}, {opaque(), status()},
                response(16#51, Status, Opaque, <<Opaque:32>>))},
       {1, ?LET({Opaque, Status}, {opaque(), status()}, response(16#52, Status, Opaque, <<>>))},
       {1, ?LET(Opaque, opaque(), noop(Opaque))},
       {1, ?LET({VB, StreamId, Size}, {vbucket(), range(0, 65535), range(0, 500)},
                encode(#{magic => alt_req, opcode => 16#57, datatype => 0, vbucket => VB,
                         opaque => 1, cas => 0, framing_extras => [{2, <<StreamId:16>>}],
                         extras => <<1:64, 1:64, 0:32, 0:32, 0:32, 0:16, 0:8>>,
                         key => <<"k">>, value => binary:copy(<<"w">>, Size)}))}]).

vbucket() -> range(0, 1023).
opaque() -> range(0, 16#ffffffff).
status() -> oneof([0, 1, 2, 4, 7, 16#23]).
