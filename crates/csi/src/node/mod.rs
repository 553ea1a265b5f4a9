//! The Node service: stage (attach the export as a block device, format, mount), publish (bind
//! mount, or the device itself for block volumes), and undo both; statistics and expansion.
//!
//! ```text
//!  NodeStage    export ─attach.rs─► /dev/X ─mkfs (if blank)─► mount STAGING ─► grow the fs
//!  NodePublish  STAGING ─bind─► TARGET (ro if asked)      block: /dev/X ─bind─► TARGET file
//!  NodeUnpublish / NodeUnstage: unmount what is ours, detach, forget — every step skipped
//!                 when already undone, so retries and a restarted plugin finish the job
//! ```
//!
//! A staged volume is recorded in `{state_dir}/volumes/VOLUME.json` (written before anything is
//! mounted); when the record is missing, unstaging finds the attachment from the mount table and
//! the loop devices (see `attach.rs`), and the staging mount by its device number.

mod attach;
pub mod system;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::csi;
use crate::daemon::Daemon;
use crate::names;
use crate::Locks;
use attach::Attachment;
use system::run;

type Reply<T> = Result<Response<T>, Status>;

/// The Node service.
#[derive(Debug)]
pub struct Node {
    pub(crate) daemon: Arc<Daemon>,
    pub(crate) node_id: String,
    pub(crate) max_volumes_per_node: u32,
    /// Where records and nbdfuse directories live.
    pub(crate) state_dir: PathBuf,
    pub(crate) locks: Locks,
}

/// A staged volume, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Staged {
    volume_id: String,
    staging_path: PathBuf,
    attachment: Attachment,
    /// A block volume (not mounted at the staging path).
    block: bool,
    fs_type: String,
    read_only: bool,
}

