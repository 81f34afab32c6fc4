//! Bounds-checked access to the frame and the header walk (Ethernet, one 802.1Q tag, IPv4,
//! TCP/UDP). Raw pointer arithmetic happens only in `ptr_at`.
use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;

/// Pointer to a `T` at `offset` in the frame, or None when the frame is too short for it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// Where the IPv4 header starts, after Ethernet and at most one VLAN tag.
pub enum L3 {
    Ipv4(usize),
    /// Another EtherType (ARP, IPv6, stacked VLANs...).
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
    } else {
        L3::Other
    }
}

/// The L4 header's first four bytes (source and destination port, network order), if the
/// frame holds the protocol's whole header at `offset`.
#[inline(always)]
pub fn l4_ports(ctx: &XdpContext, offset: usize, proto: u8) -> Option<u32> {
    let ports = match proto {
        lb_common::IPPROTO_TCP => ptr_at::<TcpHdr>(ctx, offset)? as *const u32,
        _ => ptr_at::<UdpHdr>(ctx, offset)? as *const u32,
    };
    // SAFETY: both headers are at least four bytes long and inside the frame.
    Some(unsafe { ports.read_unaligned() })
}

/// The IPv4 header at `offset`.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, offset: usize) -> Option<&Ipv4Hdr> {
    // SAFETY: inside the frame, and the frame outlives the program's run.
    ptr_at::<Ipv4Hdr>(ctx, offset).map(|p| unsafe { &*p })
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
    let p = ptr_at::<[u16; 6]>(ctx, 0)?;
    // SAFETY: as in set_macs.
    let m = unsafe { *p };
    set_macs(ctx, [m[3], m[4], m[5]], [m[0], m[1], m[2]])
}
