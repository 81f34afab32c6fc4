//! The schedulers: which entry of a service's table a new flow takes. Maglev by the flow
//! hash, source-hash by the client's address (with an optional per-client pin), rr/wrr by a
//! per-CPU cursor, lc/wlc by the better of two random entries. The scheduler is decoded from
//! the service here and nowhere else.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    hash::{ring_slot, source_hash},
    Addr, Affinity, AffinityKey, FlowKey, Service, TcpFlags, NO_BACKEND, SCHED_LC, SCHED_MAGLEV, SCHED_RR,
    SCHED_SOURCE_HASH, SCHED_WLC, SCHED_WRR,
};

use crate::{
    flow::{over_new_flow_limit, usable, NS_PER_SEC},
    maps::{self, ACTIVE_FLOWS, BACKEND_WEIGHTS, MAGLEV, RR_CURSOR, SOURCE_AFFINITY},
};

/// The backend id for a new flow of `service` (None: its table has no entry for it), as its
/// scheduler decides.
#[inline(always)]
pub fn new_flow_backend(service: &Service, key: &FlowKey, tcp_flags: TcpFlags, hash: u32, now: u64) -> Option<u32> {
    if service.has_affinity() {
        return Some(source_affinity(service, key, tcp_flags, now));
    }
    let by_hash = ring_slot(hash, service.table_size);
    let slot = if service.scheduler == SCHED_MAGLEV {
        by_hash
    } else {
        scheduled_slot(service, &key.src, by_hash, tcp_flags, now)
    };
    maglev(service, slot)
}

/// The backend in slot `slot` (below the table's size) of the service's table.
#[inline(always)]
fn maglev(service: &Service, slot: u32) -> Option<u32> {
    if slot >= service.table_size {
        return None;
    }
    MAGLEV.get(service.table_base.wrapping_add(slot)).copied()
}

/// The slot of the service's table for a new flow of a service whose scheduler is not
/// Maglev. Not inlined: Maglev services never pay for it, and its frame stays off the
/// balancer's (the verifier adds up the stacks of a call chain, 512 bytes at most).
/// rr/wrr take this CPU's cursor, unless the flow will not be pinned (a RST, or past the
/// new-flow rate): such a flow is placed by its hash over the same table, so that its later
/// packets, which will not find a pin either, land on the same backend (`by_hash`, the flow
/// hash's slot).
#[inline(never)]
fn scheduled_slot(service: &Service, src: &Addr, by_hash: u32, tcp_flags: TcpFlags, now: u64) -> u32 {
    match service.scheduler {
        SCHED_SOURCE_HASH => source_slot(service, src),
        SCHED_RR | SCHED_WRR => {
            let size = service.table_size;
            let pinned = !tcp_flags.is_rst() && !over_new_flow_limit(now);
            let Some(cursor) = RR_CURSOR.get_ptr_mut(service.id) else {
                return by_hash;
            };
            if !pinned {
                return by_hash;
            }
            // SAFETY: this CPU's slot, valid for the program's run.
            unsafe {
                // Past the end only if the table shrank since the cursor moved: start over.
                let at = if *cursor < size { *cursor } else { 0 };
                let next = at.wrapping_add(1);
                *cursor = if next >= size { 0 } else { next };
                at
            }
        }
        SCHED_LC | SCHED_WLC => {
            // A flow that will not be pinned is placed by its hash: its later packets find no
            // pin either, and must land on the same backend.
            if tcp_flags.is_rst() || over_new_flow_limit(now) {
                return by_hash;
            }
            least_loaded(service)
        }
        _ => by_hash,
    }
}

