//! Map names, keys and values, as the eBPF object declares them and the agent fills them.
use crate::{Addr, IPPROTO_TCP};

/// Map names, as the eBPF object declares them and the agent looks them up.
pub mod map_names {
    /// [`crate::VipKey`] → [`crate::Vip`]: is this destination ours at all?
    pub const VIPS: &str = "VIPS";
    /// `u64` words of a bitmap with the [`crate::vip_bit`] of every VIP set: an address whose
    /// bit is clear is not in [`VIPS`] (one array read instead of a hash lookup for the traffic
    /// that is not ours); one whose bit is set may be.
    pub const VIP_BITS: &str = "VIP_BITS";
    /// [`crate::ServiceBucket`]s: [`crate::ServiceKey`] → [`crate::Service`], a two-choice
    /// hash table the agent lays out (see [`crate::service_buckets`]).
    pub const SERVICES: &str = "SERVICES";
    /// All services' Maglev tables, back to back: entry → backend id.
    pub const MAGLEV: &str = "MAGLEV";
    /// Backend id → [`crate::Backend`].
    pub const BACKENDS: &str = "BACKENDS";
    /// Per-CPU [`crate::Counters`] per service id.
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// Per-CPU [`crate::Counters`] per backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// Per-CPU [`crate::Counters`] per [`crate::Reason`].
    pub const REASON_STATS: &str = "REASON_STATS";
    /// Per-CPU [`crate::BackendFlows`] per backend id: the passive health signal.
    pub const BACKEND_FLOW_STATS: &str = "BACKEND_FLOW_STATS";
    /// Per-CPU [`crate::Counters`] per [`crate::FlowEvent`] (packets only).
    pub const FLOW_STATS: &str = "FLOW_STATS";
    /// [`crate::FlowKey`] → [`crate::Flow`]: LRU hash with per-CPU LRU lists.
    pub const FLOWS: &str = "FLOWS";
    /// Per-CPU [`crate::CachedFlow`] per slot: each CPU's cache of its established TCP flows'
    /// pins, in front of [`FLOWS`].
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    /// `u32` per [`FLOW_CACHE`] slot, global: bumped by every new pin of a flow of the slot, so
    /// that no CPU's cache answers for a 5-tuple pinned anew (on any CPU) since it was cached.
    pub const PIN_VERSIONS: &str = "PIN_VERSIONS";
    /// One [`crate::Settings`].
    pub const SETTINGS: &str = "SETTINGS";
    /// Per-CPU [`crate::RateWindow`].
    pub const NEW_FLOW_RATE: &str = "NEW_FLOW_RATE";
    /// Devmap of egress interfaces for XDP_REDIRECT (ifindex → ifindex).
    pub const TX_PORTS: &str = "TX_PORTS";
    /// Per-CPU [`crate::NextHop`] per slot: each CPU's cache of the FIB's answers for the
    /// encapsulating backends, valid while [`crate::Settings::route_generation`] holds.
    pub const NEXT_HOPS: &str = "NEXT_HOPS";
    /// [`crate::VipKey`] → `u32` (1, unused): outer destinations this host decapsulates (the
    /// backend side of L3 DSR, program [`crate::program_names::DECAP`]).
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
    /// Per-CPU [`crate::Counters`] per [`crate::reason::DecapReason`] (bytes as received).
    pub const DECAP_STATS: &str = "DECAP_STATS";
    /// Per-CPU `u32` per service id: the round-robin cursor of rr/wrr services (the next entry
    /// of the service's table a new flow takes on this CPU).
    pub const RR_CURSOR: &str = "RR_CURSOR";
    /// `u64` per backend id, global (not per CPU): the flows pinned to the backend and not yet
    /// closed, kept by the data path with atomic adds and reconciled by the agent with
    /// [`FLOWS`] every few seconds. What lc/wlc compare.
    pub const ACTIVE_FLOWS: &str = "ACTIVE_FLOWS";
    /// `u32` per backend id: its configured weight, which wlc divides its active flows by.
    pub const BACKEND_WEIGHTS: &str = "BACKEND_WEIGHTS";
    /// [`crate::AffinityKey`] → [`crate::Affinity`]: LRU hash of the client pins of
    /// source-hash services with an affinity timeout ([`Service::affinity_timeout_secs`]).
    pub const SOURCE_AFFINITY: &str = "SOURCE_AFFINITY";
}

