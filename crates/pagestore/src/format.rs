//! The bytes of segment objects and manifests (see `docs/FORMAT.md`). Pure functions: no I/O.
//!
//! A segment is immutable and self-describing:
//!
//! ```text
//!   page data: the pages, back to back, page_size bytes each
//!   index:     entry_count × 16 bytes, sorted by page number:
//!                page u64 | slot u32 (index of the page in the data; TOMBSTONE: reads as zeroes)
//!                | crc32c u32 of the page's bytes (0 for a tombstone)
//!   footer:    40 bytes: magic "STRSEG01" | version u32 | page_size_bits u32 | entry_count u64
//!                | index_offset u64 | index_crc u32 | footer_crc u32 (of the 36 bytes before it)
//! ```
//!
//! A manifest is one line of header and a JSON body:
//!
//! ```text
//!   STRATA-MANIFEST 1 crc32c=0123abcd\n
//!   {"image":"vm1","version":7,"image_size":1073741824,"page_size_bits":12,…}
//! ```

use serde::{Deserialize, Serialize};

/// Where a page lives in a segment's data: its slot, or this for a tombstone (zeroes).
pub const TOMBSTONE: u32 = u32::MAX;

const SEG_MAGIC: &[u8; 8] = b"STRSEG01";
const SEG_VERSION: u32 = 1;
/// Bytes in a segment's footer.
pub const FOOTER_LEN: u64 = 40;
/// Bytes per index entry.
pub const ENTRY_LEN: u64 = 16;

const MANIFEST_MAGIC: &str = "STRATA-MANIFEST";
const MANIFEST_VERSION: u32 = 1;

/// A malformed or corrupt object.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct FormatError {
    pub what: String,
    pub reason: String,
}

fn bad(what: &str, reason: impl Into<String>) -> FormatError {
    FormatError {
        what: what.to_string(),
        reason: reason.into(),
    }
}

/// One entry of a segment index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub page: u64,
    /// The page's slot in the data, or [`TOMBSTONE`].
    pub slot: u32,
    /// CRC32C of the page's bytes (0 for a tombstone).
    pub crc: u32,
}

/// Builds a segment object.
#[derive(Debug)]
pub struct SegmentBuilder {
    page_size: usize,
    data: Vec<u8>,
    entries: Vec<Entry>,
}

