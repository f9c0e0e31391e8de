//! Shut from idle and from a setup in progress (the stuck-add cases are in shut_during_setup.rs).

mod common;

use common::*;
use dcp_setup::*;

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
    assert_eq!(s.info().pending_closes_producer, Vec::<u16>::new());
    assert_eq!(
        s.close_stream_response(Side::Producer, 0, 0),
        Outcome::Absorbed
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

// Moved from test/dcp_setup_tests.erl (shut_from_idle_without_streams_is_immediate_test).
#[test]
fn shut_from_idle_without_streams_is_immediate_and_refuses_what_follows() {
    let mut s = Setup::new();
    assert_eq!(s.shut(), Ok(Start::Settled));
    assert_eq!(s.phase(), Phase::Shut);
    assert_eq!(s.takeover_begin(1), Err(Refusal::Shut));
    assert_eq!(s.begin(&[1]), Err(Refusal::Shut));
}
