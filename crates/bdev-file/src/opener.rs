//! `file:///PATH?size=SIZE[&direct=BOOL][&io=uring|threads][&readonly=BOOL]`, and Mayastor's
//! `aio:///PATH?blk_size=512|4096` and `uring:///PATH?blk_size=…` for the same device.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use strata_bdev::{BlockDevice, DeviceUri, Error, ErrorKind, Opener, Registry, Result};

use crate::device::{FileDevice, FileOptions, IoEngine};

/// The query keys a `file://` URI accepts.
const KEYS: &[&str] = &["size", "direct", "io", "readonly"];
/// The query keys of `aio://` and `uring://`.
const ALIAS_KEYS: &[&str] = &["blk_size", "size", "direct", "readonly"];

/// Opens `file:///PATH?size=SIZE[&direct=BOOL][&io=uring|threads][&readonly=BOOL]`:
///
/// - `size`: required to create a missing file; must match an existing one if given.
/// - `direct`: `O_DIRECT` (default false).
/// - `io`: `uring` or `threads` to force an engine (default: io_uring if available).
/// - `readonly`: open read-only (default false).
///
/// and, in the form Mayastor's nexus children take, `aio:///PATH` (the default engine) and
/// `uring:///PATH` (io_uring) with `blk_size=512|1024|2048|4096`, the logical block size the
/// device advertises (I/O must be aligned to it; default: byte-granular, as `file://`), and
/// `size`, `direct`, `readonly` as above. `aio:////disk1.img` (four slashes) names `/disk1.img`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileOpener;

impl FileOpener {
    /// Register the `file`, `aio` and `uring` schemes in `registry`.
    pub fn register(registry: &mut Registry) {
        for scheme in ["file", "aio", "uring"] {
            registry.register(scheme, Arc::new(FileOpener));
        }
    }

    /// The path, options and advertised block size (`blk_size`) a URI names, taking its
    /// query keys (any other key is an error).
    pub fn parse(uri: &mut DeviceUri) -> Result<(PathBuf, FileOptions, Option<u32>)> {
        let scheme = uri.scheme.clone();
        let alias = scheme == "aio" || scheme == "uring";
        if !(uri.authority.is_empty() || uri.authority.eq_ignore_ascii_case("localhost")) {
            return Err(uri.invalid(&format!(
                "expected {scheme}:///PATH (three slashes, then an absolute path; no host)"
            )));
        }
        if uri.path.trim_matches('/').is_empty() {
            return Err(uri.invalid(&format!("expected {scheme}:///PATH: the path is missing")));
        }
        let size = uri.take_size("size")?;
        let direct = uri.take_bool("direct")?.unwrap_or(false);
        let engine = if alias {
            if scheme == "uring" {
                IoEngine::Uring
            } else {
                IoEngine::Auto
            }
        } else {
            match uri.take("io") {
                None => IoEngine::Auto,
                Some(v) => match v.to_ascii_lowercase().as_str() {
                    "auto" => IoEngine::Auto,
                    "uring" | "io_uring" => IoEngine::Uring,
                    "threads" => IoEngine::Threads,
                    _ => return Err(uri.invalid(&format!("io={v:?}: expected uring or threads"))),
                },
            }
        };
        let block_size = match if alias { uri.take("blk_size") } else { None } {
            None => None,
            Some(v) => Some(
                v.parse::<u32>()
                    .ok()
                    .filter(|b| b.is_power_of_two() && (512..=4096).contains(b))
                    .ok_or_else(|| {
                        uri.invalid(&format!("blk_size={v:?}: expected 512, 1024, 2048 or 4096"))
                    })?,
            ),
        };
        let read_only = uri.take_bool("readonly")?.unwrap_or(false);
        uri.finish(if alias { ALIAS_KEYS } else { KEYS })?;
        Ok((
            PathBuf::from(&uri.path),
            FileOptions {
                size,
                direct,
                engine,
                read_only,
                engine_only: false,
            },
            block_size,
        ))
    }
}

#[async_trait]
impl Opener for FileOpener {
    async fn open(&self, mut uri: DeviceUri) -> Result<Arc<dyn BlockDevice>> {
        let (path, options, block_size) = FileOpener::parse(&mut uri)?;
        let open = move || {
            let dev = FileDevice::open(path, options)?;
            match block_size {
                Some(bs) => dev.with_block_size(bs),
                None => Ok(dev),
            }
        };
        // Opening makes blocking system calls (and may wait for a ring thread to start).
        let dev = match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt.spawn_blocking(open).await.map_err(|e| {
                Error::with_source(ErrorKind::Io, format!("open {}", uri.as_str()), e)
            })??,
            Err(_) => open()?,
        };
        Ok(Arc::new(dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<(PathBuf, FileOptions)> {
        FileOpener::parse(&mut DeviceUri::parse(uri)?).map(|(p, o, _)| (p, o))
    }

    #[test]
    fn parses_mayastor_forms() {
        let mut u = DeviceUri::parse("aio:////disk1.img?blk_size=512").unwrap();
        let (path, o, bs) = FileOpener::parse(&mut u).unwrap();
        assert_eq!(path, PathBuf::from("//disk1.img"));
        assert_eq!(
            path.canonicalize().ok(),
            PathBuf::from("/disk1.img").canonicalize().ok()
        );
        assert_eq!((o.engine, bs), (IoEngine::Auto, Some(512)));
        let mut u = DeviceUri::parse("uring:///dev/sdb?blk_size=4096&direct=1").unwrap();
        let (_, o, bs) = FileOpener::parse(&mut u).unwrap();
        assert_eq!(
            (o.engine, o.direct, bs),
            (IoEngine::Uring, true, Some(4096))
        );
        for (uri, why) in [
            ("aio:///x?blk_size=100", "expected 512"),
            ("aio:///x?io=threads", "unknown option"),
            ("file:///x?blk_size=512", "unknown option"),
            ("uring://host/x", "no host"),
        ] {
            let e = FileOpener::parse(&mut DeviceUri::parse(uri).unwrap()).unwrap_err();
            assert!(e.to_string().contains(why), "{uri}: {e}");
        }
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
