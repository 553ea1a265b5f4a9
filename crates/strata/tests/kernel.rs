//! The Linux kernel's own clients against `strata serve`, in a Debian 6.1 guest under qemu
//! (TCG): its NBD client on the embedded default's page-store volume, its NVMe/TCP host on an
//! image volume (with header and data digests too, and an online resize), and its virtio-blk
//! driver on vhost-user-blk volumes with one and two queues, beside the same steps on
//! qemu-storage-daemon's vhost-user-blk export (so the harness itself is known good). One guest
//! does it all; a second boot reads the vhost-user disks' files back after a reboot.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{strata_bin, wait_until};
use strata_testkit::vm::{VhostUserBlk, Vm, VmConfig};
use strata_testkit::{nvme, pattern};

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(600);
const MIB: u64 = 1 << 20;

/// A process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `strata serve` with the embedded default (no configuration file), on free ports.
struct Daemon {
    child: Killed,
    data: tempfile::TempDir,
    nbd: String,
    nvmf: String,
    banner: String,
}

impl Daemon {
    fn start() -> Daemon {
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(strata_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--nvmf-listen",
                "127.0.0.1:0",
            ])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("STRATA_DATA_DIR", data.path())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(data.path().join("strata.log")).unwrap())
            .spawn()
            .unwrap();
        use std::io::BufRead;
        let mut banner = String::new();
        for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if line == "ready" {
                break;
            }
            banner.push_str(&line);
            banner.push('\n');
        }
        let find = |prefix: &str| {
            banner
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in the banner:\n{banner}"))
                .to_string()
        };
        let nbd = find("listening: nbd://");
        let nvmf = find("nvmf: ");
        Daemon {
            child: Killed(child),
            data,
            nbd,
            nvmf,
            banner,
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(strata_bin())
            .args(args)
            .env("STRATA_DATA_DIR", self.data.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "strata {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn port(addr: &str) -> &str {
        addr.rsplit_once(':').unwrap().1
    }
}

/// qemu-storage-daemon serving a file as a vhost-user-blk disk with two queues.
fn qsd(dir: &std::path::Path) -> (Killed, std::path::PathBuf) {
    let disk = dir.join("qsd.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(256 * MIB))
        .unwrap();
    let socket = dir.join("qsd.sock");
    let child = Command::new("qemu-storage-daemon")
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
        .expect("start qemu-storage-daemon (qemu-utils: scripts/test.sh installs it)");
    wait_until("qemu-storage-daemon's socket", SHORT, || socket.exists());
    (Killed(child), socket)
}

/// The guest's block device whose serial (virtio-blk GET_ID) is `id` (the loop's own status is
/// the last disk's comparison, so it is not the test; an empty answer is).
fn disk_with_serial(vm: &Vm, id: &str) -> String {
    let out = vm
        .check(
            &format!("for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = \"{id}\" ] && basename $d; done; true"),
            SHORT,
        )
        .unwrap();
    let dev = out.trim();
    assert!(!dev.is_empty(), "no virtio disk with serial {id}");
    format!("/dev/{dev}")
}

/// The guest's one virtio disk whose serial is none of `others` (qemu-storage-daemon's export
/// answers GET_ID with a serial of its own choosing).
fn disk_not_serial(vm: &Vm, others: &[&str]) -> String {
    let test: Vec<String> = others
        .iter()
        .map(|o| format!("[ \"$(cat $d/serial)\" != \"{o}\" ]"))
        .collect();
    let out = vm
        .check(
            &format!(
                "for d in /sys/block/vd*; do {} && basename $d; done; true",
                test.join(" && ")
            ),
            SHORT,
        )
        .unwrap();
    let disks: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        disks.len(),
        1,
        "virtio disks with serials other than {others:?}: {out:?}"
    );
    format!("/dev/{}", disks[0])
}

