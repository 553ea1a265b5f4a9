//! The guest kernel's NBD client (Debian's `nbd-client`) against an NBD server on the host
//! (`qemu-nbd` over a 1 GiB file, started by the test): O_DIRECT writes that reach the host's
//! file at the right offset, ext4 made, filled, checked (`e2fsck -f`), and read back after a
//! disconnect and a new connection.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use strata_testkit::vm::{Vm, VmConfig};
use strata_testkit::{free_port, pattern, wait_for_port};

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(300);
const DISK_SIZE: u64 = 1 << 30;

/// A host process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kernel_nbd_client_against_a_host_server() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let disk = dir.path().join("disk.img");
    File::create(&disk)
        .and_then(|file| file.set_len(DISK_SIZE))
        .expect("create a sparse 1 GiB disk file");
    let port = free_port().expect("a free port");
    let server = Server(
        Command::new("qemu-nbd")
            .args(["--format=raw", "--persistent", "--bind=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(&disk)
            .stdin(Stdio::null())
            .spawn()
            .expect("start qemu-nbd (qemu-utils: scripts/test.sh installs it)"),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_for_port(addr, SHORT).expect("qemu-nbd listens");

    let vm = Vm::boot(VmConfig::default()).expect("boot the test VM");
    // The host's 127.0.0.1 is 10.0.2.2 from the guest.
    let connect = format!("nbd-client 10.0.2.2 {port} /dev/nbd0");
    vm.check(&connect, SHORT).expect("nbd-client connects");
    let size = vm
        .check("blockdev --getsize64 /dev/nbd0", SHORT)
        .expect("device size");
    assert_eq!(size.trim(), DISK_SIZE.to_string());

    // 8 MiB at 64 MiB with O_DIRECT, read back with O_DIRECT, and found in the host's file.
    let first_sector = (64 << 20) / 512;
    let sectors = (8 << 20) / 512;
    vm.check(
        &format!(
            "set -e
             {make} > /tmp/pattern
             dd if=/tmp/pattern of=/dev/nbd0 bs=1M seek=64 oflag=direct 2>/dev/null
             dd if=/dev/nbd0 of=/tmp/back bs=1M skip=64 count=8 iflag=direct 2>/dev/null
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
        "the host's file does not hold the pattern the guest wrote at 64 MiB"
    );

    // ext4: make, mount, fill, unmount, check.
    vm.check("mkfs.ext4 -q -F /dev/nbd0", LONG)
        .expect("mkfs.ext4 over NBD");
    vm.check(
        "set -e
         mount /dev/nbd0 /mnt
         mkdir /mnt/dir
         dd if=/dev/urandom of=/mnt/dir/random bs=1M count=4 2>/dev/null
         echo strata > /mnt/hello
         md5sum /mnt/dir/random /mnt/hello > /tmp/sums
         umount /mnt",
        LONG,
    )
    .expect("write files on ext4 over NBD");
    let mut magic = [0u8; 2];
    File::open(&disk)
        .and_then(|file| file.read_exact_at(&mut magic, 1024 + 56))
        .expect("read the superblock magic from the host's file");
    assert_eq!(
        u16::from_le_bytes(magic),
        0xef53,
        "ext4 superblock on the host"
    );
    vm.check("e2fsck -f -n /dev/nbd0", LONG)
        .expect("e2fsck -f finds the filesystem clean");

    // Disconnect, connect again, read the files back.
    vm.check("nbd-client -d /dev/nbd0", SHORT)
        .expect("nbd-client -d");
    vm.check("test \"$(cat /sys/block/nbd0/size)\" = 0", SHORT)
        .expect("/dev/nbd0 has no size once disconnected");
    vm.check(&connect, SHORT)
        .expect("nbd-client connects again");
    let files = vm
        .check(
            "set -e
             mount /dev/nbd0 /mnt
             md5sum -c /tmp/sums
             cat /mnt/hello
             umount /mnt",
            LONG,
        )
        .expect("read the files back after reconnecting");
    assert!(files.contains("/mnt/dir/random: OK"), "{files}");
    assert!(files.contains("strata"), "{files}");
    vm.check("nbd-client -d /dev/nbd0", SHORT)
        .expect("nbd-client -d");

    vm.poweroff().expect("power off");
    drop(server);
}
