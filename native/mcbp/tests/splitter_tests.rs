//! The cut-through splitter: side policies, chunk boundaries, budget, errors and counters.

mod common;

use common::*;
use mcbp::splitter::{fate, Fate, MAX_REPORTED_FRAME, REPORTED_FRAME_COST};
use mcbp::{
    Error, Event, FeedOutput, FeedStatus, FrameInfo, Magic, Piece, Side, Splitter, StreamEndReason,
};

const MAX: u64 = 30 * 1024 * 1024;

/// Forwarded bytes, events and forward pieces of one unbudgeted call.
type Fed = (Vec<u8>, Vec<Event>, Vec<Piece>);

fn feed(s: &mut Splitter, chunk: &[u8]) -> Result<Fed, Error> {
    let mut out = FeedOutput::default();
    s.feed_all(chunk, &mut out)?;
    Ok((out.forward_bytes(chunk), out.events, out.forward))
}

#[test]
fn consecutive_forwarded_frames_become_one_range() {
    let stream: Vec<u8> = (0..100).flat_map(|i| mutation(1, i, 200)).collect();
    let mut s = Splitter::new(Side::Producer, MAX);
    let (fwd, events, pieces) = feed(&mut s, &stream).unwrap();
    assert_eq!(pieces, vec![Piece::Chunk(0..stream.len())]);
    assert_eq!(fwd, stream);
    assert!(events.is_empty());
}

#[test]
fn producer_stream_end_is_forwarded_and_reported() {
    let mut stream = mutation(5, 1, 10);
    stream.extend(stream_end(5, 77, 2));
    stream.extend(mutation(5, 2, 10));
    let mut s = Splitter::new(Side::Producer, MAX);
    let (fwd, events, pieces) = feed(&mut s, &stream).unwrap();
    assert_eq!(fwd, stream);
    assert_eq!(
        pieces.len(),
        1,
        "a forwarded-and-reported frame does not break the run"
    );
    assert_eq!(
        events,
        vec![Event::StreamEnd {
            vbucket: 5,
            opaque: 77,
            reason: StreamEndReason::STATE_CHANGED
        }]
    );
}

#[test]
fn producer_close_stream_answer_is_reported_and_not_forwarded() {
    let m1 = mutation(5, 1, 10);
    let close = response(0x52, 0, 9);
    let m2 = mutation(5, 2, 10);
    let stream = [m1.clone(), close.clone(), m2.clone()].concat();
    let mut s = Splitter::new(Side::Producer, MAX);
    let (fwd, events, pieces) = feed(&mut s, &stream).unwrap();
    assert_eq!(fwd, [m1.clone(), m2].concat());
    assert_eq!(
        events,
        vec![Event::CloseStreamResponse {
            opaque: 9,
            status: 0
        }]
    );
    assert_eq!(pieces.len(), 2);
    assert_eq!(s.stats().blocked_frames, 1);
}

#[test]
fn each_side_applies_its_policy_table() {
    use Fate::*;
    let cases = [
        (Side::Producer, 0x80, 0x55, ForwardAndReport),
        (Side::Producer, 0x80, 0x5b, ForwardAndReport),
        (Side::Producer, 0x81, 0x52, Report),
        (Side::Producer, 0x81, 0x51, Forward),
        (Side::Producer, 0x80, 0x57, Forward),
        (Side::Producer, 0x08, 0x55, ForwardAndReport),
        (Side::Consumer, 0x81, 0x51, Report),
        (Side::Consumer, 0x81, 0x52, Report),
        (Side::Consumer, 0x80, 0x53, ForwardAndReport),
        (Side::Consumer, 0x81, 0x5b, ForwardAndReport),
        (Side::Consumer, 0x80, 0x55, Forward),
        (Side::Consumer, 0x81, 0x5d, Forward),
        (Side::Consumer, 0x18, 0x51, Report),
        // Server-initiated frames have their own opcode namespace.
        (Side::Consumer, 0x83, 0x51, Forward),
        (Side::Producer, 0x82, 0x55, Forward),
    ];
    for (side, magic, opcode, expected) in cases {
        assert_eq!(
            fate(side, magic, opcode),
            Some(expected),
            "{side:?} {magic:#x} {opcode:#x}"
        );
    }
    assert_eq!(fate(Side::Consumer, 0x00, 0x51), None);
}

