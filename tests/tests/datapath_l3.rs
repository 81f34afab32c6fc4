//! The routed data path on crafted frames through BPF_PROG_TEST_RUN, in a namespace whose
//! routes and neighbours the balancer's FIB lookups see (tests/src/dpbed.rs): IPv6, extension
//! headers, IPIP/IP6IP6 encapsulation, ICMP "too big" answers, the no-neighbour and no-route
//! cases and the flow table. Every case checks its verdict, its exact output frame and its
//! counters. Needs root.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{
    Flow, FlowEvent, FlowKey, Reason, Settings, ETH_HDR, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_HDR,
    IPV6_HDR,
};
use xlb_tests::{
    bed::{XDP_PASS, XDP_REDIRECT, XDP_TX},
    dpbed::{
        backend_mac, encap_hash, flow_key, outer_src_v4, outer_src_v6, tcp, to_lb, udp, with_bed, Bed, DpBed, CLIENT4,
        CLIENT6, CLIENT_MAC, GW2_MAC, GW4_MAC, GW6_MAC, L2_V4, L2_V6, LB_MAC, LB_MAC2, PORT_IPIP, PORT_L2_TCP,
        PORT_L2_UDP, PORT_NO_NEIGH, PORT_NO_ROUTE, PORT_REDIRECT, PORT_TOO_BIG, SMALL_MTU, UDP_IDLE_NS, VIP4, VIP6,
    },
    wire::{
        build::{ipv6_with_ext, set_tos, Ext},
        checksum,
        expect::{expect_ip6ip6, expect_ipip_v4, expect_too_big_v4, expect_too_big_v6, icmpv6_checksum},
        view::{l3_offset, mac_at, EthView},
        Frame,
    },
};

use FlowEvent::{Closed, Hit, New, OtherCpu, RateLimited, Stale};

fn ipv4_of(addr: IpAddr) -> Ipv4Addr {
    match addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("{addr} is not IPv4"),
    }
}

fn ipv6_of(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => panic!("{addr} is not IPv6"),
    }
}

