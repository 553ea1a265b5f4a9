//! The Controller service: CSI volumes and snapshots as Strata volumes, page-store snapshots and
//! clones, each call converted and handed to the daemon. What the driver keeps about a volume
//! (its CSI name, its source, where it is published) lives in the volume's labels, so any
//! controller instance — or the same one after a restart — sees the same state.

use std::collections::HashMap;
use std::sync::Arc;

use strata_api::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::csi;
use crate::csi::controller_service_capability::rpc::Type as Cap;
use crate::daemon::Daemon;
use crate::names::{self, Params};
use crate::Locks;

mod create;

type Reply<T> = Result<Response<T>, Status>;

/// The Controller and GroupController services.
#[derive(Debug)]
pub struct Controller {
    pub(crate) daemon: Arc<Daemon>,
    /// Volumes a node may have published at once (NodeGetInfo says the same).
    pub(crate) max_volumes_per_node: u32,
    /// Calls changing one volume or snapshot run one at a time.
    pub(crate) locks: Locks,
    /// Publications are counted per node: one at a time.
    pub(crate) publishing: tokio::sync::Mutex<()>,
}

pub(crate) fn required(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// The image (`STORE/IMAGE`) behind an image volume.
pub(crate) fn image_of(v: &pb::Volume) -> Option<String> {
    match v.spec.as_ref()?.backing.as_ref()? {
        pb::volume_spec::Backing::Image(k) => Some(k.clone()),
        _ => None,
    }
}

pub(crate) fn labels(v: &pb::Volume) -> HashMap<String, String> {
    v.spec
        .as_ref()
        .map(|s| s.labels.clone())
        .unwrap_or_default()
}

/// Whether the driver created `v`.
pub(crate) fn is_csi(v: &pb::Volume) -> bool {
    labels(v).contains_key(names::LABEL_NAME)
}

/// A volume's condition: abnormal unless every replica (or the image) is healthy.
pub(crate) fn condition(v: &pb::Volume) -> csi::VolumeCondition {
    let abnormal = v.state != "online";
    let mut message = format!("{} volume is {}", v.kind, v.state);
    let away: Vec<String> = v
        .children
        .iter()
        .filter(|c| c.state != "online")
        .map(|c| match &c.reason {
            Some(r) => format!("replica {} {} ({r})", c.index, c.state),
            None => format!("replica {} {}", c.index, c.state),
        })
        .collect();
    if !away.is_empty() {
        message.push_str(": ");
        message.push_str(&away.join(", "));
    }
    if let Some(f) = v.image.as_ref().and_then(|i| i.fenced.clone()) {
        message.push_str(&format!(": {f}"));
    }
    csi::VolumeCondition { abnormal, message }
}

pub(crate) fn topology(node: &str) -> csi::Topology {
    csi::Topology {
        segments: [(names::TOPOLOGY_NODE.to_string(), node.to_string())].into(),
    }
}

/// A Strata volume as CSI shows it.
pub(crate) fn csi_volume(v: &pb::Volume) -> csi::Volume {
    let spec = v.spec.clone().unwrap_or_default();
    let source = spec
        .labels
        .get(names::LABEL_SOURCE)
        .and_then(|s| s.split_once(':'))
        .map(|(kind, id)| csi::VolumeContentSource {
            r#type: Some(match kind {
                "snapshot" => csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: id.to_string(),
                    },
                ),
                _ => csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: id.to_string(),
                    },
                ),
            }),
        });
    csi::Volume {
        capacity_bytes: v.size as i64,
        volume_id: spec.name.clone(),
        volume_context: [("strata.io/kind".to_string(), v.kind.clone())].into(),
        content_source: source,
        accessible_topology: vec![topology(&spec.node)],
    }
}

fn timestamp(secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs as i64,
        nanos: 0,
    }
}

/// A page-store snapshot as CSI shows it; its source volume ID is its image's name.
pub(crate) fn csi_snapshot(s: &pb::Snapshot) -> csi::Snapshot {
    let source = s.image.split_once('/').map_or(s.image.as_str(), |(_, i)| i);
    csi::Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: names::snapshot_id(&s.image, &s.name),
        source_volume_id: source.to_string(),
        creation_time: Some(timestamp(s.created)),
        ready_to_use: true,
        group_snapshot_id: if s.name.starts_with(names::GROUP_PREFIX) {
            s.name.clone()
        } else {
            String::new()
        },
    }
}

