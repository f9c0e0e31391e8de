//! Glue for the dcp_setup machine: one resource per consumer connection, term conversion only.
//! The decisions live in the pure `dcp_setup` crate; events are the splitter's own tuples.

use dcp_setup::{
    Action, Input, Outcome, Phase, Refusal, Reply, Request, Response, Setup, Start, TakeoverStage,
    Why, MAX_VBUCKETS,
};
use mcbp::Kind;
use parking_lot::Mutex;
use rustler::types::tuple::get_tuple;
use rustler::{Atom, Encoder, Env, Error, NifResult, ResourceArc, Term};

use crate::atoms::*;
use crate::codec::{event_from_term, side_atom, side_of};

pub struct SetupResource {
    machine: Mutex<Setup>,
}

// The lock is never held across a call that can unwind.
impl std::panic::RefUnwindSafe for SetupResource {}

#[rustler::resource_impl]
impl rustler::Resource for SetupResource {}

#[rustler::nif]
fn setup_new() -> ResourceArc<SetupResource> {
    ResourceArc::new(SetupResource {
        machine: Mutex::new(Setup::new()),
    })
}

/// A bare atom `(Tag, None)` or a pair `{Tag, Arg}` as `(Tag, Some(Arg))`.
fn tagged(term: Term<'_>) -> NifResult<(Atom, Option<Term<'_>>)> {
    if let Ok(atom) = term.decode::<Atom>() {
        return Ok((atom, None));
    }
    match get_tuple(term)?.as_slice() {
        [tag, arg] => Ok((tag.decode()?, Some(*arg))),
        _ => Err(Error::BadArg),
    }
}

/// `{setup_streams, [VBucket]}`, `{takeover, VBucket}`, `{maybe_close_stream, VBucket}` or
/// `shut_connection` (dcp_consumer_conn's own request terms).
#[rustler::nif]
fn setup_request<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    request: Term<'a>,
) -> NifResult<Term<'a>> {
    let (tag, arg) = tagged(request)?;
    let Some(arg) = arg else {
        if tag != shut_connection() {
            return Err(Error::BadArg);
        }
        return Ok(encode_start(
            env,
            setup.machine.lock().request(Request::Shut),
        ));
    };
    let started = if tag == setup_streams() {
        // list_length rejects improper lists, on which rustler's list iterator would panic.
        let mut wanted = Vec::with_capacity(arg.list_length()?);
        for term in arg.into_list_iterator()? {
            match caller_vbucket(term) {
                Some(vb) => wanted.push(vb),
                None => return Ok(bad_vbucket_error(env, term)),
            }
        }
        setup.machine.lock().request(Request::Begin(&wanted))
    } else {
        let Some(vb) = caller_vbucket(arg) else {
            return Ok(bad_vbucket_error(env, arg));
        };
        let request = if tag == takeover() {
            Request::Takeover(vb)
        } else if tag == maybe_close_stream() {
            Request::MaybeCloseStream(vb)
        } else {
            return Err(Error::BadArg);
        };
        setup.machine.lock().request(request)
    };
    Ok(encode_start(env, started))
}

/// `{consumer | producer, SplitterEvent}`, `deadline` or `{connection_lost, Reason}`.
#[rustler::nif]
fn setup_event<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    event: Term<'a>,
) -> NifResult<Term<'a>> {
    let (input, lost) = match tagged(event)? {
        (tag, None) if tag == deadline() => (Input::Deadline, None),
        (tag, Some(reason)) if tag == connection_lost() => (Input::ConnectionLost, Some(reason)),
        (side, Some(e)) => (Input::Frame(side_of(side)?, event_from_term(e)?), None),
        (_, None) => return Err(Error::BadArg),
    };
    let outcome = setup.machine.lock().event(input);
    Ok(encode_outcome(env, outcome, lost))
}

#[rustler::nif]
fn setup_partitions(setup: ResourceArc<SetupResource>) -> Vec<u16> {
    setup.machine.lock().partitions()
}

