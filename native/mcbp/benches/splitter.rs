//! The splitter over streams of DCP mutations of 256 B, 4 KiB and 1 MiB, fed in 64 KiB chunks as a
//! socket would deliver them. Reported per frame (elements) and per byte (GB/s).
//! Target: <= 10 ns per 256-byte frame.
//!
//! The streams (4 MiB, 8 MiB) are larger than L2, so this includes fetching the headers from
//! memory, which the splitter's prefetch hides.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mcbp::{FeedOutput, Frame, Magic, Side, Splitter};

const CHUNK: usize = 64 * 1024;

/// A DCP mutation of exactly `size` bytes (header + 31 extras + 4-byte key + value).
fn mutation(size: usize, seqno: u64) -> Vec<u8> {
    let mut extras = [0u8; 31];
    extras[..8].copy_from_slice(&seqno.to_be_bytes());
    let value = vec![b'v'; size - 24 - 31 - 4];
    Frame {
        magic: Magic::Req,
        opcode: 0x57,
        datatype: 0,
        vbucket_or_status: (seqno % 1024) as u16,
        opaque: 1,
        cas: seqno,
        framing_extras: Vec::new(),
        extras: &extras,
        key: b"key0",
        value: &value,
    }
    .to_vec()
    .expect("encodable")
}

fn stream(frame_size: usize, total: usize) -> (Vec<u8>, u64) {
    let frames = (total / frame_size).max(4);
    let mut s = Vec::with_capacity(frames * frame_size);
    for i in 0..frames {
        s.extend_from_slice(&mutation(frame_size, i as u64));
    }
    (s, frames as u64)
}

fn split_all(stream: &[u8], out: &mut FeedOutput) -> usize {
    let mut splitter = Splitter::new(Side::Producer, mcbp::DEFAULT_MAX_FRAME_SIZE);
    let mut pieces = 0;
    for chunk in stream.chunks(CHUNK) {
        out.clear();
        splitter
            .feed(chunk, 0, usize::MAX, out)
            .expect("valid stream");
        pieces += out.forward.len();
    }
    pieces
}

fn bench(c: &mut Criterion) {
    let cases = [
        ("256B", 256, 4 << 20),
        ("4KiB", 4096, 4 << 20),
        ("1MiB", 1 << 20, 8 << 20),
    ];
    let mut out = FeedOutput::default();
    let mut per_frame = c.benchmark_group("splitter_frames");
    for (name, size, total) in cases {
        let (s, frames) = stream(size, total);
        per_frame.throughput(Throughput::Elements(frames));
        per_frame.bench_with_input(BenchmarkId::from_parameter(name), &s, |b, s| {
            b.iter(|| split_all(black_box(s), &mut out))
        });
    }
    per_frame.finish();
    let mut per_byte = c.benchmark_group("splitter_bytes");
    for (name, size, total) in cases {
        let (s, _) = stream(size, total);
        per_byte.throughput(Throughput::Bytes(s.len() as u64));
        per_byte.bench_with_input(BenchmarkId::from_parameter(name), &s, |b, s| {
            b.iter(|| split_all(black_box(s), &mut out))
        });
    }
    per_byte.finish();
    // One 64 KiB chunk fed again and again: the cost with the chunk in cache, as a proxy sees a
    // chunk it has just received.
    let mut hot = c.benchmark_group("splitter_hot_chunk");
    for (name, size) in [("256B", 256), ("4KiB", 4096)] {
        let (s, _) = stream(size, CHUNK);
        let chunk = &s[..CHUNK - CHUNK % size];
        let frames = (chunk.len() / size) as u64;
        hot.throughput(Throughput::Elements(frames));
        let mut splitter = Splitter::new(Side::Producer, mcbp::DEFAULT_MAX_FRAME_SIZE);
        hot.bench_with_input(BenchmarkId::from_parameter(name), chunk, |b, chunk| {
            b.iter(|| {
                out.clear();
                splitter
                    .feed(black_box(chunk), 0, usize::MAX, &mut out)
                    .expect("valid stream");
                out.forward.len()
            })
        });
    }
    hot.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
