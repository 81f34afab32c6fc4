//! The backend side of L3 DSR: `xlb_decap` on crafted IPIP/IP6IP6 frames through
//! BPF_PROG_TEST_RUN (verdict, exact output frame and the counter of every case), and
//! `lb-agent decap` as a real process in network namespaces. Needs root (CAP_BPF).
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use lb_agent::decap::Decap;
use lb_common::{reason::DecapReason, Counters, ETH_HDR, IPV4_HDR, IPV6_HDR, VLAN_HDR};
use xlb_tests::{
    agent::{agent_binary, TempDir},
    bed::XDP_PASS,
    netns::Netns,
    wire::{checksum, Frame},
};

/// This backend's addresses: the outer destinations it accepts.
const US: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 11);
const US6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x97, 0, 0, 0, 0, 0, 0x11);
/// Another backend's.
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 12);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x97, 0, 0, 0, 0, 0, 0x12);
/// The balancer's encapsulation source.
const LB: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x97, 0, 0, 0, 0, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 1, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x97, 1, 0, 0, 0, 0, 0x100);

/// ECN codepoints (the low two bits of the IPv4 TOS / IPv6 traffic class).
const ECT0: u8 = 0b10;
const CE: u8 = 0b11;

/// An outer IPv4 header (protocol 4, DF, TOS `tos`) in front of `inner`'s IP packet, after its
/// L2 header (VLAN tag included), as the balancer writes it.
fn ipip(inner: &[u8], l3: usize, src: Ipv4Addr, dst: Ipv4Addr, tos: u8) -> Vec<u8> {
    let total = (inner.len() - l3 + IPV4_HDR) as u16;
    let mut outer = vec![0x45, tos];
    outer.extend_from_slice(&total.to_be_bytes());
    outer.extend_from_slice(&[0, 0, 0x40, 0, 64, 4, 0, 0]);
    outer.extend_from_slice(&src.octets());
    outer.extend_from_slice(&dst.octets());
    let csum = checksum(&outer);
    outer[10..12].copy_from_slice(&csum.to_be_bytes());
    encapsulate(inner, l3, &outer, 0x0800)
}

/// An outer IPv6 header (next header 41, ECN bits `ecn`) in front of `inner`'s IP packet.
fn ip6ip6(inner: &[u8], l3: usize, src: Ipv6Addr, dst: Ipv6Addr, ecn: u8) -> Vec<u8> {
    let payload = (inner.len() - l3) as u16;
    let mut outer = vec![0x60, ecn << 4, 0, 0];
    outer.extend_from_slice(&payload.to_be_bytes());
    outer.extend_from_slice(&[41, 64]);
    outer.extend_from_slice(&src.octets());
    outer.extend_from_slice(&dst.octets());
    encapsulate(inner, l3, &outer, 0x86dd)
}

/// `outer` between `inner`'s L2 header and its IP packet; the EtherType becomes the outer's.
fn encapsulate(inner: &[u8], l3: usize, outer: &[u8], ether_type: u16) -> Vec<u8> {
    let mut frame = [&inner[..l3], outer, &inner[l3..]].concat();
    frame[l3 - 2..l3].copy_from_slice(&ether_type.to_be_bytes());
    frame
}

