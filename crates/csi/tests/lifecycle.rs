//! A volume's whole life through CSI, as Kubernetes drives it, against `strata csi --mode all`
//! over a `strata serve` started here: a 3-replica nexus volume (replica files placed in the
//! daemon's pools) and a page-store image volume are created, published, staged (attached
//! through nbdfuse and a loop device, the path this host's kernel offers), formatted, mounted
//! and bind-mounted; files are written; the image is snapshotted and a clone made from the
//! snapshot shows the files; the image volume grows and so does its file system (offline, as
//! Kubernetes expands a volume whose attachment cannot grow in place); then everything is
//! undone and nothing is left: no volume in `strata volume list`, no replica file, no mount,
//! no loop device, no nbdfuse.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::Driver;
use strata_csi::csi;
use strata_csi::csi::controller_client::ControllerClient;
use strata_csi::csi::node_client::NodeClient;

type Channel = strata_api::ApiChannel;

const MIB: i64 = 1 << 20;

fn mount_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            },
        )),
    }
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The file system's size (bytes) at `path`.
fn fs_size(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("a path");
    // SAFETY: statvfs on a NUL-terminated path into a zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {}", path.display());
    st.f_blocks * st.f_frsize
}

struct Csi {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    node_id: String,
    dir: PathBuf,
}

/// Where a volume is staged and published.
struct Paths {
    staging: PathBuf,
    target: PathBuf,
}

impl Csi {
    async fn connect(d: &Driver) -> Csi {
        let channel = strata_api::connect(&d.endpoint)
            .await
            .expect("connect to the CSI socket");
        let mut node = NodeClient::new(channel.clone());
        let node_id = node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner()
            .node_id;
        Csi {
            controller: ControllerClient::new(channel),
            node,
            node_id,
            dir: d.dir.path().to_path_buf(),
        }
    }

    async fn create(
        &mut self,
        name: &str,
        bytes: i64,
        parameters: HashMap<String, String>,
        source: Option<csi::volume_content_source::Type>,
    ) -> csi::Volume {
        self.controller
            .create_volume(csi::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![mount_capability()],
                parameters,
                volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
            .into_inner()
            .volume
            .expect("a volume")
    }

    /// ControllerPublish, NodeStage, NodePublish.
    async fn attach(&mut self, v: &csi::Volume) -> Paths {
        let id = &v.volume_id;
        let context = self
            .controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: self.node_id.clone(),
                volume_capability: Some(mount_capability()),
                readonly: false,
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerPublishVolume {id}: {e}"))
            .into_inner()
            .publish_context;
        let staging = self.dir.join("staging").join(id);
        let target = self.dir.join("pods").join(id).join("mount");
        std::fs::create_dir_all(&staging).expect("the staging directory");
        std::fs::create_dir_all(target.parent().expect("a parent")).expect("the pod directory");
        self.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: context.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(mount_capability()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodeStageVolume {id}: {e}"));
        self.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                publish_context: context,
                staging_target_path: staging.to_string_lossy().into(),
                target_path: target.to_string_lossy().into(),
                volume_capability: Some(mount_capability()),
                readonly: false,
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodePublishVolume {id}: {e}"));
        Paths { staging, target }
    }

    /// NodeUnpublish, NodeUnstage, ControllerUnpublish.
    async fn detach(&mut self, id: &str, p: &Paths) {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: p.target.to_string_lossy().into(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnpublishVolume {id}: {e}"));
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: p.staging.to_string_lossy().into(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnstageVolume {id}: {e}"));
        self.controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.into(),
                node_id: self.node_id.clone(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerUnpublishVolume {id}: {e}"));
    }

    /// ControllerExpandVolume, which asks for NodeExpandVolume after it.
    async fn expand_controller(&mut self, id: &str, bytes: i64) {
        let r = self
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capability: Some(mount_capability()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerExpandVolume {id}: {e}"))
            .into_inner();
        assert!(r.capacity_bytes >= bytes, "{id}: {r:?}");
        assert!(r.node_expansion_required, "{id}: a file system to grow");
    }

    /// NodeExpandVolume on the published volume.
    async fn expand_node(&mut self, id: &str, p: &Paths, bytes: i64) {
        let r = self
            .node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: p.target.to_string_lossy().into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                staging_target_path: p.staging.to_string_lossy().into(),
                volume_capability: Some(mount_capability()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodeExpandVolume {id}: {e}"))
            .into_inner();
        assert!(r.capacity_bytes >= bytes, "{id}: {r:?}");
    }

    async fn delete(&mut self, id: &str) {
        self.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("DeleteVolume {id}: {e}"));
    }
}

/// Files of distinct content in `dir`: (name, bytes).
fn write_files(dir: &Path, tag: &str) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = (0..4u32)
        .map(|i| {
            let bytes: Vec<u8> = (0..(300_000 + i as usize * 77_777))
                .map(|j| (j as u32).wrapping_mul(2_654_435_761).rotate_left(i + 3) as u8)
                .collect();
            (format!("{tag}-{i}.bin"), bytes)
        })
        .collect();
    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes).expect("write a file");
    }
    // SAFETY: syncfs on a directory we opened.
    let d = std::fs::File::open(dir).expect("open the mount");
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::syncfs(d.as_raw_fd()) }, 0, "syncfs");
    files
}

fn assert_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (name, bytes) in files {
        let got = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("read {name} in {}: {e}", dir.display()));
        assert!(got == *bytes, "{name} in {} differs", dir.display());
    }
}

