//! The handshake: the greeting, options and their replies, export information.

use bytes::{BufMut, BytesMut};

use super::*;

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

/// Parse the data of `NBD_REP_META_CONTEXT`: the context id and its name.
pub fn parse_rep_meta_context(b: &[u8]) -> Result<(u32, String), ProtocolError> {
    need("NBD_REP_META_CONTEXT", b, 4)?;
    Ok((be_u32(b, 0), string("meta context name", &b[4..])?))
}
