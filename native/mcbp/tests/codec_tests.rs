//! Header, framing extras and whole-frame decode/encode, per magic and per error.

mod common;

use common::*;
use mcbp::{decode, Decoded, EncodeError, Error, Frame, FrameInfo, Magic, DEFAULT_MAX_FRAME_SIZE};

fn decode_whole(bytes: &[u8]) -> Frame<'_> {
    match decode(bytes, DEFAULT_MAX_FRAME_SIZE).expect("valid frame") {
        Decoded::Frame(f, used) => {
            assert_eq!(used, bytes.len());
            f
        }
        Decoded::More(n) => panic!("needs {n} more"),
    }
}

#[test]
fn every_magic_round_trips_with_its_own_header_layout() {
    for magic in Magic::ALL {
        let mut f = frame(magic, 0x57, b"extra", b"the key", b"the value");
        f.datatype = 0x07;
        f.vbucket_or_status = 0x1234;
        f.opaque = 0xdeadbeef;
        f.cas = 0x0102030405060708;
        if magic.is_flexible() {
            f.framing_extras = vec![FrameInfo {
                id: 2,
                data: &[0, 9],
            }];
        }
        let b = bytes(&f);
        assert_eq!(b[0], magic.byte());
        assert_eq!(decode_whole(&b), f, "{magic:?}");
    }
}

#[test]
fn classic_header_fields_are_big_endian_at_their_offsets() {
    let mut f = frame(Magic::Req, 0x1f, b"ab", b"key", b"value");
    f.vbucket_or_status = 0x0203;
    f.opaque = 0x0a0b0c0d;
    let b = bytes(&f);
    assert_eq!(&b[..12], &[0x80, 0x1f, 0, 3, 2, 0, 2, 3, 0, 0, 0, 10]);
    assert_eq!(&b[12..16], &[0x0a, 0x0b, 0x0c, 0x0d]);
    assert_eq!(&b[24..], b"abkeyvalue");
}

#[test]
fn flexible_header_has_framing_length_and_one_byte_key_length() {
    let mut f = frame(Magic::AltRes, 0x53, b"", b"k", b"");
    f.framing_extras = vec![FrameInfo {
        id: 0,
        data: &[0, 1],
    }];
    let b = bytes(&f);
    assert_eq!(&b[..5], &[0x18, 0x53, 3, 1, 0]);
    assert_eq!(&b[24..27], &[0x02, 0, 1]);
}

#[test]
fn frame_info_escape_nibbles_are_used_for_ids_and_lengths_of_15_and_more() {
    let long = [7u8; 20];
    let infos = vec![
        FrameInfo { id: 15, data: &[1] },
        FrameInfo { id: 3, data: &long },
        FrameInfo {
            id: 270,
            data: &long[..15],
        },
    ];
    let mut out = Vec::new();
    mcbp::frame::encode_frame_infos(&infos, &mut out).unwrap();
    assert_eq!(&out[..3], &[0xf1, 0, 1]);
    assert_eq!(&out[3..5], &[0x3f, 5]);
    assert_eq!(&out[25..28], &[0xff, 255, 0]);
    assert_eq!(mcbp::frame::parse_frame_infos(&out).unwrap(), infos);
}

#[test]
fn frame_info_beyond_the_escape_range_cannot_be_encoded() {
    let mut out = Vec::new();
    let too_long = [0u8; 271];
    assert_eq!(
        mcbp::frame::encode_frame_infos(&[FrameInfo { id: 271, data: &[] }], &mut out),
        Err(EncodeError::FrameInfoIdTooLarge { id: 271 })
    );
    assert_eq!(
        mcbp::frame::encode_frame_infos(
            &[FrameInfo {
                id: 1,
                data: &too_long
            }],
            &mut out
        ),
        Err(EncodeError::FrameInfoTooLong { id: 1, len: 271 })
    );
}

#[test]
fn short_input_asks_for_the_missing_bytes() {
    let b = mutation(1, 1, 10);
    assert_eq!(decode(&[], DEFAULT_MAX_FRAME_SIZE), Ok(Decoded::More(24)));
    assert_eq!(
        decode(&b[..5], DEFAULT_MAX_FRAME_SIZE),
        Ok(Decoded::More(19))
    );
    assert_eq!(
        decode(&b[..30], DEFAULT_MAX_FRAME_SIZE),
        Ok(Decoded::More(b.len() - 30))
    );
}

