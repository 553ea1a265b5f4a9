//! CreateVolume: a new volume, an existing one found again (the call is idempotent), or a
//! page-store clone of a snapshot or of another volume.

use std::collections::HashMap;

use strata_api::v1 as pb;
use tonic::Status;
use tracing::info;

use super::{csi_volume, image_of, labels, required, topology, Controller};
use crate::csi;
use crate::csi::volume_content_source::Type as Source;
use crate::names::{self, Params};

/// A clone's origin: the image, its snapshot, and whether the snapshot was taken for the clone
/// (a volume as the source).
type CloneOf = (String, pb::Snapshot, bool);

/// Volumes are served from `node`: refused when the accessibility requirements exclude it.
fn check_reachable(r: &csi::CreateVolumeRequest, node: &str) -> Result<(), Status> {
    let Some(req) = &r.accessibility_requirements else {
        return Ok(());
    };
    let ours = topology(node);
    let listed = !req.requisite.is_empty() || !req.preferred.is_empty();
    let reachable = req.requisite.iter().chain(&req.preferred).any(|t| {
        t.segments
            .get(names::TOPOLOGY_NODE)
            .is_none_or(|n| ours.segments.get(names::TOPOLOGY_NODE) == Some(n))
    });
    if listed && !reachable {
        return Err(Status::resource_exhausted(format!(
            "volumes are served from node {node}, which the accessibility requirements exclude"
        )));
    }
    Ok(())
}

/// The label recording where a volume's content came from.
fn source_label(source: &Option<Source>) -> Option<String> {
    match source {
        Some(Source::Snapshot(s)) => Some(format!("snapshot:{}", s.snapshot_id)),
        Some(Source::Volume(v)) => Some(format!("volume:{}", v.volume_id)),
        None => None,
    }
}

/// An existing volume `v` with the requested id is this call's volume only if it was made by
/// the same request: same CSI name, a size in the range, the same source.
fn check_same(
    v: &pb::Volume,
    r: &csi::CreateVolumeRequest,
    id: &str,
    source: &Option<String>,
) -> Result<(), Status> {
    let l = labels(v);
    if l.get(names::LABEL_NAME) != Some(&r.name) {
        return Err(Status::already_exists(format!(
            "a volume {id:?} exists that is not the CSI volume {:?}",
            r.name
        )));
    }
    if !names::fits(v.size, r.capacity_range.as_ref()) {
        return Err(Status::already_exists(format!(
            "volume {:?} exists with {} bytes, outside the capacity range asked for",
            r.name, v.size
        )));
    }
    if l.get(names::LABEL_SOURCE) != source.as_ref() {
        return Err(Status::already_exists(format!(
            "volume {:?} exists with another content source",
            r.name
        )));
    }
    Ok(())
}

/// The export protocol a StorageClass names, as the daemon's API numbers it.
fn protocol(params: &Params) -> Result<pb::Protocol, Status> {
    pb::Protocol::from_str_name(&format!(
        "PROTOCOL_{}",
        params.protocol.to_ascii_uppercase()
    ))
    .ok_or_else(|| {
        Status::invalid_argument(format!(
            "protocol {}: the Strata daemon's API does not know it",
            params.protocol
        ))
    })
}

