//! Each CPU's flow cache: a direct-mapped array in front of its flow table (FLOWS), holding the
//! pins of established TCP flows. A hit costs an array slot (inlined by the verifier) and a key
//! comparison instead of the LRU hash's lookup, which hashes the 5-tuple, walks a bucket and
//! marks the entry used.
//!
//! It answers only what the flow table would: an entry is the pin as this CPU last found it
//! there, and the pin of a 5-tuple changes only when the flow is pinned anew. Every new pin
//! bumps its slot's version (PIN_VERSIONS, global), and an entry is good only while the
//! version it was filled under holds, so a 5-tuple reset and pinned again on another CPU is
//! never sent to its old backend from here. A backend gone from the service fails the same
//! generation check as in the table. Packets that change a flow's state (SYN, FIN, RST) and
//! UDP (its idle time) always go to the table, and an entry is refilled from the table after
//! [`FLOW_CACHE_REFRESH_JIFFIES`], so that the LRU keeps seeing the flow as used.
use core::intrinsics::{atomic_xadd, AtomicOrdering::Relaxed};

use aya_ebpf::helpers::bpf_jiffies64;
use lb_common::{
    hash::encap_hash,
    limits::{FLOW_CACHE_REFRESH_JIFFIES, FLOW_CACHE_SLOTS},
    Flow, FlowKey,
};

use crate::{
    flow::{usable, Chosen},
    maps::{FLOW_CACHE, PIN_VERSIONS},
};

/// The slot of `key`'s flow: every VIP's flows share the slots (the key tells them apart).
#[inline(always)]
pub fn slot(key: &FlowKey) -> u32 {
    encap_hash(&key.src, key.ports) & (FLOW_CACHE_SLOTS - 1)
}

/// Word by word: an array or struct comparison would call a byte-wise memcmp.
#[inline(always)]
fn same(a: &FlowKey, b: &FlowKey) -> bool {
    a.ports == b.ports
        && a.src[0] == b.src[0]
        && a.dst[0] == b.dst[0]
        && a.proto == b.proto
        && a.family == b.family
        && a.src[1] == b.src[1]
        && a.src[2] == b.src[2]
        && a.src[3] == b.src[3]
        && a.dst[1] == b.dst[1]
        && a.dst[2] == b.dst[2]
        && a.dst[3] == b.dst[3]
}

/// The cached pin of `key`'s flow in `slot`, while it still holds.
#[inline(always)]
pub fn lookup(key: &FlowKey, slot: u32) -> Option<Chosen> {
    let c = FLOW_CACHE.get(slot)?;
    if !same(&c.key, key) || PIN_VERSIONS.get(slot).copied() != Some(c.version) {
        return None;
    }
    // SAFETY: a helper without arguments (inlined as a load of jiffies_64).
    if unsafe { bpf_jiffies64() }.wrapping_sub(c.filled_jiffies) >= FLOW_CACHE_REFRESH_JIFFIES {
        return None;
    }
    let backend = usable(c.backend, Some(c.generation))?;
    Some(Chosen { id: c.backend, backend })
}

/// The slot's version, read before the flow table is (a pin inserted after it bumps it). On
/// x86 loads stay in order; where they may not, a bump racing this read leaves the entry stale
/// until its refresh at most.
#[inline(always)]
pub fn version(slot: u32) -> Option<u32> {
    let p = PIN_VERSIONS.get_ptr(slot)?;
    // SAFETY: an aligned u32 of the map, valid for the program's run; volatile, so that it
    // stays before the table's lookup.
    Some(unsafe { core::ptr::read_volatile(p) })
}

/// Caches the pin `flow` the table gave `key`, found under `version`.
#[inline(always)]
pub fn fill(key: &FlowKey, slot: u32, version: u32, flow: &Flow) {
    let Some(c) = FLOW_CACHE.get_ptr_mut(slot) else { return };
    // SAFETY: this CPU's slot, valid for the program's run; no other writer on this CPU.
    let c = unsafe { &mut *c };
    // Field by field: a whole struct's store would be a memmove into the map value.
    let k = &mut c.key;
    for i in 0..4 {
        k.src[i] = key.src[i];
        k.dst[i] = key.dst[i];
    }
    k.ports = key.ports;
    k.proto = key.proto;
    k.family = key.family;
    k._pad = 0;
    c.backend = flow.backend;
    c.generation = flow.generation;
    c.version = version;
    // SAFETY: a helper without arguments (inlined as a load of jiffies_64).
    c.filled_jiffies = unsafe { bpf_jiffies64() };
}

/// `key`'s flow was pinned anew: no CPU's cache answers for the slot's flows until refilled.
#[inline(never)]
pub fn invalidate(key: &FlowKey) {
    if let Some(p) = PIN_VERSIONS.get_ptr_mut(slot(key)) {
        // SAFETY: an aligned u32 of the map, valid for the program's run; the result unused: a
        // plain BPF_ATOMIC_ADD, after the insert.
        unsafe { atomic_xadd::<u32, u32, { Relaxed }>(p, 1) };
    }
}
