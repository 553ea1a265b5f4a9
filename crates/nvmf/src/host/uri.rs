//! `nvmf://HOST[:PORT]/NQN` URIs: what they name and the options their query keys set.

use std::sync::Arc;

use async_trait::async_trait;
use strata_bdev::{tcp_address, BlockDevice, DeviceUri, Opener, Result};

use super::{HostOptions, NvmfDevice};
use crate::codec::DEFAULT_PORT;
use crate::target::format_uuid;

/// The query keys `nvmf://` URIs take.
const KEYS: &[&str] = &[
    "nsid",
    "hostnqn",
    "hostid",
    "hdgst",
    "ddgst",
    "timeout",
    "connect_timeout",
    "reconnect_timeout",
    "kato",
    "queues",
    "queue_size",
];

/// Opens `nvmf://HOST[:PORT]/NQN` (port 4420 by default; IPv6 addresses in brackets).
/// Query keys: `nsid=N` (default 1), `hostnqn=`, `hostid=UUID`, `hdgst=true`, `ddgst=true`,
/// `timeout=SECONDS` (per call), `connect_timeout=SECONDS`, `reconnect_timeout=SECONDS` (how
/// long I/O waits for a lost target), `kato=SECONDS` (keep-alive timeout, 0: none),
/// `queues=N`, `queue_size=N`.
#[derive(Debug, Clone, Default)]
pub struct NvmfOpener {
    options: HostOptions,
}

impl NvmfOpener {
    /// An opener whose devices start from `options` (URI keys override them).
    pub fn new(options: HostOptions) -> NvmfOpener {
        NvmfOpener { options }
    }

    /// The address, subsystem NQN and options `uri` names, consuming its query keys.
    pub fn parse(&self, uri: &mut DeviceUri) -> Result<(String, String, HostOptions)> {
        if uri.scheme != "nvmf" {
            return Err(uri.invalid(&format!(
                "the NVMe/TCP host opens nvmf:// URIs, not {}://",
                uri.scheme
            )));
        }
        let addr = tcp_address(
            &uri.authority,
            DEFAULT_PORT,
            "nvmf://[::1]:4420/NQN",
            Some("the host is missing: nvmf://HOST[:PORT]/NQN"),
        )
        .map_err(|why| uri.invalid(&why))?;
        let nqn = uri.path.strip_prefix('/').unwrap_or(&uri.path).to_string();
        if nqn.is_empty() {
            return Err(uri.invalid(
                "the subsystem NQN is missing: nvmf://HOST[:PORT]/NQN, e.g. nvmf://10.0.0.2/nqn.2026-12.io.strata:vol",
            ));
        }
        let mut o = self.options.clone();
        if let Some(v) = uri.take("nsid") {
            o.nsid = v
                .parse::<u32>()
                .ok()
                .filter(|&n| n != 0 && n != u32::MAX)
                .ok_or_else(|| {
                    uri.invalid(&format!("nsid={v:?}: expected a namespace ID from 1"))
                })?;
        }
        if let Some(v) = uri.take("hostid") {
            o.hostid = parse_uuid(&v)
                .ok_or_else(|| uri.invalid(&format!("hostid={v:?}: expected a UUID")))?;
            o.hostnqn = format!("nqn.2014-08.org.nvmexpress:uuid:{}", format_uuid(&o.hostid));
        }
        if let Some(v) = uri.take("hostnqn") {
            if v.is_empty() || v.len() > crate::codec::MAX_NQN_LEN {
                return Err(uri.invalid(&format!("hostnqn={v:?}: 1 to 223 bytes expected")));
            }
            o.hostnqn = v;
        }
        if let Some(b) = uri.take_bool("hdgst")? {
            o.header_digest = b;
        }
        if let Some(b) = uri.take_bool("ddgst")? {
            o.data_digest = b;
        }
        if let Some(t) = uri.take_secs("timeout", false)? {
            o.timeout = Some(t);
        }
        if let Some(t) = uri.take_secs("connect_timeout", false)? {
            o.connect_timeout = t;
        }
        if let Some(t) = uri.take_secs("reconnect_timeout", true)? {
            o.reconnect_timeout = t;
        }
        if let Some(t) = uri.take_secs("kato", true)? {
            o.keep_alive = t;
        }
        if let Some(v) = uri.take("queues") {
            o.queues = v
                .parse::<u16>()
                .ok()
                .filter(|&n| (1..=1024).contains(&n))
                .ok_or_else(|| uri.invalid(&format!("queues={v:?}: expected 1 to 1024")))?;
        }
        if let Some(v) = uri.take("queue_size") {
            o.queue_size =
                v.parse::<u16>().ok().filter(|&n| n >= 2).ok_or_else(|| {
                    uri.invalid(&format!("queue_size={v:?}: expected 2 to 65535"))
                })?;
        }
        uri.finish(KEYS)?;
        Ok((addr, nqn, o))
    }
}

#[async_trait]
impl Opener for NvmfOpener {
    async fn open(&self, mut uri: DeviceUri) -> Result<Arc<dyn BlockDevice>> {
        let (addr, nqn, opts) = self.parse(&mut uri)?;
        Ok(Arc::new(NvmfDevice::connect(&addr, &nqn, opts).await?))
    }
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    #[test]
    fn uris() {
        let o = NvmfOpener::default();
        let mut u = DeviceUri::parse(
            "nvmf://10.0.0.2/nqn.2026-12.io.strata:vol?nsid=2&hdgst=true&ddgst=1&timeout=3&queues=4&kato=0",
        )
        .expect("parse");
        let (addr, nqn, opts) = o.parse(&mut u).expect("valid");
        assert_eq!(addr, "10.0.0.2:4420");
        assert_eq!(nqn, "nqn.2026-12.io.strata:vol");
        assert_eq!(opts.nsid, 2);
        assert!(opts.header_digest && opts.data_digest);
        assert_eq!(opts.timeout, Some(Duration::from_secs(3)));
        assert_eq!(opts.queues, 4);
        assert!(opts.keep_alive.is_zero());

        let mut u = DeviceUri::parse("nvmf://[::1]:4421/n?hostnqn=nqn.x:h").expect("parse");
        let (addr, _, opts) = o.parse(&mut u).expect("valid");
        assert_eq!(addr, "[::1]:4421");
        assert_eq!(opts.hostnqn, "nqn.x:h");

        for bad in [
            "nvmf://h/n?nsid=0",
            "nvmf://h/n?speed=9",
            "nvmf://h/",
            "nvmf://h:99999/n",
            "nvmf://::1/n",
            "nvmf:///n",
            "nvmf://h/n?timeout=0",
            "nvmf://h/n?hostid=xyz",
        ] {
            let mut u = DeviceUri::parse(bad).expect("parse");
            assert!(o.parse(&mut u).is_err(), "{bad} is refused");
        }
        let mut u = DeviceUri::parse("nvmf://h/n?speed=9").expect("parse");
        let e = o.parse(&mut u).expect_err("unknown key");
        assert!(e.to_string().contains("unknown option \"speed\""), "{e}");
    }

    #[test]
    fn host_ids() {
        let o = HostOptions::default();
        assert!(o.hostnqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));
        assert_eq!(
            o.hostid,
            HostOptions::default().hostid,
            "one host ID per process"
        );
        assert_eq!(parse_uuid(&format_uuid(&o.hostid)), Some(o.hostid));
    }
}
