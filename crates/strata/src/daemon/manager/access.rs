//! Who may name what. The daemon's own user (its configuration file, and the owner of its unix
//! socket) may name any device; a remote caller (a TCP client with a token or a certificate)
//! may name local paths only inside the configured pools, so that the API is never a way to
//! read or write the daemon's host beyond them.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use strata_bdev::DeviceUri;

use super::{expand_uri, Backing, Manager, OpError, OpResult, VolumeDecl};

/// Who asks for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The daemon's own user: the configuration file, reconciliation, the unix socket's owner.
    Owner,
    /// A client of a TCP listener, by the name of its token or certificate.
    Remote(String),
}

/// `[[pool]]`: a directory where volumes and replicas made through the API may live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    /// An absolute directory (created if missing, mode 0700).
    pub path: PathBuf,
}

/// Device URI schemes whose path is a local file (or block device).
const LOCAL_PATH_SCHEMES: &[&str] = &["file", "aio", "uring"];

impl Pool {
    /// The pool's directory as the kernel resolves it.
    fn resolved(&self) -> Option<PathBuf> {
        std::fs::canonicalize(&self.path).ok()
    }
}

/// `path` with every symbolic link resolved, for a path that may not exist yet: its longest
/// existing ancestor resolved, the rest appended (which holds no `..`).
fn resolve(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return None;
    }
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        match std::fs::symlink_metadata(&existing) {
            Ok(_) => break,
            Err(_) => {
                rest.push(existing.file_name()?.to_os_string());
                existing = existing.parent()?.to_path_buf();
            }
        }
    }
    let mut out = std::fs::canonicalize(&existing).ok()?;
    for part in rest.into_iter().rev() {
        out.push(part);
    }
    Some(out)
}

impl Manager {
    /// Refuse a local path a remote caller may not use.
    pub(super) fn allow_path(&self, caller: &Caller, field: &str, path: &Path) -> OpResult<()> {
        let Caller::Remote(who) = caller else {
            return Ok(());
        };
        let resolved = resolve(path);
        let inside = resolved.as_ref().is_some_and(|p| {
            self.pools
                .iter()
                .filter_map(Pool::resolved)
                .any(|pool| p.starts_with(&pool) && *p != pool)
        });
        if inside {
            return Ok(());
        }
        let pools: Vec<String> = self
            .pools
            .iter()
            .map(|p| p.path.display().to_string())
            .collect();
        Err(OpError::new(
            super::OpKind::Precondition,
            format!(
                "{field}: {} is outside the pools a remote caller ({who}) may use ({}); use a \
                 path inside one, or ask the daemon's owner (its unix socket, or its \
                 configuration file)",
                path.display(),
                if pools.is_empty() {
                    "none are configured: [[pool]]".to_string()
                } else {
                    pools.join(", ")
                }
            ),
        ))
    }

    /// Refuse a device URI naming a local path a remote caller may not use.
    pub(super) fn allow_uri(&self, caller: &Caller, field: &str, uri: &str) -> OpResult<()> {
        if *caller == Caller::Owner {
            return Ok(());
        }
        let expanded = expand_uri(uri, &self.data_dir);
        let mut u = DeviceUri::parse(&expanded)
            .map_err(|e| OpError::invalid(format!("{field}: {}", e.chain())))?;
        if LOCAL_PATH_SCHEMES.contains(&u.scheme.as_str()) {
            self.allow_path(caller, field, Path::new(&u.path))?;
        }
        if let Some(socket) = u.take("socket") {
            self.allow_path(caller, field, Path::new(&socket))?;
        }
        Ok(())
    }

    /// Refuse a declaration naming anything its caller may not use.
    pub(super) fn allow_decl(&self, caller: &Caller, d: &VolumeDecl, path: &str) -> OpResult<()> {
        match &d.backing {
            Backing::Device(uri) => self.allow_uri(caller, &format!("{path}device"), uri),
            Backing::Nexus(n) => {
                n.replicas.iter().enumerate().try_for_each(|(i, r)| {
                    self.allow_uri(caller, &format!("{path}replicas[{i}]"), r)
                })
            }
            Backing::Image(_) => Ok(()),
        }
    }
}

/// Make the pools' directories (mode 0700) so that paths in them resolve.
pub fn create_pools(pools: &[Pool]) -> anyhow::Result<()> {
    use anyhow::Context;
    for p in pools {
        if !p.path.is_absolute() {
            anyhow::bail!(
                "[[pool]] {}: path {} is not absolute",
                p.name,
                p.path.display()
            );
        }
        std::fs::create_dir_all(&p.path)
            .with_context(|| format!("[[pool]] {}: create {}", p.name, p.path.display()))?;
    }
    Ok(())
}

impl Manager {
    /// Refuse a device URI that reaches back into this daemon's own NBD listeners: a volume
    /// whose device or replica is an export of the same daemon would wait on itself (a replica
    /// cycle deadlocks its rebuild). Use the other volume's device directly instead.
    pub(super) async fn refuse_self(&self, field: &str, uri: &str) -> OpResult<()> {
        let Ok(mut u) = DeviceUri::parse(uri) else {
            return Ok(());
        };
        let ours = self.exports.listening(super::Protocol::Nbd);
        if ours.is_empty() {
            // At start-up, before the listeners: nothing to reach back into (and no lookup).
            return Ok(());
        }
        let refuse = |addr: &str| {
            Err(OpError::invalid(format!(
                "{field}: {uri} is an export of this daemon itself ({addr}); a volume cannot \
                 be built on this daemon's own exports (it would wait on itself): name the other \
                 volume's device instead"
            )))
        };
        match u.scheme.as_str() {
            "nbd+unix" => {
                let socket = u.take("socket");
                for l in &ours {
                    if let (Some(s), Some(mine)) = (&socket, l.split_once("?socket=").map(|x| x.1))
                    {
                        let same = std::fs::canonicalize(s).ok()
                            == std::fs::canonicalize(mine).ok()
                            || s == mine;
                        if same {
                            return refuse(l);
                        }
                    }
                }
            }
            "nbd" | "nbds" => {
                let hostport = if u.authority.contains(':') {
                    u.authority.clone()
                } else {
                    format!("{}:10809", u.authority)
                };
                let Ok(addrs) = tokio::net::lookup_host(&hostport).await else {
                    return Ok(());
                };
                let addrs: Vec<std::net::SocketAddr> = addrs.collect();
                for l in &ours {
                    let Some(Ok(mine)) = l
                        .strip_prefix("nbd://")
                        .map(str::parse::<std::net::SocketAddr>)
                    else {
                        continue;
                    };
                    let hit = addrs.iter().any(|a| {
                        a.port() == mine.port()
                            && (a.ip() == mine.ip()
                                || mine.ip().is_unspecified()
                                || (a.ip().is_loopback() && mine.ip().is_loopback()))
                    });
                    if hit {
                        return refuse(l);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}
