//! A resized namespace: the target raises a namespace-attribute notice, lists the namespace in
//! the changed namespace log (cleared when read), and Strata's host follows the new size.

mod common;

use std::sync::Arc;

use common::*;
use strata_bdev::{BlockDevice, WriteOpts};
use strata_nvmf::codec::{aen, cns, feature, log_id, Command, Digests, IdentifyNamespace};
use strata_nvmf::{HostOptions, TargetSettings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_raises_a_notice_and_the_host_follows() {
    let (t, addr) = target(TargetSettings::default()).await;
    let dev = Arc::new(Resizable::new("grow", 8 << 20, 32 << 20));
    let n = export(&t, "grow", dev.clone());

    // Strata's host.
    let h = host(addr, &n, HostOptions::default()).await;
    assert_eq!(h.geometry().size, 8 << 20);
    assert!(h.capabilities().resize);
    let end = 24 << 20;
    assert!(h
        .write_at(end - 4096, pattern(1, 4096), WriteOpts::default())
        .await
        .is_err());

    // A raw host that asked for notices and has an event request waiting.
    let mut admin = Raw::connect(addr).await;
    admin.init(Digests::default()).await;
    admin.connect_admin(&n, 0).await;
    admin.enable().await;
    let cid = admin.cid();
    let r = admin
        .command(
            Command::set_features(cid, feature::ASYNC_EVENT_CONFIG, aen::CFG_NS_ATTRIBUTE),
            &[],
        )
        .await;
    assert!(r.completion.status.is_success());
    let aer = admin.cid();
    let c = admin.capsule(&Command::async_event_request(aer), &[]);
    admin.send(&c).await;

    dev.resize(end);
    t.resized(&n).expect("resized");

    let ev = admin.answer(aer).await;
    assert_eq!(
        ev.completion.result as u32,
        aen::result(
            aen::TYPE_NOTICE,
            aen::INFO_NS_CHANGED,
            log_id::CHANGED_NAMESPACES
        )
    );
    let cid = admin.cid();
    let log = admin
        .command(
            Command::get_log_page(cid, log_id::CHANGED_NAMESPACES, 0xFFFF_FFFF, 4096, 0, false),
            &[],
        )
        .await;
    assert_eq!(
        &log.data[..8],
        &[1, 0, 0, 0, 0, 0, 0, 0],
        "namespace 1 changed"
    );
    let cid = admin.cid();
    let log = admin
        .command(
            Command::get_log_page(cid, log_id::CHANGED_NAMESPACES, 0xFFFF_FFFF, 4096, 0, false),
            &[],
        )
        .await;
    assert!(
        log.data.iter().all(|&b| b == 0),
        "reading the log cleared it"
    );
    let cid = admin.cid();
    let id = admin
        .command(Command::identify(cid, cns::NAMESPACE, 1, 0), &[])
        .await;
    let id = IdentifyNamespace::decode(&id.data).expect("identify");
    assert_eq!(id.nsze, end / 512);

    // Strata's host picked the notice up by itself.
    wait_until("the host sees the new size", LIMIT, || {
        let size = h.geometry().size;
        async move { size == end }
    })
    .await;
    let data = pattern(2, 4096);
    h.write_at(end - 4096, data.clone(), WriteOpts::default())
        .await
        .expect("write at the new end");
    assert_eq!(h.read_at(end - 4096, 4096).await.expect("read"), data);

    // A second resize, while no event request is waiting, is delivered to the next one.
    dev.resize(28 << 20);
    t.resized(&n).expect("resized");
    let aer = admin.cid();
    let r = admin.command(Command::async_event_request(aer), &[]).await;
    assert_eq!((r.completion.result >> 8) as u8, aen::INFO_NS_CHANGED as u8);
    assert!(matches!(
        t.resized(&nqn("nope")),
        Err(strata_nvmf::TargetError::NotFound(_))
    ));
}
