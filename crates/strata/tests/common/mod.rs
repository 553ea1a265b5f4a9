//! Shared helpers for tests that start `strata serve` and drive it with real programs.
#![allow(dead_code)]

pub mod raw;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `strata serve`, stopped (SIGTERM) when dropped.
pub struct Strata {
    child: Option<Child>,
    /// `127.0.0.1:PORT` of its first TCP listener.
    pub addr: String,
    /// Its unix sockets.
    pub sockets: Vec<PathBuf>,
    /// The temporary directory holding its config and data.
    pub dir: tempfile::TempDir,
    /// What it printed on stdout before `ready`.
    pub banner: Vec<String>,
    stderr_log: PathBuf,
}

/// The strata binary under test.
pub fn strata_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

impl Strata {
    /// Start with a config; `{dir}` in it expands to a fresh temporary directory.
    pub fn start(config: &str) -> Strata {
        Strata::start_with(config, &[])
    }

    /// Start with a config and extra flags.
    pub fn start_with(config: &str, args: &[&str]) -> Strata {
        let dir = tempfile::tempdir().expect("temporary directory");
        Strata::start_in(dir, config, args)
    }

    /// Start in an existing directory (to restart on the same data).
    pub fn start_in(dir: tempfile::TempDir, config: &str, args: &[&str]) -> Strata {
        Strata::start_env(dir, config, args, &[])
    }

    /// Start in an existing directory with extra environment variables.
    pub fn start_env(
        dir: tempfile::TempDir,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Strata {
        Strata::start_wrapped(dir, config, &[], args, env)
    }

    /// Start through a wrapper command that execs its arguments (`ip netns exec NS`).
    pub fn start_wrapped(
        dir: tempfile::TempDir,
        config: &str,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Strata {
        let config = config.replace("{dir}", &dir.path().to_string_lossy());
        let config_path = dir.path().join("strata.toml");
        std::fs::write(&config_path, &config).expect("write config");
        let stderr_log = dir.path().join("strata.log");
        // Free ports for what the configuration leaves at its default (fixed) ports.
        let mut ports = vec!["--metrics-listen", "127.0.0.1:0"];
        if !config.contains("[nvmf]") {
            ports.extend(["--nvmf-listen", "127.0.0.1:0"]);
        }
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(strata_bin());
                c
            }
            None => Command::new(strata_bin()),
        };
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(ports)
            .args(args)
            .env("STRATA_LOG", "info,strata_nbd=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).expect("create log"))
            .spawn()
            .expect("start strata serve");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) if line == "ready" => break,
                Ok(line) => banner.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "strata serve did not become ready; stdout: {banner:?}\nstderr:\n{}",
                        std::fs::read_to_string(&stderr_log).unwrap_or_default()
                    );
                }
            }
        }
        let addr = banner
            .iter()
            .find_map(|l| l.strip_prefix("listening: nbd://"))
            .map(|a| a.split_whitespace().next().unwrap_or(a).to_string())
            .unwrap_or_default();
        let sockets = banner
            .iter()
            .filter_map(|l| l.strip_prefix("listening: nbd+unix:///?socket="))
            .map(|s| PathBuf::from(s.split_whitespace().next().unwrap_or(s)))
            .collect();
        Strata {
            child: Some(child),
            addr,
            sockets,
            dir,
            banner,
            stderr_log,
        }
    }

    /// The gRPC API's unix socket, as an endpoint (`unix:///…/api.sock`).
    pub fn api_endpoint(&self) -> String {
        self.banner
            .iter()
            .find_map(|l| l.strip_prefix("api: unix://"))
            .map(|p| format!("unix://{p}"))
            .expect("the banner names the API socket")
    }

    /// The gRPC API's TCP address, as an endpoint (`http://127.0.0.1:PORT`).
    pub fn api_http(&self) -> String {
        self.banner
            .iter()
            .filter_map(|l| l.strip_prefix("api: "))
            .find(|a| a.starts_with("http://"))
            .expect("the banner names the API's TCP address")
            .to_string()
    }

    /// Where it serves Prometheus metrics: `http://127.0.0.1:PORT/metrics`.
    pub fn metrics_url(&self) -> String {
        self.banner
            .iter()
            .find_map(|l| l.strip_prefix("metrics: "))
            .expect("the banner names the metrics endpoint")
            .to_string()
    }

    /// `strata --endpoint unix://…/api.sock ARGS` against this server, which must succeed;
    /// returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_raw(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed:\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `strata --endpoint … ARGS`, whatever its exit status.
    pub fn cli_raw(&self, args: &[&str]) -> Output {
        Command::new(strata_bin())
            .arg("--endpoint")
            .arg(self.api_endpoint())
            .args(args)
            .output()
            .expect("run the strata CLI")
    }

    /// `nbd://ADDR/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// A path inside the server's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Send SIGTERM and wait for a clean exit; returns the exit status and the directory.
    pub fn stop(mut self) -> (ExitStatus, tempfile::TempDir) {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        let status = wait_timeout(&mut child, Duration::from_secs(60));
        let dir = std::mem::replace(
            &mut self.dir,
            tempfile::tempdir().expect("temporary directory"),
        );
        (status, dir)
    }
}

