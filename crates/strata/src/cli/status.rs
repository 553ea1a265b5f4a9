//! `strata status` and `strata node`: what a daemon serves and how it is doing.

use anyhow::bail;
use strata_api::v1 as pb;

use super::target::{api_error, Target};
use crate::format::human_bytes;

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

pub(super) fn print_volume(v: &pb::Volume) {
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
            line.push_str(&format!(
                "\n       {label}: {}",
                super::child::rebuild_line(r)
            ));
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
