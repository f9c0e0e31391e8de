//! The machine itself. Every event costs O(1) (a scan of at most [`MAX_OWED_PER_VBUCKET`]
//! entries of one vbucket) except `begin`/`shut` (one pass over the vbuckets) and the one-off
//! sweeps of `deadline`/`connection_lost`.
//!
//! # What the machine knows of the consumer
//!
//! Every request it sends is an [`Owed`] entry until its answer arrives, whether or not a caller
//! still waits for it. The opaque names that request: a generation in the high 22 bits, the
//! vbucket in the low 10 (`opaque_of`/`vbucket_of`). An answer is matched to its exact request
//! (vbucket, kind and opaque); an answer matching no entry is a protocol violation.
//!
//! The consumer handles our requests in the order they were sent, and the producer's stream ends
//! reach it after everything sent before them. So each request and each stream end gets a
//! sequence number, and an answer changes the active set only if nothing later for that vbucket
//! has been applied (`applied`): an ADD_STREAM success that arrives after the answer to a later
//! CLOSE_STREAM, or after a stream end, opened a stream that no longer exists. Applied answers:
//! add success or `key_eexists` -> active; another add failure -> not active; close success or
//! `key_enoent` -> not active; another close failure -> unchanged. Producer-side closes never
//! change the active set, nor does the add of a takeover while the takeover runs (a completed
//! takeover leaves no replica stream); the late answer of a takeover that already ended is
//! applied like any add's (the consumer holds whatever that add opened).
//!
//! # Late answers (the rule)
//!
//! An answer whose caller was already answered (deadline, shut, stream end) is applied like any
//! other: a late ADD_STREAM success keeps the stream **active** (the consumer holds it, so
//! `get_partitions` lists it), and the retry of the same setup finds it active and succeeds
//! without sending anything. Late answers are counted in `absorbed`.
//!
//! A setup that begins while answers for its vbuckets are owed never sends a second request of a
//! kind whose first is still owed and not superseded: it waits for the owed one (`adopt`). A
//! wanted vbucket whose last owed request is an add waits for that add's answer; an unwanted one
//! whose last owed request is an add is closed (both sides), and the close supersedes the add.
//!
//! A stream end is taken to come after every request sent before the machine saw it. A producer
//! that ended an old stream just after the vbucket was closed and re-added (with
//! `send_stream_end_on_client_close_stream`, which the proxy does not ask for) would make the new
//! add's answer look stale: the vbucket would then be missing from the active set until the next
//! setup re-adds it (key_eexists, which counts as active).
//!
//! One vbucket keeps at most [`MAX_OWED_PER_VBUCKET`] owed entries; past that the oldest no
//! caller waits for is forgotten (only a peer that leaves many requests unanswered gets there;
//! that answer, if it ever comes, then stops the connection as unexpected).
//!
//! # Takeover
//!
//! A takeover of a vbucket with an active (or possibly active) stream first closes it on both
//! sides, in the same step as its ADD_STREAM, so no other request runs in between. A stream end
//! for the takeover vbucket before the consumer acknowledged the switch to active answers the
//! takeover at once with `{stream_end, Reason}`, whatever the reason; after the switch it changes
//! nothing. A completed takeover does not add the vbucket to the active set (the consumer owns
//! the vbucket; there is no replica stream). A shut during a takeover closes the vbucket on the
//! consumer and answers the takeover's caller (and the shut's) with `{stream_end, closed}`.

use mcbp::names::{ADD_STREAM_FLAG_TAKEOVER, STATUS_KEY_ENOENT, STATUS_SUCCESS};

use crate::vbset::VbSet;
use crate::{
    Action, Event, Input, Outcome, Phase, Refusal, Reply, Request, Response, Side, Start,
    StreamEndReason, TakeoverStage, VbState, Why, MAX_VBUCKETS,
};

/// kv_engine's answer to an ADD_STREAM for a vbucket that has a stream.
const STATUS_KEY_EEXISTS: u16 = 0x02;

/// Owed entries kept per vbucket (see the module doc).
pub const MAX_OWED_PER_VBUCKET: usize = 8;

const VB_BITS: u32 = 10;
const VB_MASK: u32 = (1 << VB_BITS) - 1;
const GENERATIONS: u64 = 1 << (32 - VB_BITS);

