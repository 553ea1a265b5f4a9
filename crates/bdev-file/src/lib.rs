//! Strata's local backend: a regular file or a block device as a
//! [`BlockDevice`](strata_bdev::BlockDevice), opened from
//! `file:///PATH?size=SIZE[&direct=BOOL][&io=uring|threads][&readonly=BOOL]` by [`FileOpener`]
//! or directly with [`FileDevice::open`].
//!
//! This crate owns: creating sparse image files (never resizing existing ones), the writer's
//! exclusive `flock`, `O_DIRECT` alignment (aligned read buffers, bounce buffers for unaligned
//! writes), and two I/O engines for reads, writes and flushes:
//!
//! - **io_uring** (the default where the kernel allows it): one ring and one ring thread per
//!   device. Callers queue requests and await a oneshot; the thread batches them into SQEs and
//!   completes them from CQEs, keeping each buffer alive and unmoved until the kernel is done.
//! - **threads**: `pread`/`pwrite` on tokio's blocking pool, where io_uring is unavailable.
//!
//! ```text
//!   read_at / write_at / flush
//!        │  Request{op, buffer, oneshot}        ┌─────────── ring thread ───────────┐
//!        ├──► Mutex<Vec> queue ────────────────►│ SQEs (batched) ──► io_uring ──┐   │
//!        │    eventfd += 1 only if it sleeps   │ CQEs: short? resubmit the rest│   │
//!        ◄─── oneshot (buffer back) ◄───────────│◄──────────────────────────────┘   │
//!                                               └───────────────────────────────────┘
//!   trim / write_zeroes (fallocate), block_status (SEEK_DATA/SEEK_HOLE), cache (fadvise)
//!        └──► tokio spawn_blocking
//! ```
//!
//! Trim punches holes; zeroing uses `ZERO_RANGE`, hole punching, or writing zeroes, in that
//! order of preference; block status reports holes from `SEEK_DATA`/`SEEK_HOLE`.

mod buf;
mod device;
mod opener;
mod sys;
mod threads;
mod uring;

pub use device::{FileDevice, FileOptions, IoEngine};
pub use opener::FileOpener;
