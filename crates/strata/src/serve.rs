//! `strata serve`: open the configured volumes, export them over NBD, and run until SIGINT or
//! SIGTERM, then drain connections, flush every device and exit.

use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use strata_nbd::{Server, ServerConfig, TlsMode, TlsSettings};
use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use crate::config::{default_data_dir, Config, TlsConfig, TlsModeConfig};
use crate::manager::{Managed, Manager};

/// Flags that override the configuration file.
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (default: the embedded demo configuration).
    #[arg(short, long, env = "STRATA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (default: $STRATA_DATA_DIR, $XDG_DATA_HOME/strata or ~/.local/share/strata).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// TCP address to serve NBD on; repeat for several. Replaces [nbd] listen.
    #[arg(short, long)]
    pub listen: Vec<String>,
    /// Unix socket to serve NBD on; repeat for several. Replaces [nbd] unix.
    #[arg(long)]
    pub socket: Vec<PathBuf>,
    /// Serve only the unix sockets (no TCP listener).
    #[arg(long)]
    pub no_tcp: bool,
    /// Add a volume: NAME=URI (e.g. scratch=mem://scratch?size=1G); repeat for several.
    #[arg(long = "volume", value_name = "NAME=URI")]
    pub volumes: Vec<String>,
    /// TLS certificate chain (PEM); with --tls-key enables STARTTLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Whether clients must use TLS.
    #[arg(long, value_enum)]
    pub tls_mode: Option<TlsModeConfig>,
    /// TCP address of the gRPC API; repeat for several. Replaces [api] listen.
    #[arg(long)]
    pub api_listen: Vec<String>,
    /// TCP address of the Prometheus /metrics endpoint; repeat for several. Replaces
    /// [metrics] listen.
    #[arg(long)]
    pub metrics_listen: Vec<String>,
}

