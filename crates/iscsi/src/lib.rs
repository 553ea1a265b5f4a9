//! Strata's iSCSI support (RFC 7143): a pure codec and an initiator that is a block device.
//!
//! ```text
//!   codec       bytes ⇄ typed PDUs (BHS, AHS, digests), login/text key=value, SCSI CDBs,
//!               parameter data and sense; no I/O, fuzzable
//!     │
//!   connection  PDU reader (data straight into the caller's buffer) and vectored writer
//!   login       security (CHAP/MD5) and operational negotiation
//!   session     full feature phase: CmdSN window, R2T/Data-Out, Data-In, NOP, aborts
//!   host        IscsiDevice: a BlockDevice over one LUN, reconnecting with backoff
//!   opener      iscsi://HOST[:PORT]/IQN[/LUN]?user=&secret=&header_digest=&data_digest=&timeout=
//! ```
//!
//! The device speaks SCSI block commands: READ(16), WRITE(16) (FUA native when the target
//! says DPOFUA, else a SYNCHRONIZE CACHE after), SYNCHRONIZE CACHE(16), UNMAP for trim on a
//! thin-provisioned LUN, WRITE SAME(16) for zeroing; sizes come from READ CAPACITY(16) and the
//! Block Limits and Logical Block Provisioning VPD pages. Writes send immediate and unsolicited
//! data as negotiated, then answer R2Ts. A CHECK CONDITION becomes an error whose
//! [`ErrorKind`](strata_bdev::ErrorKind) follows the sense key and code, with the decoded
//! sense in its message. Every call has a deadline; a lost connection is re-established in
//! the background and commands cut off by it are sent again while their deadline allows.

pub mod codec;
pub mod connection;
pub mod host;
pub mod login;
pub mod opener;
pub mod session;

pub use host::{IscsiDevice, IscsiOptions, Portal};
pub use login::Chap;
pub use opener::IscsiOpener;