fn in_range(vb: u16) -> bool {
    usize::from(vb) < MAX_VBUCKETS
}

/// The opaque rule, the one place it is written: the request's generation (its sequence number
/// modulo 2^22) in the high bits, its vbucket in the low 10.
fn opaque_of(vb: u16, seq: u64) -> u32 {
    (((seq % GENERATIONS) as u32) << VB_BITS) | u32::from(vb)
}

fn vbucket_of(opaque: u32) -> u16 {
    (opaque & VB_MASK) as u16
}

/// One request whose answer has not arrived.
#[derive(Clone, Copy, Debug)]
struct Owed {
    opaque: u32,
    kind: Response,
    seq: u64,
    /// The current caller waits for this answer.
    caller: bool,
    takeover: bool,
}

/// The newest request a vbucket's consumer stream still depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Last {
    Add,
    TakeoverAdd,
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    Idle,
    Shut,
}

#[derive(Clone, Copy, Debug)]
struct Takeover {
    vbucket: u16,
    stage: TakeoverStage,
    opaque: u32,
    requested: Option<VbState>,
    add_acked: bool,
    /// The takeover closed an older stream of its vbucket: until the consumer's STREAM_REQ is
    /// seen, a stream end for the vbucket is that stream's.
    closing_old: bool,
    /// The sequence number of the takeover's add.
    add_seq: u64,
}

#[derive(Clone, Copy, Debug)]
enum State {
    Idle,
    SettingUp { next: After },
    Takeover(Takeover),
    Shut,
}

/// A takeover as `info` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakeoverInfo {
    pub vbucket: u16,
    pub stage: TakeoverStage,
    /// The consumer's STREAM_REQ opaque, once seen.
    pub opaque: Option<u32>,
    pub requested_state: Option<VbState>,
    pub add_acked: bool,
}

/// One request whose answer is owed, as `info` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwedInfo {
    pub vbucket: u16,
    pub request: Response,
    pub opaque: u32,
    /// The waiting caller's reply depends on this answer.
    pub for_caller: bool,
}

/// A snapshot of the machine for diagnostics and tests (allocates: not for the hot path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupInfo {
    pub phase: Phase,
    pub active: Vec<u16>,
    /// The vbuckets whose answers of each kind the waiting caller waits for.
    pub pending_adds: Vec<u16>,
    pub pending_closes_consumer: Vec<u16>,
    pub pending_closes_producer: Vec<u16>,
    pub errors: Vec<(Why, u16)>,
    /// The phase entered when the setup completes (`Shut` once a shut was asked for).
    pub next: Option<Phase>,
    pub takeover: Option<TakeoverInfo>,
    /// Every request whose answer is owed, by vbucket then age.
    pub owed: Vec<OwedInfo>,
    /// Answers that arrived for requests no caller waited for any more, for logs and stats.
    pub absorbed: u64,
}

/// The stream-setup bookkeeping of one consumer connection.
#[derive(Clone, Debug)]
pub struct Setup {
    state: State,
    active: VbSet,
    /// What the waiting caller waits for, by kind (each is one `Owed` entry with `caller`).
    pending_adds: VbSet,
    pending_closes_consumer: VbSet,
    pending_closes_producer: VbSet,
    errors: Vec<(Why, u16)>,
    owed: Box<[Vec<Owed>]>,
    /// Per vbucket, the sequence number of the last request answer or stream end applied.
    applied: Box<[u64]>,
    seq: u64,
    absorbed: u64,
}

impl Default for Setup {
    fn default() -> Self {
        Setup::new()
    }
}

impl Setup {
    pub fn new() -> Setup {
        Setup {
            state: State::Idle,
            active: VbSet::new(),
            pending_adds: VbSet::new(),
            pending_closes_consumer: VbSet::new(),
            pending_closes_producer: VbSet::new(),
            errors: Vec::new(),
            owed: vec![Vec::new(); MAX_VBUCKETS].into_boxed_slice(),
            applied: vec![0; MAX_VBUCKETS].into_boxed_slice(),
            seq: 0,
            absorbed: 0,
        }
    }

