//! Several daemons as one storage system: three `strata serve`, each in a network namespace of
//! its own on a bridge the test makes (veth pairs), sharing an etcd the test starts, with a
//! client in a namespace of its own.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{require, wait_until, Etcd, Strata};
use serde_json::Value;

/// Run `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    require("ip");
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Network namespaces on a bridge in this namespace: host `i` of the list is
/// `10.77.SUBNET.(10 + i)`, the bridge `.1`. Everything is removed when dropped.
struct Net {
    bridge: String,
    subnet: u8,
    hosts: Vec<Host>,
}

struct Host {
    name: String,
    netns: String,
    /// The veth end on the bridge.
    link: String,
    ip: String,
}

impl Net {
    /// `case` tells apart the networks of tests running at once.
    fn new(case: u8, names: &[&str]) -> Net {
        let id = std::process::id() % 10_000;
        let subnet = ((std::process::id() % 40) * 5 + u32::from(case)) as u8 + 20;
        let bridge = format!("stb{id}x{case}");
        let mut net = Net {
            bridge: bridge.clone(),
            subnet,
            hosts: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.gateway()),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, name) in names.iter().enumerate() {
            let host = Host {
                name: name.to_string(),
                netns: format!("strata-{id}-{case}-{name}"),
                link: format!("stv{id}x{case}x{i}"),
                ip: format!("10.77.{subnet}.{}", 10 + i),
            };
            ip(&["netns", "add", &host.netns]);
            net.hosts.push(host);
            let host = net.hosts.last().unwrap();
            ip(&[
                "link",
                "add",
                &host.link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.netns,
            ]);
            ip(&["link", "set", &host.link, "master", &bridge, "up"]);
            ip(&[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &host.netns, "link", "set", "eth0", "up"]);
            ip(&["-n", &host.netns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn gateway(&self) -> String {
        format!("10.77.{}.1", self.subnet)
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap()
    }

    /// Run a program in `name`'s namespace; its output whatever the exit status.
    fn run_in(&self, name: &str, program: &str, args: &[&str]) -> std::process::Output {
        require(program);
        Command::new("timeout")
            .args(["--kill-after=10", "300", "ip", "netns", "exec"])
            .arg(&self.host(name).netns)
            .arg(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program} in {name}: {e}"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// The configuration of node `name` at `ip`, sharing `etcd`.
fn node_config(name: &str, ip: &str, etcd: &str, zone: &str) -> String {
    format!(
        "data_dir = \"{{dir}}/data\"\n\
         [nbd]\nlisten = [\"{ip}:10809\"]\n\
         [nvmf]\nlisten = [\"{ip}:4420\"]\n\
         [api]\nnode_name = \"{name}\"\n\
         [state]\nstore = \"etcd://{etcd}/strata\"\nreconcile_secs = 0.2\n\
         [cluster]\nlease_secs = 3\nlabels = {{ zone = \"{zone}\" }}\n\
         [[pool]]\nname = \"p1\"\npath = \"{{dir}}/pool\"\n\
         [[volume]]\nname = \"scratch-{name}\"\nuri = \"mem://scratch-{name}?size=16M\"\n"
    )
}

/// Three nodes `a`, `b`, `c` (zones z1, z2, z3) and a client namespace on one bridge, and etcd
/// on the bridge's address.
struct Cluster {
    // Dropped in this order: the daemons, etcd, then the network.
    nodes: BTreeMap<String, Strata>,
    etcd: Etcd,
    _tmp: tempfile::TempDir,
    net: Net,
}

const NODES: [&str; 3] = ["a", "b", "c"];

impl Cluster {
    fn start(case: u8) -> Cluster {
        let net = Net::new(case, &["a", "b", "c", "client"]);
        let tmp = tempfile::tempdir().unwrap();
        let etcd = Etcd::start_on(&net.gateway(), tmp.path());
        let mut cluster = Cluster {
            net,
            etcd,
            _tmp: tmp,
            nodes: BTreeMap::new(),
        };
        for name in NODES {
            let dir = tempfile::tempdir().unwrap();
            cluster.start_node(name, dir);
        }
        cluster
    }

    fn config(&self, name: &str) -> String {
        let zone = format!("z{}", NODES.iter().position(|n| *n == name).unwrap() + 1);
        node_config(name, &self.net.host(name).ip, &self.etcd.endpoint(), &zone)
    }

    fn start_node(&mut self, name: &str, dir: tempfile::TempDir) {
        let netns = self.net.host(name).netns.clone();
        let s = Strata::start_wrapped(
            dir,
            &self.config(name),
            &["ip", "netns", "exec", &netns],
            &[],
            &[],
        );
        self.nodes.insert(name.to_string(), s);
    }

    /// Poll `cond` until it holds; after `limit`, fail with every node's log.
    fn wait(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + limit;
        while !cond() {
            if std::time::Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|(n, s)| {
                        let log = s.log();
                        let tail: Vec<&str> = log.lines().rev().take(40).collect();
                        let tail: Vec<&str> = tail.into_iter().rev().collect();
                        format!("--- node {n}:\n{}", tail.join("\n"))
                    })
                    .collect();
                panic!(
                    "timed out after {limit:?} waiting for {what}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn node(&self, name: &str) -> &Strata {
        &self.nodes[name]
    }

    /// kill -9 a node's daemon; its directory, to start it again.
    fn kill(&mut self, name: &str) -> tempfile::TempDir {
        self.nodes.remove(name).unwrap().crash()
    }
}

fn json(s: &Strata, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = s.cli(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("strata {args:?}: {e}: {out}"))
}

/// `strata node list` as seen from `s`: node name → its entry.
fn nodes(s: &Strata) -> BTreeMap<String, Value> {
    json(s, &["node", "list"])["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_string(), n.clone()))
        .collect()
}

fn alive(s: &Strata) -> Vec<String> {
    nodes(s)
        .into_iter()
        .filter(|(_, n)| n["alive"] == true)
        .map(|(k, _)| k)
        .collect()
}

#[test]
fn nodes_register_under_leases_are_listed_alive_or_dead_and_a_taken_name_is_refused() {
    let mut cluster = Cluster::start(1);
    let a = cluster.node("a");

    // Every node is listed, alive, with where it serves, its labels and its pools.
    wait_until("three live nodes", Duration::from_secs(30), || {
        alive(cluster.node("a")) == ["a", "b", "c"]
    });
    let listed = nodes(a);
    for (i, name) in NODES.iter().enumerate() {
        let n = &listed[*name];
        let ip = &cluster.net.host(name).ip;
        assert_eq!(
            n["addresses"]["nbd"]["addresses"][0],
            format!("{ip}:10809"),
            "{n}"
        );
        assert_eq!(
            n["addresses"]["nvmf"]["addresses"][0],
            format!("{ip}:4420"),
            "{n}"
        );
        assert_eq!(n["labels"]["zone"], format!("z{}", i + 1), "{n}");
        let protocols = n["protocols"].as_array().unwrap();
        assert!(protocols.contains(&"nbd".into()) && protocols.contains(&"nvmf".into()));
        let pool = &n["pools"][0];
        assert_eq!(pool["name"], "p1", "{n}");
        assert!(pool["free_bytes"].as_u64().unwrap() > 0, "{n}");
    }
    // Every node sees the same list.
    assert_eq!(alive(cluster.node("c")), ["a", "b", "c"]);

    // What a pool holds shows as used.
    let b_pool = cluster.node("b").path("pool");
    let before = listed["b"]["pools"][0]["used_bytes"].as_u64().unwrap();
    std::fs::write(b_pool.join("held.img"), vec![1u8; 4 << 20]).unwrap();
    wait_until(
        "b's pool to show 4 MiB more used",
        Duration::from_secs(30),
        || {
            nodes(cluster.node("a"))["b"]["pools"][0]["used_bytes"]
                .as_u64()
                .unwrap()
                >= before + (4 << 20)
        },
    );

    // A second daemon taking b's name (elsewhere, with its own ports) is refused, and says who
    // holds the name.
    let dup_dir = tempfile::tempdir().unwrap();
    let dup_config = node_config(
        "b",
        &cluster.net.host("client").ip,
        &cluster.etcd.endpoint(),
        "z9",
    )
    .replace("{dir}", &dup_dir.path().to_string_lossy());
    let dup_path = dup_dir.path().join("strata.toml");
    std::fs::write(&dup_path, dup_config).unwrap();
    let out = cluster.net.run_in(
        "client",
        common::strata_bin(),
        &[
            "serve",
            "--config",
            dup_path.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the duplicate started: {stderr}");
    assert!(
        stderr.contains("node name \"b\" is taken")
            && stderr.contains(&format!("pid {}", cluster.node("b").pid())),
        "{stderr}"
    );
    // b is still b: its record was not replaced by the refused daemon's.
    assert_eq!(nodes(cluster.node("a"))["b"]["labels"]["zone"], "z2");

    // kill -9: c's lease lapses and it is listed dead, its record kept.
    let c_dir = cluster.kill("c");
    wait_until("c to be seen dead", Duration::from_secs(30), || {
        alive(cluster.node("a")) == ["a", "b"]
    });
    let c = &nodes(cluster.node("b"))["c"];
    assert_eq!(c["alive"], false);
    assert_eq!(c["pools"][0]["name"], "p1", "{c}");
    assert_eq!(
        c["addresses"]["nbd"]["addresses"][0],
        format!("{}:10809", cluster.net.host("c").ip)
    );

    // It starts again on its data and is alive again.
    cluster.start_node("c", c_dir);
    wait_until("c to be alive again", Duration::from_secs(30), || {
        alive(cluster.node("a")) == ["a", "b", "c"]
    });

    // A clean stop gives the name back at once (no lease to wait for); the record stays.
    let (status, _) = cluster.nodes.remove("b").unwrap().stop();
    assert!(status.success());
    assert_eq!(alive(cluster.node("a")), ["a", "c"]);

    // Without etcd, the nodes go on serving their volumes to the client.
    cluster.etcd.stop();
    let uri = format!("nbd://{}:10809/scratch-a", cluster.net.host("a").ip);
    for cmd in ["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"] {
        let out = cluster
            .net
            .run_in("client", "qemu-io", &["-f", "raw", "-c", cmd, &uri]);
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
            "qemu-io {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let refused = cluster.node("a").cli_raw(&["node", "list"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unavailable"));
    // etcd is back: a and c hold their names again.
    cluster.etcd.restart();
    wait_until(
        "a and c alive after etcd returns",
        Duration::from_secs(60),
        || {
            cluster
                .node("a")
                .cli_raw(&["node", "list"])
                .status
                .success()
                && alive(cluster.node("a")) == ["a", "c"]
        },
    );
}

/// The nexus's children as `strata volume get` shows them: (URI, state).
fn children(s: &Strata, volume: &str) -> Vec<(String, String)> {
    json(s, &["volume", "get", volume])["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["uri"].as_str().unwrap().to_string(),
                c["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The files in a node's pool.
fn pool_files(s: &Strata) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(s.path("pool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// fio (nbd engine) in the client's namespace: random writes verified with crc32c; no errors.
fn fio_verify_in(net: &Net, host: &str, uri: &str) {
    let out = net.run_in(
        host,
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=terse",
            "--terse-version=3",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio on {uri}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Terse v3: field 5 is the error count.
    let fields: Vec<&str> = stdout.lines().last().unwrap_or("").split(';').collect();
    assert!(fields.len() > 5, "{stdout}");
    assert_eq!(fields[4], "0", "fio reported errors on {uri}: {stdout}");
}

#[test]
fn replicas_by_count_go_to_three_nodes_and_fio_verifies_through_the_nexus() {
    let cluster = Cluster::start(2);
    let a = cluster.node("a");
    wait_until("three live nodes", Duration::from_secs(30), || {
        alive(cluster.node("a")) == ["a", "b", "c"]
    });
    a.cli(&["volume", "create", "v", "--replicas", "3", "--size", "64M"]);

    // One replica on each node: a file in a's pool, and b's and c's over NVMe/TCP.
    let uris: Vec<String> = children(a, "v").into_iter().map(|(u, _)| u).collect();
    assert_eq!(uris.len(), 3, "{uris:?}");
    let a_pool = a.path("pool").canonicalize().unwrap();
    assert!(
        uris.iter().any(|u| [a_pool.clone(), a.path("pool")]
            .iter()
            .any(|p| u.starts_with(&format!("aio://{}/", p.display())))),
        "{uris:?}"
    );
    for node in ["b", "c"] {
        let prefix = format!("nvmf://{}:4420/", cluster.net.host(node).ip);
        assert!(
            uris.iter().any(|u| u.starts_with(&prefix)),
            "no replica on {node}: {uris:?}"
        );
    }
    // b and c each hold theirs in their pool, exported over NVMe/TCP only.
    for node in ["b", "c"] {
        wait_until(
            &format!("{node} to hold a replica file"),
            Duration::from_secs(30),
            || pool_files(cluster.node(node)).len() == 1,
        );
    }
    cluster.wait("every replica online", Duration::from_secs(60), || {
        children(cluster.node("a"), "v")
            .iter()
            .all(|(_, state)| state == "online")
    });

    // fio verify from the client's namespace through the nexus on a.
    let uri = format!("nbd://{}:10809/v", cluster.net.host("a").ip);
    fio_verify_in(&cluster.net, "client", &uri);

    // The three replicas hold the same bytes.
    let out = a.cli_raw(&["volume", "get", "v"]);
    assert!(out.status.success());
    let files: Vec<std::path::PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| pool_files(cluster.node(n))[0].clone())
        .collect();
    let first = std::fs::read(&files[0]).unwrap();
    for f in &files[1..] {
        assert!(
            std::fs::read(f).unwrap()[..64 << 20] == first[..64 << 20],
            "{} differs from {}",
            f.display(),
            files[0].display()
        );
    }

    // Deleting the volume removes every replica, on every node.
    a.cli(&["volume", "delete", "v"]);
    for node in ["a", "b", "c"] {
        wait_until(
            &format!("{node}'s replica to be deleted"),
            Duration::from_secs(30),
            || pool_files(cluster.node(node)).is_empty(),
        );
    }
}
