//! Programs a test starts on the host beside the VM (`qemu-nbd`, `qemu-storage-daemon`, …):
//! killed and reaped when the test drops them, so a failing test leaves none behind.
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use strata_testkit::host::storage_daemon;
//!
//! let qsd = storage_daemon(Path::new("/tmp/disk.img"), Path::new("/tmp/vhost.sock"), false,
//!     Duration::from_secs(60)).expect("qemu-storage-daemon serves the disk");
//! drop(qsd); // killed
//! ```

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Where `qemu-nbd` and `qemu-storage-daemon` come from.
pub const QEMU_UTILS: &str = "qemu-utils: scripts/test.sh installs it";

/// A program running on the host, killed and reaped when dropped.
#[derive(Debug)]
pub struct HostProcess {
    child: Child,
    name: String,
}

impl HostProcess {
    /// Start `command` with stdin from /dev/null; `hint` says how to install it if it is missing.
    pub fn spawn(command: &mut Command, hint: &str) -> Result<HostProcess> {
        let name = command.get_program().to_string_lossy().into_owned();
        let child = command.stdin(Stdio::null()).spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Missing {
                    program: name.clone(),
                    hint: hint.to_string(),
                }
            } else {
                Error::io(format!("start {name}"), e)
            }
        })?;
        Ok(HostProcess { child, name })
    }

    /// Wait until the program has made the Unix socket `path`, for at most `timeout`; fails
    /// at once if the program exits.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if is_socket(path) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::HostCommand {
                    what: format!("wait for the socket {}", path.display()),
                    command: self.name.clone(),
                    status: status.to_string(),
                    output: String::new(),
                    hint: String::new(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::io(
                    format!(
                        "{} made no socket at {} within {timeout:?}",
                        self.name,
                        path.display()
                    ),
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `path` is a Unix socket.
pub fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// `qemu-storage-daemon` exporting the raw file `file` as a writable vhost-user-blk device with
/// two queues on the Unix socket `socket` (passing discards down to the file when `discard`),
/// returned once the socket is there (within `timeout`).
pub fn storage_daemon(
    file: &Path,
    socket: &Path,
    discard: bool,
    timeout: Duration,
) -> Result<HostProcess> {
    let mut daemon = HostProcess::spawn(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0,filename={}{}",
                file.display(),
                if discard { ",discard=unmap" } else { "" }
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=export0,node-name=disk0,writable=on,num-queues=2,\
                 addr.type=unix,addr.path={}",
                socket.display()
            )),
        QEMU_UTILS,
    )?;
    daemon.wait_for_socket(socket, timeout)?;
    Ok(daemon)
}