    /// A caller's request: what to send, `Settled` (reply `ok` now) or a refusal (the machine is
    /// unchanged).
    pub fn request(&mut self, request: Request<'_>) -> Result<Start, Refusal> {
        match request {
            Request::Begin(wanted) => self.begin(wanted),
            Request::Takeover(vb) => self.takeover_begin(vb),
            Request::MaybeCloseStream(vb) => self.maybe_close_stream(vb),
            Request::Shut => self.shut(),
        }
    }

    /// What the connection saw. Frames are matched to the side they came from; a frame no rule
    /// names for that side changes nothing.
    pub fn event(&mut self, input: Input) -> Outcome {
        use Event as E;
        match input {
            Input::Deadline => self.deadline(),
            Input::ConnectionLost => self.connection_lost(),
            Input::Frame(side, event) => match (side, event) {
                (Side::Consumer, E::AddStreamResponse { opaque, status, .. }) => {
                    self.add_stream_response(opaque, status)
                }
                (side, E::CloseStreamResponse { opaque, status }) => {
                    self.close_stream_response(side, opaque, status)
                }
                (
                    Side::Producer,
                    E::StreamEnd {
                        vbucket,
                        opaque,
                        reason,
                    },
                ) => self.stream_end(vbucket, opaque, reason),
                (Side::Consumer, E::StreamReq { vbucket, opaque }) => {
                    self.stream_req(vbucket, opaque)
                }
                (Side::Producer, E::SetVbucketState { opaque, state, .. }) => {
                    self.set_vbucket_state(opaque, state)
                }
                (Side::Consumer, E::SetVbucketStateResponse { opaque, status }) => {
                    self.set_vbucket_state_response(opaque, status)
                }
                _ => Outcome::NoReply,
            },
        }
    }

    // ---- requests ----

    /// Starts a setup towards exactly `wanted` (see the module doc for owed answers).
    /// The list is checked before anything else, in O(MAX_VBUCKETS) at most: its length first,
    /// then each element's range, then duplicates.
    fn begin(&mut self, wanted: &[u16]) -> Result<Start, Refusal> {
        if wanted.len() > MAX_VBUCKETS {
            return Err(Refusal::TooManyVbuckets);
        }
        if let Some(&bad) = wanted.iter().find(|vb| !in_range(**vb)) {
            return Err(Refusal::BadVbucket(bad));
        }
        let mut want = VbSet::new();
        for &vb in wanted {
            if want.contains(vb) {
                return Err(Refusal::DuplicateVbucket(vb));
            }
            want.insert(vb);
        }
        self.refuse_unless_idle()?;
        let mut adds = Vec::new();
        let mut closes = Vec::new();
        for vb in 0..MAX_VBUCKETS as u16 {
            if want.contains(vb) {
                self.plan_add(vb, &mut adds);
            } else {
                self.plan_close(vb, true, &mut closes);
            }
        }
        adds.append(&mut closes);
        Ok(self.enter_setup(adds, After::Idle))
    }

    /// Closes one stream on both sides (a setup towards "active minus `vb`").
    fn maybe_close_stream(&mut self, vb: u16) -> Result<Start, Refusal> {
        self.refuse_unless_idle_for(vb)?;
        let mut actions = Vec::new();
        self.plan_close(vb, true, &mut actions);
        Ok(self.enter_setup(actions, After::Idle))
    }

