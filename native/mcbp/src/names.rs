//! Opcode and status names (kv_engine's, in snake case). The NIF turns these strings into atoms.

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
pub const STATUS_KEY_ENOENT: u16 = 0x01;
pub const STATUS_ROLLBACK: u16 = 0x23;

/// Client opcodes (magics 0x80, 0x81, 0x08, 0x18).
static CLIENT_OPCODES: [(u8, &str); 72] = [
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

/// Server-initiated opcodes (magics 0x82, 0x83): a namespace of their own.
static SERVER_OPCODES: [(u8, &str); 4] = [
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
        Magic::ServerReq | Magic::ServerRes => SERVER_OPCODES
            .iter()
            .find(|(code, _)| *code == opcode)
            .map(|(_, name)| *name),
        _ => opcode_name(opcode),
    }
}

/// The client opcode with this name.
pub fn opcode_by_name(name: &str) -> Option<u8> {
    CLIENT_OPCODES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(code, _)| *code)
}

pub fn status_name(status: u16) -> Option<&'static str> {
    STATUSES
        .iter()
        .find(|(code, _)| *code == status)
        .map(|(_, name)| *name)
}

pub fn status_by_name(name: &str) -> Option<u16> {
    STATUSES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(code, _)| *code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for (code, name) in CLIENT_OPCODES {
            assert_eq!(opcode_name(code), Some(name));
            assert_eq!(opcode_by_name(name), Some(code));
        }
        for (code, name) in STATUSES {
            assert_eq!(status_name(code), Some(name));
            assert_eq!(status_by_name(name), Some(code));
        }
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
