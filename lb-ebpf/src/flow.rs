//! The flow tables (FLOWS, one per CPU): a packet's pinned backend while it is still in the
//! service (for UDP, not idle too long); otherwise the scheduler's choice (`sched`), pinned in
//! this CPU's table unless over the new-flow rate. Also the per-backend active-flow counts that
//! follow the pins.
use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering::Relaxed};

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_loop};
use lb_common::{
    limits::MAX_CPUS, Backend, Flow, FlowEvent, FlowKey, Service, Settings, TcpFlags, BACKEND_F_VALID, FLOW_TCP_CLOSED,
    FLOW_TCP_ESTABLISHED, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    flow_cache,
    maps::{FlowTable, ACTIVE_FLOWS, BACKENDS, FLOWS, NEW_FLOW_RATE, SETTINGS},
    sched, stats,
};

pub(crate) const NS_PER_SEC: u64 = 1_000_000_000;

/// A usable backend: its id and its slot.
pub struct Chosen {
    pub id: u32,
    pub backend: &'static Backend,
}

/// The backend in slot `id` when it is valid (and, given a generation, still the same one).
#[inline(always)]
pub(crate) fn usable(id: u32, generation: Option<u32>) -> Option<&'static Backend> {
    let backend = BACKENDS.get(id)?;
    let valid = backend.flags & BACKEND_F_VALID != 0;
    (valid && generation.is_none_or(|g| g == backend.generation)).then_some(backend)
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
            // Reopened: a flow already counted, not a new handshake to watch.
            (*flow).last_seen_ns = bpf_ktime_get_ns() | FLOW_TCP_ESTABLISHED;
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
pub(crate) fn over_new_flow_limit(now: u64) -> bool {
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

/// What [`look_in`] is given and gives back, on the caller's stack.
#[repr(C)]
struct Search {
    key: FlowKey,
    /// The CPU the packet is on: its table has no entry.
    cpu: u32,
    /// The first CPU the loop looks at (its index 0).
    first: u32,
    /// The CPU whose table has the flow, plus one; 0 while not found.
    found: u32,
}

/// bpf_loop's callback for one other CPU (`first + index`): 1 (stop) when its table has the
/// flow. A helper-driven loop, so that the verifier checks this body once, not once per CPU.
extern "C" fn look_in(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let search = ctx.cast::<Search>();
    // SAFETY: `ctx` is the caller's Search, for the loop's duration.
    unsafe {
        let other = (*search).first.wrapping_add(index as u32);
        if other == (*search).cpu {
            return 0;
        }
        match FLOWS.get(other) {
            Some(theirs) if theirs.get_ptr_mut(&(*search).key).is_some() => {
                (*search).found = other + 1;
                1
            }
            _ => 0,
        }
    }
}

/// Other CPUs' tables looked in first, directly, and a pin found in one used where it is:
/// looking there again on the flow's next packet costs less than moving the entry (an insert
/// and a removal). One found further along, by a `bpf_loop`, moves here, so that a flow that
/// has changed CPU for good pays that search once.
const IN_PLACE_LOOKUPS: u32 = 3;

/// A pin in another CPU's table for a flow this CPU's `table` has none of: its packets came in on
/// another CPU before (an interrupt moved, an RSS table changed, a veth sender migrated: veth
/// runs XDP on the sending CPU, so in a veth bed most flows alternate between CPUs). Null when
/// there is none. The entry keeps its handshake and active-flow accounting, and stays the flow's
/// one entry: used in place (`home` is set to its CPU) when it is in one of the first
/// [`IN_PLACE_LOOKUPS`] other CPUs' tables, moved into `table` otherwise. A lookup per CPU: asked
/// only where a packet may well belong to a pinned flow (see [`select`]).
#[inline(never)]
fn pinned_elsewhere(table: &FlowTable, key: &FlowKey, cpu: u32, cpus: u32, home: &mut u32) -> *mut Flow {
    let cpus = cpus.min(MAX_CPUS);
    // CPUs 0..=IN_PLACE_LOOKUPS but this one: IN_PLACE_LOOKUPS others.
    let near = cpus.min(IN_PLACE_LOOKUPS + 1);
    for other in 0..IN_PLACE_LOOKUPS + 1 {
        if other >= near {
            break;
        }
        if other == cpu {
            continue;
        }
        if let Some(flow) = FLOWS.get(other).and_then(|theirs| theirs.get_ptr_mut(key)) {
            stats::count_flow(FlowEvent::OtherCpu);
            *home = other;
            return flow;
        }
    }
    if cpus <= near {
        return core::ptr::null_mut();
    }
    let mut search = Search { key: *key, cpu, first: near, found: 0 };
    let look: extern "C" fn(u64, *mut core::ffi::c_void) -> i64 = look_in;
    // SAFETY: the callback and its context are valid for the call; no flags.
    unsafe { bpf_loop(cpus - near, look as *mut core::ffi::c_void, (&raw mut search).cast(), 0) };
    let Some(other) = search.found.checked_sub(1) else {
        return core::ptr::null_mut();
    };
    let Some(theirs) = FLOWS.get(other) else {
        return core::ptr::null_mut();
    };
    let Some(flow) = theirs.get_ptr_mut(key) else {
        return core::ptr::null_mut();
    };
    stats::count_flow(FlowEvent::OtherCpu);
    // SAFETY: the entry stays valid for the program's run (RCU); racing writers only ever
    // store whole, equally valid values.
    let value = unsafe { *flow };
    if table.insert(key, &value, 0).is_err() {
        *home = other;
        return flow;
    }
    let _ = theirs.remove(key);
    table.get_ptr_mut(key).unwrap_or(core::ptr::null_mut())
}

/// `BPF_NOEXIST`: an insert that fails, with `EEXIST`, when the key has an entry.
const NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// A pinned flow's packet: its backend while that is still usable (and, for UDP, the pin not
/// idle), with the pin's bookkeeping; None for a stale pin, released (and removed from `home`'s
/// table when that is another CPU's, so that it is released once), for a new pin to replace.
#[inline(always)]
fn follow(
    flow: *mut Flow,
    key: &FlowKey,
    tcp_flags: TcpFlags,
    settings: &Settings,
    cpu: u32,
    home: u32,
) -> Option<Chosen> {
    let udp = key.proto == IPPROTO_UDP;
    // SAFETY: the entry stays valid for the program's run (RCU); racing writers only ever
    // store whole, equally valid values.
    let f = unsafe { *flow };
    // The clock only matters to UDP pins: a TCP hit does without it.
    // SAFETY: a helper without arguments.
    let now = if udp { unsafe { bpf_ktime_get_ns() } } else { 0 };
    let idle = udp && now.wrapping_sub(f.last_seen_ns) > settings.udp_idle_ns;
    let (false, Some(backend)) = (idle, usable(f.backend, Some(f.generation))) else {
        release_stale(f.backend, f.generation, f.active(key.proto));
        // Released once: the flow's new pin goes into this CPU's table, and a stale entry left
        // in another would be released again by that CPU's next packet of it.
        if home != cpu {
            if let Some(theirs) = FLOWS.get(home) {
                let _ = theirs.remove(key);
            }
        }
        stats::count_flow(FlowEvent::Stale);
        return None;
    };
    if !udp && tcp_flags.changes_state() {
        track_tcp(flow, tcp_flags);
    }
    if tcp_flags.is_rst() {
        if let Some(table) = FLOWS.get(home) {
            let _ = table.remove(key);
        }
        stats::count_flow(FlowEvent::Closed);
    } else {
        // Refreshed well before it could expire, but not on every packet.
        let refresh = if settings.udp_idle_ns < 2 * NS_PER_SEC { settings.udp_idle_ns / 2 } else { NS_PER_SEC };
        if udp && now.wrapping_sub(f.last_seen_ns) > refresh {
            // SAFETY: as above.
            unsafe { (*flow).last_seen_ns = now };
        }
        stats::count_flow(FlowEvent::Hit);
        // A pure ACK changes no state (track_tcp left the entry alone): `f` is current.
        if !udp && tcp_flags.is_ack_only() && !f.established() && f.last_seen_ns != FLOW_TCP_CLOSED {
            // SAFETY: as above.
            unsafe { (*flow).last_seen_ns |= FLOW_TCP_ESTABLISHED };
            stats::count_established(f.backend);
        }
        if tcp_flags.is_syn_only() {
            stats::count_syn_retransmit(f.backend);
        }
    }
    Some(Chosen { id: f.backend, backend })
}

/// The backend for this packet: its pinned one while that is still in the service (and, for
/// UDP, not idle too long); otherwise its scheduler's, pinned unless over the new-flow rate.
/// `hash` is the flow's hash, computed only when the flow table has no usable pin.
#[inline(always)]
pub fn select(key: &FlowKey, tcp_flags: TcpFlags, service: &Service, hash: impl Fn() -> u32) -> Option<Chosen> {
    // A TCP packet that changes nothing (no SYN, FIN or RST): most of an established flow's,
    // which this CPU's flow cache may answer for.
    let plain = key.proto == IPPROTO_TCP && !tcp_flags.changes_state();
    let cache_slot = if plain { flow_cache::slot(key) } else { 0 };
    if plain {
        if let Some(chosen) = flow_cache::lookup(key, cache_slot) {
            stats::count_flow(FlowEvent::Hit);
            return Some(chosen);
        }
    }
    let settings = SETTINGS.get(0)?;
    let udp = key.proto == IPPROTO_UDP;
    // SAFETY: a helper without arguments.
    let clock = || unsafe { bpf_ktime_get_ns() };
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // None only before the agent has given this CPU a table: nothing is pinned then.
    let table = FLOWS.get(cpu);
    // A SYN is not looked up: it is a new flow but for a retransmission or a reused 5-tuple,
    // which its insert finds (below). The lookup, a cold bucket in a large table, was most of a
    // SYN flood's per-packet cost, and the insert walks the same bucket anyway. Katran skips it
    // too (and re-pins such a SYN by the table).
    let syn = !udp && tcp_flags.is_syn_only();
    // The CPU whose table holds the flow's entry.
    let mut home = cpu;
    let mut now = 0;
    // Read before the table: a pin inserted after this read is one the cache must not keep.
    let version = if plain { flow_cache::version(cache_slot) } else { None };
    let pinned = match table {
        Some(table) if !syn => table.get_ptr_mut(key).or_else(|| {
            // A miss: a new flow, or one pinned on another CPU. Anything but a SYN looks in
            // the other CPUs' tables, a lookup each: the price of a new UDP flow on a host of
            // many CPUs, and of a flow's packet off its entry's CPU (a retransmitted SYN on
            // another CPU is scheduled afresh: its first got no answer). Past the new-flow rate
            // nothing is looked for (a flood of ACKs would pay it per packet).
            now = clock();
            if over_new_flow_limit(now) {
                return None;
            }
            let flow = pinned_elsewhere(table, key, cpu, settings.flow_tables, &mut home);
            (!flow.is_null()).then_some(flow)
        }),
        _ => None,
    };
    if let Some(flow) = pinned {
        if let Some(chosen) = follow(flow, key, tcp_flags, settings, cpu, home) {
            if let Some(version) = version {
                // SAFETY: the entry stays valid for the program's run (RCU).
                let f = unsafe { *flow };
                if f.established() && f.last_seen_ns != FLOW_TCP_CLOSED {
                    flow_cache::fill(key, cache_slot, version, &f);
                }
            }
            return Some(chosen);
        }
    }
    if now == 0 {
        now = clock();
    }
    let hash = hash();
    let id = sched::new_flow_backend(service, key, tcp_flags, hash, now)?;
    let backend = usable(id, None)?;
    let chosen = Chosen { id, backend };
    if tcp_flags.is_rst() {
        stats::count_new_flow(id);
        return Some(chosen);
    }
    let Some(table) = table.filter(|_| under_new_flow_limit(now, settings.new_flows_per_cpu_sec)) else {
        stats::count_new_flow(id);
        stats::count_flow(FlowEvent::RateLimited);
        return Some(chosen);
    };
    // A TCP pin on anything but a SYN (a flow older than its pin) is not a handshake to watch:
    // it starts established. (UDP ignores the bit: a nanosecond.)
    let last_seen_ns = if syn { now & !FLOW_TCP_ESTABLISHED } else { now | FLOW_TCP_ESTABLISHED };
    let flow = Flow { backend: id, generation: backend.generation, last_seen_ns };
    // A SYN's insert may not replace a pin: its failure says the flow has one (a retransmitted
    // SYN, or the 5-tuple reused), to follow as any pinned packet would. (On a full table the
    // failed insert has already evicted an entry for its own: the LRU's oldest, rarely.)
    // Anything else reached here without a usable pin: it replaces a stale one.
    let mut inserted = table.insert(key, &flow, if syn { NOEXIST } else { 0 });
    if syn && matches!(inserted, Err(e) if -e == EEXIST) {
        if let Some(pinned) = table.get_ptr_mut(key).and_then(|pin| follow(pin, key, tcp_flags, settings, cpu, cpu)) {
            return Some(pinned);
        }
        // Stale, and released: replaced.
        inserted = table.insert(key, &flow, 0);
    }
    if inserted.is_ok() {
        flow_cache::invalidate(key);
        active_add(id);
        if syn {
            stats::count_syn_pinned(id);
        }
    }
    stats::count_new_flow(id);
    stats::count_flow(FlowEvent::New);
    Some(chosen)
}
