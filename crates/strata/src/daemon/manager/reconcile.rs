//! Reconciliation: making this node's volumes what the state store declares, again and again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_bdev::BlockDevice;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::open::{open_device, with_size};
use super::{Backing, Managed, Manager, OpResult, VolumeDecl, VOLUMES};

impl Manager {
    /// The volume records in the state store: `(name, declaration)`.
    pub async fn records(&self) -> OpResult<Vec<VolumeDecl>> {
        let mut out = Vec::new();
        for (key, value) in self.state.list(VOLUMES).await? {
            match serde_json::from_slice::<VolumeDecl>(&value) {
                Ok(mut d) => {
                    if d.node.is_empty() {
                        d.node = self.node.clone();
                    }
                    out.push(d);
                }
                Err(e) => warn!(%key, error = %e, "state store record is not a volume; ignored"),
            }
        }
        Ok(out)
    }

    /// Make this node's volumes what the state store declares: open the missing ones, add and
    /// remove replicas, grow images, change exports, close the ones no longer declared, and
    /// try again to bring back faulted replicas (with backoff). What cannot be done is logged
    /// and kept in [`Manager::problems`]; the rest goes on.
    pub async fn reconcile(&self) -> OpResult<()> {
        let _changing = self.changes.lock().await;
        self.reconcile_stores().await?;
        let records = self.records().await?;
        let mine: BTreeMap<String, VolumeDecl> = records
            .into_iter()
            .filter(|d| d.node == self.node)
            .map(|d| (d.name.clone(), d))
            .collect();
        let mut problems = BTreeMap::new();
        for (name, def) in &mine {
            let result = match self.lookup(name) {
                None => match self.open_managed(def, false).await {
                    Ok(m) => match self.insert(m).await {
                        Ok(()) => {
                            info!(volume = %name, kind = def.kind(), "volume opened as the state store declares");
                            Ok(())
                        }
                        Err(e) => Err(e.message),
                    },
                    Err(e) => Err(e.message),
                },
                Some(m) if m.from_config => Err(
                    "the configuration file declares this volume too; its declaration wins"
                        .to_string(),
                ),
                Some(m) => self.converge(&m, def).await,
            };
            if let Err(why) = result {
                let known = self.problems.read().expect("lock poisoned").get(name) == Some(&why);
                if !known {
                    warn!(volume = %name, problem = %why, "cannot make the volume what its declaration says; will retry");
                }
                problems.insert(name.clone(), why);
            }
        }
        // Volumes no longer declared here are closed (their data stays).
        let gone: Vec<Arc<Managed>> = self
            .volumes()
            .into_iter()
            .filter(|m| !m.from_config && !mine.contains_key(&m.name))
            .collect();
        for m in gone {
            info!(volume = %m.name, "volume is no longer declared for this node; closing it");
            self.close_volume(m, false).await;
        }
        *self.problems.write().expect("lock poisoned") = problems;
        self.heal().await;
        self.mirror_health().await;
        self.images.close_idle().await;
        Ok(())
    }

