//! Glue for the mcbp codec and splitter: terms <-> mcbp structs, the splitter resource.
//! Protocol logic stays in the `mcbp` crate.

use mcbp::splitter::{Event, FeedOutput, FeedStatus, Piece, Side, Splitter};
use mcbp::{
    Decoded, EncodeError, Error, Field, Frame, FrameInfo, Kind, Magic, StreamEndReason, VbState,
};
use parking_lot::Mutex;
use rustler::types::tuple::get_tuple;
use rustler::Error::BadArg;
use rustler::{Atom, Binary, Encoder, Env, NewBinary, NifResult, ResourceArc, Term};

use crate::atoms::*;

/// Parts at least this long become sub-binaries of the input; shorter ones are copied so a small
/// key does not keep a large socket chunk alive.
const SUBBINARY_MIN: usize = 64;

/// Work units per `feed` call (see `mcbp::splitter::REPORTED_FRAME_COST`): 32 Ki forwarded
/// frames or 256 reported ones. A forwarded frame costs ~4 ns when the chunk is in cache but up to
/// ~15 ns in a chunk larger than L2 (measured by `make bench`'s slice check), so a call stays
/// near half a millisecond even then.
const FEED_BUDGET: usize = 32 * 1024;

fn error_term<'a>(env: Env<'a>, e: &Error) -> Term<'a> {
    match *e {
        Error::BadMagic(b) => (bad_magic(), b).encode(env),
        Error::FrameTooLarge { len, max } => (frame_too_large(), len, max).encode(env),
        Error::ReportedFrameTooLarge {
            opcode: op,
            len,
            max,
        } => (reported_frame_too_large(), op, len, max).encode(env),
        Error::BadLengths {
            framing: f,
            extras: x,
            key: k,
            body: b,
        } => {
            let map =
                Term::map_from_arrays(env, &[framing(), extras(), key(), body()], &[f, x, k, b])
                    .unwrap_or_else(|_| Term::map_new(env));
            (bad_lengths(), map).encode(env)
        }
        Error::BadFramingExtras { offset } => (bad_framing_extras(), offset).encode(env),
        Error::BadExtras { opcode: op, len } => (bad_extras(), op, len).encode(env),
        Error::BadValue { opcode: op, len } => (bad_value(), op, len).encode(env),
    }
}

fn encode_error_term<'a>(env: Env<'a>, e: &EncodeError) -> Term<'a> {
    match *e {
        EncodeError::KeyTooLong { len, max } => (key_too_long(), len, max).encode(env),
        EncodeError::ExtrasTooLong { len } => (extras_too_long(), len).encode(env),
        EncodeError::FramingExtrasNotAllowed => framing_extras_not_allowed().encode(env),
        EncodeError::FramingExtrasTooLong { len } => (framing_extras_too_long(), len).encode(env),
        EncodeError::FrameInfoIdTooLarge { id } => (frame_info_id_too_large(), id).encode(env),
        EncodeError::FrameInfoTooLong { id, len } => (frame_info_too_long(), id, len).encode(env),
        EncodeError::BodyTooLarge { len } => (body_too_large(), len).encode(env),
    }
}

/// A part of `base` (a slice of `base.as_slice()`) as a binary term.
fn part_term<'a>(env: Env<'a>, base: &Binary<'a>, part: &[u8]) -> NifResult<Term<'a>> {
    if part.len() >= SUBBINARY_MIN {
        let offset = part.as_ptr() as usize - base.as_slice().as_ptr() as usize;
        Ok(base.make_subbinary(offset, part.len())?.encode(env))
    } else {
        Ok(Binary::from(NewBinary::from_slice(env, part)).encode(env))
    }
}

