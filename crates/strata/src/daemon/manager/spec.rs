//! Declarative specs (`strata apply -f spec.yaml`): the volumes a cluster should have. Applying
//! one compares it with the declarations in the state store, plans what differs, refuses what
//! cannot be done safely (with the field and the reason), writes the declarations that changed
//! and lets reconciliation make them real. The format is in `docs/SPEC.md`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use strata_nexus::NexusSettings;
use tracing::info;

use super::{
    check_volume_name, Backing, Caller, ImageDecl, ImageKey, Manager, NexusDecl, OpError, OpKind,
    OpResult, Protocol, VolumeDecl, DEFAULT_PAGE_SIZE,
};
use crate::format::human_bytes;

/// The document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecDoc {
    /// The format version; 1 if absent.
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    volumes: Vec<VolumeEntry>,
}

/// One volume as a spec writes it.
#[derive(Debug, Deserialize)]
struct VolumeEntry {
    name: String,
    #[serde(default, with = "opt_size")]
    size: Option<u64>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    replicas: Option<Vec<String>>,
    #[serde(default)]
    image: Option<String>,
    /// An image's page size (default 4096).
    #[serde(default, with = "opt_size")]
    page_size: Option<u64>,
    /// The protocols it is exported over (default: every one the daemon serves).
    #[serde(default)]
    exports: Option<Vec<String>>,
    /// `false`: not exported (the same as `exports: []`).
    #[serde(default)]
    export: Option<bool>,
    /// NVMe/TCP: host NQNs allowed to connect (default: any host).
    #[serde(default)]
    nvmf_hosts: Vec<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    description: String,
    #[serde(default)]
    node: Option<String>,
    /// Snapshots that must exist (image volumes).
    #[serde(default)]
    snapshots: Vec<String>,
    /// A nexus's settings (`strata_nexus::NexusSettings`: dirty_granularity, rebuild_segment,
    /// rebuild_parallel, child_timeout_secs); any other field is a mistake, reported by name.
    #[serde(flatten)]
    nexus: serde_yaml_ng::Mapping,
}

/// An optional size written as bytes or with a unit.
mod opt_size {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(serde::Deserialize)]
        struct S(#[serde(with = "strata_bdev::units::size")] u64);
        Ok(<Option<S> as serde::Deserialize>::deserialize(d)?.map(|s| s.0))
    }
}

/// A volume a spec declares, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub def: VolumeDecl,
    pub snapshots: Vec<String>,
    /// Its place in the document, for messages: `volumes[3]`.
    pub path: String,
    /// The spec names its node (else it is created on the node applying the spec, and stays
    /// where it is once it exists).
    pub node_given: bool,
}