    /// Change an open volume to match `want` where that is safe.
    async fn converge(&self, m: &Arc<Managed>, want: &VolumeDecl) -> Result<(), String> {
        let have = m.decl();
        let name = &want.name;
        let same_kind =
            std::mem::discriminant(&have.backing) == std::mem::discriminant(&want.backing);
        match (&have.backing, &want.backing) {
            _ if !same_kind => {
                return Err(format!(
                    "it is a {} volume and the declaration says {}: delete it and create it again",
                    have.kind(),
                    want.kind()
                ))
            }
            (Backing::Device(a), Backing::Device(b)) if a != b => {
                return Err(format!(
                    "its device is {a}; moving it to {b} is not done in place: copy the data and \
                     create a new volume"
                ))
            }
            (Backing::Image(a), Backing::Image(b)) if a.key != b.key => {
                return Err(format!(
                    "it is image {}; the declaration names {}: clone or copy it instead",
                    a.key, b.key
                ))
            }
            (Backing::Nexus(had), Backing::Nexus(wanted)) => {
                if had.settings != wanted.settings {
                    return Err(
                        "its nexus settings differ from the declaration's; they take effect when \
                         the volume is opened again"
                            .to_string(),
                    );
                }
                let wanted = &wanted.replicas;
                let n = m.nexus().expect("a nexus volume has a nexus").clone();
                let children: Vec<String> =
                    n.status().children.into_iter().map(|c| c.name).collect();
                for uri in wanted.iter().filter(|u| !children.contains(u)) {
                    let size = Some(n.geometry().size);
                    let dev = open_device(&self.registry, &with_size(uri, size))
                        .await
                        .map_err(|e| format!("add replica {uri}: {}", e.chain()))?;
                    n.add_child(uri.clone(), dev)
                        .map_err(|e| format!("add replica {uri}: {e}"))?;
                    info!(volume = %name, replica = %uri, "replica added; full rebuild started");
                }
                for uri in children.iter().filter(|u| !wanted.contains(u)) {
                    n.remove_child(uri)
                        .map_err(|e| format!("remove replica {uri}: {e}"))?;
                    info!(volume = %name, replica = %uri, "replica removed");
                }
                n.save_record()
                    .await
                    .map_err(|e| format!("save the nexus record: {e}"))?;
            }
            _ => {}
        }
        let size = m.device.geometry().size;
        if want.size != 0 && want.size != size {
            match m.image() {
                Some(i) if want.size > size => {
                    i.resize(want.size, false)
                        .await
                        .map_err(|e| format!("grow to {} bytes: {}", want.size, e.chain()))?;
                    info!(volume = %name, from = size, to = want.size, "volume grown");
                }
                Some(_) => {
                    return Err(format!(
                        "it holds {size} bytes and the declaration says {}: shrinking discards \
                         data, so it is only done by `strata volume resize --force`",
                        want.size
                    ))
                }
                None => {
                    return Err(format!(
                        "it holds {size} bytes and the declaration says {}: only page-store \
                         image volumes can be resized",
                        want.size
                    ))
                }
            }
        }
        if (
            &have.exports,
            have.read_only,
            &have.description,
            &have.nvmf_hosts,
        ) != (
            &want.exports,
            want.read_only,
            &want.description,
            &want.nvmf_hosts,
        ) {
            let refused = self.exports.apply(&want.exports, &m.exported(want)).await;
            if !refused.is_empty() {
                return Err(format!("export it: {}", refused.join("; ")));
            }
        }
        m.set_decl(want.clone());
        Ok(())
    }

    /// Try to bring back faulted replicas of declared nexus volumes, backing off from 5 s to
    /// 5 min per replica.
    async fn heal(&self) {
        for m in self.volumes().into_iter().filter(|m| !m.from_config) {
            let Some(n) = m.nexus() else { continue };
            for c in n.status().children {
                if !matches!(c.state, strata_nexus::ChildState::Faulted(_)) {
                    continue;
                }
                let key = (m.name.clone(), c.name.clone());
                let now = Instant::now();
                let wait = {
                    let retry = self.retry.lock().expect("lock poisoned");
                    match retry.get(&key) {
                        Some((at, _)) if *at > now => continue,
                        Some((_, wait)) => (*wait * 2).min(Duration::from_secs(300)),
                        None => Duration::from_secs(5),
                    }
                };
                self.retry
                    .lock()
                    .expect("lock poisoned")
                    .insert(key.clone(), (now + wait, wait));
                match self.online(n, &c.name).await {
                    Ok(()) => {
                        info!(volume = %m.name, replica = %c.name, "faulted replica reopened; rebuilding it");
                        self.retry.lock().expect("lock poisoned").remove(&key);
                    }
                    Err(e) => {
                        warn!(volume = %m.name, replica = %c.name, error = %e, retry_in = ?wait, "faulted replica still cannot be reopened")
                    }
                }
            }
        }
    }

    /// Copy the state of this node's nexus volumes to `health/NODE.VOLUME` in the state store,
    /// so that a cluster sees it (the authoritative record, which fences stale replicas, is
    /// the local ledger: a fault must never wait on the network).
    async fn mirror_health(&self) {
        for m in self.volumes() {
            let Some(n) = m.nexus() else { continue };
            let children: Vec<serde_json::Value> = n
                .status()
                .children
                .iter()
                .map(|c| serde_json::json!({"uri": c.name, "state": c.state.to_string()}))
                .collect();
            let value = serde_json::to_vec(&children).expect("JSON serializes");
            let key = format!("health/{}.{}", self.node, m.name);
            if self.health.lock().expect("lock poisoned").get(&key) == Some(&value) {
                continue;
            }
            if self.state.put(&key, &value).await.is_ok() {
                self.health
                    .lock()
                    .expect("lock poisoned")
                    .insert(key, value);
            }
        }
    }

    /// Reconcile now and then every `every`, until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut unavailable = false;
        while !stop.is_cancelled() {
            match self.reconcile().await {
                Ok(()) if unavailable => {
                    info!(store = %self.state.describe(), "state store is reachable again");
                    unavailable = false;
                }
                Ok(()) => {}
                Err(e) if !unavailable => {
                    warn!(error = %e, "cannot read the desired state; volumes keep serving and changes are refused until it is back");
                    unavailable = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
