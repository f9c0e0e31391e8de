//! DCP extras (and the few DCP values with a fixed layout) decoded by name.

use crate::error::Error;
use crate::frame::Frame;
use crate::names::*;

/// One decoded field value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field<'a> {
    Int(u64),
    Bool(bool),
    /// A name from a fixed table (becomes an atom).
    Name(&'static str),
    /// A code outside its table, kept as a number (`{unknown, N}`).
    Unknown(u64),
    Bytes(&'a [u8]),
    /// (vbucket uuid, seqno) pairs, newest first.
    FailoverLog(Vec<(u64, u64)>),
}

pub type Fields<'a> = Vec<(&'static str, Field<'a>)>;

/// A code as its name in `kind`'s table, or kept as a number.
fn named(kind: Kind, code: u64) -> Field<'static> {
    match u32::try_from(code).ok().and_then(|c| name(kind, c)) {
        Some(n) => Field::Name(n),
        None => Field::Unknown(code),
    }
}

/// Reads big-endian integers from a slice whose size the caller has checked.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        let mut a = [0u8; N];
        a.copy_from_slice(head);
        a
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take::<8>())
    }
    fn u32(&mut self) -> u64 {
        u32::from_be_bytes(self.take::<4>()) as u64
    }
    fn u16(&mut self) -> u64 {
        u16::from_be_bytes(self.take::<2>()) as u64
    }
    fn u8(&mut self) -> u64 {
        self.take::<1>()[0] as u64
    }
}

fn expect_extras(frame: &Frame<'_>, sizes: &[usize]) -> Result<(), Error> {
    if sizes.contains(&frame.extras.len()) {
        Ok(())
    } else {
        Err(Error::BadExtras {
            opcode: frame.opcode,
            len: frame.extras.len(),
        })
    }
}