    /// Shuts the connection: closes on the consumer every stream it holds or may hold; the reply
    /// comes once those closes are answered. Over a setup in progress the setup's caller and the
    /// shut's get one reply: the consumer's answer to a shut's close settles a still-pending add
    /// (`{stream_end, closed}`, or the close's failure status), and producer-side answers stop
    /// mattering once anything else is pending. Over a takeover, see the module doc.
    fn shut(&mut self) -> Result<Start, Refusal> {
        let mut actions = Vec::new();
        match self.state {
            State::Shut => return Ok(Start::Settled),
            State::Idle => {
                for vb in 0..MAX_VBUCKETS as u16 {
                    self.plan_close(vb, false, &mut actions);
                }
                if self.pending_closes_consumer.is_empty() {
                    self.state = State::Shut;
                    return Ok(Start::Settled);
                }
            }
            State::SettingUp { .. } => {
                for vb in 0..MAX_VBUCKETS as u16 {
                    self.plan_close(vb, false, &mut actions);
                    if self.pending_adds.contains(vb) && !self.pending_closes_consumer.contains(vb)
                    {
                        // The add is the last request: its close must come after it.
                        self.send(Side::Consumer, vb, &mut actions);
                    }
                }
                if !self.pending_adds.is_empty() || !self.pending_closes_consumer.is_empty() {
                    for vb in self.pending_closes_producer.iter().collect::<Vec<_>>() {
                        self.release(vb, Response::CloseStream(Side::Producer));
                    }
                    self.pending_closes_producer.clear();
                }
            }
            State::Takeover(t) => {
                self.release(t.vbucket, Response::AddStream);
                self.errors
                    .push((Why::StreamEnd(StreamEndReason::CLOSED), t.vbucket));
                for vb in 0..MAX_VBUCKETS as u16 {
                    self.plan_close(vb, false, &mut actions);
                }
                if !self.pending_closes_consumer.contains(t.vbucket) {
                    self.send(Side::Consumer, t.vbucket, &mut actions);
                }
            }
        }
        self.state = State::SettingUp { next: After::Shut };
        Ok(Start::Send(actions))
    }

    /// Starts a takeover of `vb`: closes a stream it may have (both sides), then the ADD_STREAM
    /// with the takeover flag, all in one step.
    fn takeover_begin(&mut self, vb: u16) -> Result<Start, Refusal> {
        self.refuse_unless_idle_for(vb)?;
        let mut actions = Vec::new();
        self.plan_close(vb, true, &mut actions);
        let closing_old = self.pending_closes_consumer.contains(vb);
        // The closes are part of the takeover's step, not something its caller waits for: their
        // answers update the active set like late answers, and the takeover's add (sent after
        // them) is what the caller's reply depends on.
        self.release(vb, Response::CloseStream(Side::Consumer));
        self.release(vb, Response::CloseStream(Side::Producer));
        self.pending_closes_consumer.clear();
        self.pending_closes_producer.clear();
        let seq = self.owe_add(vb, true, &mut actions);
        self.state = State::Takeover(Takeover {
            vbucket: vb,
            stage: TakeoverStage::Requested,
            opaque: 0,
            requested: None,
            add_acked: false,
            closing_old,
            add_seq: seq,
        });
        Ok(Start::Send(actions))
    }

    /// A wanted vbucket: wait for an owed add, else add it unless it is (and stays) active. An
    /// owed takeover add is no replica stream to wait for: its stream is closed first.
    fn plan_add(&mut self, vb: u16, actions: &mut Vec<Action>) {
        match self.last_consumer_request(vb) {
            Some(Last::Add) => self.adopt(vb, Response::AddStream),
            Some(Last::TakeoverAdd) => {
                self.plan_close(vb, true, actions);
                self.send_add(vb, actions);
            }
            Some(Last::Close) => self.send_add(vb, actions),
            None if !self.active.contains(vb) => self.send_add(vb, actions),
            None => {}
        }
    }

    /// An unwanted vbucket that the consumer holds or may hold: wait for an owed close, else
    /// close it (on the producer too when `both`).
    fn plan_close(&mut self, vb: u16, both: bool, actions: &mut Vec<Action>) {
        let last = self.last_consumer_request(vb);
        let closing = last == Some(Last::Close);
        let may_hold = matches!(last, Some(Last::Add | Last::TakeoverAdd))
            || (last.is_none() && self.active.contains(vb));
        if !closing && !may_hold {
            return;
        }
        if closing {
            self.adopt(vb, Response::CloseStream(Side::Consumer));
        } else {
            self.send(Side::Consumer, vb, actions);
        }
        if both {
            if self
                .find(vb, Response::CloseStream(Side::Producer))
                .is_some()
            {
                self.adopt(vb, Response::CloseStream(Side::Producer));
            } else {
                self.send(Side::Producer, vb, actions);
            }
        }
    }

    fn send_add(&mut self, vb: u16, actions: &mut Vec<Action>) {
        self.owe_add(vb, false, actions);
        self.pending_adds.insert(vb);
    }

