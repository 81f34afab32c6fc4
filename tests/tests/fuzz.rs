//! Fuzz and property test of the XDP balancer: at least a million random and mutated frames
//! through BPF_PROG_TEST_RUN, each checked against properties that hold whatever the input, and
//! against an independent model of the data path (verdict, reason and the exact output frame).
//! The counters are read once, at the end: every frame must have been counted exactly once,
//! under the reason the model predicted. Needs root (CAP_BPF, CAP_NET_ADMIN).
//!
//! The test bed is one network namespace with three veth pairs, so that `bpf_fib_lookup` can
//! answer every way the encapsulation path cares about:
//!
//! ```text
//! veth0 (ingress, 10.0.0.2/24, fd00::2/64)  gw 10.0.0.254 / fd00::fe permanent neighbour
//!                                            gw 10.0.0.253 / fd00::fd no neighbour
//! veth2 (10.1.0.2/24, fd01::2/64, in TX_PORTS)      gw 10.1.0.254 / fd01::fe permanent
//! veth4 (10.2.0.2/24, fd02::2/64, not in TX_PORTS)  gw 10.2.0.254 / fd02::fe permanent
//! backend nets 10.200.k.0/24 and fd00:200:k::/64, k = NETS' index
//! ```
//!
//! Environment: `XLB_FUZZ_SEED` (decimal, 0x-hex, or `random`), `XLB_FUZZ_FRAMES` (default
//! 1,000,000), `XLB_FUZZ_STRICT=1` turns the known findings (see `Finding`) into failures.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{anyhow, Context as _, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{
    config::Forward,
    dataplane::{if_index, map_addr, Dataplane, LoadOptions},
    maglev::{self, Member},
};
use lb_common::{addr_v6, hash::flow_hash, Reason, Settings, NO_BACKEND};
use xlb_tests::{
    netns::Netns,
    packet::{checksum, Frame},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const HASH_SEED: u32 = 0x0f0f_5eed;
const TABLE: u32 = 251;
const DEV_MTU: u16 = 1500;
const ROUTE_MTU: u16 = 1400;
const DEFAULT_FRAMES: u64 = 1_000_000;
/// Below this many frames (XLB_FUZZ_FRAMES), a reason never hit is not a failure.
const COVERAGE_MIN_FRAMES: u64 = 100_000;
const DEFAULT_SEED: u64 = 0x00c0_ffee_5eed_f00d;
/// The kernel refuses test frames shorter than an Ethernet header.
const MIN_FRAME: usize = 14;
const TCP: u8 = 6;
const UDP: u8 = 17;

// ---------------------------------------------------------------------------------------------
// The test bed: interfaces, routes, neighbours, services and backends. The model below is
// derived from the same tables, so the two cannot drift apart.
// ---------------------------------------------------------------------------------------------

/// The balancer's interface (index 0) and two egress interfaces, each one end of a veth pair.
const DEVS: usize = 3;

fn dev_name(i: usize) -> String {
    format!("veth{}", 2 * i)
}

fn dev_mac(i: usize) -> [u8; 6] {
    [0x02, 0x1b, 0, 0, 0, 1 + i as u8]
}

fn gw_mac(i: usize) -> [u8; 6] {
    [0x02, 0x67, 0x77, 0, 0, 1 + i as u8]
}

/// How `bpf_fib_lookup` reaches one backend subnet.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// Through the gateway of device `dev`; `neigh`: the gateway has a permanent neighbour
    /// entry (else it has none); `mtu_lock`: a locked route MTU instead of the device's.
    Via {
        dev: usize,
        neigh: bool,
        mtu_lock: Option<u16>,
    },
    Blackhole,
    NoRoute,
}

/// Backend subnets 10.200.k.0/24 and fd00:200:k::/64.
const NETS: [Path; 7] = [
    Path::Via { dev: 0, neigh: true, mtu_lock: None }, // tx_encap
    Path::Via { dev: 0, neigh: true, mtu_lock: Some(ROUTE_MTU) }, // tx_encap or tx_too_big
    Path::Via { dev: 0, neigh: false, mtu_lock: None }, // pass_no_neighbour
    Path::Blackhole,                                   // drop_no_route
    Path::NoRoute,                                     // drop_no_route
    Path::Via { dev: 1, neigh: true, mtu_lock: None }, // redirect_encap
    Path::Via { dev: 2, neigh: true, mtu_lock: None }, // pass_no_neighbour (no devmap)
];

/// Devices in TX_PORTS.
const TX_PORT_DEVS: [usize; 1] = [1];

fn net_addr(v6: bool, net: usize, host: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, net as u16, 0, 0, 0, 0, u16::from(host)))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 200, net as u8, host))
    }
}

fn vip(v6: bool, i: usize) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1 + i as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1 + i as u8))
    }
}

const VIP_L2: usize = 0;
const VIP_IPIP: usize = 1;
const VIP_EMPTY: usize = 2;
const VIPS_PER_FAMILY: usize = 3;

