//! Nexus volumes end to end: `strata serve` mirroring over a file, a memory device and a real
//! remote NBD peer (nbdkit), driven by fio and qemu-io, managed with the `strata` CLI.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, require, run, strata_bin, Strata};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// An nbdkit serving a file on a TCP port; killed when dropped.
struct Nbdkit {
    child: Child,
}

impl Nbdkit {
    /// Serve `file` on `port`; returns once nbdkit accepts connections (it writes its pid file
    /// only then).
    fn start(file: &Path, port: u16) -> Nbdkit {
        require("nbdkit");
        let pidfile = file.with_extension(format!("{port}.pid"));
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("-P")
            .arg(&pidfile)
            .arg("file")
            .arg(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        wait_for("nbdkit to listen", || pidfile.exists());
        Nbdkit { child }
    }

    /// SIGKILL: the peer dies without a word.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `cond` until it holds (two minutes at most).
fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    common::wait_until(what, Duration::from_secs(120), cond);
}

/// `strata --endpoint … ARGS`, which must succeed; returns stdout.
fn cli(s: &Strata, args: &[&str]) -> String {
    s.cli(args)
}

fn cli_raw(s: &Strata, args: &[&str]) -> std::process::Output {
    s.cli_raw(args)
}

/// The replicas of `volume` as `strata status --json` reports them.
fn replicas(s: &Strata, volume: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&cli(s, &["status", volume, "--json"])).unwrap();
    v[0]["children"].as_array().unwrap().clone()
}

fn wait_all_online(s: &Strata, volume: &str) {
    wait_for("every replica online", || {
        replicas(s, volume).iter().all(|c| c["state"] == "online")
    });
}

/// `cmp` two files (or fail showing where they differ).
fn same_bytes(a: &Path, b: &Path) {
    run("cmp", &[a.to_str().unwrap(), b.to_str().unwrap()]);
}

/// fio's nbd engine, 4 KiB random writes at queue depth 32 with crc32c verification.
fn fio_args(uri: &str, size: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--name=mirror",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--output-format=json",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.push(format!("--uri={uri}"));
    args.push(format!("--size={size}"));
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn spawn_fio(args: &[String]) -> Child {
    require("fio");
    Command::new("fio")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Wait for fio and require a clean run: exit 0, no I/O or verify error.
fn fio_clean(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The nbd engine prints a line before the JSON.
    let json = &stdout[stdout.find('{').expect("fio printed JSON")..];
    let v: Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["jobs"][0]["error"], 0, "fio reported an error: {json}");
    v
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks()).unwrap_or(0)
}

#[test]
fn fio_survives_a_dying_remote_replica_whose_return_copies_only_what_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let kit_file = dir.path().join("remote.img");
    std::fs::File::create(&kit_file)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let port = free_port();
    let kit = Nbdkit::start(&kit_file, port);
    let config = format!(
        r#"
data_dir = "{{dir}}/data"
[nbd]
listen = ["127.0.0.1:0"]
[[volume]]
name = "m"
replicas = ["file://{{data_dir}}/local.img?size=256M", "mem://m1?size=256M", "nbd://127.0.0.1:{port}/"]
dirty_granularity = "1M"
[[volume]]
name = "m1"
uri = "mem://m1?size=256M"
"#
    );
    let s = Strata::start(&config);
    wait_all_online(&s, "m");
    let local = s.path("data/local.img");
    let uri = s.uri("m");

    // 8192 random 4 KiB writes over the first 32 MiB (32 granules), paced so that most of them
    // come after the remote replica dies, then fio reads everything back and checks it.
    let fio = fio_args(&uri, "32M", &["--rate_iops=4000"]);
    let running = spawn_fio(&fio);
    let before = allocated(&kit_file);
    wait_for("fio's first writes to reach nbdkit", || {
        allocated(&kit_file) > before
    });
    kit.kill();
    fio_clean(running);

    let c = replicas(&s, "m");
    assert_eq!(c[2]["state"], "faulted", "{c:?}");
    assert!(
        c[2]["reason"].as_str().unwrap().contains("connection"),
        "{c:?}"
    );
    assert_eq!(c[0]["state"], "online");
    assert_eq!(c[1]["state"], "online");
    let status = cli(&s, &["status", "m"]);
    assert!(status.contains("DEGRADED"), "{status}");
    // Two more regions missed, at known places: 200 MiB (twice, one granule) and 250 MiB.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x61 200M 4k",
            "-c",
            "write -P 0x62 209780736 4k",
            "-c",
            "write -P 0x63 250M 4k",
            &uri,
        ],
    );
    // Every one of the 32 granules fio wrote after the kill, and the two above.
    let missed = 34 * MIB;
    assert_eq!(replicas(&s, "m")[2]["dirty_bytes"], missed);

    // The peer comes back on the same file; onlining reconnects and copies only what it missed.
    let _kit = Nbdkit::start(&kit_file, port);
    let out = cli(&s, &["child", "online", "m", "2", "--wait"]);
    assert!(out.contains("partial rebuild of 34.0 MiB started"), "{out}");
    assert!(out.contains("partial completed"), "{out}");
    let c = replicas(&s, "m");
    assert_eq!(c[2]["state"], "online", "{c:?}");
    let r = &c[2]["rebuild"];
    assert_eq!(r["kind"], "partial");
    assert_eq!(r["total_bytes"], missed);
    assert_eq!(
        r["copied_bytes"].as_u64().unwrap() + r["zeroed_bytes"].as_u64().unwrap(),
        missed
    );

    // The three replicas are byte-identical.
    let m1 = s.path("m1.img");
    run("nbdcopy", &[&s.uri("m1"), m1.to_str().unwrap()]);
    same_bytes(&local, &kit_file);
    same_bytes(&local, &m1);

    // fio's verify pass, served by the rebuilt replica alone.
    cli(&s, &["child", "offline", "m", "0"]);
    cli(&s, &["child", "offline", "m", "1"]);
    let mut verify = fio.clone();
    verify.push("--verify_only".into());
    fio_clean(spawn_fio(&verify));
    cli(&s, &["child", "online", "m", "0", "--wait"]);
    cli(&s, &["child", "online", "m", "1", "--wait"]);
    wait_all_online(&s, "m");
}

