//! Versions of page-store images through `strata serve`, the CLI and real clients: snapshots
//! exported read-only, clones and clones of clones, resize online and offline, transactions
//! over NBD (raw protocol, crash mid-commit, conflicts), access tokens, and garbage collection
//! while servers write.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::raw::{self, RawNbd};
use common::{qemu_io, run, run_raw, strata_bin, wait_until, Strata};
use serde_json::Value;

const CONFIG: &str = r#"
data_dir = "{dir}/data"
[nbd]
listen = ["127.0.0.1:0"]
[pagestore]
checkpoint_bytes = "1M"
segment_bytes = "512K"
max_segments = 8
txn_timeout_secs = 30
[[volume]]
name = "vm"
uri = "image://local/vm?size=64M"
[jwt]
secret = "insecure_token"
"#;

const PS: usize = 4096;

fn page(b: u8) -> Vec<u8> {
    vec![b; PS]
}

/// The export size nbdinfo reports.
fn size_of(uri: &str) -> u64 {
    run("nbdinfo", &["--size", uri]).trim().parse().unwrap()
}

/// `strata image list --json`, by `STORE/NAME`.
fn images(s: &Strata) -> Vec<Value> {
    let v: Value = serde_json::from_str(&s.cli(&["image", "list", "--json"])).unwrap();
    v.as_array().unwrap().clone()
}

fn image<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|i| {
            format!(
                "{}/{}",
                i["store"].as_str().unwrap(),
                i["name"].as_str().unwrap()
            ) == name
        })
        .unwrap_or_else(|| panic!("no image {name} in {list:?}"))
}

/// Bytes of every file under `dir` (files deleted meanwhile count as gone).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
            Ok(m) => total += m.len(),
            Err(_) => {}
        }
    }
    total
}

