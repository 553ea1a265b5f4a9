//! The `strata` command: the daemon (`strata serve`) and, over time, the CLI that drives it.

use clap::{Parser, Subcommand};

mod cli;
mod cli_images;
mod config;
mod control;
mod gc;
mod images;
mod ledger;
mod serve;
mod volume;

/// Strata: a block-storage data plane.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(flatten)]
    target: cli::Target,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Compact,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open the configured volumes and export them over NBD until SIGINT or SIGTERM.
    ///
    /// With no arguments: a thin 1 GiB file-backed volume `demo` in the data directory,
    /// exported on 127.0.0.1:10809.
    Serve(serve::ServeArgs),
    /// Show the running daemon's volumes, their replicas and rebuilds.
    Status(cli::StatusArgs),
    /// Add, remove, offline, online or fault a replica of a nexus volume.
    #[command(subcommand)]
    Child(cli::ChildCommand),
    /// Follow, pause, resume or cancel a rebuild.
    #[command(subcommand)]
    Rebuild(cli::RebuildCommand),
    /// Take, list or delete snapshots of page-store images.
    #[command(subcommand)]
    Snapshot(cli_images::SnapshotCommand),
    /// Make a new image that is a clone of a snapshot (IMAGE@SNAPSHOT NAME): O(1), writable.
    Clone { snapshot: String, name: String },
    /// List, resize, flatten or delete page-store images.
    #[command(subcommand)]
    Image(cli_images::ImageCommand),
    /// Delete objects no image, snapshot or clone needs (after a grace period), in the
    /// stores of a configuration. Safe while servers run.
    Gc(cli_images::GcArgs),
}

/// Keep I/O buffers on the heap. By default glibc gives every allocation over 128 KiB fresh
/// pages from `mmap` and unmaps them on free, so each 1 MiB read buffer costs 256 page faults
/// and the kernel zeroing them; measured, that halved sequential throughput.
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Compact => builder.compact().with_ansi(false).init(),
    }
    let client = match &cli.command {
        Command::Serve(_) => None,
        Command::Status(args) => Some(cli::status(&cli.target, args)),
        Command::Child(cmd) => Some(cli::child(&cli.target, cmd)),
        Command::Rebuild(cmd) => Some(cli::rebuild(&cli.target, cmd)),
        Command::Snapshot(cmd) => Some(cli_images::snapshot(&cli.target, cmd)),
        Command::Clone { snapshot, name } => Some(cli_images::clone(&cli.target, snapshot, name)),
        Command::Image(cmd) => cli_images::image(&cli.target, cmd),
        Command::Gc(_) => None,
    };
    if let Some(result) = client {
        return match result {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("strata: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata: start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Gc(args) => cli_images::gc(&args).await,
            Command::Image(cmd) => cli_images::offline(&cmd).await,
            _ => unreachable!("client commands return above"),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