#[test]
fn consumer_add_stream_answer_is_held_across_chunks_until_whole() {
    let mut f = frame(Magic::Res, 0x51, &[0, 0, 0, 4], b"", b"");
    f.opaque = 3;
    let answer = bytes(&f);
    let stream = [mutation(1, 1, 5), answer.clone(), mutation(1, 2, 5)].concat();
    let cut = mutation(1, 1, 5).len() + 26;
    let mut s = Splitter::new(Side::Consumer, MAX);
    let (fwd1, ev1, _) = feed(&mut s, &stream[..cut]).unwrap();
    assert!(ev1.is_empty());
    assert_eq!(s.held_bytes(), 26);
    let (fwd2, ev2, _) = feed(&mut s, &stream[cut..]).unwrap();
    assert_eq!(
        ev2,
        vec![Event::AddStreamResponse {
            opaque: 3,
            status: 0,
            stream_opaque: Some(4)
        }]
    );
    assert_eq!(s.held_bytes(), 0);
    assert_eq!(
        [fwd1, fwd2].concat(),
        [mutation(1, 1, 5), mutation(1, 2, 5)].concat()
    );
}

#[test]
fn a_header_split_across_chunks_is_forwarded_as_a_held_piece() {
    let m = mutation(1, 1, 100);
    let mut s = Splitter::new(Side::Producer, MAX);
    let (fwd1, _, pieces1) = feed(&mut s, &m[..10]).unwrap();
    assert!(fwd1.is_empty() && pieces1.is_empty());
    assert_eq!(s.held_bytes(), 10);
    let (fwd2, _, pieces2) = feed(&mut s, &m[10..]).unwrap();
    assert_eq!(fwd2, m);
    assert_eq!(pieces2[0], Piece::Held(m[..24].to_vec().into()));
    assert_eq!(pieces2[1], Piece::Chunk(14..m.len() - 10));
    assert_eq!(s.held_bytes(), 0);
}

#[test]
fn a_large_mutation_is_passed_through_piece_by_piece_without_holding_it() {
    let m = mutation(1, 1, 20 * 1024 * 1024);
    let mut s = Splitter::new(Side::Producer, MAX);
    let mut forwarded = Vec::with_capacity(m.len());
    for piece in m.chunks(64 * 1024) {
        let (fwd, ev, pieces) = feed(&mut s, piece).unwrap();
        assert!(ev.is_empty());
        assert!(pieces.len() <= 1);
        assert_eq!(s.held_bytes(), 0);
        forwarded.extend(fwd);
    }
    assert_eq!(forwarded, m);
    assert_eq!(s.stats().largest_frame, m.len() as u64);
}

#[test]
fn the_budget_stops_at_a_frame_boundary_and_resumes_there() {
    let one = mutation(1, 1, 10);
    let stream: Vec<u8> = (0..10).flat_map(|i| mutation(1, i, 10)).collect();
    let mut s = Splitter::new(Side::Producer, MAX);
    let mut out = FeedOutput::default();
    let status = s.feed(&stream, 0, 3, &mut out).unwrap();
    assert_eq!(status, FeedStatus::Stopped(3 * one.len()));
    assert_eq!(out.forward, vec![Piece::Chunk(0..3 * one.len())]);
    assert_eq!(out.work, 3);
    out.clear();
    let status = s.feed(&stream, 3 * one.len(), 100, &mut out).unwrap();
    assert_eq!(status, FeedStatus::Done);
    assert_eq!(out.forward, vec![Piece::Chunk(3 * one.len()..stream.len())]);
}