/// O_DIRECT pattern write and read-back at 4 MiB, then mkfs.ext4, mount, files, umount and
/// `e2fsck -f` clean on `dev`; the files' checksums are left in `/tmp/NAME.md5`.
fn pattern_and_filesystem(vm: &Vm, dev: &str, name: &str) {
    let first = 4 * MIB / 512;
    let sectors = MIB / 512;
    vm.check(
        &format!(
            "set -e
             {make} > /tmp/pattern
             dd if=/tmp/pattern of={dev} bs=64k seek=64 oflag=direct conv=fsync 2>/dev/null
             echo 3 > /proc/sys/vm/drop_caches
             dd if={dev} of=/tmp/back bs=64k skip=64 count=16 iflag=direct 2>/dev/null
             cmp /tmp/pattern /tmp/back",
            make = pattern::guest_command(first, sectors)
        ),
        LONG,
    )
    .unwrap_or_else(|e| panic!("{name}: O_DIRECT pattern on {dev}: {e:?}"));
    vm.check(
        &format!(
            "set -e
             mkfs.ext4 -q -F {dev}
             mkdir -p /mnt/{name}
             mount {dev} /mnt/{name}
             dd if=/dev/urandom of=/mnt/{name}/big bs=1M count=8 2>/dev/null
             for i in 1 2 3 4 5; do echo \"{name} file $i\" > /mnt/{name}/f$i; done
             cd /mnt/{name} && md5sum big f1 f2 f3 f4 f5 > /tmp/{name}.md5 && cd /
             umount /mnt/{name}
             e2fsck -f -n {dev}"
        ),
        LONG,
    )
    .unwrap_or_else(|e| panic!("{name}: ext4 on {dev}: {e:?}"));
}

/// Mount `dev` read-only and check the files [`pattern_and_filesystem`] wrote.
fn files_read_back(vm: &Vm, dev: &str, name: &str) {
    vm.check(
        &format!(
            "set -e
             mkdir -p /mnt/{name}
             mount -o ro {dev} /mnt/{name}
             cd /mnt/{name} && md5sum -c /tmp/{name}.md5 && cd /
             umount /mnt/{name}"
        ),
        LONG,
    )
    .unwrap_or_else(|e| panic!("{name}: files read back from {dev}: {e:?}"));
}