#[test]
fn a_new_replica_is_fully_rebuilt_while_fio_writes() {
    let config = r#"
data_dir = "{dir}/data"
[nbd]
listen = ["127.0.0.1:0"]
[[volume]]
name = "m"
replicas = ["file://{data_dir}/a.img?size=128M", "file://{data_dir}/b.img?size=128M"]
"#;
    let s = Strata::start(config);
    wait_all_online(&s, "m");
    let (a, b, c) = (
        s.path("data/a.img"),
        s.path("data/b.img"),
        s.path("data/c.img"),
    );
    // 32768 writes over the whole volume, paced to last several seconds.
    let mut fio = spawn_fio(&fio_args(&s.uri("m"), "128M", &["--rate_iops=6000"]));
    wait_for("fio's first writes", || allocated(&a) > 0);
    let new = format!("file://{}?size=128M", c.display());
    let out = cli(&s, &["child", "add", "m", &new]);
    assert!(out.contains("full rebuild of 128.0 MiB started"), "{out}");
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the rebuild started; the test proves nothing"
    );
    let out = cli(&s, &["rebuild", "watch", "m", "2"]);
    assert!(out.contains("full completed"), "{out}");
    fio_clean(fio);
    let c2 = &replicas(&s, "m")[2];
    assert_eq!(c2["state"], "online");
    let r = &c2["rebuild"];
    assert_eq!(
        r["copied_bytes"].as_u64().unwrap() + r["zeroed_bytes"].as_u64().unwrap(),
        128 * MIB
    );
    same_bytes(&a, &b);
    same_bytes(&a, &c);
}

#[test]
fn a_replica_faulted_before_a_crash_stays_out_and_heals_partially() {
    let config = r#"
data_dir = "{dir}/data"
[nbd]
listen = ["127.0.0.1:0"]
[[volume]]
name = "m"
replicas = ["file://{data_dir}/a.img?size=64M", "file://{data_dir}/b.img?size=64M"]
"#;
    let s = Strata::start(config);
    wait_all_online(&s, "m");
    let uri = s.uri("m");
    run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 64M", &uri]);
    let out = cli(&s, &["child", "fault", "m", "1", "--reason", "disk swap"]);
    assert!(out.contains("is faulted"), "{out}");
    // Missed by b: granules 1 and 10 (two writes land in 10).
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 2 1M 4k",
            "-c",
            "write -P 2 10M 8k",
            "-c",
            "write -P 2 11010048 4k",
            &uri,
        ],
    );
    // A crash: no shutdown, no flush. What was acknowledged is recorded.
    let s = Strata::start_in(s.crash(), config, &[]);
    let c = replicas(&s, "m");
    assert_eq!(c[1]["state"], "faulted", "{c:?}");
    assert_eq!(c[1]["reason"], "disk swap");
    assert_eq!(c[1]["dirty_bytes"], 2 * MIB);
    // Never read from b: with two readable replicas, reads alternate; every one sees the new data.
    let uri = s.uri("m");
    let mut args = vec!["-f", "raw"];
    for _ in 0..16 {
        args.extend(["-c", "read -P 2 1M 4k", "-c", "read -P 2 11010048 4k"]);
    }
    args.push(&uri);
    let out = run("qemu-io", &args);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let out = cli(&s, &["child", "online", "m", "1", "--wait"]);
    assert!(out.contains("partial rebuild of 2.0 MiB started"), "{out}");
    let r = &replicas(&s, "m")[1]["rebuild"];
    assert_eq!(r["total_bytes"], 2 * MIB);
    same_bytes(&s.path("data/a.img"), &s.path("data/b.img"));
}