/// Parse and validate a spec; `node` is the node volumes without one go to. Errors name the
/// field (`volumes[1].replicas[0]: …`).
pub fn parse(text: &str, node: &str) -> Result<Vec<Desired>, String> {
    let doc: SpecDoc = serde_yaml_ng::from_str(text).map_err(|e| format!("spec: {e}"))?;
    if let Some(v) = doc.version.filter(|&v| v != 1) {
        return Err(format!(
            "version: {v} is not a spec version this daemon reads (1)"
        ));
    }
    let mut out: Vec<Desired> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, v) in doc.volumes.into_iter().enumerate() {
        let path = format!("volumes[{i}]");
        if let Some(first) = seen.insert(v.name.clone(), i) {
            return Err(format!(
                "{path}.name: {:?} is declared twice (also volumes[{first}])",
                v.name
            ));
        }
        let nexus_set = !v.nexus.is_empty();
        let settings: NexusSettings =
            serde_yaml_ng::from_value(serde_yaml_ng::Value::Mapping(v.nexus))
                .map_err(|e| format!("{path}: {e}"))?;
        let backing = match (v.device, v.replicas, v.image) {
            (Some(d), None, None) => Backing::Device(d),
            (None, Some(replicas), None) => Backing::Nexus(NexusDecl {
                replicas,
                settings,
                placed: None,
            }),
            (None, None, Some(i)) => Backing::Image(ImageDecl {
                key: ImageKey::parse(&i).map_err(|e| format!("{path}.image: {e}"))?,
                page_size: match v.page_size {
                    None => DEFAULT_PAGE_SIZE,
                    Some(p) => u32::try_from(p)
                        .map_err(|_| format!("{path}.page_size: {p} is too large"))?,
                },
            }),
            _ => {
                return Err(format!(
                    "{path}: give exactly one of device (a URI), replicas (a list of URIs) or \
                     image (STORE/IMAGE)"
                ))
            }
        };
        if nexus_set && !matches!(backing, Backing::Nexus(_)) {
            return Err(format!(
                "{path}: dirty_granularity, rebuild_segment, rebuild_parallel and \
                 child_timeout_secs apply to nexus volumes (replicas) only"
            ));
        }
        let exports = match (v.exports, v.export) {
            (Some(list), _) => list
                .iter()
                .enumerate()
                .map(|(j, p)| Protocol::parse(p).map_err(|e| format!("{path}.exports[{j}]: {e}")))
                .collect::<Result<_, _>>()?,
            (None, Some(false)) => Default::default(),
            (None, _) => Protocol::defaults(),
        };
        let node_given = v.node.is_some();
        let node = v.node.unwrap_or_else(|| node.to_string());
        check_volume_name(&node).map_err(|_| {
            format!("{path}.node: {node:?} is not a node name (letters, digits, . _ -)")
        })?;
        let def = VolumeDecl {
            name: v.name,
            size: v.size.unwrap_or(0),
            backing,
            exports,
            read_only: v.read_only,
            description: v.description,
            node,
            nvmf_hosts: v.nvmf_hosts,
            labels: Default::default(),
        };
        def.validate(&format!("{path}.")).map_err(|e| e.message)?;
        if !v.snapshots.is_empty() && def.image().is_none() {
            return Err(format!(
                "{path}.snapshots: only page-store image volumes have snapshots"
            ));
        }
        for (j, s) in v.snapshots.iter().enumerate() {
            strata_pagestore::check_name(s)
                .map_err(|e| format!("{path}.snapshots[{j}]: {}", e.chain()))?;
        }
        out.push(Desired {
            def,
            snapshots: v.snapshots,
            path,
            node_given,
        });
    }
    Ok(out)
}

/// One thing an apply does, or refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub verb: &'static str,
    pub path: String,
    pub volume: String,
    pub message: String,
    pub done: bool,
}

/// What to carry out for one volume.
enum Step {
    /// Create it (here, or declare it for another node).
    Create(VolumeDecl),
    /// Store the new declaration; reconciliation changes the volume.
    Declare(VolumeDecl),
    Delete(VolumeDecl),
}

struct Plan {
    actions: Vec<Action>,
    /// Per volume: what to do, and the indexes of its actions.
    steps: Vec<(Step, Vec<usize>)>,
    /// `(action index, volume, snapshot)`.
    snapshots: Vec<(usize, String, String)>,
}

impl Plan {
    fn push(&mut self, verb: &'static str, path: &str, volume: &str, message: String) -> usize {
        self.actions.push(Action {
            verb,
            path: path.to_string(),
            volume: volume.to_string(),
            message,
            done: false,
        });
        self.actions.len() - 1
    }
}

const SPEC_KEY: &str = "spec";
/// The volumes specs declared and that were not pruned since: what `--prune` may delete.
const SPEC_NAMES_KEY: &str = "spec-volumes";

/// The volumes earlier applies declared (and did not prune).
async fn previous_names(manager: &Manager) -> OpResult<BTreeSet<String>> {
    let Some(v) = manager.state.get(SPEC_NAMES_KEY).await? else {
        return Ok(BTreeSet::new());
    };
    serde_json::from_slice(&v).map_err(|e| {
        OpError::new(
            OpKind::Internal,
            format!("state store key {SPEC_NAMES_KEY} is not a list of names: {e}"),
        )
    })
}

/// The spec last applied, if any.
pub async fn current(manager: &Manager) -> OpResult<String> {
    Ok(manager
        .state
        .get(SPEC_KEY)
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default())
}

