//! Glue for the dcp_setup machine: one resource per consumer connection, term conversion only.
//! The decisions live in the pure `dcp_setup` crate.

use dcp_setup::{
    Action, Outcome, Phase, Refusal, Reply, Response, Setup, Side, Start, TakeoverStage, VbState,
    Why, MAX_VBUCKETS,
};
use mcbp::StreamEndReason;
use parking_lot::Mutex;
use rustler::types::tuple::get_tuple;
use rustler::{Atom, Encoder, Env, Error, NifResult, ResourceArc, Term};

rustler::atoms! {
    ok,
    error,
    send,
    reply,
    noreply,
    stop,
    errors,
    vbucket,
    mcbp_status,
    stream_end,
    setup_timeout,
    connection_lost,
    busy,
    shut,
    bad_vbucket,
    already_active,
    add_stream,
    close_stream,
    consumer,
    producer,
    unexpected_response,
    unknown,
    idle,
    setting_up,
    takeover,
    requested,
    opaque_known,
    active,
    replica,
    pending,
    dead,
    ignore,
    undefined,
    state,
    pending_adds,
    pending_closes_consumer,
    pending_closes_producer,
    next_state,
    stage,
    opaque,
    requested_state,
    add_acked,
    absorbed,
}

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

#[rustler::nif]
fn setup_begin<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    vbuckets: Term<'a>,
) -> NifResult<Term<'a>> {
    // list_length rejects improper lists, on which rustler's list iterator would panic.
    let mut wanted = Vec::with_capacity(vbuckets.list_length()?);
    for term in vbuckets.into_list_iterator()? {
        match caller_vbucket(term) {
            Some(vb) => wanted.push(vb),
            None => return Ok(bad_vbucket_error(env, term)),
        }
    }
    let started = setup.machine.lock().begin(&wanted);
    Ok(encode_start(env, started))
}

#[rustler::nif]
fn setup_add_stream_response<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    opaque: u32,
    status: Term<'a>,
) -> NifResult<Term<'a>> {
    let status = decode_status(status)?;
    let outcome = setup.machine.lock().add_stream_response(opaque, status);
    Ok(encode_outcome(env, outcome, None))
}

#[rustler::nif]
fn setup_close_stream_response<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    side: Atom,
    opaque: u32,
    status: Term<'a>,
) -> NifResult<Term<'a>> {
    let side = decode_side(side)?;
    let status = decode_status(status)?;
    let outcome = setup
        .machine
        .lock()
        .close_stream_response(side, opaque, status);
    Ok(encode_outcome(env, outcome, None))
}

#[rustler::nif]
fn setup_stream_end<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    vbucket: Term<'a>,
    opaque: u32,
    reason: Term<'a>,
) -> NifResult<Term<'a>> {
    let vb = decode_wire_vbucket(vbucket)?;
    let code = decode_reason(reason)?;
    let outcome = setup.machine.lock().stream_end(vb, opaque, code);
    Ok(encode_outcome(env, outcome, None))
}

#[rustler::nif]
fn setup_takeover_begin<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    vbucket: Term<'a>,
) -> Term<'a> {
    let Some(vb) = caller_vbucket(vbucket) else {
        return bad_vbucket_error(env, vbucket);
    };
    let started = setup.machine.lock().takeover_begin(vb);
    encode_start(env, started.map(Start::Send))
}

#[rustler::nif]
fn setup_stream_req<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    vbucket: Term<'a>,
    opaque: u32,
) -> NifResult<Term<'a>> {
    let vb = decode_wire_vbucket(vbucket)?;
    let outcome = setup.machine.lock().stream_req(vb, opaque);
    Ok(encode_outcome(env, outcome, None))
}

#[rustler::nif]
fn setup_set_vbucket_state<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    opaque: u32,
    vb_state: Term<'a>,
) -> NifResult<Term<'a>> {
    let vb_state = decode_vb_state(vb_state)?;
    let outcome = setup.machine.lock().set_vbucket_state(opaque, vb_state);
    Ok(encode_outcome(env, outcome, None))
}

#[rustler::nif]
fn setup_set_vbucket_state_response<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    opaque: u32,
    status: Term<'a>,
) -> NifResult<Term<'a>> {
    let status = decode_status(status)?;
    let outcome = setup
        .machine
        .lock()
        .set_vbucket_state_response(opaque, status);
    Ok(encode_outcome(env, outcome, None))
}

