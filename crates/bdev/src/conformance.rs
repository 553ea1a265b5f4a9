//! The conformance suite every block device and wrapper runs in its tests (feature
//! `conformance`): aligned and unaligned I/O against a reference model, the end of the device,
//! zeroing, trim, flush and FUA, block status, and concurrent I/O.
//!
//! ```text
//! #[tokio::test(flavor = "multi_thread")]
//! async fn conformance() {
//!     run(Expect::default(), |size| async move { open_my_device(size).await }).await;
//! }
//! ```

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::device::{BlockDevice, WriteOpts, ZeroOpts};
use crate::error::ErrorKind;

/// The size of the devices the suite asks for.
pub const SIZE: u64 = 8 << 20;

/// Device-specific expectations.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// A trimmed range reads back as zeroes.
    pub trim_reads_zero: bool,
}

impl Default for Expect {
    fn default() -> Expect {
        Expect {
            trim_reads_zero: true,
        }
    }
}

/// Run every check, each on a fresh device of [`SIZE`] bytes from `make`. Panics, naming the
/// check, on the first failure.
pub async fn run<F, Fut>(expect: Expect, make: F)
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Arc<dyn BlockDevice>>,
{
    geometry(make(SIZE).await).await;
    fresh_reads_zero(make(SIZE).await).await;
    aligned_round_trip(make(SIZE).await).await;
    unaligned_against_model(make(SIZE).await).await;
    end_of_device(make(SIZE).await).await;
    zeroes(make(SIZE).await).await;
    trim(make(SIZE).await, expect).await;
    flush_and_fua(make(SIZE).await).await;
    block_status(make(SIZE).await).await;
    concurrency(make(SIZE).await).await;
}

/// `len` pseudo-random bytes, the same for the same `seed`: data a test writes and checks.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    Bytes::from(v)
}

fn bs(dev: &Arc<dyn BlockDevice>) -> u64 {
    u64::from(dev.geometry().block_size.max(1))
}

async fn geometry(dev: Arc<dyn BlockDevice>) {
    let g = dev.geometry();
    assert_eq!(g.size, SIZE, "geometry: {dev:?} has the size asked for");
    assert!(
        g.block_size.is_power_of_two(),
        "geometry: block size {} is a power of two",
        g.block_size
    );
    assert!(
        g.optimal_io_size >= g.block_size && g.optimal_io_size.is_multiple_of(g.block_size),
        "geometry: optimal I/O size {} is a multiple of the block size {}",
        g.optimal_io_size,
        g.block_size
    );
}

async fn fresh_reads_zero(dev: Arc<dyn BlockDevice>) {
    let data = dev
        .read_at(0, SIZE as usize)
        .await
        .expect("read a fresh device");
    assert!(
        data.iter().all(|&b| b == 0),
        "fresh: an unwritten device reads as zeroes"
    );
}

async fn aligned_round_trip(dev: Arc<dyn BlockDevice>) {
    let bs = bs(&dev);
    for (i, (off, len)) in [
        (0, bs),
        (bs * 3, bs * 8),
        (1 << 20, 1 << 20),
        (SIZE - bs, bs),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(i as u64, len as usize);
        dev.write_at(off, data.clone(), WriteOpts::default())
            .await
            .expect("aligned write");
        let back = dev.read_at(off, len as usize).await.expect("aligned read");
        assert_eq!(
            back, data,
            "aligned: {len} bytes at {off} read back as written"
        );
    }
}

async fn unaligned_against_model(dev: Arc<dyn BlockDevice>) {
    if bs(&dev) > 1 {
        let e = dev
            .write_at(1, Bytes::from_static(b"x"), WriteOpts::default())
            .await;
        assert_eq!(
            e.expect_err("unaligned write to a block device must fail")
                .kind(),
            ErrorKind::InvalidInput,
            "unaligned: refused with EINVAL"
        );
        return;
    }
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = SmallRng::seed_from_u64(7);
    for i in 0..200 {
        let len = rng.random_range(1..70_000usize);
        let off = rng.random_range(0..SIZE - len as u64);
        let data = pattern(1000 + i, len);
        model[off as usize..off as usize + len].copy_from_slice(&data);
        dev.write_at(off, data, WriteOpts::default())
            .await
            .expect("unaligned write");
        let roff = rng.random_range(0..SIZE - 70_000);
        let rlen = rng.random_range(1..70_000usize);
        let back = dev.read_at(roff, rlen).await.expect("unaligned read");
        assert!(
            back[..] == model[roff as usize..roff as usize + rlen],
            "unaligned: {rlen} bytes at {roff} match the model after {i} writes"
        );
    }
    let all = dev.read_at(0, SIZE as usize).await.expect("read all");
    assert!(
        all[..] == model[..],
        "unaligned: the whole device matches the model"
    );
}

