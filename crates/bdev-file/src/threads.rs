//! The thread-pool engine: each I/O is one `pread`/`pwrite` (plus `fdatasync` for FUA) on
//! tokio's blocking pool. The fallback where io_uring is unavailable, and a baseline to compare
//! it with. Allocations per I/O: the blocking task, plus the caller's buffer.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::buf::{ReadBuf, WriteBuf};

/// Run `f` on tokio's blocking pool. Outside a tokio runtime this fails instead of panicking.
pub(crate) async fn blocking<T, F>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|_| io::Error::other("file I/O needs a tokio runtime to run blocking calls on"))?;
    rt.spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking file I/O task failed: {e}")))?
}

/// The thread-pool engine of one file.
pub(crate) struct Pool {
    file: Arc<File>,
}

impl Pool {
    pub(crate) fn new(file: Arc<File>) -> Pool {
        Pool { file }
    }

    /// Fill `buf` from `offset`; bytes past the end of the file stay zero.
    pub(crate) async fn read(&self, offset: u64, mut buf: ReadBuf) -> io::Result<ReadBuf> {
        let file = self.file.clone();
        blocking(move || {
            read_full(&file, offset, buf.as_mut_slice())?;
            Ok(buf)
        })
        .await
    }

    /// Write all of `buf` at `offset`, then `fdatasync` when `dsync`.
    pub(crate) async fn write(&self, offset: u64, buf: WriteBuf, dsync: bool) -> io::Result<()> {
        let file = self.file.clone();
        blocking(move || {
            file.write_all_at(buf.as_slice(), offset)?;
            if dsync {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    /// `fdatasync`.
    pub(crate) async fn fdatasync(&self) -> io::Result<()> {
        let file = self.file.clone();
        blocking(move || file.sync_data()).await
    }
}

/// Read until `buf` is full or the file ends (the rest of `buf` is left as it was: zeroes).
/// Short reads are continued; `EINTR` is retried.
pub(crate) fn read_full(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
