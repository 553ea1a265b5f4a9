//! Transactions: writes that commit together or not at all, reading a snapshot taken at BEGIN.
//!
//! ```text
//!  BEGIN ─► note the image's change counter (waits for plain writes in flight)
//!  WRITE / ZERO ─► kept in memory, at most `max_txn_bytes`
//!  READ ─► own writes, else each page as it was at BEGIN (the undo log), else as it is
//!  LOCK ─► take the image's write lock (plain writes wait), answer whether a page this
//!          transaction read or wrote was changed since BEGIN
//!  COMMIT ─► LOCK, then one WAL append ending in a commit record, fdatasync
//! ```
//!
//! While transactions are open, every change to a page records what the page was before it
//! (`Versions::undo`), once per page and open transaction at most: a transaction reads the
//! version that was current at its BEGIN, and a change after its BEGIN to a page it touched is
//! a conflict. With no transaction open, writes pay one atomic load.
//!
//! A transaction lives at most `txn_timeout`; then it is rolled back, its lock released, and
//! every later command in it is answered with the reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use strata_bdev::{check_io, Error, ErrorKind, Result};
use tokio::sync::OwnedRwLockWriteGuard;

use super::read::Src;
use super::{Image, Inner};
use crate::wal::Wal;

/// Page versions kept for open transactions.
#[derive(Debug, Default)]
pub(crate) struct Versions {
    /// Changes made while transactions were open (a counter).
    seq: u64,
    /// Open transactions: id → the change counter at their BEGIN.
    open: BTreeMap<u64, u64>,
    next_id: u64,
    /// Per page changed while transactions were open: (change number, what the page was just
    /// before that change), oldest first.
    undo: HashMap<u64, Vec<(u64, Src)>>,
}

impl Versions {
    /// Record that `page`, which was `prior`, changes now (change number `self.seq`).
    fn record(&mut self, page: u64, prior: Src) {
        let newest_begin = self.open.values().copied().max().unwrap_or(0);
        let list = self.undo.entry(page).or_default();
        // Every open transaction began before the last recorded change: it is the one they
        // read through, and this change adds nothing they need.
        if list.last().is_some_and(|(seq, _)| *seq > newest_begin) {
            return;
        }
        list.push((self.seq, prior));
    }

    /// The version of `page` current at change `begin`, if it changed since.
    fn as_of(&self, page: u64, begin: u64) -> Option<&Src> {
        self.undo
            .get(&page)?
            .iter()
            .find(|(seq, _)| *seq > begin)
            .map(|(_, s)| s)
    }

    /// Forget transaction `id`, and the versions no open transaction needs any more.
    fn close(&mut self, id: u64) -> bool {
        if self.open.remove(&id).is_none() {
            return false;
        }
        match self.open.values().copied().min() {
            None => self.undo.clear(),
            Some(oldest) => self.undo.retain(|_, list| {
                list.retain(|(seq, _)| *seq > oldest);
                !list.is_empty()
            }),
        }
        true
    }
}

impl Inner {
    /// Apply a change of pages `first..first + count` (`f` appends it to the write buffer and
    /// says whether it did), keeping their previous versions for open transactions. Callers
    /// hold `writers` shared (or alone), so no transaction begins meanwhile.
    pub(super) fn apply(
        &self,
        first: u64,
        count: u64,
        f: impl FnOnce(&Wal) -> Result<bool>,
    ) -> Result<bool> {
        let wal = self.wal()?;
        if self.txn.open.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return f(wal);
        }
        let mut v = self.txn.versions.lock().expect("lock");
        if v.open.is_empty() {
            return f(wal);
        }
        let prior = self.sources(first, count);
        if !f(wal)? {
            return Ok(false);
        }
        v.seq += 1;
        for (i, src) in prior.into_iter().enumerate() {
            v.record(first + i as u64, src);
        }
        Ok(true)
    }

    fn end_txn(&self, id: u64) {
        if self.txn.versions.lock().expect("lock").close(id) {
            self.txn
                .open
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Why a transaction can no longer commit, shared with its timer.
type Doom = Arc<tokio::sync::watch::Sender<Option<String>>>;

/// An open transaction on an image (see the module docs). Dropping it rolls it back.
pub struct Transaction {
    inner: Arc<Inner>,
    id: u64,
    begin: u64,
    /// Pages written: data, or `None` for zeroes.
    writes: BTreeMap<u64, Option<Bytes>>,
    bytes: u64,
    /// Pages read, as ranges `start → end` (merged).
    reads: BTreeMap<u64, u64>,
    /// The image's write lock, once taken; the timer takes it away at the deadline.
    lock: Arc<Mutex<Option<OwnedRwLockWriteGuard<()>>>>,
    doom: Doom,
    timer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "transaction {} on image {} ({} pages written)",
            self.id,
            self.inner.name,
            self.writes.len()
        )
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        self.timer.abort();
        self.lock.lock().expect("lock").take();
        self.inner.end_txn(self.id);
    }
}

