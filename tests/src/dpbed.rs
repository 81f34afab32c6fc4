//! A data-path bed for BPF_PROG_TEST_RUN fixtures of the routed (L3) data path: a network
//! namespace with real routes and neighbour entries, so that the balancer's `bpf_fib_lookup`
//! answers as it would on a host, and a loaded [`Dataplane`] with a fixed set of services.
//!
//! The kernel resolves BPF_PROG_TEST_RUN's `ingress_ifindex` and runs the FIB lookups in the
//! network namespace of the *calling thread*, so every piece of BPF work happens on one thread
//! that entered the namespace: [`DpBed::run`] (or [`with_bed`]) runs a closure there with a
//! freshly loaded [`Bed`]. The namespace (and everything in it) goes when the [`DpBed`] drops.
//!
//! Topology, all inside the namespace:
//!
//! ```text
//!   veth0 (LB_MAC, 10.1.0.1/24, fd00:1::1/64) ── veth1
//!     10.2.0.0/24, fd00:2::/64  via GW4/GW6 (permanent neighbours GW4_MAC/GW6_MAC)
//!     10.3.0.0/24, fd00:3::/64  via GW4/GW6, mtu lock 1300 (too-big cases)
//!     10.4.0.0/24, fd00:4::/64  via NO_NEIGH_GW4/6 (no neighbour entry)
//!   veth2 (LB_MAC2, 10.5.0.1/24, fd00:5::1/64) ── veth3
//!     10.6.0.0/24, fd00:6::/64  via 10.5.0.254/fd00:5::fe (permanent, GW2_MAC): XDP_REDIRECT
//!   no default route: 192.0.2.1 and 2001:db8::1 are unroutable.
//! ```
//!
//! The route MTU is *locked*: `bpf_fib_lookup` ignores an unlocked route MTU (IPv4 unless
//! `net.ipv4.ip_forward_use_pmtu`, IPv6 always) and checks against the device MTU instead.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    panic,
};

use anyhow::{bail, Context as _, Result};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};
use lb_agent::{config::Forward, dataplane::map_addr, sys::if_index};
use lb_common::{
    addr_v6,
    hash::{flow_hash, ring_slot},
    FlowKey, Settings, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    bed::{self, xdp_md},
    netns::Netns,
    wire::Frame,
};

pub const SEED: u32 = 0x5eed;
/// Maglev table size of every service (prime).
pub const TABLE: u32 = 251;
pub const FLOW_TABLE_SIZE: u32 = 4096;
/// UDP idle time of the default settings: long enough never to expire in a test.
pub const UDP_IDLE_NS: u64 = 60_000_000_000;

pub const VETH: &str = "veth0";
pub const VETH_PEER: &str = "veth1";
pub const VETH2: &str = "veth2";
pub const VETH2_PEER: &str = "veth3";
/// MAC of veth0: the interface the balancer "runs on" (ingress of every test frame).
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x01];
pub const LB_MAC2: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x02];
/// Source MAC of test frames: the router that brought the client's packet.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
pub const GW4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
pub const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0xfe);
pub const GW4_MAC: [u8; 6] = [0x02, 0x9a, 0, 0, 0x04, 0xfe];
pub const GW6_MAC: [u8; 6] = [0x02, 0x9a, 0, 0, 0x06, 0xfe];
pub const GW2_MAC: [u8; 6] = [0x02, 0x9a, 0, 0, 0x02, 0xfe];
/// Gateways without a neighbour entry.
pub const NO_NEIGH_GW4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 253);
pub const NO_NEIGH_GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0xfd);
/// MTU of the routes to 10.3.0.0/24 and fd00:3::/64.
pub const SMALL_MTU: u16 = 1300;

pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x100);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 2);

/// Ports of the services on both VIPs. L2 DSR: TCP 80, UDP 53. IPIP: TCP and UDP 443 (three
/// backends), and single-backend TCP services whose backend is behind a small MTU, behind a
/// gateway without neighbour, unroutable, or behind veth2.
pub const PORT_L2_TCP: u16 = 80;
pub const PORT_L2_UDP: u16 = 53;
pub const PORT_IPIP: u16 = 443;
pub const PORT_TOO_BIG: u16 = 1000;
pub const PORT_NO_NEIGH: u16 = 1001;
pub const PORT_NO_ROUTE: u16 = 1002;
pub const PORT_REDIRECT: u16 = 1003;

/// Outer source prefixes of the encapsulation: 10.1.0.0/24 and fd00:1::/112.
pub const IPIP_SRC4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 0);
pub const IPIP_SRC4_LEN: u8 = 24;
pub const IPIP_SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0);
pub const IPIP_SRC6_LEN: u8 = 112;

