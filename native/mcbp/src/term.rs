//! The Erlang term shapes of mcbp's values (mcbp.erl's types), written down once, here. A value
//! is built through a `Sink` (the NIF's makes terms; the tests' makes text), so the glue has one
//! generic converter and no protocol of its own; a term coming in is read as a `Value`.

use crate::dcp::{Field, Fields};
use crate::error::{EncodeError, Error};
use crate::frame::{Frame, FrameInfo};
use crate::header::{Magic, MAX_FRAME_SIZE_RANGE};
use crate::names::{code, name, Kind, StreamEndReason, VbState};
use crate::splitter::{Event, Side, Splitter, Stats};

/// Where a term is built. Tuples, lists and maps take their parts as slices, so a fixed shape is
/// built from arrays on the stack.
pub trait Sink {
    type Term;
    fn atom(&mut self, name: &'static str) -> Self::Term;
    fn int(&mut self, n: u64) -> Self::Term;
    /// Bytes of the value described; the NIF keeps a large slice of its input as a sub-binary.
    fn bin(&mut self, bytes: &[u8]) -> Self::Term;
    fn tuple(&mut self, items: &[Self::Term]) -> Self::Term;
    fn list(&mut self, items: &[Self::Term]) -> Self::Term;
    /// `keys` are distinct.
    fn map(&mut self, keys: &[Self::Term], values: &[Self::Term]) -> Self::Term;

    /// A code as its name in `kind`'s table, `{unknown, Code}` when it has none.
    fn name(&mut self, kind: Kind, code: u32) -> Self::Term {
        match name(kind, code) {
            Some(n) => self.atom(n),
            None => {
                let pair = [self.atom("unknown"), self.int(code.into())];
                self.tuple(&pair)
            }
        }
    }
    /// `{Tag, N...}` (built on the stack: events take this path).
    fn tagged(&mut self, tag: &'static str, args: &[u64]) -> Self::Term {
        let tag = self.atom(tag);
        match *args {
            [a] => {
                let t = [tag, self.int(a)];
                self.tuple(&t)
            }
            [a, b] => {
                let t = [tag, self.int(a), self.int(b)];
                self.tuple(&t)
            }
            _ => {
                let mut t = vec![tag];
                t.extend(args.iter().map(|n| self.int(*n)));
                self.tuple(&t)
            }
        }
    }
}

/// A [`Sink`] that writes Erlang text (`{a,1}`, `#{k=>v}`, `<<"bin">>`) and remembers every atom it
/// was asked for: the term-shape tests of this crate and of `dcp_setup` pin shapes with it.
#[derive(Debug, Default)]
pub struct Text(pub std::collections::BTreeSet<&'static str>);

impl Sink for Text {
    type Term = String;
    fn atom(&mut self, name: &'static str) -> String {
        self.0.insert(name);
        name.to_string()
    }
    fn int(&mut self, n: u64) -> String {
        n.to_string()
    }
    fn bin(&mut self, bytes: &[u8]) -> String {
        format!("<<{:?}>>", String::from_utf8_lossy(bytes))
    }
    fn tuple(&mut self, items: &[String]) -> String {
        format!("{{{}}}", items.join(","))
    }
    fn list(&mut self, items: &[String]) -> String {
        format!("[{}]", items.join(","))
    }
    fn map(&mut self, keys: &[String], values: &[String]) -> String {
        let pairs: Vec<String> = keys
            .iter()
            .zip(values)
            .map(|(k, v)| format!("{k}=>{v}"))
            .collect();
        format!("#{{{}}}", pairs.join(","))
    }
}

/// A value with an Erlang term shape.
pub trait ToTerm {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term;
}

/// The atoms the shapes below use besides the names tables' and the magics' names: the NIF makes
/// them all once, at load.
#[rustfmt::skip]
pub const ATOMS: &[&str] = &[
    // plain values, the name tables' own names
    "unknown", "undefined", "true", "false", "consumer", "producer",
    "opcode", "server_opcode", "status", "stream_end_reason", "vbucket_state", "hello_feature",
    // the frame map
    "magic", "opcode_name", "datatype", "vbucket", "opaque", "cas", "framing_extras", "extras",
    "key", "value",
    // events
    "stream_end", "add_stream_response", "close_stream_response", "stream_req",
    "set_vbucket_state", "set_vbucket_state_response",
    // errors
    "bad_magic", "frame_too_large", "reported_frame_too_large", "bad_lengths", "bad_framing_extras", "bad_extras", "bad_value",
    "failover_log_too_long",
    "framing", "body", "missing_field", "bad_field", "field_not_allowed", "key_too_long",
    "extras_too_long", "framing_extras_not_allowed", "framing_extras_too_long",
    "frame_info_id_too_large", "frame_info_too_long", "body_too_large",
    // stats
    "frames", "bytes", "forwarded_frames", "blocked_frames", "reported_frames", "largest_frame",
    "held_bytes", "forward_remaining", "by_opcode",
    // dcp_fields
    "abort_seqno", "by_seqno", "commit_seqno", "delete_time", "deleted", "durability_level", "end",
    "end_seqno", "event", "expiration", "failover_log", "flags", "high_completed_seqno",
    "include_delete_times", "include_xattrs", "lock_time", "max_visible_seqno", "name", "nmeta",
    "notifier", "nru", "prepared_seqno", "producer", "reason", "reserved", "rev_seqno",
    "rollback_seqno", "snap_end_seqno", "snap_start_seqno", "snapshot_type", "start",
    "start_seqno", "state", "stream_opaque", "takeover", "vbucket_uuid", "version",
    "v1", "v2_0",
];

/// A name table by its atom (`dcp_nif:name_kind()`).
pub fn kind_from_name(name: &str) -> Option<Kind> {
    const KINDS: [(&str, Kind); 6] = [
        ("opcode", Kind::Opcode),
        ("server_opcode", Kind::ServerOpcode),
        ("status", Kind::Status),
        ("stream_end_reason", Kind::StreamEndReason),
        ("vbucket_state", Kind::VbState),
        ("hello_feature", Kind::HelloFeature),
    ];
    KINDS.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

pub fn side_name(side: Side) -> &'static str {
    match side {
        Side::Consumer => "consumer",
        Side::Producer => "producer",
    }
}

pub fn side_from_name(name: &str) -> Option<Side> {
    [Side::Consumer, Side::Producer]
        .into_iter()
        .find(|s| side_name(*s) == name)
}

/// The splitter `splitter_new(Side, MaxFrameSize)` asks for: `None` for a side or size out of
/// range.
pub fn splitter(side: &str, max_frame_size: u64) -> Option<Splitter> {
    let max = Some(max_frame_size).filter(|m| MAX_FRAME_SIZE_RANGE.contains(m))?;
    Some(Splitter::new(side_from_name(side)?, max))
}

impl ToTerm for Side {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        s.atom(side_name(*self))
    }
}

impl ToTerm for Event {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        let t = match *self {
            Event::StreamEnd {
                vbucket,
                opaque,
                reason,
            } => [
                s.atom("stream_end"),
                s.int(vbucket.into()),
                s.int(opaque.into()),
                s.name(Kind::StreamEndReason, reason.0),
            ],
            Event::AddStreamResponse {
                opaque,
                status,
                stream_opaque,
            } => [
                s.atom("add_stream_response"),
                s.int(opaque.into()),
                s.int(status.into()),
                match stream_opaque {
                    Some(o) => s.int(o.into()),
                    None => s.atom("undefined"),
                },
            ],
            Event::SetVbucketState {
                vbucket,
                opaque,
                state,
            } => [
                s.atom("set_vbucket_state"),
                s.int(vbucket.into()),
                s.int(opaque.into()),
                s.name(Kind::VbState, state.0.into()),
            ],
            Event::CloseStreamResponse { opaque, status } => {
                return s.tagged("close_stream_response", &[opaque.into(), status.into()])
            }
            Event::StreamReq { vbucket, opaque } => {
                return s.tagged("stream_req", &[vbucket.into(), opaque.into()])
            }
            Event::SetVbucketStateResponse { opaque, status } => {
                return s.tagged(
                    "set_vbucket_state_response",
                    &[opaque.into(), status.into()],
                )
            }
        };
        s.tuple(&t)
    }
}

