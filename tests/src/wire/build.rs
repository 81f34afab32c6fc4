//! A small builder of Ethernet/IPv4/IPv6/TCP/UDP frames for BPF_PROG_TEST_RUN fixtures and the fuzz test.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{ETH_HDR, IPV4_HDR, IPV6_HDR, VLAN_HDR};

use super::view::l3_offset;

#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub ether_type: u16,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// Bytes of IPv4 options, or of IPv6 destination-options headers (a multiple of 8).
    pub ip_options: usize,
    /// The IPv4 flags/fragment-offset field as on the wire (0x2000 = MF); for IPv6, nonzero
    /// adds a fragment header with this offset/flags field.
    pub frag: u16,
    /// TCP flags (SYN by default).
    pub tcp_flags: u8,
    pub ttl: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A TCP SYN; IPv4 or IPv6 after the addresses.
    pub fn tcp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        let (src, dst) = (src.into(), dst.into());
        Self {
            dst_mac: [0x02, 0, 0, 0, 0, 0x03],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            ether_type: if src.is_ipv4() { 0x0800 } else { 0x86dd },
            src,
            dst,
            proto: 6,
            sport,
            dport,
            ip_options: 0,
            frag: if src.is_ipv4() { 0x4000 } else { 0 }, // DF
            tcp_flags: 0x02,
            ttl: 64,
            payload: b"hello".to_vec(),
        }
    }

    pub fn udp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        Self { proto: 17, ..Self::tcp(src, sport, dst, dport) }
    }

    /// An echo request (ICMP or ICMPv6 after the addresses).
    pub fn icmp(src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Self {
        let f = Self::tcp(src, 0, dst, 0);
        Self { proto: if f.src.is_ipv4() { 1 } else { 58 }, ..f }
    }

    pub fn tcp_flags(mut self, flags: u8) -> Self {
        self.tcp_flags = flags;
        self
    }

    pub fn payload(mut self, payload: Vec<u8>) -> Self {
        self.payload = payload;
        self
    }

    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    pub fn ip_options(mut self, bytes: usize) -> Self {
        self.ip_options = bytes;
        self
    }

    pub fn frag(mut self, field: u16) -> Self {
        self.frag = field;
        self
    }

    pub fn ether_type(mut self, t: u16) -> Self {
        self.ether_type = t;
        self
    }

    /// Offset of the IPv4 header in the built frame.
    pub fn l3_offset(&self) -> usize {
        ETH_HDR + if self.vlan.is_some() { VLAN_HDR } else { 0 }
    }

    /// Offset of the L4 header in the built frame.
    pub fn l4_offset(&self) -> usize {
        match self.src {
            IpAddr::V4(_) => self.l3_offset() + IPV4_HDR + self.ip_options,
            IpAddr::V6(_) => self.l3_offset() + IPV6_HDR + self.ip_options + if self.frag != 0 { 8 } else { 0 },
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(id) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        f.extend_from_slice(&self.ether_type.to_be_bytes());
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => self.ipv4(&mut f, src, dst),
            (IpAddr::V6(src), IpAddr::V6(dst)) => self.ipv6(&mut f, src, dst),
            _ => panic!("source and destination of different families"),
        }
        f
    }

    fn ipv4(&self, f: &mut Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr) {
        let l4 = self.l4();
        let ip_start = f.len();
        let ihl = (IPV4_HDR + self.ip_options) / 4;
        let total = (IPV4_HDR + self.ip_options + l4.len()) as u16;
        f.push(0x40 | ihl as u8);
        f.push(0);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&0x1234u16.to_be_bytes());
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.push(self.ttl);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        // Options: NOPs then end-of-list.
        f.extend(std::iter::repeat_n(1u8, self.ip_options.saturating_sub(1)));
        if self.ip_options > 0 {
            f.push(0);
        }
        let csum = checksum(&f[ip_start..]);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(&l4);
    }

    fn ipv6(&self, f: &mut Vec<u8>, src: Ipv6Addr, dst: Ipv6Addr) {
        let l4 = self.l4();
        // Extension headers: destination options (padded with PadN), then a fragment header.
        let mut ext = Vec::new();
        let mut next = self.proto;
        if self.frag != 0 {
            ext.splice(0..0, [next, 0, (self.frag >> 8) as u8, self.frag as u8, 0, 0, 0x12, 0x34]);
            next = 44;
        }
        if self.ip_options > 0 {
            let mut opts = vec![next, (self.ip_options / 8 - 1) as u8, 1, (self.ip_options - 4) as u8];
            opts.resize(self.ip_options, 0);
            ext.splice(0..0, opts);
            next = 60;
        }
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        f.push(next);
        f.push(self.ttl);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&ext);
        f.extend_from_slice(&l4);
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.proto {
            6 => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&1u32.to_be_bytes()); // seq
                l4.extend_from_slice(&0u32.to_be_bytes()); // ack
                l4.extend_from_slice(&[0x50, self.tcp_flags]); // data offset 5
                l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, csum, urg
            }
            17 => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            1 => l4.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]), // echo request
            58 => l4.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]), // echo request
            _ => {}
        }
        l4.extend_from_slice(&self.payload);
        l4
    }
}

