//! Every protocol name table: opcodes, statuses, DCP_STREAM_END reasons, vbucket states and HELLO
//! features, code <-> name (kv_engine's names, in snake case). This is the only place they are
//! written down: the NIF makes its atoms from these tables once, at load, and Erlang reads them
//! through the NIF (`mcbp:names/1`) or `include/mcbp.hrl` (checked against these tables by a test).

use crate::header::Magic;

pub const GET: u8 = 0x00;
pub const SET: u8 = 0x01;
pub const NOOP: u8 = 0x0a;
pub const HELLO: u8 = 0x1f;
pub const SASL_LIST_MECHS: u8 = 0x20;
pub const SASL_AUTH: u8 = 0x21;
pub const SASL_STEP: u8 = 0x22;
pub const SELECT_BUCKET: u8 = 0x89;

pub const DCP_OPEN: u8 = 0x50;
pub const DCP_ADD_STREAM: u8 = 0x51;
pub const DCP_CLOSE_STREAM: u8 = 0x52;
pub const DCP_STREAM_REQ: u8 = 0x53;
pub const DCP_GET_FAILOVER_LOG: u8 = 0x54;
pub const DCP_STREAM_END: u8 = 0x55;
pub const DCP_SNAPSHOT_MARKER: u8 = 0x56;
pub const DCP_MUTATION: u8 = 0x57;
pub const DCP_DELETION: u8 = 0x58;
pub const DCP_EXPIRATION: u8 = 0x59;
pub const DCP_FLUSH: u8 = 0x5a;
pub const DCP_SET_VBUCKET_STATE: u8 = 0x5b;
pub const DCP_NOOP: u8 = 0x5c;
pub const DCP_BUFFER_ACKNOWLEDGEMENT: u8 = 0x5d;
pub const DCP_CONTROL: u8 = 0x5e;
pub const DCP_SYSTEM_EVENT: u8 = 0x5f;
pub const DCP_PREPARE: u8 = 0x60;
pub const DCP_SEQNO_ACKNOWLEDGED: u8 = 0x61;
pub const DCP_COMMIT: u8 = 0x62;
pub const DCP_ABORT: u8 = 0x63;
pub const DCP_SEQNO_ADVANCED: u8 = 0x64;
pub const DCP_OSO_SNAPSHOT: u8 = 0x65;
pub const DCP_CACHE_TRANSFER: u8 = 0x66;
pub const DCP_CACHE_TRANSFER_END: u8 = 0x67;

pub const STATUS_SUCCESS: u16 = 0x00;
/// A close-stream answer of key_enoent means the stream was already gone.
pub const STATUS_KEY_ENOENT: u16 = 0x01;
pub const STATUS_ROLLBACK: u16 = 0x23;

/// DCP_ADD_STREAM flags word: take the vbucket over.
pub const ADD_STREAM_FLAG_TAKEOVER: u32 = 0x1;

/// Why a producer ended a stream (the u32 in DCP_STREAM_END's extras). Any code is a value: one
/// without a name is kept as it is, never an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamEndReason(pub u32);

impl StreamEndReason {
    /// Everything asked for was sent: not a failure during setup.
    pub const OK: StreamEndReason = StreamEndReason(0);
    pub const CLOSED: StreamEndReason = StreamEndReason(1);
    pub const STATE_CHANGED: StreamEndReason = StreamEndReason(2);
    pub const DISCONNECTED: StreamEndReason = StreamEndReason(3);
    pub const TOO_SLOW: StreamEndReason = StreamEndReason(4);
    pub const BACKFILL_FAIL: StreamEndReason = StreamEndReason(5);
    pub const ROLLBACK: StreamEndReason = StreamEndReason(6);
    pub const FILTER_EMPTY: StreamEndReason = StreamEndReason(7);
    pub const LOST_PRIVILEGES: StreamEndReason = StreamEndReason(8);

    pub fn name(self) -> Option<&'static str> {
        name(Kind::StreamEndReason, self.0)
    }
}

/// A vbucket state (DCP_SET_VBUCKET_STATE's extras byte). Any byte is a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VbState(pub u8);

impl VbState {
    pub const ACTIVE: VbState = VbState(1);
    pub const REPLICA: VbState = VbState(2);
    pub const PENDING: VbState = VbState(3);
    pub const DEAD: VbState = VbState(4);

    pub fn name(self) -> Option<&'static str> {
        name(Kind::VbState, u32::from(self.0))
    }
}

/// The name tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Client opcodes (magics 0x80, 0x81, 0x08, 0x18).
    Opcode,
    /// Server-initiated opcodes (magics 0x82, 0x83): a namespace of their own.
    ServerOpcode,
    Status,
    StreamEndReason,
    VbState,
    HelloFeature,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Opcode,
        Kind::ServerOpcode,
        Kind::Status,
        Kind::StreamEndReason,
        Kind::VbState,
        Kind::HelloFeature,
    ];
}

