//! The NBD wire format as pure functions: bytes in, typed messages out, and typed messages to
//! bytes. No I/O happens here, so every parser can be fuzzed and property-tested.
//!
//! Names and numbers follow the NBD project's `doc/proto.md`.

use bytes::{BufMut, BytesMut};

/// `NBDMAGIC`, the first 8 bytes a newstyle server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client → server, after the handshake flags).
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags, sent with the export's size.
pub mod tx_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR + 1;
    pub const ERR_POLICY: u32 = ERR + 2;
    pub const ERR_INVALID: u32 = ERR + 3;
    pub const ERR_PLATFORM: u32 = ERR + 4;
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    pub const ERR_TOO_BIG: u32 = ERR + 9;

    /// Whether a reply type is an error.
    pub fn is_error(t: u32) -> bool {
        t & ERR != 0
    }
}

/// Information types in `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Commands.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
    /// The transaction extension (compatible with MVPS): see the README, "Transactions over NBD".
    pub const BEGIN_TXN: u16 = 64;
    pub const COMMIT_TXN: u16 = 65;
    pub const ROLLBACK_TXN: u16 = 66;
    pub const LOCK_TXN: u16 = 67;

    /// One of the transaction commands.
    pub fn is_txn(command: u16) -> bool {
        (BEGIN_TXN..=LOCK_TXN).contains(&command)
    }
}

/// Command flags.
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply flags and chunk types.
pub mod reply {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const TYPE_NONE: u16 = 0;
    pub const TYPE_OFFSET_DATA: u16 = 1;
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    pub const TYPE_ERROR: u16 = (1 << 15) + 1;
    pub const TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Flags of a `base:allocation` extent.
pub mod alloc_flags {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// NBD error numbers on the wire.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    /// The wire value for a Linux errno: the protocol allows only the values above.
    pub fn from_os(e: i32) -> u32 {
        match e {
            1 | 13 | 30 => EPERM,
            12 => ENOMEM,
            22 => EINVAL,
            27 | 28 | 122 => ENOSPC,
            75 => EOVERFLOW,
            95 => ENOTSUP,
            108 => ESHUTDOWN,
            _ => EIO,
        }
    }
}

/// The only meta context Strata serves.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Sizes of the fixed parts of messages.
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// Longest export name or meta-context query accepted (the spec's 4096-byte string limit).
pub const MAX_STRING: usize = 4096;

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("{what} is truncated: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{what} is {len} bytes, more than the {max} allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtocolError> {
    if b.len() < n {
        Err(ProtocolError::Truncated {
            what,
            need: n,
            have: b.len(),
        })
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// The server's greeting: `NBDMAGIC IHAVEOPT flags`.
pub fn encode_greeting(buf: &mut BytesMut, flags: u16) {
    buf.put_u64(NBD_MAGIC);
    buf.put_u64(IHAVEOPT);
    buf.put_u16(flags);
}

/// Parse the server's 18-byte greeting; returns its handshake flags.
pub fn decode_greeting(b: &[u8]) -> Result<u16, ProtocolError> {
    need("greeting", b, 18)?;
    let magic = be_u64(b, 0);
    if magic != NBD_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: NBD_MAGIC,
            found: magic,
        });
    }
    let style = be_u64(b, 8);
    if style != IHAVEOPT {
        return Err(ProtocolError::Invalid(format!(
            "server speaks oldstyle or an unknown style ({style:#x}); only newstyle is supported"
        )));
    }
    Ok(be_u16(b, 16))
}

/// The header of an option the client sends: `IHAVEOPT option length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parse a 16-byte option header.
pub fn decode_option_header(b: &[u8]) -> Result<OptionHeader, ProtocolError> {
    need("option header", b, OPTION_HEADER_LEN)?;
    let magic = be_u64(b, 0);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: be_u32(b, 8),
        len: be_u32(b, 12),
    })
}