/// An L2 DSR hit: XDP_TX, only the MACs change (to the expected backend's, from veth0's).
/// Returns the backend.
fn assert_l2_hit(bed: &mut Bed, f: &Frame, events: &[FlowEvent]) -> u32 {
    let input = f.build();
    let backend = bed.expected_backend(f);
    let out = bed.run_flow(&input, Reason::TxForwarded, events);
    let mut expected = input.clone();
    expected[0..6].copy_from_slice(&backend_mac(backend));
    expected[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(out, expected, "only the MACs change");
    backend
}

/// The backend an L2 output frame went to, from its destination MAC.
fn l2_backend(out: &[u8]) -> u32 {
    let mac = mac_at(out, 0);
    assert_eq!(mac[..5], backend_mac(0)[..5], "not a backend MAC: {mac:02x?}");
    u32::from(mac[5])
}

/// The encapsulated frame the balancer must emit for `input` towards `backend`, with the MACs
/// of the route through veth0 (gateway's lladdr, veth0's MAC).
fn expected_encap(bed: &Bed, f: &Frame, input: &[u8], backend: u32) -> Vec<u8> {
    let hash = encap_hash(f);
    let addr = bed.backend(backend).addr;
    match f.src {
        IpAddr::V4(_) => expect_ipip_v4(input, GW4_MAC, LB_MAC, outer_src_v4(hash), ipv4_of(addr)),
        IpAddr::V6(_) => expect_ip6ip6(input, GW6_MAC, LB_MAC, outer_src_v6(hash), ipv6_of(addr), hash),
    }
}

/// Independent checks of an IPIP frame: outer header fields and checksum, inner untouched.
fn check_ipip_v4_fields(input: &[u8], out: &[u8], backend: Ipv4Addr) -> Ipv4Addr {
    let outer_eth = EthView::new(out);
    let outer = outer_eth.ipv4();
    let inner = EthView::new(input).ipv4();
    assert_eq!(outer_eth.payload()[0], 0x45, "version 4, IHL 5");
    assert_eq!(outer.tos(), inner.tos(), "TOS copied");
    assert_eq!(outer.total_len(), inner.total_len() + IPV4_HDR);
    assert_eq!(outer.dont_fragment(), inner.dont_fragment(), "DF as the inner packet's");
    assert_eq!(outer.ttl(), 64, "TTL");
    assert_eq!(outer.protocol(), 4, "protocol IPIP");
    assert!(outer.checksum_ok(), "outer header checksum");
    let src = outer.src();
    assert_eq!(src.octets()[..3], [10, 1, 0], "outer source inside 10.1.0.0/24");
    assert_eq!(outer.dst(), backend);
    assert_eq!(outer.payload(), EthView::new(input).payload(), "inner packet byte for byte");
    src
}

fn check_ip6ip6_fields(input: &[u8], out: &[u8], backend: Ipv6Addr, hash: u32) -> Ipv6Addr {
    let outer = EthView::new(out).ipv6();
    let inner = EthView::new(input).ipv6();
    let inner_bytes = EthView::new(input).payload();
    assert_eq!(outer.traffic_class(), inner.traffic_class(), "traffic class copied");
    assert_eq!(outer.flow_label(), hash & 0xf_ffff, "flow label from the hash");
    assert_eq!(outer.payload_len(), inner_bytes.len(), "payload length");
    assert_eq!(outer.next_header(), 41, "next header IPv6");
    assert_eq!(outer.hop_limit(), 64, "hop limit");
    let src = outer.src();
    assert_eq!(src.segments()[..7], [0xfd00, 1, 0, 0, 0, 0, 0], "outer source inside fd00:1::/112");
    assert_eq!(outer.dst(), backend);
    assert_eq!(outer.payload(), inner_bytes, "inner packet byte for byte");
    src
}

// ---- 1. IPv6 L2 DSR ------------------------------------------------------------------------

#[test]
fn ipv6_l2_hits_rewrite_only_the_macs() {
    with_bed(|bed| {
        let mut seen = HashSet::new();
        for sport in 40_000..40_030u16 {
            let f = tcp(CLIENT6, sport, VIP6, PORT_L2_TCP);
            let svc_id = bed.service(VIP6.into(), IPPROTO_TCP, PORT_L2_TCP).slot.id;
            let backend = bed.expected_backend(&f);
            let (svc0, be0) = (bed.dp.service_counters(svc_id).unwrap(), bed.dp.backend_counters(backend).unwrap());
            seen.insert(assert_l2_hit(bed, &f, &[New]));
            let (svc1, be1) = (bed.dp.service_counters(svc_id).unwrap(), bed.dp.backend_counters(backend).unwrap());
            assert_eq!(svc1.packets - svc0.packets, 1);
            assert_eq!((be1.packets - be0.packets, be1.bytes - be0.bytes), (1, f.build().len() as u64));
            assert_l2_hit(bed, &f, &[Hit]);
            let u = udp(CLIENT6, sport, VIP6, PORT_L2_UDP);
            assert_l2_hit(bed, &u, &[New]);
            assert_l2_hit(bed, &u, &[Hit]);
        }
        assert_eq!(seen, HashSet::from(L2_V6), "30 flows reach all three backends");
    });
}

// ---- 2. IPv6 extension headers -------------------------------------------------------------

#[test]
fn ipv6_extension_headers_are_walked() {
    with_bed(|bed| {
        let chains: [&[Ext]; 5] = [
            &[Ext::HopByHop],
            &[Ext::DestOpts],
            &[Ext::HopByHop, Ext::DestOpts],
            &[Ext::HopByHop, Ext::Routing, Ext::DestOpts],
            // MAX_IPV6_EXT_HEADERS = 4: the longest chain that is walked.
            &[Ext::HopByHop, Ext::DestOpts, Ext::Routing, Ext::DestOpts],
        ];
        for (i, chain) in chains.into_iter().enumerate() {
            for f in [tcp(CLIENT6, 41_000 + i as u16, VIP6, PORT_L2_TCP), udp(CLIENT6, 41_000, VIP6, PORT_L2_UDP)] {
                let input = ipv6_with_ext(&f, chain);
                let backend = bed.expected_backend(&f);
                let out = bed.run_counted(&input, Reason::TxForwarded);
                let mut expected = input.clone();
                expected[0..6].copy_from_slice(&backend_mac(backend));
                expected[6..12].copy_from_slice(&LB_MAC);
                assert_eq!(out, expected, "chain {chain:?}: only the MACs change");
            }
        }
        // A 16-byte destination-options header (length field 1), from the frame builder.
        let f = tcp(CLIENT6, 41_100, VIP6, PORT_L2_TCP).ip_options(16);
        let input = f.build();
        let out = bed.run_counted(&input, Reason::TxForwarded);
        assert_eq!(out[0..6], backend_mac(bed.expected_backend(&f)));
        assert_eq!(out[12..], input[12..]);
    });
}

#[test]
fn ipv6_fragments_too_many_headers_and_other_protocols() {
    with_bed(|bed| {
        let f = tcp(CLIENT6, 42_000, VIP6, PORT_L2_TCP);
        let u = udp(CLIENT6, 42_000, VIP6, PORT_L2_UDP);
        // Fragment headers: first fragment (MF), a later one, after a walked header.
        bed.run_flow(&ipv6_with_ext(&u, &[Ext::Fragment(0x0001)]), Reason::DropFragment, &[]);
        bed.run_flow(&ipv6_with_ext(&u, &[Ext::Fragment(0x0100)]), Reason::DropFragment, &[]);
        bed.run_flow(&ipv6_with_ext(&f, &[Ext::HopByHop, Ext::Fragment(0x0001)]), Reason::DropFragment, &[]);
        bed.run_counted(
            &udp(CLIENT6, 42_000, VIP6, PORT_L2_UDP).ip_options(8).frag(0x0001).build(),
            Reason::DropFragment,
        );
        // One more header than MAX_IPV6_EXT_HEADERS.
        let five = [Ext::HopByHop, Ext::DestOpts, Ext::Routing, Ext::DestOpts, Ext::DestOpts];
        bed.run_flow(&ipv6_with_ext(&f, &five), Reason::DropIpOptions, &[]);
        // A fragment header right after the longest walked chain is still seen as one.
        let four_and_frag = [Ext::HopByHop, Ext::DestOpts, Ext::Routing, Ext::DestOpts, Ext::Fragment(1)];
        bed.run_flow(&ipv6_with_ext(&f, &four_and_frag), Reason::DropFragment, &[]);
        // AH is not walked: protocol 51 has no service.
        bed.run_flow(&ipv6_with_ext(&f, &[Ext::Auth]), Reason::DropUnknownService, &[]);
        bed.run_flow(&ipv6_with_ext(&f, &[Ext::HopByHop, Ext::Auth]), Reason::DropUnknownService, &[]);
        // A port or protocol without service.
        bed.run_flow(&tcp(CLIENT6, 42_000, VIP6, 81).build(), Reason::DropUnknownService, &[]);
        bed.run_flow(&udp(CLIENT6, 42_000, VIP6, PORT_L2_TCP).build(), Reason::DropUnknownService, &[]);
    });
}

#[test]
fn ipv6_traffic_for_the_host_passes_untouched() {
    with_bed(|bed| {
        let icmp = Frame::icmp(CLIENT6, VIP6);
        bed.assert_untouched(&icmp.build(), Reason::PassVipIcmp);
        bed.assert_untouched(&ipv6_with_ext(&icmp, &[Ext::HopByHop]), Reason::PassVipIcmp);
        let other: Ipv6Addr = "fd00:99::101".parse().unwrap();
        bed.assert_untouched(&tcp(CLIENT6, 1234, other, PORT_L2_TCP).build(), Reason::PassNotVip);
        bed.assert_untouched(&udp(CLIENT6, 1234, other, 53).vlan(5).build(), Reason::PassNotVip);
        bed.assert_untouched(&ipv6_with_ext(&udp(CLIENT6, 1, other, 53), &[Ext::Fragment(1)]), Reason::PassNotVip);
        let five = [Ext::HopByHop, Ext::DestOpts, Ext::Routing, Ext::DestOpts, Ext::DestOpts];
        bed.assert_untouched(&ipv6_with_ext(&tcp(CLIENT6, 1, other, 80), &five), Reason::PassNotVip);
        // The IPv4 VIP's address family does not leak: an IPv6 address with VIP4's bytes.
        let mut v4_bytes = [0u8; 16];
        v4_bytes[..4].copy_from_slice(&VIP4.octets());
        bed.assert_untouched(&tcp(CLIENT6, 1, Ipv6Addr::from(v4_bytes), 80).build(), Reason::PassNotVip);
    });
}

#[test]
fn truncated_ipv6_gets_a_safe_verdict() {
    with_bed(|bed| {
        let f = tcp(CLIENT6, 1234, VIP6, PORT_L2_TCP);
        let input = f.build();
        for cut in [ETH_HDR, ETH_HDR + 1, ETH_HDR + 24, ETH_HDR + IPV6_HDR - 1] {
            bed.assert_untouched(&input[..cut], Reason::PassMalformed);
        }
        let tagged = f.clone().vlan(3).build();
        bed.assert_untouched(&tagged[..ETH_HDR + 4 + IPV6_HDR - 1], Reason::PassMalformed);
        let mut bad_version = input.clone();
        bad_version[ETH_HDR] = 0x40;
        bed.assert_untouched(&bad_version, Reason::PassMalformed);
        // The transport header cut short, with and without extension headers.
        for cut in [ETH_HDR + IPV6_HDR, ETH_HDR + IPV6_HDR + 19] {
            bed.run_flow(&input[..cut], Reason::DropTruncatedL4, &[]);
        }
        let udp_in = udp(CLIENT6, 1234, VIP6, PORT_L2_UDP).build();
        bed.run_flow(&udp_in[..ETH_HDR + IPV6_HDR + 7], Reason::DropTruncatedL4, &[]);
        let ext = ipv6_with_ext(&f, &[Ext::HopByHop, Ext::DestOpts]);
        bed.run_flow(&ext[..ETH_HDR + IPV6_HDR + 16 + 10], Reason::DropTruncatedL4, &[]);
        // An extension header cut short is not walked.
        bed.run_flow(&ext[..ETH_HDR + IPV6_HDR + 8 + 1], Reason::DropIpOptions, &[]);
    });
}

// ---- 3. Encapsulation ----------------------------------------------------------------------

/// One family of the encapsulation tests: who sends, to which gateway, and how a frame of it
/// is varied (no DF, an extension header) besides TCP/UDP and a TOS.
struct EncapCase {
    name: &'static str,
    client: IpAddr,
    vip: IpAddr,
    first_port: u16,
    gateway_mac: [u8; 6],
    ether_type: u16,
}

const ENCAP_CASES: [EncapCase; 2] = [
    EncapCase {
        name: "ipip",
        client: IpAddr::V4(CLIENT4),
        vip: IpAddr::V4(VIP4),
        first_port: 43_000,
        gateway_mac: GW4_MAC,
        ether_type: ETH_P_IP,
    },
    EncapCase {
        name: "ip6ip6",
        client: IpAddr::V6(CLIENT6),
        vip: IpAddr::V6(VIP6),
        first_port: 44_000,
        gateway_mac: GW6_MAC,
        ether_type: ETH_P_IPV6,
    },
];

#[test]
fn encapsulated_frames_are_exact() {
    with_bed(|bed| {
        for case in &ENCAP_CASES {
            let mut sources = HashSet::new();
            let mut backends = HashSet::new();
            for (i, sport) in (case.first_port..case.first_port + 24).enumerate() {
                let (c, v) = (case.client, case.vip);
                let mut f = if i % 2 == 0 { tcp(c, sport, v, PORT_IPIP) } else { udp(c, sport, v, PORT_IPIP) };
                if c.is_ipv4() && i % 3 == 0 {
                    f = f.frag(0); // no DF
                }
                let mut input = if c.is_ipv6() && i % 5 == 2 { ipv6_with_ext(&f, &[Ext::HopByHop]) } else { f.build() };
                if i % 4 == 1 {
                    set_tos(&mut input, 0xb8);
                }
                let backend = bed.expected_backend(&f);
                backends.insert(backend);
                let be0 = bed.dp.backend_counters(backend).unwrap();
                let out = bed.run_flow(&input, Reason::TxEncap, &[New]);
                assert_eq!(out, expected_encap(bed, &f, &input, backend), "{} flow {i}", case.name);
                let eth = EthView::new(&out);
                assert_eq!(eth.dst_mac(), case.gateway_mac, "to the gateway's lladdr");
                assert_eq!(eth.src_mac(), LB_MAC, "from veth0");
                assert_eq!(eth.ether_type(), case.ether_type);
                let source: IpAddr = match bed.backend(backend).addr {
                    IpAddr::V4(addr) => check_ipip_v4_fields(&input, &out, addr).into(),
                    IpAddr::V6(addr) => check_ip6ip6_fields(&input, &out, addr, encap_hash(&f)).into(),
                };
                sources.insert(source);
                let be1 = bed.dp.backend_counters(backend).unwrap();
                assert_eq!((be1.packets - be0.packets, be1.bytes - be0.bytes), (1, input.len() as u64));
                // The pinned flow: the same frame again.
                assert_eq!(bed.run_flow(&input, Reason::TxEncap, &[Hit]), out);
            }
            assert_eq!(backends.len(), 3, "{}: 24 flows reach all three backends", case.name);
            assert!(sources.len() > 12, "{}: the outer source varies with the flow: {sources:?}", case.name);
        }
    });
}

#[test]
fn vlan_tagged_ipip_keeps_its_tag() {
    with_bed(|bed| {
        for f in [tcp(CLIENT4, 45_000, VIP4, PORT_IPIP).vlan(42), tcp(CLIENT6, 45_000, VIP6, PORT_IPIP).vlan(42)] {
            let input = f.build();
            let backend = bed.expected_backend(&f);
            let out = bed.run_counted(&input, Reason::TxEncap);
            assert_eq!(EthView::new(&out).vlan(), Some(42), "tag kept");
            assert_eq!(out, expected_encap(bed, &f, &input, backend));
            match f.src {
                IpAddr::V4(_) => {
                    check_ipip_v4_fields(&input, &out, ipv4_of(bed.backend(backend).addr));
                }
                IpAddr::V6(_) => {
                    check_ip6ip6_fields(&input, &out, ipv6_of(bed.backend(backend).addr), encap_hash(&f));
                }
            }
        }
    });
}

#[test]
fn another_egress_interface_is_redirected_through_the_devmap() {
    with_bed(|bed| {
        let flows = [tcp(CLIENT4, 46_000, VIP4, PORT_REDIRECT), tcp(CLIENT6, 46_000, VIP6, PORT_REDIRECT)];
        let expected = |bed: &Bed, f: &Frame, input: &[u8]| {
            let hash = encap_hash(f);
            let backend = bed.expected_backend(f);
            match bed.backend(backend).addr {
                IpAddr::V4(a) => expect_ipip_v4(input, GW2_MAC, LB_MAC2, outer_src_v4(hash), a),
                IpAddr::V6(a) => expect_ip6ip6(input, GW2_MAC, LB_MAC2, outer_src_v6(hash), a, hash),
            }
        };
        // veth2 is not in TX_PORTS yet: the frame is left to the kernel.
        for f in &flows {
            let input = f.build();
            let out = bed.run_counted(&input, Reason::PassNoNeighbour);
            assert_eq!(out[12..], expected(bed, f, &input)[12..], "encapsulated");
        }
        let ifindex2 = bed.topo.ifindex2;
        bed.dp.add_tx_port(ifindex2).unwrap();
        for f in &flows {
            let input = f.build();
            let out = bed.run_counted(&input, Reason::RedirectEncap);
            assert_eq!(out, expected(bed, f, &input), "MACs of the route through veth2");
        }
        let (verdict, _) = bed.run(&flows[0].build());
        assert_eq!(verdict, XDP_REDIRECT);
    });
}

// ---- 4. Too big ----------------------------------------------------------------------------

/// A TCP frame whose IP packet is `ip_len` bytes long.
fn sized_tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, ip_len: usize) -> Frame {
    let headers = if src.is_ipv4() { IPV4_HDR } else { IPV6_HDR } + 20;
    tcp(src, sport, dst, dport).payload(vec![0x5a; ip_len - headers])
}

