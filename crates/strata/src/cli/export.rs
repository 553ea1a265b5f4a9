//! `strata export`: which protocols volumes are served over.

use strata_api::v1 as pb;

use super::target::{api_error, Target};

/// `strata export …`
#[derive(Debug, clap::Subcommand)]
pub enum ExportCommand {
    /// List what is exported, and where clients connect.
    List,
    /// Export a volume over NBD.
    Create {
        volume: String,
        #[arg(long)]
        read_only: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Stop exporting a volume (connected clients keep their connection until they close it).
    Delete { volume: String },
}

pub async fn export(target: &Target, cmd: &ExportCommand) -> anyhow::Result<()> {
    let mut c = pb::exports_client::ExportsClient::new(target.channel().await?);
    let nbd = pb::Protocol::Nbd as i32;
    match cmd {
        ExportCommand::List => {
            let l = c
                .list_exports(pb::ListExportsRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&l.exports, |exports| {
                println!("{:<20} {:<5} {:<3} URIS", "VOLUME", "PROTO", "RO");
                for e in exports {
                    println!(
                        "{:<20} {:<5} {:<3} {}",
                        e.volume,
                        "nbd",
                        if e.read_only { "yes" } else { "no" },
                        e.uris.join(" ")
                    );
                }
            })
        }
        ExportCommand::Create {
            volume,
            read_only,
            description,
        } => {
            let e = c
                .create_export(pb::CreateExportRequest {
                    volume: volume.clone(),
                    protocol: nbd,
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
        ExportCommand::Delete { volume } => {
            let r = c
                .delete_export(pb::DeleteExportRequest {
                    volume: volume.clone(),
                    protocol: nbd,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.done(&r.message)
        }
    }
}
