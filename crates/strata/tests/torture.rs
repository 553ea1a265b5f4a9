//! Crash torture for page-store images: a loop writes through NBD, flushes, records what each
//! flush made durable, then has `strata serve` die at a random moment — SIGKILL while requests
//! are in flight or while it sits idle, or an armed failpoint aborting it in the middle of a
//! checkpoint or a compaction — restarts it and checks every block of the image against a model
//! of what may legally be there.
//!
//! ```text
//!  cycle:  start (maybe STRATA_FAILPOINTS=one of four) ─► writes, zeroing, FUA, flushes, live
//!          reads ─► dies (SIGKILL or abort) ─► restart plain ─► read all 32 MiB ─► check ─► the
//!          image as read becomes the next cycle's starting point
//! ```
//!
//! The checker's unit is the image's 512-byte logical block: most requests cover whole 4 KiB
//! pages, and the rest start and end anywhere on a 512-byte boundary, so that writes, trims and
//! zeroing of part of a page (merged into the page by the server) die mid-way too, and a torn
//! page shows as blocks of one request from different moments.
//!
//! Every block written carries its block number and a write id, and the rest of it is derived
//! from the two, so a block read back is identified exactly: zeroes, one particular write, or
//! garbage. After a crash each block must hold a version it may legally hold: the newest one a
//! successful FLUSH (or a FUA write) covered, or one written after it (those may or may not have
//! survived). Requests go one at a time, and the write buffer replays a prefix of what it
//! received, so the image as a whole must also look like the device at one moment between the
//! last FLUSH and the crash.
//!
//! `STRATA_TORTURE_CYCLES` (default 50) sets the number of cycles; `bench/torture-soak.sh` runs
//! many more. `STRATA_TORTURE_SEED` repeats a run's workload (the moments of the kills, being
//! timed, still vary). A failure names the seed, the cycle, the block, what was found and what
//! was allowed, and keeps the data directory and the daemon logs.

#![allow(clippy::unwrap_used)] // test: a failed step is a failed test

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata::bdev::{BlockDevice, Bytes, WriteOpts, ZeroOpts};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use common::S3Server;

/// The unit the checker tracks: the image's 512-byte logical block. Pages are 4 KiB, so a
/// write of part of a page is merged into it; whole-page requests are most of the load.
const BLOCK: usize = 512;
/// Logical blocks per 4 KiB page of the image.
const PAGE_BLOCKS: u64 = 8;
const IMAGE_BYTES: u64 = 32 << 20;
const BLOCKS: u64 = IMAGE_BYTES / BLOCK as u64;
const EXPORT: &str = "torture";
/// Most writes land in this many blocks (2 MiB), so newer segments keep overwriting older ones
/// and compaction has pages to drop.
const HOT_BLOCKS: u64 = 4096;
const MAGIC: &[u8; 8] = b"TORTURE1";
const FAILPOINTS: [&str; 4] = [
    "checkpoint-after-segments",
    "checkpoint-after-manifest",
    "compaction-after-segments",
    "compaction-after-manifest",
];
/// A request the daemon has not answered by then is a hang, and a failure.
const REQUEST_LIMIT: Duration = Duration::from_secs(60);
/// How long a cycle with a failpoint armed waits, once its writes are done, for the background
/// checkpoint (due every second) to reach the failpoint.
const FAILPOINT_IDLE: Duration = Duration::from_secs(5);

/// Small tunables: a checkpoint every megabyte or second, segments of 512 KiB, compaction past
/// four segments, and a cache small enough that reads really go to the segment objects.
const CONFIG: &str = r#"
data_dir = "{dir}/data"

[nbd]
listen = ["127.0.0.1:0"]
{stores}
[pagestore]
checkpoint_bytes = "1M"
checkpoint_secs = 1
segment_bytes = "512K"
max_segments = 4
cache_bytes = "1M"

[[volume]]
name = "torture"
uri = "image://{store}/torture?size=32M"
description = "crash torture"
"#;

