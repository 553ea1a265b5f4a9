//! Attaching an export as a kernel block device, by the best path the host kernel has:
//!
//! ```text
//!   nvmf://HOST:PORT/NQN  and /sys/module/nvme_tcp ─► nvme connect ─► /dev/nvmeXnY
//!   nbd://HOST:PORT/NAME  and /sys/module/nbd      ─► nbd-client   ─► /dev/nbdX
//!   otherwise (any nbd URI)                         ─► nbdfuse DIR/nbd ─► losetup ─► /dev/loopX
//! ```
//!
//! The nbdfuse path works on any kernel with FUSE and loop devices: nbdfuse (started in its own
//! process group, so it outlives the plugin) serves the export as the file `nbd` in a directory
//! `{state_dir}/attach/VOLUME`, and a loop device makes that file a block device. Everything is
//! found again from the mount table and `/sys/block/loop*/loop/backing_file`, so a plugin that
//! crashed and restarted detaches what it attached.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tonic::Status;
use tracing::{info, warn};

use super::system::{self, run};

/// How an export is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    /// nbdfuse in `dir`, its file behind `loop_dev`.
    Nbdfuse { dir: PathBuf, loop_dev: PathBuf },
    /// The kernel NBD client on `dev`.
    Nbd { dev: PathBuf },
    /// The kernel NVMe/TCP host: subsystem `nqn`, namespace `dev`.
    Nvme { nqn: String, dev: PathBuf },
}

impl Attachment {
    /// The block device.
    pub fn device(&self) -> &Path {
        match self {
            Attachment::Nbdfuse { loop_dev, .. } => loop_dev,
            Attachment::Nbd { dev } | Attachment::Nvme { dev, .. } => dev,
        }
    }
}

/// An export URI, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Export {
    Nbd {
        host: String,
        port: u16,
        name: String,
    },
    NbdUnix {
        socket: String,
        name: String,
    },
    Nvmf {
        host: String,
        port: u16,
        nqn: String,
    },
}

fn host_port(authority: &str, default: u16) -> Option<(String, u16)> {
    if authority.is_empty() {
        return None;
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            let port = p.parse().ok()?;
            Some((h.trim_matches(['[', ']']).to_string(), port))
        }
        _ => Some((authority.trim_matches(['[', ']']).to_string(), default)),
    }
}

fn parse(uri: &str) -> Option<Export> {
    let (scheme, rest) = uri.split_once("://")?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, name) = path.split_once('/').unwrap_or((path, ""));
    match scheme {
        "nbd" => {
            let (host, port) = host_port(authority, 10809)?;
            Some(Export::Nbd {
                host,
                port,
                name: name.to_string(),
            })
        }
        "nbd+unix" => {
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))?
                .to_string();
            Some(Export::NbdUnix {
                socket,
                name: name.to_string(),
            })
        }
        "nvmf" | "nvme+tcp" => {
            let (host, port) = host_port(authority, 4420)?;
            Some(Export::Nvmf {
                host,
                port,
                nqn: name.to_string(),
            })
        }
        _ => None,
    }
}

fn module(name: &str) -> bool {
    Path::new("/sys/module").join(name).exists()
}