impl ServeArgs {
    /// The configuration these flags select, with the flags applied.
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::embedded_default(),
        };
        if let Some(d) = &self.data_dir {
            c.data_dir = Some(d.clone());
        }
        if !self.listen.is_empty() {
            c.nbd.listen = self.listen.clone();
        }
        if self.no_tcp {
            c.nbd.listen.clear();
        }
        if !self.socket.is_empty() {
            c.nbd.unix = self.socket.clone();
        }
        if !self.api_listen.is_empty() {
            c.api.listen = self.api_listen.clone();
        }
        if !self.metrics_listen.is_empty() {
            c.metrics.listen = self.metrics_listen.clone();
        }
        for v in &self.volumes {
            let (name, uri) = v
                .split_once('=')
                .with_context(|| format!("--volume {v:?}: expected NAME=URI"))?;
            c.volumes
                .push(crate::config::VolumeConfig::device(name, uri));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            c.nbd.tls = Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                mode: self.tls_mode.unwrap_or_default(),
            });
        } else if let (Some(mode), Some(tls)) = (self.tls_mode, c.nbd.tls.as_mut()) {
            tls.mode = mode;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Run the daemon until a signal.
pub async fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let data_dir = config.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("create data directory {}", data_dir.display()))?;

    let opener = Arc::new(image_opener(&config, &data_dir)?);
    let registry = Arc::new(strata::registry_with_images(opener.clone()));
    let jwt = match &config.jwt {
        None => None,
        Some(j) => {
            let secret = std::env::var("STRATA_JWT_SECRET")
                .ok()
                .or_else(|| j.secret.clone())
                .context("[jwt] needs a secret: set STRATA_JWT_SECRET or [jwt] secret")?;
            opener
                .store(&j.store)
                .map_err(|e| anyhow::anyhow!("[jwt] store: {e}"))?;
            Some(crate::images::Jwt::new(secret.as_bytes(), &j.store))
        }
    };
    let images = crate::images::Images::new(opener.clone(), jwt, config.nbd.images);

    let tls = config.nbd.tls.as_ref().map(load_tls).transpose()?;
    let server_config = ServerConfig {
        max_connections: config.nbd.max_connections,
        max_in_flight_bytes: config.nbd.max_in_flight_bytes.0 as usize,
        max_payload: config.nbd.max_payload.0 as u32,
        handshake_timeout: Duration::from_secs(config.nbd.handshake_timeout_secs),
        default_export: config
            .nbd
            .default_export
            .clone()
            .or_else(|| config.volumes.first().map(|v| v.name.clone())),
        tls,
        ..ServerConfig::default()
    };
    let mut tasks = Vec::new();
    let server = Server::new(server_config, Vec::new());
    server.set_resolver(images.clone());
    let state = crate::state::open(config.state.store.as_deref(), &data_dir)?;
    let manager = Manager::new(
        node_name(&config),
        data_dir.clone(),
        registry.clone(),
        images.clone(),
        server.clone(),
        state,
    );
    manager.set_stores(
        store_descriptions(&config, &data_dir)?,
        StoreFactory::new(&config, &data_dir),
        opener.clone(),
    );
    for v in &config.volumes {
        manager.add_configured(v).await?;
    }
    // Open the declared volumes before clients come; if the state store cannot be read, the
    // loop below keeps trying.
    if let Err(e) = manager.reconcile().await {
        warn!(error = %e, "cannot read the desired state yet; serving the configured volumes and retrying");
    }
    tasks.push(tokio::spawn(
        manager
            .clone()
            .run(Duration::from_secs_f64(config.state.reconcile_secs)),
    ));
    if config.gc.interval_secs > 0 {
        tasks.push(tokio::spawn(crate::gc::scheduled(
            opener.clone(),
            config.gc.clone(),
        )));
    }

    // Listeners: systemd socket activation replaces the configured ones.
    let mut listening = Vec::new();
    let activated = systemd_listeners()?;
    if !activated.is_empty() {
        for l in activated {
            match l {
                Activated::Tcp(l) => {
                    listening.push(format!("nbd://{} (systemd)", l.local_addr()?));
                    tasks.push(tokio::spawn(server.clone().serve_tcp(l)));
                }
                Activated::Unix(l) => {
                    let path = l
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
                    listening.push(format!(
                        "nbd+unix:///?socket={} (systemd)",
                        path.map(|p| p.display().to_string()).unwrap_or_default()
                    ));
                    tasks.push(tokio::spawn(server.clone().serve_unix(l)));
                }
            }
        }
    } else {
        for addr in &config.nbd.listen {
            let l = TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "listen on {addr} (is another server using the port? pick one with --listen)"
                )
            })?;
            listening.push(format!("nbd://{}", l.local_addr()?));
            tasks.push(tokio::spawn(server.clone().serve_tcp(l)));
        }
        for path in &config.nbd.unix {
            let l = bind_unix(path)?;
            listening.push(format!("nbd+unix:///?socket={}", path.display()));
            tasks.push(tokio::spawn(server.clone().serve_unix(l)));
        }
    }

    manager.set_nbd_uris(
        listening
            .iter()
            .map(|l| l.split_whitespace().next().unwrap_or(l).to_string())
            .collect(),
    );

    // The gRPC API.
    let api_unix = config
        .api
        .unix
        .clone()
        .unwrap_or_else(|| data_dir.join("api.sock"));
    let api = crate::grpc::Api::new(manager.clone());
    let routes = api.routes()?;
    let mut api_listening = Vec::new();
    let mut metrics_listening = Vec::new();
    {
        let l = bind_unix(&api_unix)?;
        // Whoever can connect can change every volume: the daemon's user only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&api_unix, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restrict {} to its owner", api_unix.display()))?;
        api_listening.push(format!("unix://{}", api_unix.display()));
        let routes = routes.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(l);
            if let Err(e) = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(incoming)
                .await
            {
                warn!(error = %e, "gRPC API on the unix socket stopped");
            }
        }));
    }
    for addr in &config.api.listen {
        let l = TcpListener::bind(addr).await.with_context(|| {
            format!("gRPC API: listen on {addr} (is the port taken? set [api] listen or pass --api-listen)")
        })?;
        api_listening.push(format!("http://{}", l.local_addr()?));
        let routes = routes.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
            if let Err(e) = tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(incoming)
                .await
            {
                warn!(error = %e, "gRPC API on TCP stopped");
            }
        }));
    }

    for addr in &config.metrics.listen {
        let l = TcpListener::bind(addr).await.with_context(|| {
            format!("metrics: listen on {addr} (is the port taken? set [metrics] listen or pass --metrics-listen)")
        })?;
        metrics_listening.push(format!("http://{}/metrics", l.local_addr()?));
        tasks.push(tokio::spawn(crate::metrics::serve(manager.clone(), l)));
    }

    print_banner(
        &data_dir,
        &manager.volumes(),
        &listening,
        &api_listening,
        &metrics_listening,
        config.nbd.tls.is_some(),
    );

    wait_for_signal().await?;
    info!("shutting down: draining connections");
    let drain = Duration::from_secs(config.nbd.shutdown_timeout_secs);
    if tokio::time::timeout(drain, server.shutdown())
        .await
        .is_err()
    {
        warn!("requests still in flight after {drain:?} (a device is not answering); flushing and exiting without them");
    }
    for t in tasks {
        t.abort();
    }
    let failed = !manager.flush_all().await.is_empty();
    for path in config.nbd.unix.iter().chain([&api_unix]) {
        let _ = std::fs::remove_file(path);
    }
    if failed {
        bail!("some volumes could not be flushed on shutdown; see the log above");
    }
    info!("stopped cleanly");
    Ok(())
}

