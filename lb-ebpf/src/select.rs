//! Backend selection: the flow table first, the service's Maglev table for new flows.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{Backend, Flow, FlowEvent, FlowKey, Service, BACKEND_F_VALID, IPPROTO_UDP};

use crate::{
    maps::{BACKENDS, FLOWS, MAGLEV, NEW_FLOW_RATE, SETTINGS},
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
/// UDP, not idle too long); otherwise Maglev's, pinned unless over the new-flow rate.
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
    let id = maglev(service, hash)?;
    let backend = usable(id, None)?;
    if now == 0 {
        now = clock();
    }
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
