//! The gRPC API (`strata.v1`, see `crates/api/proto`): each service turns its requests into
//! [`Manager`] calls and page-store operations, and failures into gRPC codes.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use strata_api::v1 as pb;
use strata_bdev::BlockDevice;
use strata_nexus::{ChildState, Nexus, RebuildKind, RebuildOutcome, RebuildState};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::manager::{BackingDef, Managed, Manager, OpError, OpKind, StoreDesc, VolumeDef};
use crate::volume::{open_device, with_size};

type Reply<T> = Result<Response<T>, Status>;
type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::Progress, Status>> + Send>>;
type RebuildStream = Pin<Box<dyn Stream<Item = Result<pb::Rebuild, Status>> + Send>>;

/// Implements every service over one [`Manager`].
#[derive(Clone)]
pub struct Api {
    manager: Arc<Manager>,
}

impl Api {
    pub fn new(manager: Arc<Manager>) -> Api {
        Api { manager }
    }

    /// Every service, with reflection, as one router.
    pub fn routes(&self) -> anyhow::Result<tonic::service::Routes> {
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
        let mut b = tonic::service::Routes::builder();
        b.add_service(NodeServer::new(self.clone()))
            .add_service(StoresServer::new(self.clone()))
            .add_service(VolumesServer::new(self.clone()))
            .add_service(ChildrenServer::new(self.clone()))
            .add_service(ImagesServer::new(self.clone()))
            .add_service(ExportsServer::new(self.clone()))
            .add_service(SpecsServer::new(self.clone()))
            .add_service(reflection);
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

/// The gRPC status for an error from the page-store helpers: the kind of a device error in
/// its chain decides, else it is a name that does not resolve.
fn any_status(e: anyhow::Error) -> Status {
    let msg = format!("{e:#}");
    match e.downcast_ref::<strata_bdev::Error>() {
        Some(d) => status(OpError::new(OpKind::of(d.kind()), msg)),
        None => Status::not_found(msg),
    }
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Conversions

fn child_state(s: &ChildState) -> (&'static str, String) {
    match s {
        ChildState::Online => ("online", String::new()),
        ChildState::Rebuilding => ("rebuilding", String::new()),
        ChildState::Faulted(r) => ("faulted", r.clone()),
        ChildState::Offline => ("offline", String::new()),
    }
}

fn rebuild_msg(p: &strata_nexus::RebuildProgress) -> pb::Rebuild {
    let (state, error) = match &p.state {
        RebuildState::Running => ("running", None),
        RebuildState::Paused => ("paused", None),
        RebuildState::Done(RebuildOutcome::Completed) => ("completed", None),
        RebuildState::Done(RebuildOutcome::Cancelled) => ("cancelled", None),
        RebuildState::Done(RebuildOutcome::Failed(e)) => ("failed", Some(e.clone())),
    };
    pb::Rebuild {
        kind: match p.kind {
            RebuildKind::Partial => "partial",
            RebuildKind::Full => "full",
        }
        .into(),
        state: state.into(),
        error,
        total_bytes: p.total_bytes,
        done_bytes: p.done_bytes,
        copied_bytes: p.copied_bytes,
        zeroed_bytes: p.zeroed_bytes,
        source: p.source.clone(),
        elapsed_secs: p.elapsed.as_secs_f64(),
        rate_bytes_per_sec: p.rate(),
        eta_secs: p.eta().map(|d| d.as_secs_f64()),
    }
}

fn children(n: &Nexus) -> Vec<pb::Child> {
    n.status()
        .children
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (state, reason) = child_state(&c.state);
            let reason = (!reason.is_empty()).then_some(reason);
            pb::Child {
                index: i as u32,
                uri: c.name.clone(),
                state: state.into(),
                reason,
                dirty_bytes: c.dirty_bytes,
                outstanding: c.outstanding as u64,
                rebuild: c.rebuild.as_ref().map(rebuild_msg),
            }
        })
        .collect()
}

fn spec_msg(d: &VolumeDef) -> pb::VolumeSpec {
    pb::VolumeSpec {
        name: d.name.clone(),
        size: d.size,
        backing: Some(match &d.backing {
            BackingDef::Device(u) => pb::volume_spec::Backing::Device(u.clone()),
            BackingDef::Nexus(r) => pb::volume_spec::Backing::Nexus(pb::NexusSpec {
                replicas: r.clone(),
            }),
            BackingDef::Image(k) => pb::volume_spec::Backing::Image(k.clone()),
        }),
        export: Some(d.export),
        read_only: d.read_only,
        description: d.description.clone(),
    }
}

/// A volume spec from the wire, validated.
pub fn spec_def(s: pb::VolumeSpec) -> Result<VolumeDef, Status> {
    let backing =
        match s.backing {
            Some(pb::volume_spec::Backing::Device(u)) => BackingDef::Device(u),
            Some(pb::volume_spec::Backing::Nexus(n)) => BackingDef::Nexus(n.replicas),
            Some(pb::volume_spec::Backing::Image(k)) => BackingDef::Image(k),
            None => return Err(Status::invalid_argument(
                "spec.backing: give a device URI, a nexus of replicas, or an image (STORE/IMAGE)",
            )),
        };
    let def = VolumeDef {
        name: s.name,
        size: s.size,
        backing,
        export: s.export.unwrap_or(true),
        read_only: s.read_only,
        description: s.description,
        node: String::new(),
    };
    def.validate("spec.").map_err(status)?;
    Ok(def)
}

impl Api {
    fn volume_msg(&self, m: &Managed) -> pb::Volume {
        let def = m.def();
        let v = &m.volume;
        let mut state = "online";
        let children = v.nexus().map(|n| children(n)).unwrap_or_default();
        if children.iter().any(|c| c.state != "online") {
            state = "degraded";
        }
        let image = v.image().map(|i| {
            let (mapped, buffered) = i.mapped_pages();
            let st = i.stats();
            let (store, name) = match &def.backing {
                BackingDef::Image(k) => k.split_once('/').unwrap_or(("", k)),
                _ => ("", ""),
            };
            let fenced = i.fenced();
            if fenced.is_some() {
                state = "fenced";
            }
            let [gets, puts, lists, deletes, errors, retries] = i.store_stats().counts();
            pb::ImageState {
                store: store.into(),
                image: name.into(),
                version: i.version(),
                segments: i.segment_count() as u64,
                mapped_pages: mapped as u64,
                buffered_pages: buffered as u64,
                buffered_bytes: i.buffered_bytes().1,
                checkpoints: st.checkpoints.load(Relaxed),
                compactions: st.compactions.load(Relaxed),
                cache_hits: st.cache_hits.load(Relaxed),
                disk_cache_hits: st.disk_cache_hits.load(Relaxed),
                cache_misses: st.cache_misses.load(Relaxed),
                fenced,
                base: i.base().map(|b| format!("{}@{}", b.image, b.snapshot)),
                store_gets: gets,
                store_puts: puts,
                store_lists: lists,
                store_deletes: deletes,
                store_errors: errors,
                store_retries: retries,
                store_bytes_got: i.store_stats().bytes_got.load(Relaxed),
                store_bytes_put: i.store_stats().bytes_put.load(Relaxed),
            }
        });
        pb::Volume {
            size: m.device.geometry().size,
            kind: def.kind().into(),
            state: state.into(),
            children,
            exports: if def.export {
                self.manager.export_uris(&def.name)
            } else {
                Vec::new()
            },
            from_config: m.from_config,
            image,
            spec: Some(spec_msg(&def)),
        }
    }