/// Compare `desired` with the declarations and plan the changes.
async fn plan(manager: &Manager, desired: &[Desired], prune: bool) -> OpResult<Plan> {
    let records: BTreeMap<String, VolumeDecl> = manager
        .records()
        .await?
        .into_iter()
        .map(|d| (d.name.clone(), d))
        .collect();
    let mut p = Plan {
        actions: Vec::new(),
        steps: Vec::new(),
        snapshots: Vec::new(),
    };
    for d in desired {
        let want = &d.def;
        let name = want.name.as_str();
        let path = d.path.as_str();
        if manager.get(name).is_ok_and(|m| m.from_config) {
            p.push(
                "refuse",
                path,
                name,
                format!(
                    "node {} declares volume {name} in its configuration file; remove it there \
                     or rename this one",
                    manager.node
                ),
            );
            continue;
        }
        let Some(have) = records.get(name) else {
            let i = p.push(
                "create",
                path,
                name,
                format!(
                    "create {} volume {name}{}",
                    want.kind(),
                    describe(want, manager)
                ),
            );
            p.steps.push((Step::Create(want.clone()), vec![i]));
            plan_snapshots(manager, &mut p, d, &BTreeSet::new()).await;
            continue;
        };
        let mut want = want.clone();
        if !d.node_given {
            want.node = have.node.clone();
        }
        if have.node != want.node {
            p.push(
                "refuse",
                &format!("{path}.node"),
                name,
                format!(
                    "volume {name} is served by node {}; moving a volume to node {} is not done \
                     in place",
                    have.node, want.node
                ),
            );
            continue;
        }
        if want.size == 0 {
            want.size = have.size;
        }
        let (changes, refusals) = diff(path, have, &want);
        if !refusals.is_empty() {
            for (field, why) in refusals {
                p.push("refuse", &field, name, why);
            }
            continue;
        }
        if !changes.is_empty() {
            let idx: Vec<usize> = changes
                .into_iter()
                .map(|(verb, field, msg)| p.push(verb, &field, name, msg))
                .collect();
            p.steps.push((Step::Declare(want.clone()), idx));
        }
        let existing = existing_snapshots(manager, &want).await;
        let placed = Desired {
            def: want.clone(),
            ..d.clone()
        };
        plan_snapshots(manager, &mut p, &placed, &existing).await;
    }
    let names: BTreeSet<&str> = desired.iter().map(|d| d.def.name.as_str()).collect();
    for old in previous_names(manager).await? {
        let Some(rec) = records.get(&old) else {
            continue;
        };
        if names.contains(old.as_str()) {
            continue;
        }
        if prune {
            let i = p.push(
                "delete",
                "volumes",
                &old,
                format!(
                    "delete volume {old} (on node {}); its devices and image keep their data",
                    rec.node
                ),
            );
            p.steps.push((Step::Delete(rec.clone()), vec![i]));
        } else {
            p.push(
                "keep",
                "volumes",
                &old,
                format!(
                    "volume {old} is no longer in the spec; kept (apply with --prune deletes it)"
                ),
            );
        }
    }
    Ok(p)
}

fn describe(d: &VolumeDecl, manager: &Manager) -> String {
    let size = if d.size > 0 {
        format!(" of {}", human_bytes(d.size))
    } else {
        String::new()
    };
    let node = if d.node != manager.node {
        format!(" on node {}", d.node)
    } else {
        String::new()
    };
    let export = if d.exports.is_empty() {
        String::new()
    } else {
        format!(", exported over {}", protocols(&d.exports))
    };
    format!("{size} {}{node}{export}", d.summary())
}

fn protocols(p: &BTreeSet<Protocol>) -> String {
    p.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}

