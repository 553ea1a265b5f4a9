//! Two `strata serve` processes on the same page-store image: exactly one keeps writing, the
//! other stops with a clear error, and the image reads back consistent — in a directory store
//! and on S3 (s3s-fs), where a create-only PUT of the manifest is what fences.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run_raw, strata_bin, Strata};
use serde_json::Value;

/// A daemon's configuration with the store `store` (a `[[store]]` entry named `shared`).
fn config(store: &str) -> String {
    format!(
        r#"
data_dir = "{{dir}}/data"
[nbd]
listen = ["127.0.0.1:0"]
{store}
[pagestore]
checkpoint_secs = 1
checkpoint_bytes = "1M"
[[volume]]
name = "v"
uri = "image://shared/v?size=64M"
"#
    )
}

fn dir_store(path: &Path) -> String {
    format!(
        "[[store]]\nname = \"shared\"\ntype = \"dir\"\npath = \"{}\"\n",
        path.display()
    )
}

/// The image as `strata status --json` shows it.
fn image(s: &Strata) -> Value {
    let out = Command::new(strata_bin())
        .arg("--endpoint")
        .arg(s.api_endpoint())
        .args(["status", "v", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["image"].clone()
}

fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    common::wait_until(what, Duration::from_secs(120), cond);
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run_raw("qemu-io", &args)
}

fn ok(out: &std::process::Output) -> bool {
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("failed")
}

#[test]
fn two_servers_on_one_image_in_a_directory_exactly_one_keeps_writing() {
    let shared = tempfile::tempdir().unwrap();
    one_keeps_writing(&config(&dir_store(shared.path())));
}

#[test]
fn two_servers_on_one_image_on_s3_exactly_one_keeps_writing() {
    let s3 = common::S3Server::start();
    one_keeps_writing(&config(&s3.store_toml("shared", "fencing")));
}

fn one_keeps_writing(config: &str) {
    let a = Strata::start(config);
    assert!(ok(&qemu_io(&a.uri("v"), &["write -P 0x11 0 1M", "flush"])));
    wait_for("a's first checkpoint", || {
        image(&a)["checkpoints"].as_u64() >= Some(1)
    });

    // b opens the same image from the same store, with its own write buffer.
    let b = Strata::start(config);
    assert!(ok(&qemu_io(&b.uri("v"), &["read -P 0x11 0 1M"])));
    assert!(ok(&qemu_io(&a.uri("v"), &["write -P 0x22 1M 1M", "flush"])));
    assert!(ok(&qemu_io(&b.uri("v"), &["write -P 0x33 2M 1M", "flush"])));
    // Both checkpoint within a second; only one can publish the next version.
    wait_for("one server to stop writing", || {
        !image(&a)["fenced"].is_null() || !image(&b)["fenced"].is_null()
    });
    let (winner, loser, won, lost) = if image(&a)["fenced"].is_null() {
        (&a, &b, "write -P 0x22 1M 1M", "2M")
    } else {
        (&b, &a, "write -P 0x33 2M 1M", "1M")
    };
    let why = image(loser)["fenced"].as_str().unwrap().to_string();
    assert!(why.contains("another writer published version"), "{why}");
    assert!(image(winner)["fenced"].is_null(), "exactly one stops");
    // The loser refuses writes and flushes; its clients see errors.
    let refused = qemu_io(&loser.uri("v"), &["write -P 0x44 4M 4k", "flush"]);
    assert!(
        !ok(&refused),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );
    let out = Command::new(strata_bin())
        .arg("--endpoint")
        .arg(loser.api_endpoint())
        .args(["status", "v"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("STOPPED WRITING"));
    // The winner goes on, and its writes keep reaching the store.
    let before = image(winner)["checkpoints"].as_u64().unwrap();
    assert!(ok(&qemu_io(
        &winner.uri("v"),
        &["write -P 0x55 8M 1M", "flush"]
    )));
    wait_for("the winner's next checkpoint", || {
        image(winner)["checkpoints"].as_u64().unwrap() > before
    });
    drop(a);
    drop(b);

    // A third server sees one consistent history: the winner's.
    let c = Strata::start(config);
    let uri = c.uri("v");
    let won_offset = won.split_whitespace().nth(3).unwrap();
    let won_pattern = won.split_whitespace().nth(2).unwrap();
    let check = qemu_io(
        &uri,
        &[
            "read -P 0x11 0 1M",
            &format!("read -P {won_pattern} {won_offset} 1M"),
            &format!("read -P 0 {lost} 1M"),
            "read -P 0x55 8M 1M",
            "read -P 0 4M 4k",
        ],
    );
    assert!(ok(&check), "{}", String::from_utf8_lossy(&check.stdout));
}
