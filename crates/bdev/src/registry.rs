//! The schemes a process can open: a [`Registry`] maps each URI scheme to its [`Opener`],
//! starting with the ones this crate implements (`mem`, `malloc`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::Result;
use crate::mem::MemOpener;
use crate::uri::{DeviceUri, Opener};

/// The schemes a process can open, each with its [`Opener`].
#[derive(Default, Clone)]
pub struct Registry {
    openers: HashMap<String, Arc<dyn Opener>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("schemes", &self.schemes())
            .finish()
    }
}

impl Registry {
    /// A registry that knows no schemes.
    pub fn empty() -> Registry {
        Registry::default()
    }

    /// A registry with the schemes this crate implements (`mem`, and `malloc` for the same
    /// devices in Mayastor's form).
    pub fn with_builtin() -> Registry {
        let mut r = Registry::empty();
        let mem = Arc::new(MemOpener::default());
        r.register("mem", mem.clone());
        r.register("malloc", mem);
        r
    }

    /// Add (or replace) the opener of `scheme`.
    pub fn register(&mut self, scheme: &str, opener: Arc<dyn Opener>) {
        self.openers.insert(scheme.to_ascii_lowercase(), opener);
    }

    /// The schemes known, sorted.
    pub fn schemes(&self) -> Vec<String> {
        let mut s: Vec<_> = self.openers.keys().cloned().collect();
        s.sort();
        s
    }

    /// Open the device a URI names.
    pub async fn open(&self, uri: &str) -> Result<Arc<dyn BlockDevice>> {
        let uri = DeviceUri::parse(uri)?;
        let opener = self.openers.get(&uri.scheme).ok_or_else(|| {
            uri.invalid(&format!(
                "unknown scheme {:?} (known: {})",
                uri.scheme,
                self.schemes().join(", ")
            ))
        })?;
        opener.open(uri).await
    }
}
