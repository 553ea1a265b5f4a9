//! The daemon's settings: a TOML file, overridden by flags, with an embedded default that serves
//! a demo volume. Each section that tunes a component is that component's own settings struct
//! (`[gc]` is `manager::gc::GcSettings`, a nexus volume's tunables `strata_nexus::NexusSettings`);
//! volumes convert into the manager's [`VolumeDecl`] here, once.
//!
//! ```toml
//! data_dir = "/var/lib/strata"
//!
//! [nbd]
//! listen = ["127.0.0.1:10809"]
//! unix = ["/run/strata/nbd.sock"]
//! default_export = "demo"
//!
//! [nbd.tls]
//! cert = "/etc/strata/server-cert.pem"
//! key = "/etc/strata/server-key.pem"
//! mode = "required"
//!
//! [[volume]]
//! name = "demo"
//! uri = "file://{data_dir}/demo.img?size=1G"
//! description = "demo volume"
//!
//! [[volume]]                 # a nexus: every write goes to each replica
//! name = "mirrored"
//! replicas = ["file://{data_dir}/m0.img?size=1G", "nbd://10.0.0.2:10809/m1"]
//! dirty_granularity = "1M"   # what a returning replica is known to have missed, per bit
//! child_timeout_secs = 30    # a replica slower than this is faulted
//! ```

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use serde::Deserialize;
use strata_nexus::NexusSettings;

use super::manager::gc::GcSettings;
use super::manager::{
    Backing, ImageDecl, ImageKey, NexusDecl, Protocol, StoreFactory, VolumeDecl, DEFAULT_PAGE_SIZE,
};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where volumes created by default and other local state live. `{data_dir}` in a volume URI
    /// expands to it.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// The NBD target.
    #[serde(default)]
    pub nbd: NbdConfig,
    /// The NVMe/TCP target.
    #[serde(default)]
    pub nvmf: NvmfConfig,
    /// The vhost-user-blk target (`strata_vhost_user_blk::VhostUserSettings`).
    #[serde(default)]
    pub vhost_user: strata_vhost_user_blk::VhostUserSettings,
    /// The volumes to open and export.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// Object stores for page-store images (`image://STORE/NAME`). A store named `local`
    /// (the directory `{data_dir}/objects`) exists unless one is declared with that name.
    #[serde(default, rename = "store")]
    pub stores: Vec<StoreEntry>,
    /// Page-store tunables and the write-buffer directory (`strata_pagestore::Settings`).
    #[serde(default)]
    pub pagestore: strata_pagestore::Settings,
    /// Export names that are access tokens (HS256 JWTs) selecting page-store images.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Garbage collection of page stores inside the daemon.
    #[serde(default)]
    pub gc: GcSettings,
    /// The gRPC API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Where desired state lives.
    #[serde(default)]
    pub state: StateConfig,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Directories where volumes made through the API's TCP listeners may put local devices.
    #[serde(default, rename = "pool")]
    pub pools: Vec<super::manager::Pool>,
    /// `[cluster]`: this node's labels, advertised host and registration lease.
    #[serde(default)]
    pub cluster: super::cluster::ClusterSettings,
}

/// `[metrics]`: where `GET /metrics` (Prometheus text format) is served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP addresses (default `127.0.0.1:10811`; `[]` for none).
    #[serde(default = "default_metrics_listen")]
    pub listen: Vec<String>,
}

fn default_metrics_listen() -> Vec<String> {
    vec!["127.0.0.1:10811".to_string()]
}

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

/// `[state]`: where the volumes created through the API and by `strata apply` are declared.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `file` (the default: `state/` in the data directory) or `etcd://HOST:PORT[,…]/PREFIX`,
    /// which several nodes can share.
    #[serde(default)]
    pub store: Option<String>,
    /// Seconds between reconciliations of the declared volumes with what is open.
    #[serde(default = "default_reconcile_secs")]
    pub reconcile_secs: f64,
}

fn default_reconcile_secs() -> f64 {
    2.0
}

impl Default for StateConfig {
    fn default() -> StateConfig {
        StateConfig {
            store: None,
            reconcile_secs: default_reconcile_secs(),
        }
    }
}

