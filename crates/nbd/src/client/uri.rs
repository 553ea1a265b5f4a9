//! URIs: [`NbdOpener`] opens `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use strata_bdev::{BlockDevice, DeviceUri, Opener, Result};

use super::{ClientOptions, NbdDevice, Target, DEFAULT_PORT};

/// Opens `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH` (the NBD project's URI
/// standard; the export is the path after the first `/`, and may be empty for the server's
/// default). Query keys: `timeout=SECONDS` (per-call time limit), `connect_timeout=SECONDS`, and
/// `socket=` for `nbd+unix`. Register it for both schemes.
#[derive(Debug, Clone, Default)]
pub struct NbdOpener {
    options: ClientOptions,
}

impl NbdOpener {
    /// An opener whose connections start from `options` (URI keys override them).
    pub fn new(options: ClientOptions) -> NbdOpener {
        NbdOpener { options }
    }

    /// The target, export and options `uri` names, consuming its query keys.
    pub fn parse(&self, uri: &mut DeviceUri) -> Result<(Target, String, ClientOptions)> {
        let target = match uri.scheme.as_str() {
            "nbd" => Target::Tcp(tcp_address(&uri.authority).map_err(|why| uri.invalid(&why))?),
            "nbd+unix" => {
                if !uri.authority.is_empty() {
                    return Err(uri.invalid(
                        "nbd+unix URIs name no host: nbd+unix:///EXPORT?socket=/path/to.sock",
                    ));
                }
                match uri.take("socket") {
                    Some(s) if !s.is_empty() => Target::Unix(PathBuf::from(s)),
                    _ => {
                        return Err(uri.invalid(
                            "socket= is required, e.g. nbd+unix:///EXPORT?socket=/run/nbd.sock",
                        ))
                    }
                }
            }
            other => {
                return Err(uri.invalid(&format!(
                    "the NBD client opens nbd:// and nbd+unix:// URIs, not {other}://"
                )))
            }
        };
        let export = uri.path.strip_prefix('/').unwrap_or(&uri.path).to_string();
        let mut options = self.options.clone();
        if let Some(t) = take_seconds(uri, "timeout")? {
            options.request_timeout = Some(t);
        }
        if let Some(t) = take_seconds(uri, "connect_timeout")? {
            options.connect_timeout = t;
        }
        let known: &[&str] = if matches!(target, Target::Unix(_)) {
            &["socket", "timeout", "connect_timeout"]
        } else {
            &["timeout", "connect_timeout"]
        };
        uri.finish(known)?;
        Ok((target, export, options))
    }
}

#[async_trait]
impl Opener for NbdOpener {
    async fn open(&self, mut uri: DeviceUri) -> Result<Arc<dyn BlockDevice>> {
        let (target, export, options) = self.parse(&mut uri)?;
        Ok(Arc::new(
            NbdDevice::connect(&target, &export, &options).await?,
        ))
    }
}

fn take_seconds(uri: &mut DeviceUri, key: &str) -> Result<Option<Duration>> {
    let Some(v) = uri.take(key) else {
        return Ok(None);
    };
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .map(Some)
        .ok_or_else(|| {
            uri.invalid(&format!(
                "{key}={v:?}: expected a number of seconds above 0"
            ))
        })
}

/// `host:port` from a URI authority: the host defaults to localhost, the port to 10809; IPv6
/// addresses are written in brackets.
fn tcp_address(authority: &str) -> std::result::Result<String, String> {
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
                return Err(
                    "write IPv6 addresses in brackets, e.g. nbd://[::1]:10809/EXPORT".into(),
                )
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
    let host = if host.is_empty() {
        "localhost".to_string()
    } else {
        host
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_addresses() {
        assert_eq!(tcp_address("").unwrap(), "localhost:10809");
        assert_eq!(tcp_address("h").unwrap(), "h:10809");
        assert_eq!(tcp_address("h:99").unwrap(), "h:99");
        assert_eq!(tcp_address("h:").unwrap(), "h:10809");
        assert_eq!(tcp_address("[::1]").unwrap(), "[::1]:10809");
        assert_eq!(tcp_address("[::1]:7").unwrap(), "[::1]:7");
        assert!(tcp_address("::1").is_err());
        assert!(tcp_address("h:99999").is_err());
        assert!(tcp_address("[::1").is_err());
        assert!(tcp_address("[::1]x").is_err());
    }

    #[test]
    fn uris() {
        let opener = NbdOpener::default();
        let parse = |s: &str| opener.parse(&mut DeviceUri::parse(s).unwrap());

        let (t, e, o) = parse("nbd://example.com/disk%201?timeout=2.5").unwrap();
        assert_eq!(t, Target::Tcp("example.com:10809".into()));
        assert_eq!(e, "disk 1");
        assert_eq!(o.request_timeout, Some(Duration::from_millis(2500)));

        let (t, e, o) = parse("nbd://10.0.0.1:5000/").unwrap();
        assert_eq!(t, Target::Tcp("10.0.0.1:5000".into()));
        assert_eq!(e, "");
        assert_eq!(o, ClientOptions::default());

        let (t, e, _) = parse("nbd://host").unwrap();
        assert_eq!((t, e.as_str()), (Target::Tcp("host:10809".into()), ""));

        // Only the first slash separates: the rest belongs to the export name.
        let (_, e, _) = parse("nbd://host//a/b").unwrap();
        assert_eq!(e, "/a/b");

        let (t, e, o) = parse("nbd+unix:///exp?socket=/run/s.sock&connect_timeout=1").unwrap();
        assert_eq!(t, Target::Unix("/run/s.sock".into()));
        assert_eq!(e, "exp");
        assert_eq!(o.connect_timeout, Duration::from_secs(1));

        let err = |s: &str| parse(s).unwrap_err().to_string();
        assert!(err("nbd+unix:///exp").contains("socket= is required"));
        assert!(err("nbd+unix://host/exp?socket=/s").contains("no host"));
        assert!(err("nbd://h/exp?socket=/s").contains("unknown option \"socket\""));
        assert!(err("nbd://h/exp?tls=1").contains("unknown option \"tls\""));
        assert!(err("nbd://h/exp?timeout=0").contains("timeout"));
        assert!(err("nbd://h/exp?timeout=soon").contains("timeout"));
        assert!(err("nbds://h/exp").contains("not nbds://"));
    }
}
