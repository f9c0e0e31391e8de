//! The driver against a minimal relay (what the bench's raw relay does): it sends the ADD_STREAMs,
//! then copies bytes both ways. A faithful relay gets `mismatches=0`; one that flips a byte of the
//! stream is caught.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

const VBUCKETS: u16 = 4;

fn add_stream(vbucket: u16) -> Vec<u8> {
    let mut f = vec![0x80, 0x51, 0, 0, 4, 0];
    f.extend_from_slice(&vbucket.to_be_bytes());
    f.extend_from_slice(&4u32.to_be_bytes()); // body: the 4 extras bytes (flags)
    f.extend_from_slice(&u32::from(vbucket).to_be_bytes()); // opaque
    f.extend_from_slice(&[0; 8]); // cas
    f.extend_from_slice(&[0; 4]); // flags
    f
}

/// Copies `from` to `to`; flips the byte at `corrupt_at` (counted over this direction) if given.
fn copy(mut from: TcpStream, mut to: TcpStream, corrupt_at: Option<u64>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(at) = corrupt_at {
            if at >= seen && at < seen + n as u64 {
                buf[(at - seen) as usize] ^= 0xff;
            }
        }
        seen += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Runs the driver with a relay in the middle; returns the `done` line's fields.
fn run(frame_bytes: usize, corrupt_at: Option<u64>) -> Vec<(String, u64)> {
    // A run takes milliseconds; a hang ends the test binary instead of blocking it forever.
    thread::spawn(|| {
        thread::sleep(Duration::from_secs(60));
        eprintln!("load_driver relay test: no answer within 60 s");
        std::process::abort();
    });
    let mut driver = Command::new(env!("CARGO_BIN_EXE_load_driver"))
        .args(["--frame-bytes", &frame_bytes.to_string()])
        .args([
            "--total-bytes",
            "3000000",
            "--vbuckets",
            &VBUCKETS.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("driver starts");
    let mut stdin = driver.stdin.take().unwrap();
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
    let ports: Vec<u16> = lines.next().unwrap().unwrap()["ports ".len()..]
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    let mut consumer = TcpStream::connect(("127.0.0.1", ports[0])).unwrap();
    let producer = TcpStream::connect(("127.0.0.1", ports[1])).unwrap();
    for vb in 0..VBUCKETS {
        consumer.write_all(&add_stream(vb)).unwrap();
    }
    let (c2, p2) = (consumer.try_clone().unwrap(), producer.try_clone().unwrap());
    thread::spawn(move || copy(consumer, producer, None));
    thread::spawn(move || copy(p2, c2, corrupt_at));
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    stdin.write_all(b"go\n").unwrap();
    let done = lines.next().unwrap().unwrap();
    drop(stdin);
    assert!(driver.wait().unwrap().success());
    let words: Vec<&str> = done.split(' ').collect();
    assert_eq!(words[0], "done", "{done}");
    words[1..]
        .iter()
        .map(|w| {
            let (k, v) = w.split_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn field(fields: &[(String, u64)], name: &str) -> u64 {
    fields.iter().find(|(k, _)| k == name).unwrap().1
}

#[test]
fn a_faithful_relay_delivers_every_byte() {
    for frame_bytes in [256, 4096] {
        let fields = run(frame_bytes, None);
        assert!(field(&fields, "bytes") >= 3_000_000);
        assert_eq!(field(&fields, "mismatches"), 0);
        assert!(field(&fields, "ns") > 0);
    }
}

#[test]
fn a_flipped_byte_is_a_mismatch() {
    let fields = run(256, Some(1_000_000));
    assert_eq!(field(&fields, "mismatches"), 1);
}
