//! The memcached binary protocol and DCP codec, in pure Rust: header and framing-extras decode and
//! encode, validation, DCP extras by name, and the cut-through frame splitter used by the proxy.

pub mod dcp;
pub mod error;
pub mod frame;
pub mod header;
pub mod names;
pub mod splitter;
pub mod term;

pub use dcp::{fields, Field};
pub use error::{EncodeError, Error};
pub use frame::{decode, Decoded, Frame, FrameInfo};
pub use header::{Header, Magic, DEFAULT_MAX_FRAME_SIZE, HEADER_LEN, MAX_FRAME_SIZE_RANGE};
pub use names::{Kind, StreamEndReason, VbState};
pub use splitter::{event, Event, FeedOutput, FeedStatus, Piece, Side, Splitter, Stats};
pub use term::{Sink, ToTerm, Value};
