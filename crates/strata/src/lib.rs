//! Strata: a block-storage data plane.
//!
//! This crate is the entry point for applications that embed Strata and the home of the
//! `strata` daemon. [`registry`] knows every device scheme Strata ships:
//!
//! ```text
//!   file:///path?size=1G        local file or block device (io_uring, O_DIRECT optional)
//!   aio:///path?blk_size=512    the same in Mayastor's form (also uring:///path)
//!   mem://name?size=64M         sparse memory (also malloc:///name?size_mb=64)
//!   iscsi://host[:port]/iqn/lun a LUN of an iSCSI target
//!   nbd://host:port/export      a remote NBD export
//!   nbd+unix:///export?socket=  the same over a unix socket
//!   nvmf://host:port/nqn        a namespace of a remote NVMe/TCP subsystem
//!   image://STORE/NAME?size=1G  a page-store image ([`registry_with_images`])
//! ```
//!
//! [`nexus`] mirrors a volume over several of them (`examples/nexus.rs`). [`daemon`] is
//! `strata serve` as a library, [`cli`] the command line.
//!
//! ```no_run
//! # async fn demo() -> strata::bdev::Result<()> {
//! use strata::bdev::{BlockDevice, Bytes, WriteOpts};
//! let dev = strata::registry().open("file:///tmp/disk.img?size=64M").await?;
//! dev.write_at(0, Bytes::from_static(b"hello"), WriteOpts::default()).await?;
//! dev.flush().await?;
//! assert_eq!(&dev.read_at(0, 5).await?[..], b"hello");
//! # Ok(()) }
//! ```

use std::sync::Arc;

pub mod cli;
pub mod daemon;
pub mod format;

pub use strata_bdev as bdev;
pub use strata_bdev_file as file;
pub use strata_iscsi as iscsi;
pub use strata_nbd as nbd;
pub use strata_nexus as nexus;
pub use strata_pagestore as pagestore;

/// A registry that opens every device scheme Strata ships.
pub fn registry() -> bdev::Registry {
    let mut r = bdev::Registry::with_builtin();
    file::FileOpener::register(&mut r);
    iscsi::IscsiOpener::register(&mut r);
    let nbd = Arc::new(nbd::NbdOpener::default());
    r.register("nbd", nbd.clone());
    r.register("nbd+unix", nbd);
    r.register("nvmf", Arc::new(strata_nvmf::NvmfOpener::default()));
    r
}

/// [`registry`] plus `image://STORE/NAME` for the page stores `images` knows.
pub fn registry_with_images(images: Arc<pagestore::ImageOpener>) -> bdev::Registry {
    let mut r = registry();
    r.register("image", images);
    r
}
