//! 512-byte logical blocks on images with larger pages: every 512-aligned read, write, trim,
//! zeroing and block-status query, checked against a model; and writes to different sectors of
//! the same pages, at once, all landing.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use strata_bdev::{BlockDevice, Bytes, WriteOpts, ZeroOpts};
use strata_pagestore::{FaultyObjects, Image, PageStore, Settings};

const SECTOR: u64 = 512;
/// 64 pages of 4 KiB.
const IMAGE: u64 = 256 << 10;
const SECTORS: u64 = IMAGE / SECTOR;

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, count: u64, seed: u8 },
    Zero { sector: u64, count: u64 },
    Trim { sector: u64, count: u64 },
    Read { sector: u64, count: u64 },
    Flush,
    Checkpoint,
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Mostly short ranges anywhere, some long ones; any 512-byte alignment.
    prop_oneof![
        3 => (0..SECTORS, 1..=20u64),
        1 => (0..SECTORS, 1..=200u64),
    ]
    .prop_map(|(s, n)| (s, n.min(SECTORS - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<u8>()).prop_map(|((sector, count), seed)| Op::Write { sector, count, seed }),
        2 => range().prop_map(|(sector, count)| Op::Zero { sector, count }),
        2 => range().prop_map(|(sector, count)| Op::Trim { sector, count }),
        3 => range().prop_map(|(sector, count)| Op::Read { sector, count }),
        1 => Just(Op::Flush),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reopen),
    ]
}

fn data(sector: u64, count: u64, seed: u8) -> Vec<u8> {
    (0..count * SECTOR)
        .map(|i| seed.wrapping_add((sector * SECTOR + i).wrapping_mul(7) as u8) | 1)
        .collect()
}

fn settings() -> Settings {
    Settings {
        checkpoint_bytes: 32 << 10,
        segment_bytes: 16 << 10,
        max_segments: 3,
        ..small()
    }
}

/// The image's extents over `sector..sector + count` agree with the model: holes read as
/// zeroes, and together they cover the range exactly.
async fn check_status(img: &Image, model: &[u8], sector: u64, count: u64) {
    let ext = img
        .block_status(sector * SECTOR, count * SECTOR)
        .await
        .unwrap();
    let mut at = sector * SECTOR;
    for e in &ext {
        if e.hole {
            assert!(
                model[at as usize..(at + e.len) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "a hole at {at}+{} that is not zeroes",
                e.len
            );
        }
        at += e.len;
    }
    assert_eq!(at, (sector + count) * SECTOR, "extents {ext:?}");
}

async fn run_ops(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), "buffer", settings());
    let mut img = ps.open("sectors", Some((IMAGE, 12))).await.unwrap();
    assert_eq!(img.geometry().block_size, 512);
    assert_eq!(img.geometry().optimal_io_size, 4096);
    let mut model = vec![0u8; IMAGE as usize];
    for op in ops {
        match op {
            Op::Write {
                sector,
                count,
                seed,
            } => {
                let d = data(sector, count, seed);
                img.write_at(
                    sector * SECTOR,
                    Bytes::from(d.clone()),
                    WriteOpts::default(),
                )
                .await
                .unwrap();
                model[(sector * SECTOR) as usize..][..d.len()].copy_from_slice(&d);
            }
            Op::Zero { sector, count } | Op::Trim { sector, count } => {
                let (off, len) = (sector * SECTOR, count * SECTOR);
                if matches!(op, Op::Trim { .. }) {
                    img.trim(off, len, WriteOpts::default()).await.unwrap();
                } else {
                    let opts = ZeroOpts {
                        fua: false,
                        may_trim: true,
                        fast_only: false,
                    };
                    img.write_zeroes(off, len, opts).await.unwrap();
                }
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { sector, count } => {
                let got = img
                    .read_at(sector * SECTOR, (count * SECTOR) as usize)
                    .await
                    .unwrap();
                let want = &model[(sector * SECTOR) as usize..((sector + count) * SECTOR) as usize];
                assert!(got == want, "read of sectors {sector}+{count} differs");
                check_status(&img, &model, sector, count).await;
            }
            Op::Flush => img.flush().await.unwrap(),
            Op::Checkpoint => img.checkpoint().await.unwrap(),
            Op::Reopen => {
                img.flush().await.unwrap();
                img.close().await;
                img = ps.open("sectors", None).await.unwrap();
            }
        }
    }
    let all = img.read_at(0, IMAGE as usize).await.unwrap();
    let bad = all.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        bad, None,
        "the image differs from the model at byte {bad:?}"
    );
    img.close().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sector_granular_io_matches_a_model(ops in proptest::collection::vec(op(), 1..60)) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_ops(ops));
    }
}

/// Eight writers, each owning one 512-byte sector of every page, write their sectors of the
/// same page at the same moment, page after page, round after round, while checkpoints move
/// pages into segments (whose reads take a while, so every merge has a window): every sector
/// must end as its owner last wrote it. A merge that read a page and appended it without
/// checking that nobody wrote the page in between would lose the other writers' sectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_to_different_sectors_of_a_page_all_land() {
    const PAGES: u64 = 8;
    const ROUNDS: u8 = 8;
    let dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(FaultyObjects::new(dir_objects(dir.path())));
    let ps = PageStore {
        objects: faulty.clone(),
        buffer_dir: dir.path().join("buffer"),
        settings: Settings {
            cache_bytes: 0,
            ..settings()
        },
    };
    let img = Arc::new(ps.open("race", Some((PAGES * 4096, 12))).await.unwrap());
    faulty.delay_us.store(2_000, Ordering::Relaxed);
    let sector = |owner: u64, round: u8| Bytes::from(vec![(owner as u8) << 4 | round; 512]);
    for round in 1..=ROUNDS {
        // Every page in a segment: the first reads of each page in this round wait for a GET.
        img.checkpoint().await.unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(8));
        let writers: Vec<_> = (0..8u64)
            .map(|owner| {
                let (img, start) = (img.clone(), start.clone());
                tokio::spawn(async move {
                    for p in 0..PAGES {
                        start.wait().await;
                        img.write_at(
                            p * 4096 + owner * 512,
                            sector(owner, round),
                            WriteOpts::default(),
                        )
                        .await
                        .unwrap();
                    }
                })
            })
            .collect();
        let checkpoint = {
            let img = img.clone();
            tokio::spawn(async move { img.checkpoint().await.unwrap() })
        };
        for w in writers {
            w.await.unwrap();
        }
        checkpoint.await.unwrap();
        for p in 0..PAGES {
            let got = img.read_at(p * 4096, 4096).await.unwrap();
            for owner in 0..8u64 {
                let s = &got[(owner * 512) as usize..][..512];
                assert!(
                    s == &sector(owner, round)[..],
                    "round {round}: page {p}, sector {owner} holds {:#04x}, not {:#04x}: a write \
                     to another sector of the page lost it",
                    s[0],
                    sector(owner, round)[0]
                );
            }
        }
    }
    faulty.delay_us.store(0, Ordering::Relaxed);
    // And all of it survives a reopen from the object store and the buffer.
    img.flush().await.unwrap();
    Arc::try_unwrap(img).unwrap().close().await;
    let img = ps.open("race", None).await.unwrap();
    for p in 0..PAGES {
        let got = img.read_at(p * 4096, 4096).await.unwrap();
        for owner in 0..8u64 {
            assert_eq!(got[(owner * 512) as usize], sector(owner, ROUNDS)[0]);
        }
    }
}
