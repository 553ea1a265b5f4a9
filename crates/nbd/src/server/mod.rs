//! The NBD server: accepts connections, negotiates, and serves pipelined requests against the
//! block device of the chosen export.
//!
//! ```text
//!   accept (connection limit) ─► negotiate (options, STARTTLS) ─► transmission:
//!
//!     reader ──request──► task per request ──► device
//!       │ (in-flight byte budget)                 │
//!       └──────────── writer ◄──── reply ─────────┘   one writer, vectored writes
//! ```
//!
//! Requests are answered as they complete, out of order. A bad request gets an NBD error and the
//! connection stays usable; only a broken framing (bad magic) or a vanished client ends it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use strata_bdev::{BlockDevice, Transactional};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::codec::{self, tx_flags};
use crate::transmission;

mod negotiate;

use negotiate::{Negotiated, Session};

/// One exported device.
#[derive(Debug)]
pub struct Export {
    /// The name clients ask for.
    pub name: String,
    /// A line for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The device behind it.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the device takes them.
    pub read_only: bool,
    /// The device's transactions, for the transaction commands (64–67); `None`: refused.
    pub transactions: Option<Arc<dyn Transactional>>,
}

/// Finds exports that are not in the server's list when a client asks for them: names made
/// up on the fly (a snapshot, an image of a store, an access token).
#[async_trait::async_trait]
pub trait Resolver: Send + Sync + std::fmt::Debug {
    /// The export `name` selects: `Ok(None)` if there is none, `Err(why)` if it is refused.
    async fn resolve(&self, name: &str) -> Result<Option<Resolved>, String>;
}

/// What a [`Resolver`] found.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub export: Arc<Export>,
    /// A client identity: a new connection with the same one takes over from the previous
    /// one, which is drained and closed.
    pub client_id: Option<String>,
}

impl Export {
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only || self.device.capabilities().read_only
    }

    /// The transmission flags advertised for this export.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let caps = self.device.capabilities();
        let mut f =
            tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::SEND_FUA | tx_flags::SEND_CACHE;
        if self.is_read_only() {
            f |= tx_flags::READ_ONLY;
        } else {
            // Zeroing is always possible (emulated by writes when not native), and a device
            // that cannot zero fast answers FAST_ZERO requests with ENOTSUP at once.
            f |= tx_flags::SEND_WRITE_ZEROES | tx_flags::SEND_FAST_ZERO;
            if caps.trim {
                f |= tx_flags::SEND_TRIM;
            }
        }
        if structured {
            f |= tx_flags::SEND_DF;
        }
        if caps.multi_conn {
            f |= tx_flags::CAN_MULTI_CONN;
        }
        f
    }
}

/// Whether the server speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Clients may use STARTTLS or stay in plain text.
    Optional,
    /// Every client must use STARTTLS before anything else.
    Required,
}

/// TLS settings: the certificate, key and mode.
#[derive(Clone)]
pub struct TlsSettings {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub mode: TlsMode,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Server settings; [`ServerConfig::default`] holds the documented defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Bytes of requests in flight per connection (read and write payloads); the server stops
    /// reading a connection that reaches it until replies drain.
    pub max_in_flight_bytes: usize,
    /// The largest READ or WRITE payload accepted (advertised as the maximum block size).
    pub max_payload: u32,
    /// Time a client has to finish negotiation.
    pub handshake_timeout: Duration,
    /// The export an empty name selects.
    pub default_export: Option<String>,
    /// TLS, if configured.
    pub tls: Option<TlsSettings>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 256,
            max_in_flight_bytes: 64 << 20,
            max_payload: 32 << 20,
            handshake_timeout: Duration::from_secs(60),
            default_export: None,
            tls: None,
        }
    }
}

