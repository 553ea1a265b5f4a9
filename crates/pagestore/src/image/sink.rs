//! Building segment objects from pages and uploading them, several at once, under a lease when
//! an operation uploads several before it publishes them.
//!
//! ```text
//!  pages ─► the segment being built ─► full (segment_bytes) ─► its upload starts; the next
//!           segment is built meanwhile (at most PARALLEL_UPLOADS uploads at once)
//!     directory store: a staging file beside the segment's name, written as pages come
//!                      (never the whole segment in memory), then fsync, rename, fsync the
//!                      directory
//!     remote store:    memory, then one PUT, retried until it succeeds
//!  finish ─► the last one ─► every upload done ─► the segments, in order
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{Future, StreamExt};
use strata_bdev::{Error, ErrorKind, Result};

use super::Inner;
use crate::format::{segment_tail, Entry, SegmentBuilder, SegmentRef, TOMBSTONE};
use crate::layout::{obj_err, LEASE_REFRESH};
use crate::objects::retry;

/// Segment uploads of one operation in flight at once.
const PARALLEL_UPLOADS: usize = 4;

/// Page data a staging file takes in one write.
const FILE_CHUNK: usize = 1 << 20;

/// A segment being written to a staging file in a directory store.
struct Staged {
    file: File,
    staging: PathBuf,
    path: PathBuf,
    /// Page data not yet written to the file.
    buf: Vec<u8>,
    /// Page data written to the file.
    written: u64,
    entries: Vec<Entry>,
    /// Renamed into place: nothing to clean up.
    published: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // An abandoned segment (an error, or the operation given up) leaves no file behind.
        if !self.published {
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

/// Where a segment being built goes.
enum Body {
    File(Staged),
    /// Memory, uploaded with one PUT once complete.
    Memory(SegmentBuilder),
}

/// The segment being built.
struct Building {
    /// Its number within the operation, and its key relative to the image.
    part: usize,
    key: String,
    body: Body,
    data_len: u64,
}

type Upload<'a> =
    Pin<Box<dyn Future<Output = Result<(usize, SegmentRef, Vec<Entry>)>> + Send + 'a>>;

/// Builds segment objects from pages and uploads each once it holds `segment_bytes`.
///
/// An operation that uploads several segments before it publishes them holds a *lease*
/// (`images/NAME/leases/STEM`, refreshed while it works): garbage collection leaves the
/// segments of a live lease alone, however long ago the first was written.
pub(super) struct SegmentSink<'a> {
    inner: &'a Inner,
    building: Option<Building>,
    /// Key of the segments, relative to the image, before the part number.
    stem: String,
    /// Segments started so far.
    started: usize,
    uploads: FuturesUnordered<Upload<'a>>,
    made: Vec<(usize, SegmentRef, Vec<Entry>)>,
    /// The lease, if the operation takes one, and when it was last written.
    lease: Option<(String, Option<Instant>)>,
}

impl<'a> SegmentSink<'a> {
    pub(super) fn new(inner: &'a Inner, stem: String) -> SegmentSink<'a> {
        SegmentSink {
            inner,
            building: None,
            stem,
            started: 0,
            uploads: FuturesUnordered::new(),
            made: Vec::new(),
            lease: None,
        }
    }

    /// Hold a lease on the segments while they await their manifest.
    pub(super) fn leased(mut self) -> SegmentSink<'a> {
        let name = self.stem.trim_start_matches("segments/");
        self.lease = Some((format!("images/{}/leases/{name}", self.inner.name), None));
        self
    }

    /// The segment being built, started if there is none.
    fn building(&mut self) -> Result<&mut Building> {
        if self.building.is_none() {
            let part = self.started;
            let key = format!("{}-{part}.seg", self.stem);
            let full = format!("images/{}/{key}", self.inner.name);
            let body = match self.inner.store.objects.local_path(&full) {
                Some(path) => Body::File(self.inner.stage(path)?),
                None => Body::Memory(SegmentBuilder::new(self.inner.page_size)),
            };
            self.started += 1;
            self.building = Some(Building {
                part,
                key,
                body,
                data_len: 0,
            });
        }
        Ok(self.building.as_mut().expect("just made"))
    }

    /// Add a page's bytes to the segment being built.
    pub(super) fn page(&mut self, page: u64, bytes: &[u8]) -> Result<()> {
        let b = self.building()?;
        b.data_len += bytes.len() as u64;
        match &mut b.body {
            Body::Memory(m) => m.page(page, bytes),
            Body::File(f) => {
                f.entries.push(Entry {
                    page,
                    slot: ((f.written + f.buf.len() as u64) / bytes.len() as u64) as u32,
                    crc: crc32c::crc32c(bytes),
                });
                f.buf.extend_from_slice(bytes);
                if f.buf.len() >= FILE_CHUNK {
                    f.write_out()?;
                }
            }
        }
        Ok(())
    }

