//! [`VhostUserSettings`]: the `[vhost_user]` section of the daemon's configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// How the vhost-user-blk target serves its volumes. Every field has a default; the daemon
/// embeds this struct as its `[vhost_user]` section.
///
/// ```toml
/// [vhost_user]
/// socket_dir = "/run/strata/vhost-user"   # default: {data_dir}/vhost-user
/// max_queues = 8
/// queue_size = 1024
/// max_in_flight_bytes = "64M"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VhostUserSettings {
    /// Where the daemon puts one socket per exported volume, `NAME.sock`. `None`: the daemon
    /// chooses (`{data_dir}/vhost-user`). The target itself takes a socket path per volume.
    pub socket_dir: Option<PathBuf>,
    /// The most virtqueues a front-end may use (one per vCPU is usual); each is served by its
    /// own thread. The front-end chooses how many, up to this.
    pub max_queues: u16,
    /// The largest virtqueue a front-end may set up (entries).
    pub queue_size: u16,
    /// The most data segments one request may have (`seg_max`).
    pub seg_max: u32,
    /// Requests larger than this reach the device in pieces of this size, so that one request
    /// never holds more than this in memory.
    #[serde(with = "strata_bdev::units::size")]
    pub io_chunk_bytes: u64,
    /// Bytes of request data in flight per front-end (reads and writes); requests past it wait.
    #[serde(with = "strata_bdev::units::size")]
    pub max_in_flight_bytes: u64,
    /// The largest discard or write-zeroes segment, in 512-byte sectors.
    pub max_discard_sectors: u32,
    /// The most segments in one discard or write-zeroes request.
    pub max_discard_segments: u32,
    /// How long stopping an export waits for requests in flight before it gives up on them.
    #[serde(with = "strata_bdev::units::secs", rename = "shutdown_timeout_secs")]
    pub shutdown_timeout: Duration,
}

impl Default for VhostUserSettings {
    fn default() -> VhostUserSettings {
        VhostUserSettings {
            socket_dir: None,
            max_queues: 8,
            queue_size: 1024,
            seg_max: 254,
            io_chunk_bytes: 4 << 20,
            max_in_flight_bytes: 64 << 20,
            max_discard_sectors: 1 << 22,
            max_discard_segments: 64,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl VhostUserSettings {
    /// Refuses settings the target cannot work with.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_queues == 0 || self.max_queues > 64 {
            return Err(format!(
                "max_queues {} is not between 1 and 64",
                self.max_queues
            ));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 2 {
            return Err(format!(
                "queue_size {} is not a power of two of at least 2",
                self.queue_size
            ));
        }
        if self.seg_max == 0 {
            return Err("seg_max is 0".to_string());
        }
        if self.io_chunk_bytes < 4096 || !self.io_chunk_bytes.is_multiple_of(4096) {
            return Err(format!(
                "io_chunk_bytes {} is not a multiple of 4096",
                self.io_chunk_bytes
            ));
        }
        if self.max_in_flight_bytes < self.io_chunk_bytes {
            return Err("max_in_flight_bytes is smaller than io_chunk_bytes".to_string());
        }
        if self.max_discard_sectors == 0 || self.max_discard_segments == 0 {
            return Err("max_discard_sectors and max_discard_segments must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(VhostUserSettings::default().validate(), Ok(()));
    }
}
