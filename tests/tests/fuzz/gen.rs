//! Inputs: valid frames from the builder, drawn with the seeded PRNG (rng.rs), and mutations.
use super::*;

/// What a valid frame should look like; every field is drawn at random.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) v6: Option<bool>,
    /// Destination: a VIP (index) or not.
    pub(crate) vip: Option<Option<usize>>,
    pub(crate) proto: Option<u8>,
    pub(crate) vlan: Option<bool>,
    pub(crate) options: Option<bool>,
    pub(crate) frag: Option<bool>,
    pub(crate) ext: Option<bool>,
}

pub(crate) const ANY: Shape =
    Shape { v6: None, vip: None, proto: None, vlan: None, options: None, frag: None, ext: None };

pub(crate) fn random_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let mut o = [0u8; 16];
        rng.fill(&mut o);
        if rng.percent(50) {
            o[..2].copy_from_slice(&[0xfd, 0x99]); // close to the VIPs
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        let mut o = [0u8; 4];
        rng.fill(&mut o);
        if rng.percent(50) {
            o[..3].copy_from_slice(&[10, 99, 0]); // close to the VIPs
        }
        IpAddr::V4(Ipv4Addr::from(o))
    }
}

/// Sources that are no single host, which no ICMP error may answer.
pub(crate) const NOT_ONE_HOST: [IpAddr; 10] = [
    IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
    IpAddr::V4(Ipv4Addr::new(0, 1, 2, 3)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(240, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)),
    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x101)),
];

/// A client address: random, now and then one that is no single host.
pub(crate) fn random_source(rng: &mut Rng, v6: bool) -> IpAddr {
    if rng.percent(4) {
        let mut choices = NOT_ONE_HOST.iter().filter(|a| a.is_ipv6() == v6);
        let n = choices.clone().count();
        return *choices.nth(rng.below(n)).unwrap();
    }
    random_addr(rng, v6)
}

pub(crate) fn valid_frame(rng: &mut Rng, model: &Model, shape: Shape) -> Vec<u8> {
    let v6 = shape.v6.unwrap_or_else(|| rng.percent(45));
    let dst = match shape.vip.unwrap_or_else(|| rng.percent(80).then(|| rng.below(VIPS_PER_FAMILY))) {
        Some(i) => vip(v6, i),
        None => loop {
            let a = random_addr(rng, v6);
            if !model.vips.contains(&a) {
                break a;
            }
        },
    };
    let src = random_source(rng, v6);
    let icmp = if v6 { 58 } else { 1 };
    let proto = shape.proto.unwrap_or_else(|| match rng.below(100) {
        0..=44 => TCP,
        45..=81 => UDP,
        82..=89 => icmp,
        _ => rng.pick(&[0, 1, 4, 41, 47, 50, 58, 132, 255]),
    });
    let port = |rng: &mut Rng| if rng.percent(85) { rng.pick(&SERVICE_PORTS) } else { rng.u16() };
    let mut f = Frame::tcp(src, rng.u16(), dst, port(rng));
    f.proto = proto;
    rng.fill(&mut f.dst_mac);
    rng.fill(&mut f.src_mac);
    f.tcp_flags = match rng.below(10) {
        0..=5 => 0x02,
        6 => 0x10,
        7 => 0x04, // RST: closes pinned flows
        _ => rng.byte(),
    };
    f.ttl = rng.byte();
    if shape.vlan.unwrap_or_else(|| rng.percent(20)) {
        f.vlan = Some(rng.u16());
    }
    if shape.options.unwrap_or_else(|| rng.percent(6)) {
        f.ip_options = if v6 { 8 * rng.range(1, 8) } else { 4 * rng.range(1, 10) };
    }
    let fragment = shape.frag.unwrap_or_else(|| rng.percent(5));
    f.frag = match (v6, fragment) {
        (false, false) => rng.pick(&[0x4000, 0x4000, 0x4000, 0]),
        (false, true) => rng.pick(&[0x2000, 0x0001, 0x00b9, 0x3fff, 0x6000]),
        (true, false) => 0,
        (true, true) => rng.pick(&[0x0001, 0x0008, 0xfff9, 0x0100]),
    };
    let len = match rng.below(100) {
        0..=69 => rng.range(0, 64),
        70..=89 => rng.range(0, 600),
        _ => rng.range(1300, 1560),
    };
    f.payload = rng.bytes(len);
    let mut bytes = f.build();
    if v6 && shape.ext.unwrap_or_else(|| rng.percent(8)) {
        add_ipv6_ext_headers(rng, &mut bytes, f.l3_offset());
    }
    bytes
}

