//! The balancer: classify (IPv4 or IPv6, VIP, service), select a backend (flow table, Maglev)
//! and forward (L2 DSR, or encapsulation towards the FIB's next hop).
use core::mem::MaybeUninit;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    addr_v4, addr_v6,
    hash::{encap_hash, flow_hash},
    vip_bit, Addr, Backend, FlowKey, Reason, Service, ServiceKey, TcpFlags, FAMILY_V4, FAMILY_V6, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_HDR, IPV6_HDR, IP_DF, TCP_HDR, UDP_HDR,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    encap,
    fib::{self, Verdict},
    flow::{self, Chosen},
    frame, icmp,
    maps::{self, SETTINGS, TX_PORTS, VIPS, VIP_BITS},
    parse::{self, Ipv6Next, L3},
    stats,
};

/// A packet to a VIP, as far as the balancer needs it.
struct Packet {
    key: FlowKey,
    l3: usize,
    tcp_flags: TcpFlags,
    /// Length of the IP packet by its header's length field, header included; checked to cover
    /// the transport header and to end inside the frame. Bytes after it are padding.
    ip_len: u16,
    /// IPv4 TOS or IPv6 traffic class.
    tos: u8,
    /// IPv4 "don't fragment" (IPv6 is never fragmented on the way).
    df: bool,
}

/// Decides the fate of one frame and carries it out; the caller counts the reason.
#[inline(always)]
pub fn balance(ctx: &XdpContext) -> Reason {
    let packet = match parse::l3(ctx) {
        L3::Ipv4(l3) => ipv4_packet(ctx, l3),
        L3::Ipv6(l3) => {
            let mut packet = MaybeUninit::<Packet>::uninit();
            // SAFETY: ipv6_packet writes the whole packet whenever it returns Ok.
            ipv6_packet(ctx, l3, &mut packet).map(|()| unsafe { packet.assume_init() })
        }
        L3::Other => return Reason::PassNotIp,
        L3::Truncated => return Reason::PassMalformed,
    };
    let packet = match packet {
        Ok(p) => p,
        Err(reason) => return reason,
    };
    let k = &packet.key;
    let service_key = ServiceKey { addr: k.dst, port: (k.ports >> 16) as u16, proto: k.proto, family: k.family };
    let Some(service) = maps::service(&service_key) else {
        return on_vip(&k.dst, k.family, Reason::DropUnknownService);
    };
    // A serial chain of multiplies: only a new flow's backend needs it, not an established
    // flow (encapsulation takes its outer bits from a cheaper hash).
    let hash = || flow_hash(&k.src, k.ports, maps::hash_seed());
    let Some(chosen) = flow::select(k, packet.tcp_flags, &service, hash) else {
        return Reason::DropNoBackend;
    };
    let bytes = frame::frame_len(ctx);
    let reason = forward(ctx, &packet, &service, &chosen);
    if matches!(reason, Reason::TxForwarded | Reason::TxEncap | Reason::RedirectEncap | Reason::PassNoNeighbour) {
        stats::count_forward(service.id, chosen.id, bytes);
    }
    reason
}

/// Whether `addr` may be a VIP: its bit in VIP_BITS is set. One array read; a clear bit is
/// the fate of all the traffic that is not ours.
#[inline(always)]
fn maybe_vip(addr: &Addr) -> bool {
    let bit = vip_bit(addr);
    VIP_BITS.get(bit >> 6).is_some_and(|w| (w >> (bit & 63)) & 1 != 0)
}

/// `reason` for a packet to `addr`, which passed [`maybe_vip`], if `addr` is a VIP; the
/// packet passes untouched if it is not (its bit is another address's). Asked only where
/// a packet to a VIP would not be balanced: the balanced path never pays the VIPS lookup.
#[inline(never)]
fn on_vip(addr: &Addr, family: u8, reason: Reason) -> Reason {
    let key = maps::vip_key([addr[0], addr[1], addr[2], addr[3], u32::from_ne_bytes([family, 0, 0, 0])]);
    // SAFETY: the value is only tested for presence.
    match unsafe { VIPS.get(&key) } {
        Some(_) => reason,
        None => Reason::PassNotVip,
    }
}

#[inline(always)]
fn ipv4_packet(ctx: &XdpContext, l3: usize) -> Result<Packet, Reason> {
    let ip: &Ipv4Hdr = frame::ref_at(ctx, l3).ok_or(Reason::PassMalformed)?;
    let ihl = ip.vihl & 0x0f;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Err(Reason::PassMalformed);
    }
    let dst = addr_v4(ip.dst_addr);
    if !maybe_vip(&dst) {
        return Err(Reason::PassNotVip);
    }
    ipv4_vip_packet(ctx, l3, ip, ihl, dst).map_err(|r| on_vip(&dst, FAMILY_V4, r))
}