/// An NBD server over a set of exports.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    resolver: RwLock<Option<Arc<dyn Resolver>>>,
    /// Connections by client identity: their id, their stop token, and when they are done.
    clients: std::sync::Mutex<HashMap<String, ClientConn>>,
    next_conn: std::sync::atomic::AtomicU64,
    connections: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Server {
    /// A server with `exports`.
    pub fn new(config: ServerConfig, exports: Vec<Export>) -> Arc<Server> {
        let exports = exports
            .into_iter()
            .map(|e| (e.name.clone(), Arc::new(e)))
            .collect();
        Arc::new(Server {
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            config,
            exports: RwLock::new(exports),
            resolver: RwLock::new(None),
            clients: std::sync::Mutex::new(HashMap::new()),
            next_conn: std::sync::atomic::AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Add or replace an export; connections already open keep the device they have.
    pub fn add_export(&self, export: Export) {
        self.exports
            .write()
            .expect("lock poisoned")
            .insert(export.name.clone(), Arc::new(export));
    }

    /// Remove an export from new negotiations.
    pub fn remove_export(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.write().expect("lock poisoned").remove(name)
    }

    /// The exports, by name.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.exports
            .read()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Resolve names that are not in the list with `resolver` from now on.
    pub fn set_resolver(&self, resolver: Arc<dyn Resolver>) {
        *self.resolver.write().expect("lock poisoned") = Some(resolver);
    }

    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.exports.read().expect("lock poisoned");
        let name = match (name, &self.config.default_export) {
            ("", Some(default)) if !exports.contains_key("") => default.as_str(),
            _ => name,
        };
        exports.get(name).cloned()
    }

    /// The export `name` selects: a listed one, else what the resolver makes of it.
    async fn find(&self, name: &str) -> Result<Option<Resolved>, String> {
        if let Some(export) = self.lookup(name) {
            return Ok(Some(Resolved {
                export,
                client_id: None,
            }));
        }
        let resolver = self.resolver.read().expect("lock poisoned").clone();
        match resolver {
            Some(r) => r.resolve(name).await,
            None => Ok(None),
        }
    }

    /// Stop accepting, let every connection finish the requests it has in flight, and wait.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Serve clients from a TCP listener until shutdown.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        self.serve(listener).await
    }

    /// Serve clients from a unix-socket listener until shutdown.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        self.serve(listener).await
    }

    async fn serve<L: Listener>(self: Arc<Self>, listener: L) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                a = listener.accept_one() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // At the limit this client waits, unanswered, and this listener accepts no
                    // more until a connection ends.
                    let Some(permit) = self.connection_permit().await else {
                        return;
                    };
                    self.spawn_connection(stream, peer, permit);
                }
                Err(e) => {
                    warn!(error = %e, "accept NBD connection");
                    // EMFILE and friends: back off briefly rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn connection_permit(&self) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            p = self.connections.clone().acquire_owned() => p.ok(),
        }
    }

    /// Serve one connected client (any byte stream) until it disconnects or the server shuts down.
    pub fn spawn_connection<S>(
        self: &Arc<Self>,
        stream: S,
        peer: String,
        permit: OwnedSemaphorePermit,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let server = self.clone();
        // Every line a connection logs carries its id, its peer and, once chosen, its export.
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let span = tracing::info_span!(
            "nbd",
            conn = id,
            peer = %peer,
            volume = tracing::field::Empty
        );
        self.tasks.spawn(
            async move {
                debug!("connected");
                match server.serve_connection(stream).await {
                    Ok(()) => debug!("disconnected"),
                    Err(e) => info!(error = %e, "connection ended"),
                }
                drop(permit);
            }
            .instrument(span),
        );
    }

    async fn serve_connection<S>(self: Arc<Self>, mut stream: S) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let timeout = self.config.handshake_timeout;
        let mut buf = BytesMut::new();
        codec::encode_greeting(
            &mut buf,
            codec::handshake_flags::FIXED_NEWSTYLE | codec::handshake_flags::NO_ZEROES,
        );
        stream.write_all(&buf).await?;
        let client_flags = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(()),
            f = with_timeout(timeout, stream.read_u32()) => f?,
        };
        let known = codec::client_flags::FIXED_NEWSTYLE | codec::client_flags::NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(invalid(format!(
                "client sent unknown client flags {client_flags:#x}"
            )));
        }
        let session = Session {
            fixed: client_flags & codec::client_flags::FIXED_NEWSTYLE != 0,
            no_zeroes: client_flags & codec::client_flags::NO_ZEROES != 0,
            ..Session::default()
        };
        let negotiated = with_timeout(timeout, self.negotiate(&mut stream, session)).await?;
        match negotiated {
            Negotiated::Close => Ok(()),
            Negotiated::Transmission(session, export) => {
                self.transmission(stream, session, export).await
            }
            Negotiated::StartTls(session) => {
                let tls = self
                    .config
                    .tls
                    .clone()
                    .expect("STARTTLS is acknowledged only when TLS is configured");
                let mut stream = with_timeout(timeout, tls.acceptor.accept(stream)).await?;
                let session = Session {
                    tls: true,
                    ..session
                };
                match with_timeout(timeout, self.negotiate(&mut stream, session)).await? {
                    Negotiated::Close => Ok(()),
                    Negotiated::Transmission(session, export) => {
                        self.transmission(stream, session, export).await
                    }
                    Negotiated::StartTls(_) => {
                        unreachable!("a second STARTTLS is refused during negotiation")
                    }
                }
            }
        }
    }

    /// The transmission phase, on this task: see [`transmission`](crate::transmission).
    async fn transmission<S>(
        self: Arc<Self>,
        stream: S,
        s: Session,
        found: Resolved,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let export = found.export;
        tracing::Span::current().record("volume", export.name.as_str());
        debug!(export = %export.name, structured = s.structured, tls = s.tls, "transmission");
        let Some(client) = found.client_id else {
            return self
                .serve_requests(stream, s, export, self.shutdown.clone())
                .await;
        };
        // The same client again: the previous connection answers what it has in flight and
        // closes before this one starts.
        let id = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stop = self.shutdown.child_token();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let previous = self.clients.lock().expect("lock poisoned").insert(
            client.clone(),
            ClientConn {
                id,
                stop: stop.clone(),
                done: done_rx,
            },
        );
        if let Some(mut prev) = previous {
            info!(client = %client, "the same client connected again: closing its previous connection");
            prev.stop.cancel();
            let _ = prev.done.wait_for(|d| *d).await;
        }
        let result = self.serve_requests(stream, s, export, stop).await;
        {
            let mut clients = self.clients.lock().expect("lock poisoned");
            if clients.get(&client).is_some_and(|c| c.id == id) {
                clients.remove(&client);
            }
        }
        let _ = done_tx.send(true);
        result
    }

    async fn serve_requests<S>(
        &self,
        stream: S,
        s: Session,
        export: Arc<Export>,
        stop: CancellationToken,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ctx = Arc::new(transmission::Ctx {
            block_size: u64::from(export.device.geometry().block_size.max(1)),
            export,
            structured: s.structured,
            block_status: s.meta_export.is_some(),
            max_payload: self.config.max_payload,
        });
        transmission::serve(stream, ctx, self.config.max_in_flight_bytes, stop).await
    }
}

/// A socket listener the server can accept from.
trait Listener {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Accept one client; returns the stream and a name for logs.
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)>;
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.accept().await?;
        // Replies are written in batches already; do not let Nagle delay the last one.
        stream.set_nodelay(true)?;
        Ok((stream, peer.to_string()))
    }
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "unix".to_string()))
    }
}

/// A connection known by its client identity.
#[derive(Debug)]
struct ClientConn {
    id: u64,
    stop: CancellationToken,
    done: tokio::sync::watch::Receiver<bool>,
}

/// A name for logs and errors: long names (access tokens) are cut short.
fn shown(name: &str) -> String {
    if name.len() <= 64 {
        format!("{name:?}")
    } else {
        let cut: String = name.chars().take(24).collect();
        format!("\"{cut}…\" ({} bytes)", name.len())
    }
}

async fn with_timeout<T>(
    d: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(d, f).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "negotiation took too long")
    })?
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}
