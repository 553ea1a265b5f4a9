//! Mayastor's example, in Strata: a nexus over three children named by URI, one write that
//! becomes a write to each, a read back and a check.
//!
//! ```text
//! cargo run -p strata-iscsi --example seed_nexus -- \
//!     'aio:////disk1.img?blk_size=512' \
//!     'iscsi://foobar/iqn.2019-05.io.openebs:disk0' \
//!     'nvmf://fooo/nqn.2019-05.io-openebs:disk0'
//! ```
//!
//! The children are the program's arguments (hosts substituted with reachable ones). The
//! schemes it opens are those of [`registry`]: `aio://`, `uring://`, `file://`, `malloc://`,
//! `mem://`, `iscsi://`, `nvmf://` and `nbd://`.

use std::sync::Arc;

use strata_bdev::{BlockDevice, Bytes, Registry, WriteOpts};
use strata_nexus::{Nexus, NexusSettings};

/// The schemes the example opens.
fn registry() -> Registry {
    let mut r = Registry::with_builtin();
    strata_bdev_file::FileOpener::register(&mut r);
    strata_iscsi::IscsiOpener::register(&mut r);
    let nbd = Arc::new(strata_nbd::NbdOpener::default());
    r.register("nbd", nbd.clone());
    r.register("nbd+unix", nbd);
    r.register("nvmf", Arc::new(strata_nvmf::NvmfOpener::default()));
    r
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let children: Vec<String> = std::env::args().skip(1).collect();
    if children.is_empty() {
        return Err("usage: seed_nexus CHILD_URI... (e.g. aio:////disk1.img?blk_size=512)".into());
    }
    let registry = registry();
    let mut devices: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    for uri in &children {
        let dev = registry
            .open(uri)
            .await
            .map_err(|e| format!("open {uri}: {}", e.chain()))?;
        devices.push((uri.clone(), dev));
    }

    // Create the nexus over the children (all new, so they hold the same bytes).
    let nexus = Nexus::new("mynexus", devices.clone(), NexusSettings::default())?;
    let g = nexus.geometry();
    println!(
        "nexus mynexus: {} bytes in {}-byte blocks over {} children",
        g.size,
        g.block_size,
        devices.len()
    );

    // Write a buffer of 0xff: one write to the nexus becomes one write to every child.
    let buf = Bytes::from(vec![0xffu8; 4096]);
    nexus.write_at(0, buf.clone(), WriteOpts::default()).await?;
    nexus.flush().await?;

    // Read it back and check it, through the nexus and on every child.
    let back = nexus.read_at(0, 4096).await?;
    if !back.iter().all(|&b| b == 0xff) {
        return Err("the nexus read back something else than it wrote".into());
    }
    for (uri, dev) in &devices {
        let copy = dev.read_at(0, 4096).await?;
        if copy != buf {
            return Err(format!("child {uri} does not hold the write").into());
        }
        println!("verified: {}", strata_iscsi::opener::redact(uri));
    }
    println!(
        "wrote, read back and verified 4096 bytes on {} children",
        devices.len()
    );
    Ok(())
}
