//! Placement: where the replicas of a volume declared with a replica count (rather than URIs)
//! go. On one node they are files in the configured `[[pool]]` directories — one per pool while
//! there are enough pools, the pools with the most free space first — or in
//! `{data_dir}/replicas` when none is configured. The daemon creates them (sparse, or with every
//! block allocated), owns them, and deletes them when the volume or the replica goes.
//!
//! In a cluster (other live nodes in the state store), a new volume's replicas go to distinct
//! nodes: one on this node (the nexus's), the others on live nodes with an NVMe/TCP listener and
//! a pool with room, spread across the `[cluster] topology_key` label, most free space first.
//! A replica on another node is declared there as a volume of its own — a file in that node's
//! pool, exported over NVMe/TCP only to the cluster's nodes (their host NQNs) — which that
//! node's reconciliation opens; the nexus names it `nvmf://ADDR/NQN?hostnqn=…` and, like any
//! replica that is not there yet, brings it online with a rebuild. The rest of the manager sees
//! only URIs.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{info, warn};

use super::nodes::NodeStatus;
use super::{Backing, Manager, OpError, OpKind, OpResult, Placed, Pool, Protocol, VolumeDecl};

/// How long a new volume waits for the other nodes to export its replicas.
const REMOTE_READY: std::time::Duration = std::time::Duration::from_secs(20);

/// The label naming the volume a replica declared on another node belongs to.
pub const REPLICA_OF: &str = "strata.io/replica-of";

/// The NVMe host NQN a node connects to other nodes' replicas with.
pub fn host_nqn(node: &str) -> String {
    format!("nqn.2026-12.io.strata:node:{node}")
}

/// A pool and the space of the filesystem it is on.
#[derive(Debug, Clone)]
pub struct PoolSpace {
    pub name: String,
    pub path: PathBuf,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Allocated by the files directly in the pool's directory (the replicas placed there).
    pub used_bytes: u64,
}

