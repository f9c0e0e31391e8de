# dcp_proxy: `make demo` runs the main job, `make test` the whole test suite, `make bench` the benchmarks.
# Each target bootstraps a fresh machine first (scripts/bootstrap.sh is idempotent and fast when done).

VBUCKETS   ?= 64
DOCS       ?= 10000
VALUE_SIZE ?= 256

# Criterion's warm-up and measurement per bench (s), short enough that `make bench` stays under 5 min.
CRITERION_TIMES ?= --warm-up-time 1 --measurement-time 2

EBIN = -pa _build/default/lib/dcp_proxy/ebin -pa _build/default/lib/dcp_proxy/bench

.PHONY: all bootstrap compile demo test test-rust test-erlang lint bench dialyzer clean

all: compile

bootstrap:
	@sh scripts/bootstrap.sh

compile: bootstrap
	rebar3 compile

demo: compile
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

clean:
	rm -rf _build target priv
