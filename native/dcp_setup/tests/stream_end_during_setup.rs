//! Named cases of the MB-53445 stream-end semantics and the other rules of the machine.

mod common;

use common::Drive;
use dcp_setup::{
    Action, Outcome, Phase, Refusal, Reply, Response, Setup, Side, Start, StreamEndReason, VbState,
    Why,
};

fn add(vb: u16) -> Action {
    Action::AddStream {
        vbucket: vb,
        opaque: u32::from(vb),
        flags: 0,
    }
}

fn close(side: Side, vb: u16) -> Action {
    Action::CloseStream {
        side,
        vbucket: vb,
        opaque: u32::from(vb),
    }
}

fn errors(list: &[(Why, u16)]) -> Outcome {
    Outcome::Reply(Reply::Errors(list.to_vec()))
}

/// A machine with `vbs` active (set up and answered).
fn with_active(vbs: &[u16]) -> Setup {
    let mut s = Setup::new();
    if let Ok(Start::Send(_)) = s.begin(vbs) {
        for &vb in vbs {
            s.add_stream_response(vb.into(), 0);
        }
    }
    assert_eq!(s.partitions(), vbs);
    assert_eq!(s.phase(), Phase::Idle);
    s
}

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
    assert_eq!(s.partitions(), vec![2]);
}

#[test]
fn late_add_answer_after_a_stream_end_failure_is_absorbed_not_a_violation() {
    let mut s = Setup::new();
    assert!(s.begin(&[0, 1]).is_ok());
    assert_eq!(
        s.stream_end(0, 9, StreamEndReason::ROLLBACK),
        Outcome::NoReply
    );
    // Still setting up: the late answer for 0 is absorbed and does not complete anything.
    assert_eq!(s.add_stream_response(0, 0), Outcome::NoReply);
    assert_eq!(s.phase(), Phase::SettingUp);
    assert_eq!(
        s.add_stream_response(1, 0),
        errors(&[(Why::StreamEnd(StreamEndReason::ROLLBACK), 0)])
    );
    assert_eq!(s.partitions(), vec![1]);
}

#[test]
fn late_add_answer_arriving_after_the_reply_is_absorbed_once() {
    let mut s = Setup::new();
    assert!(s.begin(&[4]).is_ok());
    assert_eq!(
        s.stream_end(4, 1, StreamEndReason::CLOSED),
        errors(&[(Why::StreamEnd(StreamEndReason::CLOSED), 4)])
    );
    assert_eq!(s.add_stream_response(4, 0x22), Outcome::NoReply);
    assert!(
        s.partitions().is_empty(),
        "an absorbed answer never activates"
    );
    assert_eq!(s.info().absorbed, 1);
    // Only one answer was owed: a second one is a violation.
    assert_eq!(
        s.add_stream_response(4, 0),
        Outcome::UnexpectedResponse {
            response: Response::AddStream,
            opaque: 4
        }
    );
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
fn answer_with_an_opaque_matching_nothing_is_a_protocol_violation() {
    let mut s = Setup::new();
    assert!(s.begin(&[0]).is_ok());
    assert_eq!(
        s.add_stream_response(77, 0),
        Outcome::UnexpectedResponse {
            response: Response::AddStream,
            opaque: 77
        }
    );
    assert_eq!(
        s.close_stream_response(Side::Producer, 0xdead_beef, 0),
        Outcome::UnexpectedResponse {
            response: Response::CloseStream(Side::Producer),
            opaque: 0xdead_beef
        }
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
    assert_eq!(s.begin(&[3, 3]), Ok(Start::Settled));
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
fn deadline_fails_every_pending_vbucket_once_with_setup_timeout() {
    let mut s = with_active(&[0]);
    assert!(s.begin(&[1, 2]).is_ok()); // adds 1, 2; closes 0 on both sides
    assert_eq!(s.add_stream_response(2, 0), Outcome::NoReply);
    assert_eq!(
        s.deadline(),
        errors(&[(Why::SetupTimeout, 0), (Why::SetupTimeout, 1)])
    );
    assert_eq!(s.phase(), Phase::Idle);
    // The timed-out requests' answers are absorbed when they finally come.
    assert_eq!(s.add_stream_response(1, 0), Outcome::NoReply);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 0, 0),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Producer, 0, 0),
        Outcome::NoReply
    );
    assert_eq!(s.deadline(), Outcome::NoReply);
}

#[test]
fn connection_lost_fails_pending_vbuckets_and_shuts() {
    let mut s = Setup::new();
    assert!(s.begin(&[0, 1]).is_ok());
    assert_eq!(
        s.stream_end(1, 0, StreamEndReason::DISCONNECTED),
        Outcome::NoReply
    );
    assert_eq!(
        s.connection_lost(),
        errors(&[
            (Why::ConnectionLost, 0),
            (Why::StreamEnd(StreamEndReason::DISCONNECTED), 1)
        ])
    );
    assert_eq!(s.phase(), Phase::Shut);
    assert_eq!(s.begin(&[0]), Err(Refusal::Shut));
    assert_eq!(s.add_stream_response(0, 0), Outcome::NoReply);
}

