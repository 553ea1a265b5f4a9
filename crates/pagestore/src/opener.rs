//! `image://STORE/NAME?size=SIZE&page_size=BYTES`: open (creating if missing) a page-store image.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use strata_bdev::{BlockDevice, DeviceUri, Opener, Result};

use crate::image::{Image, PageStore};

/// Opens images in the named page stores. Stores can be added and removed while it is in use;
/// images already open keep their store.
#[derive(Debug, Default)]
pub struct ImageOpener {
    stores: RwLock<HashMap<String, Arc<PageStore>>>,
}

impl ImageOpener {
    pub fn new() -> ImageOpener {
        ImageOpener::default()
    }

    /// Make `store` reachable as `image://NAME/…`.
    pub fn add_store(&self, name: &str, store: PageStore) {
        self.stores
            .write()
            .expect("lock poisoned")
            .insert(name.to_string(), Arc::new(store));
    }

    /// Make a store unreachable by name (its open images keep working).
    pub fn remove_store(&self, name: &str) -> Option<Arc<PageStore>> {
        self.stores.write().expect("lock poisoned").remove(name)
    }

    /// The store named `name`, or an error listing the configured ones.
    pub fn store(&self, name: &str) -> Result<Arc<PageStore>> {
        let found = self
            .stores
            .read()
            .expect("lock poisoned")
            .get(name)
            .cloned();
        found.ok_or_else(|| {
            strata_bdev::Error::new(
                strata_bdev::ErrorKind::NotFound,
                format!(
                    "no page store named {name:?} (configured: {})",
                    self.store_names().join(", ")
                ),
            )
        })
    }

    /// The configured stores' names, sorted.
    pub fn store_names(&self) -> Vec<String> {
        let mut known: Vec<String> = self
            .stores
            .read()
            .expect("lock poisoned")
            .keys()
            .cloned()
            .collect();
        known.sort_unstable();
        known
    }
}

impl ImageOpener {
    /// Open the image an `image://` URI names.
    pub async fn open_image(&self, uri: &str) -> Result<Arc<Image>> {
        self.open_parsed(DeviceUri::parse(uri)?).await
    }

    async fn open_parsed(&self, mut uri: DeviceUri) -> Result<Arc<Image>> {
        let store_name = uri.authority.clone();
        let Ok(store) = self.store(&store_name) else {
            return Err(uri.invalid(&format!(
                "no page store named {store_name:?} (configured: {})",
                self.store_names().join(", ")
            )));
        };
        let name = uri.path.trim_start_matches('/').to_string();
        let size = uri.take_size("size")?;
        let page_size = uri.take_size("page_size")?.unwrap_or(4096);
        uri.finish(&["size", "page_size"])?;
        if !page_size.is_power_of_two() {
            return Err(uri.invalid(&format!(
                "page_size {page_size}: must be a power of two from 512 to 65536"
            )));
        }
        let bits = page_size.trailing_zeros();
        let image = store.open(&name, size.map(|s| (s, bits))).await?;
        Ok(Arc::new(image))
    }
}

#[async_trait]
impl Opener for ImageOpener {
    async fn open(&self, uri: DeviceUri) -> Result<Arc<dyn BlockDevice>> {
        Ok(self.open_parsed(uri).await?)
    }
}
