//! Backend selection: the flow table first, the service's table for new flows (indexed as its
//! scheduler says: flow hash, client hash or round-robin cursor).
use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering::Relaxed};

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use lb_common::{
    affinity_timeout_of, hash::source_hash, scheduler_of, Addr, Affinity, AffinityKey, Backend, Flow, FlowEvent,
    FlowKey, Service, TcpFlags, AFFINITY_MASK, BACKEND_F_VALID, FLOW_TCP_CLOSED, IPPROTO_UDP, NO_BACKEND, SCHED_LC,
    SCHED_MASK, SCHED_RR, SCHED_SHIFT, SCHED_SOURCE_HASH, SCHED_WLC, SCHED_WRR,
};

use crate::{
    maps::{
        self, ACTIVE_FLOWS, BACKENDS, BACKEND_WEIGHTS, FLOWS, MAGLEV, NEW_FLOW_RATE, RR_CURSOR, SETTINGS,
        SOURCE_AFFINITY,
    },
    stats,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// A usable backend: its id and its slot.
pub struct Chosen {
    pub id: u32,
    pub backend: &'static Backend,
}

#[inline(always)]
fn usable(id: u32, generation: Option<u32>) -> Option<&'static Backend> {
    let backend = BACKENDS.get(id)?;
    let valid = backend.flags & BACKEND_F_VALID != 0;
    (valid && generation.is_none_or(|g| g == backend.generation)).then_some(backend)
}

#[inline(always)]
fn maglev(service: &Service, hash: u32) -> Option<u32> {
    if service.table_size == 0 {
        return None;
    }
    MAGLEV.get(service.table_base.wrapping_add(hash % service.table_size)).copied()
}

/// The index into the service's table for a new flow of a service whose scheduler is not
/// Maglev. Not inlined: Maglev services never pay for it, and its frame stays off the
/// balancer's (the verifier adds up the stacks of a call chain, 512 bytes at most).
/// rr/wrr take this CPU's cursor, unless the flow will not be pinned (a RST, or past the
/// new-flow rate): such a flow is placed by its hash over the same table, so that its later
/// packets, which will not find a pin either, land on the same backend.
#[inline(never)]
fn scheduled_index(service: &Service, src: &Addr, hash: u32, tcp_flags: TcpFlags, now: u64) -> u32 {
    match (service.flags & SCHED_MASK) >> SCHED_SHIFT {
        SCHED_SOURCE_HASH => source_hash(src, maps::hash_seed()),
        SCHED_RR | SCHED_WRR => {
            let pinned = !tcp_flags.is_rst() && !over_new_flow_limit(now);
            let Some(cursor) = RR_CURSOR.get_ptr_mut(service.id) else {
                return hash;
            };
            if !pinned {
                return hash;
            }
            // SAFETY: this CPU's slot, valid for the program's run.
            unsafe {
                let at = *cursor;
                let next = at.wrapping_add(1);
                *cursor = if next >= service.table_size { 0 } else { next };
                at
            }
        }
        SCHED_LC | SCHED_WLC => {
            // A flow that will not be pinned is placed by its hash: its later packets find no
            // pin either, and must land on the same backend.
            if tcp_flags.is_rst() || over_new_flow_limit(now) {
                return hash;
            }
            least_loaded(service)
        }
        _ => hash,
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
    let timeout_ns = u64::from(affinity_timeout_of(service.flags)) * NS_PER_SEC;
    let client = AffinityKey { addr: key.src, service: service.id, family: key.family, _pad: [0; 3] };
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
    let Some(id) = maglev(service, source_hash(&key.src, maps::hash_seed())) else { return NO_BACKEND };
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
    let weighted = (service.flags & SCHED_MASK) >> SCHED_SHIFT == SCHED_WLC;
    // SAFETY: a helper without arguments.
    let mut best = unsafe { bpf_get_prandom_u32() };
    let mut best_load = load(service, best, weighted);
    for _ in 1..LC_CANDIDATES {
        // SAFETY: as above.
        let index = unsafe { bpf_get_prandom_u32() };
        let l = load(service, index, weighted);
        // active_a / weight_a < active_b / weight_b, without dividing.
        if l.0 * best_load.1 < best_load.0 * l.1 {
            best = index;
            best_load = l;
        }
    }
    best
}

/// (active flows, weight) of the backend at `index` (modulo the table) of the service's table;
/// the weight is 1 unless `weighted`. An entry without a backend loads as u32::MAX per 1.
#[inline(always)]
fn load(service: &Service, index: u32, weighted: bool) -> (u64, u64) {
    let Some(id) = maglev(service, index) else { return (u64::from(u32::MAX), 1) };
    let active = ACTIVE_FLOWS.get(id).map_or(0, |a| (*a).min(u64::from(u32::MAX)));
    let weight = if weighted { BACKEND_WEIGHTS.get(id).map_or(1, |w| u64::from(*w).max(1)) } else { 1 };
    (active, weight)
}

/// One more active flow on backend `id` (an atomic add: the counts are global).
#[inline(never)]
fn active_add(id: u32) {
    if let Some(p) = ACTIVE_FLOWS.get_ptr_mut(id) {
        // SAFETY: an aligned u64 of the map, valid for the program's run, only ever accessed
        // atomically by the data path. The result unused: a plain BPF_ATOMIC_ADD.
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(p, 1) };
    }
}