/// The frame map of the contract; `frame`'s parts are slices of `base`.
fn frame_term<'a>(env: Env<'a>, base: &Binary<'a>, frame: &Frame<'_>) -> NifResult<Term<'a>> {
    let mut infos = Vec::with_capacity(frame.framing_extras.len());
    for info in &frame.framing_extras {
        infos.push((info.id, part_term(env, base, info.data)?).encode(env));
    }
    let which = name_atom(env, frame.magic.vbucket_or_status_names().0);
    let keys = [
        magic().encode(env),
        opcode().encode(env),
        opcode_name().encode(env),
        datatype().encode(env),
        which.encode(env),
        opaque().encode(env),
        cas().encode(env),
        framing_extras().encode(env),
        extras().encode(env),
        key().encode(env),
        value().encode(env),
    ];
    let values = [
        name_atom(env, frame.magic.name()).encode(env),
        frame.opcode.encode(env),
        frame
            .opcode_name()
            .map_or(unknown(), |n| name_atom(env, n))
            .encode(env),
        frame.datatype.encode(env),
        frame.vbucket_or_status.encode(env),
        frame.opaque.encode(env),
        frame.cas.encode(env),
        infos.encode(env),
        part_term(env, base, frame.extras)?,
        part_term(env, base, frame.key)?,
        part_term(env, base, frame.value)?,
    ];
    Term::map_from_term_arrays(env, &keys, &values)
}

#[rustler::nif]
fn decode<'a>(env: Env<'a>, bin: Binary<'a>) -> NifResult<Term<'a>> {
    let input = bin.as_slice();
    match mcbp::decode(input, mcbp::DEFAULT_MAX_FRAME_SIZE) {
        Ok(Decoded::Frame(frame, used)) => {
            let map = frame_term(env, &bin, &frame)?;
            let rest = bin.make_subbinary(used, input.len() - used)?;
            Ok((ok(), map, rest).encode(env))
        }
        Ok(Decoded::More(n)) => Ok((more(), n).encode(env)),
        Err(e) => Ok((error(), error_term(env, &e)).encode(env)),
    }
}

/// The frame a frame map (or a sparser `frame_spec`) describes; `Err` carries the reason term.
fn read_map<'a>(env: Env<'a>, map: Term<'a>) -> Result<Frame<'a>, Term<'a>> {
    let bad = |field: Atom| (bad_field(), field).encode(env);
    if !map.is_map() {
        return Err(bad_field().encode(env));
    }
    let get = |field: Atom| map.map_get(field).ok();
    let need = |field: Atom| get(field).ok_or_else(|| (missing_field(), field).encode(env));
    let m_atom = need(magic())?.decode::<Atom>().map_err(|_| bad(magic()))?;
    let m = atom_name(m_atom)
        .and_then(Magic::from_name)
        .ok_or_else(|| bad(magic()))?;
    let op_term = need(opcode())?;
    let op = if op_term.is_atom() {
        term_code(Kind::Opcode, op_term)
    } else {
        op_term
            .decode::<u64>()
            .ok()
            .and_then(|n| u32::try_from(n).ok())
    };
    let op = op
        .and_then(|c| u8::try_from(c).ok())
        .ok_or_else(|| bad(opcode()))?;
    let (which, other) = m.vbucket_or_status_names();
    let (which, other) = (name_atom(env, which), name_atom(env, other));
    if get(other).is_some() {
        return Err((field_not_allowed(), other).encode(env));
    }
    // rustler's u8/u16 decoders truncate out-of-range integers: decode as u64 and check.
    let int = |field: Atom| -> Result<u64, Term<'a>> {
        get(field).map_or(Ok(0), |t| t.decode::<u64>().map_err(|_| bad(field)))
    };
    let small = |field: Atom, max: u64| {
        int(field).and_then(|n| if n <= max { Ok(n) } else { Err(bad(field)) })
    };
    let bin = |field: Atom| -> Result<&'a [u8], Term<'a>> {
        get(field).map_or(Ok(&[][..]), |t| {
            t.decode::<Binary<'a>>()
                .map(|b| b.as_slice())
                .map_err(|_| bad(field))
        })
    };
    let mut infos = Vec::new();
    if let Some(t) = get(framing_extras()) {
        let list: Vec<(u64, Binary<'a>)> = t.decode().map_err(|_| bad(framing_extras()))?;
        for (id, data) in list {
            let id = u16::try_from(id).map_err(|_| bad(framing_extras()))?;
            infos.push(FrameInfo {
                id,
                data: data.as_slice(),
            });
        }
    }
    Ok(Frame {
        magic: m,
        opcode: op,
        datatype: small(datatype(), 0xff)? as u8,
        vbucket_or_status: small(which, 0xffff)? as u16,
        opaque: small(opaque(), 0xffff_ffff)? as u32,
        cas: int(cas())?,
        framing_extras: infos,
        extras: bin(extras())?,
        key: bin(key())?,
        value: bin(value())?,
    })
}

