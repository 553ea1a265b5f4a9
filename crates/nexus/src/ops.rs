//! The operations a nexus sends to one child, and how one child I/O is run: counted as
//! outstanding, under the child's timeout, with what the child lacks emulated.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use strata_bdev::{
    write_zeroes_by_writing, BlockDevice, Capabilities, Error, ErrorKind, Extent, Geometry, Result,
    WriteOpts, ZeroOpts,
};

use crate::dirty::DirtyMap;
use crate::nexus::Target;
use crate::status::ChildState;

/// Operations on one child, emulating what it lacks so that every child ends with the same
/// bytes: FUA as write-then-flush, trim and write-zeroes as zeroing (by writes if need be),
/// block status as "all data", flush as nothing when it has no volatile cache.
pub(crate) mod child_io {
    use super::*;

    async fn settle(dev: &dyn BlockDevice, fua: bool) -> Result<()> {
        if fua && dev.capabilities().flush {
            dev.flush().await
        } else {
            Ok(())
        }
    }

    pub(crate) async fn write(
        dev: &dyn BlockDevice,
        offset: u64,
        data: Bytes,
        opts: WriteOpts,
    ) -> Result<()> {
        if !opts.fua || dev.capabilities().fua {
            return dev.write_at(offset, data, opts).await;
        }
        dev.write_at(offset, data, WriteOpts { fua: false }).await?;
        settle(dev, true).await
    }

    pub(crate) async fn zeroes(
        dev: &dyn BlockDevice,
        offset: u64,
        len: u64,
        opts: ZeroOpts,
    ) -> Result<()> {
        let caps = dev.capabilities();
        if caps.write_zeroes {
            let fua_ok = !opts.fua || caps.fua;
            let o = ZeroOpts {
                fua: opts.fua && caps.fua,
                // The nexus never promises fast zeroing; children zero however they can.
                fast_only: false,
                ..opts
            };
            dev.write_zeroes(offset, len, o).await?;
            return settle(dev, !fua_ok).await;
        }
        let o = ZeroOpts {
            fast_only: false,
            ..opts
        };
        write_zeroes_by_writing(dev, offset, len, o).await
    }

    pub(crate) async fn trim(
        dev: &dyn BlockDevice,
        offset: u64,
        len: u64,
        opts: WriteOpts,
    ) -> Result<()> {
        let caps = dev.capabilities();
        if caps.trim {
            dev.trim(
                offset,
                len,
                WriteOpts {
                    fua: opts.fua && caps.fua,
                },
            )
            .await?;
            return settle(dev, opts.fua && !caps.fua).await;
        }
        let zero = ZeroOpts {
            fua: opts.fua,
            may_trim: true,
            fast_only: false,
        };
        zeroes(dev, offset, len, zero).await
    }

    pub(crate) async fn flush(dev: &dyn BlockDevice) -> Result<()> {
        if dev.capabilities().flush {
            dev.flush().await
        } else {
            Ok(())
        }
    }

    pub(crate) async fn block_status(
        dev: &dyn BlockDevice,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        if dev.capabilities().block_status {
            dev.block_status(offset, len).await
        } else {
            Ok(vec![Extent::data(len)])
        }
    }
}

/// A front-end operation as the nexus sends it to one child. `Display` names it for error
/// messages and fault reasons ("write 4096 bytes at offset 0 to"); it is formatted only when
/// something failed, never on the way of an I/O that succeeds.
pub(crate) trait ChildOp: fmt::Display + Sync {
    type Output: Send;

    /// The bytes it changes (for the range lock and dirty maps); `None` for reads and flush.
    fn range(&self) -> Option<(u64, u64)> {
        None
    }

    /// Run it on one child, borrowing the child from the caller's view.
    fn run<'a>(
        &'a self,
        dev: &'a dyn BlockDevice,
    ) -> impl Future<Output = Result<Self::Output>> + Send + 'a;
}

pub(crate) struct ReadOp {
    pub(crate) offset: u64,
    pub(crate) len: usize,
}

impl fmt::Display for ReadOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "read {} bytes at offset {} from", self.len, self.offset)
    }
}

impl ChildOp for ReadOp {
    type Output = Bytes;

    fn run<'a>(
        &'a self,
        dev: &'a dyn BlockDevice,
    ) -> impl Future<Output = Result<Bytes>> + Send + 'a {
        dev.read_at(self.offset, self.len)
    }
}

pub(crate) struct StatusOp {
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl fmt::Display for StatusOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "query block status of {} bytes at offset {} on",
            self.len, self.offset
        )
    }
}

