//! Decode-side errors: every one names what was wrong so the connection can log it and close.

use std::fmt;

/// A protocol violation found in bytes read from a peer. After one of these the stream cannot be
/// resynchronised: the connection must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The first byte of a frame is not one of the six magics.
    BadMagic(u8),
    /// The header claims a frame (24-byte header + body) larger than the configured cap.
    FrameTooLarge { len: u64, max: u64 },
    /// A frame the splitter reports (stream ends, stream requests, vbucket states, add and close
    /// answers: all small) larger than `splitter::MAX_REPORTED_FRAME`: a protocol violation, not
    /// megabytes to gather and copy.
    ReportedFrameTooLarge { opcode: u8, len: u64, max: u64 },
    /// framing extras + extras + key exceed the body length.
    BadLengths {
        framing: u32,
        extras: u32,
        key: u32,
        body: u32,
    },
    /// A FrameInfo object starting at this offset of the framing extras overruns them.
    BadFramingExtras { offset: usize },
    /// A DCP request whose extras do not have the fixed size its opcode requires.
    BadExtras { opcode: u8, len: usize },
    /// A DCP value whose size does not fit its documented layout (snapshot marker v2, failover log).
    BadValue { opcode: u8, len: usize },
    /// A failover log (STREAM_REQ or GET_FAILOVER_LOG answer) of more entries than
    /// `dcp::MAX_FAILOVER_LOG_ENTRIES`: no kv_engine keeps that many, and decoding it would build
    /// a list that large in one NIF call.
    FailoverLogTooLong { opcode: u8, entries: u64, max: u64 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadMagic(b) => write!(f, "bad magic 0x{b:02x}"),
            Error::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds cap {max}")
            }
            Error::ReportedFrameTooLarge { opcode, len, max } => {
                write!(
                    f,
                    "reported frame 0x{opcode:02x} of {len} bytes exceeds cap {max}"
                )
            }
            Error::BadLengths {
                framing,
                extras,
                key,
                body,
            } => write!(
                f,
                "framing {framing} + extras {extras} + key {key} > body {body}"
            ),
            Error::BadFramingExtras { offset } => {
                write!(f, "framing extras overrun at offset {offset}")
            }
            Error::BadExtras { opcode, len } => {
                write!(f, "opcode 0x{opcode:02x} with {len} bytes of extras")
            }
            Error::BadValue { opcode, len } => {
                write!(f, "opcode 0x{opcode:02x} with a value of {len} bytes")
            }
            Error::FailoverLogTooLong {
                opcode,
                entries,
                max,
            } => write!(
                f,
                "opcode 0x{opcode:02x} answer with a failover log of {entries} entries (cap {max})"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Why a frame description cannot be encoded (a bug in the caller, not in the peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The key does not fit the key-length field of this magic (u16 classic, u8 flexible).
    KeyTooLong { len: usize, max: usize },
    /// Extras longer than 255 bytes.
    ExtrasTooLong { len: usize },
    /// Framing extras on a magic without flexible framing.
    FramingExtrasNotAllowed,
    /// Encoded framing extras longer than 255 bytes.
    FramingExtrasTooLong { len: usize },
    /// A FrameInfo id above 270 (15 + 255) cannot be expressed with the escape nibble.
    FrameInfoIdTooLarge { id: u16 },
    /// A FrameInfo payload above 270 bytes cannot be expressed with the escape nibble.
    FrameInfoTooLong { id: u16, len: usize },
    /// The body does not fit the u32 body-length field.
    BodyTooLarge { len: u64 },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for EncodeError {}
