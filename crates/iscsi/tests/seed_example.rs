//! The seed's example program (`examples/seed_nexus.rs`) over children in the seed's own URI
//! forms — `aio:////PATH?blk_size=512`, `iscsi://HOST/IQN` (tgt), `nvmf://HOST/NQN` (Strata's own
//! NVMe/TCP target) and `malloc:///NAME` — with reachable hosts substituted.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use strata_bdev::{BlockDevice, MemDevice};
use strata_nvmf::{Subsystem, Target, TargetSettings};

use common::Tgt;

const MIB: u64 = 1 << 20;

fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/seed_nexus");
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples",
        path.display()
    );
    path
}

#[test]
fn the_seed_example_writes_reads_back_and_verifies_on_every_child() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let tgt_file = dir.path().join("disk0.img");
    let (_, iqn) = tgt.add_target("disk0", &tgt_file, 64 * MIB, false);
    let disk1 = dir.path().join("disk1.img");
    std::fs::File::create(&disk1)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();

    // Strata's NVMe/TCP target serves the seed's nvmf:// child, under the seed's NQN.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let nvme_disk: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("nvme", 64 * MIB));
    let nqn = "nqn.2019-05.io-openebs:disk0";
    let port = rt.block_on(async {
        let target = Target::new(TargetSettings::default()).unwrap();
        target
            .add_subsystem(Subsystem::new(nqn, nvme_disk.clone()))
            .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(target.serve_tcp(l));
        port
    });
    let children = [
        // Four slashes, as in the seed: aio:// and then the absolute path.
        format!("aio:///{}?blk_size=512", disk1.display()),
        format!("iscsi://127.0.0.1:{}/{iqn}", tgt.port),
        format!("nvmf://127.0.0.1:{port}/{nqn}"),
        "malloc:///disk2?size_mb=64".to_string(),
    ];
    assert!(children[0].starts_with("aio:////"));
    let out = Command::new(example()).args(&children).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("wrote, read back and verified 4096 bytes on 4 children"),
        "{stdout}"
    );
    // The write reached the local file and the file tgt serves.
    for f in [&disk1, &tgt_file] {
        let bytes = std::fs::read(f).unwrap();
        assert!(bytes[..4096].iter().all(|&b| b == 0xff), "{}", f.display());
        assert!(bytes[4096..8192].iter().all(|&b| b == 0), "{}", f.display());
    }
    // And the namespace Strata's target serves.
    let on_nvme = rt.block_on(nvme_disk.read_at(0, 8192)).unwrap();
    assert!(on_nvme[..4096].iter().all(|&b| b == 0xff));
    assert!(on_nvme[4096..].iter().all(|&b| b == 0));
}