/// Fill `buf` (one block) with write `id` of `block`: a header naming both, then bytes derived
/// from them.
fn fill(buf: &mut [u8], block: u64, id: u64) {
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&id.to_le_bytes());
    let mut z = (block ^ id.rotate_left(29)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut x = (z ^ (z >> 31)) | 1;
    for w in buf[24..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// What one block read back holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    Zeroes,
    /// Exactly the bytes of this write of this block.
    Write(u64),
    /// Anything else, and why.
    Garbage(String),
}

impl Found {
    /// The version: 0 for zeroes, else the write id.
    fn version(&self) -> Option<u64> {
        match self {
            Found::Zeroes => Some(0),
            Found::Write(id) => Some(*id),
            Found::Garbage(_) => None,
        }
    }
}

fn identify(block: u64, data: &[u8], scratch: &mut [u8]) -> Found {
    if data.iter().all(|&b| b == 0) {
        return Found::Zeroes;
    }
    if &data[..8] != MAGIC {
        return Found::Garbage(format!(
            "neither zeroes nor a block this test wrote (begins {:02x?})",
            &data[..16]
        ));
    }
    let p = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let id = u64::from_le_bytes(data[16..24].try_into().unwrap());
    if p != block {
        return Found::Garbage(format!(
            "the header of write {id} of block {p}: data of another block"
        ));
    }
    fill(scratch, block, id);
    match data.iter().zip(scratch.iter()).position(|(a, b)| a != b) {
        None => Found::Write(id),
        Some(i) => Found::Garbage(format!(
            "the header of write {id} of this block, but byte {i} differs from what was written \
             (torn or corrupt)"
        )),
    }
}

/// One request that changed the image, in the order sent.
#[derive(Debug, Clone)]
struct Op {
    first: u64,
    count: u64,
    /// The write id of block `first` (block `first + i` got `first_id + i`); 0: zeroing.
    first_id: u64,
    fua: bool,
    /// The daemon answered it with success.
    acked: bool,
}

impl Op {
    fn version(&self, block: u64) -> u64 {
        if self.first_id == 0 {
            0
        } else {
            self.first_id + (block - self.first)
        }
    }
}

/// What a cycle sent before the daemon died.
#[derive(Debug, Default)]
struct CycleLog {
    ops: Vec<Op>,
    /// `ops[..flushed]` were covered by a FLUSH that succeeded.
    flushed: usize,
    bytes: u64,
}

/// Every write ever sent, for naming a version in a report.
#[derive(Debug, Clone, Copy)]
struct WriteRec {
    first_id: u64,
    count: u64,
    first: u64,
    cycle: usize,
    op: usize,
}

/// How a cycle ends.
#[derive(Debug, Clone, Copy)]
enum Death {
    /// SIGKILL once this many bytes were written, this long after the next request was sent.
    KillInFlight { at_bytes: u64, delay: Duration },
    /// SIGKILL this long after the last request was answered (after a FLUSH, or not).
    KillIdle { flush_first: bool, delay: Duration },
    /// The armed failpoint aborts the daemon (SIGKILL after [`FAILPOINT_IDLE`] if it never
    /// reaches it).
    Failpoint(&'static str),
}

/// A running `strata serve`; killed if dropped.
struct Daemon {
    child: Child,
    addr: String,
    log: PathBuf,
    /// The test sent SIGKILL.
    killed: bool,
}

/// Why a daemon did not start.
struct StartError {
    why: String,
    log: String,
}

impl Daemon {
    async fn start(
        config: &Path,
        log: PathBuf,
        failpoint: Option<&str>,
    ) -> Result<Daemon, StartError> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .args([
                "--metrics-listen",
                "127.0.0.1:0",
                "--nvmf-listen",
                "127.0.0.1:0",
            ])
            .env("STRATA_LOG", "info,strata_pagestore=debug")
            .env_remove("STRATA_FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create daemon log"))
            .kill_on_drop(true);
        if let Some(fp) = failpoint {
            cmd.env("STRATA_FAILPOINTS", fp);
        }
        let mut child = cmd.spawn().expect("start strata serve");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let mut banner = Vec::new();
        let ready = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "ready" {
                    return true;
                }
                banner.push(line);
            }
            false
        })
        .await;
        if ready != Ok(true) {
            let _ = child.start_kill();
            let status = child.wait().await.expect("wait for strata serve");
            return Err(StartError {
                why: format!(
                    "strata serve did not become ready ({}; stdout: {banner:?})",
                    describe_status(status)
                ),
                log: std::fs::read_to_string(&log).unwrap_or_default(),
            });
        }
        // Keep reading, so that nothing printed later meets a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = banner
            .iter()
            .find_map(|l| l.strip_prefix("listening: nbd://"))
            .map(|a| a.split_whitespace().next().unwrap_or(a).to_string())
            .expect("strata serve names its TCP address");
        Ok(Daemon {
            child,
            addr,
            log,
            killed: false,
        })
    }

    async fn open(&self) -> Result<Arc<dyn BlockDevice>, String> {
        let uri = format!("nbd://{}/{EXPORT}", self.addr);
        strata::registry()
            .open(&uri)
            .await
            .map_err(|e| format!("open {uri}: {e}"))
    }

    fn kill(&mut self) {
        if !self.killed {
            self.killed = true;
            let _ = self.child.start_kill();
        }
    }

    /// The exit status, if the daemon exits within `limit`.
    async fn exited(&mut self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|r| r.expect("wait for strata serve"))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn describe_status(s: ExitStatus) -> String {
    match s.signal() {
        Some(libc::SIGKILL) => "killed by SIGKILL".into(),
        Some(libc::SIGABRT) => "aborted (SIGABRT)".into(),
        Some(n) => format!("killed by signal {n}"),
        None => format!("exited with {s}"),
    }
}

