//! [`NexusSettings`]: the tunables of one nexus, as settings files and declarations write them.

use std::time::Duration;

/// Tunables of one nexus.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NexusSettings {
    /// Bytes covered by one bit of a dirty-region map (default 1 MiB). A multiple of the nexus
    /// block size.
    #[serde(with = "strata_bdev::units::size")]
    pub dirty_granularity: u64,
    /// Bytes a rebuild copies under one range lock (default 1 MiB); rounded up to a multiple of
    /// `dirty_granularity`.
    #[serde(with = "strata_bdev::units::size")]
    pub rebuild_segment: u64,
    /// Segments a rebuild copies at once (default 4).
    pub rebuild_parallel: usize,
    /// A child whose I/O takes longer than this is faulted (default: no limit). Written
    /// `child_timeout_secs` in settings files. Per-child overrides: [`Nexus::set_io_timeout`](crate::Nexus::set_io_timeout).
    #[serde(
        rename = "child_timeout_secs",
        with = "strata_bdev::units::secs_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub io_timeout: Option<Duration>,
}

impl Default for NexusSettings {
    fn default() -> NexusSettings {
        NexusSettings {
            dirty_granularity: 1 << 20,
            rebuild_segment: 1 << 20,
            rebuild_parallel: 4,
            io_timeout: None,
        }
    }
}

impl NexusSettings {
    /// Check what can be checked before a nexus exists (its block size is checked when it is
    /// made): the reason, in the words of a settings file.
    pub fn validate(&self) -> Result<(), String> {
        if self.dirty_granularity == 0 || !self.dirty_granularity.is_multiple_of(4096) {
            return Err(format!(
                "dirty_granularity {} is not a positive multiple of 4 KiB",
                self.dirty_granularity
            ));
        }
        if !(1..=1024).contains(&self.rebuild_parallel) {
            return Err(format!(
                "rebuild_parallel {} is not between 1 and 1024",
                self.rebuild_parallel
            ));
        }
        if self.rebuild_segment > 1 << 30 {
            return Err(format!(
                "rebuild_segment {} is more than 1 GiB",
                self.rebuild_segment
            ));
        }
        if self.io_timeout.is_some_and(|t| t.is_zero()) {
            return Err(
                "child_timeout_secs must be more than 0 (leave it out for no limit)".into(),
            );
        }
        Ok(())
    }
}
