//! Strata's test kit: a small Linux VM whose kernel drives Strata's targets with its own
//! clients — `nbd-client`, the NVMe/TCP host (through `nvme-cli`), virtio-blk over
//! vhost-user, iSCSI — and whose kernel NVMe target (nvmet) serves as a reference NVMe/TCP
//! target. The host running the tests has none of these drivers and loads no modules, so they
//! run in a guest under `qemu-system-x86_64 -accel tcg`.
//!
//! ```text
//!  test (host)                                  guest (Debian 6.1 kernel, busybox initramfs)
//!  ───────────                                  ─────────────────────────────────────────────
//!  Strata server on 127.0.0.1:P  ◄── 10.0.2.2:P ── nbd-client, nvme connect, iscsi …
//!  TCP client → 127.0.0.1:H  ── hostfwd ──────────► nvmet (configfs) on 0.0.0.0:G
//!  vhost-user-blk socket  ◄── qemu chardev ──────── virtio-blk (/dev/vda)
//!  Vm::run("cmd")  ── serial console ─────────────► sh -c cmd → status + output
//! ```
//!
//! Use it as a dev-dependency and call it from plain threads (or `spawn_blocking`): the API is
//! blocking.
//!
//! ```no_run
//! use std::time::Duration;
//! use strata_testkit::vm::{Vm, VmConfig};
//!
//! let vm = Vm::boot(VmConfig::default()).expect("boot the test VM");
//! let (status, output) = vm.run("uname -r", Duration::from_secs(30)).expect("run");
//! assert_eq!(status, 0, "{output}");
//! vm.check("nbd-client 10.0.2.2 10809 /dev/nbd0", Duration::from_secs(60)).expect("connect");
//! vm.poweroff().expect("power off");
//! ```
//!
//! The first boot builds the guest (see [`image`]): the kernel, busybox, `nbd-client`,
//! `nvme-cli`, e2fsprogs, `fstrim`/`blockdev` and coreutils' `dd` are downloaded as Debian
//! packages with `apt-get download` and packed into an initramfs, cached in
//! `target/vm-cache/` (keyed by the package versions; a file lock makes concurrent test
//! binaries build it once). Errors say what is missing and how to get it (`scripts/test.sh`
//! installs qemu); nothing is skipped.
//!
//! Set `STRATA_VM_CONSOLE=1` to copy the guest's console to stderr as it arrives.

pub mod console;
pub mod cpio;
pub mod elf;
pub mod image;
pub mod nvme;
mod nvmet;
pub mod pattern;
pub mod vm;

pub use nvmet::NvmetTarget;

use std::fmt;
use std::time::Duration;

/// What went wrong preparing, booting or driving the test VM.
///
/// `Debug` prints the same text as `Display` (and the cause), so that `expect` in a test shows
/// the console log readably.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A program the harness needs is not installed.
    #[error("{program} not found: {hint}")]
    Missing { program: String, hint: String },
    /// An I/O operation on the host failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A host command (apt-get, dpkg-deb, …) failed.
    #[error("{what}: `{command}` failed ({status}){hint}\n{output}")]
    HostCommand {
        what: String,
        command: String,
        status: String,
        output: String,
        hint: String,
    },
    /// The guest image could not be assembled.
    #[error("build the test VM's image: {0}")]
    Image(String),
    /// The VM did not come up.
    #[error("boot the test VM: {reason}\n--- console (last lines) ---\n{console}")]
    Boot { reason: String, console: String },
    /// A guest command did not finish in time.
    #[error(
        "guest command did not finish within {after:?}: {command}\n--- its output so far ---\n\
         {output}\n--- console (last lines) ---\n{console}"
    )]
    Timeout {
        command: String,
        after: Duration,
        output: String,
        console: String,
    },
    /// qemu exited while the harness waited on the guest.
    #[error(
        "qemu exited while waiting for: {waiting_for}\n--- console (last lines) ---\n{console}"
    )]
    Exited {
        waiting_for: String,
        console: String,
    },
    /// A guest command exited with a non-zero status.
    #[error("guest command exited with status {status}: {command}\n--- output ---\n{output}")]
    Failed {
        command: String,
        status: i32,
        output: String,
    },
    /// A guest command's output was not what the harness expected.
    #[error("unexpected output from guest command: {command}\n--- output ---\n{output}")]
    Unexpected { command: String, output: String },
    /// A caller's argument was refused.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, "\ncaused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// The result of the harness's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it).
///
/// Another process may take it before the caller binds it; callers that can listen on port 0
/// should do that instead.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::io("bind 127.0.0.1:0 to find a free port", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("read the address of a listener", e))?;
    Ok(addr.port())
}

/// Waits until something accepts TCP connections at `addr` (a server the test started), for
/// at most `timeout`.
pub fn wait_for_port(addr: std::net::SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(Error::io(
                    format!("nothing accepted connections at {addr} within {timeout:?}"),
                    e,
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
