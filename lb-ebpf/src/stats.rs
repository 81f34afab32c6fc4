//! Per-CPU counters: one per verdict reason, per flow-table event, per service and per backend.
use aya_ebpf::maps::PerCpuArray;
use lb_common::{Counters, FlowEvent, Reason};

use crate::maps::{BACKEND_STATS, FLOW_STATS, REASON_STATS, SERVICE_STATS};

#[inline(always)]
fn add(map: &PerCpuArray<Counters>, index: u32, bytes: u64) {
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

#[inline(always)]
pub fn count_flow(event: FlowEvent) {
    add(&FLOW_STATS, event as u32, 0);
}

#[inline(always)]
pub fn count_forward(service: u32, backend: u32, bytes: u64) {
    add(&SERVICE_STATS, service, bytes);
    add(&BACKEND_STATS, backend, bytes);
}
