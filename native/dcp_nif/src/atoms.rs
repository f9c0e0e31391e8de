//! The one atom table of the NIF: the fixed atoms (created once by rustler) and the atoms of the
//! protocol's names (`mcbp::names`, and the other static names the codec returns), made from
//! their strings once and looked up after that.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use mcbp::Kind;
use rustler::types::tuple::get_tuple;
use rustler::{Atom, Encoder, Env, Term};

rustler::atoms! {
    ok, error, more, continue_ = "continue", unknown, undefined, consumer, producer,
    // name tables
    opcode, server_opcode, status, stream_end_reason, vbucket_state, hello_feature,
    // events
    stream_end, add_stream_response, close_stream_response, stream_req, set_vbucket_state,
    set_vbucket_state_response,
    // frame map keys
    magic, opcode_name, datatype, vbucket, opaque, cas, framing_extras, extras, key, value,
    // errors
    bad_magic, frame_too_large, reported_frame_too_large, bad_lengths, bad_framing_extras, bad_extras, bad_value, framing,
    body, missing_field, bad_field, field_not_allowed, key_too_long, extras_too_long,
    framing_extras_not_allowed, framing_extras_too_long, frame_info_id_too_large,
    frame_info_too_long, body_too_large,
    // stats
    frames, bytes, forwarded_frames, blocked_frames, reported_frames, largest_frame, held_bytes,
    forward_remaining, by_opcode,
    // setup machine
    setup_streams, takeover, maybe_close_stream, shut_connection, shut, deadline, connection_lost, send, reply, noreply,
    stop, errors, mcbp_status, setup_timeout, busy, bad_vbucket, already_active, add_stream,
    close_stream, unexpected_response, idle, setting_up, requested, opaque_known, active, ignore,
    state, pending_adds, pending_closes_consumer, pending_closes_producer, next_state, stage,
    requested_state, add_acked, absorbed,
}

/// Both ways: name -> atom, and atom (its term word) -> name.
#[derive(Default)]
struct Names {
    atoms: HashMap<&'static str, Atom>,
    names: HashMap<rustler::sys::ErlNifTerm, &'static str>,
}

impl Names {
    fn insert(&mut self, name: &'static str, atom: Atom) {
        self.atoms.insert(name, atom);
        self.names.insert(atom.as_c_arg(), name);
    }
}

static NAMES: OnceLock<RwLock<Names>> = OnceLock::new();

/// Makes the atoms of every name table; called once, when the library is loaded.
pub fn load(env: Env<'_>) -> bool {
    let mut table = Names::default();
    let magics = mcbp::Magic::ALL.iter().map(|m| m.name());
    let names = Kind::ALL
        .iter()
        .flat_map(|k| mcbp::names::table(*k).iter().map(|(_, n)| *n));
    for name in magics.chain(names) {
        match Atom::from_str(env, name) {
            Ok(a) => table.insert(name, a),
            Err(_) => return false,
        };
    }
    // Loaded again (after a purge) the table is already there, with the same atoms: atoms are
    // never freed.
    let _ = NAMES.set(RwLock::new(table));
    true
}

/// The atom of a static name. The name tables' atoms exist from load; another static name (a
/// field key) is made the first time it is asked for, then looked up.
pub fn name_atom(env: Env<'_>, name: &'static str) -> Atom {
    let table = NAMES.get_or_init(Default::default);
    if let Some(a) = table.read().ok().and_then(|t| t.atoms.get(name).copied()) {
        return a;
    }
    // Plain ASCII names: making the atom cannot fail.
    let a = Atom::from_str(env, name).unwrap_or_else(|_| unknown());
    if let Ok(mut t) = table.write() {
        t.insert(name, a);
    }
    a
}

/// The static name of an atom the table knows.
pub fn atom_name(atom: Atom) -> Option<&'static str> {
    let table = NAMES.get()?.read().ok()?;
    table.names.get(&atom.as_c_arg()).copied()
}

/// A name table's atom for a code, `{unknown, Code}` when it has none.
pub fn code_term(env: Env<'_>, kind: Kind, code: u32) -> Term<'_> {
    match mcbp::names::name(kind, code) {
        Some(n) => name_atom(env, n).encode(env),
        None => (unknown(), code).encode(env),
    }
}

/// The code of a term `code_term` gives: a name of the table, or `{unknown, Code}` for a code
/// without one (so every accepted term encodes back unchanged).
pub fn term_code(kind: Kind, term: Term<'_>) -> Option<u32> {
    if let Ok(atom) = term.decode::<Atom>() {
        return mcbp::names::code(kind, atom_name(atom)?);
    }
    match get_tuple(term).ok()?.as_slice() {
        [tag, code] if tag.decode::<Atom>().ok()? == unknown() => {
            let code: u32 = code.decode().ok()?;
            mcbp::names::name(kind, code).is_none().then_some(code)
        }
        _ => None,
    }
}

/// The table a kind atom names.
pub fn kind_of(atom: Atom) -> Option<Kind> {
    [
        (opcode(), Kind::Opcode),
        (server_opcode(), Kind::ServerOpcode),
        (status(), Kind::Status),
        (stream_end_reason(), Kind::StreamEndReason),
        (vbucket_state(), Kind::VbState),
        (hello_feature(), Kind::HelloFeature),
    ]
    .into_iter()
    .find(|(a, _)| *a == atom)
    .map(|(_, k)| k)
}
