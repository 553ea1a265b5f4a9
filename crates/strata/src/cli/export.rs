//! `strata export`: which protocols volumes are served over.

use strata_api::v1 as pb;

use super::target::{api_error, Target};

/// `strata export …`
#[derive(Debug, clap::Subcommand)]
pub enum ExportCommand {
    /// List what is exported, and where clients connect.
    List,
    /// Export a volume over a protocol (NBD unless --protocol says).
    Create {
        volume: String,
        /// nbd, nvmf or vhost_user.
        #[arg(long, default_value = "nbd")]
        protocol: String,
        #[arg(long)]
        read_only: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Stop exporting a volume over a protocol (connected clients keep their connection until
    /// they close it).
    Delete {
        volume: String,
        /// nbd, nvmf or vhost_user.
        #[arg(long, default_value = "nbd")]
        protocol: String,
    },
}

pub async fn export(target: &Target, cmd: &ExportCommand) -> anyhow::Result<()> {
    let mut c = pb::exports_client::ExportsClient::new(target.channel().await?);
    match cmd {
        ExportCommand::List => {
            let l = c
                .list_exports(pb::ListExportsRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&l.exports, |exports| {
                println!("{:<20} {:<10} {:<3} URIS", "VOLUME", "PROTOCOL", "RO");
                for e in exports {
                    let p = pb::Protocol::try_from(e.protocol)
                        .map(|p| {
                            p.as_str_name()
                                .trim_start_matches("PROTOCOL_")
                                .to_lowercase()
                        })
                        .unwrap_or_else(|_| e.protocol.to_string());
                    println!(
                        "{:<20} {:<10} {:<3} {}",
                        e.volume,
                        p,
                        if e.read_only { "yes" } else { "no" },
                        e.uris.join(" ")
                    );
                }
            })
        }
        ExportCommand::Create {
            volume,
            protocol,
            read_only,
            description,
        } => {
            let e = c
                .create_export(pb::CreateExportRequest {
                    volume: volume.clone(),
                    protocol: super::volume::protocol(protocol)?,
                    read_only: *read_only,
                    description: description.clone(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&e, |e| {
                println!("volume {} exported: {}", e.volume, e.uris.join(" "))
            })
        }
        ExportCommand::Delete { volume, protocol } => {
            let r = c
                .delete_export(pb::DeleteExportRequest {
                    volume: volume.clone(),
                    protocol: super::volume::protocol(protocol)?,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.done(&r.message)
        }
    }
}
