//! The target: one unix socket per exported volume, one front-end at a time on each.
//!
//! ```text
//!  serve(name) ─► socket NAME.sock (0600) ─► export thread: poll(listener, stop)
//!     accept ─► session: VhostUserDaemon (a thread per queue) + relay ─► until the
//!     front-end goes away (or stop) ─► quiesce ─► wait for the next front-end
//! ```
//!
//! A front-end that disconnects or restarts (qemu's `reconnect-ms=`) finds the socket waiting
//! again. Stopping an export first takes no more requests and lets those in flight complete
//! (used ring and notification), then closes the connection: a front-end that reconnects to
//! a new export of the same volume resumes at the first request it has no answer for.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use strata_bdev::BlockDevice;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::{debug, info, info_span, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::connection::{Disk, Session, SessionHandle};
use crate::error::Error;
use crate::relay::{BackendChannel, Relay};
use crate::settings::VhostUserSettings;

/// Serves block devices to vhost-user-blk front-ends (qemu, Cloud Hypervisor, Firecracker,
/// Kata …), one unix socket per volume.
///
/// The queue threads run the devices' futures on `runtime`; the target itself needs no async
/// context except for [`stop`](VhostUserTarget::stop) and
/// [`shutdown`](VhostUserTarget::shutdown), which wait for sessions to drain.
#[derive(Debug)]
pub struct VhostUserTarget {
    settings: Arc<VhostUserSettings>,
    runtime: Handle,
    exports: Mutex<HashMap<String, Arc<Export>>>,
    shut: AtomicBool,
}

/// A live export, as [`VhostUserTarget::serve`] returns it (cheap to clone).
#[derive(Debug, Clone)]
pub struct ExportHandle {
    export: Arc<Export>,
}

impl ExportHandle {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.export.disk.name
    }

    /// The socket front-ends connect to.
    pub fn socket_path(&self) -> &Path {
        &self.export.socket_path
    }

    /// Whether a front-end is connected now.
    pub fn connected(&self) -> bool {
        self.export.connected.load(Ordering::Acquire)
    }

    /// How many front-end connections the export has accepted so far.
    pub fn connections(&self) -> u64 {
        self.export.connections.load(Ordering::Acquire)
    }

    /// The capacity announced to front-ends, in bytes.
    pub fn capacity(&self) -> u64 {
        self.export.disk.capacity.load(Ordering::Acquire) * crate::codec::SECTOR_SIZE
    }
}

#[derive(Debug)]
struct Export {
    disk: Arc<Disk>,
    socket_path: PathBuf,
    /// Readable once the export is to stop (never read: it stays readable).
    stop: EventFd,
    connected: AtomicBool,
    connections: AtomicU64,
    /// The connected front-end, for config-change notifications.
    live: Mutex<Option<Arc<BackendChannel>>>,
    /// Fires when the export thread has finished.
    finished: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Export {
    fn live(&self) -> MutexGuard<'_, Option<Arc<BackendChannel>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal_stop(&self) {
        if let Err(e) = self.stop.write(1) {
            warn!(volume = %self.disk.name, error = %e, "signal a vhost-user export to stop");
        }
    }
}

