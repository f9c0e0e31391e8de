//! `load_driver`: the bench's load generator (bench only, never part of the product). It plays both
//! memcached nodes of a replication on loopback so that the relay or proxy between them is the only
//! thing measured:
//!
//! - it listens as the consumer node and as the producer node (`ports <consumer> <producer>` on
//!   stdout) and accepts one connection on each;
//! - it answers every request of a handshake with success (echoing opcode and opaque; HELLO grants
//!   every feature asked for), whatever the handshake holds;
//! - the consumer node answers each ADD_STREAM as kv_engine does: it sends its own STREAM_REQ
//!   (opaque `0x10000 + vbucket`) and, once the producer's answer comes back, answers the
//!   ADD_STREAM with success and the stream opaque in 4 extras bytes;
//! - the producer node answers each STREAM_REQ with success and a one-entry failover log;
//! - once every vbucket is set up it prints `ready`, waits for `go` on stdin, then the producer
//!   writes a prebuilt block of DCP_MUTATION frames again and again at full speed, and the
//!   consumer compares every byte it receives with what was sent;
//! - it prints `done bytes=B ns=T mismatches=M driver_cpu_ns=C` (wall time from `go` to the last
//!   byte, and the driver's own CPU time over that span), then answers requests with success
//!   until stdin closes, and exits.
//!
//! Options: `--frame-bytes N` (each mutation exactly N bytes on the wire, default 256),
//! `--total-bytes N` (at least N bytes are streamed, a whole number of blocks, default 1 GB),
//! `--vbuckets N` (default 64), `--block-bytes N` (the repeated block, default 1 MiB).

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

const REQ: u8 = 0x80;
const ALT_REQ: u8 = 0x08;
const RES: u8 = 0x81;
const ALT_RES: u8 = 0x18;
const HELLO: u8 = 0x1f;
const SASL_LIST_MECHS: u8 = 0x20;
const DCP_ADD_STREAM: u8 = 0x51;
const DCP_STREAM_REQ: u8 = 0x53;
const DCP_MUTATION: u8 = 0x57;
const HEADER_LEN: usize = 24;
/// The consumer's own stream opaques: above every vbucket id, as kv_sim and kv_engine keep them.
const OWN_OPAQUE_BASE: u32 = 0x10000;
const MUTATION_EXTRAS_LEN: usize = 31;
const READ_BUF: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
struct Config {
    frame_bytes: usize,
    total_bytes: u64,
    vbuckets: u16,
    block_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            frame_bytes: 256,
            total_bytes: 1_000_000_000,
            vbuckets: 64,
            block_bytes: 1 << 20,
        }
    }
}

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config::default();
    let mut it = args.iter();
    while let Some(name) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{name} needs a value"))?
            .parse::<u64>()
            .map_err(|e| format!("{name}: {e}"))?;
        match name.as_str() {
            "--frame-bytes" => cfg.frame_bytes = value as usize,
            "--total-bytes" => cfg.total_bytes = value,
            "--vbuckets" => cfg.vbuckets = value as u16,
            "--block-bytes" => cfg.block_bytes = value as usize,
            other => return Err(format!("unknown option {other}")),
        }
    }
    let min_frame = HEADER_LEN + MUTATION_EXTRAS_LEN + 16;
    if cfg.frame_bytes < min_frame {
        return Err(format!("--frame-bytes must be at least {min_frame}"));
    }
    if cfg.vbuckets == 0 || cfg.vbuckets > 1024 {
        return Err("--vbuckets must be 1..1024".to_string());
    }
    Ok(cfg)
}

/// The fields of a frame header the driver needs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Header {
    magic: u8,
    opcode: u8,
    framing_len: usize,
    key_len: usize,
    extras_len: usize,
    /// vbucket of a request, status of a response
    vbucket: u16,
    body_len: usize,
    opaque: u32,
}

