//! Fuzz and property test of the XDP programs: at least a million random and mutated frames
//! through BPF_PROG_TEST_RUN for each of the balancer and the decapsulator, each checked against
//! properties that hold whatever the input, and against an independent model of the program
//! (verdict, reason and the exact output frame). The counters are read once, at the end: every
//! frame must have been counted exactly once, under the reason the model predicted. Needs root
//! (CAP_BPF, CAP_NET_ADMIN).
//!
//! The test bed is one network namespace with three veth pairs, so that `bpf_fib_lookup` can
//! answer every way the encapsulation path cares about:
//!
//! ```text
//! veth0 (ingress, 10.0.0.2/24, fd00::2/64)  gw 10.0.0.254 / fd00::fe permanent neighbour
//!                                            gw 10.0.0.253 / fd00::fd no neighbour
//! veth2 (10.1.0.2/24, fd01::2/64, in TX_PORTS)      gw 10.1.0.254 / fd01::fe permanent
//! veth4 (10.2.0.2/24, fd02::2/64, not in TX_PORTS)  gw 10.2.0.254 / fd02::fe permanent
//! backend nets 10.200.k.0/24 and fd00:200:k::/64, k = NETS' index
//! ```
//!
//! Environment: `XLB_FUZZ_SEED` (decimal, 0x-hex, or `random`), `XLB_FUZZ_FRAMES` (default
//! 1,000,000, per program), `XLB_FUZZ_STRICT=0` counts the findings (see `Finding`) instead of
//! failing on them (they fail by default).
mod decap;
mod gen;
mod model;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{anyhow, Context as _, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{
    config::Forward,
    dataplane::{map_addr, Dataplane, LoadOptions},
    decap::Decap,
    sys::if_index,
    tables::maglev::{self, Member},
};
use lb_common::{
    addr_v6,
    hash::{encap_hash, flow_hash},
    reason::DecapReason,
    Reason, Settings, NO_BACKEND,
};
use xlb_tests::{
    bed::{verdict_name, xdp_md, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    dpbed::ring_entry,
    netns::Netns,
    rng::Rng,
    wire::{checksum, Frame},
};

const HASH_SEED: u32 = 0x0f0f_5eed;
const TABLE: u32 = 251;
const DEV_MTU: u16 = 1500;
const ROUTE_MTU: u16 = 1400;
const DEFAULT_FRAMES: u64 = 1_000_000;
/// Below this many frames (XLB_FUZZ_FRAMES), a reason never hit is not a failure.
const COVERAGE_MIN_FRAMES: u64 = 100_000;
const DEFAULT_SEED: u64 = 0x00c0_ffee_5eed_f00d;
/// The kernel refuses test frames shorter than an Ethernet header.
const MIN_FRAME: usize = 14;
const TCP: u8 = 6;
const UDP: u8 = 17;

const DROP_TOO_BIG_BAD_SOURCE: Reason = Reason::DropTooBigBadSource;

use gen::*;
use model::*;

// ---------------------------------------------------------------------------------------------
// The test bed: interfaces, routes, neighbours, services and backends. The model below is
// derived from the same tables, so the two cannot drift apart.
// ---------------------------------------------------------------------------------------------

/// The balancer's interface (index 0) and two egress interfaces, each one end of a veth pair.
const DEVS: usize = 3;

fn dev_name(i: usize) -> String {
    format!("veth{}", 2 * i)
}

fn dev_mac(i: usize) -> [u8; 6] {
    [0x02, 0x1b, 0, 0, 0, 1 + i as u8]
}

fn gw_mac(i: usize) -> [u8; 6] {
    [0x02, 0x67, 0x77, 0, 0, 1 + i as u8]
}

/// How `bpf_fib_lookup` reaches one backend subnet.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// Through the gateway of device `dev`; `neigh`: the gateway has a permanent neighbour
    /// entry (else it has none); `mtu_lock`: a locked route MTU instead of the device's.
    Via {
        dev: usize,
        neigh: bool,
        mtu_lock: Option<u16>,
    },
    Blackhole,
    NoRoute,
}

/// Backend subnets 10.200.k.0/24 and fd00:200:k::/64.
const NETS: [Path; 7] = [
    Path::Via { dev: 0, neigh: true, mtu_lock: None }, // tx_encap
    Path::Via { dev: 0, neigh: true, mtu_lock: Some(ROUTE_MTU) }, // tx_encap or tx_too_big
    Path::Via { dev: 0, neigh: false, mtu_lock: None }, // pass_no_neighbour
    Path::Blackhole,                                   // drop_no_route
    Path::NoRoute,                                     // drop_no_route
    Path::Via { dev: 1, neigh: true, mtu_lock: None }, // redirect_encap
    Path::Via { dev: 2, neigh: true, mtu_lock: None }, // pass_no_neighbour (no devmap)
];

/// Devices in TX_PORTS.
const TX_PORT_DEVS: [usize; 1] = [1];

fn net_addr(v6: bool, net: usize, host: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, net as u16, 0, 0, 0, 0, u16::from(host)))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 200, net as u8, host))
    }
}

fn vip(v6: bool, i: usize) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1 + i as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1 + i as u8))
    }
}

const VIP_L2: usize = 0;
const VIP_IPIP: usize = 1;
const VIP_EMPTY: usize = 2;
const VIPS_PER_FAMILY: usize = 3;

