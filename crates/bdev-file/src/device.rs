//! [`FileDevice`]: a regular file or a block device as a [`BlockDevice`].

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use strata_bdev::{
    check_io, read_only_error, write_zeroes_by_writing, BlockDevice, Capabilities, Error,
    ErrorKind, Extent, Geometry, Result, WriteOpts, ZeroOpts,
};

use crate::buf::{AlignedBuf, ReadBuf, WriteBuf};
use crate::sys;
use crate::threads::{self, Pool};
use crate::uring::Ring;

/// The I/O size reported as optimal: a page.
const OPTIMAL_IO: u32 = 4096;
/// The direct I/O alignment assumed when neither the kernel (`statx` `STATX_DIOALIGN`, Linux
/// 6.1+) nor the device (`BLKSSZGET`) says: 4096 satisfies every common filesystem and disk,
/// where 512 would fail on 4K-sector disks. Opening checks it with one direct read.
const FALLBACK_DIRECT_ALIGN: u32 = 4096;
/// `block_status` answers at most this many extents per call (a prefix of the range).
const MAX_EXTENTS: usize = 1024;

/// Which I/O engine a device uses for reads, writes and flushes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring when the kernel allows it, else the thread pool.
    #[default]
    Auto,
    /// io_uring; opening fails if it is unavailable.
    Uring,
    /// `pread`/`pwrite` on tokio's blocking thread pool.
    Threads,
}

impl fmt::Display for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoEngine::Auto => "auto",
            IoEngine::Uring => "io_uring",
            IoEngine::Threads => "threads",
        })
    }
}

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// The size in bytes: required to create a missing file (which is created sparse); for an
    /// existing file or block device, if given, it must match — nothing is ever resized.
    pub size: Option<u64>,
    /// Bypass the page cache (`O_DIRECT`): I/O must then be aligned to the reported block size.
    pub direct: bool,
    /// The I/O engine.
    pub engine: IoEngine,
    /// Open read-only: writes, trims and zeroing fail with [`ErrorKind::PermissionDenied`].
    pub read_only: bool,
    /// Send every read and write to the engine. By default buffered I/O is first tried on the
    /// calling thread with `RWF_NOWAIT`, which completes page-cache hits without a handoff.
    pub engine_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular,
    Block,
}

/// The engine a device runs its reads, writes and flushes on: a closed set on the hot path, so
/// an enum rather than a trait object.
enum Engine {
    Uring(Ring),
    Threads(Pool),
}

impl Engine {
    fn kind(&self) -> IoEngine {
        match self {
            Engine::Uring(_) => IoEngine::Uring,
            Engine::Threads(_) => IoEngine::Threads,
        }
    }

    async fn read(&self, offset: u64, buf: ReadBuf) -> io::Result<ReadBuf> {
        match self {
            Engine::Uring(r) => r.read(offset, buf).await,
            Engine::Threads(p) => p.read(offset, buf).await,
        }
    }

    async fn write(&self, offset: u64, buf: WriteBuf, fua: bool) -> io::Result<()> {
        match self {
            Engine::Uring(r) => r.write(offset, buf, fua).await,
            Engine::Threads(p) => p.write(offset, buf, fua).await,
        }
    }

    async fn fdatasync(&self) -> io::Result<()> {
        match self {
            Engine::Uring(r) => r.fdatasync().await,
            Engine::Threads(p) => p.fdatasync().await,
        }
    }
}

/// A local file or block device.
///
/// Reads, writes and flushes go through the engine (io_uring or the thread pool); `fallocate`
/// (trim, zeroing), `lseek` (block status) and `posix_fadvise` (cache) run on tokio's blocking
/// pool. A writable device holds an exclusive `flock` on the file for as long as it is open.
///
/// Dropping the device waits for its in-flight I/O to finish (briefly blocking the dropping
/// thread), then closes the file and releases the lock.
pub struct FileDevice {
    // Dropped first: the ring thread finishes what is in flight before the file closes.
    engine: Engine,
    file: Arc<File>,
    path: PathBuf,
    kind: Kind,
    geometry: Geometry,
    read_only: bool,
    direct: bool,
    /// Memory alignment for direct I/O buffers (1 without `O_DIRECT`).
    mem_align: usize,
    /// A block device's logical sector size, which `fallocate` on it must be aligned to.
    sector: u64,
    /// `fallocate(PUNCH_HOLE)` works: on a file it deallocates; on a block device it zeroes
    /// without writing (the kernel refuses rather than falling back to writing).
    punch: bool,
    /// `fallocate(ZERO_RANGE)` may work: cleared at its first `EOPNOTSUPP`.
    zero_range: AtomicBool,
    /// Buffered I/O is first tried inline with `RWF_NOWAIT` (cleared if the kernel or the
    /// filesystem does not support it).
    nowait_read: AtomicBool,
    nowait_write: AtomicBool,
}

