//! The Erlang terms of `dcp_setup::term` (dcp_nif.erl's setup types), pinned as Erlang text: the
//! requests and events read from `Value`s, the answers and `setup_info`'s map. And every atom
//! they use is one the NIF makes at load.

use std::collections::BTreeSet;

use dcp_setup::term::{self, ATOMS};
use dcp_setup::Setup;
use mcbp::term::Text;
use mcbp::{names, Kind, ToTerm, Value};

use Value::{Atom, Int, List, Other, Tuple};

fn pair(tag: &'static str, v: Value<'static>) -> Value<'static> {
    Tuple(vec![Atom(tag), v])
}

fn vbs(vbs: &[u64]) -> Value<'static> {
    List(vbs.iter().map(|v| Int(*v)).collect())
}

/// The caller's part at a path, as text naming the path.
fn part(path: &[usize]) -> String {
    format!("Part{path:?}")
}

fn request(s: &mut Setup, sink: &mut Text, v: &Value<'_>) -> Option<String> {
    s.request_term(v, sink, part)
}

fn event(s: &mut Setup, sink: &mut Text, v: &Value<'_>) -> Option<String> {
    s.event_term(v, sink, part)
}

fn ev(side: &'static str, tag: &'static str, args: &[u64]) -> Value<'static> {
    let mut t = vec![Atom(tag)];
    t.extend(args.iter().map(|n| Int(*n)));
    pair(side, Tuple(t))
}

#[test]
fn requests_answer_with_actions_or_refusals() {
    let (mut s, mut t) = (Setup::new(), Text::default());
    let begin = pair("setup_streams", vbs(&[1, 2]));
    assert_eq!(
        request(&mut s, &mut t, &begin).as_deref(),
        Some("{send,[{add_stream,1,1025,0},{add_stream,2,2050,0}]}")
    );
    assert_eq!(
        request(&mut s, &mut t, &pair("takeover", Int(3))).as_deref(),
        Some("{error,busy}")
    );
    let answer = |vb: u64| ev("consumer", "add_stream_response", &[vb * 1025, 0, 100 + vb]);
    assert_eq!(
        event(&mut s, &mut t, &answer(1)).as_deref(),
        Some("noreply")
    );
    assert_eq!(
        event(&mut s, &mut t, &answer(2)).as_deref(),
        Some("{reply,ok}")
    );
    let close = pair("maybe_close_stream", Int(2));
    assert_eq!(
        request(&mut s, &mut t, &close).as_deref(),
        Some("{send,[{close_stream,consumer,2,3074},{close_stream,producer,2,4098}]}")
    );
    let shut = Atom("shut_connection");
    assert_eq!(
        request(&mut s, &mut t, &shut).as_deref(),
        Some("{send,[{close_stream,consumer,1,5121}]}")
    );
    let mut s = Setup::new();
    assert_eq!(
        request(&mut s, &mut t, &shut).as_deref(),
        Some("{reply,ok}")
    );
    assert_eq!(
        request(&mut s, &mut t, &begin).as_deref(),
        Some("{error,shut}")
    );
}

#[test]
fn nothing_to_do_replies_at_once() {
    let (mut s, mut t) = (Setup::new(), Text::default());
    let none = pair("setup_streams", vbs(&[]));
    assert_eq!(
        request(&mut s, &mut t, &none).as_deref(),
        Some("{reply,ok}")
    );
}

#[test]
fn bad_vbuckets_echo_the_callers_term_by_its_path() {
    let (mut s, mut t) = (Setup::new(), Text::default());
    let cases = [
        (pair("setup_streams", vbs(&[1, 1024])), "Part[1, 1]"),
        (
            pair("setup_streams", List(vec![Int(0), Other])),
            "Part[1, 1]",
        ),
        (pair("takeover", Int(1 << 40)), "Part[1]"),
        (pair("maybe_close_stream", Other), "Part[1]"),
    ];
    for (v, echo) in cases {
        let want = format!("{{error,{{bad_vbucket,{echo}}}}}");
        assert_eq!(request(&mut s, &mut t, &v), Some(want));
    }
    assert_eq!(s.info().phase, dcp_setup::Phase::Idle);
}

#[test]
fn vbucket_lists_too_long_duplicated_or_not_lists_are_refused_by_name() {
    let (mut s, mut t) = (Setup::new(), Text::default());
    let all: Vec<u64> = (0..1024).collect();
    let mut over = all.clone();
    over.push(5);
    let cases = [
        // what the NIF's reader gives for a list beyond mcbp::term::MAX_ITEMS
        (
            pair("setup_streams", Value::TooLong),
            "{error,{too_many_vbuckets,1024}}",
        ),
        (
            pair("setup_streams", vbs(&over)),
            "{error,{too_many_vbuckets,1024}}",
        ),
        (
            pair("setup_streams", vbs(&[3, 4, 3])),
            "{error,{duplicate_vbucket,3}}",
        ),
        // an improper list is Other: the whole term is the bad part, as the API says
        (
            pair("setup_streams", Other),
            "{error,{bad_vbucket,Part[1]}}",
        ),
        (
            pair("setup_streams", Int(1)),
            "{error,{bad_vbucket,Part[1]}}",
        ),
    ];
    for (v, want) in cases {
        assert_eq!(request(&mut s, &mut t, &v).as_deref(), Some(want));
    }
    assert_eq!(s.info().phase, dcp_setup::Phase::Idle);
    let got = request(&mut s, &mut t, &pair("setup_streams", vbs(&all))).unwrap();
    assert!(got.starts_with("{send,[{add_stream,0,"), "{got}");
}

