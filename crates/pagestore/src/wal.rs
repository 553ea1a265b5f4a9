//! The write buffer: per image, a directory of append-only log files ("generations") on local
//! disk. Every write is appended as one checksummed record; FLUSH appends a commit record and
//! returns once the log is fdatasync'ed (concurrent flushes share one sync). A checkpoint freezes
//! the current generation, starts a new one, and deletes the frozen one once its pages are in the
//! object store.
//!
//! ```text
//!   record: magic u32 "STWA" | crc32c u32 (of the rest of the header and the payload)
//!           | seq u64 | kind u8 (1 write, 2 zero, 3 commit) | 3 zero bytes | page u64 | count u32
//!           | payload: count pages (writes only)
//! ```
//!
//! Replay reads each generation up to its last commit record whose every record checks out, and
//! cuts the file there: a torn or unflushed tail is dropped, never half-applied.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use strata_bdev::{Error, ErrorKind, Result};

use crate::pagemap::PageMap;

const MAGIC: u32 = 0x4157_5453; // "STWA" little-endian
pub const HEADER_LEN: u64 = 32;

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_COMMIT: u8 = 3;

/// Where the newest buffered version of a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// At this byte offset of the generation's file.
    Data(u64),
    /// The page reads as zeroes (trim / write zeroes).
    Zero,
}

/// A frozen generation's file and its pages (page, location), in page order.
pub type Frozen = (Arc<File>, Vec<(u64, Loc)>);

/// One generation: its file and where each page written in it went.
#[derive(Debug)]
pub struct Generation {
    pub file: Arc<File>,
    /// Pages in the order written (a page written twice is here twice; the later one counts).
    pages: Vec<(u64, Loc)>,
    /// Bytes appended.
    pub len: u64,
    /// Where its last commit record ends: replay after a crash of the process keeps every
    /// record before it.
    committed: u64,
    /// Bytes known to be on disk.
    synced: u64,
    /// Where the last commit record on disk ends: replay keeps every record before it even
    /// after a power loss.
    durable: u64,
    /// When it was made (or found, at open).
    created: std::time::Instant,
}

impl Generation {
    fn new(file: File, pages: Vec<(u64, Loc)>, len: u64) -> Generation {
        Generation {
            file: Arc::new(file),
            pages,
            len,
            committed: len,
            synced: len,
            durable: len,
            created: std::time::Instant::now(),
        }
    }
}

#[derive(Debug)]
struct Log {
    /// Frozen generations (being checkpointed) and the active one, oldest first.
    gens: BTreeMap<u64, Generation>,
    /// The newest buffered version of every page: its generation and place (one lookup
    /// however many generations there are).
    index: PageMap<(u64, Loc)>,
    active: u64,
    next_seq: u64,
    /// Records appended since the last commit record.
    uncommitted: bool,
    /// Commit sequence numbers issued; the newest.
    committed_seq: u64,
    /// Generations with appended bytes not yet synced.
    unsynced: Vec<u64>,
    /// A generation was created since the directory was last synced.
    dir_unsynced: bool,
}

impl Log {
    /// The newest buffered location of `page`: generation file and place.
    fn lookup(&self, page: u64) -> Option<(Arc<File>, Loc)> {
        let (g, loc) = self.index.get(&page)?;
        Some((self.gens[g].file.clone(), *loc))
    }

    /// Record that `page` of generation `g` is at `loc`, the newest version.
    fn place(&mut self, g: u64, page: u64, loc: Loc) {
        self.gens
            .get_mut(&g)
            .expect("the generation exists")
            .pages
            .push((page, loc));
        self.index.insert(page, (g, loc));
    }
}

/// A run of pages appended by [`Wal::write_batch_if`].
#[derive(Debug, Clone)]
pub enum Batch {
    /// Whole pages of data from `first`.
    Data { first: u64, pages: bytes::Bytes },
    /// `count` pages from `first` read as zeroes.
    Zero { first: u64, count: u64 },
}

/// The write buffer of one image.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    page_size: usize,
    log: Mutex<Log>,
    /// The newest commit known durable.
    durable_seq: AtomicU64,
    /// Held by the one task syncing; flushers queue behind it and find their commit covered.
    syncing: tokio::sync::Mutex<()>,
    _lock: File,
}

