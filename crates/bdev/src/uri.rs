//! Device URIs (`file:///disk.img?size=1G`, `mem://scratch?size=64M`, `nbd://host:10809/name`)
//! and the [`Opener`] trait each scheme implements (the `Registry` maps schemes to openers).
//!
//! A backend takes the query keys it knows with [`DeviceUri::take`] and ends with
//! [`DeviceUri::finish`], which turns any key left over into an error: a misspelt option is never
//! silently ignored.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};

/// A parsed device URI: `scheme://authority/path?key=value&…`, percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUri {
    text: String,
    /// The scheme, lower-cased (`file`, `mem`, `nbd`, `nbd+unix`, …).
    pub scheme: String,
    /// The authority (host, host:port or a name); empty for `file:///…`.
    pub authority: String,
    /// The path, starting with `/` when present.
    pub path: String,
    query: Vec<(String, String)>,
}

impl DeviceUri {
    /// Parse `text`.
    pub fn parse(text: &str) -> Result<DeviceUri> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("parse device URI {text:?}: {why}"),
            )
        };
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://…, e.g. file:///var/lib/disk.img?size=1G"))?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(bad(
                "the scheme is empty or has characters other than letters, digits, + - .",
            ));
        }
        let (rest, query_text) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') || query_text.is_some_and(|q| q.contains('#')) {
            return Err(bad("fragments (#…) are not allowed"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let mut query = Vec::new();
        for pair in query_text
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_decode(k).map_err(|e| bad(&e))?;
            let v = percent_decode(v).map_err(|e| bad(&e))?;
            if query.iter().any(|(seen, _)| *seen == k) {
                return Err(bad(&format!("query key {k:?} appears twice")));
            }
            query.push((k, v));
        }
        Ok(DeviceUri {
            text: text.to_string(),
            scheme: scheme.to_ascii_lowercase(),
            authority: percent_decode(authority).map_err(|e| bad(&e))?,
            path: percent_decode(path).map_err(|e| bad(&e))?,
            query,
        })
    }

    /// The URI as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Remove and return the value of query key `key`.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let i = self.query.iter().position(|(k, _)| k == key)?;
        Some(self.query.remove(i).1)
    }

    /// Remove `key` and parse it as a size (`4096`, `64K`, `512MiB`, `1G`, `2T`; binary units).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>> {
        self.take(key)
            .map(|v| parse_size(&v).map_err(|why| self.invalid(&format!("{key}={v:?}: {why}"))))
            .transpose()
    }

    /// Remove `key` and parse it as a boolean (`true/false`, `1/0`, `yes/no`, `on/off`; a bare key is true).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.take(key)
            .map(|v| match v.to_ascii_lowercase().as_str() {
                "" | "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(self.invalid(&format!("{key}={v:?}: expected true or false"))),
            })
            .transpose()
    }

    /// Remove `key` and parse it as a number of seconds (`30`, `2.5`) above 0, or also 0 when
    /// `zero_ok` (a limit of 0 meaning none, for instance).
    pub fn take_secs(&mut self, key: &str, zero_ok: bool) -> Result<Option<Duration>> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        parse_secs(&v, zero_ok).map(Some).ok_or_else(|| {
            self.invalid(&format!(
                "{key}={v:?}: expected a number of seconds{}",
                if zero_ok { "" } else { " above 0" }
            ))
        })
    }

    /// Fail if any query key was not taken; `known` lists the keys the backend accepts.
    pub fn finish(&self, known: &[&str]) -> Result<()> {
        match self.query.first() {
            None => Ok(()),
            Some((k, _)) => Err(self.invalid(&format!(
                "unknown option {k:?} (this scheme accepts: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))),
        }
    }

    /// An [`ErrorKind::InvalidInput`] error about this URI.
    pub fn invalid(&self, why: &str) -> Error {
        Error::new(
            ErrorKind::InvalidInput,
            format!("device URI {}: {why}", self.text),
        )
    }
}

impl fmt::Display for DeviceUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes do not form UTF-8".to_string())
}

/// A number of seconds as a URI writes it (`30`, `2.5`): above 0, or also 0 when `zero_ok`.
pub fn parse_secs(text: &str, zero_ok: bool) -> Option<Duration> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 || (zero_ok && *s == 0.0))
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// `host:port` for a TCP connection from a URI authority: `HOST`, `HOST:PORT`, `[IPV6]` or
/// `[IPV6]:PORT`, the port `default_port` when it is missing. An IPv6 address must be written in
/// brackets (`ipv6_example` shows how, in the message). A missing host is `localhost`, or the
/// error `missing_host` when that is given.
pub fn tcp_address(
    authority: &str,
    default_port: u16,
    ipv6_example: &str,
    missing_host: Option<&str>,
) -> std::result::Result<String, String> {
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
                return Err(format!(
                    "write IPv6 addresses in brackets, e.g. {ipv6_example}"
                ))
            }
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let host = match (host.as_str(), missing_host) {
        ("" | "[]", Some(why)) => return Err(why.to_string()),
        ("", None) => "localhost".to_string(),
        _ => host,
    };
    let port = match port {
        None | Some("") => default_port,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("port {p:?} is not a number from 0 to 65535"))?,
    };
    Ok(format!("{host}:{port}"))
}