/// The (code, name) pairs of one table, ascending by code.
pub fn table(kind: Kind) -> &'static [(u16, &'static str)] {
    match kind {
        Kind::Opcode => &CLIENT_OPCODES,
        Kind::ServerOpcode => &SERVER_OPCODES,
        Kind::Status => &STATUSES,
        Kind::StreamEndReason => &STREAM_END_REASONS,
        Kind::VbState => &VBUCKET_STATES,
        Kind::HelloFeature => &HELLO_FEATURES,
    }
}

/// The name of a code, `None` when the table has none.
pub fn name(kind: Kind, code: u32) -> Option<&'static str> {
    if kind == Kind::Opcode {
        return u8::try_from(code).ok().and_then(opcode_name);
    }
    table(kind)
        .iter()
        .find(|(c, _)| u32::from(*c) == code)
        .map(|(_, n)| *n)
}

/// The code of a name, `None` when the table has none.
pub fn code(kind: Kind, name: &str) -> Option<u32> {
    table(kind)
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(c, _)| u32::from(*c))
}

static CLIENT_OPCODES: [(u16, &str); 72] = [
    (0x00, "get"),
    (0x01, "set"),
    (0x02, "add"),
    (0x03, "replace"),
    (0x04, "delete"),
    (0x05, "increment"),
    (0x06, "decrement"),
    (0x07, "quit"),
    (0x08, "flush"),
    (0x09, "getq"),
    (0x0a, "noop"),
    (0x0b, "version"),
    (0x0c, "getk"),
    (0x0d, "getkq"),
    (0x0e, "append"),
    (0x0f, "prepend"),
    (0x10, "stat"),
    (0x11, "setq"),
    (0x12, "addq"),
    (0x13, "replaceq"),
    (0x14, "deleteq"),
    (0x15, "incrementq"),
    (0x16, "decrementq"),
    (0x17, "quitq"),
    (0x18, "flushq"),
    (0x19, "appendq"),
    (0x1a, "prependq"),
    (0x1b, "verbosity"),
    (0x1c, "touch"),
    (0x1d, "gat"),
    (0x1e, "gatq"),
    (0x1f, "hello"),
    (0x20, "sasl_list_mechs"),
    (0x21, "sasl_auth"),
    (0x22, "sasl_step"),
    (0x25, "ioctl_get"),
    (0x26, "ioctl_set"),
    (0x3d, "set_vbucket"),
    (0x3e, "get_vbucket"),
    (0x3f, "del_vbucket"),
    (0x48, "get_all_vb_seqnos"),
    (0x50, "dcp_open"),
    (0x51, "dcp_add_stream"),
    (0x52, "dcp_close_stream"),
    (0x53, "dcp_stream_req"),
    (0x54, "dcp_get_failover_log"),
    (0x55, "dcp_stream_end"),
    (0x56, "dcp_snapshot_marker"),
    (0x57, "dcp_mutation"),
    (0x58, "dcp_deletion"),
    (0x59, "dcp_expiration"),
    (0x5a, "dcp_flush"),
    (0x5b, "dcp_set_vbucket_state"),
    (0x5c, "dcp_noop"),
    (0x5d, "dcp_buffer_acknowledgement"),
    (0x5e, "dcp_control"),
    (0x5f, "dcp_system_event"),
    (0x60, "dcp_prepare"),
    (0x61, "dcp_seqno_acknowledged"),
    (0x62, "dcp_commit"),
    (0x63, "dcp_abort"),
    (0x64, "dcp_seqno_advanced"),
    (0x65, "dcp_oso_snapshot"),
    (0x66, "dcp_cache_transfer"),
    (0x67, "dcp_cache_transfer_end"),
    (0x83, "get_replica"),
    (0x89, "select_bucket"),
    (0x91, "observe_seqno"),
    (0x92, "observe"),
    (0xb5, "get_cluster_config"),
    (0xf1, "get_random_key"),
    (0xfe, "get_error_map"),
];

static SERVER_OPCODES: [(u16, &str); 4] = [
    (0x01, "clustermap_change_notification"),
    (0x02, "authenticate"),
    (0x03, "active_external_users"),
    (0x04, "get_authorization"),
];

static STATUSES: [(u16, &str); 33] = [
    (0x00, "success"),
    (0x01, "key_enoent"),
    (0x02, "key_eexists"),
    (0x03, "e2big"),
    (0x04, "einval"),
    (0x05, "not_stored"),
    (0x06, "delta_badval"),
    (0x07, "not_my_vbucket"),
    (0x08, "no_bucket"),
    (0x09, "locked"),
    (0x0a, "dcp_stream_not_found"),
    (0x0b, "opaque_no_match"),
    (0x1f, "auth_stale"),
    (0x20, "auth_error"),
    (0x21, "auth_continue"),
    (0x22, "erange"),
    (0x23, "rollback"),
    (0x24, "eaccess"),
    (0x25, "not_initialized"),
    (0x26, "unknown_frame_info"),
    (0x81, "unknown_command"),
    (0x82, "enomem"),
    (0x83, "not_supported"),
    (0x84, "einternal"),
    (0x85, "ebusy"),
    (0x86, "etmpfail"),
    (0x87, "xattr_einval"),
    (0x88, "unknown_collection"),
    (0x8a, "cannot_apply_collections_manifest"),
    (0x8c, "unknown_scope"),
    (0xa0, "durability_invalid_level"),
    (0xa1, "durability_impossible"),
    (0xa2, "sync_write_in_progress"),
];