    /// Sends an ADD_STREAM (with the takeover flag for a takeover) and owes its answer; returns
    /// the request's sequence number.
    fn owe_add(&mut self, vb: u16, takeover: bool, actions: &mut Vec<Action>) -> u64 {
        let (opaque, seq) = self.owe(vb, Response::AddStream, takeover);
        actions.push(Action::AddStream {
            vbucket: vb,
            opaque,
            flags: if takeover {
                ADD_STREAM_FLAG_TAKEOVER
            } else {
                0
            },
        });
        seq
    }

    /// A new request of `kind` for `vb` whose answer a caller waits for: its opaque and sequence
    /// number.
    fn owe(&mut self, vb: u16, kind: Response, takeover: bool) -> (u32, u64) {
        let seq = self.next_seq();
        let opaque = opaque_of(vb, seq);
        self.push_owed(
            vb,
            Owed {
                opaque,
                kind,
                seq,
                caller: true,
                takeover,
            },
        );
        (opaque, seq)
    }

    fn send(&mut self, side: Side, vb: u16, actions: &mut Vec<Action>) {
        let (opaque, _) = self.owe(vb, Response::CloseStream(side), false);
        self.pending_closes(side).insert(vb);
        actions.push(Action::CloseStream {
            side,
            vbucket: vb,
            opaque,
        });
    }

    /// The caller waits for the newest owed request of this kind (already sent).
    fn adopt(&mut self, vb: u16, kind: Response) {
        if let Some(i) = self.find(vb, kind) {
            self.owed[usize::from(vb)][i].caller = true;
            match kind {
                Response::AddStream => self.pending_adds.insert(vb),
                Response::CloseStream(side) => self.pending_closes(side).insert(vb),
            }
        }
    }

    /// No caller waits for this kind's owed answers of `vb` any more.
    fn release(&mut self, vb: u16, kind: Response) {
        for o in self.owed[usize::from(vb)].iter_mut() {
            if o.kind == kind {
                o.caller = false;
            }
        }
    }

    fn enter_setup(&mut self, actions: Vec<Action>, next: After) -> Start {
        if self.pending_adds.is_empty()
            && self.pending_closes_consumer.is_empty()
            && self.pending_closes_producer.is_empty()
        {
            return Start::Settled;
        }
        self.state = State::SettingUp { next };
        Start::Send(actions)
    }

    // ---- answers ----

    /// The consumer memcached answered an ADD_STREAM.
    fn add_stream_response(&mut self, opaque: u32, status: u16) -> Outcome {
        if matches!(self.state, State::Shut) {
            return Outcome::NoReply;
        }
        let vb = vbucket_of(opaque);
        let Some(o) = self.take(vb, opaque, Response::AddStream) else {
            return Outcome::UnexpectedResponse {
                response: Response::AddStream,
                opaque,
            };
        };
        // A takeover's own add never makes a replica stream; one whose takeover already ended
        // (deadline, stream end, shut) left whatever it opened on the consumer like any add.
        if (!o.takeover || !o.caller) && self.apply(vb, o.seq) {
            if status == STATUS_SUCCESS || status == STATUS_KEY_EEXISTS {
                self.active.insert(vb);
            } else {
                self.active.remove(vb);
            }
        }
        if !o.caller {
            self.absorbed += 1;
            return Outcome::Absorbed;
        }
        match &mut self.state {
            State::Takeover(t) if o.takeover => {
                if status == STATUS_SUCCESS {
                    t.add_acked = true;
                    self.finish_takeover_if_complete()
                } else {
                    self.state = State::Idle;
                    Outcome::Reply(Reply::Errors(vec![(Why::McbpStatus(status), vb)]))
                }
            }
            _ => {
                self.pending_adds.remove(vb);
                if status != STATUS_SUCCESS {
                    self.errors.push((Why::McbpStatus(status), vb));
                }
                self.finish_if_settled()
            }
        }
    }

