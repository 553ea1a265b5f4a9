//! Conversions between the wire messages of `strata.v1` and the manager's domain types: the one
//! place where a protobuf shape becomes a [`VolumeDecl`] (and back).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use strata_api::v1 as pb;
use strata_bdev::BlockDevice;
use strata_nexus::{
    ChildState, Nexus, NexusSettings, RebuildOutcome, RebuildProgress, RebuildState,
};
use tonic::Status;

use super::status;
use crate::daemon::manager::{
    kind_name, Backing, ImageDecl, ImageInfo, ImageKey, Managed, Manager, NexusDecl, OpError,
    Placed, Protocol, SnapshotInfo, VolumeDecl, DEFAULT_PAGE_SIZE,
};

/// A protocol from the wire (unspecified: NBD).
pub fn protocol(p: i32) -> Result<Protocol, Status> {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Unspecified) | Ok(pb::Protocol::Nbd) => Ok(Protocol::Nbd),
        Ok(pb::Protocol::Nvmf) => Ok(Protocol::Nvmf),
        Ok(pb::Protocol::VhostUser) => Ok(Protocol::VhostUser),
        Err(_) => Err(Status::invalid_argument(format!(
            "protocol: {p} is not a protocol this daemon knows"
        ))),
    }
}

pub fn protocol_msg(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Nbd => pb::Protocol::Nbd,
        Protocol::Nvmf => pb::Protocol::Nvmf,
        Protocol::VhostUser => pb::Protocol::VhostUser,
    }
}

fn settings_from(s: Option<pb::NexusSettings>) -> Result<NexusSettings, Status> {
    let mut out = NexusSettings::default();
    let Some(s) = s else { return Ok(out) };
    if s.dirty_granularity > 0 {
        out.dirty_granularity = s.dirty_granularity;
    }
    if s.rebuild_segment > 0 {
        out.rebuild_segment = s.rebuild_segment;
    }
    if s.rebuild_parallel > 0 {
        out.rebuild_parallel = s.rebuild_parallel as usize;
    }
    if let Some(t) = s.child_timeout_secs {
        out.io_timeout = Some(strata_bdev::units::duration_from_secs(t).map_err(|e| {
            Status::invalid_argument(format!("spec.nexus.settings.child_timeout_secs: {e}"))
        })?);
    }
    Ok(out)
}

fn settings_msg(s: &NexusSettings) -> pb::NexusSettings {
    pb::NexusSettings {
        dirty_granularity: s.dirty_granularity,
        rebuild_segment: s.rebuild_segment,
        rebuild_parallel: s.rebuild_parallel as u32,
        child_timeout_secs: s.io_timeout.map(|d: Duration| d.as_secs_f64()),
    }
}

/// A volume spec from the wire, validated.
pub fn decl(s: pb::VolumeSpec) -> Result<VolumeDecl, Status> {
    let backing =
        match s.backing {
            Some(pb::volume_spec::Backing::Device(u)) => Backing::Device(u),
            Some(pb::volume_spec::Backing::Nexus(n)) => {
                if n.replica_count > 0 && !n.replicas.is_empty() {
                    return Err(Status::invalid_argument(
                        "spec.nexus: give replicas (URIs) or replica_count, not both",
                    ));
                }
                Backing::Nexus(NexusDecl {
                    placed: (n.replica_count > 0).then_some(Placed {
                        count: n.replica_count,
                        preallocate: n.preallocate,
                    }),
                    replicas: n.replicas,
                    settings: settings_from(n.settings)?,
                })
            }
            Some(pb::volume_spec::Backing::Image(k)) => Backing::Image(ImageDecl {
                key: ImageKey::parse(&k)
                    .map_err(|e| status(OpError::invalid(format!("spec.image: {e}"))))?,
                page_size: if s.page_size == 0 {
                    DEFAULT_PAGE_SIZE
                } else {
                    s.page_size
                },
            }),
            None => return Err(Status::invalid_argument(
                "spec.backing: give a device URI, a nexus of replicas, or an image (STORE/IMAGE)",
            )),
        };
    let exports = match s.export {
        Some(false) => Default::default(),
        _ if s.protocols.is_empty() => Protocol::defaults(),
        _ => s
            .protocols
            .iter()
            .map(|p| protocol(*p))
            .collect::<Result<_, _>>()?,
    };
    let d = VolumeDecl {
        name: s.name,
        size: s.size,
        backing,
        exports,
        read_only: s.read_only,
        description: s.description,
        node: String::new(),
        nvmf_hosts: s.nvmf_hosts,
        labels: s.labels.into_iter().collect(),
    };
    d.validate("spec.").map_err(status)?;
    Ok(d)
}

