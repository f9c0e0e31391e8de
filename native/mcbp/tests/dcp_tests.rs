//! DCP extras by name: one test per opcode in PROTOCOL.md, and the fixed sizes enforced.

mod common;

use common::*;
use mcbp::{decode, fields, Decoded, Error, Field, Magic};

/// Decodes a copy that lives for the test (leaked) so fields can borrow from it.
fn fields_of(bytes: &[u8]) -> Result<Vec<(&'static str, Field<'static>)>, Error> {
    let bytes: &'static [u8] = Box::leak(bytes.to_vec().into_boxed_slice());
    match decode(bytes, u64::MAX).unwrap() {
        Decoded::Frame(f, _) => fields(&f),
        Decoded::More(_) => panic!("partial"),
    }
}

fn get<'a>(fs: &'a [(&'static str, Field<'a>)], name: &str) -> &'a Field<'a> {
    &fs.iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .1
}

fn be(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn stream_end_reasons_are_named_and_unknown_codes_kept() {
    let names = [
        "ok",
        "closed",
        "state_changed",
        "disconnected",
        "too_slow",
        "backfill_fail",
        "rollback",
        "filter_empty",
        "lost_privileges",
    ];
    for (code, name) in names.iter().enumerate() {
        let b = stream_end(3, 4, code as u32);
        assert_eq!(fields_of(&b).unwrap(), vec![("reason", Field::Name(name))]);
    }
    let b = stream_end(3, 4, 9);
    assert_eq!(fields_of(&b).unwrap(), vec![("reason", Field::Unknown(9))]);
}

#[test]
fn stream_request_has_its_seqnos_and_uuid() {
    let extras = be(&[
        &1u32.to_be_bytes(),
        &0u32.to_be_bytes(),
        &10u64.to_be_bytes(),
        &u64::MAX.to_be_bytes(),
        &0xabcdu64.to_be_bytes(),
        &10u64.to_be_bytes(),
        &12u64.to_be_bytes(),
    ]);
    let f = fields_of(&request(0x53, &extras, 1)).unwrap();
    assert_eq!(get(&f, "flags"), &Field::Int(1));
    assert_eq!(get(&f, "start_seqno"), &Field::Int(10));
    assert_eq!(get(&f, "end_seqno"), &Field::Int(u64::MAX));
    assert_eq!(get(&f, "vbucket_uuid"), &Field::Int(0xabcd));
    assert_eq!(get(&f, "snap_start_seqno"), &Field::Int(10));
    assert_eq!(get(&f, "snap_end_seqno"), &Field::Int(12));
}

#[test]
fn fixed_extras_sizes_are_enforced_for_each_dcp_request() {
    let sizes: [(u8, &[usize]); 19] = [
        (0x50, &[8]),
        (0x51, &[4]),
        (0x52, &[0]),
        (0x53, &[48]),
        (0x54, &[0]),
        (0x55, &[4]),
        (0x56, &[20, 1]),
        (0x57, &[31]),
        (0x58, &[18, 21]),
        (0x59, &[20]),
        (0x5b, &[1]),
        (0x5c, &[0]),
        (0x5d, &[4]),
        (0x5f, &[13]),
        (0x60, &[31]),
        (0x61, &[8]),
        (0x62, &[16]),
        (0x63, &[16]),
        (0x64, &[8]),
    ];
    for (opcode, good) in sizes {
        for len in 0..50 {
            let extras = vec![1u8; len];
            let mut value = Vec::new();
            if opcode == 0x56 && len == 1 {
                value = vec![0u8; 44];
            }
            let mut f = frame(Magic::Req, opcode, &extras, b"", &value);
            f.opaque = 1;
            let b = bytes(&f);
            let r = fields_of(&b);
            if good.contains(&len) {
                assert!(r.is_ok(), "0x{opcode:02x} with {len}: {r:?}");
            } else {
                assert_eq!(r, Err(Error::BadExtras { opcode, len }), "0x{opcode:02x}");
            }
        }
    }
    let f = fields_of(&request(0x65, &[0, 0, 0, 3], 1)).unwrap();
    assert_eq!(get(&f, "start"), &Field::Bool(true));
    assert_eq!(get(&f, "end"), &Field::Bool(true));
    assert_eq!(
        fields_of(&request(0x65, &[0, 0, 3], 1)),
        Err(Error::BadExtras {
            opcode: 0x65,
            len: 3
        })
    );
}

#[test]
fn mutation_fields_follow_the_31_byte_layout() {
    let extras = be(&[
        &5u64.to_be_bytes(),
        &6u64.to_be_bytes(),
        &7u32.to_be_bytes(),
        &8u32.to_be_bytes(),
        &9u32.to_be_bytes(),
        &10u16.to_be_bytes(),
        &[11],
    ]);
    let f = fields_of(&request(0x57, &extras, 1)).unwrap();
    let expect = [
        ("by_seqno", 5),
        ("rev_seqno", 6),
        ("flags", 7),
        ("expiration", 8),
        ("lock_time", 9),
        ("nmeta", 10),
        ("nru", 11),
    ];
    for (name, v) in expect {
        assert_eq!(get(&f, name), &Field::Int(v), "{name}");
    }
}

#[test]
fn deletion_v1_v2_and_expiration_are_told_apart_by_size() {
    let v1 = be(&[
        &1u64.to_be_bytes(),
        &2u64.to_be_bytes(),
        &3u16.to_be_bytes(),
    ]);
    let f = fields_of(&request(0x58, &v1, 1)).unwrap();
    assert_eq!(get(&f, "version"), &Field::Int(1));
    assert_eq!(get(&f, "nmeta"), &Field::Int(3));
    let v2 = be(&[
        &1u64.to_be_bytes(),
        &2u64.to_be_bytes(),
        &4u32.to_be_bytes(),
        &[0],
    ]);
    let f = fields_of(&request(0x58, &v2, 1)).unwrap();
    assert_eq!(get(&f, "version"), &Field::Int(2));
    assert_eq!(get(&f, "delete_time"), &Field::Int(4));
    let exp = be(&[
        &1u64.to_be_bytes(),
        &2u64.to_be_bytes(),
        &4u32.to_be_bytes(),
    ]);
    let f = fields_of(&request(0x59, &exp, 1)).unwrap();
    assert_eq!(get(&f, "delete_time"), &Field::Int(4));
}

#[test]
fn snapshot_marker_v1_in_extras_and_v2_in_the_value() {
    let v1 = be(&[
        &1u64.to_be_bytes(),
        &9u64.to_be_bytes(),
        &2u32.to_be_bytes(),
    ]);
    let f = fields_of(&request(0x56, &v1, 1)).unwrap();
    assert_eq!(get(&f, "version"), &Field::Name("v1"));
    assert_eq!(get(&f, "end_seqno"), &Field::Int(9));
    assert_eq!(get(&f, "snapshot_type"), &Field::Int(2));
    let value = be(&[
        &1u64.to_be_bytes(),
        &9u64.to_be_bytes(),
        &2u32.to_be_bytes(),
        &8u64.to_be_bytes(),
        &7u64.to_be_bytes(),
        &99u64.to_be_bytes(),
    ]);
    let b = bytes(&frame(Magic::Req, 0x56, &[0], b"", &value[..36]));
    let f = fields_of(&b).unwrap();
    assert_eq!(get(&f, "version"), &Field::Name("v2_0"));
    assert_eq!(get(&f, "end_seqno"), &Field::Int(9));
    assert_eq!(get(&f, "max_visible_seqno"), &Field::Int(8));
    assert_eq!(get(&f, "high_completed_seqno"), &Field::Int(7));
    // v2.0's value is exactly 36 bytes, as kv_engine's validator has it
    for len in [35, 44] {
        let b = bytes(&frame(Magic::Req, 0x56, &[0], b"", &value[..len]));
        assert_eq!(fields_of(&b), Err(Error::BadValue { opcode: 0x56, len }));
    }
    // 2.1 was never used; 2.2 (52 bytes, negotiated by a control) is not decoded
    for version in [1u8, 2] {
        let b = bytes(&frame(Magic::Req, 0x56, &[version], b"", &value[..44]));
        assert_eq!(
            fields_of(&b).unwrap(),
            vec![("version", Field::Unknown(version as u64))]
        );
    }
}

#[test]
fn set_vbucket_state_names_the_four_states() {
    for (code, name) in [(1, "active"), (2, "replica"), (3, "pending"), (4, "dead")] {
        let f = fields_of(&request(0x5b, &[code], 1)).unwrap();
        assert_eq!(f, vec![("state", Field::Name(name))]);
    }
    let f = fields_of(&request(0x5b, &[9], 1)).unwrap();
    assert_eq!(f, vec![("state", Field::Unknown(9))]);
}

#[test]
fn open_add_stream_and_flow_control_fields() {
    let b = bytes(&frame(
        Magic::Req,
        0x50,
        &[0, 0, 0, 0, 0, 0, 0, 0x25],
        b"replication:a",
        b"",
    ));
    let f = fields_of(&b).unwrap();
    assert_eq!(get(&f, "producer"), &Field::Bool(true));
    assert_eq!(get(&f, "include_xattrs"), &Field::Bool(true));
    assert_eq!(get(&f, "include_delete_times"), &Field::Bool(true));
    assert_eq!(get(&f, "notifier"), &Field::Bool(false));
    assert_eq!(get(&f, "name"), &Field::Bytes(b"replication:a"));
    let f = fields_of(&request(0x51, &[0, 0, 0, 1], 1)).unwrap();
    assert_eq!(get(&f, "takeover"), &Field::Bool(true));
    let f = fields_of(&request(0x5d, &[0, 0, 1, 0], 1)).unwrap();
    assert_eq!(get(&f, "bytes"), &Field::Int(256));
    let b = bytes(&frame(Magic::Req, 0x5e, b"", b"enable_noop", b"true"));
    let f = fields_of(&b).unwrap();
    assert_eq!(get(&f, "name"), &Field::Bytes(b"enable_noop"));
    assert_eq!(get(&f, "value"), &Field::Bytes(b"true"));
}

#[test]
fn sync_write_and_seqno_fields() {
    let prep = be(&[
        &1u64.to_be_bytes(),
        &2u64.to_be_bytes(),
        &3u32.to_be_bytes(),
        &4u32.to_be_bytes(),
        &5u32.to_be_bytes(),
        &[6, 1, 2],
    ]);
    let f = fields_of(&request(0x60, &prep, 1)).unwrap();
    assert_eq!(get(&f, "deleted"), &Field::Bool(true));
    assert_eq!(get(&f, "durability_level"), &Field::Int(2));
    let two = be(&[&7u64.to_be_bytes(), &8u64.to_be_bytes()]);
    let f = fields_of(&request(0x62, &two, 1)).unwrap();
    assert_eq!(get(&f, "commit_seqno"), &Field::Int(8));
    let f = fields_of(&request(0x63, &two, 1)).unwrap();
    assert_eq!(get(&f, "abort_seqno"), &Field::Int(8));
    let f = fields_of(&request(0x61, &7u64.to_be_bytes(), 1)).unwrap();
    assert_eq!(get(&f, "prepared_seqno"), &Field::Int(7));
    let f = fields_of(&request(0x64, &7u64.to_be_bytes(), 1)).unwrap();
    assert_eq!(get(&f, "by_seqno"), &Field::Int(7));
    let ev = be(&[&7u64.to_be_bytes(), &1u32.to_be_bytes(), &[2]]);
    let f = fields_of(&request(0x5f, &ev, 1)).unwrap();
    assert_eq!(get(&f, "event"), &Field::Int(1));
}

#[test]
fn stream_request_responses_carry_a_failover_log_or_a_rollback_seqno() {
    let log = be(&[
        &1u64.to_be_bytes(),
        &2u64.to_be_bytes(),
        &3u64.to_be_bytes(),
        &4u64.to_be_bytes(),
    ]);
    let mut f = frame(Magic::Res, 0x53, b"", b"", &log);
    let b = bytes(&f);
    assert_eq!(
        fields_of(&b).unwrap(),
        vec![("failover_log", Field::FailoverLog(vec![(1, 2), (3, 4)]))]
    );
    f.value = &log[..15];
    assert_eq!(
        fields_of(&bytes(&f)),
        Err(Error::BadValue {
            opcode: 0x53,
            len: 15
        })
    );
    let seq = 77u64.to_be_bytes();
    let mut f = frame(Magic::Res, 0x53, b"", b"", &seq);
    f.vbucket_or_status = 0x23;
    assert_eq!(
        fields_of(&bytes(&f)).unwrap(),
        vec![("rollback_seqno", Field::Int(77))]
    );
    let b = response(0x53, 0x07, 1);
    assert_eq!(fields_of(&b).unwrap(), vec![]);
    let b = bytes(&frame(Magic::Res, 0x51, &[0, 0, 0, 9], b"", b""));
    assert_eq!(
        fields_of(&b).unwrap(),
        vec![("stream_opaque", Field::Int(9))]
    );
}

#[test]
fn non_dcp_frames_have_no_fields() {
    let b = bytes(&frame(Magic::Req, 0x1f, b"", b"agent", b""));
    assert_eq!(fields_of(&b).unwrap(), vec![]);
}

#[test]
fn a_failover_log_longer_than_the_cap_is_a_named_error() {
    use mcbp::dcp::MAX_FAILOVER_LOG_ENTRIES;
    // exactly the cap decodes; one entry more is refused, for both answers that carry a log
    let at_cap = vec![0u8; 16 * MAX_FAILOVER_LOG_ENTRIES];
    let f = frame(Magic::Res, 0x53, b"", b"", &at_cap);
    match &fields_of(&bytes(&f)).unwrap()[..] {
        [("failover_log", Field::FailoverLog(log))] => {
            assert_eq!(log.len(), MAX_FAILOVER_LOG_ENTRIES)
        }
        other => panic!("{other:?}"),
    }
    let over = vec![0u8; 16 * (MAX_FAILOVER_LOG_ENTRIES + 1)];
    for opcode in [0x53, 0x54] {
        let f = frame(Magic::Res, opcode, b"", b"", &over);
        assert_eq!(
            fields_of(&bytes(&f)),
            Err(Error::FailoverLogTooLong {
                opcode,
                entries: MAX_FAILOVER_LOG_ENTRIES as u64 + 1,
                max: MAX_FAILOVER_LOG_ENTRIES as u64,
            })
        );
    }
    // a 30 MiB log: refused by its size, before a list is built
    let huge = vec![0u8; 30 << 20];
    let f = frame(Magic::Res, 0x54, b"", b"", &huge);
    assert!(matches!(
        fields_of(&bytes(&f)),
        Err(Error::FailoverLogTooLong { entries, .. }) if entries == (30 << 20) / 16
    ));
}
