//! The Volumes service.

use strata_api::v1 as pb;
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::convert::{decl, volume_msg};
use super::{required, status, Api, Reply};

#[tonic::async_trait]
impl pb::volumes_server::Volumes for Api {
    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Reply<pb::Volume> {
        let caller = caller(&req);
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let m = self
            .manager
            .create(decl(spec)?, &caller)
            .await
            .map_err(status)?;
        Ok(Response::new(volume_msg(&self.manager, &m)))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Reply<pb::Volume> {
        let name = req.into_inner().name;
        required("name", &name)?;
        let m = self.manager.get(&name).map_err(status)?;
        Ok(Response::new(volume_msg(&self.manager, &m)))
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Reply<pb::ListVolumesResponse> {
        let volumes = self
            .manager
            .volumes()
            .iter()
            .map(|m| volume_msg(&self.manager, m))
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Reply<pb::DeleteVolumeResponse> {
        let r = req.into_inner();
        required("name", &r.name)?;
        let message = self
            .manager
            .delete(&r.name, r.delete_image)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteVolumeResponse { message }))
    }

    async fn set_volume_labels(
        &self,
        req: Request<pb::SetVolumeLabelsRequest>,
    ) -> Reply<pb::Volume> {
        let r = req.into_inner();
        required("name", &r.name)?;
        let m = self
            .manager
            .set_labels(&r.name, r.set.into_iter().collect(), &r.remove)
            .await
            .map_err(status)?;
        Ok(Response::new(volume_msg(&self.manager, &m)))
    }

    async fn resize_volume(&self, req: Request<pb::ResizeVolumeRequest>) -> Reply<pb::Volume> {
        let r = req.into_inner();
        required("name", &r.name)?;
        let m = self
            .manager
            .resize(&r.name, r.size, r.force)
            .await
            .map_err(status)?;
        Ok(Response::new(volume_msg(&self.manager, &m)))
    }
}
