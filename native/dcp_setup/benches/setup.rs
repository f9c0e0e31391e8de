//! Cost of the setup bookkeeping: per event, and for a full setup of 256 and 1024 vbuckets
//! (begin + every answer). O(1) per event means 1024 costs about 4x what 256 costs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
#[path = "../tests/common/mod.rs"]
mod common;

use common::Drive;
use dcp_setup::{Action, Event, Input, Outcome, Request, Setup, Side, Start, StreamEndReason};

/// Starts a setup of `wanted`; the opaque each vbucket's request was sent with, by vbucket.
fn begin_opaques(machine: &mut Setup, wanted: &[u16]) -> Vec<u32> {
    let mut opaques = vec![0; 1024];
    if let Ok(Start::Send(actions)) = machine.request(Request::Begin(wanted)) {
        for a in actions {
            match a {
                Action::AddStream {
                    vbucket, opaque, ..
                }
                | Action::CloseStream {
                    vbucket, opaque, ..
                } => opaques[usize::from(vbucket)] = opaque,
            }
        }
    }
    opaques
}

fn add_answer(machine: &mut Setup, opaque: u32, status: u16) -> Outcome {
    machine.event(Input::Frame(
        Side::Consumer,
        Event::AddStreamResponse {
            opaque,
            status,
            stream_opaque: None,
        },
    ))
}

/// Answers in an order unlike the request order (a stride walk), as a real consumer might.
fn answer_order(n: u16) -> Vec<u16> {
    // 37 is coprime with 256 and 1024, so this is a permutation of 0..n.
    (0..n)
        .map(|i| (i.wrapping_mul(37).wrapping_add(11)) % n)
        .collect()
}

/// begin(0..n) and n successful answers; returns the final outcome.
fn full_setup(machine: &mut Setup, wanted: &[u16], order: &[u16]) -> Outcome {
    let opaques = black_box(begin_opaques(machine, wanted));
    let mut last = Outcome::NoReply;
    for &vb in order {
        last = add_answer(machine, opaques[usize::from(vb)], 0);
    }
    last
}

/// Times `iters` events, one per vbucket of fresh 1024-vbucket setups (their begin untimed).
fn timed_per_vbucket(iters: u64, event: impl Fn(&mut Setup, u16, u32) -> Outcome) -> Duration {
    let wanted: Vec<u16> = (0..1024).collect();
    let order = answer_order(1024);
    let mut total = Duration::ZERO;
    let mut done = 0u64;
    while done < iters {
        let mut machine = Setup::new();
        let opaques = begin_opaques(&mut machine, &wanted);
        let batch = (iters - done).min(1024) as usize;
        let start = Instant::now();
        for &vb in &order[..batch] {
            black_box(event(&mut machine, vb, opaques[usize::from(vb)]));
        }
        total += start.elapsed();
        done += batch as u64;
    }
    total
}

fn per_event(c: &mut Criterion) {
    let mut group = c.benchmark_group("event");
    group.throughput(Throughput::Elements(1));

    // One add answer inside a 1024-vbucket setup (a fresh setup every 1024 answers, untimed).
    group.bench_function("add_stream_response", |b| {
        b.iter_custom(|iters| {
            timed_per_vbucket(iters, |machine, _vb, opaque| {
                add_answer(machine, opaque, black_box(0))
            })
        })
    });

    // A stream end that fails a pending add (the MB-53445 path).
    group.bench_function("stream_end_failing_pending_add", |b| {
        b.iter_custom(|iters| {
            timed_per_vbucket(iters, |machine, vb, _opaque| {
                machine.stream_end(vb, 0xabcd, StreamEndReason::STATE_CHANGED)
            })
        })
    });

    // Events that change nothing: a stream end for an untracked vbucket, a takeover-only request.
    group.bench_function("stream_end_untracked", |b| {
        let mut machine = Setup::new();
        black_box(machine.begin(&[1, 2, 3])).ok();
        b.iter(|| black_box(machine.stream_end(black_box(700), 5, StreamEndReason::CLOSED)))
    });
    group.bench_function("close_stream_response_owed", |b| {
        b.iter_batched_ref(
            || {
                let mut machine = Setup::new();
                let opaques = begin_opaques(&mut machine, &[9]);
                add_answer(&mut machine, opaques[9], 0);
                let mut close = 0;
                if let Ok(Start::Send(actions)) = machine.request(Request::MaybeCloseStream(9)) {
                    if let Some(Action::CloseStream { opaque, .. }) = actions.first() {
                        close = *opaque;
                    }
                }
                machine.deadline();
                (machine, close)
            },
            |(machine, close)| {
                black_box(machine.event(Input::Frame(
                    Side::Consumer,
                    Event::CloseStreamResponse {
                        opaque: *close,
                        status: 0,
                    },
                )))
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn full_setups(c: &mut Criterion) {
    let mut group = c.benchmark_group("full_setup");
    for n in [256u16, 1024] {
        let wanted: Vec<u16> = (0..n).collect();
        let order = answer_order(n);
        group.throughput(Throughput::Elements(u64::from(n)));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_batched_ref(
                Setup::new,
                |machine| black_box(full_setup(machine, &wanted, &order)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// Median time of a full setup of `n` vbuckets, measured directly for the ratio line.
fn median_full_setup(n: u16, runs: usize) -> Duration {
    let wanted: Vec<u16> = (0..n).collect();
    let order = answer_order(n);
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let mut machine = Setup::new();
            let start = Instant::now();
            black_box(full_setup(&mut machine, &wanted, &order));
            start.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[runs / 2]
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    per_event(&mut c);
    full_setups(&mut c);
    c.final_summary();

    let t256 = median_full_setup(256, 4001);
    let t1024 = median_full_setup(1024, 4001);
    println!(
        "full setup median: 256 vbuckets {:?} ({:.1} ns/vbucket), 1024 vbuckets {:?} ({:.1} ns/vbucket); \
         ratio 1024/256 = {:.2}x (O(1) per event: about 4x)",
        t256,
        t256.as_nanos() as f64 / 256.0,
        t1024,
        t1024.as_nanos() as f64 / 1024.0,
        t1024.as_secs_f64() / t256.as_secs_f64()
    );
}
