//! Thin, safe wrappers over the Linux calls this crate needs that `std` does not offer. Each
//! returns `io::Result` carrying the errno, so that callers can classify it with
//! [`strata_bdev::Error::io`].

use std::fs::File;
use std::io;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use strata_bdev::Extent;

/// Retry a libc call that returns -1 and sets errno while it fails with `EINTR`.
fn retry(mut f: impl FnMut() -> libc::c_long) -> io::Result<libc::c_long> {
    loop {
        let r = f();
        if r != -1 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// `preadv2(2)` with `RWF_NOWAIT` into possibly uninitialised memory: reads what the page
/// cache holds without ever blocking; `EAGAIN` when the data would have to come from the disk.
/// Returns the bytes read, which are then initialised.
pub(crate) fn pread_nowait(
    file: &File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    offset: u64,
) -> io::Result<usize> {
    let offset = off(offset)?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the iovec describes `buf`, borrowed mutably for the call; the kernel only writes it.
    let n = retry(|| unsafe {
        libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) as libc::c_long
    })?;
    Ok(n as usize)
}

/// `pwritev2(2)` with `RWF_NOWAIT`: writes into the page cache without ever blocking;
/// `EAGAIN` when it would have to wait (for memory, a lock, or block allocation).
pub(crate) fn pwrite_nowait(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    let offset = off(offset)?;
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the iovec describes `buf`, which the kernel only reads.
    let n = retry(|| unsafe {
        libc::pwritev2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) as libc::c_long
    })?;
    Ok(n as usize)
}

/// `fallocate(2)`.
pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (off(offset)?, off(len)?);
    // SAFETY: fallocate reads no memory of ours; the fd is valid while `file` is borrowed.
    retry(|| unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) }.into()).map(drop)
}

/// Deallocate a range, keeping the size (reads of it return zeroes).
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// `lseek(2)`; `SEEK_DATA` and `SEEK_HOLE` answer `ENXIO` past the last data / at the end.
pub(crate) fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset = off(offset)?;
    // SAFETY: lseek reads no memory of ours; the fd is valid while `file` is borrowed.
    let r = retry(|| unsafe { libc::lseek(file.as_raw_fd(), offset, whence) })?;
    Ok(r as u64)
}

/// How long [`lock_exclusive`] waits for a lock held by someone else to go away.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Take an exclusive advisory lock; `EWOULDBLOCK` if someone else still holds one after
/// [`LOCK_WAIT`]. The wait covers a process that has just died: the kernel closes files still
/// referenced by its io_uring only when it has torn the ring down, a moment after the exit.
/// The lock belongs to the open file description and goes away when it is closed.
/// The name of the pseudo filesystem `file` lives in (proc, sysfs, …), if it is in one: its
/// "files" are kernel interfaces, not data.
pub(crate) fn pseudo_filesystem(file: &File) -> io::Result<Option<&'static str>> {
    // SAFETY: `st` is plain data that fstatfs fills; the descriptor is valid while `file` is.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match st.f_type {
        0x9fa0 => Some("proc"),
        0x6265_6572 => Some("sysfs"),
        0x6462_6720 => Some("debugfs"),
        0x7472_6163 => Some("tracefs"),
        0x2710_2300 | 0x0027_e0eb => Some("cgroup"),
        0x6367_7270 => Some("cgroup2"),
        0x7363_6673 => Some("securityfs"),
        0x1cd1 => Some("devpts"),
        0x6e73_6673 => Some("nsfs"),
        0xcafe_4a11 => Some("bpf"),
        0x6573_5546 => Some("fuse control"),
        _ => None,
    })
}

pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock reads no memory of ours; the fd is valid while `file` is borrowed.
        let r = retry(|| {
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }.into()
        });
        match r {
            Err(e)
                if e.raw_os_error() == Some(libc::EWOULDBLOCK)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r.map(drop),
        }
    }
}

