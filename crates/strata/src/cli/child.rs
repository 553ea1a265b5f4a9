//! `strata child` and `strata rebuild`: a nexus volume's replicas and rebuilds.

use std::io::{IsTerminal, Write};

use anyhow::{bail, Context};
use strata_api::v1 as pb;
use strata_api::ApiChannel;
use tokio_stream::StreamExt;

use super::target::{api_error, Target};
use crate::format::{clock, human_bytes};

/// `strata child …`
#[derive(Debug, clap::Subcommand)]
pub enum ChildCommand {
    /// Add a replica to a nexus volume; it is fully rebuilt from the others.
    Add {
        volume: String,
        uri: String,
        /// Follow the rebuild until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Remove a replica (by index or URI).
    Remove { volume: String, child: String },
    /// Take a replica out of service; what it misses is recorded for a partial rebuild.
    Offline { volume: String, child: String },
    /// Bring a faulted or offline replica back (reopening a faulted one): it is rebuilt from
    /// the others, partially when what it missed is known.
    Online {
        volume: String,
        child: String,
        /// Follow the rebuild until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Give a volume whose replicas the daemon placed this many replicas (new ones are placed
    /// and rebuilt; removed ones are deleted).
    Count { volume: String, count: u32 },
    /// Fault a replica, as a failed I/O would.
    Fault {
        volume: String,
        child: String,
        #[arg(long, default_value = "faulted by the operator")]
        reason: String,
    },
}

/// `strata rebuild …`
#[derive(Debug, clap::Subcommand)]
pub enum RebuildCommand {
    /// Follow a rebuild with a progress bar until it ends (exit status 0 if it completed).
    Watch { volume: String, child: String },
    /// Show a rebuild's progress.
    Status { volume: String, child: String },
    /// Rebuild an offline or faulted replica (after a cancel, say).
    Start {
        volume: String,
        child: String,
        /// Follow the rebuild until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Pause a rebuild.
    Pause { volume: String, child: String },
    /// Resume a paused rebuild.
    Resume { volume: String, child: String },
    /// Stop a rebuild; the replica goes offline, keeping what is left to copy.
    Cancel { volume: String, child: String },
}

fn req(volume: &str, child: &str) -> pb::ChildRequest {
    pb::ChildRequest {
        volume: volume.to_string(),
        child: child.to_string(),
        reason: String::new(),
    }
}

pub async fn child(target: &Target, cmd: &ChildCommand) -> anyhow::Result<()> {
    let mut c = pb::children_client::ChildrenClient::new(target.channel().await?);
    let (r, follow) = match cmd {
        ChildCommand::Add { volume, uri, wait } => (
            c.add_child(req(volume, uri)).await,
            wait.then(|| (volume, uri)),
        ),
        ChildCommand::Remove { volume, child } => (c.remove_child(req(volume, child)).await, None),
        ChildCommand::Offline { volume, child } => {
            (c.offline_child(req(volume, child)).await, None)
        }
        ChildCommand::Online {
            volume,
            child,
            wait,
        } => (
            c.online_child(req(volume, child)).await,
            wait.then(|| (volume, child)),
        ),
        ChildCommand::Count { volume, count } => (
            c.set_replica_count(pb::SetReplicaCountRequest {
                volume: volume.clone(),
                count: *count,
            })
            .await,
            None,
        ),
        ChildCommand::Fault {
            volume,
            child,
            reason,
        } => (
            c.fault_child(pb::ChildRequest {
                reason: reason.clone(),
                ..req(volume, child)
            })
            .await,
            None,
        ),
    };
    let r = r.map_err(api_error)?.into_inner();
    target.print(&r, |r| println!("{}", r.message))?;
    match follow {
        Some((volume, child)) => watch(target, &mut c, volume, child).await,
        None => Ok(()),
    }
}

pub async fn rebuild(target: &Target, cmd: &RebuildCommand) -> anyhow::Result<()> {
    let mut c = pb::children_client::ChildrenClient::new(target.channel().await?);
    let r = match cmd {
        RebuildCommand::Watch { volume, child } => {
            return watch(target, &mut c, volume, child).await
        }
        RebuildCommand::Status { volume, child } => {
            let r = c
                .get_rebuild(req(volume, child))
                .await
                .map_err(api_error)?
                .into_inner();
            return target.print(&r, |r| println!("{}", rebuild_line(r)));
        }
        RebuildCommand::Start {
            volume,
            child,
            wait,
        } => {
            let r = c
                .start_rebuild(req(volume, child))
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&r, |r| println!("{}", r.message))?;
            return match wait {
                true => watch(target, &mut c, volume, child).await,
                false => Ok(()),
            };
        }
        RebuildCommand::Pause { volume, child } => c.pause_rebuild(req(volume, child)).await,
        RebuildCommand::Resume { volume, child } => c.resume_rebuild(req(volume, child)).await,
        RebuildCommand::Cancel { volume, child } => c.cancel_rebuild(req(volume, child)).await,
    };
    let r = r.map_err(api_error)?.into_inner();
    target.print(&r, |r| println!("{}", r.message))
}

pub(super) fn rebuild_line(r: &pb::Rebuild) -> String {
    let pct = if r.total_bytes == 0 {
        100.0
    } else {
        r.done_bytes as f64 * 100.0 / r.total_bytes as f64
    };
    let mut s = format!(
        "{} {}, {} of {} ({pct:.0}%): {} copied, {} zeroed, {}/s",
        r.kind,
        r.state,
        human_bytes(r.done_bytes),
        human_bytes(r.total_bytes),
        human_bytes(r.copied_bytes),
        human_bytes(r.zeroed_bytes),
        human_bytes(r.rate_bytes_per_sec as u64),
    );
    match (&r.error, r.eta_secs, r.state.as_str()) {
        (Some(e), _, _) => s.push_str(&format!(": {e}")),
        (None, Some(eta), "running") => s.push_str(&format!(", eta {}", clock(eta))),
        (None, _, _) => s.push_str(&format!(", {} elapsed", clock(r.elapsed_secs))),
    }
    s
}

/// Follow the rebuild of one replica until it ends: a bar on a terminal, a line per 10%
/// otherwise (JSON: one object per update).
async fn watch(
    target: &Target,
    c: &mut pb::children_client::ChildrenClient<ApiChannel>,
    volume: &str,
    child: &str,
) -> anyhow::Result<()> {
    let mut stream = c
        .watch_rebuild(pb::WatchRebuildRequest {
            volume: volume.to_string(),
            child: child.to_string(),
            interval_ms: 200,
        })
        .await
        .map_err(api_error)?
        .into_inner();
    let tty = std::io::stdout().is_terminal() && !target.json();
    let mut last_step = None;
    let mut out = std::io::stdout();
    let mut last = None;
    while let Some(r) = stream.next().await {
        let r = r.map_err(api_error)?;
        let pct = (r.done_bytes * 100)
            .checked_div(r.total_bytes)
            .unwrap_or(100);
        if target.json() {
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
        } else if tty {
            let filled = (pct as usize * 30 / 100).min(30);
            write!(
                out,
                "\r\x1b[2K[{}{}] {}",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                rebuild_line(&r)
            )?;
            out.flush()?;
        } else {
            let finished = !matches!(r.state.as_str(), "running" | "paused");
            if last_step != Some(pct / 10) || finished {
                writeln!(out, "replica {child} of {volume}: {}", rebuild_line(&r))?;
                last_step = Some(pct / 10);
            }
        }
        last = Some(r);
    }
    if tty {
        writeln!(out)?;
    }
    let r = last.context("the daemon sent no progress")?;
    match r.state.as_str() {
        "completed" => Ok(()),
        "failed" => bail!(
            "rebuild of replica {child} of {volume} failed: {}",
            r.error.unwrap_or_default()
        ),
        other => bail!("rebuild of replica {child} of {volume} {other}"),
    }
}
