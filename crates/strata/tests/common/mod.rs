//! Shared helpers for tests that start `strata serve` and drive it with real programs.
#![allow(dead_code)]

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
        let config = config.replace("{dir}", &dir.path().to_string_lossy());
        let config_path = dir.path().join("strata.toml");
        std::fs::write(&config_path, &config).expect("write config");
        let stderr_log = dir.path().join("strata.log");
        let mut child = Command::new(strata_bin())
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env("STRATA_LOG", "info,strata_nbd=debug")
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