    /// A memcached answered a CLOSE_STREAM (key_enoent counts as success).
    fn close_stream_response(&mut self, side: Side, opaque: u32, status: u16) -> Outcome {
        if matches!(self.state, State::Shut) {
            return Outcome::NoReply;
        }
        let vb = vbucket_of(opaque);
        let kind = Response::CloseStream(side);
        let Some(o) = self.take(vb, opaque, kind) else {
            return Outcome::UnexpectedResponse {
                response: kind,
                opaque,
            };
        };
        let closed = status == STATUS_SUCCESS || status == STATUS_KEY_ENOENT;
        if side == Side::Consumer && self.apply(vb, o.seq) && closed {
            self.active.remove(vb);
        }
        if !o.caller {
            self.absorbed += 1;
            return Outcome::Absorbed;
        }
        self.pending_closes(side).remove(vb);
        if side == Side::Consumer && self.shut_is_closing_an_add(vb) {
            // The shut's close is the consumer's last word on this stream: settle the add now
            // (kv_engine may never answer it); its answer, if it comes, is a late one.
            self.pending_adds.remove(vb);
            self.release(vb, Response::AddStream);
            let why = if closed {
                Why::StreamEnd(StreamEndReason::CLOSED)
            } else {
                Why::McbpStatus(status)
            };
            self.errors.push((why, vb));
        } else if !closed {
            self.errors.push((Why::McbpStatus(status), vb));
        }
        self.finish_if_settled()
    }

    /// The producer sent DCP_STREAM_END. Matched by vbucket: the frame's opaque is the
    /// consumer's own stream opaque, unrelated to ours (MB-53445); only a takeover, which has seen
    /// the consumer's STREAM_REQ, can tell its own stream's end from an older stream's by it.
    fn stream_end(&mut self, vb: u16, opaque: u32, reason: StreamEndReason) -> Outcome {
        if !in_range(vb) {
            return Outcome::NoReply;
        }
        match self.state {
            State::Shut => return Outcome::NoReply,
            State::Takeover(t) if t.vbucket == vb && self.ends_takeover_stream(t, opaque) => {
                if t.stage == TakeoverStage::Active {
                    // The ordinary end of a stream that took over: the takeover goes on.
                    self.end_stream(vb);
                    return Outcome::NoReply;
                }
                // A takeover stream that ended before the switch did not take over.
                self.release(vb, Response::AddStream);
                self.state = State::Idle;
                self.end_stream(vb);
                return Outcome::Reply(Reply::Errors(vec![(Why::StreamEnd(reason), vb)]));
            }
            _ => {}
        }
        self.end_stream(vb);
        if matches!(self.state, State::SettingUp { .. })
            && self.pending_adds.contains(vb)
            && reason != StreamEndReason::OK
        {
            // kv_engine may never answer this add: fail it now; its answer is a late one.
            self.pending_adds.remove(vb);
            self.release(vb, Response::AddStream);
            self.errors.push((Why::StreamEnd(reason), vb));
            return self.finish_if_settled();
        }
        Outcome::NoReply
    }

    /// The consumer's stream of `vb` ends after everything sent before this point.
    fn end_stream(&mut self, vb: u16) {
        let seq = self.next_seq();
        self.applied[usize::from(vb)] = seq;
        self.active.remove(vb);
    }

    fn ends_takeover_stream(&self, t: Takeover, opaque: u32) -> bool {
        match t.stage {
            TakeoverStage::Requested => !t.closing_old,
            TakeoverStage::OpaqueKnown | TakeoverStage::Active => opaque == t.opaque,
        }
    }

    /// The consumer sent DCP_STREAM_REQ: during a takeover it tells us the opaque the
    /// set-vbucket-state exchange will use.
    fn stream_req(&mut self, vb: u16, opaque: u32) -> Outcome {
        if let State::Takeover(t) = &mut self.state {
            if t.stage == TakeoverStage::Requested && t.vbucket == vb {
                t.stage = TakeoverStage::OpaqueKnown;
                t.opaque = opaque;
            }
        }
        Outcome::NoReply
    }

    /// The producer asked the consumer to change the takeover vbucket's state.
    fn set_vbucket_state(&mut self, opaque: u32, state: VbState) -> Outcome {
        if let State::Takeover(t) = &mut self.state {
            if t.stage == TakeoverStage::OpaqueKnown && t.opaque == opaque && t.requested.is_none()
            {
                t.requested = Some(state);
            }
        }
        Outcome::NoReply
    }

    /// The consumer answered a set-vbucket-state request.
    fn set_vbucket_state_response(&mut self, opaque: u32, status: u16) -> Outcome {
        if let State::Takeover(t) = &mut self.state {
            if t.stage == TakeoverStage::OpaqueKnown
                && t.opaque == opaque
                && status == STATUS_SUCCESS
            {
                if t.requested == Some(VbState::ACTIVE) {
                    t.stage = TakeoverStage::Active;
                    return self.finish_takeover_if_complete();
                }
                t.requested = None;
            }
        }
        Outcome::NoReply
    }