fn io(what: String, e: std::io::Error) -> Error {
    let kind = ErrorKind::from_errno(e.raw_os_error().unwrap_or(libc::EIO));
    Error::with_source(kind, what, e)
}

fn gen_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("wal-{id:016x}.log"))
}

fn header(seq: u64, kind: u8, page: u64, count: u32, payload: &[u8]) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16] = kind;
    h[20..28].copy_from_slice(&page.to_le_bytes());
    h[28..32].copy_from_slice(&count.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[8..]), payload);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What replay found in one generation.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Committed records applied.
    pub records: u64,
    /// Bytes dropped from the tail (after the last commit, or torn).
    pub dropped: u64,
}

impl Wal {
    /// Open (creating) the buffer of an image in `dir`, replay generations newer than
    /// `after_gen` (older ones are already in the object store and are deleted), and start a new
    /// active generation. Fails if another process has the buffer open.
    pub fn open(
        dir: &Path,
        page_size: usize,
        after_gen: u64,
    ) -> Result<(Wal, Vec<(u64, Replayed)>)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("create write buffer {}", dir.display()), e))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(format!("open {}", lock_path.display()), e))?;
        // SAFETY: flock reads no memory of ours; the fd is valid while `lock` lives.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "write buffer {} is in use by another process (two servers must never share \
                     an image's buffer)",
                    dir.display()
                ),
            ));
        }
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| io(format!("list write buffer {}", dir.display()), e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                u64::from_str_radix(name.strip_prefix("wal-")?.strip_suffix(".log")?, 16).ok()
            })
            .collect();
        ids.sort_unstable();
        let mut gens = BTreeMap::new();
        let mut index = PageMap::default();
        let mut report = Vec::new();
        let mut next_seq = 1;
        for id in ids {
            let path = gen_path(dir, id);
            if id <= after_gen {
                std::fs::remove_file(&path)
                    .map_err(|e| io(format!("remove checkpointed {}", path.display()), e))?;
                continue;
            }
            let file = File::options()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io(format!("open {}", path.display()), e))?;
            let (pages, len, replayed, seq) = replay(&file, page_size, &path)?;
            // What a crash of the process left may be in the page cache only: on disk before
            // anything relies on it.
            file.sync_data()
                .map_err(|e| io(format!("sync {}", path.display()), e))?;
            next_seq = next_seq.max(seq + 1);
            report.push((id, replayed));
            for (p, loc) in &pages {
                index.insert(*p, (id, *loc));
            }
            gens.insert(id, Generation::new(file, pages, len));
        }
        let active = gens
            .keys()
            .next_back()
            .copied()
            .unwrap_or(after_gen)
            .max(after_gen)
            + 1;
        let file = new_gen_file(dir, active)?;
        sync_dir(dir).map_err(|e| io(format!("sync directory {}", dir.display()), e))?;
        gens.insert(active, Generation::new(file, Vec::new(), 0));
        let wal = Wal {
            dir: dir.to_path_buf(),
            page_size,
            log: Mutex::new(Log {
                gens,
                index,
                active,
                next_seq,
                uncommitted: false,
                committed_seq: 0,
                unsynced: Vec::new(),
                dir_unsynced: false,
            }),
            durable_seq: AtomicU64::new(0),
            syncing: tokio::sync::Mutex::new(()),
            _lock: lock,
        };
        Ok((wal, report))
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().expect("write buffer lock poisoned")
    }

    /// The newest buffered location of `page`: generation file and place, newest generation first.
    #[cfg(test)]
    pub fn lookup(&self, page: u64) -> Option<(Arc<File>, Loc)> {
        self.log().lookup(page)
    }

    /// Look up a run of pages at once (one lock).
    pub fn lookup_run(&self, first: u64, count: u64) -> Vec<Option<(Arc<File>, Loc)>> {
        let log = self.log();
        (first..first + count)
            .map(|page| log.lookup(page))
            .collect()
    }

    /// Append one record; returns nothing until the bytes are in the file (not yet synced).
    fn append(&self, kind: u8, page: u64, count: u32, payload: &[u8]) -> Result<()> {
        self.append_locked(&mut self.log(), kind, page, count, payload)
    }

    fn append_locked(
        &self,
        log: &mut Log,
        kind: u8,
        page: u64,
        count: u32,
        payload: &[u8],
    ) -> Result<()> {
        let seq = log.next_seq;
        let h = header(seq, kind, page, count, payload);
        let active = log.active;
        let g = log
            .gens
            .get_mut(&active)
            .expect("the active generation exists");
        let start = g.len;
        if let Err(e) = write_record(&g.file, &h, payload, start) {
            // Nothing half-written stays behind: cut the file back to the last whole record.
            let _ = g.file.set_len(start);
            let path = gen_path(&self.dir, active);
            return Err(io(format!("append to write buffer {}", path.display()), e));
        }
        g.len += HEADER_LEN + payload.len() as u64;
        if kind == KIND_COMMIT {
            g.committed = g.len;
        }
        for i in 0..u64::from(count) {
            let loc = match kind {
                KIND_WRITE => Loc::Data(start + HEADER_LEN + i * self.page_size as u64),
                _ => Loc::Zero,
            };
            log.place(active, page + i, loc);
        }
        log.next_seq += 1;
        if kind == KIND_COMMIT {
            log.uncommitted = false;
            log.committed_seq = seq;
        } else {
            log.uncommitted = true;
        }
        if !log.unsynced.contains(&active) {
            log.unsynced.push(active);
        }
        Ok(())
    }

    /// Append a transaction: its writes (`Some(bytes)`, one page each) and tombstones
    /// (`None`), in page order, then a commit record, in one write. Readers see all of it or
    /// none, and replay after a crash finds all of it or none (nothing before the commit
    /// record counts). Durable once [`flush`](Self::flush) returns.
    pub fn write_batch(&self, pages: &[(u64, Option<bytes::Bytes>)]) -> Result<()> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < pages.len() {
            let (first, data) = &pages[i];
            let mut n = 1;
            while i + n < pages.len()
                && pages[i + n].0 == first + n as u64
                && pages[i + n].1.is_some() == data.is_some()
            {
                n += 1;
            }
            let run = &pages[i..i + n];
            runs.push(if data.is_some() {
                let mut payload = Vec::with_capacity(n * self.page_size);
                for (_, d) in run {
                    payload.extend_from_slice(d.as_deref().expect("a data run"));
                }
                Batch::Data {
                    first: *first,
                    pages: bytes::Bytes::from(payload),
                }
            } else {
                Batch::Zero {
                    first: *first,
                    count: n as u64,
                }
            });
            i += n;
        }
        self.append_batch(&mut self.log(), &runs)
    }

    /// Append `runs` as [`write_batch`](Self::write_batch) does, if `unchanged` agrees: it is
    /// called under the buffer's lock with a lookup of the newest buffered location of a page,
    /// so nothing is appended between its answer and the batch. Returns whether it appended.
    pub fn write_batch_if(
        &self,
        runs: &[Batch],
        unchanged: impl FnOnce(&dyn Fn(u64) -> Option<(Arc<File>, Loc)>) -> bool,
    ) -> Result<bool> {
        let mut log = self.log();
        let held = &*log;
        if !unchanged(&|page| held.lookup(page)) {
            return Ok(false);
        }
        self.append_batch(&mut log, runs)?;
        Ok(true)
    }

    /// Append `runs` and a commit record in one write.
    fn append_batch(&self, log: &mut Log, runs: &[Batch]) -> Result<()> {
        let ps = self.page_size as u64;
        let mut seq = log.next_seq;
        let mut buf: Vec<u8> = Vec::new();
        // (first page, pages, offset of the data in `buf` or None for zeroes)
        let mut placed: Vec<(u64, u64, Option<u64>)> = Vec::with_capacity(runs.len());
        for run in runs {
            match run {
                Batch::Data { first, pages } => {
                    let total = pages.len() as u64 / ps;
                    let mut done = 0;
                    while done < total {
                        let n = (total - done).min(u64::from(u32::MAX));
                        let payload = &pages[(done * ps) as usize..((done + n) * ps) as usize];
                        buf.extend_from_slice(&header(
                            seq,
                            KIND_WRITE,
                            first + done,
                            n as u32,
                            payload,
                        ));
                        placed.push((first + done, n, Some(buf.len() as u64)));
                        buf.extend_from_slice(payload);
                        seq += 1;
                        done += n;
                    }
                }
                Batch::Zero { first, count } => {
                    let mut done = 0;
                    while done < *count {
                        let n = (count - done).min(u64::from(u32::MAX));
                        buf.extend_from_slice(&header(seq, KIND_ZERO, first + done, n as u32, &[]));
                        placed.push((first + done, n, None));
                        seq += 1;
                        done += n;
                    }
                }
            }
        }
        buf.extend_from_slice(&header(seq, KIND_COMMIT, 0, 0, &[]));
        let active = log.active;
        let g = log
            .gens
            .get_mut(&active)
            .expect("the active generation exists");
        let start = g.len;
        if let Err(e) = g.file.write_all_at(&buf, start) {
            let _ = g.file.set_len(start);
            let path = gen_path(&self.dir, active);
            return Err(io(format!("append to write buffer {}", path.display()), e));
        }
        g.len += buf.len() as u64;
        g.committed = g.len;
        for (first, n, at) in placed {
            for i in 0..n {
                let loc = match at {
                    Some(off) => Loc::Data(start + off + i * ps),
                    None => Loc::Zero,
                };
                log.place(active, first + i, loc);
            }
        }
        log.next_seq = seq + 1;
        log.uncommitted = false;
        log.committed_seq = seq;
        if !log.unsynced.contains(&active) {
            log.unsynced.push(active);
        }
        Ok(())
    }

    /// Buffer whole pages starting at `page`.
    pub fn write(&self, page: u64, data: &[u8]) -> Result<()> {
        let count = (data.len() / self.page_size) as u32;
        self.append(KIND_WRITE, page, count, data)
    }

    /// Buffer that `count` pages from `page` read as zeroes.
    pub fn zero(&self, page: u64, count: u64) -> Result<()> {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(u64::from(u32::MAX)) as u32;
            self.append(KIND_ZERO, page + done, n, &[])?;
            done += u64::from(n);
        }
        Ok(())
    }

    /// Make every write appended so far durable: a commit record, then one fdatasync shared
    /// with concurrent callers.
    pub async fn flush(&self) -> Result<()> {
        let target = {
            let mut log = self.log();
            if log.uncommitted {
                self.append_locked(&mut log, KIND_COMMIT, 0, 0, &[])?;
            }
            log.committed_seq
        };
        while self.durable_seq.load(Ordering::Acquire) < target {
            let _turn = self.syncing.lock().await;
            if self.durable_seq.load(Ordering::Acquire) >= target {
                break;
            }
            // Each generation to sync: its id and file, and how far it is written and
            // committed now (what the sync makes durable).
            let (files, seq, new_names) = {
                let mut log = self.log();
                let new_names = std::mem::take(&mut log.dir_unsynced);
                let ids = std::mem::take(&mut log.unsynced);
                let files: Vec<(u64, Arc<File>, u64, u64)> = ids
                    .iter()
                    .filter_map(|id| {
                        let g = log.gens.get(id)?;
                        Some((*id, g.file.clone(), g.len, g.committed))
                    })
                    .collect();
                (files, log.committed_seq, new_names)
            };
            let taken: Vec<u64> = files.iter().map(|(id, _, _, _)| *id).collect();
            let dir = self.dir.clone();
            let synced = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                for (_, f, _, _) in &files {
                    f.sync_data()?;
                }
                // The names of generations made since the last sync must survive too.
                if new_names {
                    sync_dir(&dir)?;
                }
                Ok(files)
            })
            .await
            .map_err(|e| Error::new(ErrorKind::Io, format!("sync write buffer: {e}")))?;
            let files = match synced {
                Ok(files) => files,
                Err(e) => {
                    // Synced again next time.
                    let mut log = self.log();
                    log.dir_unsynced |= new_names;
                    for id in taken {
                        if !log.unsynced.contains(&id) {
                            log.unsynced.push(id);
                        }
                    }
                    drop(log);
                    return Err(io(format!("sync write buffer {}", self.dir.display()), e));
                }
            };
            {
                let mut log = self.log();
                for (id, _, len, committed) in files {
                    if let Some(g) = log.gens.get_mut(&id) {
                        g.synced = g.synced.max(len);
                        g.durable = g.durable.max(committed);
                    }
                }
            }
            self.durable_seq.fetch_max(seq, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Freeze the active generation and start a new one; returns the frozen generation's id,
    /// or `None` if it holds nothing.
    pub fn rotate(&self) -> Result<Option<u64>> {
        self.rotate_at(1)
    }

    /// [`rotate`](Self::rotate) if the active generation holds at least `min_len` bytes.
    pub fn rotate_at(&self, min_len: u64) -> Result<Option<u64>> {
        let mut log = self.log();
        let active = log.active;
        if log.gens[&active].len < min_len.max(1) {
            return Ok(None);
        }
        // Close the generation with a commit: a later flush (committing in the next generation)
        // covers these records too, and replay must not drop them.
        if log.uncommitted {
            self.append_locked(&mut log, KIND_COMMIT, 0, 0, &[])?;
        }
        let next = active + 1;
        let file = new_gen_file(&self.dir, next)?;
        log.gens.insert(next, Generation::new(file, Vec::new(), 0));
        log.active = next;
        // The new name is made durable by the next flush, before anything relies on it.
        log.dir_unsynced = true;
        Ok(Some(active))
    }

    /// The pages of frozen generation `id` and its file.
    pub fn frozen(&self, id: u64) -> Option<Frozen> {
        let log = self.log();
        let g = log.gens.get(&id)?;
        Some((g.file.clone(), newest_in(&g.pages)))
    }

    /// The pages of frozen generation `id` that a checkpoint must keep, and its file: those
    /// whose newer version in a later generation would not outlast this one are kept. A newer
    /// version replaces this one if replay keeps it whenever it would keep this one: it is on
    /// disk and committed; or this one is not on disk yet and the newer one is committed
    /// (replay after a crash of the process keeps it). Zeroing records, whose place is not
    /// kept, are never counted as replacing.
    pub fn frozen_live(&self, id: u64) -> Option<Frozen> {
        let log = self.log();
        let g = log.gens.get(&id)?;
        let mut pages = newest_in(&g.pages);
        pages.retain(|(p, l)| {
            let here_on_disk = match l {
                Loc::Data(off) => *off < g.synced,
                Loc::Zero => true,
            };
            match log.index.get(p) {
                Some((h, Loc::Data(off))) if *h > id => {
                    let h = &log.gens[h];
                    !(*off < h.durable || (!here_on_disk && *off < h.committed))
                }
                _ => true,
            }
        });
        Some((g.file.clone(), pages))
    }

    /// Append a commit record if records were appended since the last one: replay after a
    /// crash of the process keeps them (nothing is synced).
    pub fn commit(&self) -> Result<()> {
        let mut log = self.log();
        if log.uncommitted {
            self.append_locked(&mut log, KIND_COMMIT, 0, 0, &[])?;
        }
        Ok(())
    }

    /// How long ago generation `id` was started; `None` if it is gone.
    pub fn age(&self, id: u64) -> Option<std::time::Duration> {
        Some(self.log().gens.get(&id)?.created.elapsed())
    }

    /// Generations older than the active one, oldest first.
    pub fn frozen_ids(&self) -> Vec<u64> {
        let log = self.log();
        log.gens
            .keys()
            .copied()
            .filter(|&g| g != log.active)
            .collect()
    }

    /// Forget a checkpointed generation and delete its file.
    pub fn retire(&self, id: u64) -> Result<()> {
        let removed = {
            let mut log = self.log();
            let removed = log.gens.remove(&id);
            if let Some(g) = &removed {
                for (p, loc) in &g.pages {
                    if log.index.get(p) == Some(&(id, *loc)) {
                        log.index.remove(p);
                    }
                }
            }
            removed
        };
        if removed.is_some() {
            let path = gen_path(&self.dir, id);
            std::fs::remove_file(&path)
                .map_err(|e| io(format!("remove checkpointed {}", path.display()), e))?;
        }
        Ok(())
    }

    /// Bytes in the active generation, and in all generations.
    pub fn sizes(&self) -> (u64, u64) {
        let log = self.log();
        (
            log.gens[&log.active].len,
            log.gens.values().map(|g| g.len).sum(),
        )
    }

    /// Pages the buffer holds a version of (for memory accounting).
    pub fn mapped_pages(&self) -> usize {
        self.log().index.len()
    }
}

