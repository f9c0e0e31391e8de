#!/bin/sh
# Idempotent setup of a fresh machine: the Debian Erlang packages (only when missing) and the crates.
set -e
cd "$(dirname "$0")/.."

erlang_ready() {
    command -v erl >/dev/null 2>&1 && command -v rebar3 >/dev/null 2>&1 \
        && erl -noshell -eval 'case {code:lib_dir(eunit), code:lib_dir(proper), code:lib_dir(meck), code:lib_dir(erts)} of
                                   {{error,_},_,_,_} -> halt(1); {_,{error,_},_,_} -> halt(1);
                                   {_,_,{error,_},_} -> halt(1); _ -> halt(0) end.' >/dev/null 2>&1 \
        && [ -f "$(erl -noshell -eval 'io:format("~s", [code:root_dir()]), halt().')/usr/include/erl_nif.h" ]
}

if ! erlang_ready; then
    echo "bootstrap: installing Erlang/OTP from Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        erlang-nox erlang-dev erlang-eunit rebar3 erlang-meck erlang-proper erlang-proper-dev >/dev/null
fi

cargo fetch --quiet
