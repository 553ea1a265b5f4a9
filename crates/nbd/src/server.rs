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

use crate::codec::{self, opt, rep, tx_flags, BlockSizes, ClientOption};
use crate::transmission;

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

/// Option data longer than this is refused with `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Option data longer than this is not even read: the connection is closed.
const MAX_DISCARD_LEN: u32 = 16 << 20;
/// The block size every client can be assumed to keep to without asking (NBD: "a client
/// desiring maximum interoperability SHOULD constrain its requests to a minimum block size of
/// 512").
const INTEROPERABLE_BLOCK: u32 = 512;

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

    /// The option haggling phase. Returns when the client chose an export, aborted, or asked
    /// for TLS (then the caller upgrades the stream and negotiates again).
    async fn negotiate<S>(&self, stream: &mut S, mut s: Session) -> std::io::Result<Negotiated>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls_required = self
            .config
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == TlsMode::Required);
        let mut out = BytesMut::new();
        loop {
            let mut header = [0u8; codec::OPTION_HEADER_LEN];
            let read = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Negotiated::Close),
                r = stream.read_exact(&mut header) => r,
            };
            match read {
                Ok(_) => {}
                // A client that goes away between options (e.g. `nbdinfo --list` after LIST).
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(Negotiated::Close)
                }
                Err(e) => return Err(e),
            }
            let h = codec::decode_option_header(&header)
                .map_err(|e| invalid(format!("option header: {e}")))?;
            if h.len > MAX_OPTION_LEN {
                if h.len > MAX_DISCARD_LEN || !s.fixed {
                    return Err(invalid(format!(
                        "option {} carries {} bytes of data",
                        h.option, h.len
                    )));
                }
                tokio::io::copy(
                    &mut (&mut *stream).take(u64::from(h.len)),
                    &mut tokio::io::sink(),
                )
                .await?;
                let msg = format!(
                    "option data of {} bytes is over the {MAX_OPTION_LEN}-byte limit",
                    h.len
                );
                send_option_reply(stream, &mut out, h.option, rep::ERR_TOO_BIG, msg.as_bytes())
                    .await?;
                continue;
            }
            let mut data = vec![0u8; h.len as usize];
            stream.read_exact(&mut data).await?;
            if !s.fixed && h.option != opt::EXPORT_NAME {
                return Err(invalid(format!(
                    "option {} from a client without fixed newstyle",
                    h.option
                )));
            }
            let option = match codec::parse_option(h.option, &data) {
                Ok(o) => o,
                Err(e) => {
                    if h.option == opt::EXPORT_NAME {
                        return Err(invalid(format!("NBD_OPT_EXPORT_NAME: {e}")));
                    }
                    let code = match e {
                        codec::ProtocolError::TooLong { .. } => rep::ERR_TOO_BIG,
                        _ => rep::ERR_INVALID,
                    };
                    send_option_reply(stream, &mut out, h.option, code, e.to_string().as_bytes())
                        .await?;
                    continue;
                }
            };
            if tls_required
                && !s.tls
                && !matches!(option, ClientOption::StartTls | ClientOption::Abort)
            {
                if h.option == opt::EXPORT_NAME {
                    return Err(invalid(
                        "NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server".into(),
                    ));
                }
                send_option_reply(
                    stream,
                    &mut out,
                    h.option,
                    rep::ERR_TLS_REQD,
                    b"this server requires TLS: use STARTTLS first",
                )
                .await?;
                continue;
            }
            match option {
                ClientOption::Abort => {
                    // The client may already be gone; that is fine.
                    let _ = send_option_reply(stream, &mut out, h.option, rep::ACK, &[]).await;
                    return Ok(Negotiated::Close);
                }
                ClientOption::ExportName(name) => {
                    let found = match self.find(&name).await {
                        Ok(Some(found)) => found,
                        Ok(None) => {
                            return Err(invalid(format!(
                                "NBD_OPT_EXPORT_NAME: no export named {}",
                                shown(&name)
                            )))
                        }
                        Err(why) => {
                            return Err(invalid(format!(
                                "NBD_OPT_EXPORT_NAME: export {} refused: {why}",
                                shown(&name)
                            )))
                        }
                    };
                    let export = found.export.clone();
                    out.clear();
                    let flags = export.transmission_flags(s.structured);
                    codec::encode_export_name_reply(
                        &mut out,
                        export.device.geometry().size,
                        flags,
                        s.no_zeroes,
                    );
                    stream.write_all(&out).await?;
                    s.meta_export = None;
                    return Ok(Negotiated::Transmission(s, found));
                }
                ClientOption::List => {
                    for e in self.exports() {
                        let d = codec::encode_rep_server(&e.name, &e.description);
                        send_option_reply(stream, &mut out, h.option, rep::SERVER, &d).await?;
                    }
                    send_option_reply(stream, &mut out, h.option, rep::ACK, &[]).await?;
                }
                ClientOption::StartTls => {
                    if s.tls {
                        send_option_reply(
                            stream,
                            &mut out,
                            h.option,
                            rep::ERR_INVALID,
                            b"TLS is already in use",
                        )
                        .await?;
                    } else if self.config.tls.is_none() {
                        send_option_reply(
                            stream,
                            &mut out,
                            h.option,
                            rep::ERR_UNSUP,
                            b"TLS is not configured on this server",
                        )
                        .await?;
                    } else {
                        send_option_reply(stream, &mut out, h.option, rep::ACK, &[]).await?;
                        // STARTTLS forgets everything negotiated before it.
                        return Ok(Negotiated::StartTls(Session {
                            fixed: s.fixed,
                            no_zeroes: s.no_zeroes,
                            ..Session::default()
                        }));
                    }
                }
                ClientOption::StructuredReply => {
                    s.structured = true;
                    send_option_reply(stream, &mut out, h.option, rep::ACK, &[]).await?;
                }
                ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                    let set = h.option == opt::SET_META_CONTEXT;
                    if set {
                        s.meta_export = None;
                    }
                    if !s.structured {
                        send_option_reply(
                            stream,
                            &mut out,
                            h.option,
                            rep::ERR_INVALID,
                            b"negotiate NBD_OPT_STRUCTURED_REPLY first",
                        )
                        .await?;
                        continue;
                    }
                    let (code, msg) = match self.find(&req.export).await {
                        Ok(Some(_)) => (rep::ACK, String::new()),
                        Ok(None) => (
                            rep::ERR_UNKNOWN,
                            format!("no export named {}", shown(&req.export)),
                        ),
                        Err(why) => (rep::ERR_POLICY, why),
                    };
                    if code != rep::ACK {
                        send_option_reply(stream, &mut out, h.option, code, msg.as_bytes()).await?;
                        continue;
                    }
                    let selected = if set {
                        req.queries.iter().any(|q| q == codec::BASE_ALLOCATION)
                    } else {
                        req.queries.is_empty()
                            || req
                                .queries
                                .iter()
                                .any(|q| q == "base:" || q == codec::BASE_ALLOCATION)
                    };
                    if selected {
                        let id = if set {
                            transmission::BASE_ALLOCATION_ID
                        } else {
                            0
                        };
                        let d = codec::encode_rep_meta_context(id, codec::BASE_ALLOCATION);
                        send_option_reply(stream, &mut out, h.option, rep::META_CONTEXT, &d)
                            .await?;
                        if set {
                            s.meta_export = Some(req.export.clone());
                        }
                    }
                    send_option_reply(stream, &mut out, h.option, rep::ACK, &[]).await?;
                }
                ClientOption::Info(req) | ClientOption::Go(req) => {
                    let go = h.option == opt::GO;
                    let found = match self.find(&req.name).await {
                        Ok(Some(found)) => found,
                        Ok(None) => {
                            let msg = format!(
                                "no export named {}; NBD_OPT_LIST (nbdinfo --list) shows the exports",
                                shown(&req.name)
                            );
                            send_option_reply(
                                stream,
                                &mut out,
                                h.option,
                                rep::ERR_UNKNOWN,
                                msg.as_bytes(),
                            )
                            .await?;
                            continue;
                        }
                        Err(why) => {
                            warn!(export = %shown(&req.name), reason = %why, "export refused");
                            send_option_reply(
                                stream,
                                &mut out,
                                h.option,
                                rep::ERR_POLICY,
                                why.as_bytes(),
                            )
                            .await?;
                            continue;
                        }
                    };
                    let export = found.export.clone();
                    let sizes = self.block_sizes(&export);
                    let asked_sizes = req.requests.contains(&codec::info::BLOCK_SIZE);
                    if asked_sizes || sizes.minimum > 1 {
                        let d = codec::encode_info_block_size(sizes);
                        send_option_reply(stream, &mut out, h.option, rep::INFO, &d).await?;
                    }
                    // A client that does not ask for block sizes keeps to 512-byte multiples
                    // (the protocol's advice for interoperability): only an export that needs
                    // more must refuse it.
                    if sizes.minimum > INTEROPERABLE_BLOCK && !asked_sizes {
                        let msg = format!(
                            "this export needs {}-byte aligned I/O: request NBD_INFO_BLOCK_SIZE",
                            sizes.minimum
                        );
                        send_option_reply(
                            stream,
                            &mut out,
                            h.option,
                            rep::ERR_BLOCK_SIZE_REQD,
                            msg.as_bytes(),
                        )
                        .await?;
                        continue;
                    }
                    if req.requests.contains(&codec::info::NAME) {
                        let d = codec::encode_info_string(codec::info::NAME, &export.name);
                        send_option_reply(stream, &mut out, h.option, rep::INFO, &d).await?;
                    }
                    if req.requests.contains(&codec::info::DESCRIPTION)
                        && !export.description.is_empty()
                    {
                        let d = codec::encode_info_string(
                            codec::info::DESCRIPTION,
                            &export.description,
                        );
                        send_option_reply(stream, &mut out, h.option, rep::INFO, &d).await?;
                    }
                    let d = codec::encode_info_export(
                        export.device.geometry().size,
                        export.transmission_flags(s.structured),
                    );
                    send_option_reply(stream, &mut out, h.option, rep::INFO, &d).await?;
                    send_option_reply(stream, &mut out, h.option, rep::ACK, &[]).await?;
                    if go {
                        // Block status is allowed only for the export the meta context was set on.
                        if s.meta_export.as_deref() != Some(req.name.as_str()) {
                            s.meta_export = None;
                        }
                        return Ok(Negotiated::Transmission(s, found));
                    }
                }
                ClientOption::Unknown(o) => {
                    let msg = format!("option {o} is not supported");
                    send_option_reply(stream, &mut out, h.option, rep::ERR_UNSUP, msg.as_bytes())
                        .await?;
                }
            }
        }
    }

    fn block_sizes(&self, export: &Export) -> BlockSizes {
        let g = export.device.geometry();
        let minimum = g.block_size.max(1);
        BlockSizes {
            minimum,
            preferred: g.optimal_io_size.max(minimum).max(4096),
            maximum: self.config.max_payload,
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

/// What negotiation ended with.
enum Negotiated {
    Close,
    StartTls(Session),
    Transmission(Session, Resolved),
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

/// What a client negotiated so far.
#[derive(Debug, Default, Clone)]
struct Session {
    fixed: bool,
    no_zeroes: bool,
    tls: bool,
    structured: bool,
    /// The export `base:allocation` was selected for.
    meta_export: Option<String>,
}

async fn send_option_reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> std::io::Result<()> {
    out.clear();
    codec::encode_option_reply(out, option, reply_type, data);
    stream.write_all(out).await
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
