%% @doc dcp_replicator:get_connection_name/4: ns_server's naming and truncation rule.
-module(dcp_01_naming_tests).

-include_lib("eunit/include/eunit.hrl").

name(Consumer, Producer, Bucket, ConnNum) ->
    dcp_replicator:get_connection_name(Consumer, Producer, Bucket, ConnNum).

hash(LongName) ->
    base64:encode_to_string(crypto:hash(sha, LongName)).

short_name_is_producer_arrow_consumer_colon_bucket_test() ->
    ?assertEqual("replication:n_1@10.0.0.2->n_0@10.0.0.1:default",
                 name('n_0@10.0.0.1', 'n_1@10.0.0.2', "default", 0)).

connection_number_above_zero_adds_a_slash_suffix_test() ->
    ?assertEqual("replication:n_1@h2->n_0@h1:beer/3", name('n_0@h1', 'n_1@h2', "beer", 3)).

node_names_may_be_strings_test() ->
    ?assertEqual(name('a@h', 'b@h', "default", 1), name("a@h", "b@h", "default", 1)).

name_of_exactly_200_characters_is_kept_whole_test() ->
    Fixed = length("replication:p->c:"),
    Bucket = lists:duplicate(200 - Fixed, $b),
    Name = name("c", "p", Bucket, 0),
    ?assertEqual(200, length(Name)),
    ?assertEqual("replication:p->c:" ++ Bucket, Name).

name_over_200_characters_is_cut_and_ends_with_the_hash_of_the_long_name_test() ->
    Consumer = "consumer-" ++ lists:duplicate(80, $c),
    Producer = "producer-" ++ lists:duplicate(80, $p),
    Bucket = lists:duplicate(100, $b),
    Long = "replication:" ++ Producer ++ "->" ++ Consumer ++ ":" ++ Bucket ++ "/7",
    %% no common prefix: each node keeps its first 35 characters, the bucket its first 60
    Expected = "replication:" ++ lists:sublist(Producer, 35) ++ "->" ++ lists:sublist(Consumer, 35)
        ++ ":" ++ lists:sublist(Bucket, 60) ++ ":" ++ hash(Long),
    Name = name(Consumer, Producer, Bucket, 7),
    ?assertEqual(Expected, Name),
    ?assert(length(Name) =< 200).

name_of_201_characters_is_truncated_test() ->
    Fixed = length("replication:p->c:"),
    Bucket = lists:duplicate(201 - Fixed, $b),
    Name = name("c", "p", Bucket, 0),
    ?assertEqual("replication:p->c:" ++ lists:sublist(Bucket, 60) ++ ":"
                 ++ hash("replication:p->c:" ++ Bucket), Name).

long_common_prefix_is_dropped_but_35_characters_of_each_node_remain_test() ->
    Prefix = "ns_1@" ++ lists:duplicate(100, $x) ++ ".example.com-",
    Consumer = Prefix ++ "consumer",
    Producer = Prefix ++ "producer",
    Name = name(Consumer, Producer, "default", 0),
    %% dropping the whole common prefix would leave 8 characters: the cut stops at 35 left
    ?assertEqual("replication:" ++ lists:nthtail(length(Producer) - 35, Producer) ++ "->"
                 ++ lists:nthtail(length(Consumer) - 35, Consumer) ++ ":default:"
                 ++ hash("replication:" ++ Producer ++ "->" ++ Consumer ++ ":default"),
                 Name),
    ?assert(length(Name) =< 200),
    %% the two nodes stay distinguishable
    ?assertMatch("replication:" ++ _, Name),
    ?assertNotEqual(nomatch, string:find(Name, "producer->")),
    ?assertNotEqual(nomatch, string:find(Name, "consumer:default:")).

short_common_prefix_is_dropped_whole_then_35_characters_kept_test() ->
    Prefix = "ns_1@rack1.",
    Consumer = Prefix ++ lists:duplicate(120, $c),
    Producer = Prefix ++ lists:duplicate(120, $p),
    Name = name(Consumer, Producer, "default", 0),
    ?assertEqual("replication:" ++ lists:duplicate(35, $p) ++ "->" ++ lists:duplicate(35, $c)
                 ++ ":default:"
                 ++ hash("replication:" ++ Producer ++ "->" ++ Consumer ++ ":default"),
                 Name).

truncated_names_of_different_connections_differ_test() ->
    Node = lists:duplicate(150, $n),
    ?assertNotEqual(name(Node ++ "1", Node ++ "2", "default", 1),
                    name(Node ++ "1", Node ++ "2", "default", 2)).

every_truncated_name_fits_in_200_characters_test() ->
    Lengths = [length(name(lists:duplicate(C, $c), lists:duplicate(P, $p),
                           lists:duplicate(B, $b), N))
               || C <- [1, 35, 36, 300], P <- [1, 35, 300], B <- [1, 60, 61, 250],
                  N <- [0, 1023]],
    ?assertEqual([], [L || L <- Lengths, L > 200]).

names_without_the_replication_prefix_are_refused_test() ->
    ?assertEqual({error, {bad_option, connection_name, "ns_server:x"}},
                 dcp_replicator:start_link(#{connection_name => "ns_server:x",
                                             consumer => {"127.0.0.1", 1},
                                             producer => {"127.0.0.1", 2},
                                             bucket => "b", user => "u", password => "p"})).