fn header(b: &[u8]) -> Header {
    let magic = b[0];
    let (framing_len, key_len) = match magic {
        ALT_REQ | ALT_RES => (b[2] as usize, b[3] as usize),
        _ => (0, u16::from_be_bytes([b[2], b[3]]) as usize),
    };
    Header {
        magic,
        opcode: b[1],
        framing_len,
        key_len,
        extras_len: b[4] as usize,
        vbucket: u16::from_be_bytes([b[6], b[7]]),
        body_len: u32::from_be_bytes([b[8], b[9], b[10], b[11]]) as usize,
        opaque: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
    }
}

/// A classic-framing frame.
fn frame(magic: u8, opcode: u8, vbucket: u16, opaque: u32, parts: [&[u8]; 3]) -> Vec<u8> {
    let [extras, key, value] = parts;
    let body = extras.len() + key.len() + value.len();
    let mut f = Vec::with_capacity(HEADER_LEN + body);
    f.push(magic);
    f.push(opcode);
    f.extend_from_slice(&(key.len() as u16).to_be_bytes());
    f.push(extras.len() as u8);
    f.push(0);
    f.extend_from_slice(&vbucket.to_be_bytes());
    f.extend_from_slice(&(body as u32).to_be_bytes());
    f.extend_from_slice(&opaque.to_be_bytes());
    f.extend_from_slice(&0u64.to_be_bytes());
    f.extend_from_slice(extras);
    f.extend_from_slice(key);
    f.extend_from_slice(value);
    f
}

/// A success response to a request: HELLO grants every feature asked for, SASL_LIST_MECHS offers
/// PLAIN, everything else has an empty body.
fn success(h: &Header, request: &[u8]) -> Vec<u8> {
    let value: &[u8] = match h.opcode {
        HELLO => &request[HEADER_LEN + h.framing_len + h.extras_len + h.key_len..],
        SASL_LIST_MECHS => b"PLAIN",
        _ => &[],
    };
    frame(RES, h.opcode, 0, h.opaque, [&[], &[], value])
}

fn stream_req(vbucket: u16, opaque: u32) -> Vec<u8> {
    let mut extras = Vec::with_capacity(48);
    extras.extend_from_slice(&0u32.to_be_bytes()); // flags
    extras.extend_from_slice(&0u32.to_be_bytes()); // reserved
    extras.extend_from_slice(&0u64.to_be_bytes()); // start seqno
    extras.extend_from_slice(&u64::MAX.to_be_bytes()); // end seqno
    extras.extend_from_slice(&0u64.to_be_bytes()); // vbucket uuid
    extras.extend_from_slice(&0u64.to_be_bytes()); // snapshot start
    extras.extend_from_slice(&0u64.to_be_bytes()); // snapshot end
    frame(REQ, DCP_STREAM_REQ, vbucket, opaque, [&extras, &[], &[]])
}

fn stream_req_success(opaque: u32) -> Vec<u8> {
    let mut failover_log = Vec::with_capacity(16);
    failover_log.extend_from_slice(&0x5eed_u64.to_be_bytes()); // vbucket uuid
    failover_log.extend_from_slice(&0u64.to_be_bytes()); // seqno
    frame(RES, DCP_STREAM_REQ, 0, opaque, [&[], &[], &failover_log])
}

fn add_stream_success(add_opaque: u32, stream_opaque: u32) -> Vec<u8> {
    frame(
        RES,
        DCP_ADD_STREAM,
        0,
        add_opaque,
        [&stream_opaque.to_be_bytes(), &[], &[]],
    )
}