#[test]
fn decode_leaves_the_next_frame_in_place() {
    let mut b = mutation(1, 1, 10);
    let first = b.len();
    b.extend_from_slice(&stream_end(1, 2, 0));
    match decode(&b, DEFAULT_MAX_FRAME_SIZE).unwrap() {
        Decoded::Frame(f, used) => {
            assert_eq!(used, first);
            assert_eq!(f.opcode, 0x57);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unknown_magic_is_refused_from_the_first_byte() {
    assert_eq!(
        decode(&[0x42], DEFAULT_MAX_FRAME_SIZE),
        Err(Error::BadMagic(0x42))
    );
    let mut b = mutation(1, 1, 1);
    b[0] = 0x00;
    assert_eq!(decode(&b, DEFAULT_MAX_FRAME_SIZE), Err(Error::BadMagic(0)));
}

#[test]
fn an_oversized_frame_is_refused_from_its_header_alone() {
    let mut h = mutation(1, 1, 0);
    h[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        decode(&h[..24], DEFAULT_MAX_FRAME_SIZE),
        Err(Error::FrameTooLarge {
            len: 24 + u32::MAX as u64,
            max: DEFAULT_MAX_FRAME_SIZE
        })
    );
    let b = mutation(1, 1, 100);
    assert_eq!(
        decode(&b, 100),
        Err(Error::FrameTooLarge {
            len: b.len() as u64,
            max: 100
        })
    );
    assert!(decode(&b, b.len() as u64).is_ok());
}

#[test]
fn parts_longer_than_the_body_are_refused() {
    let mut b = mutation(1, 1, 0);
    // extras 31 + key 3 = 34 = body; claim a body of 33.
    b[8..12].copy_from_slice(&33u32.to_be_bytes());
    assert_eq!(
        decode(&b[..24], DEFAULT_MAX_FRAME_SIZE),
        Err(Error::BadLengths {
            framing: 0,
            extras: 31,
            key: 3,
            body: 33
        })
    );
    let mut f = frame(Magic::AltReq, 0x01, b"e", b"k", b"");
    f.framing_extras = vec![FrameInfo { id: 1, data: &[1] }];
    let mut b = bytes(&f);
    b[8..12].copy_from_slice(&3u32.to_be_bytes());
    assert_eq!(
        decode(&b[..24], DEFAULT_MAX_FRAME_SIZE),
        Err(Error::BadLengths {
            framing: 2,
            extras: 1,
            key: 1,
            body: 3
        })
    );
}

#[test]
fn framing_extras_that_overrun_are_refused_with_their_offset() {
    // Two frame infos: a good one (2 bytes), then one claiming 4 bytes of data with 1 left.
    let mut f = frame(Magic::AltReq, 0x01, b"", b"", b"");
    f.framing_extras = vec![
        FrameInfo { id: 0, data: &[9] },
        FrameInfo {
            id: 1,
            data: &[1, 2, 3, 4],
        },
    ];
    let mut b = bytes(&f);
    // Shrink the framing-extras length to cut the second object short.
    b[2] = 4;
    let body = (b.len() - 24 - 3) as u32;
    b[8..12].copy_from_slice(&body.to_be_bytes());
    b.truncate(24 + body as usize);
    assert_eq!(
        decode(&b, DEFAULT_MAX_FRAME_SIZE),
        Err(Error::BadFramingExtras { offset: 2 })
    );
    // An escape nibble whose escape byte is missing.
    let b = [
        0x08, 0x01, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf0,
    ];
    assert_eq!(
        decode(&b, DEFAULT_MAX_FRAME_SIZE),
        Err(Error::BadFramingExtras { offset: 0 })
    );
}

#[test]
fn encode_refuses_what_the_header_cannot_express() {
    let key = vec![0u8; 256];
    assert_eq!(
        frame(Magic::AltReq, 0, b"", &key, b"").to_vec(),
        Err(EncodeError::KeyTooLong { len: 256, max: 255 })
    );
    assert!(frame(Magic::Req, 0, b"", &key, b"").to_vec().is_ok());
    let extras = vec![0u8; 256];
    assert_eq!(
        frame(Magic::Req, 0, &extras, b"", b"").to_vec(),
        Err(EncodeError::ExtrasTooLong { len: 256 })
    );
    let mut f = frame(Magic::Req, 0, b"", b"", b"");
    f.framing_extras = vec![FrameInfo { id: 1, data: &[] }];
    assert_eq!(f.to_vec(), Err(EncodeError::FramingExtrasNotAllowed));
    let data = [0u8; 200];
    let mut f = frame(Magic::AltReq, 0, b"", b"", b"");
    f.framing_extras = vec![
        FrameInfo { id: 1, data: &data },
        FrameInfo { id: 2, data: &data },
    ];
    assert_eq!(
        f.to_vec(),
        Err(EncodeError::FramingExtrasTooLong { len: 404 })
    );
}

#[test]
fn unknown_opcodes_decode_without_a_name() {
    let b = bytes(&frame(Magic::Req, 0xee, b"", b"", b"x"));
    let f = decode_whole(&b);
    assert_eq!(f.opcode, 0xee);
    assert_eq!(f.opcode_name(), None);
}

#[test]
fn a_head_for_a_value_held_elsewhere_is_the_whole_frame_minus_the_value() {
    let value = vec![7u8; 100_000];
    let whole = frame(Magic::Req, 0x57, &[1, 2, 3, 4], b"key", &value)
        .to_vec()
        .unwrap();
    // the frame passed has no value: only its length goes into the header
    let mut head = Vec::new();
    frame(Magic::Req, 0x57, &[1, 2, 3, 4], b"key", b"")
        .encode_head_for(value.len() as u64, &mut head)
        .unwrap();
    assert_eq!(head.len(), 24 + 4 + 3);
    assert_eq!(head.as_slice(), &whole[..head.len()]);
    // a value the u32 body length cannot count is refused, at no cost
    let mut out = Vec::new();
    assert_eq!(
        frame(Magic::Req, 0x57, b"", b"k", b"").encode_head_for(u32::MAX as u64, &mut out),
        Err(EncodeError::BodyTooLarge {
            len: u32::MAX as u64 + 1
        })
    );
    assert!(out.is_empty());
}

#[test]
fn more_frame_infos_than_fit_are_refused_before_any_is_encoded() {
    let mut f = frame(Magic::AltReq, 0, b"", b"", b"");
    f.framing_extras = vec![FrameInfo { id: 1, data: &[] }; 100_000];
    assert_eq!(
        f.to_vec(),
        Err(EncodeError::FramingExtrasTooLong { len: 100_000 })
    );
}