fn kind<T: std::fmt::Debug>(r: crate::Result<T>) -> ErrorKind {
    r.expect_err("I/O past the end must fail").kind()
}

async fn end_of_device(dev: Arc<dyn BlockDevice>) {
    let bs = bs(&dev);
    let last = pattern(3, bs as usize);
    dev.write_at(SIZE - bs, last.clone(), WriteOpts::default())
        .await
        .expect("write the last block");
    assert_eq!(
        dev.read_at(SIZE - bs, bs as usize)
            .await
            .expect("read the last block"),
        last
    );
    assert_eq!(
        kind(
            dev.write_at(SIZE, pattern(4, bs as usize), WriteOpts::default())
                .await
        ),
        ErrorKind::OutOfRange,
        "end: a write past the end"
    );
    assert_eq!(
        kind(
            dev.write_at(SIZE - bs, pattern(4, 2 * bs as usize), WriteOpts::default())
                .await
        ),
        ErrorKind::OutOfRange,
        "end: a write straddling the end"
    );
    assert_eq!(
        kind(dev.read_at(SIZE - bs, 2 * bs as usize).await),
        ErrorKind::OutOfRange,
        "end: a read straddling the end"
    );
    assert_eq!(
        kind(dev.read_at(u64::MAX - bs + 1, bs as usize).await),
        ErrorKind::OutOfRange,
        "end: a read at 2^64"
    );
    assert_eq!(
        kind(dev.trim(SIZE, bs, WriteOpts::default()).await),
        ErrorKind::OutOfRange,
        "end: trim past the end"
    );
    assert_eq!(
        kind(
            dev.write_zeroes(SIZE - bs, 2 * bs, ZeroOpts::default())
                .await
        ),
        ErrorKind::OutOfRange,
        "end: zeroes past the end"
    );
    assert_eq!(
        dev.read_at(SIZE - bs, bs as usize)
            .await
            .expect("read the last block"),
        last,
        "end: failed writes changed nothing"
    );
    assert!(dev
        .read_at(SIZE, 0)
        .await
        .expect("an empty read at the end")
        .is_empty());
}

async fn zeroes(dev: Arc<dyn BlockDevice>) {
    let caps = dev.capabilities();
    for (round, may_trim) in [false, true].into_iter().enumerate() {
        let base = round as u64 * (2 << 20);
        let data = pattern(10 + round as u64, 1 << 20);
        dev.write_at(base, data.clone(), WriteOpts::default())
            .await
            .expect("write before zeroing");
        dev.write_zeroes(
            base + 65536,
            131072,
            ZeroOpts {
                may_trim,
                ..ZeroOpts::default()
            },
        )
        .await
        .expect("write zeroes");
        let back = dev
            .read_at(base, 1 << 20)
            .await
            .expect("read after zeroing");
        assert!(
            back[65536..196608].iter().all(|&b| b == 0),
            "zeroes: the range reads as zeroes (may_trim={may_trim})"
        );
        assert_eq!(
            back[..65536],
            data[..65536],
            "zeroes: bytes before the range are intact"
        );
        assert_eq!(
            back[196608..],
            data[196608..],
            "zeroes: bytes after the range are intact"
        );
    }
    let data = pattern(12, 65536);
    dev.write_at(4 << 20, data.clone(), WriteOpts::default())
        .await
        .expect("write");
    let fast = dev
        .write_zeroes(
            4 << 20,
            65536,
            ZeroOpts {
                fast_only: true,
                ..ZeroOpts::default()
            },
        )
        .await;
    let back = dev.read_at(4 << 20, 65536).await.expect("read");
    match fast {
        Ok(()) => assert!(
            back.iter().all(|&b| b == 0),
            "zeroes: a fast zero that succeeded zeroed"
        ),
        Err(e) => {
            assert!(
                !caps.fast_zero,
                "zeroes: a device that claims fast zero did it ({e})"
            );
            assert_eq!(
                e.kind(),
                ErrorKind::Unsupported,
                "zeroes: a refused fast zero says ENOTSUP"
            );
            assert_eq!(back, data, "zeroes: a refused fast zero changed nothing");
        }
    }
}