fn conflict(why: String) -> Error {
    Error::new(ErrorKind::Conflict, why)
}

impl Image {
    /// Begin a transaction. Plain writes already in flight land before it.
    pub async fn begin(&self) -> Result<Transaction> {
        let inner = &self.inner;
        inner.wal()?;
        inner.check_fenced("begin a transaction on")?;
        let timeout = inner.store.settings.txn_timeout;
        let (id, begin) = {
            // Alone for a moment: a plain write checks for open transactions and applies under
            // the shared lock, so none is between the two while this one begins.
            let _quiet = tokio::time::timeout(timeout, inner.txn.writers.write())
                .await
                .map_err(|_| {
                    conflict(format!(
                        "begin a transaction on image {}: another transaction held the write \
                         lock for {timeout:?}; try again",
                        inner.name
                    ))
                })?;
            let mut v = inner.txn.versions.lock().expect("lock");
            let id = v.next_id;
            v.next_id += 1;
            let begin = v.seq;
            v.open.insert(id, begin);
            inner
                .txn
                .open
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            (id, begin)
        };
        let lock: Arc<Mutex<Option<OwnedRwLockWriteGuard<()>>>> = Arc::new(Mutex::new(None));
        let doom: Doom = Arc::new(tokio::sync::watch::Sender::new(None));
        let timer = {
            let (inner, lock, doom) = (inner.clone(), lock.clone(), doom.clone());
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                doom.send_modify(|d| {
                    d.get_or_insert(format!(
                        "the transaction was open longer than {timeout:?} and was rolled back"
                    ));
                });
                lock.lock().expect("lock").take();
                inner.end_txn(id);
                tracing::warn!(image = %inner.name, transaction = id, "transaction timed out; rolled back");
            })
        };
        Ok(Transaction {
            inner: inner.clone(),
            id,
            begin,
            writes: BTreeMap::new(),
            bytes: 0,
            reads: BTreeMap::new(),
            lock,
            doom,
            timer,
        })
    }
}

impl Transaction {
    fn doomed(&self) -> Option<String> {
        self.doom.borrow().clone()
    }

    fn check(&self) -> Result<()> {
        match self.doomed() {
            None => Ok(()),
            Some(why) => Err(conflict(why)),
        }
    }

    fn doom(&self, why: String) {
        self.doom.send_modify(|d| {
            d.get_or_insert(why);
        });
    }

