//! A quick 4 KiB random read/write load at queue depth 32 against file devices, to compare
//! engines: `cargo run --release -p strata-bdev-file --example randio -- [DIR] [SECONDS]
//! [prefill]`. Each engine and mode gets its own 1 GiB file in a temporary directory under DIR
//! (default: the current directory): sparse, or written in full first with `prefill`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_bdev::{BlockDevice, Bytes, WriteOpts};
use strata_bdev_file::{FileDevice, FileOptions, IoEngine};

const QD: u64 = 32;
const BS: u64 = 4096;

async fn load(dev: Arc<FileDevice>, write: bool, secs: f64) -> f64 {
    let blocks = dev.geometry().size / BS;
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let data = Bytes::from(vec![0x5a; BS as usize]);
    let tasks: Vec<_> = (0..QD)
        .map(|q| {
            let (dev, done, data) = (dev.clone(), done.clone(), data.clone());
            tokio::spawn(async move {
                let mut x = q.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                while Instant::now() < end {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % blocks) * BS;
                    if write {
                        dev.write_at(off, data.clone(), WriteOpts::default())
                            .await
                            .expect("write");
                    } else {
                        dev.read_at(off, BS as usize).await.expect("read");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / secs
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = tempfile::tempdir_in(args.next().unwrap_or_else(|| ".".into()))
        .expect("temporary directory");
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let prefill = args.next().is_some_and(|s| s == "prefill");
    // (engine, O_DIRECT, engine only): the default is inline page-cache hits, then io_uring.
    let modes = [
        (IoEngine::Uring, false, false),
        (IoEngine::Uring, false, true),
        (IoEngine::Threads, false, true),
        (IoEngine::Uring, true, true),
        (IoEngine::Threads, true, true),
    ];
    for (engine, direct, engine_only) in modes {
        {
            let path = dir
                .path()
                .join(format!("randio-{engine}-{direct}-{engine_only}.img"));
            if prefill {
                std::fs::write(&path, vec![1u8; 1 << 30]).expect("prefill");
            }
            let options = FileOptions {
                size: Some(1 << 30),
                direct,
                engine,
                read_only: false,
                engine_only,
            };
            let dev = Arc::new(FileDevice::open(&path, options).expect("open"));
            let w = load(dev.clone(), true, secs).await;
            let r = load(dev.clone(), false, secs).await;
            println!(
                "{engine:>8} direct={direct:<5} inline={:<5}  randwrite {w:>9.0} IOPS  randread {r:>9.0} IOPS",
                !engine_only && !direct
            );
        }
    }
}
