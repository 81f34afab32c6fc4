//! The IPv4 balancer: VIP and service lookup, Maglev selection, L2 DSR rewrite.
use lb_common::{hash::flow_hash_v4, Reason, ServiceKey, BACKEND_F_VALID, IPPROTO_TCP, IPPROTO_UDP};

use aya_ebpf::programs::XdpContext;

use crate::{
    maps::{self, BACKENDS, MAGLEV, SERVICES, VIPS},
    parse::{self, L3},
    stats,
};

const IPPROTO_ICMP: u8 = 1;
/// More-fragments flag and fragment offset, in the header's (big-endian) layout.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;

/// Decides the fate of one frame and carries it out (rewrite); the caller counts the reason.
#[inline(always)]
pub fn balance(ctx: &XdpContext) -> Reason {
    let offset = match parse::l3(ctx) {
        L3::Ipv4(offset) => offset,
        L3::Other => return Reason::PassNotIpv4,
        L3::Truncated => return Reason::PassMalformed,
    };
    let Some(ip) = parse::ipv4(ctx, offset) else {
        return Reason::PassMalformed;
    };
    let ihl = ip.vihl & 0x0f;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Reason::PassMalformed;
    }
    let daddr = u32::from_ne_bytes(ip.dst_addr);
    // SAFETY: the value is only tested for presence.
    if unsafe { VIPS.get(&daddr) }.is_none() {
        return Reason::PassNotVip;
    }
    if ihl != 5 {
        return Reason::DropIpOptions;
    }
    if u16::from_be_bytes(ip.frags) & IP_MF_OFFSET_MASK != 0 {
        return Reason::DropFragment;
    }
    let proto = ip.proto;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {}
        IPPROTO_ICMP => return Reason::PassVipIcmp,
        _ => return Reason::DropUnknownService,
    }
    let saddr = u32::from_ne_bytes(ip.src_addr);
    let Some(ports) = parse::l4_ports(ctx, offset + 20, proto) else {
        return Reason::DropTruncatedL4;
    };
    let key = ServiceKey { vip: daddr, port: (ports >> 16) as u16, proto, _pad: 0 };
    // SAFETY: the agent replaces values whole; we copy the fields we need at once.
    let Some(service) = (unsafe { SERVICES.get(&key) }) else {
        return Reason::DropUnknownService;
    };
    let (id, base, size) = (service.id, service.table_base, service.table_size);
    if size == 0 {
        return Reason::DropNoBackend;
    }
    let hash = flow_hash_v4(saddr, daddr, ports, proto, maps::hash_seed());
    let Some(&backend_id) = MAGLEV.get(base.wrapping_add(hash % size)) else {
        return Reason::DropNoBackend;
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return Reason::DropNoBackend;
    };
    if backend.flags & BACKEND_F_VALID == 0 {
        return Reason::DropNoBackend;
    }
    if parse::set_macs(ctx, backend.mac, maps::iface_mac()).is_none() {
        return Reason::PassMalformed;
    }
    stats::count_forward(id, backend_id, parse::frame_len(ctx));
    Reason::TxForwarded
}