/// Snapshots a user made (not the hidden ones clones of volumes read through).
pub(crate) fn visible(s: &pb::Snapshot) -> bool {
    !s.name.starts_with(names::CLONE_SNAPSHOT_PREFIX)
}

impl Controller {
    /// The daemon's node: the one node volumes are served from and published to today.
    pub(crate) async fn node(&self) -> Result<String, Status> {
        Ok(self.daemon.info().await?.node_name)
    }

    /// A CSI volume by ID; NOT_FOUND for none (or one the driver did not create).
    pub(crate) async fn csi_volume_by_id(&self, id: &str) -> Result<pb::Volume, Status> {
        match self.daemon.volume(id).await? {
            Some(v) if is_csi(&v) => Ok(v),
            _ => Err(Status::not_found(format!("no volume {id:?}"))),
        }
    }

    /// Delete an image no volume uses and no snapshot remains of (the home of snapshots whose
    /// volume was deleted).
    pub(crate) async fn drop_orphan_image(&self, image: &str) -> Result<(), Status> {
        let Some((store, name)) = image.split_once('/') else {
            return Ok(());
        };
        if self
            .daemon
            .volume(name)
            .await?
            .is_some_and(|v| image_of(&v).as_deref() == Some(image))
        {
            return Ok(());
        }
        if !self.daemon.snapshots_of(image).await?.is_empty() {
            return Ok(());
        }
        let known = self
            .daemon
            .images_of(store)
            .await?
            .iter()
            .any(|i| i.name == name);
        if known {
            info!(
                image,
                "deleting the image of a deleted volume: its last snapshot is gone"
            );
            self.daemon.delete_image(image).await?;
        }
        Ok(())
    }

    /// The snapshot a request's content source names, checked to exist.
    pub(crate) async fn source_snapshot(&self, id: &str) -> Result<(String, pb::Snapshot), Status> {
        let not_found = || Status::not_found(format!("no snapshot {id:?}"));
        let (image, snap) = names::parse_snapshot_id(id).ok_or_else(not_found)?;
        let s = self
            .daemon
            .snapshots_of(&image)
            .await?
            .into_iter()
            .find(|s| s.name == snap)
            .ok_or_else(not_found)?;
        Ok((image, s))
    }

    async fn delete(&self, id: &str) -> Result<(), Status> {
        required("volume_id", id)?;
        let _lock = self.locks.lock(id).await;
        let Some(v) = self.daemon.volume(id).await? else {
            return Ok(());
        };
        if !is_csi(&v) {
            return Err(Status::failed_precondition(format!(
                "volume {id:?} was not created by the CSI driver; delete it with `strata volume \
                 delete`"
            )));
        }
        let l = labels(&v);
        let published = names::published(&l);
        if !published.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {id:?} is published to {}; unpublish it first",
                published.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let image = image_of(&v);
        // An image keeps its snapshots (they outlive their volume, as CSI wants): it is
        // deleted with its last snapshot.
        let keep_image = match &image {
            Some(i) => !self.daemon.snapshots_of(i).await?.is_empty(),
            None => false,
        };
        self.daemon
            .delete_volume(id, image.is_some() && !keep_image)
            .await?;
        if let Some(base) = l.get(names::LABEL_CLONE_BASE) {
            self.daemon.delete_snapshot(base).await?;
            if let Some((image, _)) = names::parse_snapshot_id(base) {
                self.drop_orphan_image(&image).await?;
            }
        }
        info!(volume = %id, "volume deleted");
        Ok(())
    }

