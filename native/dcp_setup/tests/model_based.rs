//! Model-based test: random operation sequences run against the machine and against a reference
//! model written straight from the rules (plain vectors, linear scans). Every outcome and every
//! observable state must agree, and the waiting caller must get exactly one reply.

mod common;

use common::Drive;
use dcp_setup::{
    Action, Outcome, Phase, Refusal, Reply, Response, Setup, SetupInfo, Side, Start,
    StreamEndReason, TakeoverInfo, TakeoverStage, VbState, Why, MAX_VBUCKETS,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// The reference model.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Add,
    Close(Side),
}

#[derive(Clone, Debug)]
struct ModelTakeover {
    vb: u16,
    stage: TakeoverStage,
    opaque: u32,
    requested: Option<VbState>,
    acked: bool,
}

#[derive(Clone, Debug)]
enum ModelState {
    Idle,
    SettingUp {
        adds: Vec<u16>,
        closes_consumer: Vec<u16>,
        /// None: producer-side answers are ignored (a shut interrupted the setup).
        closes_producer: Option<Vec<u16>>,
        errors: Vec<(Why, u16)>,
        then_shut: bool,
    },
    Takeover(ModelTakeover),
    Shut,
}

#[derive(Clone, Debug)]
struct Model {
    active: Vec<u16>,
    /// One entry per answer still owed for a request whose outcome is already decided.
    owed: Vec<(Kind, u16)>,
    absorbed: u64,
    state: ModelState,
}

fn sorted_unique(mut v: Vec<u16>) -> Vec<u16> {
    v.sort_unstable();
    v.dedup();
    v
}

fn remove_first<T: PartialEq>(v: &mut Vec<T>, x: &T) -> bool {
    match v.iter().position(|y| y == x) {
        Some(i) => {
            v.remove(i);
            true
        }
        None => false,
    }
}

fn reply_from(mut errors: Vec<(Why, u16)>) -> Reply {
    if errors.is_empty() {
        Reply::Ok
    } else {
        errors.sort_by_key(|e| e.1); // stable: per-vbucket order is the order of events
        Reply::Errors(errors)
    }
}

impl Model {
    fn new() -> Model {
        Model {
            active: Vec::new(),
            owed: Vec::new(),
            absorbed: 0,
            state: ModelState::Idle,
        }
    }

    fn busy_check(&self) -> Result<(), Refusal> {
        match self.state {
            ModelState::Idle => Ok(()),
            ModelState::Shut => Err(Refusal::Shut),
            _ => Err(Refusal::Busy),
        }
    }

    fn begin(&mut self, wanted: &[u16]) -> Result<Start, Refusal> {
        if let Some(&bad) = wanted.iter().find(|&&vb| vb as usize >= MAX_VBUCKETS) {
            return Err(Refusal::BadVbucket(bad));
        }
        self.busy_check()?;
        let wanted = sorted_unique(wanted.to_vec());
        let adds: Vec<u16> = wanted
            .iter()
            .copied()
            .filter(|vb| !self.active.contains(vb))
            .collect();
        let closes: Vec<u16> = sorted_unique(self.active.clone())
            .into_iter()
            .filter(|vb| !wanted.contains(vb))
            .collect();
        self.start_setup(adds, closes)
    }

    fn start_setup(&mut self, adds: Vec<u16>, closes: Vec<u16>) -> Result<Start, Refusal> {
        if adds.is_empty() && closes.is_empty() {
            return Ok(Start::Settled);
        }
        let mut actions: Vec<Action> = adds
            .iter()
            .map(|&vb| Action::AddStream {
                vbucket: vb,
                opaque: u32::from(vb),
                flags: 0,
            })
            .collect();
        for &vb in &closes {
            actions.push(Action::CloseStream {
                side: Side::Consumer,
                vbucket: vb,
                opaque: u32::from(vb),
            });
            actions.push(Action::CloseStream {
                side: Side::Producer,
                vbucket: vb,
                opaque: u32::from(vb),
            });
        }
        self.state = ModelState::SettingUp {
            adds,
            closes_consumer: closes.clone(),
            closes_producer: Some(closes),
            errors: Vec::new(),
            then_shut: false,
        };
        Ok(Start::Send(actions))
    }

    fn maybe_close_stream(&mut self, vb: u16) -> Result<Start, Refusal> {
        if vb as usize >= MAX_VBUCKETS {
            return Err(Refusal::BadVbucket(vb));
        }
        self.busy_check()?;
        if !self.active.contains(&vb) {
            return Ok(Start::Settled);
        }
        self.start_setup(Vec::new(), vec![vb])
    }