    /// The setup deadline fired: every vbucket still pending fails with `setup_timeout`; the
    /// answers stay owed and are applied when they come.
    fn deadline(&mut self) -> Outcome {
        match self.state {
            State::SettingUp { .. } => {
                let pending = self
                    .pending_adds
                    .union(&self.pending_closes_consumer)
                    .union(&self.pending_closes_producer);
                for vb in pending.iter() {
                    for o in self.owed[usize::from(vb)].iter_mut() {
                        o.caller = false;
                    }
                    self.errors.push((Why::SetupTimeout, vb));
                }
                self.clear_pending();
                self.finish_if_settled()
            }
            State::Takeover(t) => {
                self.release(t.vbucket, Response::AddStream);
                if t.add_acked && self.apply(t.vbucket, t.add_seq) {
                    // The consumer holds the stream the acknowledged add opened (unless it ended
                    // since): a later setup keeps or closes it like any other.
                    self.active.insert(t.vbucket);
                }
                self.state = State::Idle;
                Outcome::Reply(Reply::Errors(vec![(Why::SetupTimeout, t.vbucket)]))
            }
            State::Idle | State::Shut => Outcome::NoReply,
        }
    }

    /// The connection is gone: every pending vbucket fails with `connection_lost`, and the
    /// machine is shut with no streams.
    fn connection_lost(&mut self) -> Outcome {
        let outcome = match self.state {
            State::SettingUp { .. } => {
                let lost = self
                    .pending_adds
                    .union(&self.pending_closes_consumer)
                    .union(&self.pending_closes_producer);
                self.errors
                    .extend(lost.iter().map(|vb| (Why::ConnectionLost, vb)));
                Outcome::Reply(self.take_reply())
            }
            State::Takeover(t) => {
                Outcome::Reply(Reply::Errors(vec![(Why::ConnectionLost, t.vbucket)]))
            }
            State::Idle | State::Shut => Outcome::NoReply,
        };
        self.state = State::Shut;
        self.active.clear();
        self.clear_pending();
        for owed in self.owed.iter_mut() {
            owed.clear();
        }
        self.errors.clear();
        outcome
    }

    // ---- what callers and tests see ----

    /// Vbuckets with an active stream, ascending.
    pub fn partitions(&self) -> Vec<u16> {
        self.active.iter().collect()
    }

