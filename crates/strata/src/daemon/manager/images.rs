//! Page-store images: listing, resize, delete, snapshots, clones and flattening. An image is
//! named by an image volume's name or by `STORE/IMAGE`; the rules (a shrink needs `force`, a
//! snapshot clones read through cannot go, an image volume is resized as a volume) live here.

use std::sync::Arc;

use strata_bdev::BlockDevice;
use strata_pagestore::format::{Manifest, SnapshotRecord};
use strata_pagestore::Image;
use tracing::info;

use super::{ImageKey, Manager, OpError, OpResult, Stores};
use crate::format::human_bytes;

/// An image as listed.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub key: ImageKey,
    pub size: u64,
    pub page_size: u32,
    pub version: u64,
    /// `IMAGE@SNAPSHOT` a clone reads through.
    pub base: Option<String>,
    pub snapshots: u32,
    pub stored_bytes: u64,
    pub open: bool,
}

/// A snapshot as listed.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub image: ImageKey,
    pub name: String,
    pub version: u64,
    pub size: u64,
    pub created: u64,
    pub exclusive_bytes: u64,
}

impl SnapshotInfo {
    /// A snapshot of image `key` as the store's catalog lists it.
    fn listed(key: &ImageKey, s: strata_pagestore::versions::SnapshotInfo) -> SnapshotInfo {
        SnapshotInfo {
            image: key.clone(),
            name: s.name,
            version: s.version,
            size: s.size,
            created: s.created,
            exclusive_bytes: s.exclusive_bytes,
        }
    }
}

/// The bytes in one of an image's pages.
pub(super) fn page_bytes(image: &Image) -> u64 {
    u64::from(image.geometry().optimal_io_size)
}

/// Refuse a resize of `image` to `size` that discards data without `force`.
pub fn check_resize(what: &str, image: &Image, size: u64, force: bool) -> OpResult<()> {
    let page = page_bytes(image);
    if size == 0 || !size.is_multiple_of(page) {
        return Err(OpError::invalid(format!(
            "size: {size} is not a positive multiple of the image's {page}-byte pages"
        )));
    }
    let old = image.geometry().size;
    if size < old && !force {
        return Err(OpError::precondition(format!(
            "shrinking {what} from {old} to {size} bytes discards the data beyond the new end; \
             pass force to do it"
        )));
    }
    Ok(())
}

/// Resize an image that no daemon has open (`strata image resize --offline`).
pub async fn resize_offline(
    stores: &Stores,
    key: &ImageKey,
    size: u64,
    force: bool,
) -> OpResult<u64> {
    let image = stores
        .get(&key.store)?
        .open(&key.image, None)
        .await
        .map_err(|e| OpError::from(e).context(&format!("open image {key}")))?;
    let old = image.geometry().size;
    let result = match check_resize(&format!("image {key}"), &image, size, force) {
        Ok(()) => image.resize(size, force).await.map_err(OpError::from),
        Err(e) => Err(e),
    };
    image.close().await;
    result.map_err(|e| e.context(&format!("resize image {key}")))?;
    Ok(old)
}

/// A snapshot deletion that passed its checks: the clones to flatten first, then the deletion.
#[derive(Debug)]
pub struct SnapshotDeletion {
    manager: Arc<Manager>,
    key: ImageKey,
    snapshot: String,
    flatten: Vec<String>,
}

impl SnapshotDeletion {
    /// Flatten the clones that read through the snapshot (reporting `(done, total)` pages),
    /// then delete it; the final message.
    pub async fn run(self, progress: &(dyn Fn(u64, u64) + Send + Sync)) -> OpResult<String> {
        let SnapshotDeletion {
            manager,
            key,
            snapshot,
            flatten,
        } = self;
        for c in flatten {
            info!(clone = %c, "flattening before the snapshot is deleted");
            let clone = ImageKey {
                store: key.store.clone(),
                image: c,
            };
            manager
                .images
                .image(&clone, None)
                .await?
                .flatten(progress)
                .await?;
        }
        manager
            .stores
            .get(&key.store)?
            .delete_snapshot(&key.image, &snapshot)
            .await?;
        manager.images.forget_snapshot(&key, &snapshot).await;
        let message = format!(
            "snapshot {key}@{snapshot} deleted; `strata gc` frees its data after the grace period"
        );
        info!("{message}");
        Ok(message)
    }
}

/// `IMAGE@SNAPSHOT` split.
pub fn split_snapshot(s: &str) -> OpResult<(&str, &str)> {
    s.rsplit_once('@').ok_or_else(|| {
        OpError::invalid(format!("snapshot {s:?}: name a snapshot as IMAGE@SNAPSHOT"))
    })
}

impl Manager {
    /// The image `name` names: an image volume's name, or `STORE/IMAGE`.
    pub fn image_key(&self, name: &str) -> OpResult<ImageKey> {
        self.images.key(name)
    }