    fn takeover_begin(&mut self, vb: u16) -> Result<Vec<Action>, Refusal> {
        if vb as usize >= MAX_VBUCKETS {
            return Err(Refusal::BadVbucket(vb));
        }
        self.busy_check()?;
        if self.active.contains(&vb) {
            return Err(Refusal::AlreadyActive);
        }
        self.state = ModelState::Takeover(ModelTakeover {
            vb,
            stage: TakeoverStage::Requested,
            opaque: 0,
            requested: None,
            acked: false,
        });
        Ok(vec![Action::AddStream {
            vbucket: vb,
            opaque: u32::from(vb),
            flags: 1,
        }])
    }

    fn shut(&mut self) -> Result<Start, Refusal> {
        match &mut self.state {
            ModelState::Shut => Ok(Start::Settled),
            ModelState::Takeover(_) => Err(Refusal::Busy),
            ModelState::Idle => {
                if self.active.is_empty() {
                    self.state = ModelState::Shut;
                    return Ok(Start::Settled);
                }
                let closes = sorted_unique(self.active.clone());
                let actions = closes
                    .iter()
                    .map(|&vb| Action::CloseStream {
                        side: Side::Consumer,
                        vbucket: vb,
                        opaque: u32::from(vb),
                    })
                    .collect();
                self.state = ModelState::SettingUp {
                    adds: Vec::new(),
                    closes_consumer: closes,
                    closes_producer: Some(Vec::new()),
                    errors: Vec::new(),
                    then_shut: true,
                };
                Ok(Start::Send(actions))
            }
            ModelState::SettingUp {
                adds,
                closes_consumer,
                closes_producer,
                then_shut,
                ..
            } => {
                let mut candidates = adds.clone();
                candidates.extend(self.active.iter().copied());
                let more: Vec<u16> = sorted_unique(candidates)
                    .into_iter()
                    .filter(|vb| !closes_consumer.contains(vb))
                    .collect();
                closes_consumer.extend(more.iter().copied());
                if !adds.is_empty() || !closes_consumer.is_empty() {
                    *closes_producer = None;
                }
                *then_shut = true;
                Ok(Start::Send(
                    more.into_iter()
                        .map(|vb| Action::CloseStream {
                            side: Side::Consumer,
                            vbucket: vb,
                            opaque: u32::from(vb),
                        })
                        .collect(),
                ))
            }
        }
    }

    /// Replies and leaves the setup when nothing is pending any more.
    fn settle(&mut self) -> Outcome {
        let ModelState::SettingUp {
            adds,
            closes_consumer,
            closes_producer,
            errors,
            then_shut,
        } = &mut self.state
        else {
            return Outcome::NoReply;
        };
        let producer_done = closes_producer.as_ref().is_none_or(|p| p.is_empty());
        if !adds.is_empty() || !closes_consumer.is_empty() || !producer_done {
            return Outcome::NoReply;
        }
        let reply = reply_from(std::mem::take(errors));
        self.state = if *then_shut {
            ModelState::Shut
        } else {
            ModelState::Idle
        };
        Outcome::Reply(reply)
    }

    fn owed_or_violation(&mut self, kind: Kind, opaque: u32) -> Outcome {
        let response = match kind {
            Kind::Add => Response::AddStream,
            Kind::Close(side) => Response::CloseStream(side),
        };
        if opaque < MAX_VBUCKETS as u32 && remove_first(&mut self.owed, &(kind, opaque as u16)) {
            self.absorbed += 1;
            Outcome::NoReply
        } else {
            Outcome::UnexpectedResponse { response, opaque }
        }
    }

    fn add_stream_response(&mut self, opaque: u32, status: u16) -> Outcome {
        match &mut self.state {
            ModelState::Shut => Outcome::NoReply,
            ModelState::SettingUp { adds, errors, .. } => {
                let hit = opaque < MAX_VBUCKETS as u32 && remove_first(adds, &(opaque as u16));
                if !hit {
                    return self.owed_or_violation(Kind::Add, opaque);
                }
                let vb = opaque as u16;
                if status == 0 {
                    if !self.active.contains(&vb) {
                        self.active.push(vb);
                    }
                } else {
                    errors.push((Why::McbpStatus(status), vb));
                }
                self.settle()
            }
            ModelState::Takeover(t) if opaque == t.vb as u32 && !t.acked => {
                if status == 0 {
                    t.acked = true;
                    self.takeover_done()
                } else {
                    let vb = t.vb;
                    self.state = ModelState::Idle;
                    Outcome::Reply(Reply::Errors(vec![(Why::McbpStatus(status), vb)]))
                }
            }
            _ => self.owed_or_violation(Kind::Add, opaque),
        }
    }

