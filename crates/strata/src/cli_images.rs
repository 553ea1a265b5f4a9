//! CLI commands for page-store images: snapshots, clones, resize, flatten, delete, and
//! garbage collection.

use std::path::PathBuf;

use anyhow::{bail, Context};
use strata_api::v1 as pb;
use strata_api::v1::images_client::ImagesClient;

use crate::cli::{api_error, follow, human_bytes, parse_size, Target};

/// `strata snapshot …`
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of an image (a volume name or STORE/IMAGE): every write acknowledged
    /// before it is in it; nothing is copied.
    Create { image: String, name: String },
    /// List an image's snapshots with their size and the space only each holds.
    List { image: String },
    /// Delete IMAGE@SNAPSHOT. Refused while clones read through it, unless --flatten.
    Delete {
        snapshot: String,
        /// First flatten the clones that read through it (copies their shared pages).
        #[arg(long)]
        flatten: bool,
    },
}

/// `strata image …`
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// List the images of the daemon's stores.
    List {
        /// Only this store.
        #[arg(long)]
        store: Option<String>,
    },
    /// Grow an image (or shrink it, with --force); clients see the new size on reconnect.
    Resize {
        image: String,
        /// The new size: bytes, or with a unit (K, M, G, T; KiB… alike).
        size: String,
        /// Allow shrinking, which drops the data beyond the new end.
        #[arg(long)]
        force: bool,
        /// Resize without a daemon: open the image from the configuration's store directly
        /// (it must not be in use).
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        local: LocalStores,
    },
    /// Copy what a clone reads from its snapshot into it, so that it no longer depends on it.
    Flatten { image: String },
    /// Delete an image and its snapshots. Refused while clones read through it.
    Delete { image: String },
}

/// Stores named by a configuration file, for commands that work without a daemon.
#[derive(Debug, clap::Args)]
pub struct LocalStores {
    /// TOML configuration file (default: the embedded demo configuration).
    #[arg(short, long, env = "STRATA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (default: $STRATA_DATA_DIR, $XDG_DATA_HOME/strata or ~/.local/share/strata).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl LocalStores {
    fn opener(&self) -> anyhow::Result<strata_pagestore::ImageOpener> {
        let args = crate::serve::ServeArgs {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            ..Default::default()
        };
        let config = args.resolve()?;
        let data_dir = config
            .data_dir
            .clone()
            .unwrap_or_else(crate::config::default_data_dir);
        crate::serve::image_opener(&config, &data_dir)
    }
}

/// `strata gc`
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Only this store (default: every store of the configuration).
    #[arg(long)]
    pub store: Option<String>,
    /// List what would be deleted and how many bytes; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep everything written, or replaced, less than this many seconds ago.
    #[arg(long, default_value_t = 3600)]
    pub grace_secs: u64,
    /// Keep replaced versions of images this many seconds.
    #[arg(long, default_value_t = 0)]
    pub retention_secs: u64,
    #[command(flatten)]
    pub local: LocalStores,
}

fn when(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = now.saturating_sub(secs);
    match ago {
        0..=119 => format!("{ago} s ago"),
        120..=7199 => format!("{} min ago", ago / 60),
        7200..=172_799 => format!("{} h ago", ago / 3600),
        _ => format!("{} days ago", ago / 86400),
    }
}

async fn client(target: &Target) -> anyhow::Result<ImagesClient<tonic::transport::Channel>> {
    Ok(ImagesClient::new(target.channel().await?))
}

