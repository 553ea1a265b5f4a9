//! Versions of images in a store: snapshots, clones, the catalog of what exists and what
//! depends on what, and garbage collection.
//!
//! ```text
//!   images/NAME/manifest/V          versions (the newest is the image)
//!   images/NAME/snapshots/SNAP      a name for version V (JSON; "deleted" once deleted)
//!   images/CLONE/manifest/1         {"base": {"image": NAME, "version": V, "snapshot": SNAP}, …}
//! ```
//!
//! Nothing is copied to take a snapshot or to make a clone: both only name a version. Garbage
//! collection deletes what no version still in use references, after a grace period.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use strata_bdev::{Error, ErrorKind, Result};

use crate::format::{BaseRef, Manifest, SnapshotRecord};
use crate::image::PageStore;
use crate::layout::{
    base_chain, check_name, create_manifest, get_record, latest_manifest, manifest_key,
    manifest_versions, not_found, now_secs, obj_err, read_manifest, read_snapshot, snapshot_key,
    LEASE_TTL,
};
use crate::objects::{retry, Listed, Objects};

/// Split `IMAGE@SNAPSHOT`.
pub fn parse_snapshot_ref(s: &str) -> Result<(&str, &str)> {
    match s.split_once('@') {
        Some((i, n)) if !i.is_empty() && !n.is_empty() => {
            check_name(i)?;
            check_name(n)?;
            Ok((i, n))
        }
        _ => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{s:?}: name a snapshot as IMAGE@SNAPSHOT"),
        )),
    }
}

impl PageStore {
    /// Create image `name` as a clone of snapshot `image@snapshot`: O(1), its pages read
    /// through to the snapshot until written.
    pub async fn create_clone(&self, image: &str, snapshot: &str, name: &str) -> Result<Manifest> {
        check_name(name)?;
        let objects = &*self.objects;
        if latest_manifest(objects, name).await?.is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("image {name} exists already; a clone needs a new name"),
            ));
        }
        let rec = read_snapshot(objects, image, snapshot).await?;
        let src = read_manifest(objects, image, rec.version).await?;
        let m = Manifest {
            image: name.to_string(),
            version: 1,
            image_size: src.image_size,
            page_size_bits: src.page_size_bits,
            segments: Vec::new(),
            wal_generation: 0,
            writer: String::new(),
            created: now_secs(),
            base: Some(BaseRef {
                image: image.to_string(),
                version: rec.version,
                snapshot: snapshot.to_string(),
            }),
        };
        let made = create_manifest(objects, m.clone()).await?;
        if made.base != m.base {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("image {name} was created meanwhile by someone else"),
            ));
        }
        // The snapshot may have been deleted between the check and the clone: undo.
        if read_snapshot(objects, image, snapshot).await.is_err() {
            let _ = objects.delete(&manifest_key(name, 1)).await;
            return Err(not_found(format!(
                "snapshot {image}@{snapshot} was deleted while the clone was made"
            )));
        }
        Ok(made)
    }

    /// The images in the store, their snapshots, and what depends on what.
    pub async fn catalog(&self) -> Result<Catalog> {
        Catalog::scan(&*self.objects).await
    }

    /// Delete snapshot `image@snapshot`. Refused while clones read through it (flatten them
    /// first). Its data is freed by garbage collection, after the grace period.
    pub async fn delete_snapshot(&self, image: &str, snapshot: &str) -> Result<()> {
        let objects = &*self.objects;
        let mut rec = read_snapshot(objects, image, snapshot).await?;
        let cat = self.catalog().await?;
        let deps = cat.dependents(image, rec.version);
        if !deps.is_empty() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "snapshot {image}@{snapshot} is the base of {}; flatten those clones first \
                     (strata snapshot delete --flatten does it)",
                    deps.join(", ")
                ),
            ));
        }
        rec.deleted = Some(now_secs());
        let key = snapshot_key(image, snapshot);
        retry(
            objects,
            "delete snapshot",
            5,
            || false,
            || objects.put(&key, Bytes::from(rec.encode())),
        )
        .await
        .map_err(|e| obj_err(&format!("delete snapshot {image}@{snapshot}"), e))
    }

    /// Delete image `name` with its snapshots. Refused while clones read through any of its
    /// versions. Its data is freed by garbage collection.
    pub async fn delete_image(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let objects = &*self.objects;
        let cat = self.catalog().await?;
        let Some(entry) = cat.images.get(name).filter(|e| e.latest.is_some()) else {
            return Err(not_found(format!("no image {name} in this store")));
        };
        let mut deps = BTreeSet::new();
        for &(v, _) in &entry.versions {
            deps.extend(
                cat.dependents(name, v)
                    .into_iter()
                    .filter(|d| !d.starts_with(&format!("{name}@")) && d != name),
            );
        }
        if !deps.is_empty() {
            let deps: Vec<String> = deps.into_iter().collect();
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "image {name} has clones that read through it: {}; flatten or delete them first",
                    deps.join(", ")
                ),
            ));
        }
        for s in &entry.snapshots {
            let key = snapshot_key(name, &s.snapshot);
            objects
                .delete(&key)
                .await
                .map_err(|e| obj_err(&format!("delete image {name}"), e))?;
        }
        // Oldest first: a crash part-way leaves the image as it was, never an older version.
        for &(v, _) in &entry.versions {
            let key = manifest_key(name, v);
            retry(
                objects,
                "delete manifest",
                5,
                || false,
                || objects.delete(&key),
            )
            .await
            .map_err(|e| obj_err(&format!("delete image {name}"), e))?;
        }
        // Its write buffer must not be replayed into a new image of the same name.
        let dir = self.buffer_dir.join(name);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::with_source(
                ErrorKind::Io,
                format!(
                    "delete image {name}: remove its write buffer {}",
                    dir.display()
                ),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// Delete what no image, snapshot or clone needs (see [`GcOptions`]).
    pub async fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        gc(&*self.objects, opts).await
    }
}

