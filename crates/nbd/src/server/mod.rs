//! The NBD server: accepts connections, negotiates, and serves pipelined requests against the
//! block device of the chosen export.
//!
//! ```text
//!   accept ─► slot (slots.rs: limits overall, per peer, for negotiating; idle ones reclaimed)
//!     └─► connection.rs: negotiate (negotiate.rs: options, STARTTLS; one time limit)
//!           └─► transmission (crate::transmission): one task per connection
//!
//!     reader ──request──► request futures ──► device (heavy calls off the runtime's workers)
//!       │ (in-flight requests and bytes)          │
//!       └──────────── writer ◄──── reply ─────────┘   one writer, vectored writes
//! ```
//!
//! Requests are answered as they complete, out of order. A bad request gets an NBD error and the
//! connection stays usable; only a broken framing (bad magic) or a vanished client ends it.
//! Settings: [`ServerConfig`] (config.rs).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::transmission::{self, Counters};

mod config;
mod connection;
pub(crate) mod export;
mod negotiate;
pub(crate) mod slots;

pub use config::{ConfigError, ServerConfig};
use connection::ClientConn;
pub use export::{Export, Resolved, Resolver};
use slots::{Limits, Slots};

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

/// An NBD server over a set of exports.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    resolver: RwLock<Option<Arc<dyn Resolver>>>,
    /// Connections by export and client identity: their id, how to stop them, and when they
    /// are done.
    clients: std::sync::Mutex<HashMap<(String, String), ClientConn>>,
    next_conn: std::sync::atomic::AtomicU64,
    slots: Arc<Slots>,
    /// CPU-heavy device calls running at once, server-wide.
    heavy: Arc<Semaphore>,
    counters: Arc<Counters>,
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
            slots: Arc::new(Slots::new(Limits::of(&config))),
            heavy: Arc::new(Semaphore::new(transmission::HEAVY_PARALLEL)),
            counters: Arc::new(Counters::default()),
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

    /// What the server holds now: connections, requests in flight, and how many connections
    /// its limits have turned away or closed so far.
    pub fn stats(&self) -> ServerStats {
        let (connections, negotiating) = self.slots.counts();
        let c = &self.counters;
        ServerStats {
            connections,
            negotiating,
            requests_in_flight: c.requests.load(Ordering::Relaxed),
            bytes_in_flight: c.bytes.load(Ordering::Relaxed),
            paused_connections: c.paused.load(Ordering::Relaxed),
            refused: self.slots.refused.load(Ordering::Relaxed),
            reclaimed: self.slots.reclaimed.load(Ordering::Relaxed),
        }
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
                Ok(a) => {
                    // With the server full this client waits, unanswered, and this listener
                    // accepts no more until a connection ends or an idle one can be reclaimed.
                    match self.slots.admit(&a.peer, &self.shutdown).await {
                        None => return,
                        Some(Ok(slot)) => self.start(a.stream, a.name, slot, None),
                        // Counted in the stats; a line each could flood the log.
                        Some(Err(why)) => {
                            debug!(peer = %a.name, reason = %why, "connection refused")
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "accept NBD connection");
                    // EMFILE and friends: back off briefly rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serve one connected client (any byte stream) until it disconnects or the server shuts
    /// down. `peer` names the client in logs and for the per-peer limits on negotiating
    /// connections; `permit` is the caller's own connection limit, held until the end (the
    /// server's total and per-peer limits do not apply).
    pub fn spawn_connection<S>(
        self: &Arc<Self>,
        stream: S,
        peer: String,
        permit: OwnedSemaphorePermit,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let slot = self.slots.admit_unlimited(&peer, &self.shutdown);
        self.start(stream, peer, slot, Some(permit));
    }
}

/// What a server holds at one moment ([`Server::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections holding a slot, negotiating or not.
    pub connections: usize,
    /// Of those, the ones still negotiating.
    pub negotiating: usize,
    /// Requests read and not yet answered, over every connection.
    pub requests_in_flight: usize,
    /// What those requests charge to their connections' byte budgets.
    pub bytes_in_flight: usize,
    /// Connections the server is not reading because their budget is spent.
    pub paused_connections: usize,
    /// Connections closed at once because their peer was at its limit (since start).
    pub refused: u64,
    /// Connections closed to make room: idle ones when slots were needed, and the longest
    /// negotiating ones beyond the limits on negotiation (since start).
    pub reclaimed: u64,
}

/// A connection as a listener accepted it.
struct Accepted<S> {
    stream: S,
    /// For logs.
    name: String,
    /// Who the per-peer limits count it against.
    peer: String,
}

/// A socket listener the server can accept from.
trait Listener {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    async fn accept_one(&self) -> std::io::Result<Accepted<Self::Stream>>;
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Accepted<Self::Stream>> {
        let (stream, peer) = self.accept().await?;
        // Replies are written in batches already; do not let Nagle delay the last one.
        stream.set_nodelay(true)?;
        Ok(Accepted {
            stream,
            name: peer.to_string(),
            peer: peer.ip().to_string(),
        })
    }
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Accepted<Self::Stream>> {
        let (stream, _) = self.accept().await?;
        // Local users are told apart by their user id.
        let peer = match stream.peer_cred() {
            Ok(c) => format!("uid {}", c.uid()),
            Err(_) => "unix".to_string(),
        };
        Ok(Accepted {
            stream,
            name: format!("unix ({peer})"),
            peer,
        })
    }
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

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}
