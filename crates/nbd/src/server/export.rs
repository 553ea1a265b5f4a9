//! One exported device, and the [`Resolver`] that finds exports by name on demand.

use std::sync::Arc;

use strata_bdev::{BlockDevice, Transactional};

use crate::codec::tx_flags;

/// One exported device.
#[derive(Debug)]
pub struct Export {
    /// The name clients ask for.
    pub name: String,
    /// A line for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The device behind it.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the device takes them.
    pub read_only: bool,
    /// The device's transactions, for the transaction commands (64–67); `None`: refused.
    pub transactions: Option<Arc<dyn Transactional>>,
}

/// Finds exports that are not in the server's list when a client asks for them: names made
/// up on the fly (a snapshot, an image of a store, an access token).
#[async_trait::async_trait]
pub trait Resolver: Send + Sync + std::fmt::Debug {
    /// The export `name` selects: `Ok(None)` if there is none, `Err(why)` if it is refused.
    async fn resolve(&self, name: &str) -> Result<Option<Resolved>, String>;
}

/// What a [`Resolver`] found.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub export: Arc<Export>,
    /// A client identity: a new connection with the same one takes over from the previous
    /// one, which is drained and closed.
    pub client_id: Option<String>,
}

impl Export {
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only || self.device.capabilities().read_only
    }

    /// The transmission flags advertised for this export.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let caps = self.device.capabilities();
        let mut f =
            tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::SEND_FUA | tx_flags::SEND_CACHE;
        if self.is_read_only() {
            f |= tx_flags::READ_ONLY;
        } else {
            // Zeroing is always possible (emulated by writes when not native), and a device
            // that cannot zero fast answers FAST_ZERO requests with ENOTSUP at once.
            f |= tx_flags::SEND_WRITE_ZEROES | tx_flags::SEND_FAST_ZERO;
            if caps.trim {
                f |= tx_flags::SEND_TRIM;
            }
        }
        if structured {
            f |= tx_flags::SEND_DF;
        }
        if caps.multi_conn {
            f |= tx_flags::CAN_MULTI_CONN;
        }
        f
    }
}
