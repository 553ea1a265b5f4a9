//! The block-device conformance suite on Strata's NVMe/TCP host against Strata's target, plain
//! and with header and data digests, and with in-capsule data turned off (every write by R2T).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use strata_bdev::conformance::{self, Expect};
use strata_bdev::BlockDevice;
use strata_nvmf::{HostOptions, TargetSettings};

async fn conformance_with(settings: TargetSettings, opts: HostOptions) {
    let (t, addr) = target(settings).await;
    let n = AtomicUsize::new(0);
    conformance::run(Expect::default(), |size| {
        let name = format!("c{}", n.fetch_add(1, Ordering::Relaxed));
        let nqn = export(&t, &name, mem(&name, size));
        let opts = opts.clone();
        let t = t.clone();
        async move {
            let dev = host(addr, &nqn, opts.clone()).await;
            let caps = dev.capabilities();
            assert!(caps.trim && caps.write_zeroes && caps.fua && caps.resize);
            let info = t.controller_info(&nqn);
            assert_eq!(info.len(), 1);
            assert_eq!(info[0].queues.len(), 1 + dev.io_queues(), "{info:?}");
            assert!(
                info[0]
                    .queues
                    .iter()
                    .all(|q| q.header_digest == opts.header_digest
                        && q.data_digest == opts.data_digest),
                "the digests asked for: {info:?}"
            );
            Arc::new(dev) as Arc<dyn BlockDevice>
        }
    })
    .await;
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_plain() {
    conformance_with(TargetSettings::default(), HostOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_header_and_data_digests() {
    let opts = HostOptions {
        header_digest: true,
        data_digest: true,
        ..HostOptions::default()
    };
    conformance_with(TargetSettings::default(), opts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_every_write_by_r2t_in_small_h2c_pdus() {
    let settings = TargetSettings {
        in_capsule_data_size: 0,
        max_h2c_data: 4096,
        max_data_transfer: 64 << 10,
        ..TargetSettings::default()
    };
    let opts = HostOptions {
        queues: 3,
        queue_size: 8,
        data_digest: true,
        ..HostOptions::default()
    };
    conformance_with(settings, opts).await;
}
