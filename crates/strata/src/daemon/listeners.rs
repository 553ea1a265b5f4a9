//! Listeners: TCP and unix sockets bound from the configuration, or handed over by systemd
//! socket activation; TLS settings; the shutdown signals.

use std::os::fd::{FromRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use strata_nbd::{TlsMode, TlsSettings};
use tokio::net::{TcpListener, UnixListener};
use tracing::info;

use super::config::{TlsConfig, TlsModeConfig};

pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    // A socket file left by a process that died is removed; a live one is not stolen.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("unix socket {} is in use by another server", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("listen on unix socket {}", path.display()))
}

pub fn load_tls(t: &TlsConfig) -> anyhow::Result<TlsSettings> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&t.cert)
        .with_context(|| format!("read TLS certificate {}", t.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse TLS certificate {}", t.cert.display()))?;
    if certs.is_empty() {
        bail!(
            "TLS certificate file {} holds no certificate",
            t.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&t.key)
        .with_context(|| format!("read TLS private key {}", t.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("set TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "use TLS certificate {} with key {}",
                t.cert.display(),
                t.key.display()
            )
        })?;
    Ok(TlsSettings {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        mode: match t.mode {
            TlsModeConfig::Required => TlsMode::Required,
            TlsModeConfig::Optional => TlsMode::Optional,
        },
    })
}

pub enum Activated {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Listeners passed by systemd socket activation (`LISTEN_PID`, `LISTEN_FDS`), if any.
pub fn systemd_listeners() -> anyhow::Result<Vec<Activated>> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let Some(n) = std::env::var("LISTEN_FDS").ok().filter(|_| pid_matches) else {
        return Ok(Vec::new());
    };
    let n: RawFd = n
        .parse()
        .with_context(|| format!("LISTEN_FDS={n:?} is not a number"))?;
    // These describe us only; children must not inherit them.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    const SD_LISTEN_FDS_START: RawFd = 3;
    let mut out = Vec::new();
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n {
        // SAFETY: `sockaddr_storage` is plain data; getsockname writes at most `len` bytes to it.
        let family = unsafe {
            let mut addr: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if libc::getsockname(
                fd,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
            ) != 0
            {
                bail!(
                    "systemd passed fd {fd}, which is not a socket: {}",
                    std::io::Error::last_os_error()
                );
            }
            i32::from(addr.ss_family)
        };
        if family == libc::AF_UNIX {
            // SAFETY: systemd hands us ownership of the listening sockets LISTEN_FDS names.
            let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
            l.set_nonblocking(true)?;
            out.push(Activated::Unix(UnixListener::from_std(l)?));
        } else {
            // SAFETY: as above.
            let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            l.set_nonblocking(true)?;
            out.push(Activated::Tcp(TcpListener::from_std(l)?));
        }
    }
    Ok(out)
}

pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}
