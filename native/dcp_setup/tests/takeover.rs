//! Takeover: an ADD_STREAM with the takeover flag completes once the add is acknowledged and the
//! consumer acknowledged the switch to active.

mod common;

use common::*;
use dcp_setup::*;

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
    // The consumer owns the vbucket: no replica stream on this connection.
    assert!(s.partitions().is_empty());
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
fn takeover_of_an_active_vbucket_closes_it_in_the_same_step() {
    let mut s = with_active(&[4]);
    assert_eq!(
        s.takeover_begin(4),
        Ok(vec![
            close(Side::Consumer, 4),
            close(Side::Producer, 4),
            takeover_add(4)
        ])
    );
    assert_eq!(s.phase(), Phase::Takeover);
    // The closes' answers are the takeover's own business: no reply, the stream is gone.
    assert_eq!(
        s.close_stream_response(Side::Consumer, 4, 0),
        Outcome::Absorbed
    );
    assert_eq!(
        s.close_stream_response(Side::Producer, 4, 0),
        Outcome::Absorbed
    );
    assert_eq!(s.partitions(), Vec::<u16>::new());
    // The old stream's end (sent on the producer's close) is not the takeover stream's.
    assert_eq!(
        s.stream_end(4, 0x99, StreamEndReason::CLOSED),
        Outcome::NoReply
    );
    assert_eq!(s.stream_req(4, 0x5000), Outcome::NoReply);
    assert_eq!(s.add_stream_response(4, 0), Outcome::NoReply);
    assert_eq!(
        s.set_vbucket_state(0x5000, VbState::ACTIVE),
        Outcome::NoReply
    );
    assert_eq!(
        s.set_vbucket_state_response(0x5000, 0),
        Outcome::Reply(Reply::Ok)
    );
    assert_eq!(s.partitions(), Vec::<u16>::new());
}

#[test]
fn stream_end_before_the_switch_answers_the_takeover_at_once_for_every_reason() {
    for reason in [0u32, 1, 2, 3, 4, 5, 6, 7, 8, 42] {
        for seen_stream_req in [false, true] {
            let mut s = Setup::new();
            assert!(s.takeover_begin(3).is_ok());
            if seen_stream_req {
                assert_eq!(s.stream_req(3, 0x77), Outcome::NoReply);
            }
            let reason = StreamEndReason(reason);
            assert_eq!(
                s.stream_end(3, 0x77, reason),
                errors(&[(Why::StreamEnd(reason), 3)])
            );
            assert_eq!(s.phase(), Phase::Idle);
            // The takeover's add is still owed: its late answer is absorbed, and a new takeover
            // closes whatever that add may have opened before adding again.
            assert_eq!(
                s.takeover_begin(3),
                Ok(vec![
                    close(Side::Consumer, 3),
                    close(Side::Producer, 3),
                    takeover_add(3)
                ])
            );
        }
    }
}

#[test]
fn stream_end_after_the_switch_changes_nothing() {
    let mut s = Setup::new();
    assert!(s.takeover_begin(2).is_ok());
    assert_eq!(s.stream_req(2, 11), Outcome::NoReply);
    assert_eq!(s.set_vbucket_state(11, VbState::ACTIVE), Outcome::NoReply);
    assert_eq!(s.set_vbucket_state_response(11, 0), Outcome::NoReply);
    assert_eq!(s.stream_end(2, 11, StreamEndReason::OK), Outcome::NoReply);
    assert_eq!(s.phase(), Phase::Takeover);
    assert_eq!(s.add_stream_response(2, 0), Outcome::Reply(Reply::Ok));
    assert_eq!(s.partitions(), Vec::<u16>::new());
}

#[test]
fn shut_ends_a_running_takeover_and_answers_its_caller() {
    let mut s = Setup::new();
    assert!(s.takeover_begin(5).is_ok());
    assert_eq!(s.stream_req(5, 0x33), Outcome::NoReply);
    assert_eq!(s.shut(), Ok(Start::Send(vec![close(Side::Consumer, 5)])));
    assert_eq!(
        s.close_stream_response(Side::Consumer, 5, 0),
        errors(&[(Why::StreamEnd(StreamEndReason::CLOSED), 5)])
    );
    assert_eq!(s.phase(), Phase::Shut);
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
fn shut_after_a_timed_out_takeover_closes_what_its_add_may_have_opened() {
    let mut s = Setup::new();
    assert!(s.takeover_begin(0).is_ok());
    assert_eq!(s.deadline(), errors(&[(Why::SetupTimeout, 0)]));
    assert_eq!(s.shut(), Ok(Start::Send(vec![close(Side::Consumer, 0)])));
    assert_eq!(
        s.close_stream_response(Side::Consumer, 0, 1),
        Outcome::Reply(Reply::Ok)
    );
    assert_eq!(s.phase(), Phase::Shut);
}
