//! A test VM: qemu (TCG) booting the guest image, driven over its serial console.
//!
//! ```text
//!  Vm::run ─► stdin of qemu ─► ttyS0 ─► init.sh: decode, sh script ─► ttyS0 ─► stdout of qemu
//!                                                                               │
//!  Vm::run ◄── progress(log, id) ◄── console log (Mutex + Condvar) ◄── reader thread
//! ```
//!
//! The API is blocking: call it from a test's thread or from `spawn_blocking`. Every wait has a
//! deadline given by the caller; errors carry the end of the console log.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::console::{self, Progress};
use crate::image::{self, GuestImage};
use crate::{Error, Result};

/// The qemu program.
pub const QEMU: &str = "qemu-system-x86_64";

/// Lines of console log that errors carry.
const TAIL_LINES: usize = 80;

/// How to start a VM. `Default` gives 1024 MiB, 2 vCPUs, user-mode networking without
/// forwarded ports and a boot deadline of 5 minutes (a boot takes about 20 s under TCG, more
/// on a loaded machine).
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest memory in MiB (`-m`).
    pub memory_mib: u32,
    /// Virtual CPUs (`-smp`).
    pub cpus: u32,
    /// TCP ports forwarded from the host's 127.0.0.1 into the guest: (host port, guest port).
    /// A guest server listening on 0.0.0.0:guest is then reached at 127.0.0.1:host.
    pub hostfwd: Vec<(u16, u16)>,
    /// Back guest memory with a shared memfd (`-object memory-backend-memfd,…,share=on` and
    /// `-numa node,memdev=…`), as vhost-user devices need.
    pub shared_memory: bool,
    /// More qemu arguments, appended last (devices, chardevs, …).
    pub extra_qemu_args: Vec<String>,
    /// More kernel command-line arguments.
    pub kernel_args: Vec<String>,
    /// How long to wait for the guest to be ready for commands.
    pub boot_timeout: Duration,
}

impl Default for VmConfig {
    fn default() -> VmConfig {
        VmConfig {
            memory_mib: 1024,
            cpus: 2,
            hostfwd: Vec::new(),
            shared_memory: false,
            extra_qemu_args: Vec::new(),
            kernel_args: Vec::new(),
            boot_timeout: Duration::from_secs(300),
        }
    }
}

impl VmConfig {
    /// Forward 127.0.0.1:`host_port` on the host to `guest_port` in the guest.
    pub fn with_hostfwd(mut self, host_port: u16, guest_port: u16) -> VmConfig {
        self.hostfwd.push((host_port, guest_port));
        self
    }

    /// Attach a vhost-user-blk disk (and share guest memory, which it needs).
    pub fn with_vhost_user_blk(mut self, disk: &VhostUserBlk) -> VmConfig {
        self.shared_memory = true;
        self.extra_qemu_args.extend(disk.qemu_args());
        self
    }