#[test]
fn takeover_completes_only_after_add_ack_and_switch_to_active_ack() {
    let mut s = Setup::new();
    assert_eq!(
        s.takeover_begin(6),
        Ok(vec![Action::AddStream {
            vbucket: 6,
            opaque: 6,
            flags: 1
        }])
    );
    assert_eq!(s.stream_req(6, 0x5000), Outcome::NoReply);
    assert_eq!(
        s.set_vbucket_state(0x5000, VbState::PENDING),
        Outcome::NoReply
    );
    assert_eq!(s.set_vbucket_state_response(0x5000, 0), Outcome::NoReply);
    assert_eq!(s.add_stream_response(6, 0), Outcome::NoReply);
    assert_eq!(
        s.set_vbucket_state(0x5000, VbState::ACTIVE),
        Outcome::NoReply
    );
    // An answer with another opaque is someone else's exchange.
    assert_eq!(s.set_vbucket_state_response(0x5001, 0), Outcome::NoReply);
    assert_eq!(
        s.set_vbucket_state_response(0x5000, 0),
        Outcome::Reply(Reply::Ok)
    );
    assert_eq!(s.partitions(), vec![6]);
    assert_eq!(s.phase(), Phase::Idle);
}

#[test]
fn takeover_waits_for_the_add_ack_when_active_comes_first() {
    let mut s = Setup::new();
    assert!(s.takeover_begin(2).is_ok());
    assert_eq!(s.stream_req(2, 11), Outcome::NoReply);
    assert_eq!(s.set_vbucket_state(11, VbState::ACTIVE), Outcome::NoReply);
    assert_eq!(s.set_vbucket_state_response(11, 0), Outcome::NoReply);
    assert_eq!(s.add_stream_response(2, 0), Outcome::Reply(Reply::Ok));
}

#[test]
fn takeover_of_an_active_vbucket_is_refused() {
    let mut s = with_active(&[4]);
    assert_eq!(s.takeover_begin(4), Err(Refusal::AlreadyActive));
    assert_eq!(s.phase(), Phase::Idle);
}

#[test]
fn failed_takeover_add_replies_with_its_status() {
    let mut s = Setup::new();
    assert!(s.takeover_begin(1).is_ok());
    assert_eq!(
        s.add_stream_response(1, 0x02),
        errors(&[(Why::McbpStatus(0x02), 1)])
    );
    assert_eq!(s.phase(), Phase::Idle);
}

#[test]
fn shut_from_idle_closes_active_streams_then_replies() {
    let mut s = with_active(&[0, 3]);
    assert_eq!(
        s.shut(),
        Ok(Start::Send(vec![
            close(Side::Consumer, 0),
            close(Side::Consumer, 3)
        ]))
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 3, 0),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 0, 0x01),
        Outcome::Reply(Reply::Ok)
    );
    assert_eq!(s.phase(), Phase::Shut);
    assert_eq!(s.shut(), Ok(Start::Settled));
}

#[test]
fn shut_from_a_stuck_setup_closes_pending_and_active_and_answers_the_setup_caller() {
    let mut s = with_active(&[0]);
    assert!(s.begin(&[1]).is_ok()); // add 1, close 0 on both sides
    assert_eq!(
        s.shut(),
        Ok(Start::Send(vec![close(Side::Consumer, 1)])),
        "0 is already closing; 1 is still being added"
    );
    assert_eq!(s.info().pending_closes_producer, None);
    assert_eq!(
        s.close_stream_response(Side::Producer, 0, 0),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 0, 0),
        Outcome::NoReply
    );
    // The add is answered before its close: the close's answer then only completes the close.
    // (A close answered first settles the add itself: tests/shut_during_setup.rs.)
    assert_eq!(s.add_stream_response(1, 0x04), Outcome::NoReply);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 1, 0x01),
        errors(&[(Why::McbpStatus(0x04), 1)])
    );
    assert_eq!(s.phase(), Phase::Shut);
}

#[test]
fn shut_during_a_takeover_is_refused_as_busy() {
    let mut s = Setup::new();
    assert!(s.takeover_begin(0).is_ok());
    assert_eq!(s.shut(), Err(Refusal::Busy));
    assert_eq!(s.deadline(), errors(&[(Why::SetupTimeout, 0)]));
    assert_eq!(s.shut(), Ok(Start::Settled));
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
    assert!(s.partitions().is_empty(), "the producer side closed it");
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
