//! The read cache: blocks of segment data (a fixed-size, aligned range of a segment object)
//! kept in memory and, optionally, in a local file.
//!
//! Both tiers evict the least recently used block. Neither is trusted: every page served from
//! a cached block is checked against the checksum its segment index gave, and a block that
//! fails is dropped and fetched again from the object store.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

/// A cached block: segment id and block number within the segment.
pub type BlockKey = (u32, u32);

/// Least-recently-used bookkeeping shared by both tiers.
#[derive(Debug)]
struct Lru<V> {
    tick: u64,
    entries: HashMap<BlockKey, (V, u64)>,
    /// Use tick → key, oldest first.
    order: BTreeMap<u64, BlockKey>,
}

impl<V: Clone> Lru<V> {
    fn new() -> Lru<V> {
        Lru {
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn get(&mut self, key: BlockKey) -> Option<V> {
        let (v, t) = self.entries.get_mut(&key)?;
        self.order.remove(t);
        self.tick += 1;
        *t = self.tick;
        self.order.insert(self.tick, key);
        Some(v.clone())
    }

    fn insert(&mut self, key: BlockKey, v: V) -> Option<V> {
        let old = self.remove(key);
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.entries.insert(key, (v, self.tick));
        old
    }

    fn remove(&mut self, key: BlockKey) -> Option<V> {
        let (v, t) = self.entries.remove(&key)?;
        self.order.remove(&t);
        Some(v)
    }

    fn pop_oldest(&mut self) -> Option<V> {
        let (_, key) = self.order.pop_first()?;
        self.entries.remove(&key).map(|(v, _)| v)
    }

    fn keys_where(&self, gone: impl Fn(u32) -> bool) -> Vec<BlockKey> {
        self.entries.keys().copied().filter(|k| gone(k.0)).collect()
    }
}

/// Blocks in memory, bounded in bytes.
#[derive(Debug)]
pub struct Cache {
    capacity: u64,
    used: u64,
    lru: Lru<Bytes>,
}

impl Cache {
    pub fn new(capacity: u64) -> Cache {
        Cache {
            capacity,
            used: 0,
            lru: Lru::new(),
        }
    }

    pub fn get(&mut self, key: BlockKey) -> Option<Bytes> {
        self.lru.get(key)
    }

    /// Whether the block is cached (without counting as a use).
    pub fn contains(&self, key: BlockKey) -> bool {
        self.lru.entries.contains_key(&key)
    }

    pub fn put(&mut self, key: BlockKey, b: Bytes) {
        let len = b.len() as u64;
        if len > self.capacity {
            return;
        }
        if let Some(old) = self.lru.remove(key) {
            self.used -= old.len() as u64;
        }
        while self.used + len > self.capacity {
            let Some(old) = self.lru.pop_oldest() else {
                break;
            };
            self.used -= old.len() as u64;
        }
        self.lru.insert(key, b);
        self.used += len;
    }

    pub fn remove(&mut self, key: BlockKey) {
        if let Some(old) = self.lru.remove(key) {
            self.used -= old.len() as u64;
        }
    }

    /// Drop every block of the segments `gone` selects.
    pub fn forget(&mut self, gone: impl Fn(u32) -> bool) {
        for k in self.lru.keys_where(gone) {
            self.remove(k);
        }
    }
}

/// Where a block lives in the cache file, and how long it is.
#[derive(Debug, Clone, Copy)]
struct Slot {
    index: u32,
    len: u32,
}

#[derive(Debug)]
struct DiskMap {
    lru: Lru<Slot>,
    free: Vec<u32>,
}

/// Blocks in a local file of `capacity` bytes, in slots of one block each. The file is made
/// empty when the image opens: segment ids are not stable across opens.
#[derive(Debug)]
pub struct DiskCache {
    path: PathBuf,
    file: File,
    block: u64,
    map: Mutex<DiskMap>,
    warned: AtomicBool,
}

impl DiskCache {
    pub fn open(path: &Path, capacity: u64, block: u64) -> std::io::Result<DiskCache> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let slots = (capacity / block).min(u64::from(u32::MAX)) as u32;
        Ok(DiskCache {
            path: path.to_path_buf(),
            file,
            block,
            map: Mutex::new(DiskMap {
                lru: Lru::new(),
                free: (0..slots).rev().collect(),
            }),
            warned: AtomicBool::new(false),
        })
    }

    pub fn get(&self, key: BlockKey) -> Option<Bytes> {
        let slot = self.map.lock().expect("lock").lru.get(key)?;
        let mut buf = vec![0u8; slot.len as usize];
        match self
            .file
            .read_exact_at(&mut buf, u64::from(slot.index) * self.block)
        {
            Ok(()) => Some(Bytes::from(buf)),
            Err(e) => {
                self.warn(&e);
                self.remove(key);
                None
            }
        }
    }

    /// Keep a block. A failed write (a full disk) only means the block is not kept.
    pub fn put(&self, key: BlockKey, b: &[u8]) {
        if b.len() as u64 > self.block {
            return;
        }
        let index = {
            let mut m = self.map.lock().expect("lock");
            if let Some(old) = m.lru.remove(key) {
                m.free.push(old.index);
            }
            match m.free.pop() {
                Some(i) => i,
                None => match m.lru.pop_oldest() {
                    Some(s) => s.index,
                    None => return,
                },
            }
        };
        // The slot is in no map while it is written, so no reader sees it half done.
        let mut m = match self.file.write_all_at(b, u64::from(index) * self.block) {
            Ok(()) => self.map.lock().expect("lock"),
            Err(e) => {
                self.warn(&e);
                self.map.lock().expect("lock").free.push(index);
                return;
            }
        };
        let slot = Slot {
            index,
            len: b.len() as u32,
        };
        if let Some(old) = m.lru.insert(key, slot) {
            m.free.push(old.index);
        }
    }

    pub fn remove(&self, key: BlockKey) {
        let mut m = self.map.lock().expect("lock");
        if let Some(old) = m.lru.remove(key) {
            m.free.push(old.index);
        }
    }

    pub fn forget(&self, gone: impl Fn(u32) -> bool) {
        let mut m = self.map.lock().expect("lock");
        for k in m.lru.keys_where(gone) {
            if let Some(old) = m.lru.remove(k) {
                m.free.push(old.index);
            }
        }
    }

    fn warn(&self, e: &std::io::Error) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                file = %self.path.display(),
                error = %e,
                "read cache file failed; blocks are fetched from the object store instead"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_evicts_least_recently_used() {
        let mut c = Cache::new(8);
        c.put((0, 0), Bytes::from_static(b"aaaa"));
        c.put((0, 1), Bytes::from_static(b"bbbb"));
        assert!(c.get((0, 0)).is_some());
        c.put((0, 2), Bytes::from_static(b"cccc"));
        assert!(c.get((0, 1)).is_none(), "the least recently used went");
        assert!(c.get((0, 0)).is_some() && c.get((0, 2)).is_some());
        c.forget(|s| s == 0);
        assert!(c.get((0, 0)).is_none());
        assert_eq!(c.used, 0);
    }

    #[test]
    fn disk_keeps_blocks_and_reuses_slots() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskCache::open(&dir.path().join("c"), 8, 4).unwrap();
        d.put((1, 0), b"aaaa");
        d.put((1, 1), b"bb");
        assert_eq!(d.get((1, 0)).unwrap(), &b"aaaa"[..]);
        d.put((2, 0), b"cccc");
        assert!(d.get((1, 1)).is_none(), "the least recently used went");
        assert_eq!(d.get((1, 0)).unwrap(), &b"aaaa"[..]);
        assert_eq!(d.get((2, 0)).unwrap(), &b"cccc"[..]);
        d.forget(|s| s == 1);
        assert!(d.get((1, 0)).is_none());
        d.put((3, 0), b"dddd");
        assert_eq!(d.get((3, 0)).unwrap(), &b"dddd"[..]);
        assert_eq!(d.get((2, 0)).unwrap(), &b"cccc"[..]);
        let len = std::fs::metadata(dir.path().join("c")).unwrap().len();
        assert!(len <= 8, "the file stays within its capacity: {len}");
    }
}