enum Backends {
    /// Three L2 DSR backends on veth0's subnet, with MACs.
    L2,
    /// One backend in each of these nets.
    Nets(&'static [usize]),
    /// None: the table stays empty.
    Empty,
}

struct ServiceSpec {
    vip: usize,
    port: u16,
    proto: u8,
    forward: Forward,
    backends: Backends,
}

const MIXED: &[usize] = &[2, 3, 4, 5, 6];
/// The same services on the IPv4 and on the IPv6 VIPs.
const SERVICES: [ServiceSpec; 8] = [
    ServiceSpec { vip: VIP_L2, port: 80, proto: TCP, forward: Forward::L2, backends: Backends::L2 },
    ServiceSpec { vip: VIP_L2, port: 53, proto: UDP, forward: Forward::L2, backends: Backends::L2 },
    ServiceSpec { vip: VIP_IPIP, port: 80, proto: TCP, forward: Forward::Ipip, backends: Backends::Nets(&[0, 0]) },
    ServiceSpec { vip: VIP_IPIP, port: 53, proto: UDP, forward: Forward::Ipip, backends: Backends::Nets(&[1, 1]) },
    ServiceSpec { vip: VIP_IPIP, port: 443, proto: TCP, forward: Forward::Ipip, backends: Backends::Nets(MIXED) },
    ServiceSpec { vip: VIP_IPIP, port: 443, proto: UDP, forward: Forward::Ipip, backends: Backends::Nets(MIXED) },
    ServiceSpec { vip: VIP_EMPTY, port: 80, proto: TCP, forward: Forward::L2, backends: Backends::Empty },
    ServiceSpec { vip: VIP_EMPTY, port: 53, proto: UDP, forward: Forward::Ipip, backends: Backends::Empty },
];
const SERVICE_PORTS: [u16; 3] = [80, 53, 443];

fn settings() -> Settings {
    Settings {
        udp_idle_ns: 30_000_000_000,
        // Low enough that the run exercises the rate limiter too.
        new_flows_per_cpu_sec: 2_000,
        ipip_src_v4: u32::from_ne_bytes([172, 16, 0, 0]),
        ipip_src_v4_host: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        ipip_src_v6_host: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        ipip_src_v6: addr_v6(Ipv6Addr::new(0xfd00, 0x5, 0, 0, 0, 0, 0, 0).octets()),
        ..Settings::default()
    }
}

/// Creates the interfaces, addresses, neighbours and routes inside `ns`.
fn set_up_links(ns: &Netns) -> Result<()> {
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
    for i in 0..DEVS {
        let (dev, peer) = (dev_name(i), format!("veth{}", 2 * i + 1));
        let mac = mac_text(dev_mac(i));
        ns.exec(&["ip", "link", "add", &dev, "address", &mac, "type", "veth", "peer", "name", &peer])?;
        ns.exec(&["ip", "link", "set", &dev, "up"])?;
        ns.exec(&["ip", "link", "set", &peer, "up"])?;
        ns.exec(&["ip", "addr", "add", &format!("10.{i}.0.2/24"), "dev", &dev])?;
        ns.exec(&["ip", "addr", "add", &format!("fd0{i}::2/64"), "dev", &dev, "nodad"])?;
        let gw = mac_text(gw_mac(i));
        ns.exec(&["ip", "neigh", "add", &format!("10.{i}.0.254"), "lladdr", &gw, "dev", &dev, "nud", "permanent"])?;
        ns.exec(&["ip", "neigh", "add", &format!("fd0{i}::fe"), "lladdr", &gw, "dev", &dev, "nud", "permanent"])?;
    }
    for (k, path) in NETS.iter().enumerate() {
        let (net4, net6) = (format!("10.200.{k}.0/24"), format!("fd00:200:{k}::/64"));
        match *path {
            Path::Via { dev, neigh, mtu_lock } => {
                let (gw4, gw6) = if neigh {
                    (format!("10.{dev}.0.254"), format!("fd0{dev}::fe"))
                } else {
                    (format!("10.{dev}.0.253"), format!("fd0{dev}::fd"))
                };
                let name = dev_name(dev);
                let mtu = mtu_lock.map(|m| m.to_string());
                for (net, gw) in [(&net4, &gw4), (&net6, &gw6)] {
                    let mut cmd = vec!["ip", "route", "add", net, "via", gw, "dev", &name];
                    if let Some(mtu) = &mtu {
                        cmd.extend(["mtu", "lock", mtu]);
                    }
                    ns.exec(&cmd)?;
                }
            }
            Path::Blackhole => {
                ns.exec(&["ip", "route", "add", "blackhole", &net4])?;
                ns.exec(&["ip", "-6", "route", "add", "blackhole", &net6])?;
            }
            Path::NoRoute => {}
        }
    }
    Ok(())
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

// ---------------------------------------------------------------------------------------------
// Running frames.
// ---------------------------------------------------------------------------------------------

struct Bed {
    dp: Dataplane,
    model: Model,
}

fn with_bed<R: Send + 'static>(f: impl FnOnce(&mut Bed) -> R + Send + 'static) -> R {
    let ns = Netns::new("fuzz").expect("network namespace (run as root)");
    set_up_links(&ns).expect("links, addresses, neighbours and routes");
    let result = ns
        .run(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let mut bed = Bed::new().expect("balancer loaded and configured");
                f(&mut bed)
            }))
        })
        .expect("the test thread in the namespace");
    // A failed assertion in `f` fails the test with its own message.
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl Bed {
    fn new() -> Result<Self> {
        let ifindex: Vec<u32> = (0..DEVS)
            .map(|i| if_index(&dev_name(i)).ok_or_else(|| anyhow!("no {}", dev_name(i))))
            .collect::<Result<_>>()?;
        let lb_mac = dev_mac(0);
        let mut dp = Dataplane::load(&LoadOptions {
            hash_seed: HASH_SEED,
            iface_mac: lb_mac,
            maglev_capacity: 2 * TABLE * 2 * SERVICES.len() as u32,
            flow_table_size: 1 << 16,
        })
        .context("load the balancer (run the tests as root)")?;
        let settings = settings();
        dp.set_settings(settings)?;
        for &dev in &TX_PORT_DEVS {
            dp.add_tx_port(ifindex[dev])?;
        }
        let mut model = Model {
            vips: HashSet::new(),
            services: HashMap::new(),
            backends: HashMap::new(),
            ingress: ifindex[0],
            tx_ports: TX_PORT_DEVS.iter().map(|&d| ifindex[d]).collect(),
            lb_mac,
            settings,
        };
        let (mut next_id, mut next_backend) = (0u32, 0u32);
        for v6 in [false, true] {
            for i in 0..VIPS_PER_FAMILY {
                model.vips.insert(vip(v6, i));
            }
            for (s, spec) in SERVICES.iter().enumerate() {
                let mut members = Vec::new();
                let backends: Vec<(IpAddr, [u8; 6], Hop)> = match spec.backends {
                    Backends::L2 => (0..3u8)
                        .map(|j| {
                            let addr = if v6 {
                                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11 + u16::from(j)))
                            } else {
                                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0x11 + j))
                            };
                            (addr, [0x02, 0xbe, 0, s as u8, v6 as u8, j], Hop::Unroutable)
                        })
                        .collect(),
                    Backends::Nets(nets) => nets
                        .iter()
                        .enumerate()
                        .map(|(j, &net)| {
                            let hop = match NETS[net] {
                                Path::Via { dev, neigh, mtu_lock } => Hop::Route {
                                    mtu: mtu_lock.unwrap_or(DEV_MTU),
                                    via: neigh.then(|| (ifindex[dev], dev_mac(dev), gw_mac(dev))),
                                },
                                Path::Blackhole | Path::NoRoute => Hop::Unroutable,
                            };
                            (net_addr(v6, net, (10 * s + j + 1) as u8), [0; 6], hop)
                        })
                        .collect(),
                    Backends::Empty => Vec::new(),
                };
                for (addr, mac, hop) in backends {
                    let id = next_backend;
                    next_backend += 1;
                    let l2 = matches!(spec.backends, Backends::L2);
                    dp.set_backend(id, addr, l2.then_some(mac), true)?;
                    let key = octets(addr).iter().fold(0u64, |k, &b| k.rotate_left(8) ^ u64::from(b));
                    members.push(Member { id, key, weight: 1 });
                    model.backends.insert(id, ModelBackend { addr, mac, hop });
                }
                let addr = vip(v6, spec.vip);
                let mut slot = dp.add_service(addr, spec.port, spec.proto, next_id, TABLE, spec.forward)?;
                let table =
                    if members.is_empty() { vec![NO_BACKEND; TABLE as usize] } else { maglev::build(&members, TABLE) };
                dp.publish_table(&mut slot, &table)?;
                let ipip = matches!(spec.forward, Forward::Ipip);
                model.services.insert((addr, spec.port, spec.proto), ModelService { id: next_id, ipip, table });
                next_id += 1;
            }
        }
        Ok(Self { dp, model })
    }
}

