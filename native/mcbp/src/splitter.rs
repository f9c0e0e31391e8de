//! The cut-through splitter: turns socket chunks into (a) byte ranges to forward to the partner
//! socket and (b) events for the frames the connection must act on.
//!
//! Each frame's 24-byte header alone decides its fate, so a forwarded frame is passed on piece by
//! piece as its bytes arrive, never gathered. Between calls the splitter holds at most one partial
//! header or one reported (small) frame, and the work per call is proportional to the number of
//! frames, not bytes.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::error::Error;
use crate::frame::{decode, Decoded, Frame};
use crate::header::{Header, Magic, HEADER_LEN};
use crate::names::{
    StreamEndReason, VbState, DCP_ADD_STREAM, DCP_CLOSE_STREAM, DCP_SET_VBUCKET_STATE,
    DCP_STREAM_END, DCP_STREAM_REQ,
};

/// Which memcached the bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The consumer memcached (the proxy's DCP consumer connection).
    Consumer,
    /// The producer memcached.
    Producer,
}

/// What happens to a frame, decided from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Passed to the partner socket, not reported.
    Forward,
    /// Reported as an event and not forwarded (it answers the proxy itself).
    Report,
    /// Passed on and also reported.
    ForwardAndReport,
}

// Magic classes index the policy tables; server-initiated frames have opcodes of their own
// namespace and are always forwarded.
const CLIENT_REQ: usize = 0;
const CLIENT_RES: usize = 1;
const SERVER: usize = 2;
const INVALID: u8 = 0xff;
const FLEXIBLE: u8 = 0x10;

const fn magic_table() -> [u8; 256] {
    let mut t = [INVALID; 256];
    t[0x80] = CLIENT_REQ as u8;
    t[0x81] = CLIENT_RES as u8;
    t[0x08] = CLIENT_REQ as u8 | FLEXIBLE;
    t[0x18] = CLIENT_RES as u8 | FLEXIBLE;
    t[0x82] = SERVER as u8;
    t[0x83] = SERVER as u8;
    t
}

static MAGIC_INFO: [u8; 256] = magic_table();

type Policy = [[Fate; 256]; 3];

const fn policy(side: Side) -> Policy {
    let mut t = [[Fate::Forward; 256]; 3];
    match side {
        Side::Producer => {
            t[CLIENT_REQ][DCP_STREAM_END as usize] = Fate::ForwardAndReport;
            t[CLIENT_REQ][DCP_SET_VBUCKET_STATE as usize] = Fate::ForwardAndReport;
            // Answers the proxy's own close on the producer.
            t[CLIENT_RES][DCP_CLOSE_STREAM as usize] = Fate::Report;
        }
        Side::Consumer => {
            // Answers to the proxy's own add/close.
            t[CLIENT_RES][DCP_ADD_STREAM as usize] = Fate::Report;
            t[CLIENT_RES][DCP_CLOSE_STREAM as usize] = Fate::Report;
            // Takeover bookkeeping needs to see these on their way.
            t[CLIENT_REQ][DCP_STREAM_REQ as usize] = Fate::ForwardAndReport;
            t[CLIENT_RES][DCP_SET_VBUCKET_STATE as usize] = Fate::ForwardAndReport;
        }
    }
    t
}

static PRODUCER_POLICY: Policy = policy(Side::Producer);
static CONSUMER_POLICY: Policy = policy(Side::Consumer);

/// The fate of a frame with this magic byte and opcode on this side (`None`: bad magic).
pub fn fate(side: Side, magic: u8, opcode: u8) -> Option<Fate> {
    let info = MAGIC_INFO[magic as usize];
    if info == INVALID {
        return None;
    }
    let table = match side {
        Side::Producer => &PRODUCER_POLICY,
        Side::Consumer => &CONSUMER_POLICY,
    };
    Some(table[(info & 0x3) as usize][opcode as usize])
}

/// One piece of the bytes to forward, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A range of the chunk passed to `feed`.
    Chunk(Range<usize>),
    /// Header bytes held from an earlier chunk, whose frame turned out to be forwarded.
    Held(Bytes),
}

