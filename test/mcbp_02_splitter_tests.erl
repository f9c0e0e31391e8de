%% @doc The cut-through splitter through the NIF: side policies, events, zero-copy forwarding,
%% large inputs, errors, stats, and a PropEr chunking property.
-module(mcbp_02_splitter_tests).

-include_lib("proper/include/proper.hrl").
-include_lib("eunit/include/eunit.hrl").

-define(MIB, (1024 * 1024)).

mutation(VBucket, Seqno, ValueSize) ->
    iolist_to_binary(
      mcbp:encode(#{magic => req, opcode => dcp_mutation, vbucket => VBucket, opaque => 1,
                    extras => <<Seqno:64, 1:64, 0:32, 0:32, 0:32, 0:16, 0:8>>,
                    key => <<"key">>, value => binary:copy(<<"v">>, ValueSize)})).

stream_end(VBucket, Opaque, Reason) ->
    iolist_to_binary(mcbp:encode(#{magic => req, opcode => dcp_stream_end, vbucket => VBucket,
                                   opaque => Opaque, extras => <<Reason:32>>})).

response(Opcode, Status, Opaque) ->
    iolist_to_binary(mcbp:encode(#{magic => res, opcode => Opcode, status => Status,
                                   opaque => Opaque})).

feed(S, Chunk) ->
    {ok, Forward, Events} = mcbp:feed(S, Chunk),
    {iolist_to_binary(Forward), Events}.

producer_stream_end_is_forwarded_and_reported_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    Stream = <<(mutation(3, 1, 10))/binary, (stream_end(3, 99, 2))/binary,
               (stream_end(4, 98, 0))/binary, (stream_end(5, 97, 42))/binary>>,
    ?assertEqual({Stream, [{stream_end, 3, 99, state_changed}, {stream_end, 4, 98, ok},
                           {stream_end, 5, 97, {unknown, 42}}]},
                 feed(S, Stream)).

