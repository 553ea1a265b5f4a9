//! The server's side of the option haggling phase: one function per option. Negotiation ends
//! when the client chooses an export (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`), aborts, or asks for
//! TLS (the caller then upgrades the stream and negotiates again).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::warn;

use super::slots::Slot;
use super::{invalid, shown, Resolved, Server, TlsMode};
use crate::codec::{self, opt, rep, BlockSizes, ClientOption, InfoRequest, MetaRequest};
use crate::transmission;

/// Option data longer than this is refused with `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Option data longer than this is not even read: the connection is closed.
const MAX_DISCARD_LEN: u32 = 16 << 20;
/// The block size every client can be assumed to keep to without asking (NBD: "a client
/// desiring maximum interoperability SHOULD constrain its requests to a minimum block size of
/// 512").
const INTEROPERABLE_BLOCK: u32 = 512;

/// What negotiation ended with.
pub(super) enum Negotiated {
    Close,
    StartTls(Session),
    Transmission(Session, Resolved),
}

/// What a client negotiated so far.
#[derive(Debug, Default, Clone)]
pub(super) struct Session {
    pub fixed: bool,
    pub no_zeroes: bool,
    pub tls: bool,
    pub structured: bool,
    /// The export `base:allocation` was selected for.
    pub meta_export: Option<String>,
}

impl Session {
    /// What survives STARTTLS: the handshake flags, nothing negotiated before it.
    fn after_starttls(&self) -> Session {
        Session {
            fixed: self.fixed,
            no_zeroes: self.no_zeroes,
            ..Session::default()
        }
    }
}

/// One option as the client sent it.
struct Received {
    option: u32,
    data: Vec<u8>,
}

/// A negotiation in progress on one connection.
struct Negotiation<'a, S> {
    server: &'a Server,
    stream: &'a mut S,
    s: Session,
    out: BytesMut,
    /// Marked negotiated before the reply that ends negotiation goes out, so that a client
    /// that has its answer never finds its connection still counted as negotiating.
    slot: &'a Slot,
}

