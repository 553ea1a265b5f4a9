//! The dirty-region bitmap: which granules of the device a child has missed while it was away.

/// One bit per `granularity` bytes of the device; a set bit means the child's copy of that
/// granule may be stale and must be copied before the child serves reads again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirtyMap {
    granularity: u64,
    granules: u64,
    words: Vec<u64>,
    set: u64,
}

impl DirtyMap {
    /// A clean map for a device of `size` bytes.
    pub(crate) fn new(size: u64, granularity: u64) -> DirtyMap {
        let granules = size.div_ceil(granularity);
        DirtyMap {
            granularity,
            granules,
            words: vec![0; granules.div_ceil(64) as usize],
            set: 0,
        }
    }

    /// A map with every granule dirty (a child whose history is unknown).
    pub(crate) fn full(size: u64, granularity: u64) -> DirtyMap {
        let mut m = DirtyMap::new(size, granularity);
        m.set_granules(0, m.granules);
        m
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

    /// Mark granules `[first, end)` dirty; returns whether any was clean before.
    pub(crate) fn set_granules(&mut self, first: u64, end: u64) -> bool {
        let before = self.set;
        for g in first..end.min(self.granules) {
            let (w, b) = ((g / 64) as usize, g % 64);
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                self.set += 1;
            }
        }
        self.set != before
    }

    /// Add every granule dirty in `other` (a map of the same shape).
    pub(crate) fn union(&mut self, other: &DirtyMap) {
        debug_assert_eq!(
            (self.granularity, self.granules),
            (other.granularity, other.granules)
        );
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        self.set = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// The runs `(first, end)` of dirty granules.
    pub(crate) fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let g = i as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match runs.last_mut() {
                    Some(run) if run.1 == g => run.1 = g + 1,
                    _ => runs.push((g, g + 1)),
                }
            }
        }
        runs
    }

    /// Clear granules `[first, end)` and return the runs `(first, end)` of those that were dirty.
    pub(crate) fn take_granules(&mut self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for g in first..end.min(self.granules) {
            let (w, b) = ((g / 64) as usize, g % 64);
            if self.words[w] & (1 << b) != 0 {
                self.words[w] &= !(1 << b);
                self.set -= 1;
                match runs.last_mut() {
                    Some(run) if run.1 == g => run.1 = g + 1,
                    _ => runs.push((g, g + 1)),
                }
            }
        }
        runs
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
}
