//! Garbage collection of page stores: on a schedule inside the daemon, or once with
//! `strata gc`.

use std::time::Duration;

use serde::Deserialize;
use strata_pagestore::versions::{GcOptions, GcReport};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{OpResult, Stores};

/// `[gc]`: collect garbage in every store on a schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcSettings {
    /// Seconds between collections (0: never; `strata gc` runs one by hand).
    #[serde(rename = "interval_secs", with = "strata_bdev::units::secs")]
    pub interval: Duration,
    /// Nothing written, or replaced, less than this long ago is deleted.
    #[serde(rename = "grace_secs", with = "strata_bdev::units::secs")]
    pub grace: Duration,
    /// Replaced versions of an image are kept this long.
    #[serde(rename = "retention_secs", with = "strata_bdev::units::secs")]
    pub retention: Duration,
}

impl Default for GcSettings {
    fn default() -> GcSettings {
        GcSettings {
            interval: Duration::ZERO,
            grace: Duration::from_secs(3600),
            retention: Duration::ZERO,
        }
    }
}

impl GcSettings {
    pub fn options(&self, dry_run: bool) -> GcOptions {
        GcOptions {
            grace: self.grace,
            retention: self.retention,
            dry_run,
        }
    }
}

/// Collect every store (or only `only`).
pub async fn run_once(
    stores: &Stores,
    only: Option<&str>,
    opts: &GcOptions,
) -> OpResult<Vec<(String, GcReport)>> {
    let names = match only {
        Some(s) => {
            stores.get(s)?;
            vec![s.to_string()]
        }
        None => stores.names(),
    };
    let mut out = Vec::new();
    for name in names {
        let report = stores.get(&name)?.gc(opts).await.map_err(|e| {
            super::OpError::from(e).context(&format!("collect garbage in store {name}"))
        })?;
        out.push((name, report));
    }
    Ok(out)
}

/// Collect every store every `settings.interval`, until `stop` is cancelled.
pub async fn scheduled(
    stores: std::sync::Arc<Stores>,
    settings: GcSettings,
    stop: CancellationToken,
) {
    let opts = settings.options(false);
    let mut tick = tokio::time::interval(settings.interval.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match run_once(&stores, None, &opts).await {
            Ok(reports) => {
                for (store, r) in reports {
                    info!(store = %store, deleted = r.deleted.len(), deleted_bytes = r.deleted_bytes,
                        kept = r.kept, "scheduled garbage collection");
                }
            }
            Err(e) => {
                warn!(error = %e, "scheduled garbage collection failed; retrying at the next interval")
            }
        }
    }
}