async fn trim(dev: Arc<dyn BlockDevice>, expect: Expect) {
    let bs = bs(&dev);
    let data = pattern(20, 1 << 20);
    dev.write_at(0, data.clone(), WriteOpts::default())
        .await
        .expect("write before trim");
    let r = dev.trim(65536, 262144, WriteOpts::default()).await;
    if !dev.capabilities().trim {
        assert_eq!(
            r.expect_err("trim without the capability").kind(),
            ErrorKind::Unsupported
        );
        return;
    }
    r.expect("trim");
    let back = dev.read_at(0, 1 << 20).await.expect("read after trim");
    assert_eq!(
        back[..65536],
        data[..65536],
        "trim: bytes before the range are intact"
    );
    assert_eq!(
        back[327680..],
        data[327680..],
        "trim: bytes after the range are intact"
    );
    if expect.trim_reads_zero {
        assert!(
            back[65536..327680].iter().all(|&b| b == 0),
            "trim: the trimmed range reads as zeroes"
        );
    }
    dev.trim(0, bs, WriteOpts { fua: true })
        .await
        .expect("trim with FUA");
}

async fn flush_and_fua(dev: Arc<dyn BlockDevice>) {
    dev.write_at(0, pattern(30, 4096), WriteOpts::default())
        .await
        .expect("write");
    dev.flush().await.expect("flush");
    let data = pattern(31, 8192);
    dev.write_at(8192, data.clone(), WriteOpts { fua: true })
        .await
        .expect("FUA write");
    assert_eq!(dev.read_at(8192, 8192).await.expect("read"), data);
    dev.flush().await.expect("a second flush");
}

async fn block_status(dev: Arc<dyn BlockDevice>) {
    let caps = dev.capabilities();
    dev.write_at(0, pattern(40, 1 << 20), WriteOpts::default())
        .await
        .expect("write");
    for (off, len) in [
        (0, SIZE),
        (4096, 1 << 20),
        (SIZE - 4096, 4096),
        (12345 / bs(&dev) * bs(&dev), 3 * bs(&dev)),
    ] {
        let ext = dev.block_status(off, len).await.expect("block status");
        assert!(!ext.is_empty(), "block status: at least one extent");
        let total: u64 = ext.iter().map(|e| e.len).sum();
        assert!(
            total > 0 && total <= len,
            "block status: extents cover a non-empty prefix ({total} of {len})"
        );
        assert!(
            ext.iter().all(|e| e.len > 0),
            "block status: no empty extents"
        );
    }
    let ext = dev.block_status(0, 1 << 20).await.expect("block status");
    assert!(
        ext.iter().all(|e| !e.hole && !e.zero),
        "block status: written data is data: {ext:?}"
    );
    if caps.block_status {
        let ext = dev
            .block_status(4 << 20, 1 << 20)
            .await
            .expect("block status");
        assert!(
            ext[0].hole && ext[0].zero,
            "block status: an unwritten range is a hole: {ext:?}"
        );
    }
    assert_eq!(
        dev.block_status(SIZE, 4096)
            .await
            .expect_err("status past the end")
            .kind(),
        ErrorKind::OutOfRange
    );
}

async fn concurrency(dev: Arc<dyn BlockDevice>) {
    const N: u64 = 64;
    const LEN: u64 = 65536;
    let mut tasks = Vec::new();
    for i in 0..N {
        let dev = dev.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(100 + i, LEN as usize);
            dev.write_at(i * LEN, data.clone(), WriteOpts { fua: i % 8 == 0 })
                .await
                .expect("concurrent write");
            if i % 4 == 0 {
                dev.flush().await.expect("concurrent flush");
            }
            let back = dev
                .read_at(i * LEN, LEN as usize)
                .await
                .expect("concurrent read");
            assert_eq!(
                back, data,
                "concurrency: region {i} reads back its own write"
            );
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let all = dev.read_at(0, (N * LEN) as usize).await.expect("read all");
    for i in 0..N {
        let r = (i * LEN) as usize..((i + 1) * LEN) as usize;
        assert_eq!(
            all[r],
            pattern(100 + i, LEN as usize)[..],
            "concurrency: region {i} after all writes"
        );
    }
}