impl Controller {
    pub(super) async fn create(&self, r: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
        required("name", &r.name)?;
        names::check_capabilities(&r.volume_capabilities)?;
        let params = Params::parse(&r.parameters, &r.mutable_parameters)?;
        let mut size = names::size_for(r.capacity_range.as_ref())?;
        check_reachable(&r, &self.node().await?)?;
        let id = names::volume_id(&r.name);
        let _lock = self.locks.lock(&id).await;
        let source = r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.clone());
        let source_label = source_label(&source);
        if let Some(v) = self.daemon.volume(&id).await? {
            check_same(&v, &r, &id, &source_label)?;
            return Ok(csi_volume(&v));
        }
        let protocol = protocol(&params)?;
        let mut labels: HashMap<String, String> =
            [(names::LABEL_NAME.to_string(), r.name.clone())].into();
        if let Some(s) = &source_label {
            labels.insert(names::LABEL_SOURCE.into(), s.clone());
        }
        let clone_of = self.clone_source(&source, &id, &mut labels).await?;
        if clone_of.is_some() && params.replicas > 1 {
            return Err(Status::invalid_argument(
                "a volume made from a snapshot or a volume is a page-store clone: replicas > 1 \
                 does not apply",
            ));
        }
        let (backing, grow_to) = match &clone_of {
            Some((image, snap, _)) => self.clone_backing(&r, image, snap, &id, &mut size).await?,
            None => (new_backing(&params, &id), None),
        };
        let spec = pb::VolumeSpec {
            name: id.clone(),
            size: if grow_to.is_some() {
                clone_of.as_ref().map_or(size, |(_, s, _)| s.size)
            } else {
                size
            },
            backing: Some(backing),
            export: Some(true),
            protocols: vec![protocol as i32],
            description: format!("CSI volume {}", r.name),
            labels,
            ..Default::default()
        };
        let mut v = self.daemon.create_volume(spec).await?;
        if let Some(size) = grow_to {
            v = self.daemon.resize_volume(&id, size).await?;
        }
        info!(volume = %id, name = %r.name, size = v.size, kind = %v.kind, "volume created");
        Ok(csi_volume(&v))
    }

    /// From a snapshot or a volume: the snapshot a page-store clone is made of (for a volume, a
    /// snapshot taken for the clone, found again on a retry).
    async fn clone_source(
        &self,
        source: &Option<Source>,
        id: &str,
        labels: &mut HashMap<String, String>,
    ) -> Result<Option<CloneOf>, Status> {
        match source {
            Some(Source::Snapshot(s)) => {
                let (image, snap) = self.source_snapshot(&s.snapshot_id).await?;
                Ok(Some((image, snap, false)))
            }
            Some(Source::Volume(src)) => {
                let v = self.csi_volume_by_id(&src.volume_id).await?;
                let image = image_of(&v).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "volume {:?} is a replicated volume: clones are made of page-store \
                         volumes (StorageClass parameter store)",
                        src.volume_id
                    ))
                })?;
                let name = format!("{}{id}", names::CLONE_SNAPSHOT_PREFIX);
                let snap = match self
                    .daemon
                    .snapshots_of(&image)
                    .await?
                    .into_iter()
                    .find(|s| s.name == name)
                {
                    Some(s) => s,
                    None => self.daemon.create_snapshot(&image, &name).await?,
                };
                labels.insert(
                    names::LABEL_CLONE_BASE.into(),
                    names::snapshot_id(&image, &name),
                );
                Ok(Some((image, snap, true)))
            }
            None => Ok(None),
        }
    }

    /// The clone of `snap` in its image's store (made unless a retry finds it), and the size to
    /// grow it to when more was asked for than the snapshot holds.
    async fn clone_backing(
        &self,
        r: &csi::CreateVolumeRequest,
        image: &str,
        snap: &pb::Snapshot,
        id: &str,
        size: &mut u64,
    ) -> Result<(pb::volume_spec::Backing, Option<u64>), Status> {
        if *size < snap.size {
            if r.capacity_range
                .as_ref()
                .is_some_and(|c| c.required_bytes > 0)
            {
                return Err(Status::out_of_range(format!(
                    "the source holds {} bytes, more than the {size} asked for",
                    snap.size
                )));
            }
            *size = snap.size;
        }
        let store = image.split_once('/').map_or("", |(s, _)| s).to_string();
        let key = format!("{store}/{id}");
        let exists = self
            .daemon
            .images_of(&store)
            .await?
            .iter()
            .any(|i| i.name == id);
        if !exists {
            self.daemon
                .create_clone(&names::snapshot_id(image, &snap.name), id)
                .await?;
        }
        Ok((
            pb::volume_spec::Backing::Image(key),
            (*size > snap.size).then_some(*size),
        ))
    }
}

/// A new volume's backing: an image in the StorageClass's store, else a nexus of replicas.
fn new_backing(params: &Params, id: &str) -> pb::volume_spec::Backing {
    match &params.store {
        Some(store) => pb::volume_spec::Backing::Image(format!("{store}/{id}")),
        None => pb::volume_spec::Backing::Nexus(pb::NexusSpec {
            replica_count: params.replicas,
            preallocate: !params.thin,
            ..Default::default()
        }),
    }
}
