//! A fixed-size vbucket set: O(1) membership, no allocation per event.

use crate::MAX_VBUCKETS;

const WORDS: usize = MAX_VBUCKETS / 64;

/// A set of vbuckets as a 1024-bit bitset with a running count.
#[derive(Clone, Debug)]
pub(crate) struct VbSet {
    words: [u64; WORDS],
    len: usize,
}

impl VbSet {
    pub(crate) const fn new() -> Self {
        VbSet {
            words: [0; WORDS],
            len: 0,
        }
    }

    /// `vb` must be below MAX_VBUCKETS; callers check with `in_range` first.
    pub(crate) fn contains(&self, vb: u16) -> bool {
        let vb = usize::from(vb);
        vb < MAX_VBUCKETS && self.words[vb / 64] & (1 << (vb % 64)) != 0
    }

    pub(crate) fn insert(&mut self, vb: u16) {
        let vb = usize::from(vb);
        if vb < MAX_VBUCKETS && self.words[vb / 64] & (1 << (vb % 64)) == 0 {
            self.words[vb / 64] |= 1 << (vb % 64);
            self.len += 1;
        }
    }

    pub(crate) fn remove(&mut self, vb: u16) {
        let vb = usize::from(vb);
        if vb < MAX_VBUCKETS && self.words[vb / 64] & (1 << (vb % 64)) != 0 {
            self.words[vb / 64] &= !(1 << (vb % 64));
            self.len -= 1;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn clear(&mut self) {
        *self = VbSet::new();
    }

    /// Members of either set.
    pub(crate) fn union(&self, other: &VbSet) -> VbSet {
        let mut u = VbSet::new();
        for i in 0..WORDS {
            u.words[i] = self.words[i] | other.words[i];
            u.len += u.words[i].count_ones() as usize;
        }
        u
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..WORDS).flat_map(move |i| Bits(self.words[i]).map(move |b| (i * 64 + b) as u16))
    }
}

/// Iterates the set bit positions of one word, lowest first.
struct Bits(u64);

impl Iterator for Bits {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(bit)
    }
}
