//! `strata serve`: the flags that override the configuration file.

use std::path::PathBuf;

use anyhow::Context;

use crate::daemon::config::{Config, TlsConfig, TlsModeConfig, VolumeConfig};

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
    /// TCP address to serve NVMe/TCP on; repeat for several. Replaces [nvmf] listen.
    #[arg(long)]
    pub nvmf_listen: Vec<String>,
    /// Serve no NVMe/TCP.
    #[arg(long)]
    pub no_nvmf: bool,
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
        let mut c = Config::load_or_default(self.config.as_deref(), self.data_dir.as_deref())?;
        if !self.listen.is_empty() {
            c.nbd.listen = self.listen.clone();
        }
        if self.no_tcp {
            c.nbd.listen.clear();
        }
        if !self.socket.is_empty() {
            c.nbd.unix = self.socket.clone();
        }
        if !self.nvmf_listen.is_empty() {
            c.nvmf.listen = self.nvmf_listen.clone();
        }
        if self.no_nvmf {
            c.nvmf.listen.clear();
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
            c.volumes.push(VolumeConfig::device(name, uri));
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