/// Interface indexes and MACs of the bed, as seen inside the namespace.
#[derive(Clone, Copy, Debug)]
pub struct Topo {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub ifindex2: u32,
    pub mac2: [u8; 6],
}

/// The namespace and its links. Lives on the test's own thread; BPF work goes through
/// [`DpBed::run`].
pub struct DpBed {
    pub ns: Netns,
}

impl DpBed {
    pub fn new() -> Result<Self> {
        let ns = Netns::new("dp")?;
        let ip = |args: &str| -> Result<()> {
            let mut full = vec!["ip"];
            full.extend(args.split_whitespace());
            ns.exec(&full).map(drop)
        };
        let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        ip(&format!("link add {VETH} address {} type veth peer name {VETH_PEER}", mac(LB_MAC)))?;
        ip(&format!("link add {VETH2} address {} type veth peer name {VETH2_PEER}", mac(LB_MAC2)))?;
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        ip(&format!("addr add 10.1.0.1/24 dev {VETH}"))?;
        ip(&format!("addr add fd00:1::1/64 dev {VETH} nodad"))?;
        ip(&format!("addr add 10.5.0.1/24 dev {VETH2}"))?;
        ip(&format!("addr add fd00:5::1/64 dev {VETH2} nodad"))?;
        for dev in [VETH, VETH_PEER, VETH2, VETH2_PEER] {
            ip(&format!("link set {dev} up"))?;
        }
        ip(&format!("neigh add {GW4} lladdr {} dev {VETH} nud permanent", mac(GW4_MAC)))?;
        ip(&format!("neigh add {GW6} lladdr {} dev {VETH} nud permanent", mac(GW6_MAC)))?;
        ip(&format!("neigh add 10.5.0.254 lladdr {} dev {VETH2} nud permanent", mac(GW2_MAC)))?;
        ip(&format!("neigh add fd00:5::fe lladdr {} dev {VETH2} nud permanent", mac(GW2_MAC)))?;
        ip(&format!("route add 10.2.0.0/24 via {GW4}"))?;
        ip(&format!("route add fd00:2::/64 via {GW6}"))?;
        ip(&format!("route add 10.3.0.0/24 via {GW4} mtu lock {SMALL_MTU}"))?;
        ip(&format!("route add fd00:3::/64 via {GW6} mtu lock {SMALL_MTU}"))?;
        ip(&format!("route add 10.4.0.0/24 via {NO_NEIGH_GW4}"))?;
        ip(&format!("route add fd00:4::/64 via {NO_NEIGH_GW6}"))?;
        ip("route add 10.6.0.0/24 via 10.5.0.254")?;
        ip("route add fd00:6::/64 via fd00:5::fe")?;
        Ok(Self { ns })
    }

    /// Runs `f` with a freshly loaded [`Bed`] on a thread inside the namespace, pinned to CPU 0
    /// (the flow tables are per CPU: a thread that migrated between two packets of a flow would
    /// find its pin in another CPU's table, counted as such); a panic in `f` is re-raised here
    /// with its own message.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce(&mut Bed) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.run_raw(move || {
            crate::bench::pin_to_cpu0().expect("pin the bed's thread");
            let mut bed = Bed::new().expect("load the data-path bed (run the tests as root)");
            f(&mut bed)
        })
    }

    /// Runs `f` on a thread inside the namespace, without a [`Bed`] (e.g. to build one with
    /// other options); a panic is re-raised here.
    pub fn run_raw<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let handle = self.ns.spawn(f).expect("enter the bed's namespace");
        match handle.join() {
            Ok(r) => r,
            Err(payload) => panic::resume_unwind(payload),
        }
    }

    /// A counter of the namespace's IP statistics, e.g. ("Ip", "ForwDatagrams") from
    /// /proc/net/snmp or ("Ip6", "Ip6OutForwDatagrams") from /proc/net/snmp6.
    pub fn snmp(&self, table: &str, name: &str) -> Result<u64> {
        let file = if table == "Ip6" { "/proc/net/snmp6" } else { "/proc/net/snmp" };
        let out = self.ns.exec(&["cat", file])?;
        let text = String::from_utf8_lossy(&out.stdout);
        if table == "Ip6" {
            for line in text.lines() {
                let mut words = line.split_whitespace();
                if words.next() == Some(name) {
                    return Ok(words.next().unwrap_or("0").parse()?);
                }
            }
        } else {
            let prefix = format!("{table}:");
            let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
            if lines.len() == 2 {
                let names = lines[0].split_whitespace();
                if let Some((_, v)) = names.zip(lines[1].split_whitespace()).find(|(n, _)| *n == name) {
                    return Ok(v.parse()?);
                }
            }
        }
        bail!("no counter {table} {name} in {file}")
    }
}

