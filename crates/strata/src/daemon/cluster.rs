//! This daemon as a node of a cluster. At start it takes its node name in the state store — a
//! key `alive/NODE` created only if absent, under a lease — so that two running daemons never
//! serve one node's volumes; a name another live daemon holds is refused. While it runs it
//! renews the lease and keeps its record `nodes/NODE` (addresses, protocols, labels, pools with
//! their space) current; at shutdown it gives the name back. A daemon that dies stops renewing,
//! and its name lapses after `[cluster] lease_secs`; its record stays, so `strata node list`
//! shows it dead.
//!
//! ```text
//!   Daemon::start ─► Membership::join ──create-if-absent + lease──► alive/NODE
//!        │                 └─ taken: refuse to start (who holds it)
//!        └─► Membership::run: every lease/3 ─► renew ─► lapsed? join again
//!                                            └─► nodes/NODE (the record)
//! ```
//!
//! Until it holds its name, reconciliation opens nothing (`Manager::is_member`). Losing the
//! state store does not end the membership: volumes keep serving, and the lease is renewed
//! (or taken again) when the store answers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::manager::nodes::{unix_now, NodeRecord, Session, ALIVE, NODES};
use super::manager::Manager;
use super::state::{LeaseId, StateError, StateStore};

/// `[cluster]`: how this node presents itself to the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// The host other nodes and clients reach this node at, put in place of an unspecified
    /// listen address (`0.0.0.0`, `::`) in the node's record.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Labels: topology (`zone = "a"`, `rack = "r1"`) and anything else placement may use.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The label replicas of one volume are spread across: distinct values first.
    #[serde(default = "default_topology_key")]
    pub topology_key: String,
    /// How long the node's name outlives its last renewal: a dead node is seen dead this long
    /// after it stopped.
    #[serde(
        rename = "lease_secs",
        with = "strata_bdev::units::secs",
        default = "default_lease"
    )]
    pub lease: Duration,
}

fn default_topology_key() -> String {
    "zone".to_string()
}

fn default_lease() -> Duration {
    Duration::from_secs(6)
}

impl Default for ClusterSettings {
    fn default() -> ClusterSettings {
        ClusterSettings {
            advertise: None,
            labels: BTreeMap::new(),
            topology_key: default_topology_key(),
            lease: default_lease(),
        }
    }
}

impl ClusterSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        // etcd's shortest lease is about 2 s; renewals go every third of it.
        if self.lease < Duration::from_secs(2) {
            anyhow::bail!("[cluster] lease_secs must be at least 2");
        }
        for (k, v) in &self.labels {
            super::manager::check_label(k, v)
                .map_err(|e| anyhow::anyhow!("[cluster] labels: {e}"))?;
        }
        Ok(())
    }
}

/// Why this daemon could not take its node name.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Another running daemon holds it.
    #[error(
        "node name {node:?} is taken: a running daemon holds it ({holder}); give this daemon \
         another name ([api] node_name) or stop that one"
    )]
    Taken { node: String, holder: String },
    /// The state store could not be asked.
    #[error("register node {node:?}")]
    Store {
        node: String,
        #[source]
        source: StateError,
    },
}

/// This daemon's registration; see the module documentation.
#[derive(Debug)]
pub struct Membership {
    manager: Arc<Manager>,
    state: Arc<dyn StateStore>,
    settings: ClusterSettings,
    session: Session,
    lease: Mutex<Option<LeaseId>>,
    /// `HOST:PORT` by protocol, once the listeners are up.
    addresses: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Membership {
    pub fn new(manager: Arc<Manager>, settings: ClusterSettings) -> Arc<Membership> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Arc::new(Membership {
            state: manager.state.clone(),
            manager,
            settings,
            session: Session {
                id: session_id(),
                pid: std::process::id(),
                host,
                started_unix_secs: unix_now(),
            },
            lease: Mutex::new(None),
            addresses: Mutex::new(BTreeMap::new()),
        })
    }

    fn node(&self) -> &str {
        &self.manager.node
    }

    fn alive_key(&self) -> String {
        format!("{ALIVE}{}", self.node())
    }

    /// Take the node name under a new lease.
    pub async fn join(&self) -> Result<(), JoinError> {
        let node = self.node().to_string();
        let value = serde_json::to_vec(&self.session).expect("a session serializes");
        let created = self
            .state
            .create_leased(&self.alive_key(), &value, self.settings.lease)
            .await
            .map_err(|source| JoinError::Store {
                node: node.clone(),
                source,
            })?;
        match created {
            Ok(lease) => {
                *self.lease.lock().expect("lock poisoned") = Some(lease);
                self.manager.set_member(true);
                info!(node = %node, lease_secs = self.settings.lease.as_secs(), "registered in the state store");
                Ok(())
            }
            Err(held) => Err(JoinError::Taken {
                node,
                holder: describe_holder(&held),
            }),
        }
    }

    /// Take the node name at start. A name held by a daemon that has just died (killed, its
    /// machine gone) lapses within one lease, so a holder is waited for that long before this
    /// daemon is refused: a restart after a crash goes through, a second live daemon does not.
    pub async fn join_at_start(&self) -> Result<(), JoinError> {
        let deadline = tokio::time::Instant::now() + self.settings.lease + Duration::from_secs(1);
        let mut told = false;
        loop {
            match self.join().await {
                Err(e @ JoinError::Taken { .. }) if tokio::time::Instant::now() < deadline => {
                    if !told {
                        info!(error = %e, wait_secs = self.settings.lease.as_secs() + 1, "waiting for the node name's lease to lapse, in case its holder has died");
                        told = true;
                    }
                    tokio::time::sleep(self.settings.lease / 6).await;
                }
                other => return other,
            }
        }
    }

