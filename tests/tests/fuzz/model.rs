//! The model: what the balancer must do with a frame, computed from the input bytes alone,
//! and the properties that hold whatever the input.
use super::*;

/// Where `bpf_fib_lookup` sends a backend's encapsulated packets.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hop {
    Unroutable,
    /// `via`: egress ifindex, source and destination MAC when the neighbour is known.
    Route {
        mtu: u16,
        via: Option<(u32, [u8; 6], [u8; 6])>,
    },
}

pub(crate) struct ModelBackend {
    pub(crate) addr: IpAddr,
    pub(crate) mac: [u8; 6],
    pub(crate) hop: Hop,
}

pub(crate) struct ModelService {
    pub(crate) id: u32,
    pub(crate) ipip: bool,
    pub(crate) table: Vec<u32>,
}

pub(crate) struct Model {
    pub(crate) vips: HashSet<IpAddr>,
    pub(crate) services: HashMap<(IpAddr, u16, u8), ModelService>,
    pub(crate) backends: HashMap<u32, ModelBackend>,
    pub(crate) ingress: u32,
    pub(crate) tx_ports: HashSet<u32>,
    pub(crate) lb_mac: [u8; 6],
    pub(crate) settings: Settings,
}

/// What the model expects: the reason (hence the verdict) and the output frame.
pub(crate) struct Expect {
    pub(crate) reason: Reason,
    /// None: the input, unchanged.
    pub(crate) out: Option<Vec<u8>>,
    /// (service id, backend id) when the frame is counted as forwarded.
    pub(crate) forwarded: Option<(u32, u32)>,
}

impl Expect {
    pub(crate) fn same(reason: Reason) -> Self {
        Self { reason, out: None, forwarded: None }
    }
}

/// A packet to a VIP with a complete TCP or UDP header, as the model parsed it.
pub(crate) struct Flow {
    pub(crate) l3: usize,
    pub(crate) l4: usize,
    pub(crate) v6: bool,
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) ports: [u8; 4],
    pub(crate) proto: u8,
    /// The length the IP header claims (IPv6: payload length + 40): covers the IP and
    /// transport headers and ends inside the frame.
    pub(crate) ip_len: u16,
    pub(crate) tos: u8,
    pub(crate) df: bool,
}

pub(crate) fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

pub(crate) fn ip4(b: &[u8]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

pub(crate) fn ip6(b: &[u8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).unwrap()))
}

/// L3 offset and EtherType after at most one 802.1Q tag; None when cut inside them.
pub(crate) fn l3_of(f: &[u8]) -> Option<(usize, u16)> {
    let et = be16(f, 12);
    if et != 0x8100 {
        return Some((14, et));
    }
    (f.len() >= 18).then(|| (18, be16(f, 16)))
}

impl Model {
    /// The MTU of the route to a backend, if the FIB has one.
    pub(crate) fn route_mtu(&self, addr: IpAddr) -> Option<u16> {
        self.backends.values().find(|b| b.addr == addr).and_then(|b| match b.hop {
            Hop::Route { mtu, .. } => Some(mtu),
            Hop::Unroutable => None,
        })
    }

