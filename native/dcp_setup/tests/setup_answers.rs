//! A setup's requests (with the opaque and flags they carry), their answers and the reply.

mod common;

use common::*;
use dcp_setup::*;

#[test]
fn add_answer_failure_is_reported_with_its_status() {
    let mut s = Setup::new();
    assert!(s.begin(&[0, 1]).is_ok());
    assert_eq!(s.add_stream_response(1, 0x07), Outcome::NoReply);
    assert_eq!(
        s.add_stream_response(0, 0),
        errors(&[(Why::McbpStatus(0x07), 1)])
    );
    assert_eq!(s.partitions(), vec![0]);
}

#[test]
fn errors_are_in_ascending_vbucket_order() {
    let mut s = Setup::new();
    assert!(s.begin(&[1, 2, 3]).is_ok());
    assert_eq!(s.add_stream_response(3, 0x85), Outcome::NoReply);
    assert_eq!(
        s.stream_end(1, 0, StreamEndReason::TOO_SLOW),
        Outcome::NoReply
    );
    assert_eq!(
        s.add_stream_response(2, 0x04),
        errors(&[
            (Why::StreamEnd(StreamEndReason::TOO_SLOW), 1),
            (Why::McbpStatus(0x04), 2),
            (Why::McbpStatus(0x85), 3),
        ])
    );
}

#[test]
fn unwanted_streams_are_closed_on_both_sides_and_key_enoent_counts_as_success() {
    let mut s = with_active(&[0, 1]);
    assert_eq!(
        s.begin(&[1, 2]),
        Ok(Start::Send(vec![
            add(2),
            close(Side::Consumer, 0),
            close(Side::Producer, 0)
        ]))
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 0, 0x01),
        Outcome::NoReply
    );
    assert_eq!(s.add_stream_response(2, 0), Outcome::NoReply);
    assert_eq!(
        s.close_stream_response(Side::Producer, 0, 0),
        Outcome::Reply(Reply::Ok)
    );
    assert_eq!(s.partitions(), vec![1, 2]);
}

#[test]
fn setup_with_nothing_to_change_settles_at_once() {
    let mut s = with_active(&[3]);
    assert_eq!(s.begin(&[3]), Ok(Start::Settled));
    assert_eq!(s.begin(&[1024]), Err(Refusal::BadVbucket(1024)));
    assert_eq!(s.phase(), Phase::Idle);
}

#[test]
fn second_setup_while_one_is_pending_is_refused_as_busy() {
    let mut s = Setup::new();
    assert!(s.begin(&[0]).is_ok());
    assert_eq!(s.begin(&[1]), Err(Refusal::Busy));
    assert_eq!(s.takeover_begin(1), Err(Refusal::Busy));
    assert_eq!(s.maybe_close_stream(0), Err(Refusal::Busy));
}

#[test]
fn maybe_close_stream_closes_only_an_active_stream() {
    let mut s = with_active(&[5]);
    assert_eq!(s.maybe_close_stream(6), Ok(Start::Settled));
    assert_eq!(
        s.maybe_close_stream(5),
        Ok(Start::Send(vec![
            close(Side::Consumer, 5),
            close(Side::Producer, 5)
        ]))
    );
    assert_eq!(
        s.close_stream_response(Side::Producer, 5, 0),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 5, 0x20),
        errors(&[(Why::McbpStatus(0x20), 5)])
    );
    // The consumer refused to close: it still holds the stream.
    assert_eq!(s.partitions(), vec![5], "the consumer kept it");
}

#[test]
fn full_setup_of_all_1024_vbuckets() {
    let all: Vec<u16> = (0..1024).collect();
    let mut s = Setup::new();
    let Ok(Start::Send(actions)) = s.begin(&all) else {
        panic!("expected adds");
    };
    assert_eq!(actions.len(), 1024);
    for vb in (0..1024u16).rev().skip(1) {
        assert_eq!(s.add_stream_response(vb.into(), 0), Outcome::NoReply);
    }
    assert_eq!(s.add_stream_response(1023, 0), Outcome::Reply(Reply::Ok));
    assert_eq!(s.partitions(), all);
}

// Moved from test/dcp_setup_tests.erl (add_failure_and_close_key_enoent_give_exact_reply).
#[test]
fn a_failed_add_and_a_key_enoent_close_in_one_setup_give_one_exact_reply() {
    let mut s = with_active(&[0]);
    assert_eq!(
        s.begin(&[1, 2]),
        Ok(Start::Send(vec![
            add(1),
            add(2),
            close(Side::Consumer, 0),
            close(Side::Producer, 0)
        ]))
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 0, 1),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Producer, 0, 0),
        Outcome::NoReply
    );
    assert_eq!(s.add_stream_response(2, 0x07), Outcome::NoReply);
    assert_eq!(
        s.add_stream_response(1, 0),
        errors(&[(Why::McbpStatus(0x07), 2)])
    );
    assert_eq!(s.partitions(), vec![1]);
}

/// The machine hears each frame from the side whose splitter reports it; the same frame from the
/// other side names no rule and changes nothing.
#[test]
fn a_frame_from_the_side_no_rule_names_changes_nothing() {
    let mut s = Setup::new();
    assert!(s.begin(&[3]).is_ok());
    let before = s.info();
    let stray = [
        Event::AddStreamResponse {
            opaque: 3,
            status: 0,
            stream_opaque: None,
        },
        Event::StreamReq {
            vbucket: 3,
            opaque: 3,
        },
        Event::SetVbucketStateResponse {
            opaque: 3,
            status: 0,
        },
    ];
    for event in stray {
        assert_eq!(
            s.event(Input::Frame(Side::Producer, event)),
            Outcome::NoReply
        );
    }
    let end = Event::StreamEnd {
        vbucket: 3,
        opaque: 3,
        reason: StreamEndReason::CLOSED,
    };
    assert_eq!(s.event(Input::Frame(Side::Consumer, end)), Outcome::NoReply);
    assert_eq!(s.info(), before);
    assert_eq!(s.add_stream_response(3, 0), Outcome::Reply(Reply::Ok));
}

#[test]
fn vbucket_lists_are_checked_before_anything_changes() {
    let mut s = Setup::new();
    // a million elements: refused on its length alone, before any element is looked at
    let huge = vec![0u16; 1_000_000];
    assert_eq!(
        s.request(Request::Begin(&huge)),
        Err(Refusal::TooManyVbuckets)
    );
    let all: Vec<u16> = (0..MAX_VBUCKETS as u16).collect();
    let mut over = all.clone();
    over.push(0);
    assert_eq!(
        s.request(Request::Begin(&over)),
        Err(Refusal::TooManyVbuckets)
    );
    assert_eq!(
        s.request(Request::Begin(&[7, 1024])),
        Err(Refusal::BadVbucket(1024))
    );
    assert_eq!(
        s.request(Request::Begin(&[7, 8, 7])),
        Err(Refusal::DuplicateVbucket(7))
    );
    // refused lists changed nothing: the machine is idle and takes the full list
    assert_eq!(s.info().phase, Phase::Idle);
    assert!(matches!(s.request(Request::Begin(&all)), Ok(Start::Send(a)) if a.len() == 1024));
    // a bad list is refused as such even while busy
    assert_eq!(
        s.request(Request::Begin(&[2, 2])),
        Err(Refusal::DuplicateVbucket(2))
    );
}
