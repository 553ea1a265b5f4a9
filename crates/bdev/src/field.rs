//! Fixed-width integers at byte offsets of a wire header or a data structure, as the protocol
//! codecs read and write them: big-endian for NBD, iSCSI and SCSI, little-endian for NVMe and
//! virtio. Each panics when the field does not fit in the slice: a codec checks a header's
//! length once, before it reads the fields.
//!
//! ```
//! use strata_bdev::field::{be16, le32, put_be16};
//!
//! let mut b = [0u8; 6];
//! put_be16(&mut b, 0, 0x1234);
//! assert_eq!(be16(&b, 0), 0x1234);
//! assert_eq!(le32(&[1, 0, 0, 0], 0), 1);
//! ```

/// The big-endian `u16` at `at`.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(array(b, at))
}

/// The big-endian `u32` at `at`.
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(array(b, at))
}

/// The big-endian `u64` at `at`.
pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(array(b, at))
}

/// The little-endian `u16` at `at`.
pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(b, at))
}

/// The little-endian `u32` at `at`.
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(b, at))
}

/// The little-endian `u64` at `at`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(b, at))
}

/// Write `v` big-endian at `at`.
pub fn put_be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Write `v` big-endian at `at`.
pub fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Write `v` big-endian at `at`.
pub fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut x = [0u8; N];
    x.copy_from_slice(&b[at..at + N]);
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_what_was_written() {
        let mut b = [0u8; 16];
        put_be16(&mut b, 1, 0x0102);
        put_be32(&mut b, 3, 0x0304_0506);
        put_be64(&mut b, 7, 0x0708_090a_0b0c_0d0e);
        assert_eq!(b[..3], [0, 1, 2]);
        assert_eq!(be16(&b, 1), 0x0102);
        assert_eq!(be32(&b, 3), 0x0304_0506);
        assert_eq!(be64(&b, 7), 0x0708_090a_0b0c_0d0e);
        assert_eq!(le16(&b, 1), 0x0201);
        assert_eq!(le32(&b, 3), 0x0605_0403);
        assert_eq!(le64(&b, 7), 0x0e0d_0c0b_0a09_0807);
    }

    #[test]
    #[should_panic]
    fn a_field_past_the_end_panics() {
        be32(&[0; 3], 0);
    }
}
