//! The Erlang term shapes of `mcbp::term`, built through two sinks: one writes Erlang text (the
//! exact shapes), one builds `Value`s (so every shape read back gives the value again). And every
//! atom a shape uses is one the NIF makes at load.

use std::collections::BTreeSet;

use mcbp::term::{self, SpecError, Text, ATOMS};
use mcbp::{
    names, EncodeError, Error, Event, Frame, FrameInfo, Kind, Magic, Side, Sink, Splitter,
    StreamEndReason, ToTerm, Value, VbState,
};

/// `Value`s, as the NIF reads the terms the `Text` shapes stand for.
struct Values;

impl Sink for Values {
    type Term = Value<'static>;
    fn atom(&mut self, name: &'static str) -> Value<'static> {
        Value::Atom(name)
    }
    fn int(&mut self, n: u64) -> Value<'static> {
        Value::Int(n)
    }
    fn bin(&mut self, bytes: &[u8]) -> Value<'static> {
        Value::Bin(Box::leak(bytes.to_vec().into_boxed_slice()))
    }
    fn tuple(&mut self, items: &[Value<'static>]) -> Value<'static> {
        Value::Tuple(items.to_vec())
    }
    fn list(&mut self, items: &[Value<'static>]) -> Value<'static> {
        Value::List(items.to_vec())
    }
    fn map(&mut self, keys: &[Value<'static>], values: &[Value<'static>]) -> Value<'static> {
        Value::Map(keys.iter().cloned().zip(values.iter().cloned()).collect())
    }
}

fn text(x: &impl ToTerm) -> String {
    x.to_term(&mut Text::default())
}

fn events() -> Vec<Event> {
    vec![
        Event::StreamEnd {
            vbucket: 5,
            opaque: 7,
            reason: StreamEndReason::CLOSED,
        },
        Event::StreamEnd {
            vbucket: 5,
            opaque: 7,
            reason: StreamEndReason(99),
        },
        Event::AddStreamResponse {
            opaque: 1,
            status: 0,
            stream_opaque: Some(42),
        },
        Event::AddStreamResponse {
            opaque: 1,
            status: 0x23,
            stream_opaque: None,
        },
        Event::CloseStreamResponse {
            opaque: 2,
            status: 1,
        },
        Event::StreamReq {
            vbucket: 1023,
            opaque: 3,
        },
        Event::SetVbucketState {
            vbucket: 4,
            opaque: 5,
            state: VbState::ACTIVE,
        },
        Event::SetVbucketState {
            vbucket: 4,
            opaque: 5,
            state: VbState(9),
        },
        Event::SetVbucketStateResponse {
            opaque: 6,
            status: 0,
        },
    ]
}

#[test]
fn events_are_tagged_tuples_with_names_or_unknown_codes() {
    let shapes: Vec<String> = events().iter().map(text).collect();
    assert_eq!(
        shapes,
        [
            "{stream_end,5,7,closed}",
            "{stream_end,5,7,{unknown,99}}",
            "{add_stream_response,1,0,42}",
            "{add_stream_response,1,35,undefined}",
            "{close_stream_response,2,1}",
            "{stream_req,1023,3}",
            "{set_vbucket_state,4,5,active}",
            "{set_vbucket_state,4,5,{unknown,9}}",
            "{set_vbucket_state_response,6,0}",
        ]
    );
}

#[test]
fn every_event_reads_back_and_other_terms_do_not() {
    for e in events() {
        assert_eq!(Event::from_value(&e.to_term(&mut Values)), Some(e));
    }
    let bad = [
        Value::Tuple(vec![
            Value::Atom("stream_req"),
            Value::Int(70000),
            Value::Int(1),
        ]),
        Value::Tuple(vec![Value::Atom("stream_req"), Value::Int(1)]),
        Value::Tuple(vec![
            Value::Atom("stream_end"),
            Value::Int(1),
            Value::Int(2),
            Value::Atom("closed_x"),
        ]),
        // A code that has a name must be given by its name.
        Value::Tuple(vec![
            Value::Atom("stream_end"),
            Value::Int(1),
            Value::Int(2),
            Value::Tuple(vec![Value::Atom("unknown"), Value::Int(1)]),
        ]),
        Value::Atom("stream_req"),
        Value::Other,
    ];
    for v in bad {
        assert_eq!(Event::from_value(&v), None, "{v:?}");
    }
}

#[test]
fn the_frame_map_has_the_contracts_keys_and_reads_back() {
    let f = Frame {
        magic: Magic::AltReq,
        opcode: names::DCP_MUTATION,
        datatype: 1,
        vbucket_or_status: 3,
        opaque: 9,
        cas: u64::MAX,
        framing_extras: vec![FrameInfo { id: 2, data: b"ab" }],
        extras: b"x",
        key: b"k",
        value: b"v",
    };
    assert_eq!(
        text(&f),
        "#{magic=>alt_req,opcode=>87,opcode_name=>dcp_mutation,datatype=>1,vbucket=>3,opaque=>9,\
         cas=>18446744073709551615,framing_extras=>[{2,<<\"ab\">>}],extras=><<\"x\">>,\
         key=><<\"k\">>,value=><<\"v\">>}"
    );
    assert_eq!(Frame::from_value(&f.to_term(&mut Values)), Ok(f.clone()));
    // the head reader leaves the value out, whatever the map holds there
    let mut spec = f.to_term(&mut Values);
    if let Value::Map(pairs) = &mut spec {
        for (k, v) in pairs.iter_mut() {
            if *k == Value::Atom("value") {
                *v = Value::TooLong;
            }
        }
    }
    assert_eq!(Frame::from_value(&spec), Err(SpecError::Bad("value")));
    assert_eq!(Frame::head_from_value(&spec), Ok(Frame { value: b"", ..f }));
}

#[test]
fn a_frame_spec_names_its_first_bad_field() {
    let spec = |pairs: &[(&'static str, Value<'static>)]| {
        Value::Map(
            pairs
                .iter()
                .map(|(k, v)| (Value::Atom(k), v.clone()))
                .collect(),
        )
    };
    let req = Value::Atom("req");
    let cases = [
        (Value::Other, SpecError::NotAMap),
        (spec(&[]), SpecError::Missing("magic")),
        (
            spec(&[("magic", Value::Atom("nope"))]),
            SpecError::Bad("magic"),
        ),
        (
            spec(&[("magic", req.clone())]),
            SpecError::Missing("opcode"),
        ),
        (
            spec(&[("magic", req.clone()), ("opcode", Value::Int(256))]),
            SpecError::Bad("opcode"),
        ),
        (
            spec(&[
                ("magic", req.clone()),
                ("opcode", Value::Int(1)),
                ("status", Value::Int(0)),
            ]),
            SpecError::NotAllowed("status"),
        ),
        (
            spec(&[
                ("magic", req.clone()),
                ("opcode", Value::Atom("set")),
                ("datatype", Value::Int(256)),
            ]),
            SpecError::Bad("datatype"),
        ),
        (
            spec(&[
                ("magic", req),
                ("opcode", Value::Int(1)),
                ("framing_extras", Value::List(vec![Value::Int(1)])),
            ]),
            SpecError::Bad("framing_extras"),
        ),
        (
            spec(&[
                ("magic", Value::Atom("alt_req")),
                ("opcode", Value::Int(1)),
                ("framing_extras", Value::TooLong),
            ]),
            SpecError::Bad("framing_extras"),
        ),
    ];
    for (v, why) in cases {
        assert_eq!(Frame::from_value(&v), Err(why), "{v:?}");
    }
    assert_eq!(text(&SpecError::NotAMap), "bad_field");
    assert_eq!(text(&SpecError::Missing("magic")), "{missing_field,magic}");
}

#[test]
fn errors_stats_tables_and_codes() {
    let bad = Error::BadLengths {
        framing: 1,
        extras: 2,
        key: 3,
        body: 4,
    };
    assert_eq!(
        text(&bad),
        "{bad_lengths,#{framing=>1,extras=>2,key=>3,body=>4}}"
    );
    assert_eq!(
        text(&Error::FrameTooLarge { len: 9, max: 8 }),
        "{frame_too_large,9,8}"
    );
    assert_eq!(
        text(&EncodeError::FramingExtrasNotAllowed),
        "framing_extras_not_allowed"
    );
    let mut s = Splitter::new(Side::Consumer, 1024);
    let mut out = mcbp::FeedOutput::default();
    let op = (0..=255)
        .find(|o| names::opcode_name(*o).is_none())
        .unwrap();
    let noop = Frame {
        opcode: op,
        ..common_frame()
    }
    .to_vec()
    .unwrap();
    s.feed_all(&noop, &mut out).unwrap();
    let stats = text(&s.stats());
    assert!(
        stats.ends_with(&format!(
            "by_opcode=>#{{{{unknown,{op}}}=>#{{frames=>1,bytes=>24}}}}}}"
        )),
        "{stats}"
    );
    let t = term::table(&mut Text::default(), Kind::VbState);
    assert_eq!(t, "[{1,active},{2,replica},{3,pending},{4,dead}]");
    let unknown = Value::Tuple(vec![Value::Atom("unknown"), Value::Int(99)]);
    assert_eq!(term::code_of(Kind::StreamEndReason, &unknown), Some(99));
    assert_eq!(
        term::code_of(Kind::StreamEndReason, &Value::Atom("closed")),
        Some(1)
    );
    assert!(term::splitter("producer", 24).is_some());
    assert!(term::splitter("producer", 23).is_none() && term::splitter("x", 1024).is_none());
}

fn common_frame() -> Frame<'static> {
    Frame {
        magic: Magic::Req,
        opcode: 0,
        datatype: 0,
        vbucket_or_status: 0,
        opaque: 0,
        cas: 0,
        framing_extras: vec![],
        extras: b"",
        key: b"",
        value: b"",
    }
}

/// The NIF makes the atoms of the names tables, the magics and `ATOMS` at load; a shape using
/// any other would cost an atom made per term.
#[test]
fn every_atom_a_shape_uses_is_made_at_load() {
    let mut known: BTreeSet<&str> = ATOMS.iter().copied().collect();
    known.extend(Magic::ALL.iter().map(|m| m.name()));
    known.extend(
        Kind::ALL
            .iter()
            .flat_map(|k| names::table(*k).iter().map(|(_, n)| *n)),
    );
    let mut sink = Text::default();
    for e in events() {
        e.to_term(&mut sink);
    }
    for kind in Kind::ALL {
        term::table(&mut sink, kind);
    }
    for why in [
        SpecError::NotAMap,
        SpecError::Missing("magic"),
        SpecError::NotAllowed("status"),
    ] {
        why.to_term(&mut sink);
    }
    Error::BadLengths {
        framing: 0,
        extras: 0,
        key: 0,
        body: 0,
    }
    .to_term(&mut sink);
    for e in [
        Error::BadMagic(0),
        Error::BadFramingExtras { offset: 0 },
        Error::BadValue { opcode: 0, len: 0 },
        Error::FailoverLogTooLong {
            opcode: 0,
            entries: 0,
            max: 0,
        },
    ] {
        e.to_term(&mut sink);
    }
    let s = Splitter::new(Side::Producer, 1024);
    s.stats().to_term(&mut sink);
    // Every request and response of every opcode, with every extras size up to 48 bytes and a
    // value of 0, 16 (a failover log, a system event's name), 36 (a snapshot marker v2.0) or 44
    // bytes.
    for fill in [0u8, 0xff] {
        let zeros = [fill; 48];
        for magic in Magic::ALL {
            for opcode in 0..=255u8 {
                for len in 0..=48 {
                    for value in [&zeros[..0], &zeros[..16], &zeros[..36], &zeros[..44]] {
                        let f = Frame {
                            magic,
                            opcode,
                            extras: &zeros[..len],
                            value,
                            ..common_frame()
                        };
                        if len == 0 {
                            f.to_term(&mut sink);
                        }
                        if let Ok(fields) = mcbp::fields(&f) {
                            fields.to_term(&mut sink);
                        }
                    }
                }
            }
        }
    }
    let missing: Vec<&str> = sink.0.difference(&known).copied().collect();
    assert!(
        missing.is_empty(),
        "atoms not in mcbp::term::ATOMS: {missing:?}"
    );
    assert!(sink.0.contains("include_xattrs") && sink.0.contains("v2_0"));
}
