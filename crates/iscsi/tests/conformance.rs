//! The block-device conformance suite on `iscsi://` devices served by tgt: plain, with header
//! and data digests, with CHAP, and on a thin-provisioned LUN (trim through UNMAP).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::Tgt;
use strata_bdev::conformance::{run, Expect, SIZE};
use strata_bdev::{BlockDevice, Registry};
use strata_iscsi::IscsiOpener;

/// Run the suite, each check on a fresh LUN of a new target; `query` is added to every URI.
async fn suite(query: &'static str, thin: bool, chap: Option<(&'static str, &'static str)>) {
    let dir = tempfile::tempdir().unwrap();
    let tgt = Arc::new(Mutex::new(Tgt::start(dir.path())));
    let mut registry = Registry::empty();
    IscsiOpener::register(&mut registry);
    let dir_path = dir.path().to_path_buf();
    let count = Arc::new(Mutex::new(0u32));
    let expect = Expect {
        // tgt's thin LUNs punch holes and report LBPRZ: trimmed blocks read as zeroes.
        trim_reads_zero: true,
    };
    run(expect, |size| {
        let tgt = tgt.clone();
        let registry = registry.clone();
        let dir = dir_path.clone();
        let count = count.clone();
        async move {
            assert_eq!(size, SIZE);
            let uri = {
                let mut n = count.lock().unwrap();
                *n += 1;
                let mut t = tgt.lock().unwrap();
                let (tid, iqn) = t.add_target(
                    &format!("lun{n}"),
                    &dir.join(format!("lun{n}.img")),
                    size,
                    thin,
                );
                if let Some((user, secret)) = chap {
                    t.require_chap(tid, user, secret);
                }
                t.uri(&iqn, query)
            };
            let dev: Arc<dyn BlockDevice> = registry.open(&uri).await.unwrap();
            dev
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_without_digests() {
    suite("timeout=20", false, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_header_and_data_digests() {
    suite(
        "timeout=20&header_digest=crc32c&data_digest=crc32c",
        false,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_chap() {
    suite(
        "timeout=20&user=strata&secret=0123456789abcdef",
        false,
        Some(("strata", "0123456789abcdef")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_thin_lun_with_unmap() {
    suite("timeout=20", true, None).await;
}
