%% @doc include/mcbp.hrl against the codec's own tables (native/mcbp/src/names.rs through the NIF):
%% every define of the header is checked, section by section; a define in a section this test does
%% not know fails it, so a new entry cannot go unchecked.
-module(mcbp_04_names_tests).

-include_lib("eunit/include/eunit.hrl").

%% Macro names that are not the table's name upper-cased.
-define(ALIASES, #{'DCP_BUFFER_ACK' => dcp_buffer_acknowledgement}).

hrl_defines() ->
    File = filename:join([code:lib_dir(dcp_proxy), "include", "mcbp.hrl"]),
    {ok, Bin} = file:read_file(File),
    Lines = string:split(binary_to_list(Bin), "\n", all),
    {_, Defs} = lists:foldl(fun define/2, {none, []}, Lines),
    lists:reverse(Defs).

define("%% " ++ Section, {_, Acc}) ->
    {Section, Acc};
define("-define(MCBP_HRL" ++ _, Acc) ->
    Acc;
define("-define(" ++ Rest, {Section, Acc}) ->
    {match, [Name, Value]} =
        re:run(Rest, "^([A-Z0-9_]+), *(16#[0-9a-fA-F]+|[0-9]+)\\)", [{capture, all_but_first, list}]),
    {Section, [{Section, list_to_atom(Name), value(Value)} | Acc]};
define(_, Acc) ->
    Acc.

value("16#" ++ Hex) -> list_to_integer(Hex, 16);
value(Dec) -> list_to_integer(Dec).

table_name(Macro) ->
    maps:get(Macro, ?ALIASES, list_to_atom(string:lowercase(atom_to_list(Macro)))).

every_define_matches_the_codec_test_() ->
    Defs = hrl_defines(),
    ?assert(length(Defs) > 40),
    [{atom_to_list(Macro), fun() -> check(Section, Macro, Value) end}
     || {Section, Macro, Value} <- Defs].

check(_Section, 'MAX_SEQNO', Value) ->
    ?assertEqual(16#ffffffffffffffff, Value);
check("Magics", Macro, Value) ->
    Frame = iolist_to_binary(mcbp:encode(#{magic => table_name(Macro), opcode => 0})),
    ?assertMatch(<<Value, _/binary>>, Frame);
check("Opcodes", Macro, Value) ->
    ?assertEqual(table_name(Macro), mcbp:name(opcode, Value)),
    ?assertEqual(Value, mcbp:code(opcode, table_name(Macro)));
check("Statuses", Macro, Value) ->
    ?assertEqual(table_name(Macro), mcbp:name(status, Value)),
    ?assertEqual(Value, mcbp:code(status, table_name(Macro)));
check("DCP_ADD_STREAM flags", 'ADD_STREAM_TAKEOVER', Value) ->
    ?assertMatch(#{takeover := true}, fields(dcp_commands:add_stream(1, Value, 1)));
check("DCP_OPEN flags", Macro, Value) ->
    Fields = fields(dcp_commands:request(16#50, #{extras => <<0:32, Value:32>>})),
    case Macro of
        'OPEN_PRODUCER' -> ?assertMatch(#{producer := true, include_xattrs := false}, Fields);
        'OPEN_XATTR' -> ?assertMatch(#{producer := false, include_xattrs := true}, Fields);
        'OPEN_DEL_TIMES' -> ?assertMatch(#{include_delete_times := true}, Fields);
        %% the codec names no field for it: the flags word carries it through
        'OPEN_DEL_USER_XATTR' -> ?assertMatch(#{flags := Value}, Fields)
    end;
check(Section, Macro, Value) ->
    error({unchecked_define, Section, Macro, Value}).

fields(IoData) ->
    {ok, Frame, <<>>} = mcbp:decode(iolist_to_binary(IoData)),
    mcbp:dcp_fields(Frame).

every_table_round_trips_through_the_nif_test() ->
    [begin
         Table = mcbp:names(Kind),
         ?assert(Table =/= []),
         [begin
              ?assertEqual(Name, mcbp:name(Kind, Code)),
              ?assertEqual(Code, mcbp:code(Kind, Name))
          end || {Code, Name} <- Table]
     end || Kind <- [opcode, server_opcode, status, stream_end_reason, vbucket_state,
                     hello_feature]],
    ?assertEqual({unknown, 9}, mcbp:name(stream_end_reason, 9)),
    ?assertEqual(undefined, mcbp:code(status, nonsense)),
    ?assertEqual(30 * 1024 * 1024, mcbp:default_max_frame_size()).