/// One DCP_MUTATION of exactly `frame_bytes` on the wire.
fn mutation(seqno: u64, vbucket: u16, frame_bytes: usize) -> Vec<u8> {
    let key = format!("bench-key-{:06}", seqno % 1_000_000);
    let mut extras = Vec::with_capacity(MUTATION_EXTRAS_LEN);
    extras.extend_from_slice(&seqno.to_be_bytes()); // by seqno
    extras.extend_from_slice(&1u64.to_be_bytes()); // rev seqno
    extras.extend_from_slice(&[0u8; 15]); // flags, expiration, lock time, nmeta, nru
    let value_len = frame_bytes - HEADER_LEN - MUTATION_EXTRAS_LEN - key.len();
    let value: Vec<u8> = (0..value_len).map(|i| b'a' + (i % 26) as u8).collect();
    let opaque = OWN_OPAQUE_BASE + u32::from(vbucket);
    let f = frame(
        REQ,
        DCP_MUTATION,
        vbucket,
        opaque,
        [&extras, key.as_bytes(), &value],
    );
    debug_assert_eq!(f.len(), frame_bytes);
    f
}

/// Whole mutations, about `block_bytes` of them, spread over the vbuckets in turn.
fn mutation_block(cfg: &Config) -> Vec<u8> {
    let frames = (cfg.block_bytes / cfg.frame_bytes).max(1);
    let mut block = Vec::with_capacity(frames * cfg.frame_bytes);
    for i in 0..frames {
        let vbucket = (i % usize::from(cfg.vbuckets)) as u16;
        block.extend_from_slice(&mutation(i as u64 + 1, vbucket, cfg.frame_bytes));
    }
    block
}

/// Checks a received stream against the block repeated: every byte past the end of what was sent,
/// and every byte that differs, is a mismatch.
struct Comparer {
    block: Arc<Vec<u8>>,
    total: u64,
    pos: u64,
    mismatches: u64,
}

impl Comparer {
    fn feed(&mut self, mut data: &[u8]) {
        let len = self.block.len() as u64;
        while !data.is_empty() {
            if self.pos >= self.total {
                self.mismatches += data.len() as u64;
                self.pos += data.len() as u64;
                return;
            }
            let off = (self.pos % len) as usize;
            let n = data
                .len()
                .min(self.block.len() - off)
                .min((self.total - self.pos) as usize);
            let expected = &self.block[off..off + n];
            if &data[..n] != expected {
                self.mismatches += data[..n]
                    .iter()
                    .zip(expected)
                    .filter(|(a, b)| a != b)
                    .count() as u64;
            }
            self.pos += n as u64;
            data = &data[n..];
        }
    }

    fn done(&self) -> bool {
        self.pos >= self.total
    }
}

/// The complete frames at the front of `buf`: their headers and byte ranges.
fn complete_frames(buf: &[u8]) -> (Vec<(Header, usize, usize)>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while buf.len() - at >= HEADER_LEN {
        let h = header(&buf[at..]);
        let end = at + HEADER_LEN + h.body_len;
        if end > buf.len() {
            break;
        }
        frames.push((h, at, end));
        at = end;
    }
    (frames, at)
}

fn is_request(magic: u8) -> bool {
    magic == REQ || magic == ALT_REQ
}

fn is_response(magic: u8) -> bool {
    magic == RES || magic == ALT_RES
}

fn read_some(sock: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    match sock.read(buf)? {
        0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed")),
        n => Ok(n),
    }
}

/// Answers every request of a connection that has nothing else to do (after the stream, or the
/// producer's socket while streaming) with success, until the socket closes.
fn answer_requests(mut sock: TcpStream, mut buf: Vec<u8>) {
    let mut rd = vec![0u8; READ_BUF];
    let mut answer_sock = match sock.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    loop {
        let (frames, used) = complete_frames(&buf);
        let mut out = Vec::new();
        for (h, start, end) in frames {
            if is_request(h.magic) {
                out.extend_from_slice(&success(&h, &buf[start..end]));
            }
        }
        buf.drain(..used);
        if !out.is_empty() && answer_sock.write_all(&out).is_err() {
            return;
        }
        match sock.read(&mut rd) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&rd[..n]),
        }
    }
}

