//! Strata's NVMe over Fabrics, TCP transport: volumes exported as NVMe namespaces to any
//! NVMe/TCP host (the Linux kernel's `nvme-tcp`, `nvme-cli`, SPDK), and remote namespaces
//! opened as block devices (`nvmf://HOST[:PORT]/NQN`), in three parts:
//!
//! ```text
//!   codec    bytes ⇄ PDUs, commands, Identify data, log pages; no I/O, fuzzable
//!     │
//!   target   TCP ─► one task per queue (admin or I/O) ─► controllers per subsystem
//!            (dynamic IDs, keep-alive, properties, AENs) ─► Arc<dyn BlockDevice>
//!            + the discovery subsystem on the same port
//!   host     NvmfDevice: a BlockDevice over an admin queue and several I/O queues,
//!            reconnecting with backoff when the target goes away
//! ```
//!
//! ```no_run
//! # async fn demo(dev: std::sync::Arc<dyn strata_bdev::BlockDevice>) -> Result<(), Box<dyn std::error::Error>> {
//! use strata_nvmf::{Subsystem, Target, TargetSettings};
//! let target = Target::new(TargetSettings::default())?;
//! target.add_subsystem(Subsystem::new("nqn.2026-12.io.strata:demo", dev))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4420").await?;
//! tokio::spawn(target.clone().serve_tcp(listener));
//! // nvme discover -t tcp -a 127.0.0.1 -s 4420
//! // nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2026-12.io.strata:demo
//! # Ok(()) }
//! ```
//!
//! What is implemented, per the NVMe over Fabrics 1.1 specification and its TCP binding:
//! ICReq/ICResp with header and data digests (CRC32C) and MAXH2CDATA; command and response
//! capsules with in-capsule data; R2T/H2CData; C2HData (with SUCCESS when the host disables
//! SQ flow control); H2CTermReq/C2HTermReq. Fabrics Connect (dynamic controllers),
//! Property Get/Set (CAP, VS, CC, CSTS: enable and shutdown), Disconnect. Admin Identify
//! (controller, namespace, active namespace list, namespace identification descriptors),
//! Get Log Page (error, SMART / health, firmware slot, changed namespace list, discovery),
//! Get/Set Features (number of queues, keep-alive timer, asynchronous event configuration,
//! volatile write cache, temperature threshold), Keep Alive, Asynchronous Event Request,
//! Abort. NVM Read, Write, Flush, Write Zeroes, Dataset Management (deallocate). Not (yet):
//! ANA groups and reservations (the namespace and controller structures have their place),
//! in-band authentication and TLS.

pub mod codec;
pub mod host;
pub mod target;

pub use host::{HostOptions, NvmfDevice, NvmfOpener};
pub use target::{
    derived_uuid, ControllerInfo, QueueInfo, Subsystem, Target, TargetError, TargetSettings,
};
