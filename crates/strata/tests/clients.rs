//! Real NBD clients against `strata serve`: qemu-io, qemu-img, nbdinfo, nbdcopy, fio, and a
//! real ext4 filesystem through nbdfuse and a loop device.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

mod common;

use common::{random_file, run, run_raw, Strata, CONFIG};

#[test]
fn qemu_io_patterns_zeroes_discard_flush_and_aio() {
    let s = Strata::start(CONFIG);
    let uri = s.uri("disk");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1M 4k",
            "-c",
            "write -P 0x11 8400000 777",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 4k",
            "-c",
            "read -P 0x11 8400000 777",
            "-c",
            "write -z 64k 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 0xab 128k 64k",
            "-c",
            "discard 256k 256k",
            "-c",
            "read -P 0 256k 256k",
            "-c",
            "aio_write -P 0x21 2M 64k",
            "-c",
            "aio_write -P 0x22 3M 64k",
            "-c",
            "aio_write -P 0x23 4M 64k",
            "-c",
            "aio_write -P 0x24 5M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x21 2M 64k",
            "-c",
            "read -P 0x24 5M 64k",
            "-c",
            "write -P 0x55 1020M 4M",
            "-c",
            "read -P 0x55 1020M 4M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("read ")).count(),
        9,
        "every read ran: {out}"
    );

    // Data is still there on a new connection.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            &uri,
            "-c",
            "read -P 0xcd 1M 4k",
            "-c",
            "read -P 0x22 3M 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // Out of range is an error the client sees, not a crash.
    let out = run_raw("qemu-io", &["-f", "raw", &uri, "-c", "write -P 1 1024M 4k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("error") || text.contains("Input/output") || text.contains("out of"),
        "{text}"
    );
}