/// One image as the catalog sees it.
#[derive(Debug, Default)]
pub struct ImageEntry {
    /// Manifest versions and when each was written, oldest first.
    pub versions: Vec<(u64, SystemTime)>,
    /// The newest manifest (none: the image was deleted, its objects await collection).
    pub latest: Option<Manifest>,
    /// Snapshots, deleted ones included (their `deleted` is set).
    pub snapshots: Vec<SnapshotRecord>,
    /// Every object under `images/NAME/`.
    pub objects: Vec<Listed>,
}

/// What is in a store: every image, its versions and snapshots.
#[derive(Debug, Default)]
pub struct Catalog {
    pub images: BTreeMap<String, ImageEntry>,
    /// Manifests read so far, by (image, version).
    manifests: HashMap<(String, u64), Manifest>,
    /// Base chains of the manifests that are in use: (image, version) → chain.
    chains: HashMap<(String, u64), Vec<(String, u64)>>,
}

impl Catalog {
    async fn scan(objects: &dyn Objects) -> Result<Catalog> {
        let listed = retry(
            objects,
            "list store",
            5,
            || false,
            || objects.list("images/"),
        )
        .await
        .map_err(|e| obj_err("list images", e))?;
        let mut cat = Catalog::default();
        for o in listed {
            let mut parts = o.key.splitn(4, '/');
            let (Some("images"), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            let entry = cat.images.entry(name.to_string()).or_default();
            if let (Some("manifest"), Some(v)) = (parts.next(), parts.next()) {
                if let Ok(v) = v.parse::<u64>() {
                    entry.versions.push((v, o.modified));
                }
            }
            entry.objects.push(o);
        }
        let names: Vec<String> = cat.images.keys().cloned().collect();
        for name in names {
            let entry = cat.images.get_mut(&name).expect("listed above");
            entry.versions.sort_unstable();
            let snaps: Vec<String> = entry
                .objects
                .iter()
                .filter_map(|o| {
                    o.key
                        .strip_prefix(&format!("images/{name}/snapshots/"))
                        .map(str::to_string)
                })
                .collect();
            let latest = entry.versions.last().map(|(v, _)| *v);
            let mut records = Vec::new();
            for s in snaps {
                if let Some(r) = get_record(objects, &name, &s).await? {
                    records.push(r);
                }
            }
            records.sort_by(|a, b| a.snapshot.cmp(&b.snapshot));
            let entry = cat.images.get_mut(&name).expect("listed above");
            entry.snapshots = records;
            if let Some(v) = latest {
                let m = read_manifest(objects, &name, v).await?;
                cat.manifests.insert((name.clone(), v), m.clone());
                cat.images.get_mut(&name).expect("listed above").latest = Some(m);
            }
        }
        // The chains of every image's newest version and of every live snapshot.
        let mut uses: Vec<(String, u64)> = Vec::new();
        for (name, e) in &cat.images {
            if let Some(m) = &e.latest {
                uses.push((name.clone(), m.version));
            }
            for s in e.snapshots.iter().filter(|s| s.deleted.is_none()) {
                uses.push((name.clone(), s.version));
            }
        }
        for u in uses {
            cat.chain_of(objects, &u.0, u.1).await?;
        }
        Ok(cat)
    }

    /// The manifest `image` version `v` (read once).
    async fn manifest(&mut self, objects: &dyn Objects, image: &str, v: u64) -> Result<&Manifest> {
        let key = (image.to_string(), v);
        if !self.manifests.contains_key(&key) {
            let m = read_manifest(objects, image, v).await?;
            self.manifests.insert(key.clone(), m);
        }
        Ok(&self.manifests[&key])
    }

    /// The versions `image@v` reads through to, nearest first.
    async fn chain_of(
        &mut self,
        objects: &dyn Objects,
        image: &str,
        v: u64,
    ) -> Result<Vec<(String, u64)>> {
        let key = (image.to_string(), v);
        if let Some(c) = self.chains.get(&key) {
            return Ok(c.clone());
        }
        let m = self.manifest(objects, image, v).await?.clone();
        let chain: Vec<(String, u64)> = base_chain(objects, &m)
            .await?
            .into_iter()
            .map(|b| {
                let k = (b.image.clone(), b.version);
                self.manifests.insert(k.clone(), b);
                k
            })
            .collect();
        self.chains.insert(key, chain.clone());
        Ok(chain)
    }

    /// Images and snapshots that read through version `v` of `image`: `NAME` for an image's
    /// newest version, `NAME@SNAP` for a snapshot.
    pub fn dependents(&self, image: &str, v: u64) -> Vec<String> {
        let target = (image.to_string(), v);
        let mut out = Vec::new();
        for (name, e) in &self.images {
            if let Some(m) = &e.latest {
                if self
                    .chains
                    .get(&(name.clone(), m.version))
                    .is_some_and(|c| c.contains(&target))
                {
                    out.push(name.clone());
                }
            }
            for s in e.snapshots.iter().filter(|s| s.deleted.is_none()) {
                if self
                    .chains
                    .get(&(name.clone(), s.version))
                    .is_some_and(|c| c.contains(&target))
                {
                    out.push(format!("{name}@{}", s.snapshot));
                }
            }
        }
        out
    }

    /// Keys of the segments a version references, its base chain's included.
    fn referenced(&self, image: &str, v: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut versions = vec![(image.to_string(), v)];
        if let Some(c) = self.chains.get(&(image.to_string(), v)) {
            versions.extend(c.iter().cloned());
        }
        for (i, v) in versions {
            if let Some(m) = self.manifests.get(&(i.clone(), v)) {
                out.extend(m.segments.iter().map(|s| format!("images/{i}/{}", s.key)));
            }
        }
        out
    }

    fn sizes(&self) -> HashMap<&str, u64> {
        self.images
            .values()
            .flat_map(|e| e.objects.iter().map(|o| (o.key.as_str(), o.size)))
            .collect()
    }

    /// The live snapshots of `image`, each with the bytes only it holds: objects no other
    /// version in use (the image itself, other snapshots, clones) references.
    pub fn snapshots(&self, image: &str) -> Vec<SnapshotInfo> {
        let Some(e) = self.images.get(image) else {
            return Vec::new();
        };
        let sizes = self.sizes();
        let live: Vec<(String, u64, Option<String>)> = self
            .images
            .iter()
            .flat_map(|(name, e)| {
                let latest = e.latest.as_ref().map(|m| (name.clone(), m.version, None));
                let snaps = e
                    .snapshots
                    .iter()
                    .filter(|s| s.deleted.is_none())
                    .map(|s| (name.clone(), s.version, Some(s.snapshot.clone())));
                latest.into_iter().chain(snaps)
            })
            .collect();
        e.snapshots
            .iter()
            .filter(|s| s.deleted.is_none())
            .map(|s| {
                let mine: BTreeSet<String> =
                    self.referenced(image, s.version).into_iter().collect();
                let others: BTreeSet<String> = live
                    .iter()
                    .filter(|(n, _, sn)| !(n == image && sn.as_deref() == Some(&s.snapshot)))
                    .flat_map(|(n, v, _)| self.referenced(n, *v))
                    .collect();
                let exclusive_bytes = mine
                    .difference(&others)
                    .filter_map(|k| sizes.get(k.as_str()))
                    .sum();
                SnapshotInfo {
                    name: s.snapshot.clone(),
                    version: s.version,
                    size: s.image_size,
                    created: s.created,
                    exclusive_bytes,
                }
            })
            .collect()
    }

    /// Bytes of the objects under `images/NAME/`.
    pub fn stored_bytes(&self, image: &str) -> u64 {
        self.images
            .get(image)
            .map_or(0, |e| e.objects.iter().map(|o| o.size).sum())
    }
}

/// A snapshot as `strata snapshot list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub version: u64,
    /// The image's size in bytes when it was taken.
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Bytes that deleting it (and collecting garbage) would free.
    pub exclusive_bytes: u64,
}

