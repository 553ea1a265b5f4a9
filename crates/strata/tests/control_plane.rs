//! The control plane through the CLI with `--output json`: declarative specs that converge,
//! re-apply as no-ops and refuse what is unsafe; two daemons sharing etcd; the metrics a
//! Prometheus server scrapes while fio runs.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, qemu_io, require, run, run_raw, wait_until, Strata};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn json(s: &Strata, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = s.cli(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("strata {args:?}: {e}: {out}"))
}

/// `strata ARGS` that must fail; its stderr.
fn refused(s: &Strata, args: &[&str]) -> String {
    let out = s.cli_raw(args);
    assert!(!out.status.success(), "strata {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn volume(s: &Strata, name: &str) -> Value {
    json(s, &["volume", "get", name])
}

fn all_online(s: &Strata, name: &str) -> bool {
    let v = volume(s, name);
    v["children"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["state"] == "online")
}

fn verbs(r: &Value) -> Vec<(String, String)> {
    r["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["verb"].as_str().unwrap().to_string(),
                a["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

const CONFIG: &str = r#"
data_dir = "{dir}/data"
[nbd]
listen = ["127.0.0.1:0"]
[state]
reconcile_secs = 0.1
"#;

fn spec(dir: &std::path::Path, replicas: usize, pages_size: &str) -> String {
    let mut s = String::from("volumes:\n  - name: mirror\n    size: 64M\n    replicas:\n");
    for i in 0..replicas {
        s.push_str(&format!("      - file://{}/r{i}.img\n", dir.display()));
    }
    s.push_str(&format!(
        "  - name: pages\n    size: {pages_size}\n    image: local/pages\n    snapshots: [empty]\n"
    ));
    s
}

#[test]
fn a_spec_converges_reapplies_as_a_no_op_and_refuses_what_is_unsafe() {
    require("qemu-io");
    let s = Strata::start(CONFIG);
    let dir = s.dir.path().to_path_buf();
    let file = dir.join("spec.yaml");
    let f = file.to_str().unwrap();
    std::fs::write(&file, spec(&dir, 3, "32M")).unwrap();

    // diff shows what apply would do, and does nothing.
    let d = json(&s, &["diff", "-f", f]);
    assert_eq!(
        verbs(&d),
        [
            ("create".into(), "volumes[0]".into()),
            ("create".into(), "volumes[1]".into()),
            ("snapshot".into(), "volumes[1].snapshots[0]".into()),
        ]
    );
    assert!(d["actions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["done"] == false));
    assert_eq!(json(&s, &["volume", "list"]).as_array().unwrap().len(), 0);

    let a = json(&s, &["apply", "-f", f]);
    assert!(
        a["actions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["done"] == true),
        "{a}"
    );
    wait_until(
        "the mirror's replicas online",
        Duration::from_secs(60),
        || all_online(&s, "mirror"),
    );
    let mirror = format!("nbd://{}/mirror", s.addr);
    let pages = format!("nbd://{}/pages", s.addr);
    qemu_io(&mirror, false, &["write -P 0x41 0 2M"]);
    qemu_io(&pages, false, &["write -P 0x42 1M 1M"]);
    let snaps = json(&s, &["snapshot", "list", "pages"]);
    assert_eq!(snaps[0]["name"], "empty");

    // Applying the same spec again changes nothing.
    let again = json(&s, &["apply", "-f", f]);
    assert_eq!(again["unchanged"], true, "{again}");
    assert!(again["actions"].as_array().unwrap().is_empty(), "{again}");

    // Edit: a fourth replica, a larger image. diff shows it first; nothing changes yet.
    std::fs::write(&file, spec(&dir, 4, "48M")).unwrap();
    let d = json(&s, &["diff", "-f", f]);
    assert_eq!(
        verbs(&d),
        [
            ("add-replica".into(), "volumes[0].replicas[3]".into()),
            ("resize".into(), "volumes[1].size".into()),
        ]
    );
    assert_eq!(
        volume(&s, "mirror")["children"].as_array().unwrap().len(),
        3
    );
    assert_eq!(volume(&s, "pages")["size"], 32 * MIB);
    json(&s, &["apply", "-f", f]);
    wait_until("the new replica rebuilt", Duration::from_secs(60), || {
        all_online(&s, "mirror")
    });
    assert_eq!(
        volume(&s, "mirror")["children"].as_array().unwrap().len(),
        4
    );
    assert_eq!(volume(&s, "pages")["size"], 48 * MIB);
    let size = run("nbdinfo", &["--size", &pages]);
    assert_eq!(size.trim(), (48 * MIB).to_string());
    qemu_io(&mirror, true, &["read -P 0x41 0 2M"]);
    qemu_io(&pages, true, &["read -P 0x42 1M 1M"]);
    // The new replica holds the data: take the others away and read.
    for i in 0..3 {
        s.cli(&["child", "offline", "mirror", &i.to_string()]);
    }
    qemu_io(&mirror, true, &["read -P 0x41 0 2M"]);
    // Reconciliation leaves offline replicas alone (the operator took them away)...
    for i in 0..3 {
        s.cli(&["child", "online", "mirror", &i.to_string(), "--wait"]);
    }
    // ...and brings a faulted one back by itself.
    s.cli(&["child", "fault", "mirror", "1", "--reason", "test"]);
    wait_until(
        "the faulted replica healed",
        Duration::from_secs(60),
        || all_online(&s, "mirror"),
    );

    // Unsafe changes are refused, naming the field; nothing changes.
    let bad = spec(&dir, 4, "48M").replace("image: local/pages", "image: local/other");
    std::fs::write(&file, &bad).unwrap();
    let out = s.cli_raw(&["--output", "json", "diff", "-f", f]);
    assert!(!out.status.success());
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verbs(&d), [("refuse".into(), "volumes[1].image".into())]);
    std::fs::write(&file, spec(&dir, 4, "16M")).unwrap();
    let e = refused(&s, &["apply", "-f", f]);
    assert!(e.contains("refused"), "{e}");
    assert_eq!(volume(&s, "pages")["size"], 48 * MIB);
    // Invalid specs name the field.
    std::fs::write(
        &file,
        "volumes:\n  - name: x\n    size: 1000\n    device: mem://x\n",
    )
    .unwrap();
    let e = refused(&s, &["apply", "-f", f]);
    assert!(e.contains("volumes[0].size") && e.contains("512"), "{e}");
    std::fs::write(
        &file,
        "volumes:\n  - name: x\n    replicas: [\"file:///a\", \"::\"]\n",
    )
    .unwrap();
    let e = refused(&s, &["diff", "-f", f]);
    assert!(e.contains("volumes[0].replicas[1]"), "{e}");
    std::fs::write(&file, "volumes:\n  - name: x\n    sise: 1G\n").unwrap();
    let e = refused(&s, &["apply", "-f", f]);
    assert!(e.contains("volumes[0]") && e.contains("sise"), "{e}");

    // The state survives a restart: both volumes come back with their data.
    let (status, tmp) = s.stop();
    assert!(status.success());
    let s = Strata::start_in(tmp, CONFIG, &[]);
    let mirror = format!("nbd://{}/mirror", s.addr);
    let pages = format!("nbd://{}/pages", s.addr);
    qemu_io(&mirror, true, &["read -P 0x41 0 2M"]);
    qemu_io(&pages, true, &["read -P 0x42 1M 1M"]);
    std::fs::write(&file, spec(&dir, 4, "48M")).unwrap();
    assert_eq!(json(&s, &["diff", "-f", f])["unchanged"], true);
    assert_eq!(json(&s, &["apply", "-f", f])["unchanged"], true);
    assert_eq!(json(&s, &["spec", "get"])["spec"], spec(&dir, 4, "48M"));

    // A volume dropped from the spec is kept unless pruned.
    let only_mirror = spec(&dir, 4, "48M");
    let only_mirror = &only_mirror[..only_mirror.find("  - name: pages").unwrap()];
    std::fs::write(&file, only_mirror).unwrap();
    let a = json(&s, &["apply", "-f", f]);
    assert_eq!(verbs(&a), [("keep".into(), "volumes".into())]);
    volume(&s, "pages");
    let a = json(&s, &["apply", "--prune", "-f", f]);
    assert_eq!(verbs(&a), [("delete".into(), "volumes".into())]);
    let e = refused(&s, &["volume", "get", "pages"]);
    assert!(e.contains("no volume \"pages\""), "{e}");

    // The rest of the CLI answers in JSON too.
    let info = json(&s, &["node", "info"]);
    assert_eq!(info["state_store_available"], true);
    assert!(info["problems"].as_array().unwrap().is_empty(), "{info}");
    let stats = json(&s, &["node", "stats", "mirror"]);
    assert!(
        stats["volumes"][0]["reads"].as_u64().unwrap() > 0,
        "{stats}"
    );
    let exports = json(&s, &["export", "list"]);
    assert_eq!(exports[0]["uris"][0], mirror);
    let stores = json(&s, &["store", "list"]);
    assert_eq!(stores[0]["name"], "local");
    let created = json(
        &s,
        &[
            "volume",
            "create",
            "scratch",
            "--device",
            "mem://scratch",
            "--size",
            "8M",
        ],
    );
    assert_eq!(created["size"], 8 * MIB);
    assert_eq!(created["kind"], "device");
    let e = refused(
        &s,
        &[
            "volume", "create", "bad", "--device", "mem://b", "--size", "1000",
        ],
    );
    assert!(e.contains("multiple of the 512-byte block size"), "{e}");
    json(&s, &["export", "delete", "scratch"]);
    assert!(!run_raw("nbdinfo", &[&format!("nbd://{}/scratch", s.addr)])
        .status
        .success());
    json(&s, &["volume", "delete", "scratch"]);
    let completion = run(common::strata_bin(), &["completions", "bash"]);
    assert!(
        completion.contains("strata") && completion.contains("apply"),
        "{completion}"
    );
}

/// An etcd server on loopback, in its own directory; killed when dropped.
struct Etcd {
    child: Option<Child>,
    client: u16,
    peer: u16,
    dir: std::path::PathBuf,
}

impl Etcd {
    fn start(dir: &std::path::Path) -> Etcd {
        let mut e = Etcd {
            child: None,
            client: free_port(),
            peer: free_port(),
            dir: dir.to_path_buf(),
        };
        e.restart();
        e
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }

    fn restart(&mut self) {
        require("etcd");
        let client = format!("http://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .args(["--name", "strata-test"])
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("strata-test={peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("etcd.log")).unwrap())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let health = format!("127.0.0.1:{}", self.client);
        wait_until("etcd to answer", Duration::from_secs(60), || {
            common::http_get(&health, "/health").is_some_and(|b| b.contains("true"))
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn two_daemons_share_desired_state_in_etcd_and_losing_it_stops_changes_not_io() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(tmp.path());
    let config = |node: &str| {
        format!(
            "data_dir = \"{{dir}}/data\"\n[nbd]\nlisten = [\"127.0.0.1:0\"]\n[api]\nnode_name = \
             \"{node}\"\n[state]\nstore = \"etcd://{}/strata-test\"\nreconcile_secs = 0.1\n",
            etcd.endpoint()
        )
    };
    let a = Strata::start(&config("a"));
    let b = Strata::start(&config("b"));
    let file = tmp.path().join("spec.yaml");
    let f = file.to_str().unwrap();
    let doc = "volumes:\n  - name: va\n    device: mem://va\n    size: 16M\n  - name: vb\n    \
               device: mem://vb\n    size: 16M\n    node: b\n";
    std::fs::write(&file, doc).unwrap();
    let applied = json(&a, &["apply", "-f", f]);
    assert!(
        applied["actions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["done"] == true),
        "{applied}"
    );
    // b sees the same desired state, serves its volume, and has nothing to change.
    assert_eq!(json(&b, &["spec", "get"])["spec"], doc);
    wait_until("b to serve vb", Duration::from_secs(30), || {
        b.cli_raw(&["volume", "get", "vb"]).status.success()
    });
    assert_eq!(json(&b, &["diff", "-f", f])["unchanged"], true);
    let names = |s: &Strata| -> Vec<String> {
        json(s, &["volume", "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["spec"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&a), ["va"]);
    assert_eq!(names(&b), ["vb"]);
    let va = format!("nbd://{}/va", a.addr);
    qemu_io(&va, false, &["write -P 0x61 0 1M"]);

    // etcd goes away: I/O goes on, changes are refused with a clear error.
    etcd.stop();
    qemu_io(&va, false, &["write -P 0x62 1M 1M"]);
    qemu_io(&va, true, &["read -P 0x61 0 1M", "read -P 0x62 1M 1M"]);
    let e = refused(
        &a,
        &[
            "volume", "create", "vc", "--device", "mem://vc", "--size", "8M",
        ],
    );
    assert!(e.contains("unavailable") && e.contains("etcd://"), "{e}");
    let e = refused(&a, &["apply", "-f", f]);
    assert!(e.contains("unavailable"), "{e}");
    assert_eq!(json(&a, &["node", "info"])["state_store_available"], false);
    assert_eq!(names(&a), ["va"], "the volume keeps serving");

    // etcd is back: changes work again.
    etcd.restart();
    wait_until("a to see etcd again", Duration::from_secs(30), || {
        json(&a, &["node", "info"])["state_store_available"] == true
    });
    json(
        &a,
        &[
            "volume", "create", "vc", "--device", "mem://vc", "--size", "8M",
        ],
    );
    assert_eq!(names(&a), ["va", "vc"]);
    qemu_io(&va, true, &["read -P 0x61 0 1M", "read -P 0x62 1M 1M"]);
}

/// Check a Prometheus text exposition line by line; the samples as (name{labels}, value).
fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    let mut typed = std::collections::BTreeMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current = String::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, arg) = (parts.next().unwrap(), parts.next().unwrap(), parts.next());
            assert!(name_ok(name), "bad metric name in {line:?}");
            if kw == "TYPE" {
                let t = arg.unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&t), "{line}");
                assert!(
                    typed.insert(name.to_string(), t.to_string()).is_none(),
                    "TYPE twice: {line}"
                );
                assert!(
                    !finished.contains(&name.to_string()),
                    "family {name} split in two groups"
                );
                if !current.is_empty() {
                    finished.push(current.clone());
                }
                current = name.to_string();
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "bad name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert_eq!(
            family, current,
            "sample outside its family's group: {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
                let inner = inner.unwrap_or_else(|| panic!("bad labels in {line:?}"));
                let mut rest = inner;
                while !rest.is_empty() {
                    let (k, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("{line:?}"));
                    assert!(name_ok(k), "bad label name in {line:?}");
                    let mut end = None;
                    let mut escaped = false;
                    for (i, c) in after.char_indices() {
                        match (escaped, c) {
                            (true, _) => escaped = false,
                            (false, '\\') => escaped = true,
                            (false, '"') => {
                                end = Some(i);
                                break;
                            }
                            _ => {}
                        }
                    }
                    let end = end.unwrap_or_else(|| panic!("unterminated label in {line:?}"));
                    rest = after[end + 1..].trim_start_matches(',');
                }
            }
        }
        samples.push((series.to_string(), v));
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .unwrap_or_else(|| panic!("no {series}"))
        .1
}

#[test]
fn metrics_scraped_during_fio_move_and_parse_as_prometheus_text() {
    require("fio");
    require("python3");
    let s = Strata::start_with(common::CONFIG, &["--log-format", "json"]);
    let url = s.metrics_url();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let uri = s.uri("scratch");
    let mut fio = Command::new("fio")
        .args([
            "--name=metrics",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=256M",
            "--time_based",
            "--runtime=30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let writes = r#"strata_volume_requests_total{volume="scratch",op="write"}"#;
    let first = parse_exposition(&common::http_get(&addr, "/metrics").unwrap());
    let start = sample(&first, writes);
    let mut last = String::new();
    wait_until("the write counter to move", Duration::from_secs(30), || {
        last = common::http_get(&addr, "/metrics").unwrap();
        sample(&parse_exposition(&last), writes) > start + 1000.0
    });
    let _ = fio.kill();
    let _ = fio.wait();
    let samples = parse_exposition(&last);
    let reads = r#"strata_volume_requests_total{volume="scratch",op="read"}"#;
    assert!(sample(&samples, reads) > 0.0);
    let bytes = r#"strata_volume_bytes_total{volume="scratch",op="write"}"#;
    assert!(sample(&samples, bytes) >= 4096.0 * 1000.0);
    // The latency histogram is cumulative and its count is the +Inf bucket.
    let buckets: Vec<f64> = samples
        .iter()
        .filter(|(s, _)| {
            s.starts_with(r#"strata_volume_latency_seconds_bucket{volume="scratch",op="write""#)
        })
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(buckets.len(), 17);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    let count = sample(
        &samples,
        r#"strata_volume_latency_seconds_count{volume="scratch",op="write"}"#,
    );
    assert_eq!(count, *buckets.last().unwrap());
    assert!(last.contains("strata_volume_queue_depth{volume=\"scratch\"}"));
    // An independent parser agrees: prometheus_client's.
    let check = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
n = sum(len(f.samples) for f in text_string_to_metric_families(sys.stdin.read()))
print(n)
"#;
    let mut py = Command::new("python3")
        .args(["-c", check])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(last.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejects the exposition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(n, samples.len());
    // Anything but GET /metrics is refused.
    assert!(common::http_get(&addr, "/").is_none());
    // The log is JSON, one object a line; a connection's lines carry its id and volume.
    let log = s.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["volume"] == "scratch" && l["span"]["conn"].is_u64()),
        "{log}"
    );
}
