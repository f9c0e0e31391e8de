%% @doc Helpers shared by the test modules that run kv_sim nodes: waiting for a replication to
%% catch up, TLS configurations from public_key's test certificates, and flushing exit signals.
-module(dcp_test_lib).

-include_lib("eunit/include/eunit.hrl").

-export([assert_replicated/3, tls_configs/0, flush_exits/0]).

%% How long the consumer may take to hold what the producer has before the test fails.
-define(REPLICATION_WAIT_MS, 45000).

%% @doc Polls the nodes until the consumer holds what the producer has for every vbucket, then
%% compares them (so a test that lost data fails naming the vbuckets whose digests differ, not by
%% its EUnit backstop).
-spec assert_replicated(pid(), pid(), [non_neg_integer()]) -> ok.
assert_replicated(Producer, Consumer, VBuckets) ->
    wait_replicated(Producer, Consumer, VBuckets,
                    erlang:monotonic_time(millisecond) + ?REPLICATION_WAIT_MS),
    Differ = [{VB, kv_sim:digest(Producer, VB), kv_sim:digest(Consumer, VB)}
              || VB <- VBuckets, kv_sim:digest(Producer, VB) =/= kv_sim:digest(Consumer, VB)],
    ?assertEqual([], Differ).

wait_replicated(Producer, Consumer, VBuckets, Deadline) ->
    Pending = [VB || VB <- VBuckets, kv_sim:digest(Producer, VB) =/= kv_sim:digest(Consumer, VB)],
    case Pending =/= [] andalso erlang:monotonic_time(millisecond) < Deadline of
        true -> timer:sleep(20), wait_replicated(Producer, Consumer, Pending, Deadline);
        false -> ok
    end.

%% @doc `{ServerOpts, ClientOpts}' from a fresh test CA, both sides verifying their peer. RSA 2048
%% keys: OTP 25's default test keys are refused by its own TLS 1.3 server (insufficient_security).
-spec tls_configs() -> {[ssl:tls_server_option()], [ssl:tls_client_option()]}.
tls_configs() ->
    {ok, _} = application:ensure_all_started(ssl),
    Rsa = [{key, {rsa, 2048, 65537}}],
    Chain = #{root => Rsa, intermediates => [], peer => Rsa},
    #{server_config := Server, client_config := Client} =
        public_key:pkix_test_data(#{server_chain => Chain, client_chain => Chain}),
    %% the test certificates name no host: the client verifies the chain, not the name
    {[{verify, verify_peer}, {fail_if_no_peer_cert, true} | Server],
     [{verify, verify_peer}, {server_name_indication, disable} | Client]}.

%% @doc Drops the exit signals a trapping test process collected (a failed start_link leaves one).
-spec flush_exits() -> ok.
flush_exits() ->
    receive {'EXIT', _, _} -> flush_exits() after 0 -> ok end.
