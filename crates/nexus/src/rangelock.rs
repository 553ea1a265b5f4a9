//! The range lock that keeps a rebuild copy and front-end writes to the same segment apart.
//!
//! The device is cut into segments (the rebuild's copy unit); each segment maps to one of a fixed
//! number of stripes, each a tokio `RwLock`. Front-end writes take the stripes of the segments they
//! touch *shared* (they do not exclude each other — their order is the client's business); a
//! rebuild copying a segment takes its stripe *exclusive*. So a write to a segment being copied
//! waits until the copy is done, and a copy waits for the writes already in flight there. Two
//! segments sharing a stripe only costs some needless waiting.
//!
//! Shared holders take their stripes in ascending order and an exclusive holder takes one stripe
//! and nothing else while holding it, so no cycle of waits can form.
//!
//! Guards borrow the lock, and a range within one segment (every I/O up to the segment size that
//! does not cross a segment boundary) takes its one stripe without allocating.

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const STRIPES: u64 = 1024;

#[derive(Debug)]
pub(crate) struct RangeLock {
    segment: u64,
    stripes: Box<[RwLock<()>]>,
}

/// Held by a front-end write for its duration: its lowest stripe, and any others.
#[derive(Debug)]
pub(crate) struct SharedGuard<'a> {
    _first: RwLockReadGuard<'a, ()>,
    _rest: Vec<RwLockReadGuard<'a, ()>>,
}

/// Held by a rebuild while it copies one segment.
#[derive(Debug)]
pub(crate) struct SegmentGuard<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
}

impl RangeLock {
    pub(crate) fn new(segment: u64) -> RangeLock {
        RangeLock {
            segment,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }

    fn stripe(&self, segment: u64) -> &RwLock<()> {
        &self.stripes[(segment % STRIPES) as usize]
    }

    /// Lock `[offset, offset + len)` shared.
    pub(crate) async fn shared(&self, offset: u64, len: u64) -> SharedGuard<'_> {
        let first = offset / self.segment;
        let last = (offset + len.max(1) - 1) / self.segment;
        if first == last {
            return SharedGuard {
                _first: self.stripe(first).read().await,
                _rest: Vec::new(),
            };
        }
        let mut stripes: Vec<u64> = if last - first + 1 >= STRIPES {
            (0..STRIPES).collect()
        } else {
            let mut v: Vec<u64> = (first..=last).map(|s| s % STRIPES).collect();
            v.sort_unstable();
            v
        };
        stripes.dedup();
        let first = self.stripes[stripes[0] as usize].read().await;
        let mut rest = Vec::with_capacity(stripes.len() - 1);
        for &s in &stripes[1..] {
            rest.push(self.stripes[s as usize].read().await);
        }
        SharedGuard {
            _first: first,
            _rest: rest,
        }
    }

    /// Lock segment number `segment` exclusively.
    pub(crate) async fn segment(&self, segment: u64) -> SegmentGuard<'_> {
        SegmentGuard {
            _guard: self.stripe(segment).write().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_copy_waits_for_writes_and_writes_wait_for_a_copy() {
        let l = Arc::new(RangeLock::new(4096));
        let w = l.shared(4000, 200).await; // segments 0 and 1
        let _other = l.shared(0, 10).await; // writes share
        let l2 = l.clone();
        let copy = tokio::spawn(async move {
            let _g = l2.segment(1).await;
        });
        tokio::task::yield_now().await;
        assert!(!copy.is_finished());
        drop(w);
        drop(_other);
        copy.await.expect("copy task");
        let g = l.segment(2).await;
        let l3 = l.clone();
        let write = tokio::spawn(async move {
            let _g = l3.shared(8192, 1).await;
        });
        tokio::task::yield_now().await;
        assert!(!write.is_finished());
        drop(g);
        write.await.expect("write task");
    }
}