pub async fn snapshot(target: &Target, cmd: &SnapshotCommand) -> anyhow::Result<()> {
    let mut c = client(target).await?;
    match cmd {
        SnapshotCommand::Create { image, name } => {
            let s = c
                .create_snapshot(pb::CreateSnapshotRequest {
                    image: image.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&s, |s| {
                println!(
                    "snapshot {}@{} taken (version {}, {}); export it read-only as {}@{}",
                    s.image,
                    s.name,
                    s.version,
                    human_bytes(s.size),
                    s.image,
                    s.name
                )
            })
        }
        SnapshotCommand::List { image } => {
            let l = c
                .list_snapshots(pb::ListSnapshotsRequest {
                    image: image.clone(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&l.snapshots, |snapshots| {
                println!(
                    "{:<24} {:>8} {:>12} {:>14}  CREATED",
                    "SNAPSHOT", "VERSION", "SIZE", "ONLY IT HOLDS"
                );
                for s in snapshots {
                    println!(
                        "{:<24} {:>8} {:>12} {:>14}  {}",
                        s.name,
                        s.version,
                        human_bytes(s.size),
                        human_bytes(s.exclusive_bytes),
                        when(s.created)
                    );
                }
            })
        }
        SnapshotCommand::Delete { snapshot, flatten } => {
            let stream = c
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot: snapshot.clone(),
                    flatten: *flatten,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            let message = follow(stream, "flatten", "pages").await?;
            target.done(&message)
        }
    }
}

pub async fn clone(target: &Target, snapshot: &str, name: &str) -> anyhow::Result<()> {
    let i = client(target)
        .await?
        .create_clone(pb::CreateCloneRequest {
            snapshot: snapshot.to_string(),
            name: name.to_string(),
        })
        .await
        .map_err(api_error)?
        .into_inner();
    target.print(&i, |i| {
        println!(
            "image {}/{} created as a clone of {}/{} ({}); export it as {}/{}",
            i.store,
            i.name,
            i.store,
            i.base.as_deref().unwrap_or(snapshot),
            human_bytes(i.size),
            i.store,
            i.name
        )
    })
}

/// Image commands that need the daemon (`resize --offline` runs here: see [`offline`]).
pub async fn image(target: &Target, cmd: &ImageCommand) -> anyhow::Result<()> {
    let mut c = client(target).await?;
    match cmd {
        ImageCommand::List { store } => {
            let l = c
                .list_images(pb::ListImagesRequest {
                    store: store.clone().unwrap_or_default(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&l.images, |images| {
                println!(
                    "{:<32} {:>10} {:>8} {:>10} {:>10} {:>5}  BASE",
                    "IMAGE", "SIZE", "VERSION", "SNAPSHOTS", "STORED", "OPEN"
                );
                for i in images {
                    println!(
                        "{:<32} {:>10} {:>8} {:>10} {:>10} {:>5}  {}",
                        format!("{}/{}", i.store, i.name),
                        human_bytes(i.size),
                        i.version,
                        i.snapshots,
                        human_bytes(i.stored_bytes),
                        if i.open { "yes" } else { "no" },
                        i.base.as_deref().unwrap_or("-")
                    );
                }
            })
        }
        ImageCommand::Resize {
            image, size, force, ..
        } => {
            let r = c
                .resize_image(pb::ResizeImageRequest {
                    image: image.clone(),
                    size: parse_size(size)?,
                    force: *force,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&r, |r| println!("{}", r.message))
        }
        ImageCommand::Flatten { image } => {
            let stream = c
                .flatten_image(pb::FlattenImageRequest {
                    image: image.clone(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            let message = follow(stream, "flatten", "pages").await?;
            target.done(&message)
        }
        ImageCommand::Delete { image } => {
            let r = c
                .delete_image(pb::DeleteImageRequest {
                    image: image.clone(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.done(&r.message)
        }
    }
}

/// Image commands that open the store here, without a daemon.
pub async fn offline(cmd: &ImageCommand) -> anyhow::Result<()> {
    let ImageCommand::Resize {
        image,
        size,
        force,
        local,
        ..
    } = cmd
    else {
        bail!("only resize runs offline");
    };
    let size = parse_size(size)?;
    let (store, name) = image
        .split_once('/')
        .with_context(|| format!("{image:?}: name the image as STORE/IMAGE"))?;
    let opener = local.opener()?;
    let img = opener
        .store(store)?
        .open(name, None)
        .await
        .map_err(|e| anyhow::anyhow!("open image {image}: {}", e.chain()))?;
    let old = strata_bdev::BlockDevice::geometry(&img).size;
    let result = img.resize(size, *force).await;
    img.close().await;
    result.map_err(|e| anyhow::anyhow!("resize image {image}: {}", e.chain()))?;
    println!(
        "image {image} resized from {} to {}",
        human_bytes(old),
        human_bytes(size)
    );
    Ok(())
}

pub async fn gc(target: &Target, args: &GcArgs) -> anyhow::Result<()> {
    if args.grace_secs < 60 && !args.dry_run {
        eprintln!(
            "strata gc: warning: a grace period of {} s is shorter than a checkpoint may take to \
             publish what it uploaded; with servers writing to these stores, keep it at 60 s or \
             more",
            args.grace_secs
        );
    }
    let opener = args.local.opener()?;
    let cfg = crate::config::GcConfig {
        interval_secs: 0,
        grace_secs: args.grace_secs,
        retention_secs: args.retention_secs,
    };
    let reports = crate::gc::run_once(
        &opener,
        args.store.as_deref(),
        &crate::gc::options(&cfg, args.dry_run),
    )
    .await?;
    if target.json() {
        let v: Vec<serde_json::Value> = reports
            .iter()
            .map(|(s, r)| serde_json::json!({"store": s, "report": r}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (store, r) in reports {
        let verb = if r.dry_run { "would delete" } else { "deleted" };
        for (key, size) in &r.deleted {
            println!("{store}: {verb} {key} ({})", human_bytes(*size));
        }
        println!(
            "{store}: {verb} {} objects ({}); kept {} objects ({})",
            r.deleted.len(),
            human_bytes(r.deleted_bytes),
            r.kept,
            human_bytes(r.kept_bytes)
        );
    }
    Ok(())
}
