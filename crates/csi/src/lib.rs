//! Strata's CSI driver: the Container Storage Interface (v1.12) Identity, Controller,
//! GroupController and Node services, served on a unix socket to Kubernetes (or any CO), as a
//! thin adapter over the Strata daemon's gRPC API. It owns no storage logic: volumes,
//! replicas, snapshots, clones and resizes are the daemon's; the driver maps CSI's names and
//! rules onto them and, on a node, attaches exports as kernel block devices and mounts them.
//!
//! ```text
//!  kubelet / external-provisioner, -attacher, -snapshotter, -resizer
//!        │ CSI gRPC over unix://…/csi.sock
//!        ▼
//!  identity.rs   name, capabilities, probe
//!  controller.rs CreateVolume … ModifyVolume ─┐
//!  group.rs      volume group snapshots ──────┼─ daemon.rs ─► strata serve (strata.v1 API)
//!  node/         stage, publish, stats, expand┘   (GetVolume for exports and condition)
//!        │ attach.rs: NVMe/TCP │ kernel NBD │ nbdfuse + loop ; mkfs, mount (system.rs)
//!        ▼
//!  /dev/X ─► STAGING mount ─► bind mounts into pods
//! ```
//!
//! `names.rs` holds the pure mappings (names, parameters, capacity, tokens), unit-tested. The
//! `strata csi` command calls [`run`].

pub mod controller;
mod daemon;
pub mod group;
pub mod identity;
pub mod names;
pub mod node;

/// Generated from `proto/csi/v1/csi.proto` (CSI v1.12.0).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use daemon::Daemon;
pub use identity::DRIVER_NAME;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Which services to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Identity, Controller and GroupController (one instance per cluster).
    Controller,
    /// Identity and Node (on every node).
    Node,
    /// All of them (one machine, or csi-sanity).
    All,
}

/// How the driver runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// `unix:///path/to/csi.sock` (or a bare path).
    pub csi_endpoint: String,
    /// This node's ID (the host name by default).
    pub node_id: String,
    pub mode: Mode,
    /// The Strata daemon's API endpoint.
    pub daemon_endpoint: String,
    pub auth: strata_api::ClientAuth,
    /// Where the node keeps its records and nbdfuse directories.
    pub state_dir: PathBuf,
    /// Volumes one node may have published at once.
    pub max_volumes_per_node: u32,
}

/// Why the driver could not serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CSI endpoint {0:?}: expected unix:///PATH")]
    Endpoint(String),
    #[error("listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serve CSI")]
    Serve(#[source] tonic::transport::Error),
}

/// Per-key locks: calls about one volume (or snapshot) run one at a time, others in parallel.
#[derive(Debug, Default)]
pub struct Locks {
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A held [`Locks`] key.
#[derive(Debug)]
pub struct LockGuard<'a> {
    locks: &'a Locks,
    key: String,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Locks {
    pub async fn lock(&self, key: &str) -> LockGuard<'_> {
        let m = self
            .keys
            .lock()
            .expect("lock poisoned")
            .entry(key.to_string())
            .or_default()
            .clone();
        LockGuard {
            locks: self,
            key: key.to_string(),
            _guard: m.lock_owned().await,
        }
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let mut keys = self.locks.keys.lock().expect("lock poisoned");
        // Forget the key when no one else holds or waits for it (the map and this guard's
        // mutex are the only references then).
        if keys
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) <= 2)
        {
            keys.remove(&self.key);
        }
    }
}

/// The socket path of a `unix://` endpoint.
fn socket_path(endpoint: &str) -> Result<PathBuf, Error> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(Error::Endpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Serve the CSI services `config.mode` names until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), Error> {
    let path = socket_path(&config.csi_endpoint)?;
    let listen_err = |source| Error::Listen {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(listen_err(e)),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(listen_err)?;
    let daemon = Arc::new(Daemon::new(
        config.daemon_endpoint.clone(),
        config.auth.clone(),
    ));
    let mut router = tonic::transport::Server::builder().add_service(
        csi::identity_server::IdentityServer::new(identity::Identity {
            daemon: daemon.clone(),
        }),
    );
    if config.mode != Mode::Node {
        let controller = Arc::new(controller::Controller {
            daemon: daemon.clone(),
            max_volumes_per_node: config.max_volumes_per_node,
            locks: Locks::default(),
            publishing: tokio::sync::Mutex::new(()),
        });
        router = router
            .add_service(csi::controller_server::ControllerServer::from_arc(
                controller.clone(),
            ))
            .add_service(csi::group_controller_server::GroupControllerServer::from_arc(controller));
    }
    if config.mode != Mode::Controller {
        router = router.add_service(csi::node_server::NodeServer::new(node::Node {
            daemon,
            node_id: config.node_id.clone(),
            max_volumes_per_node: config.max_volumes_per_node,
            state_dir: config.state_dir.clone(),
            locks: Locks::default(),
        }));
    }
    info!(endpoint = %path.display(), mode = ?config.mode, node = %config.node_id,
        daemon = %config.daemon_endpoint, "serving CSI");
    println!("ready");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let served = router
        .serve_with_incoming_shutdown(incoming, cancel.cancelled())
        .await
        .map_err(Error::Serve);
    let _ = std::fs::remove_file(&path);
    served
}