/// Append an option with its data.
pub fn encode_option(buf: &mut BytesMut, option: u32, data: &[u8]) {
    buf.put_u64(IHAVEOPT);
    buf.put_u32(option);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// The export name and information requests of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// The export name and queries of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// An option the client sent, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaRequest),
    SetMetaContext(MetaRequest),
    /// An option this codec does not know; answered with `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

fn string(what: &'static str, b: &[u8]) -> Result<String, ProtocolError> {
    if b.len() > MAX_STRING {
        return Err(ProtocolError::TooLong {
            what,
            len: b.len(),
            max: MAX_STRING,
        });
    }
    String::from_utf8(b.to_vec())
        .map_err(|_| ProtocolError::Invalid(format!("{what} is not UTF-8")))
}

fn no_data(option: &str, data: &[u8]) -> Result<(), ProtocolError> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::Invalid(format!(
            "{option} carries {} bytes of data; it must carry none",
            data.len()
        )))
    }
}

/// Parse the data of option `option`. Errors mean `NBD_REP_ERR_INVALID` (or `ERR_TOO_BIG`).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtocolError> {
    Ok(match option {
        opt::EXPORT_NAME => ClientOption::ExportName(string("export name", data)?),
        // The spec asks servers to ignore data sent with ABORT.
        opt::ABORT => ClientOption::Abort,
        opt::LIST => {
            no_data("NBD_OPT_LIST", data)?;
            ClientOption::List
        }
        opt::STARTTLS => {
            no_data("NBD_OPT_STARTTLS", data)?;
            ClientOption::StartTls
        }
        opt::STRUCTURED_REPLY => {
            no_data("NBD_OPT_STRUCTURED_REPLY", data)?;
            ClientOption::StructuredReply
        }
        opt::INFO | opt::GO => {
            let req = parse_info_request(data)?;
            if option == opt::INFO {
                ClientOption::Info(req)
            } else {
                ClientOption::Go(req)
            }
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            let req = parse_meta_request(data)?;
            if option == opt::LIST_META_CONTEXT {
                ClientOption::ListMetaContext(req)
            } else {
                ClientOption::SetMetaContext(req)
            }
        }
        other => ClientOption::Unknown(other),
    })
}

fn parse_info_request(b: &[u8]) -> Result<InfoRequest, ProtocolError> {
    need("NBD_OPT_GO/INFO data", b, 6)?;
    let name_len = be_u32(b, 0) as usize;
    if name_len > b.len() - 6 {
        return Err(ProtocolError::Invalid(format!(
            "export name length {name_len} exceeds the option's data ({} bytes)",
            b.len()
        )));
    }
    let name = string("export name", &b[4..4 + name_len])?;
    let rest = &b[4 + name_len..];
    let n = be_u16(rest, 0) as usize;
    if rest.len() != 2 + 2 * n {
        return Err(ProtocolError::Invalid(format!(
            "NBD_OPT_GO/INFO lists {n} information requests but carries {} bytes for them",
            rest.len() - 2
        )));
    }
    let requests = (0..n).map(|i| be_u16(rest, 2 + 2 * i)).collect();
    Ok(InfoRequest { name, requests })
}

fn parse_meta_request(b: &[u8]) -> Result<MetaRequest, ProtocolError> {
    need("meta context data", b, 8)?;
    let name_len = be_u32(b, 0) as usize;
    if name_len > b.len() - 8 {
        return Err(ProtocolError::Invalid(format!(
            "export name length {name_len} exceeds the option's data ({} bytes)",
            b.len()
        )));
    }
    let export = string("export name", &b[4..4 + name_len])?;
    let mut at = 4 + name_len;
    let n = be_u32(b, at) as usize;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        need("meta context query", &b[at..], 4)?;
        let len = be_u32(b, at) as usize;
        at += 4;
        if len > b.len() - at {
            return Err(ProtocolError::Invalid(format!(
                "meta context query length {len} exceeds the option's data"
            )));
        }
        queries.push(string("meta context query", &b[at..at + len])?);
        at += len;
    }
    if at != b.len() {
        return Err(ProtocolError::Invalid(format!(
            "{} bytes left after the meta context queries",
            b.len() - at
        )));
    }
    Ok(MetaRequest { export, queries })
}