/// The rest of [`ipv4_packet`], for a destination that may be a VIP.
#[inline(always)]
fn ipv4_vip_packet(ctx: &XdpContext, l3: usize, ip: &Ipv4Hdr, ihl: u8, dst: Addr) -> Result<Packet, Reason> {
    if ihl != 5 {
        return Err(Reason::DropIpOptions);
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & parse::IP_MF_OFFSET_MASK != 0 {
        return Err(Reason::DropFragment);
    }
    let proto = transport(ip.proto, IPPROTO_ICMP)?;
    let (ports, tcp_flags) = parse::l4_ports(ctx, l3 + IPV4_HDR, proto).ok_or(Reason::DropTruncatedL4)?;
    let ip_len = u16::from_be_bytes(ip.tot_len);
    if !length_fits(ctx, l3, l3 + IPV4_HDR, proto, ip_len as usize) {
        return Err(Reason::DropTruncatedL4);
    }
    Ok(Packet {
        key: FlowKey { src: addr_v4(ip.src_addr), dst, ports, proto, family: FAMILY_V4, _pad: 0 },
        l3,
        tcp_flags,
        ip_len,
        tos: ip.tos,
        df: frags & IP_DF != 0,
    })
}

/// Not inlined, to keep its header copy off the IPv4 path's stack. It fills `packet` rather
/// than returning a `Result<Packet, _>`: the BTF of a function's signature reaches the kernel,
/// which rejects the layout Rust gives such an enum (its tag inside a union member).
#[inline(never)]
fn ipv6_packet(ctx: &XdpContext, l3: usize, packet: &mut MaybeUninit<Packet>) -> Result<(), Reason> {
    let ip: &Ipv6Hdr = frame::ref_at(ctx, l3).ok_or(Reason::PassMalformed)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let dst = addr_v6(ip.dst_addr);
    if !maybe_vip(&dst) {
        return Err(Reason::PassNotVip);
    }
    ipv6_vip_packet(ctx, l3, ip, dst, packet).map_err(|r| on_vip(&dst, FAMILY_V6, r))
}

/// The rest of [`ipv6_packet`], for a destination that may be a VIP.
#[inline(always)]
fn ipv6_vip_packet(
    ctx: &XdpContext,
    l3: usize,
    ip: &Ipv6Hdr,
    dst: Addr,
    packet: &mut MaybeUninit<Packet>,
) -> Result<(), Reason> {
    let (proto, l4) = match parse::ipv6_next(ctx, ip.next_hdr, l3 + IPV6_HDR) {
        Ipv6Next::Transport(proto, l4) => (proto, l4),
        Ipv6Next::Fragment => return Err(Reason::DropFragment),
        Ipv6Next::Unwalked => return Err(Reason::DropIpOptions),
    };
    let proto = transport(proto, IPPROTO_ICMPV6)?;
    let (ports, tcp_flags) = parse::l4_ports(ctx, l4, proto).ok_or(Reason::DropTruncatedL4)?;
    let payload_len = u16::from_be_bytes(ip.payload_len);
    if !length_fits(ctx, l3, l4, proto, payload_len as usize + IPV6_HDR) {
        return Err(Reason::DropTruncatedL4);
    }
    packet.write(Packet {
        key: FlowKey { src: addr_v6(ip.src_addr), dst, ports, proto, family: FAMILY_V6, _pad: 0 },
        l3,
        tcp_flags,
        ip_len: payload_len.saturating_add(IPV6_HDR as u16),
        tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
        df: true,
    });
    Ok(())
}

/// Whether the IP length field (`ip_len`, IP header included) describes a packet the frame
/// holds: long enough for the IP header (with IPv6's extension headers: `l4 - l3` bytes) and
/// the whole TCP (20) or UDP (8) header, and not running past the frame. Otherwise the packet
/// is cut short (by the frame, or by its own length field): drop_truncated_l4, as for a TCP/UDP
/// header the frame cuts short. Checked only for TCP/UDP to a VIP: ICMP goes to the host's
/// stack, which judges lengths itself. Bytes after the length (Ethernet pads frames to 60
/// bytes) are allowed; see forward_encap for what becomes of them.
#[inline(always)]
fn length_fits(ctx: &XdpContext, l3: usize, l4: usize, proto: u8, ip_len: usize) -> bool {
    let l4_header = if proto == IPPROTO_TCP { TCP_HDR } else { UDP_HDR };
    ip_len >= l4 - l3 + l4_header && l3 + ip_len <= frame::frame_len(ctx) as usize
}

/// TCP and UDP go on; the family's ICMP goes to the host; anything else has no service.
#[inline(always)]
fn transport(proto: u8, icmp: u8) -> Result<u8, Reason> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => Ok(proto),
        p if p == icmp => Err(Reason::PassVipIcmp),
        _ => Err(Reason::DropUnknownService),
    }
}

#[inline(always)]
fn forward(ctx: &XdpContext, packet: &Packet, service: &Service, chosen: &Chosen) -> Reason {
    if !service.is_ipip() {
        return match parse::set_macs(ctx, chosen.backend.mac, maps::iface_mac()) {
            Some(()) => Reason::TxForwarded,
            None => Reason::PassMalformed,
        };
    }
    match forward_encap(ctx, packet, chosen.id, chosen.backend) {
        Ok(reason) => reason,
        // Called from here, not from forward_encap: the verifier adds up the stacks of a chain.
        Err(mtu) => too_big(ctx, packet, mtu),
    }
}