static STREAM_END_REASONS: [(u16, &str); 9] = [
    (0, "ok"),
    (1, "closed"),
    (2, "state_changed"),
    (3, "disconnected"),
    (4, "too_slow"),
    (5, "backfill_fail"),
    (6, "rollback"),
    (7, "filter_empty"),
    (8, "lost_privileges"),
];

static VBUCKET_STATES: [(u16, &str); 4] =
    [(1, "active"), (2, "replica"), (3, "pending"), (4, "dead")];

static HELLO_FEATURES: [(u16, &str); 16] = [
    (0x02, "tls"),
    (0x03, "tcp_nodelay"),
    (0x04, "mutation_seqno"),
    (0x05, "tcp_delay"),
    (0x06, "xattr"),
    (0x07, "xerror"),
    (0x08, "select_bucket"),
    (0x0a, "snappy"),
    (0x0b, "json"),
    (0x0c, "duplex"),
    (0x0d, "clustermap_change_notification"),
    (0x0e, "unordered_execution"),
    (0x0f, "tracing"),
    (0x10, "alt_request_support"),
    (0x11, "sync_replication"),
    (0x12, "collections"),
];

const fn client_table() -> [Option<&'static str>; 256] {
    let mut t = [None; 256];
    let mut i = 0;
    while i < CLIENT_OPCODES.len() {
        t[CLIENT_OPCODES[i].0 as usize] = Some(CLIENT_OPCODES[i].1);
        i += 1;
    }
    t
}

static CLIENT_BY_CODE: [Option<&str>; 256] = client_table();

/// The name of a client opcode, `None` when unknown (unknown opcodes are passed through, not errors).
pub fn opcode_name(opcode: u8) -> Option<&'static str> {
    CLIENT_BY_CODE[opcode as usize]
}

/// The name of an opcode in the namespace its magic selects.
pub fn opcode_name_for(magic: Magic, opcode: u8) -> Option<&'static str> {
    match magic {
        Magic::ServerReq | Magic::ServerRes => name(Kind::ServerOpcode, u32::from(opcode)),
        _ => opcode_name(opcode),
    }
}

pub fn status_name(status: u16) -> Option<&'static str> {
    name(Kind::Status, u32::from(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_ascending_and_round_trip() {
        for kind in Kind::ALL {
            let t = table(kind);
            assert!(t.windows(2).all(|w| w[0].0 < w[1].0), "{kind:?} ascending");
            for &(c, n) in t {
                assert_eq!(name(kind, u32::from(c)), Some(n), "{kind:?}");
                assert_eq!(code(kind, n), Some(u32::from(c)), "{kind:?} {n}");
            }
        }
        assert_eq!(StreamEndReason::STATE_CHANGED.name(), Some("state_changed"));
        assert_eq!(StreamEndReason(9).name(), None);
        assert_eq!(VbState::ACTIVE.name(), Some("active"));
        assert_eq!(VbState(0).name(), None);
        assert_eq!(code(Kind::HelloFeature, "collections"), Some(0x12));
    }

    #[test]
    fn the_opcodes_the_proxy_relies_on_have_their_names() {
        assert_eq!(opcode_name(HELLO), Some("hello"));
        assert_eq!(opcode_name(SASL_AUTH), Some("sasl_auth"));
        assert_eq!(opcode_name(SASL_LIST_MECHS), Some("sasl_list_mechs"));
        assert_eq!(opcode_name(SELECT_BUCKET), Some("select_bucket"));
        assert_eq!(opcode_name(NOOP), Some("noop"));
        assert_eq!(opcode_name(GET), Some("get"));
        assert_eq!(opcode_name(SET), Some("set"));
        for op in DCP_OPEN..=DCP_CACHE_TRANSFER_END {
            assert!(opcode_name(op).unwrap().starts_with("dcp_"), "0x{op:02x}");
        }
        assert_eq!(opcode_name(0xee), None);
        assert_eq!(
            opcode_name_for(Magic::ServerReq, 0x01),
            Some("clustermap_change_notification")
        );
    }

    #[test]
    fn statuses_in_protocol_md_have_their_names() {
        let expected = [
            (0x00, "success"),
            (0x01, "key_enoent"),
            (0x02, "key_eexists"),
            (0x04, "einval"),
            (0x07, "not_my_vbucket"),
            (0x08, "no_bucket"),
            (0x20, "auth_error"),
            (0x22, "erange"),
            (0x23, "rollback"),
            (0x24, "eaccess"),
            (0x81, "unknown_command"),
            (0x82, "enomem"),
            (0x83, "not_supported"),
            (0x84, "einternal"),
            (0x85, "ebusy"),
            (0x86, "etmpfail"),
        ];
        for (code, name) in expected {
            assert_eq!(status_name(code), Some(name));
        }
        assert_eq!(status_name(0x7777), None);
    }
}
