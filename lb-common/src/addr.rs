//! Addresses as the maps hold them: IP addresses in network-order words, MACs in 16-bit words.

/// An IPv4 or IPv6 address as four words holding its bytes in network order; an IPv4 address
/// is the first word, the others zero. Keys carry the family beside it, so `10.0.0.1` and
/// `a00:1::` never collide.
pub type Addr = [u32; 4];

/// An IPv4 address (its octets) as an [`Addr`].
pub const fn addr_v4(octets: [u8; 4]) -> Addr {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// An IPv6 address (its octets) as an [`Addr`].
pub const fn addr_v6(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The bit an address takes in [`VIP_BITS`](crate::map_names::VIP_BITS): its words folded to
/// 16 bits. Distinct addresses may share a bit; an address whose bit is clear is no VIP.
pub const fn vip_bit(addr: &Addr) -> u32 {
    let x = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
    (x ^ (x >> 16)) & 0xffff
}

/// The bytes of an [`Addr`] (the inverse of [`addr_v6`]; an IPv4 address is the first four).
pub const fn addr_octets(words: Addr) -> [u8; 16] {
    let [a, b, c, d] = words[0].to_ne_bytes();
    let [e, f, g, h] = words[1].to_ne_bytes();
    let [i, j, k, l] = words[2].to_ne_bytes();
    let [m, n, o, p] = words[3].to_ne_bytes();
    [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p]
}

/// A MAC address as three 16-bit words holding its bytes in memory order: the data path copies
/// it with three aligned 16-bit moves (a `[u8; 6]` copy compiles to a slow byte-wise helper).
pub const fn mac_words(mac: [u8; 6]) -> [u16; 3] {
    [u16::from_ne_bytes([mac[0], mac[1]]), u16::from_ne_bytes([mac[2], mac[3]]), u16::from_ne_bytes([mac[4], mac[5]])]
}

/// The inverse of [`mac_words`].
pub const fn mac_bytes(words: [u16; 3]) -> [u8; 6] {
    let [a, b] = words[0].to_ne_bytes();
    let [c, d] = words[1].to_ne_bytes();
    let [e, f] = words[2].to_ne_bytes();
    [a, b, c, d, e, f]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_bits_fold_every_word() {
        let a = addr_v4([10, 99, 0, 100]);
        assert!(vip_bit(&a) < 1 << 16);
        assert_ne!(vip_bit(&a), vip_bit(&addr_v4([10, 99, 0, 101])), "neighbours differ");
        assert_ne!(vip_bit(&a), vip_bit(&addr_v4([10, 98, 0, 100])));
        let v6 = addr_v6([0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00]);
        assert_ne!(vip_bit(&v6), vip_bit(&addr_v6([0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x01])));
    }
}