impl ToTerm for Error {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        match *self {
            Error::BadMagic(b) => s.tagged("bad_magic", &[b.into()]),
            Error::FrameTooLarge { len, max } => s.tagged("frame_too_large", &[len, max]),
            Error::ReportedFrameTooLarge { opcode, len, max } => {
                s.tagged("reported_frame_too_large", &[opcode.into(), len, max])
            }
            Error::BadLengths {
                framing,
                extras,
                key,
                body,
            } => {
                let keys = ["framing", "extras", "key", "body"].map(|k| s.atom(k));
                let values = [framing, extras, key, body].map(|n| s.int(n.into()));
                let t = [s.atom("bad_lengths"), s.map(&keys, &values)];
                s.tuple(&t)
            }
            Error::BadFramingExtras { offset } => s.tagged("bad_framing_extras", &[offset as u64]),
            Error::BadExtras { opcode, len } => {
                s.tagged("bad_extras", &[opcode.into(), len as u64])
            }
            Error::BadValue { opcode, len } => s.tagged("bad_value", &[opcode.into(), len as u64]),
            Error::FailoverLogTooLong {
                opcode,
                entries,
                max,
            } => s.tagged("failover_log_too_long", &[opcode.into(), entries, max]),
        }
    }
}

impl ToTerm for EncodeError {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        match *self {
            EncodeError::KeyTooLong { len, max } => {
                s.tagged("key_too_long", &[len as u64, max as u64])
            }
            EncodeError::ExtrasTooLong { len } => s.tagged("extras_too_long", &[len as u64]),
            EncodeError::FramingExtrasNotAllowed => s.atom("framing_extras_not_allowed"),
            EncodeError::FramingExtrasTooLong { len } => {
                s.tagged("framing_extras_too_long", &[len as u64])
            }
            EncodeError::FrameInfoIdTooLarge { id } => {
                s.tagged("frame_info_id_too_large", &[id.into()])
            }
            EncodeError::FrameInfoTooLong { id, len } => {
                s.tagged("frame_info_too_long", &[id.into(), len as u64])
            }
            EncodeError::BodyTooLarge { len } => s.tagged("body_too_large", &[len]),
        }
    }
}

