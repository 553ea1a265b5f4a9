//! A vhost-user-blk disk attached with `VmConfig::with_vhost_user_blk` (shared memfd memory,
//! socket chardev, `vhost-user-blk-pci` with two queues), served by `qemu-storage-daemon` on the
//! host: the guest's virtio-blk driver sees it with its size and queues, and O_DIRECT writes
//! reach the host's file at the right offset.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_testkit::pattern;
use strata_testkit::vm::{VhostUserBlk, Vm, VmConfig};

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(300);
const DISK_SIZE: u64 = 64 << 20;

/// A host process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn vhost_user_blk_disk() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let disk = dir.path().join("disk.img");
    File::create(&disk)
        .and_then(|file| file.set_len(DISK_SIZE))
        .expect("create a 64 MiB disk file");
    let socket = dir.path().join("vhost-user-blk.sock");
    let mut server = Server(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0,filename={}",
                disk.display()
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
    while !socket.exists() {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("qemu-storage-daemon exited ({status})");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon made no socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let config = VmConfig {
        memory_mib: 512,
        ..VmConfig::default()
    }
    .with_vhost_user_blk(&VhostUserBlk::new("disk0", &socket).num_queues(2));
    let vm = Vm::boot(config).expect("boot the test VM with a vhost-user-blk disk");

    let size = vm
        .check("blockdev --getsize64 /dev/vda", SHORT)
        .expect("the disk is /dev/vda");
    assert_eq!(size.trim(), DISK_SIZE.to_string());
    let queues = vm
        .check("ls /sys/block/vda/mq | wc -l", SHORT)
        .expect("count the disk's queues");
    assert_eq!(queues.trim(), "2");

    // 1 MiB at 4 MiB with O_DIRECT, read back, and found in the host's file.
    let first_sector = (4 << 20) / 512;
    let sectors = (1 << 20) / 512;
    vm.check(
        &format!(
            "set -e
             {make} > /tmp/pattern
             dd if=/tmp/pattern of=/dev/vda bs=64k seek=64 oflag=direct conv=fsync 2>/dev/null
             dd if=/dev/vda of=/tmp/back bs=64k skip=64 count=16 iflag=direct 2>/dev/null
             cmp /tmp/pattern /tmp/back",
            make = pattern::guest_command(first_sector, sectors)
        ),
        LONG,
    )
    .expect("write a pattern with O_DIRECT and read it back");
    let expected = pattern::sectors(first_sector, sectors);
    let mut on_host = vec![0u8; expected.len()];
    File::open(&disk)
        .and_then(|file| file.read_exact_at(&mut on_host, first_sector * 512))
        .expect("read the host's file");
    assert!(
        on_host == expected,
        "the host's file does not hold the pattern the guest wrote at 4 MiB"
    );

    vm.poweroff().expect("power off");
    drop(server);
}