/// Parse a size: a number with an optional binary unit (K, M, G, T, P; optionally followed by
/// `iB` or `B`), e.g. `4096`, `64K`, `512MiB`, `1G`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 4096, 64K or 1G"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        other => return Err(format!("unknown size unit {other:?} (use K, M, G, T or P)")),
    };
    num.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} does not fit in 64 bits"))
}

/// Opens devices of one URI scheme.
#[async_trait]
pub trait Opener: Send + Sync {
    /// Open the device `uri` names; take its query keys and call [`DeviceUri::finish`].
    async fn open(&self, uri: DeviceUri) -> Result<Arc<dyn BlockDevice>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let u = DeviceUri::parse("file:///var/lib/a%20b.img?size=1G&direct=1").unwrap();
        assert_eq!(u.scheme, "file");
        assert_eq!(u.authority, "");
        assert_eq!(u.path, "/var/lib/a b.img");
        let mut u2 = u.clone();
        assert_eq!(u2.take_size("size").unwrap(), Some(1 << 30));
        assert_eq!(u2.take_bool("direct").unwrap(), Some(true));
        assert!(u2.finish(&["size", "direct"]).is_ok());

        let u = DeviceUri::parse("nbd+unix:///exp?socket=/run/s.sock").unwrap();
        assert_eq!(u.scheme, "nbd+unix");
        assert_eq!(u.path, "/exp");

        let u = DeviceUri::parse("nbd://127.0.0.1:10809/demo").unwrap();
        assert_eq!(u.authority, "127.0.0.1:10809");
        assert_eq!(u.path, "/demo");
    }

    #[test]
    fn unknown_and_bad_keys_are_errors() {
        let u = DeviceUri::parse("mem://x?size=1M&sise=2").unwrap();
        let mut u2 = u.clone();
        u2.take("size");
        let e = u2.finish(&["size"]).unwrap_err();
        assert!(e.to_string().contains("unknown option \"sise\""), "{e}");
        assert!(DeviceUri::parse("mem://x?size=1&size=2").is_err());
        assert!(DeviceUri::parse("/just/a/path").is_err());
        assert!(DeviceUri::parse("file:///x%zz").is_err());
        let mut u = DeviceUri::parse("mem://x?size=12Q").unwrap();
        assert!(u
            .take_size("size")
            .unwrap_err()
            .to_string()
            .contains("unit"));
    }

    #[test]
    fn seconds() {
        let mut u = DeviceUri::parse("nbd://h/e?timeout=2.5&kato=0&t=0&x=soon").unwrap();
        assert_eq!(
            u.take_secs("timeout", false).unwrap(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(u.take_secs("kato", true).unwrap(), Some(Duration::ZERO));
        let e = u.take_secs("t", false).unwrap_err().to_string();
        assert!(
            e.contains("t=\"0\": expected a number of seconds above 0"),
            "{e}"
        );
        let e = u.take_secs("x", true).unwrap_err().to_string();
        assert!(
            e.ends_with("x=\"soon\": expected a number of seconds"),
            "{e}"
        );
        assert_eq!(u.take_secs("absent", false).unwrap(), None);
        assert_eq!(parse_secs(" 3 ", false), Some(Duration::from_secs(3)));
        assert_eq!(parse_secs("-1", true), None);
        assert_eq!(parse_secs("1e300", false), None);
    }

    #[test]
    fn tcp_addresses() {
        let nbd = |a: &str| tcp_address(a, 10809, "nbd://[::1]:10809/EXPORT", None);
        assert_eq!(nbd("").unwrap(), "localhost:10809");
        assert_eq!(nbd("h").unwrap(), "h:10809");
        assert_eq!(nbd("h:99").unwrap(), "h:99");
        assert_eq!(nbd("h:").unwrap(), "h:10809");
        assert_eq!(nbd(":7").unwrap(), "localhost:7");
        assert_eq!(nbd("[::1]").unwrap(), "[::1]:10809");
        assert_eq!(nbd("[::1]:7").unwrap(), "[::1]:7");
        assert!(nbd("::1")
            .unwrap_err()
            .contains("e.g. nbd://[::1]:10809/EXPORT"));
        assert!(nbd("h:99999").unwrap_err().contains("port \"99999\""));
        assert!(nbd("[::1").unwrap_err().contains("closing ]"));
        assert!(nbd("[::1]x").unwrap_err().contains(":PORT"));
        let need = |a: &str| tcp_address(a, 4420, "nvmf://[::1]:4420/NQN", Some("no host"));
        assert_eq!(need("h").unwrap(), "h:4420");
        for missing in ["", ":4420", "[]", "[]:1", ":99999"] {
            assert_eq!(need(missing).unwrap_err(), "no host", "{missing}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999P").is_err());
    }
}
