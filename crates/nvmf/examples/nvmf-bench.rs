//! NVMe/TCP vs NBD on the same memory volume, both driven by Strata's own clients.
//!
//! ```text
//!   nvmf-bench                 this process: the clients (NvmfDevice, NbdDevice), the jobs
//!     └─ nvmf-bench serve      a child process: one MemDevice, served by Strata's NBD server
//!                              and Strata's NVMe/TCP target at once; its CPU time is read
//!                              from /proc/PID/stat around every job
//! ```
//!
//! Jobs: 4 KiB random read and write at queue depth 32, 1 MiB sequential read and write at
//! depth 8. Every (job, protocol) cell runs ROUNDS times, interleaved, and the median round is
//! printed with p50/p99 latency and server CPU per request.
//!
//! ```sh
//! cargo run --release -p strata-nvmf --example nvmf-bench            # RUNTIME=10 ROUNDS=3
//! RUNTIME=5 ROUNDS=1 SIZE_MB=512 cargo run --release -p strata-nvmf --example nvmf-bench
//! JOBS=randread PROTOCOLS=nvmf RUNTIME=30 ...   # one cell, e.g. to profile the server (its
//!                                               # PID is printed on stderr)
//! NVMF_QUEUES=2 ...                             # I/O queues of the NVMe/TCP host
//! NVMF_IN_CAPSULE=1048576 ...                   # the target's in-capsule data size
//! # instructions per request in the server, which a busy machine does not disturb:
//! SERVER_WRAP="valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p" SIZE_MB=64 ...
//! ```

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_bdev::{BlockDevice, Bytes, MemDevice, WriteOpts};
use strata_nbd::client::{ClientOptions, Target as NbdTarget};
use strata_nbd::{Export, NbdDevice, Server, ServerConfig};
use strata_nvmf::{HostOptions, NvmfDevice, Subsystem, Target, TargetSettings};

const NQN: &str = "nqn.2026-12.io.strata:bench";

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("serve") {
        serve();
    } else {
        drive();
    }
}

/// The server process: both protocols over one memory device, until stdin closes.
fn serve() {
    let size = env_u64("SIZE_MB", 1024) << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("bench", size));
        let nbd = Server::new(
            ServerConfig::default(),
            vec![Export {
                name: "bench".into(),
                description: "benchmark".into(),
                device: dev.clone(),
                read_only: false,
                transactions: None,
            }],
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let nbd_port = l.local_addr().expect("address").port();
        tokio::spawn(nbd.clone().serve_tcp(l));
        let defaults = TargetSettings::default();
        let target = Target::new(TargetSettings {
            in_capsule_data_size: env_u64("NVMF_IN_CAPSULE", defaults.in_capsule_data_size),
            ..defaults
        })
        .expect("settings");
        target
            .add_subsystem(Subsystem::new(NQN, dev))
            .expect("subsystem");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let nvmf_port = l.local_addr().expect("address").port();
        tokio::spawn(target.clone().serve_tcp(l));
        println!("ready {nbd_port} {nvmf_port}");
        std::io::stdout().flush().expect("stdout");
        // Until the driver closes our stdin.
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            while std::io::stdin()
                .read_line(&mut s)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
        })
        .await;
    });
}

#[derive(Clone, Copy, Debug)]
struct Job {
    name: &'static str,
    write: bool,
    random: bool,
    bs: usize,
    depth: usize,
}

const JOBS: [Job; 4] = [
    Job {
        name: "4k randread qd32",
        write: false,
        random: true,
        bs: 4096,
        depth: 32,
    },
    Job {
        name: "4k randwrite qd32",
        write: true,
        random: true,
        bs: 4096,
        depth: 32,
    },
    Job {
        name: "1M seqread qd8",
        write: false,
        random: false,
        bs: 1 << 20,
        depth: 8,
    },
    Job {
        name: "1M seqwrite qd8",
        write: true,
        random: false,
        bs: 1 << 20,
        depth: 8,
    },
];

