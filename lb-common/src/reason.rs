//! One vocabulary for what the data path did with a frame: it indexes the per-CPU statistics
//! and names the metrics. Every frame is counted exactly once, at its exit.

/// Why the balancer returned the verdict it did.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// XDP_PASS: not IPv4 (ARP, IPv6 and the rest go to the kernel untouched).
    PassNotIpv4 = 0,
    /// XDP_PASS: IPv4, but the destination is not a VIP.
    PassNotVip = 1,
    /// XDP_PASS: Ethernet, VLAN or IPv4 header truncated or not IPv4: the kernel's stack judges it.
    PassMalformed = 2,
    /// XDP_PASS: ICMP to a VIP, answered by the balancer host itself (ping, PMTU).
    PassVipIcmp = 3,
    /// XDP_TX: rewritten to a backend (L2 DSR).
    TxForwarded = 4,
    /// XDP_DROP: VIP, but no service on this port and protocol.
    DropUnknownService = 5,
    /// XDP_DROP: the service has no usable backend.
    DropNoBackend = 6,
    /// XDP_DROP: TCP or UDP header to a VIP cut short.
    DropTruncatedL4 = 7,
    /// XDP_DROP: IPv4 fragment to a VIP (later fragments carry no ports to hash).
    DropFragment = 8,
    /// XDP_DROP: IPv4 header with options to a VIP.
    DropIpOptions = 9,
}

impl Reason {
    /// Number of reasons: the size of the statistics array.
    pub const COUNT: u32 = 10;

    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNotIpv4,
        Reason::PassNotVip,
        Reason::PassMalformed,
        Reason::PassVipIcmp,
        Reason::TxForwarded,
        Reason::DropUnknownService,
        Reason::DropNoBackend,
        Reason::DropTruncatedL4,
        Reason::DropFragment,
        Reason::DropIpOptions,
    ];

    /// Stable snake_case name, used in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassVipIcmp => "pass_vip_icmp",
            Reason::TxForwarded => "tx_forwarded",
            Reason::DropUnknownService => "drop_unknown_service",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropTruncatedL4 => "drop_truncated_l4",
            Reason::DropFragment => "drop_fragment",
            Reason::DropIpOptions => "drop_ip_options",
        }
    }

    /// The XDP action that goes with the reason (XDP_DROP = 1, XDP_PASS = 2, XDP_TX = 3).
    pub const fn action(self) -> u32 {
        match self {
            Reason::PassNotIpv4 | Reason::PassNotVip | Reason::PassMalformed | Reason::PassVipIcmp => 2,
            Reason::TxForwarded => 3,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_indexed_by_discriminant() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
