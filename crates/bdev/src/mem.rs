//! `mem://NAME?size=SIZE` (or Mayastor's `malloc:///NAME?size_mb=N`): a sparse device in
//! memory, for tests, scratch space and benchmarks.
//!
//! Storage is allocated in 4 KiB chunks on first write and freed by trim and zeroing, so an
//! unwritten device costs nothing and block status is exact at chunk granularity. Chunks live in
//! sharded maps so that I/O to different regions does not contend on one lock.
//!
//! Opening the same name twice in one process yields the same device while it is open, so a
//! mirror and a test can share one memory child.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};

use crate::device::{
    check_io, read_only_error, BlockDevice, Capabilities, Extent, Geometry, WriteOpts, ZeroOpts,
};
use crate::error::{Error, ErrorKind, Result};
use crate::uri::{DeviceUri, Opener};

const CHUNK: u64 = 4096;
const SHARDS: usize = 64;
/// Block status looks at no more chunks than this per call (it may answer a prefix).
const STATUS_SCAN_CHUNKS: u64 = 1 << 16;

type Chunk = Box<[u8; CHUNK as usize]>;

/// A sparse in-memory block device.
pub struct MemDevice {
    name: String,
    size: u64,
    read_only: bool,
    shards: Box<[RwLock<HashMap<u64, Chunk>>]>,
}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mem://{} ({} bytes)", self.name, self.size)
    }
}

impl MemDevice {
    /// A new, all-zero device of `size` bytes.
    pub fn new(name: impl Into<String>, size: u64) -> MemDevice {
        MemDevice {
            name: name.into(),
            size,
            read_only: false,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of memory holding data (allocated chunks).
    pub fn allocated_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.read().expect("lock poisoned").len() as u64 * CHUNK)
            .sum()
    }

    fn shard(&self, chunk: u64) -> &RwLock<HashMap<u64, Chunk>> {
        &self.shards[(chunk % SHARDS as u64) as usize]
    }

    /// Call `f(chunk index, range within chunk, range within the request)` for each chunk piece.
    fn for_each_piece(
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, std::ops::Range<usize>, std::ops::Range<usize>),
    ) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let chunk = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = ((CHUNK - within as u64).min(end - pos)) as usize;
            let req = (pos - offset) as usize;
            f(chunk, within..within + n, req..req + n);
            pos += n as u64;
        }
    }

    fn zero_range(&self, offset: u64, len: u64) {
        MemDevice::for_each_piece(offset, len, |chunk, within, _| {
            let mut shard = self.shard(chunk).write().expect("lock poisoned");
            if within.len() == CHUNK as usize {
                shard.remove(&chunk);
            } else if let Some(c) = shard.get_mut(&chunk) {
                c[within].fill(0);
                if c.iter().all(|&b| b == 0) {
                    shard.remove(&chunk);
                }
            }
        });
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size,
            block_size: 1,
            optimal_io_size: CHUNK as u32,
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            block_status: true,
            multi_conn: true,
            resize: false,
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_io(self.geometry(), "read", offset, len as u64)?;
        // Each byte is written once: copied from its chunk, or zero where none is allocated.
        let mut buf = BytesMut::with_capacity(len);
        MemDevice::for_each_piece(offset, len as u64, |chunk, within, _| {
            match self.shard(chunk).read().expect("lock poisoned").get(&chunk) {
                Some(c) => buf.extend_from_slice(&c[within]),
                None => buf.put_bytes(0, within.len()),
            }
        });
        Ok(buf.freeze())
    }

    async fn write_at(&self, offset: u64, data: Bytes, _opts: WriteOpts) -> Result<()> {
        if self.read_only {
            return Err(read_only_error("write"));
        }
        check_io(self.geometry(), "write", offset, data.len() as u64)?;
        MemDevice::for_each_piece(offset, data.len() as u64, |chunk, within, req| {
            let mut shard = self.shard(chunk).write().expect("lock poisoned");
            let c = shard
                .entry(chunk)
                .or_insert_with(|| Box::new([0u8; CHUNK as usize]));
            c[within].copy_from_slice(&data[req]);
        });
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        // Completed writes are already visible to every reader of this process; there is no
        // durable medium behind memory to flush to.
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _opts: WriteOpts) -> Result<()> {
        if self.read_only {
            return Err(read_only_error("trim"));
        }
        check_io(self.geometry(), "trim", offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _opts: ZeroOpts) -> Result<()> {
        if self.read_only {
            return Err(read_only_error("write zeroes"));
        }
        check_io(self.geometry(), "write zeroes", offset, len)?;
        // Freed chunks read as zeroes, so zeroing is always a fast deallocation here.
        self.zero_range(offset, len);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_io(self.geometry(), "query block status", offset, len)?;
        let scan_end = offset + len.min(STATUS_SCAN_CHUNKS * CHUNK);
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < scan_end {
            let chunk = pos / CHUNK;
            let n = (CHUNK - pos % CHUNK).min(scan_end - pos);
            let present = self
                .shard(chunk)
                .read()
                .expect("lock poisoned")
                .contains_key(&chunk);
            match extents.last_mut() {
                Some(last) if last.hole != present => last.len += n,
                _ => extents.push(if present {
                    Extent::data(n)
                } else {
                    Extent::hole(n)
                }),
            }
            pos += n;
        }
        if extents.is_empty() {
            extents.push(Extent::hole(0));
        }
        Ok(extents)
    }
}

