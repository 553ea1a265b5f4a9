//! Pure mappings between CSI's shapes and Strata's (no I/O): names and IDs, StorageClass
//! parameters, capacity ranges, access modes, list tokens. Unit-tested here.
//!
//! | CSI | Strata |
//! | --- | --- |
//! | volume name (≤ 128 bytes, any characters) | volume name ([`volume_id`]): the name itself when it is a valid Strata name, else a readable prefix and a hash; the CSI name is kept in the label [`LABEL_NAME`] |
//! | volume ID | the Strata volume name |
//! | snapshot ID | `STORE/IMAGE@SNAPSHOT`, a page-store snapshot |
//! | group snapshot ID | `group.NAME`: every member is a snapshot of that name |

use std::collections::{BTreeMap, HashMap};

use tonic::Status;

use crate::csi;

/// The label holding a CSI volume's name: volumes without it are not the driver's.
pub const LABEL_NAME: &str = "csi.strata.io/name";
/// The label holding what a volume was created from (`snapshot:ID` or `volume:ID`).
pub const LABEL_SOURCE: &str = "csi.strata.io/source";
/// The label naming the hidden snapshot a volume cloned from a volume reads through.
pub const LABEL_CLONE_BASE: &str = "csi.strata.io/clone-base";
/// Prefix of the labels recording where a volume is published: `PREFIX + node` = `rw` | `ro`.
pub const LABEL_PUBLISHED: &str = "publish.csi.strata.io/";
/// The topology key of a node.
pub const TOPOLOGY_NODE: &str = "topology.strata.io/node";
/// Snapshots taken to clone a volume from a volume start with this; they are not listed.
pub const CLONE_SNAPSHOT_PREFIX: &str = "clone.";
/// Snapshots of a group snapshot are named `group.NAME` (the group's ID).
pub const GROUP_PREFIX: &str = "group.";

/// The default size of a volume whose request names none.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Sizes are rounded up to whole pages of this.
pub const ALIGN: u64 = 4096;

/// Whether `s` is usable as a Strata name of at most `max` bytes as it is.
fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A hex digest of `s` (the first 8 bytes of its SHA-256).
fn digest(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A Strata name of at most `max` bytes for the CSI name `name`: the name itself when valid,
/// else its valid characters (to stay readable) and a digest of the whole name.
fn strata_name(name: &str, max: usize) -> String {
    if valid_name(name, max) {
        return name.to_string();
    }
    let readable: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(max - 17)
        .collect();
    let readable = readable.trim_start_matches('.');
    format!("{readable}-{}", digest(name))
}

/// The Strata volume name (the CSI volume ID) for the CSI volume name `name`.
pub fn volume_id(name: &str) -> String {
    strata_name(name, 64)
}

/// The page-store snapshot name for the CSI snapshot name `name`.
pub fn snapshot_name(name: &str) -> String {
    strata_name(name, 180)
}

/// The group snapshot ID (and the name of each member snapshot) for a CSI group name.
pub fn group_id(name: &str) -> String {
    format!("{GROUP_PREFIX}{}", strata_name(name, 180))
}

/// A snapshot ID.
pub fn snapshot_id(image: &str, snapshot: &str) -> String {
    format!("{image}@{snapshot}")
}

/// `(STORE/IMAGE, SNAPSHOT)` of a snapshot ID, if it is one.
pub fn parse_snapshot_id(id: &str) -> Option<(String, String)> {
    let (image, snap) = id.rsplit_once('@')?;
    let (store, name) = image.split_once('/')?;
    (valid_name(store, 200) && valid_name(name, 200) && valid_name(snap, 200))
        .then(|| (image.to_string(), snap.to_string()))
}

/// How a volume is protected and exported, from StorageClass parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Replica files the daemon places (nexus volumes); 1 for image volumes.
    pub replicas: u32,
    /// A page-store image volume in this store.
    pub store: Option<String>,
    /// The export protocol's name (`nbd`, `nvmf`).
    pub protocol: String,
    /// Sparse (true) or preallocated replica files.
    pub thin: bool,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            replicas: 1,
            store: None,
            protocol: "nbd".into(),
            thin: true,
        }
    }
}

/// Keys the external provisioner adds for its own use.
fn reserved(key: &str) -> bool {
    key.starts_with("csi.storage.k8s.io/")
}

fn parse_replicas(v: &str) -> Result<u32, Status> {
    v.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=16).contains(n))
        .ok_or_else(|| {
            Status::invalid_argument(format!("parameter replicas={v:?}: expected 1 to 16"))
        })
}

fn parse_bool(key: &str, v: &str) -> Result<bool, Status> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(Status::invalid_argument(format!(
            "parameter {key}={v:?}: expected true or false"
        ))),
    }
}

