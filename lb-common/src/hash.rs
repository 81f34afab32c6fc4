//! The flow hash: a seeded MurmurHash3-style mix of the 5-tuple. Every balancer host that
//! shares a VIP uses the same seed, so each picks the same backend for a flow.

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finaliser: every input bit moves every output bit.
#[inline(always)]
pub(crate) const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow. Addresses as [`crate::Addr`] words, `ports` the L4 header's first four
/// bytes, all as they sit in the packet.
#[inline(always)]
pub const fn flow_hash(src: &crate::Addr, dst: &crate::Addr, ports: u32, proto: u8, seed: u32) -> u32 {
    let mut h = mix(seed, src[0]);
    h = mix(h, src[1]);
    h = mix(h, src[2]);
    h = mix(h, src[3]);
    h = mix(h, dst[0]);
    h = mix(h, dst[1]);
    h = mix(h, dst[2]);
    h = mix(h, dst[3]);
    h = mix(h, ports);
    h = mix(h, proto as u32);
    finish(h ^ 37)
}

/// Hash of a client address alone (the source-hash scheduler): the flow hash with the
/// destination, ports and protocol zero, so every connection of a client gets one answer, the
/// same on every host with the same seed.
#[inline(always)]
pub const fn source_hash(src: &crate::Addr, seed: u32) -> u32 {
    flow_hash(src, &[0; 4], 0, 0, seed)
}

/// The bits an encapsulated packet takes from its flow: the outer source's host part and the
/// IPv6 flow label. Not the flow hash (about 175 instructions, which an established flow
/// otherwise never needs): a fold of the client's address and the ports, mixed by the
/// finaliser, so every packet of a flow gets the same bits and a backend's RSS spreads flows
/// by them. Unseeded: nothing is chosen by it.
#[inline(always)]
pub const fn encap_hash(src: &crate::Addr, ports: u32) -> u32 {
    finish(
        src[0]
            ^ src[1].rotate_left(8)
            ^ src[2].rotate_left(16)
            ^ src[3].rotate_left(24)
            ^ ports.wrapping_mul(0x9e37_79b1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encap_hash_varies_with_the_client_and_its_ports() {
        let a = [0x0a00_0001, 0, 0, 0];
        let base = encap_hash(&a, 1000 | (80 << 16));
        assert_eq!(base, encap_hash(&a, 1000 | (80 << 16)));
        assert_ne!(base, encap_hash(&a, 1001 | (80 << 16)));
        assert_ne!(base, encap_hash(&[0x0a00_0002, 0, 0, 0], 1000 | (80 << 16)));
        // The low byte (an IPv4 outer source's host part under a /24) spreads source ports.
        let mut buckets = [0u32; 256];
        for sport in 0..=u16::MAX as u32 {
            buckets[(encap_hash(&a, sport | (80 << 16)) & 0xff) as usize] += 1;
        }
        let mean = 65_536 / 256;
        assert!(buckets.iter().all(|&b| b.abs_diff(mean) < mean / 4), "{buckets:?}");
    }

    #[test]
    fn seed_and_every_field_matter() {
        let (a, b) = ([1, 0, 0, 0], [2, 0, 0, 0]);
        let base = flow_hash(&a, &b, 3, 6, 7);
        assert_ne!(base, flow_hash(&a, &b, 3, 6, 8));
        assert_ne!(base, flow_hash(&[9, 0, 0, 0], &b, 3, 6, 7));
        assert_ne!(base, flow_hash(&a, &[2, 0, 0, 1], 3, 6, 7));
        assert_ne!(base, flow_hash(&a, &b, 9, 6, 7));
        assert_ne!(base, flow_hash(&a, &b, 3, 17, 7));
        assert_eq!(base, flow_hash(&a, &b, 3, 6, 7));
    }

    #[test]
    fn spreads_source_ports_evenly() {
        // 65,536 source ports over 7 buckets: each within 5% of the mean.
        let mut buckets = [0u32; 7];
        for sport in 0..=u16::MAX as u32 {
            let h = flow_hash(&[0x0a00_0001, 0, 0, 0], &[0x0a00_00c8, 0, 0, 0], sport | (80 << 16), 6, 42);
            buckets[(h % 7) as usize] += 1;
        }
        let mean = 65_536 / 7;
        for b in buckets {
            assert!(b.abs_diff(mean) < mean / 20, "{buckets:?}");
        }
    }
}
