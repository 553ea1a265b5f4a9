//! Opening rules, locking, read-only devices, holes, engines under load, and the errors a user
//! meets.

use std::path::Path;
use std::sync::Arc;

use strata_bdev::{
    BlockDevice, BlockDeviceExt, Bytes, ErrorKind, Extent, Registry, WriteOpts, ZeroOpts,
};
use strata_bdev_file::{FileDevice, FileOpener, FileOptions, IoEngine};

const MIB: u64 = 1 << 20;

fn options(size: Option<u64>, engine: IoEngine) -> FileOptions {
    FileOptions {
        size,
        engine,
        ..FileOptions::default()
    }
}

fn create(path: &Path, size: u64, engine: IoEngine) -> FileDevice {
    FileDevice::open(path, options(Some(size), engine)).expect("create a file device")
}

fn registry() -> Registry {
    let mut r = Registry::empty();
    FileOpener::register(&mut r);
    r
}

#[tokio::test]
async fn a_new_file_is_sparse_and_the_default_engine_is_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.img");
    let dev = registry()
        .open(&format!("file://{}?size=64M", path.display()))
        .await
        .unwrap();
    assert_eq!(dev.size(), 64 * MIB);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 64 * MIB);
    assert_eq!(
        std::os::unix::fs::MetadataExt::blocks(&meta),
        0,
        "created sparse"
    );
    let engine = FileDevice::open(&path, FileOptions::default());
    assert!(engine.is_err(), "the first device still holds the lock");
    drop(dev);
    let dev = FileDevice::open(&path, FileOptions::default()).unwrap();
    assert_ne!(dev.engine(), IoEngine::Auto);
    let dev = {
        drop(dev);
        FileDevice::open(&path, options(None, IoEngine::Threads)).unwrap()
    };
    assert_eq!(dev.engine(), IoEngine::Threads);
}

#[tokio::test]
async fn an_existing_file_of_another_size_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let dev = create(&path, MIB, IoEngine::Auto);
    dev.write_slice_at(0, b"keep me").await.unwrap();
    drop(dev);

    let e = FileDevice::open(&path, options(Some(2 * MIB), IoEngine::Auto)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let msg = e.to_string();
    for part in [
        "1048576 bytes",
        "size=2097152",
        "leave size= out",
        "truncate -s",
    ] {
        assert!(msg.contains(part), "{msg:?} mentions {part:?}");
    }
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB, "not resized");

    // The same size, or none, opens it as it is.
    for size in [Some(MIB), None] {
        let dev = FileDevice::open(&path, options(size, IoEngine::Auto)).unwrap();
        assert_eq!(dev.size(), MIB);
        assert_eq!(&dev.read_at(0, 7).await.unwrap()[..], b"keep me");
    }
}

#[tokio::test]
async fn a_missing_file_needs_a_size_and_an_existing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.img");
    let e = registry()
        .open(&format!("file://{}", path.display()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("no size was given"), "{e}");
    assert!(!path.exists(), "nothing was created");

    let e = FileDevice::open(
        &path,
        FileOptions {
            size: Some(MIB),
            read_only: true,
            ..FileOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!path.exists());

    let nested = dir.path().join("no/such/dir/disk.img");
    let e = FileDevice::open(&nested, options(Some(MIB), IoEngine::Auto)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let missing = dir.path().join("no/such/dir");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e} names the missing directory"
    );
    assert!(!dir.path().join("no").exists(), "no directory was created");
}

