//! The nodes of a cluster as the state store shows them. Each daemon keeps two keys there:
//!
//! ```text
//!   alive/NODE   leased: which daemon holds the name now (a Session); gone when its lease lapses
//!   nodes/NODE   its record (NodeRecord): addresses, protocols, labels, pools; kept after death
//! ```
//!
//! `daemon/cluster.rs` writes them (registration, renewal); this file reads them back for
//! `strata node list` and, in time, for placement.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{Manager, OpResult};

/// The key prefix of the node records.
pub const NODES: &str = "nodes/";
/// The key prefix of the leased liveness keys.
pub const ALIVE: &str = "alive/";

/// Which running daemon holds a node name: the value of `alive/NODE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Random, new at every start.
    pub id: String,
    pub pid: u32,
    /// The host name of the machine it runs on.
    pub host: String,
    pub started_unix_secs: u64,
}

/// A pool of a node and its space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub name: String,
    pub path: String,
    pub total_bytes: u64,
    /// Allocated by the replicas in the pool.
    pub used_bytes: u64,
    pub free_bytes: u64,
}

/// A node as it describes itself: the value of `nodes/NODE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub version: String,
    /// `HOST:PORT` listeners by protocol (`nbd`, `nvmf`, `api`).
    #[serde(default)]
    pub addresses: BTreeMap<String, Vec<String>>,
    /// The protocols it exports volumes over.
    #[serde(default)]
    pub protocols: Vec<String>,
    /// Topology (`zone`, `rack`) and other labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pools: Vec<PoolRecord>,
    #[serde(default)]
    pub updated_unix_secs: u64,
}

/// A node and whether it is alive now.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub record: NodeRecord,
    pub alive: bool,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Manager {
    /// Every node that registered, alive or not, by name. A node that holds its name but has
    /// not written its record yet is listed with its name alone.
    pub async fn nodes(&self) -> OpResult<Vec<NodeStatus>> {
        let alive: Vec<String> = self
            .state
            .list(ALIVE)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(ALIVE).map(str::to_string))
            .collect();
        let mut out: BTreeMap<String, NodeStatus> = BTreeMap::new();
        for (key, value) in self.state.list(NODES).await? {
            match serde_json::from_slice::<NodeRecord>(&value) {
                Ok(record) => {
                    let alive = alive.contains(&record.name);
                    out.insert(record.name.clone(), NodeStatus { record, alive });
                }
                Err(e) => warn!(%key, error = %e, "state store record is not a node; ignored"),
            }
        }
        for name in alive {
            out.entry(name.clone()).or_insert_with(|| NodeStatus {
                record: NodeRecord {
                    name,
                    version: String::new(),
                    addresses: BTreeMap::new(),
                    protocols: Vec::new(),
                    labels: BTreeMap::new(),
                    pools: Vec::new(),
                    updated_unix_secs: 0,
                },
                alive: true,
            });
        }
        Ok(out.into_values().collect())
    }

    /// This node's pools as its record shows them.
    pub fn pool_records(&self) -> Vec<PoolRecord> {
        self.pool_space()
            .into_iter()
            .map(|p| PoolRecord {
                name: p.name,
                path: p.path.display().to_string(),
                total_bytes: p.total_bytes,
                used_bytes: p.used_bytes,
                free_bytes: p.free_bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_written_without_the_optional_fields_still_read() {
        let r: NodeRecord = serde_json::from_str(r#"{"name":"a","version":"1"}"#).unwrap();
        assert_eq!(r.name, "a");
        assert!(r.pools.is_empty() && r.labels.is_empty());
    }
}
