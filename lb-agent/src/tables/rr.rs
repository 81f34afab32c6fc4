//! Round-robin tables for the rr and wrr schedulers: the data path walks a service's table with
//! a per-CPU cursor, so the table holds the order in which backends take new flows.
//!
//! The order is nginx's smooth weighted round robin: every step each member's current value
//! grows by its weight, the largest (first in the canonical order on a tie) is picked and
//! loses the total weight. Over one cycle of `W` = Σ weight (after dividing the weights by
//! their greatest common divisor) each member appears exactly `weight` times, spread out rather
//! than in runs: weights 5, 1, 1 give `a a b a c a a`, not `a a a a a b c`.
use lb_common::NO_BACKEND;

use crate::tables::maglev::Member;

/// The members that take new flows, in the order every host agrees on.
fn live_members(members: &[Member], weighted: bool) -> Vec<Member> {
    let mut live: Vec<Member> = members
        .iter()
        .filter(|m| m.weight > 0 && m.id != NO_BACKEND)
        .map(|m| Member { weight: if weighted { m.weight } else { 1 }, ..*m })
        .collect();
    live.sort_unstable_by_key(|m| (m.key, m.id));
    live
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The first `len` entries of the smooth weighted round-robin sequence of `members` (weights
/// as given, none 0).
fn smooth_sequence(members: &[Member], len: usize) -> Vec<u32> {
    let total: i64 = members.iter().map(|m| i64::from(m.weight)).sum();
    let mut current = vec![0i64; members.len()];
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        let mut best = 0;
        for (i, m) in members.iter().enumerate() {
            current[i] += i64::from(m.weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(members[best].id);
    }
    out
}

/// One cycle of the sequence: each member of weight > 0 appears `weight / g` times, `g` the
/// greatest common divisor of the weights (every member once when `weighted` is false). Empty
/// when no member has weight > 0.
#[must_use]
pub fn cycle(members: &[Member], weighted: bool) -> Vec<u32> {
    let mut live = live_members(members, weighted);
    let g = live.iter().fold(0, |g, m| gcd(g, u64::from(m.weight))).max(1);
    for m in &mut live {
        m.weight = (u64::from(m.weight) / g) as u32;
    }
    let total: u64 = live.iter().map(|m| u64::from(m.weight)).sum();
    smooth_sequence(&live, total as usize)
}

/// The table of a rr (`weighted` false) or wrr service of `size` allocated entries: as many
/// whole cycles as fit, so that the cursor, wrapping at the table's end, keeps every member's
/// exact share. A cycle longer than `size` (weights summing past it) is cut to its first
/// `size` entries: the shares are then off by up to one cycle's worth of rounding over `size`
/// entries. No member of weight > 0: one [`NO_BACKEND`] entry.
#[must_use]
pub fn table(members: &[Member], size: u32, weighted: bool) -> Vec<u32> {
    let size = size.max(1) as usize;
    let live = live_members(members, weighted);
    if live.is_empty() {
        return vec![NO_BACKEND];
    }
    let g = live.iter().fold(0, |g, m| gcd(g, u64::from(m.weight))).max(1);
    let total: u64 = live.iter().map(|m| u64::from(m.weight) / g).sum();
    if total as usize >= size {
        let reduced: Vec<Member> =
            live.iter().map(|m| Member { weight: (u64::from(m.weight) / g) as u32, ..*m }).collect();
        return smooth_sequence(&reduced, size);
    }
    let one = cycle(members, weighted);
    let cycles = size / one.len();
    one.repeat(cycles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[u32]) -> Vec<Member> {
        weights.iter().enumerate().map(|(i, &w)| Member { id: i as u32, key: 100 + i as u64, weight: w }).collect()
    }

    fn count(seq: &[u32], id: u32) -> usize {
        seq.iter().filter(|&&x| x == id).count()
    }

    #[test]
    fn nginx_example_is_interleaved() {
        // nginx's own example: weights 5, 1, 1 give a a b a c a a.
        assert_eq!(cycle(&members(&[5, 1, 1]), true), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn proportions_follow_the_weights_over_a_cycle() {
        let m = members(&[1, 2, 3]);
        let c = cycle(&m, true);
        assert_eq!(c.len(), 6);
        assert_eq!((count(&c, 0), count(&c, 1), count(&c, 2)), (1, 2, 3));
        // Weights with a common divisor give the same, shorter cycle.
        assert_eq!(cycle(&members(&[10, 20, 30]), true), c);
        let big = members(&[7, 3, 11, 1]);
        let c = cycle(&big, true);
        assert_eq!(c.len(), 22);
        for (i, w) in [7, 3, 11, 1].into_iter().enumerate() {
            assert_eq!(count(&c, i as u32), w);
        }
    }

    #[test]
    fn no_member_runs_longer_than_its_share_needs() {
        // Smooth WRR: between two picks of a member there are at most ceil(W / w) other steps,
        // and a light member is never starved for a whole half cycle.
        let weights = [1, 2, 3, 10];
        let c = cycle(&members(&weights), true);
        let total: usize = weights.iter().sum::<u32>() as usize;
        for (id, &w) in weights.iter().enumerate() {
            let positions: Vec<usize> = (0..2 * total).filter(|&i| c[i % total] == id as u32).collect();
            for pair in positions.windows(2) {
                let gap = pair[1] - pair[0];
                assert!(gap <= total.div_ceil(w as usize) + 1, "member {id} gap {gap} in {c:?}");
            }
        }
        // The heavy member never takes more than ceil(10/6)+1 in a row.
        let longest = c.chunk_by(|a, b| a == b).map(<[u32]>::len).max().unwrap();
        assert!(longest <= 2, "{c:?}");
    }

    #[test]
    fn rr_ignores_weights_and_drained_members() {
        let m = members(&[5, 0, 2, 1]);
        assert_eq!(cycle(&m, false), [0, 2, 3]);
        assert_eq!(cycle(&m, true), [0, 2, 0, 0, 3, 0, 2, 0]);
    }

    #[test]
    fn order_of_the_config_does_not_matter() {
        let mut m = members(&[1, 2, 3]);
        let c = cycle(&m, true);
        m.reverse();
        assert_eq!(cycle(&m, true), c);
    }

    #[test]
    fn tables_hold_whole_cycles() {
        let t = table(&members(&[1, 2, 3]), 65537, true);
        assert_eq!(t.len(), 65537 - 65537 % 6);
        assert_eq!((count(&t, 0), count(&t, 1), count(&t, 2)), (10922, 21844, 32766));
        let c = cycle(&members(&[1, 2, 3]), true);
        assert!(t.chunks(6).all(|chunk| chunk == c.as_slice()));
        let rr = table(&members(&[1, 1, 1]), 251, false);
        assert_eq!(rr.len(), 249);
        // A cycle longer than the table: its first entries.
        let t = table(&members(&[1000, 999]), 251, true);
        assert_eq!(t.len(), 251);
        assert!(count(&t, 0).abs_diff(126) <= 1, "{}", count(&t, 0));
        assert_eq!(table(&members(&[0, 0]), 251, true), [NO_BACKEND]);
        assert_eq!(table(&[], 251, false), [NO_BACKEND]);
    }
}

/// lc/wlc pick among two random entries of the Maglev table (power of two choices) rather than
/// the exact minimum: a simulation of both, to measure what the sampling costs in balance.
#[cfg(test)]
mod least_connections_simulation {
    use crate::tables::maglev::{self, Member};

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Policy {
        /// The backend with the fewest active flows per weight (ties: the first drawn).
        Exact,
        /// The better of `n` random table entries, as the data path does with n = 2.
        Sampled(usize),
    }

    /// `steps` flows arrive one by one; once `live` flows are open, each arrival is preceded
    /// by the departure of a random open flow. Returns (mean, worst) over the steps after the
    /// warm-up of max_i(active_i / weight_i) / (total / total weight): 1.0 is perfect.
    fn simulate(weights: &[u32], policy: Policy, live: usize, steps: usize, seed: u64) -> (f64, f64) {
        let members: Vec<Member> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Member { id: i as u32, key: 1_000 + i as u64, weight: w })
            .collect();
        let table = maglev::build(&members, 65_537);
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut active = vec![0u64; weights.len()];
        let mut flows: Vec<usize> = Vec::with_capacity(live + 1);
        let load = |active: &[u64], b: usize| active[b] as f64 / f64::from(weights[b]);
        let total_weight: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let (mut sum, mut worst, mut samples) = (0.0, 0.0f64, 0usize);
        for step in 0..steps {
            if flows.len() >= live {
                let i = rng.usize(..flows.len());
                let b = flows.swap_remove(i);
                active[b] -= 1;
            }
            let b = match policy {
                Policy::Exact => (0..weights.len())
                    .filter(|&b| weights[b] > 0)
                    .min_by(|&x, &y| load(&active, x).total_cmp(&load(&active, y)))
                    .unwrap(),
                Policy::Sampled(n) => {
                    let mut best = table[rng.usize(..table.len())] as usize;
                    for _ in 1..n {
                        let c = table[rng.usize(..table.len())] as usize;
                        // As the data path compares: active_c * w_best < active_best * w_c.
                        if active[c] * u64::from(weights[best]) < active[best] * u64::from(weights[c]) {
                            best = c;
                        }
                    }
                    best
                }
            };
            active[b] += 1;
            flows.push(b);
            if step >= live {
                let mean = flows.len() as f64 / total_weight;
                let max = (0..weights.len()).map(|b| load(&active, b)).fold(0.0, f64::max);
                sum += max / mean;
                worst = worst.max(max / mean);
                samples += 1;
            }
        }
        (sum / samples as f64, worst)
    }

    #[test]
    fn sampled_choice_is_close_to_the_exact_minimum() {
        let equal = [1u32; 10];
        let weighted = [1u32, 1, 2, 2, 3, 3, 4, 4, 5, 5];
        for (name, weights) in [("lc, 10 backends", &equal[..]), ("wlc, 10 backends 1..5", &weighted[..])] {
            for live in [100, 1_000, 10_000] {
                let steps = 20 * live + 200_000;
                let exact = simulate(weights, Policy::Exact, live, steps, 7);
                let one = simulate(weights, Policy::Sampled(1), live, steps, 7);
                let two = simulate(weights, Policy::Sampled(2), live, steps, 7);
                eprintln!(
                    "{name}, {live} open flows: max/mean load (mean over time, worst): exact {:.3} {:.3}, \
                     two choices {:.3} {:.3}, one random choice {:.3} {:.3}",
                    exact.0, exact.1, two.0, two.1, one.0, one.1
                );
                assert!(two.0 < one.0, "two choices must beat one");
                // Power of two choices: the gap to the minimum stays O(log log n) flows per backend,
                // whatever the number of flows.
                let per_backend = live as f64 / weights.len() as f64;
                assert!((two.0 - 1.0) * per_backend < 12.0, "{name}, {live}: {two:?}");
            }
        }
    }
}
