//! How the devices that talk to a remote target (the NBD client, the NVMe/TCP host, the iSCSI
//! initiator) name a call in their error messages.
//!
//! ```
//! use strata_bdev::call::Op;
//!
//! assert_eq!(Op::new("read", 4096, 512).to_string(), "read 512 bytes at offset 4096");
//! assert_eq!(Op::whole("flush").to_string(), "flush");
//! ```

use std::fmt;

/// A call on a device, as its error messages name it: `read 512 bytes at offset 4096`, or
/// `flush` for a call on the whole device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    verb: &'static str,
    /// Offset and length, for a call on a range.
    range: Option<(u64, u64)>,
}

impl Op {
    /// A call on `len` bytes at `offset`.
    pub fn new(verb: &'static str, offset: u64, len: u64) -> Op {
        Op {
            verb,
            range: Some((offset, len)),
        }
    }

    /// A call on the whole device (a flush).
    pub fn whole(verb: &'static str) -> Op {
        Op { verb, range: None }
    }

    /// What the call does (`read`, `flush`, …).
    pub fn verb(&self) -> &'static str {
        self.verb
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.range {
            None => f.write_str(self.verb),
            Some((offset, len)) => write!(f, "{} {len} bytes at offset {offset}", self.verb),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_name_their_range() {
        assert_eq!(
            Op::new("trim", 0, 0).to_string(),
            "trim 0 bytes at offset 0"
        );
        assert_eq!(Op::whole("flush").to_string(), "flush");
        assert_eq!(Op::whole("flush").verb(), "flush");
    }
}