    /// The full qemu command line (without the program) for this configuration.
    pub fn qemu_args(&self, kernel: &Path, initramfs: &Path) -> Vec<String> {
        let mut args: Vec<String> = [
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        args.extend([
            "-smp".to_string(),
            self.cpus.to_string(),
            "-m".to_string(),
            format!("{}M", self.memory_mib),
        ]);
        if self.shared_memory {
            args.extend(shared_memory_args(self.memory_mib));
        }
        let mut append = vec![
            "console=ttyS0".to_string(),
            "panic=-1".to_string(),
            "mitigations=off".to_string(),
            "random.trust_cpu=on".to_string(),
            // The crypto self-tests take seconds under emulation.
            "cryptomgr.notests".to_string(),
        ];
        append.extend(self.kernel_args.iter().cloned());
        args.extend([
            "-kernel".to_string(),
            kernel.to_string_lossy().into_owned(),
            "-initrd".to_string(),
            initramfs.to_string_lossy().into_owned(),
            "-append".to_string(),
            append.join(" "),
        ]);
        let mut netdev = "user,id=n0".to_string();
        for (host, guest) in &self.hostfwd {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        args.extend([
            "-netdev".to_string(),
            netdev,
            "-device".to_string(),
            "virtio-net-pci,netdev=n0".to_string(),
        ]);
        args.extend(self.extra_qemu_args.iter().cloned());
        args
    }
}

/// qemu arguments that back `memory_mib` of guest memory with a shared memfd (one NUMA node),
/// as vhost-user back ends need to map it. `-m` must name the same size.
pub fn shared_memory_args(memory_mib: u32) -> Vec<String> {
    vec![
        "-object".to_string(),
        format!("memory-backend-memfd,id=mem,size={memory_mib}M,share=on"),
        "-numa".to_string(),
        "node,memdev=mem".to_string(),
    ]
}

/// A vhost-user-blk disk: qemu connects to a back end listening on a unix socket; the guest
/// sees a virtio-blk disk (`/dev/vda` for the first).
#[derive(Debug, Clone)]
pub struct VhostUserBlk {
    /// The chardev's id (unique per VM).
    pub id: String,
    /// The back end's unix socket.
    pub socket: PathBuf,
    /// Virtqueues (`num-queues`).
    pub num_queues: u16,
    /// Reconnect to a back end that went away, after this long (`reconnect-ms`).
    pub reconnect: Option<Duration>,
}

impl VhostUserBlk {
    /// One queue, no reconnection.
    pub fn new(id: impl Into<String>, socket: impl Into<PathBuf>) -> VhostUserBlk {
        VhostUserBlk {
            id: id.into(),
            socket: socket.into(),
            num_queues: 1,
            reconnect: None,
        }
    }

    /// With `num_queues` virtqueues.
    pub fn num_queues(mut self, num_queues: u16) -> VhostUserBlk {
        self.num_queues = num_queues;
        self
    }

    /// Reconnecting after `delay` when the back end goes away.
    pub fn reconnect(mut self, delay: Duration) -> VhostUserBlk {
        self.reconnect = Some(delay);
        self
    }

    /// `-chardev socket,…` and `-device vhost-user-blk-pci,…`.
    pub fn qemu_args(&self) -> Vec<String> {
        // qemu option values escape a comma by doubling it.
        let path = self.socket.to_string_lossy().replace(',', ",,");
        let mut chardev = format!("socket,id={},path={path}", self.id);
        if let Some(delay) = self.reconnect {
            chardev.push_str(&format!(",reconnect-ms={}", delay.as_millis().max(1)));
        }
        vec![
            "-chardev".to_string(),
            chardev,
            "-device".to_string(),
            format!(
                "vhost-user-blk-pci,chardev={},num-queues={}",
                self.id, self.num_queues
            ),
        ]
    }
}

/// What qemu has printed, shared with the reader threads.
#[derive(Default)]
struct Output {
    serial: Vec<u8>,
    stderr: Vec<u8>,
    /// qemu's stdout closed: it exited.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    output: Mutex<Output>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Output> {
        self.output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why a wait ended without its condition.
enum Stop {
    Deadline,
    Exited,
}

/// A running test VM. Dropping it kills qemu.
#[derive(Debug)]
pub struct Vm {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    config: VmConfig,
    image: GuestImage,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let output = self.lock();
        f.debug_struct("Shared")
            .field("serial_bytes", &output.serial.len())
            .field("closed", &output.closed)
            .finish()
    }
}

impl Vm {
    /// Builds the guest image if needed (cached), starts qemu and waits until the guest is
    /// ready for commands (network up, configfs mounted, modules loaded).
    pub fn boot(config: VmConfig) -> Result<Vm> {
        check_qemu()?;
        let image = image::prepare()?;
        let started = Instant::now();
        let args = config.qemu_args(&image.kernel, &image.initramfs);
        let mut child = Command::new(QEMU)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("start {QEMU}"), e))?;
        let shared = Arc::new(Shared::default());
        let echo = std::env::var_os("STRATA_VM_CONSOLE").is_some_and(|v| !v.is_empty() && v != "0");
        if let Some(stdout) = child.stdout.take() {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vm-console".into())
                .spawn(move || pump(stdout, &shared, false, echo))
                .map_err(|e| Error::io("start the console reader", e))?;
        }
        if let Some(stderr) = child.stderr.take() {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vm-stderr".into())
                .spawn(move || pump(stderr, &shared, true, echo))
                .map_err(|e| Error::io("start the qemu stderr reader", e))?;
        }
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| Error::io("take qemu's stdin", std::io::ErrorKind::BrokenPipe.into()))?;
        let vm = Vm {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            shared,
            next_id: AtomicU64::new(1),
            config,
            image,
        };
        vm.wait_ready()?;
        eprintln!(
            "strata-testkit: VM ready after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(vm)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + self.config.boot_timeout;
        let waited = self.wait(deadline, |output| {
            console::has_line(&output.serial, console::READY).then_some(())
        });
        match waited {
            Ok(()) => {}
            Err(Stop::Deadline) => {
                return Err(Error::Boot {
                    reason: format!(
                        "no `{}` from the guest within {:?}",
                        console::READY,
                        self.config.boot_timeout
                    ),
                    console: self.tail(),
                })
            }
            Err(Stop::Exited) => {
                return Err(Error::Boot {
                    reason: format!("qemu exited ({})", self.exit_status()),
                    console: self.tail(),
                })
            }
        }
        let output = self.shared.lock();
        let modules = console::lines_starting(&output.serial, console::MODULE_FAILED);
        let steps = console::lines_starting(&output.serial, console::SETUP_FAILED);
        drop(output);
        if !modules.is_empty() || !steps.is_empty() {
            return Err(Error::Boot {
                reason: format!(
                    "the guest came up incomplete: modules that did not load {modules:?}, \
                     steps that failed {steps:?}"
                ),
                console: self.tail(),
            });
        }
        Ok(())
    }

