//! Glue for the mcbp codec and splitter: one generic converter between terms and the term shapes
//! `mcbp::term` describes, and the splitter resource. Protocol logic and shapes stay in `mcbp`.

use mcbp::splitter::{FeedOutput, FeedStatus, Piece, Splitter};
use mcbp::term::kind_from_name;
use mcbp::{Decoded, Frame, Kind, Sink, ToTerm, Value};
use parking_lot::Mutex;
use rustler::types::tuple::{get_tuple, make_tuple};
use rustler::Error::BadArg;
use rustler::{
    Atom, Binary, Encoder, Env, MapIterator, NewBinary, NifResult, ResourceArc, Term, TermType,
};

use crate::atoms::*;

/// Parts at least this long become sub-binaries of the input; shorter ones are copied so a small
/// key does not keep a large socket chunk alive.
const SUBBINARY_MIN: usize = 64;

/// Work units per `feed` call (see `mcbp::splitter::REPORTED_FRAME_COST`): 32 Ki forwarded
/// frames or 256 reported ones. A forwarded frame costs ~4 ns when the chunk is in cache but up to
/// ~15 ns in a chunk larger than L2 (measured by `make bench`'s slice check), so a call stays
/// near half a millisecond even then.
const FEED_BUDGET: usize = 32 * 1024;

/// How deep a term coming in is read; the shapes mcbp reads are at most 3 deep.
pub(crate) const VALUE_DEPTH: u32 = 8;

/// The one converter: builds the terms of mcbp's shapes in `env`. A part of `base` becomes a
/// sub-binary of it (when long enough), other bytes are copied.
pub(crate) struct Out<'a> {
    env: Env<'a>,
    base: Option<Binary<'a>>,
}

impl<'a> Out<'a> {
    pub(crate) fn new(env: Env<'a>) -> Self {
        Out { env, base: None }
    }
}

impl<'a> Sink for Out<'a> {
    type Term = Term<'a>;
    fn atom(&mut self, name: &'static str) -> Term<'a> {
        name_atom(self.env, name).to_term(self.env)
    }
    fn int(&mut self, n: u64) -> Term<'a> {
        n.encode(self.env)
    }
    fn bin(&mut self, bytes: &[u8]) -> Term<'a> {
        if let Some(base) = self.base.filter(|_| bytes.len() >= SUBBINARY_MIN) {
            let offset = (bytes.as_ptr() as usize).wrapping_sub(base.as_slice().as_ptr() as usize);
            if offset <= base.len() && bytes.len() <= base.len() - offset {
                if let Ok(sub) = base.make_subbinary(offset, bytes.len()) {
                    return sub.encode(self.env);
                }
            }
        }
        Binary::from(NewBinary::from_slice(self.env, bytes)).encode(self.env)
    }
    fn tuple(&mut self, items: &[Term<'a>]) -> Term<'a> {
        make_tuple(self.env, items)
    }
    fn list(&mut self, items: &[Term<'a>]) -> Term<'a> {
        items.encode(self.env)
    }
    fn map(&mut self, keys: &[Term<'a>], values: &[Term<'a>]) -> Term<'a> {
        // Keys are distinct by contract, the one way this fails.
        Term::map_from_term_arrays(self.env, keys, values)
            .unwrap_or_else(|_| Term::map_new(self.env))
    }
}

pub(crate) fn term<'a>(env: Env<'a>, x: &impl ToTerm) -> Term<'a> {
    x.to_term(&mut Out::new(env))
}

pub(crate) fn error_term<'a>(env: Env<'a>, why: &impl ToTerm) -> Term<'a> {
    (error(), term(env, why)).encode(env)
}

/// A term as mcbp reads it; parts deeper than `depth` are `Other`. At most `mcbp::term::MAX_ITEMS`
/// items are read in all: a list, tuple or map beyond that is `TooLong`, so a caller's huge term
/// costs a bounded read (a list is walked cell by cell, never measured first).
pub(crate) fn value(t: Term<'_>, depth: u32) -> Value<'_> {
    let mut budget = mcbp::term::MAX_ITEMS;
    read(t, depth, &mut budget)
}

fn read<'a>(t: Term<'a>, depth: u32, budget: &mut usize) -> Value<'a> {
    let inner = |t, budget: &mut usize| match depth {
        0 => Value::Other,
        _ => read(t, depth - 1, budget),
    };
    let read = match t.get_type() {
        TermType::Atom => t.decode().ok().and_then(atom_name).map(Value::Atom),
        TermType::Integer => t.decode().ok().map(Value::Int),
        TermType::Binary => t.decode::<Binary>().ok().map(|b| Value::Bin(b.as_slice())),
        TermType::Tuple => get_tuple(t).ok().map(|ts| match take(budget, ts.len()) {
            true => Value::Tuple(ts.into_iter().map(|t| inner(t, budget)).collect()),
            false => Value::TooLong,
        }),
        TermType::List => {
            // An improper tail is `Other` (rustler's list iterator would panic on it).
            let mut items = Vec::new();
            let mut rest = t;
            loop {
                if rest.is_empty_list() {
                    break Some(Value::List(items));
                }
                let Ok((head, tail)) = rest.list_get_cell() else {
                    break None;
                };
                if !take(budget, 1) {
                    break Some(Value::TooLong);
                }
                items.push(inner(head, budget));
                rest = tail;
            }
        }
        TermType::Map => match t.map_size() {
            Ok(n) if take(budget, n) => (t.decode::<MapIterator>().ok()).map(|it| {
                Value::Map(
                    it.map(|(k, v)| (inner(k, budget), inner(v, budget)))
                        .collect(),
                )
            }),
            Ok(_) => Some(Value::TooLong),
            Err(_) => None,
        },
        _ => None,
    };
    read.unwrap_or(Value::Other)
}

