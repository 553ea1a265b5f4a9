//! The Linux kernel and Strata's NVMe/TCP, both ways, in one VM (Debian 6.1 kernel under qemu
//! TCG, `strata-testkit`):
//!
//! - the kernel's `nvme-tcp` host (driven by `nvme-cli` in the guest, reaching this process's
//!   127.0.0.1 as 10.0.2.2) against Strata's target serving a memory device from this test:
//!   discovery, connect, O_DIRECT pattern I/O (found in the device on this side), ext4 made,
//!   filled and checked with `e2fsck -f`, files read back after disconnect and connect, a
//!   resize seen after `nvme ns-rescan`, and all of it again with header and data digests;
//! - Strata's host against the guest kernel's `nvmet` (reached through a forwarded port): the
//!   block-device conformance suite, and I/O with digests.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use strata_bdev::conformance::{self, Expect};
use strata_bdev::{BlockDevice, WriteOpts};
use strata_nvmf::{HostOptions, NvmfDevice, TargetSettings};
use strata_testkit::nvme;
use strata_testkit::vm::{Vm, VmConfig};
use strata_testkit::{free_port, pattern};

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(600);
const MIB: u64 = 1 << 20;
const SIZE: u64 = 96 * MIB;
const GROWN: u64 = 160 * MIB;
/// The port nvmet listens on in the guest.
const GUEST_PORT: u16 = 4420;

/// `nvme connect` (with `extra` options) and the controller and namespace it made.
fn connect(vm: &Vm, port: u16, nqn: &str, extra: &str) -> (String, String) {
    nvme::connect(vm, "10.0.2.2", port, nqn, extra).expect("nvme connect")
}

fn disconnect(vm: &Vm, nqn: &str, dev: &str) {
    nvme::disconnect(vm, nqn, dev).expect("nvme disconnect");
}

/// Write sectors `[first, first + count)` of the pattern with O_DIRECT and read them back.
fn pattern_io(vm: &Vm, dev: &str, first: u64, count: u64) {
    vm.check(
        &format!(
            "set -e
             {make} > /tmp/pattern
             dd if=/tmp/pattern of={dev} bs=1M seek={seek} oflag=direct 2>/dev/null
             dd if={dev} of=/tmp/back bs=1M skip={seek} count={n} iflag=direct 2>/dev/null
             cmp /tmp/pattern /tmp/back",
            make = pattern::guest_command(first, count),
            seek = first * 512 / MIB,
            n = count * 512 / MIB,
        ),
        LONG,
    )
    .expect("write a pattern with O_DIRECT and read it back");
}

