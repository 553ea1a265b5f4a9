//! The client's side of fixed newstyle negotiation: structured replies and the
//! `base:allocation` meta context, each optional, then `NBD_OPT_GO` with block sizes, falling
//! back to `NBD_OPT_EXPORT_NAME` for servers that predate GO. One step per option.

use bytes::BytesMut;
use strata_bdev::{Error, ErrorKind, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::codec::{self, info, opt, rep, tx_flags, BlockSizes, Info};

/// Option replies longer than this are a protocol violation.
const MAX_OPTION_REPLY: u32 = 1 << 20;

/// What negotiation settled.
#[derive(Debug)]
pub(super) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// The id the server gave `base:allocation`, if it was selected.
    pub context: Option<u32>,
    pub sizes: Option<BlockSizes>,
    pub description: Option<String>,
}

/// Run the fixed newstyle handshake on `s` and enter transmission for `export`.
pub(super) async fn negotiate<S>(s: &mut S, host: &str, export: &str) -> Result<Negotiated>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut h = Handshake {
        s,
        host,
        export,
        out: BytesMut::new(),
    };
    let no_zeroes = h.greet().await?;
    let structured = h.structured_replies().await?;
    // base:allocation is optional, and only with structured replies.
    let context = if structured {
        h.base_allocation().await?
    } else {
        None
    };
    h.go(structured, context, no_zeroes).await
}