struct ConsumerDone {
    bytes: u64,
    mismatches: u64,
    end: Instant,
}

/// The consumer node: the handshake, the ADD_STREAM dance, then the byte-for-byte check.
fn consumer_node(
    mut sock: TcpStream,
    cfg: &Config,
    block: Arc<Vec<u8>>,
    total: u64,
    ready: mpsc::Sender<Result<(), String>>,
) -> Result<(ConsumerDone, TcpStream), String> {
    let err = |e: io::Error| format!("consumer node: {e}");
    let mut rd = vec![0u8; READ_BUF];
    let mut buf = Vec::new();
    // stream opaque -> the proxy's ADD_STREAM opaque
    let mut adds: HashMap<u32, u32> = HashMap::new();
    let mut answered = 0usize;
    let leftover = 'setup: loop {
        let n = read_some(&mut sock, &mut rd).map_err(err)?;
        buf.extend_from_slice(&rd[..n]);
        let (frames, used) = complete_frames(&buf);
        let mut out = Vec::new();
        for (h, start, end) in frames {
            if is_request(h.magic) && h.opcode == DCP_ADD_STREAM {
                let stream_opaque = OWN_OPAQUE_BASE + u32::from(h.vbucket);
                adds.insert(stream_opaque, h.opaque);
                out.extend_from_slice(&stream_req(h.vbucket, stream_opaque));
            } else if is_request(h.magic) {
                out.extend_from_slice(&success(&h, &buf[start..end]));
            } else if is_response(h.magic) && h.opcode == DCP_STREAM_REQ {
                if let Some(add_opaque) = adds.remove(&h.opaque) {
                    out.extend_from_slice(&add_stream_success(add_opaque, h.opaque));
                    answered += 1;
                    if answered == usize::from(cfg.vbuckets) {
                        sock.write_all(&out).map_err(err)?;
                        break 'setup buf[end..].to_vec();
                    }
                }
            }
        }
        buf.drain(..used);
        sock.write_all(&out).map_err(err)?;
    };
    ready.send(Ok(())).map_err(|e| e.to_string())?;
    let mut cmp = Comparer {
        block,
        total,
        pos: 0,
        mismatches: 0,
    };
    cmp.feed(&leftover);
    while !cmp.done() {
        let n = read_some(&mut sock, &mut rd).map_err(err)?;
        cmp.feed(&rd[..n]);
    }
    let end = Instant::now();
    let result = ConsumerDone {
        bytes: cmp.pos,
        mismatches: cmp.mismatches,
        end,
    };
    Ok((result, sock))
}

/// The producer node: the handshake, one answer per STREAM_REQ, then the stream on `go`.
fn producer_node(
    mut sock: TcpStream,
    cfg: &Config,
    block: Arc<Vec<u8>>,
    blocks: u64,
    ready: mpsc::Sender<Result<(), String>>,
    go: mpsc::Receiver<()>,
) -> Result<(), String> {
    let err = |e: io::Error| format!("producer node: {e}");
    let mut rd = vec![0u8; READ_BUF];
    let mut buf = Vec::new();
    let mut answered = 0usize;
    while answered < usize::from(cfg.vbuckets) {
        let n = read_some(&mut sock, &mut rd).map_err(err)?;
        buf.extend_from_slice(&rd[..n]);
        let (frames, used) = complete_frames(&buf);
        let mut out = Vec::new();
        for (h, start, end) in frames {
            if is_request(h.magic) && h.opcode == DCP_STREAM_REQ {
                out.extend_from_slice(&stream_req_success(h.opaque));
                answered += 1;
            } else if is_request(h.magic) {
                out.extend_from_slice(&success(&h, &buf[start..end]));
            }
            // responses (a raw relay forwards the consumer's ADD_STREAM answers) are dropped
        }
        buf.drain(..used);
        sock.write_all(&out).map_err(err)?;
    }
    let reader = sock.try_clone().map_err(err)?;
    thread::spawn(move || answer_requests(reader, buf));
    ready.send(Ok(())).map_err(|e| e.to_string())?;
    go.recv().map_err(|e| e.to_string())?;
    for _ in 0..blocks {
        sock.write_all(&block).map_err(err)?;
    }
    // This thread stays until the driver exits, so its CPU time stays in /proc/self/task.
    let _ = go.recv();
    Ok(())
}

