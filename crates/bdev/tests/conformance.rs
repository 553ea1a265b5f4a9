//! The conformance suite on the memory device and on the fault and stats wrappers around it.

use std::sync::Arc;

use strata_bdev::conformance::{run, Expect};
use strata_bdev::{BlockDevice, FaultDevice, MemDevice, StatsDevice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_device() {
    run(Expect::default(), |size| async move {
        Arc::new(MemDevice::new("c", size)) as Arc<dyn BlockDevice>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_wrapper_without_rules() {
    run(Expect::default(), |size| async move {
        let (dev, _handle) = FaultDevice::new(Arc::new(MemDevice::new("f", size)));
        Arc::new(dev) as Arc<dyn BlockDevice>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_wrapper() {
    run(Expect::default(), |size| async move {
        Arc::new(StatsDevice::new(Arc::new(MemDevice::new("s", size)))) as Arc<dyn BlockDevice>
    })
    .await;
}