    /// Where this node serves, by protocol (`nbd`, `nvmf`, `api`); unspecified hosts are
    /// replaced by `[cluster] advertise`.
    pub fn set_addresses(&self, listening: &super::Listening) {
        let advertise = |a: &str| -> String {
            let Some(host) = &self.settings.advertise else {
                return a.to_string();
            };
            match a.parse::<std::net::SocketAddr>() {
                Ok(s) if s.ip().is_unspecified() => {
                    if host.contains(':') {
                        format!("[{host}]:{}", s.port())
                    } else {
                        format!("{host}:{}", s.port())
                    }
                }
                _ => a.to_string(),
            }
        };
        let mut out = BTreeMap::new();
        let nbd: Vec<String> = listening
            .nbd
            .iter()
            .filter_map(|u| u.strip_prefix("nbd://"))
            .map(|a| advertise(a.split_whitespace().next().unwrap_or(a)))
            .collect();
        let api: Vec<String> = listening
            .api
            .iter()
            .filter_map(|u| {
                u.strip_prefix("http://")
                    .or_else(|| u.strip_prefix("https://"))
            })
            .map(advertise)
            .collect();
        let nvmf: Vec<String> = listening.nvmf.iter().map(|a| advertise(a)).collect();
        for (proto, list) in [("nbd", nbd), ("nvmf", nvmf), ("api", api)] {
            if !list.is_empty() {
                out.insert(proto.to_string(), list);
            }
        }
        *self.addresses.lock().expect("lock poisoned") = out;
    }

    /// The record `nodes/NODE` holds now.
    fn record(&self) -> NodeRecord {
        let addresses = self.addresses.lock().expect("lock poisoned").clone();
        let mut protocols: Vec<String> = ["nbd", "nvmf"]
            .into_iter()
            .filter(|p| addresses.contains_key(*p))
            .map(str::to_string)
            .collect();
        protocols.push("vhost_user".into());
        NodeRecord {
            name: self.node().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            addresses,
            protocols,
            labels: self.settings.labels.clone(),
            pools: self.manager.pool_records(),
            updated_unix_secs: unix_now(),
        }
    }

    /// Write this node's record.
    pub async fn publish(&self) -> Result<(), StateError> {
        let value = serde_json::to_vec(&self.record()).expect("a node record serializes");
        self.state
            .put(&format!("{NODES}{}", self.node()), &value)
            .await
    }

    /// Renew the lease and refresh the record every third of the lease, taking the name
    /// again when the lease has lapsed, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let every = self.settings.lease / 3;
        let mut unavailable = false;
        let mut taken_logged = false;
        loop {
            let lease = *self.lease.lock().expect("lock poisoned");
            let step = match lease {
                Some(lease) => match self.state.keep_alive(lease).await {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        warn!(node = %self.node(), "the node's registration lapsed (the state store was out of reach longer than its lease); registering again");
                        *self.lease.lock().expect("lock poisoned") = None;
                        self.manager.set_member(false);
                        self.rejoin(&mut taken_logged).await
                    }
                    Err(e) => Err(e),
                },
                None => self.rejoin(&mut taken_logged).await,
            };
            let step = match step {
                Ok(()) if self.manager.is_member() => self.publish().await,
                other => other,
            };
            match step {
                Ok(()) if unavailable => {
                    info!(node = %self.node(), "registration renewed: the state store answers again");
                    unavailable = false;
                }
                Ok(()) => {}
                Err(e) if !unavailable => {
                    warn!(node = %self.node(), error = %e, "cannot renew the node's registration; volumes keep serving, retrying");
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

    /// Take the name again; a name another daemon took meanwhile is logged once (this daemon
    /// keeps serving what it has open, and opens nothing more).
    async fn rejoin(&self, taken_logged: &mut bool) -> Result<(), StateError> {
        match self.join().await {
            Ok(()) => {
                *taken_logged = false;
                Ok(())
            }
            Err(JoinError::Store { source, .. }) => Err(source),
            Err(e @ JoinError::Taken { .. }) => {
                if !*taken_logged {
                    error!(error = %e, "this daemon no longer holds its node name; it opens and changes nothing until the name is free");
                    *taken_logged = true;
                }
                Ok(())
            }
        }
    }

    /// Give the name back (at shutdown): the node is seen dead at once.
    pub async fn leave(&self) {
        let lease = self.lease.lock().expect("lock poisoned").take();
        if let Some(lease) = lease {
            self.manager.set_member(false);
            if let Err(e) = self.state.revoke(lease).await {
                warn!(node = %self.node(), error = %e, "give the node name back; it lapses with its lease");
            }
        }
    }
}

/// Who holds a name, for the refusal's message.
fn describe_holder(held: &[u8]) -> String {
    match serde_json::from_slice::<Session>(held) {
        Ok(s) => format!(
            "pid {} on host {:?}, started {} s ago",
            s.pid,
            s.host,
            unix_now().saturating_sub(s.started_unix_secs)
        ),
        Err(_) => "an unreadable registration".to_string(),
    }
}

/// 16 random hex digits.
fn session_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // The id tells sessions apart; time and pid do too when randomness is unavailable.
        let t = unix_now() ^ u64::from(std::process::id()) << 32;
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_refusal_names_the_holder() {
        let s = Session {
            id: "x".into(),
            pid: 42,
            host: "h1".into(),
            started_unix_secs: unix_now(),
        };
        let d = describe_holder(&serde_json::to_vec(&s).unwrap());
        assert!(d.contains("pid 42") && d.contains("h1"), "{d}");
        assert_eq!(session_id().len(), 16);
    }
}
