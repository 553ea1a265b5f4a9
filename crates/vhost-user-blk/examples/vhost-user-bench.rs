//! vhost-user-blk benchmark without a VM: a front-end on the `vhost` crate (this crate's
//! `frontend`) drives 4k random reads and writes at depth 32 and 1M sequential reads and
//! writes at depth 8 against Strata's target and against qemu-storage-daemon's vhost-user-blk
//! export, on the same file, one back end at a time, rounds interleaved; prints IOPS, MiB/s,
//! p50/p99 latency per back end and the Strata/qemu-storage-daemon ratios (median of rounds).
//!
//! ```text
//! cargo run --release -p strata-vhost-user-blk --features frontend --example vhost-user-bench -- \
//!     [--seconds 5] [--rounds 3] [--size-mib 1024] [--direct] [--dir /var/tmp]
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_bdev::BlockDevice;
use strata_bdev_file::{FileDevice, FileOptions};
use strata_vhost_user_blk::codec;
use strata_vhost_user_blk::frontend::{BlkFrontend, Buf, FrontendOptions};
use strata_vhost_user_blk::{VhostUserSettings, VhostUserTarget};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Debug, Clone, Copy)]
struct Job {
    name: &'static str,
    write: bool,
    random: bool,
    block: u64,
    depth: usize,
}

const JOBS: [Job; 4] = [
    Job {
        name: "4k randread  QD32",
        write: false,
        random: true,
        block: 4096,
        depth: 32,
    },
    Job {
        name: "4k randwrite QD32",
        write: true,
        random: true,
        block: 4096,
        depth: 32,
    },
    Job {
        name: "1M seqread   QD8",
        write: false,
        random: false,
        block: 1 << 20,
        depth: 8,
    },
    Job {
        name: "1M seqwrite  QD8",
        write: true,
        random: false,
        block: 1 << 20,
        depth: 8,
    },
];

#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
}

