//! Garbage collection of page stores: on a schedule inside the daemon, or once with
//! `strata gc`.

use std::sync::Arc;
use std::time::Duration;

use strata_pagestore::versions::{GcOptions, GcReport};
use strata_pagestore::ImageOpener;
use tracing::{info, warn};

use crate::config::GcConfig;

pub fn options(cfg: &GcConfig, dry_run: bool) -> GcOptions {
    GcOptions {
        grace: Duration::from_secs(cfg.grace_secs),
        retention: Duration::from_secs(cfg.retention_secs),
        dry_run,
    }
}

/// Collect every store of `opener` (or only `only`).
pub async fn run_once(
    opener: &ImageOpener,
    only: Option<&str>,
    opts: &GcOptions,
) -> anyhow::Result<Vec<(String, GcReport)>> {
    let names = match only {
        Some(s) => {
            opener.store(s)?;
            vec![s.to_string()]
        }
        None => opener.store_names(),
    };
    let mut out = Vec::new();
    for name in names {
        let report = opener
            .store(&name)?
            .gc(opts)
            .await
            .map_err(|e| anyhow::anyhow!("collect garbage in store {name}: {}", e.chain()))?;
        out.push((name, report));
    }
    Ok(out)
}

/// Collect every store every `interval_secs`, until the task is dropped.
pub async fn scheduled(opener: Arc<ImageOpener>, cfg: GcConfig) {
    let opts = options(&cfg, false);
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.interval_secs.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match run_once(&opener, None, &opts).await {
            Ok(reports) => {
                for (store, r) in reports {
                    info!(store = %store, deleted = r.deleted.len(), deleted_bytes = r.deleted_bytes,
                        kept = r.kept, "scheduled garbage collection");
                }
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "scheduled garbage collection failed; retrying at the next interval")
            }
        }
    }
}
