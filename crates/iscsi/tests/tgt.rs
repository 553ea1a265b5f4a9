//! The initiator against tgt: LUN discovery, CHAP refusals, digests, large transfers through
//! R2T, and reconnection after the target restarts.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Tgt;
use strata_bdev::{BlockDevice, Bytes, ErrorKind, Registry, WriteOpts, ZeroOpts};
use strata_iscsi::{IscsiDevice, IscsiOpener, IscsiOptions, Portal};

const MIB: u64 = 1 << 20;

fn registry() -> Registry {
    let mut r = Registry::empty();
    IscsiOpener::register(&mut r);
    r
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uri_without_a_lun_finds_the_disk_behind_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let (_, iqn) = tgt.add_target("disk0", &dir.path().join("d.img"), 16 * MIB, false);
    // The seed's form: iscsi://HOST/IQN. tgt's LUN 0 is a controller; LUN 1 the disk.
    let uri = format!("iscsi://127.0.0.1:{}/{iqn}", tgt.port);
    let portal = Portal {
        address: format!("127.0.0.1:{}", tgt.port),
        target: iqn.clone(),
        lun: None,
    };
    let dev = IscsiDevice::connect(portal, IscsiOptions::default())
        .await
        .unwrap();
    assert_eq!(dev.lun(), 1);
    assert_eq!(dev.geometry().size, 16 * MIB);
    assert_eq!(dev.geometry().block_size, 512);
    assert!(format!("{dev:?}").contains(&format!("{iqn}/1")), "{dev:?}");
    dev.close().await;
    let dev = registry().open(&uri).await.unwrap();
    assert_eq!(dev.geometry().size, 16 * MIB);

    let e = registry()
        .open(&format!(
            "iscsi://127.0.0.1:{}/iqn.2024-01.io.strata.test:nobody",
            tgt.port
        ))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("target not found"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chap_is_required_and_checked_and_its_secret_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let (tid, iqn) = tgt.add_target("chap", &dir.path().join("c.img"), 8 * MIB, false);
    tgt.require_chap(tid, "strata", "0123456789abcdef");

    let e = registry().open(&tgt.uri(&iqn, "")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("requires CHAP"), "{e}");

    let wrong = "user=strata&secret=not-the-secret-1";
    let e = registry().open(&tgt.uri(&iqn, wrong)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert!(!e.chain().contains("not-the-secret-1"), "{e}");

    let dev = registry()
        .open(&tgt.uri(&iqn, "user=strata&secret=0123456789abcdef"))
        .await
        .unwrap();
    assert!(!format!("{dev:?}").contains("0123456789abcdef"));
    dev.write_at(0, pattern(1, 4096), WriteOpts::default())
        .await
        .unwrap();
    assert_eq!(dev.read_at(0, 4096).await.unwrap(), pattern(1, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_large_transfers_and_zeroing() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let file = dir.path().join("big.img");
    let (_, iqn) = tgt.add_target("big", &file, 64 * MIB, false);
    let portal = Portal {
        address: format!("127.0.0.1:{}", tgt.port),
        target: iqn,
        lun: Some(1),
    };
    let options = IscsiOptions {
        header_digest: true,
        data_digest: true,
        ..IscsiOptions::default()
    };
    let dev = IscsiDevice::connect(portal, options).await.unwrap();
    let neg = dev.negotiated().unwrap();
    assert!(neg.digests.header && neg.digests.data, "{neg:?}");

    // 20 MiB: over the per-command limit (split) and over the first burst (R2T and Data-Out).
    let data = pattern(7, 20 << 20);
    dev.write_at(MIB, data.clone(), WriteOpts { fua: true })
        .await
        .unwrap();
    assert_eq!(dev.read_at(MIB, 20 << 20).await.unwrap(), data);
    dev.flush().await.unwrap();
    // What the initiator wrote is in the file tgt serves.
    let on_disk = std::fs::read(&file).unwrap();
    assert_eq!(&on_disk[MIB as usize..MIB as usize + (20 << 20)], &data[..]);

    dev.write_zeroes(2 * MIB, 3 * MIB, ZeroOpts::default())
        .await
        .unwrap();
    let back = dev.read_at(MIB, 5 << 20).await.unwrap();
    assert_eq!(&back[..MIB as usize], &data[..MIB as usize]);
    assert!(back[MIB as usize..4 * MIB as usize].iter().all(|&b| b == 0));
    assert_eq!(
        &back[4 * MIB as usize..],
        &data[3 * MIB as usize..4 * MIB as usize]
    );

    // Many commands in flight at once.
    let dev = Arc::new(dev);
    let mut tasks = Vec::new();
    for i in 0..256u64 {
        let dev = dev.clone();
        tasks.push(tokio::spawn(async move {
            let d = pattern(i as u8, 65536);
            dev.write_at(30 * MIB + i * 65536, d.clone(), WriteOpts::default())
                .await
                .unwrap();
            assert_eq!(dev.read_at(30 * MIB + i * 65536, 65536).await.unwrap(), d);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_waits_for_a_restarted_target_and_fails_in_time_when_it_stays_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let (_, iqn) = tgt.add_target("re", &dir.path().join("r.img"), 8 * MIB, false);
    let dev = registry().open(&tgt.uri(&iqn, "timeout=60")).await.unwrap();
    dev.write_at(0, pattern(3, 8192), WriteOpts::default())
        .await
        .unwrap();
    dev.flush().await.unwrap();

    // The target restarts: the next I/O waits for the new session and succeeds.
    tgt.restart();
    assert_eq!(dev.read_at(0, 8192).await.unwrap(), pattern(3, 8192));
    dev.write_at(8192, pattern(4, 8192), WriteOpts::default())
        .await
        .unwrap();

    // The target goes away for good: a call fails with TimedOut, within its time limit.
    let short = registry().open(&tgt.uri(&iqn, "timeout=2")).await.unwrap();
    tgt.kill();
    // (The outer limit only tells a hang from an answer.)
    let e = tokio::time::timeout(Duration::from_secs(60), short.read_at(0, 4096))
        .await
        .expect("the call hung past its 2 s limit")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("unreachable"), "{e}");
}