enum Backends {
    /// Three L2 DSR backends on veth0's subnet, with MACs.
    L2,
    /// One backend in each of these nets.
    Nets(&'static [usize]),
    /// None: the table stays empty.
    Empty,
}

struct ServiceSpec {
    vip: usize,
    port: u16,
    proto: u8,
    forward: Forward,
    backends: Backends,
}

const MIXED: &[usize] = &[2, 3, 4, 5, 6];
/// The same services on the IPv4 and on the IPv6 VIPs.
const SERVICES: [ServiceSpec; 8] = [
    ServiceSpec { vip: VIP_L2, port: 80, proto: TCP, forward: Forward::L2, backends: Backends::L2 },
    ServiceSpec { vip: VIP_L2, port: 53, proto: UDP, forward: Forward::L2, backends: Backends::L2 },
    ServiceSpec { vip: VIP_IPIP, port: 80, proto: TCP, forward: Forward::Ipip, backends: Backends::Nets(&[0, 0]) },
    ServiceSpec { vip: VIP_IPIP, port: 53, proto: UDP, forward: Forward::Ipip, backends: Backends::Nets(&[1, 1]) },
    ServiceSpec { vip: VIP_IPIP, port: 443, proto: TCP, forward: Forward::Ipip, backends: Backends::Nets(MIXED) },
    ServiceSpec { vip: VIP_IPIP, port: 443, proto: UDP, forward: Forward::Ipip, backends: Backends::Nets(MIXED) },
    ServiceSpec { vip: VIP_EMPTY, port: 80, proto: TCP, forward: Forward::L2, backends: Backends::Empty },
    ServiceSpec { vip: VIP_EMPTY, port: 53, proto: UDP, forward: Forward::Ipip, backends: Backends::Empty },
];
const SERVICE_PORTS: [u16; 3] = [80, 53, 443];

fn settings() -> Settings {
    Settings {
        udp_idle_ns: 30_000_000_000,
        // Low enough that the run exercises the rate limiter too.
        new_flows_per_cpu_sec: 2_000,
        ipip_src_v4: u32::from_ne_bytes([172, 16, 0, 0]),
        ipip_src_v4_host: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        ipip_src_v6_host: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        ipip_src_v6: addr_v6(Ipv6Addr::new(0xfd00, 0x5, 0, 0, 0, 0, 0, 0).octets()),
    }
}

/// Creates the interfaces, addresses, neighbours and routes inside `ns`.
fn set_up_links(ns: &Netns) -> Result<()> {
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
    for i in 0..DEVS {
        let (dev, peer) = (dev_name(i), format!("veth{}", 2 * i + 1));
        let mac = mac_text(dev_mac(i));
        ns.exec(&["ip", "link", "add", &dev, "address", &mac, "type", "veth", "peer", "name", &peer])?;
        ns.exec(&["ip", "link", "set", &dev, "up"])?;
        ns.exec(&["ip", "link", "set", &peer, "up"])?;
        ns.exec(&["ip", "addr", "add", &format!("10.{i}.0.2/24"), "dev", &dev])?;
        ns.exec(&["ip", "addr", "add", &format!("fd0{i}::2/64"), "dev", &dev, "nodad"])?;
        let gw = mac_text(gw_mac(i));
        ns.exec(&["ip", "neigh", "add", &format!("10.{i}.0.254"), "lladdr", &gw, "dev", &dev, "nud", "permanent"])?;
        ns.exec(&["ip", "neigh", "add", &format!("fd0{i}::fe"), "lladdr", &gw, "dev", &dev, "nud", "permanent"])?;
    }
    for (k, path) in NETS.iter().enumerate() {
        let (net4, net6) = (format!("10.200.{k}.0/24"), format!("fd00:200:{k}::/64"));
        match *path {
            Path::Via { dev, neigh, mtu_lock } => {
                let (gw4, gw6) = if neigh {
                    (format!("10.{dev}.0.254"), format!("fd0{dev}::fe"))
                } else {
                    (format!("10.{dev}.0.253"), format!("fd0{dev}::fd"))
                };
                let name = dev_name(dev);
                let mtu = mtu_lock.map(|m| m.to_string());
                for (net, gw) in [(&net4, &gw4), (&net6, &gw6)] {
                    let mut cmd = vec!["ip", "route", "add", net, "via", gw, "dev", &name];
                    if let Some(mtu) = &mtu {
                        cmd.extend(["mtu", "lock", mtu]);
                    }
                    ns.exec(&cmd)?;
                }
            }
            Path::Blackhole => {
                ns.exec(&["ip", "route", "add", "blackhole", &net4])?;
                ns.exec(&["ip", "-6", "route", "add", "blackhole", &net6])?;
            }
            Path::NoRoute => {}
        }
    }
    Ok(())
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

// ---------------------------------------------------------------------------------------------
// The model: what the balancer must do with a frame, computed from the input bytes alone.
// ---------------------------------------------------------------------------------------------

/// Where `bpf_fib_lookup` sends a backend's encapsulated packets.
#[derive(Clone, Copy, Debug)]
enum Hop {
    Unroutable,
    /// `via`: egress ifindex, source and destination MAC when the neighbour is known.
    Route {
        mtu: u16,
        via: Option<(u32, [u8; 6], [u8; 6])>,
    },
}

struct ModelBackend {
    addr: IpAddr,
    mac: [u8; 6],
    hop: Hop,
}

struct ModelService {
    id: u32,
    ipip: bool,
    table: Vec<u32>,
}

struct Model {
    vips: HashSet<IpAddr>,
    services: HashMap<(IpAddr, u16, u8), ModelService>,
    backends: HashMap<u32, ModelBackend>,
    ingress: u32,
    tx_ports: HashSet<u32>,
    lb_mac: [u8; 6],
    settings: Settings,
}

/// What the model expects: the reason (hence the verdict) and the output frame.
struct Expect {
    reason: Reason,
    /// None: the input, unchanged.
    out: Option<Vec<u8>>,
    /// (service id, backend id) when the frame is counted as forwarded.
    forwarded: Option<(u32, u32)>,
}

impl Expect {
    fn same(reason: Reason) -> Self {
        Self { reason, out: None, forwarded: None }
    }
}

/// A packet to a VIP with a complete TCP or UDP header, as the model parsed it.
struct Flow {
    l3: usize,
    l4: usize,
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    ports: [u8; 4],
    proto: u8,
    /// The length the IP header claims (IPv6: payload length + 40, saturating).
    ip_len: u16,
    tos: u8,
    df: bool,
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn ip4(b: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

fn ip6(b: &[u8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).unwrap()))
}

/// L3 offset and EtherType after at most one 802.1Q tag; None when cut inside them.
fn l3_of(f: &[u8]) -> Option<(usize, u16)> {
    let et = be16(f, 12);
    if et != 0x8100 {
        return Some((14, et));
    }
    (f.len() >= 18).then(|| (18, be16(f, 16)))
}

impl Model {
    /// The MTU of the route to a backend, if the FIB has one.
    fn route_mtu(&self, addr: IpAddr) -> Option<u16> {
        self.backends.values().find(|b| b.addr == addr).and_then(|b| match b.hop {
            Hop::Route { mtu, .. } => Some(mtu),
            Hop::Unroutable => None,
        })
    }

    /// Whether the frame carries a parseable IP header whose destination is a VIP: only such
    /// frames may get anything but XDP_PASS with the frame untouched.
    fn dst_is_vip(&self, f: &[u8]) -> bool {
        let Some((l3, et)) = l3_of(f) else { return false };
        match et {
            0x0800 if f.len() >= l3 + 20 && f[l3] >> 4 == 4 && f[l3] & 15 >= 5 => {
                self.vips.contains(&ip4(&f[l3 + 16..]))
            }
            0x86dd if f.len() >= l3 + 40 && f[l3] >> 4 == 6 => self.vips.contains(&ip6(&f[l3 + 24..])),
            _ => false,
        }
    }

    /// The TCP or UDP packet to a VIP, or the reason it is none.
    fn flow(&self, f: &[u8]) -> Result<Flow, Reason> {
        let Some((l3, et)) = l3_of(f) else { return Err(Reason::PassMalformed) };
        match et {
            0x0800 => self.ipv4(f, l3),
            0x86dd => self.ipv6(f, l3),
            _ => Err(Reason::PassNotIp),
        }
    }

    fn predict(&self, f: &[u8]) -> Expect {
        match self.flow(f) {
            Ok(flow) => self.service(f, &flow),
            Err(reason) => Expect::same(reason),
        }
    }

    fn ipv4(&self, f: &[u8], l3: usize) -> Result<Flow, Reason> {
        if f.len() < l3 + 20 || f[l3] >> 4 != 4 || f[l3] & 15 < 5 {
            return Err(Reason::PassMalformed);
        }
        let dst = ip4(&f[l3 + 16..]);
        if !self.vips.contains(&dst) {
            return Err(Reason::PassNotVip);
        }
        if f[l3] & 15 != 5 {
            return Err(Reason::DropIpOptions);
        }
        let frags = be16(f, l3 + 6);
        if frags & 0x3fff != 0 {
            return Err(Reason::DropFragment);
        }
        let proto = transport(f[l3 + 9], 1)?;
        let l4 = l3 + 20;
        let ports = l4_ports(f, l4, proto)?;
        Ok(Flow {
            l3,
            l4,
            v6: false,
            src: ip4(&f[l3 + 12..]),
            dst,
            ports,
            proto,
            ip_len: be16(f, l3 + 2),
            tos: f[l3 + 1],
            df: frags & 0x4000 != 0,
        })
    }

    fn ipv6(&self, f: &[u8], l3: usize) -> Result<Flow, Reason> {
        if f.len() < l3 + 40 || f[l3] >> 4 != 6 {
            return Err(Reason::PassMalformed);
        }
        let dst = ip6(&f[l3 + 24..]);
        if !self.vips.contains(&dst) {
            return Err(Reason::PassNotVip);
        }
        // Hop-by-hop, routing and destination options are walked, four at most.
        let (mut next, mut off) = (f[l3 + 6], l3 + 40);
        let mut walked = 0;
        while matches!(next, 0 | 43 | 60) {
            if walked == 4 || f.len() < off + 2 {
                return Err(Reason::DropIpOptions);
            }
            next = f[off];
            off += (usize::from(f[off + 1]) + 1) * 8;
            walked += 1;
        }
        if next == 44 {
            return Err(Reason::DropFragment);
        }
        let proto = transport(next, 58)?;
        let ports = l4_ports(f, off, proto)?;
        Ok(Flow {
            l3,
            l4: off,
            v6: true,
            src: ip6(&f[l3 + 8..]),
            dst,
            ports,
            proto,
            ip_len: be16(f, l3 + 4).saturating_add(40),
            tos: (f[l3] << 4) | (f[l3 + 1] >> 4),
            df: true,
        })
    }

    fn service(&self, f: &[u8], flow: &Flow) -> Expect {
        let dport = u16::from_be_bytes([flow.ports[2], flow.ports[3]]);
        let Some(service) = self.services.get(&(flow.dst, dport, flow.proto)) else {
            return Expect::same(Reason::DropUnknownService);
        };
        let hash = flow_hash(
            &map_addr(flow.src).0,
            &map_addr(flow.dst).0,
            u32::from_ne_bytes(flow.ports),
            flow.proto,
            HASH_SEED,
        );
        let id = service.table[(hash % TABLE) as usize];
        if id == NO_BACKEND {
            return Expect::same(Reason::DropNoBackend);
        }
        let backend = &self.backends[&id];
        let forwarded = Some((service.id, id));
        if !service.ipip {
            let mut out = f.to_vec();
            out[..6].copy_from_slice(&backend.mac);
            out[6..12].copy_from_slice(&self.lb_mac);
            return Expect { reason: Reason::TxForwarded, out: Some(out), forwarded };
        }
        let Hop::Route { mtu, mut via } = backend.hop else { return Expect::same(Reason::DropNoRoute) };
        let outer_len = flow.ip_len.saturating_add(if flow.v6 { 40 } else { 20 });
        if outer_len > mtu {
            if flow.df {
                return Expect { reason: Reason::TxTooBig, out: Some(self.too_big(f, flow, mtu)), forwarded: None };
            }
            // The kernel's stack fragments it.
            via = None;
        }
        if !flow.v6 && flow.ip_len > u16::MAX - 20 {
            return Expect::same(Reason::DropAdjustFailed);
        }
        let l3 = flow.l3;
        let reason = match via {
            Some((ifindex, _, _)) if ifindex == self.ingress => Reason::TxEncap,
            Some((ifindex, _, _)) if self.tx_ports.contains(&ifindex) => Reason::RedirectEncap,
            _ => Reason::PassNoNeighbour,
        };
        let mut out = Vec::with_capacity(f.len() + 40);
        match via {
            // Sent out: to the next hop.
            Some((_, smac, dmac)) if reason != Reason::PassNoNeighbour => {
                out.extend_from_slice(&dmac);
                out.extend_from_slice(&smac);
            }
            // Handed to the stack, which forwards (and resolves, or fragments) it: it must
            // still be addressed to us, as it arrived.
            _ => out.extend_from_slice(&f[..12]),
        }
        out.extend_from_slice(&f[12..l3]);
        let hash_be = hash.to_be_bytes();
        if flow.v6 {
            let label = hash & 0xf_ffff;
            out.push(0x60 | (flow.tos >> 4));
            out.push((flow.tos << 4) | (label >> 16) as u8);
            out.extend_from_slice(&(label as u16).to_be_bytes());
            out.extend_from_slice(&flow.ip_len.to_be_bytes());
            out.extend_from_slice(&[41, 64]);
            let mut src = ipv6_octets(&self.settings.ipip_src_v6);
            let host = self.settings.ipip_src_v6_host.to_ne_bytes();
            for i in 0..4 {
                src[12 + i] |= hash_be[i] & host[i];
            }
            out.extend_from_slice(&src);
            out.extend_from_slice(&octets(backend.addr));
        } else {
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[1] = flow.tos;
            h[2..4].copy_from_slice(&(flow.ip_len + 20).to_be_bytes());
            h[6] = if flow.df { 0x40 } else { 0 };
            h[8] = 64;
            h[9] = 4;
            let (base, host) = (self.settings.ipip_src_v4.to_ne_bytes(), self.settings.ipip_src_v4_host.to_ne_bytes());
            for i in 0..4 {
                h[12 + i] = base[i] | (hash_be[i] & host[i]);
            }
            h[16..20].copy_from_slice(&octets(backend.addr));
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&h);
        }
        out.extend_from_slice(&f[l3..]);
        Expect { reason, out: Some(out), forwarded }
    }

    /// ICMP "fragmentation needed" or ICMPv6 "packet too big" back to the client.
    fn too_big(&self, f: &[u8], flow: &Flow, route_mtu: u16) -> Vec<u8> {
        let l3 = flow.l3;
        let mut out = Vec::with_capacity(l3 + 96);
        out.extend_from_slice(&f[6..12]);
        out.extend_from_slice(&f[..6]);
        out.extend_from_slice(&f[12..l3]);
        if flow.v6 {
            let mtu = u32::from(route_mtu - 40);
            let ip = out.len();
            out.extend_from_slice(&[0x60, 0, 0, 0, 0, 56, 58, 64]);
            out.extend_from_slice(&f[l3 + 24..l3 + 40]);
            out.extend_from_slice(&f[l3 + 8..l3 + 24]);
            let icmp = out.len();
            out.extend_from_slice(&[2, 0, 0, 0]);
            out.extend_from_slice(&mtu.to_be_bytes());
            out.extend_from_slice(&f[l3..l3 + 48]);
            let c = icmpv6_checksum(&out[ip..]);
            out[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
        } else {
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[3] = 56;
            h[8] = 64;
            h[9] = 1;
            h[12..16].copy_from_slice(&f[l3 + 16..l3 + 20]);
            h[16..20].copy_from_slice(&f[l3 + 12..l3 + 16]);
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&h);
            let icmp = out.len();
            out.extend_from_slice(&[3, 4, 0, 0, 0, 0]);
            out.extend_from_slice(&(route_mtu - 20).to_be_bytes());
            out.extend_from_slice(&f[l3..l3 + 28]);
            let c = checksum(&out[icmp..]);
            out[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
        }
        out
    }
}

/// TCP and UDP go on; the family's ICMP is the host's; anything else has no service.
fn transport(proto: u8, icmp: u8) -> Result<u8, Reason> {
    match proto {
        TCP | UDP => Ok(proto),
        p if p == icmp => Err(Reason::PassVipIcmp),
        _ => Err(Reason::DropUnknownService),
    }
}

fn l4_ports(f: &[u8], l4: usize, proto: u8) -> Result<[u8; 4], Reason> {
    let need = if proto == TCP { 20 } else { 8 };
    if f.len() < l4 + need {
        return Err(Reason::DropTruncatedL4);
    }
    Ok([f[l4], f[l4 + 1], f[l4 + 2], f[l4 + 3]])
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ipv6_octets(words: &[u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    o
}

/// Checksum of the ICMPv6 message after the 40-byte IPv6 header `ip[..40]`, over the
/// pseudo-header; 0 when the message's own checksum field is right.
fn icmpv6_checksum(ip: &[u8]) -> u16 {
    let msg = &ip[40..];
    let mut buf = Vec::with_capacity(40 + msg.len());
    buf.extend_from_slice(&ip[8..40]);
    buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    buf.extend_from_slice(&[0, 0, 0, 58]);
    buf.extend_from_slice(msg);
    checksum(&buf)
}

// ---------------------------------------------------------------------------------------------
// Properties that hold whatever the input, independent of the model's details.
// ---------------------------------------------------------------------------------------------

/// Data-path findings the properties tolerate and count, unless `XLB_FUZZ_STRICT=1`. Each has
/// an ignored reproducer at the end of this file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Finding {
    /// The outer header claims more bytes than the frame carries: the encapsulation trusts the
    /// inner header's length field.
    OuterLengthBeyondFrame,
    /// An encapsulated frame sent out (TX/REDIRECT) larger than the egress route's MTU: the MTU
    /// check used the inner header's length field, not the frame's length.
    LargerThanEgressMtu,
    /// An ICMP error to a source that is no single host (RFC 1122 3.2.2, RFC 4443 2.4 (e)).
    IcmpErrorToNonUnicastSource,
}

impl Finding {
    fn describe(self) -> &'static str {
        match self {
            Finding::OuterLengthBeyondFrame => "outer IP length claims more bytes than the encapsulated frame carries",
            Finding::LargerThanEgressMtu => "encapsulated frame sent out larger than the egress route's MTU",
            Finding::IcmpErrorToNonUnicastSource => {
                "ICMP error sent to a multicast/broadcast/unspecified/loopback source"
            }
        }
    }
}

#[derive(Default)]
struct Findings {
    /// Count, length of the shortest example, the example.
    seen: BTreeMap<Finding, (u64, usize, String)>,
    /// Not a finding: encapsulated with bytes after the inner packet (Ethernet padding, or
    /// garbage), which the backend's stack trims.
    trailing_bytes: u64,
}

impl Findings {
    /// Counts the finding and keeps its shortest example.
    fn note(&mut self, finding: Finding, f: &[u8], out: &[u8]) -> Result<(), String> {
        let entry = self.seen.entry(finding).or_insert((0, usize::MAX, String::new()));
        entry.0 += 1;
        if f.len() < entry.1 {
            entry.1 = f.len();
            entry.2 = format!("  in  {}\n  out {}", hex_short(f), hex_short(out));
        }
        if strict() {
            return Err(format!("finding: {}", finding.describe()));
        }
        Ok(())
    }
}

fn check_properties(model: &Model, f: &[u8], verdict: u32, out: &[u8], findings: &mut Findings) -> Result<(), String> {
    if !matches!(verdict, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT) {
        return Err(format!("verdict {verdict} is not DROP/PASS/TX/REDIRECT"));
    }
    if !model.dst_is_vip(f) && (verdict != XDP_PASS || out != f) {
        return Err("not to a VIP, yet not passed untouched".into());
    }
    match verdict {
        XDP_DROP => Ok(()),
        XDP_PASS if out == f => Ok(()),
        XDP_PASS | XDP_REDIRECT => check_encap(model, f, verdict, out, findings),
        // An L2 forward: only the MACs change. (An ICMP answer may have the input's length.)
        _ if out.len() == f.len() && out[12..] == f[12..] => Ok(()),
        _ => {
            let (l2, et) = l3_of(f).ok_or("TX of a frame cut inside its VLAN tag")?;
            let proto = match et {
                0x0800 if out.len() > l2 + 9 => out[l2 + 9],
                0x86dd if out.len() > l2 + 6 => out[l2 + 6],
                _ => return Err("TX of a changed frame that is not IP".into()),
            };
            match proto {
                1 | 58 => check_icmp(f, out, l2, et, findings),
                _ => check_encap(model, f, verdict, out, findings),
            }
        }
    }
}

fn check_encap(model: &Model, f: &[u8], verdict: u32, out: &[u8], findings: &mut Findings) -> Result<(), String> {
    let (l2, et) = l3_of(f).ok_or("encapsulated a frame cut inside its VLAN tag")?;
    let grow = match et {
        0x0800 => 20,
        0x86dd => 40,
        _ => return Err("encapsulated a frame that is not IP".into()),
    };
    if out.len() != f.len() + grow {
        return Err(format!(
            "encapsulation grew the frame by {} bytes, not {grow}",
            out.len() as isize - f.len() as isize
        ));
    }
    if out[12..l2] != f[12..l2] {
        return Err("encapsulation changed the EtherType or VLAN tag".into());
    }
    if out[l2 + grow..] != f[l2..] {
        return Err("the inner packet differs from the input after its L2 header".into());
    }
    let carried = out.len() - l2;
    let (outer_len, claimed, dst) = if grow == 20 {
        let h = &out[l2..l2 + 20];
        if h[0] != 0x45 || h[9] != 4 || checksum(h) != 0 || be16(h, 6) & 0x3fff != 0 || h[8] == 0 {
            return Err("outer IPv4 header malformed (version/IHL, protocol 4, checksum, fragment, TTL)".into());
        }
        (usize::from(be16(h, 2)), usize::from(be16(f, l2 + 2)) + 20, ip4(&h[16..]))
    } else {
        let h = &out[l2..l2 + 40];
        if h[0] >> 4 != 6 || h[6] != 41 || h[7] == 0 {
            return Err("outer IPv6 header malformed (version, next header 41, hop limit)".into());
        }
        // The data path adds 40 to the payload length with saturation, twice.
        let claimed = (usize::from(be16(f, l2 + 4)) + 40).min(65535) + 40;
        (usize::from(be16(h, 4)) + 40, claimed, ip6(&h[24..]))
    };
    let Some(mtu) = model.route_mtu(dst) else {
        return Err(format!("encapsulated to {dst}, which is no routable backend"));
    };
    if outer_len != carried && outer_len != claimed {
        return Err(format!("outer length {outer_len}: neither the {carried} bytes carried nor the {claimed} claimed"));
    }
    if outer_len > carried {
        findings.note(Finding::OuterLengthBeyondFrame, f, out)?;
    } else if outer_len < carried {
        findings.trailing_bytes += 1;
    }
    // Handed to the stack, it must still be addressed to us, or the kernel drops it as meant
    // for another host (PACKET_OTHERHOST) instead of forwarding it.
    if verdict == XDP_PASS && out[..12] != f[..12] {
        return Err("encapsulated and passed to the stack without the MAC header it arrived with".into());
    }
    if verdict != XDP_PASS && carried > usize::from(mtu) {
        findings.note(Finding::LargerThanEgressMtu, f, out)?;
    }
    Ok(())
}

/// Whether an ICMP error may be sent to `src` (RFC 1122 3.2.2: not to a zero, loopback,
/// broadcast, multicast or class E source; RFC 4443 2.4 (e.5): not to the unspecified or a
/// multicast source).
fn single_host(src: IpAddr) -> bool {
    match src {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] != 0 && o[0] != 127 && o[0] < 224
        }
        IpAddr::V6(a) => !a.is_unspecified() && !a.is_multicast(),
    }
}

