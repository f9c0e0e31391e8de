#!/bin/sh
# rebar3 compile pre-hook: builds the rustler NIF in release mode and installs it as priv/dcp_nif.so.
# DCP_SKIP_NIF_BUILD=1 reuses an existing priv/dcp_nif.so (for parallel development only).
set -e
cd "$(dirname "$0")/.."
mkdir -p priv
if [ -n "$DCP_SKIP_NIF_BUILD" ] && [ -f priv/dcp_nif.so ]; then
    exit 0
fi
cargo build --release --quiet -p dcp_nif
target_dir="${CARGO_TARGET_DIR:-target}"
cp -f "$target_dir/release/libdcp_nif.so" priv/dcp_nif.so.tmp
mv -f priv/dcp_nif.so.tmp priv/dcp_nif.so
