//! Strata's vhost-user-blk target: volumes served straight into virtual machines.
//!
//! A VMM (qemu, Cloud Hypervisor, Firecracker, Kata …) hands the guest's virtio-blk queues to
//! this process over a unix socket: it shares the guest's memory (a memfd) and one eventfd pair
//! per queue, so requests and their data never cross a network stack or a copy in the VMM.
//! This crate owns that export: one socket per volume, the virtio-blk device model, and the
//! bridge from vhost-user-backend's queue threads to the async [`BlockDevice`].
//!
//! ```text
//!  guest virtio-blk driver
//!      │ descriptors in shared memory, kick/call eventfds
//!  VMM ── unix socket NAME.sock (mode 0600) ──► relay ─► vhost-user-backend message handler
//!      │                                          │       (SET_MEM_TABLE, SET_VRING_*, GET_CONFIG…)
//!      │                                          └ back-end channel: config change (resize)
//!      ▼
//!  queue thread per virtqueue (vhost-user-backend) ── codec (layout, header, status) ──┐
//!      first poll of each request here; what is not done yet ─► tokio runtime          │
//!      ▼                                                                               │
//!  Arc<dyn BlockDevice> (nexus, image, file, mem, nbd)  ◄────────────────────────────┘
//!      completion: data + status into guest memory (vm-memory) ─► used ring ─► call eventfd
//! ```
//!
//! - [`codec`]: the virtio-blk format as pure functions (feature bits, request layout over
//!   any descriptor framing, headers, discard segments, configuration space).
//! - `connection`: one front-end's session — the `VhostUserBackend` implementation, request
//!   execution, completion out of order, draining.
//! - `relay`: the control socket relayed message by message, keeping the back-end channel to
//!   announce a resize (vhost-user-backend gives a back end no way to send it).
//! - [`VhostUserTarget`]: sockets, one front-end at a time per volume, reconnection, stop.
//! - `frontend` (feature `frontend`): a vhost-user-blk driver outside any VM, on the `vhost`
//!   crate's front-end, for tests and benchmarks.
//!
//! The device offers SEG_MAX, BLK_SIZE, TOPOLOGY, FLUSH, CONFIG_WCE, MQ, DISCARD (when the
//! device can trim), WRITE_ZEROES, RO (read-only volumes), GET_ID (the volume name), indirect
//! descriptors and EVENT_IDX; protocol features MQ, CONFIG, REPLY_ACK and BACKEND_REQ.
//! INFLIGHT_SHMFD is not offered: vhost-user-backend refuses GET_INFLIGHT_FD. In its place,
//! an export that stops completes every request in flight before it closes the connection, so
//! a front-end that reconnects resumes exactly after the last request it saw completed.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use strata_vhost_user_blk::{VhostUserSettings, VhostUserTarget};
//!
//! let device = Arc::new(strata_bdev::MemDevice::new("demo", 1 << 30));
//! let target = VhostUserTarget::new(VhostUserSettings::default(), tokio::runtime::Handle::current())?;
//! target.serve("demo", device, false, "/run/strata/vhost-user/demo.sock".as_ref())?;
//! // qemu … -chardev socket,id=demo,path=/run/strata/vhost-user/demo.sock
//! //        -device vhost-user-blk-pci,chardev=demo,num-queues=2
//! target.resized("demo")?; // after the device grew
//! target.stop("demo").await?;
//! # Ok(()) }
//! ```
//!
//! [`BlockDevice`]: strata_bdev::BlockDevice

pub mod codec;
mod connection;
mod error;
#[cfg(feature = "frontend")]
pub mod frontend;
mod relay;
mod settings;
mod target;

pub use error::Error;
pub use settings::VhostUserSettings;
pub use target::{ExportHandle, VhostUserTarget};

/// The qemu arguments that attach the export at `socket` as a virtio-blk disk with
/// `num_queues` queues (the guest's memory must be shared: `-object memory-backend-memfd,
/// id=mem,size=…,share=on -numa node,memdev=mem`).
pub fn qemu_args(id: &str, socket: &std::path::Path, num_queues: u16) -> Vec<String> {
    let path = socket.to_string_lossy().replace(',', ",,");
    vec![
        "-chardev".to_string(),
        format!("socket,id={id},path={path},reconnect-ms=1000"),
        "-device".to_string(),
        format!("vhost-user-blk-pci,chardev={id},num-queues={num_queues}"),
    ]
}
