//! A byte pattern that says where it belongs: each 512-byte sector holds its own sector number
//! (left-aligned decimal, space-padded, ending in a newline), so a write that lands at the wrong
//! offset, or not at all, shows. The guest makes it with busybox awk; the host computes the
//! same bytes to compare with what reached its side.

/// The bytes of sectors `first .. first + count`.
pub fn sectors(first: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(usize::try_from(count * 512).unwrap_or(0));
    for sector in first..first + count {
        out.extend_from_slice(format!("{sector:<511}\n").as_bytes());
    }
    out
}

/// A guest shell command that prints the same bytes as [`sectors`] to stdout.
pub fn guest_command(first: u64, count: u64) -> String {
    format!(
        "awk 'BEGIN {{ for (i = {first}; i < {end}; i++) printf \"%-511d\\n\", i }}'",
        end = first + count
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_are_512_bytes_and_numbered() {
        let bytes = sectors(7, 2);
        assert_eq!(bytes.len(), 1024);
        assert!(bytes.starts_with(b"7 "));
        assert_eq!(bytes[511], b'\n');
        assert!(bytes[512..].starts_with(b"8 "));
        assert_eq!(
            guest_command(7, 2),
            r#"awk 'BEGIN { for (i = 7; i < 9; i++) printf "%-511d\n", i }'"#
        );
    }
}
