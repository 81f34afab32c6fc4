//! The backend side of L3 DSR: strips the outer IPv4 (protocol 4) or IPv6 (next header 41) header
//! of packets sent to one of this host's addresses, so that the client's packet goes up the stack.
//!
//! It runs for every frame a backend receives, so what is not encapsulated leaves after the
//! EtherType and one protocol byte. What the balancer never writes is left to the stack untouched
//! (which has no tunnel device and drops it): outer IPv4 options (counted as malformed), outer
//! IPv6 extension headers, and outer fragments (the stack would reassemble them, but after XDP, so
//! nothing decapsulates the result). The outer IPv4 checksum is not verified: the Ethernet FCS
//! already guards the frame. A congestion mark (ECN CE) on the outer header is copied to an
//! ECN-capable inner packet, as RFC 6040 asks of a decapsulator.
use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{reason::DecapReason, FAMILY_V4, FAMILY_V6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HDR, IPV6_HDR};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    csum, frame,
    maps::DECAP_ADDRS,
    parse::{self, L3},
};

/// Offsets of the destination address in the IPv4 and IPv6 headers.
const IPV4_DST: usize = 16;
const IPV6_DST: usize = 24;
/// Version 4, IHL 5: the only outer IPv4 header the balancer writes.
const IPV4_VIHL_NO_OPTIONS: u8 = 0x45;
/// The two ECN bits of the IPv4 TOS / IPv6 traffic class, and their "congestion experienced" value.
const ECN_MASK: u8 = 0b11;
const ECN_CE: u8 = 0b11;

/// Decides the fate of one frame and carries it out; the caller counts the reason. Every
/// verdict is XDP_PASS; only `Decapsulated` changes the frame.
#[inline(always)]
pub fn decap(ctx: &XdpContext) -> DecapReason {
    let checked = match parse::l3(ctx) {
        L3::Ipv4(l3) => outer_v4(ctx, l3).map(|()| (l3, IPV4_HDR)),
        L3::Ipv6(l3) => outer_v6(ctx, l3).map(|()| (l3, IPV6_HDR)),
        L3::Other => Err(DecapReason::PassNotEncap),
        L3::Truncated => Err(DecapReason::PassMalformed),
    };
    let (l2_len, outer_len) = match checked {
        Ok(found) => found,
        Err(reason) => return reason,
    };
    // Every header was checked above, so neither step can fail on a real frame.
    let stripped = if outer_len == IPV4_HDR { strip::<IPV4_HDR>(ctx, l2_len) } else { strip::<IPV6_HDR>(ctx, l2_len) };
    match stripped {
        Some(()) => DecapReason::Decapsulated,
        None => DecapReason::PassMalformed,
    }
}

/// Whether `key` (a `VipKey` as five words, see [`dst_v4`]) is an address we accept.
#[inline(always)]
fn accepts(key: [u32; 5]) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { DECAP_ADDRS.get(&crate::maps::vip_key(key)) }.is_some()
}

/// The lookup key of the IPv4 destination at `l3`, as VipKey's words: the address, zeros, the
/// family byte and padding. Built from 16-bit loads: the header's byte arrays are read byte by
/// byte, and a VipKey literal zeroes its padding field with a call of a byte-wise memset.
#[inline(always)]
fn dst_v4(ctx: &XdpContext, l3: usize) -> Option<[u32; 5]> {
    let p = frame::ptr_at::<[u16; 2]>(ctx, l3 + IPV4_DST)?;
    // SAFETY: inside the frame, checked by ptr_at; 2-byte aligned as the frame is.
    let a = unsafe { p.read() };
    Some([join(a[0], a[1]), 0, 0, 0, u32::from_ne_bytes([FAMILY_V4, 0, 0, 0])])
}

/// As [`dst_v4`], for the IPv6 destination at `l3`.
#[inline(always)]
fn dst_v6(ctx: &XdpContext, l3: usize) -> Option<[u32; 5]> {
    let p = frame::ptr_at::<[u16; 8]>(ctx, l3 + IPV6_DST)?;
    // SAFETY: as in dst_v4.
    let a = unsafe { p.read() };
    Some([
        join(a[0], a[1]),
        join(a[2], a[3]),
        join(a[4], a[5]),
        join(a[6], a[7]),
        u32::from_ne_bytes([FAMILY_V6, 0, 0, 0]),
    ])
}

/// Two 16-bit words in memory order as one 32-bit word in memory order.
#[inline(always)]
fn join(first: u16, second: u16) -> u32 {
    u32::from(first) | (u32::from(second) << 16)
}
// `join` holds for little-endian targets only: bpfel.
const _: () = assert!(cfg!(target_endian = "little"));

