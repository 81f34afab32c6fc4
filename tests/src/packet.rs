//! A small builder of Ethernet/IPv4/TCP/UDP frames for BPF_PROG_TEST_RUN fixtures.
use std::net::Ipv4Addr;

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const IPV4_LEN: usize = 20;

#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub ether_type: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// Bytes of IPv4 options (a multiple of 4).
    pub ip_options: usize,
    /// The IPv4 flags/fragment-offset field as on the wire (0x2000 = MF).
    pub frag: u16,
    pub ttl: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            dst_mac: [0x02, 0, 0, 0, 0, 0x03],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            ether_type: 0x0800,
            src,
            dst,
            proto: 6,
            sport,
            dport,
            ip_options: 0,
            frag: 0x4000, // DF
            ttl: 64,
            payload: b"hello".to_vec(),
        }
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self { proto: 17, ..Self::tcp(src, sport, dst, dport) }
    }

    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self { proto: 1, ..Self::tcp(src, 0, dst, 0) }
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
        ETH_LEN + if self.vlan.is_some() { VLAN_LEN } else { 0 }
    }

    /// Offset of the L4 header in the built frame.
    pub fn l4_offset(&self) -> usize {
        self.l3_offset() + IPV4_LEN + self.ip_options
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
        let l4 = self.l4();
        let ip_start = f.len();
        let ihl = (IPV4_LEN + self.ip_options) / 4;
        let total = (IPV4_LEN + self.ip_options + l4.len()) as u16;
        f.push(0x40 | ihl as u8);
        f.push(0);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&0x1234u16.to_be_bytes());
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.push(self.ttl);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        // Options: NOPs then end-of-list.
        f.extend(std::iter::repeat_n(1u8, self.ip_options.saturating_sub(1)));
        if self.ip_options > 0 {
            f.push(0);
        }
        let csum = checksum(&f[ip_start..]);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(&l4);
        f
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.proto {
            6 => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&1u32.to_be_bytes()); // seq
                l4.extend_from_slice(&0u32.to_be_bytes()); // ack
                l4.extend_from_slice(&[0x50, 0x02]); // data offset 5, SYN
                l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, csum, urg
            }
            17 => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            1 => l4.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]), // echo request
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
}
