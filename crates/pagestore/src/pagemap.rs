//! Hash maps keyed by page number: the page map of a manifest and the write buffer's index
//! hash every page a request touches, so they use a one-multiply hash instead of SipHash.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Fibonacci hashing's multiplier (2^64 / φ, odd).
const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// Mixes integer keys with one multiplication per word, then folds the high bits into the low
/// ones and mixes once more (the map indexes by the low bits, which a multiplication alone
/// leaves alike for keys that differ only in high bits: pages a power of two apart).
#[derive(Debug, Default, Clone, Copy)]
pub struct PageHasher(u64);

impl Hasher for PageHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(K);
    }

    fn finish(&self) -> u64 {
        let h = self.0 ^ (self.0 >> 32);
        h.wrapping_mul(K) ^ (h >> 29)
    }
}

/// A map from page numbers.
pub type PageMap<V> = HashMap<u64, V, BuildHasherDefault<PageHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn pages_a_power_of_two_apart_spread_over_the_low_bits() {
        let b = BuildHasherDefault::<PageHasher>::default();
        let low: std::collections::HashSet<u64> =
            (0..1024u64).map(|i| b.hash_one(i << 20) & 1023).collect();
        assert!(low.len() > 600, "{} distinct buckets of 1024", low.len());
    }
}
