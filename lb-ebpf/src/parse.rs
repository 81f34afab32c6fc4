//! The header walk: Ethernet, one 802.1Q tag, IPv4 or IPv6 (with its extension headers),
//! TCP/UDP, through the bounds-checked accessors of `frame`.
use aya_ebpf::programs::XdpContext;
use lb_common::{limits::MAX_IPV6_EXT_HEADERS, TcpFlags, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP};
use network_types::{eth::EthHdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr};

use crate::frame::{ptr_at, read_at};

/// IPv4 more-fragments flag and fragment offset, in the header's (big-endian) layout: any
/// bit set means a fragment.
pub const IP_MF_OFFSET_MASK: u16 = 0x3fff;

/// Where the IP header starts, after Ethernet and at most one VLAN tag.
pub enum L3 {
    Ipv4(usize),
    Ipv6(usize),
    /// Another EtherType (ARP, stacked VLANs...).
    Other,
    /// Cut short inside Ethernet or the VLAN tag.
    Truncated,
}

#[inline(always)]
pub fn l3(ctx: &XdpContext) -> L3 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return L3::Truncated;
    };
    // SAFETY: ptr_at checked that the whole header is inside the frame.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut offset = EthHdr::LEN;
    if ether_type == ETH_P_8021Q.to_be() {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, offset) else {
            return L3::Truncated;
        };
        // SAFETY: as above.
        ether_type = unsafe { (*vlan).ether_type };
        offset += VlanHdr::LEN;
    }
    if ether_type == ETH_P_IP.to_be() {
        L3::Ipv4(offset)
    } else if ether_type == ETH_P_IPV6.to_be() {
        L3::Ipv6(offset)
    } else {
        L3::Other
    }
}

/// The transport header after IPv6's extension headers.
pub enum Ipv6Next {
    /// Protocol number and offset of its header.
    Transport(u8, usize),
    Fragment,
    /// Too many extension headers, or one cut short.
    Unwalked,
}

/// Walks hop-by-hop, routing and destination-options headers (at most
/// MAX_IPV6_EXT_HEADERS); stops at the first other header.
#[inline(always)]
pub fn ipv6_next(ctx: &XdpContext, mut next: u8, mut offset: usize) -> Ipv6Next {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            0 | 43 | 60 => {
                let Some([nh, len]) = read_at::<[u8; 2]>(ctx, offset) else {
                    return Ipv6Next::Unwalked;
                };
                next = nh;
                offset += (len as usize + 1) * 8;
            }
            44 => return Ipv6Next::Fragment,
            _ => return Ipv6Next::Transport(next, offset),
        }
    }
    match next {
        0 | 43 | 60 => Ipv6Next::Unwalked,
        44 => Ipv6Next::Fragment,
        _ => Ipv6Next::Transport(next, offset),
    }
}

/// The L4 header's first four bytes (source and destination port, as on the wire) and the
/// TCP flags (0 for UDP), if the frame holds the protocol's whole header at `offset`.
#[inline(always)]
pub fn l4_ports(ctx: &XdpContext, offset: usize, proto: u8) -> Option<(u32, TcpFlags)> {
    if proto == IPPROTO_TCP {
        let tcp = ptr_at::<TcpHdr>(ctx, offset)? as *const u8;
        // SAFETY: the whole TCP header is inside the frame: bytes 0..4 are the ports, 13 the flags.
        unsafe { Some(((tcp as *const u32).read_unaligned(), TcpFlags(*tcp.add(13)))) }
    } else {
        let udp = ptr_at::<UdpHdr>(ctx, offset)? as *const u32;
        // SAFETY: the whole UDP header is inside the frame.
        unsafe { Some((udp.read_unaligned(), TcpFlags(0))) }
    }
}

/// Rewrites the Ethernet addresses in place.
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, dst: [u16; 3], src: [u16; 3]) -> Option<()> {
    let p = ptr_at::<[u16; 6]>(ctx, 0)?;
    // SAFETY: 12 bytes inside the frame; XDP frames start 2-byte aligned.
    unsafe { *p = [dst[0], dst[1], dst[2], src[0], src[1], src[2]] };
    Some(())
}

/// Swaps the Ethernet source and destination addresses.
#[inline(always)]
pub fn swap_macs(ctx: &XdpContext) -> Option<()> {
    let m = crate::frame::words_at::<6>(ctx, 0)?;
    set_macs(ctx, [m[3], m[4], m[5]], [m[0], m[1], m[2]])
}
