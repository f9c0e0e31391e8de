//! The per-connection DCP stream-setup state machine (pure Rust, no rustler).
//!
//! One [`Setup`] value per consumer connection. It decides, for every event the connection sees,
//! what the connection process must do: reply to the caller waiting for a setup, nothing, or stop
//! for a protocol violation. It implements the MB-53445 rule that a DCP_STREAM_END failing a stream
//! still being set up is reported in the setup reply instead of leaving the caller waiting forever.

mod machine;
mod vbset;

pub use machine::{Setup, SetupInfo, TakeoverInfo};

/// Vbuckets are 0..MAX_VBUCKETS.
pub const MAX_VBUCKETS: usize = 1024;

/// Memcached status codes the machine interprets.
pub const STATUS_SUCCESS: u16 = 0x00;
/// A close-stream answer of key_enoent means the stream was already gone: success.
pub const STATUS_KEY_ENOENT: u16 = 0x01;

/// DCP_STREAM_END reason codes (the u32 in the frame's extras). Any other code is kept as is.
pub mod reason {
    /// Everything asked for was sent: not a failure during setup.
    pub const OK: u32 = 0;
    pub const CLOSED: u32 = 1;
    pub const STATE_CHANGED: u32 = 2;
    pub const DISCONNECTED: u32 = 3;
    pub const TOO_SLOW: u32 = 4;
    pub const BACKFILL_FAIL: u32 = 5;
    pub const ROLLBACK: u32 = 6;
    pub const FILTER_EMPTY: u32 = 7;
    pub const LOST_PRIVILEGES: u32 = 8;
}

/// Which memcached a close-stream request went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Consumer,
    Producer,
}

/// A request the connection must send. ADD_STREAM and CLOSE_STREAM carry opaque = vbucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    AddStream { vbucket: u16, takeover: bool },
    CloseStream { side: Side, vbucket: u16 },
}

/// Why one vbucket of a setup failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// An add or close was answered with this failure status.
    McbpStatus(u16),
    /// The producer ended the stream (reason code) while its add was pending.
    StreamEnd(u32),
    /// The setup deadline fired while this vbucket was pending.
    SetupTimeout,
    /// The connection was lost while this vbucket was pending (the caller supplies the reason term).
    ConnectionLost,
}

/// The answer for the caller waiting on a setup, takeover or shut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok,
    /// Failures in ascending vbucket order; for one vbucket, in the order they happened.
    Errors(Vec<(Why, u16)>),
}

/// Which kind of answer matched nothing outstanding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    AddStream,
    CloseStream(Side),
}

/// What the connection process must do after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    NoReply,
    Reply(Reply),
    /// An answer whose opaque matches nothing outstanding: the peer is not following the protocol.
    UnexpectedResponse {
        response: Response,
        opaque: u32,
    },
}

/// What a request (begin, takeover, maybe-close, shut) starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Send these; the waiting caller's reply comes in a later [`Outcome`].
    Send(Vec<Action>),
    /// Nothing to do: reply `ok` now.
    Settled,
}

/// Why a request was refused (the machine is unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another setup or takeover is in progress.
    Busy,
    /// The connection is shut.
    Shut,
    BadVbucket(u16),
    /// Takeover of a vbucket that already has an active stream is not allowed.
    AlreadyActive,
}

/// Vbucket states in DCP_SET_VBUCKET_STATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VbState {
    Active,
    Replica,
    Pending,
    Dead,
    Other(u8),
}

impl VbState {
    pub fn from_code(code: u8) -> VbState {
        match code {
            1 => VbState::Active,
            2 => VbState::Replica,
            3 => VbState::Pending,
            4 => VbState::Dead,
            n => VbState::Other(n),
        }
    }
}

/// The phase names `setup_info` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    SettingUp,
    Takeover,
    Shut,
}

/// Takeover progress, in the order it happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeoverStage {
    /// ADD_STREAM (takeover) sent; waiting for the consumer's STREAM_REQ.
    Requested,
    /// The consumer's STREAM_REQ was seen: its opaque identifies the set-vbucket-state exchange.
    OpaqueKnown,
    /// The consumer acknowledged the switch to active.
    Active,
}