/// Creates a bed, runs `f` in it, removes it.
pub fn with_bed<F, R>(f: F) -> R
where
    F: FnOnce(&mut Bed) -> R + Send + 'static,
    R: Send + 'static,
{
    let bed = DpBed::new().expect("create the data-path bed's namespace (run as root)");
    bed.run(f)
}

/// Backend ids of the standard services.
pub const L2_V4: [u32; 3] = [0, 1, 2];
pub const IPIP_V4: [u32; 3] = [3, 4, 5];
pub const L2_V6: [u32; 3] = [6, 7, 8];
pub const IPIP_V6: [u32; 3] = [9, 10, 11];
pub const TOO_BIG_V4: u32 = 12;
pub const TOO_BIG_V6: u32 = 13;
pub const NO_NEIGH_V4: u32 = 14;
pub const NO_NEIGH_V6: u32 = 15;
pub const NO_ROUTE_V4: u32 = 16;
pub const NO_ROUTE_V6: u32 = 17;
pub const REDIRECT_V4: u32 = 18;
pub const REDIRECT_V6: u32 = 19;

/// MAC of an L2 backend.
pub fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, id as u8]
}

/// The standard backends: (id, address, MAC for L2).
pub fn standard_backends() -> Vec<(u32, IpAddr, Option<[u8; 6]>)> {
    let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    let v6 = |net: u16, host: u16| IpAddr::V6(Ipv6Addr::new(0xfd00, net, 0, 0, 0, 0, 0, host));
    let mut all = Vec::new();
    for (i, id) in L2_V4.into_iter().enumerate() {
        all.push((id, v4(10, 1, 0, 11 + i as u8), Some(backend_mac(id))));
    }
    for (i, id) in IPIP_V4.into_iter().enumerate() {
        all.push((id, v4(10, 2, 0, 11 + i as u8), None));
    }
    for (i, id) in L2_V6.into_iter().enumerate() {
        all.push((id, v6(1, 0x11 + i as u16), Some(backend_mac(id))));
    }
    for (i, id) in IPIP_V6.into_iter().enumerate() {
        all.push((id, v6(2, 0x11 + i as u16), None));
    }
    all.extend([
        (TOO_BIG_V4, v4(10, 3, 0, 10), None),
        (TOO_BIG_V6, v6(3, 0x10), None),
        (NO_NEIGH_V4, v4(10, 4, 0, 10), None),
        (NO_NEIGH_V6, v6(4, 0x10), None),
        (NO_ROUTE_V4, v4(192, 0, 2, 1), None),
        (NO_ROUTE_V6, IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)), None),
        (REDIRECT_V4, v4(10, 6, 0, 10), None),
        (REDIRECT_V6, v6(6, 0x10), None),
    ]);
    all
}

/// The standard services: (VIP, port, protocol, forwarding, backend ids).
pub fn standard_services() -> Vec<(IpAddr, u16, u8, Forward, Vec<u32>)> {
    let mut all = Vec::new();
    for (vip, l2, ipip, too_big, no_neigh, no_route, redirect) in [
        (IpAddr::V4(VIP4), L2_V4, IPIP_V4, TOO_BIG_V4, NO_NEIGH_V4, NO_ROUTE_V4, REDIRECT_V4),
        (IpAddr::V6(VIP6), L2_V6, IPIP_V6, TOO_BIG_V6, NO_NEIGH_V6, NO_ROUTE_V6, REDIRECT_V6),
    ] {
        all.extend([
            (vip, PORT_L2_TCP, IPPROTO_TCP, Forward::L2, l2.to_vec()),
            (vip, PORT_L2_UDP, IPPROTO_UDP, Forward::L2, l2.to_vec()),
            (vip, PORT_IPIP, IPPROTO_TCP, Forward::Ipip, ipip.to_vec()),
            (vip, PORT_IPIP, IPPROTO_UDP, Forward::Ipip, ipip.to_vec()),
            (vip, PORT_TOO_BIG, IPPROTO_TCP, Forward::Ipip, vec![too_big]),
            (vip, PORT_NO_NEIGH, IPPROTO_TCP, Forward::Ipip, vec![no_neigh]),
            (vip, PORT_NO_ROUTE, IPPROTO_TCP, Forward::Ipip, vec![no_route]),
            (vip, PORT_REDIRECT, IPPROTO_TCP, Forward::Ipip, vec![redirect]),
        ]);
    }
    all
}

/// The settings the bed starts with: long UDP idle time, no new-flow limit, outer sources
/// 10.1.0.0/24 and fd00:1::/112.
pub fn default_settings() -> Settings {
    let host4 = u32::MAX >> IPIP_SRC4_LEN;
    let host6 = u32::MAX >> (IPIP_SRC6_LEN - 96);
    let mut src6 = addr_v6(IPIP_SRC6.octets());
    src6[3] &= !host6.to_be();
    Settings {
        udp_idle_ns: UDP_IDLE_NS,
        new_flows_per_cpu_sec: 0,
        ipip_src_v4: u32::from_ne_bytes(IPIP_SRC4.octets()) & !host4.to_be(),
        ipip_src_v4_host: host4.to_be(),
        ipip_src_v6_host: host6.to_be(),
        ipip_src_v6: src6,
        ..Settings::default()
    }
}