#[test]
fn too_big_ipv4_is_answered_with_fragmentation_needed() {
    with_bed(|bed| {
        let (c, v) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4));
        // 1280 + 20 = the route's MTU: fits.
        let fits = sized_tcp(c, 47_000, v, PORT_TOO_BIG, usize::from(SMALL_MTU) - IPV4_HDR);
        let input = fits.build();
        let out = bed.run_counted(&input, Reason::TxEncap);
        assert_eq!(out, expected_encap(bed, &fits, &input, bed.expected_backend(&fits)));
        // One byte more, with DF: answered.
        for f in [
            sized_tcp(c, 47_001, v, PORT_TOO_BIG, usize::from(SMALL_MTU) - IPV4_HDR + 1),
            sized_tcp(c, 47_002, v, PORT_TOO_BIG, 1500),
            sized_tcp(c, 47_003, v, PORT_TOO_BIG, 1400).vlan(9),
        ] {
            let input = f.build();
            let out = bed.run_flow(&input, Reason::TxTooBig, &[New]);
            let l3 = f.l3_offset();
            assert_eq!(out, expect_too_big_v4(&input, SMALL_MTU - 20), "ICMP fragmentation needed");
            // Field by field, independently of the expected frame.
            let (eth, sent) = (EthView::new(&out), EthView::new(&input));
            assert_eq!((eth.dst_mac(), eth.src_mac()), (CLIENT_MAC, LB_MAC), "MACs swapped");
            assert_eq!((eth.vlan(), eth.ether_type()), (sent.vlan(), sent.ether_type()), "tag and EtherType kept");
            let ip = eth.ipv4();
            assert!(ip.checksum_ok(), "IP checksum");
            assert_eq!(ip.protocol(), 1, "ICMP");
            assert_eq!((ip.src(), ip.dst()), (VIP4, CLIENT4), "from the VIP to the client");
            assert_eq!(ip.total_len(), out.len() - l3);
            let icmp = ip.payload();
            assert_eq!(icmp.len(), 8 + IPV4_HDR + 8);
            assert_eq!(checksum(icmp), 0, "ICMP checksum");
            assert_eq!(icmp[0..2], [3, 4], "type 3 code 4");
            assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1280, "next-hop MTU = 1300 - 20");
            assert_eq!(icmp[8..], input[l3..l3 + IPV4_HDR + 8], "quotes the client's header + 8 bytes");
        }
    });
}

#[test]
fn too_big_ipv6_is_answered_with_packet_too_big() {
    with_bed(|bed| {
        let (c, v) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6));
        let fits = sized_tcp(c, 48_000, v, PORT_TOO_BIG, usize::from(SMALL_MTU) - IPV6_HDR);
        let input = fits.build();
        let out = bed.run_counted(&input, Reason::TxEncap);
        assert_eq!(out, expected_encap(bed, &fits, &input, bed.expected_backend(&fits)));
        for f in [
            sized_tcp(c, 48_001, v, PORT_TOO_BIG, usize::from(SMALL_MTU) - IPV6_HDR + 1),
            sized_tcp(c, 48_002, v, PORT_TOO_BIG, 1500),
            sized_tcp(c, 48_003, v, PORT_TOO_BIG, 1400).vlan(9),
        ] {
            let input = f.build();
            let out = bed.run_flow(&input, Reason::TxTooBig, &[New]);
            let l3 = f.l3_offset();
            assert_eq!(out, expect_too_big_v6(&input, u32::from(SMALL_MTU) - 40), "ICMPv6 packet too big");
            let eth = EthView::new(&out);
            assert_eq!((eth.dst_mac(), eth.src_mac()), (CLIENT_MAC, LB_MAC), "MACs swapped");
            let ip = eth.ipv6();
            assert_eq!(ip.next_header(), 58, "ICMPv6");
            assert_eq!((ip.src(), ip.dst()), (VIP6, CLIENT6), "from the VIP to the client");
            let icmp = ip.payload();
            assert_eq!(ip.payload_len(), icmp.len());
            assert_eq!(icmpv6_checksum(VIP6, CLIENT6, icmp), 0, "ICMPv6 checksum over the pseudo-header");
            assert_eq!(icmp[0..2], [2, 0], "type 2");
            assert_eq!(u32::from_be_bytes(icmp[4..8].try_into().unwrap()), 1260, "MTU = 1300 - 40");
            assert_eq!(icmp[8..], input[l3..l3 + IPV6_HDR + 8]);
        }
    });
}

#[test]
fn too_big_ipv4_without_df_is_left_to_the_kernel_to_fragment() {
    with_bed(|bed| {
        let f = sized_tcp(CLIENT4.into(), 49_000, VIP4.into(), PORT_TOO_BIG, 1400).frag(0);
        let input = f.build();
        let out = bed.run_flow(&input, Reason::PassNoNeighbour, &[New]);
        let expected = expected_encap(bed, &f, &input, bed.expected_backend(&f));
        assert_eq!(out[12..], expected[12..], "encapsulated, DF clear");
        assert!(!EthView::new(&out).ipv4().dont_fragment());
    });
}

// ---- 5. No neighbour, no route -------------------------------------------------------------

#[test]
fn no_neighbour_passes_the_encapsulated_frame() {
    with_bed(|bed| {
        for f in [
            tcp(CLIENT4, 50_000, VIP4, PORT_NO_NEIGH),
            tcp(CLIENT6, 50_000, VIP6, PORT_NO_NEIGH),
            tcp(CLIENT4, 50_001, VIP4, PORT_NO_NEIGH).vlan(7),
        ] {
            let input = f.build();
            let backend = bed.expected_backend(&f);
            let be0 = bed.dp.backend_counters(backend).unwrap();
            let out = bed.run_flow(&input, Reason::PassNoNeighbour, &[New]);
            assert_eq!(Reason::PassNoNeighbour.action().code(), XDP_PASS);
            let expected = expected_encap(bed, &f, &input, backend);
            assert_eq!(out.len(), expected.len());
            assert_eq!(out[12..], expected[12..], "encapsulated; the EtherType (and tag) kept");
            let be1 = bed.dp.backend_counters(backend).unwrap();
            assert_eq!(be1.packets - be0.packets, 1, "counted as forwarded to its backend");
        }
    });
}

#[test]
fn no_route_drops_the_frame_untouched() {
    with_bed(|bed| {
        for f in [tcp(CLIENT4, 51_000, VIP4, PORT_NO_ROUTE), tcp(CLIENT6, 51_000, VIP6, PORT_NO_ROUTE)] {
            let input = f.build();
            let out = bed.run_flow(&input, Reason::DropNoRoute, &[New]);
            assert_eq!(out, input, "untouched");
        }
    });
}