producer_close_stream_answer_is_reported_not_forwarded_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    M = mutation(3, 1, 10),
    Close = response(16#52, 0, 3),
    SetState = iolist_to_binary(mcbp:encode(#{magic => req, opcode => 16#5b, opaque => 5,
                                              extras => <<1>>})),
    ?assertEqual({<<M/binary, SetState/binary, M/binary>>,
                  [{close_stream_response, 3, 0}, {set_vbucket_state, 0, 5, active}]},
                 feed(S, <<M/binary, Close/binary, SetState/binary, M/binary>>)),
    %% the state byte the event carries must be there
    Bad = iolist_to_binary(mcbp:encode(#{magic => req, opcode => 16#5b, opaque => 5})),
    ?assertEqual({error, {bad_extras, 16#5b, 0}},
                 mcbp:feed(mcbp:splitter_new(#{side => producer}), Bad)).

consumer_policy_reports_add_close_answers_and_sees_stream_requests_test() ->
    S = mcbp:splitter_new(#{side => consumer}),
    Add = response(16#51, 0, 7),
    Close = response(16#52, 1, 8),
    Req = iolist_to_binary(mcbp:encode(#{magic => req, opcode => dcp_stream_req, vbucket => 7,
                                         opaque => 1234, extras => <<0:384>>})),
    StateAnswer = response(16#5b, 0, 5),
    Ack = iolist_to_binary(mcbp:encode(#{magic => req, opcode => 16#5d, extras => <<100:32>>})),
    {Forward, Events} = feed(S, <<Add/binary, Req/binary, Close/binary, StateAnswer/binary,
                                  Ack/binary>>),
    ?assertEqual(<<Req/binary, StateAnswer/binary, Ack/binary>>, Forward),
    ?assertEqual([{add_stream_response, 7, 0, undefined}, {stream_req, 7, 1234},
                  {close_stream_response, 8, 1}, {set_vbucket_state_response, 5, 0}], Events),
    WithOpaque = iolist_to_binary(mcbp:encode(#{magic => res, opcode => 16#51, opaque => 7,
                                                extras => <<16#10007:32>>})),
    ?assertEqual({<<>>, [{add_stream_response, 7, 0, 16#10007}]}, feed(S, WithOpaque)).

forward_parts_are_sub_binaries_of_the_chunk_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    Chunk = iolist_to_binary([mutation(1, N, 1000) || N <- lists:seq(1, 50)]),
    {ok, Forward, []} = mcbp:feed(S, Chunk),
    Parts = lists:flatten(Forward),
    ?assertEqual(1, length(Parts)),
    [?assertEqual(byte_size(Chunk), binary:referenced_byte_size(P)) || P <- Parts].

a_header_split_across_chunks_is_held_then_forwarded_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    M = mutation(1, 1, 100),
    <<A:10/binary, B/binary>> = M,
    ?assertEqual({<<>>, []}, feed(S, A)),
    ?assertMatch(#{held_bytes := 10}, mcbp:splitter_stats(S)),
    ?assertEqual({M, []}, feed(S, B)),
    ?assertMatch(#{held_bytes := 0}, mcbp:splitter_stats(S)).

a_multi_megabyte_chunk_is_cut_into_several_nif_calls_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    Frame = mutation(1, 1, 0),
    N = (16 * ?MIB) div byte_size(Frame),
    Chunk = binary:copy(Frame, N),
    {ok, Forward, []} = mcbp:feed(S, Chunk),
    %% One list per NIF call: more frames than one call's budget means several calls.
    ?assert(length(Forward) > 1),
    ?assertEqual(Chunk, iolist_to_binary(Forward)),
    ?assertMatch(#{frames := N, forwarded_frames := N, held_bytes := 0},
                 mcbp:splitter_stats(S)).

a_20_mib_mutation_in_64_kib_pieces_is_never_held_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    M = mutation(1, 1, 20 * ?MIB),
    Pieces = pieces(M, 64 * 1024),
    Forwarded = [begin
                     {ok, Forward, []} = mcbp:feed(S, P),
                     #{held_bytes := Held} = mcbp:splitter_stats(S),
                     ?assert(Held =< 24),
                     Forward
                 end || P <- Pieces],
    ?assertEqual(M, iolist_to_binary(Forwarded)),
    ?assertMatch(#{frames := 1, held_bytes := 0, largest_frame := Size} when Size =:= byte_size(M),
                 mcbp:splitter_stats(S)).

pieces(Bin, Size) when byte_size(Bin) =< Size -> [Bin];
pieces(Bin, Size) ->
    <<P:Size/binary, Rest/binary>> = Bin,
    [P | pieces(Rest, Size)].

bad_magic_fails_the_splitter_for_good_test() ->
    S = mcbp:splitter_new(#{side => consumer}),
    ?assertEqual({error, {bad_magic, 16#42}}, mcbp:feed(S, <<16#42, 0, 0>>)),
    ?assertEqual({error, {bad_magic, 16#42}}, mcbp:feed(S, mutation(1, 1, 1))).

frame_over_the_cap_is_refused_from_its_header_test() ->
    S = mcbp:splitter_new(#{side => producer, max_frame_size => 1000}),
    M = mutation(1, 1, 1000),
    ?assertEqual({error, {frame_too_large, byte_size(M), 1000}},
                 mcbp:feed(S, binary:part(M, 0, 24))).

bad_lengths_in_a_forwarded_frame_fail_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    <<H:8/binary, _:32, Rest/binary>> = mutation(1, 1, 0),
    ?assertEqual({error, {bad_lengths, #{framing => 0, extras => 31, key => 3, body => 5}}},
                 mcbp:feed(S, <<H/binary, 5:32, Rest/binary>>)).

stream_end_with_bad_extras_fails_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    Bad = iolist_to_binary(mcbp:encode(#{magic => req, opcode => dcp_stream_end,
                                         extras => <<0, 0>>})),
    ?assertEqual({error, {bad_extras, 16#55, 2}}, mcbp:feed(S, Bad)).

reported_frame_with_bad_framing_extras_fails_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    %% alt_req stream end; its one frame info (0x25) claims 5 bytes of the 2 there are.
    B = <<16#08, 16#55, 3, 0, 4, 0, 0:16, 7:32, 0:32, 0:64, 16#25, 0, 1, 0:32>>,
    ?assertEqual({error, {bad_framing_extras, 0}}, mcbp:feed(S, B)).

stats_count_frames_per_opcode_test() ->
    S = mcbp:splitter_new(#{side => producer}),
    M = mutation(1, 1, 100),
    End = stream_end(1, 1, 0),
    Close = response(16#52, 0, 1),
    _ = feed(S, <<M/binary, M/binary, End/binary, Close/binary, 16#80>>),
    ?assertEqual(#{frames => 4,
                   bytes => 2 * byte_size(M) + byte_size(End) + byte_size(Close),
                   forwarded_frames => 3, blocked_frames => 1, reported_frames => 2,
                   largest_frame => byte_size(M), held_bytes => 1, forward_remaining => 0,
                   by_opcode => #{dcp_mutation => #{frames => 2, bytes => 2 * byte_size(M)},
                                  dcp_stream_end => #{frames => 1, bytes => byte_size(End)},
                                  dcp_close_stream => #{frames => 1, bytes => byte_size(Close)}}},
                 mcbp:splitter_stats(S)).

splitter_new_refuses_bad_options_test() ->
    ?assertError({badarg, {side, left, expected_consumer_or_producer}},
                 mcbp:splitter_new(#{side => left})),
    ?assertError({badarg, {max_frame_size, 10, _}},
                 mcbp:splitter_new(#{side => consumer, max_frame_size => 10})),
    ?assertError({badarg, {max_frame_size, big, _}},
                 mcbp:splitter_new(#{side => consumer, max_frame_size => big})),
    ?assertError({badarg, {unknown_options, [colour]}},
                 mcbp:splitter_new(#{side => consumer, colour => red})),
    ?assertError({badarg, {splitter_opts, #{}, side_required}}, mcbp:splitter_new(#{})).

%% ---- PropEr: any chunking gives the forwarded frames and the reported frames, in order ----

chunking_property_test() ->
    ?assert(proper:quickcheck(prop_chunking(), [{numtests, 200}, {to_file, user}])).

frame_gen() ->
    oneof([?LET({VB, Size}, {range(0, 1023), range(0, 600)}, mutation(VB, 1, Size)),
           ?LET({VB, Op, R}, {range(0, 1023), range(0, 16#ffff), range(0, 10)},
                stream_end(VB, Op, R)),
           ?LET({Op, St}, {elements([16#51, 16#52, 16#53, 16#5b, 16#5d]), range(0, 3)},
                response(Op, St, 7)),
           ?LET(Op, elements([16#53, 16#5b, 16#5c, 16#0a]),
                iolist_to_binary(mcbp:encode(#{magic => req, opcode => Op, opaque => 3,
                                               extras => extras_for(Op)})))]).

extras_for(16#53) -> <<0:384>>;
extras_for(16#5b) -> <<2>>;
extras_for(_) -> <<>>.

%% The side policies of DESIGN.md, restated independently of the NIF's tables.
fate(producer, <<16#80, 16#55, _/binary>>) -> forward_and_report;
fate(producer, <<16#80, 16#5b, _/binary>>) -> forward_and_report;
fate(producer, <<16#81, 16#52, _/binary>>) -> report;
fate(consumer, <<16#81, 16#51, _/binary>>) -> report;
fate(consumer, <<16#81, 16#52, _/binary>>) -> report;
fate(consumer, <<16#80, 16#53, _/binary>>) -> forward_and_report;
fate(consumer, <<16#81, 16#5b, _/binary>>) -> forward_and_report;
fate(_, _) -> forward.

expected_event(<<16#80, 16#55, _/binary>> = Frame) ->
    {ok, #{vbucket := VB, opaque := Opaque, extras := <<Code:32>>}, <<>>} = mcbp:decode(Frame),
    Reasons = [ok, closed, state_changed, disconnected, too_slow, backfill_fail, rollback,
               filter_empty, lost_privileges],
    Reason = case Code < length(Reasons) of
                 true -> lists:nth(Code + 1, Reasons);
                 false -> {unknown, Code}
             end,
    {stream_end, VB, Opaque, Reason};
expected_event(<<16#80, 16#5b, _/binary>> = Frame) ->
    {ok, #{vbucket := VB, opaque := Opaque, extras := <<2>>}, <<>>} = mcbp:decode(Frame),
    {set_vbucket_state, VB, Opaque, replica};
expected_event(<<16#80, 16#53, _/binary>> = Frame) ->
    {ok, #{vbucket := VB, opaque := Opaque}, <<>>} = mcbp:decode(Frame),
    {stream_req, VB, Opaque};
expected_event(<<16#81, Op, _/binary>> = Frame) ->
    {ok, #{status := Status, opaque := Opaque}, <<>>} = mcbp:decode(Frame),
    case Op of
        16#51 -> {add_stream_response, Opaque, Status, undefined};
        16#52 -> {close_stream_response, Opaque, Status};
        16#5b -> {set_vbucket_state_response, Opaque, Status}
    end.

cut(Bin, Cuts) ->
    Points = lists:usort([C rem (byte_size(Bin) + 1) || C <- Cuts] ++ [0, byte_size(Bin)]),
    [binary:part(Bin, A, B - A) || {A, B} <- lists:zip(lists:droplast(Points), tl(Points))].

prop_chunking() ->
    ?FORALL({Side, Frames, Cuts},
            {elements([consumer, producer]), list(frame_gen()), list(non_neg_integer())},
            begin
                S = mcbp:splitter_new(#{side => Side}),
                Stream = iolist_to_binary(Frames),
                Results = [mcbp:feed(S, C) || C <- cut(Stream, Cuts)],
                Forward = iolist_to_binary([F || {ok, F, _} <- Results]),
                Events = lists:append([E || {ok, _, E} <- Results]),
                WantForward = iolist_to_binary([F || F <- Frames, fate(Side, F) =/= report]),
                WantEvents = [expected_event(F) || F <- Frames, fate(Side, F) =/= forward],
                length(Results) =:= length([ok || {ok, _, _} <- Results])
                    andalso Forward =:= WantForward
                    andalso Events =:= WantEvents
                    andalso maps:get(held_bytes, mcbp:splitter_stats(S)) =:= 0
            end).