/// A reported frame, decoded once, here: every frame a side policy reports is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// DCP_STREAM_END (producer). Its opaque is the consumer's own stream opaque (MB-53445).
    StreamEnd {
        vbucket: u16,
        opaque: u32,
        reason: StreamEndReason,
    },
    /// The answer to an ADD_STREAM (consumer); on success the extras carry the consumer's own
    /// stream opaque.
    AddStreamResponse {
        opaque: u32,
        status: u16,
        stream_opaque: Option<u32>,
    },
    /// The answer to a CLOSE_STREAM (either side).
    CloseStreamResponse { opaque: u32, status: u16 },
    /// The consumer's DCP_STREAM_REQ (the takeover learns its opaque).
    StreamReq { vbucket: u16, opaque: u32 },
    /// The producer's DCP_SET_VBUCKET_STATE request.
    SetVbucketState {
        vbucket: u16,
        opaque: u32,
        state: VbState,
    },
    /// The consumer's answer to a DCP_SET_VBUCKET_STATE.
    SetVbucketStateResponse { opaque: u32, status: u16 },
}

/// What one `feed` call produced. Reuse it across calls (`clear` keeps the capacity).
#[derive(Debug, Default, Clone)]
pub struct FeedOutput {
    pub forward: Vec<Piece>,
    pub events: Vec<Event>,
    /// Budget units spent: one per frame, `REPORTED_FRAME_COST` per reported frame.
    pub work: usize,
}

/// A reported frame costs the caller a term to build: measured through the NIF (when most were
/// frame maps; the typed event tuples cost less), about 0.7 us against about 4 ns for a forwarded
/// frame, so it weighs this much in the budget.
pub const REPORTED_FRAME_COST: usize = 128;

/// The largest frame the splitter reports (header included). Reported frames are gathered and
/// copied into an event, so they are capped far below `max_frame_size`: stream ends, add and close
/// answers and set-vbucket-state frames are tens of bytes, a stream request with a collections
/// filter a few KiB.
pub const MAX_REPORTED_FRAME: u64 = 64 * 1024;

fn cost(fate: Fate) -> usize {
    match fate {
        Fate::Forward => 1,
        Fate::Report | Fate::ForwardAndReport => REPORTED_FRAME_COST,
    }
}

impl FeedOutput {
    pub fn clear(&mut self) {
        self.forward.clear();
        self.events.clear();
        self.work = 0;
    }

    /// The forwarded bytes, materialised (for tests and tools; the NIF makes sub-binaries).
    pub fn forward_bytes(&self, chunk: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in &self.forward {
            match p {
                Piece::Chunk(r) => v.extend_from_slice(&chunk[r.clone()]),
                Piece::Held(b) => v.extend_from_slice(b),
            }
        }
        v
    }

    fn push_range(&mut self, start: usize, end: usize) {
        if start == end {
            return;
        }
        if let Some(Piece::Chunk(r)) = self.forward.last_mut() {
            if r.end == start {
                r.end = end;
                return;
            }
        }
        self.forward.push(Piece::Chunk(start..end));
    }
}

/// How a `feed` call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedStatus {
    /// The whole chunk was consumed.
    Done,
    /// The frame budget was spent; call again with `from` = this offset.
    Stopped(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a frame boundary; `held` may hold the first bytes (< 24) of the next header.
    Boundary,
    /// Passing the rest of a forwarded frame through.
    Passing { remaining: u64 },
    /// Gathering a reported frame into `held`; `forward`: also pass its bytes on.
    Gathering { remaining: usize, forward: bool },
}

/// Counters, as returned by `Splitter::stats`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    pub frames: u64,
    pub bytes: u64,
    pub forwarded_frames: u64,
    /// Reported and not forwarded.
    pub blocked_frames: u64,
    pub reported_frames: u64,
    pub largest_frame: u64,
    pub held_bytes: u64,
    /// Bytes of the frame being forwarded that have not arrived yet; 0 at a frame boundary (also
    /// while only part of the next header is held: nothing of that frame was forwarded yet). A
    /// proxy writes frames of its own into the partner socket only at a boundary.
    pub forward_remaining: u64,
    /// (opcode, frames, bytes) for every opcode seen, ascending.
    pub by_opcode: Vec<(u8, u64, u64)>,
}

pub struct Splitter {
    max_frame_size: u64,
    policy: &'static Policy,
    state: State,
    held: BytesMut,
    failed: Option<Error>,
    frames_by_opcode: [u64; 256],
    bytes_by_opcode: [u64; 256],
    forwarded_frames: u64,
    blocked_frames: u64,
    reported_frames: u64,
    largest_frame: u64,
}

impl Splitter {
    pub fn new(side: Side, max_frame_size: u64) -> Splitter {
        Splitter {
            max_frame_size,
            policy: match side {
                Side::Producer => &PRODUCER_POLICY,
                Side::Consumer => &CONSUMER_POLICY,
            },
            state: State::Boundary,
            held: BytesMut::new(),
            failed: None,
            frames_by_opcode: [0; 256],
            bytes_by_opcode: [0; 256],
            forwarded_frames: 0,
            blocked_frames: 0,
            reported_frames: 0,
            largest_frame: 0,
        }
    }