/// Frames the balancer passes to the kernel after encapsulating them: the stack accepts a frame
/// only if its destination MAC is the interface's own (anything else is PACKET_OTHERHOST,
/// which ip_rcv/ipv6_rcv drop). lb-ebpf/src/balancer.rs, forward_encap: encap::grow_head
/// moves only the EtherType (and tag) to the new front, the MACs are written only for
/// `Route::Via`; for `Route::NoNeighbour` (and too big without DF) they are whatever the
/// headroom held (zero here, stale bytes on a NIC); for `Route::Via` out of an interface that
/// is not in TX_PORTS they are the gateway's and the egress interface's.
#[test]
fn frames_passed_to_the_stack_keep_the_interface_as_destination() {
    with_bed(|bed| {
        let cases = [
            ("no neighbour, IPv4", tcp(CLIENT4, 52_000, VIP4, PORT_NO_NEIGH)),
            ("no neighbour, IPv6", tcp(CLIENT6, 52_000, VIP6, PORT_NO_NEIGH)),
            ("no neighbour, VLAN", tcp(CLIENT4, 52_000, VIP4, PORT_NO_NEIGH).vlan(7)),
            ("too big without DF", sized_tcp(CLIENT4.into(), 52_001, VIP4.into(), PORT_TOO_BIG, 1400).frag(0)),
            ("egress not in TX_PORTS, IPv4", tcp(CLIENT4, 52_002, VIP4, PORT_REDIRECT)),
            ("egress not in TX_PORTS, IPv6", tcp(CLIENT6, 52_002, VIP6, PORT_REDIRECT)),
        ];
        let mut wrong = Vec::new();
        for (name, f) in cases {
            let out = bed.run_counted(&f.build(), Reason::PassNoNeighbour);
            if mac_at(&out, 0) != LB_MAC {
                wrong.push(format!("{name}: destination {:02x?}", mac_at(&out, 0)));
            }
        }
        assert!(wrong.is_empty(), "passed frames not addressed to veth0 ({:02x?}):\n{}", LB_MAC, wrong.join("\n"));
    });
}

/// The same bug, end to end: in live-frame mode an XDP_PASS frame goes up the namespace's
/// stack, which must forward the encapsulated packet (Ip ForwDatagrams). Two controls show
/// that the harness sees forwarding and that the MAC is the only thing wrong: a packet to the
/// same backend that is not for a VIP, and the balancer's own encapsulated output with veth0's
/// MAC put back, are both forwarded.
#[test]
fn no_neighbour_frames_are_forwarded_by_the_kernel() {
    let dp = DpBed::new().unwrap();
    let forwarded = |dp: &DpBed| dp.snmp("Ip", "ForwDatagrams").unwrap();
    // A flow whose outer source is an ordinary host of 10.1.0.0/24 (not .0, .1 or .255: the
    // kernel would call those martians).
    let f = (53_001..54_000u16)
        .map(|sport| tcp(CLIENT4, sport, VIP4, PORT_NO_NEIGH))
        .find(|f| !matches!(outer_src_v4(encap_hash(f)).octets()[3], 0 | 1 | 255))
        .unwrap();
    let g = f.clone();
    let before = forwarded(&dp);
    let fixed = dp.run(move |bed| {
        let control = tcp(CLIENT4, 53_000, Ipv4Addr::new(10, 4, 0, 10), 80);
        bed.run_live(&control.build()).unwrap();
        let mut out = bed.run_counted(&g.build(), Reason::PassNoNeighbour);
        out[0..6].copy_from_slice(&LB_MAC);
        out
    });
    assert_eq!(forwarded(&dp) - before, 1, "control: a pass_not_vip frame to 10.4.0.10 is forwarded");
    let before = forwarded(&dp);
    dp.run(move |bed| bed.run_live(&fixed).unwrap());
    assert_eq!(forwarded(&dp) - before, 1, "control: the encapsulated frame with veth0's MAC is forwarded");
    let before = forwarded(&dp);
    dp.run(move |bed| bed.run_live(&f.build()).unwrap());
    assert_eq!(forwarded(&dp) - before, 1, "the balancer's encapsulated no-neighbour frame is forwarded");
}

/// bpf_fib_lookup answers BPF_FIB_LKUP_RET_FWD_DISABLED when forwarding is off on the ingress
/// interface, and the data path counts that as drop_no_route: on a host without IP forwarding
/// every encapsulated packet is dropped, not only the few the kernel would forward.
#[test]
fn without_ip_forwarding_every_encapsulated_packet_is_dropped() {
    let bed = DpBed::new().unwrap();
    bed.ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=0", "net.ipv6.conf.all.forwarding=0"]).unwrap();
    bed.ns.exec(&["sysctl", "-qw", "net.ipv4.conf.veth0.forwarding=0"]).unwrap();
    bed.run(|bed| {
        for f in [tcp(CLIENT4, 64_000, VIP4, PORT_IPIP), tcp(CLIENT6, 64_000, VIP6, PORT_IPIP)] {
            let input = f.build();
            assert_eq!(bed.run_counted(&input, Reason::DropNoRoute), input);
        }
        // L2 DSR does not look at the FIB.
        assert_l2_hit(bed, &tcp(CLIENT4, 64_000, VIP4, PORT_L2_TCP), &[New]);
    });
}

// ---- 6. Flow table -------------------------------------------------------------------------

#[test]
fn pinned_flows_survive_a_new_table_and_new_flows_follow_it() {
    with_bed(|bed| {
        let pinned = tcp(CLIENT4, 55_000, VIP4, PORT_L2_TCP);
        let b = assert_l2_hit(bed, &pinned, &[New]);
        let other = L2_V4.into_iter().find(|&x| x != b).unwrap();
        // The new table gives every slot (the pinned flow's included) to another backend.
        bed.publish(VIP4.into(), IPPROTO_TCP, PORT_L2_TCP, vec![other; 251]).unwrap();
        let out = bed.run_flow(&pinned.build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(l2_backend(&out), b, "the pinned flow keeps its backend");
        for sport in 55_001..55_011u16 {
            let f = tcp(CLIENT4, sport, VIP4, PORT_L2_TCP);
            assert_eq!(assert_l2_hit(bed, &f, &[New]), other, "a new flow follows the new table");
        }
    });
}

#[test]
fn a_draining_backend_keeps_its_flows_and_gets_no_new_ones() {
    with_bed(|bed| {
        // Pin a few flows; take the backend of the first out of the table, still usable.
        let flows: Vec<Frame> = (56_000..56_012u16).map(|p| tcp(CLIENT6, p, VIP6, PORT_L2_TCP)).collect();
        let pinned: Vec<u32> = flows.iter().map(|f| assert_l2_hit(bed, f, &[New])).collect();
        let draining = pinned[0];
        let rest: Vec<u32> = L2_V6.into_iter().filter(|&x| x != draining).collect();
        let table = bed.table_of(&rest);
        bed.publish(VIP6.into(), IPPROTO_TCP, PORT_L2_TCP, table).unwrap();
        let info = bed.backend(draining);
        bed.set_backend(draining, info.addr, info.mac, true).unwrap();
        for (f, b) in flows.iter().zip(&pinned) {
            let out = bed.run_flow(&f.build(), Reason::TxForwarded, &[Hit]);
            assert_eq!(l2_backend(&out), *b, "pinned flows stay, the draining backend's included");
        }
        for sport in 56_100..56_140u16 {
            let f = tcp(CLIENT6, sport, VIP6, PORT_L2_TCP);
            assert_ne!(assert_l2_hit(bed, &f, &[New]), draining, "no new flow for a draining backend");
        }
    });
}

#[test]
fn a_removed_backend_loses_its_flows() {
    with_bed(|bed| {
        let f = tcp(CLIENT4, 57_000, VIP4, PORT_L2_TCP);
        let b = assert_l2_hit(bed, &f, &[New]);
        let rest: Vec<u32> = L2_V4.into_iter().filter(|&x| x != b).collect();
        let table = bed.table_of(&rest);
        bed.publish(VIP4.into(), IPPROTO_TCP, PORT_L2_TCP, table).unwrap();
        let info = bed.backend(b);
        bed.set_backend(b, info.addr, info.mac, false).unwrap();
        let now = bed.expected_backend(&f);
        assert_ne!(now, b);
        let out = bed.run_flow(&f.build(), Reason::TxForwarded, &[Stale, New]);
        assert_eq!(l2_backend(&out), now, "re-hashed to the new table's backend");
        assert_eq!(l2_backend(&bed.run_flow(&f.build(), Reason::TxForwarded, &[Hit])), now, "and pinned there");
    });
}

#[test]
fn a_slot_given_to_another_address_re_hashes_its_flows() {
    with_bed(|bed| {
        let f = tcp(CLIENT4, 58_000, VIP4, PORT_IPIP);
        let input = f.build();
        let b = bed.expected_backend(&f);
        let out = bed.run_flow(&input, Reason::TxEncap, &[New]);
        assert_eq!(out, expected_encap(bed, &f, &input, b));
        // Same id, another address: a new generation. The table still names the id.
        let new_addr = Ipv4Addr::new(10, 2, 0, 99);
        bed.set_backend(b, new_addr.into(), None, true).unwrap();
        let out = bed.run_flow(&input, Reason::TxEncap, &[Stale, New]);
        assert_eq!(out, expected_encap(bed, &f, &input, b));
        assert_eq!(EthView::new(&out).ipv4().dst(), new_addr, "to the slot's new owner");
        bed.run_flow(&input, Reason::TxEncap, &[Hit]);
        // Setting the same address again keeps the generation: still a hit.
        bed.set_backend(b, new_addr.into(), None, true).unwrap();
        bed.run_flow(&input, Reason::TxEncap, &[Hit]);
    });
}

#[test]
fn idle_udp_flows_expire_and_tcp_flows_do_not() {
    with_bed(|bed| {
        let mut settings = bed.settings;
        settings.udp_idle_ns = 1;
        bed.set_settings(settings).unwrap();
        let u = udp(CLIENT4, 59_000, VIP4, PORT_L2_UDP);
        let b = assert_l2_hit(bed, &u, &[New]);
        assert_eq!(assert_l2_hit(bed, &u, &[Stale, New]), b, "expired, re-hashed by the same table");
        assert_l2_hit(bed, &u, &[Stale, New]);
        let t = tcp(CLIENT4, 59_000, VIP4, PORT_L2_TCP);
        assert_l2_hit(bed, &t, &[New]);
        assert_l2_hit(bed, &t, &[Hit]);
        // A long idle time: hits.
        settings.udp_idle_ns = UDP_IDLE_NS;
        bed.set_settings(settings).unwrap();
        let u6 = udp(CLIENT6, 59_001, VIP6, PORT_L2_UDP);
        assert_l2_hit(bed, &u6, &[New]);
        assert_l2_hit(bed, &u6, &[Hit]);
        assert_l2_hit(bed, &u6, &[Hit]);
        // An expired flow is re-pinned to its *new* Maglev backend.
        let u2 = udp(CLIENT4, 59_002, VIP4, PORT_L2_UDP);
        let b2 = assert_l2_hit(bed, &u2, &[New]);
        let other = L2_V4.into_iter().find(|&x| x != b2).unwrap();
        bed.publish(VIP4.into(), IPPROTO_UDP, PORT_L2_UDP, vec![other; 251]).unwrap();
        assert_eq!(l2_backend(&bed.run_flow(&u2.build(), Reason::TxForwarded, &[Hit])), b2);
        settings.udp_idle_ns = 1;
        bed.set_settings(settings).unwrap();
        assert_eq!(assert_l2_hit(bed, &u2, &[Stale, New]), other);
    });
}

/// lb-ebpf/src/select.rs, select(): a UDP flow's last_seen_ns is refreshed only when it is more
/// than NS_PER_SEC old, while the flow counts as idle once it is more than udp_idle_ns old.
/// With udp_idle_ns <= 1 s (the config allows `udp_idle_secs = 1`) the refresh never happens
/// before the expiry: a flow that sends every 200 ms is re-hashed every second (and moves
/// to another backend if the table changed since it was pinned).
#[test]
fn an_active_udp_flow_does_not_expire() {
    with_bed(|bed| {
        let mut settings = bed.settings;
        settings.udp_idle_ns = 1_000_000_000;
        bed.set_settings(settings).unwrap();
        let u = udp(CLIENT4, 59_500, VIP4, PORT_L2_UDP);
        let b = assert_l2_hit(bed, &u, &[New]);
        let other = L2_V4.into_iter().find(|&x| x != b).unwrap();
        bed.publish(VIP4.into(), IPPROTO_UDP, PORT_L2_UDP, vec![other; 251]).unwrap();
        for i in 0..8 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let out = bed.run_flow(&u.build(), Reason::TxForwarded, &[Hit]);
            assert_eq!(l2_backend(&out), b, "packet {i}, {} ms after the first", 200 * (i + 1));
        }
    });
}