    /// Add a tombstone to the segment being built.
    pub(super) fn tombstone(&mut self, page: u64) -> Result<()> {
        match &mut self.building()?.body {
            Body::Memory(m) => m.tombstone(page),
            Body::File(f) => f.entries.push(Entry {
                page,
                slot: TOMBSTONE,
                crc: 0,
            }),
        }
        Ok(())
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

    /// Start uploading what is built if it is full, or (`last`) if it holds anything.
    pub(super) async fn cut(&mut self, last: bool) -> Result<()> {
        let Some(b) = &self.building else {
            return Ok(());
        };
        let full = b.data_len >= self.inner.store.settings.segment_bytes;
        if !(full || last) {
            return Ok(());
        }
        self.refresh_lease().await?;
        while self.uploads.len() >= PARALLEL_UPLOADS {
            self.collect_one().await?;
        }
        let b = self.building.take().expect("checked above");
        self.uploads.push(Box::pin(self.inner.upload(b)));
        Ok(())
    }

    /// Wait for one upload to end.
    async fn collect_one(&mut self) -> Result<()> {
        if let Some(done) = self.uploads.next().await {
            self.made.push(done?);
        }
        Ok(())
    }

    /// Upload the rest; the segments made, in order. Keeps the lease until
    /// [`release`](Self::release), after their manifest is published.
    pub(super) async fn finish(&mut self) -> Result<Vec<(SegmentRef, Vec<Entry>)>> {
        self.cut(true).await?;
        while !self.uploads.is_empty() {
            self.collect_one().await?;
        }
        self.refresh_lease().await?;
        let mut made = std::mem::take(&mut self.made);
        made.sort_unstable_by_key(|(part, _, _)| *part);
        Ok(made.into_iter().map(|(_, r, e)| (r, e)).collect())
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

impl Staged {
    /// Write the buffered page data to the file.
    fn write_out(&mut self) -> Result<()> {
        self.file
            .write_all_at(&self.buf, self.written)
            .map_err(|e| staging_err(&self.staging, e))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

fn staging_err(path: &Path, e: std::io::Error) -> Error {
    Error::with_source(
        ErrorKind::Io,
        format!("write segment {}", path.display()),
        e,
    )
}

impl Inner {
    /// A staging file for the segment at `path` in a directory store: `PATH#N`, a name the
    /// store's listings leave out.
    fn stage(&self, path: PathBuf) -> Result<Staged> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| staging_err(dir, e))?;
        }
        let mut n = std::process::id();
        loop {
            let mut name = path.clone().into_os_string();
            name.push(format!("#{n}"));
            let staging = PathBuf::from(name);
            match File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&staging)
            {
                Ok(file) => {
                    return Ok(Staged {
                        file,
                        staging,
                        path,
                        buf: Vec::with_capacity(FILE_CHUNK),
                        written: 0,
                        entries: Vec::new(),
                        published: false,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(staging_err(&staging, e)),
            }
        }
    }

    /// Upload segment `b`; its part number, reference and index.
    async fn upload(&self, b: Building) -> Result<(usize, SegmentRef, Vec<Entry>)> {
        let (size, entries) = match b.body {
            Body::Memory(m) => {
                let (object, entries) = m.finish(self.page_bits);
                let size = object.len() as u64;
                self.put_object(&b.key, Bytes::from(object)).await?;
                (size, entries)
            }
            Body::File(mut f) => {
                f.write_out()?;
                let size = self.publish_staged(&mut f).await?;
                (size, std::mem::take(&mut f.entries))
            }
        };
        let r = SegmentRef {
            key: b.key,
            size,
            entries: entries.len() as u64,
            pages: entries.iter().filter(|e| e.slot != TOMBSTONE).count() as u64,
        };
        Ok((b.part, r, entries))
    }

    /// Finish a staged segment file (index, footer) and move it into place durably: fsync,
    /// rename, fsync the directory. Its size.
    async fn publish_staged(&self, f: &mut Staged) -> Result<u64> {
        let tail = segment_tail(&mut f.entries, f.written, self.page_bits);
        f.file
            .write_all_at(&tail, f.written)
            .map_err(|e| staging_err(&f.staging, e))?;
        let size = f.written + tail.len() as u64;
        let file = f.file.try_clone().map_err(|e| staging_err(&f.staging, e))?;
        let (staging, path) = (f.staging.clone(), f.path.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            file.sync_all()?;
            std::fs::rename(&staging, &path)?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("write segment: {e}")))?
        .map_err(|e| staging_err(&f.path, e))?;
        f.published = true;
        let stats = self.store.objects.stats();
        stats.puts.fetch_add(1, Ordering::Relaxed);
        stats.bytes_put.fetch_add(size, Ordering::Relaxed);
        Ok(size)
    }

    /// PUT `data` as the segment `key_rel` of this image, retried until it succeeds.
    async fn put_object(&self, key_rel: &str, data: Bytes) -> Result<()> {
        let objects = &*self.store.objects;
        let key = format!("images/{}/{key_rel}", self.name);
        retry(
            objects,
            "upload segment",
            u32::MAX,
            || self.give_up(),
            || objects.put(&key, data.clone()),
        )
        .await
        .map_err(|e| obj_err(&format!("checkpoint image {}", self.name), e))
    }
}