/// Poll `ready` until it holds, for at most `limit`.
async fn until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Result<(), Status> {
    let deadline = Instant::now() + limit;
    while !ready() {
        if Instant::now() > deadline {
            return Err(Status::deadline_exceeded(format!(
                "{what}: not done within {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Where nbdfuse serves volume `key`.
pub fn fuse_dir(state_dir: &Path, key: &str) -> PathBuf {
    state_dir.join("attach").join(key)
}

/// Attach export `uri` of volume `key`.
pub async fn attach(
    state_dir: &Path,
    key: &str,
    uri: &str,
    read_only: bool,
) -> Result<Attachment, Status> {
    let export = parse(uri).ok_or_else(|| {
        Status::invalid_argument(format!("export URI {uri:?} is not nbd or nvmf"))
    })?;
    match export {
        Export::Nvmf { host, port, nqn } => {
            if !module("nvme_tcp") {
                return Err(Status::failed_precondition(format!(
                    "volume {key} is exported over NVMe/TCP but this host has no nvme-tcp module"
                )));
            }
            attach_nvme(&host, port, &nqn).await
        }
        Export::Nbd { host, port, name } if module("nbd") => {
            attach_nbd(&["-N", &name, &host, &port.to_string()]).await
        }
        Export::NbdUnix { socket, name } if module("nbd") => {
            attach_nbd(&["-N", &name, "-unix", &socket]).await
        }
        Export::Nbd { .. } | Export::NbdUnix { .. } => {
            attach_nbdfuse(state_dir, key, uri, read_only).await
        }
    }
}

/// The loop device whose backing file is `file`, if one is.
pub(super) fn loop_of(file: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing =
            std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        if Path::new(backing.trim()) == file {
            return Some(PathBuf::from("/dev").join(name));
        }
    }
    None
}

async fn attach_nbdfuse(
    state_dir: &Path,
    key: &str,
    uri: &str,
    read_only: bool,
) -> Result<Attachment, Status> {
    let dir = fuse_dir(state_dir, key);
    let file = dir.join("nbd");
    let served = system::mounted_at(&dir)?.is_some_and(|m| m.fs_type.contains("nbdfuse"));
    if !served {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Status::internal(format!("create {}: {e}", dir.display())))?;
        let log = std::fs::File::create(state_dir.join("attach").join(format!("{key}.log")))
            .map_err(|e| Status::internal(format!("create the nbdfuse log: {e}")))?;
        let mut cmd = std::process::Command::new("nbdfuse");
        if read_only {
            cmd.arg("-r");
        }
        use std::os::unix::process::CommandExt;
        let child = cmd
            .arg(&dir)
            .arg(uri)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // Its own process group: signals to the plugin's group do not reach it.
            .process_group(0)
            .spawn()
            .map_err(|e| Status::internal(format!("start nbdfuse: {e}")))?;
        let pid = child.id();
        // Reap it when it ends (after its FUSE mount is gone) without waiting here.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let ready = until(
            Duration::from_secs(30),
            "nbdfuse serving the export",
            || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) > 0,
        )
        .await;
        if let Err(e) = ready {
            let _ = run("fusermount3", &["-u".as_ref(), dir.as_os_str()]).await;
            let log = std::fs::read_to_string(state_dir.join("attach").join(format!("{key}.log")))
                .unwrap_or_default();
            return Err(Status::unavailable(format!(
                "nbdfuse {uri} (pid {pid}): {} {}",
                e.message(),
                log.trim()
            )));
        }
        info!(volume = key, uri, "nbdfuse serves the export");
    }
    let loop_dev = match loop_of(&file) {
        Some(l) => l,
        None => {
            let mut args: Vec<&std::ffi::OsStr> = vec!["--find".as_ref(), "--show".as_ref()];
            if read_only {
                args.push("--read-only".as_ref());
            }
            args.push(file.as_os_str());
            PathBuf::from(run("losetup", &args).await?.trim())
        }
    };
    info!(volume = key, device = %loop_dev.display(), "attached through nbdfuse and a loop device");
    Ok(Attachment::Nbdfuse { dir, loop_dev })
}

/// The first NBD device the kernel has free.
fn free_nbd() -> Option<PathBuf> {
    (0..1024).map(|i| format!("nbd{i}")).find_map(|n| {
        let sys = Path::new("/sys/block").join(&n);
        (sys.exists() && !sys.join("pid").exists()).then(|| PathBuf::from("/dev").join(n))
    })
}

async fn attach_nbd(args: &[&str]) -> Result<Attachment, Status> {
    let dev = free_nbd().ok_or_else(|| Status::resource_exhausted("no free /dev/nbdX"))?;
    let mut a: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_ref()).collect();
    // -L: set the device up by ioctl, which NodeExpandVolume's NBD_SET_SIZE needs.
    a.extend(["-L".as_ref(), dev.as_os_str()]);
    run("nbd-client", &a).await?;
    Ok(Attachment::Nbd { dev })
}

/// The namespace block device of subsystem `nqn`, if connected.
fn nvme_device(nqn: &str) -> Option<PathBuf> {
    for s in std::fs::read_dir("/sys/class/nvme-subsystem")
        .ok()?
        .flatten()
    {
        let subnqn = std::fs::read_to_string(s.path().join("subsysnqn")).unwrap_or_default();
        if subnqn.trim() != nqn {
            continue;
        }
        for e in std::fs::read_dir(s.path()).ok()?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("nvme") && n.contains('n') && Path::new("/dev").join(&n).exists() {
                return Some(PathBuf::from("/dev").join(n));
            }
        }
    }
    None
}

