//! The block-device conformance suite against every engine, with and without `O_DIRECT`, and
//! with the inline page-cache path in front of the engine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use strata_bdev::conformance::{self, Expect};
use strata_bdev::BlockDevice;
use strata_bdev_file::{FileDevice, FileOptions, IoEngine};

async fn run(engine: IoEngine, direct: bool, engine_only: bool) {
    let dir = tempfile::tempdir().expect("make a temporary directory");
    let n = AtomicUsize::new(0);
    conformance::run(Expect::default(), |size| {
        let path = dir
            .path()
            .join(format!("dev{}.img", n.fetch_add(1, Ordering::Relaxed)));
        async move {
            let options = FileOptions {
                size: Some(size),
                direct,
                engine,
                read_only: false,
                engine_only,
            };
            let dev = FileDevice::open(&path, options).expect("open a new file device");
            assert_eq!(dev.engine(), engine, "{dev:?} uses the engine asked for");
            assert_eq!(dev.is_direct(), direct);
            let caps = dev.capabilities();
            assert!(caps.trim && caps.fast_zero && caps.block_status && caps.multi_conn);
            if direct {
                assert!(dev.geometry().block_size >= 512, "{:?}", dev.geometry());
            } else {
                assert_eq!(dev.geometry().block_size, 1);
            }
            Arc::new(dev) as Arc<dyn BlockDevice>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring() {
    run(IoEngine::Uring, false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads() {
    run(IoEngine::Threads, false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_direct() {
    run(IoEngine::Uring, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_direct() {
    run(IoEngine::Threads, true, false).await;
}

/// The default: page-cache hits inline, the rest through io_uring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_then_io_uring() {
    run(IoEngine::Uring, false, false).await;
}

/// Mayastor's URI forms: `aio:///PATH?blk_size=512` and `uring:///PATH?blk_size=4096` open the
/// same device with the block size they name.
async fn run_alias(scheme: &'static str, blk_size: u32) {
    let dir = tempfile::tempdir().expect("make a temporary directory");
    let n = AtomicUsize::new(0);
    let mut registry = strata_bdev::Registry::empty();
    strata_bdev_file::FileOpener::register(&mut registry);
    conformance::run(Expect::default(), |size| {
        let path = dir
            .path()
            .join(format!("dev{}.img", n.fetch_add(1, Ordering::Relaxed)));
        let registry = registry.clone();
        async move {
            let uri = format!(
                "{scheme}://{}?blk_size={blk_size}&size={size}",
                path.display()
            );
            let dev = registry.open(&uri).await.expect("open through the alias");
            assert_eq!(dev.geometry().block_size, blk_size, "{uri}");
            dev
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aio_alias_with_512_byte_blocks() {
    run_alias("aio", 512).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_alias_with_4096_byte_blocks() {
    run_alias("uring", 4096).await;
}
