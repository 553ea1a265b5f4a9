//! `iscsi://HOST[:PORT]/IQN[/LUN]?…`: the URI form of an [`IscsiDevice`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use strata_bdev::{BlockDevice, DeviceUri, Error, ErrorKind, Opener, Registry, Result};

use crate::host::{IscsiDevice, IscsiOptions, Portal, DEFAULT_PORT};
use crate::login::Chap;

/// The query keys an `iscsi://` URI accepts.
const KEYS: &[&str] = &[
    "user",
    "secret",
    "header_digest",
    "data_digest",
    "timeout",
    "initiator",
    "queue_depth",
];

/// Opens `iscsi://HOST[:PORT]/IQN[/LUN]` (port 3260 by default; without a LUN, the first LUN
/// that holds a disk). Query keys:
///
/// - `user=`, `secret=`: CHAP credentials (both or neither; the secret is never logged or
///   shown in messages). [`IscsiOpener::new`] can supply them from configuration instead.
/// - `header_digest=crc32c|none`, `data_digest=crc32c|none`: CRC32C digests (default none).
/// - `timeout=SECONDS`: the limit of each call and of logging in (default 30).
/// - `initiator=IQN`: the initiator name (default `iqn.2024-01.io.strata:HOSTNAME`).
/// - `queue_depth=N`: commands in flight at most (default 128).
#[derive(Debug, Clone, Default)]
pub struct IscsiOpener {
    options: IscsiOptions,
}

impl IscsiOpener {
    /// An opener whose devices start from `options` (URI keys override them).
    pub fn new(options: IscsiOptions) -> IscsiOpener {
        IscsiOpener { options }
    }

    /// Register the `iscsi` scheme in `registry`.
    pub fn register(registry: &mut Registry) {
        registry.register("iscsi", Arc::new(IscsiOpener::default()));
    }

    /// The portal and options a URI names, taking its query keys (any other key is an error).
    /// Error messages show the URI without its secret.
    pub fn parse(&self, uri: &mut DeviceUri) -> Result<(Portal, IscsiOptions)> {
        let shown = redact(uri.as_str());
        let invalid = |why: &str| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("device URI {shown}: {why}"),
            )
        };
        if uri.scheme != "iscsi" {
            return Err(invalid("the iSCSI initiator opens iscsi:// URIs"));
        }
        let address = tcp_address(&uri.authority).map_err(|why| invalid(&why))?;
        let path = uri.path.trim_start_matches('/');
        let mut parts = path.splitn(2, '/');
        let target = parts.next().unwrap_or_default().to_string();
        if target.is_empty() {
            return Err(invalid(
                "the target name is missing: iscsi://HOST[:PORT]/IQN[/LUN]",
            ));
        }
        let lun = match parts.next().map(|l| l.trim_end_matches('/')) {
            None | Some("") => None,
            Some(l) => Some(
                l.parse::<u16>()
                    .ok()
                    .filter(|&l| l < 16384)
                    .ok_or_else(|| {
                        invalid(&format!("LUN {l:?} is not a number from 0 to 16383"))
                    })?,
            ),
        };
        let mut o = self.options.clone();
        match (uri.take("user"), uri.take("secret")) {
            (Some(user), Some(secret)) if !user.is_empty() && !secret.is_empty() => {
                o.chap = Some(Chap { user, secret })
            }
            (None, None) => {}
            _ => return Err(invalid("CHAP needs both user= and secret=, neither empty")),
        }
        for (key, field) in [
            ("header_digest", &mut o.header_digest),
            ("data_digest", &mut o.data_digest),
        ] {
            if let Some(v) = uri.take(key) {
                *field = match v.to_ascii_lowercase().as_str() {
                    "crc32c" => true,
                    "none" => false,
                    _ => return Err(invalid(&format!("{key}={v:?}: expected crc32c or none"))),
                };
            }
        }
        if let Some(v) = uri.take("timeout") {
            o.timeout = v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| invalid(&format!("timeout={v:?}: expected seconds above 0")))?;
        }
        if let Some(v) = uri.take("initiator") {
            if !(v.starts_with("iqn.") || v.starts_with("eui.") || v.starts_with("naa.")) {
                return Err(invalid(&format!(
                    "initiator={v:?}: expected an iqn., eui. or naa. name"
                )));
            }
            o.initiator = v;
        }
        if let Some(v) = uri.take("queue_depth") {
            o.queue_depth = v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=4096).contains(n))
                .ok_or_else(|| invalid(&format!("queue_depth={v:?}: expected 1 to 4096")))?;
        }
        uri.finish(KEYS)
            .map_err(|e| Error::new(e.kind(), e.to_string().replace(uri.as_str(), &shown)))?;
        Ok((
            Portal {
                address,
                target,
                lun,
            },
            o,
        ))
    }
}

