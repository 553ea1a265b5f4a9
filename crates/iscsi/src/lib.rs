//! Strata's iSCSI support.

pub mod codec;
