//! The page store's tunables, as a configuration file spells them (the daemon's `[pagestore]`
//! table): sizes as bytes or with a unit (`"64M"`), durations as seconds or with a unit
//! (`"30s"`, `"500ms"`, `"5m"`).

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
    #[serde(with = "size")]
    pub checkpoint_bytes: u64,
    /// Checkpoint buffered writes at least this often (default 30 s).
    #[serde(rename = "checkpoint_secs", with = "duration")]
    pub checkpoint_age: Duration,
    /// Largest segment object, in bytes of page data (default 32 MiB).
    #[serde(with = "size")]
    pub segment_bytes: u64,
    /// Writes wait while the write buffer holds more than this (default 2 GiB). A generation
    /// frozen while the checkpointer is behind is uploaded only for the pages not rewritten
    /// since, so a buffer larger than what is being rewritten lets the checkpointer catch up.
    #[serde(with = "size")]
    pub max_buffered_bytes: u64,
    /// Compact when an image has more segments than this (default 24).
    pub max_segments: usize,
    /// Bytes of segment data cached in memory, per image (default 64 MiB).
    #[serde(with = "size")]
    pub cache_bytes: u64,
    /// The unit of the read cache and of reads from segments: a miss fetches the aligned block
    /// of this many bytes around it (default 64 KiB; at least one page).
    #[serde(rename = "cache_block", with = "size")]
    pub cache_block_bytes: u64,
    /// Bytes of segment data cached in a local file, per image (default 0: no disk tier).
    #[serde(with = "size")]
    pub disk_cache_bytes: u64,
    /// Directory of the disk tier's files (`NAME.cache`); default: the image's write-buffer
    /// directory.
    pub disk_cache_dir: Option<PathBuf>,
    /// A transaction open longer than this is rolled back (default 60 s); it bounds how long
    /// one holds the image's write lock.
    #[serde(rename = "txn_timeout_secs", with = "duration")]
    pub txn_timeout: Duration,
    /// Bytes a transaction may write before it commits (default 64 MiB).
    #[serde(with = "size")]
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

/// A number, or text: what a size or a duration may be written as.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Int(u64),
    Float(f64),
    Text(String),
}

/// Sizes: a number of bytes, or text with a unit (`"64K"`, `"1G"`; see
/// [`strata_bdev::parse_size`]).
pub mod size {
    use serde::{Deserialize, Deserializer};

    use super::NumberOrText;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Int(n) => Ok(n),
            NumberOrText::Float(f) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => {
                Ok(f as u64)
            }
            NumberOrText::Float(f) => Err(serde::de::Error::custom(format!(
                "{f} is not a size in bytes"
            ))),
            NumberOrText::Text(t) => strata_bdev::parse_size(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Durations: a number of seconds, or text with a unit (`"500ms"`, `"30s"`, `"5m"`, `"1h"`).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    use super::NumberOrText;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = |f: f64| {
            Duration::try_from_secs_f64(f)
                .map_err(|_| serde::de::Error::custom(format!("{f} is not a duration in seconds")))
        };
        match NumberOrText::deserialize(d)? {
            NumberOrText::Int(n) => Ok(Duration::from_secs(n)),
            NumberOrText::Float(f) => secs(f),
            NumberOrText::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }

    /// Parse `"250ms"`, `"30s"`, `"5m"`, `"1h"`, or a plain number of seconds.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(end);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration such as 30, \"500ms\" or \"5m\""))?;
        let scale = match unit.trim() {
            "" | "s" | "sec" | "secs" => 1.0,
            "ms" => 1e-3,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} (use ms, s, m or h)"
                ))
            }
        };
        Duration::try_from_secs_f64(n * scale).map_err(|_| format!("{s:?} is out of range"))
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
        assert_eq!(
            duration::parse("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration::parse("2m").unwrap(), Duration::from_secs(120));
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
