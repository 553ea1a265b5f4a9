//! The nexus: an N-way mirror [`BlockDevice`](strata_bdev::BlockDevice) over child devices,
//! each named by its URI. It keeps serving while children fail and heals them when they return.
//!
//! ```text
//!                        Nexus (BlockDevice)
//!   write/trim/zeroes/flush │               │ read, block status
//!     ┌─────────────────────┼─────┐         │ one online child, least outstanding I/O,
//!     ▼ every online and    ▼     ▼         │ retried on another when it fails
//!   child a (online)  child b   child c ◄───┘
//!                   (rebuilding) (faulted: "write …: I/O error")
//!                        ▲            └─ dirty map: regions it missed
//!                        └── rebuild task: copies from an online child, segment by segment,
//!                            under a range lock shared with front-end writes
//! ```
//!
//! - Writes, trims, zeroing and flushes go to every online and rebuilding child at once and
//!   complete when all have answered. A child that fails is faulted with the error as the
//!   reason; the I/O succeeds if an online child did, and otherwise fails with the last error's
//!   kind and a message naming every child's state.
//! - While a child is faulted or offline, writes mark the regions they touch in its dirty map
//!   (granularity [`NexusSettings::dirty_granularity`], 1 MiB by default).
//! - [`Nexus::online_child`] starts a partial rebuild of the dirty regions;
//!   [`Nexus::add_child`] (or a child with no map) a full one that zeroes the source's holes
//!   instead of copying them. Progress, pause, resume and cancel are on the [`Nexus`];
//!   [`Nexus::wait_rebuild`] awaits the end. See `rebuild.rs` for why a copy can never overwrite
//!   a newer front-end write.
//! - A child whose I/O exceeds its timeout ([`Nexus::set_io_timeout`]) is faulted.
//!
//! - With a [`Ledger`] ([`Nexus::restore`]), a write some child missed is acknowledged only once
//!   a [`NexusRecord`] saying so — the child's state and the regions it missed — is durable; after
//!   a crash or restart the nexus is restored from it, so a stale child is never read from or
//!   copied from, and heals by copying only what it missed. See `record.rs`.

mod children;
mod dirty;
mod error;
mod nexus;
mod ops;
mod rangelock;
mod rebuild;
mod record;
mod restore;
mod settings;
mod status;

pub use error::NexusError;
pub use nexus::Nexus;
pub use rebuild::{RebuildKind, RebuildOutcome, RebuildProgress, RebuildState};
pub use record::{ChildRecord, Ledger, NexusRecord, RecordedState};
pub use settings::NexusSettings;
pub use status::{ChildState, ChildStatus, NexusStatus, RestoreChild};