/// How garbage collection decides.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Nothing is deleted that was written, or stopped being used, less than this ago: a
    /// writer uploading, a reader of a version just replaced, a transaction's snapshot.
    pub grace: Duration,
    /// Versions of an image are kept this long after a newer one replaced them.
    pub retention: Duration,
    /// List what would be deleted, delete nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            grace: Duration::from_secs(3600),
            retention: Duration::from_secs(0),
            dry_run: false,
        }
    }
}

/// What a collection found and did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    /// Objects deleted (or, in a dry run, that would be), with their sizes.
    pub deleted: Vec<(String, u64)>,
    pub deleted_bytes: u64,
    /// Objects kept, and their bytes.
    pub kept: u64,
    pub kept_bytes: u64,
    pub dry_run: bool,
}

/// What one collection decides, from the catalog and the options.
struct Sweep<'a> {
    opts: &'a GcOptions,
    now: SystemTime,
    /// Versions in use, and the bases they read through.
    root_set: BTreeSet<(String, u64)>,
    /// Segments those versions reference.
    referenced: BTreeSet<String>,
    /// Manifests of versions replaced long enough ago.
    doomed_manifests: Vec<(String, u64)>,
}

impl Sweep<'_> {
    fn older_than(&self, t: SystemTime, d: Duration) -> bool {
        self.now.duration_since(t).is_ok_and(|age| age >= d)
    }

    /// Versions in use: each image's newest, live snapshots (and snapshots deleted within the
    /// grace period: a reader may still have one open), and every version replaced less than
    /// max(grace, retention) ago; and the manifests of the others.
    fn roots(&mut self, cat: &Catalog) -> Vec<(String, u64)> {
        let keep_versions = self.opts.grace.max(self.opts.retention);
        let mut roots: Vec<(String, u64)> = Vec::new();
        for (name, e) in &cat.images {
            for (i, &(v, _)) in e.versions.iter().enumerate() {
                let replaced = e.versions.get(i + 1).map(|&(_, t)| t);
                match replaced {
                    None => roots.push((name.clone(), v)),
                    Some(t) if !self.older_than(t, keep_versions) => roots.push((name.clone(), v)),
                    Some(_) => self.doomed_manifests.push((name.clone(), v)),
                }
            }
            for s in &e.snapshots {
                let keep = match s.deleted {
                    None => true,
                    Some(at) => now_secs().saturating_sub(at) < self.opts.grace.as_secs(),
                };
                if keep {
                    roots.push((name.clone(), s.version));
                }
            }
        }
        roots
    }

    /// The objects of image `name` to delete (added to `doomed`), and the count and bytes of
    /// those kept (added to `kept`).
    fn image(
        &self,
        name: &str,
        e: &ImageEntry,
        doomed: &mut Vec<(String, u64)>,
        kept: &mut (u64, u64),
    ) {
        let grace = self.opts.grace;
        // Segments of an operation still uploading (a live lease) await their manifest.
        let lease_dir = format!("images/{name}/leases/");
        let mut leased: Vec<String> = Vec::new();
        for o in e.objects.iter().filter(|o| o.key.starts_with(&lease_dir)) {
            if self.older_than(o.modified, LEASE_TTL.max(grace)) {
                doomed.push((o.key.clone(), o.size));
            } else if !self.older_than(o.modified, LEASE_TTL) {
                leased.push(format!(
                    "images/{name}/segments/{}-",
                    &o.key[lease_dir.len()..]
                ));
            }
        }
        for o in &e.objects {
            let segment = o.key.starts_with(&format!("images/{name}/segments/"))
                && !self.referenced.contains(&o.key)
                && !leased.iter().any(|l| o.key.starts_with(l.as_str()))
                && self.older_than(o.modified, grace);
            let manifest = self.doomed_manifests.iter().any(|(n, v)| {
                n == name
                    && manifest_key(n, *v) == o.key
                    && !self.root_set.contains(&(n.clone(), *v))
            });
            // The record of a snapshot deleted longer ago than the grace period.
            let record = e.snapshots.iter().any(|s| {
                snapshot_key(name, &s.snapshot) == o.key
                    && s.deleted
                        .is_some_and(|at| now_secs().saturating_sub(at) >= grace.as_secs())
            });
            if o.key.starts_with(&lease_dir) {
                if !doomed.iter().any(|(k, _)| *k == o.key) {
                    kept.0 += 1;
                    kept.1 += o.size;
                }
            } else if segment || manifest || record {
                doomed.push((o.key.clone(), o.size));
            } else {
                kept.0 += 1;
                kept.1 += o.size;
            }
        }
    }
}