impl Params {
    /// Parse StorageClass `parameters`, then `mutable` (VolumeAttributesClass) parameters, which
    /// may only set [`MUTABLE`] keys. Unknown keys are an error.
    pub fn parse(
        parameters: &HashMap<String, String>,
        mutable: &HashMap<String, String>,
    ) -> Result<Params, Status> {
        let mut p = Params::default();
        for (k, v) in parameters {
            match k.as_str() {
                "replicas" => p.replicas = parse_replicas(v)?,
                "store" => {
                    if !valid_name(v, 64) {
                        return Err(Status::invalid_argument(format!(
                            "parameter store={v:?}: not a store name"
                        )));
                    }
                    p.store = Some(v.clone());
                }
                "protocol" => {
                    let v = v.trim().to_ascii_lowercase();
                    if !["nbd", "nvmf"].contains(&v.as_str()) {
                        return Err(Status::invalid_argument(format!(
                            "parameter protocol={v:?}: expected nbd or nvmf"
                        )));
                    }
                    p.protocol = v;
                }
                "thin" => p.thin = parse_bool(k, v)?,
                k if reserved(k) => {}
                k => {
                    return Err(Status::invalid_argument(format!(
                        "unknown parameter {k:?} (known: replicas, store, protocol, thin)"
                    )))
                }
            }
        }
        p.apply_mutable(mutable)?;
        if p.store.is_some() && p.replicas > 1 {
            return Err(Status::invalid_argument(
                "parameters: a page-store volume (store) keeps its data in the object store; \
                 replicas > 1 applies to replicated volumes only",
            ));
        }
        if p.store.is_some() && !p.thin {
            return Err(Status::invalid_argument(
                "parameters: page-store volumes are always thin (thin=false applies to \
                 replicated volumes)",
            ));
        }
        Ok(p)
    }

    /// Apply mutable parameters.
    pub fn apply_mutable(&mut self, mutable: &HashMap<String, String>) -> Result<(), Status> {
        for (k, v) in mutable {
            match k.as_str() {
                "replicas" => self.replicas = parse_replicas(v)?,
                k => {
                    return Err(Status::invalid_argument(format!(
                        "mutable parameter {k:?} is not supported (mutable: {})",
                        MUTABLE.join(", ")
                    )))
                }
            }
        }
        Ok(())
    }
}

/// The parameters a VolumeAttributesClass may change.
pub const MUTABLE: &[&str] = &["replicas"];

/// The size to create for a capacity range: the required bytes rounded up to [`ALIGN`] (the
/// default size, within the limit, when none is required).
pub fn size_for(range: Option<&csi::CapacityRange>) -> Result<u64, Status> {
    let (required, limit) = match range {
        Some(r) => (r.required_bytes, r.limit_bytes),
        None => (0, 0),
    };
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: bytes cannot be negative",
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(Status::invalid_argument(format!(
            "capacity_range: required_bytes {required} is above limit_bytes {limit}"
        )));
    }
    let size = if required == 0 {
        if limit > 0 {
            DEFAULT_SIZE.min(limit / ALIGN * ALIGN)
        } else {
            DEFAULT_SIZE
        }
    } else {
        required.div_ceil(ALIGN) * ALIGN
    };
    if size == 0 || (limit > 0 && size > limit) {
        return Err(Status::out_of_range(format!(
            "capacity_range: no size in whole {ALIGN}-byte pages fits between {required} and \
             {limit} bytes"
        )));
    }
    Ok(size)
}

/// Whether `size` satisfies `range`.
pub fn fits(size: u64, range: Option<&csi::CapacityRange>) -> bool {
    let Some(r) = range else { return true };
    (r.required_bytes <= 0 || size >= r.required_bytes as u64)
        && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64)
}

/// The access modes this driver serves.
pub fn mode_supported(mode: i32) -> bool {
    use csi::volume_capability::access_mode::Mode;
    matches!(
        Mode::try_from(mode),
        Ok(Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
            | Mode::MultiNodeReaderOnly)
    )
}

/// File systems the node formats and mounts.
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];

/// Check that a capability is complete and supported; the reason when it is not.
pub fn check_capability(c: &csi::VolumeCapability) -> Result<(), String> {
    use csi::volume_capability::AccessType;
    let Some(mode) = &c.access_mode else {
        return Err("a volume capability needs an access mode".into());
    };
    if !mode_supported(mode.mode) {
        return Err(format!(
            "access mode {:?} is not supported (single-node modes, and multi-node read-only)",
            csi::volume_capability::access_mode::Mode::try_from(mode.mode)
                .map_or("unknown", |m| m.as_str_name())
        ));
    }
    match &c.access_type {
        None => Err("a volume capability needs an access type (block or mount)".into()),
        Some(AccessType::Block(_)) => Ok(()),
        Some(AccessType::Mount(m)) => {
            if m.fs_type.is_empty() || FS_TYPES.contains(&m.fs_type.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "file system {:?} is not supported ({})",
                    m.fs_type,
                    FS_TYPES.join(", ")
                ))
            }
        }
    }
}

/// Check a list of capabilities: not empty, each complete and supported.
pub fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    for c in caps {
        check_capability(c).map_err(Status::invalid_argument)?;
    }
    Ok(())
}

