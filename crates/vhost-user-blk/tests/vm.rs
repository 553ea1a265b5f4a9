//! A Debian kernel under qemu (TCG, shared memfd memory) whose virtio-blk driver uses three
//! vhost-user-blk disks at once: Strata serving a file with one queue, Strata serving a
//! memory device with two queues, and qemu-storage-daemon's export of a file (the reference
//! that shows the harness itself is sound). On each: the capacity, an O_DIRECT pattern found
//! on the host, ext4 made, filled, checked clean with `e2fsck -f`, trimmed; then a second boot
//! (the guest rebooted: a new qemu connecting to the same sockets) reads the files back. On
//! Strata's two-queue disk also: an online resize the guest sees through a config-change
//! notification, and an export restart qemu reconnects to (`reconnect-ms`) with nothing lost.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_until, Growable, Harness};
use strata_bdev::BlockDevice;
use strata_bdev_file::{FileDevice, FileOptions};
use strata_testkit::pattern;
use strata_testkit::vm::{VhostUserBlk, Vm, VmConfig};
use strata_vhost_user_blk::VhostUserSettings;

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(600);
const DISK_SIZE: u64 = 64 << 20;

/// qemu-storage-daemon, killed when dropped.
struct StorageDaemon(Child);

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn storage_daemon(file: &Path, socket: &Path) -> StorageDaemon {
    let mut daemon = StorageDaemon(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0,filename={},discard=unmap",
                file.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=export0,node-name=disk0,writable=on,num-queues=2,\
                 addr.type=unix,addr.path={}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon (qemu-utils: scripts/test.sh installs it)"),
    );
    let deadline = Instant::now() + SHORT;
    while !common::is_socket(socket) {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!("qemu-storage-daemon exited ({status})");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon made no socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

fn sparse_file(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create a disk file");
}

/// One disk as the test knows it.
struct Disk {
    /// The serial the guest reads (GET_ID): Strata answers the volume name.
    serial: Option<&'static str>,
    queues: u16,
    /// Reads bytes of the disk on the host.
    host: Box<dyn Fn(u64, usize) -> Vec<u8>>,
}

/// The guest's device names of the disks, in the order given: Strata's by their serial, the
/// one left over is the reference.
fn find_disks(vm: &Vm, disks: &[Disk]) -> Vec<String> {
    let listing = vm
        .check(
            "for d in /sys/block/vd*; do echo \"$(basename $d) $(cat $d/serial 2>/dev/null)\"; done",
            SHORT,
        )
        .expect("list the virtio disks");
    let found: Vec<(String, String)> = listing
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((
                parts.next()?.to_string(),
                parts.next().unwrap_or("").to_string(),
            ))
        })
        .collect();
    assert_eq!(found.len(), disks.len(), "the guest's disks: {listing}");
    let mut names = Vec::new();
    for disk in disks {
        let name = match disk.serial {
            Some(serial) => found
                .iter()
                .find(|(_, s)| s == serial)
                .map(|(n, _)| n.clone())
                .unwrap_or_else(|| panic!("no disk with serial {serial}: {listing}")),
            None => found
                .iter()
                .find(|(_, s)| disks.iter().all(|d| d.serial != Some(s.as_str())))
                .map(|(n, _)| n.clone())
                .expect("the reference disk"),
        };
        names.push(name);
    }
    names
}

