//! An iSCSI child in a mirror: a nexus of `aio://` (a local file), `iscsi://` (tgt) and
//! `nbd://` (nbdkit) children, exported over NBD in this process to fio with crc32c
//! verification. tgtd is killed in the middle of the run — fio sees no error; it comes back —
//! the iSCSI child is rebuilt, and the three copies are byte for byte the same.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::{program, same_prefix, wait_until, Nbdkit, Tgt};
use strata_bdev::{BlockDevice, Registry};
use strata_iscsi::{IscsiDevice, IscsiOpener, IscsiOptions, Portal};
use strata_nbd::{Export, NbdOpener, Server, ServerConfig};
use strata_nexus::{ChildState, Nexus, NexusSettings, RebuildOutcome};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_survives_a_killed_iscsi_target_whose_child_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let tgt_file = dir.path().join("iscsi.img");
    let (_, iqn) = tgt.add_target("mirror", &tgt_file, SIZE, false);
    let kit_file = dir.path().join("nbd.img");
    std::fs::File::create(&kit_file)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let kit = Nbdkit::start(&kit_file);
    let local = dir.path().join("local.img");

    let mut registry = Registry::empty();
    strata_bdev_file::FileOpener::register(&mut registry);
    IscsiOpener::register(&mut registry);
    registry.register("nbd", Arc::new(NbdOpener::default()));
    let aio = format!("aio://{}?blk_size=512&size={SIZE}", local.display());
    let nbd = format!("nbd://127.0.0.1:{}/", kit.port);
    let iscsi_name = tgt.uri(&iqn, "timeout=3");
    // The iSCSI child is opened directly so that the test can see it reconnect.
    let iscsi = Arc::new(
        IscsiDevice::connect(
            Portal {
                address: format!("127.0.0.1:{}", tgt.port),
                target: iqn.clone(),
                lun: Some(1),
            },
            IscsiOptions {
                timeout: std::time::Duration::from_secs(3),
                ..IscsiOptions::default()
            },
        )
        .await
        .unwrap(),
    );
    let children: Vec<(String, Arc<dyn BlockDevice>)> = vec![
        (aio.clone(), registry.open(&aio).await.unwrap()),
        (iscsi_name.clone(), iscsi.clone()),
        (nbd.clone(), registry.open(&nbd).await.unwrap()),
    ];
    let nexus = Arc::new(Nexus::new("mirror", children, NexusSettings::default()).unwrap());
    assert_eq!(nexus.geometry().size, SIZE);

    let server = Server::new(
        ServerConfig::default(),
        vec![Export {
            name: "mirror".into(),
            description: "aio + iscsi + nbd".into(),
            device: nexus.clone(),
            read_only: false,
            transactions: None,
        }],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(server.clone().serve_tcp(listener));

    // 4 KiB random writes over 32 MiB, paced so that most come after the target dies; then
    // fio reads everything back and checks it.
    let fio = Command::new(program("fio"))
        .args([
            "--name=mirror",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32M",
            "--rate_iops=2000",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=json",
        ])
        .arg(format!("--uri=nbd://127.0.0.1:{port}/mirror"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tgt = tokio::task::spawn_blocking(move || {
        let before = allocated(&tgt_file);
        wait_until("fio's first writes to reach tgt", || {
            allocated(&tgt_file) > before
        });
        tgt.kill();
        (tgt, tgt_file)
    });
    let out = tokio::task::spawn_blocking(move || fio.wait_with_output().unwrap())
        .await
        .unwrap();
    let (mut tgt, tgt_file) = tgt.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json = &stdout[stdout.find('{').expect("fio printed JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["jobs"][0]["error"], 0, "fio reported an error: {json}");

    let status = nexus.status();
    let child = status.child(&iscsi_name).unwrap();
    assert!(
        matches!(child.state, ChildState::Faulted(_)),
        "the iSCSI child is faulted: {status:?}"
    );
    assert_eq!(status.child(&aio).unwrap().state, ChildState::Online);
    assert_eq!(status.child(&nbd).unwrap().state, ChildState::Online);

    // The target returns; the device reconnects by itself, the nexus rebuilds the child.
    let tgt = tokio::task::spawn_blocking(move || {
        tgt.restart();
        tgt
    })
    .await
    .unwrap();
    let probe = iscsi.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the iSCSI device to reconnect", || probe.is_connected())
    })
    .await
    .unwrap();
    nexus.online_child(&iscsi_name).unwrap();
    assert_eq!(
        nexus.wait_rebuild(&iscsi_name).await.unwrap(),
        RebuildOutcome::Completed
    );
    assert!(!nexus.status().is_degraded(), "{:?}", nexus.status());
    nexus.flush().await.unwrap();

    same_prefix(&local, &tgt_file, SIZE).unwrap();
    same_prefix(&local, &kit_file, SIZE).unwrap();
    drop(tgt);
}
