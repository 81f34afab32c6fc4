//! The XDP balancer on crafted frames through BPF_PROG_TEST_RUN: verdict, exact output frame
//! and the counter of every case. Needs root (CAP_BPF).
use std::net::Ipv4Addr;

use lb_agent::config::Forward;
use lb_common::{Reason, ETH_HDR, IPV4_HDR};
use xlb_tests::{
    bed::{Bed, Builder, XDP_TX},
    wire::Frame,
};

const SEED: u32 = 0x5eed;
const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x03];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 101);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const TABLE: u32 = 251;

fn backend_mac(i: u32) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, i as u8]
}

/// Three backends; TCP 80 and UDP 53 on the VIP over all three; a service without backends.
fn bed() -> Bed {
    let mut builder = Builder::new(SEED, LB_MAC, TABLE);
    for i in 0..3u32 {
        builder = builder.backend(i, Ipv4Addr::new(10, 99, 0, 11 + i as u8).into(), Some(backend_mac(i)));
    }
    builder
        .service(VIP.into(), 80, 6, Forward::L2, &[0, 1, 2])
        .service(VIP.into(), 53, 17, Forward::L2, &[0, 1, 2])
        .empty_service(EMPTY_VIP.into(), 80, 6)
        .build()
        .expect("load the balancer (run the tests as root)")
}

/// A VIP hit: XDP_TX, the MACs rewritten, every other byte as it was; counted per service
/// and per backend.
fn assert_forwarded(bed: &mut Bed, f: &Frame) {
    let input = f.build();
    let backend = bed.expected_backend(f);
    let service = bed.service(f.dst, f.proto, f.dport).slot.id;
    let svc_before = bed.dp.service_counters(service).unwrap();
    let be_before = bed.dp.backend_counters(backend).unwrap();
    let out = bed.run_counted(&input, Reason::TxForwarded);
    let mut expected = input.clone();
    expected[0..6].copy_from_slice(&backend_mac(backend));
    expected[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(out, expected, "only the MACs change");
    let svc_after = bed.dp.service_counters(service).unwrap();
    let be_after = bed.dp.backend_counters(backend).unwrap();
    assert_eq!(svc_after.packets - svc_before.packets, 1);
    assert_eq!(be_after.packets - be_before.packets, 1);
    assert_eq!(be_after.bytes - be_before.bytes, input.len() as u64);
}

#[test]
fn vip_hits_are_rewritten_to_the_maglev_backend() {
    let mut bed = bed();
    let mut seen = std::collections::HashSet::new();
    for sport in 40_000..40_030u16 {
        let tcp = Frame::tcp(CLIENT, sport, VIP, 80);
        seen.insert(bed.expected_backend(&tcp));
        assert_forwarded(&mut bed, &tcp);
        assert_forwarded(&mut bed, &Frame::udp(CLIENT, sport, VIP, 53));
    }
    assert_eq!(seen.len(), 3, "30 flows reach all three backends");
}

#[test]
fn vlan_tagged_hit_keeps_its_tag() {
    let mut bed = bed();
    let f = Frame::tcp(CLIENT, 41_000, VIP, 80).vlan(42);
    assert_forwarded(&mut bed, &f);
}

#[test]
fn traffic_that_is_not_ours_passes_untouched() {
    let mut bed = bed();
    bed.assert_untouched(&Frame::tcp(CLIENT, 1234, Ipv4Addr::new(10, 99, 0, 3), 80).build(), Reason::PassNotVip);
    bed.assert_untouched(
        &Frame::udp(CLIENT, 1234, Ipv4Addr::new(192, 0, 2, 1), 53).vlan(5).build(),
        Reason::PassNotVip,
    );
    bed.assert_untouched(&Frame::tcp(CLIENT, 1234, VIP, 80).ether_type(0x0806).build(), Reason::PassNotIp);
    bed.assert_untouched(&Frame::tcp(CLIENT, 1234, VIP, 80).ether_type(0x86dd).build(), Reason::PassMalformed);
    bed.assert_untouched(&Frame::icmp(CLIENT, VIP).build(), Reason::PassVipIcmp);
}

#[test]
fn vip_without_a_matching_service_is_dropped() {
    let mut bed = bed();
    bed.run_counted(&Frame::tcp(CLIENT, 1234, VIP, 81).build(), Reason::DropUnknownService);
    bed.run_counted(&Frame::udp(CLIENT, 1234, VIP, 80).build(), Reason::DropUnknownService);
    let mut gre = Frame::tcp(CLIENT, 1234, VIP, 80);
    gre.proto = 47;
    bed.run_counted(&gre.build(), Reason::DropUnknownService);
}

#[test]
fn service_without_backends_drops() {
    let mut bed = bed();
    bed.run_counted(&Frame::tcp(CLIENT, 1234, EMPTY_VIP, 80).build(), Reason::DropNoBackend);
}

#[test]
fn truncated_frames_get_a_safe_verdict() {
    let mut bed = bed();
    // The kernel refuses test frames shorter than an Ethernet header, so the shortest cut is
    // inside the VLAN tag.
    let vlan = Frame::tcp(CLIENT, 1234, VIP, 80).vlan(7).build();
    bed.assert_untouched(&vlan[..ETH_HDR + 2], Reason::PassMalformed);
    let tcp = Frame::tcp(CLIENT, 1234, VIP, 80).build();
    for cut in [ETH_HDR, ETH_HDR + 1, ETH_HDR + 10, ETH_HDR + IPV4_HDR - 1] {
        bed.assert_untouched(&tcp[..cut], Reason::PassMalformed);
    }
    for cut in [ETH_HDR + IPV4_HDR, ETH_HDR + IPV4_HDR + 3, ETH_HDR + IPV4_HDR + 19] {
        bed.run_counted(&tcp[..cut], Reason::DropTruncatedL4);
    }
    let udp = Frame::udp(CLIENT, 1234, VIP, 53).build();
    bed.run_counted(&udp[..ETH_HDR + IPV4_HDR + 7], Reason::DropTruncatedL4);
    // A header that claims to be shorter than 20 bytes, or not version 4.
    let mut bad_ihl = tcp.clone();
    bad_ihl[ETH_HDR] = 0x44;
    bed.assert_untouched(&bad_ihl, Reason::PassMalformed);
    let mut bad_version = tcp.clone();
    bad_version[ETH_HDR] = 0x65;
    bed.assert_untouched(&bad_version, Reason::PassMalformed);
}

#[test]
fn ip_options_and_fragments_to_a_vip_are_dropped() {
    let mut bed = bed();
    bed.run_counted(&Frame::tcp(CLIENT, 1234, VIP, 80).ip_options(4).build(), Reason::DropIpOptions);
    bed.run_counted(&Frame::udp(CLIENT, 1234, VIP, 53).frag(0x2000).build(), Reason::DropFragment);
    bed.run_counted(&Frame::udp(CLIENT, 1234, VIP, 53).frag(0x00b9).build(), Reason::DropFragment);
    // Options and fragments not meant for a VIP are the kernel's business.
    let other = Ipv4Addr::new(10, 99, 0, 3);
    bed.assert_untouched(&Frame::tcp(CLIENT, 1234, other, 80).ip_options(8).build(), Reason::PassNotVip);
    bed.assert_untouched(&Frame::udp(CLIENT, 1234, other, 53).frag(0x00b9).build(), Reason::PassNotVip);
}

#[test]
fn a_published_table_takes_effect_for_new_flows_at_once() {
    let mut bed = bed();
    let vip = Ipv4Addr::new(10, 99, 0, 102);
    let mut slot = bed.dp.add_service(vip.into(), 80, 6, 3, TABLE, Forward::L2).unwrap();
    // Every entry to one backend, then every entry to another: each new flow follows the
    // table in force, whichever of the two copies it is.
    for (round, target) in [1u32, 2, 0].into_iter().enumerate() {
        bed.dp.publish_table(&mut slot, &vec![target; TABLE as usize]).unwrap();
        let f = Frame::tcp(CLIENT, 45_000 + round as u16, vip, 80);
        let (verdict, out) = bed.run(&f.build());
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out[0..6], backend_mac(target), "round {round}");
    }
}

