//! `strata serve` itself: the embedded default, config errors, unix sockets, systemd socket
//! activation, TLS, and clean shutdown on SIGTERM/SIGINT.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{free_port, run, run_raw, strata_bin, Strata, CONFIG};

#[test]
fn embedded_default_has_a_thin_1g_demo_volume_and_prints_how_to_connect() {
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(strata_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--nvmf-listen",
            "127.0.0.1:0",
        ])
        .env("STRATA_DATA_DIR", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        lines.push(line);
    }
    let text = lines.join("\n");
    assert!(text.contains("volume demo: 1073741824 bytes"), "{text}");
    assert!(text.contains("nbdinfo nbd://127.0.0.1:"), "{text}");
    assert!(text.contains("qemu-io"), "{text}");
    assert!(text.contains("nbd-client"), "{text}");
    assert!(
        text.contains("nvme connect -t tcp -a 127.0.0.1 -s ")
            && text.contains("-n nqn.2026-12.io.strata:demo"),
        "{text}"
    );
    let socket = home.path().join("vhost-user/demo.sock");
    assert!(
        text.contains(&format!("path={}", socket.display())),
        "{text}"
    );
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "vhost-user socket mode"
    );
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("listening: nbd://"))
        .unwrap()
        .to_string();
    let info = run("nbdinfo", &[&format!("nbd://{addr}/demo")]);
    assert!(info.contains("export-size: 1073741824"), "{info}");
    // Thin: a page-store image that was never written is one small manifest, and its
    // write buffer holds nothing.
    let objects: u64 = walk(&home.path().join("objects"));
    assert!(objects < 4096, "{objects} bytes of objects");
    assert!(home.path().join("objects/images/demo/manifest").is_dir());
    assert!(walk(&home.path().join("buffer")) < 4096);
    // The empty export name selects the demo volume.
    let info = run("nbdinfo", &[&format!("nbd://{addr}")]);
    assert!(info.contains("export-size: 1073741824"), "{info}");
    common::signal(child.id(), libc::SIGINT);
    assert!(child.wait().unwrap().success(), "SIGINT exits cleanly");
}

#[test]
fn config_mistakes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[volume]]\nname = \"a\"\nurl = \"mem://a?size=1M\"\n", "unknown field `url`"),
        ("[[volume]]\nname = \"a\"\nuri = \"mem://a?size=1M&colour=blue\"\n", "unknown option \"colour\""),
        ("[[volume]]\nname = \"a\"\nuri = \"bogus://a\"\n", "unknown scheme"),
        ("[[volume]]\nname = \"a\"\nuri = \"mem://a?size=1M\"\n[[volume]]\nname = \"a\"\nuri = \"mem://b?size=1M\"\n", "declared twice"),
        ("[nbd]\nlisten = [\"not-an-address\"]\n[[volume]]\nname = \"a\"\nuri = \"mem://a?size=1M\"\n", "listen on not-an-address"),
    ];
    for (i, (config, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, config).unwrap();
        let out = Command::new(strata_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{config}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want),
            "config {config:?}: expected {want:?} in {err}"
        );
    }
    let out = Command::new(strata_bin())
        .args(["serve", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("read config file /nonexistent.toml"));
}

#[test]
fn unix_socket_listener_serves_nbd_unix_uris() {
    let s = Strata::start(CONFIG);
    let sock = &s.sockets[0];
    let uri = format!("nbd+unix:///scratch?socket={}", sock.display());
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x42 0 64k",
            "-c",
            "read -P 0x42 0 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let out = run(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    assert!(out.contains("scratch"), "{out}");
}

#[test]
fn systemd_socket_activation_through_libnbd() {
    // nbdinfo starts the server itself, passing a listening socket with LISTEN_FDS, as systemd does.
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace("{dir}", &dir.path().to_string_lossy());
    let path = dir.path().join("strata.toml");
    std::fs::write(&path, config).unwrap();
    let out = run(
        "nbdinfo",
        &[
            "--list",
            "--",
            "[",
            strata_bin(),
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--nvmf-listen",
            "127.0.0.1:0",
            "]",
        ],
    );
    for name in ["disk", "ro", "scratch"] {
        assert!(out.contains(&format!("export=\"{name}\"")), "{out}");
    }
    // And with systemd's own tool, over TCP.
    common::require("systemd-socket-activate");
    let port = free_port();
    let mut child = Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.1:{port}"),
            strata_bin(),
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--nvmf-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It says when it listens; the first connection then starts the server with the socket.
    use std::io::BufRead;
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("Listening on") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "systemd-socket-activate exited"
        );
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let info = run("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/scratch")]);
    assert!(info.contains("export-size: 536870912"), "{info}");
    let _ = child.kill();
    let _ = child.wait();
}

fn make_certs(dir: &Path) {
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=Strata test CA",
            "-keyout",
            &d("ca-key.pem"),
            "-out",
            &d("ca-cert.pem"),
        ],
    );
    run(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &d("server-key.pem"),
            "-out",
            &d("server.csr"),
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &d("server.csr"),
            "-CA",
            &d("ca-cert.pem"),
            "-CAkey",
            &d("ca-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &d("ext.cnf"),
            "-out",
            &d("server-cert.pem"),
        ],
    );
    // The client side needs only the CA (libnbd and qemu look for ca-cert.pem in the directory).
    let client = dir.join("client");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::copy(dir.join("ca-cert.pem"), client.join("ca-cert.pem")).unwrap();
}

