//! Glue for the mcbp codec and splitter: terms <-> mcbp structs, the splitter resource.
//! Protocol logic stays in the `mcbp` crate.

use mcbp::splitter::{Event, FeedOutput, FeedStatus, Piece, Side, Splitter};
use mcbp::{Decoded, EncodeError, Error, Field, Frame, FrameInfo, Magic, StreamEndReason};
use parking_lot::Mutex;
use rustler::types::tuple::make_tuple;
use rustler::{Atom, Binary, Encoder, Env, NewBinary, NifResult, ResourceArc, Term};

rustler::atoms! {
    ok,
    error,
    more,
    continue_ = "continue",
    unknown,
    stream_end,
    consumer,
    producer,
    // frame map keys
    magic,
    opcode,
    opcode_name,
    datatype,
    vbucket,
    status,
    opaque,
    cas,
    framing_extras,
    extras,
    key,
    value,
    // errors
    bad_magic,
    frame_too_large,
    bad_lengths,
    bad_framing_extras,
    bad_extras,
    bad_value,
    framing,
    body,
    missing_field,
    bad_field,
    field_not_allowed,
    key_too_long,
    extras_too_long,
    framing_extras_not_allowed,
    framing_extras_too_long,
    frame_info_id_too_large,
    frame_info_too_long,
    body_too_large,
    // stats
    frames,
    bytes,
    forwarded_frames,
    blocked_frames,
    reported_frames,
    largest_frame,
    held_bytes,
    forward_remaining,
    by_opcode,
}

/// Parts at least this long become sub-binaries of the input; shorter ones are copied so a small
/// key does not keep a large socket chunk alive.
const SUBBINARY_MIN: usize = 64;

/// Work units per `feed` call (see `mcbp::splitter::REPORTED_FRAME_COST`): 32 Ki forwarded
/// frames or 256 reported ones. A forwarded frame costs ~4 ns when the chunk is in cache but up to
/// ~15 ns in a chunk larger than L2 (measured by `make bench`'s slice check), so a call stays
/// near half a millisecond even then.
const FEED_BUDGET: usize = 32 * 1024;

fn name_atom(env: Env<'_>, name: &str) -> NifResult<Atom> {
    Atom::from_str(env, name)
}

fn error_term<'a>(env: Env<'a>, e: &Error) -> Term<'a> {
    match *e {
        Error::BadMagic(b) => (bad_magic(), b).encode(env),
        Error::FrameTooLarge { len, max } => (frame_too_large(), len, max).encode(env),
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

fn opcode_name_term<'a>(env: Env<'a>, m: Magic, op: u8) -> NifResult<Term<'a>> {
    Ok(match mcbp::names::opcode_name_for(m, op) {
        Some(name) => name_atom(env, name)?.encode(env),
        None => unknown().encode(env),
    })
}

/// The frame map of the contract; `frame`'s parts are slices of `base`.
fn frame_term<'a>(env: Env<'a>, base: &Binary<'a>, frame: &Frame<'_>) -> NifResult<Term<'a>> {
    let mut infos = Vec::with_capacity(frame.framing_extras.len());
    for info in &frame.framing_extras {
        infos.push((info.id, part_term(env, base, info.data)?).encode(env));
    }
    let which = if frame.magic.is_response() {
        status()
    } else {
        vbucket()
    };
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
        name_atom(env, frame.magic.name())?.encode(env),
        frame.opcode.encode(env),
        opcode_name_term(env, frame.magic, frame.opcode)?,
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

/// Reads the frame map fields `encode` and `dcp_fields` need. `Err` carries the reason term.
struct MapFrame<'a> {
    magic: Magic,
    opcode: u8,
    datatype: u8,
    vbucket_or_status: u16,
    opaque: u32,
    cas: u64,
    framing_extras: Vec<(u16, Binary<'a>)>,
    extras: Binary<'a>,
    key: Binary<'a>,
    value: Binary<'a>,
}