/// The bytes allocated to the regular files directly in `dir` (sparse files count what they
/// hold, not their size).
fn used(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Total and free bytes of the filesystem holding `path`.
fn space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

/// File names differ even for replicas of volumes of the same name made in the same instant.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

impl Manager {
    /// The pools placed replicas go to: the configured ones, else `{data_dir}/replicas`.
    fn placement_pools(&self) -> Vec<Pool> {
        if self.pools.is_empty() {
            vec![Pool {
                name: "data_dir".into(),
                path: self.data_dir.join("replicas"),
            }]
        } else {
            self.pools.clone()
        }
    }

    /// The pools with their space.
    pub fn pool_space(&self) -> Vec<PoolSpace> {
        self.placement_pools()
            .into_iter()
            .map(|p| {
                let (total_bytes, free_bytes) = space(&p.path)
                    .or_else(|| p.path.parent().and_then(space))
                    .unwrap_or((0, 0));
                PoolSpace {
                    used_bytes: used(&p.path),
                    name: p.name,
                    path: p.path,
                    total_bytes,
                    free_bytes,
                }
            })
            .collect()
    }

    /// Create `count` replica files of `size` bytes for volume `volume`, in distinct pools while
    /// there are enough, avoiding the pools of `taken` (existing replicas' URIs) first; their
    /// URIs. On failure, the files made so far are removed.
    pub(super) fn place(
        &self,
        volume: &str,
        size: u64,
        count: u32,
        preallocate: bool,
        taken: &[String],
    ) -> OpResult<Vec<String>> {
        let mut pools = self.pool_space();
        // Most free space first; pools already holding a replica of this volume last.
        let used = |p: &PoolSpace| {
            taken
                .iter()
                .filter(|u| placed_path(u).is_some_and(|f| f.parent() == Some(p.path.as_path())))
                .count()
        };
        pools.sort_by_key(|p| (used(p), std::cmp::Reverse(p.free_bytes)));
        let mut made: Vec<PathBuf> = Vec::new();
        for i in 0..count as usize {
            let pool = &pools[i % pools.len()];
            match create_replica(&pool.path, volume, size, preallocate) {
                Ok(path) => made.push(path),
                Err(e) => {
                    for f in &made {
                        let _ = std::fs::remove_file(f);
                    }
                    return Err(e);
                }
            }
        }
        info!(volume, count, size, "replicas placed");
        Ok(made
            .iter()
            .map(|p| format!("file://{}", p.display()))
            .collect())
    }

    /// Place the replicas of a new volume: on distinct nodes when other nodes are alive in the
    /// state store (see the module documentation), else in this node's pools. On failure,
    /// what was placed is removed.
    pub(super) async fn place_volume(
        &self,
        volume: &str,
        size: u64,
        p: Placed,
        topology_key: &str,
    ) -> OpResult<Vec<String>> {
        let nodes = self.nodes().await.unwrap_or_default();
        let others: Vec<&NodeStatus> = nodes
            .iter()
            .filter(|n| n.alive && n.record.name != self.node)
            .collect();
        if p.count <= 1 || others.is_empty() {
            return self.place(volume, size, p.count, p.preallocate, &[]);
        }
        let own_zone = nodes
            .iter()
            .find(|n| n.record.name == self.node)
            .and_then(|n| n.record.labels.get(topology_key).cloned());
        let chosen = choose_nodes(own_zone, others, p.count as usize - 1, size, topology_key);
        if chosen.len() + 1 < p.count as usize {
            let alive: Vec<&str> = nodes
                .iter()
                .filter(|n| n.alive)
                .map(|n| n.record.name.as_str())
                .collect();
            return Err(OpError::precondition(format!(
                "{} replicas of {volume:?} need {} nodes with an NVMe/TCP listener and a pool with {size} bytes \
                 free; alive: {}",
                p.count,
                p.count,
                alive.join(", ")
            )));
        }
        let hosts: Vec<String> = nodes.iter().map(|n| host_nqn(&n.record.name)).collect();
        // NVMe namespaces have 512-byte blocks: the local replica advertises the same, so
        // that every replica fits the nexus whichever opens first.
        let mut uris: Vec<String> = self
            .place(volume, size, 1, p.preallocate, &[])?
            .into_iter()
            .map(|u| match u.strip_prefix("file://") {
                Some(path) => format!("aio://{path}?blk_size=512"),
                None => u,
            })
            .collect();
        let mut declared: Vec<String> = Vec::new();
        for n in chosen {
            match self.declare_remote_replica(volume, size, n, &hosts).await {
                Ok((name, uri)) => {
                    declared.push(name);
                    uris.push(uri);
                }
                Err(e) => {
                    self.unplace(&uris[..1]);
                    for name in &declared {
                        let _ = self.undeclare(name).await;
                    }
                    return Err(e);
                }
            }
        }
        // Each node exports its replica when its reconciliation sees the declaration; the
        // nexus opens with every replica there, or brings a late one online with a rebuild.
        let deadline = tokio::time::Instant::now() + REMOTE_READY;
        for uri in &uris[1..] {
            while tokio::time::Instant::now() < deadline {
                if super::open::open_device(&self.registry, uri).await.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        info!(
            volume,
            count = p.count,
            size,
            "replicas placed on distinct nodes"
        );
        Ok(uris)
    }

    /// Declare a replica of `volume` on node `n`: a file in its pool with the most free space,
    /// exported over NVMe/TCP to `hosts`. Its volume name and the URI the nexus opens it by.
    async fn declare_remote_replica(
        &self,
        volume: &str,
        size: u64,
        n: &NodeStatus,
        hosts: &[String],
    ) -> OpResult<(String, String)> {
        let pool = n
            .record
            .pools
            .iter()
            .max_by_key(|p| p.free_bytes)
            .ok_or_else(|| OpError::precondition(format!("node {} has no pool", n.record.name)))?;
        let addr = n
            .record
            .addresses
            .get("nvmf")
            .and_then(|a| a.first())
            .ok_or_else(|| {
                OpError::precondition(format!("node {} serves no NVMe/TCP", n.record.name))
            })?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let short: String = volume.chars().take(40).collect();
        let name = format!("{short}.r{stamp:x}{seq:x}");
        let mut labels = std::collections::BTreeMap::new();
        labels.insert(REPLICA_OF.to_string(), volume.to_string());
        let decl = VolumeDecl {
            name: name.clone(),
            size,
            backing: Backing::Device(format!("file://{}/{name}.img", pool.path)),
            exports: [Protocol::Nvmf].into_iter().collect(),
            read_only: false,
            description: format!("replica of {volume} (its nexus is on node {})", self.node),
            node: n.record.name.clone(),
            nvmf_hosts: hosts.to_vec(),
            labels,
        };
        self.save(&decl).await?;
        let uri = format!(
            "nvmf://{addr}/{}?hostnqn={}",
            crate::daemon::exports::nqn(&name),
            host_nqn(&self.node)
        );
        info!(volume, replica = %uri, node = %n.record.name, "replica declared on another node");
        Ok((name, uri))
    }

    /// Remove placed replicas: this node's files, and the declarations of those on other nodes
    /// (whose reconciliation then closes them and deletes their files).
    pub(super) async fn unplace_all(&self, uris: &[String]) {
        self.unplace(uris);
        for uri in uris {
            if let Some(name) = remote_replica(uri) {
                if let Err(e) = self.undeclare(&name).await {
                    warn!(replica = %uri, error = %e, "remove the declaration of a replica on another node");
                }
            }
        }
    }

    /// Delete replica files the daemon placed (those inside its pools; other URIs are left).
    pub(super) fn unplace(&self, uris: &[String]) {
        let pools: Vec<PathBuf> = self
            .placement_pools()
            .iter()
            .filter_map(|p| std::fs::canonicalize(&p.path).ok())
            .collect();
        for uri in uris {
            let Some(path) = placed_path(uri) else {
                continue;
            };
            let inside = path
                .parent()
                .and_then(|d| std::fs::canonicalize(d).ok())
                .is_some_and(|d| pools.contains(&d));
            if !inside {
                warn!(replica = %uri, "not in a pool: left in place");
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => info!(replica = %uri, "placed replica deleted"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(replica = %uri, error = %e, "delete a placed replica"),
            }
        }
    }
}

/// Up to `count` of `candidates` for replicas of `size` bytes: nodes with an NVMe/TCP listener
/// and a pool with room, a value of `topology_key` not used yet first (this node's is
/// `own_zone`; nodes without the label are each a zone of their own), then the most free space.
fn choose_nodes<'a>(
    own_zone: Option<String>,
    candidates: Vec<&'a NodeStatus>,
    count: usize,
    size: u64,
    topology_key: &str,
) -> Vec<&'a NodeStatus> {
    let zone = |n: &NodeStatus| n.record.labels.get(topology_key).cloned();
    let mut zones = vec![own_zone];
    let mut candidates: Vec<&NodeStatus> = candidates
        .into_iter()
        .filter(|n| {
            n.record.addresses.contains_key("nvmf")
                && n.record.pools.iter().any(|p| p.free_bytes >= size)
        })
        .collect();
    let mut chosen = Vec::new();
    while chosen.len() < count && !candidates.is_empty() {
        candidates.sort_by_key(|n| {
            let z = zone(n);
            let used = z.is_some() && zones.contains(&z);
            let free = n.record.pools.iter().map(|p| p.free_bytes).max();
            (used, std::cmp::Reverse(free), n.record.name.clone())
        });
        let n = candidates.remove(0);
        zones.push(zone(n));
        chosen.push(n);
    }
    chosen
}

/// The volume name of a replica placed on another node, from its URI
/// (`nvmf://ADDR/nqn.2026-12.io.strata:NAME?hostnqn=nqn.2026-12.io.strata:node:…`).
fn remote_replica(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("nvmf://")?;
    let (_, path) = rest.split_once('/')?;
    let nqn = path.split('?').next()?;
    let name = nqn.strip_prefix(crate::daemon::exports::NQN_PREFIX)?;
    let hosted = uri.contains(&format!("hostnqn={}", host_nqn("")));
    (hosted && !name.is_empty()).then(|| name.to_string())
}

/// The file of a placed replica's URI (`file:///path`, `aio:///path?blk_size=512`).
fn placed_path(uri: &str) -> Option<PathBuf> {
    let path = uri
        .strip_prefix("file://")
        .or_else(|| uri.strip_prefix("aio://"))?;
    let path = path.split('?').next()?;
    path.starts_with('/').then(|| PathBuf::from(path))
}

/// Create a new replica file (never an existing one: a replica must start as zeroes).
fn create_replica(dir: &Path, volume: &str, size: u64, preallocate: bool) -> OpResult<PathBuf> {
    let fail = |what: &str, e: std::io::Error| {
        let kind = if e.raw_os_error() == Some(libc::ENOSPC) {
            OpKind::Unavailable
        } else {
            OpKind::Internal
        };
        OpError::new(kind, format!("place a replica of {volume:?}: {what}: {e}"))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(&format!("create {}", dir.display()), e))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{volume}.{stamp:x}{seq:x}.img"));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| fail(&format!("create {}", path.display()), e))?;
    let sized = if preallocate {
        let len = i64::try_from(size).map_err(|_| {
            OpError::invalid(format!("size {size} is too large for a replica file"))
        })?;
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for writing for the duration of the call.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
            0 => Ok(()),
            errno => Err(std::io::Error::from_raw_os_error(errno)),
        }
    } else {
        file.set_len(size)
    };
    if let Err(e) = sized {
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(fail(
            &format!("allocate {size} bytes in {}", path.display()),
            e,
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(name: &str, zone: Option<&str>, free: u64, nvmf: bool) -> NodeStatus {
        use super::super::nodes::{NodeRecord, PoolRecord};
        let mut record = NodeRecord {
            name: name.into(),
            version: String::new(),
            addresses: Default::default(),
            protocols: Vec::new(),
            labels: Default::default(),
            pools: vec![PoolRecord {
                name: "p".into(),
                path: "/p".into(),
                total_bytes: free,
                used_bytes: 0,
                free_bytes: free,
            }],
            updated_unix_secs: 0,
        };
        if let Some(z) = zone {
            record.labels.insert("zone".into(), z.into());
        }
        if nvmf {
            record
                .addresses
                .insert("nvmf".into(), vec!["10.0.0.1:4420".into()]);
        }
        NodeStatus {
            record,
            alive: true,
        }
    }

    #[test]
    fn nodes_are_chosen_across_zones_then_by_free_space() {
        let b = node("b", Some("z1"), 900, true);
        let c = node("c", Some("z2"), 100, true);
        let d = node("d", Some("z2"), 500, true);
        let e = node("e", Some("z3"), 50, true);
        let small = node("f", Some("z4"), 10, true);
        let no_nvmf = node("g", Some("z5"), 900, false);
        let all = vec![&b, &c, &d, &e, &small, &no_nvmf];
        let names = |v: Vec<&NodeStatus>| -> Vec<String> {
            v.iter().map(|n| n.record.name.clone()).collect()
        };
        // This node is in z1: z2 and z3 first (d has more room than c), then z1 again.
        let chosen = choose_nodes(Some("z1".into()), all.clone(), 3, 20, "zone");
        assert_eq!(names(chosen), ["d", "e", "b"]);
        // Too few nodes with room and NVMe/TCP: as many as there are.
        let chosen = choose_nodes(None, all, 9, 20, "zone");
        assert_eq!(names(chosen), ["b", "d", "e", "c"]);
    }

    #[test]
    fn replica_files_are_new_sized_and_parsed_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = create_replica(dir.path(), "v", 1 << 20, false).unwrap();
        let b = create_replica(dir.path(), "v", 1 << 20, true).unwrap();
        assert_ne!(a, b);
        assert_eq!(std::fs::metadata(&a).unwrap().len(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        // Preallocated: every block is there.
        assert!(std::fs::metadata(&b).unwrap().blocks() * 512 >= 1 << 20);
        let uri = format!("file://{}", a.display());
        assert_eq!(placed_path(&uri).unwrap(), a);
        let remote =
            "nvmf://10.0.0.2:4420/nqn.2026-12.io.strata:v.r1?hostnqn=nqn.2026-12.io.strata:node:a";
        assert_eq!(remote_replica(remote).unwrap(), "v.r1");
        assert!(remote_replica("nvmf://10.0.0.2:4420/nqn.2026-12.io.strata:v").is_none());
        assert!(placed_path("mem://x").is_none());
        let aio = format!("aio://{}?blk_size=512", a.display());
        assert_eq!(placed_path(&aio).unwrap(), a);
    }
}