impl Strata {
    /// SIGKILL, as a crash would: no draining, no flush. Returns the directory to restart in.
    pub fn crash(mut self) -> tempfile::TempDir {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill strata");
        child.wait().expect("wait for strata");
        std::mem::replace(
            &mut self.dir,
            tempfile::tempdir().expect("temporary directory"),
        )
    }
}

impl Drop for Strata {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The body of `GET path` from `addr`, if it answered 200.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    std::io::Write::write_all(&mut c, request.as_bytes()).ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// A gauge or counter of a `/metrics` exposition, by its whole series (`name{labels}`).
pub fn metric(strata: &Strata, series: &str) -> Option<f64> {
    let url = strata.metrics_url();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    http_get(addr, "/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Send a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait for strata") {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("strata did not exit within {limit:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fail with a clear message if a program the test needs is missing.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: scripts/test.sh installs every tool the tests need"
    );
}

/// Run a program under a time limit; returns its output whatever the exit status.
pub fn run_raw(program: &str, args: &[&str]) -> Output {
    run_raw_env(program, args, &[])
}

/// [`run_raw`] with extra environment variables.
pub fn run_raw_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    require(program);
    Command::new("timeout")
        .args(["--kill-after=10", "600", program])
        .args(args)
        .envs(env.iter().copied())
        .env(
            "PATH",
            format!(
                "/usr/bin:/usr/sbin:/sbin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// Run a program and require success; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = run_raw(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file of `len` random bytes.
pub fn random_file(path: &Path, len: usize) {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(len as u64).fill_bytes(&mut data);
    std::fs::write(path, data).expect("write random file");
}

/// The standard test configuration: a thin file volume `disk`, a read-only file volume `ro`,
/// and a memory volume `scratch`, on a free port.
pub const CONFIG: &str = r#"
data_dir = "{dir}/data"
[nbd]
listen = ["127.0.0.1:0"]
unix = ["{dir}/nbd.sock"]

[[volume]]
name = "disk"
uri = "file://{data_dir}/disk.img?size=1G"
description = "thin file volume"

[[volume]]
name = "ro"
uri = "file://{data_dir}/ro.img?size=64M"
description = "read-only volume"
read_only = true

[[volume]]
name = "scratch"
uri = "mem://scratch?size=512M"
description = "memory volume"
"#;

/// Run qemu-io commands on `uri` (`-r` for read-only); fails on any error or pattern mismatch
/// (qemu-io itself exits 0 on a mismatch).
pub fn qemu_io(uri: &str, read_only: bool, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io {cmds:?} on {uri}: {out}"
    );
    out
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local address")
        .port()
}

/// Poll `cond` until it holds; fails the test after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An etcd server in its own directory, listening on `host`; killed when dropped.
pub struct Etcd {
    child: Option<Child>,
    host: String,
    client: u16,
    peer: u16,
    dir: PathBuf,
}

impl Etcd {
    /// On loopback.
    pub fn start(dir: &Path) -> Etcd {
        Etcd::start_on("127.0.0.1", dir)
    }

    /// On `host` (an address of this network namespace).
    pub fn start_on(host: &str, dir: &Path) -> Etcd {
        let mut e = Etcd {
            child: None,
            host: host.to_string(),
            client: free_port(),
            peer: free_port(),
            dir: dir.to_path_buf(),
        };
        e.restart();
        e
    }

    /// `HOST:PORT` of its client listener.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.client)
    }

    pub fn restart(&mut self) {
        require("etcd");
        let client = format!("http://{}:{}", self.host, self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .args(["--name", "strata-test"])
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("strata-test={peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("etcd.log")).expect("create etcd.log"))
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let health = self.endpoint();
        wait_until("etcd to answer", Duration::from_secs(60), || {
            http_get(&health, "/health").is_some_and(|b| b.contains("true"))
        });
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real S3 server for the tests: `s3s-fs`, which keeps each bucket as a directory and each
/// object as a file under it. It serves one bucket, [`S3Server::BUCKET`], on a free port with
/// the credentials [`S3Server::ACCESS_KEY`] / [`S3Server::SECRET_KEY`], and is killed when
/// dropped.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Holds the served root (`root/`) and the server's log.
    dir: tempfile::TempDir,
}

impl S3Server {
    pub const BUCKET: &'static str = "strata";
    pub const ACCESS_KEY: &'static str = "AK";
    pub const SECRET_KEY: &'static str = "SK";

    /// Start the server and return once it accepts connections. A missing `s3s-fs` fails the
    /// test (scripts/test.sh installs it).
    pub fn start() -> S3Server {
        require("s3s-fs");
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join(S3Server::BUCKET)).expect("create the bucket");
        let log = dir.path().join("s3s-fs.log");
        let port = free_port();
        let mut child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3Server::ACCESS_KEY])
            .args(["--secret-key", S3Server::SECRET_KEY])
            .arg(&root)
            // The server needs no AWS configuration of its own; keep the caller's out of it.
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("create log"))
            .stderr(std::fs::File::create(dir.path().join("s3s-fs.err")).expect("create log"))
            .spawn()
            .expect("start s3s-fs");
        let addr = format!("127.0.0.1:{port}");
        wait_until(
            "s3s-fs to accept connections",
            Duration::from_secs(30),
            || {
                if let Some(status) = child.try_wait().expect("wait for s3s-fs") {
                    panic!(
                        "s3s-fs exited before accepting connections ({status}):\n{}",
                        std::fs::read_to_string(dir.path().join("s3s-fs.err")).unwrap_or_default()
                    );
                }
                std::net::TcpStream::connect(&addr).is_ok()
            },
        );
        S3Server {
            child,
            endpoint: format!("http://{addr}"),
            dir,
        }
    }

    /// The directory that holds the bucket's objects: the object `KEY` is the file
    /// `bucket_dir()/KEY`.
    pub fn bucket_dir(&self) -> PathBuf {
        self.dir.path().join("root").join(S3Server::BUCKET)
    }

    /// A `[[store]]` entry for `strata serve` naming this server's bucket, with `prefix`.
    pub fn store_toml(&self, name: &str, prefix: &str) -> String {
        format!(
            r#"
[[store]]
name = "{name}"
type = "s3"
endpoint = "{}"
region = "us-east-1"
bucket = "{}"
prefix = "{prefix}"
access_key_id = "{}"
secret_access_key = "{}"
"#,
            self.endpoint,
            S3Server::BUCKET,
            S3Server::ACCESS_KEY,
            S3Server::SECRET_KEY
        )
    }

    /// What the server printed so far.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("s3s-fs.log"), read("s3s-fs.err"))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Real-client flows, shared by the tests that run them on different kinds of volume. Each
// takes the export's URI (a writable export of 1 GiB) and fails the test on any mismatch.

/// qemu-io on a writable 1 GiB export: patterns, write zeroes, discard, flush, aio bursts, a
/// readback on a new connection, and an out-of-range write that is an error, not a crash.
pub fn qemu_io_patterns_zeroes_discard_flush_and_aio(uri: &str) {
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1M 4k",
            "-c",
            "write -P 0x11 8400000 777",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 4k",
            "-c",
            "read -P 0x11 8400000 777",
            "-c",
            "write -z 64k 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 0xab 128k 64k",
            "-c",
            "discard 256k 256k",
            "-c",
            "read -P 0 256k 256k",
            "-c",
            "aio_write -P 0x21 2M 64k",
            "-c",
            "aio_write -P 0x22 3M 64k",
            "-c",
            "aio_write -P 0x23 4M 64k",
            "-c",
            "aio_write -P 0x24 5M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x21 2M 64k",
            "-c",
            "read -P 0x24 5M 64k",
            "-c",
            "write -P 0x55 1020M 4M",
            "-c",
            "read -P 0x55 1020M 4M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("read ")).count(),
        9,
        "every read ran: {out}"
    );

    // Data is still there on a new connection.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            uri,
            "-c",
            "read -P 0xcd 1M 4k",
            "-c",
            "read -P 0x22 3M 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // Out of range is an error the client sees, not a crash.
    let out = run_raw("qemu-io", &["-f", "raw", uri, "-c", "write -P 1 1024M 4k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("error") || text.contains("Input/output") || text.contains("out of"),
        "{text}"
    );
}

/// Whether two raw images (files or NBD URIs) hold the same bytes, by `qemu-img compare`
/// (a shorter one compares as if padded with zeroes). Anything but "identical" or "differ"
/// fails the test.
pub fn images_identical(a: &str, b: &str) -> bool {
    let out = run_raw("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {a} {b} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Fail unless two raw images hold the same bytes (see [`images_identical`]).
#[track_caller]
pub fn assert_identical(a: &str, b: &str) {
    assert!(images_identical(a, b), "{a} and {b} differ");
}

/// qemu-img convert of 64 MiB of random data into the export and of the whole export out to
/// a file (in `scratch`), then `qemu-img compare` both ways.
pub fn qemu_img_convert_in_and_out(scratch: &Path, uri: &str) {
    let src = scratch.join("src.raw");
    random_file(&src, 64 << 20);
    let src_s = src.to_str().expect("UTF-8 path");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, uri],
    );
    let back = scratch.join("back.raw");
    let back_s = back.to_str().expect("UTF-8 path");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", uri, back_s],
    );
    // The export is 1 GiB; the first 64 MiB are the source.
    assert_identical(src_s, uri);
    assert_identical(back_s, uri);
}

/// `nbdinfo --map` after writing 4 MiB and trimming its second megabyte: data, a hole that
/// reads as zeroes, data.
pub fn nbdinfo_map_shows_the_trimmed_hole(uri: &str) {
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            uri,
            "-c",
            "write -P 1 0 4M",
            "-c",
            "discard 1M 1M",
        ],
    );
    assert_map_is_data_hole_data(uri);
}