    pub fn is_active(&self, vb: u16) -> bool {
        self.active.contains(vb)
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            State::Idle => Phase::Idle,
            State::SettingUp { .. } => Phase::SettingUp,
            State::Takeover(_) => Phase::Takeover,
            State::Shut => Phase::Shut,
        }
    }

    pub fn info(&self) -> SetupInfo {
        let mut errors = self.errors.clone();
        errors.sort_by_key(|&(_, vb)| vb);
        let owed = self
            .owed
            .iter()
            .enumerate()
            .flat_map(|(vb, list)| {
                list.iter().map(move |o| OwedInfo {
                    vbucket: vb as u16,
                    request: o.kind,
                    opaque: o.opaque,
                    for_caller: o.caller,
                })
            })
            .collect();
        SetupInfo {
            phase: self.phase(),
            active: self.partitions(),
            pending_adds: self.pending_adds.iter().collect(),
            pending_closes_consumer: self.pending_closes_consumer.iter().collect(),
            pending_closes_producer: self.pending_closes_producer.iter().collect(),
            errors,
            next: match self.state {
                State::SettingUp { next: After::Idle } => Some(Phase::Idle),
                State::SettingUp { next: After::Shut } => Some(Phase::Shut),
                _ => None,
            },
            takeover: match self.state {
                State::Takeover(t) => Some(TakeoverInfo {
                    vbucket: t.vbucket,
                    stage: t.stage,
                    opaque: (t.stage != TakeoverStage::Requested).then_some(t.opaque),
                    requested_state: t.requested,
                    add_acked: t.add_acked,
                }),
                _ => None,
            },
            owed,
            absorbed: self.absorbed,
        }
    }

    // ---- bookkeeping ----

    fn refuse_unless_idle(&self) -> Result<(), Refusal> {
        match self.state {
            State::Idle => Ok(()),
            State::Shut => Err(Refusal::Shut),
            State::SettingUp { .. } | State::Takeover(_) => Err(Refusal::Busy),
        }
    }

    fn refuse_unless_idle_for(&self, vb: u16) -> Result<(), Refusal> {
        if !in_range(vb) {
            return Err(Refusal::BadVbucket(vb));
        }
        self.refuse_unless_idle()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Records that the answer of request `seq` reached `vb`'s stream; false when something
    /// later was applied already (the answer is stale for the active set).
    fn apply(&mut self, vb: u16, seq: u64) -> bool {
        let applied = &mut self.applied[usize::from(vb)];
        if seq > *applied {
            *applied = seq;
            true
        } else {
            false
        }
    }

    /// The newest owed consumer-side request of `vb` that is not stale.
    fn last_consumer_request(&self, vb: u16) -> Option<Last> {
        let applied = self.applied[usize::from(vb)];
        self.owed[usize::from(vb)]
            .iter()
            .filter(|o| {
                (o.takeover || o.seq > applied) && o.kind != Response::CloseStream(Side::Producer)
            })
            .max_by_key(|o| o.seq)
            .map(|o| match (o.kind, o.takeover) {
                (Response::AddStream, true) => Last::TakeoverAdd,
                (Response::AddStream, false) => Last::Add,
                _ => Last::Close,
            })
    }

    /// Index of the newest owed entry of this kind.
    fn find(&self, vb: u16, kind: Response) -> Option<usize> {
        self.owed[usize::from(vb)]
            .iter()
            .enumerate()
            .filter(|(_, o)| o.kind == kind && !o.takeover)
            .max_by_key(|(_, o)| o.seq)
            .map(|(i, _)| i)
    }

    fn take(&mut self, vb: u16, opaque: u32, kind: Response) -> Option<Owed> {
        let list = self.owed.get_mut(usize::from(vb))?;
        let i = list
            .iter()
            .position(|o| o.opaque == opaque && o.kind == kind)?;
        Some(list.remove(i))
    }

    fn push_owed(&mut self, vb: u16, owed: Owed) {
        let list = &mut self.owed[usize::from(vb)];
        if list.len() >= MAX_OWED_PER_VBUCKET {
            if let Some(i) = list.iter().position(|o| !o.caller) {
                list.remove(i);
            }
        }
        list.push(owed);
    }

    fn pending_closes(&mut self, side: Side) -> &mut VbSet {
        match side {
            Side::Consumer => &mut self.pending_closes_consumer,
            Side::Producer => &mut self.pending_closes_producer,
        }
    }

    fn clear_pending(&mut self) {
        self.pending_adds.clear();
        self.pending_closes_consumer.clear();
        self.pending_closes_producer.clear();
    }

    /// A shut over a setup closed `vb` on the consumer while its add is still unanswered.
    fn shut_is_closing_an_add(&self, vb: u16) -> bool {
        matches!(self.state, State::SettingUp { next: After::Shut })
            && self.pending_adds.contains(vb)
    }

    fn finish_if_settled(&mut self) -> Outcome {
        let State::SettingUp { next } = self.state else {
            return Outcome::NoReply;
        };
        if !self.pending_adds.is_empty()
            || !self.pending_closes_consumer.is_empty()
            || !self.pending_closes_producer.is_empty()
        {
            return Outcome::NoReply;
        }
        self.state = match next {
            After::Idle => State::Idle,
            After::Shut => State::Shut,
        };
        Outcome::Reply(self.take_reply())
    }

    fn finish_takeover_if_complete(&mut self) -> Outcome {
        match self.state {
            State::Takeover(t) if t.add_acked && t.stage == TakeoverStage::Active => {
                self.state = State::Idle;
                Outcome::Reply(Reply::Ok)
            }
            _ => Outcome::NoReply,
        }
    }

    fn take_reply(&mut self) -> Reply {
        let mut errors = std::mem::take(&mut self.errors);
        if errors.is_empty() {
            Reply::Ok
        } else {
            // Stable: failures of one vbucket keep the order they happened in.
            errors.sort_by_key(|&(_, vb)| vb);
            Reply::Errors(errors)
        }
    }
}