#[tokio::test]
async fn a_second_writable_open_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.img");
    for engine in [IoEngine::Uring, IoEngine::Threads] {
        let first = create(&path, MIB, engine);
        let e = FileDevice::open(&path, options(None, engine)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(
            e.to_string().contains(&path.display().to_string()),
            "{e} names the file"
        );
        // A reader does not take the lock.
        let reader = FileDevice::open(
            &path,
            FileOptions {
                read_only: true,
                engine,
                ..FileOptions::default()
            },
        )
        .unwrap();
        drop((first, reader));
        // Closing releases the lock at once, every time (no asynchronous ring teardown holds
        // the file open behind our back).
        for _ in 0..20 {
            let dev = FileDevice::open(&path, options(None, engine)).unwrap();
            dev.write_slice_at(0, b"x").await.unwrap();
        }
        std::fs::remove_file(&path).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_reopen_reads_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (engine, direct)) in [
        (IoEngine::Uring, false),
        (IoEngine::Threads, false),
        (IoEngine::Uring, true),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("ro{i}.img"));
        let data = Bytes::from((0..8192u32).map(|i| i as u8).collect::<Vec<_>>());
        let dev = create(&path, 4 * MIB, engine);
        dev.write_at(4096, data.clone(), WriteOpts::default())
            .await
            .unwrap();
        drop(dev);

        let uri = format!(
            "file://{}?readonly=true&direct={direct}&io={}",
            path.display(),
            if engine == IoEngine::Uring {
                "uring"
            } else {
                "threads"
            }
        );
        let dev: Arc<dyn BlockDevice> = registry().open(&uri).await.unwrap();
        let caps = dev.capabilities();
        assert!(caps.read_only && !caps.trim && !caps.fast_zero, "{caps:?}");
        assert_eq!(dev.read_at(4096, 8192).await.unwrap(), data);
        assert!(dev.read_at(0, 4096).await.unwrap().iter().all(|&b| b == 0));
        dev.flush().await.unwrap();
        dev.cache(0, MIB).await.unwrap();
        let ext = dev.block_status(0, MIB).await.unwrap();
        assert!(ext.iter().any(|e| !e.hole), "{ext:?}");

        let refused = [
            dev.write_at(0, data.clone(), WriteOpts::default())
                .await
                .unwrap_err(),
            dev.trim(0, 8192, WriteOpts::default()).await.unwrap_err(),
            dev.write_zeroes(0, 8192, ZeroOpts::default())
                .await
                .unwrap_err(),
        ];
        for e in refused {
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        }
        assert_eq!(dev.read_at(4096, 8192).await.unwrap(), data, "unchanged");
    }
}