struct Options {
    seconds: f64,
    rounds: usize,
    size: u64,
    direct: bool,
    dir: PathBuf,
    /// Serve a memory device from Strata instead of the file (to separate the target's cost
    /// from the file device's).
    strata_mem: bool,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        seconds: 5.0,
        rounds: 3,
        size: 1 << 30,
        direct: false,
        dir: std::env::temp_dir(),
        strata_mem: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => o.seconds = value()?.parse()?,
            "--rounds" => o.rounds = value()?.parse()?,
            "--size-mib" => o.size = value()?.parse::<u64>()? << 20,
            "--direct" => o.direct = true,
            "--strata-mem" => o.strata_mem = true,
            "--dir" => o.dir = PathBuf::from(value()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(o)
}

/// One job against the back end at `socket` for `seconds`.
fn run_job(socket: &Path, job: Job, size: u64, seconds: f64) -> Result<Outcome> {
    let mut f = BlkFrontend::connect(
        socket,
        &FrontendOptions {
            memory_bytes: 64 << 20,
            num_queues: 1,
            queue_size: 256,
            event_idx: true,
        },
    )?;
    let blocks = size / job.block;
    // One slot per request in flight: header, data, status.
    struct Slot {
        header: u64,
        data: u64,
        status: u64,
        started: Instant,
    }
    let mut slots = Vec::with_capacity(job.depth);
    for _ in 0..job.depth {
        let header = f.alloc(16, 16)?;
        let data = f.alloc(job.block, 4096)?;
        let status = f.alloc(1, 1)?;
        f.memory()
            .write_slice(&vec![0x5a; job.block as usize], GuestAddress(data))?;
        slots.push(Slot {
            header,
            data,
            status,
            started: Instant::now(),
        });
    }
    let mut by_head: HashMap<u16, usize> = HashMap::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_seq = 0u64;
    let mut pick = |rng: &mut u64| {
        if job.random {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng % blocks
        } else {
            let b = next_seq % blocks;
            next_seq += 1;
            b
        }
    };
    let ty = if job.write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let mut submit =
        |f: &mut BlkFrontend, slot: usize, slots: &mut Vec<Slot>, rng: &mut u64| -> Result<u16> {
            let s = &mut slots[slot];
            let sector = pick(rng) * job.block / 512;
            f.memory()
                .write_slice(&codec::encode_header(ty, sector), GuestAddress(s.header))?;
            let data = if job.write {
                Buf::out(s.data, job.block as u32)
            } else {
                Buf::input(s.data, job.block as u32)
            };
            s.started = Instant::now();
            Ok(f.submit(0, &[Buf::out(s.header, 16), data, Buf::input(s.status, 1)])?)
        };

    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let warmup = Duration::from_secs_f64((seconds / 5.0).min(1.0));
    let start = Instant::now();
    let mut measure_from = None;
    let before = f.avail_idx(0);
    for slot in 0..job.depth {
        let head = submit(&mut f, slot, &mut slots, &mut rng)?;
        by_head.insert(head, slot);
    }
    f.kick(0, before)?;
    let mut done_ops = 0u64;
    loop {
        let completed = f.wait_used(0, Duration::from_secs(30))?;
        let now = Instant::now();
        let measuring = match measure_from {
            Some(_) => true,
            None if now - start >= warmup => {
                measure_from = Some(now);
                false
            }
            None => false,
        };
        if let Some(from) = measure_from {
            if now - from >= Duration::from_secs_f64(seconds) {
                let elapsed = (now - from).as_secs_f64();
                latencies.sort_unstable();
                let pct = |p: f64| {
                    latencies
                        .get(
                            ((latencies.len() as f64 * p) as usize)
                                .min(latencies.len().saturating_sub(1)),
                        )
                        .copied()
                        .unwrap_or(0) as f64
                };
                // Let what is in flight finish before disconnecting.
                let mut left = job.depth - completed.len();
                while left > 0 {
                    left = left.saturating_sub(f.wait_used(0, Duration::from_secs(30))?.len());
                }
                return Ok(Outcome {
                    iops: done_ops as f64 / elapsed,
                    mib_s: done_ops as f64 * job.block as f64 / elapsed / (1 << 20) as f64,
                    p50_us: pct(0.50),
                    p99_us: pct(0.99),
                });
            }
        }
        // Every completion first (their descriptors are free again), then the resubmissions,
        // which may take those descriptors.
        let mut ready = Vec::with_capacity(completed.len());
        for (head, _) in completed {
            let slot = by_head
                .remove(&head)
                .ok_or_else(|| format!("a completion for an unknown chain {head}"))?;
            let mut status = [0u8];
            f.memory()
                .read_slice(&mut status, GuestAddress(slots[slot].status))?;
            if status[0] != 0 {
                return Err(format!("request failed with status {}", status[0]).into());
            }
            if measuring {
                latencies.push(now.duration_since(slots[slot].started).as_micros() as u32);
                done_ops += 1;
            }
            ready.push(slot);
        }
        let before = f.avail_idx(0);
        for slot in ready {
            let head = submit(&mut f, slot, &mut slots, &mut rng)?;
            by_head.insert(head, slot);
        }
        f.kick(0, before)?;
    }
}

fn wait_for_socket(path: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            return Err(format!("qemu-storage-daemon exited ({status})").into());
        }
        if Instant::now() > deadline {
            return Err("qemu-storage-daemon made no socket".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// CPU seconds of this process (threads that exited included) but the calling thread (the
/// front-end): Strata's.
fn target_cpu_seconds() -> f64 {
    let me = std::process::id();
    cpu_seconds(me) - stat_cpu_seconds(Path::new(&format!("/proc/self/task/{me}/stat")))
}

fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(Path::new(&format!("/proc/{pid}/stat")))
}

fn stat_cpu_seconds(path: &Path) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> Result<()> {
    // As `strata serve` does: large I/O buffers are reused from the heap instead of being
    // mapped and faulted in for every request.
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    let o = parse_args()?;
    let work = tempfile::Builder::new()
        .prefix("strata-vhost-bench")
        .tempdir_in(&o.dir)?;
    let file = work.path().join("disk.img");
    {
        // Fill the file so that reads read data, not holes.
        use std::io::Write;
        let mut f = std::fs::File::create(&file)?;
        let chunk = vec![0xa5u8; 1 << 20];
        for _ in 0..(o.size >> 20) {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut results: HashMap<(&str, &str), Vec<(Outcome, f64)>> = HashMap::new();
    for round in 0..o.rounds {
        for job in JOBS {
            // Strata: the target in this process over a file device.
            {
                let target =
                    VhostUserTarget::new(VhostUserSettings::default(), runtime.handle().clone())?;
                let device: Arc<dyn BlockDevice> = if o.strata_mem {
                    Arc::new(strata_bdev::MemDevice::new("bench", o.size))
                } else {
                    Arc::new(FileDevice::open(
                        &file,
                        FileOptions {
                            direct: o.direct,
                            ..FileOptions::default()
                        },
                    )?)
                };
                let socket = work.path().join("strata.sock");
                target.serve("bench", device, false, &socket)?;
                let cpu = target_cpu_seconds();
                let outcome = run_job(&socket, job, o.size, o.seconds)
                    .map_err(|e| format!("Strata, {}: {e}", job.name))?;
                let cpu = target_cpu_seconds() - cpu;
                runtime.block_on(target.shutdown());
                results
                    .entry(("strata", job.name))
                    .or_default()
                    .push((outcome, cpu));
            }
            // qemu-storage-daemon on the same file.
            {
                let socket = work.path().join("qsd.sock");
                let cache = if o.direct {
                    "cache.direct=on,aio=io_uring"
                } else {
                    "cache.direct=off"
                };
                let mut child = Command::new("qemu-storage-daemon")
                    .arg("--blockdev")
                    .arg(format!("driver=file,node-name=disk0,filename={},{cache}", file.display()))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e0,node-name=disk0,writable=on,num-queues=1,addr.type=unix,addr.path={}",
                        socket.display()
                    ))
                    .stdin(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("start qemu-storage-daemon (qemu-utils): {e}"))?;
                let outcome = (|| -> Result<(Outcome, f64)> {
                    wait_for_socket(&socket, &mut child)?;
                    let cpu = cpu_seconds(child.id());
                    let outcome = run_job(&socket, job, o.size, o.seconds)?;
                    Ok((outcome, cpu_seconds(child.id()) - cpu))
                })();
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&socket);
                results.entry(("qsd", job.name)).or_default().push(outcome?);
            }
            eprintln!("round {}/{}: {} done", round + 1, o.rounds, job.name);
        }
    }

    let median = |v: &Vec<(Outcome, f64)>, f: &dyn Fn(&(Outcome, f64)) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(|a, b| a.total_cmp(b));
        xs[xs.len() / 2]
    };
    println!(
        "vhost-user-blk, one queue, {} MiB file{}, {} s x {} rounds (median); us/req = back-end CPU per request",
        o.size >> 20,
        if o.direct { " (O_DIRECT)" } else { " (page cache)" },
        o.seconds,
        o.rounds
    );
    println!(
        "| job | Strata IOPS | qsd IOPS | ratio | Strata MiB/s | qsd MiB/s | Strata p50/p99 us | qsd p50/p99 us | Strata us/req | qsd us/req |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for job in JOBS {
        let s = &results[&("strata", job.name)];
        let q = &results[&("qsd", job.name)];
        let (si, qi) = (median(s, &|r| r.0.iops), median(q, &|r| r.0.iops));
        let cpu =
            |v: &Vec<(Outcome, f64)>| median(v, &|r| r.1 * 1e6 / (r.0.iops * o.seconds).max(1.0));
        println!(
            "| {} | {:.0} | {:.0} | {:.2}x | {:.0} | {:.0} | {:.0}/{:.0} | {:.0}/{:.0} | {:.1} | {:.1} |",
            job.name.split_whitespace().collect::<Vec<_>>().join(" "),
            si,
            qi,
            si / qi,
            median(s, &|r| r.0.mib_s),
            median(q, &|r| r.0.mib_s),
            median(s, &|r| r.0.p50_us),
            median(s, &|r| r.0.p99_us),
            median(q, &|r| r.0.p50_us),
            median(q, &|r| r.0.p99_us),
            cpu(s),
            cpu(q),
        );
    }
    Ok(())
}
