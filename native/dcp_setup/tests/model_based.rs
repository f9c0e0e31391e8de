//! Model-based test: random sequences run the machine against a model of the two nodes around it.
//! The model consumer handles the requests in the order they were sent (as a memcached does) and
//! its answers reach the machine in any order, late, after the deadline, after a shut, or (the
//! MB-53445 path, only for an add whose stream ended) never; the model producer answers its closes
//! in any order and ends streams at any time, takeover streams included, at every stage.
//!
//! Properties, checked after every step:
//! - every request the machine started gets exactly one reply (a shut over a setup or takeover
//!   shares that one's reply), and the machine is busy exactly while a caller waits;
//! - every genuine answer is recognised (never an unexpected response), every made-up one is not;
//! - the consumer never sees an ADD_STREAM for a vbucket that has a stream (kv_engine would refuse
//!   it with key_eexists): no second add while the first is owed;
//! - whenever no request or answer is in flight, the machine's active set equals the streams the
//!   model consumer holds;
//!
//! and at the end of every sequence, once everything is answered: no caller is left waiting, and
//! the retry of a setup succeeds with the active set equal to what it asked for.

mod common;

use std::collections::{BTreeSet, VecDeque};

use common::{owed_opaque, Drive};
use dcp_setup::{
    Action, Event, Input, Outcome, Phase, Reply, Request, Response, Setup, Side, Start,
    StreamEndReason, TakeoverStage, VbState, Why,
};
use proptest::prelude::*;

const VBS: u16 = 5;

fn takeover_stream_opaque(vb: u16) -> u32 {
    0x5000 + u32::from(vb)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    Add {
        vb: u16,
        opaque: u32,
        takeover: bool,
    },
    Close {
        vb: u16,
        opaque: u32,
    },
    StreamEnd {
        vb: u16,
    },
}

/// An answer on its way from the consumer.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    item: Item,
    status: u16,
    /// A stream end for its vbucket reached the consumer after it: it may never be answered.
    may_vanish: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Begin(Vec<u16>),
    MaybeClose(u16),
    Takeover(u16),
    Shut,
    Deadline,
    /// The consumer handles its next input; an add succeeds unless `fail`.
    Process {
        fail: bool,
    },
    /// The i-th answer in flight reaches the machine.
    Deliver(usize),
    /// The i-th answer in flight is never sent (only an add whose stream ended).
    Vanish(usize),
    /// The i-th producer close is answered with this status.
    ProducerAnswer(usize, u16),
    /// The producer ends vbucket's stream (for a takeover, the takeover stream).
    StreamEnd(u16, StreamEndReason),
    /// The takeover exchange moves one step, if it can.
    TakeoverStep,
    /// An answer nobody asked for: a bare vbucket as its opaque.
    Garbage(u16),
}

struct World {
    machine: Setup,
    inbox: VecDeque<Item>,
    in_flight: Vec<InFlight>,
    producer_closes: Vec<u32>,
    held: BTreeSet<u16>,
    takeover_streams: BTreeSet<u16>,
    /// The takeover exchange as the nodes see it: the consumer's STREAM_REQ was sent, the switch
    /// to active was acknowledged.
    stream_req_sent: Option<u16>,
    switched: bool,
    waiting: usize,
    requests: usize,
    replies: usize,
}

impl World {
    fn new() -> World {
        World {
            machine: Setup::new(),
            inbox: VecDeque::new(),
            in_flight: Vec::new(),
            producer_closes: Vec::new(),
            held: BTreeSet::new(),
            takeover_streams: BTreeSet::new(),
            stream_req_sent: None,
            switched: false,
            waiting: 0,
            requests: 0,
            replies: 0,
        }
    }

    fn started(&mut self, started: Result<Start, dcp_setup::Refusal>) {
        if let Ok(Start::Send(actions)) = started {
            self.waiting += 1;
            self.requests += 1;
            for a in actions {
                match a {
                    Action::AddStream {
                        vbucket,
                        opaque,
                        flags,
                    } => self.inbox.push_back(Item::Add {
                        vb: vbucket,
                        opaque,
                        takeover: flags != 0,
                    }),
                    Action::CloseStream {
                        side: Side::Consumer,
                        vbucket,
                        opaque,
                    } => self.inbox.push_back(Item::Close {
                        vb: vbucket,
                        opaque,
                    }),
                    Action::CloseStream { opaque, .. } => self.producer_closes.push(opaque),
                }
            }
        }
    }

