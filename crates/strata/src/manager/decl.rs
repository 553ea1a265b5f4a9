//! Declarations: volumes and stores as the API and specs describe them and the state store
//! keeps them, and the checks they pass before anything is opened.

use serde::{Deserialize, Serialize};
use strata_bdev::DeviceUri;

use super::{OpError, OpResult};
use crate::config::VolumeConfig;

/// What a volume is made of, as the API and specs declare it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackingDef {
    /// One device URI.
    Device(String),
    /// The replica URIs of a nexus.
    Nexus(Vec<String>),
    /// A page-store image, `STORE/IMAGE`.
    Image(String),
}

/// A volume as declared: what is stored in the state store, and what specs describe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDef {
    pub name: String,
    /// Bytes; 0 takes the size of existing devices.
    pub size: u64,
    pub backing: BackingDef,
    /// Exported over NBD.
    pub export: bool,
    pub read_only: bool,
    #[serde(default)]
    pub description: String,
    /// The node that serves it (its `[api] node_name`); empty means the node that stored it.
    #[serde(default)]
    pub node: String,
}

/// A page store the daemon knows, for listing.
#[derive(Debug, Clone)]
pub struct StoreDesc {
    pub name: String,
    /// "dir" or "s3".
    pub kind: String,
    /// The directory, or `s3://bucket/prefix at endpoint` (never credentials).
    pub location: String,
    pub from_config: bool,
}

impl StoreDesc {
    pub fn new(name: &str, sc: &strata_pagestore::StoreConfig, from_config: bool) -> StoreDesc {
        use strata_pagestore::StoreConfig;
        let (kind, location) = match sc {
            StoreConfig::Dir { path } => ("dir", path.display().to_string()),
            StoreConfig::S3 {
                endpoint,
                bucket,
                prefix,
                ..
            } => (
                "s3",
                format!(
                    "s3://{bucket}/{prefix} at {}",
                    endpoint.as_deref().unwrap_or("AWS")
                ),
            ),
        };
        StoreDesc {
            name: name.to_string(),
            kind: kind.into(),
            location,
            from_config,
        }
    }
}

/// Sizes are multiples of this.
pub const SECTOR: u64 = 512;

/// Check a volume name: it is an export name and a state-store key.
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

impl VolumeDef {
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
        let check_uri = |field: String, uri: &str| -> OpResult<()> {
            let u = DeviceUri::parse(uri)
                .map_err(|e| OpError::invalid(format!("{path}{field}: {}", e.chain())))?;
            if u.scheme == "image" {
                return Err(OpError::invalid(format!(
                    "{path}{field}: {uri:?}: name a page-store image with `image: STORE/IMAGE`"
                )));
            }
            Ok(())
        };
        match &self.backing {
            BackingDef::Device(uri) => check_uri("device".into(), uri)?,
            BackingDef::Nexus(replicas) => {
                if replicas.is_empty() {
                    return Err(OpError::invalid(format!(
                        "{path}replicas: a nexus volume needs at least one replica"
                    )));
                }
                for (i, r) in replicas.iter().enumerate() {
                    check_uri(format!("replicas[{i}]"), r)?;
                    if replicas[..i].contains(r) {
                        return Err(OpError::invalid(format!(
                            "{path}replicas[{i}]: {r:?} is listed twice"
                        )));
                    }
                }
            }
            BackingDef::Image(key) => {
                let ok = key.split_once('/').is_some_and(|(s, n)| {
                    strata_pagestore::check_name(s).is_ok()
                        && strata_pagestore::check_name(n).is_ok()
                });
                if !ok {
                    return Err(OpError::invalid(format!(
                        "{path}image: {key:?} is not STORE/IMAGE (names of letters, digits, - _ .)"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn kind(&self) -> &'static str {
        match self.backing {
            BackingDef::Device(_) => "device",
            BackingDef::Nexus(_) => "nexus",
            BackingDef::Image(_) => "image",
        }
    }

    /// The configuration entry that opens it.
    pub(crate) fn config(&self) -> VolumeConfig {
        let mut c = match &self.backing {
            BackingDef::Device(uri) => VolumeConfig::device(&self.name, uri),
            BackingDef::Image(key) => {
                let mut uri = format!("image://{key}");
                if self.size > 0 {
                    uri.push_str(&format!("?size={}", self.size));
                }
                VolumeConfig::device(&self.name, &uri)
            }
            BackingDef::Nexus(replicas) => {
                let mut c = VolumeConfig::device(&self.name, "");
                c.uri = None;
                c.replicas = replicas.clone();
                c
            }
        };
        c.description = self.description.clone();
        c.read_only = self.read_only;
        c.create_size = Some(self.size);
        c
    }

    /// The declaration of a volume the configuration file makes.
    pub fn from_config(c: &VolumeConfig, size: u64) -> VolumeDef {
        let backing = match &c.uri {
            Some(uri) => match uri.strip_prefix("image://") {
                Some(rest) => BackingDef::Image(rest.split('?').next().unwrap_or(rest).to_string()),
                None => BackingDef::Device(uri.clone()),
            },
            None => BackingDef::Nexus(c.replicas.clone()),
        };
        VolumeDef {
            name: c.name.clone(),
            size,
            backing,
            export: true,
            read_only: c.read_only,
            description: c.description.clone(),
            node: String::new(),
        }
    }
}
