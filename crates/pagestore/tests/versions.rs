//! Versions of images: snapshots, clones (of clones), flattening, resize, transactions and
//! garbage collection, on a local-directory object store.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use strata_bdev::{BlockDevice, Bytes, ErrorKind, WriteOpts};
use strata_pagestore::versions::GcOptions;
use strata_pagestore::{PageStore, Settings};

mod common;
use common::*;

fn store(root: &Path, settings: Settings) -> PageStore {
    common::store(root, "buffer", settings)
}

/// Bytes of every object under `images/NAME/`.
async fn stored(ps: &PageStore, name: &str) -> u64 {
    ps.objects
        .list(&format!("images/{name}/"))
        .await
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_clones_and_clones_of_clones_diverge_independently() {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), small());
    let gold = ps.open("gold", Some((16 << 20, 12))).await.unwrap();
    for p in 0..64 {
        write(&gold, p, 1).await;
    }
    // Buffered (not yet checkpointed) writes are in the snapshot too.
    let rec = gold.snapshot("s1").await.unwrap();
    assert_eq!(rec.image_size, 16 << 20);
    let e = gold.snapshot("s1").await.unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    write(&gold, 0, 2).await;
    gold.write_zeroes(PS as u64, PS as u64, Default::default())
        .await
        .unwrap();

    // The snapshot reads the old bytes and refuses writes.
    let snap = ps.open_snapshot("gold", "s1").await.unwrap();
    assert!(snap.capabilities().read_only);
    assert_eq!(read(&snap, 0).await, page(1));
    assert_eq!(read(&snap, 1).await, page(1));
    let e = snap
        .write_at(0, page(9), WriteOpts::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);

    // A clone: O(1) to make, reads through, diverges.
    let before = stored(&ps, "c1").await;
    assert_eq!(before, 0);
    ps.create_clone("gold", "s1", "c1").await.unwrap();
    let c1 = ps.open("c1", None).await.unwrap();
    assert_eq!(read(&c1, 0).await, page(1));
    write(&c1, 5, 5).await;
    c1.trim(6 * PS as u64, PS as u64, WriteOpts::default())
        .await
        .unwrap();
    assert_eq!(read(&c1, 5).await, page(5));
    assert_eq!(
        read(&c1, 6).await,
        zeroes(),
        "a trimmed page hides its base"
    );
    assert_eq!(
        read(&gold, 5).await,
        page(1),
        "the source does not see the clone"
    );
    // Compaction of a clone keeps the tombstones that hide its base.
    for round in 0..10u8 {
        for p in 0..40 {
            write(&c1, 1000 + p, round).await;
        }
        c1.checkpoint().await.unwrap();
    }
    assert!(
        c1.stats()
            .compactions
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert_eq!(
        read(&c1, 6).await,
        zeroes(),
        "compaction kept the tombstone"
    );
    assert_eq!(read(&c1, 5).await, page(5));
    // A clone of the clone.
    c1.snapshot("t").await.unwrap();
    ps.create_clone("c1", "t", "c2").await.unwrap();
    let c2 = ps.open("c2", None).await.unwrap();
    write(&c2, 7, 7).await;
    assert_eq!(read(&c2, 5).await, page(5));
    assert_eq!(read(&c2, 6).await, zeroes());
    assert_eq!(read(&c2, 7).await, page(7));
    assert_eq!(read(&c2, 8).await, page(1));
    assert_eq!(read(&c1, 7).await, page(1));

    // The space a clone uses after writing N pages is about N pages.
    c2.checkpoint().await.unwrap();
    for p in 100..200 {
        write(&c2, p, 3).await;
    }
    c2.checkpoint().await.unwrap();
    let bytes = stored(&ps, "c2").await;
    let n = 101 * PS as u64;
    assert!(
        bytes >= n && bytes < n + n / 10,
        "{bytes} bytes stored for {n} bytes written"
    );

    // Reopened, every level reads the same.
    c2.close().await;
    let c2 = ps.open("c2", None).await.unwrap();
    assert_eq!(read(&c2, 5).await, page(5));
    assert_eq!(read(&c2, 6).await, zeroes());
    assert_eq!(read(&c2, 8).await, page(1));
    assert_eq!(read(&c2, 150).await, page(3));

    // Deleting what clones depend on is refused, naming them.
    let e = ps.delete_snapshot("gold", "s1").await.unwrap_err();
    assert!(e.to_string().contains("c1"), "{e}");
    let e = ps.delete_image("gold").await.unwrap_err();
    assert!(e.to_string().contains("c1"), "{e}");

    // Flattening a clone of a clone under writes keeps every page.
    let seen = std::sync::Mutex::new(Vec::new());
    c2.flatten(&|d, t| seen.lock().unwrap().push((d, t)))
        .await
        .unwrap();
    let seen = seen.into_inner().unwrap();
    let (done, total) = *seen.last().unwrap();
    assert!(total > 60 && done == total, "{seen:?}");
    assert!(c2.base().is_none());
    assert_eq!(read(&c2, 5).await, page(5));
    assert_eq!(read(&c2, 6).await, zeroes());
    assert_eq!(read(&c2, 8).await, page(1));
    c2.close().await;
    let c2 = ps.open("c2", None).await.unwrap();
    assert!(c2.base().is_none());
    assert_eq!(read(&c2, 8).await, page(1));
    assert_eq!(read(&c2, 7).await, page(7));
    // c2 stands alone now: c1@t can go.
    ps.delete_snapshot("c1", "t").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_grows_online_and_shrinks_only_when_forced() {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), small());
    let img = ps.open("r", Some((1 << 20, 12))).await.unwrap();
    write(&img, 200, 4).await;
    let e = img.resize(512 << 10, false).await.unwrap_err();
    assert!(e.to_string().contains("force"), "{e}");
    assert_eq!(img.geometry().size, 1 << 20);
    img.resize(2 << 20, false).await.unwrap();
    assert_eq!(img.geometry().size, 2 << 20);
    write(&img, 400, 5).await;
    assert_eq!(read(&img, 200).await, page(4));
    // Shrink below both pages, then grow again: they read as zeroes.
    img.resize(512 << 10, true).await.unwrap();
    assert!(img.read_at(200 * PS as u64, PS).await.is_err());
    img.resize(4 << 20, false).await.unwrap();
    assert_eq!(read(&img, 200).await, zeroes());
    assert_eq!(read(&img, 400).await, zeroes());
    img.close().await;
    let img = ps.open("r", None).await.unwrap();
    assert_eq!(img.geometry().size, 4 << 20);
    assert_eq!(read(&img, 200).await, zeroes());

    // In a clone, a shrink hides its base's pages for good: after a grow, a reopen, a
    // compaction, and in a clone of a snapshot taken while it was small.
    let base = ps.open("rb", Some((1 << 20, 12))).await.unwrap();
    for p in 0..256 {
        write(&base, p, 1).await;
    }
    base.snapshot("s").await.unwrap();
    ps.create_clone("rb", "s", "rc").await.unwrap();
    let rc = ps.open("rc", None).await.unwrap();
    rc.resize(512 << 10, true).await.unwrap();
    rc.snapshot("small").await.unwrap();
    ps.create_clone("rc", "small", "rd").await.unwrap();
    let rd = ps.open("rd", None).await.unwrap();
    rd.resize(1 << 20, false).await.unwrap();
    assert_eq!(read(&rd, 200).await, zeroes());
    rd.close().await;
    let rd = ps.open("rd", None).await.unwrap();
    assert_eq!(
        read(&rd, 200).await,
        zeroes(),
        "a clone of the small snapshot"
    );
    assert_eq!(read(&rd, 100).await, page(1));
    rc.close().await;
    let rc = ps.open("rc", None).await.unwrap();
    for round in 0..10u8 {
        for p in 0..40 {
            write(&rc, p, round).await;
        }
        rc.checkpoint().await.unwrap();
    }
    assert!(
        rc.stats()
            .compactions
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    rc.resize(1 << 20, false).await.unwrap();
    assert_eq!(
        read(&rc, 200).await,
        zeroes(),
        "after a compaction and a grow"
    );
    rc.close().await;
    let rc = ps.open("rc", None).await.unwrap();
    assert_eq!(read(&rc, 200).await, zeroes(), "after a reopen");
    assert_eq!(read(&rc, 100).await, page(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_whole_read_their_snapshot_and_report_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), small());
    let img = ps.open("t", Some((4 << 20, 12))).await.unwrap();
    write(&img, 0, 1).await;
    write(&img, 1, 1).await;

    // Commit: all pages land together, durably; reads inside see own writes.
    let mut t = img.begin().await.unwrap();
    t.write(0, page(2)).await.unwrap();
    t.write(2 * PS as u64, Bytes::from([page(3), page(3)].concat()))
        .await
        .unwrap();
    assert_eq!(t.read(0, PS).await.unwrap(), page(2));
    assert_eq!(read(&img, 0).await, page(1), "invisible before commit");
    t.commit().await.unwrap();
    assert_eq!(read(&img, 0).await, page(2));
    assert_eq!(read(&img, 3).await, page(3));

    // Rollback leaves no trace.
    let mut t = img.begin().await.unwrap();
    t.write(PS as u64 * 10, page(9)).await.unwrap();
    t.rollback();
    assert_eq!(read(&img, 10).await, zeroes());

    // A snapshot at BEGIN, also across a checkpoint; a read page changed meanwhile conflicts.
    let mut t = img.begin().await.unwrap();
    assert_eq!(t.read(PS as u64, PS).await.unwrap(), page(1));
    write(&img, 1, 7).await;
    img.checkpoint().await.unwrap();
    assert_eq!(
        t.read(PS as u64, PS).await.unwrap(),
        page(1),
        "no stale read"
    );
    assert_eq!(read(&img, 1).await, page(7));
    t.write(PS as u64 * 20, page(4)).await.unwrap();
    assert!(!t.lock().await.unwrap(), "the read page changed");
    let e = t.commit().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(read(&img, 20).await, zeroes());

    // Blind writes to a page someone else changed conflict too.
    let mut t = img.begin().await.unwrap();
    t.write(PS as u64 * 30, page(4)).await.unwrap();
    write(&img, 30, 8).await;
    assert_eq!(
        t.commit().await.unwrap_err().kind(),
        ErrorKind::Conflict,
        "a concurrent write is never silently lost"
    );
    assert_eq!(read(&img, 30).await, page(8));

    // Disjoint transactions both commit; LOCK makes the commit certain and holds writers.
    let mut a = img.begin().await.unwrap();
    let mut b = img.begin().await.unwrap();
    a.write(PS as u64 * 40, page(1)).await.unwrap();
    b.write(PS as u64 * 41, page(2)).await.unwrap();
    assert!(a.lock().await.unwrap());
    let img2 = Arc::new(img);
    let w = {
        let img = img2.clone();
        tokio::spawn(async move { write(&img, 42, 3).await })
    };
    let mut w = w;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut w)
            .await
            .is_err(),
        "a plain write waits for the lock holder"
    );
    a.commit().await.unwrap();
    w.await.unwrap();
    b.commit().await.unwrap();
    assert_eq!(read(&img2, 40).await, page(1));
    assert_eq!(read(&img2, 41).await, page(2));
    assert_eq!(read(&img2, 42).await, page(3));

    // Too large: refused, and the transaction cannot commit.
    let img = Arc::try_unwrap(img2).unwrap();
    img.close().await;
    let ps = store(
        dir.path(),
        Settings {
            max_txn_bytes: 8 * PS as u64,
            txn_timeout: Duration::from_millis(300),
            ..small()
        },
    );
    let img = ps.open("t", None).await.unwrap();
    let mut t = img.begin().await.unwrap();
    let e = t
        .write(0, Bytes::from(vec![1u8; 16 * PS]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    assert_eq!(t.commit().await.unwrap_err().kind(), ErrorKind::Conflict);
    // A transaction that outlives its timeout is rolled back and frees the lock.
    let mut t = img.begin().await.unwrap();
    t.write(0, page(5)).await.unwrap();
    assert!(t.lock().await.unwrap());
    write(&img, 50, 5).await; // waits for the timeout, then goes on
    let e = t.commit().await.unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
    assert_eq!(read(&img, 0).await, page(2));
    assert_eq!(read(&img, 50).await, page(5));
}

/// Set in the child process that [`a_committed_transaction_survives_a_crash_whole`] starts and
/// kills: the directory of its store.
const CRASH_DIR: &str = "STRATA_TEST_TXN_CRASH_DIR";

/// The child's side: overwrite checkpointed pages in a transaction and commit it, start a
/// second one (writes over the first's pages, never committed), say "ready" and wait to be
/// killed.
async fn commit_then_wait_for_sigkill(root: &Path) {
    let ps = store(root, small());
    let img = ps.open("c", Some((4 << 20, 12))).await.unwrap();
    for p in 0..32 {
        write(&img, p, 7).await;
    }
    img.checkpoint().await.unwrap();
    let mut t = img.begin().await.unwrap();
    for p in 0..20 {
        t.write(p * PS as u64, page(p as u8)).await.unwrap();
    }
    t.zero(30 * PS as u64, 2 * PS as u64).await.unwrap();
    t.commit().await.unwrap();
    let mut t = img.begin().await.unwrap();
    for p in [5u64, 50] {
        t.write(p * PS as u64, page(0xee)).await.unwrap();
    }
    println!("ready");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    std::future::pending::<()>().await;
}

/// A transaction committed before the process is killed (SIGKILL, no close, no flush of the
/// process's own) is there whole after a reopen, and one still open is not there at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_transaction_survives_a_crash_whole() {
    if let Some(root) = std::env::var_os(CRASH_DIR) {
        commit_then_wait_for_sigkill(Path::new(&root)).await;
        return;
    }
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    // This test again, in a child process that does the writing and is killed.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_committed_transaction_survives_a_crash_whole",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    for line in out.lines() {
        let line = line.unwrap();
        // The test harness may print the test's name on the same line first.
        if line.ends_with("ready") {
            break;
        }
        seen.push(line);
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the writer ended before it was killed: {seen:?}"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    let ps = store(dir.path(), small());
    let img = ps.open("c", None).await.unwrap();
    for p in 0..20 {
        assert_eq!(
            read(&img, p).await,
            page(p as u8),
            "page {p}: the committed write"
        );
    }
    for p in 20..30 {
        assert_eq!(read(&img, p).await, page(7), "page {p}: untouched");
    }
    for p in 30..32 {
        assert_eq!(
            read(&img, p).await,
            zeroes(),
            "page {p}: zeroed in the transaction"
        );
    }
    assert_eq!(
        read(&img, 50).await,
        zeroes(),
        "the open transaction left nothing"
    );
    img.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_frees_replaced_data_and_keeps_every_version_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), small());
    let img = ps.open("g", Some((8 << 20, 12))).await.unwrap();
    for round in 0..4u8 {
        for p in 0..256 {
            write(&img, p, round).await;
        }
        img.checkpoint().await.unwrap();
        if round == 1 {
            img.snapshot("keep").await.unwrap();
        }
    }
    ps.create_clone("g", "keep", "gc-clone").await.unwrap();
    let clone = ps.open("gc-clone", None).await.unwrap();
    write(&clone, 3, 9).await;
    clone.checkpoint().await.unwrap();

    let now = GcOptions {
        grace: Duration::ZERO,
        retention: Duration::ZERO,
        dry_run: true,
    };
    let before = stored(&ps, "g").await;
    let dry = ps.gc(&now).await.unwrap();
    assert!(dry.deleted_bytes > 0, "{dry:?}");
    assert_eq!(stored(&ps, "g").await, before, "a dry run deletes nothing");
    // The grace period protects everything that is recent.
    let graced = ps
        .gc(&GcOptions {
            grace: Duration::from_secs(3600),
            ..now.clone()
        })
        .await
        .unwrap();
    assert!(graced.deleted.is_empty(), "{graced:?}");
    let done = ps
        .gc(&GcOptions {
            dry_run: false,
            ..now.clone()
        })
        .await
        .unwrap();
    assert_eq!(done.deleted, dry.deleted);
    assert!(stored(&ps, "g").await < before);
    // Everything still reads back exactly, also after reopening.
    let snap = ps.open_snapshot("g", "keep").await.unwrap();
    for p in [0, 100, 255] {
        assert_eq!(read(&img, p).await, page(3));
        assert_eq!(read(&snap, p).await, page(1));
    }
    assert_eq!(read(&clone, 3).await, page(9));
    assert_eq!(read(&clone, 4).await, page(1));
    img.close().await;
    let img = ps.open("g", None).await.unwrap();
    assert_eq!(read(&img, 200).await, page(3));
    // Segments of an operation still uploading (a live lease) stay, however old.
    let seg = "images/g/segments/cffff-w-0.seg";
    ps.objects.put(seg, Bytes::from_static(b"x")).await.unwrap();
    ps.objects
        .put("images/g/leases/cffff-w", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let collect = GcOptions {
        dry_run: false,
        ..now.clone()
    };
    ps.gc(&collect).await.unwrap();
    assert!(
        ps.objects.get(seg).await.is_ok(),
        "a leased segment was deleted"
    );
    ps.objects.delete("images/g/leases/cffff-w").await.unwrap();
    let r = ps.gc(&collect).await.unwrap();
    assert!(r.deleted.iter().any(|(k, _)| k == seg), "{r:?}");

    // Deleting the clone and the snapshot frees their data at the next collection.
    clone.close().await;
    ps.delete_image("gc-clone").await.unwrap();
    assert!(
        !dir.path().join("buffer/gc-clone").exists(),
        "a deleted image's write buffer is gone: a new image of that name must not replay it"
    );
    ps.delete_snapshot("g", "keep").await.unwrap();
    let after_delete = stored(&ps, "g").await;
    ps.gc(&GcOptions {
        dry_run: false,
        ..now.clone()
    })
    .await
    .unwrap();
    assert!(stored(&ps, "g").await < after_delete);
    assert_eq!(stored(&ps, "gc-clone").await, 0);
    assert_eq!(read(&img, 17).await, page(3));
    assert!(ps.open_snapshot("g", "keep").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_deletes_nothing_when_a_version_in_use_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let ps = store(dir.path(), small());
    let img = ps.open("x", Some((4 << 20, 12))).await.unwrap();
    for round in 0..3u8 {
        write(&img, 0, round).await;
        img.checkpoint().await.unwrap();
        if round == 0 {
            img.snapshot("s").await.unwrap();
        }
    }
    ps.create_clone("x", "s", "y").await.unwrap();
    // The snapshot's version vanishes behind the store's back.
    let rec: serde_json::Value =
        serde_json::from_slice(&ps.objects.get("images/x/snapshots/s").await.unwrap()).unwrap();
    let v = rec["version"].as_u64().unwrap();
    ps.objects
        .delete(&format!("images/x/manifest/{v:020}"))
        .await
        .unwrap();
    let before = stored(&ps, "x").await;
    let e = ps
        .gc(&GcOptions {
            grace: Duration::ZERO,
            retention: Duration::ZERO,
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nothing was deleted"), "{e}");
    assert_eq!(stored(&ps, "x").await, before);
}