/// Memory this host could still give a process, from `/proc/meminfo` (`None` elsewhere).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A memory device's size: above 0, whole 512-byte sectors, and no more than the host could
/// hold if it were filled.
fn check_size(uri: &DeviceUri, size: u64) -> Result<()> {
    let refuse = |why: String| {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("device URI {uri}: {why}"),
        ))
    };
    if size == 0 || !size.is_multiple_of(512) {
        return refuse(format!(
            "size {size} is not a positive multiple of 512 bytes"
        ));
    }
    if let Some(avail) = available_memory().filter(|&a| size > a) {
        return refuse(format!(
            "size {size} is more than the {avail} bytes of memory this host has available; \
             a memory device that large could not be filled (use a file:// device)"
        ));
    }
    Ok(())
}

/// Opens `mem://NAME?size=SIZE[&readonly=true]`. While a device is open, opening its name again
/// yields the same device (and a different size is an error).
#[derive(Debug, Default)]
pub struct MemOpener {
    open: Mutex<HashMap<String, Weak<MemDevice>>>,
}

#[async_trait]
impl Opener for MemOpener {
    async fn open(&self, mut uri: DeviceUri) -> Result<Arc<dyn BlockDevice>> {
        let (name, size) = if uri.scheme == "malloc" {
            // Mayastor's form: malloc:///NAME?size_mb=N.
            let name = uri.path.trim_matches('/').to_string();
            if !uri.authority.is_empty() || name.is_empty() || name.contains('/') {
                return Err(
                    uri.invalid("expected malloc:///NAME?size_mb=N (three slashes, a name)")
                );
            }
            let size = match uri.take("size_mb") {
                None => None,
                Some(v) => Some(
                    v.parse::<u64>()
                        .ok()
                        .and_then(|mb| mb.checked_mul(1 << 20))
                        .ok_or_else(|| {
                            uri.invalid(&format!("size_mb={v:?}: expected a number of MiB"))
                        })?,
                ),
            };
            (name, size)
        } else {
            let name = uri.authority.clone();
            if name.is_empty() || !uri.path.trim_matches('/').is_empty() {
                return Err(uri.invalid("expected mem://NAME?size=SIZE (a name, no path)"));
            }
            (name, uri.take_size("size")?)
        };
        let read_only = uri.take_bool("readonly")?.unwrap_or(false);
        uri.finish(if uri.scheme == "malloc" {
            &["size_mb", "readonly"]
        } else {
            &["size", "readonly"]
        })?;
        let mut open = self.open.lock().expect("lock poisoned");
        if let Some(dev) = open.get(&name).and_then(Weak::upgrade) {
            if size.is_some_and(|s| s != dev.size) {
                return Err(uri.invalid(&format!(
                    "memory device {name:?} is already open with size {}",
                    dev.size
                )));
            }
            if read_only != dev.read_only {
                return Err(uri.invalid(&format!(
                    "memory device {name:?} is already open with readonly={}",
                    dev.read_only
                )));
            }
            return Ok(dev);
        }
        let size = size.ok_or_else(|| {
            uri.invalid(if uri.scheme == "malloc" {
                "size_mb= is required, e.g. malloc:///scratch?size_mb=64"
            } else {
                "size= is required, e.g. mem://scratch?size=64M"
            })
        })?;
        check_size(&uri, size)?;
        let mut dev = MemDevice::new(name.clone(), size);
        dev.read_only = read_only;
        let dev = Arc::new(dev);
        open.retain(|_, d| d.strong_count() > 0);
        open.insert(name, Arc::downgrade(&dev));
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registry;

    #[tokio::test]
    async fn same_name_same_device() {
        let r = Registry::with_builtin();
        let a = r.open("mem://shared?size=1M").await.unwrap();
        a.write_at(0, Bytes::from_static(b"hello"), WriteOpts::default())
            .await
            .unwrap();
        let b = r.open("mem://shared").await.unwrap();
        assert_eq!(&b.read_at(0, 5).await.unwrap()[..], b"hello");
        assert!(r.open("mem://shared?size=2M").await.is_err());
        drop((a, b));
        assert!(r
            .open("mem://shared")
            .await
            .unwrap_err()
            .to_string()
            .contains("size= is required"));
    }

    #[tokio::test]
    async fn sizes_that_cannot_be_a_memory_device_are_refused() {
        let r = crate::Registry::with_builtin();
        for (uri, why) in [
            ("mem://odd?size=1000", "multiple of 512"),
            ("mem://huge?size=16P", "available"),
            ("mem://max?size=18446744073709551615", "multiple of 512"),
            ("mem://zero?size=0", "multiple of 512"),
        ] {
            let e = r.open(uri).await.unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
        r.open("mem://fine?size=1M").await.unwrap();
    }

    #[tokio::test]
    async fn malloc_is_mayastors_name_for_memory() {
        let r = Registry::with_builtin();
        let a = r.open("malloc:///m0?size_mb=4").await.unwrap();
        assert_eq!(a.geometry().size, 4 << 20);
        a.write_at(0, Bytes::from_static(b"seed"), WriteOpts::default())
            .await
            .unwrap();
        // The same device under either name.
        let b = r.open("mem://m0").await.unwrap();
        assert_eq!(&b.read_at(0, 4).await.unwrap()[..], b"seed");
        for (uri, why) in [
            ("malloc:///m1", "size_mb= is required"),
            ("malloc:///m1?size_mb=lots", "number of MiB"),
            ("malloc:///m1?size=4M", "unknown option"),
            ("malloc://host/m1?size_mb=4", "three slashes"),
        ] {
            let e = r.open(uri).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{uri}");
            assert!(e.to_string().contains(why), "{uri}: {e}");
        }
    }

    #[tokio::test]
    async fn read_only_refuses_writes() {
        let r = Registry::with_builtin();
        let d = r.open("mem://ro?size=1M&readonly=1").await.unwrap();
        let e = d
            .write_at(0, Bytes::from_static(b"x"), WriteOpts::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(d.capabilities().read_only);
    }

    #[tokio::test]
    async fn zeroing_frees_memory() {
        let d = MemDevice::new("m", 1 << 20);
        d.write_at(0, Bytes::from(vec![1u8; 65536]), WriteOpts::default())
            .await
            .unwrap();
        assert_eq!(d.allocated_bytes(), 65536);
        d.trim(4096, 8192, WriteOpts::default()).await.unwrap();
        assert_eq!(d.allocated_bytes(), 65536 - 8192);
        d.write_zeroes(0, 65536, ZeroOpts::default()).await.unwrap();
        assert_eq!(d.allocated_bytes(), 0);
    }
}