#[test]
fn control_mistakes_get_clear_errors() {
    let config = r#"
data_dir = "{dir}/data"
[nbd]
listen = ["127.0.0.1:0"]
[[volume]]
name = "m"
replicas = ["mem://ca?size=16M", "mem://cb?size=16M"]
[[volume]]
name = "plain"
uri = "mem://cp?size=16M"
"#;
    let s = Strata::start(config);
    wait_all_online(&s, "m");
    let err = |args: &[&str]| {
        let out = cli_raw(&s, args);
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(&["child", "online", "m", "7"]);
    assert!(
        e.contains("has no replica \"7\"") && e.contains("#1 mem://cb"),
        "{e}"
    );
    let e = err(&["child", "offline", "nope", "0"]);
    assert!(e.contains("no volume \"nope\""), "{e}");
    let e = err(&["child", "offline", "plain", "0"]);
    assert!(e.contains("not a nexus"), "{e}");
    cli(&s, &["child", "offline", "m", "0"]);
    let e = err(&["child", "offline", "m", "1"]);
    assert!(e.contains("last healthy child"), "{e}");
    let e = err(&["child", "add", "m", "mem://small?size=1M"]);
    assert!(e.contains("does not fit"), "{e}");
    let e = err(&["child", "add", "m", "bogus://x"]);
    assert!(e.contains("bogus"), "{e}");
    let e = err(&["rebuild", "pause", "m", "1"]);
    assert!(e.contains("has no rebuild running"), "{e}");
    // Garbage on the API socket costs that connection only.
    let api = s.api_endpoint();
    let mut sock =
        std::os::unix::net::UnixStream::connect(api.trim_start_matches("unix://")).unwrap();
    use std::io::{Read, Write};
    sock.write_all(b"{\"op\":\"explode\"}\n\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = sock.read_to_end(&mut answer);
    cli(&s, &["child", "online", "m", "0", "--wait"]);
    let (status, _) = s.stop();
    assert!(status.success());
    // No daemon: say where the CLI looked and what to do.
    let out = Command::new(strata_bin())
        .args(["--endpoint", "unix:///nonexistent/api.sock", "status"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("is `strata serve` running?"),
        "{e}"
    );
}

#[test]
fn the_library_example_mirrors_over_file_memory_and_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote.img");
    std::fs::File::create(&remote)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let port = free_port();
    let _kit = Nbdkit::start(&remote, port);
    let example = Path::new(strata_bin())
        .parent()
        .unwrap()
        .join("examples/nexus");
    assert!(
        example.exists(),
        "{} is missing: `cargo test` builds the examples",
        example.display()
    );
    let local = dir.path().join("local.img");
    let out = Command::new(&example)
        .arg(format!("file://{}?size=64M", local.display()))
        .arg("mem://ex?size=64M")
        .arg(format!("nbd://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("read back 1048576 bytes through the nexus: identical"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("holds the same 1048576 bytes").count(),
        3,
        "{stdout}"
    );
    // The remote replica holds it too, as nbdkit serves it.
    let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let written = std::fs::read(&remote).unwrap();
    assert_eq!(&written[..MIB as usize], &pattern[..]);
}

#[test]
fn fio_survives_a_dying_nvmf_replica_served_by_another_strata_and_it_is_rebuilt() {
    // The remote: another daemon exporting a file volume over NVMe/TCP only, on a fixed port
    // so that it comes back where the nexus looks for it.
    let port = free_port();
    let remote_config = format!(
        r#"
data_dir = "{{dir}}/data"
[nbd]
listen = ["127.0.0.1:0"]
[nvmf]
listen = ["127.0.0.1:{port}"]
[[volume]]
name = "r"
uri = "file://{{data_dir}}/r.img?size=128M"
exports = ["nvmf"]
"#
    );
    let remote = Strata::start(&remote_config);
    let child =
        format!("nvmf://127.0.0.1:{port}/nqn.2026-12.io.strata:r?reconnect_timeout=2&timeout=10");
    let config = format!(
        r#"
data_dir = "{{dir}}/data"
[nbd]
listen = ["127.0.0.1:0"]
[[volume]]
name = "m"
replicas = ["file://{{data_dir}}/local.img?size=128M", "{child}"]
"#
    );
    let s = Strata::start(&config);
    wait_all_online(&s, "m");
    let remote_file = remote.path("data/r.img");
    let fio = fio_args(&s.uri("m"), "32M", &["--rate_iops=4000"]);
    let running = spawn_fio(&fio);
    let before = allocated(&remote_file);
    wait_for("fio's first writes to reach the remote daemon", || {
        allocated(&remote_file) > before
    });
    let remote_dir = remote.crash();
    fio_clean(running);
    let c = replicas(&s, "m");
    assert_eq!(c[1]["state"], "faulted", "{c:?}");
    assert_eq!(c[0]["state"], "online", "{c:?}");

    // The remote daemon returns on the same data; the replica is rebuilt from what it missed.
    let remote = Strata::start_in(remote_dir, &remote_config, &[]);
    let out = cli(&s, &["child", "online", "m", "1", "--wait"]);
    assert!(out.contains("completed"), "{out}");
    wait_all_online(&s, "m");
    same_bytes(&s.path("data/local.img"), &remote.path("data/r.img"));
    // And fio's data reads back through the rebuilt replica alone.
    cli(&s, &["child", "offline", "m", "0"]);
    let mut verify = fio.clone();
    verify.push("--verify_only".into());
    fio_clean(spawn_fio(&verify));
}
