//! Encapsulation for L3 DSR: IPv4 in IPv4 (protocol 4) and IPv6 in IPv6 (next header 41),
//! written in front of the client's packet with bpf_xdp_adjust_head.
use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Addr, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HDR, IPV6_HDR};

use crate::{csum, frame};

const TTL: u8 = 64;

/// Grows the frame's head by `grow` bytes and moves the L2 header (`l2_len` bytes: 14, or 18
/// with a VLAN tag) to the new front, MACs included: a frame handed to the stack must still be
/// addressed to our interface, or the kernel drops it as meant for another host.
#[inline(always)]
pub fn grow_head(ctx: &XdpContext, grow: usize, l2_len: usize) -> Option<()> {
    // SAFETY: the helper validates the delta against the frame's headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    move_l2(ctx, grow, l2_len)
}

/// After the head grew by `grow` bytes: moves the old L2 header, now at `grow`, to the front.
#[inline(always)]
pub fn move_l2(ctx: &XdpContext, grow: usize, l2_len: usize) -> Option<()> {
    // Word copies: an unaligned copy of the header compiles to a byte-by-byte memmove.
    if l2_len == 18 {
        frame::put_words(ctx, 0, frame::words_at::<9>(ctx, grow)?)
    } else {
        frame::put_words(ctx, 0, frame::words_at::<7>(ctx, grow)?)
    }
}

/// An IPv4 header (no options) with its checksum, as 16-bit words in memory order.
#[inline(always)]
pub fn ipv4_header(tos: u8, tot_len: u16, df: bool, proto: u8, src: u32, dst: u32) -> [u16; 10] {
    let [s0, s1, s2, s3] = src.to_ne_bytes();
    let [d0, d1, d2, d3] = dst.to_ne_bytes();
    let mut h = [
        u16::from_ne_bytes([0x45, tos]),
        tot_len.to_be(),
        0,
        if df { 0x4000u16.to_be() } else { 0 },
        u16::from_ne_bytes([TTL, proto]),
        0,
        u16::from_ne_bytes([s0, s1]),
        u16::from_ne_bytes([s2, s3]),
        u16::from_ne_bytes([d0, d1]),
        u16::from_ne_bytes([d2, d3]),
    ];
    h[5] = csum::finish(csum::sum_words(&h));
    h
}

/// An IPv6 header as 32-bit words in memory order.
#[inline(always)]
pub fn ipv6_header(
    traffic_class: u8,
    flow_label: u32,
    payload_len: u16,
    next: u8,
    src: &Addr,
    dst: &Addr,
) -> [u32; 10] {
    let [p0, p1] = payload_len.to_be_bytes();
    [
        ((6u32 << 28) | ((traffic_class as u32) << 20) | (flow_label & 0xf_ffff)).to_be(),
        u32::from_ne_bytes([p0, p1, next, TTL]),
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ]
}

/// Puts an outer IPv4 header (protocol 4) in front of the IPv4 packet at `l3`.
#[inline(always)]
pub fn ipip_v4(ctx: &XdpContext, l3: usize, inner_len: u16, tos: u8, df: bool, src: u32, dst: u32) -> Option<()> {
    let outer = ipv4_header(tos, inner_len.checked_add(IPV4_HDR as u16)?, df, IPPROTO_IPIP, src, dst);
    grow_head(ctx, IPV4_HDR, l3)?;
    frame::put_words(ctx, l3, outer)
}

/// Puts an outer IPv6 header (next header 41) in front of the IPv6 packet at `l3`.
#[inline(always)]
pub fn ip6ip6(
    ctx: &XdpContext,
    l3: usize,
    inner_len: u16,
    tc: u8,
    flow_label: u32,
    src: &Addr,
    dst: &Addr,
) -> Option<()> {
    let outer = ipv6_header(tc, flow_label, inner_len, IPPROTO_IPV6, src, dst);
    grow_head(ctx, IPV6_HDR, l3)?;
    // SAFETY: ten 32-bit words are twenty 16-bit words, in the same memory order.
    let words = unsafe { core::mem::transmute::<[u32; 10], [u16; 20]>(outer) };
    frame::put_words(ctx, l3, words)
}