fn failpoint_line(fp: &str) -> String {
    format!("failpoint {fp}: aborting")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Await one request; if the kill is due meanwhile, SIGKILL the daemon and keep waiting for the
/// answer (it may still arrive).
async fn answer<T>(
    daemon: &mut Daemon,
    kill_at: Option<Instant>,
    request: impl Future<Output = strata::bdev::Result<T>>,
) -> Result<T, String> {
    let request = tokio::time::timeout(REQUEST_LIMIT, request);
    tokio::pin!(request);
    let r = match kill_at {
        Some(at) if !daemon.killed => {
            tokio::select! {
                r = &mut request => r,
                _ = tokio::time::sleep_until(at.into()) => {
                    daemon.kill();
                    request.await
                }
            }
        }
        _ => request.await,
    };
    match r {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {REQUEST_LIMIT:?}")),
    }
}

/// Totals over a run.
#[derive(Debug, Default)]
struct Totals {
    kills_in_flight: usize,
    kills_idle: usize,
    fired: HashMap<&'static str, usize>,
    missed: HashMap<&'static str, usize>,
    aborted_early: usize,
    bytes: u64,
    ops: usize,
    flushes: usize,
    live_reads: usize,
    maybe_kept: usize,
    maybe_lost: usize,
}

struct Run {
    seed: u64,
    cycles: usize,
    rng: StdRng,
    dir: Option<tempfile::TempDir>,
    config: PathBuf,
    /// The object store's files (the directory store, or the S3 server's bucket and prefix).
    objects: PathBuf,
    /// The version each block held when the cycle began (0: zeroes).
    base: Vec<u64>,
    next_id: u64,
    writes: Vec<WriteRec>,
    hot: u64,
    starts: usize,
    /// Logs of the daemons started, in order.
    logs: Vec<PathBuf>,
    totals: Totals,
    started: Instant,
}

impl Run {
    /// A run on the directory store `local`, or on `s3`'s bucket.
    fn new(seed: u64, cycles: usize, s3: Option<&S3Server>) -> Run {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("strata.toml");
        let (stores, store, objects) = match s3 {
            Some(s3) => (
                s3.store_toml("s3", "torture"),
                "s3",
                s3.bucket_dir().join("torture"),
            ),
            None => (String::new(), "local", dir.path().join("data/objects")),
        };
        std::fs::write(
            &config,
            CONFIG
                .replace("{dir}", &dir.path().to_string_lossy())
                .replace("{stores}", &stores)
                .replace("{store}", store),
        )
        .expect("write config");
        std::fs::create_dir(dir.path().join("logs")).expect("create log directory");
        let mut rng = StdRng::seed_from_u64(seed);
        let hot = rng.random_range(0..BLOCKS - HOT_BLOCKS);
        Run {
            seed,
            cycles,
            rng,
            dir: Some(dir),
            config,
            objects,
            base: vec![0; BLOCKS as usize],
            next_id: 1,
            writes: Vec::new(),
            hot,
            starts: 0,
            logs: Vec::new(),
            totals: Totals::default(),
            started: Instant::now(),
        }
    }

    fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory is kept until the end")
            .path()
    }

    /// Fail the test: what went wrong, how to repeat it, and where the evidence is.
    fn fail(&mut self, cycle: usize, what: &str) -> ! {
        let dir = self
            .dir
            .take()
            .expect("the directory is kept until the end");
        let kept = dir.keep();
        let mut logs = String::new();
        for log in self.logs.iter().rev().take(2).rev() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            logs.push_str(&format!(
                "\n--- {} (last lines) ---\n{}",
                log.strip_prefix(&kept).unwrap_or(log).display(),
                tail(&text, 30)
            ));
        }
        panic!(
            "crash torture failed: seed {seed}, cycle {cycle} of {cycles}\n{what}\n\
             repeat the workload: STRATA_TORTURE_SEED={seed} STRATA_TORTURE_CYCLES={c1} \
             cargo test -p strata --test torture -- --nocapture\n\
             data directory and every daemon's log kept in {}{logs}",
            kept.display(),
            seed = self.seed,
            cycles = self.cycles,
            c1 = cycle + 1,
        );
    }

    async fn start(&mut self, cycle: usize, failpoint: Option<&str>) -> Result<Daemon, StartError> {
        self.starts += 1;
        let log = self.path().join("logs").join(format!(
            "{:04}-cycle{cycle}-{}.log",
            self.starts,
            failpoint.unwrap_or("plain")
        ));
        self.logs.push(log.clone());
        Daemon::start(&self.config, log, failpoint).await
    }

    /// Start a daemon that must come up.
    async fn start_ok(&mut self, cycle: usize) -> (Daemon, Arc<dyn BlockDevice>) {
        let d = match self.start(cycle, None).await {
            Ok(d) => d,
            Err(e) => self.fail(
                cycle,
                &format!(
                    "the daemon does not start on the crashed data: {}\n{}",
                    e.why,
                    tail(&e.log, 40)
                ),
            ),
        };
        match d.open().await {
            Ok(dev) => (d, dev),
            Err(e) => self.fail(cycle, &format!("the export does not open: {e}")),
        }
    }

    /// Start a daemon with failpoint `fp` armed. The checkpoint of what the last daemon left
    /// buffered may reach the failpoint before the export is open: then `None`.
    async fn start_armed(
        &mut self,
        cycle: usize,
        fp: &'static str,
    ) -> Option<(Daemon, Arc<dyn BlockDevice>)> {
        let fired = |log: &str| log.contains(&failpoint_line(fp));
        let mut d = match self.start(cycle, Some(fp)).await {
            Ok(d) => d,
            Err(e) if fired(&e.log) => {
                self.totals.aborted_early += 1;
                *self.totals.fired.entry(fp).or_default() += 1;
                return None;
            }
            Err(e) => self.fail(cycle, &format!("{}\n{}", e.why, tail(&e.log, 40))),
        };
        match d.open().await {
            Ok(dev) => Some((d, dev)),
            Err(e) => {
                let status = d.exited(Duration::from_secs(30)).await;
                if status.is_some_and(|s| s.signal() == Some(libc::SIGABRT)) && fired(&d.log_text())
                {
                    self.totals.aborted_early += 1;
                    *self.totals.fired.entry(fp).or_default() += 1;
                    return None;
                }
                self.fail(cycle, &format!("the export does not open: {e}"))
            }
        }
    }

    fn death(&mut self, cycle: usize) -> Death {
        if cycle % 3 == 2 {
            // The failpoint that fired least so far: one that needs a compaction and missed it
            // is tried again.
            let fp = *FAILPOINTS
                .iter()
                .min_by_key(|fp| self.totals.fired.get(*fp).copied().unwrap_or(0))
                .expect("four failpoints");
            return Death::Failpoint(fp);
        }
        if self.rng.random_bool(0.65) {
            Death::KillInFlight {
                at_bytes: self.rng.random_range(0..6 << 20),
                delay: Duration::from_micros(self.rng.random_range(0..3000)),
            }
        } else {
            Death::KillIdle {
                flush_first: self.rng.random_bool(0.5),
                delay: Duration::from_millis(self.rng.random_range(0..3000)),
            }
        }
    }

    /// A range of blocks to write, zero or read: mostly up to `max_pages` whole pages, a third
    /// of the time 1 to 16 blocks starting anywhere (part of a page, or across a page border).
    fn pick_range(&mut self, max_pages: u64) -> (u64, u64) {
        let first = if self.rng.random_bool(0.6) {
            self.hot + self.rng.random_range(0..HOT_BLOCKS)
        } else {
            self.rng.random_range(0..BLOCKS)
        };
        let (first, count) = if self.rng.random_bool(0.33) {
            (first, self.rng.random_range(1..=16))
        } else {
            let cap = 1u64 << self.rng.random_range(0..=max_pages.trailing_zeros());
            let pages = self.rng.random_range(1..=cap);
            (first / PAGE_BLOCKS * PAGE_BLOCKS, pages * PAGE_BLOCKS)
        };
        (first.min(BLOCKS - count), count)
    }

    /// Drive the daemon until it dies; returns what was sent.
    async fn workload(
        &mut self,
        cycle: usize,
        daemon: &mut Daemon,
        dev: &dyn BlockDevice,
        death: Death,
    ) -> CycleLog {
        let mut log = CycleLog::default();
        // The version each block holds now, for reads while the daemon runs.
        let mut current: HashMap<u64, u64> = HashMap::new();
        let budget = match death {
            Death::KillInFlight { at_bytes, .. } => {
                at_bytes + self.rng.random_range(BLOCK as u64..4 << 20)
            }
            Death::KillIdle { .. } => self.rng.random_range(256 << 10..6 << 20),
            Death::Failpoint(_) => 16 << 20,
        };
        let mut kill_at: Option<Instant> = None;
        let mut scratch = vec![0u8; BLOCK];
        let mut failure: Option<String> = None;
        while log.bytes < budget {
            if let Death::KillInFlight { at_bytes, delay } = death {
                if kill_at.is_none() && log.bytes >= at_bytes {
                    kill_at = Some(Instant::now() + delay);
                }
            }
            let r: f64 = self.rng.random();
            let result = if r < 0.07 {
                self.totals.flushes += 1;
                let r = answer(daemon, kill_at, dev.flush()).await;
                if r.is_ok() {
                    log.flushed = log.ops.len();
                }
                r
            } else if r < 0.12 {
                let (first, count) = if self.rng.random_bool(0.5) {
                    self.pick_range(16)
                } else {
                    // Large ones anywhere, so that the image does not fill up with live blocks
                    // every compaction must copy.
                    let count = self.rng.random_range(64..=256) * PAGE_BLOCKS;
                    let first = self.rng.random_range(0..=BLOCKS - count);
                    (first / PAGE_BLOCKS * PAGE_BLOCKS, count)
                };
                let fua = self.rng.random_bool(0.1);
                log.ops.push(Op {
                    first,
                    count,
                    first_id: 0,
                    fua,
                    acked: false,
                });
                let (off, len) = (first * BLOCK as u64, count * BLOCK as u64);
                let r = if self.rng.random_bool(0.5) {
                    answer(daemon, kill_at, dev.trim(off, len, WriteOpts { fua })).await
                } else {
                    let opts = ZeroOpts {
                        fua,
                        may_trim: self.rng.random_bool(0.5),
                        fast_only: false,
                    };
                    answer(daemon, kill_at, dev.write_zeroes(off, len, opts)).await
                };
                if r.is_ok() {
                    log.ops.last_mut().expect("just pushed").acked = true;
                    for p in first..first + count {
                        current.insert(p, 0);
                    }
                }
                r
            } else if r < 0.17 {
                // Read back what this cycle wrote, while checkpoints and compactions run.
                let (first, count) = self.pick_range(64);
                self.totals.live_reads += 1;
                match answer(
                    daemon,
                    kill_at,
                    dev.read_at(first * BLOCK as u64, (count * BLOCK as u64) as usize),
                )
                .await
                {
                    Ok(data) => {
                        for (i, chunk) in data.chunks(BLOCK).enumerate() {
                            let p = first + i as u64;
                            let want = current.get(&p).copied().unwrap_or(self.base[p as usize]);
                            let got = identify(p, chunk, &mut scratch);
                            if got.version() != Some(want) {
                                let msg = format!(
                                    "a read while the daemon runs returned the wrong data: block \
                                     {p} holds {}, the last write to it was {}",
                                    self.found_text(&got),
                                    self.version_text(want)
                                );
                                self.fail(cycle, &msg);
                            }
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            } else {
                let (first, count) = self.pick_range(64);
                let fua = self.rng.random_bool(0.08);
                let first_id = self.next_id;
                self.next_id += count;
                self.writes.push(WriteRec {
                    first_id,
                    count,
                    first,
                    cycle,
                    op: log.ops.len(),
                });
                log.ops.push(Op {
                    first,
                    count,
                    first_id,
                    fua,
                    acked: false,
                });
                let mut data = vec![0u8; (count as usize) * BLOCK];
                for (i, chunk) in data.chunks_exact_mut(BLOCK).enumerate() {
                    fill(chunk, first + i as u64, first_id + i as u64);
                }
                log.bytes += data.len() as u64;
                let r = answer(
                    daemon,
                    kill_at,
                    dev.write_at(first * BLOCK as u64, Bytes::from(data), WriteOpts { fua }),
                )
                .await;
                if r.is_ok() {
                    log.ops.last_mut().expect("just pushed").acked = true;
                    for p in first..first + count {
                        current.insert(p, first_id + (p - first));
                    }
                }
                r
            };
            if let Err(e) = result {
                failure = Some(e);
                break;
            }
        }
        self.totals.ops += log.ops.len();
        self.totals.bytes += log.bytes;

        if failure.is_none() {
            match death {
                Death::KillInFlight { .. } => {
                    let at = kill_at.unwrap_or_else(Instant::now);
                    tokio::time::sleep_until(at.into()).await;
                    daemon.kill();
                }
                Death::KillIdle { flush_first, delay } => {
                    if flush_first {
                        self.totals.flushes += 1;
                        match answer(daemon, None, dev.flush()).await {
                            Ok(()) => log.flushed = log.ops.len(),
                            Err(e) => failure = Some(e),
                        }
                    }
                    if failure.is_none() {
                        // The crash moment: while checkpoints (due every second) run, or not.
                        tokio::time::sleep(delay).await;
                        daemon.kill();
                    }
                }
                Death::Failpoint(_) => {
                    if daemon.exited(FAILPOINT_IDLE).await.is_none() {
                        daemon.kill();
                    }
                }
            }
        }
        // A request that failed without a kill is an error unless the armed failpoint is
        // aborting the daemon; give that a moment to show in the exit status.
        let grace = if daemon.killed || matches!(death, Death::Failpoint(_)) {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(5)
        };
        let status = match daemon.exited(grace).await {
            Some(s) => s,
            None => {
                let msg = match &failure {
                    Some(e) => format!("a request failed ({e}) but the daemon did not die"),
                    None => format!("the daemon outlived SIGKILL by {grace:?}"),
                };
                self.fail(cycle, &msg)
            }
        };
        let text = daemon.log_text();
        let ok = match death {
            Death::Failpoint(fp) if status.signal() == Some(libc::SIGABRT) => {
                text.contains(&failpoint_line(fp))
            }
            _ => daemon.killed && status.signal() == Some(libc::SIGKILL),
        };
        if !ok {
            let msg = format!(
                "the daemon died on its own: {}{}\n{}",
                describe_status(status),
                failure
                    .map(|e| format!(" (a request failed: {e})"))
                    .unwrap_or_default(),
                tail(&text, 40)
            );
            self.fail(cycle, &msg);
        }
        match death {
            Death::KillInFlight { .. } => self.totals.kills_in_flight += 1,
            Death::KillIdle { .. } => self.totals.kills_idle += 1,
            Death::Failpoint(fp) => {
                let m = if daemon.killed {
                    &mut self.totals.missed
                } else {
                    &mut self.totals.fired
                };
                *m.entry(fp).or_default() += 1;
            }
        }
        log
    }

    fn version_text(&self, v: u64) -> String {
        if v == 0 {
            return "zeroes".into();
        }
        let i = self.writes.partition_point(|w| w.first_id <= v);
        match i.checked_sub(1).map(|i| self.writes[i]) {
            Some(w) if v < w.first_id + w.count => format!(
                "write {v} (cycle {}, request {} of that cycle, to block {})",
                w.cycle,
                w.op,
                w.first + (v - w.first_id)
            ),
            _ => format!("write {v} (never sent)"),
        }
    }

    fn found_text(&self, f: &Found) -> String {
        match f {
            Found::Zeroes => "zeroes".into(),
            Found::Write(id) => self.version_text(*id),
            Found::Garbage(why) => format!("garbage: {why}"),
        }
    }

    /// Check the image as read back after a crash against what the cycle sent; returns the
    /// versions found, the next cycle's starting point.
    fn check(&mut self, log: &CycleLog, found: &[Found]) -> Result<Vec<u64>, String> {
        let n = log.ops.len();
        // Per block changed this cycle: (request index, version, made durable by its own FUA).
        let mut history: HashMap<u64, Vec<(usize, u64, bool)>> = HashMap::new();
        for (i, op) in log.ops.iter().enumerate() {
            for p in op.first..op.first + op.count {
                history
                    .entry(p)
                    .or_default()
                    .push((i, op.version(p), op.fua && op.acked));
            }
        }
        // The image must equal the device after the first k requests, for one k: every block
        // narrows the ks it fits (disjoint ranges per block, counted in a difference array).
        let k_min = log
            .ops
            .iter()
            .enumerate()
            .filter(|(_, op)| op.fua && op.acked)
            .map(|(i, _)| i + 1)
            .max()
            .unwrap_or(0)
            .max(log.flushed);
        let mut cover = vec![0i64; n + 2];
        let mut fits: HashMap<u64, Vec<(usize, usize)>> = HashMap::new();
        let mut out = Vec::with_capacity(found.len());
        for (p, f) in found.iter().enumerate() {
            let p = p as u64;
            let base = self.base[p as usize];
            let Some(v) = f.version() else {
                return Err(format!(
                    "block {p} holds {}; allowed: {}",
                    self.found_text(f),
                    self.allowed_text(base, history.get(&p).map(Vec::as_slice), log.flushed)
                ));
            };
            out.push(v);
            let Some(h) = history.get(&p) else {
                if v != base {
                    return Err(format!(
                        "block {p} was not written in this cycle and held {} (read back after the \
                         last crash), but now holds {}",
                        self.version_text(base),
                        self.found_text(f)
                    ));
                }
                continue;
            };
            // Entry 0 is the version before the cycle; entry e > 0 is h[e - 1].
            let floor = (1..=h.len())
                .rev()
                .find(|&e| h[e - 1].0 < log.flushed || h[e - 1].2)
                .unwrap_or(0);
            let mut ranges = Vec::new();
            let mut matched = Vec::new();
            for e in floor..=h.len() {
                let ver = if e == 0 { base } else { h[e - 1].1 };
                if ver != v {
                    continue;
                }
                let lo = if e == 0 { 0 } else { h[e - 1].0 + 1 };
                let hi = if e == h.len() { n } else { h[e].0 };
                cover[lo] += 1;
                cover[hi + 1] -= 1;
                ranges.push((lo, hi));
                matched.push(e);
            }
            let (Some(&oldest), Some(&newest)) = (matched.first(), matched.last()) else {
                let lost = (0..floor).any(|e| (if e == 0 { base } else { h[e - 1].1 }) == v);
                return Err(format!(
                    "block {p} holds {}{}; allowed: {}",
                    self.found_text(f),
                    if lost {
                        " — older than what a FLUSH or FUA made durable: a durable write was lost"
                    } else {
                        " — never written to this block since it was last verified"
                    },
                    self.allowed_text(base, Some(h), log.flushed)
                ));
            };
            if oldest > floor {
                self.totals.maybe_kept += 1;
            }
            if newest < h.len() {
                self.totals.maybe_lost += 1;
            }
            fits.insert(p, ranges);
        }
        let mut best = (0i64, 0usize);
        let mut sum = 0i64;
        for (k, c) in cover.iter().enumerate().take(n + 1) {
            sum += c;
            if k >= k_min && sum == fits.len() as i64 {
                best = (sum, k);
                break;
            }
            if k >= k_min && sum > best.0 {
                best = (sum, k);
            }
        }
        if best.0 != fits.len() as i64 {
            let k = best.1;
            let mut odd: Vec<String> = fits
                .iter()
                .filter(|(_, r)| !r.iter().any(|&(lo, hi)| lo <= k && k <= hi))
                .take(8)
                .map(|(p, r)| {
                    format!(
                        "block {p} holds {} (fits after {r:?} requests)",
                        self.version_text(out[*p as usize])
                    )
                })
                .collect();
            odd.sort();
            return Err(format!(
                "no single moment explains the image: after {k} of the {n} requests sent ({} \
                 covered by the last FLUSH, {k_min} by FLUSH or FUA) {} of {} blocks changed in this \
                 cycle fit, but not:\n  {}",
                log.flushed,
                best.0,
                fits.len(),
                odd.join("\n  ")
            ));
        }
        Ok(out)
    }

    fn allowed_text(&self, base: u64, h: Option<&[(usize, u64, bool)]>, flushed: usize) -> String {
        let Some(h) = h else {
            return self.version_text(base);
        };
        let mut out = vec![format!("{} before the cycle", self.version_text(base))];
        for &(i, v, fua) in h {
            out.push(format!(
                "{} by request {i} ({})",
                self.version_text(v),
                if i < flushed {
                    "flushed"
                } else if fua {
                    "FUA, acknowledged"
                } else {
                    "after the last FLUSH: may be lost"
                }
            ));
        }
        format!(
            "the newest durable one or any later one of: {} (the last FLUSH covered requests 0..{flushed})",
            out.join("; ")
        )
    }
}

/// Read every block of the image.
async fn read_image(dev: &dyn BlockDevice) -> Result<Vec<Found>, String> {
    let chunk = 1usize << 20;
    let mut found = Vec::with_capacity(BLOCKS as usize);
    let mut scratch = vec![0u8; BLOCK];
    for off in (0..IMAGE_BYTES).step_by(chunk) {
        let data = tokio::time::timeout(REQUEST_LIMIT, dev.read_at(off, chunk))
            .await
            .map_err(|_| format!("read at {off}: no answer within {REQUEST_LIMIT:?}"))?
            .map_err(|e| format!("read at {off}: {e}"))?;
        for (i, block) in data.chunks(BLOCK).enumerate() {
            found.push(identify(off / BLOCK as u64 + i as u64, block, &mut scratch));
        }
    }
    Ok(found)
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: expected a number")),
    )
}

fn count_files(dir: &Path, pred: impl Fn(&str) -> bool) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| pred(&e.file_name().to_string_lossy()))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_survive_kill_9_and_failpoints_in_checkpoint_and_compaction() {
    torture(None).await;
}

