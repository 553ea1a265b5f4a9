//! The rate of a full rebuild between two files: a nexus over SOURCE gains TARGET (created
//! sparse at SOURCE's size), which gets a full rebuild; the target is then flushed (fsync), and
//! one line reports the rate.
//!
//! ```text
//! cargo run --release -p strata-nexus --example rebuild_rate -- SOURCE TARGET \
//!     [--segment BYTES] [--parallel N] [--granularity BYTES] [--direct]
//! rebuild bytes=4294967296 seconds=… rate_mib_s=… rebuild_seconds=… flush_seconds=… \
//!     copied=… zeroed=… segment=1048576 parallel=4 granularity=1048576 direct=false
//! ```
//!
//! `seconds` runs from adding the target to the end of its fsync, and `rate_mib_s` is `bytes`
//! over it. `bench/nexus-rebuild.sh` compares this with `cp --sparse=never` of the same file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use strata_bdev::{parse_size, BlockDevice};
use strata_bdev_file::{FileDevice, FileOptions};
use strata_nexus::{Nexus, NexusSettings, RebuildOutcome};

const USAGE: &str = "usage: rebuild_rate SOURCE TARGET [--segment BYTES] [--parallel N] \
                     [--granularity BYTES] [--direct]\n\
                     \n\
                     Rebuilds SOURCE (an existing file) onto TARGET (a new file, created sparse \
                     at SOURCE's size)\nthrough a nexus, fsyncs TARGET, and prints the rate.";

/// The command line.
#[derive(Debug)]
struct Args {
    source: PathBuf,
    target: PathBuf,
    settings: NexusSettings,
    direct: bool,
}

impl Args {
    /// Parse the arguments after the program name; `Ok(None)` when help was asked for.
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Option<Args>> {
        let mut paths = Vec::new();
        let mut settings = NexusSettings::default();
        let mut direct = false;
        let mut granularity_given = false;
        while let Some(arg) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "-h" | "--help" => return Ok(None),
                "--segment" => {
                    let v = value("--segment")?;
                    settings.rebuild_segment =
                        parse_size(&v).map_err(|e| anyhow::anyhow!("--segment: {e}"))?;
                }
                "--granularity" => {
                    let v = value("--granularity")?;
                    settings.dirty_granularity =
                        parse_size(&v).map_err(|e| anyhow::anyhow!("--granularity: {e}"))?;
                    granularity_given = true;
                }
                "--parallel" => {
                    let v = value("--parallel")?;
                    settings.rebuild_parallel = v
                        .parse()
                        .with_context(|| format!("--parallel {v:?}: expected a count"))?;
                }
                "--direct" => direct = true,
                flag if flag.starts_with('-') => bail!("unknown option {flag:?}"),
                path => paths.push(PathBuf::from(path)),
            }
        }
        // The nexus rounds the segment up to the dirty granularity; a segment below the default
        // granularity means a finer map rather than a silently larger segment.
        if !granularity_given && settings.rebuild_segment > 0 {
            settings.dirty_granularity = settings.dirty_granularity.min(settings.rebuild_segment);
        }
        let [source, target] = <[PathBuf; 2]>::try_from(paths)
            .map_err(|p| anyhow::anyhow!("expected SOURCE and TARGET, got {} paths", p.len()))?;
        Ok(Some(Args {
            source,
            target,
            settings,
            direct,
        }))
    }
}

/// What one run measured.
#[derive(Debug)]
struct Report {
    bytes: u64,
    rebuild_seconds: f64,
    flush_seconds: f64,
    copied: u64,
    zeroed: u64,
}

/// Open both files, rebuild, flush the target, and measure.
async fn run(args: &Args) -> anyhow::Result<(Report, NexusSettings)> {
    if args.target.symlink_metadata().is_ok() {
        bail!(
            "target {} exists: the rebuild target must be a new file (remove it first)",
            args.target.display()
        );
    }
    let source = open(
        args.source.clone(),
        FileOptions {
            read_only: true,
            direct: args.direct,
            ..FileOptions::default()
        },
    )
    .await
    .context("source")?;
    let size = source.geometry().size;
    let target = open(
        args.target.clone(),
        FileOptions {
            size: Some(size),
            direct: args.direct,
            ..FileOptions::default()
        },
    )
    .await
    .context("target")?;

    let source_name = format!("file://{}", args.source.display());
    let target_name = format!("file://{}", args.target.display());
    let nexus = Nexus::new(
        "bench",
        vec![(source_name, source as Arc<dyn BlockDevice>)],
        args.settings.clone(),
    )
    .context("create the nexus")?;

    let start = Instant::now();
    nexus
        .add_child(target_name.clone(), target.clone())
        .context("add the target")?;
    let outcome = nexus
        .wait_rebuild(&target_name)
        .await
        .context("wait for the rebuild")?;
    let rebuilt = Instant::now();
    if outcome != RebuildOutcome::Completed {
        bail!("rebuild onto {target_name} did not complete: {outcome:?}");
    }
    target
        .flush()
        .await
        .with_context(|| format!("flush target {}", args.target.display()))?;
    let flushed = Instant::now();

    let progress = nexus
        .status()
        .child(&target_name)
        .and_then(|c| c.rebuild.clone())
        .context("the target has no rebuild progress")?;
    let report = Report {
        bytes: size,
        rebuild_seconds: (rebuilt - start).as_secs_f64(),
        flush_seconds: (flushed - rebuilt).as_secs_f64(),
        copied: progress.copied_bytes,
        zeroed: progress.zeroed_bytes,
    };
    Ok((report, nexus.settings().clone()))
}

/// Open a file device on the blocking pool (opening makes blocking system calls).
async fn open(path: PathBuf, options: FileOptions) -> anyhow::Result<Arc<FileDevice>> {
    let dev = tokio::task::spawn_blocking(move || FileDevice::open(path, options))
        .await
        .context("join the opening thread")??;
    Ok(Arc::new(dev))
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("rebuild_rate: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")
        .and_then(|rt| rt.block_on(run(&args)));
    match result {
        Ok((r, settings)) => {
            let seconds = r.rebuild_seconds + r.flush_seconds;
            println!(
                "rebuild bytes={} seconds={seconds:.3} rate_mib_s={:.1} rebuild_seconds={:.3} \
                 flush_seconds={:.3} copied={} zeroed={} segment={} parallel={} granularity={} \
                 direct={}",
                r.bytes,
                r.bytes as f64 / f64::from(1 << 20) / seconds.max(1e-9),
                r.rebuild_seconds,
                r.flush_seconds,
                r.copied,
                r.zeroed,
                settings.rebuild_segment,
                settings.rebuild_parallel,
                settings.dirty_granularity,
                args.direct,
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rebuild_rate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
