//! The dirty-region map: which granules of the device a child has missed while it was away.
//!
//! Its memory follows what was marked, not the device's size: granules are grouped in chunks
//! of [`CHUNK_GRANULES`], a chunk is held only once it differs from the map's default, and a
//! map of a child whose history is unknown ("everything dirty") costs nothing until a rebuild
//! starts clearing it. A remote device claiming exabytes cannot make the daemon allocate them.

use std::collections::BTreeMap;

/// Granules per chunk: one chunk's bits are 8 KiB.
const CHUNK_GRANULES: u64 = 1 << 16;
const WORDS: usize = (CHUNK_GRANULES / 64) as usize;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    Clean,
    Full,
    /// Some dirty: the bits and how many are set (never 0 or all).
    Bits(Box<[u64; WORDS]>, u64),
}

/// One bit per `granularity` bytes of the device; a set bit means the child's copy of that
/// granule may be stale and must be copied before the child serves reads again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirtyMap {
    granularity: u64,
    granules: u64,
    /// What a chunk not in `chunks` is: all dirty (`true`) or all clean.
    absent_full: bool,
    chunks: BTreeMap<u64, Chunk>,
    set: u64,
}

impl DirtyMap {
    /// A clean map for a device of `size` bytes.
    pub(crate) fn new(size: u64, granularity: u64) -> DirtyMap {
        DirtyMap {
            granularity,
            granules: size.div_ceil(granularity),
            absent_full: false,
            chunks: BTreeMap::new(),
            set: 0,
        }
    }

    /// A map with every granule dirty (a child whose history is unknown).
    pub(crate) fn full(size: u64, granularity: u64) -> DirtyMap {
        let granules = size.div_ceil(granularity);
        DirtyMap {
            granularity,
            granules,
            absent_full: true,
            chunks: BTreeMap::new(),
            set: granules,
        }
    }

    pub(crate) fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Number of granules.
    pub(crate) fn granules(&self) -> u64 {
        self.granules
    }

    /// Number of dirty granules.
    pub(crate) fn dirty_granules(&self) -> u64 {
        self.set
    }

    pub(crate) fn is_clean(&self) -> bool {
        self.set == 0
    }

    /// Mark every granule overlapping `[offset, offset + len)` dirty; returns whether any was
    /// clean before.
    pub(crate) fn mark(&mut self, offset: u64, len: u64) -> bool {
        if len == 0 || self.granules == 0 {
            return false;
        }
        let first = offset / self.granularity;
        let last = ((offset + len - 1) / self.granularity).min(self.granules - 1);
        first <= last && self.set_granules(first, last + 1)
    }

    /// Granules in chunk `c` (the last one may be short).
    fn chunk_len(&self, c: u64) -> u64 {
        (self.granules - c * CHUNK_GRANULES).min(CHUNK_GRANULES)
    }

    /// Set (`dirty`) or clear granules `[first, end)`; returns the runs that changed.
    fn change(&mut self, first: u64, end: u64, dirty: bool) -> Vec<(u64, u64)> {
        let end = end.min(self.granules);
        let mut changed: Vec<(u64, u64)> = Vec::new();
        let mut g = first;
        while g < end {
            let c = g / CHUNK_GRANULES;
            let base = c * CHUNK_GRANULES;
            let len = self.chunk_len(c);
            let (lo, hi) = (g - base, (end - base).min(len));
            let default = if self.absent_full {
                Chunk::Full
            } else {
                Chunk::Clean
            };
            let mut chunk = self.chunks.remove(&c).unwrap_or(default);
            let before = chunk_count(&chunk, len);
            chunk_change(&mut chunk, len, lo, hi, dirty, |a, b| {
                match changed.last_mut() {
                    Some(run) if run.1 == base + a => run.1 = base + b,
                    _ => changed.push((base + a, base + b)),
                }
            });
            let after = chunk_count(&chunk, len);
            self.set = self.set + after - before;
            let is_default = matches!(
                (&chunk, self.absent_full),
                (Chunk::Full, true) | (Chunk::Clean, false)
            );
            if !is_default {
                self.chunks.insert(c, chunk);
            }
            g = base + hi;
        }
        changed
    }

