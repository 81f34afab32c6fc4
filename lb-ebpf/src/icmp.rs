//! "Fragmentation needed" (ICMP) and "packet too big" (ICMPv6) answers to a client whose packet
//! would exceed the egress MTU once encapsulated. Built in place of the client's frame and sent
//! back out of the interface it came from; the source is the VIP the client talked to.
use aya_ebpf::{
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{Addr, FAMILY_V4, IPPROTO_ICMP, IPPROTO_ICMPV6, IPV4_HDR, IPV6_HDR};

use crate::{csum, encap::ipv4_header, frame, parse};

const ICMP_HDR: usize = 8;
/// Bytes of the client's transport header quoted back (RFC 792: at least 64 bits).
const QUOTED_L4: usize = 8;

/// Whether an ICMP error may be sent to `src` (an [`Addr`]: network-order words): only if it
/// names a single host. RFC 1122 3.2.2 forbids answering a zero, loopback, broadcast, multicast
/// or class E source: 0.0.0.0/8, 127.0.0.0/8, 224.0.0.0/4, 240.0.0.0/4 (255.255.255.255
/// included). RFC 4443 2.4 (e) forbids the unspecified address (::) and multicast (ff00::/8);
/// ::1 names no host on the wire either (RFC 4291 2.5.3). A spoofed source of that kind would
/// otherwise make the balancer send errors to a group, or to a host's own loopback.
#[inline(always)]
pub fn may_answer(family: u8, src: &Addr) -> bool {
    // The first word holds the first four bytes of the address, in memory (network) order.
    let first = src[0].to_ne_bytes()[0];
    if family == FAMILY_V4 {
        return first != 0 && first != 127 && first < 224;
    }
    let unspecified_or_loopback =
        src[0] == 0 && src[1] == 0 && src[2] == 0 && (src[3] == 0 || src[3] == u32::from_ne_bytes([0, 0, 0, 1]));
    first != 0xff && !unspecified_or_loopback
}

/// Grows the head by `grow` bytes and cuts the frame to `len`, keeping the L2 header's
/// EtherType and VLAN tag, with the MACs swapped. The client's packet then sits right where the
/// answer quotes it: after the new IP and ICMP headers.
#[inline(always)]
fn reshape(ctx: &XdpContext, l2: usize, grow: usize, len: usize) -> Option<()> {
    let macs: [u16; 6] = frame::words_at(ctx, 0)?;
    // SAFETY: the helpers validate the deltas against the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    let delta = len as i64 - frame::frame_len(ctx) as i64;
    // SAFETY: as above.
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return None;
    }
    crate::encap::move_l2(ctx, grow, l2)?;
    parse::set_macs(ctx, [macs[3], macs[4], macs[5]], [macs[0], macs[1], macs[2]])
}

/// Answers the IPv4 packet at `l3` with ICMP type 3 code 4 carrying `mtu`. Not inlined: a
/// rare path, kept off the hot path's stack.
#[inline(never)]
pub fn too_big_v4(ctx: &XdpContext, l3: usize, mtu: u16) -> Option<()> {
    // A call boundary loses the verifier's bounds: l3 is 14 or 18.
    let l3 = frame::l3_bounded(l3);
    let [src, dst]: [u32; 2] = frame::read_at(ctx, l3 + 12)?;
    let grow = IPV4_HDR + ICMP_HDR;
    reshape(ctx, l3, grow, l3 + grow + IPV4_HDR + QUOTED_L4)?;
    let len = (IPV4_HDR + ICMP_HDR + IPV4_HDR + QUOTED_L4) as u16;
    write(ctx, l3, ipv4_header(0, len, false, IPPROTO_ICMP, dst, src))?;
    let header = [u16::from_ne_bytes([3, 4]), 0, 0, mtu.to_be()];
    let quoted = frame::ref_at::<[u16; 14]>(ctx, l3 + IPV4_HDR + ICMP_HDR)?;
    let check = csum::finish(csum::sum_words(&header) + csum::sum_words(quoted));
    write(ctx, l3 + IPV4_HDR, [header[0], check, header[2], header[3]])
}

/// Answers the IPv6 packet at `l3` with ICMPv6 type 2 carrying `mtu`. Not inlined, as above;
/// writes straight into the frame, since an IPv6 header built on the stack would push the
/// call chain past the verifier's 512 bytes.
#[inline(never)]
pub fn too_big_v6(ctx: &XdpContext, l3: usize, mtu: u32) -> Option<()> {
    let l3 = frame::l3_bounded(l3);
    let grow = IPV6_HDR + ICMP_HDR;
    reshape(ctx, l3, grow, l3 + grow + IPV6_HDR + QUOTED_L4)?;
    let msg_len = (ICMP_HDR + IPV6_HDR + QUOTED_L4) as u16;
    // The client's header, quoted after ours: its source is our destination and vice versa.
    let quoted = frame::ptr_at::<[u32; 10]>(ctx, l3 + grow)?;
    let ip = frame::ptr_at::<[u32; 10]>(ctx, l3)?;
    let [l0, l1] = msg_len.to_be_bytes();
    // SAFETY: both are inside the frame, checked by ptr_at, and do not overlap.
    unsafe {
        (*ip)[0] = (6u32 << 28).to_be();
        (*ip)[1] = u32::from_ne_bytes([l0, l1, IPPROTO_ICMPV6, 64]);
        let mut i = 0;
        while i < 4 {
            (*ip)[2 + i] = (*quoted)[6 + i];
            (*ip)[6 + i] = (*quoted)[2 + i];
            i += 1;
        }
    }
    let header = [u16::from_ne_bytes([2, 0]), 0, ((mtu >> 16) as u16).to_be(), (mtu as u16).to_be()];
    let body = frame::ref_at::<[u16; 24]>(ctx, l3 + IPV6_HDR + ICMP_HDR)?;
    let addrs = frame::ref_at::<[u16; 16]>(ctx, l3 + 8)?;
    // The checksum covers a pseudo-header: addresses, length and next header.
    let pseudo = csum::sum_words(addrs) + u64::from(msg_len.to_be()) + u64::from((IPPROTO_ICMPV6 as u16).to_be());
    let check = csum::finish(pseudo + csum::sum_words(&header) + csum::sum_words(body));
    write(ctx, l3 + IPV6_HDR, [header[0], check, header[2], header[3]])
}

#[inline(always)]
fn write<T>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    let p = frame::ptr_at::<T>(ctx, offset)?;
    // SAFETY: inside the frame, checked by ptr_at.
    unsafe { p.write_unaligned(value) };
    Some(())
}
