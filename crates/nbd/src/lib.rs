//! Strata's NBD protocol support: the whole current protocol of the NBD project's `doc/proto.md`
//! (fixed newstyle negotiation, INFO/GO/LIST, structured replies, `base:allocation` block
//! status, STARTTLS, multi-conn), in three parts:
//!
//! ```text
//!   codec   bytes ⇄ typed messages; no I/O, fuzzable       codec/{handshake,transmission}.rs
//!     │
//!   server  sockets → negotiation → pipelined requests → Arc<dyn BlockDevice> → one writer
//!           server/mod.rs (accept, exports), server/negotiate.rs (one function per option),
//!           transmission.rs (one task per connection)
//!   client  a BlockDevice that speaks NBD to a remote server (nbd://, nbd+unix://)
//!           client/{device,negotiate,conn,writer,reader,uri}.rs
//! ```

pub mod client;
pub mod codec;
pub mod server;
mod transmission;

pub use client::{NbdDevice, NbdOpener};
pub use server::{
    ConfigError, Export, Resolved, Resolver, Server, ServerConfig, ServerStats, TlsMode,
    TlsSettings,
};
