//! The decapsulator (xlb_decap, lb_agent::decap::Decap): the backend side of L3 DSR, on its own
//! million frames. Properties: the verdict is always XDP_PASS; a frame that is not IPIP/IP6IP6
//! to an accepted address comes out untouched; a decapsulated frame is the inner packet behind
//! the frame's own L2 header (MACs, VLAN tag), with at most a congestion mark carried over
//! (RFC 6040); exactly one header is stripped (nested encapsulation stays nested once); the
//! balancer's own encapsulated output decapsulates to the frame it was given; every frame is
//! counted once, under the reason an independent model predicts.
use super::*;

/// What the decapsulator must do with a frame.
pub(crate) struct DecapModel {
    /// The addresses it accepts, sorted (drawn from by index: deterministic).
    pub(crate) accepted: Vec<IpAddr>,
}

impl DecapModel {
    /// The balancer's encapsulation backends, so that its output can be fed to the decapsulator.
    pub(crate) fn new(model: &Model) -> Self {
        let mut accepted: Vec<IpAddr> = model
            .backends
            .values()
            .filter(|b| matches!(b.hop, Hop::Route { .. }))
            .map(|b| b.addr)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        accepted.sort();
        Self { accepted }
    }

    pub(crate) fn accepts(&self, a: IpAddr) -> bool {
        self.accepted.binary_search(&a).is_ok()
    }