impl fmt::Debug for FileDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "file://{} ({} bytes, {}{}{})",
            self.path.display(),
            self.geometry.size,
            self.engine.kind(),
            if self.direct { ", direct" } else { "" },
            if self.read_only { ", read-only" } else { "" },
        )
    }
}

impl FileDevice {
    /// Open (or create) `path`. This makes blocking system calls (open, stat, lock, one direct
    /// read with `direct`, starting the ring thread); from async code, call it on a blocking
    /// thread, as [`FileOpener`](crate::FileOpener) does.
    ///
    /// A missing file is created sparse with `options.size` bytes (its directory must exist).
    /// An existing regular file keeps its length and a block device its size; `options.size`,
    /// if given, must match it.
    pub fn open(path: impl AsRef<Path>, options: FileOptions) -> Result<FileDevice> {
        let path = path.as_ref();
        let (file, created) = open_or_create(path, &options)?;
        FileDevice::setup(path, file, created, options).inspect_err(|_| {
            if created {
                if let Err(e) = std::fs::remove_file(path) {
                    tracing::warn!("remove {} after failing to set it up: {e}", path.display());
                }
            }
        })
    }

    fn setup(path: &Path, file: File, created: bool, options: FileOptions) -> Result<FileDevice> {
        let name = path.display();
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {name}"), e))?;
        let kind = if meta.file_type().is_file() {
            Kind::Regular
        } else if meta.file_type().is_block_device() {
            Kind::Block
        } else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("open {name}: it is neither a regular file nor a block device"),
            ));
        };
        if let Ok(Some(fs)) = sys::pseudo_filesystem(&file) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "open {name}: it is a {fs} interface of the kernel, not a disk image or a \
                     block device"
                ),
            ));
        }
        // It was opened non-blocking so that a FIFO could not hang the open; I/O must block (an
        // O_NONBLOCK file makes io_uring answer EAGAIN instead of waiting).
        sys::set_status_flags(&file, 0, libc::O_NONBLOCK)
            .map_err(|e| Error::io(format!("clear O_NONBLOCK on {name}"), e))?;

        if !options.read_only {
            sys::lock_exclusive(&file).map_err(|e| {
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    Error::with_source(
                        ErrorKind::PermissionDenied,
                        format!(
                            "open {name} for writing: it is in use (another process, or another \
                             device in this one, has it open for writing)"
                        ),
                        e,
                    )
                } else {
                    Error::io(format!("lock {name}"), e)
                }
            })?;
        }

        let size = settled_size(&file, path, kind, created, options.size)?;

        let sector = match kind {
            Kind::Block => u64::from(
                sys::logical_block_size(&file)
                    .map_err(|e| Error::io(format!("read the sector size of {name}"), e))?,
            ),
            Kind::Regular => 1,
        };
        let (block_size, mem_align) = if options.direct {
            direct_alignment(&file, path, kind, size)?
        } else {
            (1, 1)
        };

        let punch = !options.read_only
            && match kind {
                // Punching past the end is a harmless probe: it frees nothing, but a filesystem
                // without hole punching refuses it.
                Kind::Regular => sys::punch_hole(&file, size, u64::from(OPTIMAL_IO)).is_ok(),
                Kind::Block => sys::block_device_zeroes_fast(meta.rdev()),
            };

        let file = Arc::new(file);
        let engine = start_engine(&file, path, options.engine)?;
        tracing::info!(
            file = %name,
            engine = %engine.kind(),
            direct = options.direct,
            read_only = options.read_only,
            size,
            "opened file device"
        );
        Ok(FileDevice {
            engine,
            file,
            path: path.to_path_buf(),
            kind,
            geometry: Geometry {
                size,
                block_size,
                optimal_io_size: OPTIMAL_IO.max(block_size),
            },
            read_only: options.read_only,
            direct: options.direct,
            mem_align,
            sector,
            punch,
            zero_range: AtomicBool::new(!options.read_only),
            nowait_read: AtomicBool::new(!options.direct && !options.engine_only),
            nowait_write: AtomicBool::new(
                !options.direct && !options.read_only && !options.engine_only,
            ),
        })
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The engine in use ([`IoEngine::Uring`] or [`IoEngine::Threads`], never `Auto`).
    pub fn engine(&self) -> IoEngine {
        self.engine.kind()
    }

    /// Whether I/O bypasses the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Advertise `block_size` as the logical block size (`blk_size=` of `aio://` and
    /// `uring://`): offsets and lengths must then be multiples of it, as on a disk with that
    /// sector size. It must be a power of two from 512 to 4096 and a multiple of the alignment
    /// direct I/O needs already; the size becomes a whole number of blocks (rounded down).
    pub fn with_block_size(mut self, block_size: u32) -> Result<FileDevice> {
        let current = self.geometry.block_size.max(1);
        if !block_size.is_power_of_two() || !(512..=4096).contains(&block_size) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "open {}: a block size of {block_size} bytes; use 512, 1024, 2048 or 4096",
                    self.name()
                ),
            ));
        }
        if !block_size.is_multiple_of(current) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "open {}: a block size of {block_size} bytes is below the {current}-byte                      alignment its direct I/O needs",
                    self.name()
                ),
            ));
        }
        let size = self.geometry.size / u64::from(block_size) * u64::from(block_size);
        if size == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "open {}: it is smaller than one {block_size}-byte block",
                    self.name()
                ),
            ));
        }
        self.geometry = Geometry {
            size,
            block_size,
            optimal_io_size: self.geometry.optimal_io_size.max(block_size),
        };
        Ok(self)
    }

    fn name(&self) -> std::path::Display<'_> {
        self.path.display()
    }

    /// `fallocate` on the blocking pool.
    async fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let file = self.file.clone();
        threads::blocking(move || sys::fallocate(&file, mode, offset, len)).await
    }

    /// Zero `[offset, offset + len)` of a block device: `fallocate` on the sector-aligned middle
    /// (`mode`), buffers of zeroes on any unaligned head and tail (only possible without direct
    /// I/O, whose requests are sector-aligned already).
    async fn zero_block_device(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<()> {
        let start = offset.next_multiple_of(self.sector).min(offset + len);
        let end = ((offset + len) / self.sector * self.sector).max(start);
        if start > offset {
            write_zeroes_by_writing(self, offset, start - offset, ZeroOpts::default()).await?;
        }
        if end > start {
            self.fallocate(mode, start, end - start)
                .await
                .map_err(|e| {
                    Error::io(
                        format!(
                            "zero {} bytes at offset {start} of {} (fallocate)",
                            end - start,
                            self.name()
                        ),
                        e,
                    )
                })?;
        }
        if offset + len > end {
            write_zeroes_by_writing(self, end, offset + len - end, ZeroOpts::default()).await?;
        }
        Ok(())
    }

    /// Zero a range of a regular file as fast as it allows; `Ok(false)` if only writing zeroes
    /// is left.
    async fn zero_file_fast(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<bool> {
        const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if may_trim && self.punch {
            self.fallocate(PUNCH, offset, len).await?;
            return Ok(true);
        }
        if self.zero_range.load(Ordering::Relaxed) {
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len).await {
                Ok(()) => return Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::debug!(file = %self.name(), "fallocate(ZERO_RANGE) is not supported");
                    self.zero_range.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        if self.punch {
            // Deallocate, then allocate again: the range reads as zeroes and stays allocated.
            self.fallocate(PUNCH, offset, len).await?;
            match self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len).await {
                Ok(()) => {}
                // A filesystem that cannot preallocate leaves a hole, which reads as zeroes.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return Err(e),
            }
            return Ok(true);
        }
        Ok(false)
    }
}

/// Open `path`, creating it when missing (and allowed). Returns the file and whether it was
/// created.
fn open_or_create(path: &Path, options: &FileOptions) -> Result<(File, bool)> {
    let name = path.display();
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
    };
    match open() {
        Ok(file) => return Ok((file, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("open {name}"), e)),
    }
    if options.read_only {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("open {name} read-only: it does not exist"),
        ));
    }
    let Some(size) = options.size else {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "open {name}: it does not exist, and no size was given to create it with \
                 (e.g. file://{name}?size=1G)"
            ),
        ));
    };
    if size == 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("create {name}: the size must be above 0"),
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "create {name}: directory {} does not exist (it is not created for you)",
                    dir.display()
                ),
            ));
        }
    }
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
    {
        Ok(file) => Ok((file, true)),
        // Someone else created it just now: open theirs, and let the size check judge it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open()
            .map(|file| (file, false))
            .map_err(|e| Error::io(format!("open {name}"), e)),
        Err(e) => Err(Error::io(format!("create {name}"), e)),
    }
}