#[rustler::nif]
fn encode<'a>(env: Env<'a>, map: Term<'a>) -> Term<'a> {
    let frame = match read_map(env, map) {
        Ok(f) => f,
        Err(why) => return (error(), why).encode(env),
    };
    let mut head = Vec::with_capacity(64 + frame.extras.len() + frame.key.len());
    match frame.encode_head(&mut head) {
        Ok(()) => {
            // One copy of the value, straight into the result.
            let mut bin = NewBinary::new(env, head.len() + frame.value.len());
            let (h, v) = bin.as_mut_slice().split_at_mut(head.len());
            h.copy_from_slice(&head);
            v.copy_from_slice(frame.value);
            Binary::from(bin).encode(env)
        }
        Err(e) => (error(), encode_error_term(env, &e)).encode(env),
    }
}

fn field_term<'a>(env: Env<'a>, f: &Field<'_>) -> NifResult<Term<'a>> {
    Ok(match f {
        Field::Int(n) => n.encode(env),
        Field::Bool(b) => b.encode(env),
        Field::Name(name) => name_atom(env, name).encode(env),
        Field::Unknown(n) => (unknown(), *n).encode(env),
        Field::Bytes(b) => Binary::from(NewBinary::from_slice(env, b)).encode(env),
        Field::FailoverLog(entries) => entries.encode(env),
    })
}

#[rustler::nif]
fn dcp_fields<'a>(env: Env<'a>, map: Term<'a>) -> NifResult<Term<'a>> {
    let frame = match read_map(env, map) {
        Ok(f) => f,
        Err(why) => return Ok((error(), why).encode(env)),
    };
    match mcbp::fields(&frame) {
        Ok(fields) => {
            let mut keys = Vec::with_capacity(fields.len());
            let mut values = Vec::with_capacity(fields.len());
            for (name, f) in &fields {
                keys.push(name_atom(env, name).encode(env));
                values.push(field_term(env, f)?);
            }
            Term::map_from_term_arrays(env, &keys, &values)
        }
        Err(e) => Ok((error(), error_term(env, &e)).encode(env)),
    }
}

