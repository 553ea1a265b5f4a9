//! The daemon as a library: [`Daemon::start`] opens the configured and declared volumes,
//! exports them, serves the gRPC API and `/metrics`, and runs reconciliation; [`Daemon::shutdown`]
//! drains clients, stops every task and flushes every volume. `strata serve` is [`run`]; tests
//! may start a daemon in process.
//!
//! ```text
//!   config.rs ──► Daemon::start ──► Stores, Images, Registry ──► Manager (manager/)
//!                      │                                          ▲    │
//!                      ├─► exports/ (one Exporter per protocol) ◄─┘    └─► state.rs (file | etcd)
//!                      ├─► api/ (gRPC, one file per service) ──► Manager
//!                      ├─► metrics.rs (GET /metrics) ──────────► Manager
//!                      ├─► cluster.rs (the node's name under a lease, its record)
//!                      └─► listeners.rs (TCP, unix, systemd, TLS, signals)
//! ```

pub mod api;
pub mod cluster;
pub mod config;
pub mod exports;
pub mod jwt;
mod ledger;
mod listeners;
pub mod manager;
mod metrics;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use strata_nbd::{Server, ServerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use config::Config;
use exports::{Exports, NbdExporter, NvmfExporter, VhostUserExporter};
use listeners::{bind_unix, load_tls, systemd_listeners, wait_for_signal, Activated};
use manager::{Images, Manager, Stores};

/// How long stopped tasks (API connections, reconciliation) may take to end at shutdown.
const TASK_DRAIN: Duration = Duration::from_secs(5);

/// Where a started daemon listens.
#[derive(Debug, Clone, Default)]
pub struct Listening {
    /// `nbd://HOST:PORT`, `nbd+unix:///?socket=PATH` (with " (systemd)" when handed over).
    pub nbd: Vec<String>,
    /// `unix:///…/api.sock`, `http://HOST:PORT`.
    pub api: Vec<String>,
    /// `http://HOST:PORT/metrics`.
    pub metrics: Vec<String>,
    /// NVMe/TCP listeners: `HOST:PORT`.
    pub nvmf: Vec<String>,
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    manager: Arc<Manager>,
    membership: Arc<cluster::Membership>,
    nbd: Arc<NbdExporter>,
    nvmf: Arc<NvmfExporter>,
    vhost_user: Arc<VhostUserExporter>,
    stop: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    /// Unix sockets this daemon made, removed at shutdown.
    sockets: Vec<PathBuf>,
    listening: Listening,
    data_dir: PathBuf,
    tls: bool,
    shutdown_timeout: Duration,
}

/// `strata serve`: start, print where to connect, run until SIGINT or SIGTERM, shut down.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let daemon = Daemon::start(config).await?;
    daemon.print_banner();
    wait_for_signal().await?;
    daemon.shutdown().await
}

