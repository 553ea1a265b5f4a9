//! The page-store tests' kit: a directory object store, small tunables, pages that say which
//! write they are.
#![allow(dead_code)] // each test file uses its own share
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use strata_bdev::{BlockDevice, Bytes, WriteOpts};
use strata_pagestore::{Image, Objects, PageStore, Settings, Store, StoreConfig};

pub const PS: usize = 4096;

/// The directory object store under `root`.
pub fn dir_objects(root: &Path) -> Arc<dyn Objects> {
    Arc::new(
        Store::open(&StoreConfig::Dir {
            path: root.join("objects"),
        })
        .unwrap(),
    )
}

/// A page store on the directory store under `root`, with its write buffers in `root/buffer`.
pub fn store(root: &Path, buffer: &str, settings: Settings) -> PageStore {
    PageStore {
        objects: dir_objects(root),
        buffer_dir: root.join(buffer),
        settings,
    }
}

/// Tunables that make checkpoints, segments and compactions happen within a few MiB.
pub fn small() -> Settings {
    Settings {
        checkpoint_bytes: 256 * 1024,
        checkpoint_age: Duration::from_secs(3600),
        segment_bytes: 128 * 1024,
        max_buffered_bytes: 64 << 20,
        max_segments: 6,
        cache_bytes: 1 << 20,
        ..Settings::default()
    }
}

/// GET requests the image's object store has served.
pub fn gets(img: &Image) -> u64 {
    img.store_stats().counts()[0]
}

/// A page derived from `seed`.
pub fn page(seed: u8) -> Bytes {
    Bytes::from((0..PS).map(|i| seed ^ (i as u8)).collect::<Vec<u8>>())
}

pub fn zeroes() -> Bytes {
    Bytes::from(vec![0u8; PS])
}

pub async fn write(img: &Image, p: u64, seed: u8) {
    img.write_at(p * PS as u64, page(seed), WriteOpts::default())
        .await
        .unwrap();
}

pub async fn read(img: &Image, p: u64) -> Bytes {
    img.read_at(p * PS as u64, PS).await.unwrap()
}
