//! Internet checksums (RFC 1071) over fixed-size buffers, unrolled for the verifier.

/// Folds a 32-bit-or-wider one's-complement sum to 16 bits and complements it.
#[inline(always)]
pub fn finish(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One's-complement sum of `N` 16-bit words as they sit in memory (no byte swapping: the
/// checksum of network-order data, stored back in memory order, comes out right either way).
#[inline(always)]
pub fn sum_words<const N: usize>(words: &[u16; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        sum += words[i] as u64;
        i += 1;
    }
    sum
}
