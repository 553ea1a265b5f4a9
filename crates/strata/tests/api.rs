//! The gRPC API through its generated Rust client: every service, valid and invalid requests,
//! and the codes they get; volumes created through it survive a restart.
#![allow(clippy::unwrap_used)]

mod common;

use common::{qemu_io, Strata};
use strata_api::v1 as pb;
use tonic::Code;

use pb::children_client::ChildrenClient;
use pb::exports_client::ExportsClient;
use pb::images_client::ImagesClient;
use pb::node_client::NodeClient;
use pb::stores_client::StoresClient;
use pb::volumes_client::VolumesClient;
use tokio_stream::StreamExt;

const CONFIG: &str = r#"
data_dir = "{dir}/data"
[nbd]
listen = ["127.0.0.1:0"]

[[volume]]
name = "cfg"
uri = "mem://cfg?size=16M"
"#;

const MIB: u64 = 1 << 20;

struct Clients {
    node: NodeClient<strata_api::ApiChannel>,
    stores: StoresClient<strata_api::ApiChannel>,
    volumes: VolumesClient<strata_api::ApiChannel>,
    children: ChildrenClient<strata_api::ApiChannel>,
    images: ImagesClient<strata_api::ApiChannel>,
    exports: ExportsClient<strata_api::ApiChannel>,
}

async fn clients(endpoint: &str) -> Clients {
    let ch = strata_api::connect(endpoint).await.unwrap();
    Clients {
        node: NodeClient::new(ch.clone()),
        stores: StoresClient::new(ch.clone()),
        volumes: VolumesClient::new(ch.clone()),
        children: ChildrenClient::new(ch.clone()),
        images: ImagesClient::new(ch.clone()),
        exports: ExportsClient::new(ch),
    }
}

/// Assert that `r` failed with `code`, and that its message mentions `needle`.
#[track_caller]
fn fails<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    match r {
        Ok(v) => panic!("expected {code:?} ({needle}), got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "{code:?} message {:?} does not mention {needle:?}",
                s.message()
            );
        }
    }
}

fn spec(name: &str, size: u64, backing: pb::volume_spec::Backing) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        spec: Some(pb::VolumeSpec {
            name: name.into(),
            size,
            backing: Some(backing),
            ..Default::default()
        }),
    }
}

fn nexus(replicas: &[String]) -> pb::volume_spec::Backing {
    pb::volume_spec::Backing::Nexus(pb::NexusSpec {
        replicas: replicas.to_vec(),
        ..Default::default()
    })
}

fn child(volume: &str, child: &str) -> pb::ChildRequest {
    pb::ChildRequest {
        volume: volume.into(),
        child: child.into(),
        reason: String::new(),
    }
}

