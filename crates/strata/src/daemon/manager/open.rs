//! Opening a declared volume: a device, a nexus restored from its record, or a page-store image.
//!
//! `{data_dir}` in a device URI stands for this node's data directory: it is expanded here, when
//! the device is opened, so that a declaration shared by several nodes means each node's own.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use strata_bdev::{BlockDevice, Error, ErrorKind, Registry};
use strata_nexus::{Nexus, RestoreChild};
use strata_pagestore::Image;
use tracing::{info, warn};

use super::decl::{Backing, NexusDecl, VolumeDecl};
use super::{Manager, OpError, OpKind, OpResult};
use crate::daemon::ledger::FileLedger;

/// How long opening one device may take before it is treated as unavailable.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the control plane steers in an open volume, beside the device clients use.
#[derive(Debug, Clone)]
pub enum Parts {
    /// A plain device: nothing to steer.
    Device,
    /// A mirror: its children and rebuilds.
    Nexus(Arc<Nexus>),
    /// A page-store image: its versions, transactions and statistics.
    Image(Arc<Image>),
}

/// A volume just opened.
pub struct Opened {
    pub device: Arc<dyn BlockDevice>,
    pub parts: Parts,
}

/// Expand `{data_dir}` in a URI.
pub fn expand_uri(uri: &str, data_dir: &Path) -> String {
    uri.replace("{data_dir}", &data_dir.to_string_lossy())
}

/// `uri` with `size=` added when `size` is given, the scheme creates devices of a given size
/// (files, memory) and the URI does not say.
pub fn with_size(uri: &str, size: Option<u64>) -> String {
    let creates = ["file:", "mem:", "aio:", "uring:"]
        .iter()
        .any(|s| uri.starts_with(s));
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

/// A device error as an operation's error: its kind says whose fault it is.
fn open_error(volume: &str, e: strata_bdev::Error) -> OpError {
    OpError::new(
        OpKind::of(e.kind()),
        format!("open volume {volume:?}: {}", e.chain()),
    )
}

impl Manager {
    /// Open the volume `d` declares. Its size must be at least the declared size.
    pub(super) async fn open_decl(&self, d: &VolumeDecl) -> OpResult<Opened> {
        let size = (d.size > 0).then_some(d.size);
        let opened = match &d.backing {
            Backing::Device(uri) => {
                self.refuse_self("device", uri).await?;
                let uri = with_size(&expand_uri(uri, &self.data_dir), size);
                let device = self
                    .registry
                    .open(&uri)
                    .await
                    .map_err(|e| open_error(&d.name, e))?;
                Opened {
                    device,
                    parts: Parts::Device,
                }
            }
            Backing::Image(i) => {
                let image = self
                    .images
                    .open_volume(&d.name, i, size)
                    .await
                    .map_err(|e| open_error(&d.name, e))?;
                Opened {
                    device: image.clone(),
                    parts: Parts::Image(image),
                }
            }
            Backing::Nexus(n) => {
                let nexus = self.open_nexus(&d.name, n, size).await?;
                Opened {
                    device: nexus.clone(),
                    parts: Parts::Nexus(nexus),
                }
            }
        };
        let have = opened.device.geometry().size;
        if d.size > 0 && have < d.size {
            return Err(OpError::invalid(format!(
                "volume {:?} is declared with {} bytes but its device holds only {have}",
                d.name, d.size
            )));
        }
        Ok(opened)
    }

    /// Restore a nexus from its record (`{data_dir}/state/nexus-NAME.toml`): replicas that
    /// cannot be opened are faulted until they are onlined; one never known to be current is
    /// never read.
    async fn open_nexus(
        &self,
        name: &str,
        n: &NexusDecl,
        size: Option<u64>,
    ) -> OpResult<Arc<Nexus>> {
        for (i, r) in n.replicas.iter().enumerate() {
            self.refuse_self(&format!("replicas[{i}]"), r).await?;
        }
        let uris: Vec<String> = n
            .replicas
            .iter()
            .map(|r| expand_uri(r, &self.data_dir))
            .collect();
        let ledger = FileLedger::new(&self.data_dir, name);
        let record = ledger.load().map_err(|e| {
            OpError::new(
                OpKind::Internal,
                format!("open nexus volume {name:?}: {e:#}"),
            )
        })?;
        let open_uris: Vec<String> = uris.iter().map(|u| with_size(u, size)).collect();
        let opened = join_all(open_uris.iter().map(|u| open_device(&self.registry, u))).await;
        let sizes: Vec<Option<u64>> = opened
            .iter()
            .map(|d| d.as_ref().ok().map(|d| d.geometry().size))
            .collect();
        let children = uris
            .iter()
            .zip(opened)
            .map(|(uri, device)| {
                if let Err(e) = &device {
                    warn!(volume = %name, replica = %uri, error = %e.chain(), "replica cannot be opened; it is faulted until it is onlined");
                }
                RestoreChild {
                    name: uri.clone(),
                    device,
                }
            })
            .collect();
        let path = ledger.path().to_path_buf();
        let nexus = Nexus::restore(
            name.to_string(),
            children,
            record.as_ref(),
            n.settings.clone(),
            Some(Arc::new(ledger)),
        )
        .map_err(|e| {
            OpError::new(
                OpKind::Unavailable,
                format!(
                    "open nexus volume {name:?}: {e} (record: {})",
                    path.display()
                ),
            )
        })?;
        nexus.save_record().await.map_err(|e| {
            OpError::new(
                OpKind::Internal,
                format!("open nexus volume {name:?}: save its record: {e}"),
            )
        })?;
        let volume_bytes = nexus.geometry().size;
        for c in nexus.status().children {
            info!(volume = %name, replica = %c.name, state = %c.state, "replica");
        }
        for (uri, bytes) in uris.iter().zip(sizes) {
            if let Some(bytes) = bytes.filter(|&b| b > volume_bytes) {
                info!(volume = %name, replica = %uri, replica_bytes = bytes, volume_bytes,
                    "replica is larger than the volume, which is as large as its smallest replica; the rest is unused");
            }
        }
        Ok(Arc::new(nexus))
    }
}
