//! A wrapper that counts what passes through a device: requests and bytes per operation,
//! failures, requests in flight, and latency histograms for reads, writes and flushes.
//!
//! ```text
//!   caller ──► StatsDevice ──► inner device
//!                  └── IoStats (atomics; read by the daemon's API and /metrics)
//! ```
//!
//! Every method is forwarded explicitly so that an override of the inner device is never lost.
//! Counting costs a few relaxed atomic additions per request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{BlockDevice, Capabilities, Extent, Geometry, WriteOpts, ZeroOpts};
use crate::error::Result;

/// Upper bounds of the latency histogram buckets, in microseconds (the last bucket, +Inf, is
/// implicit). From a RAM-speed 25 µs to a stalled 10 s replica.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// A latency histogram: a count per bucket of [`LATENCY_BUCKETS_US`] plus +Inf, and the sum.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, nanos: u64) {
        let us = nanos / 1000;
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// Observations per bucket (not cumulative), the last being +Inf.
    pub fn buckets(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Relaxed)).collect()
    }

    /// The sum of every observation, in nanoseconds.
    pub fn sum_nanos(&self) -> u64 {
        self.sum_nanos.load(Relaxed)
    }

    /// How many observations there were.
    pub fn count(&self) -> u64 {
        self.buckets().iter().sum()
    }
}

/// Counters for one operation.
#[derive(Debug, Default)]
pub struct OpStats {
    /// Requests that completed, successfully or not.
    pub requests: AtomicU64,
    /// Bytes of the requests that succeeded.
    pub bytes: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
}

/// What a [`StatsDevice`] has counted.
#[derive(Debug, Default)]
pub struct IoStats {
    pub reads: OpStats,
    pub writes: OpStats,
    pub flushes: OpStats,
    pub trims: OpStats,
    pub write_zeroes: OpStats,
    pub block_status: OpStats,
    pub read_latency: Histogram,
    pub write_latency: Histogram,
    pub flush_latency: Histogram,
    /// Requests started and not yet completed.
    pub in_flight: AtomicU64,
}

impl IoStats {
    /// Every failed request.
    pub fn errors(&self) -> u64 {
        [
            &self.reads,
            &self.writes,
            &self.flushes,
            &self.trims,
            &self.write_zeroes,
            &self.block_status,
        ]
        .iter()
        .map(|o| o.errors.load(Relaxed))
        .sum()
    }
}

/// Counts the requests to an inner device; see the module documentation.
#[derive(Debug)]
pub struct StatsDevice {
    inner: Arc<dyn BlockDevice>,
    stats: Arc<IoStats>,
}

impl StatsDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> StatsDevice {
        StatsDevice {
            inner,
            stats: Arc::new(IoStats::default()),
        }
    }

    /// The counters, shared.
    pub fn stats(&self) -> Arc<IoStats> {
        self.stats.clone()
    }

    /// The device it wraps.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    async fn count<T>(
        &self,
        op: &OpStats,
        hist: Option<&Histogram>,
        bytes: u64,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.stats.in_flight.fetch_add(1, Relaxed);
        let start = hist.map(|_| Instant::now());
        let r = fut.await;
        self.stats.in_flight.fetch_sub(1, Relaxed);
        op.requests.fetch_add(1, Relaxed);
        match &r {
            Ok(_) => {
                op.bytes.fetch_add(bytes, Relaxed);
                if let (Some(h), Some(t)) = (hist, start) {
                    h.observe(t.elapsed().as_nanos() as u64);
                }
            }
            Err(_) => {
                op.errors.fetch_add(1, Relaxed);
            }
        }
        r
    }
}

#[async_trait]
impl BlockDevice for StatsDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let s = &self.stats;
        self.count(
            &s.reads,
            Some(&s.read_latency),
            len as u64,
            self.inner.read_at(offset, len),
        )
        .await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        let s = &self.stats;
        let len = data.len() as u64;
        self.count(
            &s.writes,
            Some(&s.write_latency),
            len,
            self.inner.write_at(offset, data, opts),
        )
        .await
    }

    async fn flush(&self) -> Result<()> {
        let s = &self.stats;
        self.count(&s.flushes, Some(&s.flush_latency), 0, self.inner.flush())
            .await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        self.count(
            &self.stats.trims,
            None,
            len,
            self.inner.trim(offset, len, opts),
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.count(
            &self.stats.write_zeroes,
            None,
            len,
            self.inner.write_zeroes(offset, len, opts),
        )
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.count(
            &self.stats.block_status,
            None,
            0,
            self.inner.block_status(offset, len),
        )
        .await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.cache(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::MemDevice;

    #[tokio::test]
    async fn counts_requests_bytes_errors_and_latency() {
        let dev = StatsDevice::new(Arc::new(MemDevice::new("m", 1 << 20)));
        let s = dev.stats();
        dev.write_at(0, Bytes::from(vec![1u8; 4096]), WriteOpts::default())
            .await
            .unwrap();
        dev.read_at(0, 8192).await.unwrap();
        dev.flush().await.unwrap();
        assert!(dev.read_at(1 << 20, 512).await.is_err());
        assert_eq!(s.writes.requests.load(Relaxed), 1);
        assert_eq!(s.writes.bytes.load(Relaxed), 4096);
        assert_eq!(s.reads.requests.load(Relaxed), 2);
        assert_eq!(s.reads.bytes.load(Relaxed), 8192);
        assert_eq!(s.reads.errors.load(Relaxed), 1);
        assert_eq!(s.errors(), 1);
        assert_eq!(s.read_latency.count(), 1, "failed requests are not timed");
        assert_eq!(s.write_latency.count(), 1);
        assert_eq!(s.flushes.requests.load(Relaxed), 1);
        assert_eq!(s.in_flight.load(Relaxed), 0);
    }

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = Histogram::default();
        h.observe(10_000); // 10 µs
        h.observe(25_000); // exactly 25 µs: the first bucket (le=25)
        h.observe(26_000);
        h.observe(20_000_000_000); // 20 s: +Inf
        let b = h.buckets();
        assert_eq!(b[0], 2);
        assert_eq!(b[1], 1);
        assert_eq!(b[LATENCY_BUCKETS_US.len()], 1);
        assert_eq!(h.sum_nanos(), 10_000 + 25_000 + 26_000 + 20_000_000_000);
    }
}
