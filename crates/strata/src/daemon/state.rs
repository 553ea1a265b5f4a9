//! Where the daemon keeps its desired state (the volumes created through the API, the last
//! applied spec): behind [`StateStore`], an embedded file store by default.
//!
//! Keys are `/`-separated paths of names made of `[A-Za-z0-9._-]` (`volumes/db`, `spec`);
//! values are opaque bytes (JSON in practice). Every write is durable when it returns.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// Why a state store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store cannot be reached now; existing volumes keep serving, changes wait.
    #[error("state store {store} is unavailable: {reason}")]
    Unavailable { store: String, reason: String },
    /// Anything else (a corrupt value, a full disk).
    #[error("state store {store}: {reason}")]
    Failed { store: String, reason: String },
}

pub type StateResult<T> = Result<T, StateError>;

/// A small durable key-value store.
#[async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Where it is, for people: `file:///…`, `etcd://…`.
    fn describe(&self) -> String;
    async fn get(&self, key: &str) -> StateResult<Option<Vec<u8>>>;
    /// Store `value` under `key`, durably.
    async fn put(&self, key: &str, value: &[u8]) -> StateResult<()>;
    /// Remove `key` (no error if it is absent).
    async fn delete(&self, key: &str) -> StateResult<()>;
    /// Every key under `prefix` (ending in `/`) with its value, sorted by key.
    async fn list(&self, prefix: &str) -> StateResult<Vec<(String, Vec<u8>)>>;
    /// Whether it can be reached now (cheap; used to report health).
    async fn available(&self) -> bool;
}

/// Check a key's syntax, so that keys map onto file names safely.
pub fn check_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "state key {key:?}: use /-separated names of letters, digits, . _ -"
        ))
    }
}

/// One file per key under a directory; each write goes to a temporary file that is fsync'ed,
/// renamed over the old one, and whose directory is fsync'ed, so a crash leaves the old value
/// or the new one, never a mix.
#[derive(Debug)]
pub struct FileStateStore {
    dir: PathBuf,
}

impl FileStateStore {
    pub fn open(dir: &Path) -> std::io::Result<FileStateStore> {
        std::fs::create_dir_all(dir)?;
        Ok(FileStateStore {
            dir: dir.to_path_buf(),
        })
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> StateError {
        StateError::Failed {
            store: self.describe(),
            reason: format!("{what}: {e}"),
        }
    }

    fn path(&self, key: &str) -> StateResult<PathBuf> {
        check_key(key).map_err(|e| self.fail("bad key", e))?;
        Ok(self.dir.join(key))
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait]
impl StateStore for FileStateStore {
    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    async fn get(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.fail(&format!("read {}", path.display()), e)),
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> StateResult<()> {
        let path = self.path(key)?;
        let value = value.to_vec();
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let parent = path.parent().expect("keys live under the store directory");
            std::fs::create_dir_all(parent)?;
            let tmp = path.with_extension("tmp~");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&value)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(parent)
        })
        .await
        .map_err(|e| self.fail("write", e))?;
        r.map_err(|e| self.fail(&format!("write {key}"), e))
    }

    async fn delete(&self, key: &str) -> StateResult<()> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {
                let parent = path
                    .parent()
                    .expect("keys live under the store directory")
                    .to_path_buf();
                tokio::task::spawn_blocking(move || sync_dir(&parent))
                    .await
                    .map_err(|e| self.fail("delete", e))?
                    .map_err(|e| self.fail(&format!("delete {key}"), e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.fail(&format!("delete {key}"), e)),
        }
    }

    async fn list(&self, prefix: &str) -> StateResult<Vec<(String, Vec<u8>)>> {
        let dir_key = prefix.trim_end_matches('/');
        let dir = self.path(dir_key)?;
        let mut entries = match std::fs::read_dir(&dir) {
            Ok(e) => e
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| check_key(n).is_ok() && !n.ends_with("tmp~"))
                .collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(self.fail(&format!("list {}", dir.display()), e)),
        };
        entries.sort();
        let mut out = Vec::new();
        for name in entries {
            let key = format!("{dir_key}/{name}");
            if self.path(&key)?.is_dir() {
                continue;
            }
            if let Some(v) = self.get(&key).await? {
                out.push((key, v));
            }
        }
        Ok(out)
    }

    async fn available(&self) -> bool {
        true
    }
}