impl Daemon {
    /// Open everything `config` declares and start serving.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        config.validate()?;
        let data_dir = config.data_dir();
        make_private(&data_dir)?;
        manager::create_pools(&config.pools)?;
        let stores = Arc::new(
            Stores::new(config.store_factory(), &config.store_entries()?)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let registry = Arc::new(crate::registry_with_images(stores.opener()));
        let jwt = config.jwt()?;
        if let Some(j) = &jwt {
            stores
                .get(j.store())
                .map_err(|e| anyhow::anyhow!("[jwt] store: {}", e.chain()))?;
        }
        let images = Images::new(
            stores.clone(),
            jwt,
            config.nbd.images,
            config.nbd.images_idle_secs,
        );
        let server = Server::new(nbd_server_config(&config)?, Vec::new());
        server.set_resolver(images.clone());
        let nbd = Arc::new(NbdExporter::new(server));
        let nvmf = Arc::new(NvmfExporter::new(
            strata_nvmf::Target::new(config.nvmf.target_settings()?)
                .map_err(|e| anyhow::anyhow!("[nvmf]: {e}"))?,
        ));
        let vhost_dir = config
            .vhost_user
            .socket_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("vhost-user"));
        let vhost_user = Arc::new(VhostUserExporter::new(
            strata_vhost_user_blk::VhostUserTarget::new(
                config.vhost_user.clone(),
                tokio::runtime::Handle::current(),
            )
            .map_err(|e| anyhow::anyhow!("[vhost_user]: {e}"))?,
            vhost_dir,
        ));
        let state = state::open(config.state.store.as_deref(), &data_dir)?;
        let manager = Manager::new(
            node_name(&config),
            data_dir.clone(),
            config.pools.clone(),
            registry,
            images,
            Exports::new(vec![nbd.clone(), nvmf.clone(), vhost_user.clone()]),
            state,
        );
        // The node name first: a daemon must not open another live daemon's volumes. A store
        // that cannot be reached now is asked again by the membership task.
        manager.set_topology_key(&config.cluster.topology_key);
        let membership = cluster::Membership::new(manager.clone(), config.cluster.clone());
        match membership.join_at_start().await {
            Ok(()) => {}
            Err(e @ cluster::JoinError::Taken { .. }) => return Err(e.into()),
            Err(e) => {
                warn!(error = %anyhow::Error::from(e), "cannot register the node yet; serving the configured volumes and retrying");
            }
        }
        let mut daemon = Daemon {
            manager: manager.clone(),
            membership: membership.clone(),
            nbd,
            nvmf,
            vhost_user,
            stop: CancellationToken::new(),
            tasks: Vec::new(),
            sockets: config.nbd.unix.clone(),
            listening: Listening::default(),
            data_dir,
            tls: config.nbd.tls.is_some(),
            shutdown_timeout: Duration::from_secs(config.nbd.shutdown_timeout_secs),
        };
        for d in config.volume_decls()? {
            daemon
                .manager
                .add_configured(&d)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        // Open the declared volumes before clients come; if the state store cannot be read,
        // the loop keeps trying.
        if let Err(e) = daemon.manager.reconcile().await {
            warn!(error = %e, "cannot read the desired state yet; serving the configured volumes and retrying");
        }
        // Clients come once the volumes are open (an export's address is read when asked).
        daemon.listen_nbd(&config).await?;
        daemon.listen_nvmf(&config).await?;
        let every = Duration::from_secs_f64(config.state.reconcile_secs);
        daemon.spawn("reconcile", manager.clone().run(every, daemon.stop.clone()));
        daemon.listen_api(&config).await?;
        membership.set_addresses(&daemon.listening);
        if manager.is_member() {
            if let Err(e) = membership.publish().await {
                warn!(error = %e, "cannot write the node's record yet; retrying");
            }
        }
        daemon.spawn("membership", membership.run(daemon.stop.clone()));
        if !config.gc.interval.is_zero() {
            let gc = manager::gc::scheduled(stores, config.gc.clone(), daemon.stop.clone());
            daemon.spawn("gc", gc);
        }
        daemon.listen_metrics(&config).await?;
        Ok(daemon)
    }

    fn spawn(
        &mut self,
        what: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.push((what, tokio::spawn(task)));
    }

    /// NBD listeners: systemd socket activation replaces the configured ones.
    async fn listen_nbd(&mut self, config: &Config) -> anyhow::Result<()> {
        let server = self.nbd.server.clone();
        let activated = systemd_listeners()?;
        let mut uris = Vec::new();
        if !activated.is_empty() {
            for l in activated {
                match l {
                    Activated::Tcp(l) => {
                        uris.push(format!("nbd://{}", l.local_addr()?));
                        self.spawn("nbd", server.clone().serve_tcp(l));
                    }
                    Activated::Unix(l) => {
                        let path = l
                            .local_addr()
                            .ok()
                            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                            .unwrap_or_default();
                        uris.push(format!("nbd+unix:///?socket={}", path.display()));
                        self.spawn("nbd", server.clone().serve_unix(l));
                    }
                }
            }
            self.listening.nbd = uris.iter().map(|u| format!("{u} (systemd)")).collect();
        } else {
            for addr in &config.nbd.listen {
                let l = TcpListener::bind(addr).await.with_context(|| {
                    format!("listen on {addr} (is another server using the port? pick one with --listen)")
                })?;
                uris.push(format!("nbd://{}", l.local_addr()?));
                self.spawn("nbd", server.clone().serve_tcp(l));
            }
            for path in &config.nbd.unix {
                let l = bind_unix(path)?;
                uris.push(format!("nbd+unix:///?socket={}", path.display()));
                self.spawn("nbd", server.clone().serve_unix(l));
            }
            self.listening.nbd = uris.clone();
        }
        self.nbd.set_listening(uris);
        Ok(())
    }