    fn close_stream_response(&mut self, side: Side, opaque: u32, status: u16) -> Outcome {
        match &mut self.state {
            ModelState::Shut => Outcome::NoReply,
            ModelState::SettingUp {
                adds,
                closes_consumer,
                closes_producer,
                errors,
                then_shut,
            } => {
                let list = match side {
                    Side::Consumer => closes_consumer,
                    Side::Producer => match closes_producer {
                        None => return Outcome::NoReply,
                        Some(p) => p,
                    },
                };
                let hit = opaque < MAX_VBUCKETS as u32 && remove_first(list, &(opaque as u16));
                if !hit {
                    return self.owed_or_violation(Kind::Close(side), opaque);
                }
                let vb = opaque as u16;
                let closed = status == 0 || status == 1;
                if closed {
                    self.active.retain(|&a| a != vb);
                }
                // Rule: a shut's consumer close, answered while the vbucket's add is still pending,
                // settles that add: one error (closed by request, or the close's failure status),
                // and the add's answer is owed.
                if side == Side::Consumer && *then_shut && remove_first(adds, &vb) {
                    self.owed.push((Kind::Add, vb));
                    if closed {
                        errors.push((Why::StreamEnd(StreamEndReason::CLOSED), vb));
                    } else {
                        errors.push((Why::McbpStatus(status), vb));
                    }
                } else if !closed {
                    errors.push((Why::McbpStatus(status), vb));
                }
                self.settle()
            }
            _ => self.owed_or_violation(Kind::Close(side), opaque),
        }
    }

    fn stream_end(&mut self, vb: u16, reason_code: StreamEndReason) -> Outcome {
        match &mut self.state {
            ModelState::Shut => Outcome::NoReply,
            ModelState::SettingUp { adds, errors, .. } if adds.contains(&vb) => {
                if reason_code == StreamEndReason::OK {
                    return Outcome::NoReply;
                }
                remove_first(adds, &vb);
                errors.push((Why::StreamEnd(reason_code), vb));
                self.owed.push((Kind::Add, vb));
                self.settle()
            }
            _ => {
                self.active.retain(|&a| a != vb);
                Outcome::NoReply
            }
        }
    }

    fn stream_req(&mut self, vb: u16, opaque: u32) -> Outcome {
        if let ModelState::Takeover(t) = &mut self.state {
            if t.stage == TakeoverStage::Requested && t.vb == vb {
                t.stage = TakeoverStage::OpaqueKnown;
                t.opaque = opaque;
            }
        }
        Outcome::NoReply
    }

    fn set_vbucket_state(&mut self, opaque: u32, state: VbState) -> Outcome {
        if let ModelState::Takeover(t) = &mut self.state {
            if t.stage == TakeoverStage::OpaqueKnown && t.opaque == opaque && t.requested.is_none()
            {
                t.requested = Some(state);
            }
        }
        Outcome::NoReply
    }

    fn set_vbucket_state_response(&mut self, opaque: u32, status: u16) -> Outcome {
        if let ModelState::Takeover(t) = &mut self.state {
            if t.stage == TakeoverStage::OpaqueKnown && t.opaque == opaque && status == 0 {
                if t.requested == Some(VbState::ACTIVE) {
                    t.stage = TakeoverStage::Active;
                    return self.takeover_done();
                }
                t.requested = None;
            }
        }
        Outcome::NoReply
    }

    fn takeover_done(&mut self) -> Outcome {
        if let ModelState::Takeover(t) = &self.state {
            if t.acked && t.stage == TakeoverStage::Active {
                self.active.push(t.vb);
                self.state = ModelState::Idle;
                return Outcome::Reply(Reply::Ok);
            }
        }
        Outcome::NoReply
    }

    fn pending_vbuckets(&self) -> Vec<u16> {
        match &self.state {
            ModelState::SettingUp {
                adds,
                closes_consumer,
                closes_producer,
                ..
            } => {
                let mut all = adds.clone();
                all.extend(closes_consumer.iter().copied());
                all.extend(closes_producer.iter().flatten().copied());
                sorted_unique(all)
            }
            _ => Vec::new(),
        }
    }