    async fn publish(
        &self,
        r: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse, Status> {
        required("volume_id", &r.volume_id)?;
        required("node_id", &r.node_id)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        names::check_capability(cap).map_err(Status::invalid_argument)?;
        let v = self.csi_volume_by_id(&r.volume_id).await?;
        let node = self.node().await?;
        if r.node_id != node {
            return Err(Status::not_found(format!(
                "no node {:?}: volumes are served to node {node}",
                r.node_id
            )));
        }
        let read_only = r.readonly || names::read_only_mode(cap);
        let _one = self.publishing.lock().await;
        let v = self
            .daemon
            .volume(&v.spec.clone().unwrap_or_default().name)
            .await?
            .ok_or_else(|| Status::not_found(format!("no volume {:?}", r.volume_id)))?;
        let published = names::published(&labels(&v));
        match published.get(&r.node_id) {
            Some(&ro) if ro == read_only => {}
            Some(_) => {
                return Err(Status::already_exists(format!(
                    "volume {:?} is published to {} {}",
                    r.volume_id,
                    r.node_id,
                    if read_only { "read-write" } else { "read-only" }
                )))
            }
            None => {
                use csi::volume_capability::access_mode::Mode;
                let multi_node = cap
                    .access_mode
                    .as_ref()
                    .is_some_and(|m| Mode::try_from(m.mode) == Ok(Mode::MultiNodeReaderOnly));
                if !published.is_empty() && !multi_node {
                    return Err(Status::failed_precondition(format!(
                        "volume {:?} is published to {} and its access mode allows one node",
                        r.volume_id,
                        published.keys().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                let on_node = self
                    .daemon
                    .list_volumes()
                    .await?
                    .iter()
                    .filter(|o| names::published(&labels(o)).contains_key(&r.node_id))
                    .count();
                if on_node >= self.max_volumes_per_node as usize {
                    return Err(Status::resource_exhausted(format!(
                        "node {} has {on_node} volumes published, its limit",
                        r.node_id
                    )));
                }
                self.daemon
                    .set_labels(
                        &r.volume_id,
                        [(
                            format!("{}{}", names::LABEL_PUBLISHED, r.node_id),
                            if read_only { "ro" } else { "rw" }.to_string(),
                        )]
                        .into(),
                        Vec::new(),
                    )
                    .await?;
                info!(volume = %r.volume_id, node = %r.node_id, read_only, "volume published");
            }
        }
        let mut context: HashMap<String, String> = HashMap::new();
        context.insert("readonly".into(), read_only.to_string());
        if let Some(uri) = v.exports.first() {
            context.insert("uri".into(), uri.clone());
        }
        Ok(csi::ControllerPublishVolumeResponse {
            publish_context: context,
        })
    }

    async fn unpublish(&self, r: csi::ControllerUnpublishVolumeRequest) -> Result<(), Status> {
        required("volume_id", &r.volume_id)?;
        let _one = self.publishing.lock().await;
        let Some(v) = self.daemon.volume(&r.volume_id).await? else {
            return Ok(());
        };
        let remove: Vec<String> = names::published(&labels(&v))
            .into_keys()
            .filter(|n| r.node_id.is_empty() || *n == r.node_id)
            .map(|n| format!("{}{n}", names::LABEL_PUBLISHED))
            .collect();
        if !remove.is_empty() {
            self.daemon
                .set_labels(&r.volume_id, HashMap::new(), remove)
                .await?;
            info!(volume = %r.volume_id, node = %r.node_id, "volume unpublished");
        }
        Ok(())
    }

    /// Every CSI snapshot, sorted by ID.
    async fn snapshots(&self) -> Result<Vec<pb::Snapshot>, Status> {
        let mut all: Vec<pb::Snapshot> = self
            .daemon
            .all_snapshots()
            .await?
            .into_iter()
            .filter(visible)
            .collect();
        all.sort_by_key(|s| names::snapshot_id(&s.image, &s.name));
        Ok(all)
    }

    async fn snapshot(&self, r: csi::CreateSnapshotRequest) -> Result<csi::Snapshot, Status> {
        required("name", &r.name)?;
        required("source_volume_id", &r.source_volume_id)?;
        if let Some(k) = r
            .parameters
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/"))
        {
            return Err(Status::invalid_argument(format!(
                "unknown snapshot parameter {k:?} (there are none)"
            )));
        }
        let name = names::snapshot_name(&r.name);
        let _lock = self.locks.lock(&format!("snapshot/{name}")).await;
        let v = self.csi_volume_by_id(&r.source_volume_id).await?;
        let image = image_of(&v).ok_or_else(|| {
            Status::invalid_argument(format!(
                "volume {:?} is a replicated volume: snapshots are of page-store volumes \
                 (StorageClass parameter store)",
                r.source_volume_id
            ))
        })?;
        if let Some(s) = self.snapshots().await?.into_iter().find(|s| s.name == name) {
            if s.image == image {
                return Ok(csi_snapshot(&s));
            }
            return Err(Status::already_exists(format!(
                "snapshot {:?} exists of another volume ({})",
                r.name, s.image
            )));
        }
        let s = self.daemon.create_snapshot(&image, &name).await?;
        info!(snapshot = %names::snapshot_id(&image, &name), name = %r.name, "snapshot taken");
        Ok(csi_snapshot(&s))
    }

    pub(crate) async fn delete_snapshot_id(&self, id: &str) -> Result<(), Status> {
        let Some((image, _)) = names::parse_snapshot_id(id) else {
            return Ok(());
        };
        let _lock = self.locks.lock(&format!("snapshot/{id}")).await;
        self.daemon.delete_snapshot(id).await?;
        self.drop_orphan_image(&image).await?;
        info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    async fn expand(
        &self,
        r: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Status> {
        required("volume_id", &r.volume_id)?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let size = names::size_for(Some(range))?;
        let _lock = self.locks.lock(&r.volume_id).await;
        let v = self.csi_volume_by_id(&r.volume_id).await?;
        let block = matches!(
            r.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(csi::volume_capability::AccessType::Block(_))
        );
        let v = if v.size >= size {
            v
        } else {
            let v = self.daemon.resize_volume(&r.volume_id, size).await?;
            info!(volume = %r.volume_id, size, "volume expanded");
            v
        };
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: v.size as i64,
            node_expansion_required: !block,
        })
    }

    async fn modify(&self, r: csi::ControllerModifyVolumeRequest) -> Result<(), Status> {
        required("volume_id", &r.volume_id)?;
        let _lock = self.locks.lock(&r.volume_id).await;
        let v = self.csi_volume_by_id(&r.volume_id).await?;
        let mut p = Params::default();
        p.apply_mutable(&r.mutable_parameters)?;
        if !r.mutable_parameters.contains_key("replicas") {
            return Ok(());
        }
        match v.kind.as_str() {
            "nexus" => {
                if v.children.len() as u32 != p.replicas {
                    self.daemon
                        .set_replica_count(&r.volume_id, p.replicas)
                        .await?;
                    info!(volume = %r.volume_id, replicas = p.replicas, "replica count changed");
                }
                Ok(())
            }
            _ if p.replicas == 1 => Ok(()),
            kind => Err(Status::invalid_argument(format!(
                "volume {:?} is a {kind} volume: it has no replicas to change (replicas=1 only)",
                r.volume_id
            ))),
        }
    }
}

fn cap(t: Cap) -> csi::ControllerServiceCapability {
    csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(
            csi::controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Reply<csi::CreateVolumeResponse> {
        let volume = self.create(req.into_inner()).await?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Reply<csi::DeleteVolumeResponse> {
        self.delete(&req.into_inner().volume_id).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Reply<csi::ControllerPublishVolumeResponse> {
        Ok(Response::new(self.publish(req.into_inner()).await?))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Reply<csi::ControllerUnpublishVolumeResponse> {
        self.unpublish(req.into_inner()).await?;
        Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Reply<csi::ValidateVolumeCapabilitiesResponse> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        self.csi_volume_by_id(&r.volume_id).await?;
        let unsupported: Vec<String> = r
            .volume_capabilities
            .iter()
            .filter_map(|c| names::check_capability(c).err())
            .collect();
        let params = Params::parse(&r.parameters, &r.mutable_parameters);
        let reply = match (unsupported.is_empty(), params) {
            (true, Ok(_)) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            (_, Err(e)) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_string(),
            },
            (false, _) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: unsupported.join("; "),
            },
        };
        Ok(Response::new(reply))
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Reply<csi::ListVolumesResponse> {
        let r = req.into_inner();
        let after = names::parse_token("v", &r.starting_token)?;
        let mut vols: Vec<pb::Volume> = self
            .daemon
            .list_volumes()
            .await?
            .into_iter()
            .filter(is_csi)
            .collect();
        vols.sort_by(|a, b| {
            a.spec
                .as_ref()
                .map(|s| &s.name)
                .cmp(&b.spec.as_ref().map(|s| &s.name))
        });
        let (page, next_token) = names::page(
            vols,
            |v| v.spec.as_ref().map_or("", |s| s.name.as_str()),
            "v",
            after,
            r.max_entries,
        )?;
        let entries = page
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(csi_volume(v)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: names::published(&labels(v)).into_keys().collect(),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Reply<csi::GetCapacityResponse> {
        let r = req.into_inner();
        if let Some(c) = &r.volume_capabilities.first() {
            names::check_capability(c).map_err(Status::invalid_argument)?;
        }
        let params = Params::parse(&r.parameters, &HashMap::new())?;
        let info = self.daemon.info().await?;
        let elsewhere = r.accessible_topology.as_ref().is_some_and(|t| {
            t.segments
                .get(names::TOPOLOGY_NODE)
                .is_some_and(|n| *n != info.node_name)
        });
        let (available, largest) = if elsewhere {
            (0, 0)
        } else {
            let free: Vec<u64> = info.pools.iter().map(|p| p.free_bytes).collect();
            let total: u64 = free.iter().sum();
            let largest = free.iter().copied().max().unwrap_or(0);
            match params.store {
                // Images keep their data in the object store; locally only their write buffer.
                Some(_) => (total, 0),
                None => {
                    let n = u64::from(params.replicas);
                    let per = if free.len() as u64 >= n {
                        let mut f = free.clone();
                        f.sort_unstable_by(|a, b| b.cmp(a));
                        f[n as usize - 1]
                    } else {
                        largest / n.div_ceil(free.len().max(1) as u64)
                    };
                    (total / n, per)
                }
            }
        };
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: available.min(i64::MAX as u64) as i64,
            maximum_volume_size: (largest > 0).then_some(largest.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(names::ALIGN as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Reply<csi::ControllerGetCapabilitiesResponse> {
        // GET_SNAPSHOT (CSI 1.12, alpha) is served but not advertised: csi-sanity 5.4 takes it
        // for an unknown capability.
        let capabilities = [
            Cap::CreateDeleteVolume,
            Cap::PublishUnpublishVolume,
            Cap::ListVolumes,
            Cap::GetCapacity,
            Cap::CreateDeleteSnapshot,
            Cap::ListSnapshots,
            Cap::CloneVolume,
            Cap::PublishReadonly,
            Cap::ExpandVolume,
            Cap::ListVolumesPublishedNodes,
            Cap::VolumeCondition,
            Cap::GetVolume,
            Cap::SingleNodeMultiWriter,
            Cap::ModifyVolume,
        ]
        .into_iter()
        .map(cap)
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Reply<csi::CreateSnapshotResponse> {
        let snapshot = self.snapshot(req.into_inner()).await?;
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Reply<csi::DeleteSnapshotResponse> {
        let r = req.into_inner();
        required("snapshot_id", &r.snapshot_id)?;
        self.delete_snapshot_id(&r.snapshot_id).await?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Reply<csi::ListSnapshotsResponse> {
        let r = req.into_inner();
        let after = names::parse_token("s", &r.starting_token)?;
        let all: Vec<csi::Snapshot> = self
            .snapshots()
            .await?
            .iter()
            .map(csi_snapshot)
            .filter(|s| r.snapshot_id.is_empty() || s.snapshot_id == r.snapshot_id)
            .filter(|s| r.source_volume_id.is_empty() || s.source_volume_id == r.source_volume_id)
            .collect();
        let (page, next_token) =
            names::page(all, |s| s.snapshot_id.as_str(), "s", after, r.max_entries)?;
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries: page
                .into_iter()
                .map(|s| csi::list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Reply<csi::GetSnapshotResponse> {
        let r = req.into_inner();
        required("snapshot_id", &r.snapshot_id)?;
        let (_, s) = self.source_snapshot(&r.snapshot_id).await?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(csi_snapshot(&s)),
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Reply<csi::ControllerExpandVolumeResponse> {
        Ok(Response::new(self.expand(req.into_inner()).await?))
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Reply<csi::ControllerGetVolumeResponse> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        let v = self.csi_volume_by_id(&r.volume_id).await?;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: names::published(&labels(&v)).into_keys().collect(),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Reply<csi::ControllerModifyVolumeResponse> {
        self.modify(req.into_inner()).await?;
        Ok(Response::new(csi::ControllerModifyVolumeResponse {}))
    }
}
