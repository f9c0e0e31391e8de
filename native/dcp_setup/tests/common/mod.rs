//! The tests' names for the machine's inputs: each one goes through the machine's one entry point
//! for events (`Setup::event`) or for requests (`Setup::request`), as the NIF sends them.
//!
//! Opaques: the machine's opaques name requests (a generation above the vbucket's 10 bits). These
//! helpers check that every action's opaque names its vbucket and is unique among the owed
//! requests, then show it as the bare vbucket; an answer given with a bare vbucket as its opaque
//! is sent with the opaque of the newest owed request of that kind for that vbucket (the raw
//! `Setup::event` is there for answers with exact opaques).
#![allow(dead_code)]

use dcp_setup::{
    Action, Event, Input, Outcome, Phase, Refusal, Reply, Request, Response, Setup, Side, Start,
    StreamEndReason, VbState, Why, MAX_VBUCKETS,
};

/// The opaque of the newest owed request of `kind` for `vb`, if any.
pub fn owed_opaque(s: &Setup, vb: u16, kind: Response) -> Option<u32> {
    s.info()
        .owed
        .iter()
        .rev()
        .find(|o| o.vbucket == vb && o.request == kind)
        .map(|o| o.opaque)
}

/// A test's opaque: a bare vbucket stands for the newest owed request of that kind.
fn real_opaque(s: &Setup, opaque: u32, kind: Response) -> u32 {
    if opaque < MAX_VBUCKETS as u32 {
        owed_opaque(s, opaque as u16, kind).unwrap_or(opaque)
    } else {
        opaque
    }
}

fn bare(s: &Setup, actions: Vec<Action>) -> Vec<Action> {
    let owed = s.info().owed;
    actions
        .into_iter()
        .map(|a| match a {
            Action::AddStream {
                vbucket,
                opaque,
                flags,
            } => {
                check_opaque(&owed, vbucket, opaque);
                Action::AddStream {
                    vbucket,
                    opaque: vbucket.into(),
                    flags,
                }
            }
            Action::CloseStream {
                side,
                vbucket,
                opaque,
            } => {
                check_opaque(&owed, vbucket, opaque);
                Action::CloseStream {
                    side,
                    vbucket,
                    opaque: vbucket.into(),
                }
            }
        })
        .collect()
}

fn check_opaque(owed: &[dcp_setup::OwedInfo], vb: u16, opaque: u32) {
    assert_eq!(opaque & 0x3ff, u32::from(vb), "opaque names its vbucket");
    assert_eq!(
        owed.iter().filter(|o| o.opaque == opaque).count(),
        1,
        "opaque {opaque:#x} names one owed request"
    );
}

fn bare_start(s: &Setup, started: Result<Start, Refusal>) -> Result<Start, Refusal> {
    match started {
        Ok(Start::Send(actions)) => Ok(Start::Send(bare(s, actions))),
        other => other,
    }
}

pub trait Drive {
    fn begin(&mut self, wanted: &[u16]) -> Result<Start, Refusal>;
    fn maybe_close_stream(&mut self, vb: u16) -> Result<Start, Refusal>;
    fn shut(&mut self) -> Result<Start, Refusal>;
    /// A takeover always sends its add (or is refused).
    fn takeover_begin(&mut self, vb: u16) -> Result<Vec<Action>, Refusal>;
    fn add_stream_response(&mut self, opaque: u32, status: u16) -> Outcome;
    fn close_stream_response(&mut self, side: Side, opaque: u32, status: u16) -> Outcome;
    /// `opaque` is the frame's (the consumer's own stream opaque): the machine must ignore it.
    fn stream_end(&mut self, vb: u16, opaque: u32, reason: StreamEndReason) -> Outcome;
    fn stream_req(&mut self, vb: u16, opaque: u32) -> Outcome;
    fn set_vbucket_state(&mut self, opaque: u32, state: VbState) -> Outcome;
    fn set_vbucket_state_response(&mut self, opaque: u32, status: u16) -> Outcome;
    fn deadline(&mut self) -> Outcome;
    fn connection_lost(&mut self) -> Outcome;
}

