//! The daemon's volumes: a plain device, or a nexus over replicas restored from its record.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::join_all;
use strata_bdev::{BlockDevice, Error, ErrorKind, Registry};
use strata_nexus::{Nexus, RestoreChild};
use tracing::{info, warn};

use crate::config::{expand_uri, VolumeConfig};
use crate::ledger::FileLedger;

/// How long opening one replica may take before it is treated as unavailable.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// What a volume is made of.
pub enum Backing {
    Device(Arc<dyn BlockDevice>),
    Nexus(Arc<Nexus>),
    Image(Arc<strata_pagestore::Image>),
}

/// A volume that is open and exported.
pub struct Volume {
    pub name: String,
    /// The device URI, or a summary of a nexus.
    pub source: String,
    pub backing: Backing,
}

impl Volume {
    pub fn device(&self) -> Arc<dyn BlockDevice> {
        match &self.backing {
            Backing::Device(d) => d.clone(),
            Backing::Nexus(n) => n.clone(),
            Backing::Image(i) => i.clone(),
        }
    }

    pub fn nexus(&self) -> Option<&Arc<Nexus>> {
        match &self.backing {
            Backing::Nexus(n) => Some(n),
            _ => None,
        }
    }

    pub fn image(&self) -> Option<&Arc<strata_pagestore::Image>> {
        match &self.backing {
            Backing::Image(i) => Some(i),
            _ => None,
        }
    }
}

/// Open a device, giving up after [`OPEN_TIMEOUT`].
pub async fn open_device(
    registry: &Registry,
    uri: &str,
) -> strata_bdev::Result<Arc<dyn BlockDevice>> {
    match tokio::time::timeout(OPEN_TIMEOUT, registry.open(uri)).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(
            ErrorKind::TimedOut,
            format!("open {uri}: no answer within {OPEN_TIMEOUT:?}"),
        )),
    }
}

/// `uri` with `size=` added when `size` is given, the scheme creates devices of a given size
/// (files, memory) and the URI does not say.
pub fn with_size(uri: &str, size: Option<u64>) -> String {
    let creates = uri.starts_with("file:") || uri.starts_with("mem:");
    let has_size = uri
        .split_once('?')
        .is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("size=")));
    match size {
        Some(size) if size > 0 && creates && !has_size => {
            let sep = if uri.contains('?') { '&' } else { '?' };
            format!("{uri}{sep}size={size}")
        }
        _ => uri.to_string(),
    }
}

/// Open the volume `v` describes.
pub async fn open(
    v: &VolumeConfig,
    data_dir: &Path,
    registry: &Registry,
    images: &crate::images::Images,
) -> anyhow::Result<Volume> {
    if let Some(uri) = &v.uri {
        let uri = with_size(&expand_uri(uri, data_dir), v.create_size);
        if uri.starts_with("image://") {
            let image = images
                .open_volume(&v.name, &uri)
                .await
                .map_err(|e| anyhow::Error::new(e).context(format!("open volume {:?}", v.name)))?;
            return Ok(Volume {
                name: v.name.clone(),
                source: uri,
                backing: Backing::Image(image),
            });
        }
        let device = registry
            .open(&uri)
            .await
            .map_err(|e| anyhow::Error::new(e).context(format!("open volume {:?}", v.name)))?;
        return Ok(Volume {
            name: v.name.clone(),
            source: uri,
            backing: Backing::Device(device),
        });
    }
    let uris: Vec<String> = v.replicas.iter().map(|r| expand_uri(r, data_dir)).collect();
    let ledger = FileLedger::new(data_dir, &v.name);
    let record = ledger
        .load()
        .with_context(|| format!("open nexus volume {:?}", v.name))?;
    let open_uris: Vec<String> = uris.iter().map(|u| with_size(u, v.create_size)).collect();
    let opened = join_all(open_uris.iter().map(|u| open_device(registry, u))).await;
    let sizes: Vec<Option<u64>> = opened
        .iter()
        .map(|d| d.as_ref().ok().map(|d| d.geometry().size))
        .collect();
    let children = uris
        .iter()
        .zip(opened)
        .map(|(uri, device)| {
            if let Err(e) = &device {
                warn!(volume = %v.name, replica = %uri, error = %e.chain(), "replica cannot be opened; it is faulted until it is onlined");
            }
            RestoreChild {
                name: uri.clone(),
                device,
            }
        })
        .collect();
    let path = ledger.path().to_path_buf();
    let nexus = Nexus::restore(
        v.name.clone(),
        children,
        record.as_ref(),
        v.nexus_settings(),
        Some(Arc::new(ledger)),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "open nexus volume {:?}: {e} (record: {})",
            v.name,
            path.display()
        )
    })?;
    nexus
        .save_record()
        .await
        .with_context(|| format!("open nexus volume {:?}: save its record", v.name))?;
    let size = strata_bdev::BlockDevice::geometry(&nexus).size;
    for c in nexus.status().children {
        info!(volume = %v.name, replica = %c.name, state = %c.state, "replica");
    }
    for (uri, dev) in uris.iter().zip(&sizes) {
        if let Some(bytes) = dev.filter(|&b| b > size) {
            info!(volume = %v.name, replica = %uri, replica_bytes = bytes, volume_bytes = size,
                "replica is larger than the volume, which is as large as its smallest replica; the rest is unused");
        }
    }
    Ok(Volume {
        name: v.name.clone(),
        source: format!("nexus of {} replicas", uris.len()),
        backing: Backing::Nexus(Arc::new(nexus)),
    })
}