/// L3 DSR. Not inlined: its FIB request and outer headers would crowd the stack of the
/// L2 path, and the verifier limits the whole call chain to 512 bytes.
#[inline(never)]
/// Err(mtu): too big for the egress MTU once encapsulated, and not to be fragmented.
fn forward_encap(ctx: &XdpContext, packet: &Packet, id: u32, backend: &Backend) -> Result<Reason, u16> {
    // The verifier lost l3's bounds on the way through memory; it is 14 or 18.
    let l3 = frame::l3_bounded(packet.l3);
    let Some(settings) = SETTINGS.get(0) else {
        return Ok(Reason::DropNoRoute);
    };
    let family = packet.key.family;
    let hash = encap_hash(&packet.key.src, packet.key.ports);
    let dst = &backend.addr;
    let (src, outer_hdr) = if family == FAMILY_V4 {
        let src = settings.ipip_src_v4 | (hash.to_be() & settings.ipip_src_v4_host);
        ([src, 0, 0, 0], IPV4_HDR)
    } else {
        let s = &settings.ipip_src_v6;
        let src = [s[0], s[1], s[2], s[3] | (hash.to_be() & settings.ipip_src_v6_host)];
        (src, IPV6_HDR)
    };
    // The outer header declares the inner packet by its length field (ip_len). Bytes the frame
    // holds after it (Ethernet padding) stay where they are: after the outer packet's declared
    // end, where every receiver (ip_rcv, ipv6_rcv, the decapsulator's stack) trims them. They
    // do go on the wire, so the MTU check counts them: the frame's bytes from the IP header on.
    let outer_len = packet.ip_len.saturating_add(outer_hdr as u16);
    let on_wire = (frame::frame_len(ctx) as usize).saturating_sub(l3).saturating_add(outer_hdr);
    let on_wire = if on_wire > u16::MAX as usize { u16::MAX } else { on_wire as u16 };
    let proto = if family == FAMILY_V4 { 4 } else { 41 };
    let route = fib::next_hop(ctx, id, backend, settings.route_generation, family, proto, &src, on_wire);
    // Too big only by the bytes after the packet: the stack trims them and forwards the packet,
    // which fits (it resolves the route and the neighbour itself). Too big without DF: the
    // stack fragments it.
    let (df, verdict) = match route.verdict {
        Verdict::TooBig if outer_len <= route.mtu => (packet.df, Verdict::NoNeighbour),
        Verdict::TooBig if !packet.df => (false, Verdict::NoNeighbour),
        Verdict::TooBig => return Err(route.mtu),
        other => (packet.df, other),
    };
    if verdict == Verdict::Unroutable {
        return Ok(Reason::DropNoRoute);
    }
    let encapsulated = if family == FAMILY_V4 {
        encap::ipip_v4(ctx, l3, packet.ip_len, packet.tos, df, src[0], dst[0])
    } else {
        encap::ip6ip6(ctx, l3, packet.ip_len, packet.tos, hash, &src, dst)
    };
    if encapsulated.is_none() {
        return Ok(Reason::DropAdjustFailed);
    }
    if verdict != Verdict::Via {
        // No neighbour yet, or too big without DF: the kernel's stack forwards (and resolves,
        // or fragments) the encapsulated packet.
        return Ok(Reason::PassNoNeighbour);
    }
    let Some(received) = frame::words_at::<6>(ctx, 0) else {
        return Ok(Reason::DropAdjustFailed);
    };
    if parse::set_macs(ctx, route.dmac, route.smac).is_none() {
        return Ok(Reason::DropAdjustFailed);
    }
    Ok(if route.ifindex == ctx.ingress_ifindex() as u32 {
        Reason::TxEncap
    } else if TX_PORTS.redirect(route.ifindex, xdp_action::XDP_PASS as u64) == Ok(xdp_action::XDP_REDIRECT) {
        Reason::RedirectEncap
    } else {
        // Not in the devmap: the kernel forwards it, if it is still addressed to us.
        let received_dst = [received[0], received[1], received[2]];
        let _ = parse::set_macs(ctx, received_dst, [received[3], received[4], received[5]]);
        Reason::PassNoNeighbour
    })
}

/// Answers a packet too big for the route to its backend once encapsulated, unless its source is
/// no single host: then no ICMP error may go to it (RFC 1122 3.2.2, RFC 4443 2.4 (e)), and the
/// packet, which cannot be forwarded either, is dropped untouched.
#[inline(always)]
fn too_big(ctx: &XdpContext, packet: &Packet, mtu: u16) -> Reason {
    let (family, l3) = (packet.key.family, packet.l3);
    if !icmp::may_answer(family, &packet.key.src) {
        return Reason::DropTooBigBadSource;
    }
    let answered = if family == FAMILY_V4 {
        icmp::too_big_v4(ctx, l3, mtu.saturating_sub(IPV4_HDR as u16))
    } else {
        icmp::too_big_v6(ctx, l3, u32::from(mtu.saturating_sub(IPV6_HDR as u16)))
    };
    match answered {
        Some(()) => Reason::TxTooBig,
        None => Reason::DropAdjustFailed,
    }
}
