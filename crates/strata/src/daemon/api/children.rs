//! The Children service: a nexus volume's replicas and their rebuilds.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use strata_api::v1 as pb;
use strata_nexus::RebuildState;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::convert::{children, rebuild_msg};
use super::{required, status, Api, Reply};
use crate::daemon::manager::{ChildRef, OpResult};

type RebuildStream = Pin<Box<dyn Stream<Item = Result<pb::Rebuild, Status>> + Send>>;

impl Api {
    /// The reply to a call that changed replica `c` of `volume`.
    fn child_reply(
        &self,
        volume: &str,
        done: OpResult<(ChildRef, String)>,
    ) -> Reply<pb::ChildResponse> {
        let (c, message) = done.map_err(status)?;
        let (_, n) = self.manager.nexus_of(volume).map_err(status)?;
        Ok(Response::new(pb::ChildResponse {
            message,
            child: children(&n).into_iter().nth(c.index),
        }))
    }
}

/// The volume and replica a request names, both required.
fn names(r: &pb::ChildRequest) -> Result<(&str, &str), Status> {
    required("volume", &r.volume)?;
    required("child", &r.child)?;
    Ok((&r.volume, &r.child))
}

#[tonic::async_trait]
impl pb::children_server::Children for Api {
    async fn add_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let caller = caller(&req);
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        let done = self.manager.add_child(v, c, &caller).await;
        self.child_reply(v, done)
    }

    async fn set_replica_count(
        &self,
        req: Request<pb::SetReplicaCountRequest>,
    ) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        required("volume", &r.volume)?;
        let message = self
            .manager
            .set_replica_count(&r.volume, r.count)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ChildResponse {
            message,
            child: None,
        }))
    }

    async fn remove_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        let message = self.manager.remove_child(v, c).await.map_err(status)?;
        Ok(Response::new(pb::ChildResponse {
            message,
            child: None,
        }))
    }

    async fn offline_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        let done = self.manager.offline_child(v, c).await;
        self.child_reply(v, done)
    }

    async fn online_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        let done = self.manager.online_child(v, c).await;
        self.child_reply(v, done)
    }

    async fn fault_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        let done = self.manager.fault_child(v, c, Some(r.reason.clone())).await;
        self.child_reply(v, done)
    }

    async fn start_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        let done = self.manager.start_rebuild(v, c).await;
        self.child_reply(v, done)
    }

    async fn pause_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        self.child_reply(v, self.manager.pause_rebuild(v, c))
    }

    async fn resume_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        self.child_reply(v, self.manager.resume_rebuild(v, c))
    }

    async fn cancel_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        self.child_reply(v, self.manager.cancel_rebuild(v, c))
    }

    async fn get_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::Rebuild> {
        let r = req.into_inner();
        let (v, c) = names(&r)?;
        let (_, _, p) = self.manager.rebuild(v, c).map_err(status)?;
        Ok(Response::new(rebuild_msg(&p)))
    }

    type WatchRebuildStream = RebuildStream;

    async fn watch_rebuild(
        &self,
        req: Request<pb::WatchRebuildRequest>,
    ) -> Reply<Self::WatchRebuildStream> {
        let r = req.into_inner();
        required("volume", &r.volume)?;
        required("child", &r.child)?;
        let (n, c, _) = self.manager.rebuild(&r.volume, &r.child).map_err(status)?;
        let interval = Duration::from_millis(u64::from(match r.interval_ms {
            0 => 500,
            ms => ms.clamp(10, 60_000),
        }));
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let st = n.status();
                let Some(p) = st.child(&c.uri).and_then(|s| s.rebuild.clone()) else {
                    let _ = tx
                        .send(Err(Status::not_found("the replica was removed")))
                        .await;
                    return;
                };
                let finished = matches!(p.state, RebuildState::Done(_));
                if tx.send(Ok(rebuild_msg(&p))).await.is_err() || finished {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