/// Takes `n` items from the read budget; false (nothing taken) when fewer are left.
fn take(budget: &mut usize, n: usize) -> bool {
    let ok = n <= *budget;
    if ok {
        *budget -= n;
    }
    ok
}

/// The part of `t` at `path` (indices into tuples and proper lists, as `dcp_setup::term` gives
/// them for a term it read); `t` itself where the path leads nowhere.
pub(crate) fn part<'a>(t: Term<'a>, path: &[usize]) -> Term<'a> {
    path.iter().fold(t, |t, &i| {
        let item = match t.get_type() {
            TermType::Tuple => get_tuple(t).ok().and_then(|ts| ts.get(i).copied()),
            TermType::List if t.list_length().is_ok() => {
                t.into_list_iterator().ok().and_then(|mut l| l.nth(i))
            }
            _ => None,
        };
        item.unwrap_or(t)
    })
}

/// The frame a frame map (or `frame_spec()`) describes, or the `{error, Why}` term.
fn frame_of<'a>(env: Env<'a>, map: Term<'a>) -> Result<Frame<'a>, Term<'a>> {
    Frame::from_value(&value(map, VALUE_DEPTH)).map_err(|e| error_term(env, &e))
}

#[rustler::nif]
fn decode<'a>(env: Env<'a>, bin: Binary<'a>) -> NifResult<Term<'a>> {
    let input = bin.as_slice();
    Ok(match mcbp::decode(input, mcbp::DEFAULT_MAX_FRAME_SIZE) {
        Ok(Decoded::Frame(frame, used)) => {
            let map = frame.to_term(&mut Out {
                env,
                base: Some(bin),
            });
            let rest = bin.make_subbinary(used, input.len() - used)?;
            (ok(), map, rest).encode(env)
        }
        Ok(Decoded::More(n)) => (more(), n).encode(env),
        Err(e) => error_term(env, &e),
    })
}

/// The encoded frame but its value, for a value of `value_len` bytes the caller appends itself
/// (`mcbp:encode/1`): at most 24 + 255 + 255 + 65535 bytes are written whatever the value's size,
/// and the frame map's `value` is not read.
#[rustler::nif]
fn encode_head<'a>(env: Env<'a>, map: Term<'a>, value_len: u64) -> Term<'a> {
    let frame = match Frame::head_from_value(&value(map, VALUE_DEPTH)) {
        Ok(f) => f,
        Err(e) => return error_term(env, &e),
    };
    let mut head = Vec::with_capacity(64 + frame.extras.len() + frame.key.len());
    match frame.encode_head_for(value_len, &mut head) {
        Ok(()) => Binary::from(NewBinary::from_slice(env, &head)).encode(env),
        Err(e) => error_term(env, &e),
    }
}

#[rustler::nif]
fn dcp_fields<'a>(env: Env<'a>, map: Term<'a>) -> Term<'a> {
    match frame_of(env, map).map(|f| mcbp::fields(&f)) {
        Ok(Ok(fields)) => term(env, &fields),
        Ok(Err(e)) => error_term(env, &e),
        Err(why) => why,
    }
}

fn kind_of(kind: Atom) -> NifResult<Kind> {
    atom_name(kind).and_then(kind_from_name).ok_or(BadArg)
}

/// One name table, `[{Code, Name}]` ascending.
#[rustler::nif]
fn names(env: Env<'_>, kind: Atom) -> NifResult<Term<'_>> {
    Ok(mcbp::term::table(&mut Out::new(env), kind_of(kind)?))
}

/// A code's name in a table, `{unknown, Code}` when it has none.
#[rustler::nif]
fn name_of(env: Env<'_>, kind: Atom, code: u32) -> NifResult<Term<'_>> {
    Ok(Out::new(env).name(kind_of(kind)?, code))
}

/// A name's code in a table, `undefined` when it is not there.
#[rustler::nif]
fn code_of(env: Env<'_>, kind: Atom, name: Atom) -> NifResult<Term<'_>> {
    let code = atom_name(name).and_then(|n| mcbp::names::code(kind_of(kind).ok()?, n));
    Ok(code.map_or(undefined().encode(env), |c| c.encode(env)))
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
    let splitter = atom_name(side).and_then(|s| mcbp::term::splitter(s, max_frame_size));
    Ok(ResourceArc::new(SplitterResource {
        inner: Mutex::new(SplitterState {
            splitter: splitter.ok_or(BadArg)?,
            out: FeedOutput::default(),
        }),
    }))
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
        Ok(Some(event)) => (ok(), term(env, &event)).encode(env),
        Ok(None) => undefined().encode(env),
        Err(e) => error_term(env, &e),
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
        Err(e) => return Ok(error_term(env, &e)),
    };
    let mut forward = Vec::with_capacity(out.forward.len());
    for piece in &out.forward {
        forward.push(match piece {
            Piece::Chunk(r) => chunk.make_subbinary(r.start, r.len())?,
            Piece::Held(b) => Binary::from(NewBinary::from_slice(env, b)),
        });
    }
    let mut o = Out::new(env);
    let events: Vec<Term> = out.events.iter().map(|e| e.to_term(&mut o)).collect();
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
fn splitter_stats(env: Env<'_>, resource: ResourceArc<SplitterResource>) -> Term<'_> {
    let stats = resource.inner.lock().splitter.stats();
    term(env, &stats)
}

/// The one default max frame size (`mcbp::DEFAULT_MAX_FRAME_SIZE`, memcached's max_packet_size).
#[rustler::nif]
fn default_max_frame_size() -> u64 {
    mcbp::DEFAULT_MAX_FRAME_SIZE
}