/// `nbdinfo --map` shows the layout [`nbdinfo_map_shows_the_trimmed_hole`] makes: a megabyte of
/// data, a megabyte of hole that reads as zeroes, then data.
pub fn assert_map_is_data_hole_data(uri: &str) {
    let map = run("nbdinfo", &["--map", uri]);
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // Columns: offset length type description.
    let find = |off: u64| {
        lines
            .iter()
            .find(|c| c[0].parse::<u64>().ok() == Some(off))
            .cloned()
    };
    let first = find(0).unwrap_or_else(|| panic!("{map}"));
    assert_eq!(first[1], "1048576", "{map}");
    assert_eq!(first[2], "0", "data first: {map}");
    let hole = find(1 << 20).unwrap_or_else(|| panic!("{map}"));
    assert_eq!(
        hole[2], "3",
        "the trimmed megabyte is a hole that reads as zeroes: {map}"
    );
    assert_eq!(hole[1], "1048576", "{map}");
    assert_eq!(
        find(2 << 20).unwrap_or_else(|| panic!("{map}"))[2],
        "0",
        "{map}"
    );
}

/// nbdcopy the file `src` into the export and the whole export back out (to `back`) over
/// `connections` connections: the copy starts with `src` and the rest is zeroes.
pub fn nbdcopy_in_and_out(src: &Path, back: &Path, uri: &str, connections: usize) {
    let conns = format!("--connections={connections}");
    run("nbdcopy", &[&conns, src.to_str().expect("UTF-8 path"), uri]);
    let _ = std::fs::remove_file(back);
    // Copy out exactly the first 256 MiB through a qemu-nbd-free path: nbdcopy to a file, then cut.
    run(
        "nbdcopy",
        &[&conns, uri, back.to_str().expect("UTF-8 path")],
    );
    let a = std::fs::read(src).expect("read the source");
    let b = std::fs::read(back).expect("read the copy");
    assert!(b.len() >= a.len(), "{uri}: copied out {} bytes", b.len());
    assert!(
        a[..] == b[..a.len()],
        "{uri} with {connections} connections: data differs"
    );
    assert!(
        b[a.len()..].iter().all(|&x| x == 0),
        "{uri}: the rest of the export is zeroes"
    );
    std::fs::remove_file(back).expect("remove the copy");
}

