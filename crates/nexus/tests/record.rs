//! The durable record: degraded writes wait for it, and a nexus restored from it never serves
//! or copies stale data.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::FutureExt;
use strata_bdev::fault::{Op, Rule};
use strata_bdev::{
    BlockDevice, Bytes, Error, ErrorKind, FaultDevice, FaultHandle, MemDevice, WriteOpts,
};
use strata_nexus::{
    ChildRecord, ChildState, Ledger, Nexus, NexusError, NexusRecord, NexusSettings, RebuildKind,
    RebuildOutcome, RecordedState, RestoreChild,
};
use tokio::sync::{Notify, RwLock};

const MIB: u64 = 1 << 20;

/// A ledger in memory that can be held shut (saves wait) or made to fail.
#[derive(Default)]
struct TestLedger {
    saved: Mutex<Vec<NexusRecord>>,
    /// Saves take this shared; a test holding it exclusively keeps them waiting.
    gate: RwLock<()>,
    /// Told each time a save starts (before the gate).
    started: Notify,
    fail: AtomicBool,
}

impl TestLedger {
    fn last(&self) -> NexusRecord {
        self.saved
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a record was saved")
    }
}

#[async_trait]
impl Ledger for TestLedger {
    async fn save(&self, record: &NexusRecord) -> std::io::Result<()> {
        self.started.notify_one();
        let _open = self.gate.read().await;
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("disk full"));
        }
        self.saved.lock().unwrap().push(record.clone());
        Ok(())
    }
}

/// A child as a record lists it.
fn child(name: &str, state: RecordedState, dirty: Option<Vec<(u64, u64)>>) -> ChildRecord {
    ChildRecord {
        name: name.into(),
        state,
        dirty,
    }
}

fn mem(name: &str, size: u64) -> Arc<MemDevice> {
    Arc::new(MemDevice::new(name, size))
}

fn present(name: &str, dev: Arc<dyn BlockDevice>) -> RestoreChild {
    RestoreChild {
        name: name.into(),
        device: Ok(dev),
    }
}

fn absent(name: &str) -> RestoreChild {
    RestoreChild {
        name: name.into(),
        device: Err(Error::new(ErrorKind::Io, "connection refused")),
    }
}

fn settings() -> NexusSettings {
    NexusSettings {
        dirty_granularity: 64 * 1024,
        ..NexusSettings::default()
    }
}

fn fill(byte: u8, len: usize) -> Bytes {
    Bytes::from(vec![byte; len])
}

fn state(nexus: &Nexus, child: &str) -> ChildState {
    nexus.status().child(child).expect("child").state.clone()
}

async fn write(nexus: &Nexus, offset: u64, data: Bytes) {
    nexus
        .write_at(offset, data, WriteOpts::default())
        .await
        .expect("write through the nexus");
}

