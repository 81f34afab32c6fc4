//! Per-CPU counters: one per verdict reason, per flow-table event, per service and per backend,
//! and the decapsulator's per reason.
use aya_ebpf::btf_maps::PerCpuArray;
use lb_common::{reason::DecapReason, BackendFlows, Counters, FlowEvent, Reason};

use crate::maps::{BACKEND_FLOW_STATS, BACKEND_STATS, DECAP_STATS, FLOW_STATS, REASON_STATS, SERVICE_STATS};

#[inline(always)]
fn add<const N: usize>(map: &PerCpuArray<Counters, N>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, valid for the program's run; no other writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    add(&REASON_STATS, reason as u32, bytes);
}

/// A frame the decapsulator saw, of `bytes` as received.
#[inline(always)]
pub fn count_decap(reason: DecapReason, bytes: u64) {
    add(&DECAP_STATS, reason as u32, bytes);
}

#[inline(always)]
pub fn count_flow(event: FlowEvent) {
    add(&FLOW_STATS, event as u32, 0);
}

#[inline(always)]
pub fn count_forward(service: u32, backend: u32, bytes: u64) {
    add(&SERVICE_STATS, service, bytes);
    add(&BACKEND_STATS, backend, bytes);
}

/// One more of a backend's in-band counters (`field` picks which).
#[inline(always)]
fn bump(backend: u32, field: impl FnOnce(&mut BackendFlows) -> &mut u64) {
    if let Some(c) = BACKEND_FLOW_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot, valid for the program's run; no other writer on this CPU.
        *field(unsafe { &mut *c }) += 1;
    }
}

/// A flow given to `backend`.
#[inline(always)]
pub fn count_new_flow(backend: u32) {
    bump(backend, |c| &mut c.new_flows);
}

/// A TCP flow pinned to `backend` on its SYN: a handshake to watch.
#[inline(always)]
pub fn count_syn_pinned(backend: u32) {
    bump(backend, |c| &mut c.syn_pinned);
}

/// The client's ACK completed the handshake of a flow pinned to `backend`.
#[inline(always)]
pub fn count_established(backend: u32) {
    bump(backend, |c| &mut c.established);
}

/// A SYN again on a flow already pinned to `backend`: its first one got no answer.
#[inline(always)]
pub fn count_syn_retransmit(backend: u32) {
    bump(backend, |c| &mut c.syn_retransmits);
}
