//! The CLI commands that drive a running daemon through its control socket.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::control::{call, human_bytes, ChildInfo, Request, Response, VolumeInfo};

/// Where to find the daemon.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The daemon's control socket (default: control.sock in the default data directory).
    #[arg(long, global = true, env = "STRATA_CONTROL")]
    pub control: Option<PathBuf>,
}

impl Target {
    pub(crate) fn socket(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| crate::config::default_data_dir().join("control.sock"))
    }

    fn call(&self, req: &Request) -> anyhow::Result<Response> {
        match call(&self.socket(), req)? {
            Response::Error { message } => bail!("{message}"),
            r => Ok(r),
        }
    }

    fn volumes(&self) -> anyhow::Result<Vec<VolumeInfo>> {
        match self.call(&Request::Status)? {
            Response::Status { volumes } => Ok(volumes),
            r => bail!("unexpected answer from the daemon: {r:?}"),
        }
    }

    fn child(&self, volume: &str, child: &str) -> anyhow::Result<ChildInfo> {
        let volumes = self.volumes()?;
        let Some(v) = volumes.iter().find(|v| v.name == volume) else {
            bail!("no volume {volume:?}");
        };
        v.children
            .iter()
            .find(|c| c.name == child || c.index.to_string() == child)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("volume {volume:?} has no replica {child:?}"))
    }
}

/// `strata status`
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this volume.
    pub volume: Option<String>,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

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
    /// Pause a rebuild.
    Pause { volume: String, child: String },
    /// Resume a paused rebuild.
    Resume { volume: String, child: String },
    /// Stop a rebuild; the replica goes offline, keeping what is left to copy.
    Cancel { volume: String, child: String },
}

pub fn status(target: &Target, args: &StatusArgs) -> anyhow::Result<()> {
    let mut volumes = target.volumes()?;
    if let Some(name) = &args.volume {
        volumes.retain(|v| &v.name == name);
        if volumes.is_empty() {
            bail!("no volume {name:?}");
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&volumes)?);
        return Ok(());
    }
    for v in &volumes {
        let health = if v.children.is_empty() {
            ""
        } else if v.children.iter().all(|c| c.state == "online") {
            ", healthy"
        } else {
            ", DEGRADED"
        };
        println!(
            "volume {}: {} ({} bytes), {}{health}",
            v.name,
            human_bytes(v.size),
            v.size,
            v.source
        );
        if let Some(i) = &v.image {
            println!(
                "  image: version {}, {} segments, {} pages mapped, {} buffered ({}), \
                 {} checkpoints, {} compactions",
                i.version,
                i.segments,
                i.mapped_pages,
                i.buffered_pages,
                human_bytes(i.buffered_bytes),
                i.checkpoints,
                i.compactions
            );
            println!(
                "  store: {} GETs, {} PUTs, {} errors, {} retries; pages read from memory {}, \
                 disk cache {}, store {}",
                i.store_gets,
                i.store_puts,
                i.store_errors,
                i.store_retries,
                i.cache_hits,
                i.disk_cache_hits,
                i.cache_misses
            );
            if let Some(f) = &i.fenced {
                println!("  STOPPED WRITING: {f}");
            }
        }
        for c in &v.children {
            let mut line = format!("  #{} {:<10} {}", c.index, c.state, c.name);
            if let Some(reason) = &c.reason {
                line.push_str(&format!("\n       reason: {reason}"));
            }
            if let (Some(d), true) = (c.dirty_bytes, c.state != "rebuilding") {
                line.push_str(&format!("\n       missed: {}", human_bytes(d)));
            }
            if let Some(r) = &c.rebuild {
                let label = match r.state.as_str() {
                    "running" | "paused" => "rebuild",
                    _ => "last rebuild",
                };
                line.push_str(&format!("\n       {label}: {}", rebuild_line(r)));
            }
            println!("{line}");
        }
    }
    Ok(())
}

fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn rebuild_line(r: &crate::control::RebuildInfo) -> String {
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

pub fn child(target: &Target, cmd: &ChildCommand) -> anyhow::Result<()> {
    let (req, follow) = match cmd {
        ChildCommand::Add { volume, uri, wait } => (
            Request::AddChild {
                volume: volume.clone(),
                uri: uri.clone(),
            },
            wait.then(|| (volume.clone(), uri.clone())),
        ),
        ChildCommand::Remove { volume, child } => (
            Request::RemoveChild {
                volume: volume.clone(),
                child: child.clone(),
            },
            None,
        ),
        ChildCommand::Offline { volume, child } => (
            Request::OfflineChild {
                volume: volume.clone(),
                child: child.clone(),
            },
            None,
        ),
        ChildCommand::Online {
            volume,
            child,
            wait,
        } => (
            Request::OnlineChild {
                volume: volume.clone(),
                child: child.clone(),
            },
            wait.then(|| (volume.clone(), child.clone())),
        ),
        ChildCommand::Fault {
            volume,
            child,
            reason,
        } => (
            Request::FaultChild {
                volume: volume.clone(),
                child: child.clone(),
                reason: reason.clone(),
            },
            None,
        ),
    };
    if let Response::Done { message } = target.call(&req)? {
        println!("{message}");
    }
    match follow {
        Some((volume, child)) => watch(target, &volume, &child),
        None => Ok(()),
    }
}

pub fn rebuild(target: &Target, cmd: &RebuildCommand) -> anyhow::Result<()> {
    let req = match cmd {
        RebuildCommand::Watch { volume, child } => return watch(target, volume, child),
        RebuildCommand::Pause { volume, child } => Request::PauseRebuild {
            volume: volume.clone(),
            child: child.clone(),
        },
        RebuildCommand::Resume { volume, child } => Request::ResumeRebuild {
            volume: volume.clone(),
            child: child.clone(),
        },
        RebuildCommand::Cancel { volume, child } => Request::CancelRebuild {
            volume: volume.clone(),
            child: child.clone(),
        },
    };
    if let Response::Done { message } = target.call(&req)? {
        println!("{message}");
    }
    Ok(())
}

/// Follow the rebuild of one replica until it ends: a bar redrawn in place on a terminal, a
/// line per 10% otherwise.
fn watch(target: &Target, volume: &str, child: &str) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut last_step = None;
    let mut out = std::io::stdout();
    loop {
        let c = target.child(volume, child)?;
        let Some(r) = c.rebuild else {
            bail!(
                "replica #{} of {volume} has no rebuild (it is {})",
                c.index,
                c.state
            );
        };
        let pct = if r.total_bytes == 0 {
            100.0
        } else {
            r.done_bytes as f64 * 100.0 / r.total_bytes as f64
        };
        let finished = !matches!(r.state.as_str(), "running" | "paused");
        if tty {
            let width = 30;
            let filled = ((pct / 100.0) * width as f64).round() as usize;
            write!(
                out,
                "\r\x1b[2K[{}{}] {}",
                "#".repeat(filled.min(width)),
                ".".repeat(width - filled.min(width)),
                rebuild_line(&r)
            )?;
            out.flush()?;
        } else {
            let step = (pct / 10.0).floor() as u64;
            if last_step != Some(step) || finished {
                writeln!(out, "replica #{}: {}", c.index, rebuild_line(&r))?;
                last_step = Some(step);
            }
        }
        if finished {
            if tty {
                writeln!(out)?;
            }
            return match r.state.as_str() {
                "completed" => Ok(()),
                "failed" => bail!(
                    "rebuild of replica #{} failed: {}",
                    c.index,
                    r.error.unwrap_or_default()
                ),
                other => bail!("rebuild of replica #{} {other}", c.index),
            };
        }
        std::thread::sleep(Duration::from_millis(if tty { 200 } else { 100 }));
    }
}
