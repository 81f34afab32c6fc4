//! Backend selection: the flow table first, the service's table for new flows (indexed as its
//! scheduler says: flow hash, client hash or round-robin cursor).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    hash::source_hash, Addr, Backend, Flow, FlowEvent, FlowKey, Service, BACKEND_F_VALID, IPPROTO_UDP, SCHED_MASK,
    SCHED_RR, SCHED_SHIFT, SCHED_SOURCE_HASH, SCHED_WRR,
};

use crate::{
    maps::{self, BACKENDS, FLOWS, MAGLEV, NEW_FLOW_RATE, RR_CURSOR, SETTINGS},
    stats,
};

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
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
fn scheduled_index(service: &Service, src: &Addr, hash: u32, tcp_flags: u8, now: u64) -> u32 {
    match (service.flags & SCHED_MASK) >> SCHED_SHIFT {
        SCHED_SOURCE_HASH => source_hash(src, maps::hash_seed()),
        SCHED_RR | SCHED_WRR => {
            let pinned = tcp_flags & TCP_RST == 0 && !over_new_flow_limit(now);
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
        _ => hash,
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
pub fn select(key: &FlowKey, tcp_flags: u8, service: &Service, hash: u32) -> Option<Chosen> {
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
            if tcp_flags & TCP_RST != 0 {
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
                if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    stats::count_syn_retransmit(f.backend);
                }
            }
            return Some(Chosen { id: f.backend, backend });
        }
        stats::count_flow(FlowEvent::Stale);
    }
    if now == 0 {
        now = clock();
    }
    let index =
        if service.flags & SCHED_MASK == 0 { hash } else { scheduled_index(service, &key.src, hash, tcp_flags, now) };
    let id = maglev(service, index)?;
    let backend = usable(id, None)?;
    stats::count_new_flow(id);
    if tcp_flags & TCP_RST == 0 {
        if under_new_flow_limit(now, settings.new_flows_per_cpu_sec) {
            let flow = Flow { backend: id, generation: backend.generation, last_seen_ns: now };
            let _ = FLOWS.insert(key, &flow, 0);
            stats::count_flow(FlowEvent::New);
        } else {
            stats::count_flow(FlowEvent::RateLimited);
        }
    }
    Some(Chosen { id, backend })
}