/// Encode the data of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub fn encode_info_request(req: &InfoRequest) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + req.name.len() + 2 * req.requests.len());
    v.extend_from_slice(&(req.name.len() as u32).to_be_bytes());
    v.extend_from_slice(req.name.as_bytes());
    v.extend_from_slice(&(req.requests.len() as u16).to_be_bytes());
    for r in &req.requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

/// Encode the data of `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`.
pub fn encode_meta_request(req: &MetaRequest) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(req.export.len() as u32).to_be_bytes());
    v.extend_from_slice(req.export.as_bytes());
    v.extend_from_slice(&(req.queries.len() as u32).to_be_bytes());
    for q in &req.queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Append an option reply.
pub fn encode_option_reply(buf: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    buf.put_u64(OPT_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply_type);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// The header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

/// Parse a 20-byte option reply header.
pub fn decode_option_reply_header(b: &[u8]) -> Result<OptionReplyHeader, ProtocolError> {
    need("option reply header", b, OPTION_REPLY_HEADER_LEN)?;
    let magic = be_u64(b, 0);
    if magic != OPT_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: OPT_REPLY_MAGIC,
            found: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: be_u32(b, 8),
        reply_type: be_u32(b, 12),
        len: be_u32(b, 16),
    })
}

/// The data of `NBD_REP_SERVER`: an export's name and description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// The data of `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// The data of `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn encode_info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// Block size constraints: minimum, preferred and maximum payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// The data of `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(b: BlockSizes) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&b.minimum.to_be_bytes());
    v.extend_from_slice(&b.preferred.to_be_bytes());
    v.extend_from_slice(&b.maximum.to_be_bytes());
    v
}

/// What an `NBD_REP_INFO` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize(BlockSizes),
    Unknown(u16),
}

/// Parse the data of an `NBD_REP_INFO`.
pub fn parse_info(b: &[u8]) -> Result<Info, ProtocolError> {
    need("NBD_REP_INFO", b, 2)?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(match be_u16(b, 0) {
        info::EXPORT => {
            need("NBD_INFO_EXPORT", b, 12)?;
            Info::Export {
                size: be_u64(b, 2),
                flags: be_u16(b, 10),
            }
        }
        info::NAME => Info::Name(text(&b[2..])),
        info::DESCRIPTION => Info::Description(text(&b[2..])),
        info::BLOCK_SIZE => {
            need("NBD_INFO_BLOCK_SIZE", b, 14)?;
            Info::BlockSize(BlockSizes {
                minimum: be_u32(b, 2),
                preferred: be_u32(b, 6),
                maximum: be_u32(b, 10),
            })
        }
        other => Info::Unknown(other),
    })
}

/// The data of `NBD_REP_META_CONTEXT`.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and, unless `no_zeroes`, 124 zero bytes.
pub fn encode_export_name_reply(buf: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, 124);
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// A transmission request header (the write payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parse a 28-byte request header.
pub fn decode_request(b: &[u8]) -> Result<Request, ProtocolError> {
    need("request", b, REQUEST_LEN)?;
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: REQUEST_MAGIC.into(),
            found: magic.into(),
        });
    }
    Ok(Request {
        flags: be_u16(b, 4),
        command: be_u16(b, 6),
        cookie: be_u64(b, 8),
        offset: be_u64(b, 16),
        length: be_u32(b, 24),
    })
}

