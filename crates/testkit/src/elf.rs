//! Just enough of ELF64 (little-endian) to assemble an initramfs (pure: no I/O): the shared
//! libraries a program needs (`DT_NEEDED`) and a kernel module's `.modinfo` (its `depends=`).

/// What went wrong reading an ELF file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a readable ELF64 little-endian file: {0}")]
pub struct ElfError(pub &'static str);

const SHT_NOTE: u32 = 7;
const SHT_DYNAMIC: u32 = 6;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

struct Section {
    kind: u32,
    name: u32,
    offset: usize,
    size: usize,
    link: u32,
}

fn u16_at(data: &[u8], at: usize) -> Result<u16, ElfError> {
    let bytes = data.get(at..at + 2).ok_or(ElfError("truncated"))?;
    Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, ElfError> {
    let bytes = data.get(at..at + 4).ok_or(ElfError("truncated"))?;
    let mut word = [0; 4];
    word.copy_from_slice(bytes);
    Ok(u32::from_le_bytes(word))
}

fn u64_at(data: &[u8], at: usize) -> Result<u64, ElfError> {
    let bytes = data.get(at..at + 8).ok_or(ElfError("truncated"))?;
    let mut word = [0; 8];
    word.copy_from_slice(bytes);
    Ok(u64::from_le_bytes(word))
}

fn usize_at(data: &[u8], at: usize) -> Result<usize, ElfError> {
    usize::try_from(u64_at(data, at)?).map_err(|_| ElfError("offset out of range"))
}

/// Whether `data` starts like an ELF file.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

fn sections(data: &[u8]) -> Result<Vec<Section>, ElfError> {
    if !is_elf(data) {
        return Err(ElfError("no ELF magic"));
    }
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err(ElfError("not 64-bit little-endian"));
    }
    let shoff = usize_at(data, 0x28)?;
    let shentsize = usize::from(u16_at(data, 0x3a)?);
    let shnum = usize::from(u16_at(data, 0x3c)?);
    if shentsize < 0x40 {
        return Err(ElfError("section header too small"));
    }
    let mut out = Vec::with_capacity(shnum);
    for index in 0..shnum {
        let at = shoff + index * shentsize;
        out.push(Section {
            name: u32_at(data, at)?,
            kind: u32_at(data, at + 4)?,
            offset: usize_at(data, at + 0x18)?,
            size: usize_at(data, at + 0x20)?,
            link: u32_at(data, at + 0x28)?,
        });
    }
    Ok(out)
}

fn bytes_of<'a>(data: &'a [u8], section: &Section) -> Result<&'a [u8], ElfError> {
    data.get(section.offset..section.offset + section.size)
        .ok_or(ElfError("section beyond the end of the file"))
}

fn c_str(table: &[u8], at: usize) -> Result<&str, ElfError> {
    let rest = table
        .get(at..)
        .ok_or(ElfError("string offset out of range"))?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(ElfError("unterminated string"))?;
    std::str::from_utf8(&rest[..end]).map_err(|_| ElfError("string is not UTF-8"))
}

/// The sonames a dynamically linked program or library needs, in order (empty when static).
pub fn needed(data: &[u8]) -> Result<Vec<String>, ElfError> {
    let sections = sections(data)?;
    let mut out = Vec::new();
    for dynamic in sections.iter().filter(|s| s.kind == SHT_DYNAMIC) {
        let strtab = sections
            .get(dynamic.link as usize)
            .ok_or(ElfError("dynamic section links no string table"))?;
        let strings = bytes_of(data, strtab)?;
        let entries = bytes_of(data, dynamic)?;
        for entry in entries.chunks_exact(16) {
            let tag = u64_at(entry, 0)?;
            let value = usize_at(entry, 8)?;
            match tag {
                DT_NULL => break,
                DT_NEEDED => out.push(c_str(strings, value)?.to_string()),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Whether the file has an ELF note from `owner` of type `kind` (in an `SHT_NOTE` section).
pub fn has_note(data: &[u8], owner: &str, kind: u32) -> Result<bool, ElfError> {
    for section in sections(data)?.iter().filter(|s| s.kind == SHT_NOTE) {
        let notes = bytes_of(data, section)?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = u32_at(notes, at)? as usize;
            let descsz = u32_at(notes, at + 4)? as usize;
            let note_kind = u32_at(notes, at + 8)?;
            let name = notes
                .get(at + 12..at + 12 + namesz)
                .ok_or(ElfError("note beyond its section"))?;
            if note_kind == kind && name.strip_suffix(&[0]).unwrap_or(name) == owner.as_bytes() {
                return Ok(true);
            }
            at += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    Ok(false)
}

/// The `key=value` strings of a kernel module's `.modinfo` section.
pub fn modinfo(data: &[u8]) -> Result<Vec<(String, String)>, ElfError> {
    let sections = sections(data)?;
    let shstrndx = usize::from(u16_at(data, 0x3e)?);
    let names = bytes_of(
        data,
        sections
            .get(shstrndx)
            .ok_or(ElfError("no section name table"))?,
    )?;
    let mut out = Vec::new();
    for section in &sections {
        if c_str(names, section.name as usize)? != ".modinfo" {
            continue;
        }
        for item in bytes_of(data, section)?.split(|&b| b == 0) {
            let Ok(item) = std::str::from_utf8(item) else {
                continue;
            };
            if let Some((key, value)) = item.split_once('=') {
                out.push((key.to_string(), value.to_string()));
            }
        }
    }
    Ok(out)
}

/// The modules a kernel module depends on (its `depends=` list, names with underscores).
pub fn module_depends(data: &[u8]) -> Result<Vec<String>, ElfError> {
    Ok(modinfo(data)?
        .into_iter()
        .filter(|(key, _)| key == "depends")
        .flat_map(|(_, value)| {
            value
                .split(',')
                .filter(|name| !name.is_empty())
                .map(|name| name.replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_test_binary() {
        // The test binary itself is a dynamically linked ELF64 program that needs libc.
        let exe = std::env::current_exe().expect("current exe");
        let data = std::fs::read(exe).expect("read the test binary");
        let needed = needed(&data).expect("parse");
        assert!(
            needed.iter().any(|soname| soname.starts_with("libc.so")),
            "{needed:?}"
        );
        assert!(modinfo(&data).expect("parse").is_empty());
    }

    #[test]
    fn refuses_garbage() {
        assert!(needed(b"#!/bin/sh\n").is_err());
        assert!(needed(b"\x7fELF\x02\x01").is_err());
    }
}
