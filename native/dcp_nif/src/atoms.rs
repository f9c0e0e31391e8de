//! The one atom table of the NIF: every name mcbp's term shapes use (its names tables, the
//! magics and `mcbp::term::ATOMS`) and dcp_setup's (`dcp_setup::term::ATOMS`), made once at load
//! and only looked up after that; plus the few fixed atoms codec.rs builds (rustler makes those at
//! load too).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

use mcbp::Kind;
use rustler::{Atom, Env};

rustler::atoms! {
    ok, error, more, continue_ = "continue", unknown, undefined,
}

/// FNV-1a: the keys are short names and term words, looked up per reported frame.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let step = |h: u64, b: &u8| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        self.0 = bytes.iter().fold(self.0 ^ 0xcbf2_9ce4_8422_2325, step);
    }
}

type Fast = BuildHasherDefault<Fnv>;

/// Both ways: name -> atom, and atom (its term word) -> name.
struct Names {
    atoms: HashMap<&'static str, Atom, Fast>,
    names: HashMap<rustler::sys::ErlNifTerm, &'static str, Fast>,
}

static NAMES: OnceLock<Names> = OnceLock::new();

/// Makes the table; called once, when the library is loaded. Loaded again (after a purge) the
/// table is already there, with the same atoms: atoms are never freed.
pub fn load(env: Env<'_>) -> bool {
    let magics = mcbp::Magic::ALL.iter().map(|m| m.name());
    let tables = Kind::ALL.iter().flat_map(|k| mcbp::names::table(*k));
    let all = magics
        .chain(tables.map(|(_, n)| *n))
        .chain(mcbp::term::ATOMS.iter().copied())
        .chain(dcp_setup::term::ATOMS.iter().copied());
    let mut table = Names {
        atoms: HashMap::default(),
        names: HashMap::default(),
    };
    for name in all {
        let Ok(atom) = Atom::from_str(env, name) else {
            return false;
        };
        table.atoms.insert(name, atom);
        table.names.insert(atom.as_c_arg(), name);
    }
    let _ = NAMES.set(table);
    true
}

/// The atom of a name (mcbp's tests check that every name its shapes use is in the table; any
/// other is made, not kept).
pub fn name_atom(env: Env<'_>, name: &str) -> Atom {
    known_atom(name).unwrap_or_else(|| Atom::from_str(env, name).unwrap_or_else(|_| unknown()))
}

/// The table's atom of a name.
pub fn known_atom(name: &str) -> Option<Atom> {
    NAMES.get()?.atoms.get(name).copied()
}

/// The name of an atom the table has.
pub fn atom_name(atom: Atom) -> Option<&'static str> {
    NAMES.get()?.names.get(&atom.as_c_arg()).copied()
}