    /// NVMe/TCP listeners.
    async fn listen_nvmf(&mut self, config: &Config) -> anyhow::Result<()> {
        let mut addrs = Vec::new();
        for addr in &config.nvmf.listen {
            let l = TcpListener::bind(addr).await.with_context(|| {
                format!("NVMe/TCP: listen on {addr} (is the port taken? set [nvmf] listen or pass --nvmf-listen)")
            })?;
            addrs.push(l.local_addr()?.to_string());
            self.spawn("nvmf", self.nvmf.target.clone().serve_tcp(l));
        }
        self.listening.nvmf = addrs.clone();
        self.nvmf.set_listening(addrs);
        Ok(())
    }

    /// The gRPC API: the owner-only unix socket, and the TCP listeners configured (each call
    /// authorized by `api/auth.rs`; connections limited by `[api] max_connections`).
    async fn listen_api(&mut self, config: &Config) -> anyhow::Result<()> {
        let tokens = match &config.api.tokens_file {
            Some(path) => api::auth::Tokens::load(path)?,
            None => api::auth::Tokens::default(),
        };
        let routes = api::Api::new(self.manager.clone()).routes(Arc::new(tokens))?;
        let slots = Arc::new(tokio::sync::Semaphore::new(config.api.max_connections));
        let path = config
            .api
            .unix
            .clone()
            .unwrap_or_else(|| self.data_dir.join("api.sock"));
        let l = bind_unix(&path)?;
        // Whoever can connect can change every volume: the daemon's user only.
        set_mode(&path, 0o600)?;
        self.listening
            .api
            .push(format!("unix://{}", path.display()));
        self.sockets.push(path);
        let incoming = api::listen::unix(l, slots.clone(), self.stop.clone());
        self.serve_api(routes.clone(), incoming);
        let tls = match &config.api.tls {
            Some(t) => Some(t.acceptor(config.api.tokens_file.is_some())?),
            None => None,
        };
        for addr in &config.api.listen {
            let l = TcpListener::bind(addr).await.with_context(|| {
                format!("gRPC API: listen on {addr} (is the port taken? set [api] listen or pass --api-listen)")
            })?;
            let local = l.local_addr()?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            if tls.is_none() && !local.ip().is_loopback() {
                warn!(listen = %local, "the API listens beyond this host without TLS: its bearer tokens cross the network in the clear; configure [api.tls]");
            }
            self.listening.api.push(format!("{scheme}://{local}"));
            let incoming = api::listen::tcp(l, tls.clone(), slots.clone(), self.stop.clone());
            self.serve_api(routes.clone(), incoming);
        }
        Ok(())
    }