/// The fields of a DCP frame by name. Requests of the DCP opcodes in PROTOCOL.md must have their
/// fixed extras size (`BadExtras` otherwise). Non-DCP frames and DCP responses without a payload of
/// note give an empty list.
pub fn fields<'a>(frame: &Frame<'a>) -> Result<Fields<'a>, Error> {
    if frame.magic.is_response() {
        return response_fields(frame);
    }
    if matches!(
        frame.magic,
        crate::header::Magic::ServerReq | crate::header::Magic::ServerRes
    ) {
        return Ok(Vec::new());
    }
    let mut r = Reader(frame.extras);
    let f = match frame.opcode {
        DCP_OPEN => {
            expect_extras(frame, &[8])?;
            let _reserved = r.u32();
            let flags = r.u32();
            vec![
                ("flags", Field::Int(flags)),
                ("producer", Field::Bool(flags & 0x1 != 0)),
                ("notifier", Field::Bool(flags & 0x2 != 0)),
                ("include_xattrs", Field::Bool(flags & 0x4 != 0)),
                ("include_delete_times", Field::Bool(flags & 0x20 != 0)),
                ("name", Field::Bytes(frame.key)),
            ]
        }
        DCP_ADD_STREAM => {
            expect_extras(frame, &[4])?;
            let flags = r.u32();
            vec![
                ("flags", Field::Int(flags)),
                ("takeover", Field::Bool(flags & 0x1 != 0)),
            ]
        }
        DCP_CLOSE_STREAM | DCP_GET_FAILOVER_LOG | DCP_NOOP => {
            expect_extras(frame, &[0])?;
            Vec::new()
        }
        DCP_STREAM_REQ => {
            expect_extras(frame, &[48])?;
            vec![
                ("flags", Field::Int(r.u32())),
                ("reserved", Field::Int(r.u32())),
                ("start_seqno", Field::Int(r.u64())),
                ("end_seqno", Field::Int(r.u64())),
                ("vbucket_uuid", Field::Int(r.u64())),
                ("snap_start_seqno", Field::Int(r.u64())),
                ("snap_end_seqno", Field::Int(r.u64())),
            ]
        }
        DCP_STREAM_END => {
            expect_extras(frame, &[4])?;
            vec![("reason", named(Kind::StreamEndReason, r.u32()))]
        }
        DCP_SNAPSHOT_MARKER => snapshot_marker(frame)?,
        DCP_MUTATION => {
            expect_extras(frame, &[31])?;
            vec![
                ("by_seqno", Field::Int(r.u64())),
                ("rev_seqno", Field::Int(r.u64())),
                ("flags", Field::Int(r.u32())),
                ("expiration", Field::Int(r.u32())),
                ("lock_time", Field::Int(r.u32())),
                ("nmeta", Field::Int(r.u16())),
                ("nru", Field::Int(r.u8())),
            ]
        }
        DCP_DELETION => {
            expect_extras(frame, &[18, 21])?;
            let mut f = vec![
                ("by_seqno", Field::Int(r.u64())),
                ("rev_seqno", Field::Int(r.u64())),
            ];
            if frame.extras.len() == 18 {
                f.push(("version", Field::Int(1)));
                f.push(("nmeta", Field::Int(r.u16())));
            } else {
                f.push(("version", Field::Int(2)));
                f.push(("delete_time", Field::Int(r.u32())));
            }
            f
        }
        DCP_EXPIRATION => {
            expect_extras(frame, &[20])?;
            vec![
                ("by_seqno", Field::Int(r.u64())),
                ("rev_seqno", Field::Int(r.u64())),
                ("delete_time", Field::Int(r.u32())),
            ]
        }
        DCP_SET_VBUCKET_STATE => {
            expect_extras(frame, &[1])?;
            vec![("state", named(Kind::VbState, r.u8()))]
        }
        DCP_BUFFER_ACKNOWLEDGEMENT => {
            expect_extras(frame, &[4])?;
            vec![("bytes", Field::Int(r.u32()))]
        }
        DCP_CONTROL => vec![
            ("name", Field::Bytes(frame.key)),
            ("value", Field::Bytes(frame.value)),
        ],
        DCP_SYSTEM_EVENT => {
            expect_extras(frame, &[13])?;
            vec![
                ("by_seqno", Field::Int(r.u64())),
                ("event", Field::Int(r.u32())),
                ("version", Field::Int(r.u8())),
            ]
        }
        DCP_PREPARE => {
            expect_extras(frame, &[31])?;
            vec![
                ("by_seqno", Field::Int(r.u64())),
                ("rev_seqno", Field::Int(r.u64())),
                ("flags", Field::Int(r.u32())),
                ("expiration", Field::Int(r.u32())),
                ("lock_time", Field::Int(r.u32())),
                ("nru", Field::Int(r.u8())),
                ("deleted", Field::Bool(r.u8() != 0)),
                ("durability_level", Field::Int(r.u8())),
            ]
        }
        DCP_SEQNO_ACKNOWLEDGED => {
            expect_extras(frame, &[8])?;
            vec![("prepared_seqno", Field::Int(r.u64()))]
        }
        DCP_COMMIT => {
            expect_extras(frame, &[16])?;
            vec![
                ("prepared_seqno", Field::Int(r.u64())),
                ("commit_seqno", Field::Int(r.u64())),
            ]
        }
        DCP_ABORT => {
            expect_extras(frame, &[16])?;
            vec![
                ("prepared_seqno", Field::Int(r.u64())),
                ("abort_seqno", Field::Int(r.u64())),
            ]
        }
        DCP_SEQNO_ADVANCED => {
            expect_extras(frame, &[8])?;
            vec![("by_seqno", Field::Int(r.u64()))]
        }
        DCP_OSO_SNAPSHOT => {
            expect_extras(frame, &[4])?;
            let flags = r.u32();
            vec![
                ("flags", Field::Int(flags)),
                ("start", Field::Bool(flags & 0x1 != 0)),
                ("end", Field::Bool(flags & 0x2 != 0)),
            ]
        }
        _ => Vec::new(),
    };
    Ok(f)
}