/// `frame` (IPv4 at `l3`) with its TOS byte set and the header checksum redone.
fn with_tos(mut frame: Vec<u8>, l3: usize, tos: u8) -> Vec<u8> {
    frame[l3 + 1] = tos;
    frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let csum = checksum(&frame[l3..l3 + IPV4_HDR]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
    frame
}

/// `frame` (IPv6 at `l3`) with the ECN bits of its traffic class set.
fn with_ecn6(mut frame: Vec<u8>, l3: usize, ecn: u8) -> Vec<u8> {
    frame[l3 + 1] = (frame[l3 + 1] & 0xcf) | (ecn << 4);
    frame
}

struct Bed {
    decap: Decap,
}

fn bed() -> Bed {
    let mut decap = Decap::load().expect("load the decap program (run the tests as root)");
    decap.add_address(US.into()).unwrap();
    decap.add_address(US6.into()).unwrap();
    Bed { decap }
}

impl Bed {
    /// Runs one frame; returns the verdict and the output frame.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        xlb_tests::testrun::run_xdp(self.decap.program(), frame, None).expect("BPF_PROG_TEST_RUN")
    }

    fn counters(&self) -> Vec<(DecapReason, Counters)> {
        self.decap.counters().unwrap()
    }

    /// Runs `frame`, checks that exactly `reason`'s counter moved, by one frame of the input's
    /// size, and that the verdict is XDP_PASS; returns the output frame.
    fn run_counted(&mut self, frame: &[u8], reason: DecapReason) -> Vec<u8> {
        let before = self.counters();
        let (verdict, out) = self.run(frame);
        let after = self.counters();
        xlb_tests::testrun::assert_one_counted(&before, &after, reason, frame.len());
        assert_eq!(verdict, XDP_PASS, "verdict for {}", reason.name());
        assert_eq!(verdict, reason.action().code());
        out
    }

    fn assert_decapsulated(&mut self, frame: &[u8], inner: &[u8]) {
        let out = self.run_counted(frame, DecapReason::Decapsulated);
        assert_eq!(out, inner, "the inner frame, with the original L2 header");
    }

    fn assert_untouched(&mut self, frame: &[u8], reason: DecapReason) {
        let out = self.run_counted(frame, reason);
        assert_eq!(out, frame, "{} leaves the frame as it was", reason.name());
    }
}

#[test]
fn ipip_to_us_becomes_the_inner_frame() {
    let mut bed = bed();
    for f in [Frame::tcp(CLIENT, 40_000, VIP, 80), Frame::udp(CLIENT, 40_001, VIP, 53), Frame::icmp(CLIENT, VIP)] {
        let inner = f.build();
        bed.assert_decapsulated(&ipip(&inner, ETH_HDR, LB, US, 0), &inner);
    }
    // A large one, and one whose inner header has options.
    let big = Frame::tcp(CLIENT, 40_002, VIP, 80).payload(vec![0xab; 1400]).build();
    bed.assert_decapsulated(&ipip(&big, ETH_HDR, LB, US, 0), &big);
    let opts = Frame::tcp(CLIENT, 40_003, VIP, 80).ip_options(8).build();
    bed.assert_decapsulated(&ipip(&opts, ETH_HDR, LB, US, 0), &opts);
}

#[test]
fn ip6ip6_to_us_becomes_the_inner_frame() {
    let mut bed = bed();
    for f in [
        Frame::tcp(CLIENT6, 40_000, VIP6, 80),
        Frame::udp(CLIENT6, 40_001, VIP6, 53),
        Frame::udp(CLIENT6, 40_002, VIP6, 53).ip_options(8),
    ] {
        let inner = f.build();
        bed.assert_decapsulated(&ip6ip6(&inner, ETH_HDR, LB6, US6, 0), &inner);
    }
}

#[test]
fn vlan_tagged_packets_keep_their_tag() {
    let mut bed = bed();
    let l3 = ETH_HDR + VLAN_HDR;
    let inner = Frame::tcp(CLIENT, 41_000, VIP, 80).vlan(42).build();
    bed.assert_decapsulated(&ipip(&inner, l3, LB, US, 0), &inner);
    let inner6 = Frame::udp(CLIENT6, 41_001, VIP6, 53).vlan(42).build();
    bed.assert_decapsulated(&ip6ip6(&inner6, l3, LB6, US6, 0), &inner6);
    // Tagged, but to another host.
    let other = ipip(&inner, l3, LB, OTHER, 0);
    bed.assert_untouched(&other, DecapReason::PassNotForUs);
}

