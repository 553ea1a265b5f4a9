//! The Identity service: the plugin's name, version and capabilities, and whether it is ready
//! (its Strata daemon answers).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi;
use crate::daemon::Daemon;

/// The driver's name, as Kubernetes' CSIDriver object names it.
pub const DRIVER_NAME: &str = "csi.strata.io";

/// The Identity service.
#[derive(Debug)]
pub struct Identity {
    pub(crate) daemon: Arc<Daemon>,
}

fn service(t: csi::plugin_capability::service::Type) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(
            csi::plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::service::Type as S;
        let online = csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::VolumeExpansion(
                csi::plugin_capability::VolumeExpansion {
                    r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(S::ControllerService),
                service(S::VolumeAccessibilityConstraints),
                service(S::GroupControllerService),
                online,
            ],
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = self.daemon.info().await.is_ok();
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
