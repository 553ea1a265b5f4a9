//! The `strata` command line: the daemon (`strata serve`) and the commands that drive it through
//! its gRPC API, one file per noun. `target.rs` says where the daemon is and how to print.

mod child;
mod csi;
mod export;
mod gc;
mod image;
mod serve;
mod spec;
mod status;
mod store;
mod target;
mod volume;

use clap::{Parser, Subcommand};

pub use serve::ServeArgs;

/// A size argument: bytes, or with a unit (K, M, G, T; KiB… alike).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    strata_bdev::parse_size(s).map_err(|e| anyhow::anyhow!("size {s:?}: {e}"))
}

/// Strata: a block-storage data plane.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about)]
pub struct Cli {
    /// Log format on stderr: human, compact (one line, no colour) or json (one object a line,
    /// with the connection and volume a line concerns as fields).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "STRATA_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(flatten)]
    target: target::Target,
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
    Status(status::StatusArgs),
    /// The daemon: what it is, its state store, its I/O counters.
    #[command(subcommand)]
    Node(status::NodeCommand),
    /// Create, list, show, delete or resize volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Add, remove, offline, online or fault a replica of a nexus volume.
    #[command(subcommand)]
    Child(child::ChildCommand),
    /// Follow, show, pause, resume or cancel a rebuild.
    #[command(subcommand)]
    Rebuild(child::RebuildCommand),
    /// Export volumes over NBD, or stop.
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// The page stores and their images.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Take, list or delete snapshots of page-store images.
    #[command(subcommand)]
    Snapshot(image::SnapshotCommand),
    /// Make a new image that is a clone of a snapshot (IMAGE@SNAPSHOT NAME): O(1), writable.
    Clone { snapshot: String, name: String },
    /// List, resize, flatten or delete page-store images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Make the volumes what a spec declares (see docs/SPEC.md).
    Apply(spec::SpecArgs),
    /// Show what `strata apply` would do with a spec, changing nothing.
    Diff(spec::SpecArgs),
    /// The spec last applied.
    #[command(subcommand)]
    Spec(spec::SpecCommand),
    /// Delete objects no image, snapshot or clone needs (after a grace period), in the
    /// stores of a configuration. Safe while servers run.
    Gc(gc::GcArgs),
    /// Serve the CSI driver (Kubernetes): the Identity, Controller, GroupController and Node
    /// services on $CSI_ENDPOINT, over this daemon's API (--endpoint).
    Csi(csi::CsiArgs),
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

/// The `strata` command: parse the arguments, set up logging, run the command.
pub fn main() -> std::process::ExitCode {
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
            Command::Serve(args) => match args.resolve() {
                Ok(config) => crate::daemon::run(config).await,
                Err(e) => Err(e),
            },
            Command::Status(args) => status::status(t, args).await,
            Command::Node(cmd) => status::node(t, cmd).await,
            Command::Volume(cmd) => volume::volume(t, cmd).await,
            Command::Child(cmd) => child::child(t, cmd).await,
            Command::Rebuild(cmd) => child::rebuild(t, cmd).await,
            Command::Export(cmd) => export::export(t, cmd).await,
            Command::Store(cmd) => store::store(t, cmd).await,
            Command::Snapshot(cmd) => image::snapshot(t, cmd).await,
            Command::Clone { snapshot, name } => image::clone(t, snapshot, name).await,
            Command::Image(cmd @ image::ImageCommand::Resize { offline: true, .. }) => {
                image::offline(cmd).await
            }
            Command::Image(cmd) => image::image(t, cmd).await,
            Command::Apply(args) => spec::apply(t, args, false).await,
            Command::Diff(args) => spec::apply(t, args, true).await,
            Command::Spec(cmd) => spec::spec(t, cmd).await,
            Command::Gc(args) => gc::gc(t, args).await,
            Command::Csi(args) => csi::csi(t, args).await,
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