#[test]
fn tls_required_accepts_tls_clients_and_refuses_plain_ones() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let c = certs.path().display();
    // `[nbd.tls]` after the volumes is a table of its own in TOML, so appending it is valid.
    let config = format!("{CONFIG}\n[nbd.tls]\ncert = \"{c}/server-cert.pem\"\nkey = \"{c}/server-key.pem\"\nmode = \"required\"\n");
    let s = Strata::start(&config);
    let client = certs.path().join("client");
    let tls_uri = format!(
        "nbds://{}/disk?tls-certificates={}",
        s.addr,
        client.display()
    );
    let info = run("nbdinfo", &[&tls_uri]);
    assert!(info.contains("export-size: 1073741824"), "{info}");
    assert!(
        run_raw("nbdinfo", &["--is", "tls", &tls_uri])
            .status
            .success(),
        "nbdinfo --is tls"
    );
    // Data through TLS with qemu.
    let port = s.addr.rsplit(':').next().unwrap();
    let out = run(
        "qemu-io",
        &[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                client.display()
            ),
            "--image-opts",
            &format!("driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0"),
            "-c",
            "write -P 0x77 0 1M",
            "-c",
            "read -P 0x77 0 1M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A plain client is refused at negotiation, and the reason is on the wire (libnbd shows
    // server messages in its debug output).
    let out = common::run_raw_env("nbdinfo", &[&s.uri("disk")], &[("LIBNBD_DEBUG", "1")]);
    assert!(!out.status.success(), "a plain client must not connect");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this server requires TLS: use STARTTLS first"),
        "{err}"
    );
    let out = run_raw("qemu-io", &["-f", "raw", &s.uri("disk"), "-c", "read 0 4k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && !text.contains("read 4096/4096"),
        "qemu without TLS must not read: {text}"
    );
}

/// nbdkit serving a file through its pause filter, whose control socket holds requests at a
/// gate until released.
struct PausedNbdkit {
    child: std::process::Child,
    control: std::path::PathBuf,
    port: u16,
}

impl PausedNbdkit {
    fn start(dir: &Path) -> PausedNbdkit {
        common::require("nbdkit");
        let file = dir.join("backing.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(64 << 20))
            .unwrap();
        let control = dir.join("pause.sock");
        let port = free_port();
        let child = Command::new("nbdkit")
            .args([
                "--foreground",
                "--exit-with-parent",
                "--port",
                &port.to_string(),
            ])
            .args(["--filter=pause", "file"])
            .arg(&file)
            .arg(format!("pause-control={}", control.display()))
            .spawn()
            .unwrap();
        common::wait_until(
            "nbdkit's pause control socket",
            Duration::from_secs(30),
            || control.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        PausedNbdkit {
            child,
            control,
            port,
        }
    }

    /// Send a pause (`p`) or resume (`r`) command and check nbdkit's answer.
    fn command(&self, c: u8, want: u8) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        s.write_all(&[c]).unwrap();
        let mut answer = [0u8];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(
            answer[0], want,
            "nbdkit's pause filter answered {:?}",
            answer[0] as char
        );
    }
}

impl Drop for PausedNbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigterm_answers_a_request_in_flight_flushes_and_exits_cleanly_keeping_data() {
    common::require("qemu-io");
    let backing = tempfile::tempdir().unwrap();
    let nbdkit = PausedNbdkit::start(backing.path());
    let config = format!(
        "data_dir = \"{{dir}}/data\"\n[nbd]\nlisten = [\"127.0.0.1:0\"]\n[[volume]]\nname = \"slow\"\nuri = \"nbd://127.0.0.1:{}\"\n",
        nbdkit.port
    );
    let s = Strata::start(&config);
    let uri = s.uri("slow");
    // Hold the device's requests at nbdkit's gate; a write goes in and stays in flight.
    nbdkit.command(b'p', b'P');
    let writer = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x5a 0 4M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let depth = "strata_volume_queue_depth{volume=\"slow\"}";
    common::wait_until(
        "the write in flight at the daemon",
        Duration::from_secs(60),
        || common::metric(&s, depth).is_some_and(|d| d >= 1.0),
    );
    common::signal(s.pid(), libc::SIGTERM);
    common::wait_until(
        "the daemon to take SIGTERM",
        Duration::from_secs(60),
        || s.log().contains("shutting down: draining connections"),
    );
    // Only now does the device answer: the daemon must still be waiting to answer the write.
    nbdkit.command(b'r', b'R');
    let out = writer.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("wrote 4194304"),
        "{text}"
    );
    let (status, dir) = s.stop();
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(dir.path().join("strata.log")).unwrap();
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped cleanly"),
        "{log}"
    );
    // Same data directory, new process: the data is there.
    let s = Strata::start_in(dir, &config, &[]);
    common::qemu_io(&s.uri("slow"), true, &["read -P 0x5a 0 4M"]);
}

/// Bytes in the files under `dir`.
fn walk(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() { walk(&e.path()) } else { m.len() };
    }
    total
}
