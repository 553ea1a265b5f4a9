//! The page store's tunables, as a configuration file spells them (the daemon's `[pagestore]`
//! table): sizes as bytes or with a unit (`"64M"`), durations as seconds or with a unit
//! (`"30s"`, `"500ms"`, `"5m"`), both through [`strata_bdev::units`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Tunables of the page store.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where write buffers live, on a local disk. Read by whoever builds a
    /// [`PageStore`](crate::PageStore) (the daemon: default `{data_dir}/buffer`); a `PageStore`
    /// itself uses its own `buffer_dir`.
    pub buffer_dir: Option<PathBuf>,
    /// Checkpoint when the active write-buffer generation holds this many bytes (default 64 MiB).
    #[serde(with = "strata_bdev::units::size")]
    pub checkpoint_bytes: u64,
    /// Checkpoint buffered writes at least this often (default 30 s).
    #[serde(rename = "checkpoint_secs", with = "strata_bdev::units::secs")]
    pub checkpoint_age: Duration,
    /// Largest segment object, in bytes of page data (default 32 MiB).
    #[serde(with = "strata_bdev::units::size")]
    pub segment_bytes: u64,
    /// Writes wait while the write buffer holds more than this (default 2 GiB). A generation
    /// frozen while the checkpointer is behind is uploaded only for the pages not rewritten
    /// since, so a buffer larger than what is being rewritten lets the checkpointer catch up.
    #[serde(with = "strata_bdev::units::size")]
    pub max_buffered_bytes: u64,
    /// Compact when an image has more segments than this (default 24).
    pub max_segments: usize,
    /// Bytes of segment data cached in memory, per image (default 64 MiB).
    #[serde(with = "strata_bdev::units::size")]
    pub cache_bytes: u64,
    /// The unit of the read cache and of reads from segments: a miss fetches the aligned block
    /// of this many bytes around it (default 64 KiB; at least one page).
    #[serde(rename = "cache_block", with = "strata_bdev::units::size")]
    pub cache_block_bytes: u64,
    /// Bytes of segment data cached in a local file, per image (default 0: no disk tier).
    #[serde(with = "strata_bdev::units::size")]
    pub disk_cache_bytes: u64,
    /// Directory of the disk tier's files (`NAME.cache`); default: the image's write-buffer
    /// directory.
    pub disk_cache_dir: Option<PathBuf>,
    /// A transaction open longer than this is rolled back (default 60 s); it bounds how long
    /// one holds the image's write lock.
    #[serde(rename = "txn_timeout_secs", with = "strata_bdev::units::secs")]
    pub txn_timeout: Duration,
    /// Bytes a transaction may write before it commits (default 64 MiB).
    #[serde(with = "strata_bdev::units::size")]
    pub max_txn_bytes: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            buffer_dir: None,
            checkpoint_bytes: 64 << 20,
            checkpoint_age: Duration::from_secs(30),
            segment_bytes: 32 << 20,
            max_buffered_bytes: 2 << 30,
            max_segments: 24,
            cache_bytes: 64 << 20,
            cache_block_bytes: 64 << 10,
            disk_cache_bytes: 0,
            disk_cache_dir: None,
            txn_timeout: Duration::from_secs(60),
            max_txn_bytes: 64 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        pagestore: Settings,
    }

    fn parse(text: &str) -> Result<Settings, String> {
        toml::from_str::<Doc>(text)
            .map(|d| d.pagestore)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sizes_and_durations_as_people_write_them() {
        let s = parse(
            r#"
            [pagestore]
            checkpoint_bytes = "1M"
            checkpoint_secs = 5
            segment_bytes = 524288
            cache_block = "16K"
            txn_timeout_secs = "90s"
            disk_cache_dir = "/var/cache/strata"
            "#,
        )
        .unwrap();
        assert_eq!(s.checkpoint_bytes, 1 << 20);
        assert_eq!(s.checkpoint_age, Duration::from_secs(5));
        assert_eq!(s.segment_bytes, 512 << 10);
        assert_eq!(s.cache_block_bytes, 16 << 10);
        assert_eq!(s.txn_timeout, Duration::from_secs(90));
        assert_eq!(s.disk_cache_dir, Some(PathBuf::from("/var/cache/strata")));
        // Everything not written keeps its default.
        assert_eq!(s.max_segments, Settings::default().max_segments);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let e = parse("[pagestore]\ncache_block_bytes = \"64K\"").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        let e = parse("[pagestore]\ncache_bytes = \"64Q\"").unwrap_err();
        assert!(e.contains("unit"), "{e}");
        let e = parse("[pagestore]\ncheckpoint_secs = \"5 fortnights\"").unwrap_err();
        assert!(e.contains("duration unit"), "{e}");
    }
}