/// How long one etcd request may take before the store counts as unavailable.
const ETCD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Keys under a prefix in etcd (v3 gRPC API), so that several daemons share one cluster's
/// state. Every call has a deadline; a daemon that cannot reach etcd reports it unavailable,
/// keeps serving what it has open, and refuses changes until etcd answers again.
#[derive(Debug, Clone)]
pub struct EtcdStateStore {
    endpoints: Vec<String>,
    prefix: String,
    kv: strata_api::etcd::kv_client::KvClient<tonic::transport::Channel>,
}

impl EtcdStateStore {
    /// `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`. Connections are made on first use, so a daemon
    /// starts while etcd is down.
    pub fn new(uri: &str) -> Result<EtcdStateStore, String> {
        let rest = uri
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("state store {uri:?}: expected etcd://HOST:PORT/PREFIX"))?;
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, "strata"));
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Err(format!(
                "state store {uri:?}: give a key prefix, e.g. etcd://127.0.0.1:2379/strata"
            ));
        }
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(format!("state store {uri:?}: no etcd endpoint"));
        }
        let mut eps = Vec::new();
        for e in &endpoints {
            eps.push(
                tonic::transport::Endpoint::from_shared(e.clone())
                    .map_err(|err| format!("state store {uri:?}: {e}: {err}"))?
                    .connect_timeout(ETCD_TIMEOUT)
                    .timeout(ETCD_TIMEOUT),
            );
        }
        let channel = tonic::transport::Channel::balance_list(eps.into_iter());
        Ok(EtcdStateStore {
            endpoints,
            prefix: format!("/{prefix}/"),
            kv: strata_api::etcd::kv_client::KvClient::new(channel),
        })
    }

    fn full(&self, key: &str) -> StateResult<Vec<u8>> {
        check_key(key).map_err(|reason| StateError::Failed {
            store: self.describe(),
            reason,
        })?;
        Ok(format!("{}{key}", self.prefix).into_bytes())
    }

    fn fail(&self, what: &str, s: tonic::Status) -> StateError {
        use tonic::Code;
        let reason = format!("{what}: {}", s.message());
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                StateError::Unavailable {
                    store: self.describe(),
                    reason,
                }
            }
            _ => StateError::Failed {
                store: self.describe(),
                reason,
            },
        }
    }
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[async_trait]
impl StateStore for EtcdStateStore {
    fn describe(&self) -> String {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        format!(
            "etcd://{}/{}",
            hosts.join(","),
            self.prefix.trim_matches('/')
        )
    }

    async fn get(&self, key: &str) -> StateResult<Option<Vec<u8>>> {
        use strata_api::etcd::RangeRequest;
        let r = self
            .kv
            .clone()
            .range(RangeRequest {
                key: self.full(key)?,
                ..Default::default()
            })
            .await
            .map_err(|s| self.fail(&format!("read {key}"), s))?;
        Ok(r.into_inner().kvs.into_iter().next().map(|kv| kv.value))
    }