/// `[api]`: where the gRPC API listens. Its unix socket (mode 0600) lets the daemon's user in;
/// a TCP listener is off unless configured, and then every call needs a TLS client certificate
/// (`[api.tls] client_ca`) or a bearer token (`tokens_file`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP addresses (default none).
    #[serde(default)]
    pub listen: Vec<String>,
    /// The unix socket (default `api.sock` in the data directory).
    #[serde(default)]
    pub unix: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[serde(default)]
    pub node_name: Option<String>,
    /// TLS for the TCP listeners.
    #[serde(default)]
    pub tls: Option<super::api::listen::ApiTls>,
    /// Bearer tokens TCP clients may present: `NAME TOKEN` per line, mode 0600.
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// API connections served at once (unix and TCP together); more wait.
    #[serde(default = "default_api_connections")]
    pub max_connections: usize,
}

fn default_api_connections() -> usize {
    64
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            listen: Vec::new(),
            unix: None,
            node_name: None,
            tls: None,
            tokens_file: None,
            max_connections: default_api_connections(),
        }
    }
}

impl ApiConfig {
    /// Refuse TCP listeners that would let anyone in.
    fn validate(&self) -> anyhow::Result<()> {
        if self.max_connections == 0 {
            bail!("[api] max_connections must be at least 1");
        }
        if self.listen.is_empty() {
            return Ok(());
        }
        let certs = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if !certs && self.tokens_file.is_none() {
            bail!(
                "[api] listen {:?}: a TCP listener needs a way to tell callers apart: set \
                 [api] tokens_file (bearer tokens) or [api.tls] with client_ca (client \
                 certificates); the unix socket needs neither",
                self.listen
            );
        }
        Ok(())
    }
}

/// `[jwt]`: an export name that is an HS256 JWT selects (creating it on first use) the image
/// its `image_id` names. The secret is `STRATA_JWT_SECRET` when set, else `secret`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The HMAC secret (prefer the environment variable).
    #[serde(default)]
    pub secret: Option<String>,
    /// The store the images live in.
    #[serde(default = "default_jwt_store")]
    pub store: String,
}

fn default_jwt_store() -> String {
    "local".into()
}

/// `[[store]]`: where page-store images live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreEntry {
    /// The name `image://NAME/…` URIs use.
    pub name: String,
    /// `dir` (a local directory) or `s3` (any S3-compatible service).
    #[serde(rename = "type")]
    pub kind: StoreKind,
    /// dir: the directory (`{data_dir}` expands).
    #[serde(default)]
    pub path: Option<String>,
    /// s3: the service's URL (default: AWS).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// s3: the region (default us-east-1).
    #[serde(default)]
    pub region: Option<String>,
    /// s3: the bucket.
    #[serde(default)]
    pub bucket: Option<String>,
    /// s3: a key prefix inside the bucket.
    #[serde(default)]
    pub prefix: Option<String>,
    /// s3: credentials (default: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Dir,
    S3,
}

impl StoreEntry {
    /// The store this entry describes, with `{data_dir}` expanded.
    pub fn store_config(&self, data_dir: &Path) -> anyhow::Result<strata_pagestore::StoreConfig> {
        match self.kind {
            StoreKind::Dir => {
                let Some(path) = &self.path else {
                    bail!("store {:?}: type \"dir\" needs path = \"...\"", self.name);
                };
                Ok(strata_pagestore::StoreConfig::Dir {
                    path: PathBuf::from(super::manager::expand_uri(path, data_dir)),
                })
            }
            StoreKind::S3 => {
                let Some(bucket) = &self.bucket else {
                    bail!("store {:?}: type \"s3\" needs bucket = \"...\"", self.name);
                };
                Ok(strata_pagestore::StoreConfig::S3 {
                    endpoint: self.endpoint.clone(),
                    region: self.region.clone().unwrap_or_else(|| "us-east-1".into()),
                    bucket: bucket.clone(),
                    prefix: self.prefix.clone().unwrap_or_default(),
                    access_key_id: self.access_key_id.clone(),
                    secret_access_key: self.secret_access_key.clone(),
                })
            }
        }
    }
}