    fn deadline(&mut self) -> Outcome {
        match &mut self.state {
            ModelState::SettingUp {
                adds,
                closes_consumer,
                closes_producer,
                errors,
                ..
            } => {
                let mut all = adds.clone();
                all.extend(closes_consumer.iter().copied());
                all.extend(closes_producer.iter().flatten().copied());
                for vb in sorted_unique(all) {
                    errors.push((Why::SetupTimeout, vb));
                }
                for vb in adds.drain(..) {
                    self.owed.push((Kind::Add, vb));
                }
                for vb in closes_consumer.drain(..) {
                    self.owed.push((Kind::Close(Side::Consumer), vb));
                }
                for vb in closes_producer.iter_mut().flat_map(|p| p.drain(..)) {
                    self.owed.push((Kind::Close(Side::Producer), vb));
                }
                self.settle()
            }
            ModelState::Takeover(t) => {
                let vb = t.vb;
                if !t.acked {
                    self.owed.push((Kind::Add, vb));
                }
                self.state = ModelState::Idle;
                Outcome::Reply(Reply::Errors(vec![(Why::SetupTimeout, vb)]))
            }
            _ => Outcome::NoReply,
        }
    }

    fn connection_lost(&mut self) -> Outcome {
        let outcome = match &self.state {
            ModelState::SettingUp { errors, .. } => {
                let mut errors = errors.clone();
                for vb in self.pending_vbuckets() {
                    errors.push((Why::ConnectionLost, vb));
                }
                Outcome::Reply(reply_from(errors))
            }
            ModelState::Takeover(t) => {
                Outcome::Reply(Reply::Errors(vec![(Why::ConnectionLost, t.vb)]))
            }
            _ => Outcome::NoReply,
        };
        let absorbed = self.absorbed;
        *self = Model::new();
        self.absorbed = absorbed;
        self.state = ModelState::Shut;
        outcome
    }

    /// The machine's `info()` as the model sees it.
    fn info(&self) -> SetupInfo {
        let empty = SetupInfo {
            phase: Phase::Idle,
            active: sorted_unique(self.active.clone()),
            pending_adds: Vec::new(),
            pending_closes_consumer: Vec::new(),
            pending_closes_producer: Some(Vec::new()),
            errors: Vec::new(),
            next: None,
            takeover: None,
            absorbed: self.absorbed,
        };
        match &self.state {
            ModelState::Idle => empty,
            ModelState::Shut => SetupInfo {
                phase: Phase::Shut,
                ..empty
            },
            ModelState::Takeover(t) => SetupInfo {
                phase: Phase::Takeover,
                takeover: Some(TakeoverInfo {
                    vbucket: t.vb,
                    stage: t.stage,
                    opaque: (t.stage != TakeoverStage::Requested).then_some(t.opaque),
                    requested_state: t.requested,
                    add_acked: t.acked,
                }),
                ..empty
            },
            ModelState::SettingUp {
                adds,
                closes_consumer,
                closes_producer,
                errors,
                then_shut,
            } => {
                let mut errors = errors.clone();
                errors.sort_by_key(|e| e.1);
                SetupInfo {
                    phase: Phase::SettingUp,
                    pending_adds: sorted_unique(adds.clone()),
                    pending_closes_consumer: sorted_unique(closes_consumer.clone()),
                    pending_closes_producer: closes_producer.clone().map(sorted_unique),
                    errors,
                    next: Some(if *then_shut { Phase::Shut } else { Phase::Idle }),
                    ..empty
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operations and their generators.

/// Opaques of the consumer's own stream requests during a takeover (small set: they must collide).
const STREAM_OPAQUES: [u32; 2] = [0x1000, 0x1001];

#[derive(Clone, Debug)]
enum Op {
    Begin(Vec<u16>),
    AddAnswer(u32, u16),
    CloseAnswer(Side, u32, u16),
    StreamEnd(u16, u32, StreamEndReason),
    TakeoverBegin(u16),
    StreamReq(u16, u32),
    SetVbState(u32, VbState),
    SetVbStateAnswer(u32, u16),
    MaybeClose(u16),
    Shut,
    Deadline,
    ConnectionLost,
}

fn vbucket() -> impl Strategy<Value = u16> {
    prop_oneof![
        12 => 0u16..6,
        1 => Just(1023u16),
        1 => Just(1024u16),
        1 => any::<u16>(),
    ]
}

fn opaque() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => 0u32..6,
        1 => Just(1023u32),
        1 => Just(65536u32 + 3),
        1 => any::<u32>(),
    ]
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        10 => Just(0u16),
        2 => Just(1u16),
        1 => Just(2u16),
        1 => Just(7u16),
        1 => Just(0x23u16),
        1 => any::<u16>(),
    ]
}

fn stream_end_reason() -> impl Strategy<Value = StreamEndReason> {
    prop_oneof![
        3 => Just(StreamEndReason::OK.0),
        6 => 1u32..=8,
        1 => 9u32..64,
        1 => Just(u32::MAX),
    ]
    .prop_map(StreamEndReason)
}

fn vb_state() -> impl Strategy<Value = VbState> {
    prop_oneof![
        4 => Just(VbState::ACTIVE),
        2 => Just(VbState::PENDING),
        1 => Just(VbState::REPLICA),
        1 => Just(VbState::DEAD),
        1 => any::<u8>().prop_map(VbState),
    ]
}

fn stream_opaque() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => prop::sample::select(&STREAM_OPAQUES[..]),
        1 => any::<u32>(),
    ]
}

