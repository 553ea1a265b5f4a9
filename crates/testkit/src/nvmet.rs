//! The guest kernel's NVMe target (nvmet), set up over configfs: the reference NVMe/TCP target
//! for Strata's NVMe/TCP host.
//!
//! ```text
//! /sys/kernel/config/nvmet/
//!   subsystems/<nqn>/attr_allow_any_host = 1
//!   subsystems/<nqn>/namespaces/1/{device_path = /dev/loopN, enable = 1}
//!   ports/<guest port>/{addr_trtype = tcp, addr_adrfam = ipv4, addr_traddr = 0.0.0.0,
//!                       addr_trsvcid = <guest port>, subsystems/<nqn> → the subsystem}
//! /dev/loopN → /run/nvmet/<nqn>.img (a sparse file on tmpfs: guest memory)
//! ```
//!
//! The host reaches the port through a `hostfwd` of [`VmConfig`](crate::vm::VmConfig); inside
//! the guest it is 127.0.0.1:<guest port>.

use std::time::Duration;

use crate::console::sh_quote;
use crate::vm::Vm;
use crate::{Error, Result};

const CONFIGFS: &str = "/sys/kernel/config/nvmet";
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// A subsystem of the guest's nvmet, with one namespace, listening on a TCP port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmetTarget {
    /// The subsystem NQN.
    pub nqn: String,
    /// The TCP port in the guest (0.0.0.0).
    pub guest_port: u16,
    /// The namespace's size in bytes.
    pub size_bytes: u64,
    /// The namespace's block device in the guest (`/dev/loopN`).
    pub device: String,
    /// The file behind the device (tmpfs, in guest memory).
    pub backing_file: String,
}

fn valid_nqn(nqn: &str) -> bool {
    !nqn.is_empty()
        && nqn.len() <= 223
        && nqn
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '_'))
}

impl Vm {
    /// Creates subsystem `nqn` (any host allowed) with namespace 1 of `size_mib` MiB (a loop
    /// device over a tmpfs file, so it costs guest memory as it is written), and links it to a
    /// TCP port on 0.0.0.0:`guest_port`, created if this is its first subsystem.
    pub fn setup_nvmet(&self, nqn: &str, size_mib: u64, guest_port: u16) -> Result<NvmetTarget> {
        if !valid_nqn(nqn) {
            return Err(Error::InvalidArgument(format!(
                "NQN {nqn:?}: use letters, digits and . : - _ (at most 223)"
            )));
        }
        if size_mib == 0 || guest_port == 0 {
            return Err(Error::InvalidArgument(format!(
                "nvmet size {size_mib} MiB, port {guest_port}: both must be non-zero"
            )));
        }
        let backing_file = format!("/run/nvmet/{nqn}.img");
        let script = format!(
            r#"set -e
nqn={nqn}
file={file}
mkdir -p /run/nvmet
grep -q ' /run/nvmet ' /proc/mounts || mount -t tmpfs -o size=90% tmpfs /run/nvmet
truncate -s {size_mib}M "$file"
dev=$(losetup -f)
losetup "$dev" "$file"
sub={CONFIGFS}/subsystems/$nqn
mkdir "$sub"
echo 1 > "$sub/attr_allow_any_host"
mkdir "$sub/namespaces/1"
printf %s "$dev" > "$sub/namespaces/1/device_path"
echo 1 > "$sub/namespaces/1/enable"
port={CONFIGFS}/ports/{guest_port}
if [ ! -d "$port" ]; then
  mkdir "$port"
  echo tcp > "$port/addr_trtype"
  echo ipv4 > "$port/addr_adrfam"
  echo 0.0.0.0 > "$port/addr_traddr"
  echo {guest_port} > "$port/addr_trsvcid"
fi
ln -s "$sub" "$port/subsystems/$nqn"
echo "device=$dev"
"#,
            nqn = sh_quote(nqn),
            file = sh_quote(&backing_file),
        );
        let output = self.check(&script, SETUP_TIMEOUT)?;
        let device = output
            .lines()
            .find_map(|line| line.trim().strip_prefix("device="))
            .map(str::to_string)
            .ok_or_else(|| Error::Unexpected {
                command: script.clone(),
                output: output.clone(),
            })?;
        Ok(NvmetTarget {
            nqn: nqn.to_string(),
            guest_port,
            size_bytes: size_mib * 1024 * 1024,
            device,
            backing_file,
        })
    }

    /// Takes a subsystem made by [`Vm::setup_nvmet`] down: unlinks it from its port (removing
    /// the port when no subsystem is left, which closes its listener), then deletes the
    /// namespace, the subsystem and the backing device.
    pub fn remove_nvmet(&self, target: &NvmetTarget) -> Result<()> {
        let script = format!(
            r#"set -e
nqn={nqn}
sub={CONFIGFS}/subsystems/$nqn
port={CONFIGFS}/ports/{guest_port}
rm "$port/subsystems/$nqn"
if [ -z "$(ls "$port/subsystems")" ]; then rmdir "$port"; fi
echo 0 > "$sub/namespaces/1/enable"
rmdir "$sub/namespaces/1"
rmdir "$sub"
losetup -d {device}
rm -f {file}
"#,
            nqn = sh_quote(&target.nqn),
            guest_port = target.guest_port,
            device = sh_quote(&target.device),
            file = sh_quote(&target.backing_file),
        );
        self.check(&script, SETUP_TIMEOUT)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqns_are_checked() {
        assert!(valid_nqn("nqn.2014-08.io.strata:vol_1"));
        assert!(!valid_nqn(""));
        assert!(!valid_nqn("nqn with space"));
        assert!(!valid_nqn("nqn;rm"));
        assert!(!valid_nqn(&"n".repeat(224)));
    }
}
