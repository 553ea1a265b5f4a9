//! The control endpoint the `strata` CLI drives the daemon through: a unix socket speaking one
//! JSON request per line, answered by one JSON response per line.
//!
//! ```text
//! → {"op":"status"}
//! ← {"result":"status","volumes":[{"name":"m","size":1073741824,"source":"nexus of 3 replicas",
//!     "children":[{"index":0,"name":"file:///…","state":"online",…},…]}]}
//! → {"op":"online_child","volume":"m","child":"2"}
//! ← {"result":"done","message":"replica #2 nbd://…: partial rebuild of 66.0 MiB started"}
//! ← {"result":"error","message":"…"}
//! ```
//!
//! A child is named by its index in `status` or by its URI. An image is named by its volume
//! name or as `STORE/IMAGE`, a snapshot as `IMAGE@SNAPSHOT`. Long operations (flattening)
//! answer with `{"result":"progress","done":…,"total":…}` lines before their final answer.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use strata_bdev::Registry;
use strata_nexus::{ChildState, Nexus, RebuildKind, RebuildOutcome, RebuildState};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::images::Images;
use crate::volume::{open_device, Volume};

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    AddChild {
        volume: String,
        uri: String,
    },
    RemoveChild {
        volume: String,
        child: String,
    },
    OfflineChild {
        volume: String,
        child: String,
    },
    OnlineChild {
        volume: String,
        child: String,
    },
    FaultChild {
        volume: String,
        child: String,
        reason: String,
    },
    PauseRebuild {
        volume: String,
        child: String,
    },
    ResumeRebuild {
        volume: String,
        child: String,
    },
    CancelRebuild {
        volume: String,
        child: String,
    },
    /// Take a snapshot of an image.
    Snapshot {
        image: String,
        name: String,
    },
    /// List an image's snapshots.
    Snapshots {
        image: String,
    },
    /// Delete a snapshot; with `flatten`, first flatten the clones that read through it.
    DeleteSnapshot {
        snapshot: String,
        #[serde(default)]
        flatten: bool,
    },
    /// Make image `name` (in the snapshot's store) a clone of a snapshot.
    Clone {
        snapshot: String,
        name: String,
    },
    /// Copy what a clone reads from its base into it, so that it stands alone.
    Flatten {
        image: String,
    },
    Resize {
        image: String,
        size: u64,
        #[serde(default)]
        force: bool,
    },
    /// List the images of a store (default: every store).
    Images {
        #[serde(default)]
        store: Option<String>,
    },
    DeleteImage {
        image: String,
    },
}

/// A response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status {
        volumes: Vec<VolumeInfo>,
    },
    Done {
        message: String,
    },
    Error {
        message: String,
    },
    Snapshots {
        snapshots: Vec<strata_pagestore::versions::SnapshotInfo>,
    },
    Images {
        images: Vec<ImageSummary>,
    },
    /// Work done so far, before the final answer.
    Progress {
        done: u64,
        total: u64,
    },
}

/// An image as `strata image list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSummary {
    pub store: String,
    pub name: String,
    pub size: u64,
    pub page_size: u64,
    /// The manifest version it is at.
    pub version: u64,
    /// `IMAGE@SNAPSHOT` a clone reads through to.
    pub base: Option<String>,
    pub snapshots: usize,
    /// Bytes of its objects in the store (versions and data no longer used included, until
    /// garbage collection).
    pub stored_bytes: u64,
    /// Open in the daemon.
    pub open: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    pub source: String,
    /// The replicas of a nexus volume (empty for a plain device).
    #[serde(default)]
    pub children: Vec<ChildInfo>,
    /// A page-store image's state.
    #[serde(default)]
    pub image: Option<ImageInfo>,
}

/// A page-store image as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The manifest version it is at.
    pub version: u64,
    pub segments: usize,
    /// Pages mapped by the manifest, and by the write buffer.
    pub mapped_pages: usize,
    pub buffered_pages: usize,
    /// Bytes in the write buffer (all generations).
    pub buffered_bytes: u64,
    pub checkpoints: u64,
    pub compactions: u64,
    /// Pages read from the memory cache, the disk cache, and the store.
    pub cache_hits: u64,
    #[serde(default)]
    pub disk_cache_hits: u64,
    pub cache_misses: u64,
    /// Requests to its object store (shared by the images in that store).
    pub store_gets: u64,
    pub store_puts: u64,
    pub store_lists: u64,
    pub store_deletes: u64,
    pub store_errors: u64,
    pub store_retries: u64,
    pub store_bytes_got: u64,
    pub store_bytes_put: u64,
    /// Why it stopped writing, if it did.
    #[serde(default)]
    pub fenced: Option<String>,
}

