//! The NBD client: a [`BlockDevice`] backed by an export on a remote NBD server, over TCP or a
//! unix socket (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
//!
//! ```text
//!   callers ──register cookie──► in-flight map ◄──complete by cookie── reader task
//!      │                          (one short lock,                        ▲
//!      └──request (bounded mpsc)──► writer task   never held across await) │
//!                                   │ batched vectored writes              │ replies, parsed in
//!                                   ▼                                      │ place from one buffer
//!                                 socket ──────────────────────────────────┘
//! ```
//!
//! Negotiation is fixed newstyle: structured replies, the `base:allocation` meta context and
//! `NBD_OPT_GO` with block sizes, each optional, with a fall back to `NBD_OPT_EXPORT_NAME` for
//! old servers. In transmission, every caller registers its request under a fresh cookie and
//! hands it to the one writer task, which writes whatever is queued with one vectored write; the
//! one reader task parses replies (simple, or structured chunks which it assembles) and completes
//! the caller through a oneshot channel. Read data is copied at most once in user space, into a
//! buffer of exactly the request's size (large payloads go from the socket straight into it), so
//! a caller that keeps the buffer pins nothing else. Reads and writes over the server's maximum
//! payload are split into requests that are all sent before the first reply is awaited (a split
//! read is gathered with one more copy).
//!
//! Failure is prompt: when the connection dies (EOF, reset, a protocol violation), every request
//! in flight and every later one fails with [`ErrorKind::Io`](strata_bdev::ErrorKind::Io) saying the connection was lost.
//! A per-call time limit ([`ClientOptions::request_timeout`]) fails a call with
//! [`ErrorKind::TimedOut`](strata_bdev::ErrorKind::TimedOut) and leaves the connection up; a late reply is read and discarded.
//! Dropping the device sends `NBD_CMD_DISC` after the requests already queued, and stops both
//! tasks; [`NbdDevice::close`] does the same and waits for it.
//!
//! The parts, one file each: `device` (the [`NbdDevice`] callers use: splitting, time limits,
//! errors), `negotiate` (the handshake), `conn` (what callers, the reader and the writer share:
//! the in-flight map and each request's reply so far), `writer` and `reader` (the two tasks), and
//! `uri` (the [`NbdOpener`] for `nbd://` and `nbd+unix://`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

mod conn;
mod device;
mod negotiate;
mod reader;
#[cfg(test)]
mod tests;
mod uri;
mod writer;

pub use device::NbdDevice;
pub use uri::NbdOpener;

/// The IANA port of NBD, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`: a name or an address (IPv6 in brackets).
    Tcp(String),
    /// The path of a unix socket.
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(addr) => f.write_str(addr),
            Target::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// Client settings; [`ClientOptions::default`] holds the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Time limit of each call (`read_at`, `write_at`, …, including its queueing and any split
    /// requests). A call over it fails with [`ErrorKind::TimedOut`](strata_bdev::ErrorKind::TimedOut); the connection stays up.
    /// Default: none.
    pub request_timeout: Option<Duration>,
    /// Time limit for connecting and negotiating. Default: 30 s.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            request_timeout: None,
            connect_timeout: Duration::from_secs(30),
        }
    }
}