/// The handshake signal: a flow pinned on its SYN counts once as a handshake to watch, its
/// first pure ACK once as completed; FIN, a second ACK, or a pin on anything but a SYN do not.
#[test]
fn handshakes_are_counted_once_per_flow() {
    with_bed(|bed| {
        let counts = |bed: &Bed, b: u32| {
            let f = bed.dp.backend_flows(b).unwrap();
            (f.syn_pinned, f.established)
        };
        let syn = tcp(CLIENT4, 61_000, VIP4, PORT_L2_TCP);
        let b = bed.expected_backend(&syn);
        let (pinned0, est0) = counts(bed, b);
        bed.run_flow(&syn.build(), Reason::TxForwarded, &[New]);
        assert_eq!(counts(bed, b), (pinned0 + 1, est0), "a SYN pinned: one handshake to watch");
        bed.run_flow(&syn.clone().tcp_flags(0x12).build(), Reason::TxForwarded, &[Hit]); // SYN|ACK: not the client's
        assert_eq!(counts(bed, b), (pinned0 + 1, est0));
        bed.run_flow(&syn.clone().tcp_flags(0x18).build(), Reason::TxForwarded, &[Hit]); // ACK|PSH
        assert_eq!(counts(bed, b), (pinned0 + 1, est0 + 1), "the client's ACK completes it");
        bed.run_flow(&syn.clone().tcp_flags(0x10).build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(counts(bed, b), (pinned0 + 1, est0 + 1), "counted once");
        // A SYN then its FIN: the handshake never completes.
        let other = tcp(CLIENT4, 61_001, VIP4, PORT_L2_TCP);
        let c = bed.expected_backend(&other);
        let (pinned1, est1) = counts(bed, c);
        bed.run_flow(&other.build(), Reason::TxForwarded, &[New]);
        bed.run_flow(&other.clone().tcp_flags(0x11).build(), Reason::TxForwarded, &[Hit]); // FIN|ACK
        bed.run_flow(&other.clone().tcp_flags(0x10).build(), Reason::TxForwarded, &[Hit]); // closed: an ACK
        assert_eq!(counts(bed, c), (pinned1 + 1, est1), "a closed flow does not complete");
        // A flow first seen mid-connection (an ACK): pinned, not a handshake to watch.
        let mid = tcp(CLIENT4, 61_002, VIP4, PORT_L2_TCP).tcp_flags(0x10);
        let d = bed.expected_backend(&mid);
        let (pinned2, est2) = counts(bed, d);
        bed.run_flow(&mid.build(), Reason::TxForwarded, &[New]);
        bed.run_flow(&mid.build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(counts(bed, d), (pinned2, est2));
    });
}

/// A flow whose packets change CPU keeps its pin: its first packet on the new CPU finds the entry
/// in the old CPU's table (the tables are per CPU) and uses it there, with its accounting:
/// counted neither as new nor as another active flow, and closed once. UDP and TCP alike. (An
/// entry found past the first few other tables moves instead: a host of more CPUs than this.)
#[test]
fn a_flow_that_changes_cpu_keeps_its_pin_and_its_count() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    with_bed(|bed| {
        let on_cpu = |cpu| xlb_tests::bench::pin_to_cpu(cpu).unwrap();
        let in_table = |bed: &Bed, cpu: usize, f: &Frame| -> bool {
            let table = bed.dp.flow_tables().unwrap().swap_remove(cpu);
            let table: aya::maps::HashMap<_, FlowKey, Flow> =
                aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(table)).unwrap();
            table.get(&flow_key(f), 0).is_ok()
        };
        let syn = tcp(CLIENT4, 57_000, VIP4, PORT_L2_TCP);
        let datagram = udp(CLIENT4, 57_000, VIP4, PORT_L2_UDP);
        on_cpu(0);
        let b = assert_l2_hit(bed, &syn, &[New]);
        let c = assert_l2_hit(bed, &datagram, &[New]);
        let (active_b, active_c) = (bed.dp.active_flows(b).unwrap(), bed.dp.active_flows(c).unwrap());
        let established = bed.dp.backend_flows(b).unwrap().established;
        // New tables give every slot to another backend: a flow rescheduled would show it.
        for (proto, port, pinned) in [(IPPROTO_TCP, PORT_L2_TCP, b), (IPPROTO_UDP, PORT_L2_UDP, c)] {
            let other = L2_V4.into_iter().find(|&x| x != pinned).unwrap();
            bed.publish(VIP4.into(), proto, port, vec![other; 251]).unwrap();
        }
        on_cpu(1);
        let ack = syn.clone().tcp_flags(0x10);
        for round in 0..2 {
            // The TCP flow's second ACK here comes from this CPU's flow cache, filled by its
            // first: no table is looked in. UDP is never cached.
            let events: &[_] = if round == 0 { &[OtherCpu, Hit] } else { &[Hit] };
            let out = bed.run_flow(&ack.build(), Reason::TxForwarded, events);
            assert_eq!(l2_backend(&out), b, "the TCP flow keeps its backend on another CPU");
            let out = bed.run_flow(&datagram.build(), Reason::TxForwarded, &[OtherCpu, Hit]);
            assert_eq!(l2_backend(&out), c, "the UDP flow too");
        }
        assert!(in_table(bed, 0, &syn) && !in_table(bed, 1, &syn), "used in place: one entry");
        assert!(in_table(bed, 0, &datagram) && !in_table(bed, 1, &datagram));
        assert_eq!(bed.dp.active_flows(b).unwrap(), active_b, "not counted again");
        assert_eq!(bed.dp.active_flows(c).unwrap(), active_c);
        assert_eq!(bed.dp.backend_flows(b).unwrap().established, established + 1, "its handshake completes once");
        // A FIN closes it once, on either CPU; a RST on the other CPU removes the entry there.
        let fin = syn.clone().tcp_flags(0x11);
        let out = bed.run_flow(&fin.build(), Reason::TxForwarded, &[OtherCpu, Hit]);
        assert_eq!(l2_backend(&out), b);
        assert_eq!(bed.dp.active_flows(b).unwrap(), active_b - 1, "closed once");
        on_cpu(0);
        bed.run_flow(&fin.build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(bed.dp.active_flows(b).unwrap(), active_b - 1);
        on_cpu(1);
        let rst = syn.clone().tcp_flags(0x14);
        let out = bed.run_flow(&rst.build(), Reason::TxForwarded, &[OtherCpu, Closed]);
        assert_eq!(l2_backend(&out), b, "the RST goes to the flow's backend");
        assert!(!in_table(bed, 0, &syn) && !in_table(bed, 1, &syn), "and removes its one entry");
        // A SYN is not looked for elsewhere: a port reused is a new flow.
        let out = bed.run_flow(&syn.build(), Reason::TxForwarded, &[New]);
        assert_ne!(l2_backend(&out), b, "a new flow on the new table");
        // A pin gone stale in another CPU's table leaves it: the flow is pinned afresh here, once.
        let mut settings = bed.settings;
        settings.udp_idle_ns = 1;
        bed.set_settings(settings).unwrap();
        let active_c = bed.dp.active_flows(c).unwrap();
        let out = bed.run_flow(&datagram.build(), Reason::TxForwarded, &[OtherCpu, Stale, New]);
        let now = l2_backend(&out);
        assert_ne!(now, c, "re-hashed by the new table");
        assert!(!in_table(bed, 0, &datagram) && in_table(bed, 1, &datagram), "one entry, here");
        assert_eq!(bed.dp.active_flows(c).unwrap(), active_c - 1, "released once");
        on_cpu(0);
        let active_now = bed.dp.active_flows(now).unwrap();
        bed.run_flow(&datagram.build(), Reason::TxForwarded, &[OtherCpu, Stale, New]);
        assert_eq!(bed.dp.active_flows(now).unwrap(), active_now, "released and pinned again: no drift");
        assert!(in_table(bed, 0, &datagram) && !in_table(bed, 1, &datagram));
    });
}

/// Each CPU's flow cache answers for an established TCP flow only what its table would: not
/// for a 5-tuple reset and pinned anew on another CPU, not for a backend gone, and not past its
/// refresh, after which the table is asked (and marks the flow used) again.
#[test]
fn the_flow_cache_answers_only_for_the_pin_the_table_holds() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    with_bed(|bed| {
        let on_cpu = |cpu| xlb_tests::bench::pin_to_cpu(cpu).unwrap();
        let syn = tcp(CLIENT4, 58_000, VIP4, PORT_L2_TCP);
        let ack = syn.clone().tcp_flags(0x10);
        on_cpu(0);
        let b = assert_l2_hit(bed, &syn, &[New]);
        // The handshake's ACK is the table's (it completes the handshake) and fills the cache;
        // the next ACK is the cache's: a hit all the same.
        bed.run_flow(&ack.build(), Reason::TxForwarded, &[Hit]);
        let out = bed.run_flow(&ack.build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(l2_backend(&out), b);
        assert_eq!(bed.dp.backend_flows(b).unwrap().established, 1, "counted by the table, once");
        let other = L2_V4.into_iter().find(|&x| x != b).unwrap();
        bed.publish(VIP4.into(), IPPROTO_TCP, PORT_L2_TCP, vec![other; 251]).unwrap();
        // Reset and reopened on CPU 1: pinned anew, to the new table's backend.
        on_cpu(1);
        bed.run_flow(&syn.clone().tcp_flags(0x14).build(), Reason::TxForwarded, &[OtherCpu, Closed]);
        let out = bed.run_flow(&syn.build(), Reason::TxForwarded, &[New]);
        assert_eq!(l2_backend(&out), other);
        // CPU 0's cache still holds the old pin: the new one's version passes it by.
        on_cpu(0);
        let out = bed.run_flow(&ack.build(), Reason::TxForwarded, &[OtherCpu, Hit]);
        assert_eq!(l2_backend(&out), other, "CPU 0 follows the new pin, not its cache");
        let out = bed.run_flow(&ack.build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(l2_backend(&out), other, "and caches it");

        // A cached flow whose backend leaves the service: stale, as in the table.
        let syn = tcp(CLIENT4, 58_001, VIP4, PORT_L2_TCP);
        let ack = syn.clone().tcp_flags(0x10);
        assert_eq!(assert_l2_hit(bed, &syn, &[New]), other);
        bed.run_flow(&ack.build(), Reason::TxForwarded, &[Hit]);
        bed.run_flow(&ack.build(), Reason::TxForwarded, &[Hit]);
        let info = bed.backend(other);
        bed.set_backend(other, info.addr, info.mac, false).unwrap();
        let rest: Vec<u32> = L2_V4.into_iter().filter(|&x| x != other).collect();
        let table = bed.table_of(&rest);
        bed.publish(VIP4.into(), IPPROTO_TCP, PORT_L2_TCP, table).unwrap();
        let out = bed.run_flow(&ack.build(), Reason::TxForwarded, &[Stale, New]);
        assert_ne!(l2_backend(&out), other, "not to the backend gone");

        // The table's entry gone behind the cache's back (here, removed from user space):
        // the cache answers until its refresh, then the table's miss pins the flow anew.
        let syn = tcp(CLIENT4, 58_002, VIP4, PORT_L2_TCP);
        let ack = syn.clone().tcp_flags(0x10);
        let first = assert_l2_hit(bed, &syn, &[New]);
        bed.run_flow(&ack.build(), Reason::TxForwarded, &[Hit]);
        let table = bed.dp.flow_tables().unwrap().swap_remove(0);
        let mut table: aya::maps::HashMap<_, FlowKey, Flow> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(table)).unwrap();
        table.remove(&flow_key(&syn)).unwrap();
        let out = bed.run_flow(&ack.build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(l2_backend(&out), first, "from the cache");
        // FLOW_CACHE_REFRESH_JIFFIES is 256: 2.56 s at the lowest HZ (100).
        std::thread::sleep(std::time::Duration::from_millis(2_700));
        bed.run_flow(&ack.build(), Reason::TxForwarded, &[New]);
        assert!(table.get(&flow_key(&syn), 0).is_ok(), "pinned anew in the table");
    });
}

#[test]
fn tcp_rst_closes_the_flow() {
    with_bed(|bed| {
        let syn = tcp(CLIENT4, 60_000, VIP4, PORT_L2_TCP);
        let b = assert_l2_hit(bed, &syn, &[New]);
        // Move the table away, so that a re-hash would be visible.
        let other = L2_V4.into_iter().find(|&x| x != b).unwrap();
        bed.publish(VIP4.into(), IPPROTO_TCP, PORT_L2_TCP, vec![other; 251]).unwrap();
        let rst = syn.clone().tcp_flags(0x14); // RST|ACK
        let out = bed.run_flow(&rst.build(), Reason::TxForwarded, &[Closed]);
        assert_eq!(l2_backend(&out), b, "the RST goes to the flow's backend");
        // The entry is gone: the next SYN is a new flow, on the new table.
        let out = bed.run_flow(&syn.build(), Reason::TxForwarded, &[New]);
        assert_eq!(l2_backend(&out), other);
        // A RST without entry: forwarded by Maglev, nothing pinned, no event.
        let stray = tcp(CLIENT4, 60_001, VIP4, PORT_L2_TCP).tcp_flags(0x04);
        let out = bed.run_flow(&stray.build(), Reason::TxForwarded, &[]);
        assert_eq!(l2_backend(&out), other);
        assert_l2_hit(bed, &tcp(CLIENT4, 60_001, VIP4, PORT_L2_TCP), &[New]);
        // Same on IPv6, encapsulated.
        let syn6 = tcp(CLIENT6, 60_002, VIP6, PORT_IPIP);
        bed.run_flow(&syn6.build(), Reason::TxEncap, &[New]);
        bed.run_flow(&syn6.clone().tcp_flags(0x04).build(), Reason::TxEncap, &[Closed]);
        bed.run_flow(&syn6.build(), Reason::TxEncap, &[New]);
    });
}

#[test]
fn new_flows_over_the_per_cpu_rate_are_not_pinned() {
    with_bed(|bed| {
        limit_new_flows(bed, 2);
        let flows: Vec<Frame> = (61_000..61_003u16).map(|p| tcp(CLIENT4, p, VIP4, PORT_L2_TCP)).collect();
        assert_l2_hit(bed, &flows[0], &[New]);
        assert_l2_hit(bed, &flows[1], &[New]);
        // The third within the second: Maglev's backend, not pinned.
        assert_l2_hit(bed, &flows[2], &[RateLimited]);
        assert_l2_hit(bed, &flows[2], &[RateLimited]);
        // Pinned flows are not affected.
        assert_l2_hit(bed, &flows[0].clone().tcp_flags(0x10), &[Hit]);
        assert_l2_hit(bed, &udp(CLIENT6, 61_000, VIP6, PORT_L2_UDP), &[RateLimited]);
    });
}

/// Past the rate a SYN is placed by the table without a look at the flow table (a SYN flood is
/// all such packets): a pinned flow's SYN, retransmitted or its 5-tuple reused, takes the
/// table's backend, while the flow's other packets keep their pin.
#[test]
fn a_syn_past_the_rate_is_placed_without_the_flow_table() {
    with_bed(|bed| {
        limit_new_flows(bed, 1);
        let syn = tcp(CLIENT4, 61_100, VIP4, PORT_L2_TCP);
        let pinned = assert_l2_hit(bed, &syn, &[New]);
        let other = L2_V4.into_iter().find(|&x| x != pinned).unwrap();
        bed.publish(VIP4.into(), IPPROTO_TCP, PORT_L2_TCP, vec![other; 251]).unwrap();
        let out = bed.run_flow(&syn.build(), Reason::TxForwarded, &[RateLimited]);
        assert_eq!(l2_backend(&out), other, "the SYN past the rate: the table's backend");
        let out = bed.run_flow(&syn.clone().tcp_flags(0x10).build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(l2_backend(&out), pinned, "the ACK: the pin");
        // Under the rate again (no limit), the SYN finds its pin.
        limit_new_flows(bed, 0);
        let (before, active) = (bed.dp.backend_flows(pinned).unwrap(), bed.dp.active_flows(pinned).unwrap());
        let out = bed.run_flow(&syn.build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(l2_backend(&out), pinned, "a retransmitted SYN under the rate: the pin");
        // Found by its insert (a SYN is not looked up): a retransmission, not a new flow.
        let after = bed.dp.backend_flows(pinned).unwrap();
        assert_eq!(after.syn_retransmits, before.syn_retransmits + 1);
        assert_eq!((after.new_flows, after.syn_pinned), (before.new_flows, before.syn_pinned), "not a new flow");
        assert_eq!(bed.dp.active_flows(pinned).unwrap(), active);
        // A SYN whose pin went stale (its backend down) replaces it.
        let info = bed.backend(pinned);
        bed.set_backend(pinned, info.addr, info.mac, false).unwrap();
        let out = bed.run_flow(&syn.build(), Reason::TxForwarded, &[Stale, New]);
        assert_eq!(l2_backend(&out), other);
        assert_eq!(bed.dp.active_flows(pinned).unwrap(), active - 1, "the stale pin released");
        let out = bed.run_flow(&syn.clone().tcp_flags(0x10).build(), Reason::TxForwarded, &[Hit]);
        assert_eq!(l2_backend(&out), other, "and the flow pinned anew");
    });
}

/// Sets the new-flow rate to `per_cpu_sec` (0: no limit), the calling thread pinned to its CPU.
fn limit_new_flows(bed: &mut Bed, per_cpu_sec: u32) {
    pin_to_current_cpu();
    let settings = Settings { new_flows_per_cpu_sec: per_cpu_sec, ..bed.settings };
    bed.set_settings(settings).unwrap();
}

/// Pins the calling thread to the CPU it runs on: the new-flow window and the next-hop cache
/// are per CPU.
fn pin_to_current_cpu() {
    // SAFETY: plain libc calls on the calling thread (pid 0) with a zeroed, then filled set.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
    }
}

#[test]
fn l2_and_ipip_services_share_a_vip() {
    with_bed(|bed| {
        // Same VIP and client: the port picks L2 DSR or encapsulation.
        let l2 = tcp(CLIENT4, 62_000, VIP4, PORT_L2_TCP);
        assert_l2_hit(bed, &l2, &[New]);
        let ipip = tcp(CLIENT4, 62_000, VIP4, PORT_IPIP);
        let input = ipip.build();
        let out = bed.run_counted(&input, Reason::TxEncap);
        assert_eq!(out, expected_encap(bed, &ipip, &input, bed.expected_backend(&ipip)));
        let (verdict, _) = bed.run(&input);
        assert_eq!(verdict, XDP_TX);
    });
}

/// Why the bed locks its route MTUs: bpf_fib_lookup checks against the route's MTU only when
/// it is locked (IPv4: or with net.ipv4.ip_forward_use_pmtu), else against the device's. An
/// operator who sets `mtu 1300` on the route to the backends gets no "too big" answers.
#[test]
fn the_fib_sees_only_a_locked_route_mtu() {
    let bed = DpBed::new().unwrap();
    bed.ns.exec(&["ip", "route", "replace", "10.3.0.0/24", "via", "10.1.0.254", "mtu", "1300"]).unwrap();
    bed.ns.exec(&["ip", "route", "replace", "fd00:3::/64", "via", "fd00:1::fe", "mtu", "1300"]).unwrap();
    bed.run(|bed| {
        for (src, dst) in [(IpAddr::V4(CLIENT4), IpAddr::V4(VIP4)), (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6))] {
            let f = sized_tcp(src, 63_000, dst, PORT_TOO_BIG, 1400);
            let input = f.build();
            let out = bed.run_counted(&input, Reason::TxEncap);
            assert_eq!(out, expected_encap(bed, &f, &input, bed.expected_backend(&f)), "encapsulated beyond 1300");
        }
    });
}

// ---- 7. The IP length field, padding, sources no ICMP error may go to ----------------------

const DROP_TOO_BIG_BAD_SOURCE: Reason = Reason::DropTooBigBadSource;

/// `frame` with its IP length field set to `ip_len` bytes, IP header included (IPv4: total
/// length, checksum redone; IPv6: payload length `ip_len - 40`).
fn with_ip_length(frame: &[u8], ip_len: usize) -> Vec<u8> {
    let mut f = frame.to_vec();
    let l3 = l3_offset(&f);
    if f[l3] >> 4 == 4 {
        f[l3 + 2..l3 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = checksum(&f[l3..l3 + IPV4_HDR]);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    } else {
        f[l3 + 4..l3 + 6].copy_from_slice(&((ip_len - IPV6_HDR) as u16).to_be_bytes());
    }
    f
}

/// A TCP/UDP packet to a VIP whose length field runs past the frame (the packet is cut short)
/// or does not cover its IP and TCP/UDP headers (the ports would come from bytes after the
/// packet) is dropped untouched as drop_truncated_l4, before the flow table, for L2 and IPIP
/// services alike. ICMP to a VIP still goes to the host, whose stack judges its length.
#[test]
fn an_ip_length_past_the_frame_or_short_of_the_headers_is_truncated() {
    with_bed(|bed| {
        for f in [
            tcp(CLIENT4, 65_000, VIP4, PORT_IPIP),
            udp(CLIENT4, 65_001, VIP4, PORT_L2_UDP),
            tcp(CLIENT4, 65_002, VIP4, PORT_L2_TCP).vlan(5),
            tcp(CLIENT6, 65_000, VIP6, PORT_IPIP),
            udp(CLIENT6, 65_001, VIP6, PORT_L2_UDP).vlan(5),
        ] {
            let input = f.build();
            let l3 = f.l3_offset();
            let ip_len = input.len() - l3;
            let headers = f.l4_offset() - l3 + if f.proto == IPPROTO_TCP { 20 } else { 8 };
            let mut claims = vec![ip_len + 1, ip_len + 1000, 65_535, headers - 1];
            claims.extend(if f.src.is_ipv4() { &[20, 19, 0][..] } else { &[IPV6_HDR][..] });
            for claim in claims {
                let bad = with_ip_length(&input, claim);
                let out = bed.run_flow(&bad, Reason::DropTruncatedL4, &[]);
                assert_eq!(out, bad, "{} {}/{}, length {claim} of {ip_len}: untouched", f.dst, f.proto, f.dport);
            }
        }
        // The edge: a length that covers exactly the headers (the 5 payload bytes then are
        // padding) is forwarded.
        let f = tcp(CLIENT4, 65_003, VIP4, PORT_IPIP);
        let input = with_ip_length(&f.build(), IPV4_HDR + 20);
        let out = bed.run_flow(&input, Reason::TxEncap, &[New]);
        assert_eq!(out, expected_encap(bed, &f, &input, bed.expected_backend(&f)));
        // ICMP: the host's.
        for f in [to_lb(Frame::icmp(CLIENT4, VIP4)), to_lb(Frame::icmp(CLIENT6, VIP6))] {
            let input = f.build();
            let bad = with_ip_length(&input, input.len() - f.l3_offset() + 100);
            bed.assert_untouched(&bad, Reason::PassVipIcmp);
        }
    });
}

/// Ethernet pads frames to 60 bytes: the bytes after the IP packet's length are kept. The outer
/// header declares the inner packet by its length field, so the padding travels after the
/// outer packet's declared end, where the receiver's stack trims it; L2 DSR leaves it as is.
#[test]
fn padding_after_the_packet_travels_behind_the_outer_packet() {
    with_bed(|bed| {
        for f in [
            tcp(CLIENT4, 65_010, VIP4, PORT_IPIP).payload(Vec::new()),
            tcp(CLIENT4, 65_011, VIP4, PORT_IPIP).payload(Vec::new()).vlan(3),
            udp(CLIENT6, 65_012, VIP6, PORT_IPIP).payload(Vec::new()),
        ] {
            let mut input = f.build();
            let ip_len = input.len() - f.l3_offset();
            input.resize(input.len().max(60), 0);
            input.extend_from_slice(&[0xee; 3]);
            let out = bed.run_counted(&input, Reason::TxEncap);
            assert_eq!(
                out,
                expected_encap(bed, &f, &input, bed.expected_backend(&f)),
                "padding after the inner packet"
            );
            let l3 = f.l3_offset();
            let eth = EthView::new(&out);
            let declared = if f.src.is_ipv4() { eth.ipv4().total_len() } else { eth.ipv6().payload_len() + IPV6_HDR };
            let outer = if f.src.is_ipv4() { IPV4_HDR } else { IPV6_HDR };
            assert_eq!(declared, outer + ip_len, "the outer length is the inner length field + its header");
            assert!(out.len() - l3 > declared, "the padding follows the declared end");
        }
        let f = tcp(CLIENT4, 65_013, VIP4, PORT_L2_TCP).payload(Vec::new());
        let mut input = f.build();
        input.resize(60, 0);
        let out = bed.run_counted(&input, Reason::TxForwarded);
        assert_eq!(out[12..], input[12..], "L2 DSR: only the MACs change");
    });
}

/// The MTU check counts the whole frame from the IP header on, padding included: a frame too
/// big only by the bytes after its packet is handed to the stack (pass_no_neighbour), which
/// trims them and forwards the packet, which fits; one too big by its packet is answered.
#[test]
fn too_big_only_by_trailing_bytes_is_left_to_the_stack() {
    with_bed(|bed| {
        for (src, dst, fits) in [
            (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), usize::from(SMALL_MTU) - IPV4_HDR),
            (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), usize::from(SMALL_MTU) - IPV6_HDR),
        ] {
            let f = sized_tcp(src, 65_020, dst, PORT_TOO_BIG, fits);
            let mut input = f.build();
            input.extend_from_slice(&[0xee; 20]);
            let out = bed.run_flow(&input, Reason::PassNoNeighbour, &[New]);
            assert_eq!(out[..12], input[..12], "still addressed to veth0");
            assert_eq!(out[12..], expected_encap(bed, &f, &input, bed.expected_backend(&f))[12..]);
            // One byte more in the packet itself: too big, answered as before.
            let f = sized_tcp(src, 65_021, dst, PORT_TOO_BIG, fits + 1);
            let mut input = f.build();
            input.extend_from_slice(&[0xee; 20]);
            let trimmed = input[..input.len() - 20].to_vec();
            let out = bed.run_flow(&input, Reason::TxTooBig, &[New]);
            let expected = if src.is_ipv4() {
                expect_too_big_v4(&trimmed, SMALL_MTU - 20)
            } else {
                expect_too_big_v6(&trimmed, u32::from(SMALL_MTU) - 40)
            };
            assert_eq!(out, expected, "answered; the answer quotes the packet");
        }
    });
}

/// End to end: the stack takes the encapsulated frames the balancer hands it with bytes after
/// the outer packet's declared end (ip_rcv trims them) and forwards them: one with Ethernet
/// padding to a next hop without neighbour entry, one too big only by its trailing bytes.
#[test]
fn frames_with_trailing_bytes_are_trimmed_and_forwarded_by_the_kernel() {
    let dp = DpBed::new().unwrap();
    let forwarded = |dp: &DpBed| dp.snmp("Ip", "ForwDatagrams").unwrap();
    // Flows whose outer source is an ordinary host of 10.1.0.0/24 (not .0, .1 or .255).
    let ordinary = |port: u16, len: Option<usize>| {
        (56_001..57_000u16)
            .map(|sport| match len {
                Some(n) => sized_tcp(CLIENT4.into(), sport, VIP4.into(), port, n),
                None => tcp(CLIENT4, sport, VIP4, port).payload(Vec::new()),
            })
            .find(|f| !matches!(outer_src_v4(encap_hash(f)).octets()[3], 0 | 1 | 255))
            .unwrap()
    };
    let mut padded = ordinary(PORT_NO_NEIGH, None).build();
    padded.resize(60, 0);
    let mut trailing = ordinary(PORT_TOO_BIG, Some(usize::from(SMALL_MTU) - IPV4_HDR)).build();
    trailing.extend_from_slice(&[0xee; 20]);
    for (name, frame) in [("padded, no neighbour", padded), ("too big only by trailing bytes", trailing)] {
        let before = forwarded(&dp);
        let input = frame.clone();
        let out = dp.run(move |bed| {
            let out = bed.run_counted(&input, Reason::PassNoNeighbour);
            bed.run_live(&input).unwrap();
            out
        });
        assert!(out.len() - ETH_HDR > EthView::new(&out).ipv4().total_len(), "{name}");
        assert_eq!(forwarded(&dp) - before, 1, "{name}: forwarded by the stack");
    }
}

/// No ICMP error to a source that is no single host (RFC 1122 3.2.2, RFC 4443 2.4 (e)): a
/// packet too big once encapsulated from such a source is dropped untouched, after the flow
/// table (the flow is pinned like any other).
#[test]
fn too_big_from_a_source_that_is_no_single_host_is_dropped() {
    with_bed(|bed| {
        let sources: [(IpAddr, IpAddr); 9] = [
            (Ipv4Addr::UNSPECIFIED.into(), VIP4.into()),
            (Ipv4Addr::new(0, 9, 9, 9).into(), VIP4.into()),
            (Ipv4Addr::LOCALHOST.into(), VIP4.into()),
            (Ipv4Addr::new(224, 0, 0, 5).into(), VIP4.into()),
            (Ipv4Addr::new(240, 1, 2, 3).into(), VIP4.into()),
            (Ipv4Addr::BROADCAST.into(), VIP4.into()),
            (Ipv6Addr::UNSPECIFIED.into(), VIP6.into()),
            (Ipv6Addr::LOCALHOST.into(), VIP6.into()),
            (Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).into(), VIP6.into()),
        ];
        for (i, (src, dst)) in sources.into_iter().enumerate() {
            let mut f = sized_tcp(src, 65_030, dst, PORT_TOO_BIG, 1400);
            if i % 2 == 1 {
                f = f.vlan(11);
            }
            let input = f.build();
            let out = bed.run_flow(&input, DROP_TOO_BIG_BAD_SOURCE, &[New]);
            assert_eq!(out, input, "from {src}: dropped untouched");
        }
        // The same packets that fit are forwarded: only the ICMP error is refused.
        let f = sized_tcp(Ipv4Addr::new(224, 0, 0, 5).into(), 65_031, VIP4.into(), PORT_TOO_BIG, 1000);
        bed.run_counted(&f.build(), Reason::TxEncap);
    });
}