    fn nexus(&self, volume: &str) -> Result<(Arc<Managed>, Arc<Nexus>), Status> {
        required("volume", volume)?;
        let m = self.manager.get(volume).map_err(status)?;
        let n = m.volume.nexus().cloned().ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {volume:?} is a {} volume, not a nexus: it has no replicas",
                m.def().kind()
            ))
        })?;
        Ok((m, n))
    }

    /// The child `spec` names (its URI, else its index).
    fn child(n: &Nexus, spec: &str) -> Result<(usize, String), Status> {
        required("child", spec)?;
        let kids = n.status().children;
        if let Some(i) = kids.iter().position(|c| c.name == spec) {
            return Ok((i, spec.to_string()));
        }
        if let Some(i) = spec.parse::<usize>().ok().filter(|&i| i < kids.len()) {
            return Ok((i, kids[i].name.clone()));
        }
        let list: Vec<String> = kids
            .iter()
            .enumerate()
            .map(|(i, c)| format!("#{i} {}", c.name))
            .collect();
        Err(Status::not_found(format!(
            "volume {:?} has no replica {spec:?} (give its index or URI: {})",
            n.name(),
            list.join(", ")
        )))
    }

    fn child_reply(n: &Nexus, index: usize, message: String) -> Reply<pb::ChildResponse> {
        info!("{message}");
        Ok(Response::new(pb::ChildResponse {
            message,
            child: children(n).into_iter().nth(index),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Node

#[tonic::async_trait]
impl pb::node_server::Node for Api {
    async fn get_info(&self, _: Request<pb::GetInfoRequest>) -> Reply<pb::NodeInfo> {
        let m = &self.manager;
        Ok(Response::new(pb::NodeInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            data_dir: m.data_dir.display().to_string(),
            nbd: m.nbd_uris(),
            state_store: m.state.describe(),
            state_store_available: m.state.available().await,
            uptime_secs: m.started.elapsed().as_secs(),
            node_name: m.node.clone(),
            problems: m
                .problems()
                .into_iter()
                .map(|(v, why)| format!("{v}: {why}"))
                .collect(),
        }))
    }

    async fn get_stats(&self, req: Request<pb::GetStatsRequest>) -> Reply<pb::NodeStats> {
        let name = req.into_inner().volume;
        let volumes = if name.is_empty() {
            self.manager.volumes()
        } else {
            vec![self.manager.get(&name).map_err(status)?]
        };
        let volumes = volumes
            .iter()
            .map(|m| {
                let s = m.stats();
                pb::VolumeStats {
                    volume: m.volume.name.clone(),
                    reads: s.reads.requests.load(Relaxed),
                    writes: s.writes.requests.load(Relaxed),
                    flushes: s.flushes.requests.load(Relaxed),
                    trims: s.trims.requests.load(Relaxed),
                    write_zeroes: s.write_zeroes.requests.load(Relaxed),
                    read_bytes: s.reads.bytes.load(Relaxed),
                    write_bytes: s.writes.bytes.load(Relaxed),
                    errors: s.errors(),
                    in_flight: s.in_flight.load(Relaxed),
                    read_nanos: s.read_latency.sum_nanos(),
                    write_nanos: s.write_latency.sum_nanos(),
                }
            })
            .collect();
        Ok(Response::new(pb::NodeStats { volumes }))
    }
}

// ---------------------------------------------------------------------------------------------
// Stores

impl Api {
    async fn store_msg(&self, d: &StoreDesc, with_images: bool) -> Result<pb::Store, Status> {
        let ps = self
            .manager
            .images
            .store(&d.name)
            .map_err(|e| Status::not_found(format!("{e:#}")))?;
        let st = ps.objects.stats();
        let [gets, puts, lists, deletes, errors, retries] = st.counts();
        let images = if with_images {
            self.images_of(&d.name).await?
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

impl Api {
    /// The images of `store`.
    async fn images_of(&self, store: &str) -> Result<Vec<pb::Image>, Status> {
        let ps = self.manager.images.store(store).map_err(any_status)?;
        let cat = ps.catalog().await.map_err(|e| status(e.into()))?;
        let mut images = Vec::new();
        for (name, e) in &cat.images {
            let Some(m) = &e.latest else { continue };
            images.push(pb::Image {
                store: store.to_string(),
                name: name.clone(),
                size: m.image_size,
                page_size: 1 << m.page_size_bits,
                version: m.version,
                base: m
                    .base
                    .as_ref()
                    .map(|b| format!("{}@{}", b.image, b.snapshot)),
                snapshots: e.snapshots.iter().filter(|s| s.deleted.is_none()).count() as u32,
                stored_bytes: cat.stored_bytes(name),
                open: self.manager.images.if_open(store, name).await.is_some(),
            });
        }
        Ok(images)
    }
}

#[tonic::async_trait]
impl pb::stores_server::Stores for Api {
    async fn list_stores(
        &self,
        _: Request<pb::ListStoresRequest>,
    ) -> Reply<pb::ListStoresResponse> {
        let mut stores = Vec::new();
        for d in self.manager.stores() {
            stores.push(self.store_msg(&d, false).await?);
        }
        Ok(Response::new(pb::ListStoresResponse { stores }))
    }

    async fn get_store(&self, req: Request<pb::GetStoreRequest>) -> Reply<pb::Store> {
        let name = req.into_inner().name;
        required("name", &name)?;
        let stores = self.manager.stores();
        let Some(d) = stores.iter().find(|d| d.name == name) else {
            let names: Vec<&str> = stores.iter().map(|d| d.name.as_str()).collect();
            return Err(Status::not_found(format!(
                "no store {name:?} (stores: {})",
                names.join(", ")
            )));
        };
        Ok(Response::new(self.store_msg(d, true).await?))
    }

    async fn create_store(&self, req: Request<pb::CreateStoreRequest>) -> Reply<pb::Store> {
        let r = req.into_inner();
        required("name", &r.name)?;
        let def = match r.kind {
            Some(pb::create_store_request::Kind::Dir(d)) => {
                required("dir.path", &d.path)?;
                if !d.path.starts_with('/') {
                    return Err(Status::invalid_argument(format!(
                        "dir.path: {:?} is not an absolute path",
                        d.path
                    )));
                }
                strata_pagestore::StoreConfig::Dir {
                    path: d.path.into(),
                }
            }
            Some(pb::create_store_request::Kind::S3(s)) => {
                let opt = |v: String| (!v.is_empty()).then_some(v);
                strata_pagestore::StoreConfig::S3 {
                    endpoint: opt(s.endpoint),
                    region: opt(s.region).unwrap_or_else(|| "us-east-1".into()),
                    bucket: s.bucket,
                    prefix: s.prefix,
                    access_key_id: opt(s.access_key_id),
                    secret_access_key: opt(s.secret_access_key),
                }
            }
            None => {
                return Err(Status::invalid_argument(
                    "kind: give dir { path } or s3 { endpoint, bucket, … }",
                ))
            }
        };
        let d = self
            .manager
            .create_store(&r.name, def)
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

// ---------------------------------------------------------------------------------------------
// Volumes

#[tonic::async_trait]
impl pb::volumes_server::Volumes for Api {
    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Reply<pb::Volume> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let def = spec_def(spec)?;
        let m = self.manager.create(def).await.map_err(status)?;
        Ok(Response::new(self.volume_msg(&m)))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Reply<pb::Volume> {
        let name = req.into_inner().name;
        required("name", &name)?;
        let m = self.manager.get(&name).map_err(status)?;
        Ok(Response::new(self.volume_msg(&m)))
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Reply<pb::ListVolumesResponse> {
        let volumes = self
            .manager
            .volumes()
            .iter()
            .map(|m| self.volume_msg(m))
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

    async fn resize_volume(&self, req: Request<pb::ResizeVolumeRequest>) -> Reply<pb::Volume> {
        let r = req.into_inner();
        required("name", &r.name)?;
        let m = self
            .manager
            .resize(&r.name, r.size, r.force)
            .await
            .map_err(status)?;
        Ok(Response::new(self.volume_msg(&m)))
    }
}

// ---------------------------------------------------------------------------------------------
// Children

#[tonic::async_trait]
impl pb::children_server::Children for Api {
    async fn add_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        required("child", &r.child)?;
        strata_bdev::DeviceUri::parse(&r.child)
            .map_err(|e| Status::invalid_argument(format!("child: {}", e.chain())))?;
        // A new file or memory replica is made as large as the volume.
        let size = Some(n.geometry().size);
        let _changing = self.manager.change_lock().await;
        self.manager
            .check_declarable(&r.volume)
            .await
            .map_err(status)?;
        let dev = open_device(&self.manager.registry, &with_size(&r.child, size))
            .await
            .map_err(|e| {
                let e = OpError::from(e);
                status(OpError::new(
                    e.kind,
                    format!("add replica to {:?}: {}", r.volume, e.message),
                ))
            })?;
        n.add_child(r.child.clone(), dev)
            .map_err(|e| status(e.into()))?;
        n.save_record()
            .await
            .map_err(|e| Status::internal(format!("save the nexus record: {e}")))?;
        if let Err(e) = self.manager.replicas_changed(&r.volume).await {
            // Not declared, it would be removed again by reconciliation: undo it now.
            let _ = n.remove_child(&r.child);
            let _ = n.save_record().await;
            return Err(status(e));
        }
        let (i, _) = Self::child(&n, &r.child)?;
        Self::child_reply(
            &n,
            i,
            format!(
                "volume {}: replica {} added; full rebuild of {} started",
                r.volume,
                r.child,
                crate::cli::human_bytes(n.geometry().size)
            ),
        )
    }

    async fn remove_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        let _changing = self.manager.change_lock().await;
        self.manager
            .check_declarable(&r.volume)
            .await
            .map_err(status)?;
        n.remove_child(&name).map_err(|e| status(e.into()))?;
        n.save_record()
            .await
            .map_err(|e| Status::internal(format!("save the nexus record: {e}")))?;
        self.manager
            .replicas_changed(&r.volume)
            .await
            .map_err(status)?;
        let message = format!("volume {}: replica #{i} {name} removed", r.volume);
        info!("{message}");
        Ok(Response::new(pb::ChildResponse {
            message,
            child: None,
        }))
    }

    async fn offline_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        n.offline_child(&name).map_err(|e| status(e.into()))?;
        n.save_record()
            .await
            .map_err(|e| Status::internal(format!("save the nexus record: {e}")))?;
        Self::child_reply(
            &n,
            i,
            format!("volume {}: replica #{i} {name} is offline", r.volume),
        )
    }

    async fn online_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        self.manager.online(&n, &name).await.map_err(status)?;
        let what = match n.status().child(&name).and_then(|c| c.rebuild.clone()) {
            Some(p) => format!(
                "{} rebuild of {} started",
                match p.kind {
                    RebuildKind::Partial => "partial",
                    RebuildKind::Full => "full",
                },
                crate::cli::human_bytes(p.total_bytes)
            ),
            None => "rebuild started".into(),
        };
        Self::child_reply(
            &n,
            i,
            format!("volume {}: replica #{i} {name}: {what}", r.volume),
        )
    }

    async fn fault_child(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        let reason = if r.reason.is_empty() {
            "faulted by the operator".to_string()
        } else {
            r.reason
        };
        n.fault_child(&name, reason).map_err(|e| status(e.into()))?;
        n.save_record()
            .await
            .map_err(|e| Status::internal(format!("save the nexus record: {e}")))?;
        Self::child_reply(
            &n,
            i,
            format!("volume {}: replica #{i} {name} is faulted", r.volume),
        )
    }

    async fn start_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.get_ref();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        match n.status().child(&name).map(|c| &c.state) {
            Some(ChildState::Online) => {
                return Err(Status::failed_precondition(format!(
                    "replica #{i} of {} is online: nothing to rebuild (offline it first to \
                     rebuild it)",
                    r.volume
                )))
            }
            Some(ChildState::Rebuilding) => {
                return Err(Status::failed_precondition(format!(
                    "replica #{i} of {} is being rebuilt already (`strata rebuild watch`)",
                    r.volume
                )))
            }
            _ => {}
        }
        pb::children_server::Children::online_child(self, req).await
    }

    async fn pause_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        n.pause_rebuild(&name).map_err(|e| status(e.into()))?;
        Self::child_reply(
            &n,
            i,
            format!("volume {}: rebuild of replica #{i} paused", r.volume),
        )
    }

    async fn resume_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        n.resume_rebuild(&name).map_err(|e| status(e.into()))?;
        Self::child_reply(
            &n,
            i,
            format!("volume {}: rebuild of replica #{i} resumed", r.volume),
        )
    }

    async fn cancel_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::ChildResponse> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        n.cancel_rebuild(&name).map_err(|e| status(e.into()))?;
        Self::child_reply(
            &n,
            i,
            format!(
                "volume {}: rebuild of replica #{i} cancelled; it goes offline",
                r.volume
            ),
        )
    }

    async fn get_rebuild(&self, req: Request<pb::ChildRequest>) -> Reply<pb::Rebuild> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        let st = n.status();
        let p = st
            .child(&name)
            .and_then(|c| c.rebuild.as_ref())
            .ok_or_else(|| {
                Status::not_found(format!(
                    "replica #{i} of {} has had no rebuild since the daemon started",
                    r.volume
                ))
            })?;
        Ok(Response::new(rebuild_msg(p)))
    }

    type WatchRebuildStream = RebuildStream;

    async fn watch_rebuild(
        &self,
        req: Request<pb::WatchRebuildRequest>,
    ) -> Reply<Self::WatchRebuildStream> {
        let r = req.into_inner();
        let (_, n) = self.nexus(&r.volume)?;
        let (i, name) = Self::child(&n, &r.child)?;
        if n.status()
            .child(&name)
            .and_then(|c| c.rebuild.as_ref())
            .is_none()
        {
            return Err(Status::not_found(format!(
                "replica #{i} of {} has had no rebuild since the daemon started",
                r.volume
            )));
        }
        let interval = Duration::from_millis(u64::from(match r.interval_ms {
            0 => 500,
            ms => ms.clamp(10, 60_000),
        }));
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let st = n.status();
                let Some(p) = st.child(&name).and_then(|c| c.rebuild.clone()) else {
                    let _ = tx
                        .send(Err(Status::not_found("the replica was removed")))
                        .await;
                    return;
                };
                let finished = matches!(p.state, RebuildState::Done(_));
                if tx.send(Ok(rebuild_msg(&p))).await.is_err() || finished {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// Run `work` (which reports `(done, total)`) in the background, streaming its progress and
/// then a final message with `finished` set, or its error.
fn progress_stream<F, Fut>(work: F) -> ProgressStream
where
    F: FnOnce(mpsc::UnboundedSender<(u64, u64)>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<String, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let fut = work(ptx);
        tokio::pin!(fut);
        let mut last = (0, 0);
        let result = loop {
            tokio::select! {
                r = &mut fut => break r,
                Some((done, total)) = prx.recv() => {
                    last = (done, total);
                    // A slow reader misses updates rather than slowing the work.
                    let _ = tx.try_send(Ok(pb::Progress { done, total, finished: false, message: String::new() }));
                }
            }
        };
        let _ = tx
            .send(result.map(|message| pb::Progress {
                done: last.0.max(last.1),
                total: last.1,
                finished: true,
                message,
            }))
            .await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn split_snapshot(s: &str) -> Result<(&str, &str), Status> {
    required("snapshot", s)?;
    s.rsplit_once('@').ok_or_else(|| {
        Status::invalid_argument(format!("snapshot {s:?}: name a snapshot as IMAGE@SNAPSHOT"))
    })
}

#[tonic::async_trait]
impl pb::images_server::Images for Api {
    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Reply<pb::ListImagesResponse> {
        let store = req.into_inner().store;
        let stores: Vec<String> = if store.is_empty() {
            self.manager.stores().into_iter().map(|d| d.name).collect()
        } else {
            vec![store]
        };
        let mut images = Vec::new();
        for s in stores {
            images.extend(self.images_of(&s).await?);
        }
        Ok(Response::new(pb::ListImagesResponse { images }))
    }

    async fn resize_image(
        &self,
        req: Request<pb::ResizeImageRequest>,
    ) -> Reply<pb::ResizeImageResponse> {
        let r = req.into_inner();
        required("image", &r.image)?;
        let images = &self.manager.images;
        let (store, img) = images.key(&r.image).map_err(any_status)?;
        // An image volume is resized as a volume, so that its declaration follows.
        let volume = self
            .manager
            .volumes()
            .into_iter()
            .find(|m| m.def().backing == BackingDef::Image(format!("{store}/{img}")));
        let i = match volume {
            Some(m) => {
                self.manager
                    .resize(&m.volume.name, r.size, r.force)
                    .await
                    .map_err(status)?;
                m.volume.image().expect("an image volume").clone()
            }
            None => {
                let i = images.image(&store, &img, None).await.map_err(any_status)?;
                let old = i.geometry().size;
                if r.size < old && !r.force {
                    return Err(Status::failed_precondition(format!(
                        "shrinking image {store}/{img} from {old} to {} bytes discards the data \
                         beyond the new end; pass force to do it",
                        r.size
                    )));
                }
                i.resize(r.size, r.force)
                    .await
                    .map_err(|e| status(e.into()))?;
                i
            }
        };
        let size = i.geometry().size;
        let message = format!(
            "image {store}/{img} is now {}; clients see the new size when they reconnect",
            crate::cli::human_bytes(size)
        );
        info!("{message}");
        Ok(Response::new(pb::ResizeImageResponse { size, message }))
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> Reply<pb::DeleteImageResponse> {
        let r = req.into_inner();
        required("image", &r.image)?;
        let images = &self.manager.images;
        let (store, img) = images.key(&r.image).map_err(any_status)?;
        images
            .close(&store, &img)
            .await
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        images
            .store(&store)
            .map_err(any_status)?
            .delete_image(&img)
            .await
            .map_err(|e| status(e.into()))?;
        let message = format!(
            "image {store}/{img} deleted with its snapshots; `strata gc` frees its data after \
             the grace period"
        );
        info!("{message}");
        Ok(Response::new(pb::DeleteImageResponse { message }))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Reply<pb::Snapshot> {
        let r = req.into_inner();
        required("image", &r.image)?;
        required("name", &r.name)?;
        let images = &self.manager.images;
        let (store, img) = images.key(&r.image).map_err(any_status)?;
        let i = images.image(&store, &img, None).await.map_err(any_status)?;
        let rec = i.snapshot(&r.name).await.map_err(|e| status(e.into()))?;
        info!(image = %format!("{store}/{img}"), snapshot = %r.name, "snapshot taken");
        Ok(Response::new(pb::Snapshot {
            image: format!("{store}/{img}"),
            name: rec.snapshot,
            version: rec.version,
            size: rec.image_size,
            created: rec.created,
            exclusive_bytes: 0,
        }))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Reply<pb::ListSnapshotsResponse> {
        let r = req.into_inner();
        required("image", &r.image)?;
        let images = &self.manager.images;
        let (store, img) = images.key(&r.image).map_err(any_status)?;
        let cat = images
            .store(&store)
            .map_err(any_status)?
            .catalog()
            .await
            .map_err(|e| status(e.into()))?;
        if cat.images.get(&img).is_none_or(|e| e.latest.is_none()) {
            return Err(Status::not_found(format!(
                "no image {img} in store {store}"
            )));
        }
        let snapshots = cat
            .snapshots(&img)
            .into_iter()
            .map(|s| pb::Snapshot {
                image: format!("{store}/{img}"),
                name: s.name,
                version: s.version,
                size: s.size,
                created: s.created,
                exclusive_bytes: s.exclusive_bytes,
            })
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    type DeleteSnapshotStream = ProgressStream;

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Reply<Self::DeleteSnapshotStream> {
        let r = req.into_inner();
        let (image, snap) = split_snapshot(&r.snapshot)?;
        let images = self.manager.images.clone();
        let (store, img) = images.key(image).map_err(any_status)?;
        let snap = snap.to_string();
        if images.snapshot_open(&store, &img, &snap).await {
            return Err(Status::failed_precondition(format!(
                "snapshot {store}/{img}@{snap} is exported to clients; disconnect them first"
            )));
        }
        let ps = images.store(&store).map_err(any_status)?;
        // Check it exists before streaming, so that a wrong name fails the call itself.
        let cat = ps.catalog().await.map_err(|e| status(e.into()))?;
        let rec = cat
            .images
            .get(&img)
            .and_then(|e| {
                e.snapshots
                    .iter()
                    .find(|s| s.snapshot == snap && s.deleted.is_none())
            })
            .ok_or_else(|| Status::not_found(format!("no snapshot {store}/{img}@{snap}")))?;
        let deps = cat.dependents(&img, rec.version);
        if deps.iter().any(|d| d.contains('@')) {
            return Err(Status::failed_precondition(format!(
                "snapshots of clones read through {store}/{img}@{snap}: {}; delete them first \
                 (a snapshot cannot be flattened)",
                deps.iter()
                    .filter(|d| d.contains('@'))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !deps.is_empty() && !r.flatten {
            return Err(Status::failed_precondition(format!(
                "clones read through {store}/{img}@{snap}: {}; delete them, or pass flatten to \
                 make them stand alone first",
                deps.join(", ")
            )));
        }
        Ok(Response::new(progress_stream(move |progress| async move {
            for c in deps {
                info!(clone = %c, "flattening before the snapshot is deleted");
                let i = images.image(&store, &c, None).await.map_err(any_status)?;
                let p = progress.clone();
                i.flatten(&move |done, total| {
                    let _ = p.send((done, total));
                })
                .await
                .map_err(|e| status(e.into()))?;
            }
            images
                .store(&store)
                .map_err(any_status)?
                .delete_snapshot(&img, &snap)
                .await
                .map_err(|e| status(e.into()))?;
            images.forget_snapshot(&store, &img, &snap).await;
            let message = format!(
                "snapshot {store}/{img}@{snap} deleted; `strata gc` frees its data after the \
                 grace period"
            );
            info!("{message}");
            Ok(message)
        })))
    }

    async fn create_clone(&self, req: Request<pb::CreateCloneRequest>) -> Reply<pb::Image> {
        let r = req.into_inner();
        let (image, snap) = split_snapshot(&r.snapshot)?;
        required("name", &r.name)?;
        let images = &self.manager.images;
        let (store, img) = images.key(image).map_err(any_status)?;
        let new = match r.name.split_once('/') {
            Some((s, n)) if s == store => n.to_string(),
            Some((s, _)) => {
                return Err(Status::invalid_argument(format!(
                    "name: a clone lives in its snapshot's store ({store}), not in {s}"
                )))
            }
            None => r.name.clone(),
        };
        let ps = images.store(&store).map_err(any_status)?;
        let m = ps
            .create_clone(&img, snap, &new)
            .await
            .map_err(|e| status(e.into()))?;
        let stored_bytes = ps
            .catalog()
            .await
            .map(|c| c.stored_bytes(&new))
            .unwrap_or_default();
        info!(clone = %format!("{store}/{new}"), of = %r.snapshot, "clone created");
        Ok(Response::new(pb::Image {
            store: store.clone(),
            name: new,
            size: m.image_size,
            page_size: 1 << m.page_size_bits,
            version: m.version,
            base: Some(format!("{img}@{snap}")),
            snapshots: 0,
            stored_bytes,
            open: false,
        }))
    }

    type FlattenImageStream = ProgressStream;

    async fn flatten_image(
        &self,
        req: Request<pb::FlattenImageRequest>,
    ) -> Reply<Self::FlattenImageStream> {
        let r = req.into_inner();
        required("image", &r.image)?;
        let images = &self.manager.images;
        let (store, img) = images.key(&r.image).map_err(any_status)?;
        let i = images.image(&store, &img, None).await.map_err(any_status)?;
        let Some(base) = i.base() else {
            return Err(Status::failed_precondition(format!(
                "image {store}/{img} is not a clone: nothing to flatten"
            )));
        };
        Ok(Response::new(progress_stream(move |progress| async move {
            i.flatten(&move |done, total| {
                let _ = progress.send((done, total));
            })
            .await
            .map_err(|e| status(e.into()))?;
            Ok(format!(
                "image {store}/{img} flattened: it no longer reads through {}@{}",
                base.image, base.snapshot
            ))
        })))
    }
}

// ---------------------------------------------------------------------------------------------
// Exports

fn protocol(p: i32) -> Result<pb::Protocol, Status> {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Unspecified) | Ok(pb::Protocol::Nbd) => Ok(pb::Protocol::Nbd),
        Err(_) => Err(Status::invalid_argument(format!(
            "protocol: {p} is not a protocol this daemon knows (NBD is 1)"
        ))),
    }
}

impl Api {
    fn export_msg(&self, m: &Managed) -> pb::Export {
        let def = m.def();
        pb::Export {
            volume: def.name.clone(),
            protocol: pb::Protocol::Nbd as i32,
            name: def.name.clone(),
            read_only: def.read_only,
            uris: self.manager.export_uris(&def.name),
        }
    }
}

#[tonic::async_trait]
impl pb::exports_server::Exports for Api {
    async fn create_export(&self, req: Request<pb::CreateExportRequest>) -> Reply<pb::Export> {
        let r = req.into_inner();
        protocol(r.protocol)?;
        required("volume", &r.volume)?;
        let m = self
            .manager
            .set_export(&r.volume, true, Some(r.read_only), Some(r.description))
            .await
            .map_err(status)?;
        Ok(Response::new(self.export_msg(&m)))
    }

    async fn delete_export(
        &self,
        req: Request<pb::DeleteExportRequest>,
    ) -> Reply<pb::DeleteExportResponse> {
        let r = req.into_inner();
        protocol(r.protocol)?;
        required("volume", &r.volume)?;
        self.manager
            .set_export(&r.volume, false, None, None)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteExportResponse {
            message: format!(
                "volume {} is no longer exported over NBD; connected clients keep their \
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
            .filter(|m| m.def().export)
            .map(|m| self.export_msg(m))
            .collect();
        Ok(Response::new(pb::ListExportsResponse { exports }))
    }
}

// ---------------------------------------------------------------------------------------------
// Specs

#[tonic::async_trait]
impl pb::specs_server::Specs for Api {
    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Reply<pb::ApplyResponse> {
        let r = req.into_inner();
        let actions = crate::spec::apply(&self.manager, &r.spec, r.dry_run, r.prune)
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
        let spec = crate::spec::current(&self.manager).await.map_err(status)?;
        Ok(Response::new(pb::GetSpecResponse { spec }))
    }
}
