//! Real clients on page-store volumes (`image://STORE/NAME`), once on a directory store and once
//! on a real S3 server (s3s-fs): the flows of tests/clients.rs — qemu-io, qemu-img, nbdinfo,
//! nbdcopy, fio, ext4 through nbdfuse — with checkpoints small and frequent, so that data moves
//! to the object store while the clients run. Each test then checks that it did, and the
//! crash tests kill the daemon (SIGKILL), restart it on the same directory, and read back what
//! was flushed; once everything is checkpointed, they also delete the write buffer and read it
//! back from the object store alone.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{random_file, run, strata_bin, S3Server, Strata};
use serde_json::Value;

/// Where the image lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// The `local` store: the directory `{data_dir}/objects`.
    Dir,
    /// An s3s-fs server the test starts, bucket `strata`, prefix `test`.
    S3,
}

/// The volume every test uses: a 1 GiB image named `img`.
const VOLUME: &str = "img";

/// How long a checkpoint of everything written may take to reach the object store.
const CHECKPOINT_LIMIT: Duration = Duration::from_secs(120);

/// A `strata serve` exporting one page-store image, checkpointing at 4 MiB or every second,
/// with the S3 server it uses if the store is S3.
struct Daemon {
    s: Strata,
    config: String,
    store: Store,
    // Dropped after `s`: the daemon never outlives its store.
    s3: Option<S3Server>,
}

impl Daemon {
    fn start(store: Store) -> Daemon {
        let s3 = (store == Store::S3).then(S3Server::start);
        let (stores, store_name) = match &s3 {
            Some(s3) => (s3.store_toml("s3", "test"), "s3"),
            None => (String::new(), "local"),
        };
        let config = format!(
            r#"
data_dir = "{{dir}}/data"
[nbd]
listen = ["127.0.0.1:0"]
{stores}
[pagestore]
checkpoint_bytes = "4M"
checkpoint_secs = 1
segment_bytes = "2M"

[[volume]]
name = "{VOLUME}"
uri = "image://{store_name}/{VOLUME}?size=1G"
"#
        );
        let s = Strata::start(&config);
        Daemon {
            s,
            config,
            store,
            s3,
        }
    }

    fn uri(&self) -> String {
        self.s.uri(VOLUME)
    }

    /// A scratch directory for the clients' files.
    fn scratch(&self) -> &Path {
        self.s.dir.path()
    }

    /// Where the store keeps the image's segment objects, as files.
    fn segments_dir(&self) -> PathBuf {
        match &self.s3 {
            Some(s3) => s3
                .bucket_dir()
                .join("test/images")
                .join(VOLUME)
                .join("segments"),
            None => self
                .s
                .path("data/objects/images")
                .join(VOLUME)
                .join("segments"),
        }
    }