/// fio's nbd engine: 64 MiB of 4 KiB random writes at queue depth 32, verified with crc32c;
/// fio must report no errors.
pub fn fio_randwrite_verify_crc32c_qd32(uri: &str) {
    fio_verify_job(uri, "--do_verify=1");
}

/// fio's nbd engine: 4 KiB random writes over 64 MiB at queue depth 32 with crc32c
/// verification; `mode` is `--do_verify=1` (write, then verify) or `--verify_only`. Fails on
/// any fio error; returns fio's terse (v3) fields.
pub fn fio_verify_job(uri: &str, mode: &str) -> Vec<String> {
    fio_verify(uri, mode, "4k", "64M")
}

/// fio's nbd engine: random writes of `bs` bytes over `size` at queue depth 32 with crc32c
/// verification, as [`fio_verify_job`].
pub fn fio_verify(uri: &str, mode: &str, bs: &str, size: &str) -> Vec<String> {
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            &format!("--bs={bs}"),
            "--iodepth=32",
            &format!("--size={size}"),
            "--verify=crc32c",
            "--verify_fatal=1",
            mode,
            "--verify_state_save=0",
            "--output-format=terse",
            "--terse-version=3",
        ],
    );
    // Terse v3: field 5 is the error count.
    let fields: Vec<String> = out
        .lines()
        .last()
        .unwrap_or("")
        .split(';')
        .map(String::from)
        .collect();
    assert!(fields.len() > 5, "{out}");
    assert_eq!(fields[4], "0", "fio reported errors on {uri}: {out}");
    fields
}

