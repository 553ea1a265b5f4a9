//! A bounded in-memory cache of segment pages, evicting the least recently used.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

/// Pages keyed by (segment id, slot).
#[derive(Debug)]
pub struct Cache {
    capacity: u64,
    used: u64,
    tick: u64,
    entries: HashMap<(u32, u32), (Bytes, u64)>,
    /// Use tick → key, oldest first.
    order: BTreeMap<u64, (u32, u32)>,
}

impl Cache {
    pub fn new(capacity: u64) -> Cache {
        Cache {
            capacity,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub fn get(&mut self, seg: u32, slot: u32) -> Option<Bytes> {
        let (b, t) = self.entries.get_mut(&(seg, slot))?;
        self.order.remove(t);
        self.tick += 1;
        *t = self.tick;
        self.order.insert(self.tick, (seg, slot));
        Some(b.clone())
    }

    pub fn put(&mut self, seg: u32, slot: u32, b: Bytes) {
        let len = b.len() as u64;
        if len > self.capacity {
            return;
        }
        if let Some((old, t)) = self.entries.remove(&(seg, slot)) {
            self.order.remove(&t);
            self.used -= old.len() as u64;
        }
        while self.used + len > self.capacity {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.entries.remove(&key) {
                self.used -= old.len() as u64;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, (seg, slot));
        self.entries.insert((seg, slot), (b, self.tick));
        self.used += len;
    }

    /// Drop every page of the segments `gone` selects.
    pub fn forget(&mut self, gone: impl Fn(u32) -> bool) {
        let keys: Vec<(u32, u32)> = self
            .entries
            .keys()
            .copied()
            .filter(|(s, _)| gone(*s))
            .collect();
        for k in keys {
            if let Some((old, t)) = self.entries.remove(&k) {
                self.order.remove(&t);
                self.used -= old.len() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = Cache::new(8);
        c.put(0, 0, Bytes::from_static(b"aaaa"));
        c.put(0, 1, Bytes::from_static(b"bbbb"));
        assert!(c.get(0, 0).is_some());
        c.put(0, 2, Bytes::from_static(b"cccc"));
        assert!(c.get(0, 1).is_none(), "the least recently used went");
        assert!(c.get(0, 0).is_some() && c.get(0, 2).is_some());
        c.forget(|s| s == 0);
        assert!(c.get(0, 0).is_none());
    }
}