#[test]
fn a_reported_frame_weighs_more_against_the_budget() {
    let stream: Vec<u8> = (0..4).flat_map(|i| stream_end(1, i, 0)).collect();
    let mut s = Splitter::new(Side::Producer, MAX);
    let mut out = FeedOutput::default();
    let status = s
        .feed(&stream, 0, 2 * REPORTED_FRAME_COST, &mut out)
        .unwrap();
    assert_eq!(status, FeedStatus::Stopped(2 * 28));
    assert_eq!(out.events.len(), 2);
}

#[test]
fn a_bad_magic_fails_the_splitter_for_good() {
    let mut stream = mutation(1, 1, 10);
    stream.push(0x42);
    let mut s = Splitter::new(Side::Producer, MAX);
    assert_eq!(feed(&mut s, &stream).unwrap_err(), Error::BadMagic(0x42));
    assert_eq!(
        feed(&mut s, &mutation(1, 2, 1)).unwrap_err(),
        Error::BadMagic(0x42)
    );
}

#[test]
fn an_oversized_frame_is_refused_from_its_header() {
    let m = mutation(1, 1, 1000);
    let mut s = Splitter::new(Side::Producer, 1000);
    assert_eq!(
        feed(&mut s, &m[..24]).unwrap_err(),
        Error::FrameTooLarge {
            len: m.len() as u64,
            max: 1000
        }
    );
    assert_eq!(s.held_bytes(), 0);
}

/// A reported frame (here a 30 MiB stream end) is refused from its header, whole in the chunk or
/// held across chunks, long before `max_frame_size`: nothing is gathered or copied.
#[test]
fn an_oversized_reported_frame_is_refused_from_its_header() {
    let mut end = stream_end(3, 9, 0);
    let len = 30 * 1024 * 1024u64;
    end[8..12].copy_from_slice(&((len - 24) as u32).to_be_bytes());
    let want = Error::ReportedFrameTooLarge {
        opcode: 0x55,
        len,
        max: MAX_REPORTED_FRAME,
    };
    let mut s = Splitter::new(Side::Producer, MAX);
    assert_eq!(feed(&mut s, &end[..24]).unwrap_err(), want);
    let mut held = Splitter::new(Side::Producer, MAX);
    feed(&mut held, &end[..10]).unwrap();
    assert_eq!(feed(&mut held, &end[10..24]).unwrap_err(), want);
    // a mutation of the same size is forwarded (cut through)
    let mut fwd = Splitter::new(Side::Producer, MAX);
    assert!(feed(&mut fwd, &mutation(1, 1, 20 * 1024 * 1024)).is_ok());
}

#[test]
fn bad_lengths_are_refused_on_forwarded_frames_too() {
    let mut m = mutation(1, 1, 0);
    m[8..12].copy_from_slice(&10u32.to_be_bytes());
    let mut s = Splitter::new(Side::Producer, MAX);
    assert_eq!(
        feed(&mut s, &m).unwrap_err(),
        Error::BadLengths {
            framing: 0,
            extras: 31,
            key: 3,
            body: 10
        }
    );
}

#[test]
fn a_reported_frame_with_bad_extras_or_framing_fails() {
    let bad_end = request(0x55, &[0, 0, 1], 1);
    let mut s = Splitter::new(Side::Producer, MAX);
    assert_eq!(
        feed(&mut s, &bad_end).unwrap_err(),
        Error::BadExtras {
            opcode: 0x55,
            len: 3
        }
    );
    // An alt stream end whose single frame info claims more bytes than the framing extras hold.
    let mut f = frame(Magic::AltReq, 0x55, &[0, 0, 0, 1], b"", b"");
    f.framing_extras = vec![FrameInfo {
        id: 2,
        data: &[0, 1],
    }];
    let mut b = bytes(&f);
    b[24] = 0x25;
    let mut s = Splitter::new(Side::Producer, MAX);
    assert_eq!(
        feed(&mut s, &b).unwrap_err(),
        Error::BadFramingExtras { offset: 0 }
    );
}

