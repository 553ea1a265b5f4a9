//! The Exports service: which protocols each volume is served over.

use strata_api::v1 as pb;
use tonic::{Request, Response};

use super::convert::{protocol, protocol_msg};
use super::{required, status, Api, Reply};
use crate::daemon::manager::{Managed, Protocol};

impl Api {
    fn export_msg(&self, m: &Managed, p: Protocol) -> pb::Export {
        let d = m.decl();
        pb::Export {
            volume: m.name.clone(),
            protocol: protocol_msg(p) as i32,
            name: m.name.clone(),
            read_only: d.read_only,
            uris: self.manager.exports.addresses(&m.name, &[p].into()),
        }
    }
}

#[tonic::async_trait]
impl pb::exports_server::Exports for Api {
    async fn create_export(&self, req: Request<pb::CreateExportRequest>) -> Reply<pb::Export> {
        let r = req.into_inner();
        let p = protocol(r.protocol)?;
        required("volume", &r.volume)?;
        let m = self
            .manager
            .set_export(&r.volume, p, true, Some(r.read_only), Some(r.description))
            .await
            .map_err(status)?;
        Ok(Response::new(self.export_msg(&m, p)))
    }

    async fn delete_export(
        &self,
        req: Request<pb::DeleteExportRequest>,
    ) -> Reply<pb::DeleteExportResponse> {
        let r = req.into_inner();
        let p = protocol(r.protocol)?;
        required("volume", &r.volume)?;
        self.manager
            .set_export(&r.volume, p, false, None, None)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteExportResponse {
            message: format!(
                "volume {} is no longer exported over {p}; connected clients keep their \
                 connection until they close it",
                r.volume
            ),
        }))
    }

    async fn list_exports(
        &self,
        _: Request<pb::ListExportsRequest>,
    ) -> Reply<pb::ListExportsResponse> {
        let exports = self
            .manager
            .volumes()
            .iter()
            .flat_map(|m| {
                m.decl()
                    .exports
                    .into_iter()
                    .map(|p| self.export_msg(m, p))
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(Response::new(pb::ListExportsResponse { exports }))
    }
}