async fn attach_nvme(host: &str, port: u16, nqn: &str) -> Result<Attachment, Status> {
    if nvme_device(nqn).is_none() {
        run(
            "nvme",
            &[
                "connect",
                "-t",
                "tcp",
                "-a",
                host,
                "-s",
                &port.to_string(),
                "-n",
                nqn,
            ],
        )
        .await?;
    }
    let mut dev = None;
    until(
        Duration::from_secs(30),
        "the NVMe namespace appearing",
        || {
            dev = nvme_device(nqn);
            dev.is_some()
        },
    )
    .await?;
    let dev = dev.ok_or_else(|| Status::internal("no NVMe namespace device"))?;
    Ok(Attachment::Nvme {
        nqn: nqn.to_string(),
        dev,
    })
}

/// Undo an attachment (what is already undone is skipped).
pub async fn detach(a: &Attachment) -> Result<(), Status> {
    match a {
        Attachment::Nbdfuse { dir, loop_dev } => {
            let file = dir.join("nbd");
            if let Some(l) = loop_of(&file) {
                run("losetup", &["-d".as_ref(), l.as_os_str()]).await?;
            } else if loop_dev.exists() {
                // The loop device was detached already, or belongs to something else now.
            }
            if system::mounted_at(dir)?.is_some() {
                run("fusermount3", &["-u".as_ref(), dir.as_os_str()]).await?;
            }
            until(Duration::from_secs(10), "nbdfuse unmounted", || {
                system::mounted_at(dir).ok().flatten().is_none()
            })
            .await?;
            if let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(dir = %dir.display(), error = %e, "remove the nbdfuse directory");
                }
            }
            if let Some(parent) = dir.parent() {
                let log = parent.join(format!(
                    "{}.log",
                    dir.file_name().unwrap_or_default().to_string_lossy()
                ));
                let _ = std::fs::remove_file(log);
            }
        }
        Attachment::Nbd { dev } => {
            let name = dev.file_name().unwrap_or_default();
            if Path::new("/sys/block").join(name).join("pid").exists() {
                run("nbd-client", &["-d".as_ref(), dev.as_os_str()]).await?;
            }
        }
        Attachment::Nvme { nqn, .. } => {
            if nvme_device(nqn).is_some() {
                run("nvme", &["disconnect", "-n", nqn]).await?;
            }
        }
    }
    Ok(())
}

/// Re-read the size of an attached device after its volume grew; the size it has now.
pub async fn refresh(a: &Attachment, volume_size: u64) -> Result<u64, Status> {
    match a {
        Attachment::Nbdfuse { loop_dev, .. } => {
            // nbdfuse keeps the size it read when it connected: the loop device follows the
            // file, which grows when the volume is staged again.
            run("losetup", &["-c".as_ref(), loop_dev.as_os_str()]).await?;
        }
        Attachment::Nbd { dev } => {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(dev)
                .map_err(|e| Status::internal(format!("open {}: {e}", dev.display())))?;
            /// `NBD_SET_SIZE` from linux/nbd.h: `_IO(0xab, 2)`.
            const NBD_SET_SIZE: libc::c_ulong = 0xab02;
            // SAFETY: an ioctl on an open NBD device taking the size by value.
            let rc =
                unsafe { libc::ioctl(f.as_raw_fd(), NBD_SET_SIZE, volume_size as libc::c_ulong) };
            if rc != 0 {
                return Err(Status::internal(format!(
                    "NBD_SET_SIZE on {}: {}",
                    dev.display(),
                    std::io::Error::last_os_error()
                )));
            }
        }
        Attachment::Nvme { dev, .. } => {
            // nvme0n1 → nvme0
            let name = dev.file_name().unwrap_or_default().to_string_lossy();
            let ctrl = name.rfind('n').map_or(&*name, |i| &name[..i]).to_string();
            run("nvme", &["ns-rescan", &format!("/dev/{ctrl}")]).await?;
        }
    }
    system::size_of(a.device())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn export_uris_parse() {
        assert_eq!(
            parse("nbd://127.0.0.1:10809/vol").unwrap(),
            Export::Nbd {
                host: "127.0.0.1".into(),
                port: 10809,
                name: "vol".into()
            }
        );
        assert_eq!(
            parse("nbd+unix:///vol?socket=/run/s.sock").unwrap(),
            Export::NbdUnix {
                socket: "/run/s.sock".into(),
                name: "vol".into()
            }
        );
        assert_eq!(
            parse("nvmf://[::1]:4420/nqn.2024-01.io.strata:vol").unwrap(),
            Export::Nvmf {
                host: "::1".into(),
                port: 4420,
                nqn: "nqn.2024-01.io.strata:vol".into()
            }
        );
        assert!(parse("iscsi://x/y").is_none());
    }
}