/// Global variables of the eBPF object, set by the agent at load time.
pub mod global_names {
    /// `u32`: seed of the flow hash; equal on every balancer host that shares a VIP.
    pub const HASH_SEED: &str = "HASH_SEED";
    /// `[u16; 3]` (see [`crate::mac_words`]): MAC address of the interface the program is attached to.
    pub const IFACE_MAC: &str = "IFACE_MAC";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// The balancer.
    pub const BALANCER: &str = "xlb_balancer";
    /// XDP_PASS only: needed on the peer of a native-XDP veth in test beds, and the bench baseline.
    pub const PASS: &str = "xlb_pass";
    /// Swaps the Ethernet addresses and bounces the frame: the minimal XDP_TX baseline.
    pub const MAC_SWAP: &str = "xlb_mac_swap";
    /// Backend side of L3 DSR: strips the outer IPv4/IPv6 header of IPIP/IP6IP6 packets sent to
    /// one of this host's addresses and passes the inner packet up the stack.
    pub const DECAP: &str = "xlb_decap";
}

/// Key of [`map_names::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: Addr,
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6).
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// Value of [`map_names::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vip {
    /// Number of services on this address (informational; the data path only tests presence).
    pub services: u32,
}
const _: () = assert!(core::mem::size_of::<Vip>() == 4);

/// What a [`map_names::SERVICES`] entry is found by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Port, network byte order.
    pub port: u16,
    /// IP protocol number ([`IPPROTO_TCP`] or [`IPPROTO_UDP`](crate::IPPROTO_UDP)).
    pub proto: u8,
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6).
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// What a [`map_names::SERVICES`] entry holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into the per-service statistics.
    pub id: u32,
    /// Where the active table starts in [`map_names::MAGLEV`]. The agent writes the inactive
    /// copy and then replaces this value whole, so a packet never sees half a table.
    pub table_base: u32,
    /// Number of entries of the active table: the allocated size (a prime, fixed for the
    /// service's lifetime), or for rr/wrr the whole number of weighted cycles that fit in it.
    pub table_size: u32,
    /// How packets reach the backend: [`FORWARD_L2`] or [`FORWARD_IPIP`].
    pub forward: u8,
    /// How a new flow picks its backend: one of the `SCHED_*` ids.
    pub scheduler: u8,
    /// Source-hash only: seconds a client's new flows keep the backend of its earlier ones
    /// ([`map_names::SOURCE_AFFINITY`]); 0: off.
    pub affinity_timeout_secs: u16,
}
const _: () = assert!(core::mem::size_of::<Service>() == 16);

impl Service {
    /// Whether the service encapsulates (IPv4 in IPv4, IPv6 in IPv6) instead of L2 DSR.
    #[inline(always)]
    pub const fn is_ipip(&self) -> bool {
        self.forward == FORWARD_IPIP
    }

    /// Whether new flows of a source-hash service keep their client's backend for a while.
    #[inline(always)]
    pub const fn has_affinity(&self) -> bool {
        self.scheduler == SCHED_SOURCE_HASH && self.affinity_timeout_secs != 0
    }
}

/// One service in [`map_names::SERVICES`]; an empty entry has family 0, which no packet has.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub key: ServiceKey,
    pub service: Service,
}
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 36);

/// A value of [`map_names::SERVICES`], an array of [`SERVICE_BUCKETS`](crate::limits::SERVICE_BUCKETS)
/// buckets. A service sits in one of the two buckets [`service_buckets`] names for its key:
/// the data path reads at most two array entries and compares keys, where a kernel hash map
/// costs a call, a jhash and a list walk (about 40 ns on the bench machine, a third of an
/// established flow's cost).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceBucket {
    pub entries: [ServiceEntry; crate::limits::SERVICE_BUCKET_ENTRIES],
}