/// The page stores the configuration names, and `local` unless it names one so.
fn store_entries(
    config: &Config,
    data_dir: &Path,
) -> anyhow::Result<Vec<(String, strata_pagestore::StoreConfig)>> {
    use strata_pagestore::StoreConfig;
    let mut entries: Vec<(String, StoreConfig)> = Vec::new();
    for st in &config.stores {
        entries.push((st.name.clone(), st.store_config(data_dir)?));
    }
    if !entries.iter().any(|(n, _)| n == "local") {
        entries.push((
            "local".into(),
            StoreConfig::Dir {
                path: data_dir.join("objects"),
            },
        ));
    }
    Ok(entries)
}

/// The page stores the configuration declares, as the API describes them.
fn store_descriptions(
    config: &Config,
    data_dir: &Path,
) -> anyhow::Result<Vec<crate::manager::StoreDesc>> {
    Ok(store_entries(config, data_dir)?
        .into_iter()
        .map(|(name, sc)| crate::manager::StoreDesc::new(&name, &sc, true))
        .collect())
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

/// Makes page stores from store settings, with the configuration's buffer and cache
/// directories and tunables.
#[derive(Debug, Clone)]
pub struct StoreFactory {
    buffer_dir: PathBuf,
    settings: strata_pagestore::Settings,
    disk_cache_root: Option<PathBuf>,
}

impl StoreFactory {
    pub fn new(config: &Config, data_dir: &Path) -> StoreFactory {
        StoreFactory {
            buffer_dir: config
                .pagestore
                .buffer_dir
                .as_deref()
                .map(|b| PathBuf::from(crate::config::expand_uri(b, data_dir)))
                .unwrap_or_else(|| data_dir.join("buffer")),
            settings: config.pagestore.settings(),
            disk_cache_root: config
                .pagestore
                .disk_cache_dir
                .as_deref()
                .map(|d| PathBuf::from(crate::config::expand_uri(d, data_dir))),
        }
    }

    /// The page store `name` over the object store `sc` describes.
    pub fn build(
        &self,
        name: &str,
        sc: &strata_pagestore::StoreConfig,
    ) -> anyhow::Result<strata_pagestore::PageStore> {
        let objects = strata_pagestore::Store::open(sc)
            .map_err(|e| anyhow::anyhow!("store {name:?}: {e}"))?;
        // One buffer (and cache) directory per store, so that equal image names never meet.
        let mut settings = self.settings.clone();
        settings.disk_cache_dir = self.disk_cache_root.as_ref().map(|d| d.join(name));
        Ok(strata_pagestore::PageStore {
            objects: Arc::new(objects),
            buffer_dir: self.buffer_dir.join(name),
            settings,
        })
    }
}

/// The page stores the configuration names (and `local`, unless it names one so).
pub fn image_opener(
    config: &Config,
    data_dir: &Path,
) -> anyhow::Result<strata_pagestore::ImageOpener> {
    let factory = StoreFactory::new(config, data_dir);
    let opener = strata_pagestore::ImageOpener::new();
    for (name, sc) in store_entries(config, data_dir)? {
        opener.add_store(&name, factory.build(&name, &sc)?);
    }
    Ok(opener)
}

fn print_banner(
    data_dir: &Path,
    volumes: &[Arc<Managed>],
    listening: &[String],
    api: &[String],
    metrics: &[String],
    tls: bool,
) {
    println!(
        "strata {}: data directory {}",
        env!("CARGO_PKG_VERSION"),
        data_dir.display()
    );
    for v in volumes.iter().map(|m| &m.volume) {
        println!(
            "volume {}: {} bytes, {}",
            v.name,
            v.device().geometry().size,
            v.source
        );
        if let Some(n) = v.nexus() {
            for (i, c) in n.status().children.iter().enumerate() {
                println!("  replica #{i} {}: {}", c.state, c.name);
            }
        }
    }
    for l in listening {
        println!("listening: {l}");
    }
    for a in api {
        println!("api: {a}");
    }
    for m in metrics {
        println!("metrics: {m}");
    }
    if let (Some(first), Some(tcp)) = (
        volumes.first().map(|m| &m.volume),
        listening.iter().find(|l| l.starts_with("nbd://")),
    ) {
        let base = tcp.split_whitespace().next().unwrap_or(tcp);
        let hostport = base.trim_start_matches("nbd://");
        let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "10809"));
        let scheme = if tls { "nbds" } else { "nbd" };
        println!("connect with:");
        println!("  nbdinfo {scheme}://{hostport}/{}", first.name);
        println!("  qemu-io -f raw {scheme}://{hostport}/{}", first.name);
        println!("  nbd-client {host} {port} /dev/nbd0 -N {}", first.name);
    }
    println!("ready");
}

fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    // A socket file left by a process that died is removed; a live one is not stolen.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("unix socket {} is in use by another server", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("listen on unix socket {}", path.display()))
}

fn load_tls(t: &TlsConfig) -> anyhow::Result<TlsSettings> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&t.cert)
        .with_context(|| format!("read TLS certificate {}", t.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse TLS certificate {}", t.cert.display()))?;
    if certs.is_empty() {
        bail!(
            "TLS certificate file {} holds no certificate",
            t.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&t.key)
        .with_context(|| format!("read TLS private key {}", t.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("set TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "use TLS certificate {} with key {}",
                t.cert.display(),
                t.key.display()
            )
        })?;
    Ok(TlsSettings {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        mode: match t.mode {
            TlsModeConfig::Required => TlsMode::Required,
            TlsModeConfig::Optional => TlsMode::Optional,
        },
    })
}

enum Activated {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Listeners passed by systemd socket activation (`LISTEN_PID`, `LISTEN_FDS`), if any.
fn systemd_listeners() -> anyhow::Result<Vec<Activated>> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let Some(n) = std::env::var("LISTEN_FDS").ok().filter(|_| pid_matches) else {
        return Ok(Vec::new());
    };
    let n: RawFd = n
        .parse()
        .with_context(|| format!("LISTEN_FDS={n:?} is not a number"))?;
    // These describe us only; children must not inherit them.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    const SD_LISTEN_FDS_START: RawFd = 3;
    let mut out = Vec::new();
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n {
        // SAFETY: `sockaddr_storage` is plain data; getsockname writes at most `len` bytes to it.
        let family = unsafe {
            let mut addr: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if libc::getsockname(
                fd,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
            ) != 0
            {
                bail!(
                    "systemd passed fd {fd}, which is not a socket: {}",
                    std::io::Error::last_os_error()
                );
            }
            i32::from(addr.ss_family)
        };
        if family == libc::AF_UNIX {
            // SAFETY: systemd hands us ownership of the listening sockets LISTEN_FDS names.
            let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
            l.set_nonblocking(true)?;
            out.push(Activated::Unix(UnixListener::from_std(l)?));
        } else {
            // SAFETY: as above.
            let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            l.set_nonblocking(true)?;
            out.push(Activated::Tcp(TcpListener::from_std(l)?));
        }
    }
    Ok(out)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}