/// Puts 1..=6 hop-by-hop, routing or destination-options headers in front of the IPv6
/// packet's existing chain.
pub(crate) fn add_ipv6_ext_headers(rng: &mut Rng, f: &mut Vec<u8>, l3: usize) {
    let mut next = f[l3 + 6];
    let mut ext = Vec::new();
    for _ in 0..rng.range(1, 6) {
        let units = rng.below(3);
        let mut h = vec![0u8; (units + 1) * 8];
        h[0] = next;
        h[1] = units as u8;
        h[2] = 1; // PadN (routing: routing type 1, segments left (len - 4): harmless here)
        h[3] = (h.len() - 4) as u8;
        ext.splice(0..0, h);
        next = rng.pick(&[0, 43, 60]);
    }
    f[l3 + 6] = next;
    let payload = be16(f, l3 + 4) as usize + ext.len();
    f[l3 + 4..l3 + 6].copy_from_slice(&(payload as u16).to_be_bytes());
    f.splice(l3 + 40..l3 + 40, ext);
}

pub(crate) const INTERESTING16: [u16; 10] = [0, 1, 19, 20, 40, 0x7fff, 0x8000, 0xffeb, 0xffec, 0xffff];

/// Lengths that lie: IPv4 total length or IHL, IPv6 payload length, an extension header's length.
pub(crate) fn bogus_length(rng: &mut Rng, f: &mut [u8]) {
    let Some((l3, et)) = l3_of(f) else { return };
    let actual = f.len().saturating_sub(l3) as u16;
    let value = match rng.below(4) {
        0 => rng.pick(&INTERESTING16),
        1 => actual.wrapping_add(rng.range(1, 8) as u16),
        2 => actual.wrapping_sub(rng.range(1, 8) as u16),
        _ => rng.u16(),
    };
    match et {
        0x0800 if f.len() >= l3 + 20 => {
            if rng.percent(70) {
                f[l3 + 2..l3 + 4].copy_from_slice(&value.to_be_bytes());
            } else {
                f[l3] = 0x40 | (rng.byte() & 15);
            }
        }
        0x86dd if f.len() >= l3 + 40 => {
            if rng.percent(70) || f.len() < l3 + 42 {
                f[l3 + 4..l3 + 6].copy_from_slice(&value.wrapping_sub(40).to_be_bytes());
            } else {
                f[l3 + 41] = rng.byte();
            }
        }
        _ => {}
    }
}

pub(crate) fn flip_bits(rng: &mut Rng, f: &mut [u8]) {
    for _ in 0..rng.range(1, 8) {
        // Headers are where the decisions are: most flips land in the first 80 bytes.
        let span = if rng.percent(75) { f.len().min(80) } else { f.len() };
        let at = rng.below(span);
        if rng.percent(80) {
            f[at] ^= 1 << rng.below(8);
        } else {
            let any = rng.byte();
            f[at] = rng.pick(&[0, 1, 0x7f, 0x80, 0xff, any]);
        }
    }
}

pub(crate) fn cut(rng: &mut Rng, f: &mut Vec<u8>) {
    if f.len() > MIN_FRAME {
        let at = rng.range(MIN_FRAME, f.len() - 1);
        f.truncate(at);
    }
}

