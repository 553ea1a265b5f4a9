//! The nexus under the conformance suite, injected faults, rebuilds and random interleavings.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{mem, state, write, MIB};
use strata_bdev::conformance::{pattern, run, Expect};
use strata_bdev::fault::{Action, Op, Rule};
use strata_bdev::{
    BlockDevice, Bytes, ErrorKind, FaultDevice, FaultHandle, MemDevice, WriteOpts, ZeroOpts,
};
use strata_nexus::{
    ChildState, Nexus, NexusError, NexusSettings, RebuildKind, RebuildOutcome, RebuildState,
};

/// A nexus over `n` memory children wrapped in fault injectors.
struct Rig {
    nexus: Arc<Nexus>,
    mems: Vec<Arc<MemDevice>>,
    faults: Vec<FaultHandle>,
}

fn rig(n: usize, size: u64, settings: NexusSettings) -> Rig {
    let mut mems = Vec::new();
    let mut faults = Vec::new();
    let mut children: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    for i in 0..n {
        let m = mem(&format!("c{i}"), size);
        let (f, h) = FaultDevice::new(m.clone());
        children.push((format!("c{i}"), Arc::new(f)));
        mems.push(m);
        faults.push(h);
    }
    let nexus = Arc::new(Nexus::new("n", children, settings).expect("create nexus"));
    Rig {
        nexus,
        mems,
        faults,
    }
}