fn image_info(i: &strata_pagestore::Image) -> ImageInfo {
    use std::sync::atomic::Ordering::Relaxed;
    let (mapped, buffered) = i.mapped_pages();
    let st = i.stats();
    let [gets, puts, lists, deletes, errors, retries] = i.store_stats().counts();
    ImageInfo {
        version: i.version(),
        segments: i.segment_count(),
        mapped_pages: mapped,
        buffered_pages: buffered,
        buffered_bytes: i.buffered_bytes().1,
        checkpoints: st.checkpoints.load(Relaxed),
        compactions: st.compactions.load(Relaxed),
        cache_hits: st.cache_hits.load(Relaxed),
        disk_cache_hits: st.disk_cache_hits.load(Relaxed),
        cache_misses: st.cache_misses.load(Relaxed),
        store_gets: gets,
        store_puts: puts,
        store_lists: lists,
        store_deletes: deletes,
        store_errors: errors,
        store_retries: retries,
        store_bytes_got: i.store_stats().bytes_got.load(Relaxed),
        store_bytes_put: i.store_stats().bytes_put.load(Relaxed),
        fenced: i.fenced(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildInfo {
    pub index: usize,
    pub name: String,
    /// online, rebuilding, faulted or offline.
    pub state: String,
    #[serde(default)]
    pub reason: Option<String>,
    /// Bytes it missed while away (still to be copied back).
    #[serde(default)]
    pub dirty_bytes: Option<u64>,
    pub outstanding: usize,
    #[serde(default)]
    pub rebuild: Option<RebuildInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebuildInfo {
    /// partial or full.
    pub kind: String,
    /// running, paused, completed, cancelled or failed.
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub copied_bytes: u64,
    pub zeroed_bytes: u64,
    #[serde(default)]
    pub source: Option<String>,
    pub elapsed_secs: f64,
    pub rate_bytes_per_sec: f64,
    #[serde(default)]
    pub eta_secs: Option<f64>,
}

fn volume_info(v: &Volume) -> VolumeInfo {
    let children = v
        .nexus()
        .map(|n| {
            n.status()
                .children
                .into_iter()
                .enumerate()
                .map(|(index, c)| {
                    let (state, reason) = match c.state {
                        ChildState::Online => ("online", None),
                        ChildState::Rebuilding => ("rebuilding", None),
                        ChildState::Faulted(r) => ("faulted", Some(r)),
                        ChildState::Offline => ("offline", None),
                    };
                    ChildInfo {
                        index,
                        name: c.name,
                        state: state.to_string(),
                        reason,
                        dirty_bytes: c.dirty_bytes,
                        outstanding: c.outstanding,
                        rebuild: c.rebuild.map(|p| {
                            let (state, error) = match &p.state {
                                RebuildState::Running => ("running", None),
                                RebuildState::Paused => ("paused", None),
                                RebuildState::Done(RebuildOutcome::Completed) => {
                                    ("completed", None)
                                }
                                RebuildState::Done(RebuildOutcome::Cancelled) => {
                                    ("cancelled", None)
                                }
                                RebuildState::Done(RebuildOutcome::Failed(e)) => {
                                    ("failed", Some(e.clone()))
                                }
                            };
                            RebuildInfo {
                                kind: match p.kind {
                                    RebuildKind::Partial => "partial",
                                    RebuildKind::Full => "full",
                                }
                                .to_string(),
                                state: state.to_string(),
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
                        }),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    VolumeInfo {
        name: v.name.clone(),
        size: v.device().geometry().size,
        source: v.source.clone(),
        children,
        image: v.image().map(|i| image_info(i)),
    }
}

/// "66.0 MiB"
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The daemon side: answers requests against the open volumes.
pub struct ControlServer {
    volumes: Vec<Arc<Volume>>,
    registry: Arc<Registry>,
    images: Arc<Images>,
}

type Progress = tokio::sync::mpsc::UnboundedSender<Response>;

impl ControlServer {
    pub fn new(
        volumes: Vec<Arc<Volume>>,
        registry: Arc<Registry>,
        images: Arc<Images>,
    ) -> Arc<ControlServer> {
        Arc::new(ControlServer {
            volumes,
            registry,
            images,
        })
    }

    /// Serve connections on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.connection(stream).await {
                            warn!(error = %format!("{e:#}"), "control connection");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept on the control socket");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(&self, stream: UnixStream) -> anyhow::Result<()> {
        const MAX_REQUEST: u64 = 1 << 20;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_REQUEST)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Ok(());
            }
            let too_long = !line.ends_with(b"\n") && n as u64 == MAX_REQUEST;
            let response = if too_long {
                Response::Error {
                    message: format!("request longer than {MAX_REQUEST} bytes"),
                }
            } else {
                match serde_json::from_slice::<Request>(&line) {
                    Ok(req) => {
                        // Progress lines go out while the request runs.
                        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                        let work = self.handle(req, tx);
                        tokio::pin!(work);
                        loop {
                            tokio::select! {
                                r = &mut work => break r,
                                Some(p) = rx.recv() => {
                                    let mut out = serde_json::to_vec(&p)?;
                                    out.push(b'\n');
                                    write.write_all(&out).await?;
                                }
                            }
                        }
                    }
                    Err(e) => Response::Error {
                        message: format!("malformed request: {e}"),
                    },
                }
            };
            let mut out = serde_json::to_vec(&response)?;
            out.push(b'\n');
            write.write_all(&out).await?;
            if too_long {
                return Ok(());
            }
        }
    }

    async fn handle(&self, req: Request, progress: Progress) -> Response {
        match self.apply(req, progress).await {
            Ok(r) => r,
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        }
    }

    fn nexus(&self, volume: &str) -> anyhow::Result<&Arc<Nexus>> {
        let Some(v) = self.volumes.iter().find(|v| v.name == volume) else {
            let names: Vec<&str> = self.volumes.iter().map(|v| v.name.as_str()).collect();
            bail!("no volume {volume:?} (volumes: {})", names.join(", "));
        };
        v.nexus().with_context(|| {
            format!(
                "volume {volume:?} is a plain device ({}), not a nexus",
                v.source
            )
        })
    }

    /// The child of `nexus` that `spec` names: its exact name, else its index.
    fn child(nexus: &Nexus, spec: &str) -> anyhow::Result<(usize, String)> {
        let children = nexus.status().children;
        if let Some(i) = children.iter().position(|c| c.name == spec) {
            return Ok((i, spec.to_string()));
        }
        if let Some(c) = spec.parse::<usize>().ok().and_then(|i| children.get(i)) {
            return Ok((spec.parse().unwrap_or_default(), c.name.clone()));
        }
        let list: Vec<String> = children
            .iter()
            .enumerate()
            .map(|(i, c)| format!("#{i} {}", c.name))
            .collect();
        bail!(
            "volume {:?} has no replica {spec:?} (give its index or URI: {})",
            nexus.name(),
            list.join(", ")
        )
    }

    async fn apply(&self, req: Request, progress: Progress) -> anyhow::Result<Response> {
        let done = |message: String| {
            info!("{message}");
            Ok(Response::Done { message })
        };
        match req {
            Request::Status => Ok(Response::Status {
                volumes: self.volumes.iter().map(|v| volume_info(v)).collect(),
            }),
            Request::AddChild { volume, uri } => {
                let nexus = self.nexus(&volume)?;
                let dev = open_device(&self.registry, &uri)
                    .await
                    .map_err(|e| anyhow::anyhow!("add replica to {volume:?}: {}", e.chain()))?;
                nexus.add_child(uri.clone(), dev)?;
                nexus.save_record().await?;
                done(format!(
                    "volume {volume}: replica {uri} added; full rebuild of {} started",
                    human_bytes(strata_bdev::BlockDevice::geometry(&**nexus).size)
                ))
            }
            Request::RemoveChild { volume, child } => {
                let nexus = self.nexus(&volume)?;
                let (i, name) = Self::child(nexus, &child)?;
                nexus.remove_child(&name)?;
                nexus.save_record().await?;
                done(format!("volume {volume}: replica #{i} {name} removed"))
            }
            Request::OfflineChild { volume, child } => {
                let nexus = self.nexus(&volume)?;
                let (i, name) = Self::child(nexus, &child)?;
                nexus.offline_child(&name)?;
                nexus.save_record().await?;
                done(format!("volume {volume}: replica #{i} {name} is offline"))
            }
            Request::FaultChild {
                volume,
                child,
                reason,
            } => {
                let nexus = self.nexus(&volume)?;
                let (i, name) = Self::child(nexus, &child)?;
                nexus.fault_child(&name, reason)?;
                nexus.save_record().await?;
                done(format!("volume {volume}: replica #{i} {name} is faulted"))
            }
            Request::OnlineChild { volume, child } => {
                let nexus = self.nexus(&volume)?;
                let (i, name) = Self::child(nexus, &child)?;
                let faulted = matches!(
                    nexus.status().child(&name).map(|c| &c.state),
                    Some(ChildState::Faulted(_))
                );
                if faulted {
                    // Its device failed: close it (releasing locks and connections) and open
                    // it again from its URI.
                    let old = nexus.close_device(&name)?;
                    tokio::task::spawn_blocking(move || drop(old)).await?;
                    let dev = open_device(&self.registry, &name).await.map_err(|e| {
                        anyhow::anyhow!(
                            "online replica #{i} of {volume:?}: reopen it: {} (it stays faulted)",
                            e.chain()
                        )
                    })?;
                    nexus.replace_device(&name, dev)?;
                }
                nexus.online_child(&name)?;
                nexus.save_record().await?;
                let st = nexus.status();
                let p = st.child(&name).and_then(|c| c.rebuild.clone());
                let what = match p {
                    Some(p) => format!(
                        "{} rebuild of {} started",
                        match p.kind {
                            RebuildKind::Partial => "partial",
                            RebuildKind::Full => "full",
                        },
                        human_bytes(p.total_bytes)
                    ),
                    None => "rebuild started".into(),
                };
                done(format!("volume {volume}: replica #{i} {name}: {what}"))
            }
            Request::PauseRebuild { volume, child } => {
                let nexus = self.nexus(&volume)?;
                let (i, name) = Self::child(nexus, &child)?;
                nexus.pause_rebuild(&name)?;
                done(format!("volume {volume}: rebuild of replica #{i} paused"))
            }
            Request::ResumeRebuild { volume, child } => {
                let nexus = self.nexus(&volume)?;
                let (i, name) = Self::child(nexus, &child)?;
                nexus.resume_rebuild(&name)?;
                done(format!("volume {volume}: rebuild of replica #{i} resumed"))
            }
            Request::CancelRebuild { volume, child } => {
                let nexus = self.nexus(&volume)?;
                let (i, name) = Self::child(nexus, &child)?;
                nexus.cancel_rebuild(&name)?;
                done(format!(
                    "volume {volume}: rebuild of replica #{i} cancelled; it goes offline"
                ))
            }
            Request::Snapshot { image, name } => {
                let (store, img) = self.images.key(&image)?;
                let i = self.images.image(&store, &img, None).await?;
                let rec = i.snapshot(&name).await?;
                done(format!(
                    "snapshot {store}/{img}@{name} taken (version {}, {}); export it read-only \
                     as {store}/{img}@{name}",
                    rec.version,
                    human_bytes(rec.image_size)
                ))
            }
            Request::Snapshots { image } => {
                let (store, img) = self.images.key(&image)?;
                let cat = self.images.store(&store)?.catalog().await?;
                if cat.images.get(&img).is_none_or(|e| e.latest.is_none()) {
                    bail!("no image {img} in store {store}");
                }
                Ok(Response::Snapshots {
                    snapshots: cat.snapshots(&img),
                })
            }
            Request::DeleteSnapshot { snapshot, flatten } => {
                let (image, snap) = snapshot
                    .rsplit_once('@')
                    .with_context(|| format!("{snapshot:?}: name a snapshot as IMAGE@SNAPSHOT"))?;
                let (store, img) = self.images.key(image)?;
                if self.images.snapshot_open(&store, &img, snap).await {
                    bail!("snapshot {store}/{img}@{snap} is exported to clients; disconnect them first");
                }
                let ps = self.images.store(&store)?;
                if flatten {
                    self.flatten_dependents(&store, &img, snap, &progress)
                        .await?;
                }
                ps.delete_snapshot(&img, snap).await?;
                self.images.forget_snapshot(&store, &img, snap).await;
                done(format!(
                    "snapshot {store}/{img}@{snap} deleted; `strata gc` frees its data after the grace period"
                ))
            }
            Request::Clone { snapshot, name } => {
                let (image, snap) = snapshot
                    .rsplit_once('@')
                    .with_context(|| format!("{snapshot:?}: name a snapshot as IMAGE@SNAPSHOT"))?;
                let (store, img) = self.images.key(image)?;
                let new = match name.split_once('/') {
                    Some((s, n)) if s == store => n.to_string(),
                    Some((s, _)) => {
                        bail!("a clone lives in its snapshot's store ({store}), not in {s}")
                    }
                    None => name.clone(),
                };
                let m = self
                    .images
                    .store(&store)?
                    .create_clone(&img, snap, &new)
                    .await?;
                done(format!(
                    "image {store}/{new} created as a clone of {store}/{img}@{snap} ({}); \
                     export it as {store}/{new}",
                    human_bytes(m.image_size)
                ))
            }
            Request::Flatten { image } => {
                let (store, img) = self.images.key(&image)?;
                let i = self.images.image(&store, &img, None).await?;
                let Some(base) = i.base() else {
                    bail!("image {store}/{img} is not a clone: nothing to flatten");
                };
                let p = progress.clone();
                i.flatten(&move |done, total| {
                    let _ = p.send(Response::Progress { done, total });
                })
                .await?;
                done(format!(
                    "image {store}/{img} flattened: it no longer reads through {}@{}",
                    base.image, base.snapshot
                ))
            }
            Request::Resize { image, size, force } => {
                let (store, img) = self.images.key(&image)?;
                let i = self.images.image(&store, &img, None).await?;
                let old = strata_bdev::BlockDevice::geometry(&*i).size;
                i.resize(size, force).await?;
                done(format!(
                    "image {store}/{img} resized from {} to {}; clients see the new size when \
                     they reconnect",
                    human_bytes(old),
                    human_bytes(size)
                ))
            }
            Request::Images { store } => {
                let stores = match store {
                    Some(s) => {
                        self.images.store(&s)?;
                        vec![s]
                    }
                    None => self.images.opener().store_names(),
                };
                let mut images = Vec::new();
                for s in stores {
                    let cat = self.images.store(&s)?.catalog().await?;
                    for (name, e) in &cat.images {
                        let Some(m) = &e.latest else { continue };
                        images.push(ImageSummary {
                            store: s.clone(),
                            name: name.clone(),
                            size: m.image_size,
                            page_size: 1 << m.page_size_bits,
                            version: m.version,
                            base: m
                                .base
                                .as_ref()
                                .map(|b| format!("{}@{}", b.image, b.snapshot)),
                            snapshots: e.snapshots.iter().filter(|s| s.deleted.is_none()).count(),
                            stored_bytes: cat.stored_bytes(name),
                            open: self.images.if_open(&s, name).await.is_some(),
                        });
                    }
                }
                Ok(Response::Images { images })
            }
            Request::DeleteImage { image } => {
                let (store, img) = self.images.key(&image)?;
                self.images.close(&store, &img).await?;
                self.images.store(&store)?.delete_image(&img).await?;
                done(format!(
                    "image {store}/{img} deleted with its snapshots; `strata gc` frees its data \
                     after the grace period"
                ))
            }
        }
    }

    /// Flatten every clone that reads through `store/image@snap`; refuse if a snapshot of a
    /// clone does (snapshots cannot change).
    async fn flatten_dependents(
        &self,
        store: &str,
        image: &str,
        snap: &str,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        let ps = self.images.store(store)?;
        let cat = ps.catalog().await?;
        let Some(rec) = cat.images.get(image).and_then(|e| {
            e.snapshots
                .iter()
                .find(|s| s.snapshot == snap && s.deleted.is_none())
        }) else {
            bail!("no snapshot {store}/{image}@{snap}");
        };
        let deps = cat.dependents(image, rec.version);
        let (snaps, clones): (Vec<String>, Vec<String>) =
            deps.into_iter().partition(|d| d.contains('@'));
        if !snaps.is_empty() {
            bail!(
                "snapshots of clones read through {store}/{image}@{snap}: {}; delete them first \
                 (a snapshot cannot be flattened)",
                snaps.join(", ")
            );
        }
        for c in clones {
            info!(clone = %c, "flattening before the snapshot is deleted");
            let i = self.images.image(store, &c, None).await?;
            let p = progress.clone();
            i.flatten(&move |done, total| {
                let _ = p.send(Response::Progress { done, total });
            })
            .await?;
        }
        Ok(())
    }
}

/// The CLI side: one request, one response.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    call_with_progress(socket, req, &mut |_, _| {})
}

/// One request; progress lines go to `progress(done, total)`, the final answer is returned.
pub fn call_with_progress(
    socket: &Path,
    req: &Request,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<Response> {
    use std::io::{BufRead, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connect to the strata daemon at {} (is `strata serve` running? its control \
             socket is `control.sock` in its data directory; pass --control PATH)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reader = std::io::BufReader::new(&stream);
    loop {
        let mut answer = String::new();
        reader.read_line(&mut answer)?;
        if answer.is_empty() {
            bail!("the daemon closed the control connection without answering");
        }
        match serde_json::from_str(&answer).context("parse the daemon's answer")? {
            Response::Progress { done, total } => progress(done, total),
            r => return Ok(r),
        }
    }
}