/// Follow a rebuild to its end; its last state.
async fn watch(c: &mut Clients, volume: &str, child: &str) -> pb::Rebuild {
    let mut stream = c
        .children
        .watch_rebuild(pb::WatchRebuildRequest {
            volume: volume.into(),
            child: child.into(),
            interval_ms: 20,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(r) = stream.next().await {
        last = Some(r.unwrap());
    }
    last.expect("the stream sends at least one update")
}

async fn progress(mut s: tonic::Streaming<pb::Progress>) -> pb::Progress {
    let mut last = None;
    while let Some(p) = s.next().await {
        last = Some(p.unwrap());
    }
    let last = last.expect("a final message");
    assert!(last.finished, "{last:?}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_volumes_and_their_replicas_answer_and_refuse_bad_requests() {
    common::require("qemu-io");
    let s = Strata::start(CONFIG);
    let dir = s.dir.path().to_path_buf();
    let mut c = clients(&s.api_endpoint()).await;

    // Node.
    let info = c
        .node
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert!(info.nbd.contains(&format!("nbd://{}", s.addr)), "{info:?}");
    assert!(info.state_store.starts_with("file://"), "{info:?}");
    assert!(info.state_store_available);

    // Volumes: a 3-replica nexus over files that do not exist yet.
    let replicas: Vec<String> = (0..3)
        .map(|i| format!("file://{}/r{i}.img", dir.display()))
        .collect();
    let v = c
        .volumes
        .create_volume(spec("m", 64 * MIB, nexus(&replicas)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size, 64 * MIB);
    assert_eq!(v.kind, "nexus");
    assert_eq!(v.children.len(), 3);
    // With no record, the first replica is the source the others are rebuilt from (thinly:
    // new files are holes).
    for ch in &v.children[1..] {
        if ch.state == "rebuilding" {
            assert_eq!(watch(&mut c, "m", &ch.uri).await.state, "completed");
        }
    }
    let v = c
        .volumes
        .get_volume(pb::GetVolumeRequest { name: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.state, "online", "{v:?}");
    let uri = format!("nbd://{}/m", s.addr);
    assert_eq!(v.exports[0], uri);
    assert!(
        v.exports[1].starts_with("nvmf://127.0.0.1:")
            && v.exports[1].ends_with("/nqn.2026-12.io.strata:m"),
        "{:?}",
        v.exports
    );
    qemu_io(&uri, false, &["write -P 0x5a 0 1M"]);
    qemu_io(&uri, true, &["read -P 0x5a 0 1M"]);

    // Invalid volume requests.
    let bad = [
        (
            spec("m", 64 * MIB, nexus(&replicas)),
            Code::AlreadyExists,
            "exists",
        ),
        (
            spec(
                "odd",
                1000,
                pb::volume_spec::Backing::Device("mem://odd".into()),
            ),
            Code::InvalidArgument,
            "multiple of the 512-byte block size",
        ),
        (
            spec(
                "u",
                MIB,
                pb::volume_spec::Backing::Device("not a uri".into()),
            ),
            Code::InvalidArgument,
            "spec.device",
        ),
        (
            spec(
                "u",
                MIB,
                pb::volume_spec::Backing::Device("warp://x".into()),
            ),
            Code::InvalidArgument,
            "warp",
        ),
        (
            spec(
                "bad/name",
                MIB,
                pb::volume_spec::Backing::Device("mem://x".into()),
            ),
            Code::InvalidArgument,
            "spec.name",
        ),
        (
            spec("u", MIB, nexus(&[replicas[0].clone(), replicas[0].clone()])),
            Code::InvalidArgument,
            "spec.replicas[1]",
        ),
        (
            spec(
                "u",
                MIB,
                pb::volume_spec::Backing::Image("nostore/x".into()),
            ),
            Code::InvalidArgument,
            "nostore",
        ),
    ];
    for (req, code, needle) in bad {
        fails(c.volumes.create_volume(req).await, code, needle);
    }
    fails(
        c.volumes
            .create_volume(pb::CreateVolumeRequest { spec: None })
            .await,
        Code::InvalidArgument,
        "spec",
    );
    fails(
        c.volumes
            .get_volume(pb::GetVolumeRequest {
                name: "nope".into(),
            })
            .await,
        Code::NotFound,
        "nope",
    );
    let names: Vec<String> = c
        .volumes
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.spec.unwrap().name)
        .collect();
    assert_eq!(names, ["cfg", "m"]);

    // Children: offline one, write, online it (a partial rebuild), watch it finish.
    let r = c.children.offline_child(child("m", "1")).await.unwrap();
    assert_eq!(r.into_inner().child.unwrap().state, "offline");
    qemu_io(&uri, false, &["write -P 0x6b 4M 2M"]);
    let r = c.children.online_child(child("m", "1")).await.unwrap();
    assert!(r.into_inner().message.contains("rebuild"));
    let done = watch(&mut c, "m", "1").await;
    assert_eq!(done.state, "completed", "{done:?}");
    assert_eq!(done.kind, "partial");
    let got = c
        .children
        .get_rebuild(child("m", &replicas[1]))
        .await
        .unwrap();
    assert_eq!(got.into_inner().state, "completed");
    // Add a fourth replica: a full rebuild; then remove it by index.
    let fourth = format!("file://{}/r3.img", dir.display());
    let r = c.children.add_child(child("m", &fourth)).await.unwrap();
    assert_eq!(r.into_inner().child.unwrap().uri, fourth);
    let done = watch(&mut c, "m", &fourth).await;
    assert_eq!(
        (done.kind.as_str(), done.state.as_str()),
        ("full", "completed")
    );
    let v = c
        .volumes
        .get_volume(pb::GetVolumeRequest { name: "m".into() })
        .await
        .unwrap()
        .into_inner();
    let pb::volume_spec::Backing::Nexus(n) = v.spec.unwrap().backing.unwrap() else {
        panic!("a nexus")
    };
    assert_eq!(n.replicas.len(), 4, "the spec follows the replicas");
    c.children.remove_child(child("m", "3")).await.unwrap();
    // Invalid children requests.
    fails(
        c.children.offline_child(child("m", "9")).await,
        Code::NotFound,
        "no replica",
    );
    fails(
        c.children.offline_child(child("nope", "0")).await,
        Code::NotFound,
        "nope",
    );
    fails(
        c.children.fault_child(child("cfg", "0")).await,
        Code::FailedPrecondition,
        "not a nexus",
    );
    fails(
        c.children.add_child(child("m", "::")).await,
        Code::InvalidArgument,
        "child",
    );
    fails(
        c.children.pause_rebuild(child("m", "0")).await,
        Code::FailedPrecondition,
        "no rebuild",
    );
    c.children.offline_child(child("m", "0")).await.unwrap();
    c.children.offline_child(child("m", "1")).await.unwrap();
    fails(
        c.children.offline_child(child("m", "2")).await,
        Code::FailedPrecondition,
        "last healthy",
    );
    c.children.online_child(child("m", "0")).await.unwrap();
    // StartRebuild brings back an offline (or faulted, or cancelled) replica like OnlineChild.
    c.children.start_rebuild(child("m", "1")).await.unwrap();
    assert_eq!(watch(&mut c, "m", "1").await.state, "completed");
    assert_eq!(watch(&mut c, "m", "0").await.state, "completed");
    fails(
        c.children.start_rebuild(child("m", "1")).await,
        Code::FailedPrecondition,
        "nothing to rebuild",
    );
    qemu_io(&uri, true, &["read -P 0x5a 0 1M", "read -P 0x6b 4M 2M"]);

    // Node stats count what the clients did.
    let st = c
        .node
        .get_stats(pb::GetStatsRequest { volume: "m".into() })
        .await
        .unwrap()
        .into_inner();
    let m = &st.volumes[0];
    assert!(m.writes >= 2 && m.write_bytes >= 3 * MIB, "{m:?}");
    assert!(m.reads >= 1 && m.read_bytes >= 3 * MIB, "{m:?}");
    fails(
        c.node
            .get_stats(pb::GetStatsRequest {
                volume: "nope".into(),
            })
            .await,
        Code::NotFound,
        "nope",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_deletion_and_reflection() {
    common::require("qemu-io");
    let s = Strata::start(CONFIG);
    let dir = s.dir.path().to_path_buf();
    let mut c = clients(&s.api_endpoint()).await;
    let replicas: Vec<String> = (0..2)
        .map(|i| format!("file://{}/r{i}.img", dir.display()))
        .collect();
    c.volumes
        .create_volume(spec("m", 16 * MIB, nexus(&replicas)))
        .await
        .unwrap();
    let uri = format!("nbd://{}/m", s.addr);
    for ch in &replicas[1..] {
        watch(&mut c, "m", ch).await;
    }
    qemu_io(&uri, false, &["write -P 0x5a 0 1M"]);

    // Exports: withdraw one, clients no longer find it; put it back read-only.
    c.exports
        .delete_export(pb::DeleteExportRequest {
            volume: "m".into(),
            protocol: 0,
        })
        .await
        .unwrap();
    let out = common::run_raw("nbdinfo", &[&uri]);
    assert!(!out.status.success(), "m is no longer exported");
    fails(
        c.exports
            .delete_export(pb::DeleteExportRequest {
                volume: "m".into(),
                protocol: 0,
            })
            .await,
        Code::NotFound,
        "not exported",
    );
    let e = c
        .exports
        .create_export(pb::CreateExportRequest {
            volume: "m".into(),
            protocol: pb::Protocol::Nbd as i32,
            read_only: true,
            description: "mirror".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.uris, vec![uri.clone()]);
    qemu_io(&uri, true, &["read -P 0x5a 0 1M"]);
    let w = common::run_raw("qemu-io", &["-f", "raw", "-c", "write 0 4k", &uri]);
    let out = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        out.contains("ermission") || out.contains("read-only"),
        "{out}"
    );
    fails(
        c.exports
            .create_export(pb::CreateExportRequest {
                volume: "m".into(),
                protocol: 1,
                ..Default::default()
            })
            .await,
        Code::AlreadyExists,
        "already exported",
    );
    fails(
        c.exports
            .create_export(pb::CreateExportRequest {
                volume: "m".into(),
                protocol: 7,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "protocol",
    );
    fails(
        c.exports
            .delete_export(pb::DeleteExportRequest {
                volume: "cfg".into(),
                protocol: 0,
            })
            .await,
        Code::FailedPrecondition,
        "configuration file",
    );
    let listed = c
        .exports
        .list_exports(pb::ListExportsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<(&str, i32)> = listed
        .exports
        .iter()
        .map(|e| (e.volume.as_str(), e.protocol))
        .collect();
    let (nbd, nvmf) = (pb::Protocol::Nbd as i32, pb::Protocol::Nvmf as i32);
    assert_eq!(
        names,
        [("cfg", nbd), ("cfg", nvmf), ("m", nbd), ("m", nvmf)]
    );

    // Delete.
    fails(
        c.volumes
            .delete_volume(pb::DeleteVolumeRequest {
                name: "cfg".into(),
                delete_image: false,
            })
            .await,
        Code::FailedPrecondition,
        "configuration file",
    );
    fails(
        c.volumes
            .delete_volume(pb::DeleteVolumeRequest {
                name: "m".into(),
                delete_image: true,
            })
            .await,
        Code::InvalidArgument,
        "not an image",
    );
    c.volumes
        .delete_volume(pb::DeleteVolumeRequest {
            name: "m".into(),
            delete_image: false,
        })
        .await
        .unwrap();
    fails(
        c.volumes
            .get_volume(pb::GetVolumeRequest { name: "m".into() })
            .await,
        Code::NotFound,
        "m",
    );
    assert!(
        dir.join("r0.img").exists(),
        "replica files are never deleted"
    );

    // Reflection lists every service.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let ch = strata_api::connect(&s.api_endpoint()).await.unwrap();
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(l)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("a list of services")
    };
    let mut services: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    services.sort();
    for want in [
        "Children", "Exports", "Images", "Node", "Specs", "Stores", "Volumes",
    ] {
        assert!(
            services.contains(&format!("strata.v1.{want}")),
            "{services:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_volumes_snapshots_clones_stores_and_a_restart() {
    common::require("qemu-io");
    let s = Strata::start(CONFIG);
    let dir = s.dir.path().to_path_buf();
    let mut c = clients(&s.api_endpoint()).await;
    // A device volume, to show what only images can do.
    c.volumes
        .create_volume(spec(
            "m",
            16 * MIB,
            pb::volume_spec::Backing::Device(format!("file://{}/m.img", dir.display())),
        ))
        .await
        .unwrap();

    // An image volume: snapshots, clones, flatten, resize.
    let img = c
        .volumes
        .create_volume(spec(
            "img",
            32 * MIB,
            pb::volume_spec::Backing::Image("local/img".into()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((img.kind.as_str(), img.size), ("image", 32 * MIB));
    let img_uri = format!("nbd://{}/img", s.addr);
    qemu_io(&img_uri, false, &["write -P 0x11 0 2M"]);
    let snap = c
        .images
        .create_snapshot(pb::CreateSnapshotRequest {
            image: "img".into(),
            name: "s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((snap.image.as_str(), snap.size), ("local/img", 32 * MIB));
    fails(
        c.images
            .create_snapshot(pb::CreateSnapshotRequest {
                image: "img".into(),
                name: "s1".into(),
            })
            .await,
        Code::AlreadyExists,
        "s1",
    );
    fails(
        c.images
            .create_snapshot(pb::CreateSnapshotRequest {
                image: "img".into(),
                name: "bad name".into(),
            })
            .await,
        Code::InvalidArgument,
        "bad name",
    );
    qemu_io(&img_uri, false, &["write -P 0x22 0 1M"]);
    let list = c
        .images
        .list_snapshots(pb::ListSnapshotsRequest {
            image: "local/img".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.snapshots.len(), 1);
    assert_eq!(list.snapshots[0].name, "s1");
    fails(
        c.images
            .list_snapshots(pb::ListSnapshotsRequest {
                image: "local/none".into(),
            })
            .await,
        Code::NotFound,
        "none",
    );
    fails(
        c.images
            .list_snapshots(pb::ListSnapshotsRequest {
                image: "nostore/x".into(),
            })
            .await,
        Code::NotFound,
        "nostore",
    );
    let clone = c
        .images
        .create_clone(pb::CreateCloneRequest {
            snapshot: "img@s1".into(),
            name: "c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (clone.name.as_str(), clone.base.as_deref()),
        ("c1", Some("img@s1"))
    );
    fails(
        c.images
            .create_clone(pb::CreateCloneRequest {
                snapshot: "img@s9".into(),
                name: "c2".into(),
            })
            .await,
        Code::NotFound,
        "s9",
    );
    fails(
        c.images
            .create_clone(pb::CreateCloneRequest {
                snapshot: "img".into(),
                name: "c2".into(),
            })
            .await,
        Code::InvalidArgument,
        "IMAGE@SNAPSHOT",
    );
    // Deleting a snapshot a clone reads through needs flatten.
    fails(
        c.images
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot: "img@s1".into(),
                flatten: false,
            })
            .await,
        Code::FailedPrecondition,
        "c1",
    );
    let done = progress(
        c.images
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot: "img@s1".into(),
                flatten: true,
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(done.message.contains("deleted"), "{done:?}");
    // The clone stands alone and holds the snapshot's data.
    qemu_io(
        &format!("nbd://{}/local/c1", s.addr),
        true,
        &["read -P 0x11 0 2M"],
    );
    fails(
        c.images
            .flatten_image(pb::FlattenImageRequest {
                image: "local/c1".into(),
            })
            .await,
        Code::FailedPrecondition,
        "not a clone",
    );
    fails(
        c.images
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot: "img@s1".into(),
                flatten: false,
            })
            .await,
        Code::NotFound,
        "s1",
    );
    // Flatten as its own call, with progress.
    c.images
        .create_snapshot(pb::CreateSnapshotRequest {
            image: "img".into(),
            name: "s2".into(),
        })
        .await
        .unwrap();
    c.images
        .create_clone(pb::CreateCloneRequest {
            snapshot: "local/img@s2".into(),
            name: "local/c2".into(),
        })
        .await
        .unwrap();
    let done = progress(
        c.images
            .flatten_image(pb::FlattenImageRequest {
                image: "local/c2".into(),
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(done.total > 0 && done.done == done.total, "{done:?}");

    // Resize.
    let v = c
        .volumes
        .resize_volume(pb::ResizeVolumeRequest {
            name: "img".into(),
            size: 48 * MIB,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size, 48 * MIB);
    assert_eq!(v.spec.unwrap().size, 48 * MIB);
    fails(
        c.volumes
            .resize_volume(pb::ResizeVolumeRequest {
                name: "img".into(),
                size: 48 * MIB + 100,
                force: false,
            })
            .await,
        Code::InvalidArgument,
        "multiple",
    );
    fails(
        c.volumes
            .resize_volume(pb::ResizeVolumeRequest {
                name: "img".into(),
                size: 16 * MIB,
                force: false,
            })
            .await,
        Code::FailedPrecondition,
        "force",
    );
    fails(
        c.volumes
            .resize_volume(pb::ResizeVolumeRequest {
                name: "m".into(),
                size: 128 * MIB,
                force: false,
            })
            .await,
        Code::FailedPrecondition,
        "only page-store image volumes",
    );

    // Stores.
    let stores = c
        .stores
        .list_stores(pb::ListStoresRequest {})
        .await
        .unwrap()
        .into_inner();
    let local = stores.stores.iter().find(|s| s.name == "local").unwrap();
    assert_eq!(local.kind, "dir");
    assert!(local.puts > 0, "{local:?}");
    let local = c
        .stores
        .get_store(pb::GetStoreRequest {
            name: "local".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = local.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["c1", "c2", "img"]);
    fails(
        c.stores
            .get_store(pb::GetStoreRequest {
                name: "nope".into(),
            })
            .await,
        Code::NotFound,
        "nope",
    );

    // Volumes created through the API come back after a restart, with their data.
    drop(c);
    let (status, dir) = s.stop();
    assert!(status.success());
    let s = Strata::start_in(dir, CONFIG, &[]);
    let mut c = clients(&s.api_endpoint()).await;
    let v = c
        .volumes
        .get_volume(pb::GetVolumeRequest { name: "img".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size, 48 * MIB);
    qemu_io(
        &format!("nbd://{}/img", s.addr),
        true,
        &["read -P 0x22 0 1M", "read -P 0x11 1M 1M"],
    );
    let m = c
        .volumes
        .get_volume(pb::GetVolumeRequest { name: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((m.kind.as_str(), m.size), ("device", 16 * MIB));
    // Deleting an image volume with its image.
    c.volumes
        .delete_volume(pb::DeleteVolumeRequest {
            name: "img".into(),
            delete_image: true,
        })
        .await
        .unwrap();
    let local = c
        .stores
        .get_store(pb::GetStoreRequest {
            name: "local".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!local.images.iter().any(|i| i.name == "img"), "{local:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_is_not_running_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let e = strata_api::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("is `strata serve` running"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_images_and_specs_through_the_client() {
    common::require("qemu-io");
    let s3 = common::S3Server::start();
    let s = Strata::start(CONFIG);
    let mut c = clients(&s.api_endpoint()).await;
    let ch = strata_api::connect(&s.api_endpoint()).await.unwrap();
    let mut specs = pb::specs_client::SpecsClient::new(ch);
    let s3_store = |name: &str, secret: &str, endpoint: &str| pb::CreateStoreRequest {
        name: name.into(),
        kind: Some(pb::create_store_request::Kind::S3(pb::S3Store {
            endpoint: endpoint.into(),
            region: "us-east-1".into(),
            bucket: common::S3Server::BUCKET.into(),
            prefix: "api".into(),
            access_key_id: common::S3Server::ACCESS_KEY.into(),
            secret_access_key: secret.into(),
        })),
    };

    // Stores: an S3 bucket, reached before the call returns.
    let st = c
        .stores
        .create_store(s3_store("s3", common::S3Server::SECRET_KEY, &s3.endpoint))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.kind.as_str(), st.from_config), ("s3", false));
    assert!(
        !st.location.contains(common::S3Server::SECRET_KEY),
        "{st:?}"
    );
    fails(
        c.stores
            .create_store(s3_store("bad", "wrong-secret", &s3.endpoint))
            .await,
        Code::Unavailable,
        "credentials",
    );
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    fails(
        c.stores
            .create_store(s3_store("gone", common::S3Server::SECRET_KEY, &closed))
            .await,
        Code::Unavailable,
        "gone",
    );
    fails(
        c.stores
            .create_store(s3_store("s3", common::S3Server::SECRET_KEY, &s3.endpoint))
            .await,
        Code::AlreadyExists,
        "s3",
    );
    let dir_store = |name: &str, path: &str| pb::CreateStoreRequest {
        name: name.into(),
        kind: Some(pb::create_store_request::Kind::Dir(pb::DirStore {
            path: path.into(),
        })),
    };
    fails(
        c.stores
            .create_store(dir_store("rel", "relative/dir"))
            .await,
        Code::InvalidArgument,
        "absolute",
    );
    fails(
        c.stores.create_store(dir_store("bad/name", "/tmp/x")).await,
        Code::InvalidArgument,
        "name",
    );
    fails(
        c.stores
            .create_store(pb::CreateStoreRequest {
                name: "k".into(),
                kind: None,
            })
            .await,
        Code::InvalidArgument,
        "kind",
    );
    let objects = s.path("more-objects");
    c.stores
        .create_store(dir_store("more", objects.to_str().unwrap()))
        .await
        .unwrap();

    // An image volume in the S3 store; images listed, resized and deleted.
    c.volumes
        .create_volume(spec(
            "v",
            16 * MIB,
            pb::volume_spec::Backing::Image("s3/vol".into()),
        ))
        .await
        .unwrap();
    let uri = format!("nbd://{}/v", s.addr);
    qemu_io(&uri, false, &["write -P 0x77 0 1M", "flush"]);
    fails(
        c.stores
            .delete_store(pb::DeleteStoreRequest { name: "s3".into() })
            .await,
        Code::FailedPrecondition,
        "v",
    );
    let l = c
        .images
        .list_images(pb::ListImagesRequest { store: "s3".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.images.len(), 1);
    assert_eq!((l.images[0].name.as_str(), l.images[0].open), ("vol", true));
    let r = c
        .images
        .resize_image(pb::ResizeImageRequest {
            image: "s3/vol".into(),
            size: 32 * MIB,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.size, 32 * MIB);
    let v = c
        .volumes
        .get_volume(pb::GetVolumeRequest { name: "v".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        v.spec.unwrap().size,
        32 * MIB,
        "the volume's declaration follows"
    );
    fails(
        c.images
            .resize_image(pb::ResizeImageRequest {
                image: "s3/vol".into(),
                size: 8 * MIB,
                force: false,
            })
            .await,
        Code::FailedPrecondition,
        "force",
    );
    fails(
        c.images
            .delete_image(pb::DeleteImageRequest {
                image: "s3/vol".into(),
            })
            .await,
        Code::FailedPrecondition,
        "volume",
    );
    fails(
        c.images
            .list_images(pb::ListImagesRequest {
                store: "nope".into(),
            })
            .await,
        Code::NotFound,
        "nope",
    );
    c.volumes
        .delete_volume(pb::DeleteVolumeRequest {
            name: "v".into(),
            delete_image: false,
        })
        .await
        .unwrap();
    c.images
        .delete_image(pb::DeleteImageRequest {
            image: "s3/vol".into(),
        })
        .await
        .unwrap();
    let l = c
        .images
        .list_images(pb::ListImagesRequest { store: "s3".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(l.images.is_empty(), "{l:?}");
    c.stores
        .delete_store(pb::DeleteStoreRequest { name: "s3".into() })
        .await
        .unwrap();
    fails(
        c.stores
            .delete_store(pb::DeleteStoreRequest {
                name: "local".into(),
            })
            .await,
        Code::FailedPrecondition,
        "configuration file",
    );
    fails(
        c.stores
            .delete_store(pb::DeleteStoreRequest { name: "s3".into() })
            .await,
        Code::NotFound,
        "s3",
    );

    // Specs through the client: dry run, a field-precise refusal, apply, read back.
    let doc = "volumes:\n  - name: sv\n    image: more/sv\n    size: 8M\n";
    let plan = specs
        .apply(pb::ApplyRequest {
            spec: doc.into(),
            dry_run: true,
            prune: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plan.actions.len(), 1);
    assert_eq!(
        (plan.actions[0].verb.as_str(), plan.actions[0].done),
        ("create", false)
    );
    fails(
        specs
            .apply(pb::ApplyRequest {
                spec: "volumes:\n  - name: sv\n    image: more/sv\n    size: 7\n".into(),
                dry_run: false,
                prune: false,
            })
            .await,
        Code::InvalidArgument,
        "volumes[0].size",
    );
    fails(
        specs
            .apply(pb::ApplyRequest {
                spec: "volumes: 3\n".into(),
                dry_run: false,
                prune: false,
            })
            .await,
        Code::InvalidArgument,
        "volumes",
    );
    let done = specs
        .apply(pb::ApplyRequest {
            spec: doc.into(),
            dry_run: false,
            prune: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.actions.iter().all(|a| a.done), "{done:?}");
    let got = specs
        .get_spec(pb::GetSpecRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.spec, doc);

    // A store created through the API is there again after a restart, with its volume.
    drop((c, specs));
    let (status, dir) = s.stop();
    assert!(status.success());
    let s = Strata::start_in(dir, CONFIG, &[]);
    let mut c = clients(&s.api_endpoint()).await;
    let names: Vec<String> = c
        .stores
        .list_stores(pb::ListStoresRequest {})
        .await
        .unwrap()
        .into_inner()
        .stores
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["local", "more"]);
    qemu_io(&format!("nbd://{}/sv", s.addr), true, &["read -P 0 0 1M"]);
}
