//! The GroupController service: volume group snapshots, page-store snapshots of several images
//! taken at one point (the daemon quiesces writes to all of them meanwhile). A group's ID is
//! `group.NAME`, and each member is the snapshot of that name of its image.

use tonic::{Request, Response, Status};
use tracing::info;

use crate::controller::{csi_snapshot, image_of, Controller};
use crate::csi;
use crate::names;

type Reply<T> = Result<Response<T>, Status>;

impl Controller {
    /// The members of group `id`: every snapshot of that name.
    async fn group(&self, id: &str) -> Result<Vec<csi::Snapshot>, Status> {
        let mut members: Vec<csi::Snapshot> = self
            .daemon
            .all_snapshots()
            .await?
            .iter()
            .filter(|s| s.name == id)
            .map(csi_snapshot)
            .collect();
        members.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        Ok(members)
    }
}

fn group_msg(id: &str, members: Vec<csi::Snapshot>) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: id.to_string(),
        creation_time: members
            .iter()
            .filter_map(|s| s.creation_time)
            .min_by_key(|t| t.seconds),
        snapshots: members,
        ready_to_use: true,
    }
}

#[tonic::async_trait]
impl csi::group_controller_server::GroupController for Controller {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Reply<csi::GroupControllerGetCapabilitiesResponse> {
        use csi::group_controller_service_capability as c;
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(c::Type::Rpc(c::Rpc {
                    r#type: c::rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Reply<csi::CreateVolumeGroupSnapshotResponse> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        if r.source_volume_ids.is_empty() {
            return Err(Status::invalid_argument("source_volume_ids is required"));
        }
        if let Some(k) = r
            .parameters
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/"))
        {
            return Err(Status::invalid_argument(format!(
                "unknown group snapshot parameter {k:?} (there are none)"
            )));
        }
        let id = names::group_id(&r.name);
        let _lock = self.locks.lock(&format!("group/{id}")).await;
        let mut images = Vec::new();
        for v in &r.source_volume_ids {
            let vol = self
                .daemon
                .volume(v)
                .await?
                .filter(crate::controller::is_csi)
                .ok_or_else(|| Status::not_found(format!("no volume {v:?}")))?;
            images.push(image_of(&vol).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "volume {v:?} is a replicated volume: group snapshots are of page-store \
                     volumes"
                ))
            })?);
        }
        let existing = self.group(&id).await?;
        if !existing.is_empty() {
            let mut have: Vec<&str> = existing
                .iter()
                .map(|s| s.source_volume_id.as_str())
                .collect();
            let mut want: Vec<&str> = r.source_volume_ids.iter().map(String::as_str).collect();
            have.sort_unstable();
            want.sort_unstable();
            if have == want {
                return Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group_msg(&id, existing)),
                }));
            }
            return Err(Status::already_exists(format!(
                "group snapshot {:?} exists of other volumes",
                r.name
            )));
        }
        self.daemon.create_group_snapshot(images, &id).await?;
        info!(group = %id, volumes = r.source_volume_ids.len(), "group snapshot taken");
        Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_msg(&id, self.group(&id).await?)),
        }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Reply<csi::DeleteVolumeGroupSnapshotResponse> {
        let r = req.into_inner();
        if r.group_snapshot_id.is_empty() {
            return Err(Status::invalid_argument("group_snapshot_id is required"));
        }
        if !r.group_snapshot_id.starts_with(names::GROUP_PREFIX) {
            return Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}));
        }
        let members = self.group(&r.group_snapshot_id).await?;
        if !r.snapshot_ids.is_empty() {
            let mut have: Vec<&str> = members.iter().map(|s| s.snapshot_id.as_str()).collect();
            let mut given: Vec<&str> = r.snapshot_ids.iter().map(String::as_str).collect();
            have.sort_unstable();
            given.sort_unstable();
            if !given.iter().all(|g| have.contains(g)) {
                return Err(Status::failed_precondition(
                    "snapshot_ids: not the snapshots of this group",
                ));
            }
        }
        for s in members {
            self.delete_snapshot_id(&s.snapshot_id).await?;
        }
        info!(group = %r.group_snapshot_id, "group snapshot deleted");
        Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Reply<csi::GetVolumeGroupSnapshotResponse> {
        let r = req.into_inner();
        if r.group_snapshot_id.is_empty() {
            return Err(Status::invalid_argument("group_snapshot_id is required"));
        }
        let members = if r.group_snapshot_id.starts_with(names::GROUP_PREFIX) {
            self.group(&r.group_snapshot_id).await?
        } else {
            Vec::new()
        };
        if members.is_empty() {
            return Err(Status::not_found(format!(
                "no group snapshot {:?}",
                r.group_snapshot_id
            )));
        }
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_msg(&r.group_snapshot_id, members)),
        }))
    }
}
