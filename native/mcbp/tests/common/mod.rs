//! Frame builders shared by the integration tests.
#![allow(dead_code)]

use mcbp::{Frame, FrameInfo, Magic};

pub fn frame<'a>(
    magic: Magic,
    opcode: u8,
    extras: &'a [u8],
    key: &'a [u8],
    value: &'a [u8],
) -> Frame<'a> {
    Frame {
        magic,
        opcode,
        datatype: 0,
        vbucket_or_status: 0,
        opaque: 0,
        cas: 0,
        framing_extras: Vec::<FrameInfo<'a>>::new(),
        extras,
        key,
        value,
    }
}

pub fn bytes(f: &Frame<'_>) -> Vec<u8> {
    f.to_vec().expect("encodable test frame")
}

/// A DCP mutation request of `value_len` value bytes.
pub fn mutation(vbucket: u16, by_seqno: u64, value_len: usize) -> Vec<u8> {
    let mut extras = [0u8; 31];
    extras[..8].copy_from_slice(&by_seqno.to_be_bytes());
    let value = vec![b'v'; value_len];
    let mut f = frame(Magic::Req, 0x57, &extras, b"key", &value);
    f.vbucket_or_status = vbucket;
    bytes(&f)
}

pub fn stream_end(vbucket: u16, opaque: u32, reason: u32) -> Vec<u8> {
    let extras = reason.to_be_bytes();
    let mut f = frame(Magic::Req, 0x55, &extras, b"", b"");
    f.vbucket_or_status = vbucket;
    f.opaque = opaque;
    bytes(&f)
}

pub fn response(opcode: u8, status: u16, opaque: u32) -> Vec<u8> {
    let mut f = frame(Magic::Res, opcode, b"", b"", b"");
    f.vbucket_or_status = status;
    f.opaque = opaque;
    bytes(&f)
}

pub fn request(opcode: u8, extras: &[u8], opaque: u32) -> Vec<u8> {
    let mut f = frame(Magic::Req, opcode, extras, b"", b"");
    f.opaque = opaque;
    bytes(&f)
}
