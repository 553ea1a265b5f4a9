//! The CLI commands that drive a running daemon through its gRPC API: tables for people by
//! default, `--output json` (the API's messages) for scripts.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use strata_api::v1 as pb;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Where to find the daemon, and how to print.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The daemon's API: unix:///path/api.sock or http://HOST:PORT (default: api.sock in the
    /// default data directory).
    #[arg(long, global = true, env = "STRATA_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Same as --output json.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

impl Target {
    fn endpoint(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| {
            format!(
                "unix://{}",
                crate::config::default_data_dir().join("api.sock").display()
            )
        })
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(strata_api::connect(&self.endpoint()).await?)
    }

    pub fn json(&self) -> bool {
        self.json || self.output == Output::Json
    }

    /// Print `value` as JSON when asked to, else run `table`.
    pub fn print<T: serde::Serialize>(
        &self,
        value: &T,
        table: impl FnOnce(&T),
    ) -> anyhow::Result<()> {
        if self.json() {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            table(value);
        }
        Ok(())
    }

    /// Print a message (or, for JSON, `{"message": …}`).
    pub fn done(&self, message: &str) -> anyhow::Result<()> {
        self.print(&serde_json::json!({ "message": message }), |_| {
            println!("{message}")
        })
    }
}

/// What a failed call says: the daemon's message, without gRPC's wrapping.
pub fn api_error(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unavailable && s.message().contains("transport") {
        return anyhow::anyhow!("the daemon is unreachable: {}", s.message());
    }
    anyhow::anyhow!("{}", s.message())
}

/// "66.0 MiB"
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    strata_bdev::parse_size(s).map_err(|e| anyhow::anyhow!("size {s:?}: {e}"))
}

/// A progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise.
pub struct Bar {
    what: String,
    unit: &'static str,
    tty: bool,
    last: Option<u64>,
}