#[rustler::nif]
fn setup_info(env: Env<'_>, setup: ResourceArc<SetupResource>) -> NifResult<Term<'_>> {
    let info = setup.machine.lock().info();
    let und = undefined().encode(env);
    let takeover_term = match info.takeover {
        None => und,
        Some(t) => Term::map_from_pairs(
            env,
            &[
                (vbucket(), t.vbucket.encode(env)),
                (stage(), encode_stage(t.stage).encode(env)),
                (opaque(), t.opaque.map_or(und, |o| o.encode(env))),
                (
                    requested_state(),
                    t.requested_state
                        .map_or(und, |s| code_term(env, Kind::VbState, s.0.into())),
                ),
                (add_acked(), t.add_acked.encode(env)),
            ],
        )?,
    };
    let errors_term: Vec<Term> = info
        .errors
        .iter()
        .map(|&(why, vb)| encode_error(env, why, vb, None))
        .collect();
    Term::map_from_pairs(
        env,
        &[
            (state(), encode_phase(info.phase).encode(env)),
            (active(), info.active.encode(env)),
            (pending_adds(), info.pending_adds.encode(env)),
            (
                pending_closes_consumer(),
                info.pending_closes_consumer.encode(env),
            ),
            (
                pending_closes_producer(),
                info.pending_closes_producer.encode(env),
            ),
            (errors(), errors_term.encode(env)),
            (
                next_state(),
                info.next.map_or(undefined(), encode_phase).encode(env),
            ),
            (takeover(), takeover_term),
            (owed(), info.owed.len().encode(env)),
            (absorbed(), info.absorbed.encode(env)),
        ],
    )
}

/// A vbucket named by the caller: 0..1023, anything else is reported back as `{bad_vbucket, Term}`.
fn caller_vbucket(term: Term) -> Option<u16> {
    let vb: u32 = term.decode().ok()?;
    u16::try_from(vb)
        .ok()
        .filter(|vb| usize::from(*vb) < MAX_VBUCKETS)
}

fn bad_vbucket_error<'a>(env: Env<'a>, term: Term<'a>) -> Term<'a> {
    (error(), (bad_vbucket(), term)).encode(env)
}

fn encode_phase(phase: Phase) -> Atom {
    match phase {
        Phase::Idle => idle(),
        Phase::SettingUp => setting_up(),
        Phase::Takeover => takeover(),
        Phase::Shut => shut(),
    }
}

fn encode_stage(s: TakeoverStage) -> Atom {
    match s {
        TakeoverStage::Requested => requested(),
        TakeoverStage::OpaqueKnown => opaque_known(),
        TakeoverStage::Active => active(),
    }
}

fn encode_start(env: Env<'_>, started: Result<Start, Refusal>) -> Term<'_> {
    match started {
        Ok(Start::Settled) => (reply(), ok()).encode(env),
        Ok(Start::Send(actions)) => {
            let actions: Vec<Term> = actions
                .iter()
                .map(|action| match *action {
                    Action::AddStream {
                        vbucket: vb,
                        opaque: op,
                        flags,
                    } => (add_stream(), vb, op, flags).encode(env),
                    Action::CloseStream {
                        side,
                        vbucket: vb,
                        opaque: op,
                    } => (close_stream(), side_atom(side), vb, op).encode(env),
                })
                .collect();
            (send(), actions).encode(env)
        }
        Err(refusal) => {
            let why = match refusal {
                Refusal::Busy => busy().encode(env),
                Refusal::Shut => shut().encode(env),
                Refusal::BadVbucket(vb) => (bad_vbucket(), vb).encode(env),
            };
            (error(), why).encode(env)
        }
    }
}

/// `lost` is the caller's connection-lost reason, present only for `{connection_lost, Reason}`.
fn encode_outcome<'a>(env: Env<'a>, outcome: Outcome, lost: Option<Term<'a>>) -> Term<'a> {
    match outcome {
        Outcome::NoReply => noreply().encode(env),
        Outcome::Absorbed => (noreply(), absorbed()).encode(env),
        Outcome::Reply(Reply::Ok) => (reply(), ok()).encode(env),
        Outcome::Reply(Reply::Errors(list)) => {
            let list: Vec<Term> = list
                .iter()
                .map(|&(why, vb)| encode_error(env, why, vb, lost))
                .collect();
            (reply(), (errors(), list)).encode(env)
        }
        Outcome::UnexpectedResponse {
            response,
            opaque: op,
        } => {
            let what = match response {
                Response::AddStream => add_stream().encode(env),
                Response::CloseStream(side) => (close_stream(), side_atom(side)).encode(env),
            };
            (stop(), (unexpected_response(), what, op)).encode(env)
        }
    }
}

fn encode_error<'a>(env: Env<'a>, why: Why, vb: u16, lost: Option<Term<'a>>) -> Term<'a> {
    let why = match why {
        Why::McbpStatus(status) => (mcbp_status(), status).encode(env),
        Why::StreamEnd(r) => (stream_end(), code_term(env, Kind::StreamEndReason, r.0)).encode(env),
        Why::SetupTimeout => setup_timeout().encode(env),
        Why::ConnectionLost => (
            connection_lost(),
            lost.unwrap_or_else(|| undefined().encode(env)),
        )
            .encode(env),
    };
    (why, (vbucket(), vb)).encode(env)
}
