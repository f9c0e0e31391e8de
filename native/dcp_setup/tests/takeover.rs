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
fn shut_during_a_takeover_is_refused_as_busy() {
    let mut s = Setup::new();
    assert!(s.takeover_begin(0).is_ok());
    assert_eq!(s.shut(), Err(Refusal::Busy));
    assert_eq!(s.deadline(), errors(&[(Why::SetupTimeout, 0)]));
    assert_eq!(s.shut(), Ok(Start::Settled));
}