    /// Runs `command` (a shell script: several lines, pipes, `&&` … are fine) in the guest and
    /// returns its exit status and output (stdout and stderr together). Waits at most
    /// `timeout`; a command that timed out may still be running in the guest, and later
    /// commands wait behind it.
    ///
    /// The guest runs one command at a time (calls from several threads queue). The output
    /// crosses an emulated serial line: keep it to what the test reads, and send what a
    /// command left running in the background (`cmd > /tmp/log 2>&1 &`) prints to a file.
    pub fn run(&self, command: &str, timeout: Duration) -> Result<(i32, String)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let from = self.shared.lock().serial.len();
        self.send(&console::encode_command(id, command), command)?;
        let deadline = Instant::now() + timeout;
        let waited = self.wait(deadline, |output| {
            match console::progress(&output.serial, from, id) {
                Progress::Done { status, output } => Some((status, output)),
                Progress::Queued | Progress::Running(_) => None,
            }
        });
        match waited {
            Ok(done) => Ok(done),
            Err(Stop::Deadline) => {
                let output = match console::progress(&self.shared.lock().serial, from, id) {
                    Progress::Queued => {
                        "(not started: the guest is busy with an earlier command)".to_string()
                    }
                    Progress::Running(output) | Progress::Done { output, .. } => output,
                };
                Err(Error::Timeout {
                    command: command.to_string(),
                    after: timeout,
                    output,
                    console: self.tail(),
                })
            }
            Err(Stop::Exited) => Err(Error::Exited {
                waiting_for: command.to_string(),
                console: self.tail(),
            }),
        }
    }

    /// Runs `command` and requires exit status 0; returns its output.
    pub fn check(&self, command: &str, timeout: Duration) -> Result<String> {
        let (status, output) = self.run(command, timeout)?;
        if status != 0 {
            return Err(Error::Failed {
                command: command.to_string(),
                status,
                output,
            });
        }
        Ok(output)
    }

    /// Loads a kernel module shipped in the image (and what it depends on), with `params`
    /// (`"rd_nr=1 rd_size=65536"`, or empty). Modules listed for boot are already loaded.
    pub fn modprobe(&self, module: &str, params: &str) -> Result<()> {
        if module.is_empty()
            || !module
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::InvalidArgument(format!("module name {module:?}")));
        }
        self.check(
            &format!("modprobe {module} {params}"),
            Duration::from_secs(60),
        )?;
        Ok(())
    }

    /// Everything the guest printed on its console so far, then what qemu printed on stderr.
    pub fn console_log(&self) -> String {
        let output = self.shared.lock();
        let mut text = String::from_utf8_lossy(&output.serial).into_owned();
        if !output.stderr.is_empty() {
            text.push_str("\n--- qemu stderr ---\n");
            text.push_str(&String::from_utf8_lossy(&output.stderr));
        }
        text
    }

    /// The configuration the VM was started with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The image the VM booted.
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// Powers the guest off and waits (up to a minute) for qemu to exit; kills it after that.
    pub fn poweroff(self) -> Result<()> {
        let _ = self.send(console::POWEROFF, "power off");
        let deadline = Instant::now() + Duration::from_secs(60);
        match self.wait(deadline, |_| None::<()>) {
            Ok(()) | Err(Stop::Exited) => {}
            Err(Stop::Deadline) => {
                // Dropping `self` kills qemu.
                return Err(Error::Timeout {
                    command: "poweroff".to_string(),
                    after: Duration::from_secs(60),
                    output: String::new(),
                    console: self.tail(),
                });
            }
        }
        let status = self.lock_child().wait();
        match status {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(Error::Exited {
                waiting_for: format!("a clean poweroff, but qemu exited with {status}"),
                console: self.tail(),
            }),
            Err(e) => Err(Error::io("wait for qemu", e)),
        }
    }

    fn send(&self, text: &str, what: &str) -> Result<()> {
        let mut stdin = self
            .stdin
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sent = stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush());
        sent.map_err(|_| Error::Exited {
            waiting_for: what.to_string(),
            console: self.tail(),
        })
    }

    /// Waits until `check` returns something, qemu exits, or `deadline`.
    fn wait<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&Output) -> Option<T>,
    ) -> Result<T, Stop> {
        let mut output = self.shared.lock();
        loop {
            if let Some(found) = check(&output) {
                return Ok(found);
            }
            if output.closed {
                return Err(Stop::Exited);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Stop::Deadline);
            }
            output = self
                .shared
                .changed
                .wait_timeout(output, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    fn tail(&self) -> String {
        let output = self.shared.lock();
        let mut text = console::tail(&output.serial, TAIL_LINES);
        if !output.stderr.is_empty() {
            text.push_str("\n--- qemu stderr ---\n");
            text.push_str(&console::tail(&output.stderr, TAIL_LINES));
        }
        text
    }

    fn exit_status(&self) -> String {
        match self.lock_child().try_wait() {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => "still running".to_string(),
            Err(e) => format!("unknown: {e}"),
        }
    }

    fn lock_child(&self) -> MutexGuard<'_, Child> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let mut child = self.lock_child();
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// Copies one of qemu's output streams into the shared log until it closes.
fn pump(mut stream: impl Read, shared: &Shared, stderr: bool, echo: bool) {
    let mut buffer = [0u8; 8192];
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) | Err(_) => 0,
            Ok(read) => read,
        };
        let mut output = shared.lock();
        if read == 0 {
            if !stderr {
                output.closed = true;
            }
            drop(output);
            shared.changed.notify_all();
            return;
        }
        let chunk = &buffer[..read];
        if echo {
            let _ = std::io::stderr().write_all(chunk);
        }
        if stderr {
            output.stderr.extend_from_slice(chunk);
        } else {
            output.serial.extend_from_slice(chunk);
        }
        drop(output);
        shared.changed.notify_all();
    }
}

