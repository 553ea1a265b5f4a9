//! Where things are in the object store and how the page store reads them: manifest versions,
//! snapshot records, segment indexes, leases. Used by open images (`image/`) and by the
//! catalog and garbage collection (`versions`), which know nothing of each other.
//!
//! ```text
//!   images/NAME/manifest/V            manifest_key: versions, create-only
//!   images/NAME/snapshots/SNAP        snapshot_key: a snapshot record
//!   images/NAME/segments/…            segments (SegmentRef keys are relative to images/NAME/)
//!   images/NAME/leases/STEM           an operation's lease on the segments it is uploading
//! ```

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use strata_bdev::{Error, ErrorKind, Result};

use crate::format::{self, Entry, Manifest, SnapshotRecord, FOOTER_LEN};
use crate::objects::{retry, ObjError, Objects};

/// A lease is refreshed this often while its operation uploads.
pub(crate) const LEASE_REFRESH: Duration = Duration::from_secs(60);
/// A lease not refreshed for this long is dead (its operation crashed or failed).
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(600);

pub(crate) fn manifest_key(name: &str, version: u64) -> String {
    format!("images/{name}/manifest/{version:020}")
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn obj_err(what: &str, e: ObjError) -> Error {
    Error::new(ErrorKind::Io, format!("{what}: object store: {e}"))
}

/// Check an image name: it becomes part of object keys and a directory name.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("image name {name:?}: use 1 to 200 of A-Z a-z 0-9 - _ . (not starting with .)"),
        ))
    }
}

/// The manifest versions of `name` in the store, oldest first.
pub(crate) async fn manifest_versions(objects: &dyn Objects, name: &str) -> Result<Vec<u64>> {
    let prefix = format!("images/{name}/manifest/");
    let keys = retry(
        objects,
        "list manifests",
        5,
        || false,
        || objects.list(&prefix),
    )
    .await
    .map_err(|e| obj_err(&format!("list versions of image {name}"), e))?;
    let mut v: Vec<u64> = keys
        .iter()
        .filter_map(|o| o.key.strip_prefix(&prefix)?.parse::<u64>().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Manifest `version` of `name`.
pub(crate) async fn read_manifest(
    objects: &dyn Objects,
    name: &str,
    version: u64,
) -> Result<Manifest> {
    let key = manifest_key(name, version);
    let bytes = retry(objects, "read manifest", 5, || false, || objects.get(&key))
        .await
        .map_err(|e| obj_err(&format!("read version {version} of image {name}"), e))?;
    Manifest::decode(&key, &bytes).map_err(|e| Error::new(ErrorKind::Io, e.to_string()))
}

/// The newest manifest of `name`, if the image exists.
pub(crate) async fn latest_manifest(objects: &dyn Objects, name: &str) -> Result<Option<Manifest>> {
    match manifest_versions(objects, name).await?.last() {
        None => Ok(None),
        Some(&v) => read_manifest(objects, name, v).await.map(Some),
    }
}

/// Clones of clones are followed this deep at most.
const MAX_CHAIN: usize = 32;

/// The manifests `manifest` reads through to: its base, its base's base, …, nearest first.
pub(crate) async fn base_chain(
    objects: &dyn Objects,
    manifest: &Manifest,
) -> Result<Vec<Manifest>> {
    let mut chain: Vec<Manifest> = Vec::new();
    let mut next = manifest.base.clone();
    while let Some(b) = next {
        if chain.len() >= MAX_CHAIN {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "image {}: clones are nested more than {MAX_CHAIN} deep; flatten one",
                    manifest.image
                ),
            ));
        }
        let m = read_manifest(objects, &b.image, b.version)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!(
                    "image {} is a clone of snapshot {}@{} (version {}), which cannot be read: {}",
                    manifest.image,
                    b.image,
                    b.snapshot,
                    b.version,
                    e.chain()
                ),
                )
            })?;
        next = m.base.clone();
        chain.push(m);
    }
    Ok(chain)
}