#[tokio::test]
async fn unknown_uri_keys_are_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.img");
    let e = registry()
        .open(&format!("file://{}?size=1M&drect=true", path.display()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("unknown option \"drect\""), "{e}");
    assert!(e.to_string().contains("direct"), "{e} lists the known keys");
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_and_zeroing_make_holes_that_block_status_reports() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (engine, direct)) in [
        (IoEngine::Uring, false),
        (IoEngine::Threads, false),
        (IoEngine::Uring, true),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("holes{i}.img"));
        let dev = FileDevice::open(
            &path,
            FileOptions {
                size: Some(8 * MIB),
                direct,
                engine,
                read_only: false,
                engine_only: false,
            },
        )
        .unwrap();
        assert_eq!(
            dev.block_status(0, 8 * MIB).await.unwrap(),
            vec![Extent::hole(8 * MIB)],
            "a new file is one hole"
        );
        dev.write_at(0, Bytes::from(vec![7u8; 2 << 20]), WriteOpts::default())
            .await
            .unwrap();
        dev.flush().await.unwrap();
        assert_eq!(
            dev.block_status(0, 4 * MIB).await.unwrap(),
            vec![Extent::data(2 * MIB), Extent::hole(2 * MIB)]
        );

        dev.trim(65536, 262144, WriteOpts::default()).await.unwrap();
        assert_eq!(
            dev.block_status(0, 2 * MIB).await.unwrap(),
            vec![
                Extent::data(65536),
                Extent::hole(262144),
                Extent::data(2 * MIB - 65536 - 262144)
            ],
            "the trimmed range is a hole"
        );
        let zeroes = ZeroOpts {
            may_trim: true,
            ..ZeroOpts::default()
        };
        dev.write_zeroes(MIB, 131072, zeroes).await.unwrap();
        let ext = dev.block_status(MIB, MIB).await.unwrap();
        assert_eq!(
            ext[0],
            Extent::hole(131072),
            "zeroing with may_trim punches"
        );
        assert!(dev
            .read_at(MIB, 131072)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        let fast = ZeroOpts {
            fast_only: true,
            ..ZeroOpts::default()
        };
        dev.write_zeroes(3 * MIB / 2, 65536, fast).await.unwrap();
        assert!(dev
            .read_at(3 * MIB / 2, 65536)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_returns_a_bounded_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let dev = create(&dir.path().join("striped.img"), 32 * MIB, IoEngine::Uring);
    // 2048 data blocks separated by holes: more extents than one answer holds.
    for i in 0..2048u64 {
        dev.write_at(
            i * 16384,
            Bytes::from(vec![1u8; 4096]),
            WriteOpts::default(),
        )
        .await
        .unwrap();
    }
    let ext = dev.block_status(0, 32 * MIB).await.unwrap();
    let covered: u64 = ext.iter().map(|e| e.len).sum();
    assert!(ext.len() <= 1024, "{} extents", ext.len());
    assert!(covered > 0 && covered < 32 * MIB, "a prefix: {covered}");
    assert!(ext.windows(2).all(|w| w[0].hole != w[1].hole), "merged");
    assert_eq!(ext[0], Extent::data(4096));
    assert_eq!(ext[1], Extent::hole(12288));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_ios_beyond_the_ring_size() {
    let dir = tempfile::tempdir().unwrap();
    for (i, engine) in [IoEngine::Uring, IoEngine::Threads].into_iter().enumerate() {
        let dev = Arc::new(create(
            &dir.path().join(format!("load{i}.img")),
            8 * MIB,
            engine,
        ));
        let tasks: Vec<_> = (0..1024u64)
            .map(|n| {
                let dev = dev.clone();
                tokio::spawn(async move {
                    let data = Bytes::from(vec![(n % 251) as u8 + 1; 4096]);
                    dev.write_at(n * 8192, data.clone(), WriteOpts { fua: n % 64 == 0 })
                        .await
                        .unwrap();
                    assert_eq!(dev.read_at(n * 8192, 4096).await.unwrap(), data);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        dev.flush().await.unwrap();
    }
}

#[tokio::test]
async fn reads_past_a_file_shortened_underneath_return_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    for (i, engine) in [IoEngine::Uring, IoEngine::Threads].into_iter().enumerate() {
        let path = dir.path().join(format!("short{i}.img"));
        let dev = create(&path, MIB, engine);
        dev.write_at(0, Bytes::from(vec![9u8; 8192]), WriteOpts::default())
            .await
            .unwrap();
        // Someone else shortens the file (the lock is advisory): the read comes back short,
        // the rest is continued, meets the end, and reads as zeroes.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(6000)
            .unwrap();
        let back = dev.read_at(0, 8192).await.unwrap();
        assert!(back[..6000].iter().all(|&b| b == 9));
        assert!(back[6000..].iter().all(|&b| b == 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_device_with_abandoned_ios_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abandon.img");
    let dev = create(&path, 8 * MIB, IoEngine::Uring);
    for n in 0..64u64 {
        // Submit, then stop waiting at once: the ring thread keeps the buffer until its CQE.
        tokio::select! {
            biased;
            _ = dev.write_at(n * 65536, Bytes::from(vec![3u8; 65536]), WriteOpts::default()) => {}
            _ = std::future::ready(()) => {}
        }
        tokio::select! {
            biased;
            _ = dev.read_at(n * 65536, 65536) => {}
            _ = std::future::ready(()) => {}
        }
    }
    drop(dev); // Waits for the abandoned I/O, then closes.
    let dev = FileDevice::open(&path, FileOptions::default()).unwrap();
    dev.flush().await.unwrap();
}

/// ENOSPC surfaces as [`ErrorKind::NoSpace`], on a 1 MiB tmpfs (the tests run as root, as
/// `scripts/test.sh` does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_reports_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let mount = TinyTmpfs::mount(dir.path()).unwrap_or_else(|e| {
        panic!(
            "mount a 1 MiB tmpfs on {} (the tests run as root): {e}",
            dir.path().display()
        )
    });
    for (i, engine) in [IoEngine::Uring, IoEngine::Threads].into_iter().enumerate() {
        let path = mount.0.join(format!("full{i}.img"));
        let dev = create(&path, 8 * MIB, engine);
        let e = dev
            .write_at(0, Bytes::from(vec![5u8; 2 << 20]), WriteOpts::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{}", e.chain());
        assert_eq!(e.errno(), libc::ENOSPC);
        dev.trim(0, 8 * MIB, WriteOpts::default()).await.unwrap();
        drop(dev);
        std::fs::remove_file(&path).unwrap();
    }
}

/// A 1 MiB tmpfs mounted on a directory, unmounted on drop.
struct TinyTmpfs(std::path::PathBuf);

impl TinyTmpfs {
    fn mount(dir: &Path) -> std::io::Result<TinyTmpfs> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let target = CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=1M".as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TinyTmpfs(dir.to_path_buf()))
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let Ok(target) = CString::new(self.0.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: `target` is a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}