#[test]
fn stats_count_frames_and_bytes_per_opcode() {
    let m = mutation(1, 1, 100);
    let end = stream_end(1, 1, 0);
    let close = response(0x52, 0, 1);
    let stream = [m.clone(), m.clone(), end.clone(), close.clone()].concat();
    let mut s = Splitter::new(Side::Producer, MAX);
    feed(&mut s, &stream[..50]).unwrap();
    let st = s.stats();
    assert_eq!(st.frames, 1);
    assert_eq!(st.held_bytes, 0);
    feed(&mut s, &stream[50..]).unwrap();
    let st = s.stats();
    assert_eq!(st.frames, 4);
    assert_eq!(st.bytes, stream.len() as u64);
    assert_eq!(st.forwarded_frames, 3);
    assert_eq!(st.reported_frames, 2);
    assert_eq!(st.blocked_frames, 1);
    assert_eq!(st.largest_frame, m.len() as u64);
    assert_eq!(
        st.by_opcode,
        vec![
            (0x52, 1, close.len() as u64),
            (0x55, 1, end.len() as u64),
            (0x57, 2, 2 * m.len() as u64)
        ]
    );
}

#[test]
fn empty_and_zero_body_frames_pass_through() {
    let noop = request(0x5c, &[], 1);
    let stream = [noop.clone(), noop.clone()].concat();
    let mut s = Splitter::new(Side::Producer, MAX);
    let (fwd, _, _) = feed(&mut s, &[]).unwrap();
    assert!(fwd.is_empty());
    for b in &stream {
        feed(&mut s, std::slice::from_ref(b)).unwrap();
    }
    assert_eq!(s.stats().frames, 2);
    assert_eq!(s.held_bytes(), 0);
}

#[test]
fn forward_remaining_counts_what_is_left_of_the_frame_being_cut_through() {
    let m = mutation(1, 1, 1000);
    let end = stream_end(1, 7, 2);
    let mut s = Splitter::new(Side::Producer, MAX);
    feed(&mut s, &m[..10]).unwrap();
    // Only part of a header is held: nothing of that frame went out, so this is a boundary.
    assert_eq!(s.stats().forward_remaining, 0);
    feed(&mut s, &m[10..300]).unwrap();
    assert_eq!(s.stats().forward_remaining, (m.len() - 300) as u64);
    feed(&mut s, &m[300..]).unwrap();
    assert_eq!(s.stats().forward_remaining, 0);
    // A forwarded and reported frame counts too while it is gathered.
    feed(&mut s, &end[..26]).unwrap();
    assert_eq!(s.stats().forward_remaining, (end.len() - 26) as u64);
    feed(&mut s, &end[26..]).unwrap();
    assert_eq!(s.stats().forward_remaining, 0);
}

#[test]
fn event_decodes_each_reported_kind_and_nothing_else() {
    let decoded = |b: &[u8]| match mcbp::decode(b, u64::MAX).unwrap() {
        mcbp::Decoded::Frame(f, _) => mcbp::event(&f),
        mcbp::Decoded::More(n) => panic!("short by {n}"),
    };
    let set_state = request(0x5b, &[3], 12);
    assert_eq!(
        decoded(&set_state),
        Ok(Some(Event::SetVbucketState {
            vbucket: 0,
            opaque: 12,
            state: mcbp::VbState::PENDING
        }))
    );
    assert_eq!(
        decoded(&request(0x5b, &[], 12)),
        Err(Error::BadExtras {
            opcode: 0x5b,
            len: 0
        })
    );
    assert_eq!(
        decoded(&request(0x53, &[0; 48], 5)),
        Ok(Some(Event::StreamReq {
            vbucket: 0,
            opaque: 5
        }))
    );
    assert_eq!(
        decoded(&response(0x5b, 0x23, 6)),
        Ok(Some(Event::SetVbucketStateResponse {
            opaque: 6,
            status: 0x23
        }))
    );
    assert_eq!(decoded(&mutation(1, 1, 4)), Ok(None));
    assert_eq!(decoded(&response(0x55, 0, 1)), Ok(None));
}