/// `posix_fadvise(POSIX_FADV_WILLNEED)`: start reading a range into the page cache.
pub(crate) fn will_need(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (off(offset)?, off(len)?);
    // SAFETY: posix_fadvise reads no memory of ours; the fd is valid while `file` is borrowed.
    match unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Change an open file's status flags: turn on `set` and turn off `clear` (`O_DIRECT` fails with
/// `EINVAL` where the filesystem cannot do direct I/O).
pub(crate) fn set_status_flags(
    file: &File,
    set: libc::c_int,
    clear: libc::c_int,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL reads no memory of ours.
    let flags = retry(|| unsafe { libc::fcntl(fd, libc::F_GETFL) }.into())? as libc::c_int;
    let new = (flags | set) & !clear;
    if new == flags {
        return Ok(());
    }
    // SAFETY: F_SETFL reads no memory of ours.
    retry(|| unsafe { libc::fcntl(fd, libc::F_SETFL, new) }.into()).map(drop)
}

/// The alignment direct I/O needs, from `statx(STATX_DIOALIGN)` (Linux 6.1+): `(offset and
/// length alignment, memory alignment)`. `Ok(None)` when the kernel or filesystem does not say;
/// `(0, 0)` when it says direct I/O is not supported on this file.
pub(crate) fn dio_alignment(file: &File) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: statx is plain data, for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string, and `stx` is a writable statx the call fills in.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_offset_align, stx.stx_dio_mem_align)))
}

/// A block device's logical sector size (`BLKSSZGET`).
pub(crate) fn logical_block_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int through the pointer, which points at `size`.
    retry(|| unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) }.into())?;
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Whether a block device zeroes ranges in hardware (or its driver does so without writing
/// buffers), read from sysfs: `fallocate(PUNCH_HOLE)` on a block device needs it.
pub(crate) fn block_device_zeroes_fast(rdev: u64) -> bool {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    // A partition's directory sits inside its disk's, and only the disk has `queue/`.
    ["queue", "../queue"].iter().any(|q| {
        std::fs::read_to_string(format!(
            "/sys/dev/block/{major}:{minor}/{q}/write_zeroes_max_bytes"
        ))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
    })
}

/// A new eventfd (blocking, close-on-exec).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add one to an eventfd's counter, waking a reader.
pub(crate) fn eventfd_signal(fd: RawFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: write reads 8 bytes from `one`, which lives across the call.
    retry(|| unsafe { libc::write(fd, (&one as *const u64).cast(), 8) } as libc::c_long).map(drop)
}

/// Describe `[offset, offset + len)` from `SEEK_DATA`/`SEEK_HOLE`, with boundaries rounded to
/// `block` (holes shrink to whole blocks; a partly allocated block counts as data), in at most
/// `max` extents.
pub fn extents(
    file: &File,
    offset: u64,
    len: u64,
    block: u64,
    max: usize,
) -> io::Result<Vec<Extent>> {
    let end = offset + len;
    // ENXIO: no data at or after the offset (SEEK_DATA), or the offset is at the end.
    let seek = |pos: u64, whence| match lseek(file, pos, whence) {
        Ok(to) => Ok(to.min(end)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(end),
        Err(e) => Err(e),
    };
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |e: Extent| match out.last_mut() {
        Some(last) if last.hole == e.hole => last.len += e.len,
        _ => out.push(e),
    };
    let mut count = 0;
    let mut pos = offset;
    while pos < end && count < max {
        count += 1;
        let data = seek(pos, libc::SEEK_DATA)?.max(pos);
        let hole_end = data / block * block;
        if hole_end > pos {
            push(Extent::hole(hole_end - pos));
            pos = hole_end;
            continue;
        }
        // Data starts within this block. `max` keeps going forward should the file change
        // between the two calls.
        let hole = seek(data, libc::SEEK_HOLE)?.max(data + 1);
        let data_end = hole.next_multiple_of(block).min(end);
        push(Extent::data(data_end - pos));
        pos = data_end;
    }
    Ok(out)
}
