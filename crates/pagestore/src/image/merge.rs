//! Writes that do not cover whole pages (the image's logical block is 512 bytes; its page is
//! larger): the pages a request touches in part are read, the request's bytes merged in, and
//! every page of the request appended as one batch ending in a commit record — but only if
//! none of the pages read changed meanwhile; otherwise the merge starts again.
//!
//! ```text
//!  request ─► pages touched in part: their current source (WAL place, segment slot, zeroes)
//!          ─► read them ─► merge the request's bytes (or zeroes)
//!          ─► under the write buffer's lock: every source still the same?
//!               yes ─► append the whole request: one batch, one commit record
//!               no  ─► again (another write landed on one of those pages)
//! ```
//!
//! So two writes to different sectors of one page both land whatever their timing (no lost
//! update), a crash leaves each request whole or absent (no torn page), and a flushed one
//! replays like any other write.

use std::fs::File;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use strata_bdev::Result;

use super::read::Src;
use super::Inner;
use crate::format::TOMBSTONE;
use crate::wal::{Batch, Loc};

/// What a request writes: bytes, or zeroes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Fill<'a> {
    Data(&'a Bytes),
    Zeroes,
}

impl Inner {
    /// Write `len` bytes at `offset` (`fill`: the request's bytes or zeroes), a range that does
    /// not start or end on a page boundary.
    pub(super) async fn write_unaligned(
        &self,
        offset: u64,
        len: u64,
        fill: Fill<'_>,
    ) -> Result<()> {
        let ps = self.page_size as u64;
        let end = offset + len;
        let first = offset / ps;
        let last = (end - 1) / ps;
        let mut partial = vec![first];
        if last != first {
            partial.push(last);
        }
        partial.retain(|&p| offset > p * ps || end < (p + 1) * ps);
        loop {
            let mut seen = Vec::with_capacity(partial.len());
            for &p in &partial {
                let src = self.sources(p, 1).pop().expect("one page");
                let bytes = self
                    .read_sources(p, std::slice::from_ref(&src), p * ps, ps as usize)
                    .await?;
                seen.push((p, src, bytes));
            }
            let batch = self.merged(offset, len, fill, &mut seen);
            let applied = self.apply(first, last - first + 1, |wal| {
                wal.write_batch_if(&batch, |lookup| {
                    seen.iter()
                        .all(|(p, src, _)| self.unchanged(*p, src, lookup(*p)))
                })
            })?;
            if applied {
                return Ok(());
            }
        }
    }

    /// The batch that writes the request: the pages read (`seen`), with the request's bytes
    /// merged in, and the whole pages between them.
    fn merged(
        &self,
        offset: u64,
        len: u64,
        fill: Fill<'_>,
        seen: &mut [(u64, Src, BytesMut)],
    ) -> Vec<Batch> {
        let ps = self.page_size as u64;
        let end = offset + len;
        let first = offset / ps;
        let last = (end - 1) / ps;
        let mut batch = Vec::new();
        let mut p = first;
        while p <= last {
            if let Some((_, _, cur)) = seen.iter_mut().find(|(q, _, _)| *q == p) {
                let lo = offset.max(p * ps) - p * ps;
                let hi = end.min((p + 1) * ps) - p * ps;
                let part = &mut cur[lo as usize..hi as usize];
                match fill {
                    Fill::Data(d) => {
                        let at = (p * ps + lo - offset) as usize;
                        part.copy_from_slice(&d[at..at + part.len()]);
                    }
                    Fill::Zeroes => part.fill(0),
                }
                if cur.iter().all(|&b| b == 0) {
                    batch.push(Batch::Zero { first: p, count: 1 });
                } else {
                    batch.push(Batch::Data {
                        first: p,
                        pages: cur.clone().freeze(),
                    });
                }
                p += 1;
                continue;
            }
            // Whole pages up to the next one read in part (or the end).
            let upto = seen
                .iter()
                .map(|(q, _, _)| *q)
                .filter(|&q| q > p)
                .min()
                .unwrap_or(last + 1);
            match fill {
                Fill::Data(d) => {
                    let at = (p * ps - offset) as usize;
                    batch.push(Batch::Data {
                        first: p,
                        pages: d.slice(at..at + ((upto - p) * ps) as usize),
                    });
                }
                Fill::Zeroes => batch.push(Batch::Zero {
                    first: p,
                    count: upto - p,
                }),
            }
            p = upto;
        }
        batch
    }

    /// Whether `page`, read from `seen`, still reads from there: `wal` is what the write
    /// buffer holds for it now. Called under the write buffer's lock.
    fn unchanged(&self, page: u64, seen: &Src, wal: Option<(Arc<File>, Loc)>) -> bool {
        match wal {
            Some((f, Loc::Data(off))) => {
                matches!(seen, Src::Wal(g, o) if Arc::ptr_eq(&f, g) && *o == off)
            }
            Some((_, Loc::Zero)) => matches!(seen, Src::Zero),
            None => {
                let base = self.base.read().expect("lock");
                match base.map.get(&page) {
                    Some(l) if l.slot != TOMBSTONE => {
                        matches!(seen, Src::Seg(s, _) if s.seg == l.seg && s.slot == l.slot)
                    }
                    _ => matches!(seen, Src::Zero),
                }
            }
        }
    }
}
