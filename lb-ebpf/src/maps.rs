//! The BPF maps of the balancer; names, key and value types live in lb-common. Declared as
//! BTF maps (`.maps`), so the kernel knows their key and value types: `bpftool map dump` shows
//! them field by field.
use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    limits::{
        DEFAULT_MAGLEV_CAPACITY, FLOW_CACHE_SLOTS, MAX_BACKENDS, MAX_CPUS, MAX_SERVICES, MAX_SOURCE_AFFINITY,
        MAX_TX_PORTS, MAX_VIPS, NEXT_HOP_SLOTS, SERVICE_BUCKETS, SERVICE_BUCKET_ENTRIES, VIP_BITS_WORDS,
    },
    Affinity, AffinityKey, Backend, BackendFlows, CachedFlow, Counters, Flow, FlowEvent, FlowKey, NextHop, RateWindow,
    Reason, Service, ServiceBucket, ServiceKey, Settings, Vip, VipKey,
};

/// Destination addresses we balance.
#[btf_map]
pub static VIPS: HashMap<VipKey, Vip, { MAX_VIPS as usize }> = HashMap::new();

/// A bit per `lb_common::vip_bit` value, set for every VIP: traffic whose bit is clear passes
/// after one array read.
#[btf_map]
pub static VIP_BITS: Array<u64, { VIP_BITS_WORDS as usize }> = Array::new();

/// (VIP, port, protocol) → service and where its Maglev table is: buckets the agent lays out
/// (`lb_common::service_buckets`), looked up by [`service`].
#[btf_map]
pub static SERVICES: Array<ServiceBucket, { SERVICE_BUCKETS as usize }> = Array::new();

/// Every service's Maglev tables, back to back; the agent sizes it at load time.
#[btf_map]
pub static MAGLEV: Array<u32, { DEFAULT_MAGLEV_CAPACITY as usize }> = Array::new();

/// Backend id → address, MAC and generation.
#[btf_map]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// One CPU's flow table: 5-tuple → pinned backend. The agent creates one per possible CPU, of
/// its share of `flows.size` (the template's one entry is only what the verifier checks
/// against: the kernel compares no size of an inner hash map).
pub type FlowTable = LruHashMap<FlowKey, Flow, 1>;

/// The flow tables, by CPU (Katran's layout). A CPU inserts into and evicts from its own table
/// only, so its LRU lock is its own, and its lists are common ones, which refill and evict in
/// batches (cheaper per insert than per-CPU lists in one shared table). A flow whose packets
/// change CPU keeps its one entry, found from the new CPU (see `flow`).
#[btf_map]
pub static FLOWS: ArrayOfMaps<FlowTable, { MAX_CPUS as usize }> = ArrayOfMaps::new();

/// Each CPU's cache of established TCP flows' pins, a slot per `encap_hash` (see `flow_cache`).
#[btf_map]
pub static FLOW_CACHE: PerCpuArray<CachedFlow, { FLOW_CACHE_SLOTS as usize }> = PerCpuArray::new();

/// A version per FLOW_CACHE slot, global, bumped by each new pin of a flow of the slot.
#[btf_map]
pub static PIN_VERSIONS: Array<u32, { FLOW_CACHE_SLOTS as usize }> = Array::new();

/// (service, client) → the backend a source-hash service with an affinity timeout pinned the
/// client to. One LRU list for all CPUs: a client's flows arrive on any CPU.
#[btf_map]
pub static SOURCE_AFFINITY: LruHashMap<AffinityKey, Affinity, { MAX_SOURCE_AFFINITY as usize }> = LruHashMap::new();

/// Run-time knobs: one entry.
#[btf_map]
pub static SETTINGS: Array<Settings, 1> = Array::new();

/// New flows this second, per CPU.
#[btf_map]
pub static NEW_FLOW_RATE: PerCpuArray<RateWindow, 1> = PerCpuArray::new();

/// Round-robin cursor per service id, per CPU (rr and wrr services).
#[btf_map]
pub static RR_CURSOR: PerCpuArray<u32, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Flows pinned to each backend id and not closed: global, updated with atomic adds (lc/wlc
/// compare them; every scheduler keeps them, so a switch to lc starts from the right counts).
#[btf_map]
pub static ACTIVE_FLOWS: Array<u64, { MAX_BACKENDS as usize }> = Array::new();

/// Weight of each backend id (wlc).
#[btf_map]
pub static BACKEND_WEIGHTS: Array<u32, { MAX_BACKENDS as usize }> = Array::new();

/// Each CPU's cache of the FIB's answers for encapsulating backends, by backend id modulo
/// the slots: per CPU, so that a CPU only ever reads entries it wrote whole itself.
#[btf_map]
pub static NEXT_HOPS: PerCpuArray<NextHop, { NEXT_HOP_SLOTS as usize }> = PerCpuArray::new();

/// Egress interfaces other than the ingress one, for XDP_REDIRECT.
#[btf_map]
pub static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

#[btf_map]
pub static SERVICE_STATS: PerCpuArray<Counters, { MAX_SERVICES as usize }> = PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<Counters, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map]
pub static BACKEND_FLOW_STATS: PerCpuArray<BackendFlows, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map]
pub static REASON_STATS: PerCpuArray<Counters, { Reason::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub static FLOW_STATS: PerCpuArray<Counters, { FlowEvent::COUNT as usize }> = PerCpuArray::new();

/// Seed of the flow hash, set by the agent at load time (read-only data).
#[no_mangle]
static HASH_SEED: u32 = 0;

/// MAC address of the interface we are attached to (see `lb_common::mac_words`), set by the
/// agent at load time.
#[no_mangle]
static IFACE_MAC: [u16; 3] = [0; 3];

/// A [`VipKey`] from its five words: the address, then the family byte and zeros. A VipKey
/// literal zeroes its padding with a byte-wise memset on every lookup; five word stores do not.
#[inline(always)]
pub fn vip_key(words: [u32; 5]) -> VipKey {
    // SAFETY: VipKey is #[repr(C)], 20 bytes of plain integers: every bit pattern is valid.
    unsafe { core::mem::transmute::<[u32; 5], VipKey>(words) }
}

/// The service of `key`, from one of its two buckets. The agent rewrites an entry in place
/// (an array element has no RCU copy): a packet racing a table flip may read the new base
/// with the old size or the reverse; both tables of a service are one range of twice the
/// allocated size, so either way it indexes that service's own backends.
#[inline(always)]
pub fn service(key: &ServiceKey) -> Option<Service> {
    let (first, second) = lb_common::service_buckets(key);
    for b in [first, second] {
        let bucket = SERVICES.get(b)?;
        for i in 0..SERVICE_BUCKET_ENTRIES {
            let e = &bucket.entries[i];
            let k = &e.key;
            // Word by word: an array or struct comparison would call a byte-wise memcmp.
            if k.addr[0] == key.addr[0]
                && k.addr[1] == key.addr[1]
                && k.addr[2] == key.addr[2]
                && k.addr[3] == key.addr[3]
                && k.port == key.port
                && k.proto == key.proto
                && k.family == key.family
            {
                return Some(e.service);
            }
        }
    }
    None
}

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
#[btf_map]
pub static DECAP_ADDRS: HashMap<VipKey, u32, { lb_common::limits::MAX_DECAP_ADDRS as usize }> = HashMap::new();

/// Per-CPU counters per `lb_common::reason::DecapReason`.
#[btf_map]
pub static DECAP_STATS: PerCpuArray<Counters, { lb_common::reason::DecapReason::COUNT as usize }> = PerCpuArray::new();
