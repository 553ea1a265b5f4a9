//! The daemon's settings: a TOML file, overridden by flags, with an embedded default that serves
//! a demo volume.
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

use anyhow::{bail, Context};
use serde::Deserialize;

/// A byte size written as a number or a string with a unit ("64M").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SizeRepr")]
pub struct Size(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Number(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for Size {
    type Error = String;

    fn try_from(r: SizeRepr) -> Result<Size, String> {
        match r {
            SizeRepr::Number(n) => Ok(Size(n)),
            SizeRepr::Text(t) => strata_bdev::parse_size(&t).map(Size),
        }
    }
}

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
    /// The volumes to open and export.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// Object stores for page-store images (`image://STORE/NAME`). A store named `local`
    /// (the directory `{data_dir}/objects`) exists unless one is declared with that name.
    #[serde(default, rename = "store")]
    pub stores: Vec<StoreEntry>,
    /// Page-store tunables and the write-buffer directory.
    #[serde(default)]
    pub pagestore: PageStoreConfig,
    /// Export names that are access tokens (HS256 JWTs) selecting page-store images.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Garbage collection of page stores inside the daemon.
    #[serde(default)]
    pub gc: GcConfig,
    /// The gRPC API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Where desired state lives.
    #[serde(default)]
    pub state: StateConfig,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
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

/// `[api]`: where the gRPC API listens. Anyone who can connect can change every volume, so
/// it listens on loopback and on a unix socket only readable by the daemon's user by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP addresses (default `127.0.0.1:10810`; `[]` for none).
    #[serde(default = "default_api_listen")]
    pub listen: Vec<String>,
    /// The unix socket (default `api.sock` in the data directory).
    #[serde(default)]
    pub unix: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[serde(default)]
    pub node_name: Option<String>,
}

fn default_api_listen() -> Vec<String> {
    vec!["127.0.0.1:10810".to_string()]
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            listen: default_api_listen(),
            unix: None,
            node_name: None,
        }
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

/// `[gc]`: collect garbage in every store on a schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcConfig {
    /// Seconds between collections (0: never; `strata gc` runs one by hand).
    #[serde(default)]
    pub interval_secs: u64,
    /// Nothing written, or replaced, less than this many seconds ago is deleted.
    #[serde(default = "default_grace")]
    pub grace_secs: u64,
    /// Replaced versions of an image are kept this many seconds.
    #[serde(default)]
    pub retention_secs: u64,
}

fn default_grace() -> u64 {
    3600
}

impl Default for GcConfig {
    fn default() -> GcConfig {
        GcConfig {
            interval_secs: 0,
            grace_secs: default_grace(),
            retention_secs: 0,
        }
    }
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

/// `[pagestore]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageStoreConfig {
    /// Where write buffers live (default `{data_dir}/buffer`); on a local disk.
    #[serde(default)]
    pub buffer_dir: Option<String>,
    /// Checkpoint when an image has this much buffered.
    #[serde(default)]
    pub checkpoint_bytes: Option<Size>,
    /// Checkpoint buffered writes at least this often.
    #[serde(default)]
    pub checkpoint_secs: Option<u64>,
    /// Largest segment object.
    #[serde(default)]
    pub segment_bytes: Option<Size>,
    /// Writes wait while an image's buffer holds more than this.
    #[serde(default)]
    pub max_buffered_bytes: Option<Size>,
    /// Compact an image with more segments than this.
    #[serde(default)]
    pub max_segments: Option<usize>,
    /// Memory for cached segment data, per image.
    #[serde(default)]
    pub cache_bytes: Option<Size>,
    /// The read cache's unit: a miss fetches the aligned block around it.
    #[serde(default)]
    pub cache_block: Option<Size>,
    /// Local disk for cached segment data, per image (0: none).
    #[serde(default)]
    pub disk_cache_bytes: Option<Size>,
    /// Where the disk cache's files go (default: each image's write-buffer directory).
    #[serde(default)]
    pub disk_cache_dir: Option<String>,
    /// Seconds a transaction may stay open before it is rolled back.
    #[serde(default)]
    pub txn_timeout_secs: Option<u64>,
    /// Bytes a transaction may write.
    #[serde(default)]
    pub max_txn_bytes: Option<Size>,
}