/// The two buckets of [`map_names::SERVICES`] where the service of `key` may be: different
/// ones, both below [`SERVICE_BUCKETS`](crate::limits::SERVICE_BUCKETS). Not seeded: the
/// keys are the operator's, not a client's, and a restarted agent must find what it wrote.
#[inline(always)]
pub const fn service_buckets(key: &ServiceKey) -> (u32, u32) {
    let a = &key.addr;
    let rest = ((key.port as u32) << 16) | ((key.proto as u32) << 8) | key.family as u32;
    // A multiply per word (murmur3's constants), then its finaliser.
    let mut h = a[0].wrapping_mul(0xcc9e_2d51) ^ a[1];
    h = h.wrapping_mul(0x1b87_3593) ^ a[2];
    h = h.wrapping_mul(0xcc9e_2d51) ^ a[3];
    h = crate::hash::finish(h.wrapping_mul(0x1b87_3593) ^ rest);
    let mask = crate::limits::SERVICE_BUCKETS - 1;
    let first = h & mask;
    let second = (h >> 16) & mask;
    (first, if second == first { first ^ 1 } else { second })
}

/// L2 DSR: the frame's destination MAC becomes the backend's.
pub const FORWARD_L2: u8 = 0;
/// L3 DSR: IPv4 in IPv4 or IPv6 in IPv6 to the backend.
pub const FORWARD_IPIP: u8 = 1;

/// New flows by the flow hash over the Maglev table (the default).
pub const SCHED_MAGLEV: u8 = 0;
/// New flows by a per-CPU cursor over a table of backends in turn.
pub const SCHED_RR: u8 = 1;
/// As [`SCHED_RR`] over a smooth weighted round-robin sequence.
pub const SCHED_WRR: u8 = 2;
/// New flows by a hash of the client address alone over the Maglev table.
pub const SCHED_SOURCE_HASH: u8 = 3;
/// Least connections: of two backends drawn at random from the service's Maglev table (so
/// weights and health shape the draw), the one with fewer [`map_names::ACTIVE_FLOWS`].
pub const SCHED_LC: u8 = 4;
/// Weighted least connections: as [`SCHED_LC`], comparing active flows / weight
/// ([`map_names::BACKEND_WEIGHTS`]).
pub const SCHED_WLC: u8 = 5;

/// Longest affinity timeout of a source-hash service, in seconds.
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = u16::MAX as u32;

/// Value of [`map_names::BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// MAC address the frame is rewritten to (L2 DSR), as [`mac_words`] gives it.
    pub mac: [u16; 3],
    /// [`BACKEND_F_VALID`] when the slot holds a backend.
    pub flags: u8,
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6).
    pub family: u8,
    /// Bumped whenever the slot is given to another backend: a flow pinned to an older
    /// generation is re-hashed instead of following the slot's new owner.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 28);

pub const BACKEND_F_VALID: u8 = 1;

/// A Maglev entry that names no backend: the service has no usable backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Key of [`map_names::FLOWS`]: the 5-tuple as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// The L4 header's first four bytes: source and destination port, as on the wire.
    pub ports: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of [`map_names::FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend: u32,
    /// The backend slot's generation when the flow was pinned.
    pub generation: u32,
    /// UDP: bpf_ktime_get_ns() of the last packet (refreshed once a second, or every half idle
    /// time when that is shorter). TCP: the time the flow was pinned, or [`FLOW_TCP_CLOSED`]
    /// once a FIN was seen (the flow no longer counts in [`map_names::ACTIVE_FLOWS`]).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 16);

/// Value of [`map_names::FLOW_CACHE`]: an established, open TCP flow's pin as this CPU last
/// found it in [`map_names::FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    pub key: FlowKey,
    pub backend: u32,
    pub generation: u32,
    /// The slot's [`map_names::PIN_VERSIONS`] entry, read before the flow table was.
    pub version: u32,
    pub _pad: u32,
    /// bpf_jiffies64() when it was filled.
    pub filled_jiffies: u64,
}
const _: () = assert!(core::mem::size_of::<CachedFlow>() == 64);

/// [`Flow::last_seen_ns`] of a TCP flow that saw a FIN: pinned still (its last packets must
/// reach the same backend), but no longer active. The clock never reads 0, so an entry pinned
/// by an older data path (which stored the pin time) reads as open. A new SYN reopens it.
pub const FLOW_TCP_CLOSED: u64 = 0;