#[test]
fn the_linux_kernel_and_strata_nvme_tcp_both_ways() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // Strata's target, in this process, over a memory device that can grow.
    let dev = Arc::new(Resizable::new("kernel", SIZE, GROWN));
    let (t, addr) = rt.block_on(target(TargetSettings::default()));
    let nqn = export(&t, "kernel", dev.clone());
    let port = addr.port();

    let host_port = free_port().expect("a free port");
    let vm = Vm::boot(VmConfig::default().with_hostfwd(host_port, GUEST_PORT))
        .expect("boot the test VM");

    // ---- The kernel's host against Strata's target ----------------------------------------
    let discovery = vm
        .check(
            &format!("nvme discover -t tcp -a 10.0.2.2 -s {port}"),
            SHORT,
        )
        .expect("nvme discover");
    assert!(
        discovery.contains(&nqn),
        "the discovery log lists the subsystem:\n{discovery}"
    );
    assert!(discovery.contains("trtype:  tcp"), "{discovery}");

    let (ctrl, ns) = connect(&vm, port, &nqn, "");
    let size = vm
        .check(&format!("blockdev --getsize64 {ns}"), SHORT)
        .expect("namespace size");
    assert_eq!(size.trim(), SIZE.to_string());
    let model = vm
        .check(&format!("cat /sys/class/nvme/{}/model", &ctrl[5..]), SHORT)
        .expect("model");
    assert_eq!(model.trim(), "Strata");

    // 4 MiB at 8 MiB with O_DIRECT: read back in the guest, and found in the device here.
    let (first, count) = (8 * MIB / 512, 4 * MIB / 512);
    pattern_io(&vm, &ns, first, count);
    let here = rt
        .block_on(dev.read_at(first * 512, (count * 512) as usize))
        .expect("read the device");
    assert!(
        here[..] == pattern::sectors(first, count)[..],
        "the memory device holds the pattern the guest wrote at 8 MiB"
    );

    // ext4: make, mount, fill, unmount, check.
    vm.check(&format!("mkfs.ext4 -q -F {ns}"), LONG)
        .expect("mkfs.ext4 over NVMe/TCP");
    vm.check(
        &format!(
            "set -e
             mount {ns} /mnt
             mkdir /mnt/dir
             dd if=/dev/urandom of=/mnt/dir/random bs=1M count=8 2>/dev/null
             echo strata > /mnt/hello
             md5sum /mnt/dir/random /mnt/hello > /tmp/sums
             umount /mnt"
        ),
        LONG,
    )
    .expect("write files on ext4 over NVMe/TCP");
    let magic = rt
        .block_on(dev.read_at(1024 + 56, 2))
        .expect("read the superblock magic");
    assert_eq!(
        u16::from_le_bytes([magic[0], magic[1]]),
        0xef53,
        "ext4 superblock here"
    );
    vm.check(&format!("e2fsck -f -n {ns}"), LONG)
        .expect("e2fsck -f finds the filesystem clean");

    // Disconnect, connect again, read the files back.
    disconnect(&vm, &nqn, &ns);
    wait_until_blocking(&rt, "the controller is gone", || {
        t.controllers(&nqn).is_empty()
    });
    let (ctrl, ns) = connect(&vm, port, &nqn, "");
    let files = vm
        .check(
            &format!(
                "set -e
                 mount {ns} /mnt
                 md5sum -c /tmp/sums
                 cat /mnt/hello
                 umount /mnt"
            ),
            LONG,
        )
        .expect("read the files back after reconnecting");
    assert!(files.contains("/mnt/dir/random: OK"), "{files}");
    assert!(files.contains("strata"), "{files}");

    // Resize: the device grows, the target says so, and a rescan shows it.
    dev.resize(GROWN);
    t.resized(&nqn).expect("resized");
    vm.check(&format!("nvme ns-rescan {ctrl}"), SHORT)
        .expect("nvme ns-rescan");
    vm.check(
        &format!(
            "for i in $(seq 1 300); do [ \"$(blockdev --getsize64 {ns})\" = {GROWN} ] && exit 0; sleep 0.1; done; \
             blockdev --getsize64 {ns}; exit 1"
        ),
        SHORT,
    )
    .expect("the namespace shows its new size");
    // The new end is usable.
    pattern_io(&vm, &ns, (GROWN - 2 * MIB) / 512, 2 * MIB / 512);
    disconnect(&vm, &nqn, &ns);

    // All of it again with header and data digests.
    let (_ctrl, ns) = connect(&vm, port, &nqn, "--hdr-digest --data-digest");
    let info = t.controller_info(&nqn);
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(
        info[0].queues.len() > 1
            && info[0]
                .queues
                .iter()
                .all(|q| q.header_digest && q.data_digest),
        "every queue uses header and data digests: {info:?}"
    );
    let (first, count) = (40 * MIB / 512, 4 * MIB / 512);
    pattern_io(&vm, &ns, first, count);
    let here = rt
        .block_on(dev.read_at(first * 512, (count * 512) as usize))
        .expect("read the device");
    assert!(
        here[..] == pattern::sectors(first, count)[..],
        "the pattern, with digests"
    );
    let files = vm
        .check(
            &format!(
                "set -e
                 mount {ns} /mnt
                 md5sum -c /tmp/sums
                 dd if=/dev/urandom of=/mnt/more bs=1M count=4 2>/dev/null
                 md5sum /mnt/more > /tmp/more
                 umount /mnt
                 e2fsck -f -n {ns} >/dev/null
                 mount {ns} /mnt
                 md5sum -c /tmp/more
                 umount /mnt"
            ),
            LONG,
        )
        .expect("ext4 with digests");
    assert!(files.contains("/mnt/dir/random: OK"), "{files}");
    assert!(files.contains("/mnt/more: OK"), "{files}");
    disconnect(&vm, &nqn, &ns);

    // ---- Strata's host against the guest kernel's nvmet ------------------------------------
    let reference = format!("127.0.0.1:{host_port}");
    let n = AtomicUsize::new(0);
    rt.block_on(conformance::run(Expect::default(), |size| {
        let nqn = format!(
            "nqn.2014-08.io.strata:reference-{}",
            n.fetch_add(1, Ordering::Relaxed)
        );
        // The guest sets a fresh subsystem up (a blocking call, on this test's own thread).
        vm.setup_nvmet(&nqn, size / MIB, GUEST_PORT)
            .expect("set up an nvmet subsystem");
        let reference = reference.clone();
        async move {
            let dev = tokio::time::timeout(
                LONG,
                NvmfDevice::connect(&reference, &nqn, HostOptions::default()),
            )
            .await
            .expect("connect to nvmet in time")
            .expect("connect to nvmet");
            Arc::new(dev) as Arc<dyn BlockDevice>
        }
    }));
    // With digests, through the same port.
    let nqn = "nqn.2014-08.io.strata:reference-digests";
    vm.setup_nvmet(nqn, 16, GUEST_PORT).expect("set up nvmet");
    let opts = HostOptions {
        header_digest: true,
        data_digest: true,
        ..HostOptions::default()
    };
    rt.block_on(async {
        let dev = NvmfDevice::connect(&reference, nqn, opts)
            .await
            .expect("connect with digests");
        for (i, len) in [(0u64, 4096usize), (1, 65536), (2, 3 << 20)] {
            let data = common::pattern(i, len);
            dev.write_at(i * (4 * MIB), data.clone(), WriteOpts::default())
                .await
                .expect("write with digests");
            assert_eq!(
                dev.read_at(i * (4 * MIB), len)
                    .await
                    .expect("read with digests"),
                data
            );
        }
        dev.close().await;
    });

    vm.poweroff().expect("power off");
    rt.block_on(t.shutdown());
}

/// Poll `cond` from a blocking context.
fn wait_until_blocking(rt: &tokio::runtime::Runtime, what: &str, cond: impl Fn() -> bool) {
    rt.block_on(wait_until(what, SHORT, || {
        let ok = cond();
        async move { ok }
    }));
}