    async fn put(&self, key: &str, value: &[u8]) -> StateResult<()> {
        use strata_api::etcd::PutRequest;
        self.kv
            .clone()
            .put(PutRequest {
                key: self.full(key)?,
                value: value.to_vec(),
                lease: 0,
            })
            .await
            .map_err(|s| self.fail(&format!("write {key}"), s))?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> StateResult<()> {
        use strata_api::etcd::DeleteRangeRequest;
        self.kv
            .clone()
            .delete_range(DeleteRangeRequest {
                key: self.full(key)?,
                range_end: Vec::new(),
            })
            .await
            .map_err(|s| self.fail(&format!("delete {key}"), s))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> StateResult<Vec<(String, Vec<u8>)>> {
        use strata_api::etcd::RangeRequest;
        let dir = prefix.trim_end_matches('/');
        let start = format!("{}/", String::from_utf8_lossy(&self.full(dir)?)).into_bytes();
        let r = self
            .kv
            .clone()
            .range(RangeRequest {
                range_end: prefix_end(&start),
                key: start,
                ..Default::default()
            })
            .await
            .map_err(|s| self.fail(&format!("list {prefix}"), s))?;
        let mut out: Vec<(String, Vec<u8>)> = r
            .into_inner()
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let key = String::from_utf8(kv.key).ok()?;
                let rel = key.strip_prefix(&self.prefix)?.to_string();
                // Direct children only, as the file store lists them.
                (rel[dir.len() + 1..].find('/').is_none()).then_some((rel, kv.value))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    async fn available(&self) -> bool {
        use strata_api::etcd::RangeRequest;
        let mut kv = self.kv.clone();
        let probe = kv.range(RangeRequest {
            key: self.prefix.clone().into_bytes(),
            limit: 1,
            ..Default::default()
        });
        matches!(tokio::time::timeout(ETCD_TIMEOUT, probe).await, Ok(Ok(_)))
    }
}

/// The state store a `[state] store` setting names: `file` (the default, under the data
/// directory) or `etcd://…`.
pub fn open(
    setting: Option<&str>,
    data_dir: &Path,
) -> anyhow::Result<std::sync::Arc<dyn StateStore>> {
    use anyhow::Context;
    match setting {
        None | Some("file") => {
            let dir = data_dir.join("state");
            let s = FileStateStore::open(&dir)
                .with_context(|| format!("open the state store {}", dir.display()))?;
            Ok(std::sync::Arc::new(s))
        }
        Some(uri) if uri.starts_with("etcd://") => Ok(std::sync::Arc::new(
            EtcdStateStore::new(uri).map_err(|e| anyhow::anyhow!(e))?,
        )),
        Some(other) => {
            anyhow::bail!("[state] store = {other:?}: use \"file\" or etcd://HOST:PORT/PREFIX")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn file_store_puts_lists_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStateStore::open(dir.path()).unwrap();
        assert_eq!(s.get("volumes/a").await.unwrap(), None);
        s.put("volumes/b", b"2").await.unwrap();
        s.put("volumes/a", b"1").await.unwrap();
        s.put("spec", b"x").await.unwrap();
        s.put("volumes/a", b"one").await.unwrap();
        let l = s.list("volumes/").await.unwrap();
        assert_eq!(
            l,
            vec![
                ("volumes/a".to_string(), b"one".to_vec()),
                ("volumes/b".to_string(), b"2".to_vec())
            ]
        );
        s.delete("volumes/a").await.unwrap();
        s.delete("volumes/a").await.unwrap();
        assert_eq!(s.list("volumes/").await.unwrap().len(), 1);
        // Reopened, it holds the same.
        let s = FileStateStore::open(dir.path()).unwrap();
        assert_eq!(s.get("spec").await.unwrap(), Some(b"x".to_vec()));
        assert!(s.put("../escape", b"").await.is_err());
        assert!(s.put("volumes/", b"").await.is_err());
    }

    #[test]
    fn etcd_uris_and_prefix_ranges() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let s = EtcdStateStore::new("etcd://127.0.0.1:2379,127.0.0.1:2380/strata/c1").unwrap();
        assert_eq!(
            s.describe(),
            "etcd://127.0.0.1:2379,127.0.0.1:2380/strata/c1"
        );
        assert!(EtcdStateStore::new("etcd://127.0.0.1:2379/").is_err());
        assert!(EtcdStateStore::new("http://x").is_err());
    }
}