fn required(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

fn capability(c: Option<&csi::VolumeCapability>) -> Result<&csi::VolumeCapability, Status> {
    let c = c.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    names::check_capability(c).map_err(Status::invalid_argument)?;
    Ok(c)
}

fn is_block(c: &csi::VolumeCapability) -> bool {
    matches!(
        c.access_type,
        Some(csi::volume_capability::AccessType::Block(_))
    )
}

fn mount_of(c: &csi::VolumeCapability) -> Option<&csi::volume_capability::MountVolume> {
    match &c.access_type {
        Some(csi::volume_capability::AccessType::Mount(m)) => Some(m),
        _ => None,
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

impl Node {
    fn record_path(&self, volume: &str) -> Result<PathBuf, Status> {
        // Volume IDs are Strata volume names; anything else is no volume of ours.
        let valid = !volume.is_empty()
            && volume.len() <= 64
            && !volume.starts_with('.')
            && volume
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(Status::not_found(format!("no volume {volume:?}")));
        }
        Ok(self
            .state_dir
            .join("volumes")
            .join(format!("{volume}.json")))
    }

    fn load(&self, volume: &str) -> Result<Option<Staged>, Status> {
        let path = match self.record_path(volume) {
            Ok(p) => p,
            Err(_) => return Ok(None),
        };
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| internal(&format!("read {}", path.display()), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(internal(&format!("read {}", path.display()), e)),
        }
    }

    fn save(&self, s: &Staged) -> Result<(), Status> {
        let path = self.record_path(&s.volume_id)?;
        let dir = path.parent().unwrap_or(&self.state_dir);
        std::fs::create_dir_all(dir).map_err(|e| internal("create the state directory", e))?;
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(s).map_err(|e| internal("encode a record", e))?;
        std::fs::write(&tmp, json).map_err(|e| internal(&format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| internal(&format!("rename to {}", path.display()), e))
    }

    fn forget(&self, volume: &str) -> Result<(), Status> {
        let path = self.record_path(volume)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(internal(&format!("remove {}", path.display()), e)),
        }
    }

    /// The attachment of `volume` found without its record: an nbdfuse directory of ours.
    fn discover(&self, volume: &str) -> Result<Option<Attachment>, Status> {
        let dir = attach::fuse_dir(&self.state_dir, volume);
        if system::mounted_at(&dir)?.is_none() && !dir.exists() {
            return Ok(None);
        }
        let loop_dev = PathBuf::new();
        Ok(Some(Attachment::Nbdfuse { dir, loop_dev }))
    }

    /// The export URI of a volume: from the publish context, else from the daemon.
    async fn export_uri(
        &self,
        volume: &str,
        context: &std::collections::HashMap<String, String>,
    ) -> Result<String, Status> {
        if let Some(u) = context.get("uri").filter(|u| !u.is_empty()) {
            return Ok(u.clone());
        }
        let v = self
            .daemon
            .volume(volume)
            .await?
            .ok_or_else(|| Status::not_found(format!("no volume {volume:?}")))?;
        v.exports.first().cloned().ok_or_else(|| {
            Status::failed_precondition(format!("volume {volume:?} is not exported"))
        })
    }

    /// Whether `path` shows `device` (a mount of it, or a bind of the device node).
    fn shows(path: &Path, device: &Path) -> Result<bool, Status> {
        let Some(dev) = system::rdev(device) else {
            return Ok(false);
        };
        if system::rdev(path) == Some(dev) {
            return Ok(true);
        }
        Ok(system::mounted_at(path)?.is_some_and(|m| m.dev == dev))
    }

    async fn stage(&self, r: csi::NodeStageVolumeRequest) -> Result<(), Status> {
        required("volume_id", &r.volume_id)?;
        required("staging_target_path", &r.staging_target_path)?;
        let cap = capability(r.volume_capability.as_ref())?;
        let _lock = self.locks.lock(&r.volume_id).await;
        let staging = PathBuf::from(&r.staging_target_path);
        let block = is_block(cap);
        let read_only = names::read_only_mode(cap);
        if let Some(s) = self.load(&r.volume_id)? {
            let device_there = s.attachment.device().exists();
            if s.staging_path != staging && device_there {
                return Err(Status::already_exists(format!(
                    "volume {} is staged at {} already",
                    r.volume_id,
                    s.staging_path.display()
                )));
            }
            if s.block != block && device_there {
                return Err(Status::already_exists(format!(
                    "volume {} is staged as a {} volume",
                    r.volume_id,
                    if s.block { "block" } else { "mount" }
                )));
            }
            if device_there && (s.block || Self::shows(&staging, s.attachment.device())?) {
                return Ok(());
            }
        }
        let uri = self.export_uri(&r.volume_id, &r.publish_context).await?;
        let a = attach::attach(&self.state_dir, &r.volume_id, &uri, read_only).await?;
        let mount = mount_of(cap);
        let mut staged = Staged {
            volume_id: r.volume_id.clone(),
            staging_path: staging.clone(),
            attachment: a.clone(),
            block,
            fs_type: mount
                .map(|m| m.fs_type.clone())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "ext4".into()),
            read_only,
        };
        self.save(&staged)?;
        if block {
            info!(volume = %r.volume_id, device = %a.device().display(), "staged (block)");
            return Ok(());
        }
        let device = a.device().to_path_buf();
        match system::fs_type_of(&device).await? {
            Some(t) => staged.fs_type = t,
            None if read_only => {
                return Err(Status::failed_precondition(format!(
                    "volume {} has no file system and is staged read-only",
                    r.volume_id
                )))
            }
            None => {
                make_fs(&staged.fs_type, &device).await?;
                info!(volume = %r.volume_id, fs = %staged.fs_type, "file system made");
            }
        }
        self.save(&staged)?;
        std::fs::create_dir_all(&staging)
            .map_err(|e| internal(&format!("create {}", staging.display()), e))?;
        let mounted = Self::shows(&staging, &device)?;
        if !mounted && !read_only {
            self.grow_unmounted(&r.volume_id, &device).await?;
        }
        if !mounted {
            let mut opts: Vec<String> = mount.map(|m| m.mount_flags.clone()).unwrap_or_default();
            if read_only {
                opts.push("ro".into());
            }
            let mut args: Vec<String> = vec!["-t".into(), staged.fs_type.clone()];
            if !opts.is_empty() {
                args.push("-o".into());
                args.push(opts.join(","));
            }
            args.push(device.display().to_string());
            args.push(staging.display().to_string());
            run("mount", &args).await?;
        }
        if !read_only {
            self.grow_fs(&staged).await?;
            if let Some(group) = mount
                .map(|m| m.volume_mount_group.clone())
                .filter(|g| !g.is_empty())
            {
                give_group(&staging, &group)?;
            }
        }
        info!(volume = %r.volume_id, staging = %staging.display(), device = %device.display(), "staged");
        Ok(())
    }

    /// Grow an unmounted ext file system to its device when the volume grew while it was not
    /// staged. Growing it before the mount needs no more than the device (a mounted ext4 grows
    /// through an ioctl that needs `CAP_SYS_RESOURCE`, which a container may lack).
    async fn grow_unmounted(&self, volume: &str, device: &Path) -> Result<(), Status> {
        let Some(fs_size) = system::ext_fs_size_of(device)? else {
            return Ok(());
        };
        let device_size = system::size_of(device)?;
        if device_size <= fs_size {
            return Ok(());
        }
        system::e2fsck(device).await?;
        run("resize2fs", &[device.as_os_str()]).await?;
        info!(volume, device = %device.display(), from = fs_size, to = device_size,
            "file system grown before mounting");
        Ok(())
    }

    /// Grow the file system of a staged volume to its device.
    async fn grow_fs(&self, s: &Staged) -> Result<(), Status> {
        if s.block || s.read_only {
            return Ok(());
        }
        match s.fs_type.as_str() {
            "xfs" => run("xfs_growfs", &[s.staging_path.as_os_str()])
                .await
                .map(|_| ()),
            "ext4" | "ext3" | "ext2" => run("resize2fs", &[s.attachment.device().as_os_str()])
                .await
                .map(|_| ()),
            other => Err(Status::failed_precondition(format!(
                "cannot grow a {other} file system"
            ))),
        }
    }

    async fn unstage(&self, r: csi::NodeUnstageVolumeRequest) -> Result<(), Status> {
        required("volume_id", &r.volume_id)?;
        required("staging_target_path", &r.staging_target_path)?;
        let _lock = self.locks.lock(&r.volume_id).await;
        let staging = PathBuf::from(&r.staging_target_path);
        let attachment = match self.load(&r.volume_id)? {
            Some(s) => Some(s.attachment),
            None => self.discover(&r.volume_id)?,
        };
        let Some(a) = attachment else {
            return Ok(());
        };
        // The staging mount is ours if it shows our device (found again after a crash through
        // the loop device of our nbdfuse file).
        let device = match &a {
            Attachment::Nbdfuse { dir, .. } => {
                attach::loop_of(&dir.join("nbd")).unwrap_or_else(|| a.device().to_path_buf())
            }
            _ => a.device().to_path_buf(),
        };
        if Self::shows(&staging, &device)? {
            system::unmount_all(&staging).await?;
        }
        attach::detach(&a).await?;
        self.forget(&r.volume_id)?;
        info!(volume = %r.volume_id, "unstaged");
        Ok(())
    }

    async fn publish(&self, r: csi::NodePublishVolumeRequest) -> Result<(), Status> {
        required("volume_id", &r.volume_id)?;
        required("target_path", &r.target_path)?;
        let cap = capability(r.volume_capability.as_ref())?;
        required("staging_target_path", &r.staging_target_path)?;
        let _lock = self.locks.lock(&r.volume_id).await;
        let s = self
            .load(&r.volume_id)?
            .filter(|s| s.staging_path == Path::new(&r.staging_target_path))
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "volume {} is not staged at {}",
                    r.volume_id, r.staging_target_path
                ))
            })?;
        if is_block(cap) != s.block {
            return Err(Status::failed_precondition(format!(
                "volume {} is staged as a {} volume",
                r.volume_id,
                if s.block { "block" } else { "mount" }
            )));
        }
        let target = PathBuf::from(&r.target_path);
        let read_only = r.readonly || names::read_only_mode(cap);
        let device = s.attachment.device().to_path_buf();
        if Self::shows(&target, &device)? {
            let ro = system::mounted_at(&target)?.is_some_and(|m| m.read_only());
            if ro != read_only {
                return Err(Status::already_exists(format!(
                    "volume {} is published at {} {}",
                    r.volume_id,
                    target.display(),
                    if ro { "read-only" } else { "read-write" }
                )));
            }
            return Ok(());
        }
        let source = if s.block {
            if !target.exists() {
                std::fs::File::create(&target)
                    .map_err(|e| internal(&format!("create {}", target.display()), e))?;
            }
            device.clone()
        } else {
            std::fs::create_dir_all(&target)
                .map_err(|e| internal(&format!("create {}", target.display()), e))?;
            s.staging_path.clone()
        };
        run(
            "mount",
            &["--bind".as_ref(), source.as_os_str(), target.as_os_str()],
        )
        .await?;
        let mut opts = vec!["remount", "bind"];
        if read_only {
            opts.push("ro");
        }
        let flags: Vec<String> = mount_of(cap)
            .map(|m| m.mount_flags.clone())
            .unwrap_or_default();
        let opts = opts
            .into_iter()
            .map(String::from)
            .chain(flags)
            .collect::<Vec<_>>()
            .join(",");
        if read_only || opts.split(',').count() > 2 {
            run("mount", &["-o".as_ref(), opts.as_ref(), target.as_os_str()]).await?;
        }
        info!(volume = %r.volume_id, target = %target.display(), read_only, "published");
        Ok(())
    }

    async fn unpublish(&self, r: csi::NodeUnpublishVolumeRequest) -> Result<(), Status> {
        required("volume_id", &r.volume_id)?;
        required("target_path", &r.target_path)?;
        let _lock = self.locks.lock(&r.volume_id).await;
        let target = PathBuf::from(&r.target_path);
        let ours = match self.load(&r.volume_id)? {
            Some(s) => Self::shows(&target, s.attachment.device())?,
            None => false,
        };
        let mounted = system::mounted_at(&target)?.is_some();
        if mounted && !ours {
            // Another volume's, or no record of ours: leave it.
            warn!(volume = %r.volume_id, target = %target.display(), "the target shows something else; left mounted");
            return Ok(());
        }
        if mounted {
            system::unmount_all(&target).await?;
        }
        match std::fs::metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| internal(&format!("remove {}", target.display()), e))?;
        info!(volume = %r.volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    /// The record of `volume` if `path` is where it is staged or published.
    fn staged_at(&self, volume: &str, path: &str) -> Result<Staged, Status> {
        let not_found = || Status::not_found(format!("volume {volume:?} is not at {path:?}"));
        let s = self.load(volume)?.ok_or_else(not_found)?;
        let p = Path::new(path);
        if !p.exists() {
            return Err(not_found());
        }
        if p == s.staging_path || Self::shows(p, s.attachment.device())? {
            Ok(s)
        } else {
            Err(not_found())
        }
    }

    async fn stats(
        &self,
        r: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Status> {
        required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        let s = self.staged_at(&r.volume_id, &r.volume_path)?;
        use csi::volume_usage::Unit;
        let usage = if s.block {
            vec![csi::VolumeUsage {
                total: system::size_of(s.attachment.device())? as i64,
                unit: Unit::Bytes as i32,
                ..Default::default()
            }]
        } else {
            let (b, i) = system::fs_usage(Path::new(&r.volume_path))?;
            vec![
                csi::VolumeUsage {
                    total: b[0] as i64,
                    available: b[1] as i64,
                    used: b[2] as i64,
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    total: i[0] as i64,
                    available: i[1] as i64,
                    used: i[2] as i64,
                    unit: Unit::Inodes as i32,
                },
            ]
        };
        let attached = match &s.attachment {
            Attachment::Nbdfuse { dir, .. } => system::mounted_at(dir)?.is_some(),
            a => a.device().exists(),
        };
        let condition = if !attached {
            csi::VolumeCondition {
                abnormal: true,
                message: "the volume's attachment is gone (its export client ended)".into(),
            }
        } else {
            match self.daemon.volume(&r.volume_id).await {
                Ok(Some(v)) => crate::controller::condition(&v),
                Ok(None) => csi::VolumeCondition {
                    abnormal: true,
                    message: "the Strata daemon no longer has this volume".into(),
                },
                Err(e) => csi::VolumeCondition {
                    abnormal: true,
                    message: format!("the Strata daemon cannot be asked: {}", e.message()),
                },
            }
        };
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    async fn expand(
        &self,
        r: csi::NodeExpandVolumeRequest,
    ) -> Result<csi::NodeExpandVolumeResponse, Status> {
        required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        let _lock = self.locks.lock(&r.volume_id).await;
        let s = self.staged_at(&r.volume_id, &r.volume_path)?;
        let want = r
            .capacity_range
            .as_ref()
            .map_or(0, |c| c.required_bytes.max(0) as u64);
        let volume_size = match self.daemon.volume(&r.volume_id).await? {
            Some(v) => v.size,
            None => want,
        };
        let size = attach::refresh(&s.attachment, volume_size).await?;
        if size < want {
            return Err(Status::failed_precondition(format!(
                "the attached device of volume {} holds {size} bytes, less than {want}: its \
                 export client keeps the size it connected with, so the volume grows when it \
                 is staged again",
                r.volume_id
            )));
        }
        self.grow_fs(&s).await?;
        info!(volume = %r.volume_id, size, "file system grown");
        Ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        })
    }
}

