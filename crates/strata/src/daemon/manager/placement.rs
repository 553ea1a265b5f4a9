//! Placement: where the replicas of a volume declared with a replica count (rather than URIs)
//! go. On one node they are files in the configured `[[pool]]` directories — one per pool while
//! there are enough pools, the pools with the most free space first — or in
//! `{data_dir}/replicas` when none is configured. The daemon creates them (sparse, or with every
//! block allocated), owns them, and deletes them when the volume or the replica goes.
//!
//! A cluster extends this file: a replica on another node is a device carved from that node's
//! pool and exported to the nexus owner; the rest of the manager sees only URIs.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{info, warn};

use super::{Manager, OpError, OpKind, OpResult, Pool};

/// A pool and the space of the filesystem it is on.
#[derive(Debug, Clone)]
pub struct PoolSpace {
    pub name: String,
    pub path: PathBuf,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// Total and free bytes of the filesystem holding `path`.
fn space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

/// File names differ even for replicas of volumes of the same name made in the same instant.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

impl Manager {
    /// The pools placed replicas go to: the configured ones, else `{data_dir}/replicas`.
    fn placement_pools(&self) -> Vec<Pool> {
        if self.pools.is_empty() {
            vec![Pool {
                name: "data_dir".into(),
                path: self.data_dir.join("replicas"),
            }]
        } else {
            self.pools.clone()
        }
    }

    /// The pools with their space.
    pub fn pool_space(&self) -> Vec<PoolSpace> {
        self.placement_pools()
            .into_iter()
            .map(|p| {
                let (total_bytes, free_bytes) = space(&p.path)
                    .or_else(|| p.path.parent().and_then(space))
                    .unwrap_or((0, 0));
                PoolSpace {
                    name: p.name,
                    path: p.path,
                    total_bytes,
                    free_bytes,
                }
            })
            .collect()
    }

    /// Create `count` replica files of `size` bytes for volume `volume`, in distinct pools while
    /// there are enough, avoiding the pools of `taken` (existing replicas' URIs) first; their
    /// URIs. On failure, the files made so far are removed.
    pub(super) fn place(
        &self,
        volume: &str,
        size: u64,
        count: u32,
        preallocate: bool,
        taken: &[String],
    ) -> OpResult<Vec<String>> {
        let mut pools = self.pool_space();
        // Most free space first; pools already holding a replica of this volume last.
        let used = |p: &PoolSpace| {
            taken
                .iter()
                .filter(|u| placed_path(u).is_some_and(|f| f.parent() == Some(p.path.as_path())))
                .count()
        };
        pools.sort_by_key(|p| (used(p), std::cmp::Reverse(p.free_bytes)));
        let mut made: Vec<PathBuf> = Vec::new();
        for i in 0..count as usize {
            let pool = &pools[i % pools.len()];
            match create_replica(&pool.path, volume, size, preallocate) {
                Ok(path) => made.push(path),
                Err(e) => {
                    for f in &made {
                        let _ = std::fs::remove_file(f);
                    }
                    return Err(e);
                }
            }
        }
        info!(volume, count, size, "replicas placed");
        Ok(made
            .iter()
            .map(|p| format!("file://{}", p.display()))
            .collect())
    }

    /// Delete replica files the daemon placed (those inside its pools; other URIs are left).
    pub(super) fn unplace(&self, uris: &[String]) {
        let pools: Vec<PathBuf> = self
            .placement_pools()
            .iter()
            .filter_map(|p| std::fs::canonicalize(&p.path).ok())
            .collect();
        for uri in uris {
            let Some(path) = placed_path(uri) else {
                continue;
            };
            let inside = path
                .parent()
                .and_then(|d| std::fs::canonicalize(d).ok())
                .is_some_and(|d| pools.contains(&d));
            if !inside {
                warn!(replica = %uri, "not in a pool: left in place");
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => info!(replica = %uri, "placed replica deleted"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(replica = %uri, error = %e, "delete a placed replica"),
            }
        }
    }
}

/// The file of a placed replica's URI (`file:///path`).
fn placed_path(uri: &str) -> Option<PathBuf> {
    let path = uri.strip_prefix("file://")?;
    let path = path.split('?').next()?;
    path.starts_with('/').then(|| PathBuf::from(path))
}

/// Create a new replica file (never an existing one: a replica must start as zeroes).
fn create_replica(dir: &Path, volume: &str, size: u64, preallocate: bool) -> OpResult<PathBuf> {
    let fail = |what: &str, e: std::io::Error| {
        let kind = if e.raw_os_error() == Some(libc::ENOSPC) {
            OpKind::Unavailable
        } else {
            OpKind::Internal
        };
        OpError::new(kind, format!("place a replica of {volume:?}: {what}: {e}"))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(&format!("create {}", dir.display()), e))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{volume}.{stamp:x}{seq:x}.img"));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| fail(&format!("create {}", path.display()), e))?;
    let sized = if preallocate {
        let len = i64::try_from(size).map_err(|_| {
            OpError::invalid(format!("size {size} is too large for a replica file"))
        })?;
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for writing for the duration of the call.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
            0 => Ok(()),
            errno => Err(std::io::Error::from_raw_os_error(errno)),
        }
    } else {
        file.set_len(size)
    };
    if let Err(e) = sized {
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(fail(
            &format!("allocate {size} bytes in {}", path.display()),
            e,
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replica_files_are_new_sized_and_parsed_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = create_replica(dir.path(), "v", 1 << 20, false).unwrap();
        let b = create_replica(dir.path(), "v", 1 << 20, true).unwrap();
        assert_ne!(a, b);
        assert_eq!(std::fs::metadata(&a).unwrap().len(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        // Preallocated: every block is there.
        assert!(std::fs::metadata(&b).unwrap().blocks() * 512 >= 1 << 20);
        let uri = format!("file://{}", a.display());
        assert_eq!(placed_path(&uri).unwrap(), a);
        assert!(placed_path("mem://x").is_none());
    }
}
