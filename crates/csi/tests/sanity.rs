//! csi-sanity (the kubernetes-csi project's conformance suite, v5.4) against `strata csi --mode
//! all` over a `strata serve` started here: volumes are page-store images in a directory store,
//! staged through nbdfuse and a loop device, formatted and mounted. Every optional capability
//! is advertised, and the mutable-parameter and node attach-limit tests are enabled, so nothing
//! is skipped.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{require, Driver};

/// Counts from csi-sanity's (Ginkgo's) closing summary: `… N Passed | N Failed | N Pending | N
/// Skipped`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    ran: u32,
    total: u32,
    passed: u32,
    failed: u32,
    pending: u32,
    skipped: u32,
}

fn parse_summary(out: &str) -> Option<Summary> {
    let mut s = Summary::default();
    let ran = out.lines().find(|l| l.starts_with("Ran "))?;
    let words: Vec<&str> = ran.split_whitespace().collect();
    s.ran = words.get(1)?.parse().ok()?;
    s.total = words.get(3)?.parse().ok()?;
    let counts = out.lines().find(|l| l.contains(" Passed | "))?;
    let counts = counts.rsplit("-- ").next()?;
    for part in counts.split('|') {
        let mut w = part.split_whitespace();
        let n: u32 = w.next()?.parse().ok()?;
        match w.next()? {
            "Passed" => s.passed = n,
            "Failed" => s.failed = n,
            "Pending" => s.pending = n,
            "Skipped" => s.skipped = n,
            _ => {}
        }
    }
    Some(s)
}

#[test]
fn summary_lines_parse() {
    let out = "Ran 91 of 92 Specs in 60.2 seconds\nSUCCESS! -- 91 Passed | 0 Failed | 1 Pending | 0 Skipped\nPASS\n";
    assert_eq!(
        parse_summary(out),
        Some(Summary {
            ran: 91,
            total: 92,
            passed: 91,
            failed: 0,
            pending: 1,
            skipped: 0
        })
    );
    assert_eq!(parse_summary("no summary"), None);
}

#[test]
fn csi_sanity_passes_with_nothing_skipped() {
    let sanity = require("csi-sanity");
    for p in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "resize2fs",
        "blkid",
        "fusermount3",
    ] {
        require(p);
    }
    let d = Driver::start(&["--max-volumes-per-node", "3"]);
    let dir = d.dir.path();
    let params = dir.join("params.yaml");
    std::fs::write(&params, "store: local\n").expect("write parameters");
    let mutable = dir.join("mutable.yaml");
    std::fs::write(&mutable, "replicas: \"1\"\n").expect("write mutable parameters");
    let out = Command::new(&sanity)
        .arg(format!("--csi.endpoint={}", d.endpoint))
        .arg(format!("--csi.mountdir={}/mnt", dir.display()))
        .arg(format!("--csi.stagingdir={}/staging", dir.display()))
        .arg(format!("--csi.testvolumesize={}", 64u64 << 20))
        .arg(format!("--csi.testvolumeexpandsize={}", 96u64 << 20))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg(format!(
            "--csi.testvolumemutableparameters={}",
            mutable.display()
        ))
        .arg("--csi.testnodevolumeattachlimit")
        .arg("--ginkgo.no-color")
        .arg(format!("--ginkgo.timeout={:?}", Duration::from_secs(1500)))
        .output()
        .expect("run csi-sanity");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let Some(s) = parse_summary(&text) else {
        panic!("csi-sanity printed no summary:\n{text}\n{}", d.logs());
    };
    eprintln!("csi-sanity: {s:?}");
    assert!(
        s.failed == 0 && s.skipped == 0 && out.status.success(),
        "csi-sanity: {s:?}\n{text}\n{}",
        d.logs()
    );
    // The one pending spec is csi-sanity's own: its ListVolumes pagination test is disabled
    // in csi-sanity's source (XIt, "fragile"), which no flag turns on; every other spec ran
    // and passed.
    let pending: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("[PENDING]"))
        .skip(1)
        .take(1)
        .collect();
    assert_eq!(s.pending, 1, "{s:?}");
    assert!(
        pending.first().is_some_and(
            |l| l.contains("ListVolumes pagination should detect volumes added between pages")
        ),
        "the pending spec: {pending:?}"
    );
    assert_eq!(s.passed, s.total - s.pending, "{s:?}");
    assert_eq!(s.ran, s.passed, "{s:?}");
    // Nothing the suite made is left behind.
    assert!(d.volumes().is_empty(), "volumes left: {:?}", d.volumes());
    assert!(
        common::mounts_under(dir).is_empty(),
        "{:?}",
        common::mounts_under(dir)
    );
    assert!(
        common::loops_under(dir).is_empty(),
        "{:?}",
        common::loops_under(dir)
    );
}