/// An outer IPv4 header at `l3` that we strip: protocol 4, no options, not a fragment, to us,
/// followed by a whole IPv4 header whose length agrees with the outer one.
#[inline(always)]
fn outer_v4(ctx: &XdpContext, l3: usize) -> Result<(), DecapReason> {
    let outer: &Ipv4Hdr = frame::ref_at(ctx, l3).ok_or(DecapReason::PassMalformed)?;
    if outer.proto != IPPROTO_IPIP {
        return Err(DecapReason::PassNotEncap);
    }
    if outer.vihl != IPV4_VIHL_NO_OPTIONS {
        return Err(DecapReason::PassMalformed);
    }
    if u16::from_be_bytes(outer.frags) & parse::IP_MF_OFFSET_MASK != 0 {
        return Err(DecapReason::PassNotEncap);
    }
    if !accepts(dst_v4(ctx, l3).ok_or(DecapReason::PassMalformed)?) {
        return Err(DecapReason::PassNotForUs);
    }
    let inner_at = l3 + IPV4_HDR;
    let inner: &Ipv4Hdr = frame::ref_at(ctx, inner_at).ok_or(DecapReason::PassMalformed)?;
    if inner.vihl >> 4 != 4 || inner.vihl & 0x0f < 5 {
        return Err(DecapReason::PassMalformed);
    }
    // In 32 bits: modulo 2^16, an outer length below its own header (0..=19) would agree with
    // an inner one of 65516 or more.
    let inner_len = u32::from(u16::from_be_bytes(inner.tot_len));
    if u32::from(u16::from_be_bytes(outer.tot_len)) != inner_len + IPV4_HDR as u32 {
        return Err(DecapReason::PassMalformed);
    }
    if outer.tos & ECN_MASK == ECN_CE {
        mark_ce_v4(ctx, inner_at);
    }
    Ok(())
}

/// An outer IPv6 header at `l3` that we strip: next header 41, to us, followed by a whole IPv6
/// header whose length agrees with the outer one.
#[inline(always)]
fn outer_v6(ctx: &XdpContext, l3: usize) -> Result<(), DecapReason> {
    let outer: &Ipv6Hdr = frame::ref_at(ctx, l3).ok_or(DecapReason::PassMalformed)?;
    if outer.next_hdr != IPPROTO_IPV6 {
        return Err(DecapReason::PassNotEncap);
    }
    if outer.vcf[0] >> 4 != 6 {
        return Err(DecapReason::PassMalformed);
    }
    if !accepts(dst_v6(ctx, l3).ok_or(DecapReason::PassMalformed)?) {
        return Err(DecapReason::PassNotForUs);
    }
    let inner_at = l3 + IPV6_HDR;
    let inner: &Ipv6Hdr = frame::ref_at(ctx, inner_at).ok_or(DecapReason::PassMalformed)?;
    if inner.vcf[0] >> 4 != 6 {
        return Err(DecapReason::PassMalformed);
    }
    // In 32 bits, as for IPv4: an outer payload of 0..=39 must not agree with an inner one of
    // 65496 or more.
    let inner_payload = u32::from(u16::from_be_bytes(inner.payload_len));
    if u32::from(u16::from_be_bytes(outer.payload_len)) != inner_payload + IPV6_HDR as u32 {
        return Err(DecapReason::PassMalformed);
    }
    if (outer.vcf[1] >> 4) & ECN_MASK == ECN_CE {
        mark_ce_v6(ctx, inner_at);
    }
    Ok(())
}

/// Sets CE on the IPv4 header at `at` if it is ECN-capable, updating its checksum (RFC 1624).
#[inline(always)]
fn mark_ce_v4(ctx: &XdpContext, at: usize) {
    let Some(p) = frame::ptr_at::<[u16; 6]>(ctx, at) else {
        return;
    };
    // SAFETY: 12 bytes inside the frame, checked by ptr_at; 2-byte aligned as the frame is.
    let words = unsafe { &mut *p };
    let old = words[0];
    let [vihl, tos] = old.to_ne_bytes();
    if tos & ECN_MASK == 0 {
        return;
    }
    let new = u16::from_ne_bytes([vihl, tos | ECN_CE]);
    words[0] = new;
    words[5] = csum::finish(u64::from(!words[5]) + u64::from(!old) + u64::from(new));
}

/// Sets CE on the IPv6 header at `at` if it is ECN-capable (no checksum to update).
#[inline(always)]
fn mark_ce_v6(ctx: &XdpContext, at: usize) {
    let Some(p) = frame::ptr_at::<u8>(ctx, at + 1) else {
        return;
    };
    // SAFETY: one byte inside the frame, checked by ptr_at.
    unsafe {
        if (*p >> 4) & ECN_MASK != 0 {
            *p |= ECN_CE << 4;
        }
    }
}

/// Moves the L2 header (`l2_len`: 14, or 18 with a VLAN tag: MACs, tag and EtherType, which
/// the inner packet shares with the outer one) forward by `OUTER` bytes onto the end of the
/// outer header, then drops the `OUTER` bytes in front.
#[inline(always)]
fn strip<const OUTER: usize>(ctx: &XdpContext, l2_len: usize) -> Option<()> {
    if l2_len == 18 {
        move_forward::<[u16; 9]>(ctx, OUTER)?;
    } else {
        move_forward::<[u16; 7]>(ctx, OUTER)?;
    }
    // SAFETY: the helper validates the delta (it must leave at least an Ethernet header).
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER as i32) } != 0 {
        return None;
    }
    Some(())
}

/// Copies the frame's first `size_of::<T>()` bytes to offset `by` (the two do not overlap:
/// `by` is an outer header's length, at least 20, and T at most 18 bytes).
#[inline(always)]
fn move_forward<T>(ctx: &XdpContext, by: usize) -> Option<()> {
    let src = frame::ptr_at::<T>(ctx, 0)?;
    let dst = frame::ptr_at::<T>(ctx, by)?;
    // SAFETY: both inside the frame (ptr_at), disjoint (see above), 2-byte aligned as the frame
    // is; a fixed-size copy of u16 words is inlined as word moves.
    unsafe { core::ptr::copy_nonoverlapping(src as *const T, dst, 1) };
    Some(())
}
