//! Building segment objects from pages and uploading them, under a lease when an operation
//! uploads several before it publishes them.

use std::time::Instant;

use bytes::Bytes;
use strata_bdev::Result;

use super::Inner;
use crate::format::{Entry, SegmentBuilder, SegmentRef, TOMBSTONE};
use crate::layout::{obj_err, LEASE_REFRESH};
use crate::objects::retry;

/// Builds segment objects from pages and uploads each once it holds `segment_bytes`.
///
/// An operation that uploads several segments before it publishes them holds a *lease*
/// (`images/NAME/leases/STEM`, refreshed while it works): garbage collection leaves the
/// segments of a live lease alone, however long ago the first was written.
pub(super) struct SegmentSink<'a> {
    inner: &'a Inner,
    builder: SegmentBuilder,
    /// Key of the segments, relative to the image, before the part number.
    stem: String,
    made: Vec<(SegmentRef, Vec<Entry>)>,
    /// The lease, if the operation takes one, and when it was last written.
    lease: Option<(String, Option<Instant>)>,
}

impl<'a> SegmentSink<'a> {
    pub(super) fn new(inner: &'a Inner, stem: String) -> SegmentSink<'a> {
        SegmentSink {
            inner,
            builder: SegmentBuilder::new(inner.page_size),
            stem,
            made: Vec::new(),
            lease: None,
        }
    }

    /// Add a page's bytes to the segment being built.
    pub(super) fn page(&mut self, page: u64, bytes: &[u8]) {
        self.builder.page(page, bytes);
    }

    /// Add a tombstone to the segment being built.
    pub(super) fn tombstone(&mut self, page: u64) {
        self.builder.tombstone(page);
    }

    /// Hold a lease on the segments while they await their manifest.
    pub(super) fn leased(mut self) -> SegmentSink<'a> {
        let name = self.stem.trim_start_matches("segments/");
        self.lease = Some((format!("images/{}/leases/{name}", self.inner.name), None));
        self
    }

    pub(super) async fn refresh_lease(&mut self) -> Result<()> {
        let Some((key, last)) = &mut self.lease else {
            return Ok(());
        };
        if last.is_some_and(|t| t.elapsed() < LEASE_REFRESH) {
            return Ok(());
        }
        let objects = &*self.inner.store.objects;
        let body = Bytes::from(format!("{{\"writer\":\"{}\"}}", self.inner.writer));
        retry(
            objects,
            "write lease",
            u32::MAX,
            || self.inner.give_up(),
            || objects.put(key, body.clone()),
        )
        .await
        .map_err(|e| obj_err(&format!("image {}: lease", self.inner.name), e))?;
        *last = Some(Instant::now());
        Ok(())
    }

    /// Upload what is built if it is full, or (`last`) if it holds anything.
    pub(super) async fn cut(&mut self, last: bool) -> Result<()> {
        let full = self.builder.data_len() as u64 >= self.inner.store.settings.segment_bytes;
        if self.builder.is_empty() || !(full || last) {
            return Ok(());
        }
        self.refresh_lease().await?;
        let done = std::mem::replace(&mut self.builder, SegmentBuilder::new(self.inner.page_size));
        let (object, entries) = done.finish(self.inner.page_bits);
        let key = format!("{}-{}.seg", self.stem, self.made.len());
        let r = self.inner.put_segment(key, object, &entries).await?;
        self.made.push((r, entries));
        Ok(())
    }

    /// Upload the rest; the segments made, in order. Keeps the lease until
    /// [`release`](Self::release), after their manifest is published.
    pub(super) async fn finish(&mut self) -> Result<Vec<(SegmentRef, Vec<Entry>)>> {
        self.cut(true).await?;
        self.refresh_lease().await?;
        Ok(std::mem::take(&mut self.made))
    }

    /// Drop the lease (the segments are in a published manifest, or abandoned).
    pub(super) async fn release(self) {
        if let Some((key, Some(_))) = &self.lease {
            let objects = &*self.inner.store.objects;
            if let Err(e) = objects.delete(key).await {
                tracing::warn!(image = %self.inner.name, lease = %key, error = %e,
                    "drop lease; garbage collection drops it once it is stale");
            }
        }
    }
}

impl Inner {
    /// Upload `objects` as segments under a fresh key each; returns their references.
    pub(super) async fn put_segment(
        &self,
        key_rel: String,
        object: Vec<u8>,
        entries: &[Entry],
    ) -> Result<SegmentRef> {
        let objects = &*self.store.objects;
        let key = format!("images/{}/{key_rel}", self.name);
        let size = object.len() as u64;
        let data = Bytes::from(object);
        retry(
            objects,
            "upload segment",
            u32::MAX,
            || self.give_up(),
            || objects.put(&key, data.clone()),
        )
        .await
        .map_err(|e| obj_err(&format!("checkpoint image {}", self.name), e))?;
        Ok(SegmentRef {
            key: key_rel,
            size,
            entries: entries.len() as u64,
            pages: entries.iter().filter(|e| e.slot != TOMBSTONE).count() as u64,
        })
    }
}
