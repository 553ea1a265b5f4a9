//! Positioned reads of local files (write-buffer generations, segments of a directory store)
//! that cost no thread switch when the kernel's page cache has the data: first a
//! `preadv2(RWF_NOWAIT)` on the calling thread, and only what that could not read on a
//! blocking thread.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// One `preadv2(RWF_NOWAIT)`: the bytes read, or `WouldBlock` if they are not cached.
fn read_nowait(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let off =
        libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the iovec describes `buf`, which lives and is not otherwise borrowed for the
    // call; the descriptor is valid while `file` is.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Read exactly `buf.len()` bytes of `file` at `off`.
pub async fn read_exact_at(file: &Arc<File>, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match read_nowait(file, &mut buf[done..], off + done as u64) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Not cached (EAGAIN), or no RWF_NOWAIT here (EOPNOTSUPP): a blocking thread reads.
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                break
            }
            Err(e) => return Err(e),
        }
    }
    if done == buf.len() {
        return Ok(());
    }
    let (f, len, at) = (file.clone(), buf.len() - done, off + done as u64);
    let data = tokio::task::spawn_blocking(move || {
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, at).map(|()| v)
    })
    .await
    .map_err(io::Error::other)??;
    buf[done..].copy_from_slice(&data);
    Ok(())
}