/// One BPF_PROG_TEST_RUN at a time, with buffers reused across frames.
pub(crate) struct Runner<'a> {
    prog: &'a mut Xdp,
    out: Vec<u8>,
    ingress: u32,
}

impl Runner<'_> {
    /// Runs one frame as if it had arrived on the ingress interface; returns the verdict and
    /// the output frame's length (the frame is in `self.out`).
    fn run(&mut self, frame: &[u8]) -> Result<(u32, usize)> {
        // The ingress interface must exist in this namespace.
        let ctx = xdp_md(frame.len(), self.ingress);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut self.out);
        opts.ctx_in = Some(&ctx);
        let result = self.prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        Ok((result.return_value, result.data_size_out as usize))
    }

    /// As [`Runner::run`]; a run the kernel refuses is a failure of the test, reported.
    fn run_or_report(&mut self, frame: &[u8], failures: &mut Failures) -> Option<(u32, usize)> {
        self.run(frame)
            .map_err(|e| {
                failures.add(format!("BPF_PROG_TEST_RUN failed: {e:#}"), format!("  in  {}", hex_short(frame)))
            })
            .ok()
    }
}

/// Everything the run expects the counters to show.
#[derive(Default)]
struct Tally {
    frames: u64,
    /// Per reason: frames and output bytes (the reason counter counts the frame as it leaves).
    reasons: BTreeMap<u32, (u64, u64)>,
    verdicts: BTreeMap<u32, u64>,
    kinds: BTreeMap<Kind, BTreeMap<u32, u64>>,
    /// Per service and per backend id: frames and input bytes of forwarded frames.
    services: BTreeMap<u32, (u64, u64)>,
    backends: BTreeMap<u32, (u64, u64)>,
}

#[derive(Default)]
struct Failures {
    count: u64,
    by_kind: BTreeMap<String, u64>,
    examples: Vec<String>,
}

impl Failures {
    /// Appends the failures, by kind and with examples, to a report (nothing when none).
    fn render(&self, text: &mut String) {
        if self.count == 0 {
            return;
        }
        *text += &format!("\n{} FAILURES by kind:\n", self.count);
        for (what, n) in &self.by_kind {
            *text += &format!("  {n:>8}  {what}\n");
        }
        *text += "\nexamples:\n";
        for e in &self.examples {
            *text += &format!("{e}\n");
        }
    }

