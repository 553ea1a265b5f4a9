//! Declarations: the one shape of a volume. The configuration file, specs and the gRPC API each
//! convert their own shape into a [`VolumeDecl`] once, at the edge; the manager opens, compares,
//! stores and reconciles nothing else. The state store keeps it as JSON (`volumes/NAME`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use strata_bdev::DeviceUri;
use strata_nexus::NexusSettings;

use super::{OpError, OpResult};
pub use crate::daemon::exports::Protocol;

/// Sizes are multiples of this.
pub const SECTOR: u64 = 512;

/// The page size of an image when none is given.
pub const DEFAULT_PAGE_SIZE: u32 = 4096;

/// A page-store image: `STORE/IMAGE`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageKey {
    pub store: String,
    pub image: String,
}

impl ImageKey {
    /// Parse and check `STORE/IMAGE`.
    pub fn parse(s: &str) -> OpResult<ImageKey> {
        let ok = s.split_once('/').filter(|(store, image)| {
            strata_pagestore::check_name(store).is_ok()
                && strata_pagestore::check_name(image).is_ok()
        });
        match ok {
            Some((store, image)) => Ok(ImageKey {
                store: store.to_string(),
                image: image.to_string(),
            }),
            None => Err(OpError::invalid(format!(
                "{s:?} is not STORE/IMAGE (names of letters, digits, - _ .)"
            ))),
        }
    }
}

impl fmt::Display for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.store, self.image)
    }
}

impl TryFrom<String> for ImageKey {
    type Error = String;
    fn try_from(s: String) -> Result<ImageKey, String> {
        ImageKey::parse(&s).map_err(|e| e.message)
    }
}

impl From<ImageKey> for String {
    fn from(k: ImageKey) -> String {
        k.to_string()
    }
}

/// A page-store image volume: which image, and the page size it is created with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ImageWire")]
pub struct ImageDecl {
    pub key: ImageKey,
    pub page_size: u32,
}

/// An image as the state store has kept it: `"STORE/IMAGE"`, or with its page size.
#[derive(Deserialize)]
#[serde(untagged)]
enum ImageWire {
    Key(ImageKey),
    Full { key: ImageKey, page_size: u32 },
}

impl From<ImageWire> for ImageDecl {
    fn from(w: ImageWire) -> ImageDecl {
        match w {
            ImageWire::Key(key) => ImageDecl {
                key,
                page_size: DEFAULT_PAGE_SIZE,
            },
            ImageWire::Full { key, page_size } => ImageDecl { key, page_size },
        }
    }
}

/// A nexus volume: its replicas and how it mirrors onto them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "NexusWire")]
pub struct NexusDecl {
    /// Device URIs; every write goes to each.
    pub replicas: Vec<String>,
    pub settings: NexusSettings,
    /// The daemon places the replicas (files in its pools), owns them, and deletes them with
    /// the volume; `replicas` is empty until they are placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed: Option<Placed>,
}

/// Replicas the daemon places (`placement.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// How many.
    pub count: u32,
    /// Files get every block allocated up front (else sparse).
    #[serde(default)]
    pub preallocate: bool,
}

/// The most replicas the daemon places for one volume.
pub const MAX_PLACED: u32 = 16;

/// A nexus as the state store has kept it: a list of replicas, or with its settings.
#[derive(Deserialize)]
#[serde(untagged)]
enum NexusWire {
    Replicas(Vec<String>),
    Full {
        replicas: Vec<String>,
        #[serde(default)]
        settings: NexusSettings,
        #[serde(default)]
        placed: Option<Placed>,
    },
}

impl From<NexusWire> for NexusDecl {
    fn from(w: NexusWire) -> NexusDecl {
        match w {
            NexusWire::Replicas(replicas) => NexusDecl {
                replicas,
                settings: NexusSettings::default(),
                placed: None,
            },
            NexusWire::Full {
                replicas,
                settings,
                placed,
            } => NexusDecl {
                replicas,
                settings,
                placed,
            },
        }
    }
}

/// What a volume is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// One device URI.
    Device(String),
    /// A mirror over replicas.
    Nexus(NexusDecl),
    /// A page-store image.
    Image(ImageDecl),
}