#[test]
fn the_kernels_nbd_nvme_tcp_and_virtio_blk_clients_use_strata_serve() {
    common::require("qemu-storage-daemon");
    let d = Daemon::start();
    // The embedded default prints how to reach it over each protocol.
    assert!(d.banner.contains("nvme connect -t tcp"), "{}", d.banner);
    // An image volume over NVMe/TCP, and vhost-user-blk volumes: a file and an image.
    let vu = d.data.path().join("vu1.img");
    d.cli(&[
        "volume", "create", "nv", "--image", "local/nv", "--size", "256M", "--export", "nvmf",
    ]);
    d.cli(&[
        "volume",
        "create",
        "vu1",
        "--device",
        &format!("file://{}", vu.display()),
        "--size",
        "256M",
        "--export",
        "vhost_user",
    ]);
    d.cli(&[
        "volume",
        "create",
        "vu2",
        "--image",
        "local/vu2",
        "--size",
        "256M",
        "--export",
        "vhost_user",
    ]);
    let scratch = tempfile::tempdir().unwrap();
    let (qsd, qsd_socket) = qsd(scratch.path());
    let sock = |v: &str| d.data.path().join(format!("vhost-user/{v}.sock"));
    let config = || {
        VmConfig {
            memory_mib: 1024,
            ..VmConfig::default()
        }
        .with_vhost_user_blk(&VhostUserBlk::new("vu1", sock("vu1")).num_queues(1))
        .with_vhost_user_blk(&VhostUserBlk::new("vu2", sock("vu2")).num_queues(2))
        .with_vhost_user_blk(&VhostUserBlk::new("qsd", &qsd_socket).num_queues(2))
    };
    let vm = Vm::boot(config()).expect("boot the guest");

    // The kernel's NBD client on the embedded default, with no extra flags.
    let nbd_port = Daemon::port(&d.nbd);
    vm.check(
        &format!("nbd-client 10.0.2.2 {nbd_port} /dev/nbd0 -N demo"),
        SHORT,
    )
    .expect("nbd-client attaches the embedded default");
    let size = vm.check("blockdev --getsize64 /dev/nbd0", SHORT).unwrap();
    assert_eq!(size.trim(), (1024 * MIB).to_string());
    pattern_and_filesystem(&vm, "/dev/nbd0", "nbd");
    vm.check("nbd-client -d /dev/nbd0", SHORT).unwrap();
    vm.check(
        &format!("nbd-client 10.0.2.2 {nbd_port} /dev/nbd0 -N demo"),
        SHORT,
    )
    .expect("nbd-client reconnects");
    files_read_back(&vm, "/dev/nbd0", "nbd");
    vm.check("nbd-client -d /dev/nbd0", SHORT).unwrap();

    // NVMe/TCP: discovery, connect, I/O and ext4; again after a reconnect, and with digests.
    let nvmf_port = Daemon::port(&d.nvmf);
    let nqn = "nqn.2026-12.io.strata:nv";
    let discovered = vm
        .check(
            &format!("nvme discover -t tcp -a 10.0.2.2 -s {nvmf_port}"),
            SHORT,
        )
        .unwrap();
    assert!(discovered.contains(nqn), "{discovered}");
    let nvmf_port: u16 = nvmf_port.parse().unwrap();
    let connect = |digests: &str| {
        nvme::connect(&vm, "10.0.2.2", nvmf_port, nqn, digests).expect("nvme connect")
    };
    let (_, dev) = connect("");
    pattern_and_filesystem(&vm, &dev, "nvme");
    nvme::disconnect(&vm, nqn, &dev).unwrap();
    let (ctrl, dev) = connect("--hdr-digest --data-digest");
    files_read_back(&vm, &dev, "nvme");
    pattern_and_filesystem(&vm, &dev, "nvmed");
    // An online resize shows up after a rescan.
    d.cli(&["volume", "resize", "nv", "512M"]);
    vm.check(&format!("nvme ns-rescan {ctrl}"), SHORT).unwrap();
    let grown = vm
        .check(&format!("blockdev --getsize64 {dev}"), SHORT)
        .unwrap();
    assert_eq!(grown.trim(), (512 * MIB).to_string(), "after the resize");
    files_read_back(&vm, &dev, "nvmed");
    nvme::disconnect(&vm, nqn, &dev).unwrap();

    // vhost-user-blk: Strata's two disks (1 and 2 queues) and qemu-storage-daemon's.
    for (id, queues) in [("vu1", 1), ("vu2", 2), ("qsd", 2)] {
        let dev = if id == "qsd" {
            disk_not_serial(&vm, &["vu1", "vu2"])
        } else {
            disk_with_serial(&vm, id)
        };
        let size = vm
            .check(&format!("blockdev --getsize64 {dev}"), SHORT)
            .unwrap();
        assert_eq!(size.trim(), (256 * MIB).to_string(), "{id}");
        let base = dev.trim_start_matches("/dev/");
        let q = vm
            .check(&format!("ls /sys/block/{base}/mq | wc -l"), SHORT)
            .unwrap();
        assert_eq!(q.trim(), queues.to_string(), "{id}: queues");
        pattern_and_filesystem(&vm, &dev, id);
        vm.check(
            &format!("mount {dev} /mnt/{id} && fstrim -v /mnt/{id} && umount /mnt/{id}"),
            LONG,
        )
        .unwrap_or_else(|e| panic!("{id}: fstrim: {e:?}"));
    }
    let sums: Vec<(&str, String)> = ["vu1", "vu2", "qsd"]
        .iter()
        .map(|id| (*id, vm.check(&format!("cat /tmp/{id}.md5"), SHORT).unwrap()))
        .collect();
    vm.poweroff().expect("power off");

    // After a reboot the vhost-user disks' files are all there.
    let vm = Vm::boot(config()).expect("boot the guest again");
    for (id, md5) in &sums {
        let dev = if *id == "qsd" {
            disk_not_serial(&vm, &["vu1", "vu2"])
        } else {
            disk_with_serial(&vm, id)
        };
        vm.check(&format!("cat > /tmp/{id}.md5 <<'EOF'\n{md5}EOF"), SHORT)
            .unwrap();
        files_read_back(&vm, &dev, id);
    }
    vm.poweroff().expect("power off");
    drop(qsd);
    drop(d.child);
}