/// A declaration as the wire shows it.
pub fn spec_msg(d: &VolumeDecl) -> pb::VolumeSpec {
    let (backing, page_size) = match &d.backing {
        Backing::Device(u) => (pb::volume_spec::Backing::Device(u.clone()), 0),
        Backing::Nexus(n) => (
            pb::volume_spec::Backing::Nexus(pb::NexusSpec {
                replicas: n.replicas.clone(),
                settings: Some(settings_msg(&n.settings)),
                replica_count: n.placed.map_or(0, |p| p.count),
                preallocate: n.placed.is_some_and(|p| p.preallocate),
            }),
            0,
        ),
        Backing::Image(i) => (
            pb::volume_spec::Backing::Image(i.key.to_string()),
            i.page_size,
        ),
    };
    pb::VolumeSpec {
        name: d.name.clone(),
        size: d.size,
        backing: Some(backing),
        export: Some(!d.exports.is_empty()),
        read_only: d.read_only,
        description: d.description.clone(),
        protocols: d.exports.iter().map(|p| protocol_msg(*p) as i32).collect(),
        node: d.node.clone(),
        page_size,
        nvmf_hosts: d.nvmf_hosts.clone(),
        labels: d
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn child_state(s: &ChildState) -> (&'static str, String) {
    match s {
        ChildState::Online => ("online", String::new()),
        ChildState::Rebuilding => ("rebuilding", String::new()),
        ChildState::Faulted(r) => ("faulted", r.clone()),
        ChildState::Offline => ("offline", String::new()),
    }
}

pub fn rebuild_msg(p: &RebuildProgress) -> pb::Rebuild {
    let (state, error) = match &p.state {
        RebuildState::Running => ("running", None),
        RebuildState::Paused => ("paused", None),
        RebuildState::Done(RebuildOutcome::Completed) => ("completed", None),
        RebuildState::Done(RebuildOutcome::Cancelled) => ("cancelled", None),
        RebuildState::Done(RebuildOutcome::Failed(e)) => ("failed", Some(e.clone())),
    };
    pb::Rebuild {
        kind: kind_name(p).into(),
        state: state.into(),
        error,
        total_bytes: p.total_bytes,
        done_bytes: p.done_bytes,
        copied_bytes: p.copied_bytes,
        zeroed_bytes: p.zeroed_bytes,
        source: p.source.clone(),
        elapsed_secs: p.elapsed.as_secs_f64(),
        rate_bytes_per_sec: p.rate(),
        eta_secs: p.eta().map(|d| d.as_secs_f64()),
    }
}

pub fn children(n: &Nexus) -> Vec<pb::Child> {
    n.status()
        .children
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (state, reason) = child_state(&c.state);
            pb::Child {
                index: i as u32,
                uri: c.name.clone(),
                state: state.into(),
                reason: (!reason.is_empty()).then_some(reason),
                dirty_bytes: c.dirty_bytes,
                outstanding: c.outstanding as u64,
                rebuild: c.rebuild.as_ref().map(rebuild_msg),
            }
        })
        .collect()
}

fn image_state(d: &VolumeDecl, i: &strata_pagestore::Image) -> pb::ImageState {
    let (mapped, buffered) = i.mapped_pages();
    let st = i.stats();
    let key = d.image().cloned();
    let [gets, puts, lists, deletes, errors, retries] = i.store_stats().counts();
    pb::ImageState {
        store: key.as_ref().map(|k| k.store.clone()).unwrap_or_default(),
        image: key.map(|k| k.image).unwrap_or_default(),
        version: i.version(),
        segments: i.segment_count() as u64,
        mapped_pages: mapped as u64,
        buffered_pages: buffered as u64,
        buffered_bytes: i.buffered_bytes().1,
        checkpoints: st.checkpoints.load(Relaxed),
        compactions: st.compactions.load(Relaxed),
        cache_hits: st.cache_hits.load(Relaxed),
        disk_cache_hits: st.disk_cache_hits.load(Relaxed),
        cache_misses: st.cache_misses.load(Relaxed),
        fenced: i.fenced(),
        base: i.base().map(|b| format!("{}@{}", b.image, b.snapshot)),
        store_gets: gets,
        store_puts: puts,
        store_lists: lists,
        store_deletes: deletes,
        store_errors: errors,
        store_retries: retries,
        store_bytes_got: i.store_stats().bytes_got.load(Relaxed),
        store_bytes_put: i.store_stats().bytes_put.load(Relaxed),
    }
}

/// An open volume as the wire shows it.
pub fn volume_msg(manager: &Manager, m: &Managed) -> pb::Volume {
    let d = m.decl();
    let children = m.nexus().map(|n| children(n)).unwrap_or_default();
    let image = m.image().map(|i| image_state(&d, i));
    let state = if image.as_ref().is_some_and(|i| i.fenced.is_some()) {
        "fenced"
    } else if children.iter().any(|c| c.state != "online") {
        "degraded"
    } else {
        "online"
    };
    pb::Volume {
        size: m.device.geometry().size,
        kind: d.kind().into(),
        state: state.into(),
        children,
        exports: manager.addresses(m),
        from_config: m.from_config,
        image,
        spec: Some(spec_msg(&d)),
    }
}

pub fn image_msg(i: ImageInfo) -> pb::Image {
    pb::Image {
        store: i.key.store,
        name: i.key.image,
        size: i.size,
        page_size: u64::from(i.page_size),
        version: i.version,
        base: i.base,
        snapshots: i.snapshots,
        stored_bytes: i.stored_bytes,
        open: i.open,
    }
}

pub fn snapshot_msg(s: SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        image: s.image.to_string(),
        name: s.name,
        version: s.version,
        size: s.size,
        created: s.created,
        exclusive_bytes: s.exclusive_bytes,
    }
}
