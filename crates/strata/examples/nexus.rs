//! Mirror a volume over several devices named by URI: create a nexus over them, write a buffer,
//! read it back through the nexus and from every replica directly.
//!
//! ```text
//! cargo run --example nexus -- 'file:///tmp/a.img?size=64M' 'mem://b?size=64M' \
//!     'nbd://127.0.0.1:10809/c'
//! ```
//!
//! The first URI is the source of truth: the others are fully rebuilt from it before the write
//! (regions it reports as holes are zeroed rather than copied).

use std::sync::Arc;

use strata::bdev::{BlockDevice, Bytes, WriteOpts};
use strata::nexus::{Nexus, NexusSettings, RebuildOutcome, RestoreChild};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let uris: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        uris.len() >= 2,
        "usage: nexus URI URI [URI...]  (at least two replicas)"
    );
    let registry = strata::registry();
    let mut children = Vec::new();
    let mut devices: Vec<Arc<dyn BlockDevice>> = Vec::new();
    for uri in &uris {
        let dev = registry
            .open(uri)
            .await
            .map_err(|e| anyhow::anyhow!("open {uri}: {}", e.chain()))?;
        devices.push(dev.clone());
        children.push(RestoreChild {
            name: uri.clone(),
            device: Ok(dev),
        });
    }
    // No record: a new nexus, whose first child is copied to the others.
    let nexus = Nexus::restore("example", children, None, NexusSettings::default(), None)?;
    for uri in &uris[1..] {
        match nexus.wait_rebuild(uri).await? {
            RebuildOutcome::Completed => {}
            other => anyhow::bail!("rebuild of {uri}: {other:?}"),
        }
    }
    let size = nexus.geometry().size;
    println!("nexus over {} replicas: {size} bytes", uris.len());

    // A recognisable 1 MiB pattern (or the whole device, if smaller) at the start.
    let len = size.min(1 << 20) as usize;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    nexus
        .write_at(0, Bytes::from(data.clone()), WriteOpts::default())
        .await?;
    nexus.flush().await?;
    let back = nexus.read_at(0, len).await?;
    anyhow::ensure!(back[..] == data[..], "read back through the nexus differs");
    println!("wrote, flushed and read back {len} bytes through the nexus: identical");
    for (uri, dev) in uris.iter().zip(&devices) {
        let copy = dev.read_at(0, len).await?;
        anyhow::ensure!(
            copy[..] == data[..],
            "replica {uri} does not hold the write"
        );
        println!("replica {uri}: holds the same {len} bytes");
    }
    for c in nexus.status().children {
        println!("replica {}: {}", c.name, c.state);
    }
    Ok(())
}