    /// The images of `store` (every store when `None`).
    pub async fn list_images(&self, store: Option<&str>) -> OpResult<Vec<ImageInfo>> {
        let stores = match store {
            Some(s) => vec![s.to_string()],
            None => self.stores.names(),
        };
        let mut out = Vec::new();
        for store in stores {
            let ps = self.stores.get(&store)?;
            let cat = ps.catalog().await?;
            for (name, e) in &cat.images {
                let Some(m) = &e.latest else { continue };
                let key = ImageKey {
                    store: store.clone(),
                    image: name.clone(),
                };
                out.push(ImageInfo {
                    open: self.images.if_open(&key).await.is_some(),
                    key,
                    size: m.image_size,
                    page_size: 1 << m.page_size_bits,
                    version: m.version,
                    base: m
                        .base
                        .as_ref()
                        .map(|b| format!("{}@{}", b.image, b.snapshot)),
                    snapshots: e.snapshots.iter().filter(|s| s.deleted.is_none()).count() as u32,
                    stored_bytes: cat.stored_bytes(name),
                });
            }
        }
        Ok(out)
    }

    /// Resize an image; an image volume is resized as a volume, so its declaration follows.
    pub async fn resize_image(
        &self,
        name: &str,
        size: u64,
        force: bool,
    ) -> OpResult<(ImageKey, String)> {
        let key = self.image_key(name)?;
        let _changing = self.changes.lock().await;
        let volume = self
            .volumes()
            .into_iter()
            .find(|m| m.decl().image() == Some(&key));
        let size = match volume {
            Some(m) => {
                self.resize_unlocked(&m, size, force).await?;
                size
            }
            None => {
                let i = self.images.image(&key, None).await?;
                check_resize(&format!("image {key}"), &i, size, force)?;
                i.resize(size, force).await?;
                i.geometry().size
            }
        };
        let message = format!(
            "image {key} is now {}; clients see the new size when they reconnect",
            human_bytes(size)
        );
        info!("{message}");
        Ok((key, message))
    }

    /// Delete an image and its snapshots; refused while clones read through it, while it is a
    /// volume, or while clients use it.
    pub async fn delete_image(&self, name: &str) -> OpResult<String> {
        let key = self.image_key(name)?;
        let _changing = self.changes.lock().await;
        self.delete_image_unlocked(&key).await?;
        let message = format!(
            "image {key} deleted with its snapshots; `strata gc` frees its data after the grace \
             period"
        );
        info!("{message}");
        Ok(message)
    }

    pub(super) async fn delete_image_unlocked(&self, key: &ImageKey) -> OpResult<()> {
        self.images.close(key).await?;
        self.stores
            .get(&key.store)?
            .delete_image(&key.image)
            .await?;
        Ok(())
    }

    /// Take a snapshot: every write acknowledged before it is in it.
    pub async fn create_snapshot(&self, name: &str, snapshot: &str) -> OpResult<SnapshotInfo> {
        let key = self.image_key(name)?;
        let rec = self
            .images
            .image(&key, None)
            .await?
            .snapshot(snapshot)
            .await?;
        info!(image = %key, snapshot = %snapshot, "snapshot taken");
        Ok(SnapshotInfo {
            image: key,
            name: rec.snapshot,
            version: rec.version,
            size: rec.image_size,
            created: rec.created,
            exclusive_bytes: 0,
        })
    }

    /// Snapshot several images at one point, all named `snapshot` (see
    /// [`Image::snapshot_group`]).
    pub async fn create_group_snapshot(
        &self,
        names: &[String],
        snapshot: &str,
    ) -> OpResult<Vec<SnapshotInfo>> {
        if names.is_empty() {
            return Err(OpError::invalid("images: name at least one image"));
        }
        strata_pagestore::check_name(snapshot)
            .map_err(|e| OpError::invalid(format!("name: {}", e.chain())))?;
        let mut keys = Vec::with_capacity(names.len());
        let mut images = Vec::with_capacity(names.len());
        for n in names {
            let key = self.image_key(n)?;
            if keys.contains(&key) {
                return Err(OpError::invalid(format!("images: {key} is named twice")));
            }
            images.push(self.images.image(&key, None).await?);
            keys.push(key);
        }
        let recs = Image::snapshot_group(&images, snapshot).await?;
        Ok(keys
            .into_iter()
            .zip(recs)
            .map(|(image, rec)| SnapshotInfo {
                image,
                name: rec.snapshot,
                version: rec.version,
                size: rec.image_size,
                created: rec.created,
                exclusive_bytes: 0,
            })
            .collect())
    }

