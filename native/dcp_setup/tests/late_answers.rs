//! Answers that arrive after their request's outcome was decided still update what the machine
//! knows of the consumer (and are counted as absorbed); an answer is applied only to the request
//! it answers; answers matching nothing are protocol violations.

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
    assert_eq!(s.add_stream_response(0, 0), Outcome::Absorbed);
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
    assert_eq!(s.add_stream_response(4, 0x22), Outcome::Absorbed);
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

fn raw_add_answer(s: &mut Setup, opaque: u32, status: u16) -> Outcome {
    s.event(Input::Frame(
        Side::Consumer,
        Event::AddStreamResponse {
            opaque,
            status,
            stream_opaque: None,
        },
    ))
}

fn sent_add_opaque(started: Result<Start, Refusal>, vb: u16) -> u32 {
    match started {
        Ok(Start::Send(actions)) => actions
            .iter()
            .find_map(|a| match *a {
                Action::AddStream {
                    vbucket, opaque, ..
                } if vbucket == vb => Some(opaque),
                _ => None,
            })
            .expect("an add for the vbucket"),
        other => panic!("no add sent: {other:?}"),
    }
}

#[test]
fn late_success_after_the_deadline_keeps_the_stream_active_and_the_retry_settles() {
    let mut s = Setup::new();
    let first = sent_add_opaque(s.request(Request::Begin(&[3])), 3);
    assert_eq!(s.deadline(), errors(&[(Why::SetupTimeout, 3)]));
    assert!(s.partitions().is_empty());
    assert_eq!(raw_add_answer(&mut s, first, 0), Outcome::Absorbed);
    assert_eq!(s.partitions(), vec![3], "the consumer holds it");
    assert_eq!(s.info().absorbed, 1);
    assert_eq!(s.begin(&[3]), Ok(Start::Settled));
}

#[test]
fn retry_while_the_add_is_owed_waits_for_that_add_and_sends_nothing() {
    let mut s = Setup::new();
    let first = sent_add_opaque(s.request(Request::Begin(&[3, 4])), 3);
    assert_eq!(s.add_stream_response(4, 0), Outcome::NoReply);
    assert_eq!(s.deadline(), errors(&[(Why::SetupTimeout, 3)]));
    assert_eq!(s.begin(&[3, 4]), Ok(Start::Send(vec![])));
    assert_eq!(s.info().pending_adds, vec![3]);
    assert_eq!(raw_add_answer(&mut s, first, 0), Outcome::Reply(Reply::Ok));
    assert_eq!(s.partitions(), vec![3, 4]);
}

#[test]
fn late_failure_after_the_deadline_lets_the_retry_add_again() {
    let mut s = Setup::new();
    let first = sent_add_opaque(s.request(Request::Begin(&[3])), 3);
    assert_eq!(s.deadline(), errors(&[(Why::SetupTimeout, 3)]));
    assert_eq!(raw_add_answer(&mut s, first, 7), Outcome::Absorbed);
    assert_eq!(s.begin(&[3]), Ok(Start::Send(vec![add(3)])));
}

#[test]
fn close_and_re_add_while_the_add_is_owed_never_applies_the_old_answer_to_the_new_add() {
    let mut s = Setup::new();
    let first = sent_add_opaque(s.request(Request::Begin(&[3])), 3);
    assert_eq!(s.deadline(), errors(&[(Why::SetupTimeout, 3)]));
    // Not wanted any more: the owed add may have opened a stream, so it is closed.
    assert_eq!(
        s.begin(&[]),
        Ok(Start::Send(vec![
            close(Side::Consumer, 3),
            close(Side::Producer, 3)
        ]))
    );
    assert_eq!(
        s.close_stream_response(Side::Consumer, 3, 0),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Producer, 3, 1),
        Outcome::Reply(Reply::Ok)
    );
    // Re-added: a new request with a new opaque.
    let second = sent_add_opaque(s.request(Request::Begin(&[3])), 3);
    assert_ne!(first, second);
    assert_eq!(first & 0x3ff, second & 0x3ff);
    // The old add's answer (a failure, say) is the old request's: absorbed, not the new one's.
    assert_eq!(raw_add_answer(&mut s, first, 7), Outcome::Absorbed);
    assert_eq!(s.phase(), Phase::SettingUp);
    assert_eq!(raw_add_answer(&mut s, second, 0), Outcome::Reply(Reply::Ok));
    assert_eq!(s.partitions(), vec![3]);
    assert_eq!(s.info().absorbed, 1);
}

#[test]
fn an_add_success_answered_after_a_later_close_opened_a_stream_that_is_gone() {
    let mut s = Setup::new();
    let first = sent_add_opaque(s.request(Request::Begin(&[3])), 3);
    assert_eq!(s.deadline(), errors(&[(Why::SetupTimeout, 3)]));
    assert!(s.begin(&[]).is_ok());
    // The consumer handled the add, then the close; the close's answer overtook the add's.
    assert_eq!(
        s.close_stream_response(Side::Consumer, 3, 0),
        Outcome::NoReply
    );
    assert_eq!(
        s.close_stream_response(Side::Producer, 3, 0),
        Outcome::Reply(Reply::Ok)
    );
    assert_eq!(raw_add_answer(&mut s, first, 0), Outcome::Absorbed);
    assert!(s.partitions().is_empty());
}

#[test]
fn stream_end_ok_while_the_add_is_pending_completes_the_add_but_leaves_no_stream() {
    let mut s = Setup::new();
    assert!(s.begin(&[2]).is_ok());
    assert_eq!(s.stream_end(2, 9, StreamEndReason::OK), Outcome::NoReply);
    assert_eq!(s.add_stream_response(2, 0), Outcome::Reply(Reply::Ok));
    assert!(s.partitions().is_empty());
}

#[test]
fn a_late_close_answer_after_the_deadline_updates_the_active_set() {
    let mut s = with_active(&[1]);
    assert!(s.begin(&[]).is_ok());
    assert_eq!(s.deadline(), errors(&[(Why::SetupTimeout, 1)]));
    assert_eq!(s.partitions(), vec![1]);
    // The retry waits for the owed closes instead of sending new ones.
    assert_eq!(s.begin(&[]), Ok(Start::Send(vec![])));
    assert_eq!(
        s.close_stream_response(Side::Consumer, 1, 0),
        Outcome::NoReply
    );
    assert!(s.partitions().is_empty());
    assert_eq!(
        s.close_stream_response(Side::Producer, 1, 0),
        Outcome::Reply(Reply::Ok)
    );
}