    /// Serve the API's `routes` on the connections `incoming` yields, until the daemon stops.
    fn serve_api(
        &mut self,
        routes: tonic::service::Routes,
        incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<api::listen::ApiConn>>,
    ) {
        let stop = self.stop.clone();
        self.spawn("api", async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                warn!(error = %e, "gRPC API stopped");
            }
        });
    }

    async fn listen_metrics(&mut self, config: &Config) -> anyhow::Result<()> {
        for addr in &config.metrics.listen {
            let l = TcpListener::bind(addr).await.with_context(|| {
                format!("metrics: listen on {addr} (is the port taken? set [metrics] listen or pass --metrics-listen)")
            })?;
            self.listening
                .metrics
                .push(format!("http://{}/metrics", l.local_addr()?));
            let serve = metrics::serve(self.manager.clone(), l, self.stop.clone());
            self.spawn("metrics", serve);
        }
        Ok(())
    }

    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    pub fn listening(&self) -> &Listening {
        &self.listening
    }

    /// Stop accepting, answer every request already received (bounded by the shutdown
    /// timeout), stop every task and wait for it, flush every volume.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        info!("shutting down: draining connections");
        let drain = self.shutdown_timeout;
        if tokio::time::timeout(drain, self.manager.exports.shutdown())
            .await
            .is_err()
        {
            warn!("requests still in flight after {drain:?} (a device is not answering); flushing and exiting without them");
        }
        self.stop.cancel();
        for (what, task) in self.tasks {
            match tokio::time::timeout(TASK_DRAIN, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(task = what, error = %e, "task ended abnormally"),
                Err(_) => warn!(
                    task = what,
                    "task still running {TASK_DRAIN:?} after shutdown began; exiting without it"
                ),
            }
        }
        let failed = !self.manager.flush_all().await.is_empty();
        self.membership.leave().await;
        for path in &self.sockets {
            let _ = std::fs::remove_file(path);
        }
        if failed {
            bail!("some volumes could not be flushed on shutdown; see the log above");
        }
        info!("stopped cleanly");
        Ok(())
    }

    /// What `strata serve` prints when it is ready: volumes, listeners, how to connect.
    pub fn print_banner(&self) {
        let volumes = self.manager.volumes();
        println!(
            "strata {}: data directory {}",
            env!("CARGO_PKG_VERSION"),
            self.data_dir.display()
        );
        for m in &volumes {
            let d = m.decl();
            println!(
                "volume {}: {} bytes, {} {}",
                m.name,
                strata_bdev::BlockDevice::geometry(&*m.device).size,
                d.kind(),
                d.summary()
            );
            if let Some(n) = m.nexus() {
                for (i, c) in n.status().children.iter().enumerate() {
                    println!("  replica #{i} {}: {}", c.state, c.name);
                }
            }
        }
        for l in &self.listening.nbd {
            println!("listening: {l}");
        }
        for a in &self.listening.api {
            println!("api: {a}");
        }
        for m in &self.listening.metrics {
            println!("metrics: {m}");
        }
        for n in &self.listening.nvmf {
            println!("nvmf: {n}");
        }
        let tcp = self.listening.nbd.iter().find(|l| l.starts_with("nbd://"));
        if let (Some(first), Some(tcp)) = (volumes.first(), tcp) {
            let base = tcp.split_whitespace().next().unwrap_or(tcp);
            let hostport = base.trim_start_matches("nbd://");
            let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "10809"));
            let scheme = if self.tls { "nbds" } else { "nbd" };
            let name = &first.name;
            println!("connect with:");
            println!("  nbdinfo {scheme}://{hostport}/{name}");
            println!("  qemu-io -f raw {scheme}://{hostport}/{name}");
            println!("  nbd-client {host} {port} /dev/nbd0 -N {name}");
        }
        let nvmf = volumes
            .iter()
            .find(|m| m.decl().exports.contains(&manager::Protocol::Nvmf));
        if let (Some(m), Some(addr)) = (nvmf, self.listening.nvmf.first()) {
            let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "4420"));
            println!("  nvme discover -t tcp -a {host} -s {port}");
            println!(
                "  nvme connect -t tcp -a {host} -s {port} -n {}",
                exports::nqn(&m.name)
            );
        }
        let vhost = volumes
            .iter()
            .find(|m| m.decl().exports.contains(&manager::Protocol::VhostUser));
        if let Some(m) = vhost {
            println!(
                "  qemu-system-x86_64 … -object memory-backend-memfd,id=mem,size=1G,share=on \\\n      -numa node,memdev=mem {}",
                self.vhost_user.qemu_args(&m.name, 1)
            );
        }
        println!("ready");
    }
}

/// The NBD server's settings from `[nbd]`, with its TLS certificate loaded.
fn nbd_server_config(config: &Config) -> anyhow::Result<ServerConfig> {
    let mut s = config.nbd.server_config()?;
    if s.default_export.is_none() {
        s.default_export = config.volumes.first().map(|v| v.name.clone());
    }
    s.tls = config.nbd.tls.as_ref().map(load_tls).transpose()?;
    Ok(s)
}

/// This node's name: `[api] node_name`, else the host name.
fn node_name(config: &Config) -> String {
    if let Some(n) = &config.api.node_name {
        return n.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("set the mode of {} to {mode:o}", path.display()))
}

/// Keep what the daemon writes to its user: volume data, write buffers, records, credentials
/// and sockets are created 0600 (directories 0700), and the data directory is made 0700.
fn make_private(data_dir: &Path) -> anyhow::Result<()> {
    // SAFETY: umask only sets the process's file-creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("create data directory {}", data_dir.display()))?;
    set_mode(data_dir, 0o700)
}