#[async_trait]
impl Opener for IscsiOpener {
    async fn open(&self, mut uri: DeviceUri) -> Result<Arc<dyn BlockDevice>> {
        let (portal, options) = self.parse(&mut uri)?;
        Ok(Arc::new(IscsiDevice::connect(portal, options).await?))
    }
}

/// The URI with the value of `secret=` replaced, for messages.
pub fn redact(uri: &str) -> String {
    let Some((base, query)) = uri.split_once('?') else {
        return uri.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("secret", _)) => "secret=***".to_string(),
            _ => kv.to_string(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// `host:port` from a URI authority (port 3260 by default; IPv6 in brackets).
fn tcp_address(authority: &str) -> std::result::Result<String, String> {
    if authority.is_empty() {
        return Err("the host is missing: iscsi://HOST[:PORT]/IQN[/LUN]".into());
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address misses its closing ]")?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("expected :PORT after the IPv6 address")?,
            ),
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err("write IPv6 addresses in brackets, e.g. iscsi://[::1]/IQN".into())
            }
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("port {p:?} is not a number from 0 to 65535"))?,
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<(Portal, IscsiOptions)> {
        IscsiOpener::default().parse(&mut DeviceUri::parse(uri)?)
    }

    #[test]
    fn parses_the_documented_forms() {
        let (p, o) = parse("iscsi://foobar/iqn.2019-05.io.openebs:disk0").unwrap();
        assert_eq!(p.address, "foobar:3260");
        assert_eq!(p.target, "iqn.2019-05.io.openebs:disk0");
        assert_eq!(p.lun, None);
        assert_eq!(o.chap, None);
        let (p, o) = parse(
            "iscsi://127.0.0.1:3261/iqn.2024-01.io.strata:t/3?user=u&secret=s&header_digest=CRC32C&data_digest=none&timeout=2.5&queue_depth=8",
        )
        .unwrap();
        assert_eq!(p.address, "127.0.0.1:3261");
        assert_eq!(p.lun, Some(3));
        assert_eq!(
            o.chap,
            Some(Chap {
                user: "u".into(),
                secret: "s".into()
            })
        );
        assert!(o.header_digest && !o.data_digest);
        assert_eq!(o.timeout, Duration::from_millis(2500));
        assert_eq!(o.queue_depth, 8);
        let (p, _) = parse("iscsi://[::1]/iqn.x:y/0").unwrap();
        assert_eq!(p.address, "[::1]:3260");
        assert_eq!(p.to_string(), "iscsi://[::1]:3260/iqn.x:y/0");
    }

    #[test]
    fn refuses_bad_uris_without_showing_the_secret() {
        for (uri, why) in [
            ("iscsi:///iqn.x:y", "host is missing"),
            ("iscsi://h/", "target name is missing"),
            ("iscsi://h/iqn.x:y/lun", "not a number"),
            ("iscsi://h/iqn.x:y?user=u", "both user= and secret="),
            ("iscsi://h/iqn.x:y?header_digest=md5", "crc32c or none"),
            ("iscsi://h/iqn.x:y?timeout=0", "seconds above 0"),
            ("iscsi://h/iqn.x:y?initiator=bob", "iqn."),
            (
                "iscsi://h/iqn.x:y?user=u&secret=hunter2&sekret=1",
                "unknown option",
            ),
            ("iscsi://h:99999/iqn.x:y", "port"),
        ] {
            let e = parse(uri).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{uri}");
            assert!(e.to_string().contains(why), "{uri}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{uri}: {e}");
        }
    }

    #[test]
    fn redacts_secrets() {
        assert_eq!(
            redact("iscsi://h/t?user=u&secret=x&timeout=1"),
            "iscsi://h/t?user=u&secret=***&timeout=1"
        );
        assert_eq!(redact("iscsi://h/t"), "iscsi://h/t");
    }
}
