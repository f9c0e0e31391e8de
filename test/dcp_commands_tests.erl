%% Tests for dcp_commands: every builder read back through the one codec (mcbp), the interpreters, and
%% the log format.
-module(dcp_commands_tests).

-include_lib("proper/include/proper.hrl").
-include_lib("eunit/include/eunit.hrl").

decode(IoData) ->
    Bin = iolist_to_binary(IoData),
    {ok, Frame, <<>>} = mcbp:decode(Bin),
    Frame.

fields(IoData) ->
    mcbp:dcp_fields(decode(IoData)).

%% ---- handshake ----

sasl_auth_plain_carries_mechanism_and_nul_separated_credentials_test() ->
    F = decode(dcp_commands:sasl_auth_plain("Administrator", <<"s3cret">>, 1)),
    ?assertMatch(#{magic := req, opcode_name := sasl_auth, opaque := 1, key := <<"PLAIN">>}, F),
    ?assertEqual(<<0, "Administrator", 0, "s3cret">>, maps:get(value, F)).

select_bucket_names_the_bucket_in_the_key_test() ->
    ?assertMatch(#{opcode_name := select_bucket, key := <<"default">>, opaque := 2},
                 decode(dcp_commands:select_bucket("default", 2))).

hello_sends_agent_name_and_feature_codes_test() ->
    F = decode(dcp_commands:hello(<<"proxy">>, [xattr, snappy, json, duplex], 3)),
    ?assertMatch(#{opcode_name := hello, key := <<"proxy">>}, F),
    ?assertEqual(<<16#06:16, 16#0a:16, 16#0b:16, 16#0c:16>>, maps:get(value, F)),
    ?assertEqual([xattr, snappy, json, duplex], dcp_commands:hello_features(maps:get(value, F))).

hello_features_keep_unknown_codes_test() ->
    ?assertEqual([tcp_nodelay, {unknown, 16#7777}],
                 dcp_commands:hello_features(<<16#03:16, 16#7777:16>>)).

hello_refuses_a_feature_it_does_not_know_test() ->
    ?assertError({unknown_hello_feature, teleport}, dcp_commands:hello("a", [teleport], 1)).

dcp_open_producer_sets_the_producer_and_feature_flags_test() ->
    F = decode(dcp_commands:dcp_open("replication:a->b:default", producer,
                                     [xattr, del_times, del_user_xattr], 4)),
    ?assertMatch(#{opcode_name := dcp_open, key := <<"replication:a->b:default">>}, F),
    ?assertEqual(<<0:32, (16#01 bor 16#04 bor 16#20 bor 16#100):32>>, maps:get(extras, F)),
    ?assertMatch(#{producer := true, include_xattrs := true, include_delete_times := true},
                 mcbp:dcp_fields(F)).

dcp_open_consumer_without_features_has_zero_flags_test() ->
    ?assertMatch(#{flags := 0, producer := false},
                 fields(dcp_commands:dcp_open("replication:x", consumer, [], 4))).

%% ---- stream setup ----

add_stream_takes_a_flags_word_or_a_takeover_list_test() ->
    F = decode(dcp_commands:add_stream(17, 1, 17)),
    ?assertMatch(#{opcode_name := dcp_add_stream, vbucket := 17, opaque := 17}, F),
    ?assertMatch(#{takeover := true}, mcbp:dcp_fields(F)),
    ?assertMatch(#{takeover := true}, fields(dcp_commands:add_stream(17, [takeover], 17))),
    ?assertMatch(#{takeover := false}, fields(dcp_commands:add_stream(17, 0, 17))).

close_stream_addresses_the_vbucket_test() ->
    ?assertMatch(#{opcode_name := dcp_close_stream, vbucket := 1023, opaque := 1023,
                   extras := <<>>},
                 decode(dcp_commands:close_stream(1023, 1023))).

stream_req_defaults_to_everything_from_the_start_seqno_test() ->
    ?assertMatch(#{flags := 0, start_seqno := 7, end_seqno := 16#ffffffffffffffff,
                   vbucket_uuid := 0, snap_start_seqno := 7, snap_end_seqno := 7},
                 fields(dcp_commands:stream_req(3, #{start_seqno => 7}, 99))).

stream_req_carries_every_given_field_test() ->
    Params = #{flags => 1, start_seqno => 10, end_seqno => 20, vbucket_uuid => 1234,
               snap_start_seqno => 8, snap_end_seqno => 12},
    F = decode(dcp_commands:stream_req(3, Params, 99)),
    ?assertMatch(#{vbucket := 3, opaque := 99}, F),
    ?assertMatch(#{flags := 1, start_seqno := 10, end_seqno := 20, vbucket_uuid := 1234,
                   snap_start_seqno := 8, snap_end_seqno := 12}, mcbp:dcp_fields(F)).

control_puts_the_name_in_the_key_and_the_setting_in_the_value_test() ->
    ?assertMatch(#{opcode_name := dcp_control, key := <<"connection_buffer_size">>,
                   value := <<"1048576">>},
                 decode(dcp_commands:control("connection_buffer_size", "1048576", 5))).

buffer_ack_carries_the_byte_count_test() ->
    F = decode(dcp_commands:buffer_ack(65536, 6)),
    ?assertMatch(#{opcode_name := dcp_buffer_acknowledgement}, F),
    ?assertMatch(#{bytes := 65536}, mcbp:dcp_fields(F)).

noop_response_echoes_the_opaque_with_success_test() ->
    ?assertMatch(#{magic := res, opcode_name := dcp_noop, status := 0, opaque := 42},
                 decode(dcp_commands:noop_response(42))),
    ?assertMatch(#{magic := req, opcode_name := dcp_noop, opaque := 43},
                 decode(dcp_commands:noop_request(43))).

%% ---- what a node sends ----

snapshot_marker_is_v1_with_range_and_type_test() ->
    ?assertMatch(#{start_seqno := 0, end_seqno := 100, snapshot_type := 1},
                 fields(dcp_commands:snapshot_marker(4, 9, 0, 100, 1))).

mutation_carries_key_value_and_seqnos_test() ->
    F = decode(dcp_commands:mutation(4, 9, #{key => <<"k1">>, value => <<"v1">>, by_seqno => 5,
                                             rev_seqno => 2, cas => 77})),
    ?assertMatch(#{magic := req, opcode_name := dcp_mutation, vbucket := 4, opaque := 9,
                   key := <<"k1">>, value := <<"v1">>, cas := 77}, F),
    ?assertMatch(#{by_seqno := 5, rev_seqno := 2}, mcbp:dcp_fields(F)).

mutation_with_framing_extras_uses_the_flexible_magic_test() ->
    F = decode(dcp_commands:mutation(4, 9, #{key => <<"k">>, by_seqno => 1,
                                             framing_extras => [{2, <<1:16>>}]})),
    ?assertMatch(#{magic := alt_req, framing_extras := [{2, <<1:16>>}], key := <<"k">>}, F).

deletion_is_v2_only_with_a_delete_time_test() ->
    ?assertMatch(#{version := 1, by_seqno := 6},
                 fields(dcp_commands:deletion(4, 9, #{key => <<"k">>, by_seqno => 6}))),
    ?assertMatch(#{version := 2, by_seqno := 6, delete_time := 1000},
                 fields(dcp_commands:deletion(4, 9, #{key => <<"k">>, by_seqno => 6,
                                                      delete_time => 1000}))).

expiration_carries_the_seqno_test() ->
    ?assertMatch(#{by_seqno := 8, delete_time := 3},
                 fields(dcp_commands:expiration(4, 9, #{key => <<"k">>, by_seqno => 8,
                                                        delete_time => 3}))).

stream_end_encodes_every_named_reason_and_unknown_codes_test() ->
    Reasons = [ok, closed, state_changed, disconnected, too_slow, backfill_fail, rollback,
               filter_empty, lost_privileges],
    [?assertEqual(#{reason => R}, fields(dcp_commands:stream_end(1, 2, R))) || R <- Reasons],
    ?assertEqual(#{reason => {unknown, 42}}, fields(dcp_commands:stream_end(1, 2, {unknown, 42}))),
    ?assertEqual(#{reason => state_changed}, fields(dcp_commands:stream_end(1, 2, 2))).

set_vbucket_state_encodes_each_state_test() ->
    [?assertEqual(#{state => S}, fields(dcp_commands:set_vbucket_state(1, 2, S)))
     || S <- [active, replica, pending, dead]].

stream_req_response_carries_the_failover_log_test() ->
    Log = [{16#1234, 50}, {16#99, 0}],
    F = decode(dcp_commands:stream_req_response(7, 0, Log)),
    ?assertMatch(#{magic := res, opcode_name := dcp_stream_req, status := 0, opaque := 7}, F),
    ?assertEqual(Log, dcp_commands:failover_log(maps:get(value, F))).

add_stream_response_carries_the_consumer_stream_opaque_test() ->
    ?assertMatch(#{status := 0, opaque := 5, extras := <<16#10000:32>>},
                 decode(dcp_commands:add_stream_response(5, 0, 16#10000))),
    ?assertMatch(#{status := 16#02, extras := <<>>},
                 decode(dcp_commands:add_stream_response(5, 16#02, none))).

request_builds_any_opcode_including_unknown_ones_test() ->
    ?assertMatch(#{opcode := 16#ee, opcode_name := unknown, vbucket := 3},
                 decode(dcp_commands:request(16#ee, #{vbucket => 3}))).

%% ---- interpreting ----

process_response_is_ok_only_for_success_test() ->
    ?assertEqual(ok, dcp_commands:process_response(decode(dcp_commands:response(16#51, 0, 1)))),
    ?assertEqual({error, {mcbp_status, 16#23}},
                 dcp_commands:process_response(decode(dcp_commands:response(16#51, 16#23, 1)))),
    ?assertEqual({error, {mcbp_status, 1}},
                 dcp_commands:process_response(
                   iolist_to_binary(dcp_commands:response(16#52, 1, 1)))).

process_response_refuses_a_request_test() ->
    ?assertEqual({error, {not_a_response, dcp_close_stream}},
                 dcp_commands:process_response(decode(dcp_commands:close_stream(1, 1)))).

command_2_atom_names_opcodes_and_says_unknown_otherwise_test() ->
    ?assertEqual(dcp_stream_end, dcp_commands:command_2_atom(16#55)),
    ?assertEqual(dcp_buffer_acknowledgement, dcp_commands:command_2_atom(16#5d)),
    ?assertEqual(select_bucket, dcp_commands:command_2_atom(16#89)),
    ?assertEqual(unknown, dcp_commands:command_2_atom(16#ee)).

opcode_is_the_inverse_of_command_2_atom_test() ->
    [?assertEqual(Op, dcp_commands:opcode(dcp_commands:command_2_atom(Op)))
     || Op <- lists:seq(16#50, 16#65)],
    ?assertError({unknown_opcode_name, nonsense}, dcp_commands:opcode(nonsense)).

status_names_map_to_their_codes_test() ->
    ?assertEqual(16#20, dcp_commands:status(auth_error)),
    ?assertEqual(16#23, dcp_commands:status(rollback)),
    ?assertEqual(7, dcp_commands:status(7)).

%% ---- formatting ----

format_packet_nicely_names_request_fields_then_dumps_hex_test() ->
    Text = dcp_commands:format_packet_nicely(sent, iolist_to_binary(dcp_commands:add_stream(17, 1, 17))),
    ?assertMatch({match, _}, re:run(Text, "^sent REQUEST \\(req\\): dcp_add_stream")),
    ?assertMatch({match, _}, re:run(Text, "vbucket = 17 opaque = 17")),
    ?assertMatch({match, _}, re:run(Text, "00000000  80 51 00 00 04 00 00 11")).

format_packet_nicely_names_the_status_of_a_response_test() ->
    Text = dcp_commands:format_packet_nicely(decode(dcp_commands:response(16#51, 16#02, 9))),
    ?assertMatch({match, _}, re:run(Text, "^RESPONSE \\(res\\): dcp_add_stream")),
    ?assertMatch({match, _}, re:run(Text, "status = key_eexists")).

format_packet_nicely_survives_undecodable_bytes_test() ->
    Text = dcp_commands:format_packet_nicely(<<16#42, 1, 2, 3>>),
    ?assertMatch({match, _}, re:run(Text, "undecodable")),
    ?assertMatch({match, _}, re:run(Text, "42 01 02 03")).

format_packet_nicely_cuts_large_frames_test() ->
    Big = iolist_to_binary(dcp_commands:mutation(1, 1, #{key => <<"k">>, by_seqno => 1,
                                                         value => binary:copy(<<"x">>, 4096)})),
    Text = dcp_commands:format_packet_nicely(Big),
    ?assertMatch({match, _}, re:run(Text, "more bytes")),
    ?assert(length(Text) < 4096).

%% ---- properties ----

prop_mutation_round_trips_through_the_codec() ->
    ?FORALL({VB, Opaque, Key, Value, Seqno, Rev},
            {range(0, 1023), range(0, 16#ffffffff), non_empty(binary()), binary(),
             range(0, 16#ffffffffffffffff), range(0, 16#ffffffffffffffff)},
            begin
                F = decode(dcp_commands:mutation(VB, Opaque, #{key => Key, value => Value,
                                                               by_seqno => Seqno,
                                                               rev_seqno => Rev})),
                #{by_seqno := S, rev_seqno := R} = mcbp:dcp_fields(F),
                maps:get(key, F) =:= Key andalso maps:get(value, F) =:= Value
                    andalso maps:get(vbucket, F) =:= VB andalso maps:get(opaque, F) =:= Opaque
                    andalso S =:= Seqno andalso R =:= Rev
            end).

mutation_round_trips_through_the_codec_test() ->
    ?assert(proper:quickcheck(prop_mutation_round_trips_through_the_codec(),
                              [{numtests, 200}, {to_file, user}])).