/// The size of an opened file or block device: set on a file just created, else read, and
/// checked against the size asked for (existing data is never resized).
fn settled_size(
    file: &File,
    path: &Path,
    kind: Kind,
    created: bool,
    want: Option<u64>,
) -> Result<u64> {
    let name = path.display();
    let size = match (kind, created, want) {
        (Kind::Regular, true, Some(size)) => {
            file.set_len(size)
                .map_err(|e| Error::io(format!("create {name} with {size} bytes"), e))?;
            size
        }
        (Kind::Regular, _, _) => {
            // Stat again: the size may have changed before the lock was ours.
            file.metadata()
                .map_err(|e| Error::io(format!("stat {name}"), e))?
                .len()
        }
        (Kind::Block, _, _) => sys::lseek(file, 0, libc::SEEK_END)
            .map_err(|e| Error::io(format!("find the size of block device {name}"), e))?,
    };
    if let Some(want) = want.filter(|&want| want != size) {
        let hint = match kind {
            Kind::Regular => format!(" (e.g. truncate -s {want} {name})"),
            Kind::Block => String::new(),
        };
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "open {name}: it is {size} bytes, but size={want} was asked for; Strata never \
                 resizes or truncates existing data: leave size= out to use it at {size} \
                 bytes, or resize it yourself first{hint}"
            ),
        ));
    }
    if size == 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "open {name}: it is empty (0 bytes); give it a size first (truncate -s 1G \
                 {name}), or remove it and open it with size= to have it created"
            ),
        ));
    }
    Ok(size)
}