    fn add(&mut self, what: String, detail: String) {
        self.count += 1;
        let n = self.by_kind.entry(what.clone()).or_default();
        *n += 1;
        if *n <= 3 && self.examples.len() < 40 {
            self.examples.push(format!("{what}\n{detail}"));
        }
    }
}

fn describe(index: u64, kind: Kind, f: &[u8], verdict: u32, out: &[u8], expect: &Expect) -> String {
    format!(
        "  frame #{index} ({kind:?}, {} bytes), verdict {verdict}, expected {} ({})\n  in  {}\n  out {}\n  exp {}",
        f.len(),
        expect.reason.name(),
        expect.reason.action().code(),
        hex_short(f),
        hex_short(out),
        hex_short(expect.out.as_deref().unwrap_or(f)),
    )
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace('_', "");
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

fn fuzz_seed() -> u64 {
    match std::env::var("XLB_FUZZ_SEED").as_deref() {
        Ok("random") => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        }
        Ok(_) => env_u64("XLB_FUZZ_SEED").expect("XLB_FUZZ_SEED: a number, 0x-hex, or `random`"),
        Err(_) => DEFAULT_SEED,
    }
}

/// Reasons this set-up cannot produce, with why.
const UNREACHABLE: &[(Reason, &str)] = &[(
    Reason::DropAdjustFailed,
    "bpf_xdp_adjust_head/tail fail only without headroom (BPF_PROG_TEST_RUN always gives 256 bytes) \
     or below an Ethernet header; an outer length can no longer overflow (a length field past the \
     frame is drop_truncated_l4)",
)];

#[test]
fn a_million_random_and_mutated_frames_keep_every_property() {
    let seed = fuzz_seed();
    let frames = env_u64("XLB_FUZZ_FRAMES").unwrap_or(DEFAULT_FRAMES);
    eprintln!("fuzz: seed {seed:#x} (XLB_FUZZ_SEED), {frames} frames (XLB_FUZZ_FRAMES)");
    let report = with_bed(move |bed| fuzz(bed, seed, frames));
    eprintln!("{}", report.text);
    assert!(report.failures == 0, "{} frames broke a property (seed {seed:#x}); see above", report.failures);
}

struct Report {
    text: String,
    failures: u64,
}

