//! The Strata daemon as the driver reaches it: its gRPC API (`strata_api`), connected on first
//! use and kept (tonic reconnects a channel by itself). Calls return the daemon's own status
//! codes, which are CSI's codes for the same cases.

use std::collections::HashMap;

use futures_util_lite::drain;
use strata_api::v1 as pb;
use strata_api::{ApiChannel, ClientAuth};
use tokio::sync::Mutex;
use tonic::{Code, Status};

/// A client of one Strata daemon.
#[derive(Debug)]
pub struct Daemon {
    endpoint: String,
    auth: ClientAuth,
    channel: Mutex<Option<ApiChannel>>,
}

/// Draining a server stream without pulling in a stream-combinator crate.
mod futures_util_lite {
    use tonic::Streaming;

    /// Read a stream to its end; its last message.
    pub async fn drain<T>(mut s: Streaming<T>) -> Result<Option<T>, tonic::Status> {
        let mut last = None;
        while let Some(m) = s.message().await? {
            last = Some(m);
        }
        Ok(last)
    }
}

impl Daemon {
    pub fn new(endpoint: String, auth: ClientAuth) -> Daemon {
        Daemon {
            endpoint,
            auth,
            channel: Mutex::new(None),
        }
    }

    async fn channel(&self) -> Result<ApiChannel, Status> {
        let mut c = self.channel.lock().await;
        if let Some(ch) = &*c {
            return Ok(ch.clone());
        }
        let ch = strata_api::connect_with(&self.endpoint, &self.auth)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        *c = Some(ch.clone());
        Ok(ch)
    }

    async fn volumes(&self) -> Result<pb::volumes_client::VolumesClient<ApiChannel>, Status> {
        Ok(pb::volumes_client::VolumesClient::new(
            self.channel().await?,
        ))
    }

    async fn images(&self) -> Result<pb::images_client::ImagesClient<ApiChannel>, Status> {
        Ok(pb::images_client::ImagesClient::new(self.channel().await?))
    }

    /// What the daemon is: its node name and pools.
    pub async fn info(&self) -> Result<pb::NodeInfo, Status> {
        let mut c = pb::node_client::NodeClient::new(self.channel().await?);
        Ok(c.get_info(pb::GetInfoRequest {}).await?.into_inner())
    }

    /// Volume `name`, or `None` when there is none.
    pub async fn volume(&self, name: &str) -> Result<Option<pb::Volume>, Status> {
        match self
            .volumes()
            .await?
            .get_volume(pb::GetVolumeRequest { name: name.into() })
            .await
        {
            Ok(v) => Ok(Some(v.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    pub async fn list_volumes(&self) -> Result<Vec<pb::Volume>, Status> {
        Ok(self
            .volumes()
            .await?
            .list_volumes(pb::ListVolumesRequest {})
            .await?
            .into_inner()
            .volumes)
    }

    pub async fn create_volume(&self, spec: pb::VolumeSpec) -> Result<pb::Volume, Status> {
        Ok(self
            .volumes()
            .await?
            .create_volume(pb::CreateVolumeRequest { spec: Some(spec) })
            .await?
            .into_inner())
    }

    pub async fn delete_volume(&self, name: &str, delete_image: bool) -> Result<(), Status> {
        self.volumes()
            .await?
            .delete_volume(pb::DeleteVolumeRequest {
                name: name.into(),
                delete_image,
            })
            .await?;
        Ok(())
    }

    pub async fn resize_volume(&self, name: &str, size: u64) -> Result<pb::Volume, Status> {
        Ok(self
            .volumes()
            .await?
            .resize_volume(pb::ResizeVolumeRequest {
                name: name.into(),
                size,
                force: false,
            })
            .await?
            .into_inner())
    }

    pub async fn set_labels(
        &self,
        name: &str,
        set: HashMap<String, String>,
        remove: Vec<String>,
    ) -> Result<pb::Volume, Status> {
        Ok(self
            .volumes()
            .await?
            .set_volume_labels(pb::SetVolumeLabelsRequest {
                name: name.into(),
                set,
                remove,
            })
            .await?
            .into_inner())
    }

    pub async fn set_replica_count(&self, volume: &str, count: u32) -> Result<(), Status> {
        pb::children_client::ChildrenClient::new(self.channel().await?)
            .set_replica_count(pb::SetReplicaCountRequest {
                volume: volume.into(),
                count,
            })
            .await?;
        Ok(())
    }

    /// Every snapshot of every image.
    pub async fn all_snapshots(&self) -> Result<Vec<pb::Snapshot>, Status> {
        Ok(self
            .images()
            .await?
            .list_snapshots(pb::ListSnapshotsRequest {
                image: String::new(),
            })
            .await?
            .into_inner()
            .snapshots)
    }

    /// The snapshots of one image (none when it does not exist).
    pub async fn snapshots_of(&self, image: &str) -> Result<Vec<pb::Snapshot>, Status> {
        match self
            .images()
            .await?
            .list_snapshots(pb::ListSnapshotsRequest {
                image: image.into(),
            })
            .await
        {
            Ok(l) => Ok(l.into_inner().snapshots),
            Err(s) if s.code() == Code::NotFound => Ok(Vec::new()),
            Err(s) => Err(s),
        }
    }

    pub async fn create_snapshot(&self, image: &str, name: &str) -> Result<pb::Snapshot, Status> {
        Ok(self
            .images()
            .await?
            .create_snapshot(pb::CreateSnapshotRequest {
                image: image.into(),
                name: name.into(),
            })
            .await?
            .into_inner())
    }

    pub async fn create_group_snapshot(
        &self,
        images: Vec<String>,
        name: &str,
    ) -> Result<pb::GroupSnapshot, Status> {
        Ok(self
            .images()
            .await?
            .create_group_snapshot(pb::CreateGroupSnapshotRequest {
                images,
                name: name.into(),
            })
            .await?
            .into_inner())
    }

    /// Delete `IMAGE@SNAPSHOT`, flattening the clones that read through it first; absent is
    /// not an error.
    pub async fn delete_snapshot(&self, snapshot: &str) -> Result<(), Status> {
        let r = self
            .images()
            .await?
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot: snapshot.into(),
                flatten: true,
            })
            .await;
        let done = match r {
            Ok(s) => drain(s.into_inner()).await.map(|_| ()),
            Err(s) => Err(s),
        };
        match done {
            Err(s) if s.code() == Code::NotFound => Ok(()),
            other => other,
        }
    }

    pub async fn create_clone(&self, snapshot: &str, name: &str) -> Result<pb::Image, Status> {
        Ok(self
            .images()
            .await?
            .create_clone(pb::CreateCloneRequest {
                snapshot: snapshot.into(),
                name: name.into(),
            })
            .await?
            .into_inner())
    }

    /// The images of a store.
    pub async fn images_of(&self, store: &str) -> Result<Vec<pb::Image>, Status> {
        Ok(self
            .images()
            .await?
            .list_images(pb::ListImagesRequest {
                store: store.into(),
            })
            .await?
            .into_inner()
            .images)
    }

    /// Delete an image (absent is not an error).
    pub async fn delete_image(&self, image: &str) -> Result<(), Status> {
        match self
            .images()
            .await?
            .delete_image(pb::DeleteImageRequest {
                image: image.into(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(s),
        }
    }
}