#[test]
fn encapsulated_packets_to_another_host_pass_untouched() {
    let mut bed = bed();
    let inner = Frame::tcp(CLIENT, 40_000, VIP, 80).build();
    bed.assert_untouched(&ipip(&inner, ETH_HDR, LB, OTHER, 0), DecapReason::PassNotForUs);
    let inner6 = Frame::tcp(CLIENT6, 40_000, VIP6, 80).build();
    bed.assert_untouched(&ip6ip6(&inner6, ETH_HDR, LB6, OTHER6, 0), DecapReason::PassNotForUs);
    // Our IPv4 address in an IPv6 key, and the other way round, are not ours.
    let v4_as_v6: Ipv6Addr = US.to_ipv6_mapped();
    bed.assert_untouched(&ip6ip6(&inner6, ETH_HDR, LB6, v4_as_v6, 0), DecapReason::PassNotForUs);
}

#[test]
fn traffic_that_is_not_encapsulated_passes_untouched() {
    let mut bed = bed();
    let cases = [
        Frame::tcp(CLIENT, 1234, US, 22).build(),
        Frame::udp(CLIENT, 1234, US, 53).vlan(5).build(),
        Frame::tcp(CLIENT6, 1234, US6, 22).build(),
        Frame::icmp(CLIENT, US).build(),
        // ARP, and a second VLAN tag (QinQ): not walked.
        Frame::tcp(CLIENT, 1234, US, 22).ether_type(0x0806).build(),
        Frame::tcp(CLIENT, 1234, US, 22).vlan(5).ether_type(0x8100).build(),
    ];
    for frame in &cases {
        bed.assert_untouched(frame, DecapReason::PassNotEncap);
    }
    // Outer fragments (first and later) and an outer IPv6 extension header are not ours to
    // reassemble or walk.
    let inner = Frame::tcp(CLIENT, 40_000, VIP, 80).build();
    let mut first = ipip(&inner, ETH_HDR, LB, US, 0);
    first[ETH_HDR + 6] = 0x20; // MF
    bed.assert_untouched(&first, DecapReason::PassNotEncap);
    let mut later = ipip(&inner, ETH_HDR, LB, US, 0);
    later[ETH_HDR + 6..ETH_HDR + 8].copy_from_slice(&[0x00, 0xb9]);
    bed.assert_untouched(&later, DecapReason::PassNotEncap);
    let mut with_ext = Frame::udp(LB6, 0, US6, 0).ip_options(8);
    with_ext.proto = 41;
    bed.assert_untouched(&with_ext.build(), DecapReason::PassNotEncap);
}

#[test]
fn malformed_encapsulation_passes_untouched() {
    let mut bed = bed();
    let inner = Frame::tcp(CLIENT, 40_000, VIP, 80).build();
    let inner6 = Frame::tcp(CLIENT6, 40_000, VIP6, 80).build();
    // The inner family is not the outer one.
    bed.assert_untouched(&ipip(&inner6, ETH_HDR, LB, US, 0), DecapReason::PassMalformed);
    bed.assert_untouched(&ip6ip6(&inner, ETH_HDR, LB6, US6, 0), DecapReason::PassMalformed);

    // Cut inside the outer header, or inside the inner one.
    let v4 = ipip(&inner, ETH_HDR, LB, US, 0);
    for cut in [ETH_HDR + 10, ETH_HDR + IPV4_HDR - 1, ETH_HDR + IPV4_HDR, ETH_HDR + IPV4_HDR + IPV4_HDR - 1] {
        bed.assert_untouched(&v4[..cut], DecapReason::PassMalformed);
    }
    let v6 = ip6ip6(&inner6, ETH_HDR, LB6, US6, 0);
    for cut in [ETH_HDR + 7, ETH_HDR + IPV6_HDR - 1, ETH_HDR + IPV6_HDR + 1, ETH_HDR + IPV6_HDR + IPV6_HDR - 1] {
        bed.assert_untouched(&v6[..cut], DecapReason::PassMalformed);
    }
    // Cut inside the VLAN tag.
    let tagged = ipip(&Frame::tcp(CLIENT, 1, VIP, 80).vlan(7).build(), ETH_HDR + VLAN_HDR, LB, US, 0);
    bed.assert_untouched(&tagged[..ETH_HDR + 2], DecapReason::PassMalformed);

    // Outer: options (the balancer writes none), wrong version; inner: IHL < 5, wrong version.
    let mut options = v4.clone();
    options[ETH_HDR] = 0x46;
    bed.assert_untouched(&options, DecapReason::PassMalformed);
    let mut version = v4.clone();
    version[ETH_HDR] = 0x55;
    bed.assert_untouched(&version, DecapReason::PassMalformed);
    let mut ihl = v4.clone();
    ihl[ETH_HDR + IPV4_HDR] = 0x44;
    bed.assert_untouched(&ihl, DecapReason::PassMalformed);
    let mut v6_version = v6.clone();
    v6_version[ETH_HDR] = 0x40;
    bed.assert_untouched(&v6_version, DecapReason::PassMalformed);
    let mut v6_inner_version = v6.clone();
    v6_inner_version[ETH_HDR + IPV6_HDR] = 0x40;
    bed.assert_untouched(&v6_inner_version, DecapReason::PassMalformed);

    // Outer and inner lengths that disagree.
    let mut long = v4.clone();
    long[ETH_HDR + 3] += 1;
    bed.assert_untouched(&long, DecapReason::PassMalformed);
    let mut long6 = v6.clone();
    long6[ETH_HDR + 5] += 1;
    bed.assert_untouched(&long6, DecapReason::PassMalformed);
}

