//! The machine itself. Every operation is O(1) per event except `begin`/`shut` (linear in the
//! vbuckets they send requests for) and the one-off sweeps of `deadline`/`connection_lost`.

use mcbp::names::{ADD_STREAM_FLAG_TAKEOVER, STATUS_KEY_ENOENT, STATUS_SUCCESS};

use crate::vbset::{OwedTable, VbSet};
use crate::{
    Action, Event, Input, Outcome, Phase, Refusal, Reply, Request, Response, Side, Start,
    StreamEndReason, TakeoverStage, VbState, Why, MAX_VBUCKETS,
};

/// The kinds of request whose answers the machine waits for (index into the owed table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Req {
    Add,
    Close(Side),
}

impl Req {
    fn index(self) -> usize {
        match self {
            Req::Add => 0,
            Req::Close(Side::Consumer) => 1,
            Req::Close(Side::Producer) => 2,
        }
    }
}

fn in_range(vb: u16) -> bool {
    usize::from(vb) < MAX_VBUCKETS
}

/// The opaque rule, the one place it is written: requests carry opaque = vbucket, so an answer's
/// opaque names its vbucket (if it is one).
fn opaque_of(vb: u16) -> u32 {
    u32::from(vb)
}

fn vbucket_of(opaque: u32) -> Option<u16> {
    u16::try_from(opaque).ok().filter(|vb| in_range(*vb))
}

fn add(vbucket: u16, flags: u32) -> Action {
    Action::AddStream {
        vbucket,
        opaque: opaque_of(vbucket),
        flags,
    }
}

fn close(side: Side, vbucket: u16) -> Action {
    Action::CloseStream {
        side,
        vbucket,
        opaque: opaque_of(vbucket),
    }
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

/// A snapshot of the machine for diagnostics and tests (allocates: not for the hot path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupInfo {
    pub phase: Phase,
    pub active: Vec<u16>,
    pub pending_adds: Vec<u16>,
    pub pending_closes_consumer: Vec<u16>,
    /// `None` when the producer-side answers are being ignored (a shut interrupted the setup).
    pub pending_closes_producer: Option<Vec<u16>>,
    pub errors: Vec<(Why, u16)>,
    /// The phase entered when the setup completes (`Shut` once a shut was asked for).
    pub next: Option<Phase>,
    pub takeover: Option<TakeoverInfo>,
    /// Late answers absorbed so far (owed answers that arrived), for logs and stats.
    pub absorbed: u64,
}