#[test]
fn other_terms_are_badarg() {
    let (mut s, mut t) = (Setup::new(), Text::default());
    for v in [
        pair("sideways", Int(1)),
        pair("shut_connection", Int(1)),
        Atom("shut"),
        Tuple(vec![Atom("takeover")]),
        Other,
    ] {
        assert_eq!(request(&mut s, &mut t, &v), None, "{v:?}");
    }
    for v in [
        Atom("shut"),
        Tuple(vec![Atom("deadline")]),
        pair("sideways", Tuple(vec![Atom("stream_req"), Int(0), Int(0)])),
        pair("consumer", Tuple(vec![Atom("stream_req"), Int(0)])),
        Tuple(vec![Atom("connection_lost")]),
        Other,
    ] {
        assert_eq!(event(&mut s, &mut t, &v), None, "{v:?}");
    }
}

#[test]
fn failures_name_their_vbucket_and_reason() {
    let (mut s, mut t) = (Setup::new(), Text::default());
    request(&mut s, &mut t, &pair("setup_streams", vbs(&[1, 2, 3])));
    let end = pair(
        "producer",
        Tuple(vec![Atom("stream_end"), Int(1), Int(1025), Atom("closed")]),
    );
    assert_eq!(event(&mut s, &mut t, &end).as_deref(), Some("noreply"));
    let failed = ev("consumer", "add_stream_response", &[2050, 0x22, 0]);
    assert_eq!(event(&mut s, &mut t, &failed).as_deref(), Some("noreply"));
    let lost = pair("connection_lost", Other);
    assert_eq!(
        event(&mut s, &mut t, &lost).as_deref(),
        Some(
            "{reply,{errors,[{{stream_end,closed},{vbucket,1}},\
             {{mcbp_status,34},{vbucket,2}},{{connection_lost,Part[1]},{vbucket,3}}]}}"
        )
    );
}

#[test]
fn deadline_and_unexpected_answers() {
    let (mut s, mut t) = (Setup::new(), Text::default());
    assert_eq!(
        event(&mut s, &mut t, &Atom("deadline")).as_deref(),
        Some("noreply")
    );
    let stray = ev("consumer", "add_stream_response", &[99, 0, 1]);
    assert_eq!(
        event(&mut s, &mut t, &stray).as_deref(),
        Some("{stop,{unexpected_response,add_stream,99}}")
    );
    let stray = ev("producer", "close_stream_response", &[98, 0]);
    assert_eq!(
        event(&mut s, &mut t, &stray).as_deref(),
        Some("{stop,{unexpected_response,{close_stream,producer},98}}")
    );
    assert_eq!(
        request(&mut s, &mut t, &pair("setup_streams", vbs(&[4]))).as_deref(),
        Some("{send,[{add_stream,4,1028,0}]}")
    );
    assert_eq!(
        event(&mut s, &mut t, &Atom("deadline")).as_deref(),
        Some("{reply,{errors,[{setup_timeout,{vbucket,4}}]}}")
    );
    let late = ev("consumer", "add_stream_response", &[1028, 0, 7]);
    assert_eq!(
        event(&mut s, &mut t, &late).as_deref(),
        Some("{noreply,absorbed}")
    );
}

#[test]
fn info_map() {
    let (mut s, mut t) = (Setup::new(), Text::default());
    assert_eq!(
        s.info().to_term(&mut t),
        "#{state=>idle,active=>[],pending_adds=>[],pending_closes_consumer=>[],\
         pending_closes_producer=>[],errors=>[],next_state=>undefined,takeover=>undefined,\
         owed=>0,absorbed=>0}"
    );
    request(&mut s, &mut t, &pair("takeover", Int(6)));
    event(&mut s, &mut t, &ev("consumer", "stream_req", &[6, 0x5000]));
    let state = pair(
        "producer",
        Tuple(vec![
            Atom("set_vbucket_state"),
            Int(6),
            Int(0x5000),
            Atom("active"),
        ]),
    );
    event(&mut s, &mut t, &state);
    assert_eq!(
        s.info().to_term(&mut t),
        "#{state=>takeover,active=>[],pending_adds=>[],pending_closes_consumer=>[],\
         pending_closes_producer=>[],errors=>[],next_state=>undefined,takeover=>#{vbucket=>6,\
         stage=>opaque_known,opaque=>20480,requested_state=>active,add_acked=>false},\
         owed=>1,absorbed=>0}"
    );
}

/// The NIF makes mcbp's atoms and `ATOMS` at load; a term using any other would cost an atom made
/// per call.
#[test]
fn every_atom_a_term_uses_is_made_at_load() {
    let mut known: BTreeSet<&str> = ATOMS.iter().copied().collect();
    known.extend(mcbp::term::ATOMS.iter().copied());
    known.extend(
        Kind::ALL
            .iter()
            .flat_map(|k| names::table(*k).iter().map(|(_, n)| *n)),
    );
    let mut t = Text::default();
    let mut s = Setup::new();
    request(&mut s, &mut t, &pair("takeover", Int(6)));
    s.info().to_term(&mut t);
    term::start(&mut t, &Err(dcp_setup::Refusal::BadVbucket(2000)));
    for test in [
        requests_answer_with_actions_or_refusals,
        failures_name_their_vbucket_and_reason,
        deadline_and_unexpected_answers,
        info_map,
    ] {
        test();
    }
    let unknown: Vec<_> = t.0.difference(&known).collect();
    assert!(unknown.is_empty(), "{unknown:?}");
}
