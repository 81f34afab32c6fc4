//! Maglev lookup tables (Eisenbud et al., NSDI 2016), built in userspace; the data path only indexes them.
//!
//! Every balancer host that shares a VIP must build the *same* table from the same set of
//! backends, whatever order its configuration lists them in, so that a flow keeps its backend
//! when the router sends its packets to another host. That is why members are sorted by their
//! stable identity before anything else happens, and why the hashes below are frozen.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use lb_common::NO_BACKEND;

/// One backend as the table builder sees it: a stable identity and a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// What goes into the table: the backend id. Must not be [`NO_BACKEND`].
    pub id: u32,
    /// The stable identity hashed for the permutation (e.g. the backend's IPv4 address), so that
    /// the table does not depend on config order or on the ids the agent happened to hand out.
    pub key: u64,
    /// Relative share of the table; 0 keeps the backend out of it.
    pub weight: u32,
}

/// Whether `n` is prime; `const` so the config validator can use it anywhere.
#[must_use]
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    // u64: `d * d` would overflow u32 for the last candidates below u32::MAX.
    let n = n as u64;
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The stable identity of a backend for Maglev: an IPv4 address as its number, an IPv6
/// address folded to 64 bits. Never derived from config order, so every host agrees.
pub fn address_key(addr: std::net::IpAddr) -> u64 {
    match addr {
        std::net::IpAddr::V4(a) => u64::from(u32::from(a)),
        std::net::IpAddr::V6(a) => {
            let n = u128::from(a);
            (n >> 64) as u64 ^ (n as u64).rotate_left(29)
        }
    }
}

/// Builds a Maglev table of `size` entries, each the id of one member of weight > 0; if no member
/// has weight > 0, every entry is [`NO_BACKEND`].
///
/// Members are sorted by `(key, id)` first, so the input order never matters. Each member gets
/// floor or ceil of `size * weight / total_weight` entries (largest remainder); a member whose
/// share rounds to 0 gets none. Removing one member moves its own entries plus only a small
/// fraction of the others (under 1% of the table in the tests below).
///
/// `size` must be prime (the config validator ensures it): that is what makes every member's
/// preference list a permutation of the table. Debug builds assert it; with a composite size a
/// release build still terminates but the table may be uneven or keep [`NO_BACKEND`] holes.
/// Sizes 0 and 1 are accepted (empty table, one entry). Ids equal to [`NO_BACKEND`] cannot be
/// told apart from an empty entry, so such members are ignored.
///
/// Cost: O(size) memory; O(size · log n) for the scheduling plus the probing of taken slots,
/// which is about size · ln(size) in practice (as in the paper) and n · size at worst, n being
/// the number of members. In a release build: ~3 ms for 65537 entries and 10 members, ~0.1 s for
/// 655373 entries and 4096 members.
#[must_use]
pub fn build(members: &[Member], size: u32) -> Vec<u32> {
    debug_assert!(size < 2 || is_prime(size), "Maglev table size {size} is not prime");
    let mut table = vec![NO_BACKEND; size as usize];
    let live = live_members(members);
    let quotas = quotas(&live, size);
    fill(&mut table, &live, &quotas);
    table
}

/// The members that may own entries, in the canonical order every host agrees on.
fn live_members(members: &[Member]) -> Vec<Member> {
    let mut live: Vec<Member> = members.iter().copied().filter(|m| m.weight > 0 && m.id != NO_BACKEND).collect();
    live.sort_unstable_by_key(|m| (m.key, m.id));
    live
}

/// Entries each member must own: quotas sum to `size` (if any member is live) and each is floor
/// or ceil of `size * w / W` (largest-remainder method). Remainder ties go to the earlier member
/// in the canonical order, so the result is the same on every host.
fn quotas(live: &[Member], size: u32) -> Vec<u64> {
    let total: u64 = live.iter().map(|m| u64::from(m.weight)).sum();
    if total == 0 {
        return vec![0; live.len()];
    }
    let size = u64::from(size);
    // size and weight are both u32, so their product fits in u64.
    let shares: Vec<(u64, u64)> = live
        .iter()
        .map(|m| {
            let exact = size * u64::from(m.weight); // size · w / W, scaled by W
            (exact / total, exact % total)
        })
        .collect();
    let mut quotas: Vec<u64> = shares.iter().map(|&(floor, _)| floor).collect();
    // The floors fall short by fewer entries than there are members with a non-zero remainder
    // (the remainders sum to `total * deficit`, each below `total`), so only those get a ceil.
    let deficit = size - quotas.iter().sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..live.len()).collect();
    by_remainder.sort_by_key(|&i| (Reverse(shares[i].1), i));
    for &i in by_remainder.iter().take(deficit as usize) {
        quotas[i] += 1;
    }
    quotas
}