/// The same on an S3 store (s3s-fs), where segments and manifests are PUTs and a manifest's
/// create-only PUT is what a crash between the two must leave consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_survive_kill_9_and_failpoints_on_s3() {
    let s3 = S3Server::start();
    torture(Some(&s3)).await;
}

async fn torture(s3: Option<&S3Server>) {
    let seed = env_u64("STRATA_TORTURE_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let cycles = env_u64("STRATA_TORTURE_CYCLES").unwrap_or(50) as usize;
    eprintln!(
        "crash torture: {cycles} cycles, seed {seed} (STRATA_TORTURE_SEED={seed} repeats it)"
    );
    let mut run = Run::new(seed, cycles, s3);
    let (mut daemon, mut dev) = run.start_ok(0).await;
    for cycle in 0..cycles {
        let death = run.death(cycle);
        let log = if let Death::Failpoint(fp) = death {
            drop(dev);
            daemon.kill();
            daemon.exited(Duration::from_secs(30)).await;
            match run.start_armed(cycle, fp).await {
                Some((d, armed)) => {
                    daemon = d;
                    let log = run.workload(cycle, &mut daemon, &*armed, death).await;
                    drop(armed);
                    log
                }
                None => CycleLog::default(),
            }
        } else {
            let log = run.workload(cycle, &mut daemon, &*dev, death).await;
            drop(dev);
            log
        };
        (daemon, dev) = run.start_ok(cycle).await;
        let found = match read_image(&*dev).await {
            Ok(f) => f,
            Err(e) => run.fail(cycle, &format!("reading the image back failed: {e}")),
        };
        match run.check(&log, &found) {
            Ok(now) => run.base = now,
            Err(e) => {
                let msg = format!(
                    "{e}\nthe cycle: {death:?}; {} requests sent ({} answered), the last FLUSH \
                     covered {}",
                    log.ops.len(),
                    log.ops.iter().filter(|o| o.acked).count(),
                    log.flushed
                );
                run.fail(cycle, &msg)
            }
        }
    }
    drop(dev);
    daemon.kill();
    daemon.exited(Duration::from_secs(30)).await;

    // The run must have exercised what it claims to.
    let mut checkpoints = 0;
    let mut compactions = 0;
    let mut replays = 0;
    for log in &run.logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        checkpoints += text.matches("checkpoint done").count();
        compactions += text.matches("compaction done").count();
        replays += text.matches("write buffer replayed").count();
    }
    let image = run.objects.join("images").join(EXPORT);
    let manifests = count_files(&image.join("manifest"), |_| true);
    let compacted = count_files(&image.join("segments"), |n| n.starts_with('c'));
    let t = &run.totals;
    eprintln!(
        "crash torture: {cycles} cycles in {:.1} s (seed {seed}): {} SIGKILLs with requests in \
         flight, {} idle; failpoints fired {:?} (not reached: {:?}; {} before the export opened); {} MiB in \
         {} requests, {} flushes, {} live reads; {} blocks kept a write sent after the last \
         FLUSH, {} lost one; {checkpoints} checkpoints, {compactions} compactions \
         ({compacted} compacted segments written), {manifests} manifests, {replays} write-buffer \
         replays",
        run.started.elapsed().as_secs_f64(),
        t.kills_in_flight,
        t.kills_idle,
        t.fired,
        t.missed,
        t.aborted_early,
        t.bytes >> 20,
        t.ops,
        t.flushes,
        t.live_reads,
        t.maybe_kept,
        t.maybe_lost,
    );
    if cycles >= 50 {
        let coverage = [
            (manifests >= cycles, "a manifest per cycle at least"),
            (checkpoints >= cycles, "a checkpoint per cycle at least"),
            (compactions >= 3, "three compactions at least"),
            (
                t.kills_in_flight >= 10,
                "ten SIGKILLs with requests in flight",
            ),
            (
                t.maybe_kept > 0 && t.maybe_lost > 0,
                "unflushed writes both kept and lost",
            ),
        ];
        for (ok, what) in coverage {
            if !ok {
                run.fail(
                    cycles,
                    &format!("the run did not exercise enough: expected {what}"),
                );
            }
        }
        for fp in FAILPOINTS {
            if run.totals.fired.get(fp).copied().unwrap_or(0) == 0 {
                run.fail(cycles, &format!("failpoint {fp} never fired"));
            }
        }
    }
}