/// Turn on `O_DIRECT` and work out its alignment: `(block size, memory alignment)`.
fn direct_alignment(file: &File, path: &Path, kind: Kind, size: u64) -> Result<(u32, usize)> {
    let name = path.display();
    let unsupported = |e: io::Error| {
        Error::with_source(
            ErrorKind::Unsupported,
            format!(
                "open {name} with direct=true: its filesystem does not support direct I/O \
                 (O_DIRECT); use direct=false"
            ),
            e,
        )
    };
    sys::set_status_flags(file, libc::O_DIRECT, 0).map_err(|e| {
        if e.raw_os_error() == Some(libc::EINVAL) {
            unsupported(e)
        } else {
            Error::io(format!("turn on O_DIRECT for {name}"), e)
        }
    })?;
    let (block, mem) = match sys::dio_alignment(file)
        .map_err(|e| Error::io(format!("stat {name} for its direct I/O alignment"), e))?
    {
        Some((0, _)) => return Err(unsupported(io::Error::from_raw_os_error(libc::EINVAL))),
        Some((block, mem)) => (block, mem),
        None => match kind {
            Kind::Block => {
                let sector = sys::logical_block_size(file)
                    .map_err(|e| Error::io(format!("read the sector size of {name}"), e))?;
                (sector, sector)
            }
            Kind::Regular => (FALLBACK_DIRECT_ALIGN, FALLBACK_DIRECT_ALIGN),
        },
    };
    if !block.is_power_of_two() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("open {name} with direct=true: odd direct I/O alignment {block}"),
        ));
    }
    // Over-aligning memory costs nothing, and keeps buffers in whole sectors.
    let mem_align = (mem.max(1) as usize)
        .next_power_of_two()
        .max(block as usize);
    if !size.is_multiple_of(u64::from(block)) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "open {name} with direct=true: its size, {size} bytes, is not a multiple of the \
                 {block}-byte block that direct I/O needs"
            ),
        ));
    }
    // Check the alignment with one direct read of the first block.
    let mut probe = AlignedBuf::zeroed(block as usize, mem_align).ok_or_else(|| {
        Error::new(
            ErrorKind::Io,
            format!("allocate {block} bytes for a direct read"),
        )
    })?;
    threads::read_full(file, 0, probe.as_mut_slice()).map_err(|e| {
        Error::io(
            format!("read {block} bytes at offset 0 of {name} with direct I/O"),
            e,
        )
    })?;
    Ok((block, mem_align))
}