    fn outcome(&mut self, got: Outcome, what: &str) -> Result<(), TestCaseError> {
        match got {
            Outcome::NoReply | Outcome::Absorbed => {}
            Outcome::Reply(reply) => {
                prop_assert!(
                    self.waiting > 0,
                    "reply with nobody waiting: {} {:?}",
                    what,
                    reply
                );
                if self.switched && reply == Reply::Ok {
                    // A completed takeover: the producer ends the takeover stream.
                    if let Some(vb) = self.stream_req_sent {
                        self.inbox.push_back(Item::StreamEnd { vb });
                    }
                }
                self.replies += self.waiting;
                self.waiting = 0;
                if self.machine.phase() != Phase::Takeover {
                    self.stream_req_sent = None;
                    self.switched = false;
                }
            }
            Outcome::UnexpectedResponse { .. } => {
                prop_assert!(
                    false,
                    "a genuine answer was not recognised: {} {:?}",
                    what,
                    got
                );
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let what = format!("{op:?}");
        match op {
            Op::Begin(vbs) => {
                let r = self.machine.request(Request::Begin(vbs));
                // A list naming a vbucket twice is refused, whatever the machine is doing.
                if let Some(dup) = first_duplicate(vbs) {
                    prop_assert_eq!(r, Err(dcp_setup::Refusal::DuplicateVbucket(dup)));
                    return Ok(());
                }
                self.started(r);
            }
            Op::MaybeClose(vb) => {
                let r = self.machine.request(Request::MaybeCloseStream(*vb));
                self.started(r);
            }
            Op::Takeover(vb) => {
                let r = self.machine.request(Request::Takeover(*vb));
                if r.is_ok() {
                    self.stream_req_sent = None;
                    self.switched = false;
                }
                self.started(r);
            }
            Op::Shut => {
                let r = self.machine.request(Request::Shut);
                self.started(r);
            }
            Op::Deadline => {
                let got = self.machine.event(Input::Deadline);
                self.outcome(got, &what)?;
            }
            Op::Process { fail } => self.process(*fail)?,
            Op::Deliver(i) => {
                if !self.in_flight.is_empty() {
                    let a = self.in_flight.remove(i % self.in_flight.len());
                    self.deliver(a, &what)?;
                }
            }
            Op::Vanish(i) => {
                if !self.in_flight.is_empty() {
                    let i = i % self.in_flight.len();
                    if self.in_flight[i].may_vanish {
                        self.in_flight.remove(i);
                    }
                }
            }
            Op::ProducerAnswer(i, status) => {
                if !self.producer_closes.is_empty() {
                    let opaque = self.producer_closes.remove(i % self.producer_closes.len());
                    let got = self.machine.event(Input::Frame(
                        Side::Producer,
                        Event::CloseStreamResponse {
                            opaque,
                            status: *status,
                        },
                    ));
                    self.outcome(got, &what)?;
                }
            }
            Op::StreamEnd(vb, reason) => {
                let opaque = if self.takeover_streams.contains(vb) {
                    takeover_stream_opaque(*vb)
                } else {
                    0xabcd
                };
                let got = self.machine.stream_end(*vb, opaque, *reason);
                self.outcome(got, &what)?;
                for a in self.in_flight.iter_mut() {
                    if matches!(a.item, Item::Add { vb: v, .. } if v == *vb) {
                        a.may_vanish = true;
                    }
                }
                self.inbox.push_back(Item::StreamEnd { vb: *vb });
            }
            Op::TakeoverStep => self.takeover_step(&what)?,
            Op::Garbage(vb) => {
                let got = self.machine.add_stream_response_raw(u32::from(*vb), 0);
                let shut = self.machine.phase() == Phase::Shut;
                prop_assert!(
                    shut || matches!(got, Outcome::UnexpectedResponse { .. }),
                    "a made-up answer was applied: {:?}",
                    got
                );
                if !shut {
                    // The connection stops: the waiting caller is answered, the world starts anew.
                    let got = self.machine.event(Input::ConnectionLost);
                    self.outcome(got, "connection lost")?;
                    prop_assert_eq!(self.waiting, 0);
                    let (requests, replies) = (self.requests, self.replies);
                    *self = World::new();
                    self.requests = requests;
                    self.replies = replies;
                }
            }
        }
        self.check(&what)
    }

    fn process(&mut self, fail: bool) -> Result<(), TestCaseError> {
        let Some(item) = self.inbox.pop_front() else {
            return Ok(());
        };
        let status = match item {
            Item::Add { vb, takeover, .. } => {
                prop_assert!(
                    !self.held.contains(&vb) && !self.takeover_streams.contains(&vb),
                    "ADD_STREAM for vbucket {} which has a stream (key_eexists)",
                    vb
                );
                if fail {
                    7
                } else {
                    if takeover {
                        self.takeover_streams.insert(vb);
                    } else {
                        self.held.insert(vb);
                    }
                    0
                }
            }
            Item::Close { vb, .. } => {
                let had = self.held.remove(&vb) | self.takeover_streams.remove(&vb);
                if had {
                    0
                } else {
                    1
                }
            }
            Item::StreamEnd { vb } => {
                self.held.remove(&vb);
                self.takeover_streams.remove(&vb);
                return Ok(());
            }
        };
        self.in_flight.push(InFlight {
            item,
            status,
            may_vanish: false,
        });
        Ok(())
    }

    fn deliver(&mut self, a: InFlight, what: &str) -> Result<(), TestCaseError> {
        let got = match a.item {
            Item::Add { opaque, .. } => self.machine.add_stream_response_raw(opaque, a.status),
            Item::Close { opaque, .. } => self.machine.event(Input::Frame(
                Side::Consumer,
                Event::CloseStreamResponse {
                    opaque,
                    status: a.status,
                },
            )),
            Item::StreamEnd { .. } => unreachable!("stream ends are not answered"),
        };
        self.outcome(got, what)
    }

    /// The consumer's STREAM_REQ once it holds the takeover stream, then the producer's switch to
    /// active and the consumer's acknowledgement.
    fn takeover_step(&mut self, what: &str) -> Result<(), TestCaseError> {
        let Some(t) = self.machine.info().takeover else {
            return Ok(());
        };
        let vb = t.vbucket;
        if !self.takeover_streams.contains(&vb) {
            return Ok(());
        }
        let opaque = takeover_stream_opaque(vb);
        if self.stream_req_sent.is_none() {
            self.stream_req_sent = Some(vb);
            let got = self.machine.stream_req(vb, opaque);
            return self.outcome(got, what);
        }
        if !self.switched && t.stage == TakeoverStage::OpaqueKnown {
            self.switched = true;
            let got = self.machine.set_vbucket_state(opaque, VbState::ACTIVE);
            self.outcome(got, what)?;
            let got = self.machine.set_vbucket_state_response(opaque, 0);
            return self.outcome(got, what);
        }
        Ok(())
    }

    fn quiet(&self) -> bool {
        self.inbox.is_empty() && self.in_flight.is_empty()
    }

    fn check(&self, what: &str) -> Result<(), TestCaseError> {
        let busy = matches!(self.machine.phase(), Phase::SettingUp | Phase::Takeover);
        prop_assert_eq!(
            busy,
            self.waiting > 0,
            "busy <=> a caller waits, after {}",
            what
        );
        if self.quiet() && !matches!(self.machine.phase(), Phase::Shut | Phase::Takeover) {
            let held: Vec<u16> = self.held.union(&self.takeover_streams).copied().collect();
            prop_assert_eq!(
                self.machine.partitions(),
                held,
                "active set == the consumer's streams, after {}",
                what
            );
        }
        Ok(())
    }

    /// Everything in flight is handled and answered (adds succeed, in order); the producer
    /// answers its closes; a takeover completes; the deadline ends what cannot.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..64 {
            while !self.inbox.is_empty() {
                self.apply(&Op::Process { fail: false })?;
            }
            while !self.in_flight.is_empty() {
                self.apply(&Op::Deliver(0))?;
            }
            while !self.producer_closes.is_empty() {
                self.apply(&Op::ProducerAnswer(0, 0))?;
            }
            self.apply(&Op::TakeoverStep)?;
            if self.quiet() && self.producer_closes.is_empty() && self.waiting == 0 {
                return Ok(());
            }
            if self.quiet() && self.producer_closes.is_empty() {
                self.apply(&Op::TakeoverStep)?;
                if self.waiting > 0 && self.quiet() {
                    self.apply(&Op::Deadline)?;
                }
            }
        }
        prop_assert!(false, "the nodes never settled");
        Ok(())
    }

