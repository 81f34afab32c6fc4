//! One vocabulary for what the data path did with a frame: it indexes the per-CPU statistics
//! and names the metrics. Every frame is counted exactly once, at its exit.
use crate::XdpAction;

macro_rules! counted_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal,)+ }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            /// Every value, in discriminant order: the statistics array's layout.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// Number of values: the size of the statistics array.
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable snake_case name, used in logs and metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

counted_enum! {
    /// Why the balancer returned the verdict it did.
    Reason {
        /// XDP_PASS: neither IPv4 nor IPv6 (ARP and the rest go to the kernel untouched).
        PassNotIp = 0 => "pass_not_ip",
        /// XDP_PASS: the destination is not a VIP.
        PassNotVip = 1 => "pass_not_vip",
        /// XDP_PASS: Ethernet, VLAN or IP header cut short or inconsistent: the stack judges it.
        PassMalformed = 2 => "pass_malformed",
        /// XDP_PASS: ICMP or ICMPv6 to a VIP, answered by the balancer host itself (ping, PMTU).
        PassVipIcmp = 3 => "pass_vip_icmp",
        /// XDP_TX: MACs rewritten to a backend (L2 DSR).
        TxForwarded = 4 => "tx_forwarded",
        /// XDP_DROP: VIP, but no service on this port and protocol.
        DropUnknownService = 5 => "drop_unknown_service",
        /// XDP_DROP: the service has no usable backend.
        DropNoBackend = 6 => "drop_no_backend",
        /// XDP_DROP: TCP or UDP to a VIP cut short: its header (by the frame or by the IP length
        /// field), or the packet (an IP length field past the frame's end).
        DropTruncatedL4 = 7 => "drop_truncated_l4",
        /// XDP_DROP: fragment to a VIP (later fragments carry no ports to hash).
        DropFragment = 8 => "drop_fragment",
        /// XDP_DROP: IPv4 options, or an IPv6 extension header we do not walk, to a VIP.
        DropIpOptions = 9 => "drop_ip_options",
        /// XDP_TX: encapsulated to a backend, out of the interface it came in on.
        TxEncap = 10 => "tx_encap",
        /// XDP_REDIRECT: encapsulated to a backend, out of another interface.
        RedirectEncap = 11 => "redirect_encap",
        /// XDP_PASS: encapsulated, but the kernel has no neighbour entry for the next hop yet:
        /// the stack forwards this one and resolves the neighbour for the next.
        PassNoNeighbour = 12 => "pass_no_neighbour",
        /// XDP_TX: too big once encapsulated; answered with ICMP "fragmentation needed" or
        /// ICMPv6 "packet too big".
        TxTooBig = 13 => "tx_too_big",
        /// XDP_DROP: no route to the backend (or the kernel's FIB said blackhole/unreachable).
        DropNoRoute = 14 => "drop_no_route",
        /// XDP_DROP: the frame could not be grown or shrunk (bpf_xdp_adjust_head/tail failed).
        DropAdjustFailed = 15 => "drop_adjust_failed",
        /// XDP_DROP: too big once encapsulated, as for tx_too_big, but from a source that is no
        /// single host (0/8, 127/8, 224/4, 240/4; ::, ::1, ff00::/8): no ICMP error may go to it
        /// (RFC 1122 3.2.2, RFC 4443 2.4 (e)).
        DropTooBigBadSource = 16 => "drop_too_big_bad_source",
    }
}

counted_enum! {
    /// What the flow table did for a packet to a service.
    FlowEvent {
        /// Pinned flow found (in the flow table, or this CPU's flow cache); its backend is still
        /// in the service.
        Hit = 0 => "hit",
        /// New flow: chosen by Maglev and pinned.
        New = 1 => "new",
        /// New flow over the per-CPU rate: chosen by Maglev, not pinned.
        RateLimited = 2 => "rate_limited",
        /// Pinned flow whose backend left the service (or whose UDP entry expired): re-hashed.
        Stale = 3 => "stale",
        /// TCP RST: the entry is removed.
        Closed = 4 => "closed",
        /// Pinned flow found in another CPU's table (its packets came in on another CPU before):
        /// used there, or moved to this CPU's table; then counted as a hit too.
        OtherCpu = 5 => "other_cpu",
    }
}

counted_enum! {
    /// What the decapsulating program (the backend side of L3 DSR) did with a frame. Every
    /// verdict is XDP_PASS: the program only ever removes an outer header.
    DecapReason {
        /// Untouched: neither IPv4 protocol 4 nor IPv6 next header 41 (outer IPv6 extension
        /// headers are not walked), an outer IPv4 fragment, or not IP at all.
        PassNotEncap = 0 => "pass_not_encap",
        /// Untouched: encapsulated, but the outer destination is not one of this host's
        /// accepted addresses (DECAP_ADDRS).
        PassNotForUs = 1 => "pass_not_for_us",
        /// Untouched: Ethernet, VLAN, outer or inner header cut short or inconsistent (version,
        /// IHL, outer IPv4 options, lengths that disagree, inner family not the outer one).
        PassMalformed = 2 => "pass_malformed",
        /// The outer header was removed; the inner packet goes up the stack.
        Decapsulated = 3 => "decapsulated",
    }
}

impl DecapReason {
    /// The XDP action: always XDP_PASS.
    pub const fn action(self) -> XdpAction {
        XdpAction::Pass
    }
}

impl Reason {
    /// The XDP action that goes with the reason.
    pub const fn action(self) -> XdpAction {
        match self {
            Reason::PassNotIp
            | Reason::PassNotVip
            | Reason::PassMalformed
            | Reason::PassVipIcmp
            | Reason::PassNoNeighbour => XdpAction::Pass,
            Reason::TxForwarded | Reason::TxEncap | Reason::TxTooBig => XdpAction::Tx,
            Reason::RedirectEncap => XdpAction::Redirect,
            Reason::DropUnknownService
            | Reason::DropNoBackend
            | Reason::DropTruncatedL4
            | Reason::DropFragment
            | Reason::DropIpOptions
            | Reason::DropNoRoute
            | Reason::DropAdjustFailed
            | Reason::DropTooBigBadSource => XdpAction::Drop,
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
        for (i, r) in FlowEvent::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in DecapReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