/// Bit 0 of [`Flow::last_seen_ns`] of an open TCP flow: the client's ACK of the handshake was
/// seen (the backend answered its SYN). A pin on a SYN starts without it.
pub const FLOW_TCP_ESTABLISHED: u64 = 1;

impl Flow {
    /// Whether an open TCP flow has seen its handshake complete.
    pub const fn established(&self) -> bool {
        self.last_seen_ns & FLOW_TCP_ESTABLISHED != 0
    }
}

impl Flow {
    /// Whether the flow counts in [`map_names::ACTIVE_FLOWS`] (of the FLOWS entry's protocol).
    pub const fn active(&self, proto: u8) -> bool {
        proto != IPPROTO_TCP || self.last_seen_ns != FLOW_TCP_CLOSED
    }
}

/// Key of [`map_names::SOURCE_AFFINITY`]: a client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub addr: Addr,
    /// The service id.
    pub service: u32,
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6).
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);

/// Value of [`map_names::SOURCE_AFFINITY`]: the backend a client's new flows go to while it
/// stays usable (valid, same generation) and the client comes back within the timeout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend: u32,
    /// The backend slot's generation when the client was pinned.
    pub generation: u32,
    /// bpf_ktime_get_ns() of the client's last new flow.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Affinity>() == 16);

/// The single entry of [`map_names::SETTINGS`]: knobs the agent may change at run time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// A UDP flow idle longer than this is re-hashed on its next packet.
    pub udp_idle_ns: u64,
    /// New flows per second and CPU that get a flow-table entry; past it (a SYN flood) the
    /// Maglev answer is used without inserting, so the flood cannot flush the table. 0: no limit.
    pub new_flows_per_cpu_sec: u32,
    /// Outer source of IPv4 encapsulation: `ipip_src_v4 | (encap hash & ipip_src_v4_host)`
    /// ([`crate::hash::encap_hash`]).
    pub ipip_src_v4: u32,
    pub ipip_src_v4_host: u32,
    /// As for IPv4; the host part varies in the last word only.
    pub ipip_src_v6_host: u32,
    pub ipip_src_v6: Addr,
    /// Changed by the agent whenever a route, neighbour, address or link changes: every
    /// [`NextHop`] of another generation is stale, and the FIB is asked again.
    pub route_generation: u32,
    /// CPUs with a flow table of their own (the first entries of [`map_names::FLOWS`]): where a
    /// packet that finds no pin on its CPU looks for one before it is scheduled as new.
    pub flow_tables: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 48);

/// Value of [`map_names::NEXT_HOPS`]: the FIB's answer for an encapsulating backend, as this
/// CPU last got it (the data path writes it; the agent only invalidates, by generation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// The backend id + 1 (0: an empty slot).
    pub tag: u32,
    /// The backend slot's [`Backend::generation`] then: a slot given to another backend misses.
    pub backend_generation: u32,
    /// [`Settings::route_generation`] then.
    pub route_generation: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// The route's MTU, as the FIB checks it.
    pub mtu: u16,
    /// Source and destination MACs, as [`crate::mac_words`] gives them.
    pub smac: [u16; 3],
    pub dmac: [u16; 3],
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);

/// Value of [`map_names::NEW_FLOW_RATE`]: this CPU's count of new flows in the current second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    pub start_ns: u64,
    pub count: u64,
}
const _: () = assert!(core::mem::size_of::<RateWindow>() == 16);

/// Value of [`map_names::BACKEND_FLOW_STATS`]: what the balancer sees of a backend's health
/// without seeing its replies. A client whose SYN got no answer sends it again, and the
/// retransmission hits the flow pinned by the first one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendFlows {
    /// Flows given to the backend (pinned or not).
    pub new_flows: u64,
    /// TCP SYNs (without ACK) of flows already pinned to the backend.
    pub syn_retransmits: u64,
    /// TCP flows pinned to the backend on their SYN.
    pub syn_pinned: u64,
    /// Of those, the ones whose client sent the handshake's ACK: the backend answered.
    pub established: u64,
}
const _: () = assert!(core::mem::size_of::<BackendFlows>() == 32);

/// Per-CPU counter pair, summed over CPUs by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 16);