    fn page_range(&self, what: &str, offset: u64, len: u64) -> Result<(u64, u64)> {
        let inner = &self.inner;
        check_io(inner.geometry(), what, offset, len)?;
        let ps = inner.page_size as u64;
        if !offset.is_multiple_of(ps) || !len.is_multiple_of(ps) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{what} in a transaction: offset and length must be multiples of the page size ({ps} bytes)"),
            ));
        }
        Ok(inner.first_and_count(offset, len))
    }

    fn note_read(&mut self, first: u64, count: u64) {
        let (mut start, mut end) = (first, first + count);
        // Merge with ranges that touch or overlap.
        let touching: Vec<(u64, u64)> = self
            .reads
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.reads.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.reads.insert(start, end);
    }

    fn was_read(&self, page: u64) -> bool {
        self.reads
            .range(..=page)
            .next_back()
            .is_some_and(|(_, e)| page < *e)
    }

    fn add(&mut self, page: u64, data: Option<Bytes>) -> Result<()> {
        let limit = self.inner.store.settings.max_txn_bytes;
        let cost = data.as_ref().map_or(16, |d| d.len() as u64 + 16);
        if self.bytes + cost > limit {
            let why = format!(
                "the transaction is larger than max_txn_bytes ({limit} bytes) and can no longer \
                 commit; roll it back"
            );
            self.doom(why.clone());
            return Err(Error::new(ErrorKind::NoSpace, why));
        }
        if let Some(old) = self.writes.insert(page, data) {
            self.bytes -= old.map_or(16, |d| d.len() as u64 + 16);
        }
        self.bytes += cost;
        Ok(())
    }

    /// Read `len` bytes at `offset`: this transaction's writes, else the image as it was at
    /// BEGIN.
    pub async fn read(&mut self, offset: u64, len: usize) -> Result<Bytes> {
        self.check()?;
        let (first, count) = self.page_range("read", offset, len as u64)?;
        let inner = self.inner.clone();
        let srcs: Vec<Src> = {
            let v = inner.txn.versions.lock().expect("lock");
            let live = inner.sources(first, count);
            live.into_iter()
                .enumerate()
                .map(|(i, s)| {
                    let page = first + i as u64;
                    if self.writes.contains_key(&page) {
                        Src::Zero
                    } else {
                        v.as_of(page, self.begin).cloned().unwrap_or(s)
                    }
                })
                .collect()
        };
        let mut out = inner.read_sources(first, &srcs, offset, len).await?;
        let ps = inner.page_size;
        for (page, data) in self.writes.range(first..first + count) {
            let at = (page - first) as usize * ps;
            match data {
                Some(d) => out[at..at + ps].copy_from_slice(d),
                None => out[at..at + ps].fill(0),
            }
        }
        self.note_read(first, count);
        Ok(out.freeze())
    }

    /// Write whole pages at `offset`.
    pub async fn write(&mut self, offset: u64, data: Bytes) -> Result<()> {
        self.check()?;
        let (first, count) = self.page_range("write", offset, data.len() as u64)?;
        let ps = self.inner.page_size;
        for i in 0..count as usize {
            self.add(first + i as u64, Some(data.slice(i * ps..(i + 1) * ps)))?;
        }
        Ok(())
    }

    /// Make whole pages at `offset` read as zeroes.
    pub async fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check()?;
        let (first, count) = self.page_range("write zeroes", offset, len)?;
        for p in first..first + count {
            self.add(p, None)?;
        }
        Ok(())
    }

    /// A page this transaction read or wrote that someone changed since BEGIN.
    fn conflict_in(&self, v: &Versions) -> Option<u64> {
        v.undo.iter().find_map(|(page, list)| {
            let changed = list.last().is_some_and(|(seq, _)| *seq > self.begin);
            (changed && (self.writes.contains_key(page) || self.was_read(*page))).then_some(*page)
        })
    }

    /// Take the image's write lock (plain writes and other commits wait until this transaction
    /// ends, at most until its deadline) and answer whether it can still commit.
    pub async fn lock(&mut self) -> Result<bool> {
        if self.doomed().is_some() {
            return Ok(false);
        }
        if self.lock.lock().expect("lock").is_some() {
            return Ok(true);
        }
        let writers = self.inner.txn.writers.clone();
        let mut doomed = self.doom.subscribe();
        let guard = tokio::select! {
            g = writers.write_owned() => g,
            _ = doomed.wait_for(Option::is_some) => return Ok(false),
        };
        if let Some(page) = self.conflict_in(&self.inner.txn.versions.lock().expect("lock")) {
            drop(guard);
            self.doom(format!(
                "page {page} was changed by another writer since BEGIN; roll back and retry"
            ));
            return Ok(false);
        }
        if self.doomed().is_some() {
            return Ok(false);
        }
        *self.lock.lock().expect("lock") = Some(guard);
        Ok(true)
    }

    /// Commit: every write of the transaction lands at once, durably, or (an error) none does.
    /// Either way the transaction is over.
    pub async fn commit(mut self) -> Result<()> {
        if !self.lock().await? {
            return Err(conflict(format!(
                "commit on image {}: {}",
                self.inner.name,
                self.doomed().unwrap_or_default()
            )));
        }
        let inner = self.inner.clone();
        // Hold the write lock here from now on: the deadline can no longer take it away.
        let held = self.lock.lock().expect("lock").take();
        let doom = self.doom.clone();
        let timed_out = || {
            conflict(format!(
                "commit on image {}: {}",
                inner.name,
                doom.borrow()
                    .clone()
                    .unwrap_or_else(|| "the transaction timed out".into())
            ))
        };
        if held.is_none() {
            return Err(timed_out());
        }
        let writes: Vec<(u64, Option<Bytes>)> =
            std::mem::take(&mut self.writes).into_iter().collect();
        if writes.is_empty() {
            return Ok(());
        }
        inner.check_fenced("commit to")?;
        let wal = inner.wal()?;
        {
            let mut v = inner.txn.versions.lock().expect("lock");
            // This transaction reads nothing any more; the others may still need the old pages.
            // If its deadline ended it first, plain writes may have gone unrecorded: refuse.
            if !v.close(self.id) || doom.borrow().is_some() {
                return Err(timed_out());
            }
            inner
                .txn
                .open
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            let prior: Vec<(u64, Src)> = if v.open.is_empty() {
                Vec::new()
            } else {
                writes
                    .iter()
                    .map(|(p, _)| (*p, inner.sources(*p, 1).pop().expect("one page")))
                    .collect()
            };
            wal.write_batch(&writes)?;
            v.seq += 1;
            for (p, s) in prior {
                v.record(p, s);
            }
        }
        // Others may go on while this one waits for the disk.
        drop(held);
        wal.flush().await
    }

    /// Throw the transaction away.
    pub fn rollback(self) {}
}

#[async_trait]
impl strata_bdev::Transaction for Transaction {
    async fn read(&mut self, offset: u64, len: usize) -> Result<Bytes> {
        Transaction::read(self, offset, len).await
    }

    async fn write(&mut self, offset: u64, data: Bytes) -> Result<()> {
        Transaction::write(self, offset, data).await
    }

    async fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        Transaction::zero(self, offset, len).await
    }

    async fn lock(&mut self) -> Result<bool> {
        Transaction::lock(self).await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        Transaction::commit(*self).await
    }

    async fn rollback(self: Box<Self>) {}
}

#[async_trait]
impl strata_bdev::Transactional for Image {
    async fn begin(&self) -> Result<Box<dyn strata_bdev::Transaction>> {
        Ok(Box::new(Image::begin(self).await?))
    }
}
