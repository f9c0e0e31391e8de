//! Named cases of the MB-53445 rule: a DCP_STREAM_END failing a stream still being set up is
//! reported in the setup reply.

mod common;

use common::*;
use dcp_setup::*;

#[test]
fn stream_end_with_state_changed_before_add_answer_fails_that_vbucket() {
    let mut s = Setup::new();
    assert_eq!(s.begin(&[5]), Ok(Start::Send(vec![add(5)])));
    assert_eq!(
        s.stream_end(5, 5, StreamEndReason::STATE_CHANGED),
        errors(&[(Why::StreamEnd(StreamEndReason::STATE_CHANGED), 5)])
    );
    assert_eq!(s.phase(), Phase::Idle);
    assert!(s.partitions().is_empty());
}

#[test]
fn reply_waits_for_the_answered_vbucket_and_reports_only_the_ended_one() {
    let mut s = Setup::new();
    assert_eq!(s.begin(&[0, 1]), Ok(Start::Send(vec![add(0), add(1)])));
    assert_eq!(
        s.stream_end(0, 0, StreamEndReason::STATE_CHANGED),
        Outcome::NoReply
    );
    assert_eq!(
        s.add_stream_response(1, 0),
        errors(&[(Why::StreamEnd(StreamEndReason::STATE_CHANGED), 0)])
    );
    assert_eq!(s.partitions(), vec![1]);
}

#[test]
fn stream_end_is_matched_by_vbucket_not_by_its_opaque() {
    let mut s = Setup::new();
    assert!(s.begin(&[3, 7]).is_ok());
    // The opaque is the consumer's own stream opaque; here it even equals the other pending vbucket.
    assert_eq!(
        s.stream_end(3, 7, StreamEndReason::BACKFILL_FAIL),
        Outcome::NoReply
    );
    assert_eq!(s.info().pending_adds, vec![7]);
    assert_eq!(
        s.add_stream_response(7, 0),
        errors(&[(Why::StreamEnd(StreamEndReason::BACKFILL_FAIL), 3)])
    );
}

#[test]
fn stream_end_with_reason_ok_leaves_the_add_pending_and_its_success_replies_ok() {
    let mut s = Setup::new();
    assert!(s.begin(&[2]).is_ok());
    assert_eq!(
        s.stream_end(2, 0x1234, StreamEndReason::OK),
        Outcome::NoReply
    );
    assert_eq!(s.info().pending_adds, vec![2]);
    assert_eq!(s.add_stream_response(2, 0), Outcome::Reply(Reply::Ok));
    // The stream has ended all the same: the consumer holds none.
    assert!(s.partitions().is_empty());
}

#[test]
fn unknown_stream_end_reason_code_is_kept_in_the_error() {
    let mut s = Setup::new();
    assert!(s.begin(&[9]).is_ok());
    assert_eq!(
        s.stream_end(9, 0, StreamEndReason(4242)),
        errors(&[(Why::StreamEnd(StreamEndReason(4242)), 9)])
    );
}

#[test]
fn stream_end_of_an_active_stream_removes_it_and_others_change_nothing() {
    let mut s = with_active(&[1, 2]);
    assert_eq!(s.stream_end(1, 0, StreamEndReason::OK), Outcome::NoReply);
    assert_eq!(s.partitions(), vec![2]);
    assert_eq!(
        s.stream_end(8, 0, StreamEndReason::CLOSED),
        Outcome::NoReply
    );
    assert_eq!(
        s.stream_end(60000, 0, StreamEndReason::CLOSED),
        Outcome::NoReply
    );
    assert_eq!(s.partitions(), vec![2]);
}