/// The checker itself: a torture test whose checker accepts anything proves nothing.
mod checker {
    use super::*;

    fn op(first: u64, count: u64, first_id: u64, fua: bool) -> Op {
        Op {
            first,
            count,
            first_id,
            fua,
            acked: true,
        }
    }

    fn zeroes() -> Vec<Found> {
        vec![Found::Zeroes; BLOCKS as usize]
    }

    #[test]
    fn a_page_reads_back_as_exactly_what_was_written_or_garbage() {
        let mut block = vec![0u8; BLOCK];
        let mut scratch = vec![0u8; BLOCK];
        fill(&mut block, 7, 42);
        assert_eq!(identify(7, &block, &mut scratch), Found::Write(42));
        assert_eq!(identify(7, &vec![0u8; BLOCK], &mut scratch), Found::Zeroes);
        // Another block's data, a flipped bit, a zeroed tail, foreign bytes.
        assert!(matches!(
            identify(8, &block, &mut scratch),
            Found::Garbage(_)
        ));
        let mut bad = block.clone();
        bad[300] ^= 1;
        assert!(matches!(identify(7, &bad, &mut scratch), Found::Garbage(_)));
        let mut torn = block.clone();
        torn[256..].fill(0);
        assert!(matches!(
            identify(7, &torn, &mut scratch),
            Found::Garbage(_)
        ));
        assert!(matches!(
            identify(7, &vec![0xa5u8; BLOCK], &mut scratch),
            Found::Garbage(_)
        ));
        // Different writes of one block differ beyond the header.
        let mut other = vec![0u8; BLOCK];
        fill(&mut other, 7, 43);
        assert_ne!(block[24..], other[24..]);
    }