fn check_icmp(f: &[u8], out: &[u8], l2: usize, et: u16, findings: &mut Findings) -> Result<(), String> {
    if out[..6] != f[6..12] || out[6..12] != f[..6] || out[12..l2] != f[12..l2] {
        return Err("ICMP answer: MACs not swapped, or the EtherType/VLAN tag changed".into());
    }
    let client = if et == 0x0800 {
        if out.len() != l2 + 56 {
            return Err(format!("ICMP answer of {} bytes", out.len()));
        }
        let (ip, icmp) = (&out[l2..l2 + 20], &out[l2 + 20..]);
        if ip[0] != 0x45 || be16(ip, 2) != 56 || ip[9] != 1 || checksum(ip) != 0 {
            return Err("ICMP answer: IPv4 header malformed (version, length, protocol, checksum)".into());
        }
        if ip[12..16] != f[l2 + 16..l2 + 20] || ip[16..20] != f[l2 + 12..l2 + 16] {
            return Err("ICMP answer: addresses are not the client's, swapped".into());
        }
        if icmp[..2] != [3, 4] || checksum(icmp) != 0 || icmp[8..] != f[l2..l2 + 28] {
            return Err("ICMP answer: type/code, checksum or quoted packet wrong".into());
        }
        let mtu = be16(icmp, 6);
        if mtu < 68 || usize::from(mtu) >= usize::from(be16(f, l2 + 2)) {
            return Err(format!("ICMP answer: MTU {mtu}"));
        }
        ip4(&ip[16..])
    } else {
        if out.len() != l2 + 96 {
            return Err(format!("ICMPv6 answer of {} bytes", out.len()));
        }
        let ip = &out[l2..];
        if ip[0] >> 4 != 6 || be16(ip, 4) != 56 || ip[6] != 58 || ip[7] == 0 {
            return Err("ICMPv6 answer: IPv6 header malformed (version, length, next header)".into());
        }
        if ip[8..24] != f[l2 + 24..l2 + 40] || ip[24..40] != f[l2 + 8..l2 + 24] {
            return Err("ICMPv6 answer: addresses are not the client's, swapped".into());
        }
        if ip[40..42] != [2, 0] || icmpv6_checksum(ip) != 0 || ip[48..] != f[l2..l2 + 48] {
            return Err("ICMPv6 answer: type/code, checksum or quoted packet wrong".into());
        }
        let mtu = u32::from_be_bytes([ip[44], ip[45], ip[46], ip[47]]);
        if mtu < 1280 || mtu >= u32::from(be16(f, l2 + 4)) + 40 {
            return Err(format!("ICMPv6 answer: MTU {mtu}"));
        }
        ip6(&ip[24..])
    };
    if !single_host(client) {
        findings.note(Finding::IcmpErrorToNonUnicastSource, f, out)?;
    }
    Ok(())
}