#[derive(Clone, Copy, Debug, Default)]
struct Cell {
    iops: f64,
    mibs: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us: f64,
    /// The client process's CPU per request (the jobs' own loop included).
    client_us: f64,
    /// Server instructions per request, when it runs under callgrind.
    ir: Option<f64>,
}

/// CPU time (user + system) of process `pid`, in seconds.
fn cpu_seconds(pid: u32, hz: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / hz
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

async fn run_job(
    dev: Arc<dyn BlockDevice>,
    job: Job,
    runtime: Duration,
    size: u64,
) -> (u64, Vec<u32>) {
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Bytes::from(vec![0xA5u8; job.bs]);
    let blocks = size / job.bs as u64;
    let mut tasks = Vec::new();
    for t in 0..job.depth {
        let (dev, stop, payload) = (dev.clone(), stop.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1);
            let mut seq = (t as u64 * blocks / job.depth as u64) % blocks;
            while !stop.load(Ordering::Relaxed) {
                let block = if job.random {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % blocks
                } else {
                    seq = (seq + 1) % blocks;
                    seq
                };
                let off = block * job.bs as u64;
                let start = Instant::now();
                if job.write {
                    dev.write_at(off, payload.clone(), WriteOpts::default())
                        .await
                        .expect("write");
                } else {
                    let d = dev.read_at(off, job.bs).await.expect("read");
                    assert_eq!(d.len(), job.bs);
                }
                lat.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            lat
        }));
    }
    tokio::time::sleep(runtime).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("job task"));
    }
    (all.len() as u64, all)
}

fn callgrind_control(flag: &str, pid: u32) {
    let ok = Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "callgrind_control {flag} {pid}");
}

/// The instruction count of the newest callgrind dump `BASE.N`.
fn last_dump_instructions(base: &str) -> f64 {
    let path = std::path::Path::new(base);
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("callgrind output file name");
    let newest = std::fs::read_dir(dir)
        .expect("callgrind output directory")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let k: u32 = n.strip_prefix(name)?.strip_prefix('.')?.parse().ok()?;
            Some((k, e.path()))
        })
        .max_by_key(|(k, _)| *k)
        .expect("a callgrind dump");
    let text = std::fs::read_to_string(&newest.1).expect("read the dump");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("the dump's instruction total")
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i])
}

