//! NVMe/TCP exports: each volume is subsystem `nqn.2026-12.io.strata:VOLUME` with namespace 1
//! (its UUID and NGUID derived from the NQN, so stable across restarts), on the daemon's
//! `[nvmf] listen` addresses, beside the discovery subsystem that lists them all.

use std::sync::{Arc, RwLock};

use strata_nvmf::{Subsystem, Target};

use super::{Exported, Exporter, Protocol};

/// The NQN prefix of Strata's subsystems.
pub const NQN_PREFIX: &str = "nqn.2026-12.io.strata:";

/// The subsystem NQN of volume `name`.
pub fn nqn(name: &str) -> String {
    format!("{NQN_PREFIX}{name}")
}

/// The NVMe/TCP target and the addresses its listeners are bound to.
#[derive(Debug)]
pub struct NvmfExporter {
    pub target: Arc<Target>,
    /// `HOST:PORT` of each listener, once bound.
    listening: RwLock<Vec<String>>,
}

impl NvmfExporter {
    pub fn new(target: Arc<Target>) -> NvmfExporter {
        NvmfExporter {
            target,
            listening: RwLock::new(Vec::new()),
        }
    }

    pub fn set_listening(&self, addrs: Vec<String>) {
        *self.listening.write().expect("lock poisoned") = addrs;
    }
}

#[async_trait::async_trait]
impl Exporter for NvmfExporter {
    fn protocol(&self) -> Protocol {
        Protocol::Nvmf
    }

    async fn export(&self, v: &Exported) -> Result<(), String> {
        let nqn = nqn(&v.name);
        // Replace: a new device, or new settings, under the same name.
        let _ = self.target.remove_subsystem(&nqn);
        let mut s = Subsystem::new(nqn, v.device.clone());
        s.read_only = v.read_only;
        s.model = Some(format!("Strata {}", v.name));
        if !v.nvmf_hosts.is_empty() {
            s.allowed_hosts = Some(v.nvmf_hosts.clone());
        }
        self.target.add_subsystem(s).map_err(|e| e.to_string())
    }

    async fn unexport(&self, name: &str) {
        let _ = self.target.remove_subsystem(&nqn(name));
    }

    fn addresses(&self, name: &str) -> Vec<String> {
        self.listening()
            .iter()
            .map(|a| format!("nvmf://{a}/{}", nqn(name)))
            .collect()
    }

    fn listening(&self) -> Vec<String> {
        self.listening.read().expect("lock poisoned").clone()
    }

    fn resized(&self, name: &str) {
        let _ = self.target.resized(&nqn(name));
    }

    async fn shutdown(&self) {
        self.target.shutdown().await;
    }
}
