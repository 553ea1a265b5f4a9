//! The discovery subsystem: its controller, the discovery log (every subsystem the host may
//! reach, at the address it connected to), and the log-change notice.

mod common;

use common::*;
use strata_nvmf::codec::identify::cntrltype;
use strata_nvmf::codec::log::{adrfam, subtype, trtype};
use strata_nvmf::codec::{
    aen, cns, feature, log_id, Command, Digests, DiscoveryLog, IdentifyController, Status,
    DISCOVERY_NQN,
};
use strata_nvmf::{Subsystem, TargetSettings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_every_subsystem_the_host_may_reach() {
    let (t, addr) = target(TargetSettings::default()).await;
    let a = export(&t, "alpha", mem("alpha", 1 << 20));
    let b = export(&t, "beta", mem("beta", 1 << 20));
    t.add_subsystem(Subsystem {
        allowed_hosts: Some(vec!["nqn.2014-08.org.example:not-this-one".into()]),
        ..Subsystem::new(nqn("hidden"), mem("hidden", 1 << 20))
    })
    .expect("add");

    let mut d = Raw::connect(addr).await;
    d.init(Digests::default()).await;
    // No keep-alive asked for: a discovery controller gets the default one.
    let cntlid = d.connect_admin(DISCOVERY_NQN, 0).await;
    d.enable().await;
    assert_eq!(t.controllers(DISCOVERY_NQN), vec![cntlid]);

    let cid = d.cid();
    let id = d
        .command(Command::identify(cid, cns::CONTROLLER, 0, 0), &[])
        .await;
    let id = IdentifyController::decode(&id.data).expect("identify");
    assert_eq!(id.cntrltype, cntrltype::DISCOVERY);
    assert_eq!(id.subnqn, DISCOVERY_NQN);
    assert_eq!(id.cntlid, cntlid);
    assert!(id.maxcmd > 0 && id.sgls & 1 != 0);

    // The header first (as nvme-cli does), then the whole log, then a piece at an offset.
    let cid = d.cid();
    let head = d
        .command(
            Command::get_log_page(cid, log_id::DISCOVERY, 0, 1024, 0, false),
            &[],
        )
        .await;
    assert!(head.completion.status.is_success());
    assert_eq!(
        DiscoveryLog::records(&head.data),
        Some(2),
        "the hidden subsystem is not listed"
    );
    let cid = d.cid();
    let full = d
        .command(
            Command::get_log_page(cid, log_id::DISCOVERY, 0, 3072, 0, false),
            &[],
        )
        .await;
    let log = DiscoveryLog::decode(&full.data).expect("decode");
    let names: Vec<&str> = log.entries.iter().map(|e| e.subnqn.as_str()).collect();
    assert_eq!(names, vec![a.as_str(), b.as_str()]);
    for e in &log.entries {
        assert_eq!(e.trtype, trtype::TCP);
        assert_eq!(e.adrfam, adrfam::IPV4);
        assert_eq!(e.subtype, subtype::NVM);
        assert_eq!(e.traddr, "127.0.0.1", "the address the host connected to");
        assert_eq!(e.trsvcid, addr.port().to_string());
        assert_eq!(e.cntlid, 0xFFFF, "dynamic controllers");
    }
    let cid = d.cid();
    let piece = d
        .command(
            Command::get_log_page(cid, log_id::DISCOVERY, 0, 1024, 2048, false),
            &[],
        )
        .await;
    assert_eq!(
        piece.data,
        full.data[2048..3072],
        "offsets read the same log"
    );

    // Log-change notices: asked for, then raised when a subsystem comes and goes.
    let cid = d.cid();
    let r = d
        .command(
            Command::set_features(cid, feature::ASYNC_EVENT_CONFIG, aen::CFG_DISCOVERY_CHANGE),
            &[],
        )
        .await;
    assert!(r.completion.status.is_success());
    let aer = d.cid();
    let c = d.capsule(&Command::async_event_request(aer), &[]);
    d.send(&c).await;
    export(&t, "gamma", mem("gamma", 1 << 20));
    let ev = d.answer(aer).await;
    assert_eq!(
        ev.completion.result as u32,
        aen::result(
            aen::TYPE_NOTICE,
            aen::INFO_DISCOVERY_CHANGED,
            log_id::DISCOVERY
        )
    );
    let cid = d.cid();
    let full = d
        .command(
            Command::get_log_page(cid, log_id::DISCOVERY, 0, 4096, 0, false),
            &[],
        )
        .await;
    let after = DiscoveryLog::decode(&full.data).expect("decode");
    assert_eq!(after.entries.len(), 3);
    assert!(after.genctr > log.genctr, "the generation counter moved");

    // A discovery controller has no I/O queues and no namespaces.
    let mut io = Raw::connect(addr).await;
    io.init(Digests::default()).await;
    let r = io.connect_queue(DISCOVERY_NQN, 1, 31, cntlid, 0, 0).await;
    assert_eq!(
        r.completion.status.code(),
        Status::CONNECT_INVALID_PARAMETERS
    );
    let cid = d.cid();
    let r = d
        .command(Command::identify(cid, cns::NAMESPACE, 1, 0), &[])
        .await;
    assert_eq!(r.completion.status.code(), Status::INVALID_FIELD);

    // A subsystem removed disappears from the log, and its controllers go.
    let dev = host(addr, &a, strata_nvmf::HostOptions::default()).await;
    assert_eq!(t.controllers(&a).len(), 1);
    t.remove_subsystem(&a).expect("remove");
    assert!(t.controllers(&a).is_empty());
    wait_until("the host notices its controller is gone", LIMIT, || {
        let c = dev.is_connected();
        async move { !c }
    })
    .await;
    let cid = d.cid();
    let full = d
        .command(
            Command::get_log_page(cid, log_id::DISCOVERY, 0, 4096, 0, false),
            &[],
        )
        .await;
    let last = DiscoveryLog::decode(&full.data).expect("decode");
    assert!(last.entries.iter().all(|e| e.subnqn != a));
}