impl PageStoreConfig {
    pub fn settings(&self) -> strata_pagestore::Settings {
        let mut s = strata_pagestore::Settings::default();
        if let Some(v) = self.checkpoint_bytes {
            s.checkpoint_bytes = v.0;
        }
        if let Some(v) = self.checkpoint_secs {
            s.checkpoint_age = std::time::Duration::from_secs(v.max(1));
        }
        if let Some(v) = self.segment_bytes {
            s.segment_bytes = v.0;
        }
        if let Some(v) = self.max_buffered_bytes {
            s.max_buffered_bytes = v.0;
        }
        if let Some(v) = self.max_segments {
            s.max_segments = v;
        }
        if let Some(v) = self.cache_bytes {
            s.cache_bytes = v.0;
        }
        if let Some(v) = self.cache_block {
            s.cache_block_bytes = v.0;
        }
        if let Some(v) = self.disk_cache_bytes {
            s.disk_cache_bytes = v.0;
        }
        if let Some(v) = self.txn_timeout_secs {
            s.txn_timeout = std::time::Duration::from_secs(v.max(1));
        }
        if let Some(v) = self.max_txn_bytes {
            s.max_txn_bytes = v.0;
        }
        s
    }
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
                    path: PathBuf::from(expand_uri(path, data_dir)),
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

/// `[nbd]`: where and how the NBD target listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// TCP addresses to listen on (`host:port`; port 0 picks a free one).
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Unix socket paths to listen on.
    #[serde(default)]
    pub unix: Vec<PathBuf>,
    /// Connections served at once; more wait.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Request bytes in flight per connection before the server stops reading it.
    #[serde(default = "default_in_flight")]
    pub max_in_flight_bytes: Size,
    /// Largest READ/WRITE accepted.
    #[serde(default = "default_max_payload")]
    pub max_payload: Size,
    /// Seconds a client has to finish negotiation.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// Seconds to wait on shutdown for requests already received to finish.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
    /// The export an empty export name selects (default: the first volume).
    #[serde(default)]
    pub default_export: Option<String>,
    /// TLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve any page-store image as `STORE/IMAGE` and its snapshots as `STORE/IMAGE@SNAP`
    /// (and an image volume's snapshots as `VOLUME@SNAP`), opened when a client asks.
    #[serde(default = "default_true")]
    pub images: bool,
}

fn default_true() -> bool {
    true
}

fn default_listen() -> Vec<String> {
    vec!["127.0.0.1:10809".to_string()]
}
fn default_max_connections() -> usize {
    256
}
fn default_in_flight() -> Size {
    Size(64 << 20)
}
fn default_max_payload() -> Size {
    Size(32 << 20)
}
fn default_handshake_timeout() -> u64 {
    60
}
fn default_shutdown_timeout() -> u64 {
    30
}

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        NbdConfig {
            listen: default_listen(),
            unix: Vec::new(),
            max_connections: default_max_connections(),
            max_in_flight_bytes: default_in_flight(),
            max_payload: default_max_payload(),
            handshake_timeout_secs: default_handshake_timeout(),
            shutdown_timeout_secs: default_shutdown_timeout(),
            default_export: None,
            tls: None,
            images: true,
        }
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
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// The export name.
    pub name: String,
    /// The device URI (`file://`, `mem://`, `nbd://`, …); `{data_dir}` expands.
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
    /// Nexus: bytes per bit of the map of what an absent replica missed.
    #[serde(default)]
    pub dirty_granularity: Option<Size>,
    /// Nexus: bytes a rebuild copies at once under one range lock.
    #[serde(default)]
    pub rebuild_segment: Option<Size>,
    /// Nexus: segments a rebuild copies in parallel.
    #[serde(default)]
    pub rebuild_parallel: Option<usize>,
    /// Nexus: a replica whose I/O takes longer than this many seconds is faulted.
    #[serde(default)]
    pub child_timeout_secs: Option<f64>,
    /// Devices that do not exist are created this large (file and memory URIs without a
    /// `size=`); set for volumes declared through the API.
    #[serde(skip)]
    pub create_size: Option<u64>,
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
            dirty_granularity: None,
            rebuild_segment: None,
            rebuild_parallel: None,
            child_timeout_secs: None,
            create_size: None,
        }
    }

    /// The nexus settings this volume asks for.
    pub fn nexus_settings(&self) -> strata_nexus::NexusSettings {
        let mut s = strata_nexus::NexusSettings::default();
        if let Some(g) = self.dirty_granularity {
            s.dirty_granularity = g.0;
        }
        if let Some(seg) = self.rebuild_segment {
            s.rebuild_segment = seg.0;
        }
        if let Some(p) = self.rebuild_parallel {
            s.rebuild_parallel = p;
        }
        s.io_timeout = self
            .child_timeout_secs
            .map(std::time::Duration::from_secs_f64);
        s
    }
}

