%% @doc The mcbp codec contract: decode, encode, dcp_fields, names, and every error reason.
-module(mcbp_tests).

-include_lib("eunit/include/eunit.hrl").

-define(MIB, (1024 * 1024)).

mutation(VBucket, Seqno, Value) ->
    #{magic => req, opcode => dcp_mutation, vbucket => VBucket, opaque => 1,
      extras => <<Seqno:64, 1:64, 0:32, 0:32, 0:32, 0:16, 0:8>>,
      key => <<"key">>, value => Value}.

bin(Frame) ->
    iolist_to_binary(mcbp:encode(Frame)).

%% The decoded map has every field; fill in what a sparse spec leaves out.
full(Frame = #{magic := Magic, opcode := Op}) ->
    Which = case lists:member(Magic, [res, alt_res, server_res]) of
                true -> status;
                false -> vbucket
            end,
    Defaults = #{datatype => 0, Which => 0, opaque => 0, cas => 0, framing_extras => [],
                 extras => <<>>, key => <<>>, value => <<>>},
    %% Server-initiated frames have an opcode namespace of their own.
    Name = case lists:member(Magic, [server_req, server_res]) of
               true -> unknown;
               false -> mcbp:opcode_name(Op)
           end,
    maps:merge(Defaults, Frame#{opcode_name => Name}).

every_magic_round_trips_test() ->
    lists:foreach(
      fun(Magic) ->
              Which = case Magic of
                          res -> status; alt_res -> status; server_res -> status;
                          _ -> vbucket
                      end,
              Infos = case Magic of
                          alt_req -> [{2, <<0, 7>>}, {300 - 45, <<>>}, {1, binary:copy(<<9>>, 40)}];
                          alt_res -> [{0, <<1, 2>>}];
                          _ -> []
                      end,
              F = #{magic => Magic, opcode => 16#57, datatype => 3, Which => 513,
                    opaque => 16#deadbeef, cas => 16#0102030405060708,
                    framing_extras => Infos, extras => <<"ex">>, key => <<"k">>,
                    value => <<"value">>},
              ?assertEqual({ok, full(F), <<>>}, mcbp:decode(bin(F)))
      end, [req, res, alt_req, alt_res, server_req, server_res]).

