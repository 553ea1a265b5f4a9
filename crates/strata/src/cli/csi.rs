//! `strata csi`: the CSI driver (`strata_csi`) over the daemon the global flags name.

use std::path::PathBuf;

use anyhow::Context;

use super::target::Target;

/// `strata csi …`
#[derive(Debug, clap::Args)]
pub struct CsiArgs {
    /// Where to serve CSI: unix:///PATH (the CSI convention's $CSI_ENDPOINT).
    #[arg(long, env = "CSI_ENDPOINT")]
    csi_endpoint: String,
    /// This node's ID (default: the host name); the Strata daemon's node name on that node.
    #[arg(long, env = "CSI_NODE_ID")]
    node_id: Option<String>,
    /// Which services to serve.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    mode: Mode,
    /// Where the node keeps its records and nbdfuse mounts.
    #[arg(long, default_value = "/var/lib/strata-csi")]
    state_dir: PathBuf,
    /// Volumes one node may have published at once.
    #[arg(long, default_value_t = 128)]
    max_volumes_per_node: u32,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Mode {
    Controller,
    Node,
    All,
}

/// The host name, from the kernel.
fn host_name() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("read the host name (give --node-id)")?
        .trim()
        .to_string())
}

pub async fn csi(target: &Target, args: &CsiArgs) -> anyhow::Result<()> {
    let (daemon_endpoint, auth) = target.endpoint_and_auth()?;
    let node_id = match &args.node_id {
        Some(n) => n.clone(),
        None => host_name()?,
    };
    let config = strata_csi::Config {
        csi_endpoint: args.csi_endpoint.clone(),
        node_id,
        mode: match args.mode {
            Mode::Controller => strata_csi::Mode::Controller,
            Mode::Node => strata_csi::Mode::Node,
            Mode::All => strata_csi::Mode::All,
        },
        daemon_endpoint,
        auth,
        state_dir: args.state_dir.clone(),
        max_volumes_per_node: args.max_volumes_per_node,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        stop.cancel();
    });
    strata_csi::run(config, cancel)
        .await
        .map_err(|e| anyhow::Error::new(e).context("strata csi"))
}
