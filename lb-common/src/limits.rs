//! Every limit of the data path, in one place, used by both sides.

/// Distinct VIP addresses.
pub const MAX_VIPS: u32 = 1024;
/// 64-bit words of the VIP bitmap (`VIP_BITS`): one bit per [`crate::vip_bit`] value.
pub const VIP_BITS_WORDS: u32 = (1 << 16) / 64;
/// Services (VIP, port, protocol).
pub const MAX_SERVICES: u32 = 1024;
/// Buckets of the SERVICES map (a power of two) and the entries of each: eight slots per
/// service, so that one of a service's two buckets has room (or can make it by moving an
/// entry to its own other bucket) far beyond any real configuration.
pub const SERVICE_BUCKETS: u32 = 2048;
pub const SERVICE_BUCKET_ENTRIES: usize = 4;
const _: () = assert!(SERVICE_BUCKETS.is_power_of_two());
/// Backends over all services (ids are 0..MAX_BACKENDS): 1,000 services of 100 backends fit.
/// BACKENDS costs 28 B per slot, BACKEND_STATS 16 B per slot and CPU.
pub const MAX_BACKENDS: u32 = 131_072;
/// Default Maglev table size per service: a prime well above 100 × the number of backends
/// a service usually has, as the Maglev paper recommends.
pub const DEFAULT_MAGLEV_SIZE: u32 = 65_537;
/// Largest Maglev table size a service may ask for.
pub const MAX_MAGLEV_SIZE: u32 = 655_373;
/// Entries of the MAGLEV map when the config does not say: room for eight services of the
/// default size, each with its two copies (active and inactive).
pub const DEFAULT_MAGLEV_CAPACITY: u32 = 16 * DEFAULT_MAGLEV_SIZE;
/// Flow-table entries when the config does not say (about 121 B of kernel memory each with the
/// hash overhead: see the README).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
/// CPUs a flow table is kept for (`FLOWS` has a table per possible CPU): 512 covers the
/// largest two-socket hosts; how far a flow that changed CPU is looked for (see the data path).
pub const MAX_CPUS: u32 = 512;
/// Client pins of source-hash services with an affinity timeout (`SOURCE_AFFINITY`, an LRU
/// hash: the least recently pinned client goes first when full; about 100 B each).
pub const MAX_SOURCE_AFFINITY: u32 = 1 << 17;
/// Idle time after which a UDP flow is re-hashed.
pub const DEFAULT_UDP_IDLE_SECS: u32 = 30;
/// New flows per second and CPU that enter the flow table (Katran's default is of this order).
pub const DEFAULT_NEW_FLOWS_PER_CPU_SEC: u32 = 125_000;
/// IPv6 extension headers walked before the transport header.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;
/// Slots of each CPU's next-hop cache (`NEXT_HOPS`, a power of two): a backend id takes slot
/// `id % NEXT_HOP_SLOTS`; 32 B per slot and CPU.
pub const NEXT_HOP_SLOTS: u32 = 4096;
/// Slots of each CPU's flow cache (`FLOW_CACHE`, a power of two) in front of its flow table:
/// a flow takes the slot its [`crate::hash::encap_hash`] names; 64 B per slot and CPU.
pub const FLOW_CACHE_SLOTS: u32 = 4096;
/// Jiffies a flow-cache entry answers for before the flow table is asked again (and its LRU
/// entry marked used): 0.26 s at HZ=1000, 2.6 s at HZ=100.
pub const FLOW_CACHE_REFRESH_JIFFIES: u64 = 256;
/// Egress interfaces in the XDP_REDIRECT devmap.
pub const MAX_TX_PORTS: u32 = 64;
/// Addresses one backend host accepts encapsulated packets for (`lb-agent decap`).
pub const MAX_DECAP_ADDRS: u32 = 256;