    /// The reason, and the output frame when it changes (None: the input, untouched).
    pub(crate) fn predict(&self, f: &[u8]) -> (DecapReason, Option<Vec<u8>>) {
        use DecapReason::*;
        let Some((l3, et)) = l3_of(f) else { return (PassMalformed, None) };
        let (v6, hdr) = match et {
            0x0800 => (false, 20),
            0x86dd => (true, 40),
            _ => return (PassNotEncap, None),
        };
        if f.len() < l3 + hdr {
            return (PassMalformed, None);
        }
        let o = &f[l3..];
        // Only what the balancer writes is stripped: IPv4 protocol 4 without options and not a
        // fragment, IPv6 next header 41 (outer extension headers are not walked), to us, in
        // front of a whole header of the same family whose length agrees with the outer one.
        let reason = if !v6 {
            if o[9] != 4 {
                PassNotEncap
            } else if o[0] != 0x45 {
                PassMalformed
            } else if be16(o, 6) & 0x3fff != 0 {
                PassNotEncap
            } else if !self.accepts(ip4(&o[16..])) {
                PassNotForUs
            } else if o.len() < 40
                || o[20] >> 4 != 4
                || o[20] & 15 < 5
                || usize::from(be16(o, 2)) != usize::from(be16(o, 22)) + 20
            {
                PassMalformed // no whole inner IPv4 header, or lengths that disagree
            } else {
                Decapsulated
            }
        } else if o[6] != 41 {
            PassNotEncap
        } else if o[0] >> 4 != 6 {
            PassMalformed
        } else if !self.accepts(ip6(&o[24..])) {
            PassNotForUs
        } else if o.len() < 80 || o[40] >> 4 != 6 || usize::from(be16(o, 4)) != usize::from(be16(o, 44)) + 40 {
            PassMalformed // no whole inner IPv6 header, or lengths that disagree
        } else {
            Decapsulated
        };
        if reason != Decapsulated {
            return (reason, None);
        }
        let mut out = f[..l3].to_vec();
        out.extend_from_slice(&o[hdr..]);
        // RFC 6040: a congestion mark on the outer header reaches an ECN-capable inner packet.
        if !v6 && o[1] & 3 == 3 && out[l3 + 1] & 3 != 0 {
            let old = be16(&out, l3);
            out[l3 + 1] |= 3;
            let new = be16(&out, l3);
            let c = checksum_update(be16(&out, l3 + 10), old, new);
            out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else if v6 && (o[1] >> 4) & 3 == 3 && (out[l3 + 1] >> 4) & 3 != 0 {
            out[l3 + 1] |= 0x30;
        }
        (Decapsulated, Some(out))
    }
}

/// The header checksum `hc` after one 16-bit word went from `old` to `new` (RFC 1624, eqn. 3:
/// HC' = ~(~HC + ~m + m')).
pub(crate) fn checksum_update(hc: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Properties of one decapsulator run, whatever the model says: XDP_PASS always; untouched
/// unless IPIP/IP6IP6 to an accepted address; else exactly one header gone, the L2 header kept,
/// the inner packet byte for byte but for a congestion mark the outer header carried.
pub(crate) fn check_decap_properties(dm: &DecapModel, f: &[u8], verdict: u32, out: &[u8]) -> Result<(), String> {
    if verdict != XDP_PASS {
        return Err(format!("verdict {} is not PASS", verdict_name(verdict)));
    }
    if out == f {
        return Ok(());
    }
    let (l3, et) = l3_of(f).ok_or("changed a frame cut inside its VLAN tag")?;
    let (hdr, to_us) = match et {
        0x0800 if f.len() >= l3 + 20 => (20, f[l3 + 9] == 4 && dm.accepts(ip4(&f[l3 + 16..]))),
        0x86dd if f.len() >= l3 + 40 => (40, f[l3 + 6] == 41 && dm.accepts(ip6(&f[l3 + 24..]))),
        _ => return Err("changed a frame that is not IP (or cut inside its IP header)".into()),
    };
    if !to_us {
        return Err("changed a frame that is not IPIP/IP6IP6 to an accepted address".into());
    }
    if out.len() + hdr != f.len() {
        return Err(format!(
            "the frame shrank by {} bytes, not by one {hdr}-byte header",
            f.len() as isize - out.len() as isize
        ));
    }
    if out[..l3] != f[..l3] {
        return Err("the L2 header (MACs, VLAN tag, EtherType) changed".into());
    }
    let (inner, got) = (&f[l3 + hdr..], &out[l3..]);
    let outer_ce = if hdr == 20 { f[l3 + 1] & 3 == 3 } else { (f[l3 + 1] >> 4) & 3 == 3 };
    // Bytes a congestion mark may change: IPv4 TOS and header checksum, IPv6 traffic class.
    let marked: &[usize] = if inner.len() >= 12 && inner[0] >> 4 == 4 {
        &[1, 10, 11]
    } else if inner.len() >= 2 && inner[0] >> 4 == 6 {
        &[1]
    } else {
        &[]
    };
    for (i, (a, b)) in inner.iter().zip(got).enumerate() {
        if a != b && !(outer_ce && marked.contains(&i)) {
            return Err(format!("inner packet byte {i} changed ({a:#04x} -> {b:#04x})"));
        }
    }
    if got != inner {
        let inner_v4 = inner[0] >> 4 == 4;
        let ecn = |p: &[u8]| if inner_v4 { p[1] & 3 } else { (p[1] >> 4) & 3 };
        let (before, after) = (ecn(inner), ecn(got));
        if before == 0 || after != 3 {
            return Err(format!("ECN {before:#04b} -> {after:#04b}: only ECT becomes CE (RFC 6040)"));
        }
        let mask: u8 = if inner_v4 { 0xfc } else { 0xcf };
        if inner[1] & mask != got[1] & mask {
            return Err("the congestion mark changed more than the ECN bits".into());
        }
        if inner_v4 {
            let ihl = usize::from(inner[0] & 15) * 4;
            if inner.len() >= ihl && checksum(&inner[..ihl]) == 0 && checksum(&got[..ihl]) != 0 {
                return Err("the congestion mark broke the inner header checksum".into());
            }
        }
    }
    Ok(())
}

/// `packet` behind an outer IPv4 or IPv6 header with protocol/next header `proto`, from `src` to
/// `dst` (of the outer family), TOS/traffic class `tos`, IPv4 flags and offset `frag`; lengths
/// and checksum right.
pub(crate) fn ip_wrap(packet: &[u8], proto: u8, src: IpAddr, dst: IpAddr, tos: u8, frag: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(40 + packet.len());
    if src.is_ipv6() {
        h.extend_from_slice(&[0x60 | (tos >> 4), tos << 4, 0x12, 0x34]);
        h.extend_from_slice(&(packet.len() as u16).to_be_bytes());
        h.extend_from_slice(&[proto, 64]);
    } else {
        h.extend_from_slice(&[0x45, tos]);
        h.extend_from_slice(&((packet.len() + 20) as u16).to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0]);
    }
    h.extend_from_slice(&octets(src));
    h.extend_from_slice(&octets(dst));
    if src.is_ipv4() {
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }
    h.extend_from_slice(packet);
    h
}

/// An outer destination: mostly an accepted address, else one of the other family with the
/// same bytes, or any.
pub(crate) fn decap_dst(rng: &mut Rng, dm: &DecapModel, v6: bool) -> IpAddr {
    let ours: Vec<IpAddr> = dm.accepted.iter().copied().filter(|a| a.is_ipv6() == v6).collect();
    match rng.below(10) {
        0..=5 => ours[rng.below(ours.len())],
        6 => {
            let theirs: Vec<IpAddr> = dm.accepted.iter().copied().filter(|a| a.is_ipv6() != v6).collect();
            match theirs[rng.below(theirs.len())] {
                IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
                IpAddr::V6(a) => {
                    let o = a.octets();
                    IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
                }
            }
        }
        _ => random_addr(rng, v6),
    }
}

/// A random TOS / traffic class on the IP header of `f` (IPv4: checksum redone).
pub(crate) fn set_random_tos(rng: &mut Rng, f: &mut [u8]) {
    let Some((l3, et)) = l3_of(f) else { return };
    let tos = if rng.percent(50) { rng.pick(&[1, 2, 3]) } else { rng.byte() };
    if et == 0x0800 && f.len() >= l3 + 20 && f[l3] & 15 >= 5 && f.len() >= l3 + usize::from(f[l3] & 15) * 4 {
        let ihl = usize::from(f[l3] & 15) * 4;
        f[l3 + 1] = tos;
        f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = checksum(&f[l3..l3 + ihl]);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    } else if et == 0x86dd && f.len() >= l3 + 2 {
        f[l3] = (f[l3] & 0xf0) | (tos >> 4);
        f[l3 + 1] = (f[l3 + 1] & 0x0f) | (tos << 4);
    }
}

/// A valid frame wrapped `depth` times: mostly IPIP/IP6IP6 (the outer family's tunnel protocol
/// whatever the inner family), now and then another protocol; the L2 header is the inner
/// frame's (VLAN tag included), the EtherType the outermost header's.
pub(crate) fn decap_encapsulated(rng: &mut Rng, model: &Model, dm: &DecapModel, depth: usize) -> Vec<u8> {
    let mut inner = valid_frame(rng, model, ANY);
    if rng.percent(30) {
        set_random_tos(rng, &mut inner);
    }
    let (l3, et) = l3_of(&inner).unwrap();
    let mut packet = inner[l3..].to_vec();
    let mut v6 = et == 0x86dd;
    for _ in 0..depth {
        let outer_v6 = if rng.percent(85) { v6 } else { !v6 };
        let tunnel = if outer_v6 { 41 } else { 4 };
        let proto = if rng.percent(90) { tunnel } else { rng.pick(&[4, 41, 47, TCP, UDP, 0]) };
        let frag = if outer_v6 {
            0
        } else if rng.percent(5) {
            rng.pick(&[0x2000, 0x0001, 0x00b9, 0x6000])
        } else {
            rng.pick(&[0x4000, 0x4000, 0])
        };
        let tos = match rng.below(4) {
            0 => 0,
            1 => rng.pick(&[1, 2, 3]),
            2 => 0xb8 | rng.pick(&[0, 1, 2, 3]),
            _ => rng.byte(),
        };
        let dst = decap_dst(rng, dm, outer_v6);
        let src = random_addr(rng, outer_v6);
        packet = ip_wrap(&packet, proto, src, dst, tos, frag);
        v6 = outer_v6;
    }
    let mut f = inner[..l3 - 2].to_vec();
    f.extend_from_slice(&if v6 { [0x86, 0xdd] } else { [0x08, 0x00] });
    f.extend_from_slice(&packet);
    f
}

/// Lengths that lie: the outer or the inner length field, or both, consistently (the outer =
/// the inner + its header, modulo 2^16, as a sloppy encapsulator would write them).
pub(crate) fn decap_bogus_length(rng: &mut Rng, f: &mut [u8]) {
    let Some((l3, et)) = l3_of(f) else { return };
    let (outer_at, inner_at, hdr) = match et {
        0x0800 => (l3 + 2, l3 + 22, 20u16),
        0x86dd => (l3 + 4, l3 + 44, 40u16),
        _ => return,
    };
    let actual = f.len().saturating_sub(l3) as u16;
    let value = match rng.below(4) {
        0 => rng.pick(&INTERESTING16),
        1 => actual.wrapping_add(rng.range(1, 8) as u16),
        2 => actual.wrapping_sub(rng.range(1, 8) as u16),
        _ => rng.u16(),
    };
    let mut set = |at: usize, v: u16| {
        if f.len() >= at + 2 {
            f[at..at + 2].copy_from_slice(&v.to_be_bytes());
        }
    };
    match rng.below(3) {
        0 => set(outer_at, value),
        1 => set(inner_at, value),
        _ => {
            set(inner_at, value);
            set(outer_at, value.wrapping_add(hdr));
        }
    }
}

/// Random bytes after an Ethernet header, sometimes dressed up as IPIP/IP6IP6 to us.
pub(crate) fn decap_random_after_ethernet(rng: &mut Rng, dm: &DecapModel) -> Vec<u8> {
    let mut f = random_after_ethernet(rng);
    let Some((l3, et)) = l3_of(&f) else { return f };
    if rng.percent(60) {
        match et {
            0x0800 if f.len() >= l3 + 20 => {
                f[l3] = if rng.percent(80) { 0x45 } else { 0x40 | (rng.byte() & 15) };
                f[l3 + 9] = 4;
                f[l3 + 6] &= 0x40;
                f[l3 + 16..l3 + 20].copy_from_slice(&octets(decap_dst(rng, dm, false)));
                if f.len() > l3 + 20 && rng.percent(60) {
                    f[l3 + 20] = 0x45;
                }
            }
            0x86dd if f.len() >= l3 + 40 => {
                f[l3] = 0x60 | (f[l3] & 15);
                f[l3 + 6] = 41;
                f[l3 + 24..l3 + 40].copy_from_slice(&octets(decap_dst(rng, dm, true)));
                if f.len() > l3 + 40 && rng.percent(60) {
                    f[l3 + 40] = 0x60 | (f[l3 + 40] & 15);
                }
            }
            _ => {}
        }
    }
    f
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum DecapKind {
    SystematicCut,
    Encapsulated,
    Nested,
    RoundTrip,
    NotEncapsulated,
    Cut,
    BitFlips,
    BogusLength,
    Stacked,
    RandomAfterEthernet,
    PureRandom,
}

#[test]
fn a_million_frames_through_the_decapsulator_keep_every_property() {
    let seed = fuzz_seed();
    let frames = env_u64("XLB_FUZZ_FRAMES").unwrap_or(DEFAULT_FRAMES);
    eprintln!("fuzz decap: seed {seed:#x} (XLB_FUZZ_SEED), {frames} frames (XLB_FUZZ_FRAMES)");
    let report = with_bed(move |bed| fuzz_decap(bed, seed, frames));
    eprintln!("{}", report.text);
    assert!(
        report.failures == 0,
        "{} frames broke a property of the decapsulator (seed {seed:#x}); see above",
        report.failures
    );
}

pub(crate) fn fuzz_decap(bed: &mut Bed, seed: u64, frames: u64) -> Report {
    // Not the balancer's stream: the same seed reproduces both.
    let mut rng = Rng::new(seed.rotate_left(17) ^ 0xdeca_95ed);
    let model = &bed.model;
    let dm = DecapModel::new(model);
    let mut decap = Decap::load().expect("load the decap program (run the tests as root)");
    for &a in &dm.accepted {
        decap.add_address(a).expect("accept an address");
    }
    let before = decap.counters().expect("decap counters");
    let mut balancer = Runner { prog: bed.dp.balancer(), out: vec![0; 8192], ingress: model.ingress };
    // Ingress 0: the namespace's loopback; the decapsulator does not look at the device.
    let mut runner = Runner { prog: decap.program(), out: vec![0; 8192], ingress: 0 };
    let started = Instant::now();
    let mut failures = Failures::default();
    let mut reasons: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let mut kinds: BTreeMap<DecapKind, BTreeMap<u32, u64>> = BTreeMap::new();
    let (mut count, mut round_trips, mut nested_stripped) = (0u64, 0u64, 0u64);

    let mut seeds = Vec::new();
    for depth in [1, 1, 1, 1, 2, 2] {
        let mut s = decap_encapsulated(&mut rng, model, &dm, depth);
        s.truncate(160);
        seeds.push(s);
    }
    let mut pending: Vec<Vec<u8>> = Vec::new();
    while count < frames {
        // The frame, and for a round trip the frame the balancer was given.
        let (kind, input, original) = if let Some(f) = pending.pop() {
            (DecapKind::SystematicCut, f, None)
        } else if let Some(s) = seeds.pop() {
            pending = (MIN_FRAME..=s.len()).map(|n| s[..n].to_vec()).collect();
            continue;
        } else {
            let kind = match rng.below(100) {
                0..=19 => DecapKind::Encapsulated,
                20..=27 => DecapKind::Nested,
                28..=37 => DecapKind::RoundTrip,
                38..=44 => DecapKind::NotEncapsulated,
                45..=54 => DecapKind::Cut,
                55..=66 => DecapKind::BitFlips,
                67..=76 => DecapKind::BogusLength,
                77..=86 => DecapKind::Stacked,
                87..=94 => DecapKind::RandomAfterEthernet,
                _ => DecapKind::PureRandom,
            };
            let mut original = None;
            let f = match kind {
                DecapKind::Encapsulated => decap_encapsulated(&mut rng, model, &dm, 1),
                DecapKind::Nested => {
                    let depth = rng.range(2, 3);
                    decap_encapsulated(&mut rng, model, &dm, depth)
                }
                DecapKind::RoundTrip => {
                    let shape = Shape {
                        vip: Some(Some(VIP_IPIP)),
                        proto: Some(rng.pick(&[TCP, UDP])),
                        options: Some(false),
                        frag: Some(false),
                        ..ANY
                    };
                    let mut f = valid_frame(&mut rng, model, shape);
                    set_random_tos(&mut rng, &mut f);
                    if rng.percent(10) {
                        f.extend_from_slice(&[0; 6]); // Ethernet padding
                    }
                    match balancer.run(&f) {
                        Ok((_, n)) => {
                            let out = balancer.out[..n].to_vec();
                            let grow = if l3_of(&f).is_some_and(|(_, et)| et == 0x86dd) { 40 } else { 20 };
                            if n == f.len() + grow {
                                original = Some(f);
                            }
                            out
                        }
                        Err(e) => {
                            failures.add(format!("balancer BPF_PROG_TEST_RUN failed: {e:#}"), String::new());
                            f
                        }
                    }
                }
                DecapKind::NotEncapsulated => valid_frame(&mut rng, model, ANY),
                DecapKind::Cut => {
                    let depth = rng.range(1, 2);
                    let mut f = decap_encapsulated(&mut rng, model, &dm, depth);
                    cut(&mut rng, &mut f);
                    f
                }
                DecapKind::BitFlips => {
                    let depth = rng.range(1, 2);
                    let mut f = decap_encapsulated(&mut rng, model, &dm, depth);
                    flip_bits(&mut rng, &mut f);
                    f
                }
                DecapKind::BogusLength => {
                    let mut f = decap_encapsulated(&mut rng, model, &dm, 1);
                    decap_bogus_length(&mut rng, &mut f);
                    f
                }
                DecapKind::Stacked => {
                    let depth = rng.range(1, 2);
                    let mut f = decap_encapsulated(&mut rng, model, &dm, depth);
                    for _ in 0..rng.range(2, 4) {
                        match rng.below(5) {
                            0 => cut(&mut rng, &mut f),
                            1 => flip_bits(&mut rng, &mut f),
                            2 => decap_bogus_length(&mut rng, &mut f),
                            _ => {
                                let extra = rng.range(1, 64);
                                f.extend_from_slice(&rng.bytes(extra));
                            }
                        }
                    }
                    f
                }
                DecapKind::RandomAfterEthernet => decap_random_after_ethernet(&mut rng, &dm),
                DecapKind::PureRandom | DecapKind::SystematicCut => pure_random(&mut rng),
            };
            (kind, f, original)
        };
        let index = count;
        count += 1;
        let Some((verdict, out_len)) = runner.run_or_report(&input, &mut failures) else { continue };
        let out = &runner.out[..out_len];
        let (reason, expected) = dm.predict(&input);
        let detail = || {
            format!(
                "  frame #{index} ({kind:?}, {} bytes), verdict {}, expected {}\n  in  {}\n  out {}\n  exp {}",
                input.len(),
                verdict_name(verdict),
                reason.name(),
                hex_short(&input),
                hex_short(out),
                hex_short(expected.as_deref().unwrap_or(&input)),
            )
        };
        if let Err(what) = check_decap_properties(&dm, &input, verdict, out) {
            failures.add(format!("decap property: {what}"), detail());
        }
        if out != expected.as_deref().unwrap_or(&input) {
            failures.add(format!("decap model: output differs ({})", reason.name()), detail());
        }
        if let Some(original) = &original {
            // The balancer's frame, decapsulated: what it was given, behind the next hop's MACs.
            round_trips += 1;
            if reason != DecapReason::Decapsulated || out[..12] != input[..12] || out[12..] != original[12..] {
                failures.add(
                    "round trip: the balancer's encapsulation does not decapsulate to its input".into(),
                    format!("{}\n  original {}", detail(), hex_short(original)),
                );
            }
        }
        if kind == DecapKind::Nested && reason == DecapReason::Decapsulated {
            // The properties hold it to one header: the next one stays, untouched.
            nested_stripped += 1;
        }
        let r = reasons.entry(reason as u32).or_default();
        r.0 += 1;
        r.1 += input.len() as u64;
        *kinds.entry(kind).or_default().entry(reason as u32).or_default() += 1;
    }
    let elapsed = started.elapsed();

    let after = decap.counters().expect("decap counters");
    let mut text = format!(
        "fuzz decap: {count} frames in {:.1} s ({:.0} frames/s), seed {seed:#x}\n\nreason                 frames(counter)  frames(model)   bytes(counter)\n",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    let mut counted = 0;
    for ((reason, b), (_, a)) in before.iter().zip(&after) {
        let (packets, bytes) = (a.packets - b.packets, a.bytes - b.bytes);
        counted += packets;
        let (want_packets, want_bytes) = reasons.get(&(*reason as u32)).copied().unwrap_or_default();
        text += &format!("{:<22} {packets:>15}  {want_packets:>13}  {bytes:>15}\n", reason.name());
        if (packets, bytes) != (want_packets, want_bytes) {
            failures.add(
                format!("decap counter {} moved by {packets} frames / {bytes} bytes", reason.name()),
                format!("  the model expected {want_packets} frames / {want_bytes} bytes"),
            );
        }
        if packets == 0 && frames >= COVERAGE_MIN_FRAMES {
            failures.add(format!("decap reason {} never hit", reason.name()), String::new());
        }
    }
    if counted != count {
        failures.add(format!("decap counters sum to {counted}, {count} frames were run"), String::new());
    }
    if frames >= COVERAGE_MIN_FRAMES && (round_trips == 0 || nested_stripped == 0) {
        failures.add(format!("{round_trips} round trips, {nested_stripped} nested frames decapsulated"), String::new());
    }
    text += &format!(
        "\n{round_trips} balancer frames decapsulated back to their input; {nested_stripped} nested frames stripped once\n"
    );
    text += "reasons per input kind:\n";
    for (kind, by_reason) in &kinds {
        let total: u64 = by_reason.values().sum();
        text += &format!("  {:<20} {total:>8}:", format!("{kind:?}"));
        for (r, n) in by_reason {
            text += &format!(" {}={n}", DecapReason::ALL[*r as usize].name());
        }
        text += "\n";
    }
    failures.render(&mut text);
    Report { text, failures: failures.count }
}