/// One name table, `[{Code, Name}]` ascending.
#[rustler::nif]
fn names(env: Env<'_>, kind: Atom) -> NifResult<Term<'_>> {
    let kind = kind_of(kind).ok_or(BadArg)?;
    let table = mcbp::names::table(kind);
    let pairs: Vec<(u16, Atom)> = table.iter().map(|&(c, n)| (c, name_atom(env, n))).collect();
    Ok(pairs.encode(env))
}

/// A code's name in a table, `{unknown, Code}` when it has none.
#[rustler::nif]
fn name_of(env: Env<'_>, kind: Atom, code: u32) -> NifResult<Term<'_>> {
    let kind = kind_of(kind).ok_or(BadArg)?;
    Ok(code_term(env, kind, code))
}

/// A name's code in a table, `undefined` when it is not there.
#[rustler::nif]
fn code_of(env: Env<'_>, kind: Atom, name: Atom) -> NifResult<Term<'_>> {
    let kind = kind_of(kind).ok_or(BadArg)?;
    Ok(match term_code(kind, name.to_term(env)) {
        Some(c) => c.encode(env),
        None => undefined().encode(env),
    })
}

pub(crate) fn side_of(atom: Atom) -> NifResult<Side> {
    if atom == consumer() {
        Ok(Side::Consumer)
    } else if atom == producer() {
        Ok(Side::Producer)
    } else {
        Err(BadArg)
    }
}

pub(crate) fn side_atom(side: Side) -> Atom {
    match side {
        Side::Consumer => consumer(),
        Side::Producer => producer(),
    }
}

/// One splitter per socket direction. The lock is uncontended (one owner process); it only makes
/// the resource safe to share.
pub struct SplitterResource {
    inner: Mutex<SplitterState>,
}

struct SplitterState {
    splitter: Splitter,
    out: FeedOutput,
}

impl std::panic::RefUnwindSafe for SplitterResource {}

#[rustler::resource_impl]
impl rustler::Resource for SplitterResource {}

#[rustler::nif]
fn splitter_new(side: Atom, max_frame_size: u64) -> NifResult<ResourceArc<SplitterResource>> {
    let side = side_of(side)?;
    if !mcbp::MAX_FRAME_SIZE_RANGE.contains(&max_frame_size) {
        return Err(BadArg);
    }
    Ok(ResourceArc::new(SplitterResource {
        inner: Mutex::new(SplitterState {
            splitter: Splitter::new(side, max_frame_size),
            out: FeedOutput::default(),
        }),
    }))
}

/// A splitter event as its tuple (mcbp.erl's `event()`).
pub(crate) fn event_term(env: Env<'_>, event: Event) -> Term<'_> {
    use Event as E;
    let und = undefined().encode(env);
    match event {
        E::StreamEnd {
            vbucket: vb,
            opaque: op,
            reason: r,
        } => (
            stream_end(),
            vb,
            op,
            code_term(env, Kind::StreamEndReason, r.0),
        )
            .encode(env),
        E::AddStreamResponse {
            opaque: op,
            status: st,
            stream_opaque: so,
        } => (
            add_stream_response(),
            op,
            st,
            so.map_or(und, |o| o.encode(env)),
        )
            .encode(env),
        E::CloseStreamResponse {
            opaque: op,
            status: st,
        } => (close_stream_response(), op, st).encode(env),
        E::StreamReq {
            vbucket: vb,
            opaque: op,
        } => (stream_req(), vb, op).encode(env),
        E::SetVbucketState {
            vbucket: vb,
            opaque: op,
            state: s,
        } => (
            set_vbucket_state(),
            vb,
            op,
            code_term(env, Kind::VbState, s.0.into()),
        )
            .encode(env),
        E::SetVbucketStateResponse {
            opaque: op,
            status: st,
        } => (set_vbucket_state_response(), op, st).encode(env),
    }
}

/// The event of a tuple `event_term` gives (badarg for any other term).
pub(crate) fn event_from_term(term: Term<'_>) -> NifResult<Event> {
    use Event as E;
    let t = get_tuple(term)?;
    let tag: Atom = t.first().ok_or(BadArg)?.decode()?;
    // rustler's u8/u16 decoders truncate out-of-range integers: decode as u64 and check.
    let int = |i: usize| t[i].decode::<u64>().map_err(|_| BadArg);
    let (a, b) = (|| int(1), || int(2));
    let narrow = |n: u64| u16::try_from(n).map_err(|_| BadArg);
    let name = |kind, i: usize| term_code(kind, t[i]).ok_or(BadArg);
    let wide = |n: u64| u32::try_from(n).map_err(|_| BadArg);
    Ok(match (t.len(), tag) {
        (4, x) if x == stream_end() => E::StreamEnd {
            vbucket: narrow(a()?)?,
            opaque: wide(b()?)?,
            reason: StreamEndReason(name(Kind::StreamEndReason, 3)?),
        },
        (4, x) if x == add_stream_response() => E::AddStreamResponse {
            opaque: wide(a()?)?,
            status: narrow(b()?)?,
            stream_opaque: match t[3].decode::<Atom>() {
                Ok(u) if u == undefined() => None,
                _ => Some(wide(int(3)?)?),
            },
        },
        (3, x) if x == close_stream_response() => E::CloseStreamResponse {
            opaque: wide(a()?)?,
            status: narrow(b()?)?,
        },
        (3, x) if x == stream_req() => E::StreamReq {
            vbucket: narrow(a()?)?,
            opaque: wide(b()?)?,
        },
        (4, x) if x == set_vbucket_state() => E::SetVbucketState {
            vbucket: narrow(a()?)?,
            opaque: wide(b()?)?,
            state: VbState(u8::try_from(name(Kind::VbState, 3)?).map_err(|_| BadArg)?),
        },
        (3, x) if x == set_vbucket_state_response() => E::SetVbucketStateResponse {
            opaque: wide(a()?)?,
            status: narrow(b()?)?,
        },
        _ => return Err(BadArg),
    })
}

/// The event of the frame at the front of `bin` (what a splitter would report for it):
/// `{ok, Event}`, `undefined` for a frame no side reports, `{more, N}` or `{error, Reason}`.
#[rustler::nif]
fn decode_event<'a>(env: Env<'a>, bin: Binary<'a>) -> Term<'a> {
    let result = match mcbp::decode(bin.as_slice(), u64::MAX) {
        Ok(Decoded::Frame(frame, _)) => mcbp::event(&frame),
        Ok(Decoded::More(n)) => return (more(), n).encode(env),
        Err(e) => Err(e),
    };
    match result {
        Ok(Some(event)) => (ok(), event_term(env, event)).encode(env),
        Ok(None) => undefined().encode(env),
        Err(e) => (error(), error_term(env, &e)).encode(env),
    }
}

#[rustler::nif]
fn feed<'a>(
    env: Env<'a>,
    resource: ResourceArc<SplitterResource>,
    chunk: Binary<'a>,
    offset: usize,
) -> NifResult<Term<'a>> {
    if offset > chunk.len() {
        return Err(BadArg);
    }
    let mut state = resource.inner.lock();
    let SplitterState { splitter, out } = &mut *state;
    out.clear();
    let result = splitter.feed(chunk.as_slice(), offset, FEED_BUDGET, out);
    let percent = (out.work * 100 / FEED_BUDGET).clamp(1, 100) as i32;
    rustler::schedule::consume_timeslice(env, percent);
    let status = match result {
        Ok(status) => status,
        Err(e) => return Ok((error(), error_term(env, &e)).encode(env)),
    };
    let mut forward = Vec::with_capacity(out.forward.len());
    for piece in &out.forward {
        forward.push(match piece {
            Piece::Chunk(r) => chunk.make_subbinary(r.start, r.len())?,
            Piece::Held(b) => Binary::from(NewBinary::from_slice(env, b)),
        });
    }
    let mut events = Vec::with_capacity(out.events.len());
    for event in &out.events {
        events.push(event_term(env, *event));
    }
    Ok(match status {
        FeedStatus::Done => (ok(), forward, events).encode(env),
        FeedStatus::Stopped(next) => (continue_(), next, forward, events).encode(env),
    })
}

/// Bytes of the frame being forwarded still to come (O(1); `splitter_stats`' forward_remaining).
#[rustler::nif]
fn splitter_forward_remaining(resource: ResourceArc<SplitterResource>) -> u64 {
    resource.inner.lock().splitter.forward_remaining()
}

#[rustler::nif]
fn splitter_stats(env: Env<'_>, resource: ResourceArc<SplitterResource>) -> NifResult<Term<'_>> {
    let stats = resource.inner.lock().splitter.stats();
    let mut op_keys = Vec::with_capacity(stats.by_opcode.len());
    let mut op_values = Vec::with_capacity(stats.by_opcode.len());
    for &(op, n, b) in &stats.by_opcode {
        op_keys.push(code_term(env, Kind::Opcode, u32::from(op)));
        op_values.push(Term::map_from_arrays(env, &[frames(), bytes()], &[n, b])?);
    }
    let by_op = Term::map_from_term_arrays(env, &op_keys, &op_values)?;
    let counts = [
        (frames(), stats.frames),
        (bytes(), stats.bytes),
        (forwarded_frames(), stats.forwarded_frames),
        (blocked_frames(), stats.blocked_frames),
        (reported_frames(), stats.reported_frames),
        (largest_frame(), stats.largest_frame),
        (held_bytes(), stats.held_bytes),
        (forward_remaining(), stats.forward_remaining),
    ];
    Term::map_from_pairs(env, &counts)?.map_put(by_opcode(), by_op)
}

/// The one default max frame size (`mcbp::DEFAULT_MAX_FRAME_SIZE`, memcached's max_packet_size).
#[rustler::nif]
fn default_max_frame_size() -> u64 {
    mcbp::DEFAULT_MAX_FRAME_SIZE
}
