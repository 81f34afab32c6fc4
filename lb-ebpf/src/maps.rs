//! The BPF maps of the balancer; names, key and value types live in lb-common.
use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    limits::{
        DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_CAPACITY, MAX_BACKENDS, MAX_SERVICES, MAX_SOURCE_AFFINITY,
        MAX_TX_PORTS, MAX_VIPS,
    },
    Affinity, AffinityKey, Backend, BackendFlows, Counters, Flow, FlowEvent, FlowKey, RateWindow, Reason, Service,
    ServiceKey, Settings, Vip, VipKey,
};

/// Destination addresses we balance; anything else passes untouched after one lookup.
#[map]
pub static VIPS: HashMap<VipKey, Vip> = HashMap::with_max_entries(MAX_VIPS, 0);

/// (VIP, port, protocol) → service and where its Maglev table is.
#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Every service's Maglev tables, back to back; the agent sizes it at load time.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(DEFAULT_MAGLEV_CAPACITY, 0);

/// Backend id → address, MAC and generation.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// 5-tuple → pinned backend. LRU lists per CPU (a flow stays on the CPU its NIC queue maps to),
/// so eviction takes no shared lock; the agent sizes it at load time.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

/// (service, client) → the backend a source-hash service with an affinity timeout pinned the
/// client to. One LRU list for all CPUs: a client's flows arrive on any CPU.
#[map]
pub static SOURCE_AFFINITY: LruHashMap<AffinityKey, Affinity> = LruHashMap::with_max_entries(MAX_SOURCE_AFFINITY, 0);

/// Run-time knobs: one entry.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// New flows this second, per CPU.
#[map]
pub static NEW_FLOW_RATE: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);

/// Round-robin cursor per service id, per CPU (rr and wrr services).
#[map]
pub static RR_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Flows pinned to each backend id and not closed: global, updated with atomic adds (lc/wlc
/// compare them; every scheduler keeps them, so a switch to lc starts from the right counts).
#[map]
pub static ACTIVE_FLOWS: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Weight of each backend id (wlc).
#[map]
pub static BACKEND_WEIGHTS: Array<u32> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Egress interfaces other than the ingress one, for XDP_REDIRECT.
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static BACKEND_FLOW_STATS: PerCpuArray<BackendFlows> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static REASON_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[map]
pub static FLOW_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(FlowEvent::COUNT, 0);

/// Seed of the flow hash, set by the agent at load time (read-only data).
#[no_mangle]
static HASH_SEED: u32 = 0;

/// MAC address of the interface we are attached to (see `lb_common::mac_words`), set by the
/// agent at load time.
#[no_mangle]
static IFACE_MAC: [u16; 3] = [0; 3];

#[inline(always)]
pub fn hash_seed() -> u32 {
    // SAFETY: a plain read of our own global; volatile so that the compiler does not fold the
    // placeholder in: the loader rewrites the value before the program is verified.
    unsafe { core::ptr::read_volatile(&HASH_SEED) }
}

#[inline(always)]
pub fn iface_mac() -> [u16; 3] {
    // SAFETY: as for hash_seed.
    unsafe { core::ptr::read_volatile(&IFACE_MAC) }
}

// The backend side of L3 DSR (program xlb_decap). Names and types in lb-common.

/// Outer destinations this host decapsulates (value unused); anything else passes untouched.
#[map]
pub static DECAP_ADDRS: HashMap<VipKey, u32> = HashMap::with_max_entries(lb_common::limits::MAX_DECAP_ADDRS, 0);

/// Per-CPU counters per `lb_common::reason::DecapReason`.
#[map]
pub static DECAP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(lb_common::reason::DecapReason::COUNT, 0);
