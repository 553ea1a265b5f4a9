//! Strata's NVMe over Fabrics, TCP transport.

pub mod codec;
pub mod host;
pub mod target;

pub use host::{HostOptions, NvmfDevice, NvmfOpener};
pub use target::{Subsystem, Target, TargetError, TargetSettings};
