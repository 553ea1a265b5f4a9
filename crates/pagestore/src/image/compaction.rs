//! Compaction: merging the oldest segments into as few as their live pages need, in its own
//! task, so that checkpoints (and the writes waiting on them) go on meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use strata_bdev::Result;

use super::sink::SegmentSink;
use super::{Inner, SegInfo, SegLoc};
use crate::failpoint::failpoint;
use crate::format::{Entry, TOMBSTONE};

/// Compaction fetches dead pages between live ones rather than split a GET at gaps shorter
/// than this (pages): fewer requests for at most this many pages of waste per live page.
const COMPACTION_GAP: u32 = 64;
/// A compaction round merges at least this many of the oldest segments (more only when
/// merging these would not save a segment).
const MERGE_FAN_IN: usize = 16;

impl Inner {
    pub(super) fn too_many_segments(&self) -> bool {
        self.base.read().expect("lock").order.len() > self.store.settings.max_segments
    }

    /// Compact, unless a compaction is running already: rounds of bounded merges until the
    /// segments are few enough again, or merging would no longer save any.
    pub(super) async fn compact_now(&self) -> Result<()> {
        let _turn = self.work.compacting.lock().await;
        while self.too_many_segments() {
            if !self.compact().await? {
                break;
            }
        }
        Ok(())
    }

    /// Start a compaction in its own task when segments pile up, so that checkpoints (and
    /// the writes waiting for them) go on meanwhile.
    pub(super) fn maybe_compact_in_background(self: &Arc<Inner>) {
        if !self.too_many_segments() || self.give_up() {
            return;
        }
        let mut task = self.work.compaction.lock().expect("lock");
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let inner = self.clone();
        *task = Some(tokio::spawn(async move {
            if let Err(e) = inner.compact_now().await {
                tracing::warn!(image = %inner.name, error = %e.chain(), "compaction");
            }
        }));
    }

    /// Cancel the background compaction, if one runs; its task, to wait for.
    pub(super) fn stop_compaction(&self) -> Option<tokio::task::JoinHandle<()>> {
        let t = self.work.compaction.lock().expect("lock").take()?;
        t.abort();
        Some(t)
    }

    /// Merge the oldest segments into as few as the data needs, dropping overwritten pages and
    /// tombstones that hide nothing (a clone keeps its tombstones: they hide its base), then
    /// publish the shorter list. `false` if no merge would leave fewer segments than it reads.
    ///
    /// One round merges the shortest prefix of at least [`MERGE_FAN_IN`] segments (doubling
    /// while a merge would not pay) so that a round's work, and the ranged GETs each output
    /// segment costs (a few per victim), stay bounded however far behind compaction is.
    pub(super) async fn compact(&self) -> Result<bool> {
        let pages_per_segment = (self.store.settings.segment_bytes / self.page_size as u64).max(1);
        let (victims, live, version) = {
            let base = self.base.read().expect("lock");
            let keep_tombstones = base.manifest.base.is_some();
            let keep = self.store.settings.max_segments / 2;
            let mergeable = base.order.len().saturating_sub(keep.max(1));
            if mergeable < 2 {
                return Ok(false);
            }
            let mut data_pages: HashMap<u32, u64> = HashMap::new();
            for l in base.map.values() {
                if l.slot != TOMBSTONE {
                    *data_pages.entry(l.seg).or_default() += 1;
                }
            }
            // Only worth it if the merge leaves fewer objects than it reads.
            let pays = |n: usize| {
                let pages: u64 = base.order[..n]
                    .iter()
                    .map(|s| data_pages.get(s).copied().unwrap_or(0))
                    .sum();
                pages.div_ceil(pages_per_segment) < n as u64
            };
            let mut n = mergeable.min(MERGE_FAN_IN);
            while !pays(n) {
                if n == mergeable {
                    return Ok(false);
                }
                n = (n * 2).min(mergeable);
            }
            let victims: HashSet<u32> = base.order[..n].iter().copied().collect();
            let mut live: Vec<(u64, SegLoc, Arc<SegInfo>)> = base
                .map
                .iter()
                .filter(|(_, l)| {
                    victims.contains(&l.seg) && (keep_tombstones || l.slot != TOMBSTONE)
                })
                .map(|(p, l)| (*p, *l, base.segs[&l.seg].clone()))
                .collect();
            live.sort_unstable_by_key(|(p, _, _)| *p);
            (victims, live, base.manifest.version)
        };
        let mut sink =
            SegmentSink::new(self, format!("segments/c{version:016x}-{}", self.writer)).leased();
        // One output segment's worth of pages at a time, in page order. Every segment's slots
        // are in page order too, so a batch covers one slot interval of each victim: a few
        // ranged GETs per victim and batch, and no byte of a victim is fetched twice.
        for chunk in live.chunks(pages_per_segment as usize) {
            self.check_open("compact")?;
            self.copy_pages(&mut sink, chunk).await?;
        }
        let made = sink.finish().await?;
        failpoint("compaction-after-segments");
        self.check_open("compact")?;
        // Checkpoints may have published meanwhile: they only append, so the victims are
        // still the oldest segments, and pages they rewrote stay theirs.
        let _publishing = self.work.publishing.lock().await;
        let next = self.next_manifest(|m| {
            let rest = m.segments.split_off(victims.len());
            m.segments = made.iter().map(|(r, _)| r.clone()).chain(rest).collect();
        });
        self.publish(&next).await?;
        failpoint("compaction-after-manifest");
        sink.release().await;
        let merged_into = made.len();
        {
            let mut base = self.base.write().expect("lock");
            // Only pages still mapped to a victim move to the merged segments (a checkpoint
            // since may have a newer version); tombstones in victims hid nothing older.
            let entries: Vec<Vec<Entry>> = made
                .iter()
                .map(|(_, entries)| {
                    entries
                        .iter()
                        .filter(|e| {
                            base.map
                                .get(&e.page)
                                .is_some_and(|l| victims.contains(&l.seg))
                        })
                        .copied()
                        .collect()
                })
                .collect();
            base.map.retain(|_, l| !victims.contains(&l.seg));
            let mut order = Vec::new();
            for ((r, _), entries) in made.into_iter().zip(entries) {
                order.push(base.add_segment(self.seg_info(&r), entries));
            }
            for v in &victims {
                base.segs.remove(v);
            }
            order.extend_from_slice(&base.order[victims.len()..]);
            base.order = order;
            base.manifest = next;
        }
        self.reads
            .cache
            .lock()
            .expect("lock")
            .forget(|seg| victims.contains(&seg));
        if let Some(d) = &self.reads.disk {
            d.forget(|seg| victims.contains(&seg));
        }
        self.stats.compactions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(image = %self.name, merged = victims.len(), into = merged_into, "compaction done");
        Ok(true)
    }

