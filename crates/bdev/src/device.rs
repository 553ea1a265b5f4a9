//! The [`BlockDevice`] trait that every layer implements and consumes.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};

/// The shape of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes.
    pub size: u64,
    /// The smallest unit of I/O: offsets and lengths must be multiples of it (1 = byte granular).
    pub block_size: u32,
    /// The I/O size the device handles best (a multiple of `block_size`).
    pub optimal_io_size: u32,
}

/// What a device can do beyond read, write and flush. The defaults are the conservative answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes are refused.
    pub read_only: bool,
    /// `flush` makes earlier writes durable (false: writes are durable, or can never be made so).
    pub flush: bool,
    /// `WriteOpts::fua` is honoured natively.
    pub fua: bool,
    /// `trim` releases space.
    pub trim: bool,
    /// `write_zeroes` is done natively (not by writing buffers of zeroes).
    pub write_zeroes: bool,
    /// `write_zeroes` with `fast_only` succeeds whenever zeroing is faster than writing.
    pub fast_zero: bool,
    /// `block_status` reports real allocation rather than "all data".
    pub block_status: bool,
    /// Several clients may use the device at once and a flush from any of them covers the writes
    /// of all: the device has one consistent state and one durable cache.
    pub multi_conn: bool,
    /// The device can change size while open.
    pub resize: bool,
}

/// Flags for writes, trims and zeroing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOpts {
    /// Force unit access: the data is durable when the call returns.
    pub fua: bool,
}

/// Flags for [`BlockDevice::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroOpts {
    /// Force unit access, as for writes.
    pub fua: bool,
    /// The range may be deallocated (a hole) rather than allocated zeroes.
    pub may_trim: bool,
    /// Fail with [`ErrorKind::Unsupported`] at once rather than zero slowly.
    pub fast_only: bool,
}

/// The state of one run of bytes, as `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// No storage is allocated for the run.
    pub hole: bool,
    /// The run reads as zeroes.
    pub zero: bool,
}

impl Extent {
    /// An allocated run of data.
    pub fn data(len: u64) -> Extent {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    /// An unallocated run that reads as zeroes.
    pub fn hole(len: u64) -> Extent {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }
}

/// A block device: a flat range of bytes with asynchronous I/O.
///
/// Offsets and lengths are bytes and must lie within [`Geometry::size`] and be multiples of
/// [`Geometry::block_size`]; implementations check (see [`check_io`]) and answer
/// [`ErrorKind::OutOfRange`] or [`ErrorKind::InvalidInput`]. Optional operations have honest
/// defaults: zeroing writes zeroes, block status reports all data, trim is refused.
#[async_trait]
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// Size and block sizes.
    fn geometry(&self) -> Geometry;

    /// What the device can do.
    fn capabilities(&self) -> Capabilities;

    /// Read `len` bytes at `offset`.
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes>;

    /// Write `data` at `offset`.
    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()>;

    /// Make every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// Release the storage behind a range. What the range reads afterwards is device-specific
    /// (every Strata device reads zeroes).
    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        let _ = (offset, len, opts);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("trim on {self:?}"),
        ))
    }

    /// Make a range read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        write_zeroes_by_writing(self, offset, len, opts).await
    }

    /// Describe the allocation of a prefix of `[offset, offset + len)`: at least one extent,
    /// contiguous from `offset`, covering at most `len` bytes.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_io(self.geometry(), "query block status", offset, len)?;
        Ok(vec![Extent::data(len)])
    }

    /// Hint that a range will be read soon. The default does nothing, which the hint allows.
    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_io(self.geometry(), "prefetch", offset, len)
    }
}

