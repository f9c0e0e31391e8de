//! The 24-byte memcached binary protocol header, for all six magics.

use crate::error::Error;

pub const HEADER_LEN: usize = 24;
/// memcached's default `max_packet_size`: a peer claiming more is disconnected.
pub const DEFAULT_MAX_FRAME_SIZE: u64 = 30 * 1024 * 1024;

/// The max frame sizes a splitter takes: a whole header at least, a u32 body at most.
pub const MAX_FRAME_SIZE_RANGE: std::ops::RangeInclusive<u64> =
    HEADER_LEN as u64..=u32::MAX as u64 + HEADER_LEN as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Magic {
    Req,
    Res,
    AltReq,
    AltRes,
    ServerReq,
    ServerRes,
}

impl Magic {
    pub const ALL: [Magic; 6] = [
        Magic::Req,
        Magic::Res,
        Magic::AltReq,
        Magic::AltRes,
        Magic::ServerReq,
        Magic::ServerRes,
    ];

    pub fn from_byte(b: u8) -> Option<Magic> {
        match b {
            0x80 => Some(Magic::Req),
            0x81 => Some(Magic::Res),
            0x08 => Some(Magic::AltReq),
            0x18 => Some(Magic::AltRes),
            0x82 => Some(Magic::ServerReq),
            0x83 => Some(Magic::ServerRes),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Magic::Req => 0x80,
            Magic::Res => 0x81,
            Magic::AltReq => 0x08,
            Magic::AltRes => 0x18,
            Magic::ServerReq => 0x82,
            Magic::ServerRes => 0x83,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Magic::Req => "req",
            Magic::Res => "res",
            Magic::AltReq => "alt_req",
            Magic::AltRes => "alt_res",
            Magic::ServerReq => "server_req",
            Magic::ServerRes => "server_res",
        }
    }

    pub fn from_name(name: &str) -> Option<Magic> {
        Magic::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Responses carry a status in bytes 6-7, requests a vbucket.
    pub fn is_response(self) -> bool {
        matches!(self, Magic::Res | Magic::AltRes | Magic::ServerRes)
    }

    /// The name of bytes 6-7 under this magic, and of the one it excludes: (`status`, `vbucket`)
    /// for a response, the other way round for a request.
    pub fn vbucket_or_status_names(self) -> (&'static str, &'static str) {
        if self.is_response() {
            ("status", "vbucket")
        } else {
            ("vbucket", "status")
        }
    }

    /// Flexible framing: byte 2 is the framing-extras length and byte 3 the (u8) key length.
    pub fn is_flexible(self) -> bool {
        matches!(self, Magic::AltReq | Magic::AltRes)
    }
}

/// A parsed header. Field widths are those of the wire, whatever the magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: Magic,
    pub opcode: u8,
    pub framing_len: u8,
    pub key_len: u16,
    pub extras_len: u8,
    pub datatype: u8,
    /// vbucket for requests, status for responses.
    pub vbucket_or_status: u16,
    pub body_len: u32,
    pub opaque: u32,
    pub cas: u64,
}

impl Header {
    /// Parses and validates a header: magic, frame size cap, and that framing + extras + key fit the
    /// body. Needs no body bytes, so a bad or oversized frame is refused before anything is buffered.
    pub fn parse(h: &[u8; HEADER_LEN], max_frame_size: u64) -> Result<Header, Error> {
        let magic = Magic::from_byte(h[0]).ok_or(Error::BadMagic(h[0]))?;
        let (framing_len, key_len) = if magic.is_flexible() {
            (h[2], h[3] as u16)
        } else {
            (0, u16::from_be_bytes([h[2], h[3]]))
        };
        let header = Header {
            magic,
            opcode: h[1],
            framing_len,
            key_len,
            extras_len: h[4],
            datatype: h[5],
            vbucket_or_status: u16::from_be_bytes([h[6], h[7]]),
            body_len: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            opaque: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
            cas: u64::from_be_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]),
        };
        header.validate(max_frame_size)?;
        Ok(header)
    }

    fn validate(&self, max_frame_size: u64) -> Result<(), Error> {
        let len = self.frame_len();
        if len > max_frame_size {
            return Err(Error::FrameTooLarge {
                len,
                max: max_frame_size,
            });
        }
        let parts = self.framing_len as u32 + self.extras_len as u32 + self.key_len as u32;
        if parts > self.body_len {
            return Err(Error::BadLengths {
                framing: self.framing_len as u32,
                extras: self.extras_len as u32,
                key: self.key_len as u32,
                body: self.body_len,
            });
        }
        Ok(())
    }

    /// Header plus body, in bytes.
    pub fn frame_len(&self) -> u64 {
        HEADER_LEN as u64 + self.body_len as u64
    }

    pub fn value_len(&self) -> u32 {
        self.body_len - self.framing_len as u32 - self.extras_len as u32 - self.key_len as u32
    }

    pub fn write(&self, out: &mut [u8; HEADER_LEN]) {
        out[0] = self.magic.byte();
        out[1] = self.opcode;
        if self.magic.is_flexible() {
            out[2] = self.framing_len;
            out[3] = self.key_len as u8;
        } else {
            out[2..4].copy_from_slice(&self.key_len.to_be_bytes());
        }
        out[4] = self.extras_len;
        out[5] = self.datatype;
        out[6..8].copy_from_slice(&self.vbucket_or_status.to_be_bytes());
        out[8..12].copy_from_slice(&self.body_len.to_be_bytes());
        out[12..16].copy_from_slice(&self.opaque.to_be_bytes());
        out[16..24].copy_from_slice(&self.cas.to_be_bytes());
    }
}