/// Everything a user would do with a new disk.
fn first_use(vm: &Vm, dev: &str, disk: &Disk, index: u64) {
    let size = vm
        .check(&format!("blockdev --getsize64 /dev/{dev}"), SHORT)
        .expect("the disk's size");
    assert_eq!(size.trim(), DISK_SIZE.to_string(), "{dev}: capacity");
    let queues = vm
        .check(&format!("ls /sys/block/{dev}/mq | wc -l"), SHORT)
        .expect("count the disk's queues");
    assert_eq!(queues.trim(), disk.queues.to_string(), "{dev}: queues");

    // 1 MiB with O_DIRECT at 4 MiB (+ 1 MiB per disk), read back, and found on the host.
    let first = (4 + index) * (1 << 20) / 512;
    let sectors = (1 << 20) / 512;
    vm.check(
        &format!(
            "set -e
             {make} > /tmp/pattern
             dd if=/tmp/pattern of=/dev/{dev} bs=64k seek={seek} oflag=direct conv=fsync 2>/dev/null
             dd if=/dev/{dev} of=/tmp/back bs=64k skip={seek} count=16 iflag=direct 2>/dev/null
             cmp /tmp/pattern /tmp/back",
            make = pattern::guest_command(first, sectors),
            seek = first * 512 / (64 << 10),
        ),
        LONG,
    )
    .unwrap_or_else(|e| panic!("{dev}: O_DIRECT pattern: {e:?}"));
    assert!(
        (disk.host)(first * 512, 1 << 20) == pattern::sectors(first, sectors),
        "{dev}: the host does not see the pattern the guest wrote"
    );

    // ext4: make, mount, fill, unmount, check clean, trim.
    vm.check(
        &format!(
            "set -e
             mkfs.ext4 -q -F /dev/{dev}
             mkdir -p /mnt/{dev}
             mount /dev/{dev} /mnt/{dev}
             mkdir /mnt/{dev}/dir
             dd if=/dev/urandom of=/mnt/{dev}/dir/random bs=64k count=80 2>/dev/null
             echo hello from {dev} > /mnt/{dev}/hello
             md5sum /mnt/{dev}/dir/random /mnt/{dev}/hello > /tmp/sums-{dev}
             umount /mnt/{dev}
             e2fsck -f -n /dev/{dev}
             mount /dev/{dev} /mnt/{dev}
             rm /mnt/{dev}/dir/random
             dd if=/dev/urandom of=/mnt/{dev}/dir/random bs=64k count=40 2>/dev/null
             md5sum /mnt/{dev}/dir/random /mnt/{dev}/hello > /tmp/sums-{dev}
             fstrim -v /mnt/{dev}
             umount /mnt/{dev}
             e2fsck -f -n /dev/{dev}"
        ),
        LONG,
    )
    .unwrap_or_else(|e| panic!("{dev}: ext4: {e:?}"));
}