/// A real ext4 on the export: nbdfuse exposes it as a file, losetup makes that a block device,
/// then mkfs, mount, write files, umount, e2fsck, mount again and read them back. Mount
/// points go in `scratch`. Needs root.
pub fn ext4_through_nbdfuse_and_a_loop_device(scratch: &Path, uri: &str) {
    ext4_through_nbdfuse(scratch, uri, false);
}

/// [`ext4_through_nbdfuse_and_a_loop_device`] with the loop device in direct-I/O mode
/// (`losetup --direct-io=on`, checked in sysfs): the loop device passes the file system's
/// 512-byte-aligned requests on as they are, uncached, so the export sees requests smaller
/// than a page.
pub fn ext4_through_nbdfuse_and_a_direct_io_loop_device(scratch: &Path, uri: &str) {
    ext4_through_nbdfuse(scratch, uri, true);
}

fn ext4_through_nbdfuse(scratch: &Path, uri: &str, direct_io: bool) {
    let mnt_fuse = scratch.join("fuse");
    let mnt_fs = scratch.join("fs");
    std::fs::create_dir_all(&mnt_fuse).expect("create the FUSE mount point");
    std::fs::create_dir_all(&mnt_fs).expect("create the mount point");
    let fuse = mnt_fuse.to_str().expect("UTF-8 path").to_string();
    let fs = mnt_fs.to_str().expect("UTF-8 path").to_string();

    // nbdfuse stays in the foreground with -f; run it as a child and wait for the file to appear.
    require("nbdfuse");
    let mut nbdfuse = Command::new("nbdfuse")
        .args([&fuse, uri])
        .stdin(Stdio::null())
        .spawn()
        .expect("start nbdfuse");
    let image = mnt_fuse.join("nbd");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse did not expose {}",
            image.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    struct Cleanup<'a> {
        fs: &'a str,
        fuse: &'a str,
        loopdev: Option<String>,
    }
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.fs).status();
            if let Some(l) = &self.loopdev {
                let _ = Command::new("losetup").args(["-d", l]).status();
            }
            let _ = Command::new("fusermount3").args(["-u", self.fuse]).status();
        }
    }
    let mut cleanup = Cleanup {
        fs: &fs,
        fuse: &fuse,
        loopdev: None,
    };
    let mut losetup = vec!["--find", "--show"];
    if direct_io {
        losetup.extend(["--direct-io=on", "--sector-size=512"]);
    }
    losetup.push(image.to_str().expect("UTF-8 path"));
    let loopdev = run("losetup", &losetup).trim().to_string();
    cleanup.loopdev = Some(loopdev.clone());
    if direct_io {
        let name = loopdev.trim_start_matches("/dev/");
        let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
            .expect("read the loop device's direct-I/O flag");
        assert_eq!(dio.trim(), "1", "{loopdev} uses direct I/O");
    }
    run("mkfs.ext4", &["-q", "-F", &loopdev]);
    run("mount", &[&loopdev, &fs]);
    let mut files = Vec::new();
    for i in 0..8 {
        let p = mnt_fs.join(format!("file{i}"));
        random_file(&p, (i + 1) * 1_000_003);
        files.push((p.clone(), std::fs::read(&p).expect("read a file back")));
    }
    run("sync", &[]);
    run("umount", &[&fs]);
    let fsck = run_raw("e2fsck", &["-f", "-n", &loopdev]);
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    run("mount", &[&loopdev, &fs]);
    for (p, data) in &files {
        assert!(
            std::fs::read(p).expect("read a file after remount") == *data,
            "{} reads back identical after remount",
            p.display()
        );
    }
    drop(cleanup);
    let _ = nbdfuse.wait();
}
