//! A nexus volume's replicas and rebuilds. A change to the replica list is made under the change
//! lock and recorded in the declaration before the lock is released, so that reconciliation
//! never undoes it; what the nexus needs durable (its record) is saved before the call returns.

use std::sync::Arc;

use strata_bdev::BlockDevice;
use strata_nexus::{ChildState, Nexus, RebuildKind, RebuildProgress};
use tracing::info;

use super::open::{open_device, with_size};
use super::{Backing, Caller, Managed, Manager, OpError, OpKind, OpResult, MAX_PLACED};
use crate::format::human_bytes;

/// A replica of a nexus volume: its place in the list and its URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRef {
    pub index: usize,
    pub uri: String,
}

impl Manager {
    /// The nexus of volume `volume`.
    pub fn nexus_of(&self, volume: &str) -> OpResult<(Arc<Managed>, Arc<Nexus>)> {
        let m = self.get(volume)?;
        let n = m.nexus().cloned().ok_or_else(|| {
            OpError::precondition(format!(
                "volume {volume:?} is a {} volume, not a nexus: it has no replicas",
                m.decl().kind()
            ))
        })?;
        Ok((m, n))
    }

    /// The replica `child` names in `n`: its URI, else its index.
    pub fn child(n: &Nexus, child: &str) -> OpResult<ChildRef> {
        let kids = n.status().children;
        if let Some(index) = kids.iter().position(|c| c.name == child) {
            return Ok(ChildRef {
                index,
                uri: child.to_string(),
            });
        }
        if let Some(index) = child.parse::<usize>().ok().filter(|&i| i < kids.len()) {
            return Ok(ChildRef {
                index,
                uri: kids[index].name.clone(),
            });
        }
        let list: Vec<String> = kids
            .iter()
            .enumerate()
            .map(|(i, c)| format!("#{i} {}", c.name))
            .collect();
        Err(OpError::not_found(format!(
            "volume {:?} has no replica {child:?} (give its index or URI: {})",
            n.name(),
            list.join(", ")
        )))
    }

    /// `(nexus, replica)` for a call naming a volume and one of its replicas.
    fn nexus_child(
        &self,
        volume: &str,
        child: &str,
    ) -> OpResult<(Arc<Managed>, Arc<Nexus>, ChildRef)> {
        let (m, n) = self.nexus_of(volume)?;
        let c = Self::child(&n, child)?;
        Ok((m, n, c))
    }

    /// Save a nexus's record: which replicas hold current data.
    async fn save_nexus(n: &Nexus) -> OpResult<()> {
        n.save_record()
            .await
            .map_err(|e| OpError::new(OpKind::Internal, format!("save the nexus record: {e}")))
    }

    /// Record the nexus's replica list (and how many there are of those the daemon placed) in
    /// the volume's declaration.
    async fn record_replicas(&self, m: &Managed, n: &Nexus) -> OpResult<()> {
        let mut d = m.decl();
        if let Backing::Nexus(decl) = &mut d.backing {
            decl.replicas = n.status().children.into_iter().map(|c| c.name).collect();
            if let Some(p) = &mut decl.placed {
                p.count = decl.replicas.len() as u32;
            }
        }
        self.redeclare(m, d).await
    }

    /// Add a replica (made as large as the volume when a `file://` or `mem://` URI does not
    /// say); a full rebuild copies the data onto it.
    pub async fn add_child(
        &self,
        volume: &str,
        uri: &str,
        caller: &Caller,
    ) -> OpResult<(ChildRef, String)> {
        strata_bdev::DeviceUri::parse(uri)
            .map_err(|e| OpError::invalid(format!("child: {}", e.chain())))?;
        self.allow_uri(caller, "child", uri)?;
        self.refuse_self("child", uri).await?;
        let (m, n) = self.nexus_of(volume)?;
        let _changing = self.changes.lock().await;
        self.check_declarable(&m, "the replicas").await?;
        let size = Some(n.geometry().size);
        let dev = open_device(&self.registry, &with_size(uri, size))
            .await
            .map_err(|e| {
                let e = OpError::from(e);
                OpError::new(e.kind, format!("add replica to {volume:?}: {}", e.message))
            })?;
        n.add_child(uri.to_string(), dev)?;
        Self::save_nexus(&n).await?;
        if let Err(e) = self.record_replicas(&m, &n).await {
            // Not declared, it would be removed again by reconciliation: undo it now.
            let _ = n.remove_child(uri);
            let _ = n.save_record().await;
            return Err(e);
        }
        let c = Self::child(&n, uri)?;
        let msg = format!(
            "volume {volume}: replica {uri} added; full rebuild of {} started",
            human_bytes(n.geometry().size)
        );
        info!("{msg}");
        Ok((c, msg))
    }

