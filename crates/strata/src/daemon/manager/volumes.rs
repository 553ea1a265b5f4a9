//! Volumes: create, delete, resize, export, and their declarations in the state store.

use std::collections::BTreeMap;
use std::sync::Arc;

use strata_bdev::BlockDevice;
use tracing::info;

use super::images::check_resize;
use super::{
    check_label, Backing, Caller, Managed, Manager, OpError, OpKind, OpResult, Protocol,
    VolumeDecl, MAX_LABELS, SECTOR, VOLUMES,
};
use crate::format::human_bytes;

impl Manager {
    pub(super) async fn save(&self, d: &VolumeDecl) -> OpResult<()> {
        let json = serde_json::to_vec_pretty(d).expect("a VolumeDecl serializes");
        self.state
            .put(&format!("{VOLUMES}{}", d.name), &json)
            .await?;
        Ok(())
    }

    /// Store a declaration without opening anything: reconciliation (here, or on the node it
    /// names) makes it real.
    pub async fn declare(&self, d: &VolumeDecl, caller: &Caller) -> OpResult<()> {
        d.validate("")?;
        self.allow_decl(caller, d, "")?;
        self.check_exports(d)?;
        self.save(d).await
    }

    /// Remove a declaration (of a volume another node serves: that node closes it).
    pub async fn undeclare(&self, name: &str) -> OpResult<()> {
        self.state.delete(&format!("{VOLUMES}{name}")).await?;
        Ok(())
    }

    /// Refuse exports over protocols this daemon does not serve.
    fn check_exports(&self, d: &VolumeDecl) -> OpResult<()> {
        match d.exports.iter().find(|p| !self.exports.speaks(**p)) {
            Some(p) => Err(OpError::precondition(format!(
                "volume {:?}: this daemon does not serve {p} (configure its listener)",
                d.name
            ))),
            None => Ok(()),
        }
    }

    /// Refuse a change while the state store cannot record it (reconciliation would undo it
    /// when the store is back). Volumes of the configuration file need no record.
    pub(super) async fn check_declarable(&self, m: &Managed, what: &str) -> OpResult<()> {
        if !m.from_config && !self.state.available().await {
            return Err(OpError::new(
                OpKind::Unavailable,
                format!(
                    "state store {} is unavailable: {what} of {} cannot change until it is back \
                     (the volume keeps serving)",
                    self.state.describe(),
                    m.name
                ),
            ));
        }
        Ok(())
    }

    /// Record a changed declaration of an open volume (in the state store unless the
    /// configuration file declares it) and make it the volume's.
    pub(super) async fn redeclare(&self, m: &Managed, d: VolumeDecl) -> OpResult<()> {
        if !m.from_config {
            self.save(&d).await?;
        }
        m.set_decl(d);
        Ok(())
    }

    /// Create and open a volume, export it as declared, and remember it.
    pub async fn create(&self, mut d: VolumeDecl, caller: &Caller) -> OpResult<Arc<Managed>> {
        d.validate("")?;
        self.allow_decl(caller, &d, "")?;
        self.check_exports(&d)?;
        d.node = self.node.clone();
        let _changing = self.changes.lock().await;
        if self.lookup(&d.name).is_some() {
            return Err(OpError::new(
                OpKind::Exists,
                format!("volume {:?} exists", d.name),
            ));
        }
        if !self.state.available().await {
            return Err(OpError::new(
                OpKind::Unavailable,
                format!(
                    "state store {} is unavailable: volumes cannot be created until it is back",
                    self.state.describe()
                ),
            ));
        }
        let placed = match &mut d.backing {
            Backing::Nexus(n) if n.replicas.is_empty() => {
                let p = n.placed.unwrap_or(super::Placed {
                    count: 1,
                    preallocate: false,
                });
                n.replicas = self.place(&d.name, d.size, p.count, p.preallocate, &[])?;
                n.replicas.clone()
            }
            _ => Vec::new(),
        };
        let m = match self.open_managed(&d, false).await {
            Ok(m) => m,
            Err(e) => {
                self.unplace(&placed);
                return Err(e);
            }
        };
        if let Err(e) = self.save(&d).await {
            self.close_volume(m, !placed.is_empty()).await;
            self.unplace(&placed);
            return Err(e);
        }
        if let Err(e) = self.insert(m.clone()).await {
            let _ = self.undeclare(&d.name).await;
            return Err(e);
        }
        info!(volume = %d.name, kind = d.kind(), "volume created");
        Ok(m)
    }

