//! `strata gc`: delete what no image, snapshot or clone of a configuration's stores needs.

use super::image::LocalStores;
use super::target::Target;
use crate::daemon::manager::gc::{run_once, GcSettings};
use crate::format::human_bytes;

/// `strata gc`
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Only this store (default: every store of the configuration).
    #[arg(long)]
    pub store: Option<String>,
    /// List what would be deleted and how many bytes; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep everything written, or replaced, less than this many seconds ago.
    #[arg(long, default_value_t = 3600)]
    pub grace_secs: u64,
    /// Keep replaced versions of images this many seconds.
    #[arg(long, default_value_t = 0)]
    pub retention_secs: u64,
    #[command(flatten)]
    pub local: LocalStores,
}

pub async fn gc(target: &Target, args: &GcArgs) -> anyhow::Result<()> {
    if args.grace_secs < 60 && !args.dry_run {
        eprintln!(
            "strata gc: warning: a grace period of {} s is shorter than a checkpoint may take to \
             publish what it uploaded; with servers writing to these stores, keep it at 60 s or \
             more",
            args.grace_secs
        );
    }
    let stores = args.local.stores()?;
    let settings = GcSettings {
        interval: std::time::Duration::ZERO,
        grace: std::time::Duration::from_secs(args.grace_secs),
        retention: std::time::Duration::from_secs(args.retention_secs),
    };
    let reports = run_once(
        &stores,
        args.store.as_deref(),
        &settings.options(args.dry_run),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    if target.json() {
        let v: Vec<serde_json::Value> = reports
            .iter()
            .map(|(s, r)| serde_json::json!({"store": s, "report": r}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (store, r) in reports {
        let verb = if r.dry_run { "would delete" } else { "deleted" };
        for (key, size) in &r.deleted {
            println!("{store}: {verb} {key} ({})", human_bytes(*size));
        }
        println!(
            "{store}: {verb} {} objects ({}); kept {} objects ({})",
            r.deleted.len(),
            human_bytes(r.deleted_bytes),
            r.kept,
            human_bytes(r.kept_bytes)
        );
    }
    Ok(())
}
