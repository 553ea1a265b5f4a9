//! Page-store images on a local-directory object store: the block-device contract, checkpoints
//! and reopening, compaction, corruption, fencing, and a failing object store.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use strata_bdev::conformance::{self, Expect};
use strata_bdev::{BlockDevice, Bytes, WriteOpts, ZeroOpts};
use strata_pagestore::{FaultyObjects, Objects, PageStore, Settings, Store, StoreConfig};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), "buffer", small());
    let n = AtomicUsize::new(0);
    conformance::run(Expect::default(), |size| {
        let name = format!("conf{}", n.fetch_add(1, Ordering::Relaxed));
        let ps = ps.clone();
        async move { Arc::new(ps.open(&name, Some((size, 12))).await.unwrap()) as Arc<dyn BlockDevice> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpointed_and_buffered_writes_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), "buffer", small());
    let img = ps.open("disk", Some((64 << 20, 12))).await.unwrap();
    for p in 0..200 {
        write(&img, p, p as u8).await;
    }
    img.flush().await.unwrap();
    img.checkpoint().await.unwrap();
    assert!(img.version() >= 2 && img.segment_count() >= 1);
    // Overwrites and zeroes after the checkpoint stay in the write buffer.
    write(&img, 5, 0xee).await;
    img.write_zeroes(6 * PS as u64, PS as u64, ZeroOpts::default())
        .await
        .unwrap();
    img.flush().await.unwrap();
    write(&img, 7, 0x77).await; // not flushed: may or may not survive
    img.close().await;

    let img = ps.open("disk", None).await.unwrap();
    assert_eq!(read(&img, 5).await, page(0xee));
    assert_eq!(read(&img, 6).await, Bytes::from(vec![0u8; PS]));
    assert_eq!(read(&img, 100).await, page(100));
    let p7 = read(&img, 7).await;
    assert!(
        p7 == page(7) || p7 == page(0x77),
        "page 7 holds a version that was written"
    );
    assert_eq!(
        read(&img, 300).await,
        Bytes::from(vec![0u8; PS]),
        "never written"
    );
    // Block status: written pages are data, the rest holes.
    let ext = img.block_status(0, 1 << 20).await.unwrap();
    assert!(!ext[0].hole && ext[0].len >= 6 * PS as u64, "{ext:?}");
    // A different page size for an existing image is refused; a different size is not (the
    // image may have been resized): it keeps its own.
    img.close().await;
    let e = ps.open("disk", Some((64 << 20, 13))).await.unwrap_err();
    assert!(e.to_string().contains("exists with pages of 4096"), "{e}");
    let img = ps.open("disk", Some((32 << 20, 12))).await.unwrap();
    assert_eq!(img.geometry().size, 64 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_bounds_segments_and_keeps_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        segment_bytes: 1 << 20,
        ..small()
    };
    let ps = store(dir.path(), "buffer", settings);
    let img = ps.open("c", Some((16 << 20, 12))).await.unwrap();
    let mut model = vec![None; 512];
    let gets_before = gets(&img);
    for round in 0..12u8 {
        for k in 0..40u64 {
            let p = (k * 13 + u64::from(round) * 7) % 512;
            write(&img, p, round.wrapping_mul(31).wrapping_add(k as u8)).await;
            model[p as usize] = Some(round.wrapping_mul(31).wrapping_add(k as u8));
        }
        if round % 3 == 0 {
            let p = u64::from(round) * 5;
            img.trim(p * PS as u64, PS as u64, WriteOpts::default())
                .await
                .unwrap();
            model[p as usize] = None;
        }
        img.checkpoint().await.unwrap();
    }
    assert!(img.stats().compactions.load(Ordering::Relaxed) >= 1);
    // Compaction fetches slot ranges, not one page per GET.
    let compaction_gets = gets(&img) - gets_before;
    assert!(compaction_gets < 100, "{compaction_gets} GETs");
    assert!(
        img.segment_count() <= small().max_segments,
        "{}",
        img.segment_count()
    );
    img.close().await;
    let img = ps.open("c", None).await.unwrap();
    for (p, m) in model.iter().enumerate() {
        let want = m.map_or_else(|| Bytes::from(vec![0u8; PS]), page);
        assert_eq!(read(&img, p as u64).await, want, "page {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fetch_whole_cache_blocks_and_the_disk_tier_serves_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        checkpoint_bytes: 64 << 20,
        segment_bytes: 1 << 20,
        cache_bytes: 64 << 10,
        cache_block_bytes: 64 << 10,
        disk_cache_bytes: 4 << 20,
        ..small()
    };
    // A remote store: the directory behind a wrapper that hides its files.
    let ps = PageStore {
        objects: Arc::new(FaultyObjects::new(dir_objects(dir.path()))),
        buffer_dir: dir.path().join("buffer"),
        settings,
    };
    let img = ps.open("cached", Some((8 << 20, 12))).await.unwrap();
    for p in 0..256 {
        write(&img, p, p as u8).await;
    }
    img.checkpoint().await.unwrap();
    assert_eq!(img.segment_count(), 1);
    img.close().await;
    let img = ps.open("cached", None).await.unwrap();
    let read_all = || async {
        for p in 0..256 {
            assert_eq!(read(&img, p).await, page(p as u8), "page {p}");
        }
    };
    // Cold: one GET per 64 KiB block, whatever the read size, and concurrent readers of a
    // block share its GET.
    let g0 = gets(&img);
    let together = (0..16).map(|p| read(&img, p));
    for (p, got) in futures_util::future::join_all(together)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(got, page(p as u8));
    }
    assert_eq!(gets(&img) - g0, 1, "one GET for one block");
    // Reading on is a sequential stream: each GET takes four blocks beyond the one missed.
    read_all().await;
    assert_eq!(gets(&img) - g0, 4);
    // Memory holds one block; the disk tier holds them all.
    let g1 = gets(&img);
    read_all().await;
    assert_eq!(gets(&img), g1, "served from the caches");
    // The first page of each block comes from disk, the rest from memory.
    assert!(img.stats().disk_cache_hits.load(Ordering::Relaxed) >= 15);
    // A damaged cache file is caught by the page checksums and read again from the store.
    let path = dir.path().join("buffer/cached/read.cache");
    let mut b = std::fs::read(&path).unwrap();
    assert_eq!(b.len(), 1 << 20);
    for i in (100..b.len()).step_by(PS) {
        b[i] ^= 0x5a;
    }
    std::fs::write(&path, &b).unwrap();
    read_all().await;
    assert!(gets(&img) > g1, "refetched from the store");
    // And kept again, good this time.
    let g2 = gets(&img);
    read_all().await;
    assert_eq!(gets(&img), g2);
}