/// A volume as declared: what is opened, stored, compared and exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "VolumeWire")]
pub struct VolumeDecl {
    pub name: String,
    /// Bytes: what missing devices and images are created with, and the least existing ones
    /// must hold; 0 takes the size of existing devices.
    pub size: u64,
    pub backing: Backing,
    /// The protocols it is exported over (none: not exported).
    pub exports: BTreeSet<Protocol>,
    pub read_only: bool,
    pub description: String,
    /// The node that serves it (its `[api] node_name`); empty means the node that stored it.
    pub node: String,
    /// NVMe/TCP: host NQNs allowed to connect (empty: any host).
    pub nvmf_hosts: Vec<String>,
    /// What other programs keep about it (the CSI driver: its name, where it is published).
    pub labels: BTreeMap<String, String>,
}

/// A volume as the state store keeps it; records written before exports had protocols say
/// `export: true|false`.
#[derive(Deserialize)]
struct VolumeWire {
    name: String,
    #[serde(default)]
    size: u64,
    backing: Backing,
    #[serde(default)]
    exports: Option<BTreeSet<Protocol>>,
    #[serde(default)]
    export: Option<bool>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    description: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    nvmf_hosts: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl From<VolumeWire> for VolumeDecl {
    fn from(w: VolumeWire) -> VolumeDecl {
        let exports = match (w.exports, w.export) {
            (Some(e), _) => e,
            (None, Some(false)) => BTreeSet::new(),
            (None, _) => [Protocol::Nbd].into(),
        };
        VolumeDecl {
            name: w.name,
            size: w.size,
            backing: w.backing,
            exports,
            read_only: w.read_only,
            description: w.description,
            node: w.node,
            nvmf_hosts: w.nvmf_hosts,
            labels: w.labels,
        }
    }
}

/// The most labels a volume has.
pub const MAX_LABELS: usize = 64;

/// Check a label: a key of 1 to 253 letters, digits, `. _ - /`, a value of at most 1024 bytes.
pub fn check_label(key: &str, value: &str) -> OpResult<()> {
    if key.is_empty()
        || key.len() > 253
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
    {
        return Err(OpError::invalid(format!(
            "label {key:?}: a key is 1 to 253 letters, digits, . _ - /"
        )));
    }
    if value.len() > 1024 {
        return Err(OpError::invalid(format!(
            "label {key:?}: its value is longer than 1024 bytes"
        )));
    }
    Ok(())
}

/// Check a volume name: it is an export name, a file name and a state-store key.
pub fn check_volume_name(name: &str) -> OpResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        || name.starts_with('.')
    {
        return Err(OpError::invalid(format!(
            "volume name {name:?}: use 1 to 64 letters, digits, . _ - (not starting with .)"
        )));
    }
    Ok(())
}

