//! URIs: [`NbdOpener`] opens `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use strata_bdev::{tcp_address, BlockDevice, DeviceUri, Opener, Result};

use super::{ClientOptions, NbdDevice, Target, DEFAULT_PORT};

/// How an IPv6 host is written in an `nbd://` URI.
const NBD_IPV6: &str = "nbd://[::1]:10809/EXPORT";

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
            "nbd" => Target::Tcp(
                tcp_address(&uri.authority, DEFAULT_PORT, NBD_IPV6, None)
                    .map_err(|why| uri.invalid(&why))?,
            ),
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
        if let Some(t) = uri.take_secs("timeout", false)? {
            options.request_timeout = Some(t);
        }
        if let Some(t) = uri.take_secs("connect_timeout", false)? {
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

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