impl Bar {
    pub fn new(what: &str, unit: &'static str) -> Bar {
        Bar {
            what: what.to_string(),
            unit,
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    pub fn update(&mut self, done: u64, total: u64, detail: &str) {
        let pct = (done * 100).checked_div(total).unwrap_or(100).min(100);
        let amount = if self.unit == "bytes" {
            format!("{} of {}", human_bytes(done), human_bytes(total))
        } else {
            format!("{done} of {total} {}", self.unit)
        };
        let mut err = std::io::stderr();
        if self.tty {
            let filled = (pct as usize * 30 / 100).min(30);
            let _ = write!(
                err,
                "\r\x1b[2K{} [{}{}] {pct}% ({amount}){detail}",
                self.what,
                "#".repeat(filled),
                ".".repeat(30 - filled)
            );
            let _ = err.flush();
        } else if self.last != Some(pct / 10) {
            let _ = writeln!(err, "{}: {pct}% ({amount}){detail}", self.what);
            self.last = Some(pct / 10);
        }
    }

    pub fn finish(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Follow a progress stream to its end; the final message.
pub async fn follow(
    mut stream: tonic::Streaming<pb::Progress>,
    what: &str,
    unit: &'static str,
) -> anyhow::Result<String> {
    let mut bar = Bar::new(what, unit);
    let mut shown = false;
    while let Some(p) = stream.next().await {
        let p = p.map_err(api_error)?;
        if p.total > 0 {
            bar.update(p.done, p.total, "");
            shown = true;
        }
        if p.finished {
            if shown {
                bar.finish();
            }
            return Ok(p.message);
        }
    }
    bail!("the daemon ended the call without saying whether it finished")
}

// ---------------------------------------------------------------------------------------------
// status, node

/// `strata status`
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this volume.
    pub volume: Option<String>,
}

pub async fn status(target: &Target, args: &StatusArgs) -> anyhow::Result<()> {
    let ch = target.channel().await?;
    let mut volumes = pb::volumes_client::VolumesClient::new(ch.clone())
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .map_err(api_error)?
        .into_inner()
        .volumes;
    if let Some(name) = &args.volume {
        volumes.retain(|v| v.spec.as_ref().is_some_and(|s| &s.name == name));
        if volumes.is_empty() {
            bail!("no volume {name:?}");
        }
    }
    let info = pb::node_client::NodeClient::new(ch)
        .get_info(pb::GetInfoRequest {})
        .await
        .map_err(api_error)?
        .into_inner();
    target.print(&volumes, |volumes| {
        for v in volumes {
            print_volume(v);
        }
        if !info.state_store_available {
            println!(
                "STATE STORE UNAVAILABLE: {} (volumes keep serving; changes are refused)",
                info.state_store
            );
        }
        for p in &info.problems {
            println!("PROBLEM: {p}");
        }
    })
}

fn backing(spec: &pb::VolumeSpec) -> String {
    match &spec.backing {
        Some(pb::volume_spec::Backing::Device(u)) => u.clone(),
        Some(pb::volume_spec::Backing::Nexus(n)) => {
            format!("nexus of {} replicas", n.replicas.len())
        }
        Some(pb::volume_spec::Backing::Image(i)) => format!("image {i}"),
        None => "?".into(),
    }
}

fn print_volume(v: &pb::Volume) {
    let spec = v.spec.clone().unwrap_or_default();
    let health = match v.state.as_str() {
        "online" if v.kind == "nexus" => ", healthy".to_string(),
        "online" => String::new(),
        other => format!(", {}", other.to_uppercase()),
    };
    println!(
        "volume {}: {} ({} bytes), {}{health}{}",
        spec.name,
        human_bytes(v.size),
        v.size,
        backing(&spec),
        if v.from_config { " [config]" } else { "" }
    );
    for e in &v.exports {
        println!(
            "  export: {e}{}",
            if spec.read_only { " (read-only)" } else { "" }
        );
    }
    if let Some(i) = &v.image {
        println!(
            "  image: version {}, {} segments, {} pages mapped, {} buffered ({}), {} checkpoints, \
             {} compactions",
            i.version,
            i.segments,
            i.mapped_pages,
            i.buffered_pages,
            human_bytes(i.buffered_bytes),
            i.checkpoints,
            i.compactions
        );
        println!(
            "  store: {} GETs, {} PUTs, {} errors, {} retries; pages read from memory {}, disk \
             cache {}, store {}",
            i.store_gets,
            i.store_puts,
            i.store_errors,
            i.store_retries,
            i.cache_hits,
            i.disk_cache_hits,
            i.cache_misses
        );
        if let Some(b) = &i.base {
            println!("  clone of {b}");
        }
        if let Some(f) = &i.fenced {
            println!("  STOPPED WRITING: {f}");
        }
    }
    for c in &v.children {
        let mut line = format!("  #{} {:<10} {}", c.index, c.state, c.uri);
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

/// `strata node …`
#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// What the daemon is, where it listens, and its state store.
    Info,
    /// I/O counters of its volumes.
    Stats {
        /// Only this volume.
        volume: Option<String>,
    },
}

pub async fn node(target: &Target, cmd: &NodeCommand) -> anyhow::Result<()> {
    let mut c = pb::node_client::NodeClient::new(target.channel().await?);
    match cmd {
        NodeCommand::Info => {
            let i = c
                .get_info(pb::GetInfoRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&i, |i| {
                println!(
                    "node {} (strata {}), up {} s",
                    i.node_name, i.version, i.uptime_secs
                );
                println!("data directory: {}", i.data_dir);
                for n in &i.nbd {
                    println!("nbd: {n}");
                }
                println!(
                    "state store: {}{}",
                    i.state_store,
                    if i.state_store_available {
                        ""
                    } else {
                        " (UNAVAILABLE)"
                    }
                );
                for p in &i.problems {
                    println!("problem: {p}");
                }
            })
        }
        NodeCommand::Stats { volume } => {
            let s = c
                .get_stats(pb::GetStatsRequest {
                    volume: volume.clone().unwrap_or_default(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&s, |s| {
                println!(
                    "{:<20} {:>10} {:>10} {:>10} {:>10} {:>8} {:>7} {:>10} {:>10}",
                    "VOLUME",
                    "READS",
                    "READ",
                    "WRITES",
                    "WRITTEN",
                    "FLUSHES",
                    "ERRORS",
                    "READ AVG",
                    "WRITE AVG"
                );
                for v in &s.volumes {
                    let avg = |nanos: u64, n: u64| {
                        format!(
                            "{:.0} µs",
                            nanos.checked_div(n).unwrap_or(0) as f64 / 1000.0
                        )
                    };
                    println!(
                        "{:<20} {:>10} {:>10} {:>10} {:>10} {:>8} {:>7} {:>10} {:>10}",
                        v.volume,
                        v.reads,
                        human_bytes(v.read_bytes),
                        v.writes,
                        human_bytes(v.write_bytes),
                        v.flushes,
                        v.errors,
                        avg(v.read_nanos, v.reads),
                        avg(v.write_nanos, v.writes)
                    );
                }
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// volume

/// `strata volume …`
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Create a volume over a device, a nexus of replicas, or a page-store image, and export it.
    Create {
        name: String,
        /// Size (e.g. 1G); devices and images that do not exist are created this large.
        #[arg(long)]
        size: Option<String>,
        /// A device URI (file:///…, mem://…, nbd://…).
        #[arg(long, conflicts_with_all = ["replica", "image"])]
        device: Option<String>,
        /// A replica URI of a nexus volume; repeat for each.
        #[arg(long, conflicts_with = "image")]
        replica: Vec<String>,
        /// A page-store image, STORE/IMAGE.
        #[arg(long)]
        image: Option<String>,
        /// Do not export it over NBD.
        #[arg(long)]
        no_export: bool,
        #[arg(long)]
        read_only: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the volumes.
    List,
    /// Show one volume.
    Get { name: String },
    /// Stop serving a volume and forget it (its devices keep their data).
    Delete {
        name: String,
        /// Also delete the page-store image behind it, with its snapshots.
        #[arg(long)]
        delete_image: bool,
    },
    /// Resize a page-store image volume (shrinking needs --force and discards data).
    Resize {
        name: String,
        size: String,
        #[arg(long)]
        force: bool,
    },
}

pub async fn volume(target: &Target, cmd: &VolumeCommand) -> anyhow::Result<()> {
    let mut c = pb::volumes_client::VolumesClient::new(target.channel().await?);
    let show = |v: &pb::Volume| print_volume(v);
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            device,
            replica,
            image,
            no_export,
            read_only,
            description,
        } => {
            use pb::volume_spec::Backing;
            let backing = match (device, replica.is_empty(), image) {
                (Some(d), true, None) => Backing::Device(d.clone()),
                (None, false, None) => Backing::Nexus(pb::NexusSpec {
                    replicas: replica.clone(),
                }),
                (None, true, Some(i)) => Backing::Image(i.clone()),
                _ => bail!(
                    "give one of --device URI, --replica URI (repeated) or --image STORE/IMAGE"
                ),
            };
            let size = size.as_deref().map(parse_size).transpose()?.unwrap_or(0);
            let v = c
                .create_volume(pb::CreateVolumeRequest {
                    spec: Some(pb::VolumeSpec {
                        name: name.clone(),
                        size,
                        backing: Some(backing),
                        export: Some(!no_export),
                        read_only: *read_only,
                        description: description.clone(),
                    }),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&v, show)
        }
        VolumeCommand::List => {
            let l = c
                .list_volumes(pb::ListVolumesRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&l.volumes, |vols| {
                println!(
                    "{:<20} {:<7} {:>10} {:<9} EXPORTS",
                    "VOLUME", "KIND", "SIZE", "STATE"
                );
                for v in vols {
                    println!(
                        "{:<20} {:<7} {:>10} {:<9} {}",
                        v.spec.as_ref().map_or("", |s| s.name.as_str()),
                        v.kind,
                        human_bytes(v.size),
                        v.state,
                        v.exports.join(" ")
                    );
                }
            })
        }
        VolumeCommand::Get { name } => {
            let v = c
                .get_volume(pb::GetVolumeRequest { name: name.clone() })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&v, show)
        }
        VolumeCommand::Delete { name, delete_image } => {
            let r = c
                .delete_volume(pb::DeleteVolumeRequest {
                    name: name.clone(),
                    delete_image: *delete_image,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.done(&r.message)
        }
        VolumeCommand::Resize { name, size, force } => {
            let v = c
                .resize_volume(pb::ResizeVolumeRequest {
                    name: name.clone(),
                    size: parse_size(size)?,
                    force: *force,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&v, show)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// child, rebuild

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

fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn rebuild_line(r: &pb::Rebuild) -> String {
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
    c: &mut pb::children_client::ChildrenClient<Channel>,
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

// ---------------------------------------------------------------------------------------------
// export, store

/// `strata export …`
#[derive(Debug, clap::Subcommand)]
pub enum ExportCommand {
    /// List what is exported, and where clients connect.
    List,
    /// Export a volume over NBD.
    Create {
        volume: String,
        #[arg(long)]
        read_only: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Stop exporting a volume (connected clients keep their connection until they close it).
    Delete { volume: String },
}

pub async fn export(target: &Target, cmd: &ExportCommand) -> anyhow::Result<()> {
    let mut c = pb::exports_client::ExportsClient::new(target.channel().await?);
    let nbd = pb::Protocol::Nbd as i32;
    match cmd {
        ExportCommand::List => {
            let l = c
                .list_exports(pb::ListExportsRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&l.exports, |exports| {
                println!("{:<20} {:<5} {:<3} URIS", "VOLUME", "PROTO", "RO");
                for e in exports {
                    println!(
                        "{:<20} {:<5} {:<3} {}",
                        e.volume,
                        "nbd",
                        if e.read_only { "yes" } else { "no" },
                        e.uris.join(" ")
                    );
                }
            })
        }
        ExportCommand::Create {
            volume,
            read_only,
            description,
        } => {
            let e = c
                .create_export(pb::CreateExportRequest {
                    volume: volume.clone(),
                    protocol: nbd,
                    read_only: *read_only,
                    description: description.clone(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&e, |e| {
                println!("volume {} exported: {}", e.volume, e.uris.join(" "))
            })
        }
        ExportCommand::Delete { volume } => {
            let r = c
                .delete_export(pb::DeleteExportRequest {
                    volume: volume.clone(),
                    protocol: nbd,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.done(&r.message)
        }
    }
}

/// `strata store …`
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// List the page stores and their request counts.
    List,
    /// Show a store and its images.
    Get { name: String },
    /// Add a store: a local directory (--dir) or an S3-compatible bucket (--bucket …).
    Create {
        name: String,
        /// A local directory (created if missing).
        #[arg(long, conflicts_with_all = ["bucket", "endpoint", "prefix"])]
        dir: Option<String>,
        /// S3: the bucket.
        #[arg(long)]
        bucket: Option<String>,
        /// S3: the service's URL (default: AWS).
        #[arg(long)]
        endpoint: Option<String>,
        /// S3: the region.
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// S3: a key prefix inside the bucket.
        #[arg(long, default_value = "")]
        prefix: String,
        /// S3 credentials (default: the daemon's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
        #[arg(long, env = "STRATA_S3_ACCESS_KEY_ID")]
        access_key_id: Option<String>,
        #[arg(long, env = "STRATA_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
        secret_access_key: Option<String>,
    },
    /// Forget a store created with `store create` (its objects stay).
    Delete { name: String },
}

fn print_store(s: &pb::Store) {
    println!(
        "store {} ({}): {}; {} GETs, {} PUTs, {} LISTs, {} DELETEs, {} errors, {} retries; {} \
         read, {} written",
        s.name,
        s.kind,
        s.location,
        s.gets,
        s.puts,
        s.lists,
        s.deletes,
        s.errors,
        s.retries,
        human_bytes(s.bytes_got),
        human_bytes(s.bytes_put)
    );
    for i in &s.images {
        println!(
            "  {} {} v{}{}",
            i.name,
            human_bytes(i.size),
            i.version,
            i.base
                .as_ref()
                .map(|b| format!(", clone of {b}"))
                .unwrap_or_default()
        );
    }
}

pub async fn store(target: &Target, cmd: &StoreCommand) -> anyhow::Result<()> {
    let mut c = pb::stores_client::StoresClient::new(target.channel().await?);
    match cmd {
        StoreCommand::List => {
            let l = c
                .list_stores(pb::ListStoresRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&l.stores, |stores| stores.iter().for_each(print_store))
        }
        StoreCommand::Get { name } => {
            let s = c
                .get_store(pb::GetStoreRequest { name: name.clone() })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&s, print_store)
        }
        StoreCommand::Create {
            name,
            dir,
            bucket,
            endpoint,
            region,
            prefix,
            access_key_id,
            secret_access_key,
        } => {
            use pb::create_store_request::Kind;
            let kind = match (dir, bucket) {
                (Some(path), None) => {
                    let path = std::path::absolute(path)
                        .with_context(|| format!("--dir {path:?}"))?;
                    Kind::Dir(pb::DirStore {
                        path: path.display().to_string(),
                    })
                }
                (None, Some(bucket)) => Kind::S3(pb::S3Store {
                    endpoint: endpoint.clone().unwrap_or_default(),
                    region: region.clone(),
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                    access_key_id: access_key_id.clone().unwrap_or_default(),
                    secret_access_key: secret_access_key.clone().unwrap_or_default(),
                }),
                _ => bail!("give --dir PATH, or --bucket NAME (with --endpoint for S3 services other than AWS)"),
            };
            let s = c
                .create_store(pb::CreateStoreRequest {
                    name: name.clone(),
                    kind: Some(kind),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&s, print_store)
        }
        StoreCommand::Delete { name } => {
            let r = c
                .delete_store(pb::DeleteStoreRequest { name: name.clone() })
                .await
                .map_err(api_error)?
                .into_inner();
            target.done(&r.message)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// apply, diff, spec

/// `strata apply` and `strata diff`
#[derive(Debug, clap::Args)]
pub struct SpecArgs {
    /// The spec (YAML); `-` reads standard input.
    #[arg(short, long)]
    pub file: PathBuf,
    /// Also delete the volumes an earlier apply declared that this spec no longer names.
    #[arg(long)]
    pub prune: bool,
}

/// `strata spec …`
#[derive(Debug, clap::Subcommand)]
pub enum SpecCommand {
    /// Print the spec last applied.
    Get,
}

fn read_spec(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("read spec {}", path.display()))
}

/// Apply a spec (or with `dry_run`, show what applying it would do).
pub async fn apply(target: &Target, args: &SpecArgs, dry_run: bool) -> anyhow::Result<()> {
    let spec = read_spec(&args.file)?;
    let mut c = pb::specs_client::SpecsClient::new(target.channel().await?);
    let r = c
        .apply(pb::ApplyRequest {
            spec,
            dry_run,
            prune: args.prune,
        })
        .await
        .map_err(api_error)?
        .into_inner();
    target.print(&r, |r| {
        if r.unchanged && r.actions.is_empty() {
            println!("no changes: the volumes are as the spec says");
        }
        for a in &r.actions {
            let mark = match (a.verb.as_str(), dry_run, a.done) {
                ("refuse", _, _) => "!",
                ("keep", _, _) => "=",
                ("delete" | "remove-replica" | "unexport", true, _) => "-",
                (_, true, _) => "+",
                (_, false, true) => "✓",
                (_, false, false) => "?",
            };
            println!("{mark} {:<14} {:<24} {}", a.verb, a.path, a.message);
        }
    })?;
    if r.actions.iter().any(|a| a.verb == "refuse") {
        bail!("some of the spec was refused (lines marked !)");
    }
    Ok(())
}

pub async fn spec(target: &Target, cmd: &SpecCommand) -> anyhow::Result<()> {
    let SpecCommand::Get = cmd;
    let mut c = pb::specs_client::SpecsClient::new(target.channel().await?);
    let r = c
        .get_spec(pb::GetSpecRequest {})
        .await
        .map_err(api_error)?
        .into_inner();
    target.print(&r, |r| print!("{}", r.spec))
}