/// The IP packets of a valid frame wrapped once or twice more: IPIP, IPv6 in IPv4, IPv4 in
/// IPv6, IPv6 in IPv6, to a VIP or not.
pub(crate) fn nested(rng: &mut Rng, model: &Model) -> Vec<u8> {
    let inner = valid_frame(rng, model, ANY);
    let (l3, et) = l3_of(&inner).unwrap();
    let mut packet = inner[l3..].to_vec();
    let mut v6 = et == 0x86dd;
    for _ in 0..rng.range(1, 2) {
        let outer_v6 = rng.percent(40);
        let dst = if rng.percent(70) { vip(outer_v6, rng.below(VIPS_PER_FAMILY)) } else { random_addr(rng, outer_v6) };
        let src = random_addr(rng, outer_v6);
        let proto = if v6 { 41 } else { 4 };
        let mut h = Vec::with_capacity(40 + packet.len());
        if outer_v6 {
            h.extend_from_slice(&[0x60, 0, 0, 0]);
            h.extend_from_slice(&(packet.len() as u16).to_be_bytes());
            h.extend_from_slice(&[proto, 64]);
        } else {
            h.extend_from_slice(&[0x45, 0]);
            h.extend_from_slice(&((packet.len() + 20) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        }
        h.extend_from_slice(&octets(src));
        h.extend_from_slice(&octets(dst));
        if !outer_v6 {
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
        }
        h.extend_from_slice(&packet);
        packet = h;
        v6 = outer_v6;
    }
    let mut f = inner[..12].to_vec();
    if rng.percent(20) {
        f.extend_from_slice(&[0x81, 0, rng.byte(), rng.byte()]);
    }
    f.extend_from_slice(&if v6 { [0x86, 0xdd] } else { [0x08, 0x00] });
    f.extend_from_slice(&packet);
    f
}

/// A valid Ethernet header (maybe a VLAN tag) followed by random bytes, sometimes dressed up
/// with an IP version and a VIP destination so that they get past the first checks.
pub(crate) fn random_after_ethernet(rng: &mut Rng) -> Vec<u8> {
    let mut f = rng.bytes(12);
    let any = rng.u16();
    let mut et = rng.pick(&[0x0800u16, 0x0800, 0x86dd, 0x86dd, 0x8100, 0x0806, any]);
    if et == 0x8100 {
        f.extend_from_slice(&[0x81, 0, rng.byte(), rng.byte()]);
        let any = rng.u16();
        et = rng.pick(&[0x0800u16, 0x86dd, 0x8100, any]);
    }
    f.extend_from_slice(&et.to_be_bytes());
    let l3 = f.len();
    let n = if rng.percent(70) { rng.range(0, 120) } else { rng.range(0, 1500 - l3) };
    f.extend_from_slice(&rng.bytes(n));
    if rng.percent(60) {
        match et {
            0x0800 if f.len() >= l3 + 20 => {
                f[l3] = if rng.percent(70) { 0x45 } else { 0x40 | (rng.byte() & 15) };
                f[l3 + 16..l3 + 20].copy_from_slice(&octets(vip(false, rng.below(VIPS_PER_FAMILY))));
                if rng.percent(60) {
                    f[l3 + 6] &= 0x40; // no fragment
                    f[l3 + 9] = rng.pick(&[TCP, UDP]);
                }
            }
            0x86dd if f.len() >= l3 + 40 => {
                f[l3] = 0x60 | (f[l3] & 15);
                f[l3 + 24..l3 + 40].copy_from_slice(&octets(vip(true, rng.below(VIPS_PER_FAMILY))));
                if rng.percent(60) {
                    f[l3 + 6] = rng.pick(&[TCP, UDP, 0, 43, 60, 44]);
                }
            }
            _ => {}
        }
    }
    f
}

pub(crate) fn pure_random(rng: &mut Rng) -> Vec<u8> {
    let n = if rng.percent(50) { rng.range(MIN_FRAME, 100) } else { rng.range(MIN_FRAME, 1500) };
    let mut f = rng.bytes(n);
    if rng.percent(30) {
        let et = rng.pick(&[0x0800u16, 0x86dd, 0x8100]);
        f[12..14].copy_from_slice(&et.to_be_bytes());
    }
    f
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    SystematicCut,
    Valid,
    Replay,
    Cut,
    BitFlips,
    BogusLength,
    Stacked,
    Nested,
    RandomAfterEthernet,
    PureRandom,
}

/// Valid frames kept for replays: the same flows again (flow-table hits), or closed by a RST.
pub(crate) struct Recent(pub(crate) Vec<Vec<u8>>);

impl Recent {
    pub(crate) const SIZE: usize = 256;

    pub(crate) fn keep(&mut self, rng: &mut Rng, f: &[u8]) {
        if self.0.len() < Self::SIZE {
            self.0.push(f.to_vec());
        } else {
            let i = rng.below(Self::SIZE);
            self.0[i] = f.to_vec();
        }
    }

    pub(crate) fn replay(&self, rng: &mut Rng, model: &Model) -> Option<Vec<u8>> {
        let mut f = self.0.get(rng.below(self.0.len().max(1)))?.clone();
        if let Ok(flow) = model.flow(&f) {
            if flow.proto == TCP && rng.percent(30) {
                f[flow.l4 + 13] = rng.pick(&[0x04, 0x14, 0x10, 0x11]);
            }
        }
        Some(f)
    }
}

pub(crate) fn random_input(rng: &mut Rng, model: &Model, recent: &mut Recent) -> (Kind, Vec<u8>) {
    let kind = match rng.below(100) {
        0..=14 => Kind::Valid,
        15..=19 => Kind::Replay,
        20..=30 => Kind::Cut,
        31..=48 => Kind::BitFlips,
        49..=59 => Kind::BogusLength,
        60..=71 => Kind::Stacked,
        72..=79 => Kind::Nested,
        80..=91 => Kind::RandomAfterEthernet,
        _ => Kind::PureRandom,
    };
    let f = match kind {
        Kind::Valid => {
            let f = valid_frame(rng, model, ANY);
            recent.keep(rng, &f);
            f
        }
        Kind::Replay => recent.replay(rng, model).unwrap_or_else(|| valid_frame(rng, model, ANY)),
        Kind::Cut => {
            let mut f = valid_frame(rng, model, ANY);
            cut(rng, &mut f);
            f
        }
        Kind::BitFlips => {
            let mut f = valid_frame(rng, model, ANY);
            flip_bits(rng, &mut f);
            f
        }
        Kind::BogusLength => {
            let mut f = valid_frame(rng, model, ANY);
            bogus_length(rng, &mut f);
            f
        }
        Kind::Stacked => {
            let mut f = if rng.percent(80) { valid_frame(rng, model, ANY) } else { nested(rng, model) };
            for _ in 0..rng.range(2, 4) {
                match rng.below(5) {
                    0 => cut(rng, &mut f),
                    1 | 2 => flip_bits(rng, &mut f),
                    3 => bogus_length(rng, &mut f),
                    _ => {
                        // Trailing bytes, as Ethernet padding or garbage.
                        let extra = rng.range(1, 64);
                        f.extend_from_slice(&rng.bytes(extra));
                    }
                }
            }
            f
        }
        Kind::Nested => nested(rng, model),
        Kind::RandomAfterEthernet => random_after_ethernet(rng),
        // Systematic cuts are not drawn here.
        Kind::PureRandom | Kind::SystematicCut => pure_random(rng),
    };
    (kind, f)
}

/// A few frames of every family, protocol and header variant, cut at every offset.
pub(crate) fn systematic_seeds(rng: &mut Rng, model: &Model) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for v6 in [false, true] {
        for (vip_index, proto) in [(VIP_L2, TCP), (VIP_L2, UDP), (VIP_IPIP, TCP), (VIP_IPIP, UDP)] {
            for vlan in [false, true] {
                let shape = Shape {
                    v6: Some(v6),
                    vip: Some(Some(vip_index)),
                    proto: Some(proto),
                    vlan: Some(vlan),
                    options: Some(false),
                    frag: Some(false),
                    ext: Some(false),
                };
                seeds.push(valid_frame(rng, model, shape));
                seeds.push(valid_frame(rng, model, Shape { options: Some(true), ..shape }));
                seeds.push(valid_frame(rng, model, Shape { frag: Some(true), ..shape }));
                if v6 {
                    seeds.push(valid_frame(rng, model, Shape { ext: Some(true), ..shape }));
                }
            }
        }
        let icmp = if v6 { 58 } else { 1 };
        seeds.push(valid_frame(
            rng,
            model,
            Shape { v6: Some(v6), vip: Some(Some(VIP_IPIP)), proto: Some(icmp), ..ANY },
        ));
    }
    // Keep the long ones short: the interesting offsets are in the headers.
    for s in &mut seeds {
        s.truncate(200);
    }
    seeds
}