/// The largest buffer [`write_zeroes_by_writing`] writes at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// Zero a range by writing buffers of zeroes: the fallback for devices without native zeroing.
pub async fn write_zeroes_by_writing<D: BlockDevice + ?Sized>(
    dev: &D,
    offset: u64,
    len: u64,
    opts: ZeroOpts,
) -> Result<()> {
    check_io(dev.geometry(), "write zeroes", offset, len)?;
    if opts.fast_only {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "write zeroes fast: this device zeroes by writing, which is not faster than a write",
        ));
    }
    let zeroes = Bytes::from(vec![0u8; len.min(ZERO_CHUNK) as usize]);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        dev.write_at(
            offset + done,
            zeroes.slice(..n as usize),
            WriteOpts::default(),
        )
        .await?;
        done += n;
    }
    if opts.fua {
        dev.flush().await?;
    }
    Ok(())
}

/// Check that `[offset, offset + len)` lies on the device and is aligned to its block size;
/// `what` names the operation for the error message.
pub fn check_io(geometry: Geometry, what: &str, offset: u64, len: u64) -> Result<()> {
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > geometry.size) {
        return Err(Error::new(
            ErrorKind::OutOfRange,
            format!(
                "{what}: {len} bytes at offset {offset} reach past the end of the device ({} bytes)",
                geometry.size
            ),
        ));
    }
    let bs = u64::from(geometry.block_size.max(1));
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what}: {len} bytes at offset {offset} are not aligned to the {bs}-byte block size"),
        ));
    }
    Ok(())
}

/// A refusal to write to a read-only device.
pub fn read_only_error(what: &str) -> Error {
    Error::new(
        ErrorKind::PermissionDenied,
        format!("{what}: the device is read-only"),
    )
}

/// Conveniences over any [`BlockDevice`].
#[async_trait]
pub trait BlockDeviceExt: BlockDevice {
    /// The size in bytes.
    fn size(&self) -> u64 {
        self.geometry().size
    }

    /// Write a slice (copying it once into a buffer the device may keep).
    async fn write_slice_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_at(offset, Bytes::copy_from_slice(data), WriteOpts::default())
            .await
    }
}

impl<T: BlockDevice + ?Sized> BlockDeviceExt for T {}

/// A device whose writes can be grouped into transactions (the page store; the NBD
/// transaction extension drives it).
#[async_trait]
pub trait Transactional: Send + Sync + fmt::Debug {
    /// Begin a transaction: it reads the device as it is now, plus its own writes.
    async fn begin(&self) -> Result<Box<dyn Transaction>>;
}

/// One open transaction. Dropping it rolls it back.
#[async_trait]
pub trait Transaction: Send + Sync + fmt::Debug {
    /// Read: the transaction's own writes, else the device as it was when it began.
    async fn read(&mut self, offset: u64, len: usize) -> Result<Bytes>;
    /// Write, visible to this transaction only until it commits.
    async fn write(&mut self, offset: u64, data: Bytes) -> Result<()>;
    /// Make a range read as zeroes, visible to this transaction only until it commits.
    async fn zero(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Hold the device's write lock until the transaction ends; `false` if it can no longer
    /// commit (then only a rollback is useful).
    async fn lock(&mut self) -> Result<bool>;
    /// Apply every write at once, durably, or none ([`ErrorKind::Conflict`] and others). The
    /// transaction is over either way.
    async fn commit(self: Box<Self>) -> Result<()>;
    /// Throw the transaction away.
    async fn rollback(self: Box<Self>);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(size: u64, block_size: u32) -> Geometry {
        Geometry {
            size,
            block_size,
            optimal_io_size: block_size,
        }
    }

    #[test]
    fn check_io_bounds_and_alignment() {
        assert!(check_io(geo(4096, 1), "read", 0, 4096).is_ok());
        assert!(check_io(geo(4096, 1), "read", 4096, 0).is_ok());
        assert_eq!(
            check_io(geo(4096, 1), "read", 4095, 2).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            check_io(geo(4096, 1), "read", u64::MAX, 2)
                .unwrap_err()
                .kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            check_io(geo(8192, 512), "read", 1, 512).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}