fn fuzz(bed: &mut Bed, seed: u64, frames: u64) -> Report {
    let mut rng = Rng::new(seed);
    let before = bed.dp.reason_counters().expect("reason counters");
    let flows_before = bed.dp.flow_counters().expect("flow counters");
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut failures = Failures::default();
    let mut findings = Findings::default();
    let model = &bed.model;
    let mut runner = Runner { prog: bed.dp.balancer(), out: vec![0; 8192], ingress: model.ingress };

    let mut seeds = systematic_seeds(&mut rng, model);
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut recent = Recent(Vec::new());
    while tally.frames < frames {
        let (kind, input) = if let Some(f) = pending.pop() {
            (Kind::SystematicCut, f)
        } else if let Some(s) = seeds.pop() {
            pending = (MIN_FRAME..=s.len()).map(|n| s[..n].to_vec()).collect();
            continue;
        } else {
            random_input(&mut rng, model, &mut recent)
        };
        let index = tally.frames;
        tally.frames += 1;
        let Some((verdict, out_len)) = runner.run_or_report(&input, &mut failures) else { continue };
        let out = &runner.out[..out_len];
        let expect = model.predict(&input);
        if let Err(what) = check_properties(model, &input, verdict, out, &mut findings) {
            failures.add(format!("property: {what}"), describe(index, kind, &input, verdict, out, &expect));
        }
        if verdict != expect.reason.action().code() {
            let what = format!(
                "model: verdict {} where {} ({}) was expected",
                verdict_name(verdict),
                verdict_name(expect.reason.action().code()),
                expect.reason.name()
            );
            failures.add(what, describe(index, kind, &input, verdict, out, &expect));
        } else if out != expect.out.as_deref().unwrap_or(&input) {
            let what = format!("model: output differs ({})", expect.reason.name());
            failures.add(what, describe(index, kind, &input, verdict, out, &expect));
        }
        let r = tally.reasons.entry(expect.reason as u32).or_default();
        r.0 += 1;
        r.1 += out_len as u64;
        *tally.verdicts.entry(verdict).or_default() += 1;
        *tally.kinds.entry(kind).or_default().entry(verdict).or_default() += 1;
        if let Some((service, backend)) = expect.forwarded {
            for (map, id) in [(&mut tally.services, service), (&mut tally.backends, backend)] {
                let c = map.entry(id).or_default();
                c.0 += 1;
                c.1 += input.len() as u64;
            }
        }
    }
    let elapsed = started.elapsed();

    // The counters, once: every frame counted exactly once, under the predicted reason.
    let after = bed.dp.reason_counters().expect("reason counters");
    let flows_after = bed.dp.flow_counters().expect("flow counters");
    let mut text = format!(
        "fuzz: {} frames in {:.1} s ({:.0} frames/s), seed {seed:#x}\n\nreason                 frames(counter)  frames(model)   bytes(counter)\n",
        tally.frames,
        elapsed.as_secs_f64(),
        tally.frames as f64 / elapsed.as_secs_f64()
    );
    let mut counted = 0;
    for ((reason, b), (_, a)) in before.iter().zip(&after) {
        let (packets, bytes) = (a.packets - b.packets, a.bytes - b.bytes);
        counted += packets;
        let (want_packets, want_bytes) = tally.reasons.get(&(*reason as u32)).copied().unwrap_or_default();
        text += &format!("{:<22} {packets:>15}  {want_packets:>13}  {bytes:>15}\n", reason.name());
        if (packets, bytes) != (want_packets, want_bytes) {
            failures.add(
                format!("counter {} moved by {packets} frames / {bytes} bytes", reason.name()),
                format!("  the model expected {want_packets} frames / {want_bytes} bytes"),
            );
        }
        let unreachable = UNREACHABLE.iter().any(|(r, _)| r == reason);
        if packets == 0 && !unreachable && frames >= COVERAGE_MIN_FRAMES {
            failures.add(format!("reason {} never hit", reason.name()), String::new());
        }
    }
    if counted != tally.frames {
        failures.add(format!("counters sum to {counted}, {} frames were run", tally.frames), String::new());
    }
    for (id, &(packets, bytes)) in &tally.services {
        let c = bed.dp.service_counters(*id).expect("service counters");
        if (c.packets, c.bytes) != (packets, bytes) {
            failures.add(
                format!("service {id} counted {} frames / {} bytes", c.packets, c.bytes),
                format!("  the model expected {packets} / {bytes}"),
            );
        }
    }
    for (id, &(packets, bytes)) in &tally.backends {
        let c = bed.dp.backend_counters(*id).expect("backend counters");
        if (c.packets, c.bytes) != (packets, bytes) {
            failures.add(
                format!("backend {id} counted {} frames / {} bytes", c.packets, c.bytes),
                format!("  the model expected {packets} / {bytes}"),
            );
        }
    }
    text += "\nverdicts: ";
    for (v, n) in &tally.verdicts {
        text += &format!("{}={n} ", verdict_name(*v));
    }
    text += "\nflow events: ";
    for ((event, b), (_, a)) in flows_before.iter().zip(&flows_after) {
        text += &format!("{}={} ", event.name(), a - b);
    }
    text += "\nverdicts per input kind:\n";
    for (kind, verdicts) in &tally.kinds {
        let total: u64 = verdicts.values().sum();
        text += &format!("  {:<20} {total:>8}:", format!("{kind:?}"));
        for (v, n) in verdicts {
            text += &format!(" {}={n}", verdict_name(*v));
        }
        text += "\n";
    }
    text += &format!(
        "\n{} encapsulated frames carried bytes after the inner packet (padding; not a finding)\n",
        findings.trailing_bytes
    );
    text += "\nfindings (failures unless XLB_FUZZ_STRICT=0; regression tests at the end of fuzz.rs):\n";
    if findings.seen.is_empty() {
        text += "  none\n";
    }
    for (finding, (n, _, shortest)) in &findings.seen {
        text += &format!("  {n:>8}  {}\n  shortest example:\n{shortest}\n", finding.describe());
    }
    failures.render(&mut text);
    Report { text, failures: failures.count }
}

// ---------------------------------------------------------------------------------------------
// Regression tests of the bugs this fuzz test found, each fixed in the data path.
// ---------------------------------------------------------------------------------------------

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The backend net a service's flow from `sport` lands in, by the model.
fn landing_net(model: &Model, f: &[u8]) -> Option<usize> {
    let (_, backend) = model.predict(f).forwarded?;
    match model.backends[&backend].addr {
        IpAddr::V4(a) => Some(usize::from(a.octets()[2])),
        IpAddr::V6(a) => Some(usize::from(a.segments()[2])),
    }
}

/// A minimal TCP SYN (or UDP datagram) from a client to `dst`, addressed to the balancer's MAC,
/// whose flow lands on a backend in `net` (None: any).
fn minimal_frame(model: &Model, src: IpAddr, dst: IpAddr, proto: u8, dport: u16, net: Option<usize>) -> Frame {
    (40_000..u16::MAX)
        .map(|sport| {
            let mut f = Frame::tcp(src, sport, dst, dport).payload(Vec::new());
            f.proto = proto;
            f.dst_mac = dev_mac(0);
            f.src_mac = CLIENT_MAC;
            f
        })
        .find(|f| net.is_none() || landing_net(model, &f.build()) == net)
        .expect("a source port whose flow lands in the net")
}

fn run_one(bed: &mut Bed, frame: &[u8]) -> (u32, Vec<u8>) {
    let ingress = bed.model.ingress;
    let mut runner = Runner { prog: bed.dp.balancer(), out: vec![0; 8192], ingress };
    let (verdict, n) = runner.run(frame).expect("BPF_PROG_TEST_RUN");
    (verdict, runner.out[..n].to_vec())
}

const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

