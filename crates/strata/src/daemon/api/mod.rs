//! The gRPC API (`strata.v1`, see `crates/api/proto`): one file per service. A handler converts
//! its request into [`Manager`] calls (`convert.rs` holds the conversions between wire messages
//! and domain types) and the result back into a response; the rules live in the manager.
//!
//! | file | service |
//! | --- | --- |
//! | `node.rs` | Node: info, statistics |
//! | `stores.rs` | Stores |
//! | `volumes.rs` | Volumes |
//! | `children.rs` | Children: replicas and rebuilds |
//! | `images.rs` | Images: images, snapshots, clones |
//! | `exports.rs` | Exports |
//! | `specs.rs` | Specs |

pub mod auth;
mod children;
mod convert;
mod exports;
mod images;
pub mod listen;
mod node;
mod specs;
mod stores;
mod volumes;

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use strata_api::v1 as pb;
use tonic::{Response, Status};

use super::manager::{Manager, OpError, OpKind};

type Reply<T> = Result<Response<T>, Status>;
type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::Progress, Status>> + Send>>;

/// Implements every service over one [`Manager`].
#[derive(Clone, Debug)]
pub struct Api {
    manager: Arc<Manager>,
}

impl Api {
    pub fn new(manager: Arc<Manager>) -> Api {
        Api { manager }
    }

    /// Every service, with reflection, as one router; every call is first authorized
    /// ([`auth::authorize`]: the unix socket's owner, a client certificate, or a token).
    pub fn routes(&self, tokens: Arc<auth::Tokens>) -> anyhow::Result<tonic::service::Routes> {
        use pb::children_server::ChildrenServer;
        use pb::exports_server::ExportsServer;
        use pb::images_server::ImagesServer;
        use pb::node_server::NodeServer;
        use pb::specs_server::SpecsServer;
        use pb::stores_server::StoresServer;
        use pb::volumes_server::VolumesServer;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(strata_api::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let auth = || auth::interceptor(tokens.clone());
        let mut b = tonic::service::Routes::builder();
        b.add_service(NodeServer::with_interceptor(self.clone(), auth()))
            .add_service(StoresServer::with_interceptor(self.clone(), auth()))
            .add_service(VolumesServer::with_interceptor(self.clone(), auth()))
            .add_service(ChildrenServer::with_interceptor(self.clone(), auth()))
            .add_service(ImagesServer::with_interceptor(self.clone(), auth()))
            .add_service(ExportsServer::with_interceptor(self.clone(), auth()))
            .add_service(SpecsServer::with_interceptor(self.clone(), auth()))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                reflection,
                auth(),
            ));
        Ok(b.routes())
    }
}

/// The gRPC status for a failed operation.
pub fn status(e: OpError) -> Status {
    let code = match e.kind {
        OpKind::Invalid => tonic::Code::InvalidArgument,
        OpKind::NotFound => tonic::Code::NotFound,
        OpKind::Exists => tonic::Code::AlreadyExists,
        OpKind::Precondition => tonic::Code::FailedPrecondition,
        OpKind::Unavailable => tonic::Code::Unavailable,
        OpKind::Unimplemented => tonic::Code::Unimplemented,
        OpKind::Internal => tonic::Code::Internal,
    };
    Status::new(code, e.message)
}

/// Refuse a request that leaves a required field empty.
fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}