/// The frame map of the contract (mcbp.erl's `frame()`).
impl ToTerm for Frame<'_> {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        let infos: Vec<S::Term> = (self.framing_extras.iter())
            .map(|info| {
                let pair = [s.int(info.id.into()), s.bin(info.data)];
                s.tuple(&pair)
            })
            .collect();
        let which = self.magic.vbucket_or_status_names().0;
        let keys = [
            "magic",
            "opcode",
            "opcode_name",
            "datatype",
            which,
            "opaque",
            "cas",
            "framing_extras",
            "extras",
            "key",
            "value",
        ]
        .map(|k| s.atom(k));
        let values = [
            s.atom(self.magic.name()),
            s.int(self.opcode.into()),
            s.atom(self.opcode_name().unwrap_or("unknown")),
            s.int(self.datatype.into()),
            s.int(self.vbucket_or_status.into()),
            s.int(self.opaque.into()),
            s.int(self.cas),
            s.list(&infos),
            s.bin(self.extras),
            s.bin(self.key),
            s.bin(self.value),
        ];
        s.map(&keys, &values)
    }
}

impl ToTerm for Field<'_> {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        match self {
            Field::Int(n) => s.int(*n),
            Field::Bool(b) => s.atom(if *b { "true" } else { "false" }),
            Field::Name(n) => s.atom(n),
            Field::Unknown(n) => {
                let pair = [s.atom("unknown"), s.int(*n)];
                s.tuple(&pair)
            }
            Field::Bytes(b) => s.bin(b),
            Field::FailoverLog(entries) => {
                let items: Vec<S::Term> = (entries.iter())
                    .map(|&(uuid, seqno)| {
                        let pair = [s.int(uuid), s.int(seqno)];
                        s.tuple(&pair)
                    })
                    .collect();
                s.list(&items)
            }
        }
    }
}

/// `dcp_fields`' map, by field name.
impl ToTerm for Fields<'_> {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        let keys: Vec<S::Term> = self.iter().map(|(n, _)| s.atom(n)).collect();
        let values: Vec<S::Term> = self.iter().map(|(_, f)| f.to_term(&mut *s)).collect();
        s.map(&keys, &values)
    }
}

