//! The Stores service: page stores, listed, created (directory or S3) and deleted.

use std::sync::atomic::Ordering::Relaxed;

use strata_api::v1 as pb;
use strata_pagestore::StoreConfig;
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::convert::image_msg;
use super::{required, status, Api, Reply};
use crate::daemon::manager::StoreDesc;

impl Api {
    async fn store_msg(&self, d: &StoreDesc, with_images: bool) -> Result<pb::Store, Status> {
        let st = self
            .manager
            .stores
            .get(&d.name)
            .map_err(|e| status(e.into()))?;
        let st = st.objects.stats();
        let [gets, puts, lists, deletes, errors, retries] = st.counts();
        let images = if with_images {
            self.manager
                .list_images(Some(&d.name))
                .await
                .map_err(status)?
                .into_iter()
                .map(image_msg)
                .collect()
        } else {
            Vec::new()
        };
        Ok(pb::Store {
            name: d.name.clone(),
            kind: d.kind.clone(),
            location: d.location.clone(),
            gets,
            puts,
            lists,
            deletes,
            errors,
            retries,
            bytes_got: st.bytes_got.load(Relaxed),
            bytes_put: st.bytes_put.load(Relaxed),
            images,
            from_config: d.from_config,
        })
    }
}

/// A store's settings from the wire.
fn store_config(kind: Option<pb::create_store_request::Kind>) -> Result<StoreConfig, Status> {
    match kind {
        Some(pb::create_store_request::Kind::Dir(d)) => {
            required("dir.path", &d.path)?;
            Ok(StoreConfig::Dir {
                path: d.path.into(),
            })
        }
        Some(pb::create_store_request::Kind::S3(s)) => {
            let opt = |v: String| (!v.is_empty()).then_some(v);
            Ok(StoreConfig::S3 {
                endpoint: opt(s.endpoint),
                region: opt(s.region).unwrap_or_else(|| "us-east-1".into()),
                bucket: s.bucket,
                prefix: s.prefix,
                access_key_id: opt(s.access_key_id),
                secret_access_key: opt(s.secret_access_key),
            })
        }
        None => Err(Status::invalid_argument(
            "kind: give dir { path } or s3 { endpoint, bucket, … }",
        )),
    }
}

#[tonic::async_trait]
impl pb::stores_server::Stores for Api {
    async fn list_stores(
        &self,
        _: Request<pb::ListStoresRequest>,
    ) -> Reply<pb::ListStoresResponse> {
        let mut stores = Vec::new();
        for d in self.manager.stores.list() {
            stores.push(self.store_msg(&d, false).await?);
        }
        Ok(Response::new(pb::ListStoresResponse { stores }))
    }

    async fn get_store(&self, req: Request<pb::GetStoreRequest>) -> Reply<pb::Store> {
        let name = req.into_inner().name;
        required("name", &name)?;
        let Some(d) = self.manager.stores.describe(&name) else {
            return Err(Status::not_found(format!(
                "no store {name:?} (stores: {})",
                self.manager.stores.names().join(", ")
            )));
        };
        Ok(Response::new(self.store_msg(&d, true).await?))
    }

    async fn create_store(&self, req: Request<pb::CreateStoreRequest>) -> Reply<pb::Store> {
        let caller = caller(&req);
        let r = req.into_inner();
        required("name", &r.name)?;
        let sc = store_config(r.kind)?;
        let d = self
            .manager
            .create_store(&r.name, sc, &caller)
            .await
            .map_err(status)?;
        Ok(Response::new(self.store_msg(&d, false).await?))
    }

    async fn delete_store(
        &self,
        req: Request<pb::DeleteStoreRequest>,
    ) -> Reply<pb::DeleteStoreResponse> {
        let name = req.into_inner().name;
        required("name", &name)?;
        let message = self.manager.delete_store(&name).await.map_err(status)?;
        Ok(Response::new(pb::DeleteStoreResponse { message }))
    }
}
