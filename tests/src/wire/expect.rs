//! The frames the data path must emit, built from its input independently of the data path:
//! encapsulation (IPIP, IP6IP6) and ICMP/ICMPv6 "too big" answers.
use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{IPV4_HDR, IPV6_HDR};

use super::{
    build::checksum,
    view::{l3_offset, mac_at},
};

/// Ethernet header with these MACs and the input's tag and EtherType.
fn l2(input: &[u8], dmac: [u8; 6], smac: [u8; 6]) -> Vec<u8> {
    let l3 = l3_offset(input);
    let mut f = Vec::with_capacity(input.len() + 64);
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&input[12..l3]);
    f
}

/// An IPv4 header without options (RFC 791), identification 0, TTL 64, with its checksum.
pub fn ipv4_header(tos: u8, total: u16, df: bool, proto: u8, src: Ipv4Addr, dst: Ipv4Addr) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = tos;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6] = if df { 0x40 } else { 0 };
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// The frame the balancer must emit when it encapsulates the IPv4 `input` (IPIP, RFC 2003)
/// from `src` to `dst`: MACs `dmac`/`smac`, the input's tag and EtherType, an outer header
/// carrying the inner one's TOS and DF, and the inner packet byte for byte.
pub fn expect_ipip_v4(input: &[u8], dmac: [u8; 6], smac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let l3 = l3_offset(input);
    let inner = &input[l3..];
    let inner_len = u16::from_be_bytes([inner[2], inner[3]]);
    let df = inner[6] & 0x40 != 0;
    let mut f = l2(input, dmac, smac);
    f.extend_from_slice(&ipv4_header(inner[1], inner_len + IPV4_HDR as u16, df, 4, src, dst));
    f.extend_from_slice(inner);
    f
}

/// As [`expect_ipip_v4`] for IPv6 in IPv6 (RFC 2473): traffic class copied, the flow label
/// given, next header 41, hop limit 64.
pub fn expect_ip6ip6(
    input: &[u8],
    dmac: [u8; 6],
    smac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    flow_label: u32,
) -> Vec<u8> {
    let l3 = l3_offset(input);
    let inner = &input[l3..];
    let tc = (inner[0] << 4) | (inner[1] >> 4);
    let inner_len = u16::from_be_bytes([inner[4], inner[5]]) + IPV6_HDR as u16;
    let mut f = l2(input, dmac, smac);
    let first = (6u32 << 28) | (u32::from(tc) << 20) | (flow_label & 0xf_ffff);
    f.extend_from_slice(&first.to_be_bytes());
    f.extend_from_slice(&inner_len.to_be_bytes());
    f.extend_from_slice(&[41, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(inner);
    f
}

/// The ICMP "fragmentation needed" (type 3 code 4, RFC 792/1191) answer to the IPv4 `input`:
/// MACs swapped, from the packet's destination to its source, quoting its header and the
/// first 8 bytes after it.
pub fn expect_too_big_v4(input: &[u8], mtu: u16) -> Vec<u8> {
    let l3 = l3_offset(input);
    let ip = &input[l3..];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let quoted = &ip[..IPV4_HDR + 8];
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = l2(input, mac_at(input, 6), mac_at(input, 0));
    f.extend_from_slice(&ipv4_header(0, (IPV4_HDR + icmp.len()) as u16, false, 1, dst, src));
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 "packet too big" (type 2, RFC 4443) answer to the IPv6 `input`: MACs swapped,
/// from its destination to its source, quoting its 40-byte header and the 8 bytes after it.
pub fn expect_too_big_v6(input: &[u8], mtu: u32) -> Vec<u8> {
    let l3 = l3_offset(input);
    let ip = &input[l3..];
    let src: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst: [u8; 16] = ip[24..40].try_into().unwrap();
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&ip[..IPV6_HDR + 8]);
    let c = icmpv6_checksum(dst.into(), src.into(), &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = l2(input, mac_at(input, 6), mac_at(input, 0));
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 64]);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 checksum of `msg` (its checksum field zero, or in place: then the result is 0
/// when it is right), over the IPv6 pseudo-header.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut buf = Vec::with_capacity(40 + msg.len());
    buf.extend_from_slice(&src.octets());
    buf.extend_from_slice(&dst.octets());
    buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    buf.extend_from_slice(&[0, 0, 0, 58]);
    buf.extend_from_slice(msg);
    checksum(&buf)
}