    /// Bytes held for an incomplete header or reported frame.
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// Feeds `chunk[from..]` until `budget` units of work are spent (at least one frame is always
    /// started), appending to `out`.
    /// After an error the splitter stays failed: every later call returns the same error.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        from: usize,
        budget: usize,
        out: &mut FeedOutput,
    ) -> Result<FeedStatus, Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let from = from.min(chunk.len());
        let budget = budget.max(1);
        let mut left = budget;
        let result = self.feed_inner(chunk, from, &mut left, out);
        out.work += budget - left;
        result.inspect_err(|e| {
            self.failed = Some(e.clone());
            self.held = BytesMut::new();
            self.state = State::Boundary;
        })
    }

    /// Feeds a whole chunk with no budget.
    pub fn feed_all(&mut self, chunk: &[u8], out: &mut FeedOutput) -> Result<(), Error> {
        self.feed(chunk, 0, usize::MAX, out).map(|_| ())
    }

    fn feed_inner(
        &mut self,
        chunk: &[u8],
        mut pos: usize,
        left: &mut usize,
        out: &mut FeedOutput,
    ) -> Result<FeedStatus, Error> {
        let len = chunk.len();
        // Finish what an earlier chunk left in progress.
        loop {
            match self.state {
                State::Passing { remaining } => {
                    let n = remaining.min((len - pos) as u64) as usize;
                    out.push_range(pos, pos + n);
                    pos += n;
                    if remaining == n as u64 {
                        self.state = State::Boundary;
                    } else {
                        self.state = State::Passing {
                            remaining: remaining - n as u64,
                        };
                        return Ok(FeedStatus::Done);
                    }
                }
                State::Gathering { remaining, forward } => {
                    let n = remaining.min(len - pos);
                    self.held.extend_from_slice(&chunk[pos..pos + n]);
                    if forward {
                        out.push_range(pos, pos + n);
                    }
                    pos += n;
                    if remaining > n {
                        self.state = State::Gathering {
                            remaining: remaining - n,
                            forward,
                        };
                        return Ok(FeedStatus::Done);
                    }
                    self.state = State::Boundary;
                    let event = reported_event(&self.held)?;
                    self.held = BytesMut::new();
                    out.events.push(event);
                }
                State::Boundary if !self.held.is_empty() => {
                    let n = (HEADER_LEN - self.held.len()).min(len - pos);
                    self.held.extend_from_slice(&chunk[pos..pos + n]);
                    pos += n;
                    let Some(&h) = self.held.first_chunk::<HEADER_LEN>() else {
                        return Ok(FeedStatus::Done);
                    };
                    let (frame_len, fate) = self.begin_frame(&h)?;
                    *left = left.saturating_sub(cost(fate));
                    let body = frame_len - HEADER_LEN as u64;
                    match fate {
                        Fate::Forward => {
                            out.forward.push(Piece::Held(self.held.split().freeze()));
                            self.held = BytesMut::new();
                            self.state = State::Passing { remaining: body };
                        }
                        Fate::ForwardAndReport | Fate::Report => {
                            let forward = fate == Fate::ForwardAndReport;
                            if forward {
                                out.forward
                                    .push(Piece::Held(Bytes::copy_from_slice(&self.held)));
                            }
                            // body <= max_frame_size, which fits usize.
                            self.held.reserve(body as usize);
                            self.state = State::Gathering {
                                remaining: body as usize,
                                forward,
                            };
                        }
                    }
                }
                State::Boundary => break,
            }
        }

        loop {
            // The hot loop: whole headers inside the chunk, consecutive forwarded frames forming
            // one run (one range, so one sub-binary).
            let run_start = pos;
            let policy = self.policy;
            let max = self.max_frame_size;
            let mut largest = self.largest_frame;
            let mut forwarded = 0u64;
            // The counters of the current run of one opcode stay in registers: the per-opcode
            // arrays are written when the opcode changes and when the loop ends.
            let mut run_op = 0usize;
            let mut run_frames = 0u64;
            let mut run_bytes = 0u64;
            let exit = loop {
                let Some(h) = chunk
                    .get(pos..pos + HEADER_LEN)
                    .and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok())
                else {
                    break Exit::Tail;
                };
                if *left == 0 {
                    break Exit::Budget;
                }
                let info = MAGIC_INFO[h[0] as usize];
                let body = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
                let parts = if info & FLEXIBLE != 0 {
                    h[2] as u32 + h[3] as u32
                } else {
                    u16::from_be_bytes([h[2], h[3]]) as u32
                } + h[4] as u32;
                let frame_len = HEADER_LEN as u64 + body as u64;
                // One branch for every header error; the cold path finds out which.
                if info == INVALID || frame_len > max || parts > body {
                    break Exit::Error(header_error(h, max));
                }
                let opcode = h[1] as usize;
                if opcode != run_op {
                    self.frames_by_opcode[run_op] += run_frames;
                    self.bytes_by_opcode[run_op] += run_bytes;
                    run_op = opcode;
                    run_frames = 0;
                    run_bytes = 0;
                }
                run_frames += 1;
                run_bytes += frame_len;
                largest = largest.max(frame_len);
                let fate = policy[(info & 0x3) as usize][opcode];
                let avail = (len - pos) as u64;
                if fate == Fate::Forward {
                    *left -= 1;
                    forwarded += 1;
                    if frame_len <= avail {
                        pos += frame_len as usize;
                        prefetch_ahead(chunk, pos, frame_len as usize);
                        continue;
                    }
                    break Exit::Straddle(frame_len - avail);
                }
                if frame_len > MAX_REPORTED_FRAME {
                    break Exit::Error(Error::ReportedFrameTooLarge {
                        opcode: h[1],
                        len: frame_len,
                        max: MAX_REPORTED_FRAME,
                    });
                }
                *left = left.saturating_sub(REPORTED_FRAME_COST);
                break Exit::Reported(frame_len, fate);
            };
            self.frames_by_opcode[run_op] += run_frames;
            self.bytes_by_opcode[run_op] += run_bytes;
            self.largest_frame = largest;
            self.forwarded_frames += forwarded;
            match exit {
                Exit::Tail => {
                    out.push_range(run_start, pos);
                    break;
                }
                Exit::Budget => {
                    out.push_range(run_start, pos);
                    return Ok(FeedStatus::Stopped(pos));
                }
                Exit::Error(e) => return Err(e),
                Exit::Straddle(remaining) => {
                    out.push_range(run_start, len);
                    self.state = State::Passing { remaining };
                    return Ok(FeedStatus::Done);
                }
                Exit::Reported(frame_len, fate) => {
                    self.count_reported(fate);
                    let forward = fate == Fate::ForwardAndReport;
                    let avail = (len - pos) as u64;
                    if frame_len <= avail {
                        let end = pos + frame_len as usize;
                        out.push_range(run_start, if forward { end } else { pos });
                        out.events.push(reported_event(&chunk[pos..end])?);
                        pos = end;
                        continue;
                    }
                    out.push_range(run_start, if forward { len } else { pos });
                    self.held.reserve(frame_len as usize);
                    self.held.extend_from_slice(&chunk[pos..]);
                    self.state = State::Gathering {
                        remaining: (frame_len - avail) as usize,
                        forward,
                    };
                    return Ok(FeedStatus::Done);
                }
            }
        }
        // Less than a header left: hold it until the header is whole (it decides the fate). A bad
        // magic is refused at once rather than after more bytes.
        if pos < len {
            if MAGIC_INFO[chunk[pos] as usize] == INVALID {
                return Err(Error::BadMagic(chunk[pos]));
            }
            self.held.extend_from_slice(&chunk[pos..]);
        }
        Ok(FeedStatus::Done)
    }

    fn count_reported(&mut self, fate: Fate) {
        self.reported_frames += 1;
        match fate {
            Fate::ForwardAndReport => self.forwarded_frames += 1,
            Fate::Report => self.blocked_frames += 1,
            Fate::Forward => {}
        }
    }

    /// Validates a header held across chunks, counts its frame and decides its fate.
    fn begin_frame(&mut self, h: &[u8; HEADER_LEN]) -> Result<(u64, Fate), Error> {
        let header = Header::parse(h, self.max_frame_size)?;
        let frame_len = header.frame_len();
        let opcode = h[1] as usize;
        let fate = self.policy[(MAGIC_INFO[h[0] as usize] & 0x3) as usize][opcode];
        if fate != Fate::Forward && frame_len > MAX_REPORTED_FRAME {
            return Err(Error::ReportedFrameTooLarge {
                opcode: h[1],
                len: frame_len,
                max: MAX_REPORTED_FRAME,
            });
        }
        self.frames_by_opcode[opcode] += 1;
        self.bytes_by_opcode[opcode] += frame_len;
        self.largest_frame = self.largest_frame.max(frame_len);
        match fate {
            Fate::Forward => self.forwarded_frames += 1,
            _ => self.count_reported(fate),
        }
        Ok((frame_len, fate))
    }

    pub fn stats(&self) -> Stats {
        let by_opcode: Vec<(u8, u64, u64)> = (0..256)
            .filter(|&op| self.frames_by_opcode[op] > 0)
            .map(|op| {
                (
                    op as u8,
                    self.frames_by_opcode[op],
                    self.bytes_by_opcode[op],
                )
            })
            .collect();
        Stats {
            frames: by_opcode.iter().map(|o| o.1).sum(),
            bytes: by_opcode.iter().map(|o| o.2).sum(),
            forwarded_frames: self.forwarded_frames,
            blocked_frames: self.blocked_frames,
            reported_frames: self.reported_frames,
            largest_frame: self.largest_frame,
            held_bytes: self.held.len() as u64,
            forward_remaining: self.forward_remaining(),
            by_opcode,
        }
    }

    /// See [`Stats::forward_remaining`]; O(1), for the hot path.
    pub fn forward_remaining(&self) -> u64 {
        match self.state {
            State::Passing { remaining } => remaining,
            State::Gathering {
                remaining,
                forward: true,
            } => remaining as u64,
            _ => 0,
        }
    }
}

