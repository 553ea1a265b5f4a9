//! Strata's NVMe/TCP host as a user notices it: opening through the registry, refusals that
//! say why, keep-alives, reconnecting after the target restarts (I/O in flight is retried),
//! a clear error when the target stays away, and per-call time limits.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use strata_bdev::{
    BlockDevice, Bytes, Capabilities, ErrorKind, Geometry, MemDevice, Registry, Result, WriteOpts,
};
use strata_nvmf::{HostOptions, NvmfOpener, Subsystem, TargetSettings};

fn registry() -> Registry {
    let mut r = Registry::with_builtin();
    r.register("nvmf", Arc::new(NvmfOpener::default()));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opened_by_uri_with_refusals_that_say_why() {
    let (t, addr) = target(TargetSettings::default()).await;
    let n = export(&t, "u", mem("u", 4 << 20));
    t.add_subsystem(Subsystem {
        allowed_hosts: Some(vec!["nqn.2014-08.org.example:allowed".into()]),
        ..Subsystem::new(nqn("locked"), mem("locked", 4 << 20))
    })
    .expect("add");
    let r = registry();
    let dev = r
        .open(&format!("nvmf://{addr}/{n}?queues=3&hdgst=true&timeout=5"))
        .await
        .expect("open by URI");
    assert_eq!(dev.geometry().size, 4 << 20);
    assert_eq!(dev.geometry().block_size, 512);

    let e = r
        .open(&format!("nvmf://{addr}/{}", nqn("missing")))
        .await
        .expect_err("no such subsystem");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("no subsystem"), "{e}");
    let e = r
        .open(&format!("nvmf://{addr}/{}", nqn("locked")))
        .await
        .expect_err("not allowed");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    let dev2 = r
        .open(&format!(
            "nvmf://{addr}/{}?hostnqn=nqn.2014-08.org.example:allowed",
            nqn("locked")
        ))
        .await
        .expect("the allowed host connects");
    drop(dev2);
    let e = r
        .open(&format!("nvmf://{addr}/{n}?nsid=2"))
        .await
        .expect_err("no namespace 2");
    assert!(e.to_string().contains("namespace 2"), "{e}");
    let e = r
        .open(&format!("nvmf://{addr}/{n}?colour=blue"))
        .await
        .expect_err("unknown option");
    assert!(e.to_string().contains("unknown option \"colour\""), "{e}");
    drop(dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_hold_an_idle_association() {
    let (t, addr) = target(TargetSettings::default()).await;
    let n = export(&t, "k", mem("k", 1 << 20));
    let opts = HostOptions {
        keep_alive: Duration::from_secs(1),
        ..HostOptions::default()
    };
    let dev = host(addr, &n, opts).await;
    let id = dev.controller_id().expect("connected");
    // Idle for several keep-alive timeouts (the target cuts a controller off 1.5 s after its
    // last command): the controller stays, because keep-alives go every 0.5 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(t.controllers(&n), vec![id]);
    assert_eq!(dev.controller_id(), Some(id), "the same association");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_in_flight_survives_a_target_restart() {
    let (t, addr) = target(TargetSettings::default()).await;
    let m = mem("r", 16 << 20);
    let n = export(&t, "r", m.clone());
    let opts = HostOptions {
        reconnect_timeout: Duration::from_secs(30),
        ..HostOptions::default()
    };
    let dev = Arc::new(host(addr, &n, opts).await);
    // Writes running while the target goes away and comes back.
    let writer = {
        let dev = dev.clone();
        tokio::spawn(async move {
            for i in 0..400u64 {
                let off = (i % 256) * 65536;
                dev.write_at(off, pattern(i, 65536), WriteOpts::default())
                    .await
                    .expect("no write fails while the target restarts");
            }
        })
    };
    wait_until("some writes are done", LIMIT, || {
        let m = m.clone();
        async move { m.allocated_bytes() > 1 << 20 }
    })
    .await;
    t.shutdown().await;
    wait_until("the host notices", LIMIT, || {
        let c = dev.is_connected();
        async move { !c }
    })
    .await;
    let t2 = target_at(TargetSettings::default(), addr).await;
    t2.add_subsystem(Subsystem::new(n.clone(), m.clone()))
        .expect("export again");
    assert!(dev.wait_connected(LIMIT).await, "reconnected");
    assert_eq!(
        t2.controllers(&n),
        vec![dev.controller_id().expect("connected")],
        "a new association, on the new target"
    );
    tokio::time::timeout(LIMIT, writer)
        .await
        .expect("the writes finish")
        .expect("writer");
    for i in 144..400u64 {
        let off = (i % 256) * 65536;
        assert_eq!(
            dev.read_at(off, 65536).await.expect("read"),
            pattern(i, 65536),
            "region {} holds its last write",
            i % 256
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_gone_too_long_fails_io_clearly_then_comes_back() {
    let (t, addr) = target(TargetSettings::default()).await;
    let m = mem("g", 1 << 20);
    let n = export(&t, "g", m.clone());
    let opts = HostOptions {
        reconnect_timeout: Duration::from_millis(500),
        ..HostOptions::default()
    };
    let dev = host(addr, &n, opts).await;
    t.shutdown().await;
    let e = tokio::time::timeout(LIMIT, dev.read_at(0, 4096))
        .await
        .expect("fails in time")
        .expect_err("the target is gone");
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("unreachable"), "{e}");
    // Still gone: later calls fail at once, with the same message.
    let e = dev.flush().await.expect_err("still gone");
    assert!(e.to_string().contains("unreachable"), "{e}");
    // Back: the device reconnects by itself.
    let t2 = target_at(TargetSettings::default(), addr).await;
    t2.add_subsystem(Subsystem::new(n.clone(), m.clone()))
        .expect("export again");
    assert!(dev.wait_connected(LIMIT).await);
    dev.write_at(0, pattern(3, 4096), WriteOpts::default())
        .await
        .expect("write after the target returned");
    // A different volume under the same name is refused.
    t2.remove_subsystem(&n).expect("remove");
    t2.add_subsystem(Subsystem {
        uuid: Some([9; 16]),
        ..Subsystem::new(n.clone(), mem("imposter", 1 << 20))
    })
    .expect("another volume");
    let e = tokio::time::timeout(LIMIT, dev.read_at(0, 4096))
        .await
        .expect("fails in time")
        .expect_err("another namespace");
    assert!(e.to_string().contains("another namespace"), "{e}");
}

/// A device whose I/O never completes while `stuck` is set.
#[derive(Debug)]
struct Stuck {
    inner: MemDevice,
    stuck: AtomicBool,
}

#[async_trait]
impl BlockDevice for Stuck {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        if self.stuck.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.read_at(offset, len).await
    }
    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.inner.write_at(offset, data, opts).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_without_an_answer_times_out_and_resets_the_association() {
    let (t, addr) = target(TargetSettings::default()).await;
    let dev = Arc::new(Stuck {
        inner: MemDevice::new("s", 1 << 20),
        stuck: AtomicBool::new(true),
    });
    let n = export(&t, "s", dev.clone());
    let opts = HostOptions {
        timeout: Some(Duration::from_millis(300)),
        ..HostOptions::default()
    };
    let h = host(addr, &n, opts).await;
    let first = h.controller_id();
    let e = h.read_at(0, 4096).await.expect_err("no answer");
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    dev.stuck.store(false, Ordering::SeqCst);
    wait_until("a new association", LIMIT, || {
        let id = h.controller_id();
        async move { id.is_some() && id != first }
    })
    .await;
    assert_eq!(h.read_at(0, 4096).await.expect("read").len(), 4096);
}
