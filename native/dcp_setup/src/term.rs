//! The Erlang terms of the machine (dcp_nif.erl's setup types), written down once, here: the
//! requests and events it reads (as `mcbp::Value`s) and the answers it gives (through an
//! `mcbp::Sink`). The NIF glue only converts. Where an answer echoes a part of the caller's own
//! term (`{bad_vbucket, Term}`, `{connection_lost, Reason}`), the caller's `part` gives that part
//! by its path: element indices, each into a tuple or a proper list.

use mcbp::{Kind, Sink, ToTerm, Value};

use crate::{
    Action, Input, Outcome, Phase, Refusal, Reply, Request, Response, Setup, SetupInfo, Start,
    TakeoverInfo, TakeoverStage, Why, MAX_VBUCKETS,
};

/// The atoms the terms below use besides mcbp's (`mcbp::term::ATOMS` and its names tables).
#[rustfmt::skip]
pub const ATOMS: &[&str] = &[
    "ok", "error", "undefined", "vbucket", "opaque", "stream_end", "consumer", "producer",
    "setup_streams", "takeover", "maybe_close_stream", "shut_connection", "shut", "deadline",
    "connection_lost", "send", "reply", "noreply", "stop", "errors", "mcbp_status",
    "setup_timeout", "busy", "bad_vbucket", "owed", "add_stream", "close_stream",
    "unexpected_response", "idle", "setting_up", "requested", "opaque_known", "active", "state",
    "pending_adds", "pending_closes_consumer", "pending_closes_producer", "next_state", "stage",
    "requested_state", "add_acked", "absorbed", "too_many_vbuckets", "duplicate_vbucket",
];

/// A vbucket named by the caller: 0..1023.
fn vbucket(v: &Value<'_>) -> Option<u16> {
    match *v {
        Value::Int(n) if n < MAX_VBUCKETS as u64 => Some(n as u16),
        _ => None,
    }
}

impl Setup {
    /// A request term (`{setup_streams, [VBucket]}`, `{takeover, VBucket}`,
    /// `{maybe_close_stream, VBucket}` or `shut_connection`) applied, and its answer; `None`
    /// (badarg) for any other term. A vbucket out of range is answered `{error, {bad_vbucket,
    /// Term}}` with the caller's term, and changes nothing.
    pub fn request_term<S: Sink>(
        &mut self,
        v: &Value<'_>,
        s: &mut S,
        part: impl FnOnce(&[usize]) -> S::Term,
    ) -> Option<S::Term> {
        let bad = |s: &mut S, path: &[usize]| {
            let why = [s.atom("bad_vbucket"), part(path)];
            let why = s.tuple(&why);
            let t = [s.atom("error"), why];
            Some(s.tuple(&t))
        };
        let started = match v {
            Value::Atom("shut_connection") => self.request(Request::Shut),
            Value::Tuple(t) => match t.as_slice() {
                // Longer than any valid list: refused unread (the reader stops at
                // mcbp::term::MAX_ITEMS, the machine at MAX_VBUCKETS).
                [Value::Atom("setup_streams"), Value::TooLong] => {
                    return Some(start(s, &Err(Refusal::TooManyVbuckets)));
                }
                [Value::Atom("setup_streams"), Value::List(items)] => {
                    if items.len() > MAX_VBUCKETS {
                        return Some(start(s, &Err(Refusal::TooManyVbuckets)));
                    }
                    let wanted: Option<Vec<u16>> = items.iter().map(vbucket).collect();
                    let Some(wanted) = wanted else {
                        let i = items.iter().position(|v| vbucket(v).is_none())?;
                        return bad(s, &[1, i]);
                    };
                    self.request(Request::Begin(&wanted))
                }
                // Not a proper list: the whole term is the bad part, as dcp_replicator says.
                [Value::Atom("setup_streams"), _] => return bad(s, &[1]),
                [Value::Atom(tag @ ("takeover" | "maybe_close_stream")), arg] => {
                    let Some(vb) = vbucket(arg) else {
                        return bad(s, &[1]);
                    };
                    self.request(match *tag {
                        "takeover" => Request::Takeover(vb),
                        _ => Request::MaybeCloseStream(vb),
                    })
                }
                _ => return None,
            },
            _ => return None,
        };
        Some(start(s, &started))
    }

    /// An event term (`{consumer | producer, SplitterEvent}`, `deadline` or
    /// `{connection_lost, Reason}`) applied, and its outcome; `None` (badarg) for any other term.
    pub fn event_term<S: Sink>(
        &mut self,
        v: &Value<'_>,
        s: &mut S,
        part: impl FnOnce(&[usize]) -> S::Term,
    ) -> Option<S::Term>
    where
        S::Term: Clone,
    {
        let (input, lost) = match v {
            Value::Atom("deadline") => (Input::Deadline, None),
            Value::Tuple(t) => match t.as_slice() {
                [Value::Atom("connection_lost"), _] => (Input::ConnectionLost, Some(part(&[1]))),
                [Value::Atom(side), e] => {
                    let side = mcbp::term::side_from_name(side)?;
                    (Input::Frame(side, mcbp::Event::from_value(e)?), None)
                }
                _ => return None,
            },
            _ => return None,
        };
        Some(outcome(s, &self.event(input), lost))
    }
}