    /// Copy pages (data fetched from their segments, tombstones as they are) into `sink`, in
    /// the order given.
    pub(super) async fn copy_pages(
        &self,
        sink: &mut SegmentSink<'_>,
        chunk: &[(u64, SegLoc, Arc<SegInfo>)],
    ) -> Result<()> {
        let data: Vec<_> = chunk
            .iter()
            .filter(|(_, l, _)| l.slot != TOMBSTONE)
            .cloned()
            .collect();
        let mut fetched = self.fetch_pages(&data).await?.into_iter();
        for (page, l, _) in chunk {
            if l.slot == TOMBSTONE {
                sink.tombstone(*page)?;
            } else {
                let d = fetched.next().expect("one fetched page per data page");
                sink.page(*page, &d)?;
            }
        }
        sink.cut(false).await
    }

    /// The pages `live` names (any segments, in page order), straight from the object store,
    /// each checked against its checksum. Slots of one segment close together (less than
    /// `COMPACTION_GAP` pages apart) are fetched in one GET.
    pub(super) async fn fetch_pages(
        &self,
        live: &[(u64, SegLoc, Arc<SegInfo>)],
    ) -> Result<Vec<Bytes>> {
        let ps = self.page_size as u64;
        let mut by_seg: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, (_, l, _)) in live.iter().enumerate() {
            by_seg.entry(l.seg).or_default().push(i);
        }
        let mut out = vec![Bytes::new(); live.len()];
        for idx in by_seg.values_mut() {
            idx.sort_unstable_by_key(|&i| live[i].1.slot);
            let info = &live[idx[0]].2;
            let mut k = 0;
            while k < idx.len() {
                let first = live[idx[k]].1.slot;
                let mut n = 1;
                while n + k < idx.len()
                    && live[idx[k + n]].1.slot < live[idx[k + n - 1]].1.slot + COMPACTION_GAP
                {
                    n += 1;
                }
                let last = live[idx[k + n - 1]].1.slot;
                let base = u64::from(first) * ps;
                let bytes = self
                    .segment_range(info, base..(u64::from(last) + 1) * ps)
                    .await?;
                for &i in &idx[k..k + n] {
                    let (page, l, _) = &live[i];
                    let at = (u64::from(l.slot) * ps - base) as usize;
                    let b = bytes.slice(at..at + ps as usize);
                    if crc32c::crc32c(&b) != l.crc {
                        return Err(self.corrupt(*page, &info.key));
                    }
                    out[i] = b;
                }
                k += n;
            }
        }
        Ok(out)
    }
}
