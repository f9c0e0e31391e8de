//! The per-connection DCP stream-setup state machine (pure Rust, no rustler).
//!
//! One [`Setup`] value per consumer connection. It decides, for every event the connection sees,
//! what the connection process must do: reply to the caller waiting for a setup, nothing, or stop
//! for a protocol violation. It implements the MB-53445 rule that a DCP_STREAM_END failing a stream
//! still being set up is reported in the setup reply instead of leaving the caller waiting forever.
//! It never diverges from the consumer: each request carries an opaque naming it, answers that
//! arrive after their caller was answered still update what it knows (see `machine` for the
//! rules, late successes and takeover included).

mod machine;
pub mod term;
mod vbset;

pub use machine::{OwedInfo, Setup, SetupInfo, TakeoverInfo, MAX_OWED_PER_VBUCKET};

/// Vbuckets are 0..MAX_VBUCKETS.
pub const MAX_VBUCKETS: usize = 1024;

pub use mcbp::{Event, Side, StreamEndReason, VbState};

/// An event for the machine: a frame a splitter reported (tagged with the side it came from), the
/// setup deadline, or the loss of the connection. Everything the machine hears comes through
/// [`Setup::event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    Frame(Side, Event),
    Deadline,
    ConnectionLost,
}

/// What a caller asks for, through [`Setup::request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Replicate exactly these vbuckets.
    Begin(&'a [u16]),
    Takeover(u16),
    MaybeCloseStream(u16),
    Shut,
}

/// A request the connection must send, with the opaque and flags to send it with (the machine
/// matches the answers by that opaque).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    AddStream {
        vbucket: u16,
        opaque: u32,
        flags: u32,
    },
    CloseStream {
        side: Side,
        vbucket: u16,
        opaque: u32,
    },
}

/// Why one vbucket of a setup failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// An add or close was answered with this failure status.
    McbpStatus(u16),
    /// The producer ended the stream while its add was pending.
    StreamEnd(StreamEndReason),
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

/// A kind of request whose answer the machine waits for (and of an answer that matched nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    AddStream,
    CloseStream(Side),
}

/// What the connection process must do after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    NoReply,
    /// An answer to a request no caller waits for any more (late: after the deadline, a shut, a
    /// stream end; or superseded): applied to what the machine knows, counted, nothing to reply.
    Absorbed,
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
    /// A vbucket list with more than MAX_VBUCKETS elements (refused before it is looked at).
    TooManyVbuckets,
    /// A vbucket named twice in one list.
    DuplicateVbucket(u16),
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