/// RFC 6040: a congestion mark on the outer header reaches an ECN-capable inner packet; a
/// packet that is not ECN-capable keeps its codepoint.
#[test]
fn congestion_marks_reach_the_inner_packet() {
    let mut bed = bed();
    let inner = with_tos(Frame::tcp(CLIENT, 40_000, VIP, 80).build(), ETH_HDR, 0xb8 | ECT0);
    let marked = with_tos(inner.clone(), ETH_HDR, 0xb8 | CE);
    bed.assert_decapsulated(&ipip(&inner, ETH_HDR, LB, US, 0xb8 | CE), &marked);
    assert_eq!(checksum(&marked[ETH_HDR..ETH_HDR + IPV4_HDR]), 0);
    bed.assert_decapsulated(&ipip(&inner, ETH_HDR, LB, US, 0xb8 | ECT0), &inner);
    let not_ect = Frame::tcp(CLIENT, 40_000, VIP, 80).build();
    bed.assert_decapsulated(&ipip(&not_ect, ETH_HDR, LB, US, CE), &not_ect);

    let inner6 = with_ecn6(Frame::tcp(CLIENT6, 40_000, VIP6, 80).build(), ETH_HDR, ECT0);
    let marked6 = with_ecn6(inner6.clone(), ETH_HDR, CE);
    bed.assert_decapsulated(&ip6ip6(&inner6, ETH_HDR, LB6, US6, CE), &marked6);
    let not_ect6 = Frame::tcp(CLIENT6, 40_000, VIP6, 80).build();
    bed.assert_decapsulated(&ip6ip6(&not_ect6, ETH_HDR, LB6, US6, CE), &not_ect6);
}

/// Found by the fuzz test (tests/tests/fuzz.rs): the length check compared modulo 2^16, so an
/// outer IPv4 total length below its own header (0..=19) agreed with an inner one of 65516 or
/// more, and an outer IPv6 payload length of 0..=39 with an inner one of 65496 or more: such
/// frames were decapsulated instead of passed untouched as malformed.
#[test]
fn lengths_that_agree_only_modulo_2_16_are_malformed() {
    let mut bed = bed();
    let inner = Frame::tcp(CLIENT, 40_000, VIP, 80).build();
    let inner6 = Frame::tcp(CLIENT6, 40_000, VIP6, 80).build();
    let v4 = ipip(&inner, ETH_HDR, LB, US, 0);
    let v6 = ip6ip6(&inner6, ETH_HDR, LB6, US6, 0);
    for inner_len in [0xffffu16, 0xffec, 0xfff0] {
        let mut f = v4.clone();
        let outer_len = inner_len.wrapping_add(IPV4_HDR as u16);
        f[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&outer_len.to_be_bytes());
        f[ETH_HDR + 22..ETH_HDR + 24].copy_from_slice(&inner_len.to_be_bytes());
        bed.assert_untouched(&f, DecapReason::PassMalformed);
    }
    for inner_payload in [0xffffu16, 0xffd8, 0xffe0] {
        let mut f = v6.clone();
        let outer_payload = inner_payload.wrapping_add(IPV6_HDR as u16);
        f[ETH_HDR + 4..ETH_HDR + 6].copy_from_slice(&outer_payload.to_be_bytes());
        f[ETH_HDR + 44..ETH_HDR + 46].copy_from_slice(&inner_payload.to_be_bytes());
        bed.assert_untouched(&f, DecapReason::PassMalformed);
    }
    // The largest lengths that do agree are still decapsulated (the frame need not hold them:
    // the stack judges the inner packet).
    let mut f = v4.clone();
    f[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&0xffffu16.to_be_bytes());
    f[ETH_HDR + 22..ETH_HDR + 24].copy_from_slice(&0xffebu16.to_be_bytes());
    let mut expected = inner.clone();
    expected[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&0xffebu16.to_be_bytes());
    bed.assert_decapsulated(&f, &expected);
}