/// A directory store's segments are read from their files: no GET, the kernel's page cache
/// as the cache, and every page still checked against its checksum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_store_is_read_from_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), "buffer", small());
    let img = ps.open("files", Some((8 << 20, 12))).await.unwrap();
    for p in 0..256 {
        write(&img, p, p as u8).await;
    }
    img.checkpoint().await.unwrap();
    img.close().await;
    let img = ps.open("files", None).await.unwrap();
    let g0 = gets(&img);
    for p in 0..256 {
        assert_eq!(read(&img, p).await, page(p as u8), "page {p}");
    }
    let all = img.read_at(0, 256 * PS).await.unwrap();
    assert!(all.chunks(PS).enumerate().all(|(p, d)| d == page(p as u8)));
    assert_eq!(gets(&img), g0, "no GET for a directory store");
    assert_eq!(img.stats().local_pages.load(Ordering::Relaxed), 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_during_a_compaction_keeps_its_newer_pages() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir_objects(dir.path());
    let with = |objects: Arc<dyn Objects>, max_segments| PageStore {
        objects,
        buffer_dir: dir.path().join("buffer"),
        settings: Settings {
            max_segments,
            segment_bytes: 1 << 20,
            ..small()
        },
    };
    // Eight checkpoints of 64 pages each; the oldest holds pages 0..64.
    let img = with(inner.clone(), 100)
        .open("race", Some((4 << 20, 12)))
        .await
        .unwrap();
    for round in 0..8u8 {
        for p in 0..64 {
            write(&img, u64::from(round) * 64 + p, round).await;
        }
        img.checkpoint().await.unwrap();
    }
    img.close().await;
    // Reopened with room for four, and every request slow: the background compaction that
    // opening starts takes a while.
    let faulty = Arc::new(FaultyObjects::new(inner.clone()));
    faulty.delay_us.store(100_000, Ordering::Relaxed);
    let img = with(faulty.clone(), 4).open("race", None).await.unwrap();
    assert!(img.segment_count() > 4, "{}", img.segment_count());
    let g0 = inner.stats().counts()[0];
    let started = async {
        while inner.stats().counts()[0] == g0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), started)
        .await
        .expect("a compaction starts");
    assert_eq!(img.stats().compactions.load(Ordering::Relaxed), 0);
    // While it reads the old versions, a checkpoint publishes newer ones (and then waits for
    // the compaction to end).
    for p in 0..64 {
        write(&img, p, 200).await;
    }
    img.checkpoint().await.unwrap();
    assert!(img.stats().compactions.load(Ordering::Relaxed) >= 1);
    for p in 0..512 {
        let want = if p < 64 { 200 } else { (p / 64) as u8 };
        assert_eq!(read(&img, p).await, page(want), "page {p}");
    }
    faulty.delay_us.store(0, Ordering::Relaxed);
    img.close().await;
    let img = with(inner, 4).open("race", None).await.unwrap();
    for p in 0..512 {
        let want = if p < 64 { 200 } else { (p / 64) as u8 };
        assert_eq!(read(&img, p).await, page(want), "page {p} after a reopen");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_segment_page_is_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), "buffer", small());
    let img = ps.open("bad", Some((1 << 20, 12))).await.unwrap();
    write(&img, 3, 3).await;
    img.checkpoint().await.unwrap();
    img.close().await;
    // Flip one byte of the page data in the segment.
    let segs = dir.path().join("objects/images/bad/segments");
    let seg = std::fs::read_dir(&segs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut b = std::fs::read(&seg).unwrap();
    b[100] ^= 0x01;
    std::fs::write(&seg, &b).unwrap();
    let img = ps.open("bad", None).await.unwrap();
    let e = img.read_at(3 * PS as u64, PS).await.unwrap_err();
    assert!(e.to_string().contains("fails its checksum"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_fenced_and_the_image_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let a = store(dir.path(), "buffer-a", small());
    let b = store(dir.path(), "buffer-b", small());
    let ia = a.open("f", Some((1 << 20, 12))).await.unwrap();
    let ib = b.open("f", None).await.unwrap();
    write(&ia, 1, 0xa1).await;
    write(&ib, 2, 0xb2).await;
    ia.checkpoint().await.unwrap();
    // b's checkpoint finds the version it wanted taken: it stops writing, saying why.
    let e = ib.checkpoint().await.unwrap_err();
    assert!(e.to_string().contains("another writer"), "{e}");
    let e = ib
        .write_at(0, page(1), WriteOpts::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stopped writing"), "{e}");
    assert!(ib.flush().await.is_err());
    // a goes on.
    write(&ia, 3, 0xa3).await;
    ia.checkpoint().await.unwrap();
    ia.close().await;
    ib.close().await;
    let c = store(dir.path(), "buffer-c", small());
    let ic = c.open("f", None).await.unwrap();
    assert_eq!(read(&ic, 1).await, page(0xa1));
    assert_eq!(read(&ic, 3).await, page(0xa3));
    assert_eq!(
        read(&ic, 2).await,
        Bytes::from(vec![0u8; PS]),
        "the fenced write is not published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_object_store_slows_checkpoints_but_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir_objects(dir.path());
    let faulty = Arc::new(FaultyObjects::new(inner.clone()));
    let ps = PageStore {
        objects: faulty.clone(),
        buffer_dir: dir.path().join("buffer"),
        settings: small(),
    };
    let img = ps.open("flaky", Some((4 << 20, 12))).await.unwrap();
    faulty.fail_per_mille.store(300, Ordering::Relaxed);
    for p in 0..600 {
        write(&img, p % 1024, p as u8).await;
    }
    img.flush().await.unwrap();
    img.checkpoint().await.unwrap();
    faulty.fail_per_mille.store(0, Ordering::Relaxed);
    let [_, _, _, _, errors, retries] = inner.stats().counts();
    assert!(
        errors > 0 && retries > 0,
        "errors {errors}, retries {retries}"
    );
    img.close().await;
    let ps = PageStore {
        objects: inner,
        buffer_dir: dir.path().join("buffer-elsewhere"),
        settings: small(),
    };
    // Everything is in the object store: a server with an empty buffer reads it all.
    let img = ps.open("flaky", None).await.unwrap();
    for p in 0..600u64 {
        assert_eq!(read(&img, p).await, page(p as u8), "page {p}");
    }
}

/// A write buffer on a full disk: the write fails with ENOSPC, nothing half-written stays, and
/// once space is back writing goes on and everything flushed replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_disk_is_enospc_and_never_a_corrupt_wal() {
    let dir = tempfile::tempdir().unwrap();
    let small_fs = dir.path().join("small");
    std::fs::create_dir_all(&small_fs).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2M", "tmpfs"])
        .arg(&small_fs)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mount a 2 MiB tmpfs (the tests run as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small_fs.clone());
    let settings = Settings {
        checkpoint_bytes: 1 << 30,
        ..small()
    };
    let objects: Arc<dyn Objects> = Arc::new(
        Store::open(&StoreConfig::Dir {
            path: dir.path().join("objects"),
        })
        .unwrap(),
    );
    let ps = PageStore {
        objects,
        buffer_dir: small_fs.clone(),
        settings,
    };
    let img = ps.open("full", Some((16 << 20, 12))).await.unwrap();
    let mut written = 0u64;
    let err = loop {
        match img
            .write_at(
                written * PS as u64,
                page(written as u8),
                WriteOpts::default(),
            )
            .await
        {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 4096, "a 2 MiB disk cannot hold 16 MiB");
    };
    assert_eq!(err.kind(), strata_bdev::ErrorKind::NoSpace, "{err}");
    assert!(written > 100, "{written} pages fit");
    img.flush().await.unwrap();
    // Room again: a checkpoint moves the buffer to the object store.
    img.checkpoint().await.unwrap();
    write(&img, written, 0x5a).await;
    img.flush().await.unwrap();
    img.close().await;
    let img = ps.open("full", None).await.unwrap();
    for p in 0..written {
        assert_eq!(read(&img, p).await, page(p as u8), "page {p}");
    }
    assert_eq!(read(&img, written).await, page(0x5a));
}