impl Config {
    /// Read and validate a configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("parse config file {}", path.display()))?;
        Ok(config)
    }

    /// The embedded default: a thin 1 GiB file-backed volume `demo` in the data directory.
    pub fn embedded_default() -> Config {
        Config {
            data_dir: None,
            nbd: NbdConfig::default(),
            volumes: vec![VolumeConfig {
                description: "Strata demo volume (a thin page-store image in the data directory)"
                    .to_string(),
                ..VolumeConfig::device("demo", "image://local/demo?size=1G")
            }],
            stores: Vec::new(),
            api: ApiConfig::default(),
            state: StateConfig::default(),
            metrics: MetricsConfig::default(),
            pagestore: PageStoreConfig::default(),
            jwt: None,
            gc: GcConfig::default(),
        }
    }

    /// Check what can be checked before opening anything.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut seen = std::collections::HashSet::new();
        for v in &self.volumes {
            if v.name.is_empty() || v.name.len() > 4096 {
                bail!("volume name {:?}: must be 1 to 4096 bytes", v.name);
            }
            if !seen.insert(v.name.as_str()) {
                bail!("volume {:?} is declared twice", v.name);
            }
            match (&v.uri, v.replicas.len()) {
                (Some(_), 0) => {
                    let nexus_only = [
                        ("dirty_granularity", v.dirty_granularity.is_some()),
                        ("rebuild_segment", v.rebuild_segment.is_some()),
                        ("rebuild_parallel", v.rebuild_parallel.is_some()),
                        ("child_timeout_secs", v.child_timeout_secs.is_some()),
                    ];
                    if let Some((field, _)) = nexus_only.iter().find(|(_, set)| *set) {
                        bail!(
                            "volume {:?}: {field} applies to nexus volumes (replicas = [...]) only",
                            v.name
                        );
                    }
                }
                (None, 0) => bail!(
                    "volume {:?}: give it a device (uri = \"...\") or replicas (replicas = [\"...\", ...])",
                    v.name
                ),
                (Some(_), _) => bail!(
                    "volume {:?}: has both uri and replicas; a nexus volume lists its devices in replicas only",
                    v.name
                ),
                (None, _) => {
                    let mut uris = std::collections::HashSet::new();
                    for r in &v.replicas {
                        if !uris.insert(r) {
                            bail!("volume {:?}: replica {r:?} is listed twice", v.name);
                        }
                    }
                    if v.rebuild_parallel == Some(0) {
                        bail!("volume {:?}: rebuild_parallel must be at least 1", v.name);
                    }
                    if let Some(t) = v.child_timeout_secs {
                        if !(t > 0.0 && t.is_finite()) {
                            bail!("volume {:?}: child_timeout_secs must be a positive number of seconds", v.name);
                        }
                    }
                    if v.dirty_granularity.is_some_and(|g| g.0 == 0 || !g.0.is_multiple_of(4096)) {
                        bail!("volume {:?}: dirty_granularity must be a positive multiple of 4 KiB", v.name);
                    }
                }
            }
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
        if let Some(d) = &self.nbd.default_export {
            if !self.volumes.iter().any(|v| &v.name == d) {
                bail!("[nbd] default_export {d:?} is not a declared volume");
            }
        }
        if self.nbd.max_payload.0 < 4096 || self.nbd.max_payload.0 > 1 << 30 {
            bail!("[nbd] max_payload must be between 4096 bytes and 1 GiB");
        }
        if self.nbd.max_in_flight_bytes.0 < self.nbd.max_payload.0 {
            bail!("[nbd] max_in_flight_bytes must be at least max_payload");
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

/// Expand `{data_dir}` in a URI.
pub fn expand_uri(uri: &str, data_dir: &Path) -> String {
    uri.replace("{data_dir}", &data_dir.to_string_lossy())
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
        assert_eq!(c.nbd.max_in_flight_bytes, Size(128 << 20));
        assert_eq!(c.nbd.tls.unwrap().mode, TlsModeConfig::Optional);
        assert_eq!(
            expand_uri(
                c.volumes[1].uri.as_deref().unwrap(),
                c.data_dir.as_deref().unwrap()
            ),
            "file:///tmp/x/b.img?size=1G"
        );
    }

    #[test]
    fn mistakes_are_reported() {
        let e =
            toml::from_str::<Config>("[[volume]]\nname = \"a\"\nurl = \"mem://a\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `url`"), "{e}");
        let e = toml::from_str::<Config>("[nbd]\nmax_payload = \"12Q\"\n").unwrap_err();
        assert!(e.to_string().contains("unit"), "{e}");
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
        for (text, want) in bad {
            let c: Config = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
