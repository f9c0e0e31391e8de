//! The rustler NIF library `dcp_nif`: term conversion only. All protocol logic lives in the pure
//! crates `mcbp` and `dcp_setup`.

mod atoms;
mod codec;
mod setup;

fn load(env: rustler::Env, _info: rustler::Term) -> bool {
    atoms::load(env)
}

rustler::init!("dcp_nif", load = load);