/// `[nbd]`: where the NBD target listens, and its settings.
#[derive(Debug, Clone, Deserialize)]
pub struct NbdConfig {
    /// TCP addresses to listen on (`host:port`; port 0 picks a free one).
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Unix socket paths to listen on.
    #[serde(default)]
    pub unix: Vec<PathBuf>,
    /// Seconds to wait on shutdown for requests already received to finish.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
    /// TLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve any page-store image as `STORE/IMAGE` and its snapshots as `STORE/IMAGE@SNAP`
    /// (and an image volume's snapshots as `VOLUME@SNAP`), opened when a client asks.
    #[serde(default = "default_true")]
    pub images: bool,
    /// Images opened for clients by name or token are closed after this long unused
    /// (default 60 s).
    #[serde(default = "default_images_idle", with = "strata_bdev::units::secs")]
    pub images_idle_secs: std::time::Duration,
    /// The server's own settings, `strata_nbd::ServerConfig` (max_connections,
    /// max_connections_per_peer, max_handshakes, max_handshakes_per_peer,
    /// max_in_flight_bytes, max_in_flight_requests, max_payload, handshake_timeout_secs,
    /// idle_timeout_secs, takeover_timeout_secs, default_export); any other key is a mistake.
    #[serde(flatten)]
    pub server: BTreeMap<String, toml::Value>,
}

impl NbdConfig {
    /// The NBD server's settings (without TLS, which the daemon loads).
    pub fn server_config(&self) -> anyhow::Result<strata_nbd::ServerConfig> {
        let c: strata_nbd::ServerConfig =
            toml::Value::Table(self.server.clone().into_iter().collect())
                .try_into()
                .map_err(|e| anyhow::anyhow!("[nbd]: {e}"))?;
        c.validate()?;
        Ok(c)
    }
}

fn default_true() -> bool {
    true
}

fn default_listen() -> Vec<String> {
    vec!["127.0.0.1:10809".to_string()]
}

fn default_shutdown_timeout() -> u64 {
    30
}

fn default_images_idle() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        NbdConfig {
            listen: default_listen(),
            unix: Vec::new(),
            shutdown_timeout_secs: default_shutdown_timeout(),
            tls: None,
            images: true,
            images_idle_secs: default_images_idle(),
            server: BTreeMap::new(),
        }
    }
}

/// `[nvmf]`: where the NVMe/TCP target listens, and its settings. Every exported volume is
/// subsystem `nqn.2026-12.io.strata:VOLUME`, namespace 1; the discovery subsystem is on the
/// same port.
#[derive(Debug, Clone, Deserialize)]
pub struct NvmfConfig {
    /// TCP addresses (default `127.0.0.1:4420`; `[]` for none).
    #[serde(default = "default_nvmf_listen")]
    pub listen: Vec<String>,
    /// The target's own settings, `strata_nvmf::TargetSettings` (max_queue_entries,
    /// max_io_queues, max_h2c_data, max_data_transfer, in_capsule_data_size,
    /// keep_alive_default_secs, max_connections, handshake_timeout_secs); any other key is a
    /// mistake.
    #[serde(flatten)]
    pub target: BTreeMap<String, toml::Value>,
}

fn default_nvmf_listen() -> Vec<String> {
    vec!["127.0.0.1:4420".to_string()]
}

impl Default for NvmfConfig {
    fn default() -> NvmfConfig {
        NvmfConfig {
            listen: default_nvmf_listen(),
            target: BTreeMap::new(),
        }
    }
}

impl NvmfConfig {
    /// The target's settings.
    pub fn target_settings(&self) -> anyhow::Result<strata_nvmf::TargetSettings> {
        toml::Value::Table(self.target.clone().into_iter().collect())
            .try_into()
            .map_err(|e| anyhow::anyhow!("[nvmf]: {e}"))
    }
}

/// `[nbd.tls]`: certificate, key and whether plain-text clients are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, server certificate first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// `required` (default) refuses clients that do not use STARTTLS; `optional` lets them choose.
    #[serde(default)]
    pub mode: TlsModeConfig,
}

/// How TLS is enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsModeConfig {
    #[default]
    Required,
    Optional,
}

/// `[[volume]]`: one named device and its export.
#[derive(Debug, Clone, Deserialize)]
pub struct VolumeConfig {
    /// The export name.
    pub name: String,
    /// The device URI (`file://`, `mem://`, `nbd://`, `image://STORE/NAME?size=…`, …);
    /// `{data_dir}` expands.
    #[serde(default)]
    pub uri: Option<String>,
    /// Or: the URIs of the replicas of a nexus volume, which mirrors every write to each.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Shown by `nbdinfo --list`.
    #[serde(default)]
    pub description: String,
    /// Export read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The protocols it is exported over: nbd, nvmf, vhost_user (default: nbd and nvmf).
    #[serde(default)]
    pub exports: Option<Vec<String>>,
    /// NVMe/TCP: host NQNs allowed to connect (default: any host).
    #[serde(default)]
    pub nvmf_hosts: Vec<String>,
    /// A nexus volume's tunables (`strata_nexus::NexusSettings`: `dirty_granularity`,
    /// `rebuild_segment`, `rebuild_parallel`, `child_timeout_secs`); any other key is a mistake,
    /// reported by name.
    #[serde(flatten)]
    pub nexus: BTreeMap<String, toml::Value>,
}

