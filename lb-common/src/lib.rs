//! Types shared by the XDP data path (lb-ebpf) and the agent (lb-agent): map names, keys and
//! values, the verdict vocabulary and every limit. Addresses and ports are kept in network byte
//! order, exactly as they sit in the packet, so the data path never swaps bytes.
#![no_std]
#![deny(unsafe_code)]

pub mod hash;
pub mod limits;
mod pod;
pub mod reason;

pub use reason::Reason;

/// Map names, as the eBPF object declares them and the agent looks them up.
pub mod map_names {
    /// VIP address → [`crate::Vip`]: is this destination ours at all?
    pub const VIPS: &str = "VIPS";
    /// [`crate::ServiceKey`] → [`crate::Service`].
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
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Value of [`map_names::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vip {
    /// Number of services on this address (informational; the data path only tests presence).
    pub services: u32,
}
const _: () = assert!(core::mem::size_of::<Vip>() == 4);

/// Key of [`map_names::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub vip: u32,
    /// Port, network byte order.
    pub port: u16,
    /// IP protocol number ([`IPPROTO_TCP`] or [`IPPROTO_UDP`]).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

/// Value of [`map_names::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into the per-service statistics.
    pub id: u32,
    /// Reserved for per-service options; zero today.
    pub flags: u32,
    /// Where the active Maglev table starts in [`map_names::MAGLEV`]. The agent writes the
    /// inactive copy and then flips this one aligned word, so a packet never sees half a table.
    pub table_base: u32,
    /// Number of entries of the table (a prime, fixed for the service's lifetime).
    pub table_size: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 16);

/// Value of [`map_names::BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// MAC address the frame is rewritten to (L2 DSR), as [`mac_words`] gives it.
    pub mac: [u16; 3],
    /// [`BACKEND_F_VALID`] when the slot holds a backend.
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 12);

pub const BACKEND_F_VALID: u16 = 1;

/// A Maglev entry that names no backend: the service has no usable backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Per-CPU counter pair, summed over CPUs by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 16);

/// A MAC address as three 16-bit words holding its bytes in memory order: the data path copies
/// it with three aligned 16-bit moves (a `[u8; 6]` copy compiles to a slow byte-wise helper).
pub const fn mac_words(mac: [u8; 6]) -> [u16; 3] {
    [u16::from_ne_bytes([mac[0], mac[1]]), u16::from_ne_bytes([mac[2], mac[3]]), u16::from_ne_bytes([mac[4], mac[5]])]
}

/// The inverse of [`mac_words`].
pub const fn mac_bytes(words: [u16; 3]) -> [u8; 6] {
    let [a, b] = words[0].to_ne_bytes();
    let [c, d] = words[1].to_ne_bytes();
    let [e, f] = words[2].to_ne_bytes();
    [a, b, c, d, e, f]
}