/// Whether a capability is read-only by its access mode.
pub fn read_only_mode(c: &csi::VolumeCapability) -> bool {
    use csi::volume_capability::access_mode::Mode;
    c.access_mode.as_ref().is_some_and(|m| {
        matches!(
            Mode::try_from(m.mode),
            Ok(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
        )
    })
}

/// A list token: `PREFIX:LAST` — the last entry of the previous page.
pub fn token(prefix: &str, last: &str) -> String {
    format!("{prefix}:{last}")
}

/// The last entry of the previous page from a token (`None` for no token); ABORTED for a token
/// this driver did not make.
pub fn parse_token<'a>(prefix: &str, token: &'a str) -> Result<Option<&'a str>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    match token.split_once(':') {
        Some((p, last)) if p == prefix && !last.is_empty() => Ok(Some(last)),
        _ => Err(Status::aborted(format!(
            "starting_token {token:?} is not a token this driver handed out"
        ))),
    }
}

/// One page of `items` (sorted by `key`) after `after`, at most `max` (0: all); the token of
/// the next page.
pub fn page<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> &str,
    prefix: &str,
    after: Option<&str>,
    max: i32,
) -> Result<(Vec<T>, String), Status> {
    if max < 0 {
        return Err(Status::invalid_argument("max_entries cannot be negative"));
    }
    let rest: Vec<T> = items
        .into_iter()
        .filter(|i| after.is_none_or(|a| key(i) > a))
        .collect();
    let max = if max == 0 { rest.len() } else { max as usize };
    let more = rest.len() > max;
    let page: Vec<T> = rest.into_iter().take(max).collect();
    let next = match page.last() {
        Some(last) if more => token(prefix, key(last)),
        _ => String::new(),
    };
    Ok((page, next))
}

/// The published-node labels of a volume: `node → read_only`.
pub fn published(labels: &HashMap<String, String>) -> BTreeMap<String, bool> {
    labels
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(LABEL_PUBLISHED)?.to_string(), v == "ro")))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_map_to_valid_strata_names_stably() {
        assert_eq!(volume_id("pvc-1234"), "pvc-1234");
        let long = "a".repeat(128);
        let id = volume_id(&long);
        assert!(id.len() <= 64 && valid_name(&id, 64), "{id}");
        assert_eq!(id, volume_id(&long));
        assert_ne!(volume_id(&"a".repeat(127)), id);
        let odd = volume_id("ns/my claim");
        assert!(
            valid_name(&odd, 64) && odd.starts_with("ns-my-claim-"),
            "{odd}"
        );
        assert!(valid_name(&volume_id(".hidden"), 64));
        let s = snapshot_name(&"s".repeat(128));
        assert_eq!(s.len(), 128);
        assert_eq!(
            parse_snapshot_id(&snapshot_id("local/v", "s1")),
            Some(("local/v".into(), "s1".into()))
        );
        assert_eq!(parse_snapshot_id("reallyfakesnapshotid"), None);
        assert!(group_id("g").starts_with(GROUP_PREFIX));
    }

    #[test]
    fn parameters_are_checked() {
        let m = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let none = HashMap::new();
        assert_eq!(Params::parse(&none, &none).unwrap(), Params::default());
        let p = Params::parse(
            &m(&[
                ("replicas", "3"),
                ("thin", "false"),
                ("csi.storage.k8s.io/pvc/name", "x"),
            ]),
            &none,
        )
        .unwrap();
        assert_eq!((p.replicas, p.thin), (3, false));
        assert!(Params::parse(&m(&[("store", "local"), ("replicas", "2")]), &none).is_err());
        assert!(Params::parse(&m(&[("bogus", "1")]), &none).is_err());
        assert!(Params::parse(&m(&[("protocol", "iscsi")]), &none).is_err());
        let p = Params::parse(&m(&[("replicas", "1")]), &m(&[("replicas", "2")])).unwrap();
        assert_eq!(p.replicas, 2);
        assert!(Params::parse(&none, &m(&[("XXX_FakeKey", "v")])).is_err());
    }

    #[test]
    fn capacity_ranges() {
        let r = |req, lim| csi::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&r(1, 0))).unwrap(), 4096);
        assert_eq!(size_for(Some(&r(8192, 8192))).unwrap(), 8192);
        assert_eq!(size_for(Some(&r(0, 1 << 20))).unwrap(), 1 << 20);
        assert_eq!(
            size_for(Some(&r(100, 200))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert!(size_for(Some(&r(10, 5))).is_err());
        assert!(fits(8192, Some(&r(8192, 0))));
        assert!(!fits(4096, Some(&r(8192, 0))));
    }

    #[test]
    fn pages_and_tokens() {
        let items: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let (p, next) = page(items.clone(), |s| s, "v", None, 2).unwrap();
        assert_eq!(p, ["a", "b"]);
        let after = parse_token("v", &next).unwrap();
        let (p, next) = page(items.clone(), |s| s, "v", after, 0).unwrap();
        assert_eq!((p, next.as_str()), (vec!["c".to_string()], ""));
        assert_eq!(
            parse_token("v", "invalid-token").unwrap_err().code(),
            tonic::Code::Aborted
        );
    }
}
