//! Real NBD clients against `strata serve`: qemu-io, qemu-img, nbdinfo, nbdcopy, fio, and a
//! real ext4 filesystem through nbdfuse and a loop device.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

mod common;

use common::{random_file, run, run_raw, Strata, CONFIG};

#[test]
fn qemu_io_patterns_zeroes_discard_flush_and_aio() {
    let s = Strata::start(CONFIG);
    common::qemu_io_patterns_zeroes_discard_flush_and_aio(&s.uri("disk"));
}

#[test]
fn qemu_img_convert_in_and_out_is_identical() {
    let s = Strata::start(CONFIG);
    common::qemu_img_convert_in_and_out(s.dir.path(), &s.uri("disk"));
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
    common::nbdinfo_map_shows_the_trimmed_hole(&uri);

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
    for (export, conns) in [("disk", 1), ("disk", 4), ("scratch", 4)] {
        common::nbdcopy_in_and_out(&src, &s.path("back.bin"), &s.uri(export), conns);
    }
    // nbdcopy used four connections on scratch (the export offers multi-conn): each
    // negotiated its own transmission.
    let log = s.log();
    let scratch = log
        .lines()
        .filter(|l| l.contains("transmission") && l.contains("export=scratch"))
        .count();
    assert!(
        scratch >= 4,
        "{scratch} connections reached scratch:\n{log}"
    );
}

#[test]
fn fio_randwrite_verify_crc32c_qd32() {
    let s = Strata::start(CONFIG);
    for export in ["disk", "scratch"] {
        common::fio_randwrite_verify_crc32c_qd32(&s.uri(export));
    }
}

#[test]
fn ext4_through_nbdfuse_and_a_loop_device() {
    let s = Strata::start(CONFIG);
    common::ext4_through_nbdfuse_and_a_loop_device(s.dir.path(), &s.uri("disk"));
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