/// Fails with what to do when qemu is not installed.
fn check_qemu() -> Result<()> {
    match Command::new(QEMU)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(Error::Missing {
            program: QEMU.to_string(),
            hint: format!("`{QEMU} --version` failed ({status}); run scripts/test.sh, which installs qemu-system-x86"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Missing {
            program: QEMU.to_string(),
            hint: "run scripts/test.sh, which installs qemu-system-x86 (10.0, bookworm-backports)"
                .to_string(),
        }),
        Err(e) => Err(Error::io(format!("start {QEMU} --version"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_user_blk_arguments() {
        let disk = VhostUserBlk::new("vub0", "/tmp/a,b.sock")
            .num_queues(4)
            .reconnect(Duration::from_secs(1));
        let config = VmConfig {
            memory_mib: 512,
            ..VmConfig::default()
        }
        .with_vhost_user_blk(&disk)
        .with_hostfwd(10809, 4420);
        let args = config.qemu_args(Path::new("/k"), Path::new("/i"));
        let joined = args.join(" ");
        assert!(joined.contains("-m 512M"), "{joined}");
        assert!(
            joined.contains(
                "-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("-chardev socket,id=vub0,path=/tmp/a,,b.sock,reconnect-ms=1000"),
            "{joined}"
        );
        assert!(
            joined.contains("-device vhost-user-blk-pci,chardev=vub0,num-queues=4"),
            "{joined}"
        );
        assert!(
            joined.contains("-netdev user,id=n0,hostfwd=tcp:127.0.0.1:10809-:4420"),
            "{joined}"
        );
    }
}