fn strict() -> bool {
    std::env::var("XLB_FUZZ_STRICT").is_ok_and(|v| v == "1")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The first 160 bytes, in hex.
fn hex_short(b: &[u8]) -> String {
    match b.len() {
        0..=160 => hex(b),
        n => format!("{}... ({n} bytes)", hex(&b[..160])),
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs: a deterministic PRNG, valid frames from the builder, and mutations of them.
// ---------------------------------------------------------------------------------------------

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() >> 11) as usize % n
    }

    /// In lo..=hi.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, s: &[T]) -> T {
        s[self.below(s.len())]
    }

    fn byte(&mut self) -> u8 {
        (self.next() >> 32) as u8
    }

    fn u16(&mut self) -> u16 {
        (self.next() >> 32) as u16
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next().to_ne_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}

/// What a valid frame should look like; every field is drawn at random.
#[derive(Clone, Copy)]
struct Shape {
    v6: Option<bool>,
    /// Destination: a VIP (index) or not.
    vip: Option<Option<usize>>,
    proto: Option<u8>,
    vlan: Option<bool>,
    options: Option<bool>,
    frag: Option<bool>,
    ext: Option<bool>,
}

const ANY: Shape = Shape { v6: None, vip: None, proto: None, vlan: None, options: None, frag: None, ext: None };

fn random_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let mut o = [0u8; 16];
        rng.fill(&mut o);
        if rng.percent(50) {
            o[..2].copy_from_slice(&[0xfd, 0x99]); // close to the VIPs
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        let mut o = [0u8; 4];
        rng.fill(&mut o);
        if rng.percent(50) {
            o[..3].copy_from_slice(&[10, 99, 0]); // close to the VIPs
        }
        IpAddr::V4(Ipv4Addr::from(o))
    }
}

fn valid_frame(rng: &mut Rng, model: &Model, shape: Shape) -> Vec<u8> {
    let v6 = shape.v6.unwrap_or_else(|| rng.percent(45));
    let dst = match shape.vip.unwrap_or_else(|| rng.percent(80).then(|| rng.below(VIPS_PER_FAMILY))) {
        Some(i) => vip(v6, i),
        None => loop {
            let a = random_addr(rng, v6);
            if !model.vips.contains(&a) {
                break a;
            }
        },
    };
    let src = random_addr(rng, v6);
    let icmp = if v6 { 58 } else { 1 };
    let proto = shape.proto.unwrap_or_else(|| match rng.below(100) {
        0..=44 => TCP,
        45..=81 => UDP,
        82..=89 => icmp,
        _ => rng.pick(&[0, 1, 4, 41, 47, 50, 58, 132, 255]),
    });
    let port = |rng: &mut Rng| if rng.percent(85) { rng.pick(&SERVICE_PORTS) } else { rng.u16() };
    let mut f = Frame::tcp(src, rng.u16(), dst, port(rng));
    f.proto = proto;
    rng.fill(&mut f.dst_mac);
    rng.fill(&mut f.src_mac);
    f.tcp_flags = match rng.below(10) {
        0..=5 => 0x02,
        6 => 0x10,
        7 => 0x04, // RST: closes pinned flows
        _ => rng.byte(),
    };
    f.ttl = rng.byte();
    if shape.vlan.unwrap_or_else(|| rng.percent(20)) {
        f.vlan = Some(rng.u16());
    }
    if shape.options.unwrap_or_else(|| rng.percent(6)) {
        f.ip_options = if v6 { 8 * rng.range(1, 8) } else { 4 * rng.range(1, 10) };
    }
    let fragment = shape.frag.unwrap_or_else(|| rng.percent(5));
    f.frag = match (v6, fragment) {
        (false, false) => rng.pick(&[0x4000, 0x4000, 0x4000, 0]),
        (false, true) => rng.pick(&[0x2000, 0x0001, 0x00b9, 0x3fff, 0x6000]),
        (true, false) => 0,
        (true, true) => rng.pick(&[0x0001, 0x0008, 0xfff9, 0x0100]),
    };
    let len = match rng.below(100) {
        0..=69 => rng.range(0, 64),
        70..=89 => rng.range(0, 600),
        _ => rng.range(1300, 1560),
    };
    f.payload = rng.bytes(len);
    let mut bytes = f.build();
    if v6 && shape.ext.unwrap_or_else(|| rng.percent(8)) {
        add_ipv6_ext_headers(rng, &mut bytes, f.l3_offset());
    }
    bytes
}

/// Puts 1..=6 hop-by-hop, routing or destination-options headers in front of the IPv6
/// packet's existing chain.
fn add_ipv6_ext_headers(rng: &mut Rng, f: &mut Vec<u8>, l3: usize) {
    let mut next = f[l3 + 6];
    let mut ext = Vec::new();
    for _ in 0..rng.range(1, 6) {
        let units = rng.below(3);
        let mut h = vec![0u8; (units + 1) * 8];
        h[0] = next;
        h[1] = units as u8;
        h[2] = 1; // PadN (routing: routing type 1, segments left (len - 4): harmless here)
        h[3] = (h.len() - 4) as u8;
        ext.splice(0..0, h);
        next = rng.pick(&[0, 43, 60]);
    }
    f[l3 + 6] = next;
    let payload = be16(f, l3 + 4) as usize + ext.len();
    f[l3 + 4..l3 + 6].copy_from_slice(&(payload as u16).to_be_bytes());
    f.splice(l3 + 40..l3 + 40, ext);
}

const INTERESTING16: [u16; 10] = [0, 1, 19, 20, 40, 0x7fff, 0x8000, 0xffeb, 0xffec, 0xffff];

/// Lengths that lie: IPv4 total length or IHL, IPv6 payload length, an extension header's length.
fn bogus_length(rng: &mut Rng, f: &mut [u8]) {
    let Some((l3, et)) = l3_of(f) else { return };
    let actual = f.len().saturating_sub(l3) as u16;
    let value = match rng.below(4) {
        0 => rng.pick(&INTERESTING16),
        1 => actual.wrapping_add(rng.range(1, 8) as u16),
        2 => actual.wrapping_sub(rng.range(1, 8) as u16),
        _ => rng.u16(),
    };
    match et {
        0x0800 if f.len() >= l3 + 20 => {
            if rng.percent(70) {
                f[l3 + 2..l3 + 4].copy_from_slice(&value.to_be_bytes());
            } else {
                f[l3] = 0x40 | (rng.byte() & 15);
            }
        }
        0x86dd if f.len() >= l3 + 40 => {
            if rng.percent(70) || f.len() < l3 + 42 {
                f[l3 + 4..l3 + 6].copy_from_slice(&value.wrapping_sub(40).to_be_bytes());
            } else {
                f[l3 + 41] = rng.byte();
            }
        }
        _ => {}
    }
}