    fn finish(&mut self, retry: &[u16]) -> Result<(), TestCaseError> {
        self.drain()?;
        prop_assert_eq!(self.waiting, 0, "a caller is still waiting");
        prop_assert_eq!(self.replies, self.requests, "one reply per request");
        if self.machine.phase() == Phase::Shut {
            return Ok(());
        }
        let held: Vec<u16> = self.held.union(&self.takeover_streams).copied().collect();
        prop_assert_eq!(self.machine.partitions(), held);
        // The retry of a setup succeeds once the consumer answers.
        let r = self.machine.request(Request::Begin(retry));
        let settled = matches!(r, Ok(Start::Settled));
        self.started(r);
        let before = self.replies;
        let mut last = None;
        for _ in 0..64 {
            while !self.inbox.is_empty() {
                self.apply(&Op::Process { fail: false })?;
            }
            if self.in_flight.is_empty() && self.producer_closes.is_empty() {
                break;
            }
            if !self.in_flight.is_empty() {
                let a = self.in_flight.remove(0);
                let got = match a.item {
                    Item::Add { opaque, .. } => {
                        self.machine.add_stream_response_raw(opaque, a.status)
                    }
                    Item::Close { opaque, .. } => self.machine.event(Input::Frame(
                        Side::Consumer,
                        Event::CloseStreamResponse {
                            opaque,
                            status: a.status,
                        },
                    )),
                    Item::StreamEnd { .. } => unreachable!(),
                };
                if let Outcome::Reply(r) = &got {
                    last = Some(r.clone());
                }
                self.outcome(got, "retry")?;
            } else {
                let opaque = self.producer_closes.remove(0);
                let got = self
                    .machine
                    .close_stream_response_raw(Side::Producer, opaque, 0);
                if let Outcome::Reply(r) = &got {
                    last = Some(r.clone());
                }
                self.outcome(got, "retry")?;
            }
        }
        prop_assert_eq!(self.waiting, 0, "the retry is answered");
        if !settled {
            prop_assert_eq!(self.replies, before + 1);
            prop_assert_eq!(last, Some(Reply::Ok), "the retry succeeds");
        }
        let mut want: Vec<u16> = retry.to_vec();
        want.sort_unstable();
        want.dedup();
        prop_assert_eq!(self.machine.partitions(), want.clone());
        prop_assert_eq!(
            self.held
                .union(&self.takeover_streams)
                .copied()
                .collect::<Vec<_>>(),
            want
        );
        Ok(())
    }
}