fn frame(s: &mut Setup, side: Side, event: Event) -> Outcome {
    s.event(Input::Frame(side, event))
}

impl Drive for Setup {
    fn begin(&mut self, wanted: &[u16]) -> Result<Start, Refusal> {
        let started = self.request(Request::Begin(wanted));
        bare_start(self, started)
    }
    fn maybe_close_stream(&mut self, vb: u16) -> Result<Start, Refusal> {
        let started = self.request(Request::MaybeCloseStream(vb));
        bare_start(self, started)
    }
    fn shut(&mut self) -> Result<Start, Refusal> {
        let started = self.request(Request::Shut);
        bare_start(self, started)
    }
    fn takeover_begin(&mut self, vb: u16) -> Result<Vec<Action>, Refusal> {
        match self.request(Request::Takeover(vb))? {
            Start::Send(actions) => Ok(bare(self, actions)),
            Start::Settled => panic!("a takeover settled without sending its add"),
        }
    }
    fn add_stream_response(&mut self, opaque: u32, status: u16) -> Outcome {
        let opaque = real_opaque(self, opaque, Response::AddStream);
        let stream_opaque = (status == 0).then_some(0x1_0000 + opaque);
        let event = Event::AddStreamResponse {
            opaque,
            status,
            stream_opaque,
        };
        frame(self, Side::Consumer, event)
    }
    fn close_stream_response(&mut self, side: Side, opaque: u32, status: u16) -> Outcome {
        let opaque = real_opaque(self, opaque, Response::CloseStream(side));
        frame(self, side, Event::CloseStreamResponse { opaque, status })
    }
    fn stream_end(&mut self, vbucket: u16, opaque: u32, reason: StreamEndReason) -> Outcome {
        let event = Event::StreamEnd {
            vbucket,
            opaque,
            reason,
        };
        frame(self, Side::Producer, event)
    }
    fn stream_req(&mut self, vbucket: u16, opaque: u32) -> Outcome {
        frame(self, Side::Consumer, Event::StreamReq { vbucket, opaque })
    }
    fn set_vbucket_state(&mut self, opaque: u32, state: VbState) -> Outcome {
        // The machine matches the request by its opaque; the vbucket is informational.
        let event = Event::SetVbucketState {
            vbucket: 0,
            opaque,
            state,
        };
        frame(self, Side::Producer, event)
    }
    fn set_vbucket_state_response(&mut self, opaque: u32, status: u16) -> Outcome {
        frame(
            self,
            Side::Consumer,
            Event::SetVbucketStateResponse { opaque, status },
        )
    }
    fn deadline(&mut self) -> Outcome {
        self.event(Input::Deadline)
    }
    fn connection_lost(&mut self) -> Outcome {
        self.event(Input::ConnectionLost)
    }
}

pub fn add(vb: u16) -> Action {
    Action::AddStream {
        vbucket: vb,
        opaque: vb.into(),
        flags: 0,
    }
}

pub fn takeover_add(vb: u16) -> Action {
    Action::AddStream {
        vbucket: vb,
        opaque: vb.into(),
        flags: 1,
    }
}

pub fn close(side: Side, vb: u16) -> Action {
    Action::CloseStream {
        side,
        vbucket: vb,
        opaque: vb.into(),
    }
}

pub fn errors(list: &[(Why, u16)]) -> Outcome {
    Outcome::Reply(Reply::Errors(list.to_vec()))
}

/// A machine with `vbs` active (set up and answered).
pub fn with_active(vbs: &[u16]) -> Setup {
    let mut s = Setup::new();
    if let Ok(Start::Send(_)) = s.begin(vbs) {
        for &vb in vbs {
            s.add_stream_response(vb.into(), 0);
        }
    }
    assert_eq!(s.partitions(), vbs);
    assert_eq!(s.phase(), Phase::Idle);
    s
}