/// A new recorded nexus over memory children `a` and `b` (b through a fault injector), with b's
/// initial rebuild done.
async fn recorded_pair(ledger: &Arc<TestLedger>) -> (Arc<Nexus>, FaultHandle, Arc<MemDevice>) {
    let b = mem("b", 4 * MIB);
    let (fb, faults) = FaultDevice::new(b.clone());
    let nexus = Nexus::restore(
        "n",
        vec![present("a", mem("a", 4 * MIB)), present("b", Arc::new(fb))],
        None,
        settings(),
        Some(ledger.clone() as Arc<dyn Ledger>),
    )
    .unwrap();
    // A new nexus: b's history is unknown, so it is rebuilt from a (holes only: zeroed).
    assert_eq!(state(&nexus, "a"), ChildState::Online);
    assert_eq!(
        nexus.wait_rebuild("b").await.unwrap(),
        RebuildOutcome::Completed
    );
    let p = nexus.status().child("b").unwrap().rebuild.clone().unwrap();
    assert_eq!((p.kind, p.copied_bytes), (RebuildKind::Full, 0));
    nexus.save_record().await.unwrap();
    let r = ledger.last();
    assert!(
        r.children.iter().all(|c| c.state == RecordedState::Online),
        "{r:?}"
    );
    (Arc::new(nexus), faults, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_write_is_answered_only_once_the_record_is_durable() {
    let ledger = Arc::new(TestLedger::default());
    let (nexus, faults, _) = recorded_pair(&ledger).await;
    // A healthy write needs no record.
    let saves = ledger.saved.lock().unwrap().len();
    write(&nexus, 0, fill(1, 4096)).await;
    assert_eq!(ledger.saved.lock().unwrap().len(), saves);

    faults.add(Rule::fail(Op::Write, ErrorKind::Io));
    let closed = ledger.gate.write().await;
    // Drive the write here, not on another task, so that what it waits for is known: once the
    // record's save has started and is held at the gate, the write must still be pending.
    let mut w = std::pin::pin!(write(&nexus, MIB, fill(2, 8192)));
    tokio::select! {
        biased;
        () = &mut w => panic!("the write was answered before its record was saved"),
        () = ledger.started.notified() => {}
    }
    assert!(
        matches!(state(&nexus, "b"), ChildState::Faulted(_)),
        "b is faulted before the record is saved"
    );
    assert!(
        (&mut w).now_or_never().is_none(),
        "the write was answered while its record's save was held"
    );
    drop(closed);
    w.await;
    let r = ledger.last();
    let b = r.child("b").unwrap();
    assert!(
        matches!(&b.state, RecordedState::Faulted(why) if why.contains("injected")),
        "{b:?}"
    );
    assert_eq!(
        b.dirty,
        Some(vec![(16, 17)]),
        "1 MiB is granule 16 of 64 KiB"
    );
    assert_eq!(r.child("a").unwrap().state, RecordedState::Online);

    // Rewriting a region already recorded saves nothing new.
    let saves = ledger.saved.lock().unwrap().len();
    write(&nexus, MIB + 4096, fill(3, 4096)).await;
    assert_eq!(ledger.saved.lock().unwrap().len(), saves);
    write(&nexus, 3 * MIB, fill(3, 4096)).await;
    assert_eq!(
        ledger.last().child("b").unwrap().dirty,
        Some(vec![(16, 17), (48, 49)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_record_cannot_be_saved_fails() {
    let ledger = Arc::new(TestLedger::default());
    let (nexus, faults, _) = recorded_pair(&ledger).await;
    faults.add(Rule::fail(Op::Write, ErrorKind::Io));
    ledger.fail.store(true, Ordering::SeqCst);
    let err = nexus
        .write_at(0, fill(1, 4096), WriteOpts::default())
        .await
        .expect_err("the write cannot be acknowledged");
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(
        err.to_string()
            .contains("recording which children missed it failed"),
        "{err}"
    );
    assert!(err.to_string().contains("disk full"), "{err}");
    // Once the store works again, writes are acknowledged, with the record saved first.
    ledger.fail.store(false, Ordering::SeqCst);
    write(&nexus, 0, fill(1, 4096)).await;
    assert!(matches!(
        ledger.last().child("b").unwrap().state,
        RecordedState::Faulted(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_nexus_keeps_a_stale_child_out_and_heals_it_partially() {
    let ledger = Arc::new(TestLedger::default());
    let a = mem("ra", 4 * MIB);
    let b = mem("rb", 4 * MIB);
    let nexus = Nexus::new(
        "n",
        vec![("a".into(), a.clone() as _), ("b".into(), b.clone() as _)],
        settings(),
    )
    .unwrap();
    write(&nexus, 0, fill(1, 4 * MIB as usize)).await;
    drop(nexus);
    let children = || vec![present("a", a.clone()), present("b", b.clone())];
    // A record from before the restart: b was faulted and missed granules 2 and 10..12.
    let record = NexusRecord {
        version: 7,
        size: 4 * MIB,
        granularity: 64 * 1024,
        children: vec![
            child("a", RecordedState::Online, None),
            child(
                "b",
                RecordedState::Faulted("write: I/O error".into()),
                Some(vec![(2, 3), (10, 12)]),
            ),
        ],
    };
    // What b missed: newer data on a only.
    a.write_at(2 * 65536, fill(9, 65536), WriteOpts::default())
        .await
        .unwrap();
    a.write_at(10 * 65536, fill(9, 2 * 65536), WriteOpts::default())
        .await
        .unwrap();

    let nexus = Nexus::restore(
        "n",
        children(),
        Some(&record),
        settings(),
        Some(ledger.clone() as _),
    )
    .unwrap();
    assert_eq!(
        state(&nexus, "b"),
        ChildState::Faulted("write: I/O error".into())
    );
    assert_eq!(
        nexus.status().child("b").unwrap().dirty_bytes,
        Some(3 * 65536)
    );
    // Never read from b: every read sees a's newer data.
    for _ in 0..8 {
        assert_eq!(nexus.read_at(2 * 65536, 4096).await.unwrap(), fill(9, 4096));
    }
    nexus.save_record().await.unwrap();
    assert_eq!(
        ledger.last().version,
        8,
        "a restored nexus records over the old record"
    );
    nexus.online_child("b").unwrap();
    assert_eq!(
        nexus.wait_rebuild("b").await.unwrap(),
        RebuildOutcome::Completed
    );
    let p = nexus.status().child("b").unwrap().rebuild.clone().unwrap();
    assert_eq!(
        (p.kind, p.copied_bytes, p.zeroed_bytes),
        (RebuildKind::Partial, 3 * 65536, 0)
    );
    assert_eq!(
        a.read_at(0, 4 * MIB as usize).await.unwrap(),
        b.read_at(0, 4 * MIB as usize).await.unwrap()
    );
    assert_eq!(
        ledger.last().child("b").unwrap().state,
        RecordedState::Online
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_resumes_a_rebuild_and_adds_unknown_children_with_a_full_rebuild() {
    let a = mem("sa", MIB);
    a.write_at(0, fill(5, MIB as usize), WriteOpts::default())
        .await
        .unwrap();
    let (b, c) = (mem("sb", MIB), mem("sc", MIB));
    let record = NexusRecord {
        version: 1,
        size: MIB,
        granularity: 128 * 1024,
        children: vec![
            child("a", RecordedState::Online, None),
            child("b", RecordedState::Rebuilding, Some(vec![(1, 2)])),
            child("gone", RecordedState::Offline, None),
        ],
    };
    let nexus = Nexus::restore(
        "n",
        vec![
            present("a", a.clone()),
            present("b", b.clone()),
            present("c", c.clone()),
        ],
        Some(&record),
        settings(),
        None,
    )
    .unwrap();
    assert_eq!(
        nexus.wait_rebuild("b").await.unwrap(),
        RebuildOutcome::Completed
    );
    assert_eq!(
        nexus.wait_rebuild("c").await.unwrap(),
        RebuildOutcome::Completed
    );
    let st = nexus.status();
    let pb = st.child("b").unwrap().rebuild.clone().unwrap();
    // The recorded 128 KiB granule 1 is granules 2 and 3 at 64 KiB.
    assert_eq!(
        (pb.kind, pb.copied_bytes),
        (RebuildKind::Partial, 128 * 1024)
    );
    assert_eq!(
        b.read_at(128 * 1024, 128 * 1024).await.unwrap(),
        fill(5, 128 * 1024)
    );
    assert_eq!(
        b.read_at(0, 4096).await.unwrap(),
        fill(0, 4096),
        "only the recorded region"
    );
    let pc = st.child("c").unwrap().rebuild.clone().unwrap();
    assert_eq!((pc.kind, pc.copied_bytes), (RebuildKind::Full, MIB));
    assert!(st.child("gone").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_faults_children_that_cannot_be_opened_and_refuses_without_a_current_one() {
    let a = mem("ta", MIB);
    let record = NexusRecord {
        version: 3,
        size: MIB,
        granularity: 64 * 1024,
        children: vec![
            child("a", RecordedState::Online, None),
            child("b", RecordedState::Online, None),
            child(
                "c",
                RecordedState::Faulted("old".into()),
                Some(vec![(0, 1)]),
            ),
        ],
    };
    // b (current until the restart) is down: faulted, having missed nothing yet.
    let nexus = Nexus::restore(
        "n",
        vec![
            present("a", a.clone()),
            absent("b"),
            present("c", mem("tc", MIB)),
        ],
        Some(&record),
        settings(),
        None,
    )
    .unwrap();
    match state(&nexus, "b") {
        ChildState::Faulted(why) => assert!(why.contains("connection refused"), "{why}"),
        s => panic!("b is {s}"),
    }
    assert_eq!(nexus.status().child("b").unwrap().dirty_bytes, Some(0));
    write(&nexus, 0, fill(1, 4096)).await;
    assert_eq!(nexus.status().child("b").unwrap().dirty_bytes, Some(65536));
    // Onlining b needs its device back; the stand-in fails the rebuild.
    nexus.online_child("b").unwrap();
    assert!(matches!(
        nexus.wait_rebuild("b").await.unwrap(),
        RebuildOutcome::Failed(_)
    ));
    nexus.replace_device("b", mem("tb", MIB)).unwrap();
    nexus.online_child("b").unwrap();
    assert_eq!(
        nexus.wait_rebuild("b").await.unwrap(),
        RebuildOutcome::Completed
    );
    drop(nexus);

    // Only stale children can be opened: refuse rather than serve stale data.
    let err = Nexus::restore(
        "n",
        vec![absent("a"), absent("b"), present("c", mem("tc2", MIB))],
        Some(&record),
        settings(),
        None,
    )
    .expect_err("no current child");
    assert!(matches!(err, NexusError::Restore { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("no child known to hold current data"),
        "{err}"
    );
    // A new nexus whose first child (the initial source) is missing.
    let err = Nexus::restore(
        "n",
        vec![absent("a"), present("c", mem("tc3", MIB))],
        None,
        settings(),
        None,
    )
    .expect_err("no source");
    assert!(err.to_string().contains("cannot be opened"), "{err}");
    // A record larger than the children.
    let err = Nexus::restore(
        "n",
        vec![present("a", mem("small", MIB / 2))],
        Some(&record),
        settings(),
        None,
    )
    .expect_err("too small");
    assert!(
        err.to_string()
            .contains("give it a child at least that large"),
        "{err}"
    );
}
