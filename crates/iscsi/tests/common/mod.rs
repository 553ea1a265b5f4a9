//! The iSCSI tests' kit: a tgt launcher (tgtd in the foreground on a free port with its own
//! control socket, targets on file-backed LUNs, CHAP accounts, kill and restart), nbdkit, fio,
//! `free_port` and `wait_until`.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `cond` until it holds (two minutes at most).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The path of program `name` (PATH, then the sbin directories); fails the test when it is
/// missing.
pub fn program(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/sbin", "/usr/bin"]) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: scripts/test.sh installs it (Debian: tgt, nbdkit, fio)");
}

/// Run a program to success; returns its output.
pub fn run(prog: &Path, args: &[&str]) -> Output {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}): {}{}",
        prog.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What was set up on a tgtd, to set it up again after a restart.
#[derive(Debug, Clone)]
enum Setup {
    Target {
        tid: u32,
        iqn: String,
        file: PathBuf,
        thin: bool,
    },
    Account {
        user: String,
        secret: String,
    },
    Bind {
        tid: u32,
        user: String,
    },
}

/// A tgtd (Linux SCSI target framework daemon) serving iSCSI on 127.0.0.1:`port`, with its own
/// control socket so that tests run side by side. Killed when dropped.
pub struct Tgt {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    setup: Vec<Setup>,
    next_tid: u32,
}

impl Tgt {
    /// Start tgtd on a free port; `dir` takes its log.
    pub fn start(dir: &Path) -> Tgt {
        let mut t = Tgt {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            setup: Vec::new(),
            next_tid: 1,
        };
        t.launch();
        t
    }

    /// tgtd takes control ports up to 32767; ports differ, so their remainders do too within
    /// the ephemeral range.
    fn control(&self) -> String {
        (self.port % 32768).to_string()
    }

    fn launch(&mut self) {
        let tgtd = program("tgtd");
        let log = File::create(self.dir.join(format!("tgtd-{}.log", self.port))).unwrap();
        let child = Command::new(tgtd)
            .args(["-f", "-C", &self.control(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tgtd");
        self.child = Some(child);
        let port = self.port;
        wait_until("tgtd to answer tgtadm and listen", || {
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().unwrap()) {
                panic!(
                    "tgtd exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join(format!("tgtd-{port}.log")))
                        .unwrap_or_default()
                );
            }
            self.tgtadm_ok(&["--mode", "target", "--op", "show"])
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    fn tgtadm_ok(&self, args: &[&str]) -> bool {
        Command::new(program("tgtadm"))
            .args(["-C", &self.control(), "--lld", "iscsi"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn tgtadm(&self, args: &[&str]) {
        let control = self.control();
        let mut all = vec!["-C", control.as_str(), "--lld", "iscsi"];
        all.extend_from_slice(args);
        run(&program("tgtadm"), &all);
    }

    fn apply(&self, s: &Setup) {
        match s {
            Setup::Target {
                tid,
                iqn,
                file,
                thin,
            } => {
                let tid = tid.to_string();
                self.tgtadm(&["--op", "new", "--mode", "target", "--tid", &tid, "-T", iqn]);
                self.tgtadm(&[
                    "--op",
                    "new",
                    "--mode",
                    "logicalunit",
                    "--tid",
                    &tid,
                    "--lun",
                    "1",
                    "-b",
                    file.to_str().unwrap(),
                ]);
                if *thin {
                    self.tgtadm(&[
                        "--op",
                        "update",
                        "--mode",
                        "logicalunit",
                        "--tid",
                        &tid,
                        "--lun",
                        "1",
                        "--params",
                        "thin_provisioning=1",
                    ]);
                }
                // tgt offers no digests unless told; allow CRC32C beside None.
                for key in ["HeaderDigest", "DataDigest"] {
                    self.tgtadm(&[
                        "--op",
                        "update",
                        "--mode",
                        "target",
                        "--tid",
                        &tid,
                        "-n",
                        key,
                        "-v",
                        "CRC32C,None",
                    ]);
                }
                self.tgtadm(&[
                    "--op", "bind", "--mode", "target", "--tid", &tid, "-I", "ALL",
                ]);
            }
            Setup::Account { user, secret } => self.tgtadm(&[
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                user,
                "--password",
                secret,
            ]),
            Setup::Bind { tid, user } => self.tgtadm(&[
                "--op",
                "bind",
                "--mode",
                "account",
                "--tid",
                &tid.to_string(),
                "--user",
                user,
            ]),
        }
    }

    /// Export `file` (created with `size` bytes if missing) as LUN 1 of a new target named
    /// `iqn.2024-01.io.strata.test:NAME`; thin provisioning enables UNMAP. Returns the target
    /// id and its name.
    pub fn add_target(&mut self, name: &str, file: &Path, size: u64, thin: bool) -> (u32, String) {
        if !file.exists() {
            File::create(file).unwrap().set_len(size).unwrap();
        }
        let tid = self.next_tid;
        self.next_tid += 1;
        let iqn = format!("iqn.2024-01.io.strata.test:{name}");
        let s = Setup::Target {
            tid,
            iqn: iqn.clone(),
            file: file.to_path_buf(),
            thin,
        };
        self.apply(&s);
        self.setup.push(s);
        (tid, iqn)
    }

    /// Require CHAP with `user`/`secret` for target `tid`.
    pub fn require_chap(&mut self, tid: u32, user: &str, secret: &str) {
        let account = Setup::Account {
            user: user.into(),
            secret: secret.into(),
        };
        if !self
            .setup
            .iter()
            .any(|s| matches!(s, Setup::Account { user: u, .. } if u == user))
        {
            self.apply(&account);
            self.setup.push(account);
        }
        let bind = Setup::Bind {
            tid,
            user: user.into(),
        };
        self.apply(&bind);
        self.setup.push(bind);
    }

    /// The URI of LUN 1 of target `iqn`, with `query` (e.g. `timeout=5`).
    pub fn uri(&self, iqn: &str, query: &str) -> String {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("iscsi://127.0.0.1:{}/{iqn}/1{q}", self.port)
    }

    /// SIGKILL tgtd: the target vanishes without a word.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Start tgtd again on the same port and set up everything it served before.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
        for s in self.setup.clone() {
            self.apply(&s);
        }
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An nbdkit serving a file on a TCP port; killed when dropped.
pub struct Nbdkit {
    child: Child,
    pub port: u16,
}

impl Nbdkit {
    /// Serve `file`; returns once nbdkit accepts connections (it writes its pid file then).
    pub fn start(file: &Path) -> Nbdkit {
        let port = free_port();
        let pidfile = file.with_extension(format!("{port}.pid"));
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new(program("nbdkit"))
            .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("-P")
            .arg(&pidfile)
            .arg("file")
            .arg(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        wait_until("nbdkit to listen", || pidfile.exists());
        Nbdkit { child, port }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether two files hold the same bytes over their first `len` bytes.
pub fn same_prefix(a: &Path, b: &Path, len: u64) -> Result<(), String> {
    use std::io::Read;
    let mut fa = File::open(a).unwrap();
    let mut fb = File::open(b).unwrap();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            return Err(format!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                at + i as u64
            ));
        }
        at += n as u64;
    }
    Ok(())
}