fn empty_binary(env: Env<'_>) -> Binary<'_> {
    Binary::from(NewBinary::new(env, 0))
}

fn read_map<'a>(env: Env<'a>, map: Term<'a>) -> Result<MapFrame<'a>, Term<'a>> {
    let bad = |field: Atom| (bad_field(), field).encode(env);
    if !map.is_map() {
        return Err(bad_field().encode(env));
    }
    let get = |field: Atom| map.map_get(field).ok();
    let m = get(magic())
        .ok_or_else(|| (missing_field(), magic()).encode(env))?
        .decode::<Atom>()
        .ok()
        .and_then(|a| a.to_term(env).atom_to_string().ok())
        .and_then(|s| Magic::from_name(&s))
        .ok_or_else(|| bad(magic()))?;
    let op_term = get(opcode()).ok_or_else(|| (missing_field(), opcode()).encode(env))?;
    let op = match op_term.decode::<u64>() {
        Ok(n) => u8::try_from(n).map_err(|_| bad(opcode()))?,
        Err(_) => op_term
            .atom_to_string()
            .ok()
            .and_then(|s| mcbp::names::opcode_by_name(&s))
            .ok_or_else(|| bad(opcode()))?,
    };
    let (which, other) = if m.is_response() {
        (status(), vbucket())
    } else {
        (vbucket(), status())
    };
    if get(other).is_some() {
        return Err((field_not_allowed(), other).encode(env));
    }
    // rustler's u8/u16 decoders truncate out-of-range integers: decode as u64 and check.
    fn int<'a, T: TryFrom<u64> + Default>(
        v: Option<Term<'a>>,
        bad: Term<'a>,
    ) -> Result<T, Term<'a>> {
        match v {
            None => Ok(T::default()),
            Some(t) => t
                .decode::<u64>()
                .ok()
                .and_then(|n| T::try_from(n).ok())
                .ok_or(bad),
        }
    }
    let bin = |field: Atom| -> Result<Binary<'a>, Term<'a>> {
        match get(field) {
            None => Ok(empty_binary(env)),
            Some(t) => t.decode::<Binary<'a>>().map_err(|_| bad(field)),
        }
    };
    let mut infos = Vec::new();
    if let Some(t) = get(framing_extras()) {
        let list: Vec<(u64, Binary<'a>)> = t.decode().map_err(|_| bad(framing_extras()))?;
        for (id, data) in list {
            let id = u16::try_from(id).map_err(|_| bad(framing_extras()))?;
            infos.push((id, data));
        }
    }
    Ok(MapFrame {
        magic: m,
        opcode: op,
        datatype: int(get(datatype()), bad(datatype()))?,
        vbucket_or_status: int(get(which), bad(which))?,
        opaque: int(get(opaque()), bad(opaque()))?,
        cas: int(get(cas()), bad(cas()))?,
        framing_extras: infos,
        extras: bin(extras())?,
        key: bin(key())?,
        value: bin(value())?,
    })
}

impl<'a> MapFrame<'a> {
    fn frame(&self) -> Frame<'_> {
        Frame {
            magic: self.magic,
            opcode: self.opcode,
            datatype: self.datatype,
            vbucket_or_status: self.vbucket_or_status,
            opaque: self.opaque,
            cas: self.cas,
            framing_extras: self
                .framing_extras
                .iter()
                .map(|(id, data)| FrameInfo {
                    id: *id,
                    data: data.as_slice(),
                })
                .collect(),
            extras: self.extras.as_slice(),
            key: self.key.as_slice(),
            value: self.value.as_slice(),
        }
    }
}

#[rustler::nif]
fn encode<'a>(env: Env<'a>, map: Term<'a>) -> Term<'a> {
    let parts = match read_map(env, map) {
        Ok(p) => p,
        Err(why) => return (error(), why).encode(env),
    };
    let frame = parts.frame();
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
        Field::Name(name) => name_atom(env, name)?.encode(env),
        Field::Unknown(n) => (unknown(), *n).encode(env),
        Field::Bytes(b) => Binary::from(NewBinary::from_slice(env, b)).encode(env),
        Field::FailoverLog(entries) => entries.encode(env),
    })
}

