//! Fuzz targets for the daemon's decoders of text it does not control: the configuration's
//! TOML, a spec's YAML, and the access tokens (HS256 JWTs) clients present as export names.
//! Each is fed valid inputs mutated byte by byte and arbitrary text, a bounded number of cases
//! (`STRATA_FUZZ_CASES`, default 2000 each): none may panic, every refusal says what is wrong,
//! and a token is accepted only as it was signed.

use base64::Engine;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use strata::daemon::config::Config;
use strata::daemon::jwt::Jwt;
use strata::daemon::manager::spec;

fn cases() -> u32 {
    std::env::var("STRATA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Run `case` over `strategy`; a panic inside it fails the test with the input that caused it.
fn fuzz<S: Strategy>(strategy: S, case: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(RunnerConfig {
        cases: cases(),
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&strategy, |input| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(input))) {
            Ok(r) => r,
            Err(p) => {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(TestCaseError::fail(format!("panicked: {what}")))
            }
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Valid inputs changed by up to four byte edits (replace, insert or delete), or cut short.
fn mutated(seeds: Vec<String>) -> impl Strategy<Value = String> {
    let edit = (any::<usize>(), any::<u8>(), 0u8..3);
    (
        0..seeds.len(),
        proptest::collection::vec(edit, 0..5),
        any::<Option<usize>>(),
    )
        .prop_map(move |(i, edits, cut)| {
            let mut b = seeds[i].as_bytes().to_vec();
            for (at, byte, kind) in edits {
                let at = at % (b.len() + 1);
                match kind {
                    0 if at < b.len() => b[at] = byte,
                    1 => b.insert(at, byte),
                    _ if at < b.len() => {
                        b.remove(at);
                    }
                    _ => {}
                }
            }
            if let Some(c) = cut {
                b.truncate(c % (b.len() + 1));
            }
            String::from_utf8_lossy(&b).into_owned()
        })
}

/// Mutated seeds, and text of the right alphabet in any order.
fn inputs(seeds: &[&str], alphabet: &str) -> BoxedStrategy<String> {
    let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
    prop_oneof![
        4 => mutated(seeds),
        1 => proptest::string::string_regex(alphabet).expect("a regex"),
    ]
    .boxed()
}

const CONFIGS: &[&str] = &[
    r#"
data_dir = "/tmp/strata-fuzz"

[nbd]
listen = ["127.0.0.1:10809"]
max_connections = 64

[nvmf]
listen = ["127.0.0.1:4420"]

[pagestore]
checkpoint_bytes = "1M"
segment_bytes = "512K"
max_segments = 8

[[store]]
name = "local"
type = "dir"
path = "/tmp/strata-fuzz/objects"

[[volume]]
name = "vm"
uri = "image://local/vm?size=64M"
exports = ["nbd", "nvmf"]

[[volume]]
name = "db"
replicas = ["file:///tmp/a.img?size=16M", "mem://b?size=16M"]
description = "a mirror"
"#,
    r#"
[nbd]
listen = ["[::1]:0"]
unix = ["/tmp/strata.sock"]
default_export = "scratch"

[[store]]
name = "s3"
type = "s3"
endpoint = "http://127.0.0.1:9000"
region = "us-east-1"
bucket = "b"
access_key_id = "AK"
secret_access_key = "SK"

[[volume]]
name = "scratch"
uri = "mem://scratch?size=1G"
read_only = true

[state]
reconcile_secs = 2.5

[gc]
interval_secs = 60
grace_secs = 30
"#,
];

#[test]
fn config_toml_never_panics_and_names_what_is_wrong() {
    for seed in CONFIGS {
        let c = Config::parse(seed).unwrap_or_else(|e| panic!("a seed: {e:#}"));
        c.validate().unwrap_or_else(|e| panic!("a seed: {e:#}"));
    }
    fuzz(
        inputs(CONFIGS, "[a-z_\\[\\]=\" .0-9:/\n-]{0,300}"),
        |text| {
            let config = match Config::parse(&text) {
                Ok(c) => c,
                Err(e) => {
                    prop_assert!(!format!("{e:#}").trim().is_empty(), "an empty error");
                    return Ok(());
                }
            };
            // What the daemon does with a parsed file before opening anything.
            for r in [
                config.validate().map(|_| ()),
                config.volume_decls().map(|_| ()),
                config.store_entries().map(|_| ()),
                config.jwt().map(|_| ()),
            ] {
                if let Err(e) = r {
                    prop_assert!(!format!("{e:#}").trim().is_empty(), "an empty error");
                }
            }
            Ok(())
        },
    );
}

const SPECS: &[&str] = &[
    r#"version: 1
volumes:
  - name: db
    size: 10G
    replicas:
      - file:///var/lib/strata/db-0.img
      - nbd://10.0.0.2:10809/db-2
    description: "orders database"
    dirty_granularity: 64K
  - name: vm
    size: 20G
    image: s3/vm
    snapshots: [golden]
  - name: scratch
    device: mem://scratch
    size: 1G
    export: false
    read_only: false
    node: node-b
"#,
    r#"volumes:
  - {name: a, device: "file:///tmp/a.img", size: 4096, exports: [nbd, nvmf], nvmf_hosts: ["nqn.2014-08.org.example:h"]}
  - {name: b, image: local/b, size: 1M, page_size: 64K}
"#,
];

#[test]
fn spec_yaml_never_panics_and_names_what_is_wrong() {
    for seed in SPECS {
        spec::parse(seed, "node-a").unwrap_or_else(|e| panic!("a seed: {e}"));
    }
    fuzz(inputs(SPECS, "[a-z_:\\[\\]{}, \n0-9./-]{0,300}"), |text| {
        match spec::parse(&text, "node-a") {
            Ok(volumes) => {
                for v in volumes {
                    prop_assert!(!v.def.name.is_empty() && v.path.starts_with("volumes["));
                }
            }
            Err(e) => prop_assert!(!e.trim().is_empty(), "an empty error"),
        }
        Ok(())
    });
}

const SECRET: &[u8] = b"fuzzing secret";

/// An HS256 token over `claims`, signed with `secret`.
fn sign(secret: &[u8], header: &str, claims: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let text = format!("{}.{}", b64.encode(header), b64.encode(claims));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, text.as_bytes());
    format!("{text}.{}", b64.encode(sig.as_ref()))
}

fn tokens() -> Vec<String> {
    let far = 4_000_000_000u64;
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;
    [
        format!(
            r#"{{"image_id":"vm-1.mvps-image","image_size":1073741824,"page_size_bits":12,"exp":{far}}}"#
        ),
        format!(
            r#"{{"image_id":"a_b.mvps-image","image_size":65536,"page_size_bits":16,"exp":{far},"nbf":1,"client_id":"c"}}"#
        ),
    ]
    .iter()
    .map(|c| sign(SECRET, header, c))
    .collect()
}

#[test]
fn access_tokens_are_accepted_only_as_signed() {
    let jwt = Jwt::new(SECRET, "local");
    let valid = tokens();
    for t in &valid {
        jwt.verify(t).expect("a token signed with the secret");
    }
    let seeds: Vec<&str> = valid.iter().map(String::as_str).collect();
    fuzz(inputs(&seeds, "[A-Za-z0-9_.-]{0,200}"), |token| {
        match jwt.verify(&token) {
            // Any change to the header or the claims breaks the signature; only the
            // signature's own unused trailing bits could change without effect, and the
            // decoder refuses those.
            Ok(_) => prop_assert!(valid.contains(&token), "accepted a changed token {token:?}"),
            Err(e) => prop_assert!(
                format!("{e:#}").starts_with("access token: "),
                "an unclear error: {e:#}"
            ),
        }
        Ok(())
    });
    // Signed with another secret, or with a header that is not HS256: refused.
    let other = sign(
        b"another secret",
        r#"{"alg":"HS256"}"#,
        r#"{"image_id":"vm.mvps-image","image_size":4096,"page_size_bits":12,"exp":4000000000}"#,
    );
    assert!(jwt.verify(&other).is_err());
    let none = sign(
        SECRET,
        r#"{"alg":"none"}"#,
        r#"{"image_id":"vm.mvps-image","image_size":4096,"page_size_bits":12,"exp":4000000000}"#,
    );
    assert!(jwt.verify(&none).is_err());
}