    /// Make a volume whose replicas the daemon placed have `count` replicas: new ones are
    /// placed and fully rebuilt; removed ones (not online first, then the newest) are deleted.
    pub async fn set_replica_count(&self, volume: &str, count: u32) -> OpResult<String> {
        let (m, n) = self.nexus_of(volume)?;
        let _changing = self.changes.lock().await;
        let mut d = m.decl();
        let Backing::Nexus(nd) = &mut d.backing else {
            return Err(OpError::precondition(format!(
                "volume {volume:?} is not a nexus"
            )));
        };
        let Some(placed) = nd.placed else {
            return Err(OpError::precondition(format!(
                "volume {volume:?} names its replicas by URI: add or remove them one by one \
                 (`strata child add|remove`)"
            )));
        };
        if !(1..=MAX_PLACED).contains(&count) {
            return Err(OpError::invalid(format!(
                "count: {count} is not from 1 to {MAX_PLACED}"
            )));
        }
        self.check_declarable(&m, "the replicas").await?;
        let kids = n.status().children;
        let current = kids.len() as u32;
        let names: Vec<String> = kids.iter().map(|c| c.name.clone()).collect();
        let msg = if count > current {
            let size = n.geometry().size;
            let uris = self.place(volume, size, count - current, placed.preallocate, &names)?;
            for (i, uri) in uris.iter().enumerate() {
                let added = match open_device(&self.registry, uri).await {
                    Ok(dev) => n.add_child(uri.clone(), dev).map_err(OpError::from),
                    Err(e) => Err(OpError::from(e)),
                };
                if let Err(e) = added {
                    self.unplace(&uris[i..]);
                    let _ = Self::save_nexus(&n).await;
                    self.record_replicas(&m, &n).await?;
                    return Err(e.context(&format!("add a replica to {volume:?}")));
                }
            }
            format!(
                "volume {volume}: {} replicas placed; full rebuilds of {} started",
                uris.len(),
                human_bytes(size)
            )
        } else if count < current {
            // Replicas that are not online go first, then the newest.
            let mut order: Vec<(bool, usize, String)> = kids
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        c.state == ChildState::Online,
                        usize::MAX - i,
                        c.name.clone(),
                    )
                })
                .collect();
            order.sort();
            let mut removed = Vec::new();
            for (_, _, name) in order.into_iter().take((current - count) as usize) {
                if let Err(e) = n.remove_child(&name) {
                    let _ = Self::save_nexus(&n).await;
                    self.record_replicas(&m, &n).await?;
                    self.unplace(&removed);
                    return Err(e.into());
                }
                removed.push(name);
            }
            Self::save_nexus(&n).await?;
            self.unplace(&removed);
            format!("volume {volume}: {} replicas removed", removed.len())
        } else {
            format!("volume {volume} has {count} replicas already")
        };
        Self::save_nexus(&n).await?;
        self.record_replicas(&m, &n).await?;
        info!("{msg}");
        Ok(msg)
    }

    /// Remove a replica (its data stays on the device); refused for the last healthy one.
    pub async fn remove_child(&self, volume: &str, child: &str) -> OpResult<String> {
        let (m, n, c) = self.nexus_child(volume, child)?;
        let _changing = self.changes.lock().await;
        self.check_declarable(&m, "the replicas").await?;
        n.remove_child(&c.uri)?;
        Self::save_nexus(&n).await?;
        self.record_replicas(&m, &n).await?;
        let msg = format!("volume {volume}: replica #{} {} removed", c.index, c.uri);
        info!("{msg}");
        Ok(msg)
    }

    /// Take a replica out of service; what it misses is recorded.
    pub async fn offline_child(&self, volume: &str, child: &str) -> OpResult<(ChildRef, String)> {
        let (_, n, c) = self.nexus_child(volume, child)?;
        n.offline_child(&c.uri)?;
        Self::save_nexus(&n).await?;
        let msg = format!("volume {volume}: replica #{} {} is offline", c.index, c.uri);
        info!("{msg}");
        Ok((c, msg))
    }

    /// Fault a replica, as a failed I/O would.
    pub async fn fault_child(
        &self,
        volume: &str,
        child: &str,
        reason: Option<String>,
    ) -> OpResult<(ChildRef, String)> {
        let (_, n, c) = self.nexus_child(volume, child)?;
        let reason = reason
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "faulted by the operator".to_string());
        n.fault_child(&c.uri, reason)?;
        Self::save_nexus(&n).await?;
        let msg = format!("volume {volume}: replica #{} {} is faulted", c.index, c.uri);
        info!("{msg}");
        Ok((c, msg))
    }

    /// Bring a replica back: a partial rebuild when what it missed is known, else a full one.
    pub async fn online_child(&self, volume: &str, child: &str) -> OpResult<(ChildRef, String)> {
        let (_, n, c) = self.nexus_child(volume, child)?;
        self.online(&n, &c.uri).await?;
        let what = match n.status().child(&c.uri).and_then(|s| s.rebuild.clone()) {
            Some(p) => format!(
                "{} rebuild of {} started",
                kind_name(&p),
                human_bytes(p.total_bytes)
            ),
            None => "rebuild started".into(),
        };
        let msg = format!("volume {volume}: replica #{} {}: {what}", c.index, c.uri);
        info!("{msg}");
        Ok((c, msg))
    }

    /// Start a rebuild of an offline, faulted or cancelled replica.
    pub async fn start_rebuild(&self, volume: &str, child: &str) -> OpResult<(ChildRef, String)> {
        let (_, n, c) = self.nexus_child(volume, child)?;
        match n.status().child(&c.uri).map(|s| s.state.clone()) {
            Some(ChildState::Online) => {
                return Err(OpError::precondition(format!(
                    "replica #{} of {volume} is online: nothing to rebuild (offline it first to \
                     rebuild it)",
                    c.index
                )))
            }
            Some(ChildState::Rebuilding) => {
                return Err(OpError::precondition(format!(
                    "replica #{} of {volume} is being rebuilt already (`strata rebuild watch`)",
                    c.index
                )))
            }
            _ => {}
        }
        self.online_child(volume, child).await
    }

    pub fn pause_rebuild(&self, volume: &str, child: &str) -> OpResult<(ChildRef, String)> {
        let (_, n, c) = self.nexus_child(volume, child)?;
        n.pause_rebuild(&c.uri)?;
        let msg = format!("volume {volume}: rebuild of replica #{} paused", c.index);
        info!("{msg}");
        Ok((c, msg))
    }

    pub fn resume_rebuild(&self, volume: &str, child: &str) -> OpResult<(ChildRef, String)> {
        let (_, n, c) = self.nexus_child(volume, child)?;
        n.resume_rebuild(&c.uri)?;
        let msg = format!("volume {volume}: rebuild of replica #{} resumed", c.index);
        info!("{msg}");
        Ok((c, msg))
    }

    pub fn cancel_rebuild(&self, volume: &str, child: &str) -> OpResult<(ChildRef, String)> {
        let (_, n, c) = self.nexus_child(volume, child)?;
        n.cancel_rebuild(&c.uri)?;
        let msg = format!(
            "volume {volume}: rebuild of replica #{} cancelled; it goes offline",
            c.index
        );
        info!("{msg}");
        Ok((c, msg))
    }

    /// The replica's last rebuild, and the nexus to follow it in.
    pub fn rebuild(
        &self,
        volume: &str,
        child: &str,
    ) -> OpResult<(Arc<Nexus>, ChildRef, RebuildProgress)> {
        let (_, n, c) = self.nexus_child(volume, child)?;
        let p = n
            .status()
            .child(&c.uri)
            .and_then(|s| s.rebuild.clone())
            .ok_or_else(|| {
                OpError::not_found(format!(
                    "replica #{} of {volume} has had no rebuild since the daemon started",
                    c.index
                ))
            })?;
        Ok((n, c, p))
    }

    /// Bring a replica back online: a faulted one is closed and reopened from its URI first.
    pub async fn online(&self, n: &Arc<Nexus>, child: &str) -> OpResult<()> {
        let faulted = matches!(
            n.status().child(child).map(|c| &c.state),
            Some(ChildState::Faulted(_))
        );
        if faulted {
            // Its device failed: close it (releasing locks and connections), open it again.
            let old = n.close_device(child)?;
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            let dev = open_device(&self.registry, child).await.map_err(|e| {
                OpError::new(
                    OpKind::Unavailable,
                    format!("reopen replica {child}: {} (it stays faulted)", e.chain()),
                )
            })?;
            n.replace_device(child, dev)?;
        }
        n.online_child(child)?;
        Self::save_nexus(n).await
    }
}

/// "partial" or "full".
pub fn kind_name(p: &RebuildProgress) -> &'static str {
    match p.kind {
        RebuildKind::Partial => "partial",
        RebuildKind::Full => "full",
    }
}