/// Take back from `doomed` the segments a writer still needs. The store's listing is not one
/// atomic look: a segment listed as unreferenced may have been uploaded under a lease the
/// listing missed, and published by a manifest written after the manifests were listed. A
/// writer publishes before it drops its lease, so listing each image's leases *after* its
/// segments, and then its manifests, sees one or the other for every segment still needed.
async fn spare_what_became_needed(
    objects: &dyn Objects,
    cat: &Catalog,
    doomed: &mut Vec<(String, u64)>,
) -> Result<()> {
    let mut images: Vec<&str> = doomed
        .iter()
        .filter(|(k, _)| k.contains("/segments/"))
        .filter_map(|(k, _)| k.strip_prefix("images/")?.split('/').next())
        .collect();
    images.sort_unstable();
    images.dedup();
    let mut needed: BTreeSet<String> = BTreeSet::new();
    let mut leased: Vec<String> = Vec::new();
    for name in images {
        let lease_dir = format!("images/{name}/leases/");
        let leases = retry(
            objects,
            "list leases",
            5,
            || false,
            || objects.list(&lease_dir),
        )
        .await
        .map_err(|e| obj_err("collect garbage: list leases", e))?;
        leased.extend(
            leases
                .iter()
                .map(|o| format!("images/{name}/segments/{}-", &o.key[lease_dir.len()..])),
        );
        let seen = cat
            .images
            .get(name)
            .and_then(|e| e.versions.last())
            .map_or(0, |(v, _)| *v);
        for v in manifest_versions(objects, name).await? {
            if v > seen {
                let m = read_manifest(objects, name, v).await?;
                needed.extend(
                    m.segments
                        .iter()
                        .map(|s| format!("images/{name}/{}", s.key)),
                );
            }
        }
    }
    doomed.retain(|(k, _)| !needed.contains(k) && !leased.iter().any(|l| k.starts_with(l)));
    Ok(())
}

