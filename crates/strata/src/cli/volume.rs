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

pub async fn volume(target: &Target, cmd: &VolumeCommand) -> anyhow::Result<()> {
    let mut c = pb::volumes_client::VolumesClient::new(target.channel().await?);
    let show = |v: &pb::Volume| super::status::print_volume(v);
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            device,
            replica,
            image,
            export,
            no_export,
            nvmf_host,
            read_only,
            description,
        } => {
            use pb::volume_spec::Backing;
            let backing = match (device, replica.is_empty(), image) {
                (Some(d), true, None) => Backing::Device(d.clone()),
                (None, false, None) => Backing::Nexus(pb::NexusSpec {
                    replicas: replica.clone(),
                    settings: None,
                }),
                (None, true, Some(i)) => Backing::Image(i.clone()),
                _ => bail!(
                    "give one of --device URI, --replica URI (repeated) or --image STORE/IMAGE"
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