#[rustler::nif]
fn setup_maybe_close_stream<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    vbucket: Term<'a>,
) -> Term<'a> {
    let Some(vb) = caller_vbucket(vbucket) else {
        return bad_vbucket_error(env, vbucket);
    };
    let started = setup.machine.lock().maybe_close_stream(vb);
    encode_start(env, started)
}

#[rustler::nif]
fn setup_shut(env: Env<'_>, setup: ResourceArc<SetupResource>) -> Term<'_> {
    let started = setup.machine.lock().shut();
    encode_start(env, started)
}

#[rustler::nif]
fn setup_deadline(env: Env<'_>, setup: ResourceArc<SetupResource>) -> Term<'_> {
    let outcome = setup.machine.lock().deadline();
    encode_outcome(env, outcome, None)
}

#[rustler::nif]
fn setup_connection_lost<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    reason: Term<'a>,
) -> Term<'a> {
    let outcome = setup.machine.lock().connection_lost();
    encode_outcome(env, outcome, Some(reason))
}

#[rustler::nif]
fn setup_partitions(setup: ResourceArc<SetupResource>) -> Vec<u16> {
    setup.machine.lock().partitions()
}

#[rustler::nif]
fn setup_info(env: Env<'_>, setup: ResourceArc<SetupResource>) -> NifResult<Term<'_>> {
    let info = setup.machine.lock().info();
    let takeover_term = match info.takeover {
        None => undefined().encode(env),
        Some(t) => Term::map_from_pairs(
            env,
            &[
                (vbucket().encode(env), t.vbucket.encode(env)),
                (stage().encode(env), encode_stage(t.stage).encode(env)),
                (
                    opaque().encode(env),
                    t.opaque.map_or(undefined().encode(env), |o| o.encode(env)),
                ),
                (
                    requested_state().encode(env),
                    t.requested_state
                        .map_or(undefined().encode(env), |s| encode_vb_state(env, s)),
                ),
                (add_acked().encode(env), t.add_acked.encode(env)),
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
            (state().encode(env), encode_phase(info.phase).encode(env)),
            (active().encode(env), info.active.encode(env)),
            (pending_adds().encode(env), info.pending_adds.encode(env)),
            (
                pending_closes_consumer().encode(env),
                info.pending_closes_consumer.encode(env),
            ),
            (
                pending_closes_producer().encode(env),
                info.pending_closes_producer
                    .map_or(ignore().encode(env), |p| p.encode(env)),
            ),
            (errors().encode(env), errors_term.encode(env)),
            (
                next_state().encode(env),
                info.next.map_or(undefined(), encode_phase).encode(env),
            ),
            (takeover().encode(env), takeover_term),
            (absorbed().encode(env), info.absorbed.encode(env)),
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

/// A vbucket from a frame header: any u16 (the machine ignores ones it does not track).
fn decode_wire_vbucket(term: Term) -> NifResult<u16> {
    let vb: u32 = term.decode()?;
    u16::try_from(vb).map_err(|_| Error::BadArg)
}

fn decode_status(term: Term) -> NifResult<u16> {
    let status: u32 = term.decode()?;
    u16::try_from(status).map_err(|_| Error::BadArg)
}

fn decode_side(side: Atom) -> NifResult<Side> {
    if side == consumer() {
        Ok(Side::Consumer)
    } else if side == producer() {
        Ok(Side::Producer)
    } else {
        Err(Error::BadArg)
    }
}

/// A reason atom, or `{unknown, N}` for a code without a name. Anything else (including
/// `{unknown, N}` for a named code) is badarg, so every accepted term encodes back unchanged.
fn decode_reason(term: Term) -> NifResult<u32> {
    if let Ok(atom) = term.decode::<Atom>() {
        let name = atom.to_term(term.get_env()).atom_to_string()?;
        return StreamEndReason::from_name(&name)
            .map(StreamEndReason::code)
            .ok_or(Error::BadArg);
    }
    let elements = get_tuple(term)?;
    match elements.as_slice() {
        [tag, code] if tag.decode::<Atom>().is_ok_and(|a| a == unknown()) => {
            let code: u32 = code.decode()?;
            match StreamEndReason::from_code(code) {
                StreamEndReason::Unknown(code) => Ok(code),
                StreamEndReason::Known(_) => Err(Error::BadArg),
            }
        }
        _ => Err(Error::BadArg),
    }
}

fn encode_reason(env: Env<'_>, code: u32) -> Term<'_> {
    match StreamEndReason::from_code(code) {
        // The names are plain ASCII atoms: creating one cannot fail.
        StreamEndReason::Known(name) => Atom::from_str(env, name)
            .map_or_else(|_| (unknown(), code).encode(env), |a| a.encode(env)),
        StreamEndReason::Unknown(code) => (unknown(), code).encode(env),
    }
}

fn decode_vb_state(term: Term) -> NifResult<VbState> {
    if let Ok(atom) = term.decode::<Atom>() {
        return [
            (active(), VbState::Active),
            (replica(), VbState::Replica),
            (pending(), VbState::Pending),
            (dead(), VbState::Dead),
        ]
        .into_iter()
        .find(|(a, _)| *a == atom)
        .map(|(_, s)| s)
        .ok_or(Error::BadArg);
    }
    if let Ok(code) = term.decode::<u32>() {
        return u8::try_from(code)
            .map(VbState::from_code)
            .map_err(|_| Error::BadArg);
    }
    match get_tuple(term)?.as_slice() {
        [tag, code] if tag.decode::<Atom>().is_ok_and(|a| a == unknown()) => {
            let code: u32 = code.decode()?;
            u8::try_from(code)
                .map(VbState::from_code)
                .map_err(|_| Error::BadArg)
        }
        _ => Err(Error::BadArg),
    }
}

fn encode_vb_state(env: Env<'_>, s: VbState) -> Term<'_> {
    match s {
        VbState::Active => active().encode(env),
        VbState::Replica => replica().encode(env),
        VbState::Pending => pending().encode(env),
        VbState::Dead => dead().encode(env),
        VbState::Other(n) => (unknown(), n).encode(env),
    }
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

fn encode_side(side: Side) -> Atom {
    match side {
        Side::Consumer => consumer(),
        Side::Producer => producer(),
    }
}

fn encode_start(env: Env<'_>, started: Result<Start, Refusal>) -> Term<'_> {
    match started {
        Ok(Start::Settled) => (reply(), ok()).encode(env),
        Ok(Start::Send(actions)) => {
            let actions: Vec<Term> = actions
                .iter()
                .map(|action| match *action {
                    Action::AddStream { vbucket, takeover } => {
                        (add_stream(), vbucket, u32::from(takeover)).encode(env)
                    }
                    Action::CloseStream { side, vbucket } => {
                        (close_stream(), encode_side(side), vbucket).encode(env)
                    }
                })
                .collect();
            (send(), actions).encode(env)
        }
        Err(refusal) => {
            let why = match refusal {
                Refusal::Busy => busy().encode(env),
                Refusal::Shut => shut().encode(env),
                Refusal::AlreadyActive => already_active().encode(env),
                Refusal::BadVbucket(vb) => (bad_vbucket(), vb).encode(env),
            };
            (error(), why).encode(env)
        }
    }
}

/// `lost` is the caller's connection-lost reason, present only for `setup_connection_lost`.
fn encode_outcome<'a>(env: Env<'a>, outcome: Outcome, lost: Option<Term<'a>>) -> Term<'a> {
    match outcome {
        Outcome::NoReply => noreply().encode(env),
        Outcome::Reply(Reply::Ok) => (reply(), ok()).encode(env),
        Outcome::Reply(Reply::Errors(list)) => {
            let list: Vec<Term> = list
                .iter()
                .map(|&(why, vb)| encode_error(env, why, vb, lost))
                .collect();
            (reply(), (errors(), list)).encode(env)
        }
        Outcome::UnexpectedResponse { response, opaque } => {
            let what = match response {
                Response::AddStream => add_stream().encode(env),
                Response::CloseStream(side) => (close_stream(), encode_side(side)).encode(env),
            };
            (stop(), (unexpected_response(), what, opaque)).encode(env)
        }
    }
}

fn encode_error<'a>(env: Env<'a>, why: Why, vb: u16, lost: Option<Term<'a>>) -> Term<'a> {
    let why = match why {
        Why::McbpStatus(status) => (mcbp_status(), status).encode(env),
        Why::StreamEnd(code) => (stream_end(), encode_reason(env, code)).encode(env),
        Why::SetupTimeout => setup_timeout().encode(env),
        Why::ConnectionLost => (
            connection_lost(),
            lost.unwrap_or_else(|| undefined().encode(env)),
        )
            .encode(env),
    };
    (why, (vbucket(), vb)).encode(env)
}