    /// The snapshots of every image of every store.
    pub async fn list_all_snapshots(&self) -> OpResult<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for store in self.stores.names() {
            let cat = self.stores.get(&store)?.catalog().await?;
            for (image, e) in &cat.images {
                if e.latest.is_none() {
                    continue;
                }
                let key = ImageKey {
                    store: store.clone(),
                    image: image.clone(),
                };
                out.extend(
                    cat.snapshots(image)
                        .into_iter()
                        .map(|s| SnapshotInfo::listed(&key, s)),
                );
            }
        }
        Ok(out)
    }

    /// An image's snapshots, with the space only each holds.
    pub async fn list_snapshots(&self, name: &str) -> OpResult<Vec<SnapshotInfo>> {
        let key = self.image_key(name)?;
        let cat = self.stores.get(&key.store)?.catalog().await?;
        if cat
            .images
            .get(&key.image)
            .is_none_or(|e| e.latest.is_none())
        {
            return Err(OpError::not_found(format!(
                "no image {} in store {}",
                key.image, key.store
            )));
        }
        Ok(cat
            .snapshots(&key.image)
            .into_iter()
            .map(|s| SnapshotInfo::listed(&key, s))
            .collect())
    }

    /// Check that `IMAGE@SNAPSHOT` may be deleted (with `flatten`, after flattening the clones
    /// that read through it); the deletion to run.
    pub async fn plan_snapshot_deletion(
        self: &Arc<Self>,
        snapshot: &str,
        flatten: bool,
    ) -> OpResult<SnapshotDeletion> {
        let (image, snap) = split_snapshot(snapshot)?;
        let key = self.image_key(image)?;
        if self.images.snapshot_open(&key, snap).await {
            return Err(OpError::precondition(format!(
                "snapshot {key}@{snap} is exported to clients; disconnect them first"
            )));
        }
        let cat = self.stores.get(&key.store)?.catalog().await?;
        let rec: &SnapshotRecord = cat
            .images
            .get(&key.image)
            .and_then(|e| {
                e.snapshots
                    .iter()
                    .find(|s| s.snapshot == snap && s.deleted.is_none())
            })
            .ok_or_else(|| OpError::not_found(format!("no snapshot {key}@{snap}")))?;
        let deps = cat.dependents(&key.image, rec.version);
        let snapshots_of_clones: Vec<&String> = deps.iter().filter(|d| d.contains('@')).collect();
        if !snapshots_of_clones.is_empty() {
            return Err(OpError::precondition(format!(
                "snapshots of clones read through {key}@{snap}: {}; delete them first (a \
                 snapshot cannot be flattened)",
                snapshots_of_clones
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !deps.is_empty() && !flatten {
            return Err(OpError::precondition(format!(
                "clones read through {key}@{snap}: {}; delete them, or pass flatten to make them \
                 stand alone first",
                deps.join(", ")
            )));
        }
        Ok(SnapshotDeletion {
            manager: self.clone(),
            key,
            snapshot: snap.to_string(),
            flatten: deps,
        })
    }

    /// A new writable image reading through `IMAGE@SNAPSHOT`, in the snapshot's store.
    pub async fn create_clone(&self, snapshot: &str, name: &str) -> OpResult<ImageInfo> {
        let (image, snap) = split_snapshot(snapshot)?;
        let key = self.image_key(image)?;
        let new = match name.split_once('/') {
            Some((s, n)) if s == key.store => n.to_string(),
            Some((s, _)) => {
                return Err(OpError::invalid(format!(
                    "name: a clone lives in its snapshot's store ({}), not in {s}",
                    key.store
                )))
            }
            None => name.to_string(),
        };
        let ps = self.stores.get(&key.store)?;
        let m: Manifest = ps.create_clone(&key.image, snap, &new).await?;
        let stored_bytes = ps
            .catalog()
            .await
            .map(|c| c.stored_bytes(&new))
            .unwrap_or_default();
        let clone = ImageKey {
            store: key.store.clone(),
            image: new,
        };
        info!(clone = %clone, of = %snapshot, "clone created");
        Ok(ImageInfo {
            key: clone,
            size: m.image_size,
            page_size: 1 << m.page_size_bits,
            version: m.version,
            base: Some(format!("{}@{snap}", key.image)),
            snapshots: 0,
            stored_bytes,
            open: false,
        })
    }

    /// The clone `name` and the snapshot it reads through, to flatten.
    pub async fn flatten_target(&self, name: &str) -> OpResult<(Arc<Image>, String)> {
        let key = self.image_key(name)?;
        let i = self.images.image(&key, None).await?;
        let Some(base) = i.base() else {
            return Err(OpError::precondition(format!(
                "image {key} is not a clone: nothing to flatten"
            )));
        };
        let message = format!(
            "image {key} flattened: it no longer reads through {}@{}",
            base.image, base.snapshot
        );
        Ok((i, message))
    }
}