opcode_names_are_atoms_and_unknown_opcodes_are_unknown_test() ->
    {ok, F, _} = mcbp:decode(bin(#{magic => req, opcode => 16#ee})),
    ?assertMatch(#{opcode := 16#ee, opcode_name := unknown}, F),
    ?assertEqual(hello, mcbp:opcode_name(16#1f)),
    ?assertEqual(sasl_auth, mcbp:opcode_name(16#21)),
    ?assertEqual(sasl_list_mechs, mcbp:opcode_name(16#20)),
    ?assertEqual(select_bucket, mcbp:opcode_name(16#89)),
    ?assertEqual(dcp_stream_end, mcbp:opcode_name(16#55)),
    ?assertEqual(dcp_oso_snapshot, mcbp:opcode_name(16#65)).

status_names_follow_the_protocol_test() ->
    ?assertEqual(success, mcbp:status_name(0)),
    ?assertEqual(key_enoent, mcbp:status_name(1)),
    ?assertEqual(key_eexists, mcbp:status_name(2)),
    ?assertEqual(not_my_vbucket, mcbp:status_name(7)),
    ?assertEqual(rollback, mcbp:status_name(16#23)),
    ?assertEqual(etmpfail, mcbp:status_name(16#86)),
    ?assertEqual({unknown, 16#4242}, mcbp:status_name(16#4242)).

partial_input_asks_for_more_test() ->
    B = bin(mutation(1, 1, <<"v">>)),
    ?assertEqual({more, 24}, mcbp:decode(<<>>)),
    ?assertEqual({more, 14}, mcbp:decode(binary:part(B, 0, 10))),
    ?assertEqual({more, 1}, mcbp:decode(binary:part(B, 0, byte_size(B) - 1))).

rest_is_what_follows_the_frame_test() ->
    B = bin(mutation(1, 1, <<"v">>)),
    {ok, _, Rest} = mcbp:decode(<<B/binary, 16#80, 1, 2>>),
    ?assertEqual(<<16#80, 1, 2>>, Rest).

large_values_are_sub_binaries_of_the_input_test() ->
    B = bin(mutation(1, 1, binary:copy(<<"x">>, 100000))),
    {ok, #{value := V}, _} = mcbp:decode(B),
    ?assertEqual(100000, byte_size(V)),
    ?assertEqual(byte_size(B), binary:referenced_byte_size(V)).

bad_magic_is_an_error_test() ->
    ?assertEqual({error, {bad_magic, 16#42}}, mcbp:decode(<<16#42, 0, 0>>)).

frame_too_large_is_refused_from_the_header_test() ->
    Header = <<16#80, 16#57, 0:16, 0, 0, 0:16, (31 * ?MIB):32, 0:32, 0:64>>,
    ?assertEqual({error, {frame_too_large, 31 * ?MIB + 24, 30 * ?MIB}}, mcbp:decode(Header)).

bad_lengths_name_every_length_test() ->
    Header = <<16#08, 1, 2, 3, 4, 0, 0:16, 8:32, 0:32, 0:64>>,
    ?assertEqual({error, {bad_lengths, #{framing => 2, extras => 4, key => 3, body => 8}}},
                 mcbp:decode(Header)).

bad_framing_extras_give_the_offset_test() ->
    %% One good 1-byte frame info, then one claiming 3 bytes with 1 left.
    Framing = <<16#01, 9, 16#13, 0>>,
    B = <<16#08, 1, 4, 0, 0, 0, 0:16, 4:32, 0:32, 0:64, Framing/binary>>,
    ?assertEqual({error, {bad_framing_extras, 2}}, mcbp:decode(B)).

encode_accepts_opcode_names_and_iodata_test() ->
    F = #{magic => req, opcode => dcp_control, key => ["enable", <<"_noop">>], value => "true"},
    {ok, D, <<>>} = mcbp:decode(bin(F)),
    ?assertMatch(#{opcode := 16#5e, key := <<"enable_noop">>, value := <<"true">>}, D).

encode_refuses_frames_it_cannot_express_test() ->
    ?assertError({bad_frame, {missing_field, magic}}, mcbp:encode(#{opcode => 1})),
    ?assertError({bad_frame, {missing_field, opcode}}, mcbp:encode(#{magic => req})),
    ?assertError({bad_frame, {bad_field, magic}}, mcbp:encode(#{magic => nope, opcode => 1})),
    ?assertError({bad_frame, {bad_field, opcode}}, mcbp:encode(#{magic => req, opcode => 256})),
    ?assertError({bad_frame, {bad_field, opcode}}, mcbp:encode(#{magic => req, opcode => nope})),
    ?assertError({bad_frame, {field_not_allowed, status}},
                 mcbp:encode(#{magic => req, opcode => 1, status => 0})),
    ?assertError({bad_frame, {field_not_allowed, vbucket}},
                 mcbp:encode(#{magic => res, opcode => 1, vbucket => 0})),
    ?assertError({bad_frame, {bad_field, opaque}},
                 mcbp:encode(#{magic => req, opcode => 1, opaque => -1})),
    ?assertError({bad_frame, {key_too_long, 256, 255}},
                 mcbp:encode(#{magic => alt_req, opcode => 1, key => binary:copy(<<0>>, 256)})),
    ?assertError({bad_frame, {extras_too_long, 256}},
                 mcbp:encode(#{magic => req, opcode => 1, extras => binary:copy(<<0>>, 256)})),
    ?assertError({bad_frame, framing_extras_not_allowed},
                 mcbp:encode(#{magic => req, opcode => 1, framing_extras => [{1, <<>>}]})),
    ?assertError({bad_frame, {frame_info_id_too_large, 271}},
                 mcbp:encode(#{magic => alt_req, opcode => 1, framing_extras => [{271, <<>>}]})),
    ?assertError({bad_frame, {bad_field, framing_extras}},
                 mcbp:encode(#{magic => alt_req, opcode => 1, framing_extras => [{70000, <<>>}]})),
    ?assertError({bad_frame, {bad_field, vbucket}},
                 mcbp:encode(#{magic => req, opcode => 1, vbucket => 65536})),
    ?assertError({bad_frame, {bad_field, key}},
                 mcbp:encode(#{magic => req, opcode => 1, key => [foo]})),
    ?assertError({bad_frame, {bad_field, value}},
                 mcbp:encode(#{magic => req, opcode => 1, value => [foo]})),
    ?assertError({bad_frame, {framing_extras_too_long, 1000}},
                 mcbp:encode(#{magic => alt_req, opcode => 1,
                               framing_extras => lists:duplicate(1000, {1, <<>>})})),
    %% a list longer than the NIF reads (mcbp::term::MAX_ITEMS) is not read at all
    ?assertError({bad_frame, {bad_field, framing_extras}},
                 mcbp:encode(#{magic => alt_req, opcode => 1,
                               framing_extras => lists:duplicate(100000, {1, <<>>})})),
    ?assertError({bad_frame, {not_a_map, foo}}, mcbp:encode(foo)).

%% The NIF writes the head only; a large value is appended as it is, not copied, so a 30 MiB
%% encode costs what a small one does; small values still come as one binary.
large_values_are_appended_uncopied_and_small_ones_copied_test() ->
    Spec = #{magic => req, opcode => dcp_mutation, vbucket => 3, extras => <<0:(31 * 8)>>,
             key => <<"k">>},
    Big = binary:copy(<<7>>, 30 * 1024 * 1024 - 100),
    [Head, Value] = mcbp:encode(Spec#{value => Big}),
    ?assert(erts_debug:same(Big, Value)),
    ?assertEqual(24 + 31 + 1, byte_size(Head)),
    {ok, #{value := Big, key := <<"k">>, vbucket := 3}, <<>>} =
        mcbp:decode(iolist_to_binary([Head, Value])),
    Small = binary:copy(<<7>>, 256),
    Bin = mcbp:encode(Spec#{value => Small}),
    ?assert(is_binary(Bin)),
    ?assertMatch({ok, #{value := Small}, <<>>}, mcbp:decode(Bin)),
    ?assert(is_binary(mcbp:encode(Spec#{value => [Small, "x"]}))),
    %% an iolist value is counted, not flattened: 200 times 30 MiB is over the u32 body length
    Len = 31 + 1 + 200 * byte_size(Big),
    ?assertError({bad_frame, {body_too_large, Len}},
                 mcbp:encode(Spec#{value => lists:duplicate(200, Big)})).

dcp_fields_name_the_stream_end_reason_test() ->
    End = fun(Code) -> #{magic => req, opcode => 16#55, extras => <<Code:32>>} end,
    ?assertEqual(#{reason => ok}, mcbp:dcp_fields(End(0))),
    ?assertEqual(#{reason => state_changed}, mcbp:dcp_fields(End(2))),
    ?assertEqual(#{reason => lost_privileges}, mcbp:dcp_fields(End(8))),
    ?assertEqual(#{reason => {unknown, 9}}, mcbp:dcp_fields(End(9))).

dcp_fields_of_a_stream_request_test() ->
    F = #{magic => req, opcode => dcp_stream_req,
          extras => <<0:32, 0:32, 5:64, 16#ffffffffffffffff:64, 77:64, 5:64, 6:64>>},
    ?assertMatch(#{start_seqno := 5, end_seqno := 16#ffffffffffffffff, vbucket_uuid := 77,
                   snap_start_seqno := 5, snap_end_seqno := 6},
                 mcbp:dcp_fields(F)).

dcp_fields_of_set_vbucket_state_and_mutation_test() ->
    ?assertEqual(#{state => active},
                 mcbp:dcp_fields(#{magic => req, opcode => 16#5b, extras => <<1>>})),
    ?assertEqual(#{state => {unknown, 7}},
                 mcbp:dcp_fields(#{magic => req, opcode => 16#5b, extras => <<7>>})),
    ?assertMatch(#{by_seqno := 42, rev_seqno := 1},
                 mcbp:dcp_fields(mutation(3, 42, <<"v">>))).

dcp_fields_of_a_failover_log_test() ->
    F = #{magic => res, opcode => dcp_stream_req, status => 0, value => <<1:64, 2:64, 3:64, 4:64>>},
    ?assertEqual(#{failover_log => [{1, 2}, {3, 4}]}, mcbp:dcp_fields(F)).

%% A failover log longer than any kv_engine keeps (native/mcbp/src/dcp.rs, MAX_FAILOVER_LOG_ENTRIES,
%% 4096) is refused by its size: a 30 MiB one is an error at once, not a 2 M-entry list.
failover_log_over_the_cap_is_a_named_error_test() ->
    Log = fun(Entries) -> binary:copy(<<7:64, 9:64>>, Entries) end,
    ?assertMatch(#{failover_log := [{7, 9} | _]},
                 mcbp:dcp_fields(#{magic => res, opcode => dcp_get_failover_log, value => Log(4096)})),
    ?assertEqual({error, {failover_log_too_long, 16#54, 4097, 4096}},
                 mcbp:dcp_fields(#{magic => res, opcode => dcp_get_failover_log,
                                   value => Log(4097)})),
    %% the largest frame the splitter takes (30 MiB, header included), as it hands it over: a
    %% frame decoded from the bytes read
    Size = mcbp:default_max_frame_size() - 32,
    Huge = iolist_to_binary(mcbp:encode(#{magic => res, opcode => dcp_stream_req, status => 0,
                                          value => <<0:(Size * 8)>>})),
    {ok, Frame, <<>>} = mcbp:decode(Huge),
    {Micros, Result} = timer:tc(fun mcbp:dcp_fields/1, [Frame]),
    ?assertEqual({error, {failover_log_too_long, 16#53, Size div 16, 4096}}, Result),
    ?assert(Micros < 200000).

wrong_dcp_extras_size_is_bad_extras_test() ->
    ?assertEqual({error, {bad_extras, 16#55, 3}},
                 mcbp:dcp_fields(#{magic => req, opcode => 16#55, extras => <<0, 0, 1>>})),
    ?assertEqual({error, {bad_extras, 16#57, 30}},
                 mcbp:dcp_fields(#{magic => req, opcode => 16#57, extras => <<0:240>>})).

wrong_dcp_value_size_is_bad_value_test() ->
    ?assertEqual({error, {bad_value, 16#53, 15}},
                 mcbp:dcp_fields(#{magic => res, opcode => 16#53, value => <<0:120>>})).

non_dcp_frames_have_no_dcp_fields_test() ->
    ?assertEqual(#{}, mcbp:dcp_fields(#{magic => req, opcode => hello, key => <<"agent">>})).