#[test]
fn guests_use_vhost_user_disks() {
    let h = Harness::new(VhostUserSettings::default());
    let dir = h.dir.path().to_path_buf();

    // Strata: a file with one queue, a memory device (that can grow) with two.
    let file_path = dir.join("strata1.img");
    sparse_file(&file_path, DISK_SIZE);
    let file_device: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open(&file_path, FileOptions::default()).expect("open the file device"),
    );
    let growable = Arc::new(Growable::new(DISK_SIZE, 2 * DISK_SIZE));
    let export1 = h.serve("strata1", file_device, false);
    let export2 = h.serve("strata2", growable.clone(), false);
    // The reference: qemu-storage-daemon on a file of its own.
    let qsd_path = dir.join("qsd.img");
    sparse_file(&qsd_path, DISK_SIZE);
    let qsd_socket = dir.join("qsd.sock");
    let _qsd = storage_daemon(&qsd_path, &qsd_socket);

    let read_file = |path: std::path::PathBuf| -> Box<dyn Fn(u64, usize) -> Vec<u8>> {
        Box::new(move |offset, len| {
            let mut buf = vec![0u8; len];
            File::open(&path)
                .and_then(|f| f.read_exact_at(&mut buf, offset))
                .expect("read a disk file");
            buf
        })
    };
    let mem_runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mem = growable.clone();
    let disks = [
        Disk {
            serial: Some("strata1"),
            queues: 1,
            host: read_file(file_path.clone()),
        },
        Disk {
            serial: Some("strata2"),
            queues: 2,
            host: Box::new(move |offset, len| {
                mem_runtime
                    .block_on(mem.read_at(offset, len))
                    .expect("read the memory device")
                    .to_vec()
            }),
        },
        Disk {
            serial: None,
            queues: 2,
            host: read_file(qsd_path.clone()),
        },
    ];
    let config = || {
        VmConfig {
            memory_mib: 512,
            ..VmConfig::default()
        }
        .with_vhost_user_blk(&VhostUserBlk::new("strata1", h.socket("strata1")).num_queues(1))
        .with_vhost_user_blk(
            &VhostUserBlk::new("strata2", h.socket("strata2"))
                .num_queues(2)
                .reconnect(Duration::from_millis(200)),
        )
        .with_vhost_user_blk(&VhostUserBlk::new("qsd", &qsd_socket).num_queues(2))
    };

    // First boot: every step on every disk.
    let vm = Vm::boot(config()).expect("boot the guest with three vhost-user-blk disks");
    let names = find_disks(&vm, &disks);
    for (index, (dev, disk)) in names.iter().zip(&disks).enumerate() {
        first_use(&vm, dev, disk, index as u64);
    }
    let sums: Vec<String> = names
        .iter()
        .map(|dev| {
            vm.check(&format!("cat /tmp/sums-{dev}"), SHORT)
                .expect("the checksums")
                .trim()
                .to_string()
        })
        .collect();
    vm.poweroff().expect("power off");
    assert!(export1.connections() >= 1 && export2.connections() >= 1);

    // The guest comes back (a new qemu on the same sockets): the files are there.
    wait_until("the exports see the old qemu gone", SHORT, || {
        !export1.connected() && !export2.connected()
    });
    let vm = Vm::boot(config()).expect("boot the guest again");
    let names = find_disks(&vm, &disks);
    for (dev, sums) in names.iter().zip(&sums) {
        vm.check(
            &format!(
                "set -e
                 cat > /tmp/sums-{dev} <<'EOF'
{sums}
EOF
                 mkdir -p /mnt/{dev}
                 mount /dev/{dev} /mnt/{dev}
                 md5sum -c /tmp/sums-{dev}
                 umount /mnt/{dev}
                 e2fsck -f -n /dev/{dev}"
            ),
            LONG,
        )
        .unwrap_or_else(|e| panic!("{dev}: files after the reboot: {e:?}"));
    }
    let strata2 = &names[1];

    // Online resize: the device grows, the target announces it, the guest sees it.
    growable.set_size(DISK_SIZE + (32 << 20));
    assert!(
        h.target.resized("strata2").expect("announce the new size"),
        "the front-end was told"
    );
    let sectors = (DISK_SIZE + (32 << 20)) / 512;
    vm.check(
        &format!(
            "for i in $(seq 60); do [ \"$(cat /sys/block/{strata2}/size)\" = {sectors} ] && exit 0; sleep 1; done
             cat /sys/block/{strata2}/size; exit 1"
        ),
        SHORT,
    )
    .expect("the guest sees the new capacity");
    vm.check(
        &format!(
            "set -e
             {make} > /tmp/tail
             dd if=/tmp/tail of=/dev/{strata2} bs=64k seek={seek} oflag=direct 2>/dev/null
             dd if=/dev/{strata2} of=/tmp/tail-back bs=64k skip={seek} count=16 iflag=direct 2>/dev/null
             cmp /tmp/tail /tmp/tail-back",
            make = pattern::guest_command(DISK_SIZE / 512, 2048),
            seek = DISK_SIZE / (64 << 10),
        ),
        LONG,
    )
    .expect("I/O in the new space");

    // The export restarts under the running guest: qemu reconnects; what was written before
    // is read back after, and new writes work.
    let before = export2.connections();
    h.stop("strata2");
    let export2 = h.serve("strata2", growable.clone(), false);
    wait_until("qemu reconnects", SHORT, || export2.connected());
    assert!(before >= 1);
    vm.check(
        &format!(
            "set -e
             dd if=/dev/{strata2} of=/tmp/tail-again bs=64k skip={seek} count=16 iflag=direct 2>/dev/null
             cmp /tmp/tail /tmp/tail-again
             dd if=/tmp/tail of=/dev/{strata2} bs=64k seek=0 oflag=direct 2>/dev/null
             dd if=/dev/{strata2} of=/tmp/head bs=64k count=16 iflag=direct 2>/dev/null
             cmp /tmp/tail /tmp/head",
            seek = DISK_SIZE / (64 << 10),
        ),
        LONG,
    )
    .expect("I/O after the export restarted");
    vm.poweroff().expect("power off");
}