/// `ip args...` inside the bed's namespace (the calling thread is in it; so is the child).
fn ip(args: &str) {
    let status = std::process::Command::new("ip").args(args.split_whitespace()).status().expect("run ip");
    assert!(status.success(), "ip {args}");
}

/// The FIB's answer for a backend is cached per CPU: a neighbour or route change is seen only
/// once the agent moves the route generation (it does so on every rtnetlink notification),
/// and a cached next hop answers the MTU check as the FIB did.
#[test]
fn next_hops_are_cached_until_the_route_generation_moves() {
    let bed = DpBed::new().expect("bed");
    bed.run(|bed| {
        // NEXT_HOPS is per CPU: a packet on another CPU would find another cache.
        pin_to_current_cpu();
        let (c, v) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4));
        let f = tcp(c, 48_000, v, PORT_IPIP);
        let input = f.build();
        let backend = bed.expected_backend(&f);
        let first = bed.run_counted(&input, Reason::TxEncap);
        assert_eq!(first, expected_encap(bed, &f, &input, backend));

        // The gateway's MAC changes: the cached next hop still says the old one...
        let new_mac = [0x02, 0x9a, 0, 0, 0x04, 0xee];
        ip("neigh replace 10.1.0.254 lladdr 02:9a:00:00:04:ee dev veth0 nud permanent");
        assert_eq!(bed.run_counted(&input, Reason::TxEncap), first, "from the cache");
        // ...until the generation moves.
        bed.dp.routes_changed().unwrap();
        let after = bed.run_counted(&input, Reason::TxEncap);
        assert_eq!(mac_at(&after, 0), new_mac, "the FIB asked again");
        assert_eq!(after[6..], first[6..], "nothing else changed");
        assert_eq!(bed.dp.route_changes(), 1);
        ip("neigh replace 10.1.0.254 lladdr 02:9a:00:00:04:fe dev veth0 nud permanent");
        bed.dp.routes_changed().unwrap();

        // A cached next hop keeps the route's MTU: 1300 here. Cache it with a packet that fits,
        // raise the route's MTU behind the cache's back: the cache still answers "too big".
        let fits = sized_tcp(c, 48_001, v, PORT_TOO_BIG, 1000);
        let fits_in = fits.build();
        bed.run_counted(&fits_in, Reason::TxEncap);
        ip("route replace 10.3.0.0/24 via 10.1.0.254 mtu lock 1400");
        let big = sized_tcp(c, 48_002, v, PORT_TOO_BIG, 1350);
        let big_in = big.build();
        let out = bed.run_flow(&big_in, Reason::TxTooBig, &[New]);
        assert_eq!(out, expect_too_big_v4(&big_in, SMALL_MTU - 20), "the cached MTU");
        bed.dp.routes_changed().unwrap();
        let out = bed.run_counted(&big_in, Reason::TxEncap);
        assert!(out == expected_encap(bed, &big, &big_in, bed.expected_backend(&big)), "the new MTU");

        // IPv6: the same cache, keyed by backend.
        let (c6, v6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6));
        let f6 = tcp(c6, 48_003, v6, PORT_IPIP);
        let in6 = f6.build();
        let first6 = bed.run_counted(&in6, Reason::TxEncap);
        assert_eq!(first6, expected_encap(bed, &f6, &in6, bed.expected_backend(&f6)));
        ip("neigh replace fd00:1::fe lladdr 02:9a:00:00:06:ee dev veth0 nud permanent");
        assert_eq!(bed.run_counted(&in6, Reason::TxEncap), first6, "from the cache");
        bed.dp.routes_changed().unwrap();
        assert_eq!(mac_at(&bed.run_counted(&in6, Reason::TxEncap), 0), [0x02, 0x9a, 0, 0, 0x06, 0xee]);
    });
}