/// Every capability csi-sanity v5.4 knows is advertised (so none of its specs is skipped for a
/// capability the driver lacks), and nothing else is: csi-sanity fails a driver advertising a
/// capability it does not know, such as CSI 1.12's alpha GET_SNAPSHOT, which the driver
/// serves without advertising. The SnapshotMetadata service (alpha) is not implemented.
#[test]
fn every_capability_csi_sanity_knows_is_advertised() {
    use strata_csi::csi;
    let d = Driver::start(&[]);
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let (plugin, controller, node) = rt.block_on(async {
        let channel = strata_api::connect(&d.endpoint).await.expect("connect");
        let plugin = csi::identity_client::IdentityClient::new(channel.clone())
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities;
        let controller = csi::controller_client::ControllerClient::new(channel.clone())
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .expect("ControllerGetCapabilities")
            .into_inner()
            .capabilities;
        let node = csi::node_client::NodeClient::new(channel)
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .expect("NodeGetCapabilities")
            .into_inner()
            .capabilities;
        (plugin, controller, node)
    });
    use csi::plugin_capability::{service, volume_expansion, Type as P};
    let mut services: Vec<i32> = plugin
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(P::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    services.sort_unstable();
    assert_eq!(
        services,
        [
            service::Type::ControllerService as i32,
            service::Type::VolumeAccessibilityConstraints as i32,
            service::Type::GroupControllerService as i32,
        ],
        "{plugin:?}"
    );
    assert!(
        plugin.iter().any(|c| matches!(&c.r#type,
            Some(P::VolumeExpansion(e)) if e.r#type == volume_expansion::Type::Online as i32)),
        "{plugin:?}"
    );
    use csi::controller_service_capability::{rpc::Type as C, Type as CT};
    let mut rpcs: Vec<i32> = controller
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(CT::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    rpcs.sort_unstable();
    let mut want: Vec<i32> = [
        C::CreateDeleteVolume,
        C::PublishUnpublishVolume,
        C::ListVolumes,
        C::GetCapacity,
        C::CreateDeleteSnapshot,
        C::ListSnapshots,
        C::CloneVolume,
        C::PublishReadonly,
        C::ExpandVolume,
        C::ListVolumesPublishedNodes,
        C::VolumeCondition,
        C::GetVolume,
        C::SingleNodeMultiWriter,
        C::ModifyVolume,
    ]
    .iter()
    .map(|t| *t as i32)
    .collect();
    want.sort_unstable();
    assert_eq!(rpcs, want, "{controller:?}");
    use csi::node_service_capability::{rpc::Type as N, Type as NT};
    let mut rpcs: Vec<i32> = node
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(NT::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    rpcs.sort_unstable();
    let mut want: Vec<i32> = [
        N::StageUnstageVolume,
        N::GetVolumeStats,
        N::ExpandVolume,
        N::VolumeCondition,
        N::SingleNodeMultiWriter,
        N::VolumeMountGroup,
    ]
    .iter()
    .map(|t| *t as i32)
    .collect();
    want.sort_unstable();
    assert_eq!(rpcs, want, "{node:?}");
}
