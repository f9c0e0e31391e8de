//! Answers that arrive after their request's outcome was decided are absorbed; answers matching
//! nothing are protocol violations.

mod common;

use common::*;
use dcp_setup::*;

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