fn snapshot_marker<'a>(frame: &Frame<'a>) -> Result<Fields<'a>, Error> {
    expect_extras(frame, &[20, 1])?;
    if frame.extras.len() == 20 {
        let mut r = Reader(frame.extras);
        return Ok(vec![
            ("version", Field::Name("v1")),
            ("start_seqno", Field::Int(r.u64())),
            ("end_seqno", Field::Int(r.u64())),
            ("snapshot_type", Field::Int(r.u32())),
        ]);
    }
    // v2: the version byte says how the value is laid out. kv_engine defines 2.0 (start, end, type,
    // max visible seqno, high completed seqno: exactly 36 bytes, as its validator requires) and 2.2
    // (2.0 + purge seqno + high prepared seqno, 52 bytes, sent only after a DCP_CONTROL
    // snapshot_max_marker_version 2.2, which nothing here negotiates); 2.1 was never used. Any
    // version but 2.0 is given as `{unknown, V}`, undecoded.
    let version = frame.extras[0];
    if version != 0 {
        return Ok(vec![("version", Field::Unknown(version as u64))]);
    }
    if frame.value.len() != 36 {
        return Err(Error::BadValue {
            opcode: frame.opcode,
            len: frame.value.len(),
        });
    }
    let mut r = Reader(frame.value);
    Ok(vec![
        ("version", Field::Name("v2_0")),
        ("start_seqno", Field::Int(r.u64())),
        ("end_seqno", Field::Int(r.u64())),
        ("snapshot_type", Field::Int(r.u32())),
        ("max_visible_seqno", Field::Int(r.u64())),
        ("high_completed_seqno", Field::Int(r.u64())),
    ])
}

/// The most entries a failover log may have to be decoded. kv_engine keeps at most
/// `max_failover_entries` (25 by default); a longer log is a peer's error (or an attack: a 30 MiB
/// value would otherwise become a 2 M-entry list in one NIF call).
pub const MAX_FAILOVER_LOG_ENTRIES: usize = 4096;

fn failover_log(frame: &Frame<'_>) -> Result<Vec<(u64, u64)>, Error> {
    if !frame.value.len().is_multiple_of(16) {
        return Err(Error::BadValue {
            opcode: frame.opcode,
            len: frame.value.len(),
        });
    }
    let entries = frame.value.len() / 16;
    if entries > MAX_FAILOVER_LOG_ENTRIES {
        return Err(Error::FailoverLogTooLong {
            opcode: frame.opcode,
            entries: entries as u64,
            max: MAX_FAILOVER_LOG_ENTRIES as u64,
        });
    }
    let mut r = Reader(frame.value);
    Ok((0..frame.value.len() / 16)
        .map(|_| (r.u64(), r.u64()))
        .collect())
}

fn response_fields<'a>(frame: &Frame<'a>) -> Result<Fields<'a>, Error> {
    let status = frame.vbucket_or_status;
    let f = match frame.opcode {
        // The consumer's own stream opaque, informational.
        DCP_ADD_STREAM if frame.extras.len() == 4 => {
            vec![("stream_opaque", Field::Int(Reader(frame.extras).u32()))]
        }
        DCP_STREAM_REQ if status == STATUS_ROLLBACK => {
            if frame.value.len() != 8 {
                return Err(Error::BadValue {
                    opcode: frame.opcode,
                    len: frame.value.len(),
                });
            }
            vec![("rollback_seqno", Field::Int(Reader(frame.value).u64()))]
        }
        DCP_STREAM_REQ | DCP_GET_FAILOVER_LOG if status == STATUS_SUCCESS => {
            vec![("failover_log", Field::FailoverLog(failover_log(frame)?))]
        }
        _ => Vec::new(),
    };
    Ok(f)
}
