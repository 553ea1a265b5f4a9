//! Strata's block-device core.
//!
//! Every layer of Strata — mirrors, page-store images, local files, remote NBD devices, and the
//! protocol targets that export them — meets at one trait, [`BlockDevice`]: a flat byte range
//! with asynchronous read, write, flush, trim, write-zeroes and block status, whose errors carry
//! an [`ErrorKind`] that maps to an errno, so any target can answer its client precisely.
//!
//! ```text
//!   targets (NBD, …) ──► Arc<dyn BlockDevice> ◄── nexus, image, file, mem, nbd client
//!                              ▲
//!   Registry::open("file:///disk.img?size=1G") — one Opener per URI scheme
//! ```
//!
//! This crate also holds the memory device ([`MemDevice`], `mem://`), the fault-injecting
//! wrapper ([`FaultDevice`]) and, behind the `conformance` feature, the suite every device runs.
//! What the protocol crates share beside the trait lives here too: [`wire`] (the queue of
//! replies a target writes with vectored writes), [`field`] (integers at byte offsets, big- and
//! little-endian), [`call`] (how a remote device names a call
//! in its errors), [`units`] (sizes and durations in settings) and the URI helpers
//! ([`DeviceUri::take_secs`], [`tcp_address`]).

pub mod call;
mod device;
mod error;
pub mod fault;
pub mod field;
mod mem;
mod registry;
pub mod stats;
pub mod units;
mod uri;
pub mod wire;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use bytes::{Bytes, BytesMut};
pub use device::{
    check_io, read_only_error, write_zeroes_by_writing, BlockDevice, BlockDeviceExt, Capabilities,
    Extent, Geometry, Transaction, Transactional, WriteOpts, ZeroOpts,
};
pub use error::{Error, ErrorKind, Result};
pub use fault::{FaultDevice, FaultHandle};
pub use mem::{MemDevice, MemOpener};
pub use registry::Registry;
pub use stats::{IoStats, StatsDevice};
pub use uri::{parse_secs, parse_size, tcp_address, DeviceUri, Opener};