    /// Mark granules `[first, end)` dirty; returns whether any was clean before.
    pub(crate) fn set_granules(&mut self, first: u64, end: u64) -> bool {
        !self.change(first, end, true).is_empty()
    }

    /// Add every granule dirty in `other` (a map of the same shape).
    pub(crate) fn union(&mut self, other: &DirtyMap) {
        debug_assert_eq!(
            (self.granularity, self.granules),
            (other.granularity, other.granules)
        );
        for (first, end) in other.runs() {
            self.set_granules(first, end);
        }
    }

    /// The runs `(first, end)` of dirty granules.
    pub(crate) fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut push = |a: u64, b: u64| match runs.last_mut() {
            Some(run) if run.1 == a => run.1 = b,
            _ => runs.push((a, b)),
        };
        let chunks = self.granules.div_ceil(CHUNK_GRANULES);
        let mut c = 0;
        while c < chunks {
            let base = c * CHUNK_GRANULES;
            match self.chunks.get(&c) {
                None if self.absent_full => {
                    // Every absent chunk up to the next held one is dirty.
                    let next = self.chunks.range(c..).next().map_or(chunks, |(k, _)| *k);
                    push(base, (next * CHUNK_GRANULES).min(self.granules));
                    c = next;
                    continue;
                }
                None => {
                    c = self.chunks.range(c..).next().map_or(chunks, |(k, _)| *k);
                    continue;
                }
                Some(Chunk::Clean) => {}
                Some(Chunk::Full) => push(base, base + self.chunk_len(c)),
                Some(Chunk::Bits(words, _)) => {
                    for (i, &word) in words.iter().enumerate() {
                        let mut bits = word;
                        while bits != 0 {
                            let g = base + i as u64 * 64 + u64::from(bits.trailing_zeros());
                            bits &= bits - 1;
                            push(g, g + 1);
                        }
                    }
                }
            }
            c += 1;
        }
        runs
    }

    /// Clear granules `[first, end)` and return the runs `(first, end)` of those that were dirty.
    pub(crate) fn take_granules(&mut self, first: u64, end: u64) -> Vec<(u64, u64)> {
        self.change(first, end, false)
    }
}

/// Dirty granules in a chunk of `len` granules.
fn chunk_count(chunk: &Chunk, len: u64) -> u64 {
    match chunk {
        Chunk::Clean => 0,
        Chunk::Full => len,
        Chunk::Bits(_, n) => *n,
    }
}

