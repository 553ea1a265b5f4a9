//! Shared test kit: a runtime, a target serving devices from the test process, a device that
//! can grow, and a polling wait.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_bdev::{
    check_io, BlockDevice, Bytes, Capabilities, Extent, Geometry, MemDevice, WriteOpts, ZeroOpts,
};
use strata_vhost_user_blk::{ExportHandle, VhostUserSettings, VhostUserTarget};

/// Polls `condition` every 10 ms until it holds, failing the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A tokio runtime and a target on it, with sockets in a temporary directory.
pub struct Harness {
    pub runtime: tokio::runtime::Runtime,
    pub target: VhostUserTarget,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn new(settings: VhostUserSettings) -> Harness {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let target =
            VhostUserTarget::new(settings, runtime.handle().clone()).expect("vhost-user target");
        Harness {
            runtime,
            target,
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    pub fn serve(&self, name: &str, device: Arc<dyn BlockDevice>, read_only: bool) -> ExportHandle {
        self.target
            .serve(name, device, read_only, &self.socket(name))
            .expect("serve the volume")
    }

    pub fn stop(&self, name: &str) {
        self.runtime
            .block_on(self.target.stop(name))
            .expect("stop the export");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.runtime.block_on(self.target.shutdown());
    }
}

/// A memory device whose size can change while it is open (up to the size it was made with).
#[derive(Debug)]
pub struct Growable {
    inner: MemDevice,
    size: AtomicU64,
}

impl Growable {
    pub fn new(size: u64, max: u64) -> Growable {
        Growable {
            inner: MemDevice::new("growable", max),
            size: AtomicU64::new(size),
        }
    }

    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    fn check(&self, what: &str, offset: u64, len: u64) -> strata_bdev::Result<()> {
        check_io(self.geometry(), what, offset, len)
    }
}

#[async_trait::async_trait]
impl BlockDevice for Growable {
    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size.load(Ordering::Acquire),
            ..self.inner.geometry()
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            resize: true,
            ..self.inner.capabilities()
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> strata_bdev::Result<Bytes> {
        self.check("read", offset, len as u64)?;
        self.inner.read_at(offset, len).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> strata_bdev::Result<()> {
        self.check("write", offset, data.len() as u64)?;
        self.inner.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> strata_bdev::Result<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> strata_bdev::Result<()> {
        self.check("trim", offset, len)?;
        self.inner.trim(offset, len, opts).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> strata_bdev::Result<()> {
        self.check("write zeroes", offset, len)?;
        self.inner.write_zeroes(offset, len, opts).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> strata_bdev::Result<Vec<Extent>> {
        self.check("block status", offset, len)?;
        self.inner.block_status(offset, len).await
    }

    async fn cache(&self, offset: u64, len: u64) -> strata_bdev::Result<()> {
        self.check("prefetch", offset, len)?;
        self.inner.cache(offset, len).await
    }
}

/// Bytes `offset..offset + len` of a device.
pub fn read_device(
    runtime: &tokio::runtime::Runtime,
    device: &dyn BlockDevice,
    offset: u64,
    len: usize,
) -> Vec<u8> {
    runtime
        .block_on(device.read_at(offset, len))
        .expect("read the device")
        .to_vec()
}

/// A recognizable pattern: each byte depends on its offset and `seed`.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            ((offset + i) as u8).wrapping_mul(31).wrapping_add(seed) ^ ((offset + i) >> 9) as u8
        })
        .collect()
}

/// The path exists as a socket.
pub fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
