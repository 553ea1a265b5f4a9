//! The "newc" cpio archive format, as the kernel unpacks an initramfs (pure: no I/O).
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated path padded to a multiple of four bytes, then the data padded likewise. The
//! archive ends with an entry named `TRAILER!!!`. The kernel does not create missing parent
//! directories, so [`Tree`] adds them, and writes parents before their contents.

use std::collections::BTreeMap;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// One entry of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory with these permission bits.
    Dir { perm: u32 },
    /// A regular file.
    File { perm: u32, data: Vec<u8> },
    /// A symbolic link to `target`.
    Symlink { target: String },
    /// A character device node.
    CharDev { perm: u32, major: u32, minor: u32 },
}

/// A file tree to archive, keyed by path without a leading `/` (`bin/sh`).
#[derive(Debug, Default, Clone)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Tree {
        Tree::default()
    }

    /// Add (or replace) an entry, and every missing parent directory (mode 0755).
    pub fn insert(&mut self, path: &str, entry: Entry) {
        let path = path.trim_matches('/');
        for (slash, _) in path.match_indices('/') {
            self.entries
                .entry(path[..slash].to_string())
                .or_insert(Entry::Dir { perm: 0o755 });
        }
        self.entries.insert(path.to_string(), entry);
    }

    /// Add a directory (and its parents).
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if !self.entries.contains_key(path) {
            self.insert(path, Entry::Dir { perm: 0o755 });
        }
    }

    /// Whether the tree has an entry at `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_matches('/'))
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the tree has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The archive. Paths sort so that a directory comes before what it holds.
    pub fn to_newc(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let ino = u32::try_from(ino + 1).unwrap_or(u32::MAX);
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir { perm } => (S_IFDIR | perm, 2, &[], (0, 0)),
                Entry::File { perm, data } => (S_IFREG | perm, 1, data, (0, 0)),
                Entry::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
                Entry::CharDev { perm, major, minor } => (S_IFCHR | perm, 1, &[], (*major, *minor)),
            };
            write_entry(&mut out, ino, mode, nlink, path, data, rdev);
        }
        write_entry(&mut out, 0, 0, 1, "TRAILER!!!", &[], (0, 0));
        out
    }
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: fixed, so the same inputs give the same archive
        u32::try_from(data.len()).unwrap_or(u32::MAX),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(namesize).unwrap_or(u32::MAX),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(header: &[u8], index: usize) -> u32 {
        let start = 6 + index * 8;
        let text = std::str::from_utf8(&header[start..start + 8]).expect("hex digits");
        u32::from_str_radix(text, 16).expect("hex field")
    }

    #[test]
    fn parents_come_first_and_are_created() {
        let mut tree = Tree::new();
        tree.insert(
            "usr/bin/tool",
            Entry::File {
                perm: 0o755,
                data: b"abc".to_vec(),
            },
        );
        tree.insert(
            "usr-local",
            Entry::Symlink {
                target: "usr".into(),
            },
        );
        let paths: Vec<_> = tree.entries.keys().cloned().collect();
        assert_eq!(paths, ["usr", "usr-local", "usr/bin", "usr/bin/tool"]);
    }

    #[test]
    fn layout_is_newc() {
        let mut tree = Tree::new();
        tree.insert(
            "init",
            Entry::File {
                perm: 0o755,
                data: b"hello".to_vec(),
            },
        );
        tree.insert(
            "dev/console",
            Entry::CharDev {
                perm: 0o600,
                major: 5,
                minor: 1,
            },
        );
        let archive = tree.to_newc();
        assert_eq!(archive.len() % 4, 0);
        // Entries: dev, dev/console, init, TRAILER!!!
        let mut at = 0;
        let mut seen = Vec::new();
        while at < archive.len() {
            let header = &archive[at..at + 110];
            assert_eq!(&header[..6], b"070701");
            let size = field(header, 6) as usize;
            let namesize = field(header, 11) as usize;
            let name = &archive[at + 110..at + 110 + namesize - 1];
            assert_eq!(archive[at + 110 + namesize - 1], 0);
            let data_at = (at + 110 + namesize).next_multiple_of(4);
            let name = String::from_utf8(name.to_vec()).expect("utf-8 name");
            if name == "init" {
                assert_eq!(field(header, 1), 0o100755);
                assert_eq!(&archive[data_at..data_at + size], b"hello");
            }
            if name == "dev/console" {
                assert_eq!(field(header, 1), 0o020600);
                assert_eq!((field(header, 9), field(header, 10)), (5, 1));
            }
            seen.push(name);
            at = (data_at + size).next_multiple_of(4);
        }
        assert_eq!(seen, ["dev", "dev/console", "init", "TRAILER!!!"]);
    }
}
