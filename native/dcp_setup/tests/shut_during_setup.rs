//! Named cases of a shut over a setup whose add the consumer never answers: the consumer's answer
//! to the shut's CLOSE_STREAM settles that add, so the setup's caller is answered at once.

mod common;

use common::Drive;
use dcp_setup::{
    Action, Outcome, Phase, Reply, Response, Setup, Side, Start, StreamEndReason, Why,
};

fn close_consumer(vb: u16) -> Action {
    Action::CloseStream {
        side: Side::Consumer,
        vbucket: vb,
        opaque: u32::from(vb),
    }
}

fn errors(list: &[(Why, u16)]) -> Outcome {
    Outcome::Reply(Reply::Errors(list.to_vec()))
}

const CLOSED: Why = Why::StreamEnd(StreamEndReason::CLOSED);

/// A setup of `vbs` whose adds are all unanswered, then a shut over it.
fn shut_over_stuck_adds(vbs: &[u16]) -> Setup {
    let mut s = Setup::new();
    assert!(s.begin(vbs).is_ok());
    assert_eq!(
        s.shut(),
        Ok(Start::Send(
            vbs.iter().map(|&vb| close_consumer(vb)).collect()
        ))
    );
    s
}

#[test]
fn shut_closes_a_stuck_add_and_answers_its_caller_at_once() {
    let mut s = shut_over_stuck_adds(&[3]);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 3, 0),
        errors(&[(CLOSED, 3)])
    );
    assert_eq!(s.phase(), Phase::Shut);
    assert!(s.info().pending_adds.is_empty());
    assert!(s.partitions().is_empty());
    // The add's answer, if it ever comes, changes nothing.
    assert_eq!(s.add_stream_response(3, 0), Outcome::NoReply);
    assert!(s.partitions().is_empty());
}

#[test]
fn key_enoent_answer_to_the_close_settles_the_add_as_closed() {
    let mut s = shut_over_stuck_adds(&[7]);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 7, 0x01),
        errors(&[(CLOSED, 7)])
    );
    assert_eq!(s.phase(), Phase::Shut);
}

#[test]
fn failed_close_settles_the_add_with_the_close_status_once() {
    let mut s = shut_over_stuck_adds(&[2, 5]);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 2, 0x07),
        Outcome::NoReply
    );
    assert_eq!(s.info().pending_adds, vec![5]);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 5, 0),
        errors(&[(Why::McbpStatus(0x07), 2), (CLOSED, 5)])
    );
}

#[test]
fn late_add_answer_after_the_close_settled_it_is_absorbed_while_others_wait() {
    let mut s = shut_over_stuck_adds(&[1, 2]);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 1, 0),
        Outcome::NoReply
    );
    assert_eq!(s.add_stream_response(1, 0), Outcome::Absorbed);
    assert_eq!(s.info().absorbed, 1);
    assert!(!s.is_active(1), "an absorbed answer never activates");
    // Only one answer was owed: a second one is a violation.
    assert_eq!(
        s.add_stream_response(1, 0),
        Outcome::UnexpectedResponse {
            response: Response::AddStream,
            opaque: 1
        }
    );
}

#[test]
fn stream_end_after_the_close_settled_the_add_changes_nothing() {
    let mut s = shut_over_stuck_adds(&[4, 6]);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 4, 0),
        Outcome::NoReply
    );
    assert_eq!(
        s.stream_end(4, 0x99, StreamEndReason::CLOSED),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 6, 0),
        errors(&[(CLOSED, 4), (CLOSED, 6)])
    );
}

#[test]
fn stream_end_before_the_close_answer_keeps_its_own_reason_and_is_reported_once() {
    let mut s = shut_over_stuck_adds(&[4]);
    assert_eq!(
        s.stream_end(4, 0x99, StreamEndReason::STATE_CHANGED),
        Outcome::NoReply,
        "the shut's close is still unanswered"
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 4, 0),
        errors(&[(Why::StreamEnd(StreamEndReason::STATE_CHANGED), 4)])
    );
}

#[test]
fn add_answered_before_the_close_completes_as_usual_and_the_close_removes_it() {
    let mut s = shut_over_stuck_adds(&[3]);
    assert_eq!(s.add_stream_response(3, 0), Outcome::NoReply);
    assert_eq!(s.partitions(), vec![3]);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 3, 0),
        Outcome::Reply(Reply::Ok)
    );
    assert!(s.partitions().is_empty());
    assert_eq!(s.phase(), Phase::Shut);
}

#[test]
fn close_answers_without_a_shut_never_settle_adds() {
    // Outside a shut an add and a consumer close never share a vbucket; the close answer of
    // another vbucket leaves the pending add alone.
    let mut s = Setup::new();
    assert!(s.begin(&[0]).is_ok());
    assert_eq!(s.add_stream_response(0, 0), Outcome::Reply(Reply::Ok));
    assert!(s.begin(&[1]).is_ok()); // add 1, close 0 on both sides
    assert_eq!(
        s.close_stream_response(Side::Consumer, 0, 0),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Producer, 0, 0),
        Outcome::NoReply
    );
    assert_eq!(s.info().pending_adds, vec![1]);
    assert_eq!(s.add_stream_response(1, 0), Outcome::Reply(Reply::Ok));
}

// Moved from test/dcp_setup_tests.erl (shut_from_a_stuck_setup_answers_the_setup_caller_then_is_shut).
#[test]
fn adds_settled_before_their_closes_are_answered_leave_the_closes_to_complete_the_setup() {
    let mut s = Setup::new();
    assert!(s.begin(&[0, 1]).is_ok());
    assert_eq!(
        s.shut(),
        Ok(Start::Send(vec![close_consumer(0), close_consumer(1)]))
    );
    assert_eq!(s.info().next, Some(Phase::Shut));
    assert_eq!(
        s.stream_end(0, 0, StreamEndReason::STATE_CHANGED),
        Outcome::NoReply
    );
    assert_eq!(s.add_stream_response(1, 4), Outcome::NoReply);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 0, 0),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 1, 1),
        errors(&[
            (Why::StreamEnd(StreamEndReason::STATE_CHANGED), 0),
            (Why::McbpStatus(4), 1)
        ])
    );
    assert_eq!(s.phase(), Phase::Shut);
    assert_eq!(s.shut(), Ok(Start::Settled));
}

// Moved from test/dcp_setup_tests.erl
// (shut_close_failure_settles_a_stuck_add_with_its_status_and_owes_the_add_answer).
#[test]
fn a_failed_close_settles_its_add_whose_late_answer_is_absorbed_while_another_waits() {
    let mut s = shut_over_stuck_adds(&[2, 5]);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 2, 7),
        Outcome::NoReply
    );
    assert_eq!((s.info().pending_adds, s.info().absorbed), (vec![5], 0));
    assert_eq!(s.add_stream_response(2, 0), Outcome::Absorbed);
    assert_eq!((s.info().pending_adds, s.info().absorbed), (vec![5], 1));
    assert_eq!(
        s.close_stream_response(Side::Consumer, 5, 1),
        errors(&[(Why::McbpStatus(7), 2), (CLOSED, 5)])
    );
}