fn node_cap(t: csi::node_service_capability::rpc::Type) -> csi::NodeServiceCapability {
    csi::NodeServiceCapability {
        r#type: Some(csi::node_service_capability::Type::Rpc(
            csi::node_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Reply<csi::NodeStageVolumeResponse> {
        self.stage(req.into_inner()).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Reply<csi::NodeUnstageVolumeResponse> {
        self.unstage(req.into_inner()).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Reply<csi::NodePublishVolumeResponse> {
        self.publish(req.into_inner()).await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Reply<csi::NodeUnpublishVolumeResponse> {
        self.unpublish(req.into_inner()).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Reply<csi::NodeGetVolumeStatsResponse> {
        Ok(Response::new(self.stats(req.into_inner()).await?))
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Reply<csi::NodeExpandVolumeResponse> {
        Ok(Response::new(self.expand(req.into_inner()).await?))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Reply<csi::NodeGetCapabilitiesResponse> {
        use csi::node_service_capability::rpc::Type as T;
        let capabilities = [
            T::StageUnstageVolume,
            T::GetVolumeStats,
            T::ExpandVolume,
            T::VolumeCondition,
            T::SingleNodeMultiWriter,
            T::VolumeMountGroup,
        ]
        .into_iter()
        .map(node_cap)
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Reply<csi::NodeGetInfoResponse> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: i64::from(self.max_volumes_per_node),
            accessible_topology: Some(csi::Topology {
                segments: [(names::TOPOLOGY_NODE.to_string(), self.node_id.clone())].into(),
            }),
        }))
    }
}

/// Make a file system of `fs_type` (xfs, else ext4) on `device`.
async fn make_fs(fs_type: &str, device: &Path) -> Result<(), Status> {
    let dev = device.as_os_str();
    match fs_type {
        "xfs" => run("mkfs.xfs", &["-q".as_ref(), "-K".as_ref(), dev]).await?,
        _ => {
            run(
                "mkfs.ext4",
                &[
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-E".as_ref(),
                    "nodiscard".as_ref(),
                    dev,
                ],
            )
            .await?
        }
    };
    Ok(())
}

/// `volume_mount_group`: the staged file system's root belongs to that group, which may write.
fn give_group(staging: &Path, group: &str) -> Result<(), Status> {
    use std::os::unix::fs::PermissionsExt;
    let gid: u32 = group.parse().map_err(|_| {
        Status::invalid_argument(format!("volume_mount_group {group:?} is not a GID"))
    })?;
    std::os::unix::fs::chown(staging, None, Some(gid))
        .map_err(|e| internal("set the volume's group", e))?;
    let mode = std::fs::metadata(staging)
        .map_err(|e| internal("stat the staging path", e))?
        .permissions()
        .mode();
    std::fs::set_permissions(staging, std::fs::Permissions::from_mode(mode | 0o2070))
        .map_err(|e| internal("give the volume's group access", e))
}
