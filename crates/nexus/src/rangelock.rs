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

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use std::sync::Arc;

const STRIPES: u64 = 1024;

#[derive(Debug)]
pub(crate) struct RangeLock {
    segment: u64,
    stripes: Box<[Arc<RwLock<()>>]>,
}

/// Held by a front-end write for its duration.
#[derive(Debug)]
pub(crate) struct SharedGuard {
    _guards: Vec<OwnedRwLockReadGuard<()>>,
}

/// Held by a rebuild while it copies one segment.
#[derive(Debug)]
pub(crate) struct SegmentGuard {
    _guard: OwnedRwLockWriteGuard<()>,
}

impl RangeLock {
    pub(crate) fn new(segment: u64) -> RangeLock {
        RangeLock {
            segment,
            stripes: (0..STRIPES).map(|_| Arc::new(RwLock::new(()))).collect(),
        }
    }

    /// Lock `[offset, offset + len)` shared.
    pub(crate) async fn shared(&self, offset: u64, len: u64) -> SharedGuard {
        let first = offset / self.segment;
        let last = (offset + len.max(1) - 1) / self.segment;
        let mut stripes: Vec<u64> = if last - first + 1 >= STRIPES {
            (0..STRIPES).collect()
        } else {
            let mut v: Vec<u64> = (first..=last).map(|s| s % STRIPES).collect();
            v.sort_unstable();
            v
        };
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.stripes[s as usize].clone().read_owned().await);
        }
        SharedGuard { _guards: guards }
    }

    /// Lock segment number `segment` exclusively.
    pub(crate) async fn segment(&self, segment: u64) -> SegmentGuard {
        let stripe = self.stripes[(segment % STRIPES) as usize].clone();
        SegmentGuard {
            _guard: stripe.write_owned().await,
        }
    }
}

#[cfg(test)]
mod tests {
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
