//! `strata store`: page stores.

use anyhow::{bail, Context};
use strata_api::v1 as pb;

use super::target::{api_error, Target};
use crate::format::human_bytes;

/// `strata store …`
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// List the page stores and their request counts.
    List,
    /// Show a store and its images.
    Get { name: String },
    /// Add a store: a local directory (--dir) or an S3-compatible bucket (--bucket …).
    Create {
        name: String,
        /// A local directory (created if missing).
        #[arg(long, conflicts_with_all = ["bucket", "endpoint", "prefix"])]
        dir: Option<String>,
        /// S3: the bucket.
        #[arg(long)]
        bucket: Option<String>,
        /// S3: the service's URL (default: AWS).
        #[arg(long)]
        endpoint: Option<String>,
        /// S3: the region.
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// S3: a key prefix inside the bucket.
        #[arg(long, default_value = "")]
        prefix: String,
        /// S3 credentials (default: the daemon's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
        #[arg(long, env = "STRATA_S3_ACCESS_KEY_ID")]
        access_key_id: Option<String>,
        #[arg(long, env = "STRATA_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
        secret_access_key: Option<String>,
    },
    /// Forget a store created with `store create` (its objects stay).
    Delete { name: String },
}

fn print_store(s: &pb::Store) {
    println!(
        "store {} ({}): {}; {} GETs, {} PUTs, {} LISTs, {} DELETEs, {} errors, {} retries; {} \
         read, {} written",
        s.name,
        s.kind,
        s.location,
        s.gets,
        s.puts,
        s.lists,
        s.deletes,
        s.errors,
        s.retries,
        human_bytes(s.bytes_got),
        human_bytes(s.bytes_put)
    );
    for i in &s.images {
        println!(
            "  {} {} v{}{}",
            i.name,
            human_bytes(i.size),
            i.version,
            i.base
                .as_ref()
                .map(|b| format!(", clone of {b}"))
                .unwrap_or_default()
        );
    }
}

pub async fn store(target: &Target, cmd: &StoreCommand) -> anyhow::Result<()> {
    let mut c = pb::stores_client::StoresClient::new(target.channel().await?);
    match cmd {
        StoreCommand::List => {
            let l = c
                .list_stores(pb::ListStoresRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&l.stores, |stores| stores.iter().for_each(print_store))
        }
        StoreCommand::Get { name } => {
            let s = c
                .get_store(pb::GetStoreRequest { name: name.clone() })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&s, print_store)
        }
        StoreCommand::Create {
            name,
            dir,
            bucket,
            endpoint,
            region,
            prefix,
            access_key_id,
            secret_access_key,
        } => {
            use pb::create_store_request::Kind;
            let kind = match (dir, bucket) {
                (Some(path), None) => {
                    let path = std::path::absolute(path)
                        .with_context(|| format!("--dir {path:?}"))?;
                    Kind::Dir(pb::DirStore {
                        path: path.display().to_string(),
                    })
                }
                (None, Some(bucket)) => Kind::S3(pb::S3Store {
                    endpoint: endpoint.clone().unwrap_or_default(),
                    region: region.clone(),
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                    access_key_id: access_key_id.clone().unwrap_or_default(),
                    secret_access_key: secret_access_key.clone().unwrap_or_default(),
                }),
                _ => bail!("give --dir PATH, or --bucket NAME (with --endpoint for S3 services other than AWS)"),
            };
            let s = c
                .create_store(pb::CreateStoreRequest {
                    name: name.clone(),
                    kind: Some(kind),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            target.print(&s, print_store)
        }
        StoreCommand::Delete { name } => {
            let r = c
                .delete_store(pb::DeleteStoreRequest { name: name.clone() })
                .await
                .map_err(api_error)?
                .into_inner();
            target.done(&r.message)
        }
    }
}
