//! Who is calling: the daemon's own user on its unix socket (the *owner*, who may name any
//! path, as the configuration file does), or a client of a TCP listener that proved itself with
//! a TLS client certificate or a bearer token (confined to the configured pools). Anyone else
//! is refused before any handler runs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tonic::{Request, Status};

use crate::daemon::manager::Caller;

/// What a connection is, as the listener that accepted it saw it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// A unix-socket client running as the daemon's user (or root).
    pub owner: bool,
    /// The TLS client certificate it presented (its SHA-256 fingerprint), if any.
    pub certificate: Option<String>,
    /// Where it came from, for messages.
    pub addr: String,
}

/// The bearer tokens a TCP listener accepts: `NAME TOKEN` per line (`#` comments), kept as
/// digests so that a lookup does not compare secrets byte by byte.
#[derive(Debug, Default)]
pub struct Tokens {
    names: HashMap<Vec<u8>, String>,
}

fn digest(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

impl Tokens {
    /// Read a tokens file. Each token is at least 16 characters; the file must not be
    /// readable by other users.
    pub fn load(path: &Path) -> anyhow::Result<Tokens> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)
            .with_context(|| format!("[api] tokens_file {}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            bail!(
                "[api] tokens_file {}: readable by other users (mode {:o}); chmod 600 it",
                path.display(),
                meta.mode() & 0o777
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read [api] tokens_file {}", path.display()))?;
        let mut names = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, token) = match line.split_once(char::is_whitespace) {
                Some((n, t)) => (n.to_string(), t.trim()),
                None => (format!("token on line {}", i + 1), line),
            };
            if token.len() < 16 || token.contains(char::is_whitespace) {
                bail!(
                    "[api] tokens_file {} line {}: a token is one word of at least 16 characters",
                    path.display(),
                    i + 1
                );
            }
            names.insert(digest(token), name);
        }
        if names.is_empty() {
            bail!("[api] tokens_file {} holds no token", path.display());
        }
        Ok(Tokens { names })
    }

    fn name(&self, token: &str) -> Option<&str> {
        self.names.get(&digest(token)).map(String::as_str)
    }
}

/// Decide who a request comes from, or refuse it; the caller goes into its extensions.
pub fn authorize(tokens: &Tokens, mut req: Request<()>) -> Result<Request<()>, Status> {
    let peer = req.extensions().get::<Peer>().cloned();
    let caller = match &peer {
        Some(p) if p.owner => Caller::Owner,
        Some(Peer {
            certificate: Some(fp),
            ..
        }) => Caller::Remote(format!("client certificate {fp}")),
        _ => {
            let token = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match token.and_then(|t| tokens.name(t.trim())) {
                Some(name) => Caller::Remote(name.to_string()),
                None => {
                    let from = peer.map(|p| p.addr).unwrap_or_default();
                    return Err(Status::unauthenticated(format!(
                        "the strata API at this address needs a bearer token or a client \
                         certificate ({} from {from}); pass --token-file, or use the daemon's \
                         unix socket as its user",
                        if token.is_some() {
                            "the token given is not one of [api] tokens_file's"
                        } else {
                            "none given"
                        }
                    )));
                }
            }
        }
    };
    req.extensions_mut().insert(caller);
    Ok(req)
}

/// The caller a request was authorized as (least privilege if, impossibly, none was).
pub fn caller<T>(req: &Request<T>) -> Caller {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(|| Caller::Remote("an unauthorized caller".into()))
}

/// The interceptor every service is wrapped in.
pub fn interceptor(
    tokens: Arc<Tokens>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |req| authorize(&tokens, req)
}
