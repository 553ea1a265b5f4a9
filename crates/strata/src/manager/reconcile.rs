//! Reconciliation: making this node's volumes what the state store declares, again and again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_bdev::BlockDevice;
use tracing::{info, warn};

use super::{
    export_of, BackingDef, Managed, Manager, OpError, OpKind, OpResult, VolumeDef, VOLUMES,
};

impl Manager {
    /// The volume records in the state store: `(name, declaration)`.
    pub async fn records(&self) -> OpResult<Vec<VolumeDef>> {
        let mut out = Vec::new();
        for (key, value) in self.state.list(VOLUMES).await? {
            match serde_json::from_slice::<VolumeDef>(&value) {
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
        let mine: BTreeMap<String, VolumeDef> = records
            .into_iter()
            .filter(|d| d.node == self.node)
            .map(|d| (d.name.clone(), d))
            .collect();
        let mut problems = BTreeMap::new();
        for (name, def) in &mine {
            let current = self
                .volumes
                .read()
                .expect("lock poisoned")
                .get(name)
                .cloned();
            let result = match current {
                None => match self.open_def(def).await {
                    Ok(m) => {
                        info!(volume = %name, kind = def.kind(), "volume opened as the state store declares");
                        self.insert(m);
                        Ok(())
                    }
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
            .filter(|m| !m.from_config && !mine.contains_key(&m.volume.name))
            .collect();
        for m in gone {
            info!(volume = %m.volume.name, "volume is no longer declared for this node; closing it");
            self.close_volume(m, false).await;
        }
        *self.problems.write().expect("lock poisoned") = problems;
        self.heal().await;
        self.mirror_health().await;
        Ok(())
    }

    /// Change an open volume to match `want` where that is safe.
    async fn converge(&self, m: &Arc<Managed>, want: &VolumeDef) -> Result<(), String> {
        let have = m.def();
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
            (BackingDef::Device(a), BackingDef::Device(b)) if a != b => {
                return Err(format!(
                    "its device is {a}; moving it to {b} is not done in place: copy the data and \
                     create a new volume"
                ))
            }
            (BackingDef::Image(a), BackingDef::Image(b)) if a != b => {
                return Err(format!(
                    "it is image {a}; the declaration names {b}: clone or copy it instead"
                ))
            }
            (BackingDef::Nexus(_), BackingDef::Nexus(wanted)) => {
                let n = m
                    .volume
                    .nexus()
                    .expect("a nexus volume has a nexus")
                    .clone();
                let children: Vec<String> =
                    n.status().children.into_iter().map(|c| c.name).collect();
                for uri in wanted.iter().filter(|u| !children.contains(u)) {
                    let size = Some(n.geometry().size);
                    let dev = crate::volume::open_device(
                        &self.registry,
                        &crate::volume::with_size(uri, size),
                    )
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
            match m.volume.image() {
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
        if (have.export, have.read_only, &have.description)
            != (want.export, want.read_only, &want.description)
        {
            self.server.remove_export(name);
            if want.export {
                self.server.add_export(export_of(m, want));
            }
        }
        *m.def.lock().expect("lock poisoned") = want.clone();
        Ok(())
    }

    /// Try to bring back faulted replicas of declared nexus volumes, backing off from 5 s to
    /// 5 min per replica.
    async fn heal(&self) {
        for m in self.volumes().into_iter().filter(|m| !m.from_config) {
            let Some(n) = m.volume.nexus() else { continue };
            for c in n.status().children {
                if !matches!(c.state, strata_nexus::ChildState::Faulted(_)) {
                    continue;
                }
                let key = (m.volume.name.clone(), c.name.clone());
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
                        info!(volume = %m.volume.name, replica = %c.name, "faulted replica reopened; rebuilding it");
                        self.retry.lock().expect("lock poisoned").remove(&key);
                    }
                    Err(e) => {
                        warn!(volume = %m.volume.name, replica = %c.name, error = %e, retry_in = ?wait, "faulted replica still cannot be reopened")
                    }
                }
            }
        }
    }

    /// Bring a replica back online: a faulted one is closed and reopened from its URI first.
    pub async fn online(&self, n: &Arc<strata_nexus::Nexus>, child: &str) -> OpResult<()> {
        let faulted = matches!(
            n.status().child(child).map(|c| &c.state),
            Some(strata_nexus::ChildState::Faulted(_))
        );
        if faulted {
            // Its device failed: close it (releasing locks and connections), open it again.
            let old = n.close_device(child)?;
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            let dev = crate::volume::open_device(&self.registry, child)
                .await
                .map_err(|e| {
                    OpError::new(
                        OpKind::Unavailable,
                        format!("reopen replica {child}: {} (it stays faulted)", e.chain()),
                    )
                })?;
            n.replace_device(child, dev)?;
        }
        n.online_child(child)?;
        n.save_record()
            .await
            .map_err(|e| OpError::new(OpKind::Internal, format!("save the nexus record: {e}")))?;
        Ok(())
    }

    /// Copy the state of this node's nexus volumes to `health/NODE.VOLUME` in the state store,
    /// so that a cluster sees it (the authoritative record, which fences stale replicas, is
    /// the local ledger: a fault must never wait on the network).
    async fn mirror_health(&self) {
        for m in self.volumes() {
            let Some(n) = m.volume.nexus() else { continue };
            let children: Vec<serde_json::Value> = n
                .status()
                .children
                .iter()
                .map(|c| serde_json::json!({"uri": c.name, "state": c.state.to_string()}))
                .collect();
            let value = serde_json::to_vec(&children).expect("JSON serializes");
            let key = format!("health/{}.{}", self.node, m.volume.name);
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

    /// Reconcile now and then every `every`, until the task is dropped.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut unavailable = false;
        loop {
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
            tokio::time::sleep(every).await;
        }
    }
}