fn wanted() -> impl Strategy<Value = Vec<u16>> {
    prop_oneof![
        8 => prop::collection::vec(0u16..6, 0..6),
        1 => prop::collection::vec(vbucket(), 0..4),
        1 => (1usize..64).prop_map(|stride| (0..MAX_VBUCKETS as u16).step_by(stride).collect()),
    ]
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Consumer), Just(Side::Producer)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => wanted().prop_map(Op::Begin),
        8 => (opaque(), status()).prop_map(|(o, s)| Op::AddAnswer(o, s)),
        8 => (side(), opaque(), status()).prop_map(|(d, o, s)| Op::CloseAnswer(d, o, s)),
        6 => (vbucket(), any::<u32>(), stream_end_reason()).prop_map(|(v, o, r)| Op::StreamEnd(v, o, r)),
        2 => vbucket().prop_map(Op::TakeoverBegin),
        2 => (vbucket(), stream_opaque()).prop_map(|(v, o)| Op::StreamReq(v, o)),
        2 => (stream_opaque(), vb_state()).prop_map(|(o, s)| Op::SetVbState(o, s)),
        2 => (stream_opaque(), status()).prop_map(|(o, s)| Op::SetVbStateAnswer(o, s)),
        1 => vbucket().prop_map(Op::MaybeClose),
        1 => Just(Op::Shut),
        1 => Just(Op::Deadline),
        1 => Just(Op::ConnectionLost),
    ]
}

// ---------------------------------------------------------------------------------------------
// The harness: machine and model side by side, plus the caller's view for liveness.