/// Set or clear bits `[lo, hi)` of a chunk of `len` granules, calling `changed(a, b)` for each
/// run of bits that changed, in order; the chunk is normalised (all clean or all dirty bits
/// become `Clean` or `Full`).
fn chunk_change(
    chunk: &mut Chunk,
    len: u64,
    lo: u64,
    hi: u64,
    dirty: bool,
    mut changed: impl FnMut(u64, u64),
) {
    match (&*chunk, dirty) {
        (Chunk::Full, true) | (Chunk::Clean, false) => return,
        (Chunk::Clean, true) if lo == 0 && hi == len => {
            changed(0, len);
            *chunk = Chunk::Full;
            return;
        }
        (Chunk::Full, false) if lo == 0 && hi == len => {
            changed(0, len);
            *chunk = Chunk::Clean;
            return;
        }
        (Chunk::Clean, true) => *chunk = Chunk::Bits(Box::new([0; WORDS]), 0),
        (Chunk::Full, false) => {
            let mut words = Box::new([u64::MAX; WORDS]);
            // Bits beyond a short last chunk are never set.
            for g in len..CHUNK_GRANULES {
                words[(g / 64) as usize] &= !(1 << (g % 64));
            }
            *chunk = Chunk::Bits(words, len);
        }
        _ => {}
    }
    let Chunk::Bits(words, n) = chunk else {
        unreachable!("made bits above")
    };
    let mut run: Option<(u64, u64)> = None;
    for g in lo..hi {
        let (w, b) = ((g / 64) as usize, g % 64);
        if (words[w] & (1 << b) != 0) != dirty {
            words[w] ^= 1 << b;
            if dirty {
                *n += 1;
            } else {
                *n -= 1;
            }
            run = match run {
                Some((a, e)) if e == g => Some((a, g + 1)),
                Some((a, e)) => {
                    changed(a, e);
                    Some((g, g + 1))
                }
                None => Some((g, g + 1)),
            };
        }
    }
    if let Some((a, e)) = run {
        changed(a, e);
    }
    if *n == 0 {
        *chunk = Chunk::Clean;
    } else if *n == len {
        *chunk = Chunk::Full;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_and_take() {
        let mut m = DirtyMap::new(10 * 1024 + 1, 1024);
        assert_eq!(m.granules(), 11);
        m.mark(1023, 2); // granules 0 and 1
        m.mark(10 * 1024, 1); // the partial last granule
        m.mark(5000, 0); // nothing
        assert_eq!(m.dirty_granules(), 3);
        assert_eq!(m.take_granules(0, 4), vec![(0, 2)]);
        assert_eq!(m.dirty_granules(), 1);
        m.mark(3 * 1024, 2048);
        assert_eq!(m.take_granules(0, 100), vec![(3, 5), (10, 11)]);
        assert!(m.is_clean());
        let f = DirtyMap::full(130 * 1024, 1024);
        assert_eq!(f.dirty_granules(), 130);
        assert_eq!(f.runs(), vec![(0, 130)]);
    }

    #[test]
    fn runs_and_union() {
        let mut a = DirtyMap::new(200, 1);
        assert!(a.mark(3, 2));
        assert!(!a.mark(4, 1));
        assert!(a.mark(63, 3));
        let mut b = DirtyMap::new(200, 1);
        b.mark(199, 1);
        b.mark(5, 1);
        a.union(&b);
        assert_eq!(a.runs(), vec![(3, 6), (63, 66), (199, 200)]);
        assert_eq!(a.dirty_granules(), 7);
    }

    #[test]
    fn a_huge_device_costs_what_was_marked() {
        // 2^63 bytes at 1 MiB granules: 2^43 granules, which a bitmap could not hold.
        let size = 1u64 << 63;
        let mut f = DirtyMap::full(size, 1 << 20);
        assert_eq!(f.dirty_granules(), 1 << 43);
        assert!(f.chunks.is_empty());
        assert_eq!(f.take_granules(0, 3), vec![(0, 3)]);
        assert_eq!(f.runs().first(), Some(&(3, 1 << 43)));
        let mut c = DirtyMap::new(size, 1 << 20);
        c.mark(size - 4096, 4096);
        c.mark(0, 1);
        assert_eq!(c.runs(), vec![(0, 1), ((1 << 43) - 1, 1 << 43)]);
        assert_eq!(c.chunks.len(), 2);
    }

    /// The map agrees with a plain set of granules under any sequence of changes.
    #[test]
    fn agrees_with_a_model() {
        use proptest::prelude::*;
        let ops = proptest::collection::vec((any::<bool>(), 0u64..150_000, 0u64..70_000), 1..40);
        let config = ProptestConfig::with_cases(48);
        proptest!(config, |(full in any::<bool>(), ops in ops)| {
            // Three chunks, the last one short.
            let granules = 2 * CHUNK_GRANULES + 1_001;
            let mut m = if full { DirtyMap::full(granules, 1) } else { DirtyMap::new(granules, 1) };
            let mut model = vec![full; granules as usize];
            for (dirty, first, len) in ops {
                let end = (first + len).min(granules);
                let first = first.min(granules);
                let changed = if dirty {
                    m.change(first, end, true)
                } else {
                    m.take_granules(first, end)
                };
                let mut want: Vec<(u64, u64)> = Vec::new();
                for g in first..end {
                    if model[g as usize] != dirty {
                        model[g as usize] = dirty;
                        match want.last_mut() {
                            Some(r) if r.1 == g => r.1 = g + 1,
                            _ => want.push((g, g + 1)),
                        }
                    }
                }
                prop_assert_eq!(changed, want);
                prop_assert_eq!(m.dirty_granules(), model.iter().filter(|d| **d).count() as u64);
            }
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for (g, d) in model.iter().enumerate() {
                let g = g as u64;
                if *d {
                    match runs.last_mut() {
                        Some(r) if r.1 == g => r.1 = g + 1,
                        _ => runs.push((g, g + 1)),
                    }
                }
            }
            prop_assert_eq!(m.runs(), runs);
        });
    }
}