#[rustler::nif]
fn dcp_fields<'a>(env: Env<'a>, map: Term<'a>) -> NifResult<Term<'a>> {
    let parts = match read_map(env, map) {
        Ok(p) => p,
        Err(why) => return Ok((error(), why).encode(env)),
    };
    let frame = parts.frame();
    match mcbp::fields(&frame) {
        Ok(fields) => {
            let mut keys = Vec::with_capacity(fields.len());
            let mut values = Vec::with_capacity(fields.len());
            for (name, f) in &fields {
                keys.push(name_atom(env, name)?.encode(env));
                values.push(field_term(env, f)?);
            }
            Term::map_from_term_arrays(env, &keys, &values)
        }
        Err(e) => Ok((error(), error_term(env, &e)).encode(env)),
    }
}

#[rustler::nif]
fn status_name(env: Env<'_>, code: u64) -> NifResult<Term<'_>> {
    let code = u16::try_from(code).map_err(|_| rustler::Error::BadArg)?;
    Ok(match mcbp::names::status_name(code) {
        Some(name) => name_atom(env, name)?.encode(env),
        None => (unknown(), code).encode(env),
    })
}

#[rustler::nif]
fn opcode_name_of(env: Env<'_>, code: u64) -> NifResult<Term<'_>> {
    let code = u8::try_from(code).map_err(|_| rustler::Error::BadArg)?;
    opcode_name_term(env, Magic::Req, code)
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
    let side = if side == consumer() {
        Side::Consumer
    } else if side == producer() {
        Side::Producer
    } else {
        return Err(rustler::Error::BadArg);
    };
    if max_frame_size < mcbp::HEADER_LEN as u64 || max_frame_size > u32::MAX as u64 + 24 {
        return Err(rustler::Error::BadArg);
    }
    Ok(ResourceArc::new(SplitterResource {
        inner: Mutex::new(SplitterState {
            splitter: Splitter::new(side, max_frame_size),
            out: FeedOutput::default(),
        }),
    }))
}

fn event_term<'a>(env: Env<'a>, event: &Event) -> NifResult<Term<'a>> {
    match event {
        Event::StreamEnd {
            vbucket: vb,
            opaque: op,
            reason,
        } => {
            let reason = match reason {
                StreamEndReason::Known(name) => name_atom(env, name)?.encode(env),
                StreamEndReason::Unknown(n) => (unknown(), *n).encode(env),
            };
            Ok(make_tuple(
                env,
                &[
                    stream_end().encode(env),
                    vb.encode(env),
                    op.encode(env),
                    reason,
                ],
            ))
        }
        Event::Frame(bytes) => {
            let base = Binary::from(NewBinary::from_slice(env, bytes));
            match mcbp::decode(base.as_slice(), u64::MAX) {
                Ok(Decoded::Frame(frame, _)) => frame_term(env, &base, &frame),
                // The splitter validated the frame already.
                _ => Err(rustler::Error::BadArg),
            }
        }
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
        return Err(rustler::Error::BadArg);
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
        events.push(event_term(env, event)?);
    }
    Ok(match status {
        FeedStatus::Done => (ok(), forward, events).encode(env),
        FeedStatus::Stopped(next) => (continue_(), next, forward, events).encode(env),
    })
}

#[rustler::nif]
fn splitter_stats(env: Env<'_>, resource: ResourceArc<SplitterResource>) -> NifResult<Term<'_>> {
    let stats = resource.inner.lock().splitter.stats();
    let mut op_keys = Vec::with_capacity(stats.by_opcode.len());
    let mut op_values = Vec::with_capacity(stats.by_opcode.len());
    for &(op, n, b) in &stats.by_opcode {
        op_keys.push(match mcbp::names::opcode_name(op) {
            Some(name) => name_atom(env, name)?.encode(env),
            None => (unknown(), op).encode(env),
        });
        op_values.push(Term::map_from_arrays(env, &[frames(), bytes()], &[n, b])?);
    }
    let by_op = Term::map_from_term_arrays(env, &op_keys, &op_values)?;
    let keys = [
        frames(),
        bytes(),
        forwarded_frames(),
        blocked_frames(),
        reported_frames(),
        largest_frame(),
        held_bytes(),
        forward_remaining(),
    ];
    let values = [
        stats.frames,
        stats.bytes,
        stats.forwarded_frames,
        stats.blocked_frames,
        stats.reported_frames,
        stats.largest_frame,
        stats.held_bytes,
        stats.forward_remaining,
    ];
    Term::map_from_arrays(env, &keys, &values)?.map_put(by_opcode(), by_op)
}