/// Fills the table in rounds. In round r, member i claims its next preferred empty slots until it
/// owns min(q_i, ceil(r · q_i / q_max)) of them. Because q_i <= q_max that target grows by at most
/// one per round, so every member claims at most one slot per round; with equal weights this is
/// exactly the paper's round robin, and with unequal ones the heavy members do not grab their
/// whole share before the light ones get their turn.
///
/// Rather than visit every member every round (n · q_max steps, billions with one heavy member
/// among thousands of light ones), a heap yields the claims in the same (round, member) order.
fn fill(table: &mut [u32], live: &[Member], quotas: &[u64]) {
    let size = table.len() as u64;
    let q_max = quotas.iter().copied().max().unwrap_or(0);
    let mut prefs: Vec<Preferences> = live.iter().map(|m| Preferences::new(m.key, size)).collect();
    let mut owned = vec![0u64; live.len()];
    let mut turns: BinaryHeap<Reverse<(u64, usize)>> =
        (0..live.len()).filter(|&i| quotas[i] > 0).map(|i| Reverse((1, i))).collect();
    while let Some(Reverse((_, i))) = turns.pop() {
        if !claim(table, &mut prefs[i], live[i].id) {
            continue; // Only with a composite size: this member's list is exhausted.
        }
        owned[i] += 1;
        if owned[i] < quotas[i] {
            turns.push(Reverse((next_round(owned[i], quotas[i], q_max), i)));
        }
    }
}

/// First round r whose target ceil(r · quota / q_max) exceeds `owned`, i.e. r · quota > owned · q_max.
/// owned < quota <= q_max <= 2^32, so the product fits in u64.
fn next_round(owned: u64, quota: u64, q_max: u64) -> u64 {
    owned * q_max / quota + 1
}

/// Gives `id` the member's next preferred empty slot; false if it has none left.
fn claim(table: &mut [u32], prefs: &mut Preferences, id: u32) -> bool {
    for slot in prefs.by_ref() {
        if table[slot] == NO_BACKEND {
            table[slot] = id;
            return true;
        }
    }
    false
}

/// A member's preference list: (offset + j · skip) mod size for j = 0, 1, ..., size - 1. With a
/// prime size and 0 < skip < size, that visits every slot exactly once.
struct Preferences {
    slot: u64,
    skip: u64,
    size: u64,
    left: u64,
}

impl Preferences {
    fn new(key: u64, size: u64) -> Self {
        // Guards keep sizes 0 and 1 free of a modulo by zero; the lists are then trivial.
        let offset = if size > 0 { h1(key) % size } else { 0 };
        let skip = if size > 1 { h2(key) % (size - 1) + 1 } else { 1 };
        Preferences { slot: offset, skip, size, left: size }
    }
}

impl Iterator for Preferences {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        // Bounded by `left`, not by finding an empty slot: with a composite size the list
        // can cycle through a subset of the table, and this must still terminate.
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let slot = self.slot;
        // slot, skip < size <= 2^32: the sum fits in u64.
        self.slot = (self.slot + self.skip) % self.size;
        Some(slot as usize)
    }
}

// h1 and h2 are two unrelated 64-bit mixes of the key: h1 picks where a member's preference list
// starts, h2 how it strides. FROZEN: every balancer host sharing a VIP must build the same table,
// and hosts running different versions of xlb coexist during an upgrade; changing a constant here
// would re-shuffle every connection in flight. The `golden_table` test pins them.