async fn gc(objects: &dyn Objects, opts: &GcOptions) -> Result<GcReport> {
    let mut cat = Catalog::scan(objects).await.map_err(|e| {
        Error::new(
            e.kind(),
            format!(
                "collect garbage: read what the store holds; nothing was deleted: {}",
                e.chain()
            ),
        )
    })?;
    let mut sweep = Sweep {
        opts,
        now: SystemTime::now(),
        root_set: BTreeSet::new(),
        referenced: BTreeSet::new(),
        doomed_manifests: Vec::new(),
    };
    for (image, v) in sweep.roots(&cat) {
        // A version in use that cannot be read (or whose base cannot): stop rather than guess
        // what it needs; the next run tries again.
        let chain = cat.chain_of(objects, &image, v).await.map_err(|e| {
            Error::new(
                e.kind(),
                format!(
                    "collect garbage: version {v} of image {image}, which is in use, cannot be \
                     read, so what it needs is unknown; nothing was deleted: {}",
                    e.chain()
                ),
            )
        })?;
        sweep.referenced.extend(cat.referenced(&image, v));
        sweep.root_set.insert((image, v));
        sweep.root_set.extend(chain);
    }
    let mut doomed: Vec<(String, u64)> = Vec::new();
    let mut kept = (0u64, 0u64);
    for (name, e) in &cat.images {
        sweep.image(name, e, &mut doomed, &mut kept);
    }
    spare_what_became_needed(objects, &cat, &mut doomed).await?;
    // Segments before manifests: a crash part-way leaves old versions without their data,
    // never data without a version that could still be read.
    doomed.sort_by_key(|(k, _)| !k.contains("/segments/"));
    let mut report = GcReport {
        dry_run: opts.dry_run,
        kept: kept.0,
        kept_bytes: kept.1,
        ..GcReport::default()
    };
    for (key, size) in doomed {
        if !opts.dry_run {
            retry(
                objects,
                "delete garbage",
                5,
                || false,
                || objects.delete(&key),
            )
            .await
            .map_err(|e| obj_err("collect garbage", e))?;
        }
        report.deleted_bytes += size;
        report.deleted.push((key, size));
    }
    tracing::info!(
        deleted = report.deleted.len(),
        deleted_bytes = report.deleted_bytes,
        kept = report.kept,
        dry_run = opts.dry_run,
        "garbage collection done"
    );
    Ok(report)
}