fn drive() {
    let runtime = Duration::from_secs(env_u64("RUNTIME", 10));
    let ramp = Duration::from_secs(env_u64("RAMP", 1));
    let rounds = env_u64("ROUNDS", 3) as usize;
    let size = env_u64("SIZE_MB", 1024) << 20;
    let hz = clock_ticks();
    let exe = std::env::current_exe().expect("own path");
    let wrap: Vec<String> = std::env::var("SERVER_WRAP")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let callgrind_out = wrap
        .iter()
        .find_map(|a| a.strip_prefix("--callgrind-out-file="))
        .map(str::to_string);
    let mut child: Child = cmd
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server process");
    let pid = child.id();
    let callgrind_out = callgrind_out.map(|p| p.replace("%p", &pid.to_string()));
    eprintln!("server process {pid}");
    let only_jobs = std::env::var("JOBS").unwrap_or_default();
    let only_protocols = std::env::var("PROTOCOLS").unwrap_or_default();
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the server's ready line");
    let ports: Vec<u16> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(ports.len(), 2, "ready line: {line:?}");
    let (nbd_port, nvmf_port) = (ports[0], ports[1]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let results = rt.block_on(async move {
        let nbd: Arc<dyn BlockDevice> = Arc::new(
            NbdDevice::connect(
                &NbdTarget::Tcp(format!("127.0.0.1:{nbd_port}")),
                "bench",
                &ClientOptions::default(),
            )
            .await
            .expect("NBD client"),
        );
        let nvmf: Arc<dyn BlockDevice> = Arc::new(
            NvmfDevice::connect(
                &format!("127.0.0.1:{nvmf_port}"),
                NQN,
                HostOptions {
                    queues: env_u64("NVMF_QUEUES", u64::from(HostOptions::default().queues)) as u16,
                    ..HostOptions::default()
                },
            )
                .await
                .expect("NVMe/TCP host"),
        );
        // Fill the volume so reads see data.
        let chunk = Bytes::from(vec![0x5Au8; 1 << 20]);
        for i in 0..size >> 20 {
            nvmf.write_at(i << 20, chunk.clone(), WriteOpts::default())
                .await
                .expect("fill");
        }
        let protocols = [("NVMe/TCP", "nvmf", nvmf), ("NBD", "nbd", nbd)];
        let mut cells: Vec<Vec<Vec<Cell>>> = vec![vec![Vec::new(); 2]; JOBS.len()];
        for round in 0..rounds {
            for (j, job) in JOBS.iter().enumerate() {
                if !job.name.contains(only_jobs.as_str()) {
                    continue;
                }
                for (p, (pname, key, dev)) in protocols.iter().enumerate() {
                    if !key.contains(only_protocols.as_str()) {
                        continue;
                    }
                    if !ramp.is_zero() {
                        run_job(dev.clone(), *job, ramp, size).await;
                    }
                    if callgrind_out.is_some() {
                        callgrind_control("-z", pid);
                    }
                    let cpu0 = cpu_seconds(pid, hz);
                    let me0 = cpu_seconds(std::process::id(), hz);
                    let t0 = Instant::now();
                    let (n, mut lat) = run_job(dev.clone(), *job, runtime, size).await;
                    let secs = t0.elapsed().as_secs_f64();
                    let cpu = cpu_seconds(pid, hz) - cpu0;
                    let me = cpu_seconds(std::process::id(), hz) - me0;
                    let ir = callgrind_out.as_deref().map(|base| {
                        callgrind_control("-d", pid);
                        last_dump_instructions(base) / n.max(1) as f64
                    });
                    lat.sort_unstable();
                    let c = Cell {
                        iops: n as f64 / secs,
                        mibs: n as f64 * job.bs as f64 / secs / f64::from(1 << 20),
                        p50_us: percentile(&lat, 0.5),
                        p99_us: percentile(&lat, 0.99),
                        cpu_us: cpu * 1e6 / n.max(1) as f64,
                        client_us: me * 1e6 / n.max(1) as f64,
                        ir,
                    };
                    eprintln!(
                        "round {} {:<18} {:<9} {:>9.0} IOPS {:>7.1} MiB/s p50 {:>6.0} µs p99 {:>6.0} µs  server {:>6.1} µs CPU/req, client {:>6.1}{}",
                        round + 1, job.name, pname, c.iops, c.mibs, c.p50_us, c.p99_us, c.cpu_us, c.client_us,
                        c.ir.map(|i| format!(" {i:.0} instructions/req")).unwrap_or_default()
                    );
                    cells[j][p].push(c);
                }
            }
        }
        cells
    });
    drop(child.stdin.take());
    let _ = child.wait();

    let median = |cs: &[Cell]| {
        let mut v = cs.to_vec();
        v.sort_by(|a, b| a.iops.total_cmp(&b.iops));
        v[v.len() / 2]
    };
    println!(
        "\nmedians of {rounds} round(s) of {}s, {} MiB memory volume\n",
        runtime.as_secs(),
        size >> 20
    );
    println!("| job | NVMe/TCP | NBD | NVMe/TCP : NBD (IOPS) | server CPU/req NVMe/TCP : NBD |");
    println!("|---|---|---|---|---|");
    let fmt = |c: &Cell| {
        format!(
            "{:.0} IOPS, {:.0} MiB/s, p50 {:.0} µs, p99 {:.0} µs, {:.1} µs CPU/req",
            c.iops, c.mibs, c.p50_us, c.p99_us, c.cpu_us
        )
    };
    for (j, job) in JOBS.iter().enumerate() {
        if results[j][0].is_empty() || results[j][1].is_empty() {
            continue;
        }
        let (a, b) = (median(&results[j][0]), median(&results[j][1]));
        println!(
            "| {} | {} | {} | **{:.2}×** | {:.2} |",
            job.name,
            fmt(&a),
            fmt(&b),
            a.iops / b.iops.max(1.0),
            a.cpu_us / b.cpu_us.max(0.001)
        );
    }
}