impl VhostUserTarget {
    /// A target with `settings` whose devices run on `runtime`.
    pub fn new(settings: VhostUserSettings, runtime: Handle) -> Result<VhostUserTarget, Error> {
        settings.validate().map_err(Error::Settings)?;
        Ok(VhostUserTarget {
            settings: Arc::new(settings),
            runtime,
            exports: Mutex::new(HashMap::new()),
            shut: AtomicBool::new(false),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &VhostUserSettings {
        &self.settings
    }

    fn exports(&self) -> MutexGuard<'_, HashMap<String, Arc<Export>>> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Exports `device` as `name` on a new unix socket at `socket_path` (mode 0600; its
    /// directory is created, mode 0700, if missing). A stale socket file at the path is
    /// replaced; a live one, or anything else, is an error. `read_only` refuses writes even if
    /// the device takes them. GET_ID answers `name` (its first 20 bytes).
    pub fn serve(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        read_only: bool,
        socket_path: &Path,
    ) -> Result<ExportHandle, Error> {
        if self.shut.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        let mut exports = self.exports();
        if exports.contains_key(name) {
            return Err(Error::AlreadyExported(name.to_string()));
        }
        let socket_error = |source| Error::Socket {
            path: socket_path.to_path_buf(),
            source,
        };
        let listener = bind_private(socket_path).map_err(socket_error)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(socket_error)?;
        let (finished_tx, finished_rx) = oneshot::channel();
        let export = Arc::new(Export {
            disk: Arc::new(Disk::new(
                name.to_string(),
                device,
                read_only,
                self.settings.clone(),
            )),
            socket_path: socket_path.to_path_buf(),
            stop,
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            live: Mutex::new(None),
            finished: Mutex::new(Some(finished_rx)),
        });
        let thread_export = export.clone();
        let runtime = self.runtime.clone();
        std::thread::Builder::new()
            .name(format!("vhost-user/{name}"))
            .spawn(move || {
                let span = info_span!("vhost_user", volume = %thread_export.disk.name);
                let _span = span.enter();
                run_export(&thread_export, listener, &runtime);
                let _ = fs::remove_file(&thread_export.socket_path);
                let _ = finished_tx.send(());
            })
            .map_err(|e| {
                let _ = fs::remove_file(socket_path);
                Error::Thread(e)
            })?;
        info!(volume = %name, socket = %socket_path.display(), read_only, "vhost-user-blk export");
        exports.insert(name.to_string(), export.clone());
        Ok(ExportHandle { export })
    }

    /// The export of `name`, if any.
    pub fn export(&self, name: &str) -> Option<ExportHandle> {
        self.exports().get(name).map(|export| ExportHandle {
            export: export.clone(),
        })
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<ExportHandle> {
        let mut list: Vec<ExportHandle> = self
            .exports()
            .values()
            .map(|export| ExportHandle {
                export: export.clone(),
            })
            .collect();
        list.sort_by(|a, b| a.name().cmp(b.name()));
        list
    }

    /// Announces a new size of `name`'s device (after the device was resized): the capacity
    /// front-ends see changes, and a connected front-end gets a config-change notification
    /// (qemu then raises the guest's config interrupt). Returns whether a front-end was told.
    pub fn resized(&self, name: &str) -> Result<bool, Error> {
        let export = self
            .exports()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotExported(name.to_string()))?;
        let size = export.disk.device.geometry().size;
        export
            .disk
            .capacity
            .store(size / crate::codec::SECTOR_SIZE, Ordering::Release);
        let channel = export.live().clone();
        let Some(channel) = channel else {
            return Ok(false);
        };
        match channel.config_changed() {
            Ok(told) => {
                debug!(volume = %name, size, told, "vhost-user config change");
                Ok(told)
            }
            Err(e) => {
                warn!(volume = %name, error = %e, "tell the front-end about a new size");
                Ok(false)
            }
        }
    }

    /// Stops exporting `name`: no more requests are taken, those in flight complete (for at
    /// most `shutdown_timeout`), the front-end is disconnected and the socket removed.
    pub async fn stop(&self, name: &str) -> Result<(), Error> {
        let export = self
            .exports()
            .remove(name)
            .ok_or_else(|| Error::NotExported(name.to_string()))?;
        finish(&export).await;
        Ok(())
    }

    /// Stops every export (as [`stop`](Self::stop)) and refuses new ones.
    pub async fn shutdown(&self) {
        self.shut.store(true, Ordering::Release);
        let exports: Vec<Arc<Export>> = self.exports().drain().map(|(_, e)| e).collect();
        for export in &exports {
            export.signal_stop();
        }
        for export in &exports {
            finish(export).await;
        }
    }
}

impl Drop for VhostUserTarget {
    fn drop(&mut self) {
        for export in self.exports().values() {
            export.signal_stop();
        }
    }
}

async fn finish(export: &Export) {
    export.signal_stop();
    let finished = export
        .finished
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(finished) = finished {
        let _ = finished.await;
    }
}

/// Creates the listening socket at `path`, mode 0600 from the start: bound under a temporary
/// name in the same directory, restricted, then renamed into place.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process serves this socket",
                ));
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let temporary = dir.join(format!(
        ".{}.{}-{:x}",
        file_name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    let listener = UnixListener::bind(&temporary)?;
    let placed = fs::set_permissions(&temporary, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&temporary, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(listener)
}

/// Waits until one of `fds` is readable; returns which are.
fn poll_readable(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pollfds` is a valid array of `pollfds.len()` entries for the whole call.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(pollfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The export thread: accept a front-end, serve it until it goes, again, until stopped.
fn run_export(export: &Arc<Export>, listener: UnixListener, runtime: &Handle) {
    loop {
        let ready = match poll_readable(&[export.stop.as_raw_fd(), listener.as_raw_fd()]) {
            Ok(ready) => ready,
            Err(e) => {
                warn!(error = %e, "wait for vhost-user front-ends");
                return;
            }
        };
        if ready[0] {
            return;
        }
        let front = match listener.accept() {
            Ok((front, _)) => front,
            Err(e) => {
                debug!(error = %e, "accept a vhost-user front-end");
                continue;
            }
        };
        let n = export.connections.fetch_add(1, Ordering::AcqRel) + 1;
        let span = info_span!("session", conn = n);
        let _span = span.enter();
        info!("front-end connected");
        match serve_session(export, front, runtime) {
            Ok(()) => info!("front-end gone"),
            Err(e) => warn!(error = %e, "serve a vhost-user front-end"),
        }
    }
}

/// A name for the socket between the relay and vhost-user-backend, in the abstract namespace
/// (no file), unguessable.
fn private_address() -> io::Result<SocketAddr> {
    let name = format!(
        "strata-vhost-user-{}-{:x}{:x}",
        std::process::id(),
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    SocketAddr::from_abstract_name(name.as_bytes())
}

/// Serves one front-end until it disconnects or the export stops.
fn serve_session(export: &Arc<Export>, front: UnixStream, runtime: &Handle) -> io::Result<()> {
    let disk = &export.disk;
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let session = Arc::new(Session::new(disk.clone(), runtime.clone(), memory.clone()));
    let mut daemon =
        VhostUserDaemon::new(disk.name.clone(), SessionHandle(session.clone()), memory)
            .map_err(|e| io::Error::other(format!("start the queue threads: {e}")))?;
    let address = private_address()?;
    let handler_listener = UnixListener::bind_addr(&address)?;
    let back = UnixStream::connect_addr(&address)?;
    let mut handler_listener = Listener::from(handler_listener);
    daemon
        .start(&mut handler_listener)
        .map_err(|e| io::Error::other(format!("start the message handler: {e}")))?;
    drop(handler_listener);
    let done = EventFd::new(EFD_NONBLOCK)?;
    let channel = Arc::new(BackendChannel::default());
    let relay = Relay::start(&disk.name, front, back, channel.clone(), done.try_clone()?)?;
    *export.live() = Some(channel);
    export.connected.store(true, Ordering::Release);

    let stopped = match poll_readable(&[export.stop.as_raw_fd(), done.as_raw_fd()]) {
        Ok(ready) => ready[0] && !ready[1],
        Err(e) => {
            warn!(error = %e, "wait on a vhost-user front-end");
            true
        }
    };
    // Answer what is in flight before the front-end learns the connection is gone, so that
    // it resumes exactly after the last completed request when it comes back.
    let deadline = Instant::now() + disk.settings.shutdown_timeout;
    if !session.quiesce(deadline) {
        warn!(
            timeout = ?disk.settings.shutdown_timeout,
            "requests still in flight when the front-end was disconnected; they are abandoned"
        );
    }
    if stopped {
        debug!("export stopping: disconnecting the front-end");
    }
    relay.disconnect();
    *export.live() = None;
    export.connected.store(false, Ordering::Release);
    let ended = daemon.wait();
    relay.join();
    // Dropping the daemon stops and joins the queue threads.
    drop(daemon);
    match ended {
        Ok(()) => Ok(()),
        Err(e) => {
            debug!(error = %e, "the vhost-user message handler ended");
            Ok(())
        }
    }
}
