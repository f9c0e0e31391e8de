%% Memcached binary protocol and DCP constants (PROTOCOL.md), for code that matches on a decoded
%% frame's integer fields. The name tables live in native/mcbp/src/names.rs only (read them with
%% `mcbp:names/1', `mcbp:name/2', `mcbp:code/2'); this header only gives some of their codes a
%% macro for patterns, and test/mcbp_04_names_tests.erl checks every entry against the NIF.

-ifndef(MCBP_HRL).
-define(MCBP_HRL, true).

%% Magics
-define(REQ, 16#80).
-define(RES, 16#81).
-define(ALT_REQ, 16#08).
-define(ALT_RES, 16#18).
-define(SERVER_REQ, 16#82).
-define(SERVER_RES, 16#83).

%% Opcodes
-define(NOOP, 16#0a).
-define(HELLO, 16#1f).
-define(SASL_LIST_MECHS, 16#20).
-define(SASL_AUTH, 16#21).
-define(SELECT_BUCKET, 16#89).
-define(DCP_OPEN, 16#50).
-define(DCP_ADD_STREAM, 16#51).
-define(DCP_CLOSE_STREAM, 16#52).
-define(DCP_STREAM_REQ, 16#53).
-define(DCP_GET_FAILOVER_LOG, 16#54).
-define(DCP_STREAM_END, 16#55).
-define(DCP_SNAPSHOT_MARKER, 16#56).
-define(DCP_MUTATION, 16#57).
-define(DCP_DELETION, 16#58).
-define(DCP_EXPIRATION, 16#59).
-define(DCP_SET_VBUCKET_STATE, 16#5b).
-define(DCP_NOOP, 16#5c).
-define(DCP_BUFFER_ACK, 16#5d).
-define(DCP_CONTROL, 16#5e).
-define(DCP_SYSTEM_EVENT, 16#5f).
-define(DCP_PREPARE, 16#60).
-define(DCP_SEQNO_ACKNOWLEDGED, 16#61).
-define(DCP_COMMIT, 16#62).
-define(DCP_ABORT, 16#63).

%% Statuses
-define(SUCCESS, 16#00).
-define(KEY_ENOENT, 16#01).
-define(KEY_EEXISTS, 16#02).
-define(EINVAL, 16#04).
-define(NOT_MY_VBUCKET, 16#07).
-define(NO_BUCKET, 16#08).
-define(AUTH_ERROR, 16#20).
-define(ERANGE, 16#22).
-define(ROLLBACK, 16#23).
-define(EACCESS, 16#24).
-define(UNKNOWN_COMMAND, 16#81).
-define(ENOMEM, 16#82).
-define(NOT_SUPPORTED, 16#83).
-define(EINTERNAL, 16#84).
-define(EBUSY, 16#85).
-define(ETMPFAIL, 16#86).

%% DCP_ADD_STREAM flags
-define(ADD_STREAM_TAKEOVER, 16#01).

%% DCP_OPEN flags
-define(OPEN_PRODUCER, 16#01).
-define(OPEN_XATTR, 16#04).
-define(OPEN_DEL_TIMES, 16#20).
-define(OPEN_DEL_USER_XATTR, 16#100).

-define(MAX_SEQNO, 16#ffffffffffffffff).

-endif.