fn flip_bits(rng: &mut Rng, f: &mut [u8]) {
    for _ in 0..rng.range(1, 8) {
        // Headers are where the decisions are: most flips land in the first 80 bytes.
        let span = if rng.percent(75) { f.len().min(80) } else { f.len() };
        let at = rng.below(span);
        if rng.percent(80) {
            f[at] ^= 1 << rng.below(8);
        } else {
            let any = rng.byte();
            f[at] = rng.pick(&[0, 1, 0x7f, 0x80, 0xff, any]);
        }
    }
}

fn cut(rng: &mut Rng, f: &mut Vec<u8>) {
    if f.len() > MIN_FRAME {
        let at = rng.range(MIN_FRAME, f.len() - 1);
        f.truncate(at);
    }
}

/// The IP packets of a valid frame wrapped once or twice more: IPIP, IPv6 in IPv4, IPv4 in
/// IPv6, IPv6 in IPv6, to a VIP or not.
fn nested(rng: &mut Rng, model: &Model) -> Vec<u8> {
    let inner = valid_frame(rng, model, ANY);
    let (l3, et) = l3_of(&inner).unwrap();
    let mut packet = inner[l3..].to_vec();
    let mut v6 = et == 0x86dd;
    for _ in 0..rng.range(1, 2) {
        let outer_v6 = rng.percent(40);
        let dst = if rng.percent(70) { vip(outer_v6, rng.below(VIPS_PER_FAMILY)) } else { random_addr(rng, outer_v6) };
        let src = random_addr(rng, outer_v6);
        let proto = if v6 { 41 } else { 4 };
        let mut h = Vec::with_capacity(40 + packet.len());
        if outer_v6 {
            h.extend_from_slice(&[0x60, 0, 0, 0]);
            h.extend_from_slice(&(packet.len() as u16).to_be_bytes());
            h.extend_from_slice(&[proto, 64]);
        } else {
            h.extend_from_slice(&[0x45, 0]);
            h.extend_from_slice(&((packet.len() + 20) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        }
        h.extend_from_slice(&octets(src));
        h.extend_from_slice(&octets(dst));
        if !outer_v6 {
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
        }
        h.extend_from_slice(&packet);
        packet = h;
        v6 = outer_v6;
    }
    let mut f = inner[..12].to_vec();
    if rng.percent(20) {
        f.extend_from_slice(&[0x81, 0, rng.byte(), rng.byte()]);
    }
    f.extend_from_slice(&if v6 { [0x86, 0xdd] } else { [0x08, 0x00] });
    f.extend_from_slice(&packet);
    f
}

/// A valid Ethernet header (maybe a VLAN tag) followed by random bytes, sometimes dressed up
/// with an IP version and a VIP destination so that they get past the first checks.
fn random_after_ethernet(rng: &mut Rng) -> Vec<u8> {
    let mut f = rng.bytes(12);
    let any = rng.u16();
    let mut et = rng.pick(&[0x0800u16, 0x0800, 0x86dd, 0x86dd, 0x8100, 0x0806, any]);
    if et == 0x8100 {
        f.extend_from_slice(&[0x81, 0, rng.byte(), rng.byte()]);
        let any = rng.u16();
        et = rng.pick(&[0x0800u16, 0x86dd, 0x8100, any]);
    }
    f.extend_from_slice(&et.to_be_bytes());
    let l3 = f.len();
    let n = if rng.percent(70) { rng.range(0, 120) } else { rng.range(0, 1500 - l3) };
    f.extend_from_slice(&rng.bytes(n));
    if rng.percent(60) {
        match et {
            0x0800 if f.len() >= l3 + 20 => {
                f[l3] = if rng.percent(70) { 0x45 } else { 0x40 | (rng.byte() & 15) };
                f[l3 + 16..l3 + 20].copy_from_slice(&octets(vip(false, rng.below(VIPS_PER_FAMILY))));
                if rng.percent(60) {
                    f[l3 + 6] &= 0x40; // no fragment
                    f[l3 + 9] = rng.pick(&[TCP, UDP]);
                }
            }
            0x86dd if f.len() >= l3 + 40 => {
                f[l3] = 0x60 | (f[l3] & 15);
                f[l3 + 24..l3 + 40].copy_from_slice(&octets(vip(true, rng.below(VIPS_PER_FAMILY))));
                if rng.percent(60) {
                    f[l3 + 6] = rng.pick(&[TCP, UDP, 0, 43, 60, 44]);
                }
            }
            _ => {}
        }
    }
    f
}

fn pure_random(rng: &mut Rng) -> Vec<u8> {
    let n = if rng.percent(50) { rng.range(MIN_FRAME, 100) } else { rng.range(MIN_FRAME, 1500) };
    let mut f = rng.bytes(n);
    if rng.percent(30) {
        let et = rng.pick(&[0x0800u16, 0x86dd, 0x8100]);
        f[12..14].copy_from_slice(&et.to_be_bytes());
    }
    f
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    SystematicCut,
    Valid,
    Replay,
    Cut,
    BitFlips,
    BogusLength,
    Stacked,
    Nested,
    RandomAfterEthernet,
    PureRandom,
}

/// Valid frames kept for replays: the same flows again (flow-table hits), or closed by a RST.
struct Recent(Vec<Vec<u8>>);

impl Recent {
    const SIZE: usize = 256;

    fn keep(&mut self, rng: &mut Rng, f: &[u8]) {
        if self.0.len() < Self::SIZE {
            self.0.push(f.to_vec());
        } else {
            let i = rng.below(Self::SIZE);
            self.0[i] = f.to_vec();
        }
    }

    fn replay(&self, rng: &mut Rng, model: &Model) -> Option<Vec<u8>> {
        let mut f = self.0.get(rng.below(self.0.len().max(1)))?.clone();
        if let Ok(flow) = model.flow(&f) {
            if flow.proto == TCP && rng.percent(30) {
                f[flow.l4 + 13] = rng.pick(&[0x04, 0x14, 0x10, 0x11]);
            }
        }
        Some(f)
    }
}

fn random_input(rng: &mut Rng, model: &Model, recent: &mut Recent) -> (Kind, Vec<u8>) {
    let kind = match rng.below(100) {
        0..=14 => Kind::Valid,
        15..=19 => Kind::Replay,
        20..=30 => Kind::Cut,
        31..=48 => Kind::BitFlips,
        49..=59 => Kind::BogusLength,
        60..=71 => Kind::Stacked,
        72..=79 => Kind::Nested,
        80..=91 => Kind::RandomAfterEthernet,
        _ => Kind::PureRandom,
    };
    let f = match kind {
        Kind::Valid => {
            let f = valid_frame(rng, model, ANY);
            recent.keep(rng, &f);
            f
        }
        Kind::Replay => recent.replay(rng, model).unwrap_or_else(|| valid_frame(rng, model, ANY)),
        Kind::Cut => {
            let mut f = valid_frame(rng, model, ANY);
            cut(rng, &mut f);
            f
        }
        Kind::BitFlips => {
            let mut f = valid_frame(rng, model, ANY);
            flip_bits(rng, &mut f);
            f
        }
        Kind::BogusLength => {
            let mut f = valid_frame(rng, model, ANY);
            bogus_length(rng, &mut f);
            f
        }
        Kind::Stacked => {
            let mut f = if rng.percent(80) { valid_frame(rng, model, ANY) } else { nested(rng, model) };
            for _ in 0..rng.range(2, 4) {
                match rng.below(5) {
                    0 => cut(rng, &mut f),
                    1 | 2 => flip_bits(rng, &mut f),
                    3 => bogus_length(rng, &mut f),
                    _ => {
                        // Trailing bytes, as Ethernet padding or garbage.
                        let extra = rng.range(1, 64);
                        f.extend_from_slice(&rng.bytes(extra));
                    }
                }
            }
            f
        }
        Kind::Nested => nested(rng, model),
        Kind::RandomAfterEthernet => random_after_ethernet(rng),
        // Systematic cuts are not drawn here.
        Kind::PureRandom | Kind::SystematicCut => pure_random(rng),
    };
    (kind, f)
}

/// A few frames of every family, protocol and header variant, cut at every offset.
fn systematic_seeds(rng: &mut Rng, model: &Model) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for v6 in [false, true] {
        for (vip_index, proto) in [(VIP_L2, TCP), (VIP_L2, UDP), (VIP_IPIP, TCP), (VIP_IPIP, UDP)] {
            for vlan in [false, true] {
                let shape = Shape {
                    v6: Some(v6),
                    vip: Some(Some(vip_index)),
                    proto: Some(proto),
                    vlan: Some(vlan),
                    options: Some(false),
                    frag: Some(false),
                    ext: Some(false),
                };
                seeds.push(valid_frame(rng, model, shape));
                seeds.push(valid_frame(rng, model, Shape { options: Some(true), ..shape }));
                seeds.push(valid_frame(rng, model, Shape { frag: Some(true), ..shape }));
                if v6 {
                    seeds.push(valid_frame(rng, model, Shape { ext: Some(true), ..shape }));
                }
            }
        }
        let icmp = if v6 { 58 } else { 1 };
        seeds.push(valid_frame(
            rng,
            model,
            Shape { v6: Some(v6), vip: Some(Some(VIP_IPIP)), proto: Some(icmp), ..ANY },
        ));
    }
    // Keep the long ones short: the interesting offsets are in the headers.
    for s in &mut seeds {
        s.truncate(200);
    }
    seeds
}

// ---------------------------------------------------------------------------------------------
// Running frames.
// ---------------------------------------------------------------------------------------------

struct Bed {
    dp: Dataplane,
    model: Model,
}

fn with_bed<R: Send + 'static>(f: impl FnOnce(&mut Bed) -> R + Send + 'static) -> R {
    let ns = Netns::new("fuzz").expect("network namespace (run as root)");
    set_up_links(&ns).expect("links, addresses, neighbours and routes");
    let result = ns
        .run(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let mut bed = Bed::new().expect("balancer loaded and configured");
                f(&mut bed)
            }))
        })
        .expect("the test thread in the namespace");
    // A failed assertion in `f` fails the test with its own message.
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl Bed {
    fn new() -> Result<Self> {
        let ifindex: Vec<u32> = (0..DEVS)
            .map(|i| if_index(&dev_name(i)).ok_or_else(|| anyhow!("no {}", dev_name(i))))
            .collect::<Result<_>>()?;
        let lb_mac = dev_mac(0);
        let mut dp = Dataplane::load(&LoadOptions {
            hash_seed: HASH_SEED,
            iface_mac: lb_mac,
            maglev_capacity: 2 * TABLE * 2 * SERVICES.len() as u32,
            flow_table_size: 1 << 16,
        })
        .context("load the balancer (run the tests as root)")?;
        let settings = settings();
        dp.set_settings(settings)?;
        for &dev in &TX_PORT_DEVS {
            dp.add_tx_port(ifindex[dev])?;
        }
        let mut model = Model {
            vips: HashSet::new(),
            services: HashMap::new(),
            backends: HashMap::new(),
            ingress: ifindex[0],
            tx_ports: TX_PORT_DEVS.iter().map(|&d| ifindex[d]).collect(),
            lb_mac,
            settings,
        };
        let (mut next_id, mut next_backend) = (0u32, 0u32);
        for v6 in [false, true] {
            for i in 0..VIPS_PER_FAMILY {
                model.vips.insert(vip(v6, i));
            }
            for (s, spec) in SERVICES.iter().enumerate() {
                let mut members = Vec::new();
                let backends: Vec<(IpAddr, [u8; 6], Hop)> = match spec.backends {
                    Backends::L2 => (0..3u8)
                        .map(|j| {
                            let addr = if v6 {
                                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11 + u16::from(j)))
                            } else {
                                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0x11 + j))
                            };
                            (addr, [0x02, 0xbe, 0, s as u8, v6 as u8, j], Hop::Unroutable)
                        })
                        .collect(),
                    Backends::Nets(nets) => nets
                        .iter()
                        .enumerate()
                        .map(|(j, &net)| {
                            let hop = match NETS[net] {
                                Path::Via { dev, neigh, mtu_lock } => Hop::Route {
                                    mtu: mtu_lock.unwrap_or(DEV_MTU),
                                    via: neigh.then(|| (ifindex[dev], dev_mac(dev), gw_mac(dev))),
                                },
                                Path::Blackhole | Path::NoRoute => Hop::Unroutable,
                            };
                            (net_addr(v6, net, (10 * s + j + 1) as u8), [0; 6], hop)
                        })
                        .collect(),
                    Backends::Empty => Vec::new(),
                };
                for (addr, mac, hop) in backends {
                    let id = next_backend;
                    next_backend += 1;
                    let l2 = matches!(spec.backends, Backends::L2);
                    dp.set_backend(id, addr, l2.then_some(mac), true)?;
                    let key = octets(addr).iter().fold(0u64, |k, &b| k.rotate_left(8) ^ u64::from(b));
                    members.push(Member { id, key, weight: 1 });
                    model.backends.insert(id, ModelBackend { addr, mac, hop });
                }
                let addr = vip(v6, spec.vip);
                let mut slot = dp.add_service(addr, spec.port, spec.proto, next_id, TABLE, spec.forward)?;
                let table =
                    if members.is_empty() { vec![NO_BACKEND; TABLE as usize] } else { maglev::build(&members, TABLE) };
                dp.publish_table(&mut slot, &table)?;
                let ipip = matches!(spec.forward, Forward::Ipip);
                model.services.insert((addr, spec.port, spec.proto), ModelService { id: next_id, ipip, table });
                next_id += 1;
            }
        }
        Ok(Self { dp, model })
    }
}

