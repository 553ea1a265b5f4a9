//! The guest's NVMe/TCP host driven through `nvme-cli`: connect to a subsystem and find the
//! controller and namespace the kernel made for it, disconnect and wait for them to go.

use std::time::Duration;

use crate::vm::Vm;
use crate::Result;

const WAIT: Duration = Duration::from_secs(120);

/// A shell snippet that waits (at most `tries` tenths of a second) until subsystem `nqn` has a
/// controller with namespace 1 as a block device, and prints `CTRL NS` (e.g. `nvme0 nvme0n1`).
fn find_namespace(nqn: &str, tries: u32) -> String {
    format!(
        r#"(
for i in $(seq 1 {tries}); do
  for s in /sys/class/nvme-subsystem/nvme-subsys*; do
    [ -e "$s/subsysnqn" ] || continue
    [ "$(cat $s/subsysnqn)" = "{nqn}" ] || continue
    c=$(ls $s | grep '^nvme[0-9]*$' | head -n 1)
    n=$(ls $s | grep '^nvme[0-9]*n1$' | head -n 1)
    if [ -n "$c" ] && [ -n "$n" ] && [ -b /dev/$n ]; then echo "$c $n"; exit 0; fi
  done
  sleep 0.1
done
echo "no namespace of {nqn} appeared" >&2
exit 1
)"#
    )
}

/// `nvme connect -t tcp -a ADDR -s PORT -n NQN EXTRA` in the guest; the controller and
/// namespace devices (`/dev/nvme0`, `/dev/nvme0n1`) it made.
pub fn connect(vm: &Vm, addr: &str, port: u16, nqn: &str, extra: &str) -> Result<(String, String)> {
    vm.check(
        &format!("nvme connect -t tcp -a {addr} -s {port} -n {nqn} {extra}"),
        WAIT,
    )?;
    let out = vm.check(&find_namespace(nqn, 600), WAIT)?;
    let mut words = out.split_whitespace();
    let ctrl = words.next().unwrap_or_default().to_string();
    let ns = words.next().unwrap_or_default().to_string();
    Ok((format!("/dev/{ctrl}"), format!("/dev/{ns}")))
}

/// `nvme disconnect -n NQN`, waiting until the namespace device `dev` is gone.
pub fn disconnect(vm: &Vm, nqn: &str, dev: &str) -> Result<()> {
    vm.check(&format!("nvme disconnect -n {nqn}"), WAIT)?;
    vm.check(
        &format!("for i in $(seq 1 300); do [ -e {dev} ] || exit 0; sleep 0.1; done; exit 1"),
        WAIT,
    )?;
    Ok(())
}