/// This process's CPU time (user + system, all threads) in ns, from /proc: the per-thread
/// schedstat run times when the kernel has them, else utime + stime in clock ticks (10 ms).
fn cpu_ns() -> u64 {
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let mut sum = 0u64;
        let mut any = false;
        for task in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
                if let Some(Ok(ns)) = s.split_whitespace().next().map(str::parse::<u64>) {
                    sum += ns;
                    any = true;
                }
            }
        }
        if any && sum > 0 {
            return sum;
        }
    }
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = after.split_whitespace().collect();
            let user: u64 = f.get(11)?.parse().ok()?;
            let system: u64 = f.get(12)?.parse().ok()?;
            Some((user + system) * 10_000_000)
        })
        .unwrap_or(0)
}

fn run(cfg: Config) -> Result<(), String> {
    let block = Arc::new(mutation_block(&cfg));
    let blocks = cfg.total_bytes.div_ceil(block.len() as u64).max(1);
    let total = blocks * block.len() as u64;
    let err = |e: io::Error| e.to_string();
    let consumer_listener = TcpListener::bind("127.0.0.1:0").map_err(err)?;
    let producer_listener = TcpListener::bind("127.0.0.1:0").map_err(err)?;
    let mut stdout = io::stdout();
    writeln!(
        stdout,
        "ports {} {}",
        consumer_listener.local_addr().map_err(err)?.port(),
        producer_listener.local_addr().map_err(err)?.port()
    )
    .and_then(|_| stdout.flush())
    .map_err(err)?;

    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (go_tx, go_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let (c_cfg, c_block, c_ready) = (cfg.clone(), Arc::clone(&block), ready_tx.clone());
    thread::spawn(move || {
        let outcome = consumer_listener
            .accept()
            .map_err(|e| format!("consumer accept: {e}"))
            .and_then(|(sock, _)| {
                let _ = sock.set_nodelay(true);
                consumer_node(sock, &c_cfg, c_block, total, c_ready.clone())
            });
        match outcome {
            Ok((done, sock)) => {
                let _ = done_tx.send(Ok(done));
                // From now on a node that answers what the proxy asks (CLOSE_STREAM on shut), on
                // this thread, so that its CPU time stays in /proc/self/task.
                answer_requests(sock, Vec::new());
            }
            Err(e) => {
                let _ = c_ready.send(Err(e.clone()));
                let _ = done_tx.send(Err(e));
            }
        }
    });
    let (p_cfg, p_block, p_ready) = (cfg.clone(), Arc::clone(&block), ready_tx);
    thread::spawn(move || {
        let outcome = producer_listener
            .accept()
            .map_err(|e| format!("producer accept: {e}"))
            .and_then(|(sock, _)| {
                let _ = sock.set_nodelay(true);
                producer_node(sock, &p_cfg, p_block, blocks, p_ready.clone(), go_rx)
            });
        if let Err(e) = outcome {
            let _ = p_ready.send(Err(e));
        }
    });

    for _ in 0..2 {
        ready_rx.recv().map_err(|e| e.to_string())??;
    }
    writeln!(stdout, "ready")
        .and_then(|_| stdout.flush())
        .map_err(err)?;
    let stdin = io::stdin();
    let mut line = String::new();
    stdin.lock().read_line(&mut line).map_err(err)?;
    if line.trim() != "go" {
        return Err(format!("expected go, got {:?}", line.trim()));
    }
    let cpu0 = cpu_ns();
    let start = Instant::now();
    go_tx.send(()).map_err(|e| e.to_string())?;
    let done = done_rx.recv().map_err(|e| e.to_string())??;
    let cpu1 = cpu_ns();
    writeln!(
        stdout,
        "done bytes={} ns={} mismatches={} driver_cpu_ns={}",
        done.bytes,
        done.end.duration_since(start).as_nanos(),
        done.mismatches,
        cpu1.saturating_sub(cpu0)
    )
    .and_then(|_| stdout.flush())
    .map_err(err)?;
    // Keep both nodes up (answering) until the bench closes our stdin.
    let mut rest = String::new();
    while stdin.lock().read_line(&mut rest).map_err(err)? > 0 {
        rest.clear();
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_args(&args).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_have_the_exact_size_and_parse_back() {
        for size in [256usize, 4096, 100] {
            let f = mutation(7, 3, size);
            assert_eq!(f.len(), size);
            let h = header(&f);
            assert_eq!(h.opcode, DCP_MUTATION);
            assert_eq!(h.vbucket, 3);
            assert_eq!(h.extras_len, MUTATION_EXTRAS_LEN);
            assert_eq!(HEADER_LEN + h.body_len, size);
            assert_eq!(h.opaque, OWN_OPAQUE_BASE + 3);
        }
    }

    #[test]
    fn a_block_is_whole_frames() {
        let cfg = Config {
            frame_bytes: 4096,
            block_bytes: 10_000,
            ..Config::default()
        };
        let block = mutation_block(&cfg);
        assert_eq!(block.len(), 2 * 4096);
        let (frames, used) = complete_frames(&block);
        assert_eq!((frames.len(), used), (2, block.len()));
        assert_eq!(frames[1].0.vbucket, 1);
    }

    #[test]
    fn hello_is_answered_with_the_features_asked_for() {
        let features = [0u8, 4, 0, 6];
        let req = frame(REQ, HELLO, 0, 9, [&[], b"agent", &features]);
        let res = success(&header(&req), &req);
        let h = header(&res);
        assert_eq!((h.magic, h.opcode, h.opaque, h.vbucket), (RES, HELLO, 9, 0));
        assert_eq!(&res[HEADER_LEN..], &features);
    }

    #[test]
    fn alt_request_header_lengths() {
        let mut req = frame(REQ, 0x89, 0, 2, [&[], b"default", &[]]);
        // flexible framing: 1 byte framing extras length, 1 byte key length
        req[0] = ALT_REQ;
        req[2] = 0;
        req[3] = 7;
        let h = header(&req);
        assert_eq!((h.framing_len, h.key_len, h.body_len), (0, 7, 7));
    }

    #[test]
    fn the_comparer_counts_differences_and_extra_bytes() {
        let block = Arc::new((0u8..100).collect::<Vec<u8>>());
        let mut cmp = Comparer {
            block: Arc::clone(&block),
            total: 250,
            pos: 0,
            mismatches: 0,
        };
        let mut sent: Vec<u8> = block.iter().cycle().take(250).copied().collect();
        sent[120] ^= 1;
        sent[199] ^= 1;
        for piece in sent.chunks(37) {
            cmp.feed(piece);
        }
        assert!(cmp.done());
        assert_eq!(cmp.mismatches, 2);
        cmp.feed(&[0, 1, 2]);
        assert_eq!(cmp.mismatches, 5);
    }

    #[test]
    fn options() {
        let args: Vec<String> = ["--frame-bytes", "4096", "--vbuckets", "8"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let cfg = parse_args(&args).unwrap();
        assert_eq!((cfg.frame_bytes, cfg.vbuckets), (4096, 8));
        assert!(parse_args(&["--frame-bytes".to_string(), "10".to_string()]).is_err());
        assert!(parse_args(&["--nope".to_string(), "1".to_string()]).is_err());
    }
}