/// The stream-setup bookkeeping of one consumer connection.
#[derive(Clone, Debug)]
pub struct Setup {
    state: State,
    active: VbSet,
    /// Requests of the current setup still waiting for their answer, by kind.
    pending_adds: VbSet,
    pending_closes_consumer: VbSet,
    pending_closes_producer: VbSet,
    /// A shut interrupted the setup: producer-side close answers no longer matter.
    producer_ignored: bool,
    errors: Vec<(Why, u16)>,
    /// Answers still owed for requests whose outcome was already decided (failed by a stream end,
    /// timed out): when they arrive they are absorbed, not treated as violations.
    owed: Box<OwedTable>,
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
            producer_ignored: false,
            errors: Vec::new(),
            owed: Box::new(OwedTable::new()),
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
                        vbucket, reason, ..
                    },
                ) => self.stream_end(vbucket, reason),
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

    /// Starts a setup towards exactly `wanted`: adds for wanted vbuckets without a stream, closes
    /// (both sides) for streams no longer wanted.
    fn begin(&mut self, wanted: &[u16]) -> Result<Start, Refusal> {
        if let Some(&bad) = wanted.iter().find(|vb| !in_range(**vb)) {
            return Err(Refusal::BadVbucket(bad));
        }
        self.refuse_unless_idle()?;
        let mut want = VbSet::new();
        for &vb in wanted {
            want.insert(vb);
        }
        let mut actions = Vec::new();
        for vb in want.difference(&self.active) {
            actions.push(add(vb, 0));
        }
        for vb in self.active.difference(&want) {
            actions.push(close(Side::Consumer, vb));
            actions.push(close(Side::Producer, vb));
        }
        if actions.is_empty() {
            return Ok(Start::Settled);
        }
        Ok(self.send(actions, After::Idle))
    }

    /// Closes one active stream on both sides (a setup towards "active minus `vb`").
    fn maybe_close_stream(&mut self, vb: u16) -> Result<Start, Refusal> {
        self.refuse_unless_idle_for(vb)?;
        if !self.active.contains(vb) {
            return Ok(Start::Settled);
        }
        let actions = vec![close(Side::Consumer, vb), close(Side::Producer, vb)];
        Ok(self.send(actions, After::Idle))
    }

    /// Shuts the connection. From idle: closes every active stream on the consumer, and the reply
    /// comes once they are answered. From a setup in progress (possibly stuck): closes on the
    /// consumer every vbucket still being added or active and not yet closing; the consumer's answer
    /// to such a close settles a still-pending add (see `close_stream_response`), so the setup's own
    /// caller gets its reply through a later outcome as soon as the closes are answered, then the
    /// machine is shut. Refused during a takeover (the deadline or a lost connection ends that).
    fn shut(&mut self) -> Result<Start, Refusal> {
        match self.state {
            State::Shut => Ok(Start::Settled),
            State::Takeover(_) => Err(Refusal::Busy),
            State::Idle => {
                if self.active.is_empty() {
                    self.state = State::Shut;
                    return Ok(Start::Settled);
                }
                let actions: Vec<Action> = self
                    .active
                    .iter()
                    .map(|vb| close(Side::Consumer, vb))
                    .collect();
                Ok(self.send(actions, After::Shut))
            }
            State::SettingUp { .. } => {
                let mut actions = Vec::new();
                for vb in 0..MAX_VBUCKETS as u16 {
                    let wants_close = self.pending_adds.contains(vb) || self.active.contains(vb);
                    if wants_close && !self.pending_closes_consumer.contains(vb) {
                        actions.push(close(Side::Consumer, vb));
                    }
                }
                for action in &actions {
                    self.note_sent(action);
                }
                // Producer-side answers stop mattering, unless they are all the setup still
                // waits for: then dropping them would leave the setup's caller without a reply.
                if !self.pending_adds.is_empty() || !self.pending_closes_consumer.is_empty() {
                    self.pending_closes_producer.clear();
                    self.producer_ignored = true;
                }
                self.state = State::SettingUp { next: After::Shut };
                Ok(Start::Send(actions))
            }
        }
    }

    /// Starts a takeover of `vb` (an ADD_STREAM with the takeover flag).
    fn takeover_begin(&mut self, vb: u16) -> Result<Start, Refusal> {
        self.refuse_unless_idle_for(vb)?;
        if self.active.contains(vb) {
            return Err(Refusal::AlreadyActive);
        }
        self.state = State::Takeover(Takeover {
            vbucket: vb,
            stage: TakeoverStage::Requested,
            opaque: 0,
            requested: None,
            add_acked: false,
        });
        Ok(Start::Send(vec![add(vb, ADD_STREAM_FLAG_TAKEOVER)]))
    }

    /// The consumer memcached answered an ADD_STREAM.
    fn add_stream_response(&mut self, opaque: u32, status: u16) -> Outcome {
        match &mut self.state {
            State::Shut => Outcome::NoReply,
            State::SettingUp { .. } => match vbucket_of(opaque) {
                Some(vb) if self.pending_adds.contains(vb) => {
                    self.pending_adds.remove(vb);
                    if status == STATUS_SUCCESS {
                        self.active.insert(vb);
                    } else {
                        self.errors.push((Why::McbpStatus(status), vb));
                    }
                    self.finish_if_settled()
                }
                _ => self.absorb_owed(opaque, Req::Add, Response::AddStream),
            },
            State::Takeover(t) if opaque == u32::from(t.vbucket) && !t.add_acked => {
                let vb = t.vbucket;
                if status == STATUS_SUCCESS {
                    t.add_acked = true;
                    self.finish_takeover_if_complete()
                } else {
                    self.state = State::Idle;
                    Outcome::Reply(Reply::Errors(vec![(Why::McbpStatus(status), vb)]))
                }
            }
            State::Takeover(_) | State::Idle => {
                self.absorb_owed(opaque, Req::Add, Response::AddStream)
            }
        }
    }

    /// A memcached answered a CLOSE_STREAM (key_enoent counts as success). During a shut over a
    /// setup, the consumer's answer for a vbucket whose add is still pending also settles that add:
    /// `{stream_end, closed}` on success, `{mcbp_status, S}` on failure (one error either way), and
    /// the add's own answer becomes owed.
    fn close_stream_response(&mut self, side: Side, opaque: u32, status: u16) -> Outcome {
        match self.state {
            State::Shut => Outcome::NoReply,
            State::SettingUp { .. } if side == Side::Producer && self.producer_ignored => {
                Outcome::NoReply
            }
            State::SettingUp { .. } => match vbucket_of(opaque) {
                Some(vb) if self.pending_closes(side).contains(vb) => {
                    self.pending_closes(side).remove(vb);
                    let closed = status == STATUS_SUCCESS || status == STATUS_KEY_ENOENT;
                    if closed {
                        self.active.remove(vb);
                    }
                    if side == Side::Consumer && self.shut_is_closing_an_add(vb) {
                        // The shut's close is the consumer's last word on this stream: settle the
                        // add now (kv_engine may never answer it) and absorb its answer if it comes.
                        self.pending_adds.remove(vb);
                        self.owed.add(vb, Req::Add.index());
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
                _ => self.absorb_owed(opaque, Req::Close(side), Response::CloseStream(side)),
            },
            State::Idle | State::Takeover(_) => {
                self.absorb_owed(opaque, Req::Close(side), Response::CloseStream(side))
            }
        }
    }

    /// The producer sent DCP_STREAM_END. Matched by vbucket only: the frame's opaque is the
    /// consumer's own stream opaque, unrelated to ours (MB-53445).
    fn stream_end(&mut self, vb: u16, reason: StreamEndReason) -> Outcome {
        match self.state {
            State::Shut => Outcome::NoReply,
            State::SettingUp { .. } if self.pending_adds.contains(vb) => {
                if reason == StreamEndReason::OK {
                    // The producer sent all it was asked for; the add's answer still completes it.
                    return Outcome::NoReply;
                }
                // kv_engine may never answer this add: fail it now, absorb the answer if it comes.
                self.pending_adds.remove(vb);
                self.owed.add(vb, Req::Add.index());
                self.errors.push((Why::StreamEnd(reason), vb));
                self.finish_if_settled()
            }
            _ => {
                self.active.remove(vb);
                Outcome::NoReply
            }
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

    /// The setup deadline fired: every vbucket still pending fails with `setup_timeout`.
    fn deadline(&mut self) -> Outcome {
        match self.state {
            State::SettingUp { .. } => {
                for vb in self.all_pending().iter() {
                    for req in [
                        Req::Add,
                        Req::Close(Side::Consumer),
                        Req::Close(Side::Producer),
                    ] {
                        if self.pending_set(req).contains(vb) {
                            self.owed.add(vb, req.index());
                        }
                    }
                    self.errors.push((Why::SetupTimeout, vb));
                }
                self.clear_pending();
                self.finish_if_settled()
            }
            State::Takeover(t) => {
                if !t.add_acked {
                    self.owed.add(t.vbucket, Req::Add.index());
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
                let lost = self.all_pending();
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
        self.owed.clear();
        self.producer_ignored = false;
        self.errors.clear();
        outcome
    }

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
        let setting_up = matches!(self.state, State::SettingUp { .. });
        let pending = |set: &VbSet| -> Vec<u16> {
            if setting_up {
                set.iter().collect()
            } else {
                Vec::new()
            }
        };
        let mut errors = self.errors.clone();
        errors.sort_by_key(|&(_, vb)| vb);
        SetupInfo {
            phase: self.phase(),
            active: self.partitions(),
            pending_adds: pending(&self.pending_adds),
            pending_closes_consumer: pending(&self.pending_closes_consumer),
            pending_closes_producer: if self.producer_ignored {
                None
            } else {
                Some(pending(&self.pending_closes_producer))
            },
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
            absorbed: self.absorbed,
        }
    }

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

    /// Notes the requests as pending and enters a setup that ends in `next`.
    fn send(&mut self, actions: Vec<Action>, next: After) -> Start {
        for action in &actions {
            self.note_sent(action);
        }
        self.state = State::SettingUp { next };
        Start::Send(actions)
    }

    fn note_sent(&mut self, action: &Action) {
        match *action {
            Action::AddStream { vbucket, .. } => self.pending_adds.insert(vbucket),
            Action::CloseStream { side, vbucket, .. } => self.pending_closes(side).insert(vbucket),
        }
    }

    fn pending_closes(&mut self, side: Side) -> &mut VbSet {
        match side {
            Side::Consumer => &mut self.pending_closes_consumer,
            Side::Producer => &mut self.pending_closes_producer,
        }
    }

    fn pending_set(&self, req: Req) -> &VbSet {
        match req {
            Req::Add => &self.pending_adds,
            Req::Close(Side::Consumer) => &self.pending_closes_consumer,
            Req::Close(Side::Producer) => &self.pending_closes_producer,
        }
    }

    /// Vbuckets with any request of the current setup unanswered.
    fn all_pending(&self) -> VbSet {
        self.pending_adds
            .union(&self.pending_closes_consumer)
            .union(&self.pending_closes_producer)
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

    /// An answer that matches nothing pending: fine if it was owed, a violation otherwise.
    fn absorb_owed(&mut self, opaque: u32, req: Req, response: Response) -> Outcome {
        match vbucket_of(opaque) {
            Some(vb) if self.owed.take(vb, req.index()) => {
                self.absorbed += 1;
                Outcome::NoReply
            }
            _ => Outcome::UnexpectedResponse { response, opaque },
        }
    }

    fn finish_if_settled(&mut self) -> Outcome {
        let State::SettingUp { next } = self.state else {
            return Outcome::NoReply;
        };
        let producer_done = self.producer_ignored || self.pending_closes_producer.is_empty();
        if !self.pending_adds.is_empty()
            || !self.pending_closes_consumer.is_empty()
            || !producer_done
        {
            return Outcome::NoReply;
        }
        self.producer_ignored = false;
        self.state = match next {
            After::Idle => State::Idle,
            After::Shut => State::Shut,
        };
        Outcome::Reply(self.take_reply())
    }

    fn finish_takeover_if_complete(&mut self) -> Outcome {
        match self.state {
            State::Takeover(t) if t.add_acked && t.stage == TakeoverStage::Active => {
                self.active.insert(t.vbucket);
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
