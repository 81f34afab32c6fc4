//! Checked views of frames the data path emitted: tests read fields by name through accessors
//! whose frame length was checked when the view was made (a short frame fails with a message
//! naming what is missing, never an index panic), instead of raw offsets.
use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{ETH_HDR, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_HDR, IPV6_HDR, VLAN_HDR};

/// Offset of the IP header: after Ethernet and at most one 802.1Q tag.
pub fn l3_offset(frame: &[u8]) -> usize {
    if frame.get(12..14) == Some(&ETH_P_8021Q.to_be_bytes()[..]) {
        ETH_HDR + VLAN_HDR
    } else {
        ETH_HDR
    }
}

/// The MAC address at `offset` (0: destination, 6: source).
pub fn mac_at(frame: &[u8], offset: usize) -> [u8; 6] {
    frame[offset..offset + 6].try_into().unwrap()
}

/// An Ethernet frame, at most one 802.1Q tag, and the IP header after it.
#[derive(Clone, Copy, Debug)]
pub struct EthView<'a> {
    frame: &'a [u8],
    l3: usize,
}

impl<'a> EthView<'a> {
    /// A view of `frame`; panics (failing the test) when it is shorter than its L2 header.
    pub fn new(frame: &'a [u8]) -> Self {
        assert!(frame.len() >= ETH_HDR, "frame of {} bytes: no Ethernet header", frame.len());
        let l3 = l3_offset(frame);
        assert!(frame.len() >= l3, "frame of {} bytes: cut inside its VLAN tag", frame.len());
        Self { frame, l3 }
    }

    pub fn dst_mac(&self) -> [u8; 6] {
        mac_at(self.frame, 0)
    }

    pub fn src_mac(&self) -> [u8; 6] {
        mac_at(self.frame, 6)
    }

    /// The VLAN id of the 802.1Q tag, if there is one.
    pub fn vlan(&self) -> Option<u16> {
        (self.l3 > ETH_HDR).then(|| u16::from_be_bytes([self.frame[14], self.frame[15]]) & 0x0fff)
    }

    /// The EtherType after the tag, if any.
    pub fn ether_type(&self) -> u16 {
        u16::from_be_bytes([self.frame[self.l3 - 2], self.frame[self.l3 - 1]])
    }

    /// Where the IP header starts.
    pub fn l3(&self) -> usize {
        self.l3
    }

    /// The bytes from the IP header on.
    pub fn payload(&self) -> &'a [u8] {
        &self.frame[self.l3..]
    }

    /// The IPv4 header; panics when the frame does not carry one whole.
    pub fn ipv4(&self) -> Ipv4View<'a> {
        assert_eq!(self.ether_type(), ETH_P_IP, "not IPv4");
        Ipv4View::new(self.payload())
    }

    /// The IPv6 header; panics when the frame does not carry one whole.
    pub fn ipv6(&self) -> Ipv6View<'a> {
        assert_eq!(self.ether_type(), ETH_P_IPV6, "not IPv6");
        Ipv6View::new(self.payload())
    }
}

/// An IPv4 header (without options) and what follows it.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4View<'a>(&'a [u8]);

impl<'a> Ipv4View<'a> {
    pub fn new(packet: &'a [u8]) -> Self {
        assert!(packet.len() >= IPV4_HDR, "IPv4 packet of {} bytes: header cut short", packet.len());
        assert_eq!(packet[0] >> 4, 4, "not IPv4");
        Self(packet)
    }

    pub fn tos(&self) -> u8 {
        self.0[1]
    }

    /// The total length field.
    pub fn total_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.0[2], self.0[3]]))
    }

    pub fn dont_fragment(&self) -> bool {
        self.0[6] & 0x40 != 0
    }

    pub fn ttl(&self) -> u8 {
        self.0[8]
    }

    pub fn protocol(&self) -> u8 {
        self.0[9]
    }

    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.0[12], self.0[13], self.0[14], self.0[15])
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.0[16], self.0[17], self.0[18], self.0[19])
    }

    /// Whether the header checksum is right.
    pub fn checksum_ok(&self) -> bool {
        super::build::checksum(&self.0[..IPV4_HDR]) == 0
    }

    /// What follows the header.
    pub fn payload(&self) -> &'a [u8] {
        &self.0[IPV4_HDR..]
    }
}

/// An IPv6 header and what follows it.
#[derive(Clone, Copy, Debug)]
pub struct Ipv6View<'a>(&'a [u8]);

impl<'a> Ipv6View<'a> {
    pub fn new(packet: &'a [u8]) -> Self {
        assert!(packet.len() >= IPV6_HDR, "IPv6 packet of {} bytes: header cut short", packet.len());
        assert_eq!(packet[0] >> 4, 6, "not IPv6");
        Self(packet)
    }

    pub fn traffic_class(&self) -> u8 {
        (self.0[0] << 4) | (self.0[1] >> 4)
    }

    pub fn flow_label(&self) -> u32 {
        u32::from_be_bytes([0, self.0[1] & 0x0f, self.0[2], self.0[3]])
    }

    /// The payload length field.
    pub fn payload_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.0[4], self.0[5]]))
    }

    pub fn next_header(&self) -> u8 {
        self.0[6]
    }

    pub fn hop_limit(&self) -> u8 {
        self.0[7]
    }

    pub fn src(&self) -> Ipv6Addr {
        Ipv6Addr::from(<[u8; 16]>::try_from(&self.0[8..24]).expect("16 bytes"))
    }

    pub fn dst(&self) -> Ipv6Addr {
        Ipv6Addr::from(<[u8; 16]>::try_from(&self.0[24..40]).expect("16 bytes"))
    }

    /// What follows the header.
    pub fn payload(&self) -> &'a [u8] {
        &self.0[IPV6_HDR..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Frame;

    #[test]
    fn views_read_what_the_builder_wrote() {
        let f = Frame::tcp(Ipv4Addr::new(10, 0, 0, 1), 1234, Ipv4Addr::new(10, 0, 0, 2), 80).vlan(42).build();
        let eth = EthView::new(&f);
        assert_eq!((eth.vlan(), eth.ether_type(), eth.l3()), (Some(42), ETH_P_IP, 18));
        let ip = eth.ipv4();
        assert_eq!((ip.src(), ip.dst(), ip.protocol()), (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 6));
        assert!(ip.checksum_ok() && ip.dont_fragment() && ip.total_len() == f.len() - 18);
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        let f = Frame::udp(v6, 1, "fd00::2".parse::<Ipv6Addr>().unwrap(), 53).build();
        let ip = EthView::new(&f).ipv6();
        assert_eq!((ip.src(), ip.next_header(), ip.payload_len()), (v6, 17, f.len() - 14 - 40));
    }
}
