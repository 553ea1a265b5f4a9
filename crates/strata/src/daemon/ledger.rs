//! The daemon's state store for nexus records: one small TOML file per nexus volume in
//! `{data_dir}/state/`, replaced atomically (write a temporary file, fsync it, rename it over the
//! old one, fsync the directory) so that a crash leaves either the old record or the new one.
//!
//! ```toml
//! version = 42
//! size = 1073741824
//! granularity = 1048576
//!
//! [[child]]
//! name = "file:///var/lib/strata/m0.img?size=1G"
//! state = "online"
//!
//! [[child]]
//! name = "nbd://10.0.0.2:10809/m1"
//! state = "faulted"
//! reason = "write 4096 bytes at offset 8192 to: connection lost"
//! dirty = "0-63,512,700"      # granules it missed (here, of 1 MiB)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use strata_nexus::{ChildRecord, Ledger, NexusRecord, RecordedState};

/// Records of one nexus volume, kept in a file.
#[derive(Debug)]
pub struct FileLedger {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRecord {
    version: u64,
    size: u64,
    granularity: u64,
    #[serde(default, rename = "child")]
    children: Vec<FileChild>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileChild {
    name: String,
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Dirty granule runs, "a-b" (inclusive) or "a", comma-separated; absent: unknown (all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dirty: Option<String>,
}

fn format_runs(runs: &[(u64, u64)]) -> String {
    runs.iter()
        .map(|&(a, b)| {
            if b == a + 1 {
                a.to_string()
            } else {
                format!("{a}-{}", b - 1)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_runs(text: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut runs = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u64>(), b.trim().parse::<u64>()),
            None => (part.parse::<u64>(), part.parse::<u64>()),
        };
        match (a, b) {
            (Ok(a), Ok(b)) if a <= b && b < u64::MAX => runs.push((a, b + 1)),
            _ => bail!("dirty granules {part:?}: expected N or N-M with N <= M"),
        }
    }
    Ok(runs)
}

impl FileLedger {
    /// The ledger of nexus volume `volume` under `data_dir`.
    pub fn new(data_dir: &Path, volume: &str) -> FileLedger {
        // Volume names are export names: any bytes but '/' and NUL are kept readable; others
        // are escaped so that two names never share a file.
        let mut file = String::new();
        for c in volume.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => file.push(c),
                c => file.push_str(&format!("%{:X}", u32::from(c))),
            }
        }
        FileLedger {
            path: data_dir.join("state").join(format!("nexus-{file}.toml")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record last saved, if any.
    pub fn load(&self) -> anyhow::Result<Option<NexusRecord>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", self.path.display())),
        };
        let r: FileRecord = toml::from_str(&text).with_context(|| {
            format!(
                "parse nexus record {} (restore it from a backup, or remove it to make the \
                 first replica the source of a full rebuild of the others)",
                self.path.display()
            )
        })?;
        let mut children = Vec::new();
        for c in r.children {
            let state = match (c.state.as_str(), c.reason) {
                ("online", _) => RecordedState::Online,
                ("rebuilding", _) => RecordedState::Rebuilding,
                ("offline", _) => RecordedState::Offline,
                ("faulted", reason) => RecordedState::Faulted(reason.unwrap_or_default()),
                (other, _) => bail!(
                    "nexus record {}: child {:?} has unknown state {other:?}",
                    self.path.display(),
                    c.name
                ),
            };
            let dirty = c
                .dirty
                .as_deref()
                .map(parse_runs)
                .transpose()
                .with_context(|| {
                    format!("nexus record {}: child {:?}", self.path.display(), c.name)
                })?;
            children.push(ChildRecord {
                name: c.name,
                state,
                dirty,
            });
        }
        if r.granularity == 0 {
            bail!("nexus record {}: granularity is 0", self.path.display());
        }
        Ok(Some(NexusRecord {
            version: r.version,
            size: r.size,
            granularity: r.granularity,
            children,
        }))
    }

    fn write(&self, record: &NexusRecord) -> std::io::Result<()> {
        let file = FileRecord {
            version: record.version,
            size: record.size,
            granularity: record.granularity,
            children: record
                .children
                .iter()
                .map(|c| {
                    let (state, reason) = match &c.state {
                        RecordedState::Online => ("online", None),
                        RecordedState::Rebuilding => ("rebuilding", None),
                        RecordedState::Offline => ("offline", None),
                        RecordedState::Faulted(r) => ("faulted", Some(r.clone())),
                    };
                    FileChild {
                        name: c.name.clone(),
                        state: state.to_string(),
                        reason,
                        dirty: c.dirty.as_deref().map(format_runs),
                    }
                })
                .collect(),
        };
        let text = toml::to_string(&file).map_err(std::io::Error::other)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("toml.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(b"# Which replicas of this nexus hold current data. Written by strata.\n")?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[async_trait]
impl Ledger for FileLedger {
    async fn save(&self, record: &NexusRecord) -> std::io::Result<()> {
        let ledger = FileLedger {
            path: self.path.clone(),
        };
        let record = record.clone();
        tokio::task::spawn_blocking(move || ledger.write(&record))
            .await
            .map_err(std::io::Error::other)?
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_trip() {
        let runs = vec![(0, 64), (512, 513), (700, 702)];
        assert_eq!(format_runs(&runs), "0-63,512,700-701");
        assert_eq!(parse_runs("0-63,512,700-701").unwrap(), runs);
        assert_eq!(parse_runs("").unwrap(), vec![]);
        assert!(parse_runs("5-3").is_err());
        assert!(parse_runs("x").is_err());
    }

    #[tokio::test]
    async fn records_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = FileLedger::new(dir.path(), "my vol/1");
        assert!(ledger.path().ends_with("state/nexus-my%20vol%2F1.toml"));
        assert_eq!(ledger.load().unwrap(), None);
        let record = NexusRecord {
            version: 9,
            size: 1 << 30,
            granularity: 1 << 20,
            children: vec![
                ChildRecord {
                    name: "file:///a?size=1G".into(),
                    state: RecordedState::Online,
                    dirty: None,
                },
                ChildRecord {
                    name: "nbd://127.0.0.1:1/b".into(),
                    state: RecordedState::Faulted("write: \"lost\"\nconnection".into()),
                    dirty: Some(vec![(0, 64), (512, 513)]),
                },
                ChildRecord {
                    name: "mem://c".into(),
                    state: RecordedState::Rebuilding,
                    dirty: None,
                },
            ],
        };
        ledger.save(&record).await.unwrap();
        assert_eq!(ledger.load().unwrap(), Some(record));
        std::fs::write(ledger.path(), "version = 1\nsize = 2\n").unwrap();
        let e = format!("{:#}", ledger.load().unwrap_err());
        assert!(
            e.contains("remove it to make the first replica the source"),
            "{e}"
        );
    }
}
