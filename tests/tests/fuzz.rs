//! Fuzz and property test of the XDP programs: at least a million random and mutated frames
//! through BPF_PROG_TEST_RUN for each of the balancer and the decapsulator, each checked against
//! properties that hold whatever the input, and against an independent model of the program
//! (verdict, reason and the exact output frame). The counters are read once, at the end: every
//! frame must have been counted exactly once, under the reason the model predicted. Needs root
//! (CAP_BPF, CAP_NET_ADMIN).
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
//! 1,000,000, per program), `XLB_FUZZ_STRICT=0` counts the findings (see `Finding`) instead of
//! failing on them (they fail by default).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{anyhow, Context as _, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{
    config::Forward,
    dataplane::{map_addr, Dataplane, LoadOptions},
    decap::Decap,
    sys::if_index,
    tables::maglev::{self, Member},
};
use lb_common::{addr_v6, hash::flow_hash, reason::DecapReason, Reason, Settings, NO_BACKEND};
use xlb_tests::{
    netns::Netns,
    packet::{checksum, Frame},
    rng::Rng,
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

const DROP_TOO_BIG_BAD_SOURCE: Reason = Reason::DropTooBigBadSource;

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
    /// The length the IP header claims (IPv6: payload length + 40): covers the IP and
    /// transport headers and ends inside the frame.
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
        let ip_len = claimed_length(f, l3, l4, proto, usize::from(be16(f, l3 + 2)))?;
        Ok(Flow {
            l3,
            l4,
            v6: false,
            src: ip4(&f[l3 + 12..]),
            dst,
            ports,
            proto,
            ip_len,
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
        let ip_len = claimed_length(f, l3, off, proto, usize::from(be16(f, l3 + 4)) + 40)?;
        Ok(Flow {
            l3,
            l4: off,
            v6: true,
            src: ip6(&f[l3 + 8..]),
            dst,
            ports,
            proto,
            ip_len,
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
        let grow = if flow.v6 { 40 } else { 20 };
        // The outer header declares the inner packet by its length field; the bytes after it
        // (padding) travel too, so the MTU is checked against the whole frame's IP part.
        let outer_len = usize::from(flow.ip_len) + grow;
        let on_wire = f.len() - flow.l3 + grow;
        if on_wire > usize::from(mtu) {
            if outer_len <= usize::from(mtu) || !flow.df {
                // Too big only by its padding (the stack trims it and forwards the rest), or
                // to be fragmented: the kernel's stack forwards it.
                via = None;
            } else if !single_host(flow.src) {
                // No ICMP error may go to a source that is no single host.
                return Expect::same(DROP_TOO_BIG_BAD_SOURCE);
            } else {
                return Expect { reason: Reason::TxTooBig, out: Some(self.too_big(f, flow, mtu)), forwarded: None };
            }
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

/// The IP length field (`ip_len`, IP header included) of a TCP/UDP packet at `l3` whose
/// transport header is at `l4`, if it covers that header and ends inside the frame; else the
/// packet is cut short: drop_truncated_l4.
fn claimed_length(f: &[u8], l3: usize, l4: usize, proto: u8, ip_len: usize) -> Result<u16, Reason> {
    let l4_header = if proto == TCP { 20 } else { 8 };
    if ip_len < l4 - l3 + l4_header || l3 + ip_len > f.len() {
        return Err(Reason::DropTruncatedL4);
    }
    Ok(ip_len as u16)
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

/// Data-path findings: failures, unless `XLB_FUZZ_STRICT=0` only counts them. Each was a bug of
/// the balancer this test found; each has a regression test at the end of this file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Finding {
    /// The outer header claims more bytes than the frame carries. Was: the encapsulation
    /// trusted an inner length field that ran past the frame (now drop_truncated_l4).
    OuterLengthBeyondFrame,
    /// An encapsulated frame sent out (TX/REDIRECT) larger than the egress route's MTU. Was:
    /// the MTU check used the inner length field, which may claim less than the frame carries.
    LargerThanEgressMtu,
    /// An ICMP error to a source that is no single host (RFC 1122 3.2.2, RFC 4443 2.4 (e)).
    /// Was: answered whatever the source (now dropped).
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
        let claimed = usize::from(be16(f, l2 + 4)) + 40 + 40;
        (usize::from(be16(h, 4)) + 40, claimed, ip6(&h[24..]))
    };
    let Some(mtu) = model.route_mtu(dst) else {
        return Err(format!("encapsulated to {dst}, which is no routable backend"));
    };
    // The inner packet is what its length field says; bytes after it are padding.
    if outer_len != claimed {
        return Err(format!("outer length {outer_len}, not the {claimed} the inner length field claims"));
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
/// broadcast, multicast or class E source; RFC 4443 2.4 (e): not to the unspecified or a
/// multicast source; nor to ::1, which names no host on the wire, RFC 4291 2.5.3).
fn single_host(src: IpAddr) -> bool {
    match src {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] != 0 && o[0] != 127 && o[0] < 224
        }
        IpAddr::V6(a) => !a.is_unspecified() && !a.is_multicast() && !a.is_loopback(),
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
    std::env::var("XLB_FUZZ_STRICT").map_or(true, |v| v != "0")
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
// Inputs: valid frames from the builder, drawn with the seeded PRNG (rng.rs), and mutations.
// ---------------------------------------------------------------------------------------------

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

/// Sources that are no single host, which no ICMP error may answer.
const NOT_ONE_HOST: [IpAddr; 10] = [
    IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
    IpAddr::V4(Ipv4Addr::new(0, 1, 2, 3)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(240, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)),
    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x101)),
];

/// A client address: random, now and then one that is no single host.
fn random_source(rng: &mut Rng, v6: bool) -> IpAddr {
    if rng.percent(4) {
        let mut choices = NOT_ONE_HOST.iter().filter(|a| a.is_ipv6() == v6);
        let n = choices.clone().count();
        return *choices.nth(rng.below(n)).unwrap();
    }
    random_addr(rng, v6)
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
    let src = random_source(rng, v6);
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
    /// Appends the failures, by kind and with examples, to a report (nothing when none).
    fn render(&self, text: &mut String) {
        if self.count == 0 {
            return;
        }
        *text += &format!("\n{} FAILURES by kind:\n", self.count);
        for (what, n) in &self.by_kind {
            *text += &format!("  {n:>8}  {what}\n");
        }
        *text += "\nexamples:\n";
        for e in &self.examples {
            *text += &format!("{e}\n");
        }
    }

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

/// Reasons this set-up cannot produce, with why.
const UNREACHABLE: &[(Reason, &str)] = &[(
    Reason::DropAdjustFailed,
    "bpf_xdp_adjust_head/tail fail only without headroom (BPF_PROG_TEST_RUN always gives 256 bytes) \
     or below an Ethernet header; an outer length can no longer overflow (a length field past the \
     frame is drop_truncated_l4)",
)];

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
    text += "\nfindings (failures unless XLB_FUZZ_STRICT=0; regression tests at the end of fuzz.rs):\n";
    if findings.seen.is_empty() {
        text += "  none\n";
    }
    for (finding, (n, _, shortest)) in &findings.seen {
        text += &format!("  {n:>8}  {}\n  shortest example:\n{shortest}\n", finding.describe());
    }
    failures.render(&mut text);
    Report { text, failures: failures.count }
}

// ---------------------------------------------------------------------------------------------
// The decapsulator (xlb_decap, lb_agent::decap::Decap): the backend side of L3 DSR, on its own
// million frames. Properties: the verdict is always XDP_PASS; a frame that is not IPIP/IP6IP6 to
// an accepted address comes out untouched; a decapsulated frame is the inner packet behind the
// frame's own L2 header (MACs, VLAN tag), with at most a congestion mark carried over (RFC 6040);
// exactly one header is stripped (nested encapsulation stays nested once); the balancer's own
// encapsulated output decapsulates to the frame it was given; every frame is counted once, under
// the reason an independent model predicts.
// ---------------------------------------------------------------------------------------------

/// What the decapsulator must do with a frame.
struct DecapModel {
    /// The addresses it accepts, sorted (drawn from by index: deterministic).
    accepted: Vec<IpAddr>,
}

impl DecapModel {
    /// The balancer's encapsulation backends, so that its output can be fed to the decapsulator.
    fn new(model: &Model) -> Self {
        let mut accepted: Vec<IpAddr> = model
            .backends
            .values()
            .filter(|b| matches!(b.hop, Hop::Route { .. }))
            .map(|b| b.addr)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        accepted.sort();
        Self { accepted }
    }

    fn accepts(&self, a: IpAddr) -> bool {
        self.accepted.binary_search(&a).is_ok()
    }

    /// The reason, and the output frame when it changes (None: the input, untouched).
    fn predict(&self, f: &[u8]) -> (DecapReason, Option<Vec<u8>>) {
        use DecapReason::*;
        let Some((l3, et)) = l3_of(f) else { return (PassMalformed, None) };
        let (v6, hdr) = match et {
            0x0800 => (false, 20),
            0x86dd => (true, 40),
            _ => return (PassNotEncap, None),
        };
        if f.len() < l3 + hdr {
            return (PassMalformed, None);
        }
        let o = &f[l3..];
        // Only what the balancer writes is stripped: IPv4 protocol 4 without options and not a
        // fragment, IPv6 next header 41 (outer extension headers are not walked), to us, in
        // front of a whole header of the same family whose length agrees with the outer one.
        let reason = if !v6 {
            if o[9] != 4 {
                PassNotEncap
            } else if o[0] != 0x45 {
                PassMalformed
            } else if be16(o, 6) & 0x3fff != 0 {
                PassNotEncap
            } else if !self.accepts(ip4(&o[16..])) {
                PassNotForUs
            } else if o.len() < 40
                || o[20] >> 4 != 4
                || o[20] & 15 < 5
                || usize::from(be16(o, 2)) != usize::from(be16(o, 22)) + 20
            {
                PassMalformed // no whole inner IPv4 header, or lengths that disagree
            } else {
                Decapsulated
            }
        } else if o[6] != 41 {
            PassNotEncap
        } else if o[0] >> 4 != 6 {
            PassMalformed
        } else if !self.accepts(ip6(&o[24..])) {
            PassNotForUs
        } else if o.len() < 80 || o[40] >> 4 != 6 || usize::from(be16(o, 4)) != usize::from(be16(o, 44)) + 40 {
            PassMalformed // no whole inner IPv6 header, or lengths that disagree
        } else {
            Decapsulated
        };
        if reason != Decapsulated {
            return (reason, None);
        }
        let mut out = f[..l3].to_vec();
        out.extend_from_slice(&o[hdr..]);
        // RFC 6040: a congestion mark on the outer header reaches an ECN-capable inner packet.
        if !v6 && o[1] & 3 == 3 && out[l3 + 1] & 3 != 0 {
            let old = be16(&out, l3);
            out[l3 + 1] |= 3;
            let new = be16(&out, l3);
            let c = checksum_update(be16(&out, l3 + 10), old, new);
            out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else if v6 && (o[1] >> 4) & 3 == 3 && (out[l3 + 1] >> 4) & 3 != 0 {
            out[l3 + 1] |= 0x30;
        }
        (Decapsulated, Some(out))
    }
}

/// The header checksum `hc` after one 16-bit word went from `old` to `new` (RFC 1624, eqn. 3:
/// HC' = ~(~HC + ~m + m')).
fn checksum_update(hc: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Properties of one decapsulator run, whatever the model says: XDP_PASS always; untouched
/// unless IPIP/IP6IP6 to an accepted address; else exactly one header gone, the L2 header kept,
/// the inner packet byte for byte but for a congestion mark the outer header carried.
fn check_decap_properties(dm: &DecapModel, f: &[u8], verdict: u32, out: &[u8]) -> Result<(), String> {
    if verdict != XDP_PASS {
        return Err(format!("verdict {} is not PASS", verdict_name(verdict)));
    }
    if out == f {
        return Ok(());
    }
    let (l3, et) = l3_of(f).ok_or("changed a frame cut inside its VLAN tag")?;
    let (hdr, to_us) = match et {
        0x0800 if f.len() >= l3 + 20 => (20, f[l3 + 9] == 4 && dm.accepts(ip4(&f[l3 + 16..]))),
        0x86dd if f.len() >= l3 + 40 => (40, f[l3 + 6] == 41 && dm.accepts(ip6(&f[l3 + 24..]))),
        _ => return Err("changed a frame that is not IP (or cut inside its IP header)".into()),
    };
    if !to_us {
        return Err("changed a frame that is not IPIP/IP6IP6 to an accepted address".into());
    }
    if out.len() + hdr != f.len() {
        return Err(format!(
            "the frame shrank by {} bytes, not by one {hdr}-byte header",
            f.len() as isize - out.len() as isize
        ));
    }
    if out[..l3] != f[..l3] {
        return Err("the L2 header (MACs, VLAN tag, EtherType) changed".into());
    }
    let (inner, got) = (&f[l3 + hdr..], &out[l3..]);
    let outer_ce = if hdr == 20 { f[l3 + 1] & 3 == 3 } else { (f[l3 + 1] >> 4) & 3 == 3 };
    // Bytes a congestion mark may change: IPv4 TOS and header checksum, IPv6 traffic class.
    let marked: &[usize] = if inner.len() >= 12 && inner[0] >> 4 == 4 {
        &[1, 10, 11]
    } else if inner.len() >= 2 && inner[0] >> 4 == 6 {
        &[1]
    } else {
        &[]
    };
    for (i, (a, b)) in inner.iter().zip(got).enumerate() {
        if a != b && !(outer_ce && marked.contains(&i)) {
            return Err(format!("inner packet byte {i} changed ({a:#04x} -> {b:#04x})"));
        }
    }
    if got != inner {
        let inner_v4 = inner[0] >> 4 == 4;
        let ecn = |p: &[u8]| if inner_v4 { p[1] & 3 } else { (p[1] >> 4) & 3 };
        let (before, after) = (ecn(inner), ecn(got));
        if before == 0 || after != 3 {
            return Err(format!("ECN {before:#04b} -> {after:#04b}: only ECT becomes CE (RFC 6040)"));
        }
        let mask: u8 = if inner_v4 { 0xfc } else { 0xcf };
        if inner[1] & mask != got[1] & mask {
            return Err("the congestion mark changed more than the ECN bits".into());
        }
        if inner_v4 {
            let ihl = usize::from(inner[0] & 15) * 4;
            if inner.len() >= ihl && checksum(&inner[..ihl]) == 0 && checksum(&got[..ihl]) != 0 {
                return Err("the congestion mark broke the inner header checksum".into());
            }
        }
    }
    Ok(())
}

/// `packet` behind an outer IPv4 or IPv6 header with protocol/next header `proto`, from `src` to
/// `dst` (of the outer family), TOS/traffic class `tos`, IPv4 flags and offset `frag`; lengths
/// and checksum right.
fn ip_wrap(packet: &[u8], proto: u8, src: IpAddr, dst: IpAddr, tos: u8, frag: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(40 + packet.len());
    if src.is_ipv6() {
        h.extend_from_slice(&[0x60 | (tos >> 4), tos << 4, 0x12, 0x34]);
        h.extend_from_slice(&(packet.len() as u16).to_be_bytes());
        h.extend_from_slice(&[proto, 64]);
    } else {
        h.extend_from_slice(&[0x45, tos]);
        h.extend_from_slice(&((packet.len() + 20) as u16).to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0]);
    }
    h.extend_from_slice(&octets(src));
    h.extend_from_slice(&octets(dst));
    if src.is_ipv4() {
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }
    h.extend_from_slice(packet);
    h
}

/// An outer destination: mostly an accepted address, else one of the other family with the
/// same bytes, or any.
fn decap_dst(rng: &mut Rng, dm: &DecapModel, v6: bool) -> IpAddr {
    let ours: Vec<IpAddr> = dm.accepted.iter().copied().filter(|a| a.is_ipv6() == v6).collect();
    match rng.below(10) {
        0..=5 => ours[rng.below(ours.len())],
        6 => {
            let theirs: Vec<IpAddr> = dm.accepted.iter().copied().filter(|a| a.is_ipv6() != v6).collect();
            match theirs[rng.below(theirs.len())] {
                IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
                IpAddr::V6(a) => {
                    let o = a.octets();
                    IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
                }
            }
        }
        _ => random_addr(rng, v6),
    }
}

/// A random TOS / traffic class on the IP header of `f` (IPv4: checksum redone).
fn set_random_tos(rng: &mut Rng, f: &mut [u8]) {
    let Some((l3, et)) = l3_of(f) else { return };
    let tos = if rng.percent(50) { rng.pick(&[1, 2, 3]) } else { rng.byte() };
    if et == 0x0800 && f.len() >= l3 + 20 && f[l3] & 15 >= 5 && f.len() >= l3 + usize::from(f[l3] & 15) * 4 {
        let ihl = usize::from(f[l3] & 15) * 4;
        f[l3 + 1] = tos;
        f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = checksum(&f[l3..l3 + ihl]);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    } else if et == 0x86dd && f.len() >= l3 + 2 {
        f[l3] = (f[l3] & 0xf0) | (tos >> 4);
        f[l3 + 1] = (f[l3 + 1] & 0x0f) | (tos << 4);
    }
}

/// A valid frame wrapped `depth` times: mostly IPIP/IP6IP6 (the outer family's tunnel protocol
/// whatever the inner family), now and then another protocol; the L2 header is the inner
/// frame's (VLAN tag included), the EtherType the outermost header's.
fn decap_encapsulated(rng: &mut Rng, model: &Model, dm: &DecapModel, depth: usize) -> Vec<u8> {
    let mut inner = valid_frame(rng, model, ANY);
    if rng.percent(30) {
        set_random_tos(rng, &mut inner);
    }
    let (l3, et) = l3_of(&inner).unwrap();
    let mut packet = inner[l3..].to_vec();
    let mut v6 = et == 0x86dd;
    for _ in 0..depth {
        let outer_v6 = if rng.percent(85) { v6 } else { !v6 };
        let tunnel = if outer_v6 { 41 } else { 4 };
        let proto = if rng.percent(90) { tunnel } else { rng.pick(&[4, 41, 47, TCP, UDP, 0]) };
        let frag = if outer_v6 {
            0
        } else if rng.percent(5) {
            rng.pick(&[0x2000, 0x0001, 0x00b9, 0x6000])
        } else {
            rng.pick(&[0x4000, 0x4000, 0])
        };
        let tos = match rng.below(4) {
            0 => 0,
            1 => rng.pick(&[1, 2, 3]),
            2 => 0xb8 | rng.pick(&[0, 1, 2, 3]),
            _ => rng.byte(),
        };
        let dst = decap_dst(rng, dm, outer_v6);
        let src = random_addr(rng, outer_v6);
        packet = ip_wrap(&packet, proto, src, dst, tos, frag);
        v6 = outer_v6;
    }
    let mut f = inner[..l3 - 2].to_vec();
    f.extend_from_slice(&if v6 { [0x86, 0xdd] } else { [0x08, 0x00] });
    f.extend_from_slice(&packet);
    f
}

/// Lengths that lie: the outer or the inner length field, or both, consistently (the outer =
/// the inner + its header, modulo 2^16, as a sloppy encapsulator would write them).
fn decap_bogus_length(rng: &mut Rng, f: &mut [u8]) {
    let Some((l3, et)) = l3_of(f) else { return };
    let (outer_at, inner_at, hdr) = match et {
        0x0800 => (l3 + 2, l3 + 22, 20u16),
        0x86dd => (l3 + 4, l3 + 44, 40u16),
        _ => return,
    };
    let actual = f.len().saturating_sub(l3) as u16;
    let value = match rng.below(4) {
        0 => rng.pick(&INTERESTING16),
        1 => actual.wrapping_add(rng.range(1, 8) as u16),
        2 => actual.wrapping_sub(rng.range(1, 8) as u16),
        _ => rng.u16(),
    };
    let mut set = |at: usize, v: u16| {
        if f.len() >= at + 2 {
            f[at..at + 2].copy_from_slice(&v.to_be_bytes());
        }
    };
    match rng.below(3) {
        0 => set(outer_at, value),
        1 => set(inner_at, value),
        _ => {
            set(inner_at, value);
            set(outer_at, value.wrapping_add(hdr));
        }
    }
}

/// Random bytes after an Ethernet header, sometimes dressed up as IPIP/IP6IP6 to us.
fn decap_random_after_ethernet(rng: &mut Rng, dm: &DecapModel) -> Vec<u8> {
    let mut f = random_after_ethernet(rng);
    let Some((l3, et)) = l3_of(&f) else { return f };
    if rng.percent(60) {
        match et {
            0x0800 if f.len() >= l3 + 20 => {
                f[l3] = if rng.percent(80) { 0x45 } else { 0x40 | (rng.byte() & 15) };
                f[l3 + 9] = 4;
                f[l3 + 6] &= 0x40;
                f[l3 + 16..l3 + 20].copy_from_slice(&octets(decap_dst(rng, dm, false)));
                if f.len() > l3 + 20 && rng.percent(60) {
                    f[l3 + 20] = 0x45;
                }
            }
            0x86dd if f.len() >= l3 + 40 => {
                f[l3] = 0x60 | (f[l3] & 15);
                f[l3 + 6] = 41;
                f[l3 + 24..l3 + 40].copy_from_slice(&octets(decap_dst(rng, dm, true)));
                if f.len() > l3 + 40 && rng.percent(60) {
                    f[l3 + 40] = 0x60 | (f[l3 + 40] & 15);
                }
            }
            _ => {}
        }
    }
    f
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DecapKind {
    SystematicCut,
    Encapsulated,
    Nested,
    RoundTrip,
    NotEncapsulated,
    Cut,
    BitFlips,
    BogusLength,
    Stacked,
    RandomAfterEthernet,
    PureRandom,
}

/// Runs frames through the decapsulator (no context: the ingress device does not matter).
struct DecapRunner<'a> {
    prog: &'a mut Xdp,
    out: Vec<u8>,
}

impl DecapRunner<'_> {
    fn run(&mut self, frame: &[u8]) -> Result<(u32, usize)> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut self.out);
        let result = self.prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        Ok((result.return_value, result.data_size_out as usize))
    }
}

#[test]
fn a_million_frames_through_the_decapsulator_keep_every_property() {
    let seed = fuzz_seed();
    let frames = env_u64("XLB_FUZZ_FRAMES").unwrap_or(DEFAULT_FRAMES);
    eprintln!("fuzz decap: seed {seed:#x} (XLB_FUZZ_SEED), {frames} frames (XLB_FUZZ_FRAMES)");
    let report = with_bed(move |bed| fuzz_decap(bed, seed, frames));
    eprintln!("{}", report.text);
    assert!(
        report.failures == 0,
        "{} frames broke a property of the decapsulator (seed {seed:#x}); see above",
        report.failures
    );
}

fn fuzz_decap(bed: &mut Bed, seed: u64, frames: u64) -> Report {
    // Not the balancer's stream: the same seed reproduces both.
    let mut rng = Rng::new(seed.rotate_left(17) ^ 0xdeca_95ed);
    let model = &bed.model;
    let dm = DecapModel::new(model);
    let mut decap = Decap::load().expect("load the decap program (run the tests as root)");
    for &a in &dm.accepted {
        decap.add_address(a).expect("accept an address");
    }
    let before = decap.counters().expect("decap counters");
    let mut balancer = Runner { prog: bed.dp.balancer(), out: vec![0; 8192], ingress: model.ingress };
    let mut runner = DecapRunner { prog: decap.program(), out: vec![0; 8192] };
    let started = Instant::now();
    let mut failures = Failures::default();
    let mut reasons: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let mut kinds: BTreeMap<DecapKind, BTreeMap<u32, u64>> = BTreeMap::new();
    let (mut count, mut round_trips, mut nested_stripped) = (0u64, 0u64, 0u64);

    let mut seeds = Vec::new();
    for depth in [1, 1, 1, 1, 2, 2] {
        let mut s = decap_encapsulated(&mut rng, model, &dm, depth);
        s.truncate(160);
        seeds.push(s);
    }
    let mut pending: Vec<Vec<u8>> = Vec::new();
    while count < frames {
        // The frame, and for a round trip the frame the balancer was given.
        let (kind, input, original) = if let Some(f) = pending.pop() {
            (DecapKind::SystematicCut, f, None)
        } else if let Some(s) = seeds.pop() {
            pending = (MIN_FRAME..=s.len()).map(|n| s[..n].to_vec()).collect();
            continue;
        } else {
            let kind = match rng.below(100) {
                0..=19 => DecapKind::Encapsulated,
                20..=27 => DecapKind::Nested,
                28..=37 => DecapKind::RoundTrip,
                38..=44 => DecapKind::NotEncapsulated,
                45..=54 => DecapKind::Cut,
                55..=66 => DecapKind::BitFlips,
                67..=76 => DecapKind::BogusLength,
                77..=86 => DecapKind::Stacked,
                87..=94 => DecapKind::RandomAfterEthernet,
                _ => DecapKind::PureRandom,
            };
            let mut original = None;
            let f = match kind {
                DecapKind::Encapsulated => decap_encapsulated(&mut rng, model, &dm, 1),
                DecapKind::Nested => {
                    let depth = rng.range(2, 3);
                    decap_encapsulated(&mut rng, model, &dm, depth)
                }
                DecapKind::RoundTrip => {
                    let shape = Shape {
                        vip: Some(Some(VIP_IPIP)),
                        proto: Some(rng.pick(&[TCP, UDP])),
                        options: Some(false),
                        frag: Some(false),
                        ..ANY
                    };
                    let mut f = valid_frame(&mut rng, model, shape);
                    set_random_tos(&mut rng, &mut f);
                    if rng.percent(10) {
                        f.extend_from_slice(&[0; 6]); // Ethernet padding
                    }
                    match balancer.run(&f) {
                        Ok((_, n)) => {
                            let out = balancer.out[..n].to_vec();
                            let grow = if l3_of(&f).is_some_and(|(_, et)| et == 0x86dd) { 40 } else { 20 };
                            if n == f.len() + grow {
                                original = Some(f);
                            }
                            out
                        }
                        Err(e) => {
                            failures.add(format!("balancer BPF_PROG_TEST_RUN failed: {e:#}"), String::new());
                            f
                        }
                    }
                }
                DecapKind::NotEncapsulated => valid_frame(&mut rng, model, ANY),
                DecapKind::Cut => {
                    let depth = rng.range(1, 2);
                    let mut f = decap_encapsulated(&mut rng, model, &dm, depth);
                    cut(&mut rng, &mut f);
                    f
                }
                DecapKind::BitFlips => {
                    let depth = rng.range(1, 2);
                    let mut f = decap_encapsulated(&mut rng, model, &dm, depth);
                    flip_bits(&mut rng, &mut f);
                    f
                }
                DecapKind::BogusLength => {
                    let mut f = decap_encapsulated(&mut rng, model, &dm, 1);
                    decap_bogus_length(&mut rng, &mut f);
                    f
                }
                DecapKind::Stacked => {
                    let depth = rng.range(1, 2);
                    let mut f = decap_encapsulated(&mut rng, model, &dm, depth);
                    for _ in 0..rng.range(2, 4) {
                        match rng.below(5) {
                            0 => cut(&mut rng, &mut f),
                            1 => flip_bits(&mut rng, &mut f),
                            2 => decap_bogus_length(&mut rng, &mut f),
                            _ => {
                                let extra = rng.range(1, 64);
                                f.extend_from_slice(&rng.bytes(extra));
                            }
                        }
                    }
                    f
                }
                DecapKind::RandomAfterEthernet => decap_random_after_ethernet(&mut rng, &dm),
                DecapKind::PureRandom | DecapKind::SystematicCut => pure_random(&mut rng),
            };
            (kind, f, original)
        };
        let index = count;
        count += 1;
        let (verdict, out_len) = match runner.run(&input) {
            Ok(r) => r,
            Err(e) => {
                failures.add(format!("BPF_PROG_TEST_RUN failed: {e:#}"), format!("  in  {}", hex_short(&input)));
                continue;
            }
        };
        let out = &runner.out[..out_len];
        let (reason, expected) = dm.predict(&input);
        let detail = || {
            format!(
                "  frame #{index} ({kind:?}, {} bytes), verdict {}, expected {}\n  in  {}\n  out {}\n  exp {}",
                input.len(),
                verdict_name(verdict),
                reason.name(),
                hex_short(&input),
                hex_short(out),
                hex_short(expected.as_deref().unwrap_or(&input)),
            )
        };
        if let Err(what) = check_decap_properties(&dm, &input, verdict, out) {
            failures.add(format!("decap property: {what}"), detail());
        }
        if out != expected.as_deref().unwrap_or(&input) {
            failures.add(format!("decap model: output differs ({})", reason.name()), detail());
        }
        if let Some(original) = &original {
            // The balancer's frame, decapsulated: what it was given, behind the next hop's MACs.
            round_trips += 1;
            if reason != DecapReason::Decapsulated || out[..12] != input[..12] || out[12..] != original[12..] {
                failures.add(
                    "round trip: the balancer's encapsulation does not decapsulate to its input".into(),
                    format!("{}\n  original {}", detail(), hex_short(original)),
                );
            }
        }
        if kind == DecapKind::Nested && reason == DecapReason::Decapsulated {
            // The properties hold it to one header: the next one stays, untouched.
            nested_stripped += 1;
        }
        let r = reasons.entry(reason as u32).or_default();
        r.0 += 1;
        r.1 += input.len() as u64;
        *kinds.entry(kind).or_default().entry(reason as u32).or_default() += 1;
    }
    let elapsed = started.elapsed();

    let after = decap.counters().expect("decap counters");
    let mut text = format!(
        "fuzz decap: {count} frames in {:.1} s ({:.0} frames/s), seed {seed:#x}\n\nreason                 frames(counter)  frames(model)   bytes(counter)\n",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    let mut counted = 0;
    for ((reason, b), (_, a)) in before.iter().zip(&after) {
        let (packets, bytes) = (a.packets - b.packets, a.bytes - b.bytes);
        counted += packets;
        let (want_packets, want_bytes) = reasons.get(&(*reason as u32)).copied().unwrap_or_default();
        text += &format!("{:<22} {packets:>15}  {want_packets:>13}  {bytes:>15}\n", reason.name());
        if (packets, bytes) != (want_packets, want_bytes) {
            failures.add(
                format!("decap counter {} moved by {packets} frames / {bytes} bytes", reason.name()),
                format!("  the model expected {want_packets} frames / {want_bytes} bytes"),
            );
        }
        if packets == 0 && frames >= COVERAGE_MIN_FRAMES {
            failures.add(format!("decap reason {} never hit", reason.name()), String::new());
        }
    }
    if counted != count {
        failures.add(format!("decap counters sum to {counted}, {count} frames were run"), String::new());
    }
    if frames >= COVERAGE_MIN_FRAMES && (round_trips == 0 || nested_stripped == 0) {
        failures.add(format!("{round_trips} round trips, {nested_stripped} nested frames decapsulated"), String::new());
    }
    text += &format!(
        "\n{round_trips} balancer frames decapsulated back to their input; {nested_stripped} nested frames stripped once\n"
    );
    text += "reasons per input kind:\n";
    for (kind, by_reason) in &kinds {
        let total: u64 = by_reason.values().sum();
        text += &format!("  {:<20} {total:>8}:", format!("{kind:?}"));
        for (r, n) in by_reason {
            text += &format!(" {}={n}", DecapReason::ALL[*r as usize].name());
        }
        text += "\n";
    }
    failures.render(&mut text);
    Report { text, failures: failures.count }
}

// ---------------------------------------------------------------------------------------------
// Regression tests of the bugs this fuzz test found, each fixed in the data path.
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

/// The IPv4 header at `l3` with its total length set to `n` and its checksum redone.
fn set_total_length(f: &mut [u8], l3: usize, n: u16) {
    f[l3 + 2..l3 + 4].copy_from_slice(&n.to_be_bytes());
    f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&f[l3..l3 + 20]);
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// Runs `frame` and returns the verdict, the output and the reason whose counter moved (exactly
/// one must move, by one frame).
fn run_reason(bed: &mut Bed, frame: &[u8]) -> (u32, Vec<u8>, Reason) {
    let before = bed.dp.reason_counters().expect("reason counters");
    let (verdict, out) = run_one(bed, frame);
    let after = bed.dp.reason_counters().expect("reason counters");
    let moved: Vec<Reason> =
        before.iter().zip(&after).filter(|((_, b), (_, a))| a.packets != b.packets).map(|((r, _), _)| *r).collect();
    assert_eq!(moved.len(), 1, "exactly one counter moves per frame: {moved:?}");
    (verdict, out, moved[0])
}

/// Regression test of findings `OuterLengthBeyondFrame` and `LargerThanEgressMtu`: the
/// balancer took the IP length field (IPv4 total length, IPv6 payload length + 40) on trust.
/// It fed the FIB's MTU check and became the outer header's length, so a header claiming more
/// than the frame holds was encapsulated with an outer length claiming bytes it did not carry
/// (the backend drops it as truncated), and one claiming less passed the MTU check with a frame
/// that did not fit and was sent out anyway (the next link drops it) instead of being answered.
/// Fixed in lb-ebpf/src/balancer.rs: a TCP/UDP packet to a VIP whose length field runs past the
/// frame, or does not cover its IP and TCP/UDP headers, is cut short: drop_truncated_l4. The
/// outer header carries the length field (bytes after it, Ethernet padding, follow the outer
/// packet's declared end, and receivers trim them); the MTU check counts the whole frame, and a
/// frame too big only by such bytes goes to the stack, which trims them and forwards the rest.
#[test]
fn encapsulation_follows_the_frame_length_not_the_length_field() {
    with_bed(|bed| {
        let m = &bed.model;
        let (c4, c6) = (IpAddr::V4(CLIENT4), IpAddr::V6(CLIENT6));
        let l3 = 14;
        let tcp4 = minimal_frame(m, c4, vip(false, VIP_IPIP), TCP, 80, None).build();
        let tcp6 = minimal_frame(m, c6, vip(true, VIP_IPIP), TCP, 80, None).build();
        let l2_tcp4 = minimal_frame(m, c4, vip(false, VIP_L2), TCP, 80, None).build();
        let mut claims_more = tcp4.clone();
        set_total_length(&mut claims_more, l3, be16(&tcp4, l3 + 2) + 100);
        let mut claims_more6 = tcp6.clone();
        claims_more6[l3 + 4..l3 + 6].copy_from_slice(&(be16(&tcp6, l3 + 4) + 100).to_be_bytes());
        let mut one_more = tcp4.clone();
        set_total_length(&mut one_more, l3, be16(&tcp4, l3 + 2) + 1);
        let mut l2_claims_more = l2_tcp4.clone();
        set_total_length(&mut l2_claims_more, l3, be16(&l2_tcp4, l3 + 2) + 1);
        // Shorter than the IP header, or than IP + TCP (the ports would come from padding).
        let mut below_ip = tcp4.clone();
        set_total_length(&mut below_ip, l3, 19);
        let mut below_tcp = tcp4.clone();
        set_total_length(&mut below_tcp, l3, 20 + 19);
        let mut below_tcp6 = tcp6.clone();
        below_tcp6[l3 + 4..l3 + 6].copy_from_slice(&19u16.to_be_bytes());
        for (name, frame) in [
            ("IPv4 total length 100 beyond the frame", &claims_more),
            ("IPv6 payload length 100 beyond the frame", &claims_more6),
            ("IPv4 total length 1 beyond the frame", &one_more),
            ("IPv4 total length 1 beyond the frame, L2 service", &l2_claims_more),
            ("IPv4 total length 19", &below_ip),
            ("IPv4 total length 39: TCP header cut by the length", &below_tcp),
            ("IPv6 payload length 19: TCP header cut by the length", &below_tcp6),
        ] {
            assert_eq!(bed.model.predict(frame).reason, Reason::DropTruncatedL4, "{name}: the model");
            let (verdict, out, reason) = run_reason(bed, frame);
            assert_eq!((verdict, reason), (XDP_DROP, Reason::DropTruncatedL4), "{name}");
            assert_eq!(&out, frame, "{name}: dropped untouched");
        }

        // Ethernet padding (a 54-byte frame padded to 60): encapsulated by the length field,
        // the padding after the outer packet's declared end.
        let mut padded = tcp4.clone();
        padded.extend_from_slice(&[0; 6]);
        let (verdict, out, reason) = run_reason(bed, &padded);
        assert_eq!((verdict, reason), (XDP_TX, Reason::TxEncap), "padded frame");
        assert_eq!(out.len(), padded.len() + 20);
        assert_eq!(usize::from(be16(&out, l3 + 2)), tcp4.len() - l3 + 20, "outer length: inner length field + 20");
        assert_eq!(out[l3 + 20..], padded[l3..], "inner packet, then the padding");
        let mut padded6 = tcp6.clone();
        padded6.extend_from_slice(&[0; 6]);
        let (verdict, out, reason) = run_reason(bed, &padded6);
        assert_eq!((verdict, reason), (XDP_TX, Reason::TxEncap), "padded IPv6 frame");
        assert_eq!(usize::from(be16(&out, l3 + 4)), tcp6.len() - l3, "outer payload length: the inner packet");
        assert_eq!(out[l3 + 40..], padded6[l3..]);

        // 1400 bytes of UDP payload to net 1 (route MTU 1400) with DF, the header claiming 100
        // bytes: the frame does not fit, the packet does. Handed to the stack, encapsulated.
        let m = &bed.model;
        let mut claims_less = minimal_frame(m, c4, vip(false, VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]).build();
        set_total_length(&mut claims_less, l3, 100);
        assert_eq!(landing_net(m, &claims_less), Some(1));
        let (verdict, out, reason) = run_reason(bed, &claims_less);
        assert_eq!((verdict, reason), (XDP_PASS, Reason::PassNoNeighbour), "too big only by its trailing bytes");
        assert_eq!(out[..12], claims_less[..12], "still addressed to us");
        assert_eq!(be16(&out, l3 + 2), 120, "outer length: the 100 claimed + 20");
        assert_eq!(out[l3 + 20..], claims_less[l3..]);
        // Claiming 1381 (+ 20 > 1400): too big by the packet itself, answered.
        set_total_length(&mut claims_less, l3, 1381);
        let (verdict, out, reason) = run_reason(bed, &claims_less);
        assert_eq!((verdict, reason), (XDP_TX, Reason::TxTooBig));
        assert_eq!(be16(&out, l3 + 20 + 6), 1380, "MTU 1400 - 20");
    });
}

/// Regression test of finding `IcmpErrorToNonUnicastSource`: lb-ebpf/src/balancer.rs too_big
/// answered whatever source the packet carried, though RFC 1122 3.2.2 (IPv4) and RFC 4443
/// 2.4 (e) (IPv6) forbid ICMP errors to a source that is no single host (0.0.0.0/8, 127/8,
/// multicast, class E and broadcast; ::, ::1, ff00::/8): a spoofed source made the balancer
/// send them. Fixed (icmp.rs may_answer): such a packet is dropped untouched, counted as
/// DROP_TOO_BIG_BAD_SOURCE; a unicast source is still answered.
#[test]
fn no_icmp_error_to_a_source_that_is_not_one_host() {
    with_bed(|bed| {
        let mut sources: Vec<IpAddr> = NOT_ONE_HOST.to_vec();
        sources.extend([IpAddr::V4(Ipv4Addr::new(127, 255, 255, 254)), IpAddr::V4(Ipv4Addr::new(239, 1, 2, 3))]);
        for src in sources {
            assert!(!single_host(src), "{src}");
            // UDP 53 on the encapsulating VIP: net 1, route MTU 1400; DF (IPv6: always).
            let f = minimal_frame(&bed.model, src, vip(src.is_ipv6(), VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]);
            let frame = f.build();
            assert_eq!(bed.model.predict(&frame).reason, DROP_TOO_BIG_BAD_SOURCE, "from {src}: the model");
            let (verdict, out, reason) = run_reason(bed, &frame);
            assert_eq!((verdict, reason), (XDP_DROP, DROP_TOO_BIG_BAD_SOURCE), "from {src}");
            assert_eq!(out, frame, "from {src}: dropped untouched");
        }
        // The edges of the ranges, and a unicast source: answered.
        for src in [
            IpAddr::V4(Ipv4Addr::new(1, 0, 0, 0)),
            IpAddr::V4(Ipv4Addr::new(126, 255, 255, 255)),
            IpAddr::V4(Ipv4Addr::new(128, 0, 0, 0)),
            IpAddr::V4(Ipv4Addr::new(223, 255, 255, 255)),
            IpAddr::V4(CLIENT4),
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 2)),
            IpAddr::V6(Ipv6Addr::new(0xfeff, 0, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 1, 0)),
            IpAddr::V6(CLIENT6),
        ] {
            let f = minimal_frame(&bed.model, src, vip(src.is_ipv6(), VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]);
            let (verdict, _, reason) = run_reason(bed, &f.build());
            assert_eq!((verdict, reason), (XDP_TX, Reason::TxTooBig), "from {src}");
        }
    });
}
