//! Nobody gets in who shouldn't: a real unprivileged user, created by the test, cannot reach
//! the daemon's unix socket or its data, cannot call the TCP API without a token, and with a
//! token cannot name a path outside the pools (no `/etc/shadow`, no root-owned file of their
//! making); sizes no device can hold, and a volume built on its own daemon's export, are
//! refused with a message.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::{strata_bin, Strata};

const TOKEN: &str = "s3cr3t-token-for-the-test-0123456789";

/// A system user that exists for the duration of a test.
struct User(String);

impl User {
    fn create() -> User {
        let name = format!("strsec{}", std::process::id() % 100_000);
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .output()
            .expect("run useradd (the tests run as root)");
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        User(name)
    }

    /// `strata ARGS` run as this user, with `env`.
    fn strata(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        // The user's environment is cleared below, so runuser is named by its path.
        let mut c = Command::new(runuser());
        c.args(["-u", &self.0, "--", strata_bin()]).args(args);
        c.env_clear().env("PATH", "/usr/bin:/bin").env("HOME", "/");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// `sh -c SCRIPT` as this user.
    fn sh(&self, script: &str) -> Output {
        Command::new("runuser")
            .args(["-u", &self.0, "--", "sh", "-c", script])
            .output()
            .unwrap()
    }
}

/// Where `runuser` is (util-linux puts it in sbin).
fn runuser() -> std::path::PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| std::path::Path::new(d).join("runuser"))
        .find(|p| p.is_file());
    found.expect("runuser (util-linux) is needed to act as an unprivileged user")
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).output();
    }
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn an_unprivileged_user_cannot_read_or_write_beyond_the_pools() {
    let user = User::create();
    let dir = tempfile::tempdir().unwrap();
    // Let the user walk to the daemon's files, so that only their own modes stop them.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("ci {TOKEN}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pool = dir.path().join("pool");
    let config = format!(
        r#"
data_dir = "{{dir}}/data"
[nbd]
listen = ["127.0.0.1:0"]
[api]
listen = ["127.0.0.1:0"]
tokens_file = "{}"
[[pool]]
name = "p"
path = "{}"
[[volume]]
name = "secret"
uri = "file://{{dir}}/data/secret.img?size=1M"
"#,
        tokens.display(),
        pool.display()
    );
    let s = Strata::start_in(dir, &config, &[]);
    let data = s.dir.path().join("data");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data directory is its owner's");
    assert_eq!(
        mode(&data.join("secret.img")),
        0o600,
        "volume data is its owner's"
    );
    assert_eq!(mode(&data.join("api.sock")), 0o600);

    // The unix socket and the data are out of reach.
    let sock = format!("unix://{}", data.join("api.sock").display());
    let out = user.strata(&["--endpoint", &sock, "volume", "list"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ermission denied"), "{}", text(&out));
    let out = user.sh(&format!("cat {}", data.join("secret.img").display()));
    assert!(!out.status.success(), "the user read volume data");

    // Over TCP, nothing without a token, and a wrong one is no better.
    let http = s.api_http();
    let out = user.strata(&["--endpoint", &http, "volume", "list"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("needs a bearer token"),
        "{}",
        text(&out)
    );
    let out = user.strata(
        &["--endpoint", &http, "volume", "list"],
        &[("STRATA_API_TOKEN", "not-the-token-at-all-0000")],
    );
    assert!(text(&out).contains("not one of"), "{}", text(&out));

    // With the token: no path outside the pools, however it is spelled.
    let with_token = [("STRATA_API_TOKEN", TOKEN)];
    for device in [
        "file:///etc/shadow".to_string(),
        "file:///root/strata-planted?size=4096".to_string(),
        format!("file://{}/../etc/passwd", pool.display()),
        format!("aio://{}", data.join("secret.img").display()),
    ] {
        let out = user.strata(
            &[
                "--endpoint",
                &http,
                "volume",
                "create",
                "pwn",
                "--device",
                &device,
            ],
            &with_token,
        );
        assert!(!out.status.success(), "{device}: {}", text(&out));
        assert!(
            text(&out).contains("outside the pools"),
            "{device}: {}",
            text(&out)
        );
    }
    assert!(!std::path::Path::new("/root/strata-planted").exists());
    // A symbolic link in the pool to a file outside it is outside too.
    std::os::unix::fs::symlink("/etc/shadow", pool.join("link")).unwrap();
    let out = user.strata(
        &[
            "--endpoint",
            &http,
            "volume",
            "create",
            "pwn",
            "--device",
            &format!("file://{}/link", pool.display()),
        ],
        &with_token,
    );
    assert!(text(&out).contains("outside the pools"), "{}", text(&out));
    // Inside the pool it works, and the new file is the daemon's own.
    let inside = pool.join("mine.img");
    let out = user.strata(
        &[
            "--endpoint",
            &http,
            "volume",
            "create",
            "mine",
            "--device",
            &format!("file://{}", inside.display()),
            "--size",
            "1M",
        ],
        &with_token,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&inside), 0o600);
    // Nor can the token's holder delete what the configuration declares, or read it by
    // making another volume over it.
    let out = user.strata(
        &["--endpoint", &http, "volume", "delete", "secret"],
        &with_token,
    );
    assert!(text(&out).contains("configuration file"), "{}", text(&out));
}

#[test]
fn the_api_listens_on_tcp_only_when_told_how_to_tell_callers_apart() {
    // The default: the unix socket only.
    let s = Strata::start("data_dir = \"{dir}/data\"\n[nbd]\nlisten = [\"127.0.0.1:0\"]\n");
    assert!(
        !s.banner.iter().any(|l| l.starts_with("api: http")),
        "{:?}",
        s.banner
    );
    // A TCP listener with no tokens and no client certificates is refused at start.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[nbd]\nlisten = [\"127.0.0.1:0\"]\n[api]\nlisten = [\"127.0.0.1:0\"]\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let out = Command::new(strata_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("tokens_file"), "{}", text(&out));
    // A tokens file others may read is refused too.
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[nbd]\nlisten = [\"127.0.0.1:0\"]\n[api]\nlisten = [\"127.0.0.1:0\"]\ntokens_file = \"{}\"\n",
            dir.path().join("d").display(),
            tokens.display()
        ),
    )
    .unwrap();
    let out = Command::new(strata_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(text(&out).contains("chmod 600"), "{}", text(&out));
}

#[test]
fn impossible_sizes_and_self_referencing_replicas_are_refused() {
    let s = Strata::start("data_dir = \"{dir}/data\"\n[nbd]\nlisten = [\"127.0.0.1:0\"]\n");
    let refuse = |args: &[&str], want: &str| {
        let out = s.cli_raw(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
    };
    // Memory devices the host could never fill, or that are not whole sectors.
    refuse(
        &[
            "volume",
            "create",
            "a",
            "--replica",
            "mem://a1?size=18446744073709551615",
            "--replica",
            "mem://a2?size=18446744073709551615",
        ],
        "multiple of 512",
    );
    refuse(
        &["volume", "create", "b", "--device", "mem://b?size=16P"],
        "available",
    );
    refuse(
        &["volume", "create", "c", "--device", "mem://c?size=1000"],
        "multiple of 512",
    );
    // A replica that is this daemon's own export would wait on itself.
    s.cli(&["volume", "create", "va", "--device", "mem://va?size=1M"]);
    refuse(
        &[
            "volume",
            "create",
            "vb",
            "--replica",
            "mem://vb?size=1M",
            "--replica",
            &format!("nbd://{}/va", s.addr),
        ],
        "this daemon itself",
    );
    refuse(
        &["volume", "create", "../x", "--device", "mem://x?size=1M"],
        "volume name",
    );
    // A kernel interface is not a disk, and the message does not suggest truncating it.
    let out = s.cli_raw(&["volume", "create", "m", "--device", "file:///proc/self/mem"]);
    assert!(
        text(&out).contains("interface of the kernel") && !text(&out).contains("truncate"),
        "{}",
        text(&out)
    );
    // The daemon is still there, and well.
    assert!(s.cli(&["volume", "list"]).contains("va"));
}

/// An HS256 token for `claims`, signed with `secret`.
fn token(secret: &str, claims: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let msg = format!(
        "{}.{}",
        b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64.encode(claims)
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = ring::hmac::sign(&key, msg.as_bytes());
    format!("{msg}.{}", b64.encode(sig.as_ref()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn with_tokens_on_a_token_is_the_only_door_to_token_images() {
    // STRATA_JWT_SECRET alone turns tokens on, over the local store.
    let dir = tempfile::tempdir().unwrap();
    let config = "data_dir = \"{dir}/data\"\n[nbd]\nlisten = [\"127.0.0.1:0\"]\nimages_idle_secs = 1\n[state]\nreconcile_secs = 0.2\n";
    let s = Strata::start_env(dir, config, &[], &[("STRATA_JWT_SECRET", "the-secret")]);
    let claims = |id: &str, extra: &str| {
        format!(
            r#"{{"image_id":"{id}","image_size":16777216,"page_size_bits":12,"exp":{}{extra}}}"#,
            now() + 600
        )
    };
    let good = token("the-secret", &claims("door.mvps-image", ""));
    common::qemu_io(&s.uri(&good), false, &["write -P 0x5a 0 1M"]);
    // Its plain name is no door.
    let by_name = common::run_raw("nbdinfo", &[&s.uri("local/door.mvps-image")]);
    assert!(!by_name.status.success(), "reached a token image by name");
    // A token that is not valid yet is refused.
    let early = token(
        "the-secret",
        &claims("door.mvps-image", &format!(",\"nbf\":{}", now() + 600)),
    );
    let out = common::run_raw("nbdinfo", &[&s.uri(&early)]);
    assert!(!out.status.success(), "a token used before its nbf");
    assert!(s.log().contains("not valid before"), "{}", s.log());
    common::qemu_io(&s.uri(&good), true, &["read -P 0x5a 0 1M"]);

    // Images opened by token are closed once no client uses them: hundreds of token images
    // one after another do not pile up descriptors.
    let before = fds(s.pid());
    for i in 0..200 {
        let t = token("the-secret", &claims(&format!("t{i}.mvps-image"), ""));
        common::qemu_io(&s.uri(&t), false, &["write -P 0x11 0 4k"]);
    }
    common::wait_until(
        "the token images to be closed",
        std::time::Duration::from_secs(120),
        || fds(s.pid()) < before + 32,
    );
}

#[test]
fn idle_metrics_connections_take_no_descriptors_from_clients() {
    let s = Strata::start("data_dir = \"{dir}/data\"\n[nbd]\nlisten = [\"127.0.0.1:0\"]\n[[volume]]\nname = \"v\"\nuri = \"mem://v?size=1M\"\n");
    let before = fds(s.pid());
    let url = s.metrics_url();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    // Far more idle connections than the daemon serves at once: the rest wait in the
    // listen backlog, costing the daemon nothing.
    let idle: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    assert!(idle.len() >= 100, "{} connections", idle.len());
    common::wait_until(
        "the metrics listener to stop accepting",
        std::time::Duration::from_secs(30),
        || fds(s.pid()) >= before + 16,
    );
    assert!(
        fds(s.pid()) < before + 40,
        "{} descriptors for idle scrapers",
        fds(s.pid()) - before
    );
    // NBD clients are served meanwhile.
    let info = common::run("nbdinfo", &[&s.uri("v")]);
    assert!(info.contains("export-size: 1048576"), "{info}");
    drop(idle);
}