/// Regular files under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_and_an_image_volume_live_and_leave_nothing() {
    for p in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "resize2fs",
        "blkid",
        "fusermount3",
    ] {
        common::require(p);
    }
    let d = tokio::task::spawn_blocking(|| Driver::start(&[]))
        .await
        .expect("start");
    let dir = d.dir.path().to_path_buf();
    let mut c = Csi::connect(&d).await;

    let nexus = c
        .create(
            "pvc-nexus",
            64 * MIB,
            params(&[("replicas", "3"), ("protocol", "nbd")]),
            None,
        )
        .await;
    let image = c
        .create(
            "pvc-image",
            64 * MIB,
            params(&[("store", "local"), ("protocol", "nbd")]),
            None,
        )
        .await;
    // Three replica files, one in each pool.
    let replicas: Vec<PathBuf> = ["pool-a", "pool-b", "pool-c"]
        .iter()
        .flat_map(|p| files_under(&dir.join(p)))
        .collect();
    assert_eq!(
        replicas.len(),
        3,
        "replica files: {replicas:?}\n{}",
        d.logs()
    );

    let pn = c.attach(&nexus).await;
    let pi = c.attach(&image).await;
    let nexus_files = write_files(&pn.target, "nexus");
    let image_files = write_files(&pi.target, "image");
    assert_files(&pn.staging, &nexus_files);

    // Snapshot the image and clone the snapshot: the clone holds the files.
    let snap = c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: image.volume_id.clone(),
            name: "snap-image".into(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("a snapshot");
    assert!(snap.ready_to_use, "{snap:?}");
    let clone = c
        .create(
            "pvc-clone",
            64 * MIB,
            params(&[("store", "local"), ("protocol", "nbd")]),
            Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        )
        .await;
    let pc = c.attach(&clone).await;
    assert_files(&pc.target, &image_files);

    // Grow the image volume and its file system. An nbdfuse attachment keeps the size it
    // connected with, so this is Kubernetes' offline expansion: the pod lets go of the volume,
    // the controller grows it, and when it is staged and published again the node grows the
    // file system.
    let before = fs_size(&pi.target);
    c.detach(&image.volume_id, &pi).await;
    c.expand_controller(&image.volume_id, 128 * MIB).await;
    let pi = c.attach(&image).await;
    c.expand_node(&image.volume_id, &pi, 128 * MIB).await;
    let after = fs_size(&pi.target);
    assert!(
        after > before + 48 * MIB as u64,
        "{}: file system {before} → {after} bytes",
        image.volume_id
    );
    assert_files(&pn.target, &nexus_files);
    assert_files(&pi.target, &image_files);

    // Undo it all.
    for (v, p) in [(&clone, &pc), (&nexus, &pn), (&image, &pi)] {
        c.detach(&v.volume_id, p).await;
    }
    c.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .expect("DeleteSnapshot");
    for v in [&clone, &image, &nexus] {
        c.delete(&v.volume_id).await;
    }

    let d = tokio::task::spawn_blocking(move || {
        assert!(d.volumes().is_empty(), "volumes left: {:?}", d.volumes());
        d
    })
    .await
    .expect("list volumes");
    assert!(
        common::mounts_under(&dir).is_empty(),
        "{:?}",
        common::mounts_under(&dir)
    );
    assert!(
        common::loops_under(&dir).is_empty(),
        "{:?}",
        common::loops_under(&dir)
    );
    assert!(
        common::nbdfuse_under(&dir).is_empty(),
        "{:?}",
        common::nbdfuse_under(&dir)
    );
    let left: Vec<PathBuf> = ["pool-a", "pool-b", "pool-c"]
        .iter()
        .flat_map(|p| files_under(&dir.join(p)))
        .collect();
    assert!(
        left.is_empty(),
        "replica files left: {left:?}\n{}",
        d.logs()
    );
    drop(d);
}

