//! The Kubernetes deployment in `deploy/kubernetes/` validates against the Kubernetes schemas
//! (`kubernetes-validate --strict`, which ships them: unknown fields are errors), every object
//! the driver needs is there, and the container image installs every program the node plugin
//! runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .expect("deploy/kubernetes")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// `kubernetes-validate --strict FILES`: (success, output).
fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(common::require("kubernetes-validate"))
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The YAML documents of every manifest.
fn documents() -> Vec<serde_yaml_ng::Value> {
    manifests()
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).expect("read a manifest");
            serde_yaml_ng::Deserializer::from_str(&text)
                .map(|d| {
                    <serde_yaml_ng::Value as serde::Deserialize>::deserialize(d)
                        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let files = manifests();
    let (ok, out) = validate(&files);
    assert!(ok, "kubernetes-validate --strict:\n{out}");
    // Every built-in object was checked against its schema, none skipped for want of one
    // (the VolumeSnapshotClass, a CRD of the snapshot controller, is checked below).
    let passed = out
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    let docs = documents();
    let crds: Vec<&serde_yaml_ng::Value> = docs
        .iter()
        .filter(|d| d["apiVersion"].as_str() == Some("snapshot.storage.k8s.io/v1"))
        .collect();
    assert_eq!(passed, docs.len() - crds.len(), "{out}");
    for w in out.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            w.contains("Couldn't find schema for kind VolumeSnapshotClass"),
            "unexpected warning: {w}"
        );
    }
    // The VolumeSnapshotClass by its CRD's schema: these fields and no others.
    assert_eq!(crds.len(), 1, "one VolumeSnapshotClass");
    let c = crds[0].as_mapping().expect("an object");
    for k in c.keys() {
        let k = k.as_str().expect("string keys");
        assert!(
            [
                "apiVersion",
                "kind",
                "metadata",
                "driver",
                "deletionPolicy",
                "parameters"
            ]
            .contains(&k),
            "VolumeSnapshotClass has no field {k:?}"
        );
    }
    assert_eq!(crds[0]["kind"].as_str(), Some("VolumeSnapshotClass"));
    assert_eq!(crds[0]["driver"].as_str(), Some(strata_csi::DRIVER_NAME));
    assert!(matches!(
        crds[0]["deletionPolicy"].as_str(),
        Some("Delete" | "Retain")
    ));

    // The validator does reject what is wrong: the controller with a misspelt field.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let text = std::fs::read_to_string(deploy_dir().join("kubernetes/controller.yaml"))
        .expect("controller.yaml");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, text.replacen("replicas: 1", "replica: 1", 1)).expect("write");
    let (ok, out) = validate(&[broken]);
    assert!(!ok && out.contains("'replica' was unexpected"), "{out}");
}

#[test]
fn the_deployment_has_every_piece_the_driver_needs() {
    let docs = documents();
    let kinds: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default().to_string(),
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    for kind in [
        "CSIDriver",
        "StorageClass",
        "VolumeSnapshotClass",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "DaemonSet",
    ] {
        assert!(kinds.iter().any(|(k, _)| k == kind), "no {kind}: {kinds:?}");
    }
    let named = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("a {kind}"))
    };
    assert_eq!(
        named("CSIDriver")["metadata"]["name"].as_str(),
        Some(strata_csi::DRIVER_NAME)
    );
    let images = |d: &serde_yaml_ng::Value| -> Vec<String> {
        d["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .expect("containers")
            .iter()
            .filter_map(|c| c["image"].as_str().map(String::from))
            .collect()
    };
    let controller = images(named("Deployment"));
    for sidecar in [
        "csi-provisioner",
        "csi-attacher",
        "csi-snapshotter",
        "csi-resizer",
        "livenessprobe",
    ] {
        assert!(
            controller
                .iter()
                .any(|i| i.contains(&format!("/{sidecar}:"))),
            "the controller has no {sidecar}: {controller:?}"
        );
    }
    let node = images(named("DaemonSet"));
    for sidecar in ["csi-node-driver-registrar", "livenessprobe"] {
        assert!(
            node.iter().any(|i| i.contains(&format!("/{sidecar}:"))),
            "the node plugin has no {sidecar}: {node:?}"
        );
    }
    // Each StorageClass's parameters are ones CreateVolume accepts.
    for sc in docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("StorageClass"))
    {
        assert_eq!(sc["provisioner"].as_str(), Some(strata_csi::DRIVER_NAME));
        let params: std::collections::HashMap<String, String> = sc["parameters"]
            .as_mapping()
            .expect("parameters")
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().expect("a key").to_string(),
                    v.as_str().expect("a string value").to_string(),
                )
            })
            .collect();
        strata_csi::names::Params::parse(&params, &Default::default())
            .unwrap_or_else(|e| panic!("{:?}: {e}", sc["metadata"]["name"]));
    }
}

#[test]
fn the_image_installs_every_program_the_node_plugin_runs() {
    let dockerfile =
        std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    let install = dockerfile
        .split("apt-get install")
        .nth(1)
        .and_then(|rest| rest.split("&&").next())
        .expect("an apt-get install line");
    let packages: Vec<&str> = install
        .split_whitespace()
        .filter(|w| !w.starts_with('-') && *w != "\\")
        .collect();
    // Program → Debian package.
    for (program, package) in [
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("resize2fs", "e2fsprogs"),
        ("mkfs.xfs", "xfsprogs"),
        ("xfs_growfs", "xfsprogs"),
        ("blkid", "util-linux"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("nvme", "nvme-cli"),
        ("nbd-client", "nbd-client"),
        ("nbdfuse", "libnbd-bin"),
        ("fusermount3", "fuse3"),
    ] {
        assert!(
            packages.contains(&package),
            "{program}: the image installs no {package} ({packages:?})"
        );
    }
    assert!(
        dockerfile.contains("cargo build --release --locked -p strata --bin strata"),
        "the image builds strata"
    );
}