impl VolumeConfig {
    /// A plain volume over one device.
    pub fn device(name: &str, uri: &str) -> VolumeConfig {
        VolumeConfig {
            name: name.to_string(),
            uri: Some(uri.to_string()),
            replicas: Vec::new(),
            description: String::new(),
            read_only: false,
            exports: None,
            nvmf_hosts: Vec::new(),
            nexus: BTreeMap::new(),
        }
    }

    /// The volume this entry declares.
    pub fn decl(&self) -> anyhow::Result<VolumeDecl> {
        let name = &self.name;
        let settings: NexusSettings = toml::Value::Table(self.nexus.clone().into_iter().collect())
            .try_into()
            .map_err(|e| anyhow::anyhow!("volume {name:?}: {e}"))?;
        let (backing, size) = match (&self.uri, self.replicas.is_empty()) {
            (Some(uri), true) if uri.starts_with("image:") => image_backing(name, uri)?,
            (Some(uri), true) => (Backing::Device(uri.clone()), 0),
            (None, false) => (
                Backing::Nexus(NexusDecl {
                    replicas: self.replicas.clone(),
                    settings,
                    placed: None,
                }),
                0,
            ),
            (None, true) => bail!(
                "volume {name:?}: give it a device (uri = \"...\") or replicas (replicas = [\"...\", ...])"
            ),
            (Some(_), false) => bail!(
                "volume {name:?}: has both uri and replicas; a nexus volume lists its devices in replicas only"
            ),
        };
        if !self.nexus.is_empty() && !matches!(backing, Backing::Nexus(_)) {
            bail!(
                "volume {name:?}: dirty_granularity, rebuild_segment, rebuild_parallel and \
                 child_timeout_secs apply to nexus volumes (replicas = [...]) only"
            );
        }
        let exports = match &self.exports {
            None => Protocol::defaults(),
            Some(list) => list
                .iter()
                .map(|p| {
                    Protocol::parse(p).map_err(|e| anyhow::anyhow!("volume {name:?}: exports: {e}"))
                })
                .collect::<anyhow::Result<_>>()?,
        };
        let d = VolumeDecl {
            name: name.clone(),
            size,
            backing,
            exports,
            read_only: self.read_only,
            description: self.description.clone(),
            node: String::new(),
            nvmf_hosts: self.nvmf_hosts.clone(),
            labels: Default::default(),
        };
        d.validate("")
            .map_err(|e| anyhow::anyhow!("volume {name:?}: {e}"))?;
        Ok(d)
    }
}

/// `image://STORE/NAME?size=SIZE&page_size=BYTES`: the image and the size it is created with.
fn image_backing(volume: &str, uri: &str) -> anyhow::Result<(Backing, u64)> {
    let mut u = strata_bdev::DeviceUri::parse(uri)
        .map_err(|e| anyhow::anyhow!("volume {volume:?}: {}", e.chain()))?;
    let key = ImageKey::parse(&format!(
        "{}/{}",
        u.authority,
        u.path.trim_start_matches('/')
    ))
    .map_err(|e| anyhow::anyhow!("volume {volume:?}: uri {uri:?}: {e}"))?;
    let size = u
        .take_size("size")
        .map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
    let page = u
        .take_size("page_size")
        .map_err(|e| anyhow::anyhow!("{}", e.chain()))?
        .unwrap_or(u64::from(DEFAULT_PAGE_SIZE));
    u.finish(&["size", "page_size"])
        .map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
    let page_size = u32::try_from(page)
        .map_err(|_| anyhow::anyhow!("volume {volume:?}: page_size {page} is too large"))?;
    Ok((
        Backing::Image(ImageDecl { key, page_size }),
        size.unwrap_or(0),
    ))
}

impl Config {
    /// The configuration file `path`, or the embedded default; `data_dir` overrides its data
    /// directory.
    pub fn load_or_default(path: Option<&Path>, data_dir: Option<&Path>) -> anyhow::Result<Config> {
        let mut c = match path {
            Some(path) => Config::load(path)?,
            None => Config::embedded_default(),
        };
        if let Some(d) = data_dir {
            c.data_dir = Some(d.to_path_buf());
        }
        Ok(c)
    }

