//! The `strata` command: the daemon (`strata serve`) and, over time, the CLI that drives it.

use clap::{Parser, Subcommand};

mod cli;
mod cli_images;
mod config;
mod gc;
mod grpc;
mod images;
mod ledger;
mod manager;
mod metrics;
mod serve;
mod spec;
mod state;
mod volume;

/// Strata: a block-storage data plane.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about)]
struct Cli {
    /// Log format on stderr: human, compact (one line, no colour) or json (one object a line,
    /// with the connection and volume a line concerns as fields).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "STRATA_LOG_FORMAT")]
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
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open the configured and declared volumes, export them over NBD, and serve the gRPC API
    /// until SIGINT or SIGTERM.
    ///
    /// With no arguments: a thin 1 GiB page-store volume `demo` in the data directory,
    /// exported on 127.0.0.1:10809.
    Serve(serve::ServeArgs),
    /// Show the running daemon's volumes, their replicas and rebuilds.
    Status(cli::StatusArgs),
    /// The daemon: what it is, its state store, its I/O counters.
    #[command(subcommand)]
    Node(cli::NodeCommand),
    /// Create, list, show, delete or resize volumes.
    #[command(subcommand)]
    Volume(cli::VolumeCommand),
    /// Add, remove, offline, online or fault a replica of a nexus volume.
    #[command(subcommand)]
    Child(cli::ChildCommand),
    /// Follow, show, pause, resume or cancel a rebuild.
    #[command(subcommand)]
    Rebuild(cli::RebuildCommand),
    /// Export volumes over NBD, or stop.
    #[command(subcommand)]
    Export(cli::ExportCommand),
    /// The page stores and their images.
    #[command(subcommand)]
    Store(cli::StoreCommand),
    /// Take, list or delete snapshots of page-store images.
    #[command(subcommand)]
    Snapshot(cli_images::SnapshotCommand),
    /// Make a new image that is a clone of a snapshot (IMAGE@SNAPSHOT NAME): O(1), writable.
    Clone { snapshot: String, name: String },
    /// List, resize, flatten or delete page-store images.
    #[command(subcommand)]
    Image(cli_images::ImageCommand),
    /// Make the volumes what a spec declares (see docs/SPEC.md).
    Apply(cli::SpecArgs),
    /// Show what `strata apply` would do with a spec, changing nothing.
    Diff(cli::SpecArgs),
    /// The spec last applied.
    #[command(subcommand)]
    Spec(cli::SpecCommand),
    /// Delete objects no image, snapshot or clone needs (after a grace period), in the
    /// stores of a configuration. Safe while servers run.
    Gc(cli_images::GcArgs),
    /// Print a shell completion script (e.g. `strata completions bash > /etc/bash_completion.d/strata`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    if let Command::Completions { shell } = &cli.command {
        use clap::CommandFactory;
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "strata",
            &mut std::io::stdout(),
        );
        return std::process::ExitCode::SUCCESS;
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
    let t = &cli.target;
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Status(args) => cli::status(t, args).await,
            Command::Node(cmd) => cli::node(t, cmd).await,
            Command::Volume(cmd) => cli::volume(t, cmd).await,
            Command::Child(cmd) => cli::child(t, cmd).await,
            Command::Rebuild(cmd) => cli::rebuild(t, cmd).await,
            Command::Export(cmd) => cli::export(t, cmd).await,
            Command::Store(cmd) => cli::store(t, cmd).await,
            Command::Snapshot(cmd) => cli_images::snapshot(t, cmd).await,
            Command::Clone { snapshot, name } => cli_images::clone(t, snapshot, name).await,
            Command::Image(cmd @ cli_images::ImageCommand::Resize { offline: true, .. }) => {
                cli_images::offline(cmd).await
            }
            Command::Image(cmd) => cli_images::image(t, cmd).await,
            Command::Apply(args) => cli::apply(t, args, false).await,
            Command::Diff(args) => cli::apply(t, args, true).await,
            Command::Spec(cmd) => cli::spec(t, cmd).await,
            Command::Gc(args) => cli_images::gc(t, args).await,
            Command::Completions { .. } => unreachable!("handled above"),
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
