//! What the nexus tests share: memory children, a child's state, and writes through the nexus.

#![allow(dead_code)]

use std::sync::Arc;

use strata_bdev::{BlockDevice, Bytes, MemDevice, WriteOpts};
use strata_nexus::{ChildState, Nexus};

pub const MIB: u64 = 1 << 20;

/// A memory child named `name`.
pub fn mem(name: &str, size: u64) -> Arc<MemDevice> {
    Arc::new(MemDevice::new(name, size))
}

/// The state of the nexus's child `child`.
pub fn state(nexus: &Nexus, child: &str) -> ChildState {
    nexus.status().child(child).expect("child").state.clone()
}

/// Write `data` at `offset` through the nexus; it must succeed.
pub async fn write(nexus: &Nexus, offset: u64, data: Bytes) {
    nexus
        .write_at(offset, data, WriteOpts::default())
        .await
        .expect("write through the nexus");
}
