//! Strata's NVMe over Fabrics, TCP transport.

pub mod codec;