impl SegmentBuilder {
    pub fn new(page_size: usize) -> SegmentBuilder {
        SegmentBuilder {
            page_size,
            data: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// Add a page's bytes (exactly one page).
    pub fn page(&mut self, page: u64, bytes: &[u8]) {
        debug_assert_eq!(bytes.len(), self.page_size);
        let slot = (self.data.len() / self.page_size) as u32;
        self.data.extend_from_slice(bytes);
        self.entries.push(Entry {
            page,
            slot,
            crc: crc32c::crc32c(bytes),
        });
    }

    /// Record that a page reads as zeroes.
    pub fn tombstone(&mut self, page: u64) {
        self.entries.push(Entry {
            page,
            slot: TOMBSTONE,
            crc: 0,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of page data so far.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// The finished object and its (sorted) index.
    pub fn finish(mut self, page_size_bits: u32) -> (Vec<u8>, Vec<Entry>) {
        let tail = segment_tail(&mut self.entries, self.data.len() as u64, page_size_bits);
        let mut out = self.data;
        out.extend_from_slice(&tail);
        (out, self.entries)
    }
}

/// What follows a segment's `data_len` bytes of page data: the index of `entries` (sorted
/// here by page) and the footer.
pub fn segment_tail(entries: &mut [Entry], data_len: u64, page_size_bits: u32) -> Vec<u8> {
    entries.sort_by_key(|e| e.page);
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN as usize + FOOTER_LEN as usize);
    for e in entries.iter() {
        out.extend_from_slice(&e.page.to_le_bytes());
        out.extend_from_slice(&e.slot.to_le_bytes());
        out.extend_from_slice(&e.crc.to_le_bytes());
    }
    let index_crc = crc32c::crc32c(&out);
    let footer_start = out.len();
    out.extend_from_slice(SEG_MAGIC);
    out.extend_from_slice(&SEG_VERSION.to_le_bytes());
    out.extend_from_slice(&page_size_bits.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(&index_crc.to_le_bytes());
    let footer_crc = crc32c::crc32c(&out[footer_start..]);
    out.extend_from_slice(&footer_crc.to_le_bytes());
    out
}

/// A parsed segment footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub page_size_bits: u32,
    pub entry_count: u64,
    pub index_offset: u64,
    pub index_crc: u32,
}

impl Footer {
    /// Byte range of the index within the object.
    pub fn index_range(&self) -> std::ops::Range<u64> {
        self.index_offset..self.index_offset + self.entry_count * ENTRY_LEN
    }
}

/// Parse the last [`FOOTER_LEN`] bytes of segment `what` (its key, for errors).
pub fn parse_footer(what: &str, b: &[u8]) -> Result<Footer, FormatError> {
    if b.len() != FOOTER_LEN as usize {
        return Err(bad(
            what,
            format!("footer is {} bytes, not {FOOTER_LEN}", b.len()),
        ));
    }
    let crc = u32::from_le_bytes(b[36..40].try_into().expect("4 bytes"));
    if crc32c::crc32c(&b[..36]) != crc {
        return Err(bad(
            what,
            "footer checksum mismatch (the object is corrupt or truncated)",
        ));
    }
    if &b[..8] != SEG_MAGIC {
        return Err(bad(what, "not a Strata segment (bad magic)"));
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != SEG_VERSION {
        return Err(bad(
            what,
            format!("segment format version {version}; this Strata reads version {SEG_VERSION}"),
        ));
    }
    Ok(Footer {
        page_size_bits: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
        entry_count: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        index_offset: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        index_crc: u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
    })
}

/// Parse and check a segment's index bytes.
pub fn parse_index(what: &str, footer: &Footer, b: &[u8]) -> Result<Vec<Entry>, FormatError> {
    if b.len() as u64 != footer.entry_count * ENTRY_LEN {
        return Err(bad(what, "index length does not match the footer"));
    }
    if crc32c::crc32c(b) != footer.index_crc {
        return Err(bad(what, "index checksum mismatch (the object is corrupt)"));
    }
    let mut out = Vec::with_capacity(footer.entry_count as usize);
    for c in b.chunks_exact(ENTRY_LEN as usize) {
        out.push(Entry {
            page: u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
            slot: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
            crc: u32::from_le_bytes(c[12..16].try_into().expect("4 bytes")),
        });
    }
    Ok(out)
}

/// One segment as a manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentRef {
    /// The object key, relative to the image's prefix.
    pub key: String,
    /// Object size in bytes.
    pub size: u64,
    /// Index entries (pages and tombstones) in it.
    pub entries: u64,
    /// Pages of data in it.
    pub pages: u64,
}

/// One version of an image: its geometry and its segments, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub image: String,
    pub version: u64,
    pub image_size: u64,
    pub page_size_bits: u32,
    /// Segments, oldest first: a page's newest entry wins.
    pub segments: Vec<SegmentRef>,
    /// The write buffer generations whose contents are in these segments (all up to this one).
    pub wal_generation: u64,
    /// Which writer made this version (for diagnostics).
    pub writer: String,
    /// Seconds since the Unix epoch when it was made.
    pub created: u64,
    /// For a clone: the image version its pages fall through to (a snapshot's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
}

/// The version of another image a clone reads through to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRef {
    pub image: String,
    pub version: u64,
    /// The snapshot that keeps this version alive.
    pub snapshot: String,
}

/// A snapshot: a name for one manifest version of an image, kept until it is deleted
/// (`images/NAME/snapshots/SNAP`, plain JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    pub image: String,
    pub snapshot: String,
    pub version: u64,
    pub image_size: u64,
    /// Seconds since the Unix epoch when it was taken.
    pub created: u64,
    /// When it was deleted (seconds since the Unix epoch): its data is kept for the garbage
    /// collector's grace period, for readers that still have it open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<u64>,
}

impl SnapshotRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a snapshot record always serializes")
    }

    pub fn decode(what: &str, b: &[u8]) -> Result<SnapshotRecord, FormatError> {
        serde_json::from_slice(b).map_err(|e| bad(what, format!("malformed snapshot record: {e}")))
    }
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("a manifest always serializes");
        let mut out = format!(
            "{MANIFEST_MAGIC} {MANIFEST_VERSION} crc32c={:08x}\n",
            crc32c::crc32c(&body)
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(what: &str, b: &[u8]) -> Result<Manifest, FormatError> {
        let nl = b
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| bad(what, "no header line (not a Strata manifest)"))?;
        let header = std::str::from_utf8(&b[..nl]).map_err(|_| bad(what, "header is not text"))?;
        let mut parts = header.split(' ');
        if parts.next() != Some(MANIFEST_MAGIC) {
            return Err(bad(what, "not a Strata manifest (bad magic)"));
        }
        let version: u32 = parts
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(what, "header has no format version"))?;
        if version != MANIFEST_VERSION {
            return Err(bad(
                what,
                format!("manifest format version {version}; this Strata reads version {MANIFEST_VERSION}"),
            ));
        }
        let crc = parts
            .next()
            .and_then(|c| c.strip_prefix("crc32c="))
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .ok_or_else(|| bad(what, "header has no checksum"))?;
        let body = &b[nl + 1..];
        if crc32c::crc32c(body) != crc {
            return Err(bad(
                what,
                "checksum mismatch (the object is corrupt or truncated)",
            ));
        }
        serde_json::from_slice(body).map_err(|e| bad(what, format!("malformed body: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_round_trip_and_corruption() {
        let mut b = SegmentBuilder::new(4096);
        b.page(9, &[9u8; 4096]);
        b.tombstone(3);
        b.page(5, &[5u8; 4096]);
        let (obj, entries) = b.finish(12);
        assert_eq!(
            entries,
            vec![
                Entry {
                    page: 3,
                    slot: TOMBSTONE,
                    crc: 0
                },
                Entry {
                    page: 5,
                    slot: 1,
                    crc: crc32c::crc32c(&[5u8; 4096])
                },
                Entry {
                    page: 9,
                    slot: 0,
                    crc: crc32c::crc32c(&[9u8; 4096])
                },
            ]
        );
        let f = parse_footer("s", &obj[obj.len() - FOOTER_LEN as usize..]).unwrap();
        assert_eq!(
            (f.page_size_bits, f.entry_count, f.index_offset),
            (12, 3, 8192)
        );
        let r = f.index_range();
        assert_eq!(
            parse_index("s", &f, &obj[r.start as usize..r.end as usize]).unwrap(),
            entries
        );
        // A flipped bit anywhere in the footer or the index is caught.
        let mut bad = obj.clone();
        bad[r.start as usize + 3] ^= 1;
        assert!(parse_index("s", &f, &bad[r.start as usize..r.end as usize]).is_err());
        let n = bad.len();
        bad[n - 10] ^= 1;
        let e = parse_footer("s", &bad[n - FOOTER_LEN as usize..]).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn manifest_round_trip_and_corruption() {
        let m = Manifest {
            image: "vm".into(),
            version: 7,
            image_size: 1 << 30,
            page_size_bits: 12,
            segments: vec![SegmentRef {
                key: "seg/1".into(),
                size: 100,
                entries: 2,
                pages: 1,
            }],
            wal_generation: 3,
            writer: "w".into(),
            created: 1,
            base: Some(BaseRef {
                image: "gold".into(),
                version: 3,
                snapshot: "s1".into(),
            }),
        };
        let b = m.encode();
        assert!(b.starts_with(b"STRATA-MANIFEST 1 crc32c="));
        assert_eq!(Manifest::decode("m", &b).unwrap(), m);
        let mut c = b.clone();
        let n = c.len();
        c[n - 3] ^= 0x20;
        assert!(Manifest::decode("m", &c)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        assert!(Manifest::decode("m", b"hello\n{}").is_err());
    }
}