/// The backend id (or [`NO_BACKEND`]) for a new flow of a source-hash service with an affinity
/// timeout: the client's pin in [`SOURCE_AFFINITY`] while its backend is usable (valid, same
/// generation: the checks of the flow table) and the client's last new flow is at most the
/// timeout ago, the pin then refreshed; otherwise the client hash's entry of the table, pinned
/// (unless the flow itself will not be: a RST, or past the new-flow rate, so that a flood of
/// spoofed sources cannot flush the pins). Not inlined, as [`scheduled_index`], and called
/// beside it, not from it: the verifier adds up the stacks of a call chain.
#[inline(never)]
fn source_affinity(service: &Service, key: &FlowKey, tcp_flags: TcpFlags, now: u64) -> u32 {
    let timeout_ns = u64::from(service.affinity_timeout_secs) * NS_PER_SEC;
    // Built from words: a literal zeroes its padding with a call of a byte-wise memset.
    let words = [key.src[0], key.src[1], key.src[2], key.src[3], service.id, u32::from_ne_bytes([key.family, 0, 0, 0])];
    // SAFETY: AffinityKey is #[repr(C)], 24 bytes of plain integers: every bit pattern is valid.
    let client = unsafe { core::mem::transmute::<[u32; 6], AffinityKey>(words) };
    if let Some(pin) = SOURCE_AFFINITY.get_ptr_mut(&client) {
        // SAFETY: the entry stays valid for the program's run (RCU); racing writers only ever
        // store whole, equally valid values.
        let p = unsafe { *pin };
        // Saturating: another CPU may have refreshed it after our clock read.
        if now.saturating_sub(p.last_seen_ns) <= timeout_ns && usable(p.backend, Some(p.generation)).is_some() {
            // SAFETY: as above.
            unsafe { (*pin).last_seen_ns = now };
            return p.backend;
        }
    }
    let Some(id) = maglev(service, source_slot(service, &key.src)) else { return NO_BACKEND };
    let Some(backend) = usable(id, None) else { return NO_BACKEND };
    if !tcp_flags.is_rst() && !over_new_flow_limit(now) {
        let pin = Affinity { backend: id, generation: backend.generation, last_seen_ns: now };
        let _ = SOURCE_AFFINITY.insert(&client, &pin, 0);
    }
    id
}

/// Candidates lc/wlc draw from the service's table for a new flow.
const LC_CANDIDATES: u32 = 2;

/// lc/wlc: of [`LC_CANDIDATES`] entries drawn at random from the service's table (a Maglev
/// table: weights and health shape the draw), the index of the one whose backend has the
/// fewest active flows (wlc: per unit of weight). Power of two choices, not the exact
/// minimum: no walk over the backends, and no herd of CPUs on one backend between updates.
#[inline(always)]
fn least_loaded(service: &Service) -> u32 {
    let weighted = service.scheduler == SCHED_WLC;
    let mut best = random_slot(service);
    let mut best_load = load(service, best, weighted);
    for _ in 1..LC_CANDIDATES {
        let slot = random_slot(service);
        let l = load(service, slot, weighted);
        // active_a / weight_a < active_b / weight_b, without dividing.
        if l.0 * best_load.1 < best_load.0 * l.1 {
            best = slot;
            best_load = l;
        }
    }
    best
}

/// The slot of the service's table the client's address alone picks (source-hash).
#[inline(always)]
fn source_slot(service: &Service, src: &Addr) -> u32 {
    ring_slot(source_hash(src, maps::hash_seed()), service.table_size)
}

/// A slot of the service's table at random (lc/wlc's candidates).
#[inline(always)]
fn random_slot(service: &Service) -> u32 {
    // SAFETY: a helper without arguments.
    ring_slot(unsafe { bpf_get_prandom_u32() }, service.table_size)
}

/// (active flows, weight) of the backend in slot `slot` of the service's table; the weight is 1
/// unless `weighted`. An entry without a backend loads as u32::MAX per 1.
#[inline(always)]
fn load(service: &Service, slot: u32, weighted: bool) -> (u64, u64) {
    let Some(id) = maglev(service, slot) else { return (u64::from(u32::MAX), 1) };
    let active = ACTIVE_FLOWS.get(id).map_or(0, |a| (*a).min(u64::from(u32::MAX)));
    let weight = if weighted { BACKEND_WEIGHTS.get(id).map_or(1, |w| u64::from(*w).max(1)) } else { 1 };
    (active, weight)
}