/// splitmix64's finalizer (Steele et al.), with its golden-ratio increment.
fn h1(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// MurmurHash3's fmix64, on the key xored with a constant so that key 0 does not map to 0.
fn h2(key: u64) -> u64 {
    let mut z = key ^ 0x2545_f491_4f6c_dd1d;
    z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65_537;

    /// Members with ids 0.. and keys that look like the agent's (10.0.x.y as u64).
    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member { id: i as u32, key: 0x0a00_0000 + 7 * i as u64 + 1, weight })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u64> {
        let mut counts = vec![0u64; n];
        for &id in table {
            assert!((id as usize) < n, "entry {id} is not a member id");
            counts[id as usize] += 1;
        }
        counts
    }

    /// Asserts every member owns floor or ceil of M · w / W entries.
    fn assert_shares(weights: &[u32], table: &[u32]) {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let size = table.len() as u64;
        for (i, (&w, &got)) in weights.iter().zip(&counts(table, weights.len())).enumerate() {
            let exact = size * u64::from(w);
            let (lo, hi) = (exact / total, exact.div_ceil(total));
            assert!(lo <= got && got <= hi, "member {i} (weight {w}) owns {got}, expected {lo}..={hi}");
        }
    }

    /// Deterministic Fisher-Yates, so a failure reproduces.
    fn shuffle<T>(items: &mut [T], mut seed: u64) {
        for i in (1..items.len()).rev() {
            seed = h1(seed);
            items.swap(i, (seed % (i as u64 + 1)) as usize);
        }
    }

    /// Entries that changed owner, not counting those of `removed`, which must all move.
    fn moved_others(before: &[u32], after: &[u32], removed: u32) -> usize {
        let mut moved = 0;
        for (&b, &a) in before.iter().zip(after) {
            if b == removed {
                assert_ne!(a, removed);
            } else if a != b {
                moved += 1;
            }
        }
        moved
    }

    #[test]
    fn primes() {
        for p in [2, 3, 5, 7, 11, 13, 251, 65_537, 655_373, 4_294_967_291] {
            assert!(is_prime(p), "{p}");
        }
        for c in [0, 1, 4, 9, 15, 91, 65_536, 65_535, 655_371, 4_294_967_295] {
            assert!(!is_prime(c), "{c}");
        }
        const _: () = assert!(is_prime(lb_common::limits::DEFAULT_MAGLEV_SIZE));
        const _: () = assert!(is_prime(lb_common::limits::MAX_MAGLEV_SIZE));
    }

    #[test]
    fn equal_weights_split_evenly() {
        for n in [1, 3, 10, 100] {
            let weights = vec![1; n];
            let table = build(&members(&weights), M);
            assert_eq!(table.len(), M as usize);
            assert_shares(&weights, &table);
        }
    }

    #[test]
    fn unequal_weights_split_by_weight() {
        for weights in [&[1, 2, 3, 10][..], &[1, 1_000_000], &[5, 0, 7, 1, 1, 1], &[u32::MAX, u32::MAX, 1]] {
            assert_shares(weights, &build(&members(weights), M));
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut ms = members(&[1, 2, 3, 10, 1, 1, 4, 0, 2]);
        let reference = build(&ms, M);
        for seed in 1..5 {
            shuffle(&mut ms, seed);
            assert_eq!(build(&ms, M), reference, "seed {seed}");
        }
    }

    #[test]
    fn no_weight_means_no_backend() {
        assert_eq!(build(&[], M), vec![NO_BACKEND; M as usize]);
        assert_eq!(build(&members(&[0, 0, 0]), 13), vec![NO_BACKEND; 13]);
        let table = build(&members(&[0, 1, 0, 2]), M);
        assert!(table.iter().all(|&id| id == 1 || id == 3));
    }

    #[test]
    fn tiny_sizes() {
        assert!(build(&members(&[1, 1]), 0).is_empty());
        assert_eq!(build(&members(&[1, 1]), 1).len(), 1);
        assert_ne!(build(&members(&[1, 1]), 1)[0], NO_BACKEND);
        assert_eq!(build(&members(&[1, 1, 1]), 2).len(), 2);
    }

    // Disruption when one of N equal members goes away. Ideally only its own ~M/N entries move;
    // Maglev trades a little of that for an even split, and the paper (§5.3) shows the extra churn
    // is small and shrinks as M grows relative to N. Measured at M = 65537 with these hashes:
    // - the keys below: N = 10 moves 135 other entries (0.21% of M), N = 100 moves 370 (0.56%);
    // - removing each member in turn, over four key sets (these and three random ones): at most
    //   257 (0.39%) for N = 10 and 469 (0.72%) for N = 100.
    // The bounds, 1% and 1.5% of M, leave a 2x margin over the worst case seen.

    #[test]
    fn removing_one_of_10_moves_few_others() {
        let ms = members(&[1; 10]);
        let before = build(&ms, M);
        let removed = ms[3].id;
        let after = build(&[&ms[..3], &ms[4..]].concat(), M);
        let moved = moved_others(&before, &after, removed);
        eprintln!("N=10: removing one moved {moved} other entries ({:.2}% of M)", 100.0 * moved as f64 / f64::from(M));
        assert!(moved * 100 <= M as usize, "{moved} > 1% of M");
    }

    #[test]
    fn removing_one_of_100_moves_few_others() {
        let ms = members(&[1; 100]);
        let before = build(&ms, M);
        let removed = ms[42].id;
        let after = build(&[&ms[..42], &ms[43..]].concat(), M);
        let moved = moved_others(&before, &after, removed);
        eprintln!("N=100: removing one moved {moved} other entries ({:.2}% of M)", 100.0 * moved as f64 / f64::from(M));
        assert!(moved * 200 <= 3 * M as usize, "{moved} > 1.5% of M");
    }

    /// Pins h1, h2 and the fill order: if this changes, hosts running different versions would
    /// disagree on every table. Do not update the expectation; restore the algorithm.
    #[test]
    fn golden_table() {
        // h1 is splitmix64's finalizer: its value for 0 is splitmix64's well-known first output.
        assert_eq!(h1(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(h1(0x0a00_0001), 0x207f_1456_6dae_ebc6);
        assert_eq!(h2(0), 0xb800_bd6c_0247_2607);
        assert_eq!(h2(0x0a00_0001), 0x82a7_9854_8c54_faf3);
        assert_eq!(build(&members(&[1, 2, 1]), 13), [1, 1, 2, 1, 0, 0, 1, 0, 2, 2, 1, 1, 1]);
    }
}