/// The shared data-path bed ([`crate::bed::Bed`]) loaded with the standard services, on a
/// thread inside the namespace, and the namespace's interfaces.
pub struct Bed {
    pub bed: bed::Bed,
    pub topo: Topo,
}

impl std::ops::Deref for Bed {
    type Target = bed::Bed;
    fn deref(&self) -> &bed::Bed {
        &self.bed
    }
}

impl std::ops::DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut bed::Bed {
        &mut self.bed
    }
}

impl Bed {
    /// Loads the data path and adds the standard backends and services, frames arriving on
    /// veth0. Must run on a thread inside the bed's namespace (see [`DpBed::run`]).
    pub fn new() -> Result<Self> {
        let topo = Topo {
            ifindex: if_index(VETH).context("veth0 missing: not inside the bed's namespace?")?,
            mac: LB_MAC,
            ifindex2: if_index(VETH2).context("veth2 missing")?,
            mac2: LB_MAC2,
        };
        let mut builder = bed::Builder::new(SEED, LB_MAC, TABLE)
            .flow_table_size(FLOW_TABLE_SIZE)
            .settings(default_settings())
            .ingress(topo.ifindex);
        for (id, addr, mac) in standard_backends() {
            builder = builder.backend(id, addr, mac);
        }
        for (vip, port, proto, forward, members) in standard_services() {
            builder = builder.service(vip, port, proto, forward, &members);
        }
        Ok(Self { bed: builder.build()?, topo })
    }

    /// Runs one frame in "live frames" mode, arriving on veth0: XDP_PASS frames go up the
    /// namespace's stack, XDP_TX/XDP_REDIRECT ones are transmitted. No output frame.
    pub fn run_live(&mut self, frame: &[u8]) -> Result<()> {
        let ctx = xdp_md(frame.len(), self.topo.ifindex);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.attrs = TestRunAttrs::new().xdp_live_frames(1);
        self.dp.balancer().test_run(opts)?;
        Ok(())
    }
}

/// A frame from the client's router to the balancer's veth0.
pub fn to_lb(mut f: Frame) -> Frame {
    f.dst_mac = LB_MAC;
    f.src_mac = CLIENT_MAC;
    f
}

/// The flow-table key the data path builds for this frame.
pub fn flow_key(f: &Frame) -> FlowKey {
    let (src, family) = map_addr(f.src);
    let (dst, _) = map_addr(f.dst);
    FlowKey { src, dst, ports: ports_word(f), proto: f.proto, family, _pad: 0 }
}

pub fn tcp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Frame {
    to_lb(Frame::tcp(src, sport, dst, dport))
}

pub fn udp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Frame {
    to_lb(Frame::udp(src, sport, dst, dport))
}

/// The flow hash the data path computes for this frame with the bed's seed.
pub fn frame_hash(f: &Frame) -> u32 {
    flow_hash(&map_addr(f.src).0, ports_word(f), SEED)
}

/// The entry of a service's table (Maglev, rr, wrr) that `hash` picks, as the data path picks
/// it: its ring slot over the whole table.
pub fn ring_entry(table: &[u32], hash: u32) -> u32 {
    table[ring_slot(hash, table.len() as u32) as usize]
}

/// The encapsulation hash the data path computes for this frame (outer source bits, flow label).
pub fn encap_hash(f: &Frame) -> u32 {
    lb_common::hash::encap_hash(&map_addr(f.src).0, ports_word(f))
}

/// The frame's L4 ports as the data path reads them: the transport header's first four bytes.
fn ports_word(f: &Frame) -> u32 {
    let [s0, s1] = f.sport.to_be_bytes();
    let [d0, d1] = f.dport.to_be_bytes();
    u32::from_ne_bytes([s0, s1, d0, d1])
}

/// The outer IPv4 source for a flow of this encapsulation hash: the prefix, the host part from the hash.
pub fn outer_src_v4(hash: u32) -> Ipv4Addr {
    let host = u32::MAX >> IPIP_SRC4_LEN;
    Ipv4Addr::from((u32::from(IPIP_SRC4) & !host) | (hash & host))
}

pub fn outer_src_v6(hash: u32) -> Ipv6Addr {
    let host = u128::from(u32::MAX >> (IPIP_SRC6_LEN - 96));
    Ipv6Addr::from((u128::from(IPIP_SRC6) & !host) | (u128::from(hash) & host))
}
