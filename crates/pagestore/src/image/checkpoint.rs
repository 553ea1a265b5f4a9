//! Checkpoints: the background task that moves the write buffer's frozen generations into
//! segments and publishes each as a new manifest version; writers wait for room here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use std::os::unix::fs::FileExt;
use strata_bdev::{Error, ErrorKind, Result};

use super::sink::SegmentSink;
use super::{seg_info, Inner};
use crate::failpoint::failpoint;
use crate::format::Manifest;
use crate::layout::{manifest_key, now_secs, obj_err};
use crate::objects::{retry, ObjError};
use crate::wal::Loc;

/// The background task: checkpoints by size and age, compaction, retries.
pub(super) async fn checkpointer(inner: Arc<Inner>) {
    loop {
        if inner.life.closed.load(Ordering::Acquire) {
            return;
        }
        inner.maybe_compact_in_background();
        let due = inner.wal().is_ok_and(|wal| {
            let (active, _) = wal.sizes();
            let age = inner.work.last_checkpoint.lock().expect("lock").elapsed();
            active >= inner.store.settings.checkpoint_bytes
                || (active > 0 && age >= inner.store.settings.checkpoint_age)
                || !wal.frozen_ids().is_empty()
        });
        if due && inner.fenced().is_none() {
            if let Err(e) = inner.checkpoint().await {
                tracing::warn!(image = %inner.name, error = %e.chain(), "checkpoint");
            }
        }
        let tick = Duration::from_secs(1).min(inner.store.settings.checkpoint_age);
        let _ = tokio::time::timeout(tick, inner.life.kick.notified()).await;
    }
}

impl Inner {
    /// Move everything buffered so far into segments and a new manifest.
    pub(super) async fn checkpoint(&self) -> Result<()> {
        let _turn = self.work.checkpointing.lock().await;
        let wal = self.wal()?;
        wal.rotate()?;
        *self.work.last_checkpoint.lock().expect("lock") = Instant::now();
        for g in wal.frozen_ids() {
            self.checkpoint_generation(g).await?;
            self.life.progress.notify_waiters();
        }
        Ok(())
    }

    /// Publish `next` as the new manifest version: create-only, so a second writer that took
    /// this version fences us.
    pub(super) async fn publish(&self, next: &Manifest) -> Result<()> {
        let objects = &*self.store.objects;
        let key = manifest_key(&self.name, next.version);
        let bytes = Bytes::from(next.encode());
        let r = retry(
            objects,
            "publish manifest",
            u32::MAX,
            || self.life.closed.load(Ordering::Acquire),
            || objects.put_create(&key, bytes.clone()),
        )
        .await;
        match r {
            Ok(()) => Ok(()),
            Err(ObjError::AlreadyExists(_)) => {
                // Ours, if a retried request had in fact succeeded.
                if let Ok(existing) = objects.get(&key).await {
                    if existing == bytes {
                        return Ok(());
                    }
                }
                let why = format!(
                    "another writer published version {} of this image; this server stopped \
                     writing to it (writes buffered here since the last checkpoint stay in {} \
                     and are not published)",
                    next.version,
                    self.store.buffer_dir.join(&self.name).display()
                );
                tracing::error!(image = %self.name, "{why}");
                *self.life.fenced.lock().expect("lock") = Some(why.clone());
                self.life.progress.notify_waiters();
                Err(Error::new(ErrorKind::Io, why))
            }
            Err(e) => Err(obj_err(&format!("checkpoint image {}", self.name), e)),
        }
    }

    /// The manifest that follows the current one, changed by `edit`.
    pub(super) fn next_manifest(&self, edit: impl FnOnce(&mut Manifest)) -> Manifest {
        let mut m = self.base.read().expect("lock").manifest.clone();
        m.version += 1;
        m.writer = self.writer.clone();
        m.created = now_secs();
        edit(&mut m);
        m
    }

    pub(super) async fn checkpoint_generation(&self, g: u64) -> Result<()> {
        let wal = self.wal()?;
        let Some((file, pages)) = wal.frozen(g) else {
            return Ok(());
        };
        let mut sink = SegmentSink::new(self, format!("segments/{g:016x}-{}", self.writer));
        if pages.len() as u64 * self.page_size as u64 > self.store.settings.segment_bytes {
            sink = sink.leased();
        }
        let mut buf = vec![0u8; self.page_size];
        for (page, loc) in &pages {
            match loc {
                Loc::Data(off) => {
                    file.read_exact_at(&mut buf, *off).map_err(|e| {
                        Error::with_source(
                            ErrorKind::Io,
                            format!("read write buffer of image {}", self.name),
                            e,
                        )
                    })?;
                    sink.page(*page, &buf);
                }
                Loc::Zero => sink.tombstone(*page),
            }
            sink.cut(false).await?;
        }
        let made = sink.finish().await?;
        failpoint("checkpoint-after-segments");
        let publishing = self.work.publishing.lock().await;
        let next = self.next_manifest(|m| {
            m.segments.extend(made.iter().map(|(r, _)| r.clone()));
            m.wal_generation = g;
        });
        self.publish(&next).await?;
        failpoint("checkpoint-after-manifest");
        sink.release().await;
        let segments = made.len();
        {
            let mut base = self.base.write().expect("lock");
            for (r, entries) in made {
                let id = base.add_segment(seg_info(&self.name, &r, self.page_bits), entries);
                base.order.push(id);
            }
            base.manifest = next;
        }
        drop(publishing);
        wal.retire(g)?;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(image = %self.name, generation = g, segments, "checkpoint done");
        Ok(())
    }

    pub(super) async fn wait_for_room(&self) -> Result<()> {
        loop {
            self.check_fenced("write to")?;
            let (active, total) = self.wal()?.sizes();
            if active >= self.store.settings.checkpoint_bytes {
                self.life.kick.notify_one();
            }
            if total <= self.store.settings.max_buffered_bytes {
                return Ok(());
            }
            let wait = self.life.progress.notified();
            self.life.kick.notify_one();
            if self.life.closed.load(Ordering::Acquire) {
                return Err(Error::new(
                    ErrorKind::Shutdown,
                    format!("image {} is closing", self.name),
                ));
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    }
}