/// What a request starts, or why it was refused.
pub fn start<S: Sink>(s: &mut S, started: &Result<Start, Refusal>) -> S::Term {
    let t = match started {
        Ok(Start::Settled) => [s.atom("reply"), s.atom("ok")],
        Ok(Start::Send(actions)) => {
            let list: Vec<S::Term> = actions.iter().map(|a| a.to_term(s)).collect();
            [s.atom("send"), s.list(&list)]
        }
        Err(Refusal::Busy) => [s.atom("error"), s.atom("busy")],
        Err(Refusal::Shut) => [s.atom("error"), s.atom("shut")],
        Err(Refusal::BadVbucket(vb)) => [s.atom("error"), s.tagged("bad_vbucket", &[(*vb).into()])],
        Err(Refusal::TooManyVbuckets) => [
            s.atom("error"),
            s.tagged("too_many_vbuckets", &[MAX_VBUCKETS as u64]),
        ],
        Err(Refusal::DuplicateVbucket(vb)) => [
            s.atom("error"),
            s.tagged("duplicate_vbucket", &[(*vb).into()]),
        ],
    };
    s.tuple(&t)
}

impl ToTerm for Action {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        match *self {
            Action::AddStream {
                vbucket,
                opaque,
                flags,
            } => s.tagged("add_stream", &[vbucket.into(), opaque.into(), flags.into()]),
            Action::CloseStream {
                side,
                vbucket,
                opaque,
            } => {
                let t = [
                    s.atom("close_stream"),
                    side.to_term(s),
                    s.int(vbucket.into()),
                    s.int(opaque.into()),
                ];
                s.tuple(&t)
            }
        }
    }
}

/// An outcome's term; `lost` is the caller's connection-lost reason (`undefined` when absent).
pub fn outcome<S: Sink>(s: &mut S, outcome: &Outcome, lost: Option<S::Term>) -> S::Term
where
    S::Term: Clone,
{
    let t = match outcome {
        Outcome::NoReply => return s.atom("noreply"),
        Outcome::Absorbed => [s.atom("noreply"), s.atom("absorbed")],
        Outcome::Reply(Reply::Ok) => [s.atom("reply"), s.atom("ok")],
        Outcome::Reply(Reply::Errors(list)) => {
            let list: Vec<S::Term> = (list.iter())
                .map(|&(why, vb)| error(s, why, vb, lost.clone()))
                .collect();
            let errors = [s.atom("errors"), s.list(&list)];
            [s.atom("reply"), s.tuple(&errors)]
        }
        Outcome::UnexpectedResponse { response, opaque } => {
            let what = match response {
                Response::AddStream => s.atom("add_stream"),
                Response::CloseStream(side) => {
                    let pair = [s.atom("close_stream"), side.to_term(s)];
                    s.tuple(&pair)
                }
            };
            let why = [s.atom("unexpected_response"), what, s.int((*opaque).into())];
            [s.atom("stop"), s.tuple(&why)]
        }
    };
    s.tuple(&t)
}

/// `{Why, {vbucket, VBucket}}`.
fn error<S: Sink>(s: &mut S, why: Why, vb: u16, lost: Option<S::Term>) -> S::Term {
    let why = match why {
        Why::McbpStatus(status) => s.tagged("mcbp_status", &[status.into()]),
        Why::StreamEnd(r) => {
            let pair = [s.atom("stream_end"), s.name(Kind::StreamEndReason, r.0)];
            s.tuple(&pair)
        }
        Why::SetupTimeout => s.atom("setup_timeout"),
        Why::ConnectionLost => {
            let reason = lost.unwrap_or_else(|| s.atom("undefined"));
            let pair = [s.atom("connection_lost"), reason];
            s.tuple(&pair)
        }
    };
    let t = [why, s.tagged("vbucket", &[vb.into()])];
    s.tuple(&t)
}

impl ToTerm for Phase {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        s.atom(match self {
            Phase::Idle => "idle",
            Phase::SettingUp => "setting_up",
            Phase::Takeover => "takeover",
            Phase::Shut => "shut",
        })
    }
}

impl ToTerm for TakeoverInfo {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        let keys =
            ["vbucket", "stage", "opaque", "requested_state", "add_acked"].map(|k| s.atom(k));
        let values = [
            s.int(self.vbucket.into()),
            s.atom(match self.stage {
                TakeoverStage::Requested => "requested",
                TakeoverStage::OpaqueKnown => "opaque_known",
                TakeoverStage::Active => "active",
            }),
            match self.opaque {
                Some(o) => s.int(o.into()),
                None => s.atom("undefined"),
            },
            match self.requested_state {
                Some(st) => s.name(Kind::VbState, st.0.into()),
                None => s.atom("undefined"),
            },
            s.atom(if self.add_acked { "true" } else { "false" }),
        ];
        s.map(&keys, &values)
    }
}

/// `setup_info`'s map.
impl ToTerm for SetupInfo {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        let vbs = |s: &mut S, vbs: &[u16]| {
            let items: Vec<S::Term> = vbs.iter().map(|v| s.int((*v).into())).collect();
            s.list(&items)
        };
        let errors: Vec<S::Term> = (self.errors.iter())
            .map(|&(why, vb)| error(s, why, vb, None))
            .collect();
        let keys = [
            "state",
            "active",
            "pending_adds",
            "pending_closes_consumer",
            "pending_closes_producer",
            "errors",
            "next_state",
            "takeover",
            "owed",
            "absorbed",
        ]
        .map(|k| s.atom(k));
        let values = [
            self.phase.to_term(s),
            vbs(s, &self.active),
            vbs(s, &self.pending_adds),
            vbs(s, &self.pending_closes_consumer),
            vbs(s, &self.pending_closes_producer),
            s.list(&errors),
            match self.next {
                Some(p) => p.to_term(s),
                None => s.atom("undefined"),
            },
            match &self.takeover {
                Some(t) => t.to_term(s),
                None => s.atom("undefined"),
            },
            s.int(self.owed.len() as u64),
            s.int(self.absorbed),
        ];
        s.map(&keys, &values)
    }
}
