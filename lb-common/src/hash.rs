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

/// Hash of a flow for its service's ring: the client's address (as [`crate::Addr`] words) and
/// `ports`, the L4 header's first four bytes as they sit in the packet. Not the destination or
/// the protocol: a service's flows all share them, so they would not move a flow to another
/// slot, and the hash is a serial chain of multiplies that every new flow waits for (about 12
/// cycles a word). An IPv4 address (words 1 to 3 zero) is one word.
#[inline(always)]
pub const fn flow_hash(src: &crate::Addr, ports: u32, seed: u32) -> u32 {
    let mut h = mix(seed, src[0]);
    if src[1] | src[2] | src[3] != 0 {
        h = mix(h, src[1]);
        h = mix(h, src[2]);
        h = mix(h, src[3]);
    }
    finish(mix(h, ports))
}

/// Hash of a client address alone (the source-hash scheduler): the flow hash with the ports
/// zero, so every connection of a client gets one answer, the same on every host with the same
/// seed.
#[inline(always)]
pub const fn source_hash(src: &crate::Addr, seed: u32) -> u32 {
    flow_hash(src, 0, seed)
}

/// The slot of a ring of `size` entries that `hash` picks: multiply-shift, the hash's high
/// bits scaled to the ring, instead of a division (`hash % size`) on every new flow. Below
/// `size` for any hash; 0 for an empty ring.
#[inline(always)]
pub const fn ring_slot(hash: u32, size: u32) -> u32 {
    ((hash as u64 * size as u64) >> 32) as u32
}

/// The bits an encapsulated packet takes from its flow: the outer source's host part and the
/// IPv6 flow label. Not the flow hash (a serial chain of multiplies, which an established flow
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
        let a = [1, 0, 0, 0];
        let base = flow_hash(&a, 3, 7);
        assert_ne!(base, flow_hash(&a, 3, 8));
        assert_ne!(base, flow_hash(&[9, 0, 0, 0], 3, 7));
        assert_ne!(base, flow_hash(&a, 9, 7));
        assert_eq!(base, flow_hash(&a, 3, 7));
        // Every word of an IPv6 address.
        let v6 = [0x2001_0db8, 0, 0, 1];
        for w in 1..4 {
            let mut other = v6;
            other[w] ^= 1;
            assert_ne!(flow_hash(&v6, 3, 7), flow_hash(&other, 3, 7), "word {w}");
        }
    }

    #[test]
    fn spreads_source_ports_evenly_over_a_ring() {
        // 65,536 source ports over rings of 7 and of 65,537 slots (Maglev's default), IPv4 and
        // IPv6 clients: each of 7 slots within 5% of the mean; over the large ring, no slot
        // holds more than a handful.
        for src in [[0x0a00_0001, 0, 0, 0], [0x2001_0db8, 0, 0, 0x0a]] {
            let mut small = [0u32; 7];
            let mut large = [0u8; 65_537];
            for sport in 0..=u16::MAX as u32 {
                let h = flow_hash(&src, sport | (80 << 16), 42);
                small[ring_slot(h, 7) as usize] += 1;
                large[ring_slot(h, 65_537) as usize] += 1;
            }
            let mean = 65_536 / 7;
            assert!(small.iter().all(|b| b.abs_diff(mean) < mean / 20), "{small:?}");
            assert!(large.iter().all(|&n| n <= 8), "a slot of the large ring got {:?}", large.iter().max());
        }
    }

    #[test]
    fn ring_slot_stays_in_the_ring() {
        for size in [0, 1, 7, 65_537, u32::MAX] {
            for hash in [0, 1, 0x8000_0000, u32::MAX] {
                let slot = ring_slot(hash, size);
                assert!(slot < size.max(1), "hash {hash:#x} size {size}: slot {slot}");
            }
        }
        assert_eq!(ring_slot(u32::MAX, 65_537), 65_536);
    }
}