/// Read a segment's index: footer, then index, with ranged GETs.
pub(crate) async fn read_index(objects: &dyn Objects, key: &str, size: u64) -> Result<Vec<Entry>> {
    if size < FOOTER_LEN {
        return Err(Error::new(
            ErrorKind::Io,
            format!("segment {key}: only {size} bytes"),
        ));
    }
    let tail = retry(
        objects,
        "read segment footer",
        5,
        || false,
        || objects.get_range(key, size - FOOTER_LEN..size),
    )
    .await
    .map_err(|e| obj_err("read segment footer", e))?;
    let footer =
        format::parse_footer(key, &tail).map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
    let range = footer.index_range();
    if range.end > size - FOOTER_LEN {
        return Err(Error::new(
            ErrorKind::Io,
            format!("segment {key}: index beyond its end"),
        ));
    }
    let index = retry(
        objects,
        "read segment index",
        5,
        || false,
        || objects.get_range(key, range.clone()),
    )
    .await
    .map_err(|e| obj_err("read segment index", e))?;
    format::parse_index(key, &footer, &index).map_err(|e| Error::new(ErrorKind::Io, e.to_string()))
}

/// Check a size and page size for a new image (or a resize).
pub(crate) fn check_geometry(size: u64, bits: u32) -> Result<()> {
    if !(9..=16).contains(&bits) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("page size 2^{bits}: must be 512 bytes to 64 KiB"),
        ));
    }
    if size == 0 || !size.is_multiple_of(1u64 << bits) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "image size {size} must be a positive multiple of the page size {}",
                1u64 << bits
            ),
        ));
    }
    Ok(())
}

/// Publish version 1 of a new image; if someone created it meanwhile, theirs.
pub(crate) async fn create_manifest(objects: &dyn Objects, m: Manifest) -> Result<Manifest> {
    let key = manifest_key(&m.image, 1);
    match objects.put_create(&key, Bytes::from(m.encode())).await {
        Ok(()) => Ok(m),
        Err(ObjError::AlreadyExists(_)) => latest_manifest(objects, &m.image)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::Io, "image vanished")),
        Err(e) => Err(obj_err(&format!("create image {}", m.image), e)),
    }
}

pub(crate) fn snapshot_key(image: &str, snapshot: &str) -> String {
    format!("images/{image}/snapshots/{snapshot}")
}

pub(crate) fn not_found(what: String) -> Error {
    Error::new(ErrorKind::NotFound, what)
}

pub(crate) async fn get_record(
    objects: &dyn Objects,
    image: &str,
    snapshot: &str,
) -> Result<Option<SnapshotRecord>> {
    let key = snapshot_key(image, snapshot);
    match retry(objects, "read snapshot", 5, || false, || objects.get(&key)).await {
        Ok(b) => SnapshotRecord::decode(&key, &b)
            .map(Some)
            .map_err(|e| Error::new(ErrorKind::Io, e.to_string())),
        Err(ObjError::NotFound(_)) => Ok(None),
        Err(e) => Err(obj_err(&format!("read snapshot {image}@{snapshot}"), e)),
    }
}

/// The record of a snapshot that exists (not deleted).
pub(crate) async fn read_snapshot(
    objects: &dyn Objects,
    image: &str,
    snapshot: &str,
) -> Result<SnapshotRecord> {
    match get_record(objects, image, snapshot).await? {
        Some(r) if r.deleted.is_none() => Ok(r),
        _ => Err(not_found(format!(
            "no snapshot {image}@{snapshot} (strata snapshot list {image} shows them)"
        ))),
    }
}

/// Record snapshot `snapshot` of version `m` (O(1): nothing is copied).
pub(crate) async fn put_snapshot(
    objects: &dyn Objects,
    m: &Manifest,
    snapshot: &str,
) -> Result<SnapshotRecord> {
    check_name(snapshot)?;
    let rec = SnapshotRecord {
        image: m.image.clone(),
        snapshot: snapshot.to_string(),
        version: m.version,
        image_size: m.image_size,
        created: now_secs(),
        deleted: None,
    };
    let key = snapshot_key(&m.image, snapshot);
    let data = Bytes::from(rec.encode());
    match objects.put_create(&key, data.clone()).await {
        Ok(()) => Ok(rec),
        Err(ObjError::AlreadyExists(_)) => match get_record(objects, &m.image, snapshot).await? {
            // A deleted snapshot's name can be taken again.
            Some(old) if old.deleted.is_some() => {
                objects
                    .put(&key, data)
                    .await
                    .map_err(|e| obj_err(&format!("snapshot {}@{snapshot}", m.image), e))?;
                Ok(rec)
            }
            _ => Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "snapshot {}@{snapshot} exists already; pick another name or delete it first",
                    m.image
                ),
            )),
        },
        Err(e) => Err(obj_err(&format!("snapshot {}@{snapshot}", m.image), e)),
    }
}