async fn contents(d: &dyn BlockDevice, size: u64) -> Bytes {
    d.read_at(0, size as usize).await.expect("read a child")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_three_memory_children() {
    run(Expect::default(), |size| async move {
        let children = (0..3)
            .map(|i| {
                (
                    format!("mem://c{i}"),
                    mem(&format!("c{i}"), size + i * 4096) as Arc<dyn BlockDevice>,
                )
            })
            .collect();
        Arc::new(Nexus::new("conf", children, NexusSettings::default()).expect("nexus"))
            as Arc<dyn BlockDevice>
    })
    .await;
}

#[tokio::test]
async fn geometry_and_capabilities_are_the_safe_intersection() {
    let a = mem("a", 10 * MIB);
    let (b, _) = FaultDevice::new(mem("b", 8 * MIB + 100));
    let nexus = Nexus::new(
        "g",
        vec![("a".into(), a), ("b".into(), Arc::new(b))],
        NexusSettings::default(),
    )
    .expect("nexus");
    assert_eq!(nexus.geometry().size, 8 * MIB + 100);
    assert!(nexus.capabilities().trim && !nexus.capabilities().read_only);
    let err = nexus
        .add_child("small", mem("small", MIB))
        .expect_err("a smaller child does not fit");
    assert!(matches!(err, NexusError::Incompatible { .. }), "{err}");
    assert!(matches!(
        Nexus::new("e", vec![], NexusSettings::default()),
        Err(NexusError::NoChildren { .. })
    ));
}

#[tokio::test]
async fn write_error_faults_one_child_and_the_write_succeeds() {
    let r = rig(3, 4 * MIB, NexusSettings::default());
    r.faults[1].add(Rule::fail(Op::Write, ErrorKind::Io).times(1));
    let data = pattern(1, 8192);
    write(&r.nexus, 4096, data.clone()).await;
    match state(&r.nexus, "c1") {
        ChildState::Faulted(reason) => assert!(reason.contains("injected fault"), "{reason}"),
        s => panic!("c1 should be faulted, is {s}"),
    }
    assert_eq!(state(&r.nexus, "c0"), ChildState::Online);
    assert_eq!(r.nexus.read_at(4096, 8192).await.expect("read"), data);
    // The faulted child is no longer written to; what it missed is recorded.
    write(&r.nexus, 2 * MIB, pattern(2, 4096)).await;
    let st = r.nexus.status();
    assert_eq!(st.child("c1").expect("c1").dirty_bytes, Some(2 * MIB));
    assert!(st.is_degraded());
}

#[tokio::test]
async fn read_error_is_retried_on_another_child() {
    let r = rig(2, MIB, NexusSettings::default());
    let data = pattern(3, 4096);
    write(&r.nexus, 0, data.clone()).await;
    r.faults[0].add(Rule::fail(Op::Read, ErrorKind::Io));
    // Round robin sends one of these to c0 first; every read still answers, from c1.
    for _ in 0..4 {
        assert_eq!(r.nexus.read_at(0, 4096).await.expect("read"), data);
    }
    match state(&r.nexus, "c0") {
        ChildState::Faulted(reason) => assert!(reason.starts_with("read 4096 bytes"), "{reason}"),
        s => panic!("c0 should be faulted, is {s}"),
    }
    assert_eq!(state(&r.nexus, "c1"), ChildState::Online);
}

#[tokio::test]
async fn the_last_healthy_child_failing_fails_the_io() {
    let r = rig(2, MIB, NexusSettings::default());
    r.nexus.offline_child("c0").expect("offline c0");
    assert!(matches!(
        r.nexus.offline_child("c1"),
        Err(NexusError::LastHealthy { .. })
    ));
    r.faults[1].add(Rule::fail(Op::Write, ErrorKind::NoSpace));
    let err = r
        .nexus
        .write_at(0, pattern(4, 512), WriteOpts::default())
        .await
        .expect_err("no healthy child succeeded");
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    let msg = err.to_string();
    assert!(
        msg.contains("write 512 bytes at offset 0 to nexus n: no healthy child left"),
        "{msg}"
    );
    assert!(msg.contains("c0: offline"), "{msg}");
    assert!(msg.contains("c1: faulted: write"), "{msg}");
    let st = r.nexus.status();
    assert!(st.children.iter().all(|c| c.state != ChildState::Online));
    let err = r
        .nexus
        .read_at(0, 1)
        .await
        .expect_err("nothing to read from");
    assert!(err.to_string().contains("no healthy child left"), "{err}");
    assert!(matches!(
        r.nexus.online_child("c0"),
        Err(NexusError::NoSource { .. })
    ));
}

#[tokio::test]
async fn a_hung_child_is_faulted_by_its_timeout() {
    let r = rig(2, MIB, NexusSettings::default());
    r.nexus
        .set_io_timeout("c1", Some(Duration::from_millis(50)))
        .expect("set timeout");
    r.faults[1].add(Rule {
        ops: vec![Op::Write],
        range: None,
        action: Action::Hang,
        remaining: Some(1),
    });
    write(&r.nexus, 0, pattern(5, 4096)).await;
    match state(&r.nexus, "c1") {
        ChildState::Faulted(reason) => assert!(reason.contains("did not answer"), "{reason}"),
        s => panic!("c1 should be faulted, is {s}"),
    }
}

fn small_settings() -> NexusSettings {
    NexusSettings {
        dirty_granularity: 64 * 1024,
        rebuild_segment: 128 * 1024,
        rebuild_parallel: 3,
        io_timeout: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_rebuild_copies_only_dirty_regions() {
    let size = 8 * MIB;
    let r = rig(3, size, small_settings());
    write(&r.nexus, 0, pattern(6, size as usize)).await;
    r.nexus.offline_child("c2").expect("offline");
    // Three writes touching 1 + 2 + 1 granules of 64 KiB (the second straddles a boundary).
    write(&r.nexus, 0, pattern(7, 100)).await;
    write(&r.nexus, 3 * 65536 - 10, pattern(8, 20)).await;
    r.nexus
        .write_zeroes(5 * MIB, 4096, ZeroOpts::default())
        .await
        .expect("zeroes");
    assert_eq!(
        r.nexus.status().child("c2").expect("c2").dirty_bytes,
        Some(4 * 65536)
    );
    r.nexus.online_child("c2").expect("online");
    assert_eq!(
        r.nexus.wait_rebuild("c2").await.expect("rebuild"),
        RebuildOutcome::Completed
    );
    let st = r.nexus.status();
    let c2 = st.child("c2").expect("c2");
    assert_eq!(c2.state, ChildState::Online);
    let p = c2.rebuild.clone().expect("progress");
    assert_eq!(p.kind, RebuildKind::Partial);
    assert_eq!(p.state, RebuildState::Done(RebuildOutcome::Completed));
    assert_eq!(p.copied_bytes + p.zeroed_bytes, 4 * 65536);
    // The zeroed 4 KiB is a hole on the source: zeroed on the target, not copied.
    assert_eq!(p.zeroed_bytes, 4096);
    assert_eq!(p.total_bytes, 4 * 65536);
    let want = contents(&*r.mems[0], size).await;
    for m in &r.mems[1..] {
        assert!(contents(&**m, size).await == want, "{m:?} equals c0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_rebuild_onto_a_new_child_during_writes() {
    let size = 8 * MIB;
    let r = rig(2, size, small_settings());
    // Leave holes: the full rebuild zeroes them instead of copying.
    for i in 0..size / MIB {
        if i % 2 == 0 {
            write(&r.nexus, i * MIB, pattern(10 + i, MIB as usize)).await;
        }
    }
    let new = mem("new", size);
    r.nexus.add_child("new", new.clone()).expect("add");
    // No assertion on the state here: on a multi-threaded runtime an 8 MiB memory rebuild may
    // already be over. The progress checked below proves a full rebuild ran.
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let nexus = r.nexus.clone();
            tokio::spawn(async move {
                for i in 0..200u64 {
                    // Each writer keeps to its own half: two in-flight writes to the same
                    // bytes have no defined order, on a mirror as on a disk.
                    let half = size / 2;
                    let off = w * half + (i * 7919 * 4096) % (half - 65536);
                    nexus
                        .write_at(
                            off,
                            pattern(1000 + w * 1000 + i, 65536),
                            WriteOpts::default(),
                        )
                        .await
                        .expect("concurrent write");
                    if i % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    let outcome = r.nexus.wait_rebuild("new").await.expect("rebuild");
    for w in writers {
        w.await.expect("writer");
    }
    assert_eq!(outcome, RebuildOutcome::Completed);
    let p = r
        .nexus
        .status()
        .child("new")
        .and_then(|c| c.rebuild.clone())
        .expect("progress");
    assert_eq!(p.kind, RebuildKind::Full);
    assert_eq!(p.done_bytes, size);
    assert!(p.zeroed_bytes > 0, "holes were zeroed, not copied: {p:?}");
    let want = contents(&*r.mems[0], size).await;
    assert!(contents(&*r.mems[1], size).await == want);
    assert!(
        contents(&*new, size).await == want,
        "the new child equals c0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_source_error_faults_the_source_and_uses_another() {
    let size = 2 * MIB;
    let r = rig(3, size, small_settings());
    write(&r.nexus, 0, pattern(20, size as usize)).await;
    r.nexus.offline_child("c2").expect("offline");
    write(&r.nexus, 0, pattern(21, size as usize)).await;
    // c0 fails the rebuild's read; c1 serves it.
    r.faults[0].add(Rule::fail(Op::Read, ErrorKind::Io));
    r.nexus.online_child("c2").expect("online");
    assert_eq!(
        r.nexus.wait_rebuild("c2").await.expect("rebuild"),
        RebuildOutcome::Completed
    );
    assert!(matches!(state(&r.nexus, "c0"), ChildState::Faulted(_)));
    assert_eq!(state(&r.nexus, "c1"), ChildState::Online);
    assert_eq!(state(&r.nexus, "c2"), ChildState::Online);
    assert!(contents(&*r.mems[2], size).await == contents(&*r.mems[1], size).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_target_error_faults_the_target_and_stops() {
    let size = 2 * MIB;
    let r = rig(2, size, small_settings());
    r.nexus.offline_child("c1").expect("offline");
    write(&r.nexus, 0, pattern(30, size as usize)).await;
    r.faults[1].add(Rule::fail(Op::Write, ErrorKind::Io).in_range(MIB, 1));
    r.nexus.online_child("c1").expect("online");
    let outcome = r.nexus.wait_rebuild("c1").await.expect("rebuild");
    let RebuildOutcome::Failed(reason) = outcome else {
        panic!("the rebuild should fail, got {outcome:?}");
    };
    assert!(reason.contains("injected fault"), "{reason}");
    assert!(matches!(state(&r.nexus, "c1"), ChildState::Faulted(_)));
    assert_eq!(state(&r.nexus, "c0"), ChildState::Online);
    // What was not copied is still recorded; once the fault is gone, a partial rebuild heals it.
    let left = r.nexus.status().child("c1").expect("c1").dirty_bytes;
    assert!(left.is_some_and(|b| b > 0 && b < size), "{left:?}");
    r.faults[1].clear();
    r.nexus.online_child("c1").expect("online again");
    assert_eq!(
        r.nexus.wait_rebuild("c1").await.expect("rebuild"),
        RebuildOutcome::Completed
    );
    assert!(contents(&*r.mems[1], size).await == contents(&*r.mems[0], size).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_cancel() {
    let size = 4 * MIB;
    let r = rig(2, size, small_settings());
    write(&r.nexus, 0, pattern(40, size as usize)).await;
    r.nexus.offline_child("c1").expect("offline");
    write(&r.nexus, 0, pattern(41, size as usize)).await;
    // Hold each rebuild's first reads so that the pause lands before it ends.
    let hold = || Rule {
        ops: vec![Op::BlockStatus],
        range: None,
        action: Action::Delay(Duration::from_millis(20)),
        remaining: Some(3),
    };
    r.faults[0].add(hold());
    r.nexus.online_child("c1").expect("online");
    r.nexus.pause_rebuild("c1").expect("pause");
    let p = r.nexus.status().child("c1").and_then(|c| c.rebuild.clone());
    assert_eq!(p.expect("progress").state, RebuildState::Paused);
    r.nexus.cancel_rebuild("c1").expect("cancel");
    assert_eq!(
        r.nexus.wait_rebuild("c1").await.expect("wait"),
        RebuildOutcome::Cancelled
    );
    assert_eq!(state(&r.nexus, "c1"), ChildState::Offline);
    r.faults[0].add(hold());
    r.nexus.online_child("c1").expect("online");
    r.nexus.pause_rebuild("c1").expect("pause");
    r.nexus.resume_rebuild("c1").expect("resume");
    assert_eq!(
        r.nexus.wait_rebuild("c1").await.expect("wait"),
        RebuildOutcome::Completed
    );
    assert!(contents(&*r.mems[1], size).await == contents(&*r.mems[0], size).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_a_segment_copy_is_not_overwritten_by_older_data() {
    let size = MIB;
    let r = rig(1, size, small_settings());
    write(&r.nexus, 0, pattern(50, size as usize)).await;
    // The rebuild reads segment 0 (old data) and is held before writing it to the new child.
    let (new, hold) = FaultDevice::new(mem("new", size));
    hold.add(Rule {
        ops: vec![Op::Write],
        range: Some((0, 1)),
        action: Action::Delay(Duration::from_millis(200)),
        remaining: Some(1),
    });
    let new = Arc::new(new);
    r.nexus.add_child("new", new.clone()).expect("add");
    while hold.fired() == 0 {
        tokio::task::yield_now().await;
    }
    // This write reaches both children; without the range lock the held copy would then land
    // on top of it with the old bytes.
    let fresh = pattern(51, 4096);
    write(&r.nexus, 0, fresh.clone()).await;
    assert_eq!(
        r.nexus.wait_rebuild("new").await.expect("rebuild"),
        RebuildOutcome::Completed
    );
    assert!(
        new.read_at(0, 4096).await.expect("read") == fresh,
        "the new child holds the write made during the copy, not the copied older bytes"
    );
    assert!(contents(&*new, size).await == contents(&*r.mems[0], size).await);
}

/// A memory device that claims none of the optional features.
#[derive(Debug)]
struct Plain(Arc<MemDevice>);

#[async_trait::async_trait]
impl BlockDevice for Plain {
    fn geometry(&self) -> strata_bdev::Geometry {
        self.0.geometry()
    }

    fn capabilities(&self) -> strata_bdev::Capabilities {
        strata_bdev::Capabilities::default()
    }

    async fn read_at(&self, offset: u64, len: usize) -> strata_bdev::Result<Bytes> {
        self.0.read_at(offset, len).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> strata_bdev::Result<()> {
        assert!(!opts.fua, "FUA sent to a child without it");
        self.0.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> strata_bdev::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_child_lacks_is_emulated_and_the_mirrors_stay_identical() {
    let a = mem("ea", 4 * MIB);
    let b = mem("eb", 4 * MIB);
    let children: Vec<(String, Arc<dyn BlockDevice>)> = vec![
        ("a".into(), a.clone()),
        ("b".into(), Arc::new(Plain(b.clone()))),
    ];
    let nexus = Nexus::new("e", children, NexusSettings::default()).expect("nexus");
    let caps = nexus.capabilities();
    assert!(caps.trim && caps.write_zeroes && caps.fua && caps.block_status && caps.flush);
    assert!(
        !caps.fast_zero,
        "fast zeroing cannot be promised for children to come"
    );
    nexus
        .write_at(0, pattern(1, 4 * MIB as usize), WriteOpts { fua: true })
        .await
        .expect("write with FUA");
    nexus
        .trim(MIB, MIB, WriteOpts::default())
        .await
        .expect("trim");
    nexus
        .write_zeroes(
            3 * MIB,
            512 * 1024,
            ZeroOpts {
                fua: true,
                ..ZeroOpts::default()
            },
        )
        .await
        .expect("zeroes");
    let fast = ZeroOpts {
        fast_only: true,
        ..ZeroOpts::default()
    };
    let err = nexus
        .write_zeroes(0, 4096, fast)
        .await
        .expect_err("no fast zero");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    nexus.flush().await.expect("flush");
    assert_eq!(contents(&*a, 4 * MIB).await, contents(&*b, 4 * MIB).await);
    assert_eq!(
        &contents(&*b, 4 * MIB).await[MIB as usize..2 * MIB as usize],
        &vec![0u8; MIB as usize][..]
    );
    // Block status from either child is right: b reports all data.
    for _ in 0..4 {
        let extents = nexus.block_status(MIB, MIB).await.expect("block status");
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>() % 4096, 0);
    }
    // A child with fewer features than the others can join and is rebuilt.
    let c = mem("ec", 4 * MIB);
    nexus
        .add_child("c", Arc::new(Plain(c.clone())))
        .expect("a plain child fits");
    assert_eq!(
        nexus.wait_rebuild("c").await.expect("rebuild"),
        RebuildOutcome::Completed
    );
    assert_eq!(contents(&*a, 4 * MIB).await, contents(&*c, 4 * MIB).await);
}
