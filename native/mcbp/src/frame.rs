//! Whole frames: decode one from a byte slice (parts borrowed from it) and encode one.

use crate::error::{EncodeError, Error};
use crate::header::{Header, Magic, HEADER_LEN};

/// One FrameInfo object of the flexible framing extras.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo<'a> {
    pub id: u16,
    pub data: &'a [u8],
}

/// A frame whose variable parts borrow from the decoded bytes (or from the caller, to encode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub magic: Magic,
    pub opcode: u8,
    pub datatype: u8,
    /// vbucket for requests, status for responses.
    pub vbucket_or_status: u16,
    pub opaque: u32,
    pub cas: u64,
    pub framing_extras: Vec<FrameInfo<'a>>,
    pub extras: &'a [u8],
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// The outcome of decoding the front of a byte string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A frame and the number of bytes it took.
    Frame(Frame<'a>, usize),
    /// Not a whole frame yet: at least this many more bytes are needed.
    More(usize),
}

/// Decodes the frame at the front of `buf`. Header problems (magic, size cap, lengths) are reported
/// as soon as the header is complete, before waiting for the body.
pub fn decode(buf: &[u8], max_frame_size: u64) -> Result<Decoded<'_>, Error> {
    if let Some(&b) = buf.first() {
        if Magic::from_byte(b).is_none() {
            return Err(Error::BadMagic(b));
        }
    }
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(Decoded::More(HEADER_LEN - buf.len()));
    };
    let header = Header::parse(h, max_frame_size)?;
    // frame_len <= max_frame_size, which the caller keeps within usize.
    let len = header.frame_len() as usize;
    if buf.len() < len {
        return Ok(Decoded::More(len - buf.len()));
    }
    let frame = frame_from_parts(&header, &buf[HEADER_LEN..len])?;
    Ok(Decoded::Frame(frame, len))
}

/// Splits a body by a validated header (framing + extras + key <= body).
pub(crate) fn frame_from_parts<'a>(header: &Header, body: &'a [u8]) -> Result<Frame<'a>, Error> {
    let (framing, rest) = body.split_at(header.framing_len as usize);
    let (extras, rest) = rest.split_at(header.extras_len as usize);
    let (key, value) = rest.split_at(header.key_len as usize);
    Ok(Frame {
        magic: header.magic,
        opcode: header.opcode,
        datatype: header.datatype,
        vbucket_or_status: header.vbucket_or_status,
        opaque: header.opaque,
        cas: header.cas,
        framing_extras: parse_frame_infos(framing)?,
        extras,
        key,
        value,
    })
}

/// Parses FrameInfo objects: id in the high nibble, length in the low one, 15 meaning "15 + the
/// next byte" (the id's escape byte comes first, then the length's).
pub fn parse_frame_infos(mut bytes: &[u8]) -> Result<Vec<FrameInfo<'_>>, Error> {
    let total = bytes.len();
    let mut infos = Vec::new();
    while let Some((&first, rest)) = bytes.split_first() {
        let offset = total - bytes.len();
        let overrun = Error::BadFramingExtras { offset };
        let mut rest = rest;
        let mut id = (first >> 4) as u16;
        if id == 15 {
            let (&b, r) = rest.split_first().ok_or(overrun.clone())?;
            id += b as u16;
            rest = r;
        }
        let mut len = (first & 0x0f) as usize;
        if len == 15 {
            let (&b, r) = rest.split_first().ok_or(overrun.clone())?;
            len += b as usize;
            rest = r;
        }
        if rest.len() < len {
            return Err(overrun);
        }
        let (data, r) = rest.split_at(len);
        infos.push(FrameInfo { id, data });
        bytes = r;
    }
    Ok(infos)
}

/// Appends the encoded framing extras to `out`.
pub fn encode_frame_infos(infos: &[FrameInfo<'_>], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    for info in infos {
        let id = info.id;
        let len = info.data.len();
        if id > 15 + 255 {
            return Err(EncodeError::FrameInfoIdTooLarge { id });
        }
        if len > 15 + 255 {
            return Err(EncodeError::FrameInfoTooLong { id, len });
        }
        let id_nibble = id.min(15) as u8;
        let len_nibble = len.min(15) as u8;
        out.push((id_nibble << 4) | len_nibble);
        if id_nibble == 15 {
            out.push((id - 15) as u8);
        }
        if len_nibble == 15 {
            out.push((len - 15) as u8);
        }
        out.extend_from_slice(info.data);
    }
    Ok(())
}

impl Frame<'_> {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_head(out)?;
        out.extend_from_slice(self.value);
        Ok(())
    }

    /// Appends everything but the value (whose length the header counts), so a caller can place
    /// a large value without copying it twice.
    pub fn encode_head(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_head_for(self.value.len() as u64, out)
    }

    /// As `encode_head`, for a value of `value_len` bytes that the caller holds elsewhere (this
    /// frame's own `value` is not looked at): the header, framing extras, extras and key, at most
    /// 24 + 255 + 255 + 65535 bytes, so the cost does not depend on the value's size.
    pub fn encode_head_for(&self, value_len: u64, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let flexible = self.magic.is_flexible();
        let key_max = if flexible {
            u8::MAX as usize
        } else {
            u16::MAX as usize
        };
        if self.key.len() > key_max {
            return Err(EncodeError::KeyTooLong {
                len: self.key.len(),
                max: key_max,
            });
        }
        if self.extras.len() > u8::MAX as usize {
            return Err(EncodeError::ExtrasTooLong {
                len: self.extras.len(),
            });
        }
        if !flexible && !self.framing_extras.is_empty() {
            return Err(EncodeError::FramingExtrasNotAllowed);
        }
        // Each FrameInfo takes at least a byte: more than 255 cannot fit, whatever their size.
        if self.framing_extras.len() > u8::MAX as usize {
            return Err(EncodeError::FramingExtrasTooLong {
                len: self.framing_extras.len(),
            });
        }
        let start = out.len();
        out.resize(start + HEADER_LEN, 0);
        encode_frame_infos(&self.framing_extras, out)?;
        let framing_len = out.len() - start - HEADER_LEN;
        if framing_len > u8::MAX as usize {
            out.truncate(start);
            return Err(EncodeError::FramingExtrasTooLong { len: framing_len });
        }
        let body =
            framing_len as u64 + self.extras.len() as u64 + self.key.len() as u64 + value_len;
        if body > u32::MAX as u64 {
            out.truncate(start);
            return Err(EncodeError::BodyTooLarge { len: body });
        }
        let header = Header {
            magic: self.magic,
            opcode: self.opcode,
            framing_len: framing_len as u8,
            key_len: self.key.len() as u16,
            extras_len: self.extras.len() as u8,
            datatype: self.datatype,
            vbucket_or_status: self.vbucket_or_status,
            body_len: body as u32,
            opaque: self.opaque,
            cas: self.cas,
        };
        let mut h = [0u8; HEADER_LEN];
        header.write(&mut h);
        out[start..start + HEADER_LEN].copy_from_slice(&h);
        out.extend_from_slice(self.extras);
        out.extend_from_slice(self.key);
        Ok(())
    }

    /// Encodes into a fresh vector.
    pub fn to_vec(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out =
            Vec::with_capacity(HEADER_LEN + self.extras.len() + self.key.len() + self.value.len());
        self.encode(&mut out)?;
        Ok(out)
    }

    /// The opcode's name in the namespace of the frame's magic.
    pub fn opcode_name(&self) -> Option<&'static str> {
        crate::names::opcode_name_for(self.magic, self.opcode)
    }
}