    /// Whether the frame carries a parseable IP header whose destination is a VIP: only such
    /// frames may get anything but XDP_PASS with the frame untouched.
    pub(crate) fn dst_is_vip(&self, f: &[u8]) -> bool {
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
    pub(crate) fn flow(&self, f: &[u8]) -> Result<Flow, Reason> {
        let Some((l3, et)) = l3_of(f) else { return Err(Reason::PassMalformed) };
        match et {
            0x0800 => self.ipv4(f, l3),
            0x86dd => self.ipv6(f, l3),
            _ => Err(Reason::PassNotIp),
        }
    }

    pub(crate) fn predict(&self, f: &[u8]) -> Expect {
        match self.flow(f) {
            Ok(flow) => self.service(f, &flow),
            Err(reason) => Expect::same(reason),
        }
    }

    pub(crate) fn ipv4(&self, f: &[u8], l3: usize) -> Result<Flow, Reason> {
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

    pub(crate) fn ipv6(&self, f: &[u8], l3: usize) -> Result<Flow, Reason> {
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

    pub(crate) fn service(&self, f: &[u8], flow: &Flow) -> Expect {
        let dport = u16::from_be_bytes([flow.ports[2], flow.ports[3]]);
        let Some(service) = self.services.get(&(flow.dst, dport, flow.proto)) else {
            return Expect::same(Reason::DropUnknownService);
        };
        let hash = flow_hash(&map_addr(flow.src).0, u32::from_ne_bytes(flow.ports), HASH_SEED);
        let id = ring_entry(&service.table, hash);
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
        // The outer source bits and flow label: the encapsulation hash, not the flow hash.
        let hash = encap_hash(&map_addr(flow.src).0, u32::from_ne_bytes(flow.ports));
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
    pub(crate) fn too_big(&self, f: &[u8], flow: &Flow, route_mtu: u16) -> Vec<u8> {
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
pub(crate) fn transport(proto: u8, icmp: u8) -> Result<u8, Reason> {
    match proto {
        TCP | UDP => Ok(proto),
        p if p == icmp => Err(Reason::PassVipIcmp),
        _ => Err(Reason::DropUnknownService),
    }
}

/// The IP length field (`ip_len`, IP header included) of a TCP/UDP packet at `l3` whose
/// transport header is at `l4`, if it covers that header and ends inside the frame; else the
/// packet is cut short: drop_truncated_l4.
pub(crate) fn claimed_length(f: &[u8], l3: usize, l4: usize, proto: u8, ip_len: usize) -> Result<u16, Reason> {
    let l4_header = if proto == TCP { 20 } else { 8 };
    if ip_len < l4 - l3 + l4_header || l3 + ip_len > f.len() {
        return Err(Reason::DropTruncatedL4);
    }
    Ok(ip_len as u16)
}

pub(crate) fn l4_ports(f: &[u8], l4: usize, proto: u8) -> Result<[u8; 4], Reason> {
    let need = if proto == TCP { 20 } else { 8 };
    if f.len() < l4 + need {
        return Err(Reason::DropTruncatedL4);
    }
    Ok([f[l4], f[l4 + 1], f[l4 + 2], f[l4 + 3]])
}

pub(crate) fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub(crate) fn ipv6_octets(words: &[u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    o
}

/// Checksum of the ICMPv6 message after the 40-byte IPv6 header `ip[..40]`, over the
/// pseudo-header; 0 when the message's own checksum field is right.
pub(crate) fn icmpv6_checksum(ip: &[u8]) -> u16 {
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
pub(crate) enum Finding {
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
    pub(crate) fn describe(self) -> &'static str {
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
pub(crate) struct Findings {
    /// Count, length of the shortest example, the example.
    pub(crate) seen: BTreeMap<Finding, (u64, usize, String)>,
    /// Not a finding: encapsulated with bytes after the inner packet (Ethernet padding, or
    /// garbage), which the backend's stack trims.
    pub(crate) trailing_bytes: u64,
}

impl Findings {
    /// Counts the finding and keeps its shortest example.
    pub(crate) fn note(&mut self, finding: Finding, f: &[u8], out: &[u8]) -> Result<(), String> {
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

pub(crate) fn check_properties(
    model: &Model,
    f: &[u8],
    verdict: u32,
    out: &[u8],
    findings: &mut Findings,
) -> Result<(), String> {
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

pub(crate) fn check_encap(
    model: &Model,
    f: &[u8],
    verdict: u32,
    out: &[u8],
    findings: &mut Findings,
) -> Result<(), String> {
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
pub(crate) fn single_host(src: IpAddr) -> bool {
    match src {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] != 0 && o[0] != 127 && o[0] < 224
        }
        IpAddr::V6(a) => !a.is_unspecified() && !a.is_multicast() && !a.is_loopback(),
    }
}

pub(crate) fn check_icmp(f: &[u8], out: &[u8], l2: usize, et: u16, findings: &mut Findings) -> Result<(), String> {
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

pub(crate) fn strict() -> bool {
    std::env::var("XLB_FUZZ_STRICT").map_or(true, |v| v != "0")
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The first 160 bytes, in hex.
pub(crate) fn hex_short(b: &[u8]) -> String {
    match b.len() {
        0..=160 => hex(b),
        n => format!("{}... ({n} bytes)", hex(&b[..160])),
    }
}
