//! Wire constants (EtherTypes, IP protocol numbers, header lengths, flags) and the predicates
//! on them, once for the data path, the agent and the tests.

/// EtherTypes.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

/// Header lengths without options.
pub const ETH_HDR: usize = 14;
pub const VLAN_HDR: usize = 4;
pub const IPV4_HDR: usize = 20;
pub const IPV6_HDR: usize = 40;
pub const TCP_HDR: usize = 20;
pub const UDP_HDR: usize = 8;

/// IPv4 "don't fragment", in the flags and fragment offset word (host order).
pub const IP_DF: u16 = 0x4000;

pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 in IPv4: the outer header of L3 DSR for IPv4.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv6 in IPv6: the outer header of L3 DSR for IPv6.
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Address families, as the `family` byte of keys and values holds them.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// The verdicts of an XDP program (enum xdp_action).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAction {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

impl XdpAction {
    /// The value a program returns (and BPF_PROG_TEST_RUN reports).
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The action a program's return value names, if any.
    pub const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => XdpAction::Aborted,
            1 => XdpAction::Drop,
            2 => XdpAction::Pass,
            3 => XdpAction::Tx,
            4 => XdpAction::Redirect,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            XdpAction::Aborted => "XDP_ABORTED",
            XdpAction::Drop => "XDP_DROP",
            XdpAction::Pass => "XDP_PASS",
            XdpAction::Tx => "XDP_TX",
            XdpAction::Redirect => "XDP_REDIRECT",
        }
    }
}

/// The flags byte of a TCP header (byte 13).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;

    /// A reset: the connection is gone.
    #[inline(always)]
    pub const fn is_rst(self) -> bool {
        self.0 & Self::RST != 0
    }

    /// A SYN without ACK: a connection being opened (or its first SYN sent again).
    #[inline(always)]
    pub const fn is_syn_only(self) -> bool {
        self.0 & (Self::SYN | Self::ACK) == Self::SYN
    }

    /// A FIN or a RST: the connection is closing.
    #[inline(always)]
    pub const fn closes(self) -> bool {
        self.0 & (Self::FIN | Self::RST) != 0
    }

    /// An ACK without SYN, FIN or RST (data may ride on it): what completes the client's side
    /// of a handshake, and changes nothing else.
    #[inline(always)]
    pub const fn is_ack_only(self) -> bool {
        self.0 & (Self::ACK | Self::SYN | Self::RST | Self::FIN) == Self::ACK
    }

    /// Any of SYN, FIN, RST: a packet that may change the flow's state.
    #[inline(always)]
    pub const fn changes_state(self) -> bool {
        self.0 & (Self::FIN | Self::RST | Self::SYN) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::TcpFlags;

    #[test]
    fn tcp_flag_predicates() {
        let syn = TcpFlags(TcpFlags::SYN);
        let syn_ack = TcpFlags(TcpFlags::SYN | TcpFlags::ACK);
        let fin_ack = TcpFlags(TcpFlags::FIN | TcpFlags::ACK);
        assert!(syn.is_syn_only() && !syn_ack.is_syn_only() && !syn.is_rst() && !syn.closes());
        assert!(fin_ack.closes() && !fin_ack.is_rst() && TcpFlags(TcpFlags::RST).is_rst());
        assert!(syn.changes_state() && !TcpFlags(TcpFlags::ACK).changes_state());
        assert!(TcpFlags(TcpFlags::ACK | 0x08).is_ack_only() && !fin_ack.is_ack_only() && !syn_ack.is_ack_only());
    }
}