/// Bytes after the outer packet's declared end (Ethernet padding, or what the balancer keeps
/// after a padded client frame) stay after the inner packet, for the stack to trim; a packet
/// encapsulated twice loses one outer header only.
#[test]
fn padding_stays_and_nested_packets_are_stripped_once() {
    let mut bed = bed();
    let mut inner = Frame::tcp(CLIENT, 40_000, VIP, 80).payload(Vec::new()).build();
    let frame = ipip(&inner, ETH_HDR, LB, US, 0);
    inner.extend_from_slice(&[0; 6]);
    let mut padded = frame.clone();
    padded.extend_from_slice(&[0; 6]);
    bed.assert_decapsulated(&padded, &inner);

    let inner6 = Frame::udp(CLIENT6, 40_001, VIP6, 53).build();
    let middle6 = ip6ip6(&inner6, ETH_HDR, LB6, US6, 0);
    let twice6 = ip6ip6(&middle6, ETH_HDR, LB6, US6, 0);
    bed.assert_decapsulated(&twice6, &middle6);
    let inner4 = Frame::udp(CLIENT, 40_002, VIP, 53).vlan(9).build();
    let l3 = ETH_HDR + VLAN_HDR;
    let middle4 = ipip(&inner4, l3, LB, US, 0);
    let twice4 = ipip(&middle4, l3, LB, US, 0);
    bed.assert_decapsulated(&twice4, &middle4);
    // Stripped once more, the result is the client's frame.
    bed.assert_decapsulated(&middle4, &inner4);
}

// ---- `lb-agent decap` as a process ----