impl Server {
    /// The option haggling phase. Returns when the client chose an export, aborted, or asked
    /// for TLS (then the caller upgrades the stream and negotiates again).
    pub(super) async fn negotiate<S>(
        &self,
        stream: &mut S,
        s: Session,
        slot: &Slot,
    ) -> std::io::Result<Negotiated>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut n = Negotiation {
            server: self,
            stream,
            s,
            out: BytesMut::new(),
            slot,
        };
        loop {
            let Some(received) = n.receive().await? else {
                return Ok(Negotiated::Close);
            };
            if let Some(end) = n.handle(received).await? {
                return Ok(end);
            }
        }
    }

    pub(super) fn block_sizes(&self, export: &super::Export) -> BlockSizes {
        let g = export.device.geometry();
        let minimum = g.block_size.max(1);
        BlockSizes {
            minimum,
            preferred: g.optimal_io_size.max(minimum).max(4096),
            maximum: self.config.max_payload,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Negotiation<'_, S> {
    async fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) -> std::io::Result<()> {
        self.out.clear();
        codec::encode_option_reply(&mut self.out, option, reply_type, data);
        self.stream.write_all(&self.out).await
    }

    /// The next option whose data is within bounds; `None` when the client left between
    /// options. Oversized options are skipped with an error reply.
    async fn receive(&mut self) -> std::io::Result<Option<Received>> {
        loop {
            let mut header = [0u8; codec::OPTION_HEADER_LEN];
            match self.stream.read_exact(&mut header).await {
                Ok(_) => {}
                // A client that goes away between options (e.g. `nbdinfo --list` after LIST).
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
            let h = codec::decode_option_header(&header)
                .map_err(|e| invalid(format!("option header: {e}")))?;
            if h.len <= MAX_OPTION_LEN {
                let mut data = vec![0u8; h.len as usize];
                self.stream.read_exact(&mut data).await?;
                return Ok(Some(Received {
                    option: h.option,
                    data,
                }));
            }
            if h.len > MAX_DISCARD_LEN || !self.s.fixed {
                return Err(invalid(format!(
                    "option {} carries {} bytes of data",
                    h.option, h.len
                )));
            }
            tokio::io::copy(
                &mut (&mut *self.stream).take(u64::from(h.len)),
                &mut tokio::io::sink(),
            )
            .await?;
            let msg = format!(
                "option data of {} bytes is over the {MAX_OPTION_LEN}-byte limit",
                h.len
            );
            self.reply(h.option, rep::ERR_TOO_BIG, msg.as_bytes())
                .await?;
        }
    }

    /// Answer one option; `Some` when negotiation ends with it.
    async fn handle(&mut self, r: Received) -> std::io::Result<Option<Negotiated>> {
        if !self.s.fixed && r.option != opt::EXPORT_NAME {
            return Err(invalid(format!(
                "option {} from a client without fixed newstyle",
                r.option
            )));
        }
        let option = match codec::parse_option(r.option, &r.data) {
            Ok(o) => o,
            Err(e) if r.option == opt::EXPORT_NAME => {
                return Err(invalid(format!("NBD_OPT_EXPORT_NAME: {e}")))
            }
            Err(e) => {
                let code = match e {
                    codec::ProtocolError::TooLong { .. } => rep::ERR_TOO_BIG,
                    _ => rep::ERR_INVALID,
                };
                self.reply(r.option, code, e.to_string().as_bytes()).await?;
                return Ok(None);
            }
        };
        if self.needs_tls(&option) {
            if r.option == opt::EXPORT_NAME {
                return Err(invalid(
                    "NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server".into(),
                ));
            }
            let msg = b"this server requires TLS: use STARTTLS first";
            self.reply(r.option, rep::ERR_TLS_REQD, msg).await?;
            return Ok(None);
        }
        match option {
            ClientOption::Abort => {
                // The client may already be gone; that is fine.
                let _ = self.reply(r.option, rep::ACK, &[]).await;
                Ok(Some(Negotiated::Close))
            }
            ClientOption::ExportName(name) => self.export_name(&name).await.map(Some),
            ClientOption::List => self.list(r.option).await.map(|()| None),
            ClientOption::StartTls => self.start_tls(r.option).await,
            ClientOption::StructuredReply => {
                self.s.structured = true;
                self.reply(r.option, rep::ACK, &[]).await.map(|()| None)
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                let set = r.option == opt::SET_META_CONTEXT;
                self.meta_context(r.option, set, req).await.map(|()| None)
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = r.option == opt::GO;
                self.info(r.option, go, req).await
            }
            ClientOption::Unknown(o) => {
                let msg = format!("option {o} is not supported");
                self.reply(r.option, rep::ERR_UNSUP, msg.as_bytes())
                    .await
                    .map(|()| None)
            }
        }
    }

    /// On a TLS-only server, everything but STARTTLS and ABORT waits for TLS.
    fn needs_tls(&self, option: &ClientOption) -> bool {
        let required = self
            .server
            .config
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == TlsMode::Required);
        required && !self.s.tls && !matches!(option, ClientOption::StartTls | ClientOption::Abort)
    }

    /// `NBD_OPT_EXPORT_NAME`: no error replies exist for it, so a refusal closes the connection.
    async fn export_name(&mut self, name: &str) -> std::io::Result<Negotiated> {
        let found = match self.server.find(name).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                return Err(invalid(format!(
                    "NBD_OPT_EXPORT_NAME: no export named {}",
                    shown(name)
                )))
            }
            Err(why) => {
                return Err(invalid(format!(
                    "NBD_OPT_EXPORT_NAME: export {} refused: {why}",
                    shown(name)
                )))
            }
        };
        let export = &found.export;
        self.out.clear();
        let flags = export.transmission_flags(self.s.structured);
        let size = export.device.geometry().size;
        codec::encode_export_name_reply(&mut self.out, size, flags, self.s.no_zeroes);
        self.slot.negotiated();
        self.stream.write_all(&self.out).await?;
        let mut s = std::mem::take(&mut self.s);
        s.meta_export = None;
        Ok(Negotiated::Transmission(s, found))
    }

    async fn list(&mut self, option: u32) -> std::io::Result<()> {
        for e in self.server.exports() {
            let d = codec::encode_rep_server(&e.name, &e.description);
            self.reply(option, rep::SERVER, &d).await?;
        }
        self.reply(option, rep::ACK, &[]).await
    }

    async fn start_tls(&mut self, option: u32) -> std::io::Result<Option<Negotiated>> {
        if self.s.tls {
            let msg = b"TLS is already in use";
            self.reply(option, rep::ERR_INVALID, msg).await?;
            return Ok(None);
        }
        if self.server.config.tls.is_none() {
            let msg = b"TLS is not configured on this server";
            self.reply(option, rep::ERR_UNSUP, msg).await?;
            return Ok(None);
        }
        self.reply(option, rep::ACK, &[]).await?;
        // STARTTLS forgets everything negotiated before it.
        Ok(Some(Negotiated::StartTls(self.s.after_starttls())))
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: `base:allocation` is the one
    /// context there is.
    async fn meta_context(
        &mut self,
        option: u32,
        set: bool,
        req: MetaRequest,
    ) -> std::io::Result<()> {
        if set {
            self.s.meta_export = None;
        }
        if !self.s.structured {
            let msg = b"negotiate NBD_OPT_STRUCTURED_REPLY first";
            return self.reply(option, rep::ERR_INVALID, msg).await;
        }
        let refused = match self.server.find(&req.export).await {
            Ok(Some(_)) => None,
            Ok(None) => Some((
                rep::ERR_UNKNOWN,
                format!("no export named {}", shown(&req.export)),
            )),
            Err(why) => Some((rep::ERR_POLICY, why)),
        };
        if let Some((code, msg)) = refused {
            return self.reply(option, code, msg.as_bytes()).await;
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
            self.reply(option, rep::META_CONTEXT, &d).await?;
            if set {
                self.s.meta_export = Some(req.export);
            }
        }
        self.reply(option, rep::ACK, &[]).await
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO` (which then enters transmission).
    async fn info(
        &mut self,
        option: u32,
        go: bool,
        req: InfoRequest,
    ) -> std::io::Result<Option<Negotiated>> {
        let found = match self.server.find(&req.name).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                let msg = format!(
                    "no export named {}; NBD_OPT_LIST (nbdinfo --list) shows the exports",
                    shown(&req.name)
                );
                self.reply(option, rep::ERR_UNKNOWN, msg.as_bytes()).await?;
                return Ok(None);
            }
            Err(why) => {
                warn!(export = %shown(&req.name), reason = %why, "export refused");
                self.reply(option, rep::ERR_POLICY, why.as_bytes()).await?;
                return Ok(None);
            }
        };
        if !self.export_info(option, &req, &found, go).await? || !go {
            return Ok(None);
        }
        // Block status is allowed only for the export the meta context was set on.
        let mut s = std::mem::take(&mut self.s);
        if s.meta_export.as_deref() != Some(req.name.as_str()) {
            s.meta_export = None;
        }
        Ok(Some(Negotiated::Transmission(s, found)))
    }

    /// The `NBD_REP_INFO` replies `req` asks for, then ACK (which ends negotiation with `go`);
    /// false (after an error reply) when the export needs block sizes the client did not ask
    /// for.
    async fn export_info(
        &mut self,
        option: u32,
        req: &InfoRequest,
        found: &Resolved,
        go: bool,
    ) -> std::io::Result<bool> {
        let export = &found.export;
        let sizes = self.server.block_sizes(export);
        let asked_sizes = req.requests.contains(&codec::info::BLOCK_SIZE);
        if asked_sizes || sizes.minimum > 1 {
            let d = codec::encode_info_block_size(sizes);
            self.reply(option, rep::INFO, &d).await?;
        }
        // A client that does not ask for block sizes keeps to 512-byte multiples (the
        // protocol's advice for interoperability): only an export that needs more must refuse it.
        if sizes.minimum > INTEROPERABLE_BLOCK && !asked_sizes {
            let msg = format!(
                "this export needs {}-byte aligned I/O: request NBD_INFO_BLOCK_SIZE",
                sizes.minimum
            );
            self.reply(option, rep::ERR_BLOCK_SIZE_REQD, msg.as_bytes())
                .await?;
            return Ok(false);
        }
        let strings = [
            (codec::info::NAME, export.name.as_str()),
            (codec::info::DESCRIPTION, export.description.as_str()),
        ];
        for (kind, value) in strings {
            // An empty description is not worth a reply.
            if req.requests.contains(&kind) && (kind == codec::info::NAME || !value.is_empty()) {
                let d = codec::encode_info_string(kind, value);
                self.reply(option, rep::INFO, &d).await?;
            }
        }
        let d = codec::encode_info_export(
            export.device.geometry().size,
            export.transmission_flags(self.s.structured),
        );
        self.reply(option, rep::INFO, &d).await?;
        if go {
            self.slot.negotiated();
        }
        self.reply(option, rep::ACK, &[]).await?;
        Ok(true)
    }
}
