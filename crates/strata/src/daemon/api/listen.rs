//! The API's connections: the unix socket (its peer's credentials say whether it is the owner)
//! and TCP listeners (TLS, with client certificates where configured), each connection counted
//! against a limit so that idle clients cannot take every descriptor.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::auth::Peer;

/// How long a TLS client has to finish its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

#[derive(Debug)]
enum Io {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted API connection, holding its slot until it closes.
#[derive(Debug)]
pub struct ApiConn {
    io: Io,
    peer: Peer,
    _slot: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for ApiConn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for ApiConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ApiConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_write(cx, b),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The TLS settings of the API's TCP listeners.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTls {
    /// PEM certificate chain, the daemon's certificate first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificate(s): clients presenting a certificate it signed are let in without a
    /// token.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

impl ApiTls {
    /// A TLS acceptor; client certificates are required unless tokens may be used instead.
    pub fn acceptor(&self, tokens_too: bool) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("[api.tls] read certificate {}", self.cert.display()))?;
        if certs.is_empty() {
            bail!("[api.tls] {} holds no certificate", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("[api.tls] read private key {}", self.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("[api.tls] protocol versions")?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .with_context(|| format!("[api.tls] read client_ca {}", ca.display()))?
                {
                    roots
                        .add(c)
                        .with_context(|| format!("[api.tls] client_ca {}", ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                );
                let verifier = if tokens_too {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .context("[api.tls] client certificate verifier")?,
                )
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .with_context(|| format!("[api.tls] use {}", self.cert.display()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// The SHA-256 fingerprint of a client's certificate, as `sha256:hex` (first 16 bytes).
fn fingerprint(c: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<String> {
    let cert = c.get_ref().1.peer_certificates()?.first()?;
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    Some(format!(
        "sha256:{}",
        d.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// Connections accepted from `listener`, at most as many at once as `slots` allows (more wait
/// in the backlog), until `stop`.
pub fn unix(
    listener: UnixListener,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ApiConn>> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = unsafe { libc::getuid() };
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let Some(slot) = take_slot(&slots, &stop).await else {
                return;
            };
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((s, _)) => {
                    let uid = s.peer_cred().map(|c| c.uid()).ok();
                    let peer = Peer {
                        owner: uid.is_some_and(|u| u == me || u == 0),
                        certificate: None,
                        addr: format!("the unix socket (uid {})", uid.map_or(-1, i64::from)),
                    };
                    let conn = ApiConn {
                        io: Io::Unix(s),
                        peer,
                        _slot: slot,
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) => backoff(&e).await,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Connections accepted from a TCP `listener` (TLS when `tls` is given).
pub fn tcp(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ApiConn>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let Some(slot) = take_slot(&slots, &stop).await else {
                return;
            };
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let (s, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    backoff(&e).await;
                    continue;
                }
            };
            let mut peer = Peer {
                owner: false,
                certificate: None,
                addr: addr.to_string(),
            };
            let Some(tls) = tls.clone() else {
                let conn = ApiConn {
                    io: Io::Tcp(s),
                    peer,
                    _slot: slot,
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            // The handshake runs on its own, so a slow client holds only its slot.
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE, tls.accept(s)).await {
                    Ok(Ok(t)) => {
                        peer.certificate = fingerprint(&t);
                        let conn = ApiConn {
                            io: Io::Tls(Box::new(t)),
                            peer,
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => debug!(peer = %addr, error = %e, "API TLS handshake failed"),
                    Err(_) => debug!(peer = %addr, "API TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn take_slot(
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        _ = stop.cancelled() => None,
        p = slots.clone().acquire_owned() => p.ok(),
    }
}

/// After a failed accept (EMFILE and the like): say so, and pause rather than spin.
async fn backoff(e: &io::Error) {
    warn!(error = %e, "accept an API connection");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