    /// Segment objects in the store.
    fn segments(&self) -> usize {
        std::fs::read_dir(self.segments_dir())
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The image as `strata status --json` shows it.
    fn image_status(&self) -> Value {
        let out = std::process::Command::new(strata_bin())
            .arg("--endpoint")
            .arg(self.s.api_endpoint())
            .args(["status", VOLUME, "--json"])
            .output()
            .expect("run the strata CLI");
        assert!(
            out.status.success(),
            "strata status: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.s.log()
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["image"].clone()
    }

    /// Wait until everything written so far is in the object store: the write buffer is empty,
    /// the manifest names segments, and their objects are in the store.
    fn wait_checkpointed(&self) {
        let deadline = Instant::now() + CHECKPOINT_LIMIT;
        let mut status = self.image_status();
        while status["buffered_bytes"] != 0 {
            assert!(
                Instant::now() < deadline,
                "{:?} store: the write buffer is not checkpointed after {CHECKPOINT_LIMIT:?}: \
                 {status}\nserver log:\n{}\n{}",
                self.store,
                self.s.log(),
                self.s3.as_ref().map(S3Server::log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
            status = self.image_status();
        }
        assert!(
            self.segments() > 0,
            "{:?} store: no segment objects in {} although the write buffer is empty: {status}",
            self.store,
            self.segments_dir().display()
        );
        assert!(status["segments"].as_u64().unwrap() > 0, "{status}");
        assert_eq!(status["store_errors"], 0, "{status}");
        assert!(status["fenced"].is_null(), "{status}");
    }

    /// SIGKILL, then start again on the same directory (and the same store).
    fn crash_and_restart(self) -> Daemon {
        self.crash_and_restart_after(|_| {})
    }

    /// Once everything is checkpointed: SIGKILL, delete the whole write buffer, start again.
    /// What the image holds now comes from the object store alone.
    fn lose_the_buffer_and_restart(self) -> Daemon {
        self.wait_checkpointed();
        self.crash_and_restart_after(|dir| {
            let buffer = dir.join("data/buffer");
            assert!(buffer.is_dir(), "{} exists", buffer.display());
            std::fs::remove_dir_all(&buffer).unwrap();
        })
    }

    /// SIGKILL, do `between` to the daemon's directory, start again.
    fn crash_and_restart_after(self, between: impl FnOnce(&std::path::Path)) -> Daemon {
        let Daemon {
            s,
            config,
            store,
            s3,
        } = self;
        let dir = s.crash();
        between(dir.path());
        let s = Strata::start_in(dir, &config, &[]);
        Daemon {
            s,
            config,
            store,
            s3,
        }
    }
}

/// qemu-io reads of what `qemu_io_patterns_zeroes_discard_flush_and_aio` wrote and flushed.
fn assert_qemu_io_patterns(uri: &str) {
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            uri,
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 0xab 128k 128k",
            "-c",
            "read -P 0 256k 256k",
            "-c",
            "read -P 0xab 512k 512k",
            "-c",
            "read -P 0xcd 1M 4k",
            "-c",
            "read -P 0x11 8400000 777",
            "-c",
            "read -P 0x21 2M 64k",
            "-c",
            "read -P 0x22 3M 64k",
            "-c",
            "read -P 0x23 4M 64k",
            "-c",
            "read -P 0x24 5M 64k",
            "-c",
            "read -P 0 6M 1M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("read ")).count(),
        12,
        "every read ran: {out}"
    );
}

fn qemu_io(store: Store) {
    let d = Daemon::start(store);
    common::qemu_io_patterns_zeroes_discard_flush_and_aio(&d.uri());
    assert_qemu_io_patterns(&d.uri());

    // Whatever the checkpointer has done by now, a crash loses nothing that was flushed.
    let d = d.crash_and_restart();
    assert_qemu_io_patterns(&d.uri());
    let d = d.lose_the_buffer_and_restart();
    assert_qemu_io_patterns(&d.uri());
}

fn qemu_img_convert(store: Store) {
    let d = Daemon::start(store);
    common::qemu_img_convert_in_and_out(d.scratch(), &d.uri());
    d.wait_checkpointed();
    // Compare again, now that the image's pages come from segments.
    let src = d.scratch().join("src.raw");
    common::assert_identical(src.to_str().unwrap(), &d.uri());
}

fn nbdinfo_map(store: Store) {
    let d = Daemon::start(store);
    common::nbdinfo_map_shows_the_trimmed_hole(&d.uri());
    // The trim is a tombstone in a segment now, and still a hole.
    d.wait_checkpointed();
    common::assert_map_is_data_hole_data(&d.uri());
    let d = d.lose_the_buffer_and_restart();
    common::assert_map_is_data_hole_data(&d.uri());
}

fn nbdcopy(store: Store) {
    let d = Daemon::start(store);
    let src = d.scratch().join("src.bin");
    random_file(&src, 256 << 20);
    // A second source with different bytes, so the four-connection copy overwrites every page.
    let src2 = d.scratch().join("src2.bin");
    let inverted: Vec<u8> = std::fs::read(&src).unwrap().iter().map(|b| !b).collect();
    std::fs::write(&src2, inverted).unwrap();
    let back = d.scratch().join("back.bin");
    common::nbdcopy_in_and_out(&src, &back, &d.uri(), 1);
    common::nbdcopy_in_and_out(&src2, &back, &d.uri(), 4);
    // nbdcopy does not flush by default: a flush on a new connection covers the writes every
    // connection completed (the export offers multi-conn).
    run("qemu-io", &["-f", "raw", &d.uri(), "-c", "flush"]);

    let assert_copy_out = |d: &Daemon, when: &str| {
        let _ = std::fs::remove_file(&back);
        run(
            "nbdcopy",
            &["--connections=4", &d.uri(), back.to_str().unwrap()],
        );
        let want = std::fs::read(&src2).unwrap();
        let got = std::fs::read(&back).unwrap();
        assert_eq!(got.len(), 1 << 30, "{when}: the whole export");
        assert!(
            got[..want.len()] == want[..],
            "{when}: {:?} store: the image no longer holds what the four connections wrote",
            d.store
        );
        assert!(
            got[want.len()..].iter().all(|&x| x == 0),
            "{when}: the rest is zeroes"
        );
        std::fs::remove_file(&back).unwrap();
    };
    let d = d.crash_and_restart();
    assert_copy_out(&d, "after a crash");
    let d = d.lose_the_buffer_and_restart();
    assert_copy_out(&d, "from the object store alone");
}

fn fio(store: Store) {
    let d = Daemon::start(store);
    common::fio_randwrite_verify_crc32c_qd32(&d.uri());
    let d = d.lose_the_buffer_and_restart();
    // The same job again, verifying only: every block's checksum, now read from segments.
    let fields = common::fio_verify_job(&d.uri(), "--verify_only");
    // Terse v3: field 6 is the KiB read; all 64 MiB were read and checked.
    assert_eq!(fields[5], "65536", "fio verified everything: {fields:?}");
}

/// ext4 on a loop device in direct-I/O mode over nbdfuse: the file system's own 512-byte
/// aligned requests reach the image uncached.
fn ext4(store: Store) {
    let d = Daemon::start(store);
    common::ext4_through_nbdfuse_and_a_direct_io_loop_device(d.scratch(), &d.uri());
    d.wait_checkpointed();
}

#[test]
fn qemu_io_on_a_directory_store() {
    qemu_io(Store::Dir);
}

#[test]
fn qemu_io_on_s3() {
    qemu_io(Store::S3);
}

#[test]
fn qemu_img_convert_on_a_directory_store() {
    qemu_img_convert(Store::Dir);
}

#[test]
fn qemu_img_convert_on_s3() {
    qemu_img_convert(Store::S3);
}

#[test]
fn nbdinfo_map_on_a_directory_store() {
    nbdinfo_map(Store::Dir);
}

#[test]
fn nbdinfo_map_on_s3() {
    nbdinfo_map(Store::S3);
}

#[test]
fn nbdcopy_256m_with_one_and_four_connections_on_a_directory_store() {
    nbdcopy(Store::Dir);
}

#[test]
fn nbdcopy_256m_with_one_and_four_connections_on_s3() {
    nbdcopy(Store::S3);
}

#[test]
fn fio_randwrite_verify_crc32c_qd32_on_a_directory_store() {
    fio(Store::Dir);
}

#[test]
fn fio_randwrite_verify_crc32c_qd32_on_s3() {
    fio(Store::S3);
}

#[test]
fn ext4_through_nbdfuse_on_a_directory_store() {
    ext4(Store::Dir);
}

#[test]
fn ext4_through_nbdfuse_on_s3() {
    ext4(Store::S3);
}

/// fio's nbd engine writing 512-byte blocks at random (each a part of a 4 KiB page, merged into
/// it by the server), verified with crc32c, then verified again from the object store alone.
fn fio_512(store: Store) {
    let d = Daemon::start(store);
    common::fio_verify(&d.uri(), "--do_verify=1", "512", "8M");
    run("qemu-io", &["-f", "raw", &d.uri(), "-c", "flush"]);
    let d = d.lose_the_buffer_and_restart();
    let fields = common::fio_verify(&d.uri(), "--verify_only", "512", "8M");
    // Terse v3: field 6 is the KiB read; all 8 MiB were read and checked.
    assert_eq!(fields[5], "8192", "fio verified everything: {fields:?}");
}

/// qemu-io writing single 512-byte sectors at odd sector numbers — parts of pages, some pages
/// written in several parts — reads them back exactly, after a crash, and from the object
/// store alone.
fn qemu_io_odd_sectors(store: Store) {
    // (sector, pattern): neighbours in one page, both ends of a page, across pages.
    const SECTORS: [(u64, u8); 8] = [
        (1, 0x31),
        (3, 0x33),
        (7, 0x37),
        (8, 0x38),
        (9, 0x39),
        (4095, 0x3f),
        (4097, 0x41),
        (2_000_001, 0x51),
    ];
    let d = Daemon::start(store);
    let mut cmds: Vec<String> = SECTORS
        .iter()
        .map(|(s, p)| format!("write -P {p:#x} {} 512", s * 512))
        .collect();
    cmds.push("flush".into());
    let args: Vec<&str> = cmds.iter().flat_map(|c| ["-c", c.as_str()]).collect();
    run("qemu-io", &[&["-f", "raw", &d.uri()][..], &args].concat());
    let check = |d: &Daemon, when: &str| {
        let mut reads: Vec<String> = SECTORS
            .iter()
            .map(|(s, p)| format!("read -P {p:#x} {} 512", s * 512))
            .collect();
        // The sectors between them were never written.
        reads.push("read -P 0 0 512".into());
        reads.push("read -P 0 1024 512".into());
        reads.push(format!("read -P 0 {} 1024", 4 * 512));
        reads.push(format!("read -P 0 {} 512", 4096 * 512));
        let args: Vec<&str> = reads.iter().flat_map(|c| ["-c", c.as_str()]).collect();
        let out = run(
            "qemu-io",
            &[&["-f", "raw", "-r", &d.uri()][..], &args].concat(),
        );
        assert!(
            !out.contains("Pattern verification failed"),
            "{when}: {:?} store: {out}",
            d.store
        );
        assert_eq!(
            out.lines().filter(|l| l.starts_with("read ")).count(),
            reads.len(),
            "{when}: every read ran: {out}"
        );
    };
    check(&d, "as written");
    let d = d.crash_and_restart();
    check(&d, "after a crash");
    let d = d.lose_the_buffer_and_restart();
    check(&d, "from the object store alone");
}

#[test]
fn fio_512_byte_randwrite_verify_crc32c_on_a_directory_store() {
    fio_512(Store::Dir);
}

#[test]
fn fio_512_byte_randwrite_verify_crc32c_on_s3() {
    fio_512(Store::S3);
}

#[test]
fn qemu_io_512_byte_writes_at_odd_sectors_on_a_directory_store() {
    qemu_io_odd_sectors(Store::Dir);
}

#[test]
fn qemu_io_512_byte_writes_at_odd_sectors_on_s3() {
    qemu_io_odd_sectors(Store::S3);
}