type Change = (&'static str, String, String);

/// What differs between a declaration and the one wanted: changes that can be made, and
/// refusals `(field path, why)`.
fn diff(path: &str, have: &VolumeDecl, want: &VolumeDecl) -> (Vec<Change>, Vec<(String, String)>) {
    let mut changes = Vec::new();
    let mut refuse = Vec::new();
    let name = &want.name;
    match (&have.backing, &want.backing) {
        (Backing::Device(a), Backing::Device(b)) if a != b => refuse.push((
            format!("{path}.device"),
            format!("volume {name} is on {a}; moving it to {b} is not done in place"),
        )),
        (Backing::Image(a), Backing::Image(b)) if a != b => refuse.push((
            format!("{path}.image"),
            format!(
                "volume {name} is image {} ({}-byte pages); it cannot become {} ({}-byte pages) \
                 (clone or copy instead)",
                a.key, a.page_size, b.key, b.page_size
            ),
        )),
        (Backing::Nexus(a), Backing::Nexus(b)) if a.settings != b.settings => refuse.push((
            path.to_string(),
            format!(
                "volume {name}'s nexus settings are not changed in place (delete the volume and \
                 create it again to change them)"
            ),
        )),
        (Backing::Nexus(a), Backing::Nexus(b)) => {
            let (a, b) = (&a.replicas, &b.replicas);
            for (j, uri) in b.iter().enumerate() {
                if !a.contains(uri) {
                    changes.push((
                        "add-replica",
                        format!("{path}.replicas[{j}]"),
                        format!(
                            "add replica {uri} to {name}; a full rebuild copies the data onto it"
                        ),
                    ));
                }
            }
            for uri in a.iter().filter(|u| !b.contains(u)) {
                changes.push((
                    "remove-replica",
                    format!("{path}.replicas"),
                    format!("remove replica {uri} from {name} (its data stays on the device)"),
                ));
            }
        }
        (a, b) if std::mem::discriminant(a) != std::mem::discriminant(b) => refuse.push((
            path.to_string(),
            format!(
                "volume {name} is a {} volume; it cannot become a {} volume in place",
                have.kind(),
                want.kind()
            ),
        )),
        _ => {}
    }
    if want.size != have.size {
        match &want.backing {
            Backing::Image(_) if want.size > have.size => changes.push((
                "resize",
                format!("{path}.size"),
                format!(
                    "grow {name} from {} to {}",
                    human_bytes(have.size),
                    human_bytes(want.size)
                ),
            )),
            Backing::Image(_) => refuse.push((
                format!("{path}.size"),
                format!(
                    "shrinking {name} from {} to {} discards data; a spec does not do that (use \
                     `strata volume resize --force`)",
                    have.size, want.size
                ),
            )),
            _ => refuse.push((
                format!("{path}.size"),
                format!(
                    "{name} holds {} bytes; only page-store image volumes can be resized",
                    have.size
                ),
            )),
        }
    }
    let added: BTreeSet<Protocol> = want.exports.difference(&have.exports).copied().collect();
    let removed: BTreeSet<Protocol> = have.exports.difference(&want.exports).copied().collect();
    if !added.is_empty() {
        changes.push((
            "export",
            format!("{path}.exports"),
            format!("export {name} over {}", protocols(&added)),
        ));
    }
    if !removed.is_empty() {
        changes.push((
            "unexport",
            format!("{path}.exports"),
            format!(
                "stop exporting {name} over {} (connected clients keep their connection)",
                protocols(&removed)
            ),
        ));
    }
    if have.read_only != want.read_only
        || have.description != want.description
        || have.nvmf_hosts != want.nvmf_hosts
    {
        changes.push((
            "update",
            path.to_string(),
            format!(
                "set {name} {} and its description to {:?}",
                if want.read_only {
                    "read-only"
                } else {
                    "writable"
                },
                want.description
            ),
        ));
    }
    (changes, refuse)
}

async fn existing_snapshots(manager: &Manager, def: &VolumeDecl) -> BTreeSet<String> {
    let Some(key) = def.image() else {
        return BTreeSet::new();
    };
    let Ok(ps) = manager.stores.get(&key.store) else {
        return BTreeSet::new();
    };
    match ps.catalog().await {
        Ok(cat) => cat
            .snapshots(&key.image)
            .into_iter()
            .map(|s| s.name)
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

async fn plan_snapshots(manager: &Manager, p: &mut Plan, d: &Desired, existing: &BTreeSet<String>) {
    let name = &d.def.name;
    for (j, s) in d.snapshots.iter().enumerate() {
        if existing.contains(s) {
            continue;
        }
        let path = format!("{}.snapshots[{j}]", d.path);
        if d.def.node != manager.node {
            p.push(
                "refuse",
                &path,
                name,
                format!(
                    "snapshot {name}@{s} is taken by node {}, which serves {name}: apply the \
                     spec through it",
                    d.def.node
                ),
            );
            continue;
        }
        let i = p.push("snapshot", &path, name, format!("take snapshot {name}@{s}"));
        p.snapshots.push((i, name.clone(), s.clone()));
    }
}

/// Apply (or with `dry_run`, only plan) a spec.
pub async fn apply(
    manager: &Manager,
    text: &str,
    dry_run: bool,
    prune: bool,
    caller: &Caller,
) -> OpResult<Vec<Action>> {
    let desired = parse(text, &manager.node).map_err(OpError::invalid)?;
    for d in &desired {
        manager.allow_decl(caller, &d.def, &format!("{}.", d.path))?;
    }
    if !manager.state.available().await {
        return Err(OpError::new(
            OpKind::Unavailable,
            format!(
                "state store {} is unavailable: specs cannot be applied until it is back \
                 (volumes keep serving)",
                manager.state.describe()
            ),
        ));
    }
    let mut p = plan(manager, &desired, prune).await?;
    if dry_run {
        return Ok(p.actions);
    }
    let steps = std::mem::take(&mut p.steps);
    let mut declared = Vec::new();
    for (step, idx) in steps {
        let result = match step {
            Step::Create(def) if def.node == manager.node => {
                manager.create(def, caller).await.map(|_| ())
            }
            Step::Create(def) | Step::Declare(def) => {
                let r = manager.declare(&def, caller).await;
                declared.push((def.name.clone(), idx.clone()));
                r
            }
            Step::Delete(def) if def.node == manager.node => {
                manager.delete(&def.name, false).await.map(|_| ())
            }
            Step::Delete(def) => manager.undeclare(&def.name).await,
        };
        for i in idx {
            match &result {
                Ok(()) => p.actions[i].done = true,
                Err(e) => {
                    p.actions[i].verb = "refuse";
                    p.actions[i].message = format!("{}: {}", p.actions[i].message, e.message);
                }
            }
        }
    }
    // Remember what specs manage: this one's volumes, and older ones kept without --prune.
    let mut names: BTreeSet<String> = desired.iter().map(|d| d.def.name.clone()).collect();
    for a in &p.actions {
        if a.verb == "keep" || (a.verb == "refuse" && a.path == "volumes") {
            names.insert(a.volume.clone());
        }
    }
    manager
        .state
        .put(
            SPEC_NAMES_KEY,
            &serde_json::to_vec(&names).expect("names serialize"),
        )
        .await?;
    manager.state.put(SPEC_KEY, text.as_bytes()).await?;
    // Make this node's declarations real now rather than at the next round.
    manager.reconcile().await?;
    let problems: BTreeMap<String, String> = manager.problems().into_iter().collect();
    for (volume, idx) in declared {
        if let Some(why) = problems.get(&volume) {
            for i in idx {
                p.actions[i].done = false;
                p.actions[i].verb = "refuse";
                p.actions[i].message = format!("{}: {why}", p.actions[i].message);
            }
        }
    }
    for (i, volume, snap) in std::mem::take(&mut p.snapshots) {
        let r = manager.create_snapshot(&volume, &snap).await;
        match r {
            Ok(_) => p.actions[i].done = true,
            Err(e) => {
                p.actions[i].verb = "refuse";
                p.actions[i].message = format!("{}: {}", p.actions[i].message, e.message);
            }
        }
    }
    let done = p.actions.iter().filter(|a| a.done).count();
    info!(actions = p.actions.len(), done, "spec applied");
    Ok(p.actions)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_a_spec_and_names_the_field_of_each_error() {
        let ok = parse(
            r#"
volumes:
  - name: db
    size: 64M
    replicas: ["file:///a.img", "file:///b.img"]
    rebuild_parallel: 8
    child_timeout_secs: 5
  - name: scratch
    image: local/scratch
    size: 1G
    snapshots: [base]
    node: n2
"#,
            "n1",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].def.size, 64 << 20);
        assert_eq!(ok[0].def.node, "n1");
        assert_eq!(ok[1].def.node, "n2");
        let err = |text: &str| parse(text, "n1").unwrap_err();
        assert_eq!(ok[0].def.exports, Protocol::defaults());
        let Backing::Nexus(n) = &ok[0].def.backing else {
            panic!("a nexus")
        };
        assert_eq!(n.settings.rebuild_parallel, 8);
        assert_eq!(
            n.settings.io_timeout,
            Some(std::time::Duration::from_secs(5))
        );
        let e = err("volumes:\n  - {name: a, device: mem://a, rebuild_parallel: 2}\n");
        assert!(e.contains("nexus volumes"), "{e}");
        let e = err("volumes:\n  - {name: a, device: mem://a, exports: [carrier-pigeon]}\n");
        assert!(e.starts_with("volumes[0].exports[0]:"), "{e}");
        let e = err("volumes:\n  - {name: a, replicas: [mem://a], child_timeout_secs: 1e300}\n");
        assert!(e.contains("31 years"), "{e}");

        let e = err("volumes:\n  - name: a\n    replica: [x]\n");
        assert!(e.contains("volumes[0]") && e.contains("replica"), "{e}");
        let e = err("volumes:\n  - name: a\n    device: mem://a\n    size: 1000\n");
        assert!(e.starts_with("volumes[0].size:"), "{e}");
        let e = err("volumes:\n  - {name: a, device: mem://a}\n  - {name: a, device: mem://b}\n");
        assert!(
            e.starts_with("volumes[1].name:") && e.contains("twice"),
            "{e}"
        );
        let e = err("volumes:\n  - {name: a, replicas: [\"file:///x\", \"bad uri\"]}\n");
        assert!(e.starts_with("volumes[0].replicas[1]:"), "{e}");
        let e = err("volumes:\n  - {name: a, device: mem://a, image: local/a}\n");
        assert!(e.contains("exactly one of"), "{e}");
        let e = err("volumes:\n  - {name: a, device: mem://a, snapshots: [s]}\n");
        assert!(e.starts_with("volumes[0].snapshots:"), "{e}");
        let e = err("volumes:\n  - {name: a, image: local/a, snapshots: [\"no/slash\"]}\n");
        assert!(e.starts_with("volumes[0].snapshots[0]:"), "{e}");
        let e = err("version: 2\n");
        assert!(e.starts_with("version:"), "{e}");
        let e = err("volumes:\n  - {name: a, device: mem://a, size: 12Q}\n");
        assert!(e.contains("volumes[0].size") || e.contains("unit"), "{e}");
    }

    #[test]
    fn diff_allows_safe_changes_and_refuses_the_rest() {
        let def = |backing: Backing, size: u64| VolumeDecl {
            name: "v".into(),
            size,
            backing,
            exports: Protocol::defaults(),
            read_only: false,
            description: String::new(),
            node: "n".into(),
            nvmf_hosts: Vec::new(),
            labels: Default::default(),
        };
        let nexus = |r: &[&str]| {
            Backing::Nexus(NexusDecl {
                replicas: r.iter().map(|s| s.to_string()).collect(),
                settings: NexusSettings::default(),
                placed: None,
            })
        };
        let (c, r) = diff(
            "volumes[0]",
            &def(nexus(&["a", "b"]), 1024),
            &def(nexus(&["a", "b", "c"]), 1024),
        );
        assert!(r.is_empty());
        assert_eq!(c[0].0, "add-replica");
        assert_eq!(c[0].1, "volumes[0].replicas[2]");
        let (_, r) = diff(
            "volumes[0]",
            &def(nexus(&["a"]), 1024),
            &def(nexus(&["a"]), 2048),
        );
        assert_eq!(r[0].0, "volumes[0].size");
        let img = || {
            Backing::Image(ImageDecl {
                key: ImageKey::parse("local/v").unwrap(),
                page_size: DEFAULT_PAGE_SIZE,
            })
        };
        let (c, r) = diff("volumes[0]", &def(img(), 1024), &def(img(), 2048));
        assert!(r.is_empty());
        assert_eq!(c[0].0, "resize");
        let (_, r) = diff("volumes[0]", &def(img(), 2048), &def(img(), 1024));
        assert!(r[0].1.contains("discards"));
        let (_, r) = diff("volumes[0]", &def(img(), 1024), &def(nexus(&["a"]), 1024));
        assert!(r[0].1.contains("cannot become"));
        let (c, r) = diff("volumes[0]", &def(img(), 1024), &def(img(), 1024));
        assert!(c.is_empty() && r.is_empty());
    }
}
