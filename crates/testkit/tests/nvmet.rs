//! The guest kernel's NVMe/TCP target (nvmet), set up by `Vm::setup_nvmet`: reached from the
//! host through a forwarded port with a raw NVMe/TCP connection setup (ICReq → ICResp), and
//! from the guest's own kernel NVMe/TCP host through nvme-cli (discover, connect, O_DIRECT I/O,
//! disconnect). Also loads a module with parameters (`brd`) through `Vm::modprobe`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use strata_testkit::vm::{Vm, VmConfig};
use strata_testkit::{free_port, NvmetTarget};

const NQN: &str = "nqn.2014-08.io.strata:testkit-reference";
const GUEST_PORT: u16 = 4420;
const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(300);

/// An NVMe/TCP Initialize Connection Request (NVMe/TCP transport spec, 3.6.2.2): common header
/// (type 0x00, flags 0, HLEN 128, PDO 0, PLEN 128), PFV 0, HPDA 0, no digests, MAXR2T 0.
fn icreq() -> [u8; 128] {
    let mut pdu = [0u8; 128];
    pdu[0] = 0x00; // PDU type: ICReq
    pdu[1] = 0; // flags
    pdu[2] = 128; // header length
    pdu[3] = 0; // PDU data offset
    pdu[4..8].copy_from_slice(&128u32.to_le_bytes()); // PDU length
    pdu[8..10].copy_from_slice(&0u16.to_le_bytes()); // PDU format version
    pdu[10] = 0; // host PDU data alignment
    pdu[11] = 0; // digests: none
    pdu[12..16].copy_from_slice(&0u32.to_le_bytes()); // MAXR2T (0's based)
    pdu
}

fn exchange_icreq(host_port: u16) -> [u8; 128] {
    let mut stream =
        TcpStream::connect(("127.0.0.1", host_port)).expect("connect to the forwarded nvmet port");
    stream
        .set_read_timeout(Some(SHORT))
        .expect("set a read timeout");
    stream.write_all(&icreq()).expect("send ICReq");
    let mut response = [0u8; 128];
    stream
        .read_exact(&mut response)
        .expect("read a 128-byte ICResp");
    response
}

/// The block device of namespace 1 of subsystem `nqn` on the guest's NVMe host, from sysfs
/// (with native multipath, as Debian builds it, the device belongs to the subsystem).
fn namespace_device(vm: &Vm, nqn: &str) -> String {
    let script = format!(
        "for s in /sys/class/nvme-subsystem/nvme-subsys*; do \
           if [ \"$(cat $s/subsysnqn)\" = {nqn} ]; then ls $s | grep '^nvme[0-9]*n1$'; fi; \
         done"
    );
    let output = vm.check(&script, SHORT).expect("find the namespace device");
    let name = output.trim();
    assert!(
        name.starts_with("nvme") && !name.contains('\n'),
        "one namespace device expected, got {output:?}"
    );
    format!("/dev/{name}")
}

#[test]
fn nvmet_reference_target() {
    let host_port = free_port().expect("a free port");
    let vm = Vm::boot(VmConfig::default().with_hostfwd(host_port, GUEST_PORT))
        .expect("boot the test VM");

    // The guest kernel's target, on 0.0.0.0:4420 in the guest.
    let target: NvmetTarget = vm.setup_nvmet(NQN, 64, GUEST_PORT).expect("set up nvmet");
    assert_eq!(target.size_bytes, 64 << 20);
    assert!(target.device.starts_with("/dev/loop"), "{target:?}");

    // The host reaches it through the forwarded port: ICReq → ICResp.
    let response = exchange_icreq(host_port);
    assert_eq!(response[0], 0x01, "PDU type ICResp: {response:02x?}");
    assert_eq!(response[2], 128, "header length: {response:02x?}");
    assert_eq!(response[3], 0, "PDU data offset: {response:02x?}");
    assert_eq!(
        u32::from_le_bytes([response[4], response[5], response[6], response[7]]),
        128,
        "PDU length: {response:02x?}"
    );
    assert_eq!(
        u16::from_le_bytes([response[8], response[9]]),
        0,
        "PDU format version: {response:02x?}"
    );
    assert_eq!(
        response[11], 0,
        "no digests were asked for: {response:02x?}"
    );
    let maxh2cdata = u32::from_le_bytes([response[12], response[13], response[14], response[15]]);
    assert!(
        maxh2cdata >= 4096 && maxh2cdata.is_multiple_of(4),
        "MAXH2CDATA {maxh2cdata}: {response:02x?}"
    );

    // The guest kernel's NVMe/TCP host against its own target, through nvme-cli.
    let discovery = vm
        .check("nvme discover -t tcp -a 127.0.0.1 -s 4420", SHORT)
        .expect("nvme discover");
    assert!(
        discovery.contains(&format!("subnqn:  {NQN}")) || discovery.contains(NQN),
        "the discovery log lists the subsystem:\n{discovery}"
    );
    assert!(discovery.contains("trtype:  tcp"), "{discovery}");

    vm.check(
        &format!("nvme connect -t tcp -a 127.0.0.1 -s 4420 -n {NQN}"),
        SHORT,
    )
    .expect("nvme connect");
    let device = namespace_device(&vm, NQN);
    let size = vm
        .check(&format!("blockdev --getsize64 {device}"), SHORT)
        .expect("namespace size");
    assert_eq!(size.trim(), (64u64 << 20).to_string());

    // O_DIRECT writes through NVMe/TCP land in the target's backing device.
    vm.check(
        &format!(
            "set -e
             dd if=/dev/urandom of=/tmp/pattern bs=64k count=64 2>/dev/null
             dd if=/tmp/pattern of={device} bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null
             dd if={device} of=/tmp/back bs=64k skip=16 count=64 iflag=direct 2>/dev/null
             cmp /tmp/pattern /tmp/back
             dd if={backing} of=/tmp/backing bs=64k skip=16 count=64 iflag=direct 2>/dev/null
             cmp /tmp/pattern /tmp/backing",
            backing = target.device
        ),
        LONG,
    )
    .expect("write a pattern through NVMe/TCP and read it back, and from the backing device");

    vm.check(&format!("nvme disconnect -n {NQN}"), SHORT)
        .expect("nvme disconnect");
    vm.check(&format!("! [ -e {device} ]"), SHORT)
        .expect("the namespace device is gone after disconnect");

    // Taking the target down closes its port.
    vm.remove_nvmet(&target)
        .expect("remove the nvmet subsystem");
    let (status, output) = vm
        .run("nvme discover -t tcp -a 127.0.0.1 -s 4420", SHORT)
        .expect("run nvme discover");
    assert_ne!(status, 0, "discovery after removal must fail:\n{output}");

    // A module shipped for loading with parameters: a 16 MiB ramdisk.
    vm.modprobe("brd", "rd_nr=1 rd_size=16384")
        .expect("modprobe brd");
    let size = vm
        .check("blockdev --getsize64 /dev/ram0", SHORT)
        .expect("ramdisk size");
    assert_eq!(size.trim(), (16u64 << 20).to_string());

    vm.poweroff().expect("power off");
}
