//! A wrapper that injects failures into any device, to test how the layers above react:
//! errors of any kind, delays, and hangs, on chosen operations and ranges, for a number of times.
//!
//! ```text
//!   caller ──► FaultDevice ──(rules: op, range, action, count)──► inner device
//! ```
//!
//! Every method is forwarded explicitly so that an override of the inner device is never lost.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{BlockDevice, Capabilities, Extent, Geometry, WriteOpts, ZeroOpts};
use crate::error::{Error, ErrorKind, Result};

/// An operation a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    Cache,
}

/// What happens to a matching operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fail with this kind without reaching the inner device.
    Fail(ErrorKind),
    /// Wait, then forward.
    Delay(Duration),
    /// Never complete (until the caller gives up or the rule is cleared... it stays hung).
    Hang,
}

/// One injection rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Operations it matches; empty matches all.
    pub ops: Vec<Op>,
    /// Byte range it matches (operations that overlap it); `None` matches everywhere.
    pub range: Option<(u64, u64)>,
    /// What to do.
    pub action: Action,
    /// How many more times it fires; `None` is forever.
    pub remaining: Option<u64>,
}

impl Rule {
    /// Fail every `op` with `kind`, forever.
    pub fn fail(op: Op, kind: ErrorKind) -> Rule {
        Rule {
            ops: vec![op],
            range: None,
            action: Action::Fail(kind),
            remaining: None,
        }
    }

    /// Fail every operation with `kind`, forever.
    pub fn fail_all(kind: ErrorKind) -> Rule {
        Rule {
            ops: vec![],
            range: None,
            action: Action::Fail(kind),
            remaining: None,
        }
    }

    /// Restrict the rule to operations overlapping `[offset, offset + len)`.
    pub fn in_range(mut self, offset: u64, len: u64) -> Rule {
        self.range = Some((offset, offset.saturating_add(len)));
        self
    }

    /// Let the rule fire only `n` times.
    pub fn times(mut self, n: u64) -> Rule {
        self.remaining = Some(n);
        self
    }
}

/// Controls the rules of a [`FaultDevice`] while it is in use.
#[derive(Debug, Clone, Default)]
pub struct FaultHandle {
    rules: Arc<Mutex<Vec<Rule>>>,
    fired: Arc<Mutex<u64>>,
}

impl FaultHandle {
    /// Add a rule.
    pub fn add(&self, rule: Rule) {
        self.rules.lock().expect("lock poisoned").push(rule);
    }

    /// Remove every rule (hung operations stay hung).
    pub fn clear(&self) {
        self.rules.lock().expect("lock poisoned").clear();
    }

    /// How many times a rule has fired.
    pub fn fired(&self) -> u64 {
        *self.fired.lock().expect("lock poisoned")
    }

    fn check(&self, op: Op, offset: u64, len: u64) -> Option<Action> {
        let mut rules = self.rules.lock().expect("lock poisoned");
        // A rule allowed zero more firings is spent.
        rules.retain(|r| r.remaining != Some(0));
        let i = rules.iter().position(|r| {
            (r.ops.is_empty() || r.ops.contains(&op))
                && r.range
                    .is_none_or(|(s, e)| offset < e && offset.saturating_add(len.max(1)) > s)
        })?;
        let action = rules[i].action;
        if let Some(n) = rules[i].remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                rules.remove(i);
            }
        }
        *self.fired.lock().expect("lock poisoned") += 1;
        Some(action)
    }
}

/// A device that forwards to `inner` except where a rule says otherwise.
#[derive(Debug)]
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    handle: FaultHandle,
}

impl FaultDevice {
    /// Wrap `inner`; the handle adds and clears rules.
    pub fn new(inner: Arc<dyn BlockDevice>) -> (FaultDevice, FaultHandle) {
        let handle = FaultHandle::default();
        (
            FaultDevice {
                inner,
                handle: handle.clone(),
            },
            handle,
        )
    }

    async fn gate(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        match self.handle.check(op, offset, len) {
            None => Ok(()),
            Some(Action::Fail(kind)) => Err(Error::new(
                kind,
                format!("{op:?} {len} bytes at offset {offset}: injected fault"),
            )),
            Some(Action::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Action::Hang) => std::future::pending().await,
        }
    }
}

#[async_trait]
impl BlockDevice for FaultDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.gate(Op::Read, offset, len as u64).await?;
        self.inner.read_at(offset, len).await
    }

    async fn write_at(&self, offset: u64, data: Bytes, opts: WriteOpts) -> Result<()> {
        self.gate(Op::Write, offset, data.len() as u64).await?;
        self.inner.write_at(offset, data, opts).await
    }

    async fn flush(&self) -> Result<()> {
        self.gate(Op::Flush, 0, 0).await?;
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, opts: WriteOpts) -> Result<()> {
        self.gate(Op::Trim, offset, len).await?;
        self.inner.trim(offset, len, opts).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, opts: ZeroOpts) -> Result<()> {
        self.gate(Op::WriteZeroes, offset, len).await?;
        self.inner.write_zeroes(offset, len, opts).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.gate(Op::BlockStatus, offset, len).await?;
        self.inner.block_status(offset, len).await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.gate(Op::Cache, offset, len).await?;
        self.inner.cache(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    #[tokio::test]
    async fn rules_fire_on_matching_ops_and_ranges() {
        let (dev, h) = FaultDevice::new(Arc::new(MemDevice::new("f", 1 << 20)));
        h.add(
            Rule::fail(Op::Write, ErrorKind::NoSpace)
                .in_range(4096, 4096)
                .times(1),
        );
        let w = |off| dev.write_at(off, Bytes::from_static(b"abcd"), WriteOpts::default());
        w(0).await.unwrap();
        assert_eq!(w(4096).await.unwrap_err().kind(), ErrorKind::NoSpace);
        w(4096).await.unwrap();
        assert_eq!(h.fired(), 1);
        h.add(Rule::fail_all(ErrorKind::Io));
        assert_eq!(dev.flush().await.unwrap_err().kind(), ErrorKind::Io);
        h.clear();
        assert_eq!(&dev.read_at(4096, 4).await.unwrap()[..], b"abcd");
        h.add(Rule::fail_all(ErrorKind::Io).times(0));
        dev.flush().await.unwrap();
    }

    #[tokio::test]
    async fn hang_never_completes() {
        let (dev, h) = FaultDevice::new(Arc::new(MemDevice::new("h", 4096)));
        h.add(Rule {
            ops: vec![Op::Read],
            range: None,
            action: Action::Hang,
            remaining: None,
        });
        let r = tokio::time::timeout(Duration::from_millis(20), dev.read_at(0, 1)).await;
        assert!(r.is_err());
    }
}