/// An address that shares a VIP's bit in VIP_BITS (10.99.0.100 and 11.99.1.100 fold to the
/// same 16 bits) gets past the one-read filter but is still not ours: every packet to it passes
/// untouched, options, fragments, ICMP and unknown ports included. A VIP that shares its bit
/// with another keeps it when the other goes.
#[test]
fn an_address_sharing_a_vips_bit_is_not_ours() {
    let mut bed = bed();
    let twin = Ipv4Addr::new(11, 99, 1, 100);
    let bit = |a: Ipv4Addr| lb_common::vip_bit(&lb_common::addr_v4(a.octets()));
    assert_eq!(bit(twin), bit(VIP), "the test needs a shared bit");
    assert_ne!(bit(Ipv4Addr::new(10, 99, 0, 3)), bit(VIP), "and an address with a bit of its own");
    for f in [
        Frame::tcp(CLIENT, 1234, twin, 80),
        Frame::udp(CLIENT, 1234, twin, 53),
        Frame::tcp(CLIENT, 1234, twin, 81),
        Frame::tcp(CLIENT, 1234, twin, 80).ip_options(8),
        Frame::udp(CLIENT, 1234, twin, 53).frag(0x00b9),
        Frame::icmp(CLIENT, twin),
    ] {
        bed.assert_untouched(&f.build(), Reason::PassNotVip);
    }
    // The twin becomes a VIP and goes again: the bit stays for VIP.
    let slot = bed.dp.add_service(twin.into(), 80, 6, 7, TABLE, Forward::L2).unwrap();
    bed.dp.remove_service(&slot).unwrap();
    assert_forwarded(&mut bed, &Frame::tcp(CLIENT, 5000, VIP, 80));
    bed.run_counted(&Frame::tcp(CLIENT, 1234, VIP, 81).build(), Reason::DropUnknownService);
    bed.assert_untouched(&Frame::tcp(CLIENT, 1234, twin, 80).build(), Reason::PassNotVip);
}
