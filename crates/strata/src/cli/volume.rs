//! `strata volume`: create, list, show, delete, resize.

use anyhow::bail;
use strata_api::v1 as pb;

use super::parse_size;
use super::target::{api_error, Target};
use crate::format::human_bytes;

/// `strata volume …`
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Create a volume over a device, a nexus of replicas, or a page-store image, and export it.
    Create {
        name: String,
        /// Size (e.g. 1G); devices and images that do not exist are created this large.
        #[arg(long)]
        size: Option<String>,
        /// A device URI (file:///…, mem://…, nbd://…).
        #[arg(long, conflicts_with_all = ["replica", "image"])]
        device: Option<String>,
        /// A replica URI of a nexus volume; repeat for each.
        #[arg(long, conflicts_with = "image")]
        replica: Vec<String>,
        /// A nexus volume of this many replica files the daemon places in its pools (needs
        /// --size).
        #[arg(long, conflicts_with_all = ["replica", "image", "device"])]
        replicas: Option<u32>,
        /// Placed replica files get every block allocated up front.
        #[arg(long, requires = "replicas")]
        preallocate: bool,
        /// A label KEY=VALUE; repeat for each.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// A page-store image, STORE/IMAGE.
        #[arg(long)]
        image: Option<String>,
        /// Export it over this protocol (nbd, nvmf, vhost_user); repeat for several
        /// (default: nbd and nvmf).
        #[arg(long = "export", value_name = "PROTOCOL", conflicts_with = "no_export")]
        export: Vec<String>,
        /// Do not export it at all.
        #[arg(long)]
        no_export: bool,
        /// NVMe/TCP: a host NQN allowed to connect; repeat for several (default: any host).
        #[arg(long = "nvmf-host", value_name = "NQN")]
        nvmf_host: Vec<String>,
        #[arg(long)]
        read_only: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the volumes.
    List,
    /// Set (KEY=VALUE) or remove (--remove KEY) labels of a volume.
    Label {
        name: String,
        #[arg(value_parser = parse_label)]
        set: Vec<(String, String)>,
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Show one volume.
    Get { name: String },
    /// Stop serving a volume and forget it (its devices keep their data).
    Delete {
        name: String,
        /// Also delete the page-store image behind it, with its snapshots.
        #[arg(long)]
        delete_image: bool,
    },
    /// Resize a page-store image volume (shrinking needs --force and discards data).
    Resize {
        name: String,
        size: String,
        #[arg(long)]
        force: bool,
    },
}

/// `KEY=VALUE`.
fn parse_label(s: &str) -> anyhow::Result<(String, String)> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| anyhow::anyhow!("label {s:?}: expected KEY=VALUE"))
}

pub async fn volume(target: &Target, cmd: &VolumeCommand) -> anyhow::Result<()> {
    let mut c = pb::volumes_client::VolumesClient::new(target.channel().await?);
    let show = |v: &pb::Volume| super::status::print_volume(v);
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            device,
            replica,
            replicas,
            preallocate,
            labels,
            image,
            export,
            no_export,
            nvmf_host,
            read_only,
            description,
        } => {
            use pb::volume_spec::Backing;
            let backing = match (device, replica.is_empty(), image) {
                (None, true, None) if replicas.is_some() => Backing::Nexus(pb::NexusSpec {
                    replica_count: replicas.unwrap_or(1),
                    preallocate: *preallocate,
                    ..Default::default()
                }),
                (Some(d), true, None) => Backing::Device(d.clone()),
                (None, false, None) => Backing::Nexus(pb::NexusSpec {
                    replicas: replica.clone(),
                    ..Default::default()
                }),
                (None, true, Some(i)) => Backing::Image(i.clone()),
                _ => bail!(
                    "give one of --device URI, --replica URI (repeated), --replicas N or --image \
                     STORE/IMAGE"
                ),
            };
            let size = size.as_deref().map(parse_size).transpose()?.unwrap_or(0);
            let v = c
                .create_volume(pb::CreateVolumeRequest {
                    spec: Some(pb::VolumeSpec {
                        name: name.clone(),
                        size,
                        backing: Some(backing),
                        export: Some(!no_export),
                        protocols: export
                            .iter()
                            .map(|p| protocol(p))
                            .collect::<anyhow::Result<_>>()?,
                        nvmf_hosts: nvmf_host.clone(),
                        read_only: *read_only,
                        description: description.clone(),
                        labels: labels.iter().cloned().collect(),
                        ..Default::default()
                    }),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&v, show)
        }
        VolumeCommand::List => {
            let l = c
                .list_volumes(pb::ListVolumesRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&l.volumes, |vols| {
                println!(
                    "{:<20} {:<7} {:>10} {:<9} EXPORTS",
                    "VOLUME", "KIND", "SIZE", "STATE"
                );
                for v in vols {
                    println!(
                        "{:<20} {:<7} {:>10} {:<9} {}",
                        v.spec.as_ref().map_or("", |s| s.name.as_str()),
                        v.kind,
                        human_bytes(v.size),
                        v.state,
                        v.exports.join(" ")
                    );
                }
            })
        }
        VolumeCommand::Label { name, set, remove } => {
            let v = c
                .set_volume_labels(pb::SetVolumeLabelsRequest {
                    name: name.clone(),
                    set: set.iter().cloned().collect(),
                    remove: remove.clone(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&v, show)
        }
        VolumeCommand::Get { name } => {
            let v = c
                .get_volume(pb::GetVolumeRequest { name: name.clone() })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&v, show)
        }
        VolumeCommand::Delete { name, delete_image } => {
            let r = c
                .delete_volume(pb::DeleteVolumeRequest {
                    name: name.clone(),
                    delete_image: *delete_image,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.done(&r.message)
        }
        VolumeCommand::Resize { name, size, force } => {
            let v = c
                .resize_volume(pb::ResizeVolumeRequest {
                    name: name.clone(),
                    size: parse_size(size)?,
                    force: *force,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&v, show)
        }
    }
}

/// A protocol as the API numbers it.
pub(super) fn protocol(name: &str) -> anyhow::Result<i32> {
    let p = match name.to_ascii_lowercase().replace('-', "_").as_str() {
        "nbd" => pb::Protocol::Nbd,
        "nvmf" | "nvme" | "nvme_tcp" => pb::Protocol::Nvmf,
        "vhost_user" | "vhost" => pb::Protocol::VhostUser,
        _ => anyhow::bail!("--export {name:?}: use nbd, nvmf or vhost_user"),
    };
    Ok(p as i32)
}
