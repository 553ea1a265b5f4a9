//! CLI commands for page-store images: snapshots, clones, resize, flatten, delete, and
//! garbage collection.

use std::path::PathBuf;

use anyhow::bail;
use strata_api::v1 as pb;
use strata_api::v1::images_client::ImagesClient;

use super::parse_size;
use super::target::{api_error, follow, Target};
use crate::daemon::config::Config;
use crate::daemon::manager::{resize_offline, ImageKey, Stores};
use crate::format::{human_bytes, when};

/// `strata snapshot …`
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of an image (a volume name or STORE/IMAGE): every write acknowledged
    /// before it is in it; nothing is copied.
    Create { image: String, name: String },
    /// Snapshot several images at one point (crash-consistent together), all named NAME.
    Group {
        name: String,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// List an image's snapshots (every image's, without one) with their size and the space
    /// only each holds.
    List { image: Option<String> },
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
    /// The page stores the configuration declares, opened here.
    pub fn stores(&self) -> anyhow::Result<Stores> {
        let config = Config::load_or_default(self.config.as_deref(), self.data_dir.as_deref())?;
        config.validate()?;
        Stores::new(config.store_factory(), &config.store_entries()?)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

async fn client(target: &Target) -> anyhow::Result<ImagesClient<strata_api::ApiChannel>> {
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
        SnapshotCommand::Group { name, images } => {
            let g = c
                .create_group_snapshot(pb::CreateGroupSnapshotRequest {
                    images: images.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&g, |g| {
                for s in &g.snapshots {
                    println!(
                        "snapshot {}@{} taken (version {})",
                        s.image, s.name, s.version
                    );
                }
            })
        }
        SnapshotCommand::List { image } => {
            let l = c
                .list_snapshots(pb::ListSnapshotsRequest {
                    image: image.clone().unwrap_or_default(),
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
    let key = ImageKey::parse(image).map_err(|e| anyhow::anyhow!("{e}"))?;
    let old = resize_offline(&local.stores()?, &key, size, *force)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "image {image} resized from {} to {}",
        human_bytes(old),
        human_bytes(size)
    );
    Ok(())
}