    #[test]
    fn flushed_writes_must_survive_and_unflushed_ones_may_go() {
        let mut run = Run::new(1, 1, None);
        // Block 5: write 1, FLUSH, write 2. Block 9: write 3 (never flushed).
        let log = CycleLog {
            ops: vec![op(5, 1, 1, false), op(5, 1, 2, false), op(9, 1, 3, false)],
            flushed: 1,
            bytes: 0,
        };
        let mut found = zeroes();
        found[5] = Found::Write(1);
        assert!(run.check(&log, &found).is_ok(), "unflushed writes lost");
        found[5] = Found::Write(2);
        found[9] = Found::Write(3);
        assert!(run.check(&log, &found).is_ok(), "everything kept");
        found[5] = Found::Zeroes;
        found[9] = Found::Zeroes;
        let e = run.check(&log, &found).unwrap_err();
        assert!(
            e.contains("block 5") && e.contains("durable write was lost"),
            "{e}"
        );
        // A FUA write is durable by itself.
        let fua = CycleLog {
            ops: vec![op(5, 1, 1, true)],
            flushed: 0,
            bytes: 0,
        };
        let e = run.check(&fua, &zeroes()).unwrap_err();
        assert!(e.contains("durable write was lost"), "{e}");
    }

    #[test]
    fn garbage_stale_and_foreign_versions_are_rejected() {
        let mut run = Run::new(1, 1, None);
        run.base[5] = 1;
        let log = CycleLog {
            ops: vec![op(5, 2, 10, false)],
            flushed: 1,
            bytes: 0,
        };
        let mut found = zeroes();
        found[5] = Found::Write(10);
        found[6] = Found::Write(11);
        assert!(run.check(&log, &found).is_ok());
        found[5] = Found::Write(1);
        let e = run.check(&log, &found).unwrap_err();
        assert!(e.contains("durable write was lost"), "stale version: {e}");
        found[5] = Found::Write(99);
        let e = run.check(&log, &found).unwrap_err();
        assert!(e.contains("never written"), "{e}");
        found[5] = Found::Garbage("torn".into());
        let e = run.check(&log, &found).unwrap_err();
        assert!(e.contains("garbage: torn"), "{e}");
        // A block the cycle did not touch must keep its version.
        let mut found = zeroes();
        found[5] = Found::Write(10);
        found[6] = Found::Write(11);
        found[100] = Found::Write(11);
        let e = run.check(&log, &found).unwrap_err();
        assert!(e.contains("block 100 was not written"), "{e}");
    }

    #[test]
    fn the_image_must_be_as_of_one_moment() {
        let mut run = Run::new(1, 1, None);
        // Write block 1, write block 2, zero block 1: nothing flushed.
        let log = CycleLog {
            ops: vec![op(1, 1, 1, false), op(2, 1, 2, false), op(1, 1, 0, false)],
            flushed: 0,
            bytes: 0,
        };
        let mut found = zeroes();
        for ok in [(0, 0), (1, 0), (1, 2), (0, 2)] {
            found[1] = if ok.0 == 1 {
                Found::Write(1)
            } else {
                Found::Zeroes
            };
            found[2] = if ok.1 == 2 {
                Found::Write(2)
            } else {
                Found::Zeroes
            };
            assert!(run.check(&log, &found).is_ok(), "{ok:?}");
        }
        // Request 1's write without request 0's is no moment of the device.
        let log = CycleLog {
            ops: vec![op(1, 1, 1, false), op(2, 1, 2, false)],
            flushed: 0,
            bytes: 0,
        };
        found[1] = Found::Zeroes;
        found[2] = Found::Write(2);
        let e = run.check(&log, &found).unwrap_err();
        assert!(e.contains("no single moment"), "{e}");
    }
}
