//! The Images service: page-store images, their snapshots and clones.

use strata_api::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response};

use super::convert::{image_msg, snapshot_msg};
use super::{required, status, Api, ProgressStream, Reply};
use crate::daemon::manager::OpResult;

/// Run `work` (which reports `(done, total)`) in the background, streaming its progress and
/// then a final message with `finished` set, or its error.
fn progress_stream<F, Fut>(work: F) -> ProgressStream
where
    F: FnOnce(mpsc::UnboundedSender<(u64, u64)>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = OpResult<String>> + Send + 'static,
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
            .send(
                result
                    .map(|message| pb::Progress {
                        done: last.0.max(last.1),
                        total: last.1,
                        finished: true,
                        message,
                    })
                    .map_err(status),
            )
            .await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::images_server::Images for Api {
    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Reply<pb::ListImagesResponse> {
        let store = req.into_inner().store;
        let store = (!store.is_empty()).then_some(store.as_str());
        let images = self.manager.list_images(store).await.map_err(status)?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images.into_iter().map(image_msg).collect(),
        }))
    }

    async fn resize_image(
        &self,
        req: Request<pb::ResizeImageRequest>,
    ) -> Reply<pb::ResizeImageResponse> {
        let r = req.into_inner();
        required("image", &r.image)?;
        let (key, message) = self
            .manager
            .resize_image(&r.image, r.size, r.force)
            .await
            .map_err(status)?;
        let image = self
            .manager
            .images
            .image(&key, None)
            .await
            .map_err(status)?;
        let size = strata_bdev::BlockDevice::geometry(&*image).size;
        Ok(Response::new(pb::ResizeImageResponse { size, message }))
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> Reply<pb::DeleteImageResponse> {
        let r = req.into_inner();
        required("image", &r.image)?;
        let message = self.manager.delete_image(&r.image).await.map_err(status)?;
        Ok(Response::new(pb::DeleteImageResponse { message }))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Reply<pb::Snapshot> {
        let r = req.into_inner();
        required("image", &r.image)?;
        required("name", &r.name)?;
        let s = self
            .manager
            .create_snapshot(&r.image, &r.name)
            .await
            .map_err(status)?;
        Ok(Response::new(snapshot_msg(s)))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Reply<pb::ListSnapshotsResponse> {
        let r = req.into_inner();
        let snapshots = if r.image.is_empty() {
            self.manager.list_all_snapshots().await
        } else {
            self.manager.list_snapshots(&r.image).await
        }
        .map_err(status)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snapshots.into_iter().map(snapshot_msg).collect(),
        }))
    }

    async fn create_group_snapshot(
        &self,
        req: Request<pb::CreateGroupSnapshotRequest>,
    ) -> Reply<pb::GroupSnapshot> {
        let r = req.into_inner();
        required("name", &r.name)?;
        let snapshots = self
            .manager
            .create_group_snapshot(&r.images, &r.name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GroupSnapshot {
            name: r.name,
            snapshots: snapshots.into_iter().map(snapshot_msg).collect(),
        }))
    }

    type DeleteSnapshotStream = ProgressStream;

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Reply<Self::DeleteSnapshotStream> {
        let r = req.into_inner();
        required("snapshot", &r.snapshot)?;
        let deletion = self
            .manager
            .plan_snapshot_deletion(&r.snapshot, r.flatten)
            .await
            .map_err(status)?;
        Ok(Response::new(progress_stream(move |progress| async move {
            deletion
                .run(&move |done, total| {
                    let _ = progress.send((done, total));
                })
                .await
        })))
    }

    async fn create_clone(&self, req: Request<pb::CreateCloneRequest>) -> Reply<pb::Image> {
        let r = req.into_inner();
        required("snapshot", &r.snapshot)?;
        required("name", &r.name)?;
        let i = self
            .manager
            .create_clone(&r.snapshot, &r.name)
            .await
            .map_err(status)?;
        Ok(Response::new(image_msg(i)))
    }

    type FlattenImageStream = ProgressStream;

    async fn flatten_image(
        &self,
        req: Request<pb::FlattenImageRequest>,
    ) -> Reply<Self::FlattenImageStream> {
        let r = req.into_inner();
        required("image", &r.image)?;
        let (image, message) = self
            .manager
            .flatten_target(&r.image)
            .await
            .map_err(status)?;
        Ok(Response::new(progress_stream(move |progress| async move {
            image
                .flatten(&move |done, total| {
                    let _ = progress.send((done, total));
                })
                .await?;
            Ok(message)
        })))
    }
}