/// Regression test of a bug this fuzz test found: lb-ebpf/src/balancer.rs forward_encap, on
/// `Route::NoNeighbour` (and on `Route::TooBig` without DF, turned into NoNeighbour), returned
/// pass_no_neighbour after encap::grow_head, which moved only the EtherType/VLAN tag to the new
/// front: the 12 bytes of MACs were whatever the headroom held (zeros under BPF_PROG_TEST_RUN,
/// stale bytes on a NIC). On `Route::Via` to an interface missing from TX_PORTS the MACs were
/// the next hop's. Either way the frame reached the stack on the ingress interface addressed to
/// another host: eth_type_trans made it PACKET_OTHERHOST and ip_rcv_core dropped it, so the
/// stack never forwarded it (nor resolved the neighbour). Fixed by moving the whole L2 header
/// (encap.rs move_l2) and restoring the received MACs before passing.
#[test]
fn encapsulated_frames_handed_to_the_stack_keep_their_mac_header() {
    with_bed(|bed| {
        let m = &bed.model;
        let (c4, c6) = (IpAddr::V4(CLIENT4), IpAddr::V6(CLIENT6));
        // UDP 53 on the encapsulating VIP goes to net 1, whose route MTU is 1400: a 1400-byte
        // payload without DF is too big, and the stack is to fragment it.
        let mut too_big = minimal_frame(m, c4, vip(false, VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]);
        too_big.frag = 0;
        let cases = [
            ("IPv4, too big without DF", too_big.build()),
            (
                "IPv4, next hop without neighbour entry",
                minimal_frame(m, c4, vip(false, VIP_IPIP), TCP, 443, Some(2)).build(),
            ),
            (
                "IPv4, egress interface not in TX_PORTS",
                minimal_frame(m, c4, vip(false, VIP_IPIP), TCP, 443, Some(6)).build(),
            ),
            (
                "IPv6, next hop without neighbour entry",
                minimal_frame(m, c6, vip(true, VIP_IPIP), TCP, 443, Some(2)).build(),
            ),
        ];
        let mut wrong = Vec::new();
        for (name, frame) in cases {
            assert_eq!(bed.model.predict(&frame).reason, Reason::PassNoNeighbour, "{name}");
            let (verdict, out) = run_one(bed, &frame);
            assert_eq!(verdict, XDP_PASS, "{name}");
            if out[..12] != frame[..12] {
                wrong.push(format!(
                    "{name}: MACs {} became {}\n  in  {}\n  out {}",
                    hex(&frame[..12]),
                    hex(&out[..12]),
                    hex(&frame[..frame.len().min(80)]),
                    hex(&out[..out.len().min(100)])
                ));
            }
        }
        assert!(wrong.is_empty(), "passed to the stack without their MAC header:\n{}", wrong.join("\n"));
    });
}