/// mcbp.erl's `stats()`.
impl ToTerm for Stats {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        let mut op_keys = Vec::with_capacity(self.by_opcode.len());
        let mut op_values = Vec::with_capacity(self.by_opcode.len());
        let counts = ["frames", "bytes"].map(|k| s.atom(k));
        for &(op, frames, bytes) in &self.by_opcode {
            op_keys.push(s.name(Kind::Opcode, op.into()));
            let values = [s.int(frames), s.int(bytes)];
            op_values.push(s.map(&counts, &values));
        }
        let keys = [
            "frames",
            "bytes",
            "forwarded_frames",
            "blocked_frames",
            "reported_frames",
            "largest_frame",
            "held_bytes",
            "forward_remaining",
            "by_opcode",
        ]
        .map(|k| s.atom(k));
        let values = [
            s.int(self.frames),
            s.int(self.bytes),
            s.int(self.forwarded_frames),
            s.int(self.blocked_frames),
            s.int(self.reported_frames),
            s.int(self.largest_frame),
            s.int(self.held_bytes),
            s.int(self.forward_remaining),
            s.map(&op_keys, &op_values),
        ];
        s.map(&keys, &values)
    }
}

/// A term coming in, as far as mcbp reads terms: atoms it has names for, non-negative integers
/// up to u64, binaries (borrowed), tuples, lists and maps; anything else is `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Atom(&'static str),
    Int(u64),
    Bin(&'a [u8]),
    Tuple(Vec<Value<'a>>),
    List(Vec<Value<'a>>),
    Map(Vec<(Value<'a>, Value<'a>)>),
    /// A list, tuple or map a reader left unread because the term holds more than `MAX_ITEMS`
    /// items: reading any term costs at most that much, however large the caller made it.
    TooLong,
    Other,
}

/// The most items (elements of lists, tuples and maps, all depths together) a reader turns into
/// a `Value`; beyond that it gives `Value::TooLong`. Every term mcbp and dcp_setup read is far
/// smaller (a vbucket list has at most 1024 elements, framing extras at most 255).
pub const MAX_ITEMS: usize = 4096;

impl<'a> Value<'a> {
    fn get(&self, key: &str) -> Option<&Value<'a>> {
        match self {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| matches!(k, Value::Atom(n) if *n == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
    fn int(&self) -> Option<u64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }
}

/// The code of a term `Sink::name` gives: a name of `kind`'s table, or `{unknown, Code}` for a
/// code without one (so every accepted term encodes back unchanged).
pub fn code_of(kind: Kind, v: &Value<'_>) -> Option<u32> {
    match v {
        Value::Atom(n) => code(kind, n),
        Value::Tuple(t) => match t.as_slice() {
            [Value::Atom("unknown"), Value::Int(c)] => {
                let c = u32::try_from(*c).ok()?;
                name(kind, c).is_none().then_some(c)
            }
            _ => None,
        },
        _ => None,
    }
}

impl Event {
    /// The event of a tuple `to_term` gives; `None` for any other term.
    pub fn from_value(v: &Value<'_>) -> Option<Event> {
        let Value::Tuple(t) = v else { return None };
        let int = |i: usize| t.get(i)?.int();
        let narrow = |i: usize| u16::try_from(int(i)?).ok();
        let wide = |i: usize| u32::try_from(int(i)?).ok();
        Some(match (t.as_slice(), t.len()) {
            ([Value::Atom("stream_end"), ..], 4) => Event::StreamEnd {
                vbucket: narrow(1)?,
                opaque: wide(2)?,
                reason: StreamEndReason(code_of(Kind::StreamEndReason, &t[3])?),
            },
            ([Value::Atom("add_stream_response"), ..], 4) => Event::AddStreamResponse {
                opaque: wide(1)?,
                status: narrow(2)?,
                stream_opaque: match t[3] {
                    Value::Atom("undefined") => None,
                    _ => Some(wide(3)?),
                },
            },
            ([Value::Atom("close_stream_response"), ..], 3) => Event::CloseStreamResponse {
                opaque: wide(1)?,
                status: narrow(2)?,
            },
            ([Value::Atom("stream_req"), ..], 3) => Event::StreamReq {
                vbucket: narrow(1)?,
                opaque: wide(2)?,
            },
            ([Value::Atom("set_vbucket_state"), ..], 4) => Event::SetVbucketState {
                vbucket: narrow(1)?,
                opaque: wide(2)?,
                state: VbState(u8::try_from(code_of(Kind::VbState, &t[3])?).ok()?),
            },
            ([Value::Atom("set_vbucket_state_response"), ..], 3) => {
                Event::SetVbucketStateResponse {
                    opaque: wide(1)?,
                    status: narrow(2)?,
                }
            }
            _ => return None,
        })
    }
}

/// Why a term is not a frame map (or `frame_spec()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecError {
    NotAMap,
    Missing(&'static str),
    Bad(&'static str),
    NotAllowed(&'static str),
}

impl ToTerm for SpecError {
    fn to_term<S: Sink>(&self, s: &mut S) -> S::Term {
        let (tag, field) = match *self {
            SpecError::NotAMap => return s.atom("bad_field"),
            SpecError::Missing(f) => ("missing_field", f),
            SpecError::Bad(f) => ("bad_field", f),
            SpecError::NotAllowed(f) => ("field_not_allowed", f),
        };
        let pair = [s.atom(tag), s.atom(field)];
        s.tuple(&pair)
    }
}

impl<'a> Frame<'a> {
    /// The frame a frame map (or a sparser `frame_spec()`) describes; absent fields are 0 or
    /// empty. Fields are checked in a fixed order, so one bad map always gives the same reason.
    pub fn from_value(map: &Value<'a>) -> Result<Frame<'a>, SpecError> {
        Frame::read(map, true)
    }

    /// As `from_value`, but the `value` field is not looked at (the frame's value is empty): for
    /// `Frame::encode_head_for`, whose caller holds the value and appends it itself.
    pub fn head_from_value(map: &Value<'a>) -> Result<Frame<'a>, SpecError> {
        Frame::read(map, false)
    }

    fn read(map: &Value<'a>, with_value: bool) -> Result<Frame<'a>, SpecError> {
        use SpecError::{Bad, Missing};
        if !matches!(map, Value::Map(_)) {
            return Err(SpecError::NotAMap);
        }
        let need = |f: &'static str| map.get(f).ok_or(Missing(f));
        let magic = match need("magic")? {
            Value::Atom(n) => Magic::from_name(n),
            _ => None,
        }
        .ok_or(Bad("magic"))?;
        let opcode = match need("opcode")? {
            Value::Atom(n) => code(Kind::Opcode, n),
            Value::Int(n) => u32::try_from(*n).ok(),
            _ => None,
        }
        .and_then(|c| u8::try_from(c).ok())
        .ok_or(Bad("opcode"))?;
        let (which, other) = magic.vbucket_or_status_names();
        if map.get(other).is_some() {
            return Err(SpecError::NotAllowed(other));
        }
        let int = |f: &'static str, max: u64| match map.get(f) {
            None => Ok(0),
            Some(v) => v.int().filter(|n| *n <= max).ok_or(Bad(f)),
        };
        let bin = |f: &'static str| match map.get(f) {
            None => Ok(&[][..]),
            Some(Value::Bin(b)) => Ok(*b),
            Some(_) => Err(Bad(f)),
        };
        let info = |v: &Value<'a>| match v {
            Value::Tuple(t) => match t.as_slice() {
                [Value::Int(id), Value::Bin(data)] => Some(FrameInfo {
                    id: u16::try_from(*id).ok()?,
                    data,
                }),
                _ => None,
            },
            _ => None,
        };
        let framing_extras = match map.get("framing_extras") {
            None => Some(Vec::new()),
            Some(Value::List(l)) => l.iter().map(info).collect::<Option<_>>(),
            Some(_) => None,
        }
        .ok_or(Bad("framing_extras"))?;
        Ok(Frame {
            magic,
            opcode,
            datatype: int("datatype", 0xff)? as u8,
            vbucket_or_status: int(which, 0xffff)? as u16,
            opaque: int("opaque", 0xffff_ffff)? as u32,
            cas: int("cas", u64::MAX)?,
            framing_extras,
            extras: bin("extras")?,
            key: bin("key")?,
            value: if with_value { bin("value")? } else { &[] },
        })
    }
}

/// One names table as `[{Code, Name}]`, ascending.
pub fn table<S: Sink>(s: &mut S, kind: Kind) -> S::Term {
    let pairs: Vec<S::Term> = (crate::names::table(kind).iter())
        .map(|&(c, n)| {
            let pair = [s.int(c.into()), s.atom(n)];
            s.tuple(&pair)
        })
        .collect();
    s.list(&pairs)
}
