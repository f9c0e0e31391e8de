//! rustler glue for the `dcp_nif` Erlang module: term <-> struct conversion and resources only.
//! Protocol logic lives in the pure crates `mcbp` and `dcp_setup`.

mod atoms;
mod codec;
mod setup;

rustler::init!("dcp_nif");
