//! Strata's page store: log-structured virtual disks ("images") whose durable home is an object
//! store — a local directory or any S3-compatible service — with the local disk only as a write
//! buffer.
//!
//! ```text
//!   Image (BlockDevice)
//!     write ─► Wal: checksummed records, commit + fdatasync on FLUSH/FUA (group commit)
//!     read  ─► Wal generations ─► page map (segment, slot) ─► cache ─► ranged GET ─► zeroes
//!     checkpointer ─► segments (checksummed pages + index) ─► manifest v+1 (create-only PUT)
//!   Objects: Store (object_store: LocalFileSystem, AmazonS3) · FaultyObjects (tests)
//! ```
//!
//! Formats: `docs/FORMAT.md`. What is durable when: a write is in the page cache when it is
//! acknowledged; FLUSH, and a write with FUA, return once the write buffer is fdatasync'ed; a
//! checkpoint makes writes independent of the local disk once its manifest is published.

mod cache;
mod failpoint;
mod fileio;
pub mod format;
mod image;
mod layout;
pub mod objects;
mod opener;
mod pagemap;
pub mod settings;
pub mod versions;
mod wal;

pub use image::{Image, ImageStats, PageStore, Transaction};
pub use layout::check_name;
pub use objects::{FaultyObjects, Listed, ObjError, Objects, Stats, Store, StoreConfig};
pub use opener::ImageOpener;
pub use settings::Settings;