/// The same bug end to end, in native and generic mode: a client sends through the balancer
/// to encapsulating services whose next hop has no neighbour entry, or that leave through an
/// interface missing from TX_PORTS. The stack must forward both (IpForwDatagrams), as it
/// forwards a datagram routed through the host without the balancer. With the bug it dropped
/// them as PACKET_OTHERHOST (`ip -s -s link` counts them under "otherhost").
#[test]
fn pass_no_neighbour_frames_are_forwarded_by_the_stack_end_to_end() {
    use lb_agent::config::XdpMode;
    let mut forwarded = Vec::new();
    for mode in [XdpMode::Generic, XdpMode::Native] {
        let lb = Netns::new("lb").unwrap();
        let cl = Netns::new("cl").unwrap();
        let lb_mac = mac_text(dev_mac(0));
        let peer_mac = mac_text(gw_mac(1));
        for cmd in [
            &["ip", "link", "add", "lb0", "address", &lb_mac, "type", "veth", "peer", "name", "cl0", "netns", &cl.name]
                [..],
            &["ip", "addr", "add", "10.0.0.2/24", "dev", "lb0"],
            &["ip", "link", "set", "lb0", "up"],
            &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            // Backend nets: one behind a gateway that does not answer ARP, one out of lb1.
            &["ip", "route", "add", "10.200.2.0/24", "via", "10.0.0.253", "dev", "lb0"],
            &["ip", "link", "add", "lb1", "type", "veth", "peer", "name", "lb1p"],
            &["ip", "link", "set", "lb1", "up"],
            &["ip", "link", "set", "lb1p", "up"],
            &["ip", "addr", "add", "10.1.0.2/24", "dev", "lb1"],
            &["ip", "neigh", "add", "10.1.0.254", "lladdr", &peer_mac, "dev", "lb1", "nud", "permanent"],
            &["ip", "route", "add", "10.200.6.0/24", "via", "10.1.0.254", "dev", "lb1"],
            // The control: routed through the host without the balancer.
            &["ip", "route", "add", "10.200.3.0/24", "via", "10.1.0.254", "dev", "lb1"],
        ] {
            lb.exec(cmd).unwrap();
        }
        cl.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "cl0"]).unwrap();
        cl.exec(&["ip", "link", "set", "cl0", "up"]).unwrap();
        cl.exec(&["ip", "route", "add", "10.0.0.0/8", "via", "10.0.0.2"]).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let balancer = lb
            .spawn(move || {
                let mut dp = Dataplane::load(&LoadOptions {
                    hash_seed: 1,
                    iface_mac: dev_mac(0),
                    maglev_capacity: 4 * TABLE,
                    flow_table_size: 1024,
                })
                .unwrap();
                dp.set_settings(settings()).unwrap();
                for (id, (port, backend)) in [(53, "10.200.2.1"), (54, "10.200.6.1")].into_iter().enumerate() {
                    let id = id as u32;
                    dp.set_backend(id, backend.parse().unwrap(), None, true).unwrap();
                    let mut slot =
                        dp.add_service("10.99.0.2".parse().unwrap(), port, UDP, id, TABLE, Forward::Ipip).unwrap();
                    dp.publish_table(&mut slot, &vec![id; TABLE as usize]).unwrap();
                }
                dp.attach("lb0", Some(mode)).unwrap();
                ready_tx.send(()).unwrap();
                done_rx.recv().unwrap();
                dp.reason_counters().unwrap()[Reason::PassNoNeighbour as usize].1.packets
            })
            .unwrap();
        ready_rx.recv().unwrap();
        cl.run(|| {
            let s = std::net::UdpSocket::bind("10.0.0.1:0").unwrap();
            s.send_to(b"control", "10.200.3.1:53").unwrap();
            s.send_to(b"no neighbour", "10.99.0.2:53").unwrap();
            s.send_to(b"not in TX_PORTS", "10.99.0.2:54").unwrap();
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let nstat = lb.exec(&["nstat", "-asz", "IpForwDatagrams"]).unwrap();
        let link = lb.exec(&["ip", "-s", "-s", "link", "show", "lb0"]).unwrap();
        done_tx.send(()).unwrap();
        let passed = balancer.join().unwrap();
        assert_eq!(passed, 2, "{mode:?}: both balanced datagrams are pass_no_neighbour");
        let text = String::from_utf8_lossy(&nstat.stdout);
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("IpForwDatagrams"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        forwarded.push((mode, n, String::from_utf8_lossy(&link.stdout).into_owned()));
    }
    assert!(
        forwarded.iter().all(|(_, n, _)| *n == 3),
        "the stack forwarded fewer than 3 datagrams (the control and the two pass_no_neighbour ones); \
         see \"otherhost\" on lb0: {forwarded:#?}"
    );
}

/// The IPv4 header at `l3` with its total length set to `n` and its checksum redone.
fn set_total_length(f: &mut [u8], l3: usize, n: u16) {
    f[l3 + 2..l3 + 4].copy_from_slice(&n.to_be_bytes());
    f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&f[l3..l3 + 20]);
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// Runs `frame` and returns the verdict, the output and the reason whose counter moved (exactly
/// one must move, by one frame).
fn run_reason(bed: &mut Bed, frame: &[u8]) -> (u32, Vec<u8>, Reason) {
    let before = bed.dp.reason_counters().expect("reason counters");
    let (verdict, out) = run_one(bed, frame);
    let after = bed.dp.reason_counters().expect("reason counters");
    let moved: Vec<Reason> =
        before.iter().zip(&after).filter(|((_, b), (_, a))| a.packets != b.packets).map(|((r, _), _)| *r).collect();
    assert_eq!(moved.len(), 1, "exactly one counter moves per frame: {moved:?}");
    (verdict, out, moved[0])
}

/// Regression test of findings `OuterLengthBeyondFrame` and `LargerThanEgressMtu`: the
/// balancer took the IP length field (IPv4 total length, IPv6 payload length + 40) on trust.
/// It fed the FIB's MTU check and became the outer header's length, so a header claiming more
/// than the frame holds was encapsulated with an outer length claiming bytes it did not carry
/// (the backend drops it as truncated), and one claiming less passed the MTU check with a frame
/// that did not fit and was sent out anyway (the next link drops it) instead of being answered.
/// Fixed in lb-ebpf/src/balancer.rs: a TCP/UDP packet to a VIP whose length field runs past the
/// frame, or does not cover its IP and TCP/UDP headers, is cut short: drop_truncated_l4. The
/// outer header carries the length field (bytes after it, Ethernet padding, follow the outer
/// packet's declared end, and receivers trim them); the MTU check counts the whole frame, and a
/// frame too big only by such bytes goes to the stack, which trims them and forwards the rest.
#[test]
fn encapsulation_follows_the_frame_length_not_the_length_field() {
    with_bed(|bed| {
        let m = &bed.model;
        let (c4, c6) = (IpAddr::V4(CLIENT4), IpAddr::V6(CLIENT6));
        let l3 = 14;
        let tcp4 = minimal_frame(m, c4, vip(false, VIP_IPIP), TCP, 80, None).build();
        let tcp6 = minimal_frame(m, c6, vip(true, VIP_IPIP), TCP, 80, None).build();
        let l2_tcp4 = minimal_frame(m, c4, vip(false, VIP_L2), TCP, 80, None).build();
        let mut claims_more = tcp4.clone();
        set_total_length(&mut claims_more, l3, be16(&tcp4, l3 + 2) + 100);
        let mut claims_more6 = tcp6.clone();
        claims_more6[l3 + 4..l3 + 6].copy_from_slice(&(be16(&tcp6, l3 + 4) + 100).to_be_bytes());
        let mut one_more = tcp4.clone();
        set_total_length(&mut one_more, l3, be16(&tcp4, l3 + 2) + 1);
        let mut l2_claims_more = l2_tcp4.clone();
        set_total_length(&mut l2_claims_more, l3, be16(&l2_tcp4, l3 + 2) + 1);
        // Shorter than the IP header, or than IP + TCP (the ports would come from padding).
        let mut below_ip = tcp4.clone();
        set_total_length(&mut below_ip, l3, 19);
        let mut below_tcp = tcp4.clone();
        set_total_length(&mut below_tcp, l3, 20 + 19);
        let mut below_tcp6 = tcp6.clone();
        below_tcp6[l3 + 4..l3 + 6].copy_from_slice(&19u16.to_be_bytes());
        for (name, frame) in [
            ("IPv4 total length 100 beyond the frame", &claims_more),
            ("IPv6 payload length 100 beyond the frame", &claims_more6),
            ("IPv4 total length 1 beyond the frame", &one_more),
            ("IPv4 total length 1 beyond the frame, L2 service", &l2_claims_more),
            ("IPv4 total length 19", &below_ip),
            ("IPv4 total length 39: TCP header cut by the length", &below_tcp),
            ("IPv6 payload length 19: TCP header cut by the length", &below_tcp6),
        ] {
            assert_eq!(bed.model.predict(frame).reason, Reason::DropTruncatedL4, "{name}: the model");
            let (verdict, out, reason) = run_reason(bed, frame);
            assert_eq!((verdict, reason), (XDP_DROP, Reason::DropTruncatedL4), "{name}");
            assert_eq!(&out, frame, "{name}: dropped untouched");
        }

        // Ethernet padding (a 54-byte frame padded to 60): encapsulated by the length field,
        // the padding after the outer packet's declared end.
        let mut padded = tcp4.clone();
        padded.extend_from_slice(&[0; 6]);
        let (verdict, out, reason) = run_reason(bed, &padded);
        assert_eq!((verdict, reason), (XDP_TX, Reason::TxEncap), "padded frame");
        assert_eq!(out.len(), padded.len() + 20);
        assert_eq!(usize::from(be16(&out, l3 + 2)), tcp4.len() - l3 + 20, "outer length: inner length field + 20");
        assert_eq!(out[l3 + 20..], padded[l3..], "inner packet, then the padding");
        let mut padded6 = tcp6.clone();
        padded6.extend_from_slice(&[0; 6]);
        let (verdict, out, reason) = run_reason(bed, &padded6);
        assert_eq!((verdict, reason), (XDP_TX, Reason::TxEncap), "padded IPv6 frame");
        assert_eq!(usize::from(be16(&out, l3 + 4)), tcp6.len() - l3, "outer payload length: the inner packet");
        assert_eq!(out[l3 + 40..], padded6[l3..]);

        // 1400 bytes of UDP payload to net 1 (route MTU 1400) with DF, the header claiming 100
        // bytes: the frame does not fit, the packet does. Handed to the stack, encapsulated.
        let m = &bed.model;
        let mut claims_less = minimal_frame(m, c4, vip(false, VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]).build();
        set_total_length(&mut claims_less, l3, 100);
        assert_eq!(landing_net(m, &claims_less), Some(1));
        let (verdict, out, reason) = run_reason(bed, &claims_less);
        assert_eq!((verdict, reason), (XDP_PASS, Reason::PassNoNeighbour), "too big only by its trailing bytes");
        assert_eq!(out[..12], claims_less[..12], "still addressed to us");
        assert_eq!(be16(&out, l3 + 2), 120, "outer length: the 100 claimed + 20");
        assert_eq!(out[l3 + 20..], claims_less[l3..]);
        // Claiming 1381 (+ 20 > 1400): too big by the packet itself, answered.
        set_total_length(&mut claims_less, l3, 1381);
        let (verdict, out, reason) = run_reason(bed, &claims_less);
        assert_eq!((verdict, reason), (XDP_TX, Reason::TxTooBig));
        assert_eq!(be16(&out, l3 + 20 + 6), 1380, "MTU 1400 - 20");
    });
}

/// Regression test of finding `IcmpErrorToNonUnicastSource`: lb-ebpf/src/balancer.rs too_big
/// answered whatever source the packet carried, though RFC 1122 3.2.2 (IPv4) and RFC 4443
/// 2.4 (e) (IPv6) forbid ICMP errors to a source that is no single host (0.0.0.0/8, 127/8,
/// multicast, class E and broadcast; ::, ::1, ff00::/8): a spoofed source made the balancer
/// send them. Fixed (icmp.rs may_answer): such a packet is dropped untouched, counted as
/// DROP_TOO_BIG_BAD_SOURCE; a unicast source is still answered.
#[test]
fn no_icmp_error_to_a_source_that_is_not_one_host() {
    with_bed(|bed| {
        let mut sources: Vec<IpAddr> = NOT_ONE_HOST.to_vec();
        sources.extend([IpAddr::V4(Ipv4Addr::new(127, 255, 255, 254)), IpAddr::V4(Ipv4Addr::new(239, 1, 2, 3))]);
        for src in sources {
            assert!(!single_host(src), "{src}");
            // UDP 53 on the encapsulating VIP: net 1, route MTU 1400; DF (IPv6: always).
            let f = minimal_frame(&bed.model, src, vip(src.is_ipv6(), VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]);
            let frame = f.build();
            assert_eq!(bed.model.predict(&frame).reason, DROP_TOO_BIG_BAD_SOURCE, "from {src}: the model");
            let (verdict, out, reason) = run_reason(bed, &frame);
            assert_eq!((verdict, reason), (XDP_DROP, DROP_TOO_BIG_BAD_SOURCE), "from {src}");
            assert_eq!(out, frame, "from {src}: dropped untouched");
        }
        // The edges of the ranges, and a unicast source: answered.
        for src in [
            IpAddr::V4(Ipv4Addr::new(1, 0, 0, 0)),
            IpAddr::V4(Ipv4Addr::new(126, 255, 255, 255)),
            IpAddr::V4(Ipv4Addr::new(128, 0, 0, 0)),
            IpAddr::V4(Ipv4Addr::new(223, 255, 255, 255)),
            IpAddr::V4(CLIENT4),
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 2)),
            IpAddr::V6(Ipv6Addr::new(0xfeff, 0, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 1, 0)),
            IpAddr::V6(CLIENT6),
        ] {
            let f = minimal_frame(&bed.model, src, vip(src.is_ipv6(), VIP_IPIP), UDP, 53, None).payload(vec![0; 1400]);
            let (verdict, _, reason) = run_reason(bed, &f.build());
            assert_eq!((verdict, reason), (XDP_TX, Reason::TxTooBig), "from {src}");
        }
    });
}