#[test]
fn qemu_img_convert_in_and_out_is_identical() {
    let s = Strata::start(CONFIG);
    let src = s.path("src.raw");
    random_file(&src, 64 << 20);
    let uri = s.uri("disk");
    let src_s = src.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    let back = s.path("back.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            back.to_str().unwrap(),
        ],
    );
    // The export is 1 GiB; the first 64 MiB are the source.
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert!(out.contains("identical"), "{out}");
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            back.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn nbdinfo_list_map_can_and_is() {
    let s = Strata::start(CONFIG);
    let list = run("nbdinfo", &["--list", &s.uri("")]);
    for (name, description) in [
        ("disk", "thin file volume"),
        ("ro", "read-only volume"),
        ("scratch", "memory volume"),
    ] {
        assert!(
            list.contains(&format!("export=\"{name}\""))
                || list.contains(&format!("export=\"{name}\":")),
            "{list}"
        );
        assert!(
            list.contains(description),
            "{name}: {description} missing from {list}"
        );
    }

    // --map: write, trim, and the trimmed range is a hole.
    let uri = s.uri("disk");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 1 0 4M",
            "-c",
            "discard 1M 1M",
        ],
    );
    let map = run("nbdinfo", &["--map", &uri]);
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // Columns: offset length type description.
    let find = |off: u64| {
        lines
            .iter()
            .find(|c| c[0].parse::<u64>().ok() == Some(off))
            .cloned()
    };
    let first = find(0).unwrap_or_else(|| panic!("{map}"));
    assert_eq!(first[1], "1048576", "{map}");
    assert_eq!(first[2], "0", "data first: {map}");
    let hole = find(1 << 20).unwrap_or_else(|| panic!("{map}"));
    assert_eq!(
        hole[2], "3",
        "the trimmed megabyte is a hole that reads as zeroes: {map}"
    );
    assert_eq!(hole[1], "1048576", "{map}");
    assert_eq!(
        find(2 << 20).unwrap_or_else(|| panic!("{map}"))[2],
        "0",
        "{map}"
    );

    // Every --can flag: what the export advertises is true, the rest false.
    let can = |flag: &str, uri: &str| -> bool {
        let out = run_raw("nbdinfo", &["--can", flag, uri]);
        match out.status.code() {
            Some(0) => true,
            Some(2) => false,
            _ => panic!(
                "nbdinfo --can {flag}: {:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    };
    for (flag, want) in [
        ("connect", true),
        ("read", true),
        ("write", true),
        ("flush", true),
        ("fua", true),
        ("trim", true),
        ("zero", true),
        ("fast-zero", true),
        ("cache", true),
        ("df", true),
        ("multi-conn", true),
        ("structured-reply", true),
    ] {
        assert_eq!(
            can(flag, &uri),
            want,
            "--can {flag} on a writable file volume"
        );
    }
    let ro = s.uri("ro");
    for (flag, want) in [
        ("read", true),
        ("write", false),
        ("trim", false),
        ("zero", false),
        ("fast-zero", false),
        ("flush", true),
    ] {
        assert_eq!(can(flag, &ro), want, "--can {flag} on a read-only volume");
    }
    assert!(run_raw("nbdinfo", &["--is", "read-only", &ro])
        .status
        .success());
    assert_eq!(
        run_raw("nbdinfo", &["--is", "read-only", &uri])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run_raw("nbdinfo", &["--is", "rotational", &uri])
            .status
            .code(),
        Some(2)
    );

    // Writes to the read-only export are refused with EPERM and leave it intact.
    let out = run_raw("qemu-io", &["-f", "raw", &ro, "-c", "write -P 7 0 4k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ermission") || text.contains("read-only") || text.contains("Read-only"),
        "{text}"
    );
    let out = run("qemu-io", &["-f", "raw", "-r", &ro, "-c", "read -P 0 0 4k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn nbdcopy_256m_in_and_out_with_one_and_four_connections() {
    let s = Strata::start(CONFIG);
    let src = s.path("src.bin");
    random_file(&src, 256 << 20);
    for (export, conns) in [("disk", "1"), ("disk", "4"), ("scratch", "4")] {
        let uri = s.uri(export);
        let connections = format!("--connections={conns}");
        run("nbdcopy", &[&connections, src.to_str().unwrap(), &uri]);
        let back = s.path("back.bin");
        let _ = std::fs::remove_file(&back);
        // Copy out exactly the first 256 MiB through a qemu-nbd-free path: nbdcopy to a file, then cut.
        run("nbdcopy", &[&connections, &uri, back.to_str().unwrap()]);
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&back).unwrap();
        assert!(b.len() >= a.len(), "{export}: copied out {} bytes", b.len());
        assert!(
            a[..] == b[..a.len()],
            "{export} with {conns} connections: data differs"
        );
        assert!(
            b[a.len()..].iter().all(|&x| x == 0),
            "{export}: the rest of the export is zeroes"
        );
        std::fs::remove_file(&back).unwrap();
    }
    assert!(s.log().contains("connected") || !s.log().is_empty());
}

#[test]
fn fio_randwrite_verify_crc32c_qd32() {
    let s = Strata::start(CONFIG);
    for export in ["disk", "scratch"] {
        let uri = s.uri(export);
        let out = run(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--size=64M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",
                "--output-format=terse",
                "--terse-version=3",
            ],
        );
        // Terse v3: field 5 is the error count.
        let fields: Vec<&str> = out.lines().last().unwrap_or("").split(';').collect();
        assert!(fields.len() > 5, "{out}");
        assert_eq!(fields[4], "0", "fio reported errors on {export}: {out}");
    }
}

#[test]
fn ext4_through_nbdfuse_and_a_loop_device() {
    let s = Strata::start(CONFIG);
    let mnt_fuse = s.path("fuse");
    let mnt_fs = s.path("fs");
    std::fs::create_dir_all(&mnt_fuse).unwrap();
    std::fs::create_dir_all(&mnt_fs).unwrap();
    let fuse = mnt_fuse.to_str().unwrap().to_string();
    let fs = mnt_fs.to_str().unwrap().to_string();
    let uri = s.uri("disk");

    // nbdfuse stays in the foreground with -f; run it as a child and wait for the file to appear.
    common::require("nbdfuse");
    let mut nbdfuse = std::process::Command::new("nbdfuse")
        .args([&fuse, &uri])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start nbdfuse");
    let image = mnt_fuse.join("nbd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse did not expose {}",
            image.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    struct Cleanup<'a> {
        fs: &'a str,
        fuse: &'a str,
        loopdev: Option<String>,
    }
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.fs).status();
            if let Some(l) = &self.loopdev {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", l])
                    .status();
            }
            let _ = std::process::Command::new("fusermount3")
                .args(["-u", self.fuse])
                .status();
        }
    }
    let mut cleanup = Cleanup {
        fs: &fs,
        fuse: &fuse,
        loopdev: None,
    };
    let loopdev = run("losetup", &["--find", "--show", image.to_str().unwrap()])
        .trim()
        .to_string();
    cleanup.loopdev = Some(loopdev.clone());
    run("mkfs.ext4", &["-q", "-F", &loopdev]);
    run("mount", &[&loopdev, &fs]);
    let mut files = Vec::new();
    for i in 0..8 {
        let p = mnt_fs.join(format!("file{i}"));
        random_file(&p, (i + 1) * 1_000_003);
        files.push((p.clone(), std::fs::read(&p).unwrap()));
    }
    run("sync", &[]);
    run("umount", &[&fs]);
    let fsck = run_raw("e2fsck", &["-f", "-n", &loopdev]);
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    run("mount", &[&loopdev, &fs]);
    for (p, data) in &files {
        assert!(
            std::fs::read(p).unwrap() == *data,
            "{} reads back identical after remount",
            p.display()
        );
    }
    drop(cleanup);
    let _ = nbdfuse.wait();
}

#[test]
fn example_program_writes_and_reads_through_the_library() {
    let bin = std::path::Path::new(common::strata_bin())
        .parent()
        .unwrap()
        .join("examples/write_read");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds the examples",
        bin.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let file_uri = format!("file://{}/ex.img?size=64M", dir.path().display());
    for uri in [file_uri.as_str(), "mem://ex?size=8M"] {
        let out = std::process::Command::new(&bin).arg(uri).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{uri}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("identical"), "{text}");
    }
    // And through NBD against a running server.
    let s = Strata::start(CONFIG);
    let out = std::process::Command::new(&bin)
        .arg(s.uri("scratch"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            &s.uri("scratch"),
            "-c",
            "read -v 536866816 16",
        ],
    );
    assert!(
        out.contains("00 01 02 03 04 05 06 07"),
        "the example's pattern is visible to qemu-io: {out}"
    );
    // A bad URI is a clear error, not a panic.
    let out = std::process::Command::new(&bin)
        .arg("file:///x?sise=1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown option"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