struct Harness {
    machine: Setup,
    model: Model,
    /// A caller is waiting for the machine's reply.
    waiting: bool,
    replies: usize,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            machine: Setup::new(),
            model: Model::new(),
            waiting: false,
            replies: 0,
        }
    }

    fn check_agree(&self, what: &str) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            self.machine.info(),
            self.model.info(),
            "state after {}",
            what
        );
        let busy = matches!(self.machine.phase(), Phase::SettingUp | Phase::Takeover);
        prop_assert_eq!(
            busy,
            self.waiting,
            "busy <=> a caller waits, after {}",
            what
        );
        Ok(())
    }

    /// A request that may leave a caller waiting.
    fn start(
        &mut self,
        got: Result<Start, Refusal>,
        want: Result<Start, Refusal>,
        what: &str,
        new_waiter: bool,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(&got, &want, "{}", what);
        if new_waiter {
            if let Ok(Start::Send(_)) = got {
                prop_assert!(!self.waiting, "a second caller would wait: {}", what);
                self.waiting = true;
            }
        }
        Ok(())
    }

    fn outcome(&mut self, got: Outcome, want: Outcome, what: &str) -> Result<(), TestCaseError> {
        prop_assert_eq!(&got, &want, "{}", what);
        match got {
            Outcome::Reply(_) => {
                prop_assert!(
                    self.waiting,
                    "reply with nobody waiting (a second reply?): {}",
                    what
                );
                self.waiting = false;
                self.replies += 1;
            }
            Outcome::UnexpectedResponse { .. } => {
                // The connection answers a waiting caller through connection_lost, then stops.
                let got = self.machine.connection_lost();
                let want = self.model.connection_lost();
                self.outcome(got, want, "connection_lost after a violation")?;
            }
            Outcome::NoReply => {}
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let what = format!("{op:?}");
        match op {
            Op::Begin(vbs) => {
                let got = self.machine.begin(vbs);
                let want = self.model.begin(vbs);
                self.start(got, want, &what, true)?;
            }
            Op::MaybeClose(vb) => {
                let got = self.machine.maybe_close_stream(*vb);
                let want = self.model.maybe_close_stream(*vb);
                self.start(got, want, &what, true)?;
            }
            Op::TakeoverBegin(vb) => {
                let got = self.machine.takeover_begin(*vb).map(Start::Send);
                let want = self.model.takeover_begin(*vb).map(Start::Send);
                self.start(got, want, &what, true)?;
            }
            Op::Shut => {
                // Only a shut from idle makes its own caller wait for the machine's reply.
                let from_idle = self.machine.phase() == Phase::Idle;
                let got = self.machine.shut();
                let want = self.model.shut();
                self.start(got, want, &what, from_idle)?;
            }
            Op::AddAnswer(o, s) => {
                let got = self.machine.add_stream_response(*o, *s);
                let want = self.model.add_stream_response(*o, *s);
                self.outcome(got, want, &what)?;
            }
            Op::CloseAnswer(side, o, s) => {
                let got = self.machine.close_stream_response(*side, *o, *s);
                let want = self.model.close_stream_response(*side, *o, *s);
                self.outcome(got, want, &what)?;
            }
            Op::StreamEnd(vb, o, r) => {
                let got = self.machine.stream_end(*vb, *o, *r);
                let want = self.model.stream_end(*vb, *r);
                self.outcome(got, want, &what)?;
            }
            Op::StreamReq(vb, o) => {
                let got = self.machine.stream_req(*vb, *o);
                let want = self.model.stream_req(*vb, *o);
                self.outcome(got, want, &what)?;
            }
            Op::SetVbState(o, s) => {
                let got = self.machine.set_vbucket_state(*o, *s);
                let want = self.model.set_vbucket_state(*o, *s);
                self.outcome(got, want, &what)?;
            }
            Op::SetVbStateAnswer(o, s) => {
                let got = self.machine.set_vbucket_state_response(*o, *s);
                let want = self.model.set_vbucket_state_response(*o, *s);
                self.outcome(got, want, &what)?;
            }
            Op::Deadline => {
                let got = self.machine.deadline();
                let want = self.model.deadline();
                self.outcome(got, want, &what)?;
            }
            Op::ConnectionLost => {
                let got = self.machine.connection_lost();
                let want = self.model.connection_lost();
                self.outcome(got, want, &what)?;
            }
        }
        self.check_agree(&what)
    }

    /// Liveness: answer everything still outstanding (successfully, in the given order), or
    /// fire the deadline; either way the waiting caller must end up with exactly one reply.
    fn finish(&mut self, by_deadline: bool, reverse: bool) -> Result<(), TestCaseError> {
        let replies_before = self.replies;
        let was_waiting = self.waiting;
        if by_deadline {
            self.apply(&Op::Deadline)?;
        } else {
            let info = self.machine.info();
            let mut answers: Vec<Op> = Vec::new();
            answers.extend(
                info.pending_adds
                    .iter()
                    .map(|&vb| Op::AddAnswer(vb.into(), 0)),
            );
            answers.extend(
                info.pending_closes_consumer
                    .iter()
                    .map(|&vb| Op::CloseAnswer(Side::Consumer, vb.into(), 1)),
            );
            answers.extend(
                info.pending_closes_producer
                    .iter()
                    .flatten()
                    .map(|&vb| Op::CloseAnswer(Side::Producer, vb.into(), 0)),
            );
            if reverse {
                answers.reverse();
            }
            if let Some(t) = info.takeover {
                // The set-vbucket-state exchange is ordered; the add's answer may come first or last.
                let stream_opaque = t.opaque.unwrap_or(0x7777);
                let ack = (!t.add_acked).then_some(Op::AddAnswer(t.vbucket.into(), 0));
                if reverse {
                    answers.extend(ack.clone());
                }
                answers.push(Op::StreamReq(t.vbucket, stream_opaque));
                if t.stage != TakeoverStage::Active {
                    answers.push(Op::SetVbStateAnswer(stream_opaque, 0)); // clears a pending request
                    answers.push(Op::SetVbState(stream_opaque, VbState::ACTIVE));
                    answers.push(Op::SetVbStateAnswer(stream_opaque, 0));
                }
                if !reverse {
                    answers.extend(ack);
                }
            }
            for answer in &answers {
                self.apply(answer)?;
            }
        }
        prop_assert!(
            !self.waiting,
            "caller still waiting after everything was answered"
        );
        prop_assert_eq!(
            self.replies - replies_before,
            usize::from(was_waiting),
            "exactly one reply for the waiting caller"
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // 3 properties x 4000 sequences take about 2 s in release (`make test`); debug builds run fewer.
        cases: if cfg!(debug_assertions) { 400 } else { 4000 },
        max_shrink_iters: 20_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn machine_agrees_with_model_and_never_leaves_a_caller_waiting(
        ops in prop::collection::vec(op(), 1..80),
        by_deadline in any::<bool>(),
        reverse in any::<bool>(),
    ) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op)?;
        }
        h.finish(by_deadline, reverse)?;
    }

    /// Setups that are mostly answered: rounds of begin + answers to outstanding requests in a
    /// random order, with stream ends, shuts and deadlines interleaved, so replies with mixed
    /// errors and shuts of half-answered setups are common.
    #[test]
    fn answered_setups_agree_with_model(
        rounds in prop::collection::vec(
            (prop::collection::vec(0u16..8, 0..8),
             prop::collection::vec(
                 (any::<u8>(), status(), stream_end_reason(), any::<bool>(), 0u8..40),
                 0..16)),
            1..8),
    ) {
        let mut h = Harness::new();
        for (wanted, events) in &rounds {
            if h.machine.phase() == Phase::Shut {
                h = Harness::new();
            }
            h.apply(&Op::Begin(wanted.clone()))?;
            for &(pick, status, reason_code, end_first, interrupt) in events {
                match interrupt {
                    0..=2 => h.apply(&Op::Shut)?,
                    3 => h.apply(&Op::Deadline)?,
                    _ => {}
                }
                let info = h.machine.info();
                let mut outstanding: Vec<Op> = info.pending_adds.iter().map(|&vb| Op::AddAnswer(vb.into(), status)).collect();
                outstanding.extend(info.pending_closes_consumer.iter().map(|&vb| Op::CloseAnswer(Side::Consumer, vb.into(), status)));
                outstanding.extend(info.pending_closes_producer.iter().flatten().map(|&vb| Op::CloseAnswer(Side::Producer, vb.into(), status)));
                if outstanding.is_empty() {
                    break;
                }
                let op = outstanding[usize::from(pick) % outstanding.len()].clone();
                if end_first {
                    if let Op::AddAnswer(vb, _) = op {
                        h.apply(&Op::StreamEnd(vb as u16, 0xabcd, reason_code))?;
                    }
                }
                h.apply(&op)?;
            }
            h.finish(false, false)?;
        }
    }

    /// Takeovers with the exchange's events in random order and with random contents.
    #[test]
    fn takeovers_agree_with_model(
        active in prop::collection::vec(0u16..4, 0..3),
        vb in 0u16..4,
        events in prop::collection::vec(
            prop_oneof![
                3 => (0u16..4, stream_opaque()).prop_map(|(v, o)| Op::StreamReq(v, o)),
                4 => (stream_opaque(), vb_state()).prop_map(|(o, s)| Op::SetVbState(o, s)),
                4 => (stream_opaque(), status()).prop_map(|(o, s)| Op::SetVbStateAnswer(o, s)),
                3 => (0u32..4, status()).prop_map(|(o, s)| Op::AddAnswer(o, s)),
                2 => (0u16..4, any::<u32>(), stream_end_reason()).prop_map(|(v, o, r)| Op::StreamEnd(v, o, r)),
                1 => (0u16..4).prop_map(Op::TakeoverBegin),
                1 => Just(Op::Shut),
                1 => Just(Op::Deadline),
            ],
            0..24),
        by_deadline in any::<bool>(),
    ) {
        let mut h = Harness::new();
        h.apply(&Op::Begin(active.clone()))?;
        h.finish(false, false)?;
        h.apply(&Op::TakeoverBegin(vb))?;
        for op in &events {
            h.apply(op)?;
        }
        h.finish(by_deadline, false)?;
    }
}