fn start_engine(file: &Arc<File>, path: &Path, choice: IoEngine) -> Result<Engine> {
    let name = path.display();
    let pool = || Engine::Threads(Pool::new(file.clone()));
    match choice {
        IoEngine::Threads => Ok(pool()),
        IoEngine::Uring => Ring::start(file, name.to_string())
            .map(Engine::Uring)
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Unsupported,
                    format!("open {name} with io=uring: io_uring is not available"),
                    e,
                )
            }),
        IoEngine::Auto => match Ring::start(file, name.to_string()) {
            Ok(ring) => Ok(Engine::Uring(ring)),
            Err(e) => {
                tracing::info!(file = %name, "io_uring is not available ({e}); using the thread pool");
                Ok(pool())
            }
        },
    }
}

#[async_trait]
impl BlockDevice for FileDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.read_only;
        Capabilities {
            read_only: self.read_only,
            flush: true,
            fua: writable,
            trim: writable && self.punch,
            // A block device zeroes in the kernel (ZERO_RANGE), even where that means the
            // kernel writing zeroes; a file natively only if it can punch holes (ZERO_RANGE
            // support is only learnt by trying).
            write_zeroes: writable && (self.punch || self.kind == Kind::Block),
            fast_zero: writable && self.punch,
            block_status: self.kind == Kind::Regular,
            // One file, one page cache: a flush through any handle covers every write.
            multi_conn: true,
            resize: false,
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_io(self.geometry, "read", offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let what = || format!("read {len} bytes at offset {offset} of {}", self.name());
        let too_large = || {
            Error::new(
                ErrorKind::TooLarge,
                format!("{}: cannot allocate a buffer that large", what()),
            )
        };
        // Fast path: a page-cache hit completes here, on the caller's thread, with no handoff
        // to the engine and no zeroing of a buffer the read overwrites anyway. Anything else
        // (part of the range not cached, end of file) goes to the engine whole.
        if self.nowait_read.load(Ordering::Relaxed) {
            let mut v: Vec<u8> = Vec::new();
            v.try_reserve_exact(len).map_err(|_| too_large())?;
            match sys::pread_nowait(&self.file, &mut v.spare_capacity_mut()[..len], offset) {
                Ok(n) if n == len => {
                    // SAFETY: the kernel wrote all `len` bytes.
                    unsafe { v.set_len(len) };
                    return Ok(Bytes::from(v));
                }
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.nowait_read.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(Error::io(what(), e)),
            }
        }
        let buf =
            ReadBuf::zeroed(len, self.direct.then_some(self.mem_align)).ok_or_else(too_large)?;
        let buf = self
            .engine
            .read(offset, buf)
            .await
            .map_err(|e| Error::io(what(), e))?;
        Ok(buf.into_bytes())
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        if self.read_only {
            return Err(read_only_error("write"));
        }
        let len = data.len();
        check_io(self.geometry, "write", offset, len as u64)?;
        if len == 0 {
            return Ok(());
        }
        let what = || format!("write {len} bytes at offset {offset} of {}", self.name());
        // Fast path, as for reads: a buffered write the page cache takes at once completes
        // here. FUA writes go to the engine, which makes them durable.
        let (offset, data) = if !opts.fua && self.nowait_write.load(Ordering::Relaxed) {
            match sys::pwrite_nowait(&self.file, &data, offset) {
                Ok(n) if n == len => return Ok(()),
                Ok(n) => (offset + n as u64, data.slice(n..)),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => (offset, data),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.nowait_write.store(false, Ordering::Relaxed);
                    (offset, data)
                }
                Err(e) => return Err(Error::io(what(), e)),
            }
        } else {
            (offset, data)
        };
        let buf = if self.direct && !(data.as_ptr() as usize).is_multiple_of(self.mem_align) {
            // Direct I/O needs aligned memory: copy into a bounce buffer.
            WriteBuf::Aligned(AlignedBuf::copy_of(&data, self.mem_align).ok_or_else(|| {
                Error::new(
                    ErrorKind::TooLarge,
                    format!("{}: cannot allocate an aligned copy that large", what()),
                )
            })?)
        } else {
            WriteBuf::Bytes(data)
        };
        self.engine
            .write(offset, buf, opts.fua)
            .await
            .map_err(|e| Error::io(what(), e))
    }

    async fn flush(&self) -> Result<()> {
        self.engine
            .fdatasync()
            .await
            .map_err(|e| Error::io(format!("flush {} (fdatasync)", self.name()), e))
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        if self.read_only {
            return Err(read_only_error("trim"));
        }
        check_io(self.geometry, "trim", offset, len)?;
        if !self.punch {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "trim {}: it cannot deallocate ranges (fallocate PUNCH_HOLE is not supported)",
                    self.name()
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.kind {
            Kind::Regular => self.fallocate(mode, offset, len).await.map_err(|e| {
                Error::io(
                    format!("trim {len} bytes at offset {offset} of {}", self.name()),
                    e,
                )
            })?,
            Kind::Block => self.zero_block_device(mode, offset, len).await?,
        }
        if opts.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        if self.read_only {
            return Err(read_only_error("write zeroes"));
        }
        check_io(self.geometry, "write zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let slow = || {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "write zeroes fast to {}: it can only zero by writing zeroes",
                    self.name()
                ),
            )
        };
        match self.kind {
            Kind::Block => {
                // ZERO_RANGE on a block device falls back to the kernel writing zeroes; PUNCH_HOLE
                // never does (and may deallocate).
                if opts.fast_only && !self.punch {
                    return Err(slow());
                }
                let mode = if opts.may_trim && self.punch {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                self.zero_block_device(mode, offset, len).await?;
            }
            Kind::Regular => {
                let fast = self
                    .zero_file_fast(offset, len, opts.may_trim)
                    .await
                    .map_err(|e| {
                        Error::io(
                            format!(
                                "write zeroes to {len} bytes at offset {offset} of {}",
                                self.name()
                            ),
                            e,
                        )
                    })?;
                if !fast {
                    if opts.fast_only {
                        return Err(slow());
                    }
                    write_zeroes_by_writing(self, offset, len, ZeroOpts::default()).await?;
                }
            }
        }
        if opts.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_io(self.geometry, "query block status", offset, len)?;
        if len == 0 || self.kind == Kind::Block {
            // Block devices do not say what is allocated.
            return Ok(vec![Extent::data(len)]);
        }
        let file = self.file.clone();
        let block = u64::from(self.geometry.block_size.max(1));
        threads::blocking(move || sys::extents(&file, offset, len, block, MAX_EXTENTS))
            .await
            .map_err(|e| {
                Error::io(
                    format!(
                        "query block status of {len} bytes at offset {offset} of {}",
                        self.name()
                    ),
                    e,
                )
            })
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        check_io(self.geometry, "prefetch", offset, len)?;
        if self.direct || len == 0 {
            // Direct I/O never reads the page cache: filling it would only waste memory.
            return Ok(());
        }
        let file = self.file.clone();
        threads::blocking(move || sys::will_need(&file, offset, len))
            .await
            .map_err(|e| {
                Error::io(
                    format!("prefetch {len} bytes at offset {offset} of {}", self.name()),
                    e,
                )
            })
    }
}
