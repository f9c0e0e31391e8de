# dcp_proxy: `make demo` runs the main job, `make test` the whole test suite, `make bench` the benchmarks.
# Each target bootstraps a fresh machine first (scripts/bootstrap.sh is idempotent and fast when done).

VBUCKETS   ?= 64
DOCS       ?= 10000
VALUE_SIZE ?= 256

# make demo (the cluster rebalance): vbuckets, documents per vbucket, value bytes, connections per
# node pair, injected MB-53445 faults
REB_VBUCKETS    ?= 1024
REB_DOCS        ?= 100
REB_VALUE_SIZE  ?= 256
REB_CONNECTIONS ?= 2
REB_FAULTS      ?= 4

# Criterion's warm-up and measurement per bench (s), short enough that `make bench` stays under 5 min.
CRITERION_TIMES ?= --warm-up-time 1 --measurement-time 2

EBIN = -pa _build/default/lib/dcp_proxy/ebin -pa _build/default/lib/dcp_proxy/bench

.PHONY: all bootstrap compile demo demo-pair test test-rust test-erlang lint bench bench-slice dialyzer clean

all: compile

bootstrap:
	@sh scripts/bootstrap.sh

compile: bootstrap
	rebar3 compile

demo: compile
	erl -noshell -name rebalance_demo_$$$$@127.0.0.1 $(EBIN) -eval 'dcp_rebalance_demo:main(#{vbuckets => $(REB_VBUCKETS), docs => $(REB_DOCS), value_size => $(REB_VALUE_SIZE), connections => $(REB_CONNECTIONS), faults => $(REB_FAULTS)})' -s init stop

demo-pair: compile
	erl -noshell $(EBIN) -run dcp_demo cli '$(VBUCKETS)' '$(DOCS)' '$(VALUE_SIZE)'

lint: bootstrap
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test-rust: bootstrap
	cargo test --workspace --release

test-erlang: bootstrap
	rebar3 eunit

test: lint test-rust test-erlang dialyzer

dialyzer: compile
	rebar3 dialyzer

bench: compile
	cargo build --release -p load_driver
	cargo bench -p mcbp --bench splitter -- --noplot $(CRITERION_TIMES)
	cargo bench -p dcp_setup --bench setup -- --noplot $(CRITERION_TIMES)
	erl -noshell $(EBIN) -eval 'dcp_bench:main()' -s init stop

# The scheduler-slice check alone (NIF calls against the ~1 ms contract, huge inputs included): ~20 s.
bench-slice: compile
	erl -noshell $(EBIN) -eval 'dcp_bench:main(#{sections => [slice], reps => 5})' -s init stop

clean:
	rm -rf _build target priv