/// One fewer active flow on backend `id`, never below 0: a compare-and-swap, retried a few
/// times under contention (giving up leaves the count high, which reconciliation fixes).
#[inline(never)]
fn active_sub(id: u32) {
    let Some(p) = ACTIVE_FLOWS.get_ptr_mut(id) else { return };
    // SAFETY: as in active_add (an aligned 64-bit load is atomic; then BPF_CMPXCHG).
    let mut v = unsafe { core::ptr::read_volatile(p) };
    for _ in 0..4 {
        if v == 0 {
            return;
        }
        // SAFETY: as above.
        let (seen, swapped) = unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(p, v, v - 1) };
        if swapped {
            return;
        }
        v = seen;
    }
}

/// A pinned TCP flow's FIN, RST or SYN: the first FIN or RST closes it (one fewer active flow;
/// a second FIN does not count again), a new SYN on a closed pin (the 5-tuple reused)
/// reopens it.
#[inline(never)]
fn track_tcp(flow: *mut Flow, tcp_flags: TcpFlags) {
    // SAFETY: the entry stays valid for the program's run (RCU).
    unsafe {
        let closed = (*flow).last_seen_ns == FLOW_TCP_CLOSED;
        if tcp_flags.closes() {
            if !closed {
                (*flow).last_seen_ns = FLOW_TCP_CLOSED;
                active_sub((*flow).backend);
            }
        } else if closed && tcp_flags.is_syn_only() {
            (*flow).last_seen_ns = bpf_ktime_get_ns();
            active_add((*flow).backend);
        }
    }
}

/// A stale entry (an idle UDP flow, or a backend gone) about to be replaced: its flow no longer
/// counts, unless the backend slot has changed hands since (the count is the new owner's).
#[inline(never)]
fn release_stale(backend: u32, generation: u32, active: bool) {
    if active && BACKENDS.get(backend).is_some_and(|b| b.generation == generation) {
        active_sub(backend);
    }
}

/// Whether this CPU's new-flow window is already full (as [`under_new_flow_limit`] will find
/// it), without counting this flow.
#[inline(always)]
fn over_new_flow_limit(now: u64) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    let limit = settings.new_flows_per_cpu_sec;
    if limit == 0 {
        return false;
    }
    let Some(w) = NEW_FLOW_RATE.get(0) else {
        return true;
    };
    now.wrapping_sub(w.start_ns) <= NS_PER_SEC && w.count >= u64::from(limit)
}

/// Whether this CPU may pin one more new flow this second.
#[inline(always)]
fn under_new_flow_limit(now: u64, limit: u32) -> bool {
    if limit == 0 {
        return true;
    }
    let Some(w) = NEW_FLOW_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, valid for the program's run.
    unsafe {
        if now.wrapping_sub((*w).start_ns) > NS_PER_SEC {
            (*w).start_ns = now;
            (*w).count = 0;
        }
        (*w).count += 1;
        (*w).count <= u64::from(limit)
    }
}

/// The backend for this packet: its pinned one while that is still in the service (and, for
/// UDP, not idle too long); otherwise its scheduler's, pinned unless over the new-flow rate.
#[inline(always)]
pub fn select(key: &FlowKey, tcp_flags: TcpFlags, service: &Service, hash: u32) -> Option<Chosen> {
    let settings = SETTINGS.get(0)?;
    let udp = key.proto == IPPROTO_UDP;
    // The clock only matters to UDP pins and new pins: a TCP hit does without it.
    // SAFETY: a helper without arguments.
    let clock = || unsafe { bpf_ktime_get_ns() };
    let mut now = 0;
    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: the entry stays valid for the program's run (RCU); racing writers only
        // ever store whole, equally valid values.
        let f = unsafe { *flow };
        if udp {
            now = clock();
        }
        let idle = udp && now.wrapping_sub(f.last_seen_ns) > settings.udp_idle_ns;
        if let (false, Some(backend)) = (idle, usable(f.backend, Some(f.generation))) {
            if !udp && tcp_flags.changes_state() {
                track_tcp(flow, tcp_flags);
            }
            if tcp_flags.is_rst() {
                let _ = FLOWS.remove(key);
                stats::count_flow(FlowEvent::Closed);
            } else {
                // Refreshed well before it could expire, but not on every packet.
                let refresh = if settings.udp_idle_ns < 2 * NS_PER_SEC { settings.udp_idle_ns / 2 } else { NS_PER_SEC };
                if udp && now.wrapping_sub(f.last_seen_ns) > refresh {
                    // SAFETY: as above.
                    unsafe { (*flow).last_seen_ns = now };
                }
                stats::count_flow(FlowEvent::Hit);
                if tcp_flags.is_syn_only() {
                    stats::count_syn_retransmit(f.backend);
                }
            }
            return Some(Chosen { id: f.backend, backend });
        }
        release_stale(f.backend, f.generation, f.active(key.proto));
        stats::count_flow(FlowEvent::Stale);
    }
    if now == 0 {
        now = clock();
    }
    let id = if service.flags & AFFINITY_MASK != 0 && scheduler_of(service.flags) == SCHED_SOURCE_HASH {
        source_affinity(service, key, tcp_flags, now)
    } else {
        let index = if service.flags & SCHED_MASK == 0 {
            hash
        } else {
            scheduled_index(service, &key.src, hash, tcp_flags, now)
        };
        maglev(service, index)?
    };
    let backend = usable(id, None)?;
    stats::count_new_flow(id);
    if !tcp_flags.is_rst() {
        if under_new_flow_limit(now, settings.new_flows_per_cpu_sec) {
            let flow = Flow { backend: id, generation: backend.generation, last_seen_ns: now };
            if FLOWS.insert(key, &flow, 0).is_ok() {
                active_add(id);
            }
            stats::count_flow(FlowEvent::New);
        } else {
            stats::count_flow(FlowEvent::RateLimited);
        }
    }
    Some(Chosen { id, backend })
}