    /// Where local state lives: the configured data directory, else the default one.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// The access-token verifier `[jwt]` asks for; its secret is `STRATA_JWT_SECRET` when set.
    /// `STRATA_JWT_SECRET` alone turns tokens on over the `local` store, as the MVPS engine is
    /// started with its secret in the environment.
    pub fn jwt(&self) -> anyhow::Result<Option<super::jwt::Jwt>> {
        let Some(j) = &self.jwt else {
            return Ok(std::env::var("STRATA_JWT_SECRET")
                .ok()
                .filter(|s| !s.is_empty())
                .map(|s| super::jwt::Jwt::new(s.as_bytes(), "local")));
        };
        let secret = std::env::var("STRATA_JWT_SECRET")
            .ok()
            .or_else(|| j.secret.clone())
            .context("[jwt] needs a secret: set STRATA_JWT_SECRET or [jwt] secret")?;
        Ok(Some(super::jwt::Jwt::new(secret.as_bytes(), &j.store)))
    }

    /// The volumes the file declares.
    pub fn volume_decls(&self) -> anyhow::Result<Vec<VolumeDecl>> {
        self.volumes.iter().map(VolumeConfig::decl).collect()
    }

    /// The page stores the file names, and `local` (the directory `{data_dir}/objects`) unless
    /// it names one so.
    pub fn store_entries(&self) -> anyhow::Result<Vec<(String, strata_pagestore::StoreConfig)>> {
        let data_dir = self.data_dir();
        let mut entries = Vec::new();
        for st in &self.stores {
            entries.push((st.name.clone(), st.store_config(&data_dir)?));
        }
        if !entries.iter().any(|(n, _)| n == "local") {
            entries.push((
                "local".into(),
                strata_pagestore::StoreConfig::Dir {
                    path: data_dir.join("objects"),
                },
            ));
        }
        Ok(entries)
    }

    /// How this node makes page stores: its buffer and cache directories and tunables.
    pub fn store_factory(&self) -> StoreFactory {
        let data_dir = self.data_dir();
        let expand =
            |p: &Path| PathBuf::from(super::manager::expand_uri(&p.to_string_lossy(), &data_dir));
        StoreFactory {
            buffer_dir: self
                .pagestore
                .buffer_dir
                .as_deref()
                .map(expand)
                .unwrap_or_else(|| data_dir.join("buffer")),
            settings: self.pagestore.clone(),
            disk_cache_root: self.pagestore.disk_cache_dir.as_deref().map(expand),
        }
    }

    /// Read and validate a configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("parse config file {}", path.display()))
    }

    /// Parse a configuration's TOML text (not yet validated: see [`Config::validate`]).
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        Ok(toml::from_str(text)?)
    }

    /// The embedded default: a thin 1 GiB file-backed volume `demo` in the data directory.
    pub fn embedded_default() -> Config {
        Config {
            data_dir: None,
            nbd: NbdConfig::default(),
            nvmf: NvmfConfig::default(),
            vhost_user: Default::default(),
            volumes: vec![VolumeConfig {
                description: "Strata demo volume (a thin page-store image in the data directory)"
                    .to_string(),
                exports: Some(vec!["nbd".into(), "nvmf".into(), "vhost_user".into()]),
                ..VolumeConfig::device("demo", "image://local/demo?size=1G")
            }],
            stores: Vec::new(),
            api: ApiConfig::default(),
            state: StateConfig::default(),
            metrics: MetricsConfig::default(),
            pagestore: strata_pagestore::Settings::default(),
            jwt: None,
            gc: GcSettings::default(),
            pools: Vec::new(),
            cluster: Default::default(),
        }
    }

    /// Check what can be checked before opening anything.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut seen = std::collections::HashSet::new();
        for v in &self.volumes {
            if !seen.insert(v.name.as_str()) {
                bail!("volume {:?} is declared twice", v.name);
            }
            v.decl()?;
        }
        let mut stores = std::collections::HashSet::new();
        for st in &self.stores {
            if strata_pagestore::check_name(&st.name).is_err() {
                bail!("store name {:?}: use letters, digits, - _ .", st.name);
            }
            if !stores.insert(st.name.as_str()) {
                bail!("store {:?} is declared twice", st.name);
            }
            st.store_config(Path::new("/"))?;
        }
        self.api.validate()?;
        self.cluster.validate()?;
        if !(self.state.reconcile_secs >= 0.05 && self.state.reconcile_secs <= 3600.0) {
            bail!("[state] reconcile_secs must be between 0.05 and 3600");
        }
        if let Some(s) = &self.state.store {
            if s != "file" && !s.starts_with("etcd://") {
                bail!("[state] store = {s:?}: use \"file\" or etcd://HOST:PORT/PREFIX");
            }
        }
        if self.nbd.listen.is_empty() && self.nbd.unix.is_empty() {
            bail!("no NBD listeners: set [nbd] listen or unix, or pass --listen");
        }
        let server = self.nbd.server_config()?;
        self.nvmf.target_settings()?;
        if let Some(d) = &server.default_export {
            if !self.volumes.iter().any(|v| &v.name == d) {
                bail!("[nbd] default_export {d:?} is not a declared volume");
            }
        }
        Ok(())
    }
}

