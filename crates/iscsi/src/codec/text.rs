//! Login and Text negotiation text: `key=value` pairs, each ended by a NUL byte (RFC 7143
//! section 6), and the value types negotiation uses.

use super::CodecError;

/// The longest key the standard allows.
pub const MAX_KEY: usize = 63;
/// The longest value Strata accepts (the standard allows 8192 for most, 255 for names).
pub const MAX_VALUE: usize = 8192;

/// Encode pairs as `key=value\0…`.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decode `key=value\0…` into pairs, in order. Trailing NULs (padding) are allowed; a pair
/// without `=`, a key that is empty or too long, or text that is not UTF-8 is an error.
pub fn decode(data: &[u8]) -> Result<Vec<(String, String)>, CodecError> {
    let mut pairs = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item)
            .map_err(|_| CodecError::Malformed("negotiation text is not UTF-8".into()))?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| CodecError::Malformed(format!("negotiation item {s:?} has no =")))?;
        if k.is_empty() || k.len() > MAX_KEY {
            return Err(CodecError::Malformed(format!(
                "negotiation key {k:?} is empty or longer than {MAX_KEY} bytes"
            )));
        }
        if v.len() > MAX_VALUE {
            return Err(CodecError::Malformed(format!(
                "the value of {k} is longer than {MAX_VALUE} bytes"
            )));
        }
        pairs.push((k.to_string(), v.to_string()));
    }
    Ok(pairs)
}

/// Parse a numerical value: decimal, or hexadecimal with `0x`.
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        v.parse().ok()
    }
}

/// Parse a boolean value (`Yes`/`No`).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// A boolean as negotiation text.
pub fn bool_text(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// Decode a binary value written as `0x…` hex or `0b…` base64 (CHAP challenges and responses).
pub fn parse_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if !hex.len().is_multiple_of(2) && hex.len() > 1 {
            // An odd count: the first digit stands alone.
            let padded = format!("0{hex}");
            return decode_hex(&padded);
        }
        return decode_hex(hex);
    }
    if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        return decode_base64(b64);
    }
    None
}

/// Bytes as `0x…` hex.
pub fn hex_text(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pairs = vec![
            (
                "InitiatorName".to_string(),
                "iqn.2024-01.io.strata:x".to_string(),
            ),
            ("HeaderDigest".to_string(), "CRC32C,None".to_string()),
            ("Empty".to_string(), String::new()),
        ];
        assert_eq!(decode(&encode(&pairs)).unwrap(), pairs);
        // Padding NULs are ignored.
        let mut padded = encode(&pairs);
        padded.extend_from_slice(&[0, 0]);
        assert_eq!(decode(&padded).unwrap(), pairs);
    }

    #[test]
    fn refuses_malformed_text() {
        assert!(decode(b"NoEquals\0").is_err());
        assert!(decode(b"=value\0").is_err());
        assert!(decode(&[0xff, b'=', b'x', 0]).is_err());
    }

    #[test]
    fn values() {
        assert_eq!(parse_number("262144"), Some(262144));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("x"), None);
        assert_eq!(parse_bool("Yes"), Some(true));
        assert_eq!(parse_bool("yes"), None);
        assert_eq!(parse_binary("0x0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_binary("0xaff"), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(parse_binary("0x"), None);
        assert_eq!(parse_binary("12"), None);
        assert_eq!(hex_text(&[0, 0xab]), "0x00ab");
    }
}