/// The newest place of each page in `pages` (in the order written), in page order.
fn newest_in(pages: &[(u64, Loc)]) -> Vec<(u64, Loc)> {
    let mut newest: PageMap<Loc> = PageMap::default();
    newest.reserve(pages.len());
    for (p, l) in pages {
        newest.insert(*p, *l);
    }
    let mut out: Vec<(u64, Loc)> = newest.into_iter().collect();
    out.sort_unstable_by_key(|(p, _)| *p);
    out
}

/// Write a record's header and payload at `at`: one `pwritev`, no copy.
fn write_record(file: &File, header: &[u8], payload: &[u8], at: u64) -> std::io::Result<()> {
    let iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    let off =
        libc::off_t::try_from(at).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: both iovecs describe live slices that the kernel only reads; the descriptor is
    // valid while `file` is.
    let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), 2, off) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // A short write (rare: a signal, a nearly full disk) finishes piece by piece.
    let n = n as usize;
    if n < header.len() {
        file.write_all_at(&header[n..], at + n as u64)?;
        file.write_all_at(payload, at + header.len() as u64)
    } else {
        let done = n - header.len();
        file.write_all_at(&payload[done..], at + n as u64)
    }
}

fn new_gen_file(dir: &Path, id: u64) -> Result<File> {
    let path = gen_path(dir, id);
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io(format!("create write buffer {}", path.display()), e))?;
    Ok(f)
}