impl ChildOp for StatusOp {
    type Output = Vec<Extent>;

    fn run<'a>(
        &'a self,
        dev: &'a dyn BlockDevice,
    ) -> impl Future<Output = Result<Vec<Extent>>> + Send + 'a {
        child_io::block_status(dev, self.offset, self.len)
    }
}

pub(crate) struct WriteOp {
    pub(crate) offset: u64,
    pub(crate) data: Bytes,
    pub(crate) opts: WriteOpts,
}

impl fmt::Display for WriteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "write {} bytes at offset {} to",
            self.data.len(),
            self.offset
        )
    }
}

impl ChildOp for WriteOp {
    type Output = ();

    fn range(&self) -> Option<(u64, u64)> {
        Some((self.offset, self.data.len() as u64))
    }

    fn run<'a>(&'a self, dev: &'a dyn BlockDevice) -> impl Future<Output = Result<()>> + Send + 'a {
        child_io::write(dev, self.offset, self.data.clone(), self.opts)
    }
}

pub(crate) struct FlushOp;

impl fmt::Display for FlushOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("flush")
    }
}

impl ChildOp for FlushOp {
    type Output = ();

    fn run<'a>(&'a self, dev: &'a dyn BlockDevice) -> impl Future<Output = Result<()>> + Send + 'a {
        child_io::flush(dev)
    }
}

pub(crate) struct TrimOp {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) opts: WriteOpts,
}

impl fmt::Display for TrimOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "trim {} bytes at offset {} on", self.len, self.offset)
    }
}

impl ChildOp for TrimOp {
    type Output = ();

    fn range(&self) -> Option<(u64, u64)> {
        Some((self.offset, self.len))
    }

    fn run<'a>(&'a self, dev: &'a dyn BlockDevice) -> impl Future<Output = Result<()>> + Send + 'a {
        child_io::trim(dev, self.offset, self.len, self.opts)
    }
}

pub(crate) struct ZeroOp {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) opts: ZeroOpts,
}

impl fmt::Display for ZeroOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "write zeroes over {} bytes at offset {} on",
            self.len, self.offset
        )
    }
}

impl ChildOp for ZeroOp {
    type Output = ();

    fn range(&self) -> Option<(u64, u64)> {
        Some((self.offset, self.len))
    }

    fn run<'a>(&'a self, dev: &'a dyn BlockDevice) -> impl Future<Output = Result<()>> + Send + 'a {
        child_io::zeroes(dev, self.offset, self.len, self.opts)
    }
}

/// A child as [`Nexus::assemble`] takes it: name, device, state and dirty map.
pub(crate) type NewSlot = (String, Arc<dyn BlockDevice>, ChildState, Option<DirtyMap>);

/// Stands in for a child whose device could not be opened: every I/O fails, saying why.
#[derive(Debug)]
pub(crate) struct Absent {
    pub(crate) geometry: Geometry,
    pub(crate) caps: Capabilities,
    pub(crate) why: String,
}

impl Absent {
    fn fail<T>(&self) -> Result<T> {
        Err(Error::new(ErrorKind::Io, self.why.clone()))
    }
}

#[async_trait]
impl BlockDevice for Absent {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn read_at(&self, _offset: u64, _len: usize) -> Result<Bytes> {
        self.fail()
    }

    async fn write_at(&self, _offset: u64, _data: Bytes, _opts: WriteOpts) -> Result<()> {
        self.fail()
    }

    async fn flush(&self) -> Result<()> {
        self.fail()
    }

    async fn trim(&self, _offset: u64, _len: u64, _opts: WriteOpts) -> Result<()> {
        self.fail()
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _opts: ZeroOpts) -> Result<()> {
        self.fail()
    }

    async fn block_status(&self, _offset: u64, _len: u64) -> Result<Vec<Extent>> {
        self.fail()
    }

    async fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        self.fail()
    }
}

/// Counts an I/O as outstanding on a child until dropped.
pub(crate) struct Outstanding<'a>(&'a AtomicUsize);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Run one child I/O, counting it as outstanding and applying the child's timeout.
pub(crate) async fn call<T>(t: &Target, fut: impl Future<Output = Result<T>>) -> Result<T> {
    t.outstanding.fetch_add(1, Ordering::Relaxed);
    let _count = Outstanding(&t.outstanding);
    match t.timeout {
        None => fut.await,
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::TimedOut,
                format!("child {} did not answer within {limit:?}", t.name),
            )),
        },
    }
}