    /// Stop serving a volume, flush and close it, and forget it; with `delete_image`, delete
    /// the page-store image behind it too.
    pub async fn delete(&self, name: &str, delete_image: bool) -> OpResult<String> {
        let _changing = self.changes.lock().await;
        let m = self.get(name)?;
        if m.from_config {
            return Err(OpError::precondition(format!(
                "volume {name:?} is declared in the configuration file; remove it there and restart"
            )));
        }
        let d = m.decl();
        let image = d.image().cloned();
        if delete_image && image.is_none() {
            return Err(OpError::invalid(format!(
                "volume {name:?} is a {} volume, not an image: delete_image does not apply",
                d.kind()
            )));
        }
        self.undeclare(name).await?;
        let _ = self
            .state
            .delete(&format!("health/{}.{name}", self.node))
            .await;
        self.close_volume(m, true).await;
        if let Backing::Nexus(n) = &d.backing {
            if n.placed.is_some() {
                self.unplace(&n.replicas);
            }
        }
        let mut msg = format!("volume {name} deleted");
        if let Some(key) = image.filter(|_| delete_image) {
            self.delete_image_unlocked(&key).await?;
            msg.push_str(&format!(
                ", with image {key}; `strata gc` frees its data after the grace period"
            ));
        }
        info!("{msg}");
        Ok(msg)
    }

    /// Resize a page-store image volume (shrinking needs `force`).
    pub async fn resize(&self, name: &str, size: u64, force: bool) -> OpResult<Arc<Managed>> {
        let _changing = self.changes.lock().await;
        let m = self.get(name)?;
        self.resize_unlocked(&m, size, force).await?;
        Ok(m)
    }

    pub(super) async fn resize_unlocked(
        &self,
        m: &Managed,
        size: u64,
        force: bool,
    ) -> OpResult<()> {
        let name = &m.name;
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(OpError::invalid(format!(
                "size: {size} is not a positive multiple of the {SECTOR}-byte block size"
            )));
        }
        let Some(image) = m.image() else {
            return Err(OpError::precondition(format!(
                "volume {name:?} is a {} volume: only page-store image volumes can be resized \
                 (a device or nexus keeps the size of its devices)",
                m.decl().kind()
            )));
        };
        let old = image.geometry().size;
        check_resize(&format!("volume {name:?}"), image, size, force)?;
        image.resize(size, force).await?;
        let mut d = m.decl();
        d.size = size;
        self.redeclare(m, d).await?;
        self.exports.resized(name);
        info!(volume = %name, old, size, "volume resized to {}", human_bytes(size));
        Ok(())
    }

    /// Set labels of a volume (`set` adds or replaces, then `remove` removes).
    pub async fn set_labels(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        remove: &[String],
    ) -> OpResult<Arc<Managed>> {
        for (k, v) in &set {
            check_label(k, v)?;
        }
        let _changing = self.changes.lock().await;
        let m = self.get(name)?;
        self.check_declarable(&m, "the labels").await?;
        let mut d = m.decl();
        d.labels.extend(set);
        for k in remove {
            d.labels.remove(k);
        }
        if d.labels.len() > MAX_LABELS {
            return Err(OpError::invalid(format!(
                "volume {name:?} would have {} labels, more than {MAX_LABELS}",
                d.labels.len()
            )));
        }
        self.redeclare(&m, d).await?;
        Ok(m)
    }

    /// Export a volume over `protocol`, or stop (clients connected keep their connection
    /// until they close it); `read_only` and `description` change the export's.
    pub async fn set_export(
        &self,
        name: &str,
        protocol: Protocol,
        export: bool,
        read_only: Option<bool>,
        description: Option<String>,
    ) -> OpResult<Arc<Managed>> {
        let _changing = self.changes.lock().await;
        let m = self.get(name)?;
        if m.from_config {
            return Err(OpError::precondition(format!(
                "volume {name:?} is declared in the configuration file; its export is changed there"
            )));
        }
        let mut d = m.decl();
        match (export, d.exports.contains(&protocol)) {
            (true, true) => {
                return Err(OpError::new(
                    OpKind::Exists,
                    format!("volume {name:?} is already exported over {protocol}"),
                ))
            }
            (false, false) => {
                return Err(OpError::not_found(format!(
                    "volume {name:?} is not exported over {protocol}"
                )))
            }
            (true, false) => {
                d.exports.insert(protocol);
            }
            (false, true) => {
                d.exports.remove(&protocol);
            }
        }
        if let Some(ro) = read_only {
            d.read_only = ro;
        }
        if let Some(desc) = description {
            d.description = desc;
        }
        self.check_exports(&d)?;
        let refused = self.exports.apply(&d.exports, &m.exported(&d)).await;
        if !refused.is_empty() {
            // Back to what was declared.
            let old = m.decl();
            self.exports.apply(&old.exports, &m.exported(&old)).await;
            return Err(OpError::new(
                OpKind::Unavailable,
                format!("export volume {name:?}: {}", refused.join("; ")),
            ));
        }
        self.save(&d).await?;
        m.set_decl(d);
        Ok(m)
    }
}