/// Append a request header.
pub fn encode_request(buf: &mut BytesMut, r: &Request) {
    buf.put_u32(REQUEST_MAGIC);
    buf.put_u16(r.flags);
    buf.put_u16(r.command);
    buf.put_u64(r.cookie);
    buf.put_u64(r.offset);
    buf.put_u32(r.length);
}

/// Append a simple reply header (read data, if any, follows it).
pub fn encode_simple_reply(buf: &mut BytesMut, error: u32, cookie: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// Append a structured reply chunk header; `length` bytes of payload follow it.
pub fn encode_chunk_header(
    buf: &mut BytesMut,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    length: u32,
) {
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(chunk_type);
    buf.put_u64(cookie);
    buf.put_u32(length);
}

/// Append a whole `NBD_REPLY_TYPE_ERROR` chunk with a message.
pub fn encode_error_chunk(buf: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    encode_chunk_header(
        buf,
        reply::FLAG_DONE,
        reply::TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    buf.put_u32(error);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg);
}

/// A reply header as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        length: u32,
    },
}

impl ReplyHeader {
    /// The cookie of the request it answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// Parse a reply header from the start of `b`; `Ok(None)` if more bytes are needed. Returns the
/// header and its length (16 or 20 bytes).
pub fn decode_reply_header(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ProtocolError> {
    if b.len() < 4 {
        return Ok(None);
    }
    match be_u32(b, 0) {
        SIMPLE_REPLY_MAGIC if b.len() >= SIMPLE_REPLY_LEN => Ok(Some((
            ReplyHeader::Simple {
                error: be_u32(b, 4),
                cookie: be_u64(b, 8),
            },
            SIMPLE_REPLY_LEN,
        ))),
        STRUCTURED_REPLY_MAGIC if b.len() >= STRUCTURED_REPLY_LEN => Ok(Some((
            ReplyHeader::Chunk {
                flags: be_u16(b, 4),
                chunk_type: be_u16(b, 6),
                cookie: be_u64(b, 8),
                length: be_u32(b, 16),
            },
            STRUCTURED_REPLY_LEN,
        ))),
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC => Ok(None),
        other => Err(ProtocolError::BadMagic {
            expected: SIMPLE_REPLY_MAGIC.into(),
            found: other.into(),
        }),
    }
}

/// Parse the payload of an error chunk: the error and its message.
pub fn parse_error_chunk(b: &[u8]) -> Result<(u32, String), ProtocolError> {
    need("error chunk", b, 6)?;
    let len = be_u16(b, 4) as usize;
    need("error chunk message", &b[6..], len)?;
    Ok((
        be_u32(b, 0),
        String::from_utf8_lossy(&b[6..6 + len]).into_owned(),
    ))
}

/// A request header as a fixed array, for writers that gather headers and payloads into one
/// vectored write without a buffer per request.
pub fn request_header(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// The length of the reply header that starts `b` (16 or 20 bytes), from its first 4 bytes;
/// `Ok(None)` if fewer than 4 bytes are at hand.
pub fn reply_header_len(b: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if b.len() < 4 {
        return Ok(None);
    }
    match be_u32(b, 0) {
        SIMPLE_REPLY_MAGIC => Ok(Some(SIMPLE_REPLY_LEN)),
        STRUCTURED_REPLY_MAGIC => Ok(Some(STRUCTURED_REPLY_LEN)),
        other => Err(ProtocolError::BadMagic {
            expected: SIMPLE_REPLY_MAGIC.into(),
            found: other.into(),
        }),
    }
}

/// Parse the data of `NBD_REP_META_CONTEXT`: the context id and its name.
pub fn parse_rep_meta_context(b: &[u8]) -> Result<(u32, String), ProtocolError> {
    need("NBD_REP_META_CONTEXT", b, 4)?;
    Ok((be_u32(b, 0), string("meta context name", &b[4..])?))
}

/// Parse the payload of an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: the offset and the hole's size.
pub fn parse_offset_hole(b: &[u8]) -> Result<(u64, u32), ProtocolError> {
    if b.len() != 12 {
        return Err(ProtocolError::Invalid(format!(
            "an NBD_REPLY_TYPE_OFFSET_HOLE chunk is {} bytes; it must be 12",
            b.len()
        )));
    }
    Ok((be_u64(b, 0), be_u32(b, 8)))
}

/// Parse the payload of an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: error, message and offset.
pub fn parse_error_offset_chunk(b: &[u8]) -> Result<(u32, String, u64), ProtocolError> {
    let (error, message) = parse_error_chunk(b)?;
    let at = 6 + be_u16(b, 4) as usize;
    need("NBD_REPLY_TYPE_ERROR_OFFSET", b, at + 8)?;
    Ok((error, message, be_u64(b, at)))
}

/// One descriptor of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// Parse the payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: the meta context id and its
/// descriptors (at least one).
pub fn parse_block_status_chunk(b: &[u8]) -> Result<(u32, Vec<BlockDescriptor>), ProtocolError> {
    if b.len() < 12 || !(b.len() - 4).is_multiple_of(8) {
        return Err(ProtocolError::Invalid(format!(
            "an NBD_REPLY_TYPE_BLOCK_STATUS chunk is {} bytes; it must be 4 + 8n with n >= 1",
            b.len()
        )));
    }
    let descriptors = b[4..]
        .chunks_exact(8)
        .map(|d| BlockDescriptor {
            length: be_u32(d, 0),
            flags: be_u32(d, 4),
        })
        .collect();
    Ok((be_u32(b, 0), descriptors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_round_trip() {
        let mut b = BytesMut::new();
        encode_greeting(
            &mut b,
            handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES,
        );
        assert_eq!(b.len(), 18);
        assert_eq!(decode_greeting(&b), Ok(3));
        b[0] ^= 1;
        assert!(matches!(
            decode_greeting(&b),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_data_is_validated() {
        assert!(parse_option(opt::LIST, b"x").is_err());
        assert!(parse_option(opt::STRUCTURED_REPLY, b"").is_ok());
        assert_eq!(
            parse_option(opt::ABORT, b"ignored"),
            Ok(ClientOption::Abort)
        );
        assert_eq!(parse_option(99, b""), Ok(ClientOption::Unknown(99)));
        // A name length that runs past the data.
        assert!(parse_option(opt::GO, &[0, 0, 0, 9, b'a', 0, 0]).is_err());
        // Truncated info requests.
        assert!(parse_option(opt::GO, &[0, 0, 0, 1, b'a', 0, 2, 0, 3]).is_err());
        assert!(
            parse_option(opt::SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9]).is_err()
        );
        assert!(parse_option(opt::EXPORT_NAME, &[0xff, 0xfe]).is_err());
        assert!(parse_option(opt::EXPORT_NAME, &[b'a'; MAX_STRING + 1]).is_err());
    }

    #[test]
    fn reply_payload_helpers() {
        let mut b = BytesMut::new();
        encode_simple_reply(&mut b, 0, 1);
        assert_eq!(reply_header_len(&b), Ok(Some(SIMPLE_REPLY_LEN)));
        b.clear();
        encode_chunk_header(&mut b, 0, reply::TYPE_NONE, 1, 0);
        assert_eq!(reply_header_len(&b[..4]), Ok(Some(STRUCTURED_REPLY_LEN)));
        assert_eq!(reply_header_len(&b[..3]), Ok(None));
        assert!(reply_header_len(&[1, 2, 3, 4]).is_err());

        let d = encode_rep_meta_context(7, BASE_ALLOCATION);
        assert_eq!(
            parse_rep_meta_context(&d),
            Ok((7, BASE_ALLOCATION.to_string()))
        );
        assert!(parse_rep_meta_context(&[0, 0]).is_err());

        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_offset_hole(&hole), Ok((4096, 512)));
        assert!(parse_offset_hole(&hole[..11]).is_err());

        let mut b = BytesMut::new();
        encode_error_chunk(&mut b, 9, errno::ENOSPC, "full");
        let payload = &b[STRUCTURED_REPLY_LEN..];
        assert_eq!(
            parse_error_chunk(payload),
            Ok((errno::ENOSPC, "full".to_string()))
        );
        let mut with_offset = payload.to_vec();
        assert!(parse_error_offset_chunk(&with_offset).is_err());
        with_offset.extend_from_slice(&65536u64.to_be_bytes());
        assert_eq!(
            parse_error_offset_chunk(&with_offset),
            Ok((errno::ENOSPC, "full".to_string(), 65536))
        );

        let mut status = 1u32.to_be_bytes().to_vec();
        for (len, flags) in [
            (4096u32, 0u32),
            (8192, alloc_flags::HOLE | alloc_flags::ZERO),
        ] {
            status.extend_from_slice(&len.to_be_bytes());
            status.extend_from_slice(&flags.to_be_bytes());
        }
        let (id, d) = parse_block_status_chunk(&status).unwrap();
        assert_eq!(id, 1);
        assert_eq!(
            d,
            vec![
                BlockDescriptor {
                    length: 4096,
                    flags: 0
                },
                BlockDescriptor {
                    length: 8192,
                    flags: 3
                }
            ]
        );
        assert!(parse_block_status_chunk(&status[..4]).is_err());
        assert!(parse_block_status_chunk(&status[..13]).is_err());
    }

    proptest! {
        #[test]
        fn info_request_round_trips(name in "[a-z0-9/._-]{0,64}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let req = InfoRequest { name, requests };
            prop_assert_eq!(parse_option(opt::GO, &encode_info_request(&req)), Ok(ClientOption::Go(req)));
        }

        #[test]
        fn meta_request_round_trips(export in "[a-z]{0,16}", queries in proptest::collection::vec("[a-z:]{0,20}", 0..4)) {
            let req = MetaRequest { export, queries };
            prop_assert_eq!(parse_option(opt::SET_META_CONTEXT, &encode_meta_request(&req)), Ok(ClientOption::SetMetaContext(req)));
        }

        #[test]
        fn request_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command, cookie, offset, length };
            let mut b = BytesMut::new();
            encode_request(&mut b, &r);
            prop_assert_eq!(decode_request(&b), Ok(r));
        }

        #[test]
        fn request_header_matches_encode_request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command, cookie, offset, length };
            let mut b = BytesMut::new();
            encode_request(&mut b, &r);
            prop_assert_eq!(&request_header(&r)[..], &b[..]);
        }

        #[test]
        fn parsers_never_panic(option: u32, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_option(option % 12, &data);
            let _ = parse_info(&data);
            let _ = decode_request(&data);
            let _ = decode_reply_header(&data);
            let _ = parse_error_chunk(&data);
            let _ = decode_option_header(&data);
            let _ = decode_option_reply_header(&data);
            let _ = reply_header_len(&data);
            let _ = parse_rep_meta_context(&data);
            let _ = parse_offset_hole(&data);
            let _ = parse_error_offset_chunk(&data);
            let _ = parse_block_status_chunk(&data);
        }

        #[test]
        fn reply_headers_round_trip(error: u32, cookie: u64, flags: u16, ty: u16, len: u32) {
            let mut b = BytesMut::new();
            encode_simple_reply(&mut b, error, cookie);
            prop_assert_eq!(decode_reply_header(&b), Ok(Some((ReplyHeader::Simple { error, cookie }, 16))));
            let mut b = BytesMut::new();
            encode_chunk_header(&mut b, flags, ty, cookie, len);
            prop_assert_eq!(decode_reply_header(&b), Ok(Some((ReplyHeader::Chunk { flags, chunk_type: ty, cookie, length: len }, 20))));
        }
    }
}