#[test]
fn snapshots_clones_and_resize_through_the_cli_and_nbd() {
    let s = Strata::start(CONFIG);
    let vm = s.uri("vm");
    qemu_io(&vm, false, &["write -P 0x11 0 16M"]);
    let copy = s.path("copy-at-s1.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &vm,
            copy.to_str().unwrap(),
        ],
    );
    let out = s.cli(&["snapshot", "create", "vm", "s1"]);
    assert!(out.contains("local/vm@s1"), "{out}");
    qemu_io(&vm, false, &["write -P 0x22 0 8M"]);

    // The snapshot export reads what was there when it was taken, and only reads.
    let s1 = s.uri("local/vm@s1");
    common::assert_identical(copy.to_str().unwrap(), &s1);
    assert!(
        !common::images_identical(copy.to_str().unwrap(), &vm),
        "the image moved on"
    );
    assert!(run("nbdinfo", &[&s1]).contains("is_read_only: true"));
    let w = run_raw("qemu-io", &["-f", "raw", "-c", "write 0 4k", &s1]);
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(!w.status.success() || text.contains("failed"), "{text}");

    // A clone diverges from its snapshot and from the source.
    let out = s.cli(&["clone", "vm@s1", "c1"]);
    assert!(out.contains("local/c1"), "{out}");
    let c1 = s.uri("local/c1");
    qemu_io(&c1, false, &["write -P 0x33 4M 1M"]);
    qemu_io(
        &c1,
        true,
        &[
            "read -P 0x11 0 4M",
            "read -P 0x33 4M 1M",
            "read -P 0x11 5M 11M",
            "read -P 0 16M 48M",
        ],
    );
    qemu_io(&vm, true, &["read -P 0x22 0 8M", "read -P 0x11 8M 8M"]);
    common::assert_identical(copy.to_str().unwrap(), &s1);

    // A clone of the clone.
    s.cli(&["snapshot", "create", "local/c1", "t"]);
    s.cli(&["clone", "local/c1@t", "c2"]);
    let c2 = s.uri("local/c2");
    qemu_io(&c2, false, &["write -P 0x44 0 1M"]);
    qemu_io(
        &c2,
        true,
        &[
            "read -P 0x44 0 1M",
            "read -P 0x11 1M 3M",
            "read -P 0x33 4M 1M",
        ],
    );
    qemu_io(&c1, true, &["read -P 0x11 0 1M"]);

    // A clone stores what it wrote, about 1 MiB here, not a copy of its base.
    let list = images(&s);
    let c1_bytes = image(&list, "local/c1")["stored_bytes"].as_u64().unwrap();
    assert!(
        (1 << 20..(1 << 20) + (100 << 10)).contains(&c1_bytes),
        "clone c1 stores {c1_bytes} bytes after writing 1 MiB"
    );
    assert_eq!(image(&list, "local/c2")["base"], "c1@t");
    let snaps: Value = serde_json::from_str(&s.cli(&["snapshot", "list", "vm", "--json"])).unwrap();
    assert_eq!(snaps[0]["name"], "s1");
    assert_eq!(snaps[0]["size"], 64 << 20);

    // Deleting a snapshot clones depend on is refused, naming them; --flatten goes on.
    let refused = s.cli_raw(&["snapshot", "delete", "vm@s1"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("c1"), "{err}");
    let refused = s.cli_raw(&["snapshot", "delete", "vm@s1", "--flatten"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("c1@t"),
        "snapshots of clones: {err}"
    );
    let out = s.cli_raw(&["snapshot", "delete", "local/c1@t", "--flatten"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("100%"),
        "progress is shown"
    );
    s.cli(&["snapshot", "delete", "vm@s1", "--flatten"]);
    let list = images(&s);
    assert!(image(&list, "local/c1")["base"].is_null());
    assert!(image(&list, "local/c2")["base"].is_null());
    qemu_io(
        &c1,
        true,
        &[
            "read -P 0x11 0 4M",
            "read -P 0x33 4M 1M",
            "read -P 0x11 5M 11M",
        ],
    );
    qemu_io(
        &c2,
        true,
        &[
            "read -P 0x44 0 1M",
            "read -P 0x11 1M 3M",
            "read -P 0x33 4M 1M",
        ],
    );
    let gone = run_raw("nbdinfo", &[&s1]);
    assert!(!gone.status.success(), "a deleted snapshot is no export");

    // Resize: grow online (new connections see it), shrink only with --force.
    s.cli(&["image", "resize", "vm", "128M"]);
    assert_eq!(size_of(&vm), 128 << 20);
    qemu_io(&vm, false, &["read -P 0x22 0 8M", "write -P 0x66 100M 1M"]);
    let refused = s.cli_raw(&["image", "resize", "vm", "32M"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("force"), "{err}");
    assert_eq!(size_of(&vm), 128 << 20);

    // Offline: the daemon is stopped, the CLI opens the store itself.
    let (status, dir) = s.stop();
    assert!(status.success());
    let config = dir.path().join("strata.toml");
    let out = Command::new(strata_bin())
        .args(["image", "resize", "--offline", "--config"])
        .arg(&config)
        .args(["local/vm", "256M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = Strata::start_in(dir, CONFIG, &[]);
    let vm = s.uri("vm");
    assert_eq!(size_of(&vm), 256 << 20);
    qemu_io(
        &vm,
        true,
        &[
            "read -P 0x22 0 8M",
            "read -P 0x66 100M 1M",
            "read -P 0 200M 56M",
        ],
    );
}

#[test]
fn transactions_over_nbd_commit_roll_back_and_conflict() {
    let s = Strata::start(CONFIG);
    let mut a = RawNbd::connect(&s.addr, "vm").unwrap();
    let mut b = RawNbd::connect(&s.addr, "vm").unwrap();
    assert_eq!(a.write(0, &page(1)), 0);
    assert_eq!(a.write(8 * PS as u64, &page(1)), 0);

    // A multi-page transaction: invisible until COMMIT, then all there.
    assert_eq!(a.cmd(raw::BEGIN_TXN, 0, 0, &[]), 0);
    assert_eq!(a.write(0, &page(2)), 0);
    assert_eq!(a.write(8 * PS as u64, &page(2)), 0);
    assert_eq!(a.write(100 * PS as u64, &[page(2), page(2)].concat()), 0);
    assert_eq!(
        a.read(0, PS as u32),
        page(2),
        "a transaction reads its own writes"
    );
    assert_eq!(b.read(0, PS as u32), page(1), "others do not see them yet");
    assert_eq!(a.cmd(raw::LOCK_TXN, 0, 0, &[]), 0);
    assert_eq!(a.cmd(raw::COMMIT_TXN, 0, 0, &[]), 0);
    assert_eq!(b.read(0, PS as u32), page(2));
    assert_eq!(b.read(8 * PS as u64, PS as u32), page(2));
    assert_eq!(b.read(101 * PS as u64, PS as u32), page(2));

    // Pipelined without waiting for BEGIN's answer: what follows it is still inside it.
    let p3 = page(3);
    assert_eq!(
        a.pipeline(&[(raw::BEGIN_TXN, 0, &[]), (raw::WRITE, 60 * PS as u64, &p3)]),
        vec![0, 0]
    );
    assert_eq!(
        b.read(60 * PS as u64, PS as u32),
        page(0),
        "not visible before COMMIT"
    );
    assert_eq!(a.cmd(raw::COMMIT_TXN, 0, 0, &[]), 0);
    assert_eq!(b.read(60 * PS as u64, PS as u32), page(3));

    // Misuse gets an error reply; the connection stays usable.
    assert_eq!(a.cmd(raw::COMMIT_TXN, 0, 0, &[]), raw::EINVAL);
    assert_eq!(a.cmd(raw::LOCK_TXN, 0, 0, &[]), raw::EINVAL);
    assert_eq!(a.cmd(raw::BEGIN_TXN, 0, 0, &[]), 0);
    assert_eq!(a.cmd(raw::BEGIN_TXN, 0, 0, &[]), raw::EINVAL);
    assert_eq!(a.cmd(raw::ROLLBACK_TXN, 0, 0, &[]), 0);
    assert_eq!(a.cmd(raw::ROLLBACK_TXN, 0, 0, &[]), raw::EINVAL);
    assert_eq!(a.read(0, PS as u32), page(2));

    // Rollback leaves no trace.
    assert_eq!(a.cmd(raw::BEGIN_TXN, 0, 0, &[]), 0);
    assert_eq!(a.write(40 * PS as u64, &page(9)), 0);
    assert_eq!(a.cmd(raw::ROLLBACK_TXN, 0, 0, &[]), 0);
    assert_eq!(b.read(40 * PS as u64, PS as u32), page(0));

    // MVPS's tombstone: a zero-length WRITE in a transaction zeroes its page.
    assert_eq!(a.cmd(raw::BEGIN_TXN, 0, 0, &[]), 0);
    assert_eq!(a.cmd(raw::WRITE, 8 * PS as u64, 0, &[]), 0);
    assert_eq!(a.cmd(raw::COMMIT_TXN, 0, 0, &[]), 0);
    assert_eq!(b.read(8 * PS as u64, PS as u32), page(0));

    // A page this transaction read changes meanwhile: it reads its snapshot, LOCK says it can
    // no longer commit (EPERM), COMMIT refuses, and nothing of it lands.
    assert_eq!(a.cmd(raw::BEGIN_TXN, 0, 0, &[]), 0);
    assert_eq!(a.read(0, PS as u32), page(2));
    assert_eq!(b.write(0, &page(7)), 0);
    assert_eq!(a.read(0, PS as u32), page(2), "a consistent snapshot");
    assert_eq!(a.write(16 * PS as u64, &page(3)), 0);
    assert_eq!(a.cmd(raw::LOCK_TXN, 0, 0, &[]), raw::EPERM);
    assert_eq!(a.cmd(raw::COMMIT_TXN, 0, 0, &[]), raw::EPERM);
    assert_eq!(b.read(16 * PS as u64, PS as u32), page(0));
    assert_eq!(b.read(0, PS as u32), page(7));

    // Two transactions writing one page: the first to commit wins, the second is told.
    assert_eq!(a.cmd(raw::BEGIN_TXN, 0, 0, &[]), 0);
    assert_eq!(b.cmd(raw::BEGIN_TXN, 0, 0, &[]), 0);
    assert_eq!(a.write(20 * PS as u64, &page(4)), 0);
    assert_eq!(b.write(20 * PS as u64, &page(5)), 0);
    assert_eq!(a.cmd(raw::COMMIT_TXN, 0, 0, &[]), 0);
    assert_eq!(b.cmd(raw::LOCK_TXN, 0, 0, &[]), raw::EPERM);
    assert_eq!(b.cmd(raw::COMMIT_TXN, 0, 0, &[]), raw::EPERM);
    assert_eq!(b.read(20 * PS as u64, PS as u32), page(4));

    // The documented Python client.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nbd_transaction.py");
    let (host, port) = s.addr.rsplit_once(':').unwrap();
    let out = run("python3", &[script.to_str().unwrap(), host, port, "vm"]);
    assert!(out.contains("committed"), "{out}");
    assert_eq!(
        b.read(0, PS as u32),
        vec![b'T'; PS],
        "the script's transaction landed"
    );
    assert_eq!(b.read(PS as u64, PS as u32), vec![b'T'; PS]);
    // And the Rust one (crates/strata/examples/transaction.rs).
    let bin = Path::new(strata_bin())
        .parent()
        .unwrap()
        .join("examples/transaction");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds the examples",
        bin.display()
    );
    let out = Command::new(&bin).args([&s.addr, "vm"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("committed"), "{out}");
    assert_eq!(
        b.read(0, PS as u32),
        vec![b'R'; PS],
        "the example's transaction landed"
    );
    assert_eq!(b.read(PS as u64, PS as u32), vec![b'R'; PS]);
}

#[test]
fn a_transaction_killed_mid_commit_is_wholly_present_or_wholly_absent() {
    const PAGES: u64 = 48;
    let mut s = Strata::start(CONFIG);
    let acked = Arc::new(AtomicU64::new(0));
    for round in 0..4 {
        let addr = s.addr.clone();
        let acked2 = acked.clone();
        // Transaction g writes g into every other page of 0..2*PAGES: one WAL record each.
        let writer = std::thread::spawn(move || {
            let Ok(mut c) = RawNbd::connect(&addr, "vm") else {
                return;
            };
            let mut g = acked2.load(Ordering::SeqCst);
            loop {
                g += 1;
                let mut ok = c.request(raw::BEGIN_TXN, 0, 0, &[]).map(|r| r.0 == 0);
                for p in 0..PAGES {
                    if !matches!(ok, Ok(true)) {
                        break;
                    }
                    ok = c
                        .request(raw::WRITE, 2 * p * PS as u64, PS as u32, &page(g as u8))
                        .map(|r| r.0 == 0);
                }
                if matches!(ok, Ok(true)) {
                    ok = c.request(raw::COMMIT_TXN, 0, 0, &[]).map(|r| r.0 == 0);
                }
                match ok {
                    Ok(true) => acked2.store(g, Ordering::SeqCst),
                    Ok(false) => panic!("transaction {g} was refused"),
                    Err(_) => return, // the server died
                }
            }
        });
        let start = acked.load(Ordering::SeqCst);
        wait_until("a few commits", Duration::from_secs(120), || {
            acked.load(Ordering::SeqCst) >= start + 3 + round
        });
        let dir = s.crash();
        writer.join().unwrap();
        let last = acked.load(Ordering::SeqCst);
        s = Strata::start_in(dir, CONFIG, &[]);
        let mut c = RawNbd::connect(&s.addr, "vm").unwrap();
        let first = c.read(0, PS as u32)[0] as u64;
        for p in 0..PAGES {
            let d = c.read(2 * p * PS as u64, PS as u32);
            assert!(
                d.iter().all(|&x| x as u64 == first),
                "round {round}: page {} holds {} where page 0 holds {first}: a torn transaction",
                2 * p,
                d[0]
            );
        }
        assert!(
            first == last % 256 || first == (last + 1) % 256,
            "round {round}: transaction {last} was acknowledged, the image holds {first}"
        );
        eprintln!("round {round}: acked {last}, image holds {first}");
        let landed = if first == (last + 1) % 256 {
            last + 1
        } else {
            last
        };
        acked.store(landed, Ordering::SeqCst);
    }
}

/// An HS256 JWT with these claims, signed with `secret`.
fn token(secret: &str, header: &str, claims: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let msg = format!("{}.{}", b64.encode(header), b64.encode(claims));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = ring::hmac::sign(&key, msg.as_bytes());
    format!("{msg}.{}", b64.encode(sig.as_ref()))
}

/// The token from the MVPS README, signed with its example secret `insecure_token`.
const SEED_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpbWFnZV9pZCI6IlRFU1RJTUctMDIubXZwcy1pbWFnZSIsImltYWdlX3NpemUiOjEwNzM3NDE4MjQsInBhZ2Vfc2l6ZV9iaXRzIjoxMiwiZXhwIjoxOTAxMTU0OTQxLCJjbGllbnRfaWQiOiJjOWVmZDk2Yy1kYTU5LTQzNTEtYjMxMS0zNTEyOTVmYTk4ZTIifQ.j-nR5Opn-pK6whrm8pJIgyItO5XvlYf0oy7RzR00T1Y";

#[test]
fn access_tokens_select_images_refuse_bad_ones_and_take_over_by_client_id() {
    let s = Strata::start(CONFIG);
    let uri = s.uri(SEED_TOKEN);
    assert_eq!(size_of(&uri), 1 << 30, "the seed's token works unchanged");
    qemu_io(&uri, false, &["write -P 0x5a 0 1M"]);
    // The image it created is an image of the store, which only a token opens: its plain
    // name does not.
    assert_eq!(
        image(&images(&s), "local/TESTIMG-02.mvps-image")["size"],
        1u64 << 30
    );
    let by_name = run_raw("nbdinfo", &[&s.uri("local/TESTIMG-02.mvps-image")]);
    assert!(
        !by_name.status.success(),
        "a token image is reachable by name"
    );

    let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
    let claims = |id: &str, bits: u32, exp: u64| {
        format!(
            r#"{{"image_id":"{id}","image_size":67108864,"page_size_bits":{bits},"exp":{exp},"client_id":"x"}}"#
        )
    };
    let later = 4_000_000_000;
    let cases = [
        (
            token("insecure_token", hs, &claims("A.mvps-image", 12, 1000)),
            "expired",
        ),
        (
            token("another secret", hs, &claims("A.mvps-image", 12, later)),
            "bad signature",
        ),
        (
            token(
                "insecure_token",
                r#"{"alg":"none"}"#,
                &claims("A.mvps-image", 12, later),
            ),
            "only HS256",
        ),
        (
            token(
                "insecure_token",
                r#"{"alg":"HS256""#,
                &claims("A.mvps-image", 12, later),
            ),
            "malformed header",
        ),
        (
            token("insecure_token", hs, r#"{"image_id":"A.mvps-image"}"#),
            "claims",
        ),
        (
            token(
                "insecure_token",
                hs,
                &claims("../etc.mvps-image", 12, later),
            ),
            "image_id",
        ),
        (
            token(
                "insecure_token",
                hs,
                &claims("A-long-name-but-no-suffix", 12, later),
            ),
            "image_id",
        ),
        (
            token(
                "insecure_token",
                hs,
                &claims("TESTIMG-02.mvps-image", 13, later),
            ),
            "pages of 4096",
        ),
    ];
    for (t, why) in &cases {
        match RawNbd::connect(&s.addr, t) {
            Ok(_) => panic!("token accepted; expected refusal for: {why}"),
            Err((kind, msg)) => {
                assert_eq!(kind, raw::REP_ERR_POLICY, "{msg}");
                assert!(msg.contains(why), "expected {why:?} in {msg:?}");
            }
        }
        assert!(!run_raw("nbdinfo", &[&s.uri(t)]).status.success());
    }

    // A second connection with the same client_id takes over: the first is closed.
    let mut first = RawNbd::connect(&s.addr, SEED_TOKEN).unwrap();
    assert_eq!(first.write(0, &page(1)), 0);
    let mut second = RawNbd::connect(&s.addr, SEED_TOKEN).unwrap();
    // The takeover starts once the second has negotiated; the first, stopped, closes.
    wait_until(
        "the first connection to close",
        Duration::from_secs(30),
        || first.request(raw::READ, 0, PS as u32, &[]).is_err(),
    );
    assert_eq!(
        second.read(0, PS as u32),
        page(1),
        "and its writes are there"
    );
    // Another client (a different client_id) does not disturb it.
    let other = token(
        "insecure_token",
        hs,
        &claims("TESTIMG-02.mvps-image", 12, later).replace("\"x\"", "\"y\""),
    );
    let mut third = RawNbd::connect(&s.addr, &other).unwrap();
    assert_eq!(third.read(0, PS as u32), page(1));
    assert_eq!(second.read(0, PS as u32), page(1));
}

/// `strata gc` on the server's configuration; returns the bytes it deleted.
fn gc(s: &Strata, grace_secs: u64) -> u64 {
    let out = Command::new(strata_bin())
        .args([
            "gc",
            "--json",
            "--grace-secs",
            &grace_secs.to_string(),
            "--config",
        ])
        .arg(s.path("strata.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["report"]["deleted_bytes"].as_u64().unwrap())
        .sum()
}

#[test]
fn gc_while_servers_write_keeps_every_image_snapshot_and_clone_exact() {
    let s = Strata::start(CONFIG);
    let vm = s.uri("vm");
    qemu_io(&vm, false, &["write -P 0x11 0 32M"]);
    s.cli(&["snapshot", "create", "vm", "s"]);
    let copy = s.path("s.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri("local/vm@s"),
            copy.to_str().unwrap(),
        ],
    );
    s.cli(&["clone", "vm@s", "c"]);
    let c = s.uri("local/c");
    qemu_io(&c, false, &["write -P 0x55 0 4M"]);

    // A second server writes its own image in the same store.
    let config2 = format!(
        "data_dir = \"{{dir}}/data\"\n[nbd]\nlisten = [\"127.0.0.1:0\"]\n[pagestore]\n\
         checkpoint_bytes = \"1M\"\nsegment_bytes = \"512K\"\nmax_segments = 8\n[[store]]\n\
         name = \"local\"\ntype = \"dir\"\npath = \"{}\"\n[[volume]]\nname = \"vm2\"\n\
         uri = \"image://local/vm2?size=64M\"\n",
        s.path("data/objects").display()
    );
    let s2 = Strata::start(&config2);
    let vm2 = s2.uri("vm2");
    qemu_io(&vm2, false, &["write -P 0x22 0 32M"]);

    // Random overwrites with verification in the upper halves, from both servers, while GC
    // runs again and again.
    let overwrite = |uri: String| {
        std::thread::spawn(move || {
            run(
                "fio",
                &[
                    "--name=overwrite",
                    "--ioengine=nbd",
                    &format!("--uri={uri}"),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=16",
                    "--offset=32M",
                    "--size=32M",
                    "--loops=3",
                    "--verify=crc32c",
                    "--verify_fatal=1",
                    "--verify_state_save=0",
                ],
            )
        })
    };
    let fio = overwrite(vm.clone());
    let fio2 = overwrite(vm2.clone());
    let mut runs = 0;
    let mut deleted = 0;
    while !fio.is_finished() || !fio2.is_finished() || runs < 3 {
        deleted += gc(&s, 2);
        runs += 1;
    }
    let out = fio2.join().unwrap();
    assert!(out.contains("err= 0"), "{out}");
    let out = fio.join().unwrap();
    assert!(out.contains("err= 0"), "{out}");
    wait_until("garbage to collect", Duration::from_secs(60), || {
        deleted += gc(&s, 2);
        deleted > 0
    });

    // Everything reads back exactly, also after a restart.
    qemu_io(&vm, true, &["read -P 0x11 0 32M"]);
    qemu_io(&vm2, true, &["read -P 0x22 0 32M"]);
    common::assert_identical(copy.to_str().unwrap(), &s.uri("local/vm@s"));
    qemu_io(
        &c,
        true,
        &[
            "read -P 0x55 0 4M",
            "read -P 0x11 4M 28M",
            "read -P 0 32M 32M",
        ],
    );
    let image_copy = s.path("vm.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &vm,
            image_copy.to_str().unwrap(),
        ],
    );

    // Deleting the clone and the snapshot frees their data at the next collections.
    let objects = s.path("data/objects");
    s.cli(&["image", "delete", "local/c"]);
    s.cli(&["snapshot", "delete", "vm@s"]);
    let before = dir_bytes(&objects);
    wait_until(
        "the deleted clone and snapshot to be collected",
        Duration::from_secs(60),
        || {
            gc(&s, 2);
            dir_bytes(&objects) < before
                && !objects
                    .join("images/c")
                    .join("segments")
                    .read_dir()
                    .is_ok_and(|mut d| d.next().is_some())
        },
    );
    let (_, dir) = s.stop();
    let s = Strata::start_in(dir, CONFIG, &[]);
    qemu_io(&s.uri("vm"), true, &["read -P 0x11 0 32M"]);
    common::assert_identical(image_copy.to_str().unwrap(), &s.uri("vm"));
    qemu_io(&vm2, true, &["read -P 0x22 0 32M"]);
}

#[test]
fn the_daemon_collects_garbage_on_a_schedule() {
    let config = CONFIG.replace("[jwt]", "[gc]\ninterval_secs = 1\ngrace_secs = 1\n\n[jwt]");
    let s = Strata::start(&config);
    let vm = s.uri("vm");
    // Overwrites make replaced segments (checkpoints every MiB, compaction beyond 8 segments).
    for pattern in ["0x01", "0x02", "0x03"] {
        qemu_io(&vm, false, &[&format!("write -P {pattern} 0 8M")]);
    }
    let objects = s.path("data/objects/images/vm/segments");
    wait_until(
        "a scheduled collection to delete something",
        Duration::from_secs(60),
        || {
            s.log()
                .lines()
                .any(|l| l.contains("scheduled garbage collection") && !l.contains("deleted=0"))
        },
    );
    assert!(objects.read_dir().unwrap().count() > 0);
    qemu_io(&vm, true, &["read -P 0x03 0 8M"]);
}
