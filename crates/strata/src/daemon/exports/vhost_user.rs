//! vhost-user-blk exports: a unix socket `NAME.sock` (mode 0600) per volume in
//! `[vhost_user] socket_dir`, for one VMM (qemu, Cloud Hypervisor, …) at a time.

use std::path::{Path, PathBuf};

use strata_vhost_user_blk::VhostUserTarget;
use tracing::warn;

use super::{Exported, Exporter, Protocol};

/// The vhost-user-blk target and where its sockets go.
#[derive(Debug)]
pub struct VhostUserExporter {
    target: VhostUserTarget,
    dir: PathBuf,
}

impl VhostUserExporter {
    pub fn new(target: VhostUserTarget, dir: PathBuf) -> VhostUserExporter {
        VhostUserExporter { target, dir }
    }

    /// The socket of volume `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// The qemu arguments that attach volume `name` (with `queues` queues).
    pub fn qemu_args(&self, name: &str, queues: u16) -> String {
        strata_vhost_user_blk::qemu_args(name, &self.socket(name), queues).join(" ")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[async_trait::async_trait]
impl Exporter for VhostUserExporter {
    fn protocol(&self) -> Protocol {
        Protocol::VhostUser
    }

    async fn export(&self, v: &Exported) -> Result<(), String> {
        if self.target.export(&v.name).is_some() {
            if let Err(e) = self.target.stop(&v.name).await {
                warn!(volume = %v.name, error = %e, "stop a vhost-user export to replace it");
            }
        }
        self.target
            .serve(
                &v.name,
                v.device.clone(),
                v.read_only,
                &self.socket(&v.name),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn unexport(&self, name: &str) {
        if self.target.export(name).is_some() {
            if let Err(e) = self.target.stop(name).await {
                warn!(volume = %name, error = %e, "stop a vhost-user export");
            }
        }
    }

    fn addresses(&self, name: &str) -> Vec<String> {
        vec![format!("vhost-user://{}", self.socket(name).display())]
    }

    fn listening(&self) -> Vec<String> {
        vec![format!("vhost-user://{}/NAME.sock", self.dir.display())]
    }

    fn resized(&self, name: &str) {
        if let Err(e) = self.target.resized(name) {
            warn!(volume = %name, error = %e, "announce a resize to the vhost-user front-end");
        }
    }

    async fn shutdown(&self) {
        self.target.shutdown().await;
    }
}
