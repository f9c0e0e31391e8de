//! proptest properties: encode/decode round trip, chunking invariance of the splitter against a
//! reference model, and no panic on arbitrary bytes.

use mcbp::splitter::{fate, Fate};
use mcbp::{
    decode, Decoded, Error, Event, FeedOutput, FeedStatus, Frame, FrameInfo, Magic, Side, Splitter,
};
use proptest::prelude::*;

/// An owned frame description that proptest can generate and shrink.
#[derive(Debug, Clone)]
struct Spec {
    magic: Magic,
    opcode: u8,
    datatype: u8,
    vbucket_or_status: u16,
    opaque: u32,
    cas: u64,
    infos: Vec<(u16, Vec<u8>)>,
    extras: Vec<u8>,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl Spec {
    fn frame(&self) -> Frame<'_> {
        Frame {
            magic: self.magic,
            opcode: self.opcode,
            datatype: self.datatype,
            vbucket_or_status: self.vbucket_or_status,
            opaque: self.opaque,
            cas: self.cas,
            framing_extras: self
                .infos
                .iter()
                .map(|(id, data)| FrameInfo { id: *id, data })
                .collect(),
            extras: &self.extras,
            key: &self.key,
            value: &self.value,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.frame()
            .to_vec()
            .expect("generated frames are encodable")
    }
}

fn magic() -> impl Strategy<Value = Magic> {
    prop::sample::select(Magic::ALL.to_vec())
}

/// Opcodes biased towards the ones the policies single out.
fn opcode() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => prop::sample::select(vec![0x51u8, 0x52, 0x53, 0x55, 0x57, 0x5b, 0x5d]),
        1 => any::<u8>(),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        magic(),
        opcode(),
        any::<u8>(),
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        prop::collection::vec(
            (0u16..=270, prop::collection::vec(any::<u8>(), 0..20)),
            0..4,
        ),
        prop::collection::vec(any::<u8>(), 0..48),
        prop::collection::vec(any::<u8>(), 0..40),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(magic, opcode, datatype, vs, opaque, cas, infos, extras, key, value)| {
                let mut s = Spec {
                    magic,
                    opcode,
                    datatype,
                    vbucket_or_status: vs,
                    opaque,
                    cas,
                    infos: if magic.is_flexible() {
                        infos
                    } else {
                        Vec::new()
                    },
                    extras,
                    key,
                    value,
                };
                // Reported stream ends need their 4-byte reason to be valid, reported
                // set-vbucket-state requests their state byte.
                if matches!(magic, Magic::Req | Magic::AltReq) && opcode == 0x55 {
                    s.extras.resize(4, 0);
                }
                if matches!(magic, Magic::Req | Magic::AltReq) && opcode == 0x5b {
                    s.extras.resize(1, 0);
                }
                s
            },
        )
}

/// Cut points for a stream of `len` bytes.
fn cuts(len: usize, raw: &[usize]) -> Vec<usize> {
    let mut c: Vec<usize> = raw.iter().map(|r| r % (len + 1)).collect();
    c.push(0);
    c.push(len);
    c.sort_unstable();
    c.dedup();
    c
}

/// What the splitter must produce, frame by frame, from the side policy alone.
fn model(side: Side, frames: &[Vec<u8>]) -> (Vec<u8>, Vec<Event>) {
    let mut forward = Vec::new();
    let mut events = Vec::new();
    for f in frames {
        let fate = fate(side, f[0], f[1]).unwrap();
        if fate != Fate::Report {
            forward.extend_from_slice(f);
        }
        if fate != Fate::Forward {
            // Every reported frame is one typed event, decoded once.
            let Decoded::Frame(d, _) = decode(f, u64::MAX).unwrap() else {
                unreachable!()
            };
            events.push(
                mcbp::event(&d)
                    .unwrap()
                    .expect("a reported frame has an event"),
            );
        }
    }
    (forward, events)
}

/// Feeds the chunks with a small budget (exercising resumption) and collects everything.
fn run(
    side: Side,
    stream: &[u8],
    cut: &[usize],
    budget: usize,
) -> Result<(Vec<u8>, Vec<Event>, Splitter), Error> {
    let mut s = Splitter::new(side, 1 << 20);
    let mut forward = Vec::new();
    let mut events = Vec::new();
    for w in cut.windows(2) {
        let chunk = &stream[w[0]..w[1]];
        let mut from = 0;
        loop {
            let mut out = FeedOutput::default();
            let status = s.feed(chunk, from, budget, &mut out)?;
            forward.extend(out.forward_bytes(chunk));
            events.extend(out.events);
            match status {
                FeedStatus::Done => break,
                FeedStatus::Stopped(next) => {
                    assert!(next > from, "no progress");
                    from = next;
                }
            }
        }
    }
    Ok((forward, events, s))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_gives_the_frame_back(s in spec()) {
        let bytes = s.bytes();
        match decode(&bytes, u64::MAX).unwrap() {
            Decoded::Frame(f, used) => {
                prop_assert_eq!(used, bytes.len());
                prop_assert_eq!(f, s.frame());
            }
            Decoded::More(n) => prop_assert!(false, "needs {} more", n),
        }
        for cut in 0..bytes.len().min(40) {
            let more = matches!(decode(&bytes[..cut], u64::MAX), Ok(Decoded::More(_)));
            prop_assert!(more);
        }
    }

    #[test]
    fn any_chunking_gives_the_model_forward_bytes_and_events(
        frames in prop::collection::vec(spec(), 0..24),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..12),
        budget in 1usize..80,
        consumer in any::<bool>(),
    ) {
        let side = if consumer { Side::Consumer } else { Side::Producer };
        let frames: Vec<Vec<u8>> = frames.iter().map(Spec::bytes).collect();
        let stream = frames.concat();
        let (want_fwd, want_events) = model(side, &frames);
        let (whole_fwd, whole_events, whole) = run(side, &stream, &[0, stream.len()], usize::MAX).unwrap();
        let (fwd, events, cut) = run(side, &stream, &cuts(stream.len(), &raw_cuts), budget).unwrap();
        prop_assert_eq!(&whole_fwd, &want_fwd);
        prop_assert_eq!(&whole_events, &want_events);
        prop_assert_eq!(&fwd, &want_fwd);
        prop_assert_eq!(&events, &want_events);
        prop_assert_eq!(whole.stats(), cut.stats());
        prop_assert_eq!(cut.stats().held_bytes, 0);
        prop_assert_eq!(cut.stats().frames, frames.len() as u64);
    }

    #[test]
    fn arbitrary_bytes_never_panic_decode_or_feed(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..8),
        budget in 1usize..50,
    ) {
        let _ = decode(&bytes, 1 << 20);
        for side in [Side::Consumer, Side::Producer] {
            let _ = run(side, &bytes, &cuts(bytes.len(), &raw_cuts), budget);
        }
    }

    #[test]
    fn valid_headers_with_garbage_bodies_never_panic(
        s in spec(),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
        flip in any::<usize>(),
    ) {
        let mut bytes = s.bytes();
        let i = 24 + flip % (bytes.len() - 23);
        bytes.truncate(i);
        bytes.extend(garbage);
        let _ = decode(&bytes, 1 << 20);
        if let Ok(Decoded::Frame(f, _)) = decode(&bytes, 1 << 20) {
            let _ = mcbp::fields(&f);
        }
        for side in [Side::Consumer, Side::Producer] {
            let _ = run(side, &bytes, &[0, bytes.len()], 3);
        }
    }
}