/// One BPF_PROG_TEST_RUN at a time, with buffers reused across frames.
struct Runner<'a> {
    prog: &'a mut Xdp,
    out: Vec<u8>,
    ingress: u32,
}

impl Runner<'_> {
    /// Runs one frame as if it had arrived on the ingress interface; returns the verdict and
    /// the output frame's length (the frame is in `self.out`).
    fn run(&mut self, frame: &[u8]) -> Result<(u32, usize)> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data = data_meta = 0 (no metadata), data_end = the
        // frame's length and no egress interface; the ingress one must exist in this namespace.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.ingress.to_ne_bytes());
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut self.out);
        opts.ctx_in = Some(&ctx);
        let result = self.prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        Ok((result.return_value, result.data_size_out as usize))
    }
}

/// Everything the run expects the counters to show.
#[derive(Default)]
struct Tally {
    frames: u64,
    /// Per reason: frames and output bytes (the reason counter counts the frame as it leaves).
    reasons: BTreeMap<u32, (u64, u64)>,
    verdicts: BTreeMap<u32, u64>,
    kinds: BTreeMap<Kind, BTreeMap<u32, u64>>,
    /// Per service and per backend id: frames and input bytes of forwarded frames.
    services: BTreeMap<u32, (u64, u64)>,
    backends: BTreeMap<u32, (u64, u64)>,
}

#[derive(Default)]
struct Failures {
    count: u64,
    by_kind: BTreeMap<String, u64>,
    examples: Vec<String>,
}

impl Failures {
    fn add(&mut self, what: String, detail: String) {
        self.count += 1;
        let n = self.by_kind.entry(what.clone()).or_default();
        *n += 1;
        if *n <= 3 && self.examples.len() < 40 {
            self.examples.push(format!("{what}\n{detail}"));
        }
    }
}

fn describe(index: u64, kind: Kind, f: &[u8], verdict: u32, out: &[u8], expect: &Expect) -> String {
    format!(
        "  frame #{index} ({kind:?}, {} bytes), verdict {verdict}, expected {} ({})\n  in  {}\n  out {}\n  exp {}",
        f.len(),
        expect.reason.name(),
        expect.reason.action(),
        hex_short(f),
        hex_short(out),
        hex_short(expect.out.as_deref().unwrap_or(f)),
    )
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace('_', "");
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

fn fuzz_seed() -> u64 {
    match std::env::var("XLB_FUZZ_SEED").as_deref() {
        Ok("random") => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        }
        Ok(_) => env_u64("XLB_FUZZ_SEED").expect("XLB_FUZZ_SEED: a number, 0x-hex, or `random`"),
        Err(_) => DEFAULT_SEED,
    }
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        0 => "ABORTED",
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        XDP_TX => "TX",
        XDP_REDIRECT => "REDIRECT",
        _ => "?",
    }
}

/// Reasons this set-up cannot produce, with why. Empty: every path is reachable here
/// (drop_adjust_failed through an IPv4 total length of 65516 or more without DF, to an
/// encapsulating service: the encapsulation's length overflows).
const UNREACHABLE: &[(Reason, &str)] = &[];

#[test]
fn a_million_random_and_mutated_frames_keep_every_property() {
    let seed = fuzz_seed();
    let frames = env_u64("XLB_FUZZ_FRAMES").unwrap_or(DEFAULT_FRAMES);
    eprintln!("fuzz: seed {seed:#x} (XLB_FUZZ_SEED), {frames} frames (XLB_FUZZ_FRAMES)");
    let report = with_bed(move |bed| fuzz(bed, seed, frames));
    eprintln!("{}", report.text);
    assert!(report.failures == 0, "{} frames broke a property (seed {seed:#x}); see above", report.failures);
}

struct Report {
    text: String,
    failures: u64,
}

