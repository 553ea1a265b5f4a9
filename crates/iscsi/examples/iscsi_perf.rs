//! Drive an `iscsi://` device directly (no export in between), as libiscsi's `iscsi-perf`
//! drives a LUN: `DEPTH` requests of `BS` bytes kept in flight for `SECONDS`, random or
//! sequential, reads or writes. Prints `iops average N (M MiB/s)`, the line bench/iscsi.sh
//! reads.
//!
//! ```text
//! cargo run --release -p strata-iscsi --example iscsi_perf -- URI randread 4096 32 10
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use strata_bdev::{Bytes, Registry, WriteOpts};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [uri, rw, bs, depth, seconds] = &args[..] else {
        return Err("usage: iscsi_perf URI randread|randwrite|read|write BS DEPTH SECONDS".into());
    };
    let (random, write) = match rw.as_str() {
        "randread" => (true, false),
        "randwrite" => (true, true),
        "read" => (false, false),
        "write" => (false, true),
        other => return Err(format!("unknown pattern {other}").into()),
    };
    let bs: u64 = bs.parse()?;
    let depth: u64 = depth.parse()?;
    let run = Duration::from_secs_f64(seconds.parse()?);
    let mut registry = Registry::empty();
    strata_iscsi::IscsiOpener::register(&mut registry);
    let dev = registry.open(uri).await?;
    let blocks = dev.geometry().size / bs;
    let data = Bytes::from(vec![0x5au8; bs as usize]);
    let done = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + run;
    let mut tasks = Vec::new();
    for i in 0..depth {
        let (dev, data, done, next) = (dev.clone(), data.clone(), done.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(i);
            while Instant::now() < end {
                let block = if random {
                    rng.random_range(0..blocks)
                } else {
                    next.fetch_add(1, Ordering::Relaxed) % blocks
                };
                let r = if write {
                    dev.write_at(block * bs, data.clone(), WriteOpts::default())
                        .await
                } else {
                    dev.read_at(block * bs, bs as usize).await.map(|_| ())
                };
                r.map_err(|e| e.chain())?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let n = done.load(Ordering::Relaxed) as f64 / run.as_secs_f64();
    println!(
        "iops average {n:.0} ({:.1} MiB/s)",
        n * bs as f64 / f64::from(1 << 20)
    );
    Ok(())
}
