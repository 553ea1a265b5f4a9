//! The Specs service: apply a declarative spec, or read the last one applied.

use strata_api::v1 as pb;
use tonic::{Request, Response};

use super::auth::caller;
use super::{status, Api, Reply};
use crate::daemon::manager::spec;

#[tonic::async_trait]
impl pb::specs_server::Specs for Api {
    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Reply<pb::ApplyResponse> {
        let caller = caller(&req);
        let r = req.into_inner();
        let actions = spec::apply(&self.manager, &r.spec, r.dry_run, r.prune, &caller)
            .await
            .map_err(status)?;
        let unchanged = actions.iter().all(|a| a.verb == "keep");
        Ok(Response::new(pb::ApplyResponse {
            unchanged,
            actions: actions
                .into_iter()
                .map(|a| pb::Action {
                    verb: a.verb.into(),
                    path: a.path,
                    volume: a.volume,
                    message: a.message,
                    done: a.done,
                })
                .collect(),
        }))
    }

    async fn get_spec(&self, _: Request<pb::GetSpecRequest>) -> Reply<pb::GetSpecResponse> {
        let spec = spec::current(&self.manager).await.map_err(status)?;
        Ok(Response::new(pb::GetSpecResponse { spec }))
    }
}