/// Headers are a dependent chain (each one's length gives the next one's place), so a stream
/// larger than the cache stalls on every header. Guess that the next frames are like this one
/// and ask for the header a few frames ahead.
#[inline(always)]
fn prefetch_ahead(chunk: &[u8], pos: usize, frame_len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let ahead = pos.saturating_add(frame_len.saturating_mul(8));
        if ahead < chunk.len() {
            // SAFETY: the address is inside `chunk`; a prefetch neither reads into the program
            // nor faults.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(chunk.as_ptr().add(ahead) as *const i8);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (chunk, pos, frame_len);
}

/// Why the hot loop stopped.
enum Exit {
    /// Less than a header left.
    Tail,
    /// Budget spent at a frame boundary.
    Budget,
    Error(Error),
    /// A forwarded frame runs past the chunk by this many bytes.
    Straddle(u64),
    /// A frame to report (length, fate).
    Reported(u64, Fate),
}

/// The error of a header the hot loop refused (cold path).
#[cold]
fn header_error(h: &[u8; HEADER_LEN], max: u64) -> Error {
    match Header::parse(h, max) {
        Err(e) => e,
        Ok(_) => unreachable!("header_error called on a valid header"),
    }
}

/// A whole reported frame becomes its event; it is fully validated here (framing extras, the
/// fixed extras of a stream end and a set-vbucket-state) since the connection acts on it.
fn reported_event(bytes: &[u8]) -> Result<Event, Error> {
    let frame = match decode(bytes, u64::MAX)? {
        Decoded::Frame(f, _) => f,
        // The splitter only calls this with a whole frame.
        Decoded::More(n) => unreachable!("reported frame short by {n} bytes"),
    };
    match event(&frame)? {
        Some(e) => Ok(e),
        // The side policies report exactly the frames `event` decodes.
        None => unreachable!("reported a frame that has no event"),
    }
}

/// The event of a decoded frame, `None` for a frame no side policy reports (the splitter's
/// decoding, for a caller holding whole frames).
pub fn event(f: &Frame<'_>) -> Result<Option<Event>, Error> {
    let opaque = f.opaque;
    let vbucket = f.vbucket_or_status;
    let status = f.vbucket_or_status;
    let event = if f.magic.is_response() {
        match f.opcode {
            DCP_ADD_STREAM => Event::AddStreamResponse {
                opaque,
                status,
                stream_opaque: <[u8; 4]>::try_from(f.extras).ok().map(u32::from_be_bytes),
            },
            DCP_CLOSE_STREAM => Event::CloseStreamResponse { opaque, status },
            DCP_SET_VBUCKET_STATE => Event::SetVbucketStateResponse { opaque, status },
            _ => return Ok(None),
        }
    } else if matches!(f.magic, Magic::Req | Magic::AltReq) {
        match f.opcode {
            DCP_STREAM_END => Event::StreamEnd {
                vbucket,
                opaque,
                reason: StreamEndReason(u32::from_be_bytes(fixed_extras(f)?)),
            },
            DCP_STREAM_REQ => Event::StreamReq { vbucket, opaque },
            DCP_SET_VBUCKET_STATE => Event::SetVbucketState {
                vbucket,
                opaque,
                state: VbState(fixed_extras::<1>(f)?[0]),
            },
            _ => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    Ok(Some(event))
}

fn fixed_extras<const N: usize>(f: &Frame<'_>) -> Result<[u8; N], Error> {
    <[u8; N]>::try_from(f.extras).map_err(|_| Error::BadExtras {
        opcode: f.opcode,
        len: f.extras.len(),
    })
}