/// The Internet checksum (RFC 1071).
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_valid_ipv4_header() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let f = Frame::tcp(a, 1000, a, 80).vlan(7).ip_options(4).build();
        let ip = &f[18..18 + 24];
        assert_eq!(checksum(ip), 0, "a header with its checksum sums to zero");
        assert_eq!(f[18] & 0x0f, 6);
        assert_eq!(f.len(), 18 + 24 + 20 + 5);
    }

    #[test]
    fn builds_ipv6_with_extension_headers() {
        let a: Ipv6Addr = "fd00::1".parse().unwrap();
        let f = Frame::udp(a, 1000, a, 53).ip_options(8).frag(0x0001).build();
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f[14 + 6], 60, "destination options first");
        assert_eq!(f[14 + 40], 44, "then a fragment header");
        assert_eq!(f[14 + 48], 17, "then UDP");
        let frame = Frame::udp(a, 1000, a, 53).ip_options(8).frag(0x0001);
        assert_eq!(frame.l4_offset(), 14 + 40 + 8 + 8);
    }
}

/// IPv6 extension headers for [`ipv6_with_ext`]: hop-by-hop (0), routing (43), destination
/// options (60) of 8 bytes; a fragment header (44) with this offset/flags field; an
/// authentication header (51) of 12 bytes.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    Fragment(u16),
    Auth,
}

/// `f` (IPv6, no extension headers of its own) with these extension headers, in this order,
/// between the IPv6 header and the transport header.
pub fn ipv6_with_ext(f: &Frame, chain: &[Ext]) -> Vec<u8> {
    assert!(f.src.is_ipv6() && f.ip_options == 0 && f.frag == 0);
    let frame = f.build();
    let l3 = l3_offset(&frame);
    let mut next = frame[l3 + 6];
    let mut ext = Vec::new();
    for e in chain.iter().rev() {
        let (kind, mut h) = match *e {
            Ext::HopByHop => (0u8, vec![0, 0, 1, 4, 0, 0, 0, 0]),
            Ext::Routing => (43, vec![0, 0, 0, 0, 0, 0, 0, 0]),
            Ext::DestOpts => (60, vec![0, 0, 1, 4, 0, 0, 0, 0]),
            Ext::Fragment(field) => (44, vec![0, 0, (field >> 8) as u8, field as u8, 0, 0, 0x12, 0x34]),
            Ext::Auth => (51, vec![0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]),
        };
        h[0] = next;
        next = kind;
        h.extend_from_slice(&ext);
        ext = h;
    }
    let mut out = frame[..l3 + IPV6_HDR].to_vec();
    out[l3 + 6] = next;
    let payload = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]) + ext.len() as u16;
    out[l3 + 4..l3 + 6].copy_from_slice(&payload.to_be_bytes());
    out.extend_from_slice(&ext);
    out.extend_from_slice(&frame[l3 + IPV6_HDR..]);
    out
}

/// Sets the IPv4 TOS (fixing the header checksum) or the IPv6 traffic class of a built frame.
pub fn set_tos(frame: &mut [u8], tos: u8) {
    let l3 = l3_offset(frame);
    if frame[l3] >> 4 == 4 {
        frame[l3 + 1] = tos;
        frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let ihl = usize::from(frame[l3] & 0x0f) * 4;
        let c = checksum(&frame[l3..l3 + ihl]);
        frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    } else {
        frame[l3] = 0x60 | (tos >> 4);
        frame[l3 + 1] = (frame[l3 + 1] & 0x0f) | (tos << 4);
    }
}