/// `lb-agent decap` running in a namespace, its log in a file; killed if still running on drop.
struct DecapProcess {
    child: Child,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl DecapProcess {
    fn start(ns: &Netns, args: &[&str]) -> Self {
        let dir = TempDir::new("decap").unwrap();
        let log = dir.0.join("decap.log");
        let file = File::create(&log).unwrap();
        let child = ns
            .command(agent_binary().unwrap().to_str().unwrap())
            .arg("decap")
            .args(args)
            .env("RUST_LOG_STYLE", "never")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Self { child, log, _dir: dir }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&mut self, needle: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("lb-agent decap exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("lb-agent decap did not log {needle:?}:\n{}", self.log_text());
    }

    /// Waits for the exit; returns the exit code and the log.
    fn wait(&mut self) -> (Option<i32>, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), self.log_text());
            }
            assert!(start.elapsed() < Duration::from_secs(10), "still running:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs the agent in place).
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for DecapProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn link_show(ns: &Netns, dev: &str) -> String {
    String::from_utf8_lossy(&ns.exec(&["ip", "link", "show", dev]).unwrap().stdout).into_owned()
}

/// Sends `inner` (an IP packet) encapsulated by the kernel: a raw socket of protocol 4 (or 41)
/// puts the outer header in front.
fn send_encapsulated(ns: &Netns, inner: Vec<u8>, dst: IpAddr) {
    ns.run(move || {
        let (family, proto) = match dst {
            IpAddr::V4(_) => (libc::AF_INET, 4),
            IpAddr::V6(_) => (libc::AF_INET6, 41),
        };
        // SAFETY: plain socket calls on a descriptor we own and close; the sockaddrs are
        // initialised and sized for their family.
        unsafe {
            let fd = libc::socket(family, libc::SOCK_RAW, proto);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let sent = match dst {
                IpAddr::V4(a) => {
                    let mut sin: libc::sockaddr_in = std::mem::zeroed();
                    sin.sin_family = libc::AF_INET as u16;
                    sin.sin_addr.s_addr = u32::from(a).to_be();
                    libc::sendto(
                        fd,
                        inner.as_ptr().cast(),
                        inner.len(),
                        0,
                        (&sin as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                }
                IpAddr::V6(a) => {
                    let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
                    sin6.sin6_family = libc::AF_INET6 as u16;
                    sin6.sin6_addr.s6_addr = a.octets();
                    libc::sendto(
                        fd,
                        inner.as_ptr().cast(),
                        inner.len(),
                        0,
                        (&sin6 as *const libc::sockaddr_in6).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as u32,
                    )
                }
            };
            assert_eq!(sent, inner.len() as isize, "sendto: {}", std::io::Error::last_os_error());
            libc::close(fd);
        }
    })
    .unwrap();
}

/// A UDP datagram from the client to the VIP as an IP packet, with a valid UDP checksum.
fn udp_packet(src: IpAddr, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let frame = Frame::udp(src, 40_000, dst, dport).payload(payload.to_vec());
    let mut packet = frame.build()[ETH_HDR..].to_vec();
    let l4 = frame.l4_offset() - ETH_HDR;
    let udp_len = (packet.len() - l4) as u16;
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&udp_len.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        }
        _ => unreachable!(),
    }
    pseudo.extend_from_slice(&packet[l4..]);
    let csum = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    packet[l4 + 6..l4 + 8].copy_from_slice(&csum.to_be_bytes());
    packet
}

/// Sends encapsulated datagrams until `sock` receives one, at most `tries` (the first may wait
/// for ARP/ND).
fn delivered(lb: &Netns, sock: &UdpSocket, packet: &[u8], outer_dst: IpAddr, tries: usize) -> bool {
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..tries {
        send_encapsulated(lb, packet.to_vec(), outer_dst);
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return &buf[..n] == b"through the tunnel";
        }
    }
    false
}

/// A balancer namespace and a backend namespace on one veth pair: `lb-agent decap` on the
/// backend accepts its interface's addresses, delivers encapsulated datagrams to a server bound
/// to the VIP on its loopback, and leaves nothing attached after SIGTERM.
#[test]
fn decap_command_attaches_delivers_and_detaches() {
    let backend = Netns::new("decap-be").unwrap();
    let lb = Netns::new("decap-lb").unwrap();
    backend.exec(&["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"]).unwrap();
    backend.exec(&["ip", "link", "set", "veth1", "netns", &lb.name]).unwrap();
    for (ns, dev, v4, v6) in
        [(&backend, "veth0", "10.96.0.11/24", "fd00:96::11/64"), (&lb, "veth1", "10.96.0.2/24", "fd00:96::2/64")]
    {
        ns.exec(&["ip", "addr", "add", v4, "dev", dev]).unwrap();
        ns.exec(&["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"]).unwrap();
        ns.exec(&["ip", "link", "set", dev, "up"]).unwrap();
    }
    // The VIP on the backend's loopback; replies to the client go back out of veth0.
    backend.exec(&["ip", "addr", "add", "10.96.1.100/32", "dev", "lo"]).unwrap();
    backend.exec(&["ip", "-6", "addr", "add", "fd00:96:1::100/128", "dev", "lo", "nodad"]).unwrap();
    backend.exec(&["ip", "route", "add", "default", "dev", "veth0"]).unwrap();
    backend.exec(&["ip", "-6", "route", "add", "default", "dev", "veth0"]).unwrap();

    let mut agent = DecapProcess::start(&backend, &["--iface", "veth0", "--address", "10.96.2.1"]);
    agent.wait_for_log("decapsulating on veth0 (XDP Native mode)");
    let log = agent.log_text();
    assert!(log.contains("accepting IPIP/IP6IP6 packets to 10.96.0.11, fd00:96::11, 10.96.2.1"), "{log}");
    assert!(!log.contains("fe80"), "link-local addresses are not accepted: {log}");
    assert!(link_show(&backend, "veth0").contains("xdp"));

    // Without decapsulation the backend's stack would drop these (no tunnel device).
    let sock = backend.run(|| UdpSocket::bind("10.96.1.100:7000")).unwrap().unwrap();
    let packet = udp_packet("192.0.2.7".parse().unwrap(), "10.96.1.100".parse().unwrap(), 7000, b"through the tunnel");
    assert!(delivered(&lb, &sock, &packet, "10.96.0.11".parse().unwrap(), 10), "IPIP datagram not delivered");
    let sock6 = backend.run(|| UdpSocket::bind("[fd00:96:1::100]:7000")).unwrap().unwrap();
    let packet6 =
        udp_packet("2001:db8::7".parse().unwrap(), "fd00:96:1::100".parse().unwrap(), 7000, b"through the tunnel");
    assert!(delivered(&lb, &sock6, &packet6, "fd00:96::11".parse().unwrap(), 10), "IP6IP6 datagram not delivered");

    agent.signal(libc::SIGUSR1);
    agent.wait_for_log("counters:");
    agent.signal(libc::SIGTERM);
    let (code, log) = agent.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("SIGTERM: detaching") && log.contains("detached from veth0; exiting"), "{log}");
    let decapsulated = log
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("decapsulated"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .next_back();
    assert!(decapsulated.is_some_and(|n| n >= 2), "two datagrams decapsulated at least:\n{log}");
    assert!(!link_show(&backend, "veth0").contains("xdp"), "detached on SIGTERM");
    // Control: without the program, the stack has nothing to decapsulate with.
    assert!(!delivered(&lb, &sock, &packet, "10.96.0.11".parse().unwrap(), 2), "delivered without decap");
    assert!(!delivered(&lb, &sock6, &packet6, "fd00:96::11".parse().unwrap(), 2), "delivered without decap");
}

#[test]
fn decap_command_refuses_an_unknown_interface_or_one_without_address() {
    let ns = Netns::new("decap-err").unwrap();
    let mut agent = DecapProcess::start(&ns, &["--iface", "nosuchif0"]);
    let (code, log) = agent.wait();
    assert_eq!(code, Some(1));
    assert!(log.contains("unknown interface \"nosuchif0\""), "{log}");

    // Up, but with only a link-local IPv6 address.
    ns.exec(&["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"]).unwrap();
    ns.exec(&["ip", "link", "set", "veth0", "up"]).unwrap();
    let mut agent = DecapProcess::start(&ns, &["--iface", "veth0", "--xdp-mode", "generic"]);
    let (code, log) = agent.wait();
    assert_eq!(code, Some(1));
    assert!(log.contains("veth0 has no IPv4 or global IPv6 address to accept"), "{log}");
    assert!(!link_show(&ns, "veth0").contains("xdp"));

    // Forced generic mode with an address given by hand.
    let mut agent = DecapProcess::start(&ns, &["--iface", "veth0", "--xdp-mode", "generic", "--address", "fd00::1"]);
    agent.wait_for_log("decapsulating on veth0 (XDP Generic mode)");
    assert!(link_show(&ns, "veth0").contains("xdpgeneric"));
    agent.signal(libc::SIGINT);
    let (code, log) = agent.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(!link_show(&ns, "veth0").contains("xdp"));
}

#[test]
fn decap_command_has_help() {
    let out = std::process::Command::new(agent_binary().unwrap()).args(["decap", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Strip the outer IPIP/IP6IP6 header of packets addressed to this host"), "{help}");
    for flag in ["--iface", "--xdp-mode", "--address"] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
}
