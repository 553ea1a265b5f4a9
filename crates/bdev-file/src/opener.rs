//! `file:///PATH?size=SIZE[&direct=BOOL][&io=uring|threads][&readonly=BOOL]`.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use strata_bdev::{BlockDevice, DeviceUri, Error, ErrorKind, Opener, Registry, Result};

use crate::device::{FileDevice, FileOptions, IoEngine};

/// The query keys a `file://` URI accepts.
const KEYS: &[&str] = &["size", "direct", "io", "readonly"];

/// Opens `file:///PATH?size=SIZE[&direct=BOOL][&io=uring|threads][&readonly=BOOL]`:
///
/// - `size`: required to create a missing file; must match an existing one if given.
/// - `direct`: `O_DIRECT` (default false).
/// - `io`: `uring` or `threads` to force an engine (default: io_uring if available).
/// - `readonly`: open read-only (default false).
#[derive(Debug, Default, Clone, Copy)]
pub struct FileOpener;

impl FileOpener {
    /// Register the `file` scheme in `registry`.
    pub fn register(registry: &mut Registry) {
        registry.register("file", Arc::new(FileOpener));
    }

    /// The path and options a URI names, taking its query keys (any other key is an error).
    pub fn parse(uri: &mut DeviceUri) -> Result<(PathBuf, FileOptions)> {
        if !(uri.authority.is_empty() || uri.authority.eq_ignore_ascii_case("localhost")) {
            return Err(uri
                .invalid("expected file:///PATH (three slashes, then an absolute path; no host)"));
        }
        if uri.path.trim_matches('/').is_empty() {
            return Err(uri.invalid("expected file:///PATH: the path is missing"));
        }
        let size = uri.take_size("size")?;
        let direct = uri.take_bool("direct")?.unwrap_or(false);
        let engine = match uri.take("io") {
            None => IoEngine::Auto,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "auto" => IoEngine::Auto,
                "uring" | "io_uring" => IoEngine::Uring,
                "threads" => IoEngine::Threads,
                _ => return Err(uri.invalid(&format!("io={v:?}: expected uring or threads"))),
            },
        };
        let read_only = uri.take_bool("readonly")?.unwrap_or(false);
        uri.finish(KEYS)?;
        Ok((
            PathBuf::from(&uri.path),
            FileOptions {
                size,
                direct,
                engine,
                read_only,
                engine_only: false,
            },
        ))
    }
}

#[async_trait]
impl Opener for FileOpener {
    async fn open(&self, mut uri: DeviceUri) -> Result<Arc<dyn BlockDevice>> {
        let (path, options) = FileOpener::parse(&mut uri)?;
        // Opening makes blocking system calls (and may wait for a ring thread to start).
        let dev = match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt
                .spawn_blocking(move || FileDevice::open(path, options))
                .await
                .map_err(|e| {
                    Error::with_source(ErrorKind::Io, format!("open {}", uri.as_str()), e)
                })??,
            Err(_) => FileDevice::open(path, options)?,
        };
        Ok(Arc::new(dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<(PathBuf, FileOptions)> {
        FileOpener::parse(&mut DeviceUri::parse(uri)?)
    }

    #[test]
    fn parses_keys() {
        let (path, o) = parse("file:///var/lib/a%20b.img?size=1G&direct=1&io=threads").unwrap();
        assert_eq!(path, PathBuf::from("/var/lib/a b.img"));
        assert_eq!(
            o,
            FileOptions {
                size: Some(1 << 30),
                direct: true,
                engine: IoEngine::Threads,
                read_only: false,
                engine_only: false,
            }
        );
        let (_, o) = parse("file://localhost/x?readonly=true&io=uring").unwrap();
        assert!(o.read_only);
        assert_eq!(o.engine, IoEngine::Uring);
        assert_eq!(parse("file:///x").unwrap().1, FileOptions::default());
    }

    #[test]
    fn refuses_bad_uris() {
        for (uri, why) in [
            ("file:///x?sise=1G", "unknown option \"sise\""),
            ("file:///x?io=aio", "expected uring or threads"),
            ("file://host/x", "no host"),
            ("file:///", "path is missing"),
            ("file:///x?direct=maybe", "expected true or false"),
        ] {
            let e = parse(uri).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{uri}");
            assert!(e.to_string().contains(why), "{uri}: {e}");
        }
    }
}