fn fuzz(bed: &mut Bed, seed: u64, frames: u64) -> Report {
    let mut rng = Rng::new(seed);
    let before = bed.dp.reason_counters().expect("reason counters");
    let flows_before = bed.dp.flow_counters().expect("flow counters");
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut failures = Failures::default();
    let mut findings = Findings::default();
    let model = &bed.model;
    let mut runner = Runner { prog: bed.dp.balancer(), out: vec![0; 8192], ingress: model.ingress };

    let mut seeds = systematic_seeds(&mut rng, model);
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut recent = Recent(Vec::new());
    while tally.frames < frames {
        let (kind, input) = if let Some(f) = pending.pop() {
            (Kind::SystematicCut, f)
        } else if let Some(s) = seeds.pop() {
            pending = (MIN_FRAME..=s.len()).map(|n| s[..n].to_vec()).collect();
            continue;
        } else {
            random_input(&mut rng, model, &mut recent)
        };
        let index = tally.frames;
        tally.frames += 1;
        let (verdict, out_len) = match runner.run(&input) {
            Ok(r) => r,
            Err(e) => {
                failures.add(format!("BPF_PROG_TEST_RUN failed: {e:#}"), format!("  in  {}", hex_short(&input)));
                continue;
            }
        };
        let out = &runner.out[..out_len];
        let expect = model.predict(&input);
        if let Err(what) = check_properties(model, &input, verdict, out, &mut findings) {
            failures.add(format!("property: {what}"), describe(index, kind, &input, verdict, out, &expect));
        }
        if verdict != expect.reason.action() {
            let what = format!(
                "model: verdict {} where {} ({}) was expected",
                verdict_name(verdict),
                verdict_name(expect.reason.action()),
                expect.reason.name()
            );
            failures.add(what, describe(index, kind, &input, verdict, out, &expect));
        } else if out != expect.out.as_deref().unwrap_or(&input) {
            let what = format!("model: output differs ({})", expect.reason.name());
            failures.add(what, describe(index, kind, &input, verdict, out, &expect));
        }
        let r = tally.reasons.entry(expect.reason as u32).or_default();
        r.0 += 1;
        r.1 += out_len as u64;
        *tally.verdicts.entry(verdict).or_default() += 1;
        *tally.kinds.entry(kind).or_default().entry(verdict).or_default() += 1;
        if let Some((service, backend)) = expect.forwarded {
            for (map, id) in [(&mut tally.services, service), (&mut tally.backends, backend)] {
                let c = map.entry(id).or_default();
                c.0 += 1;
                c.1 += input.len() as u64;
            }
        }
    }
    let elapsed = started.elapsed();

    // The counters, once: every frame counted exactly once, under the predicted reason.
    let after = bed.dp.reason_counters().expect("reason counters");
    let flows_after = bed.dp.flow_counters().expect("flow counters");
    let mut text = format!(
        "fuzz: {} frames in {:.1} s ({:.0} frames/s), seed {seed:#x}\n\nreason                 frames(counter)  frames(model)   bytes(counter)\n",
        tally.frames,
        elapsed.as_secs_f64(),
        tally.frames as f64 / elapsed.as_secs_f64()
    );
    let mut counted = 0;
    for ((reason, b), (_, a)) in before.iter().zip(&after) {
        let (packets, bytes) = (a.packets - b.packets, a.bytes - b.bytes);
        counted += packets;
        let (want_packets, want_bytes) = tally.reasons.get(&(*reason as u32)).copied().unwrap_or_default();
        text += &format!("{:<22} {packets:>15}  {want_packets:>13}  {bytes:>15}\n", reason.name());
        if (packets, bytes) != (want_packets, want_bytes) {
            failures.add(
                format!("counter {} moved by {packets} frames / {bytes} bytes", reason.name()),
                format!("  the model expected {want_packets} frames / {want_bytes} bytes"),
            );
        }
        let unreachable = UNREACHABLE.iter().any(|(r, _)| r == reason);
        if packets == 0 && !unreachable && frames >= COVERAGE_MIN_FRAMES {
            failures.add(format!("reason {} never hit", reason.name()), String::new());
        }
    }
    if counted != tally.frames {
        failures.add(format!("counters sum to {counted}, {} frames were run", tally.frames), String::new());
    }
    for (id, &(packets, bytes)) in &tally.services {
        let c = bed.dp.service_counters(*id).expect("service counters");
        if (c.packets, c.bytes) != (packets, bytes) {
            failures.add(
                format!("service {id} counted {} frames / {} bytes", c.packets, c.bytes),
                format!("  the model expected {packets} / {bytes}"),
            );
        }
    }
    for (id, &(packets, bytes)) in &tally.backends {
        let c = bed.dp.backend_counters(*id).expect("backend counters");
        if (c.packets, c.bytes) != (packets, bytes) {
            failures.add(
                format!("backend {id} counted {} frames / {} bytes", c.packets, c.bytes),
                format!("  the model expected {packets} / {bytes}"),
            );
        }
    }
    text += "\nverdicts: ";
    for (v, n) in &tally.verdicts {
        text += &format!("{}={n} ", verdict_name(*v));
    }
    text += "\nflow events: ";
    for ((event, b), (_, a)) in flows_before.iter().zip(&flows_after) {
        text += &format!("{}={} ", event.name(), a - b);
    }
    text += "\nverdicts per input kind:\n";
    for (kind, verdicts) in &tally.kinds {
        let total: u64 = verdicts.values().sum();
        text += &format!("  {:<20} {total:>8}:", format!("{kind:?}"));
        for (v, n) in verdicts {
            text += &format!(" {}={n}", verdict_name(*v));
        }
        text += "\n";
    }
    text += &format!(
        "\n{} encapsulated frames carried bytes after the inner packet (padding; not a finding)\n",
        findings.trailing_bytes
    );
    text += "\nfindings (counted, tolerated unless XLB_FUZZ_STRICT=1; reproducers: the ignored tests):\n";
    if findings.seen.is_empty() {
        text += "  none\n";
    }
    for (finding, (n, _, shortest)) in &findings.seen {
        text += &format!("  {n:>8}  {}\n  shortest example:\n{shortest}\n", finding.describe());
    }
    if failures.count > 0 {
        text += &format!("\n{} FAILURES by kind:\n", failures.count);
        for (what, n) in &failures.by_kind {
            text += &format!("  {n:>8}  {what}\n");
        }
        text += "\nexamples:\n";
        for e in &failures.examples {
            text += &format!("{e}\n");
        }
    }
    Report { text, failures: failures.count }
}

// ---------------------------------------------------------------------------------------------
// Reproducers: regression tests of fixed bugs, and the findings, ignored until the data path
// is fixed (each asserts the correct behaviour and fails today).
// ---------------------------------------------------------------------------------------------

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The backend net a service's flow from `sport` lands in, by the model.
fn landing_net(model: &Model, f: &[u8]) -> Option<usize> {
    let (_, backend) = model.predict(f).forwarded?;
    match model.backends[&backend].addr {
        IpAddr::V4(a) => Some(usize::from(a.octets()[2])),
        IpAddr::V6(a) => Some(usize::from(a.segments()[2])),
    }
}

/// A minimal TCP SYN (or UDP datagram) from a client to `dst`, addressed to the balancer's MAC,
/// whose flow lands on a backend in `net` (None: any).
fn minimal_frame(model: &Model, src: IpAddr, dst: IpAddr, proto: u8, dport: u16, net: Option<usize>) -> Frame {
    (40_000..u16::MAX)
        .map(|sport| {
            let mut f = Frame::tcp(src, sport, dst, dport).payload(Vec::new());
            f.proto = proto;
            f.dst_mac = dev_mac(0);
            f.src_mac = CLIENT_MAC;
            f
        })
        .find(|f| net.is_none() || landing_net(model, &f.build()) == net)
        .expect("a source port whose flow lands in the net")
}

fn run_one(bed: &mut Bed, frame: &[u8]) -> (u32, Vec<u8>) {
    let ingress = bed.model.ingress;
    let mut runner = Runner { prog: bed.dp.balancer(), out: vec![0; 8192], ingress };
    let (verdict, n) = runner.run(frame).expect("BPF_PROG_TEST_RUN");
    (verdict, runner.out[..n].to_vec())
}

const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

/// Regression test of a bug this fuzz test found: lb-ebpf/src/balancer.rs forward_encap, on
/// `Route::NoNeighbour` (and on `Route::TooBig` without DF, turned into NoNeighbour), returned
/// pass_no_neighbour after encap::grow_head, which moved only the EtherType/VLAN tag to the new
/// front: the 12 bytes of MACs were whatever the headroom held (zeros under BPF_PROG_TEST_RUN,
/// stale bytes on a NIC). On `Route::Via` to an interface missing from TX_PORTS the MACs were
/// the next hop's. Either way the frame reached the stack on the ingress interface addressed to
/// another host: eth_type_trans made it PACKET_OTHERHOST and ip_rcv_core dropped it, so the
/// stack never forwarded it (nor resolved the neighbour). Fixed by moving the whole L2 header
/// (encap.rs move_l2) and restoring the received MACs before passing.
#[test]
fn encapsulated_frames_handed_to_the_stack_keep_their_mac_header() {
    with_bed(|bed| {
        let m = &bed.model;
        let (c4, c6) = (IpAddr::V4(CLIENT4), IpAddr::V6(CLIENT6));
        // UDP 53 on the encapsulating VIP goes to net 1, whose route MTU is 1400: a 1400-byte
        // payload without DF is too big, and the stack is to fragment it.
        let mut too_big = minimal_frame(m, c4, vip(false, VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]);
        too_big.frag = 0;
        let cases = [
            ("IPv4, too big without DF", too_big.build()),
            (
                "IPv4, next hop without neighbour entry",
                minimal_frame(m, c4, vip(false, VIP_IPIP), TCP, 443, Some(2)).build(),
            ),
            (
                "IPv4, egress interface not in TX_PORTS",
                minimal_frame(m, c4, vip(false, VIP_IPIP), TCP, 443, Some(6)).build(),
            ),
            (
                "IPv6, next hop without neighbour entry",
                minimal_frame(m, c6, vip(true, VIP_IPIP), TCP, 443, Some(2)).build(),
            ),
        ];
        let mut wrong = Vec::new();
        for (name, frame) in cases {
            assert_eq!(bed.model.predict(&frame).reason, Reason::PassNoNeighbour, "{name}");
            let (verdict, out) = run_one(bed, &frame);
            assert_eq!(verdict, XDP_PASS, "{name}");
            if out[..12] != frame[..12] {
                wrong.push(format!(
                    "{name}: MACs {} became {}\n  in  {}\n  out {}",
                    hex(&frame[..12]),
                    hex(&out[..12]),
                    hex(&frame[..frame.len().min(80)]),
                    hex(&out[..out.len().min(100)])
                ));
            }
        }
        assert!(wrong.is_empty(), "passed to the stack without their MAC header:\n{}", wrong.join("\n"));
    });
}