impl VolumeDecl {
    /// A volume over one device, exported over the default protocols.
    pub fn device(name: &str, uri: &str) -> VolumeDecl {
        VolumeDecl {
            name: name.to_string(),
            size: 0,
            backing: Backing::Device(uri.to_string()),
            exports: Protocol::defaults(),
            read_only: false,
            description: String::new(),
            node: String::new(),
            nvmf_hosts: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    /// Check everything that can be checked without opening anything; `path` prefixes field
    /// names in messages (`volumes[2].`).
    pub fn validate(&self, path: &str) -> OpResult<()> {
        check_volume_name(&self.name).map_err(|e| OpError::invalid(format!("{path}name: {e}")))?;
        if !self.size.is_multiple_of(SECTOR) {
            return Err(OpError::invalid(format!(
                "{path}size: {} is not a multiple of the {SECTOR}-byte block size",
                self.size
            )));
        }
        match &self.backing {
            Backing::Device(uri) => check_uri(&format!("{path}device"), uri)?,
            Backing::Nexus(n) if n.placed.is_some() && n.replicas.is_empty() => {
                let count = n.placed.map_or(0, |p| p.count);
                if !(1..=MAX_PLACED).contains(&count) {
                    return Err(OpError::invalid(format!(
                        "{path}replica_count: {count} is not from 1 to {MAX_PLACED}"
                    )));
                }
                if self.size == 0 {
                    return Err(OpError::invalid(format!(
                        "{path}size: replicas the daemon places need a size"
                    )));
                }
                n.settings
                    .validate()
                    .map_err(|e| OpError::invalid(format!("{path}{e}")))?;
            }
            Backing::Nexus(n) => {
                if n.replicas.is_empty() {
                    return Err(OpError::invalid(format!(
                        "{path}replicas: a nexus volume needs at least one replica"
                    )));
                }
                for (i, r) in n.replicas.iter().enumerate() {
                    check_uri(&format!("{path}replicas[{i}]"), r)?;
                    if n.replicas[..i].contains(r) {
                        return Err(OpError::invalid(format!(
                            "{path}replicas[{i}]: {r:?} is listed twice"
                        )));
                    }
                }
                n.settings
                    .validate()
                    .map_err(|e| OpError::invalid(format!("{path}{e}")))?;
            }
            Backing::Image(i) => {
                if !(512..=65536).contains(&i.page_size) || !i.page_size.is_power_of_two() {
                    return Err(OpError::invalid(format!(
                        "{path}page_size: {} is not a power of two from 512 to 65536",
                        i.page_size
                    )));
                }
            }
        }
        for (i, h) in self.nvmf_hosts.iter().enumerate() {
            if !h.starts_with("nqn.") || h.len() > 223 {
                return Err(OpError::invalid(format!(
                    "{path}nvmf_hosts[{i}]: {h:?} is not a host NQN (nqn.…, at most 223 bytes)"
                )));
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(OpError::invalid(format!(
                "{path}labels: {} labels, more than {MAX_LABELS}",
                self.labels.len()
            )));
        }
        for (k, v) in &self.labels {
            check_label(k, v).map_err(|e| OpError::invalid(format!("{path}labels: {e}")))?;
        }
        Ok(())
    }

    pub fn kind(&self) -> &'static str {
        match self.backing {
            Backing::Device(_) => "device",
            Backing::Nexus(_) => "nexus",
            Backing::Image(_) => "image",
        }
    }

    /// The image behind an image volume.
    pub fn image(&self) -> Option<&ImageKey> {
        match &self.backing {
            Backing::Image(i) => Some(&i.key),
            _ => None,
        }
    }

    /// "on file:///x", "over 3 replicas", "on image local/demo".
    pub fn summary(&self) -> String {
        match &self.backing {
            Backing::Device(u) => format!("on {u}"),
            Backing::Nexus(n) => format!("over {} replicas", n.replicas.len()),
            Backing::Image(i) => format!("on image {}", i.key),
        }
    }
}

/// A device URI a declaration may name: it parses, and it is not an image (images are named by
/// `STORE/IMAGE`, so that a volume's image is never hidden in a string).
fn check_uri(field: &str, uri: &str) -> OpResult<()> {
    let u =
        DeviceUri::parse(uri).map_err(|e| OpError::invalid(format!("{field}: {}", e.chain())))?;
    if u.scheme == "image" {
        return Err(OpError::invalid(format!(
            "{field}: {uri:?}: name a page-store image with `image: STORE/IMAGE`"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_written_before_protocols_and_settings_still_read() {
        let old = r#"{"name":"v","size":1048576,"backing":{"nexus":["mem://a","mem://b"]},
            "export":false,"read_only":false,"description":"","node":"n1"}"#;
        let d: VolumeDecl = serde_json::from_str(old).unwrap();
        assert!(d.exports.is_empty());
        let Backing::Nexus(n) = &d.backing else {
            panic!("a nexus")
        };
        assert_eq!(n.replicas.len(), 2);
        assert_eq!(n.settings, NexusSettings::default());
        let img: VolumeDecl = serde_json::from_str(
            r#"{"name":"i","size":0,"backing":{"image":"local/i"},"export":true,"read_only":false}"#,
        )
        .unwrap();
        assert_eq!(img.exports, [Protocol::Nbd].into());
        assert_eq!(img.image().unwrap().to_string(), "local/i");
        // What is written now reads back the same.
        for d in [d, img] {
            let back: VolumeDecl =
                serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
            assert_eq!(back, d);
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut d = VolumeDecl::device("v", "mem://v?size=1M");
        d.validate("").unwrap();
        d.backing = Backing::Device("image://local/x".into());
        assert!(d
            .validate("volumes[0].")
            .unwrap_err()
            .message
            .starts_with("volumes[0].device"));
        d.backing = Backing::Nexus(NexusDecl {
            replicas: vec!["mem://a".into(), "mem://a".into()],
            settings: NexusSettings::default(),
            placed: None,
        });
        assert!(d.validate("").unwrap_err().message.contains("listed twice"));
        d.name = "../x".into();
        assert!(d.validate("").unwrap_err().message.starts_with("name"));
        assert!(ImageKey::parse("nostore").is_err());
        assert_eq!(ImageKey::parse("a/b").unwrap().image, "b");
    }
}
