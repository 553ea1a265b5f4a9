//! NBD exports: the daemon's side of `strata_nbd::Server`.

use std::sync::{Arc, RwLock};

use strata_nbd::{Export, Server};

use super::{Exported, Exporter, Protocol};

/// The NBD target and the addresses its listeners are bound to.
#[derive(Debug)]
pub struct NbdExporter {
    pub server: Arc<Server>,
    /// `nbd://HOST:PORT` and `nbd+unix:///?socket=PATH`, once bound.
    listening: RwLock<Vec<String>>,
}

impl NbdExporter {
    pub fn new(server: Arc<Server>) -> NbdExporter {
        NbdExporter {
            server,
            listening: RwLock::new(Vec::new()),
        }
    }

    /// Record the listeners' addresses (`nbd://…`, `nbd+unix:///?socket=…`).
    pub fn set_listening(&self, uris: Vec<String>) {
        *self.listening.write().expect("lock poisoned") = uris;
    }
}

#[async_trait::async_trait]
impl Exporter for NbdExporter {
    fn protocol(&self) -> Protocol {
        Protocol::Nbd
    }

    async fn export(&self, v: &Exported) -> Result<(), String> {
        self.server.add_export(Export {
            name: v.name.clone(),
            description: v.description.clone(),
            device: v.device.clone(),
            read_only: v.read_only,
            transactions: v.transactions.clone(),
        });
        Ok(())
    }

    async fn unexport(&self, name: &str) {
        self.server.remove_export(name);
    }

    async fn shutdown(&self) {
        self.server.shutdown().await;
    }

    fn listening(&self) -> Vec<String> {
        self.listening.read().expect("lock poisoned").clone()
    }

    fn addresses(&self, name: &str) -> Vec<String> {
        self.listening()
            .iter()
            .map(|u| match u.split_once("?socket=") {
                Some((_, sock)) => format!("nbd+unix:///{name}?socket={sock}"),
                None => format!("{u}/{name}"),
            })
            .collect()
    }
}
