//! Glue for the dcp_setup machine: one resource per consumer connection, term conversion only.
//! The terms and the decisions live in the pure `dcp_setup` crate (`dcp_setup::term`).

use dcp_setup::Setup;
use mcbp::ToTerm;
use parking_lot::Mutex;
use rustler::{Env, Error, NifResult, ResourceArc, Term};

use crate::codec::{part, value, Out, VALUE_DEPTH};

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
fn setup_request<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    request: Term<'a>,
) -> NifResult<Term<'a>> {
    let v = value(request, VALUE_DEPTH);
    let mut out = Out::new(env);
    let answer = setup
        .machine
        .lock()
        .request_term(&v, &mut out, |p| part(request, p));
    answer.ok_or(Error::BadArg)
}

#[rustler::nif]
fn setup_event<'a>(
    env: Env<'a>,
    setup: ResourceArc<SetupResource>,
    event: Term<'a>,
) -> NifResult<Term<'a>> {
    let v = value(event, VALUE_DEPTH);
    let mut out = Out::new(env);
    let outcome = setup
        .machine
        .lock()
        .event_term(&v, &mut out, |p| part(event, p));
    outcome.ok_or(Error::BadArg)
}

#[rustler::nif]
fn setup_partitions(setup: ResourceArc<SetupResource>) -> Vec<u16> {
    setup.machine.lock().partitions()
}

#[rustler::nif]
fn setup_info(env: Env<'_>, setup: ResourceArc<SetupResource>) -> Term<'_> {
    let info = setup.machine.lock().info();
    info.to_term(&mut Out::new(env))
}