/// A negotiation in progress: the stream, names for messages, and a scratch buffer.
struct Handshake<'a, S> {
    s: &'a mut S,
    host: &'a str,
    export: &'a str,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Handshake<'_, S> {
    fn context(&self) -> String {
        format!(
            "negotiate with NBD server {} (export {:?})",
            self.host, self.export
        )
    }

    fn io(&self, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::with_source(
                ErrorKind::Io,
                format!("{}: the server closed the connection", self.context()),
                e,
            )
        } else {
            Error::io(self.context(), e)
        }
    }

    fn violation(&self, what: impl std::fmt::Display) -> Error {
        Error::new(
            ErrorKind::Io,
            format!("{}: protocol violation: {what}", self.context()),
        )
    }

    /// An error reply that ends negotiation whatever the option was.
    fn fatal(&self, reply_type: u32, data: &[u8]) -> Option<Error> {
        let msg = server_message(data);
        match reply_type {
            rep::ERR_TLS_REQD => Some(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "{}: the server requires TLS, which this client does not speak yet{msg}",
                    self.context()
                ),
            )),
            rep::ERR_SHUTDOWN => Some(Error::new(
                ErrorKind::Shutdown,
                format!("{}: the server is shutting down{msg}", self.context()),
            )),
            _ => None,
        }
    }

    /// An error reply to an optional option: a fatal one ends negotiation, any other means the
    /// server goes without it (`consequence`).
    fn declined(&self, reply_type: u32, data: &[u8], consequence: &str) -> Result<()> {
        if let Some(e) = self.fatal(reply_type, data) {
            return Err(e);
        }
        debug!(server = self.host, reply = reply_type, "{consequence}");
        Ok(())
    }

    /// Read the greeting and answer with the client flags; returns whether the server omits the
    /// zero padding of `NBD_OPT_EXPORT_NAME`'s reply.
    async fn greet(&mut self) -> Result<bool> {
        let mut greeting = [0u8; 18];
        if let Err(e) = self.s.read_exact(&mut greeting).await {
            return Err(self.io(e));
        }
        let hs = codec::decode_greeting(&greeting).map_err(|e| self.violation(e))?;
        if hs & codec::handshake_flags::FIXED_NEWSTYLE == 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: the server does not speak fixed newstyle negotiation",
                    self.context()
                ),
            ));
        }
        let no_zeroes = hs & codec::handshake_flags::NO_ZEROES != 0;
        let mut client_flags = codec::client_flags::FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= codec::client_flags::NO_ZEROES;
        }
        if let Err(e) = self.s.write_all(&client_flags.to_be_bytes()).await {
            return Err(self.io(e));
        }
        Ok(no_zeroes)
    }

    async fn send(&mut self, option: u32, data: &[u8]) -> Result<()> {
        self.out.clear();
        codec::encode_option(&mut self.out, option, data);
        match self.s.write_all(&self.out).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Read one reply to `option`: its type and data.
    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let mut h = [0u8; codec::OPTION_REPLY_HEADER_LEN];
        if let Err(e) = self.s.read_exact(&mut h).await {
            return Err(self.io(e));
        }
        let h = codec::decode_option_reply_header(&h)
            .map_err(|e| self.violation(format!("option reply: {e}")))?;
        if h.option != option {
            return Err(self.violation(format!(
                "a reply to option {} where option {option} was asked",
                h.option
            )));
        }
        if h.len > MAX_OPTION_REPLY {
            return Err(self.violation(format!(
                "an option reply of {} bytes (at most {MAX_OPTION_REPLY} expected)",
                h.len
            )));
        }
        let mut data = vec![0u8; h.len as usize];
        if let Err(e) = self.s.read_exact(&mut data).await {
            return Err(self.io(e));
        }
        Ok((h.reply_type, data))
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: whether the server sends structured replies.
    async fn structured_replies(&mut self) -> Result<bool> {
        self.send(opt::STRUCTURED_REPLY, &[]).await?;
        match self.reply(opt::STRUCTURED_REPLY).await? {
            (rep::ACK, _) => Ok(true),
            (t, data) if rep::is_error(t) => {
                self.declined(t, &data, "no structured replies: simple replies only")?;
                Ok(false)
            }
            (t, _) => Err(self.violation(format!("reply type {t} to NBD_OPT_STRUCTURED_REPLY"))),
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT base:allocation`: the id the server gave it, if any.
    async fn base_allocation(&mut self) -> Result<Option<u32>> {
        let req = codec::MetaRequest {
            export: self.export.to_string(),
            queries: vec![codec::BASE_ALLOCATION.to_string()],
        };
        self.send(opt::SET_META_CONTEXT, &codec::encode_meta_request(&req))
            .await?;
        let mut context = None;
        loop {
            match self.reply(opt::SET_META_CONTEXT).await? {
                (rep::META_CONTEXT, data) => {
                    let (id, name) =
                        codec::parse_rep_meta_context(&data).map_err(|e| self.violation(e))?;
                    if name == codec::BASE_ALLOCATION {
                        context = Some(id);
                    }
                }
                (rep::ACK, _) => return Ok(context),
                (t, data) if rep::is_error(t) => {
                    self.declined(
                        t,
                        &data,
                        "no base:allocation: block status reports all data",
                    )?;
                    // The spec: disregard contexts sent before an error.
                    return Ok(None);
                }
                (t, _) => {
                    return Err(
                        self.violation(format!("reply type {t} to NBD_OPT_SET_META_CONTEXT"))
                    )
                }
            }
        }
    }

    /// `NBD_OPT_GO`, or `NBD_OPT_EXPORT_NAME` where the server does not know GO.
    async fn go(
        &mut self,
        structured: bool,
        context: Option<u32>,
        no_zeroes: bool,
    ) -> Result<Negotiated> {
        let go = codec::InfoRequest {
            name: self.export.to_string(),
            requests: vec![info::NAME, info::DESCRIPTION, info::BLOCK_SIZE],
        };
        self.send(opt::GO, &codec::encode_info_request(&go)).await?;
        let mut export_info = None;
        let mut sizes = None;
        let mut description = None;
        loop {
            match self.reply(opt::GO).await? {
                (rep::INFO, data) => {
                    match codec::parse_info(&data).map_err(|e| self.violation(e))? {
                        Info::Export { size, flags } => export_info = Some((size, flags)),
                        Info::BlockSize(b) => sizes = Some(b),
                        Info::Description(d) => description = Some(d),
                        Info::Name(_) | Info::Unknown(_) => {}
                    }
                }
                (rep::ACK, _) => break,
                (rep::ERR_UNSUP, _) => return self.export_name(structured, no_zeroes).await,
                (t, data) if rep::is_error(t) => return Err(self.go_refused(t, &data)),
                (t, _) => return Err(self.violation(format!("reply type {t} to NBD_OPT_GO"))),
            }
        }
        let Some((size, flags)) = export_info else {
            return Err(self.violation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"));
        };
        if let Some(b) = sizes {
            check_block_sizes(b).map_err(|what| self.violation(what))?;
        }
        Ok(Negotiated {
            size,
            flags: effective_flags(flags),
            structured,
            context,
            sizes,
            description,
        })
    }

    /// The error for an error reply to `NBD_OPT_GO`.
    fn go_refused(&self, t: u32, data: &[u8]) -> Error {
        if let Some(e) = self.fatal(t, data) {
            return e;
        }
        let msg = server_message(data);
        let (kind, what) = match t {
            rep::ERR_UNKNOWN => {
                return Error::new(
                    ErrorKind::InvalidInput,
                    format!("export {:?} not found on {}{msg}", self.export, self.host),
                )
            }
            rep::ERR_POLICY => (
                ErrorKind::PermissionDenied,
                "the server's policy refuses it",
            ),
            rep::ERR_INVALID => (
                ErrorKind::InvalidInput,
                "the server calls the request invalid",
            ),
            rep::ERR_TOO_BIG => (
                ErrorKind::InvalidInput,
                "the request is too big for the server",
            ),
            rep::ERR_BLOCK_SIZE_REQD => (ErrorKind::Io, "the server wants block sizes requested"),
            _ => (ErrorKind::Io, "the server refused it"),
        };
        Error::new(
            kind,
            format!(
                "{}: open the export: {what} (reply {t:#x}){msg}",
                self.context()
            ),
        )
    }

    /// `NBD_OPT_EXPORT_NAME`: the server answers with size and flags, or hangs up.
    async fn export_name(&mut self, structured: bool, no_zeroes: bool) -> Result<Negotiated> {
        debug!(
            server = self.host,
            "NBD_OPT_GO unsupported: falling back to NBD_OPT_EXPORT_NAME"
        );
        let export = self.export;
        self.send(opt::EXPORT_NAME, export.as_bytes()).await?;
        let read = async {
            let size = self.s.read_u64().await?;
            let flags = self.s.read_u16().await?;
            if !no_zeroes {
                let mut zeroes = [0u8; 124];
                self.s.read_exact(&mut zeroes).await?;
            }
            Ok::<_, std::io::Error>((size, flags))
        };
        let (size, flags) = match read.await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "export {export:?} not found on {} (the server closed the connection \
                         on NBD_OPT_EXPORT_NAME)",
                        self.host
                    ),
                ))
            }
            Err(e) => return Err(self.io(e)),
        };
        Ok(Negotiated {
            size,
            flags: effective_flags(flags),
            structured,
            // Meta contexts are bound to NBD_OPT_GO.
            context: None,
            sizes: None,
            description: None,
        })
    }
}

/// Block sizes as the spec allows them.
fn check_block_sizes(b: BlockSizes) -> std::result::Result<(), String> {
    if !b.minimum.is_power_of_two() || b.minimum > 65536 {
        return Err(format!(
            "minimum block size {} is not a power of two up to 65536",
            b.minimum
        ));
    }
    if b.maximum < b.minimum {
        return Err(format!(
            "maximum payload {} is below the minimum block size {}",
            b.maximum, b.minimum
        ));
    }
    Ok(())
}

/// Transmission flags mean nothing unless `HAS_FLAGS` is set.
fn effective_flags(flags: u16) -> u16 {
    if flags & tx_flags::HAS_FLAGS == 0 {
        0
    } else {
        flags
    }
}

/// ": message" from an option error reply's data, or nothing.
fn server_message(data: &[u8]) -> String {
    let m = String::from_utf8_lossy(data);
    let m = m.trim();
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}