/// CreateVolume → ControllerPublish → NodeStage (attach, mkfs, mount) → NodePublish for one
/// 1 GiB volume (an image, then a 3-replica volume), then for 20 image volumes at once (their calls concurrent, as 20 pods scheduled together
/// make them); the times are printed for docs/BENCHMARKS.md, not asserted. Every volume ends
/// up mounted and writable, and everything is undone after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_to_mounted_one_and_twenty_volumes() {
    for p in ["nbdfuse", "losetup", "mkfs.ext4", "blkid", "fusermount3"] {
        common::require(p);
    }
    let d = tokio::task::spawn_blocking(|| Driver::start(&["--max-volumes-per-node", "32"]))
        .await
        .expect("start");
    let dir = d.dir.path().to_path_buf();
    let c = Csi::connect(&d).await;
    let image = || params(&[("store", "local"), ("protocol", "nbd")]);

    async fn create_and_mount(
        mut c: Csi,
        name: String,
        parameters: HashMap<String, String>,
    ) -> (csi::Volume, Paths, std::time::Duration) {
        let start = std::time::Instant::now();
        let v = c.create(&name, 1024 * MIB, parameters, None).await;
        let p = c.attach(&v).await;
        let took = start.elapsed();
        std::fs::write(p.target.join("hello"), name.as_bytes()).expect("write to the volume");
        (v, p, took)
    }
    let clone = |c: &Csi| Csi {
        controller: c.controller.clone(),
        node: c.node.clone(),
        node_id: c.node_id.clone(),
        dir: c.dir.clone(),
    };

    let mut c = c;
    let (v, p, one) = create_and_mount(clone(&c), "bench-one".into(), image()).await;
    c.detach(&v.volume_id, &p).await;
    c.delete(&v.volume_id).await;
    let replicated = params(&[("replicas", "3"), ("protocol", "nbd")]);
    let (v, p, one_nexus) = create_and_mount(clone(&c), "bench-nexus".into(), replicated).await;
    c.detach(&v.volume_id, &p).await;
    c.delete(&v.volume_id).await;

    let start = std::time::Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(create_and_mount(
                clone(&c),
                format!("bench-{i:02}"),
                image(),
            ))
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.expect("a volume task"));
    }
    let all = start.elapsed();
    let mut each: Vec<f64> = done.iter().map(|(_, _, t)| t.as_secs_f64()).collect();
    each.sort_by(f64::total_cmp);
    eprintln!(
        "CreateVolume → mounted, 1 GiB: an image volume alone {:.2} s, a 3-replica volume \
         alone {:.2} s; 20 image volumes at once: all in {:.2} s, each median {:.2} s, \
         slowest {:.2} s",
        one.as_secs_f64(),
        one_nexus.as_secs_f64(),
        all.as_secs_f64(),
        each[each.len() / 2],
        each[each.len() - 1]
    );
    for (v, p, _) in &done {
        assert_eq!(
            std::fs::read_to_string(p.target.join("hello")).expect("read back"),
            v.volume_id
        );
        c.detach(&v.volume_id, p).await;
        c.delete(&v.volume_id).await;
    }
    let d = tokio::task::spawn_blocking(move || {
        assert!(d.volumes().is_empty(), "volumes left: {:?}", d.volumes());
        d
    })
    .await
    .expect("list volumes");
    assert!(common::mounts_under(&dir).is_empty());
    assert!(common::loops_under(&dir).is_empty());
    drop(d);
}