/// Exact-opaque answers (the common helpers map bare vbuckets; these must not).
trait Raw {
    fn add_stream_response_raw(&mut self, opaque: u32, status: u16) -> Outcome;
    fn close_stream_response_raw(&mut self, side: Side, opaque: u32, status: u16) -> Outcome;
}

impl Raw for Setup {
    fn add_stream_response_raw(&mut self, opaque: u32, status: u16) -> Outcome {
        self.event(Input::Frame(
            Side::Consumer,
            Event::AddStreamResponse {
                opaque,
                status,
                stream_opaque: None,
            },
        ))
    }
    fn close_stream_response_raw(&mut self, side: Side, opaque: u32, status: u16) -> Outcome {
        self.event(Input::Frame(
            side,
            Event::CloseStreamResponse { opaque, status },
        ))
    }
}

fn reason() -> impl Strategy<Value = StreamEndReason> {
    prop_oneof![3 => Just(0u32), 6 => 1u32..=8, 1 => Just(42u32)].prop_map(StreamEndReason)
}

/// Vbucket lists, some naming a vbucket twice.
fn wanted() -> impl Strategy<Value = Vec<u16>> {
    prop::collection::vec(0..VBS, 0..4)
}

fn first_duplicate(vbs: &[u16]) -> Option<u16> {
    let mut seen = BTreeSet::new();
    vbs.iter().copied().find(|vb| !seen.insert(*vb))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => wanted().prop_map(Op::Begin),
        1 => (0..VBS).prop_map(Op::MaybeClose),
        2 => (0..VBS).prop_map(Op::Takeover),
        1 => Just(Op::Shut),
        3 => Just(Op::Deadline),
        10 => prop::bool::weighted(0.15).prop_map(|fail| Op::Process { fail }),
        8 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::Vanish),
        3 => (any::<usize>(), prop_oneof![Just(0u16), Just(1u16), Just(0x20u16)])
            .prop_map(|(i, s)| Op::ProducerAnswer(i, s)),
        2 => (0..VBS, reason()).prop_map(|(v, r)| Op::StreamEnd(v, r)),
        3 => Just(Op::TakeoverStep),
        1 => (0..VBS).prop_map(Op::Garbage),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if cfg!(debug_assertions) { 300 } else { 3000 },
        max_shrink_iters: 20_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn machine_never_diverges_from_the_consumer(
        ops in prop::collection::vec(op(), 1..80),
        retry in wanted(),
    ) {
        let mut w = World::new();
        for op in &ops {
            w.apply(op)?;
        }
        let mut retry = retry;
        retry.sort_unstable();
        retry.dedup();
        w.finish(&retry)?;
    }
}

#[test]
fn owed_opaque_helper_sees_the_request() {
    // The helper the unit tests lean on names the request the machine sent.
    let mut s = Setup::new();
    let Ok(Start::Send(actions)) = s.begin(&[2]) else {
        panic!("no add")
    };
    assert_eq!(actions.len(), 1);
    let opaque = owed_opaque(&s, 2, Response::AddStream).expect("owed");
    assert_eq!(opaque & 0x3ff, 2);
    assert_eq!(
        s.add_stream_response_raw(opaque, 0),
        Outcome::Reply(Reply::Ok)
    );
    let _ = Why::SetupTimeout;
}