/// The same bug end to end, in native and generic mode: a client sends through the balancer
/// to encapsulating services whose next hop has no neighbour entry, or that leave through an
/// interface missing from TX_PORTS. The stack must forward both (IpForwDatagrams), as it
/// forwards a datagram routed through the host without the balancer. With the bug it dropped
/// them as PACKET_OTHERHOST (`ip -s -s link` counts them under "otherhost").
#[test]
fn pass_no_neighbour_frames_are_forwarded_by_the_stack_end_to_end() {
    use lb_agent::config::XdpMode;
    let mut forwarded = Vec::new();
    for mode in [XdpMode::Generic, XdpMode::Native] {
        let lb = Netns::new("lb").unwrap();
        let cl = Netns::new("cl").unwrap();
        let lb_mac = mac_text(dev_mac(0));
        let peer_mac = mac_text(gw_mac(1));
        for cmd in [
            &["ip", "link", "add", "lb0", "address", &lb_mac, "type", "veth", "peer", "name", "cl0", "netns", &cl.name]
                [..],
            &["ip", "addr", "add", "10.0.0.2/24", "dev", "lb0"],
            &["ip", "link", "set", "lb0", "up"],
            &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            // Backend nets: one behind a gateway that does not answer ARP, one out of lb1.
            &["ip", "route", "add", "10.200.2.0/24", "via", "10.0.0.253", "dev", "lb0"],
            &["ip", "link", "add", "lb1", "type", "veth", "peer", "name", "lb1p"],
            &["ip", "link", "set", "lb1", "up"],
            &["ip", "link", "set", "lb1p", "up"],
            &["ip", "addr", "add", "10.1.0.2/24", "dev", "lb1"],
            &["ip", "neigh", "add", "10.1.0.254", "lladdr", &peer_mac, "dev", "lb1", "nud", "permanent"],
            &["ip", "route", "add", "10.200.6.0/24", "via", "10.1.0.254", "dev", "lb1"],
            // The control: routed through the host without the balancer.
            &["ip", "route", "add", "10.200.3.0/24", "via", "10.1.0.254", "dev", "lb1"],
        ] {
            lb.exec(cmd).unwrap();
        }
        cl.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "cl0"]).unwrap();
        cl.exec(&["ip", "link", "set", "cl0", "up"]).unwrap();
        cl.exec(&["ip", "route", "add", "10.0.0.0/8", "via", "10.0.0.2"]).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let balancer = lb
            .spawn(move || {
                let mut dp = Dataplane::load(&LoadOptions {
                    hash_seed: 1,
                    iface_mac: dev_mac(0),
                    maglev_capacity: 4 * TABLE,
                    flow_table_size: 1024,
                })
                .unwrap();
                dp.set_settings(settings()).unwrap();
                for (id, (port, backend)) in [(53, "10.200.2.1"), (54, "10.200.6.1")].into_iter().enumerate() {
                    let id = id as u32;
                    dp.set_backend(id, backend.parse().unwrap(), None, true).unwrap();
                    let mut slot =
                        dp.add_service("10.99.0.2".parse().unwrap(), port, UDP, id, TABLE, Forward::Ipip).unwrap();
                    dp.publish_table(&mut slot, &vec![id; TABLE as usize]).unwrap();
                }
                dp.attach("lb0", Some(mode)).unwrap();
                ready_tx.send(()).unwrap();
                done_rx.recv().unwrap();
                dp.reason_counters().unwrap()[Reason::PassNoNeighbour as usize].1.packets
            })
            .unwrap();
        ready_rx.recv().unwrap();
        cl.run(|| {
            let s = std::net::UdpSocket::bind("10.0.0.1:0").unwrap();
            s.send_to(b"control", "10.200.3.1:53").unwrap();
            s.send_to(b"no neighbour", "10.99.0.2:53").unwrap();
            s.send_to(b"not in TX_PORTS", "10.99.0.2:54").unwrap();
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let nstat = lb.exec(&["nstat", "-asz", "IpForwDatagrams"]).unwrap();
        let link = lb.exec(&["ip", "-s", "-s", "link", "show", "lb0"]).unwrap();
        done_tx.send(()).unwrap();
        let passed = balancer.join().unwrap();
        assert_eq!(passed, 2, "{mode:?}: both balanced datagrams are pass_no_neighbour");
        let text = String::from_utf8_lossy(&nstat.stdout);
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("IpForwDatagrams"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        forwarded.push((mode, n, String::from_utf8_lossy(&link.stdout).into_owned()));
    }
    assert!(
        forwarded.iter().all(|(_, n, _)| *n == 3),
        "the stack forwarded fewer than 3 datagrams (the control and the two pass_no_neighbour ones); \
         see \"otherhost\" on lb0: {forwarded:#?}"
    );
}

/// Findings `OuterLengthBeyondFrame` and `LargerThanEgressMtu`. lb-ebpf/src/balancer.rs takes
/// `ip_len` from the header (ipv4_packet, line ~100: `tot_len`; ipv6_packet, ~124-129:
/// `payload_len + 40`) and never compares it with the bytes the frame holds; forward_encap
/// gives it to bpf_fib_lookup as the packet's length (~174-181: the MTU check) and encap.rs
/// writes it as the outer length (~92, ~111). A header claiming more than the frame holds is
/// sent on with an outer header that claims bytes it does not carry (the backend drops it as
/// truncated); one claiming less passes the MTU check with a frame that does not fit and is
/// sent out anyway (the next link drops it) instead of being answered with ICMP. By the data
/// path's own rule (pass_malformed: "IP header cut short or inconsistent: the stack judges it")
/// a length beyond the frame should pass to the stack; trailing bytes (Ethernet padding) are
/// harmless, but must count in the MTU check, or be trimmed.
#[test]
#[ignore = "data-path bug: the encapsulation trusts the inner IP length field (balancer.rs ipv4_packet/ipv6_packet)"]
fn encapsulation_follows_the_frame_length_not_the_length_field() {
    with_bed(|bed| {
        let m = &bed.model;
        let (c4, c6) = (IpAddr::V4(CLIENT4), IpAddr::V6(CLIENT6));
        let mut claims_more = minimal_frame(m, c4, vip(false, VIP_IPIP), TCP, 80, None).build();
        let l3 = 14;
        let n = be16(&claims_more, l3 + 2) + 100;
        claims_more[l3 + 2..l3 + 4].copy_from_slice(&n.to_be_bytes());
        let c = checksum(&{
            let mut h = claims_more[l3..l3 + 20].to_vec();
            h[10..12].copy_from_slice(&[0, 0]);
            h
        });
        claims_more[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        let mut claims_more6 = minimal_frame(m, c6, vip(true, VIP_IPIP), TCP, 80, None).build();
        let n = be16(&claims_more6, l3 + 4) + 100;
        claims_more6[l3 + 4..l3 + 6].copy_from_slice(&n.to_be_bytes());
        // 1400 bytes of UDP payload to net 1 (route MTU 1400) with DF: too big once encapsulated,
        // unless the header claims 100 bytes in all.
        let mut claims_less = minimal_frame(m, c4, vip(false, VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]).build();
        claims_less[l3 + 2..l3 + 4].copy_from_slice(&100u16.to_be_bytes());
        let c = checksum(&{
            let mut h = claims_less[l3..l3 + 20].to_vec();
            h[10..12].copy_from_slice(&[0, 0]);
            h
        });
        claims_less[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        let mut wrong = Vec::new();
        for (name, frame) in [
            ("IPv4 total length 100 beyond the frame", claims_more),
            ("IPv6 payload length 100 beyond the frame", claims_more6),
            ("IPv4 total length 100, 1428 bytes carried, route MTU 1400", claims_less),
        ] {
            let (verdict, out) = run_one(bed, &frame);
            if !matches!(verdict, XDP_TX | XDP_REDIRECT) || out.len() == frame.len() {
                continue;
            }
            let (carried, outer) = if frame[12..14] == [0x08, 0] {
                (out.len() - 14, usize::from(be16(&out, 14 + 2)))
            } else {
                (out.len() - 14, usize::from(be16(&out, 14 + 4)) + 40)
            };
            let mtu = bed.model.route_mtu(if frame[12..14] == [0x08, 0] { ip4(&out[30..]) } else { ip6(&out[38..]) });
            if outer > carried || mtu.is_some_and(|mtu| carried > usize::from(mtu)) {
                wrong.push(format!(
                    "{name}: verdict {}, outer length {outer}, {carried} bytes carried, route MTU {mtu:?}\n  in  {}",
                    verdict_name(verdict),
                    hex(&frame[..frame.len().min(80)])
                ));
            }
        }
        assert!(wrong.is_empty(), "encapsulated by the length field:\n{}", wrong.join("\n"));
    });
}

/// Finding `IcmpErrorToNonUnicastSource`. lb-ebpf/src/balancer.rs too_big (~224) and
/// icmp.rs too_big_v4 (~43) / too_big_v6 (~61) answer whatever source the packet carries:
/// RFC 1122 3.2.2 (IPv4) and RFC 4443 2.4 (e.5) (IPv6) forbid ICMP errors to a source that is
/// no single host (0.0.0.0/8, 127/8, multicast, class E and broadcast; ::, ff00::/8). A
/// spoofed source makes the balancer emit such packets (back to the sender's MAC); the answer
/// should be a drop.
#[test]
#[ignore = "data-path bug: ICMP too-big answers to multicast/broadcast/unspecified sources (icmp.rs)"]
fn no_icmp_error_to_a_source_that_is_not_one_host() {
    with_bed(|bed| {
        let mut wrong = Vec::new();
        let sources: [IpAddr; 7] = [
            Ipv4Addr::new(0, 0, 0, 0).into(),
            Ipv4Addr::new(127, 0, 0, 1).into(),
            Ipv4Addr::new(224, 0, 0, 1).into(),
            Ipv4Addr::new(240, 0, 0, 1).into(),
            Ipv4Addr::new(255, 255, 255, 255).into(),
            Ipv6Addr::UNSPECIFIED.into(),
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).into(),
        ];
        for src in sources {
            // UDP 53 on the encapsulating VIP: net 1, route MTU 1400; DF (IPv6: always).
            let f = minimal_frame(&bed.model, src, vip(src.is_ipv6(), VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]);
            let frame = f.build();
            let (verdict, out) = run_one(bed, &frame);
            if verdict == XDP_TX {
                wrong.push(format!("from {src}: {}", hex(&out[..out.len().min(60)])));
            }
        }
        assert!(wrong.is_empty(), "ICMP errors sent to sources that are no single host:\n{}", wrong.join("\n"));
    });
}
