//! A nexus with an `nvmf://` child: its target is stopped in the middle of a stream of writes
//! (the nexus's caller sees no error, the child is faulted), then started again (the child
//! reconnects, is onlined and rebuilt, and then holds the same bytes as its sibling).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use strata_bdev::{BlockDevice, WriteOpts};
use strata_nexus::{ChildState, Nexus, NexusSettings, RebuildOutcome};
use strata_nvmf::{HostOptions, Subsystem, TargetSettings};

const SIZE: u64 = 32 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_target_faults_the_child_and_a_returning_one_is_rebuilt() {
    let (t, addr) = target(TargetSettings::default()).await;
    let remote = mem("remote", SIZE);
    let n = export(&t, "replica", remote.clone());
    let local = mem("local", SIZE);
    let uri = format!("nvmf://{addr}/{n}");
    let opts = HostOptions {
        reconnect_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_secs(2),
        ..HostOptions::default()
    };
    let child = Arc::new(host(addr, &n, opts).await);
    let nexus = Arc::new(
        Nexus::new(
            "n",
            vec![
                ("local".to_string(), local.clone() as Arc<dyn BlockDevice>),
                (uri.clone(), child.clone() as Arc<dyn BlockDevice>),
            ],
            NexusSettings::default(),
        )
        .expect("nexus"),
    );

    // A stream of verified writes, as fio verify would do: every write must succeed and read
    // back as written.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (nexus, stop, done) = (nexus.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let off = (i * 7919 % (SIZE / 65536)) * 65536;
                let data = pattern(i, 65536);
                nexus
                    .write_at(off, data.clone(), WriteOpts::default())
                    .await
                    .expect("the nexus's caller sees no error");
                assert_eq!(
                    nexus.read_at(off, 65536).await.expect("read back"),
                    data,
                    "write {i} reads back"
                );
                i += 1;
                done.store(i, Ordering::SeqCst);
            }
            i
        })
    };
    let progressed = |n: u64| {
        let done = done.clone();
        async move { done.load(Ordering::SeqCst) >= n }
    };
    wait_until("writes before the target stops", LIMIT, || progressed(50)).await;

    t.shutdown().await;
    wait_until("the nvmf child is faulted", LIMIT, || {
        let faulted = matches!(
            nexus.status().child(&uri).map(|c| c.state.clone()),
            Some(ChildState::Faulted(_))
        );
        async move { faulted }
    })
    .await;
    let at_fault = done.load(Ordering::SeqCst);
    wait_until("writes go on while it is faulted", LIMIT, || {
        progressed(at_fault + 50)
    })
    .await;

    // The target comes back with the same volume; the child reconnects by itself.
    let t2 = target_at(TargetSettings::default(), addr).await;
    t2.add_subsystem(Subsystem::new(n.clone(), remote.clone()))
        .expect("export again");
    assert!(child.wait_connected(LIMIT).await, "the child reconnects");
    nexus.online_child(&uri).expect("online the child");
    let outcome = tokio::time::timeout(Duration::from_secs(60), nexus.wait_rebuild(&uri))
        .await
        .expect("the rebuild finishes")
        .expect("rebuild");
    assert!(matches!(outcome, RebuildOutcome::Completed), "{outcome:?}");
    let before = done.load(Ordering::SeqCst);
    wait_until("writes go on after the rebuild", LIMIT, || {
        progressed(before + 20)
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let total = writer.await.expect("writer");
    assert!(total > 100);
    assert_eq!(
        nexus.status().child(&uri).map(|c| c.state.clone()),
        Some(ChildState::Online)
    );
    let a = local.read_at(0, SIZE as usize).await.expect("read local");
    let b = remote.read_at(0, SIZE as usize).await.expect("read remote");
    assert!(
        a == b,
        "the rebuilt child holds the same bytes as its sibling"
    );
    t2.shutdown().await;
}
