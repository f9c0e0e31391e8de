//! The setup deadline and the loss of the connection: every pending vbucket fails once.

mod common;

use common::*;
use dcp_setup::*;

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
    assert_eq!(s.add_stream_response(1, 0), Outcome::Absorbed);
    assert_eq!(
        s.close_stream_response(Side::Consumer, 0, 0),
        Outcome::Absorbed
    );
    assert_eq!(
        s.close_stream_response(Side::Producer, 0, 0),
        Outcome::Absorbed
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