/// Make the directory's entries (new generations) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What replaying one generation found: its pages in the order written, its length after the
/// cut, what was replayed, and the newest sequence number.
type Replay = (Vec<(u64, Loc)>, u64, Replayed, u64);

/// Replay one generation: apply records up to the last commit, cut the rest.
fn replay(file: &File, page_size: usize, path: &Path) -> Result<Replay> {
    let len = file
        .metadata()
        .map_err(|e| io(format!("stat {}", path.display()), e))?
        .len();
    let mut pages = Vec::new();
    let mut pending: Vec<(u64, u32, Option<u64>)> = Vec::new();
    let mut pos = 0u64;
    let mut committed_end = 0u64;
    let mut records = 0u64;
    let mut last_seq = 0u64;
    let mut h = [0u8; HEADER_LEN as usize];
    while pos + HEADER_LEN <= len {
        if file.read_exact_at(&mut h, pos).is_err() {
            break;
        }
        if u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) != MAGIC {
            break;
        }
        let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let kind = h[16];
        let page = u64::from_le_bytes(h[20..28].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(h[28..32].try_into().expect("4 bytes"));
        let payload_len = if kind == KIND_WRITE {
            u64::from(count) * page_size as u64
        } else {
            0
        };
        if !matches!(kind, KIND_WRITE | KIND_ZERO | KIND_COMMIT)
            || pos + HEADER_LEN + payload_len > len
        {
            break;
        }
        let mut payload = vec![0u8; payload_len as usize];
        if file.read_exact_at(&mut payload, pos + HEADER_LEN).is_err() {
            break;
        }
        if crc32c::crc32c_append(crc32c::crc32c(&h[8..]), &payload) != crc {
            tracing::warn!(file = %path.display(), offset = pos, "write buffer record fails its checksum; replay stops here");
            break;
        }
        last_seq = seq;
        match kind {
            KIND_COMMIT => {
                for (p, n, data) in pending.drain(..) {
                    for i in 0..u64::from(n) {
                        let loc = match data {
                            Some(off) => Loc::Data(off + i * page_size as u64),
                            None => Loc::Zero,
                        };
                        pages.push((p + i, loc));
                    }
                    records += 1;
                }
                committed_end = pos + HEADER_LEN;
            }
            KIND_WRITE => pending.push((page, count, Some(pos + HEADER_LEN))),
            _ => pending.push((page, count, None)),
        }
        pos += HEADER_LEN + payload_len;
    }
    if committed_end < len {
        file.set_len(committed_end)
            .map_err(|e| io(format!("cut the uncommitted tail of {}", path.display()), e))?;
        file.sync_all()
            .map_err(|e| io(format!("sync {}", path.display()), e))?;
    }
    Ok((
        pages,
        committed_end,
        Replayed {
            records,
            dropped: len - committed_end,
        },
        last_seq,
    ))
}

#[cfg(test)]
mod tests;