/// The data directory when neither the config nor a flag names one: `$STRATA_DATA_DIR`, else
/// `$XDG_DATA_HOME/strata`, else `~/.local/share/strata`, else `./strata-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STRATA_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("strata");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/strata");
    }
    PathBuf::from("strata-data")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let c: Config = toml::from_str(
            r#"
            data_dir = "/tmp/x"
            [nbd]
            listen = ["127.0.0.1:0"]
            unix = ["/tmp/x.sock"]
            max_in_flight_bytes = "128M"
            max_payload = 1048576
            default_export = "a"
            [nbd.tls]
            cert = "c.pem"
            key = "k.pem"
            mode = "optional"
            [[volume]]
            name = "a"
            uri = "mem://a?size=1M"
            [[volume]]
            name = "b"
            uri = "file://{data_dir}/b.img?size=1G"
            read_only = true
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.nbd.server_config().unwrap().max_in_flight_bytes,
            128 << 20
        );
        assert_eq!(c.nbd.tls.unwrap().mode, TlsModeConfig::Optional);
        assert_eq!(
            crate::daemon::manager::expand_uri(
                c.volumes[1].uri.as_deref().unwrap(),
                c.data_dir.as_deref().unwrap()
            ),
            "file:///tmp/x/b.img?size=1G"
        );
    }

    #[test]
    fn mistakes_are_reported() {
        let c: Config = toml::from_str("[[volume]]\nname = \"a\"\nurl = \"mem://a\"\n").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("unknown field `url`"), "{e}");
        let c: Config = toml::from_str("[nbd]\nmax_payload = \"12Q\"\n").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("unit"), "{e}");
        let c: Config = toml::from_str("[nbd]\nmax_conections = 3\n").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("max_conections"), "{e}");
        let c: Config = toml::from_str("[nbd]\nmax_connections = 0\n").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("max_connections"), "{e}");
        let mut c = Config::embedded_default();
        c.volumes.push(c.volumes[0].clone());
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        let bad = [
            ("[[volume]]\nname = \"a\"\n", "give it a device"),
            (
                "[[volume]]\nname = \"a\"\nuri = \"mem://a\"\nreplicas = [\"mem://b\"]\n",
                "both uri and replicas",
            ),
            (
                "[[volume]]\nname = \"a\"\nreplicas = [\"mem://b\", \"mem://b\"]\n",
                "listed twice",
            ),
            (
                "[[volume]]\nname = \"a\"\nuri = \"mem://a\"\ndirty_granularity = \"1M\"\n",
                "nexus volumes",
            ),
            (
                "[[volume]]\nname = \"a\"\nreplicas = [\"mem://b\"]\ndirty_granularity = 1000\n",
                "multiple of 4 KiB",
            ),
        ];
        let bad = bad.into_iter().chain([
            (
                "[[volume]]\nname = \"../x\"\nuri = \"mem://a\"\n",
                "volume name",
            ),
            (
                "[[volume]]\nname = \"a\"\nreplicas = [\"mem://b\"]\nchild_timeout_secs = 1e300\n",
                "31 years",
            ),
            (
                "[[volume]]\nname = \"a\"\nuri = \"image://local/a?size=1G&pages=1\"\n",
                "pages",
            ),
        ]);
        for (text, want) in bad {
            let e = match toml::from_str::<Config>(text) {
                Err(e) => e.to_string(),
                Ok(c) => match c.validate() {
                    Err(e) => e.to_string(),
                    Ok(()) => panic!("{text}: accepted"),
                },
            };
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
