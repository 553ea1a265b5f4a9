//! The CSI tests' kit: a `strata serve` and a `strata csi` started for a test (the `strata`
//! binary of this workspace, built by cargo unless the one beside the tests is up to date), a CSI client over the driver's socket, and
//! the programs the tests check the host with.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `target/PROFILE`: where the test itself was built (`target/PROFILE/deps/TEST`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test runs from target/PROFILE/deps")
        .to_path_buf()
}

/// The newest modification time of the workspace's sources (`crates/`, the manifests).
fn newest_source() -> std::time::SystemTime {
    fn walk(dir: &Path, newest: &mut std::time::SystemTime) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(m);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut newest = std::time::UNIX_EPOCH;
    walk(&root.join("crates"), &mut newest);
    for f in ["Cargo.toml", "Cargo.lock"] {
        if let Ok(m) = std::fs::metadata(root.join(f)).and_then(|m| m.modified()) {
            newest = newest.max(m);
        }
    }
    newest
}

/// The `strata` binary of this workspace, in the profile the tests were built in: the one
/// `cargo test --workspace` built beside them when it is newer than every source file, else
/// built now (so it is never older than the source).
pub fn strata_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile_dir = profile_dir();
            let bin = profile_dir.join("strata");
            let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
            if built.is_some_and(|b| b >= newest_source()) {
                return bin;
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-q", "-p", "strata", "--bin", "strata"]);
            // target/debug is the dev profile's; every other profile's directory is its name
            // (release, ci).
            let profile = profile_dir
                .file_name()
                .and_then(|n| n.to_str())
                .expect("a profile directory");
            if profile != "debug" {
                cmd.args(["--profile", profile]);
            }
            let target_dir = profile_dir.parent().expect("target directory");
            let status = cmd
                .env("CARGO_TARGET_DIR", target_dir)
                .status()
                .expect("run cargo build -p strata");
            assert!(status.success(), "cargo build -p strata failed");
            assert!(bin.exists(), "{} was not built", bin.display());
            bin
        })
        .clone()
}

/// A program the test needs, found on PATH (or in `target/tools/bin`, where `scripts/test.sh`
/// installs Go programs); the test fails when it is missing.
pub fn require(program: &str) -> PathBuf {
    let tools = profile_dir().parent().map(|t| t.join("tools/bin"));
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = tools
        .into_iter()
        .chain(std::env::split_paths(&path))
        .chain(["/usr/sbin".into(), "/sbin".into()]);
    for d in dirs {
        let p = d.join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!("{program} is not installed (scripts/test.sh installs it)");
}

/// Run a program that must succeed; its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(require(program))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Wait for `ready` to hold (polling), failing after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub stdout: Vec<String>,
}

impl Proc {
    /// Start `strata ARGS`, logging stderr to `log`, and wait for its `ready` line.
    pub fn strata(args: &[&str], log: PathBuf, env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(strata_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create a log"))
            .spawn()
            .expect("start strata");
        let out = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stdout = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(l) if l == "ready" => break,
                Ok(l) => stdout.push(l),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "strata {args:?} did not become ready: {stdout:?}\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        Proc { child, log, stdout }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon and a driver over it, in a temporary directory.
pub struct Driver {
    pub dir: tempfile::TempDir,
    /// `strata csi`, dropped (stopped) first.
    pub csi: Option<Proc>,
    pub daemon: Proc,
    /// `unix:///…/csi.sock`.
    pub endpoint: String,
    /// The daemon's API endpoint.
    pub api: String,
    /// The node ID the driver serves.
    pub node: String,
}

/// The daemon's configuration: NBD and NVMe/TCP on free ports, no metrics listener, a directory
/// store `local`, three pools.
pub const CONFIG: &str = r#"
data_dir = "{dir}/data"
[nbd]
listen = ["127.0.0.1:0"]
[nvmf]
listen = ["127.0.0.1:0"]
[metrics]
listen = []
[api]
node_name = "csi-node"
[[store]]
name = "local"
type = "dir"
path = "{dir}/store"
[[pool]]
name = "a"
path = "{dir}/pool-a"
[[pool]]
name = "b"
path = "{dir}/pool-b"
[[pool]]
name = "c"
path = "{dir}/pool-c"
"#;

impl Driver {
    /// Start `strata serve` and `strata csi --mode all` (with `csi_args`) over it.
    pub fn start(csi_args: &[&str]) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("strata-csi-")
            .tempdir()
            .expect("temporary directory");
        let d = dir.path().to_string_lossy().to_string();
        let config = CONFIG.replace("{dir}", &d);
        let config_path = dir.path().join("strata.toml");
        std::fs::write(&config_path, config).expect("write the config");
        let daemon = Proc::strata(
            &["serve", "--config", config_path.to_str().expect("UTF-8")],
            dir.path().join("serve.log"),
            &[("STRATA_LOG", "info")],
        );
        let api = format!("unix://{d}/data/api.sock");
        let endpoint = format!("unix://{d}/csi.sock");
        let state = format!("{d}/csi-state");
        let node = "csi-node".to_string();
        let mut args = vec![
            "--endpoint",
            &api,
            "csi",
            "--csi-endpoint",
            &endpoint,
            "--node-id",
            &node,
            "--mode",
            "all",
            "--state-dir",
            &state,
        ];
        args.extend_from_slice(csi_args);
        let csi = Proc::strata(
            &args,
            dir.path().join("csi.log"),
            &[("STRATA_LOG", "info,strata_csi=debug")],
        );
        Driver {
            dir,
            csi: Some(csi),
            daemon,
            endpoint,
            api,
            node,
        }
    }

    /// `strata --endpoint API ARGS --output json`, parsed.
    pub fn strata_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--endpoint", &self.api, "--output", "json"];
        a.extend_from_slice(args);
        let out = Command::new(strata_bin())
            .args(&a)
            .output()
            .expect("run strata");
        assert!(
            out.status.success(),
            "strata {a:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON from strata")
    }

    /// The names of the daemon's volumes.
    pub fn volumes(&self) -> Vec<String> {
        self.strata_json(&["volume", "list"])
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|v| v["spec"]["name"].as_str().map(String::from))
            .collect()
    }

    /// Both logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- strata csi ---\n{}\n--- strata serve ---\n{}",
            self.csi.as_ref().map(Proc::log).unwrap_or_default(),
            self.daemon.log()
        )
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.csi.take();
        // A test that failed midway leaves what it staged: undo it, so that nothing of it
        // outlives the test (mounts first, deepest first, then loop devices, then nbdfuse).
        let dir = self.dir.path();
        let mut mounts = mounts_under(dir);
        mounts.reverse();
        let (fuse, fs): (Vec<String>, Vec<String>) =
            mounts.into_iter().partition(|m| m.contains("/csi-state/"));
        for m in fs {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        for l in loops_under(dir) {
            let _ = Command::new("losetup")
                .args(["-d", &format!("/dev/{l}")])
                .status();
        }
        for m in fuse {
            let _ = Command::new("fusermount3").args(["-u", "-z", &m]).status();
        }
    }
}

/// Mount points under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(dir.as_ref()))
        .map(String::from)
        .collect()
}

/// Loop devices whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy();
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let b = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
                    b.starts_with(dir.as_ref())
                        .then(|| e.file_name().to_string_lossy().into_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// nbdfuse processes serving under `dir`.
pub fn nbdfuse_under(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                    let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                    (cmd.starts_with("nbdfuse") && cmd.contains(&dir)).then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}
