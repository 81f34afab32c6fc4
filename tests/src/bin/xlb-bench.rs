//! `cargo xtask bench`: the data path's per-packet cost, measured with BPF_PROG_TEST_RUN and
//! set against two baselines measured in the same run: an empty program (XDP_PASS only: the
//! harness's own cost) and a MAC swap (the cheapest XDP_TX program). Absolute figures drift from
//! run to run and machine to machine; the differences and ratios are what to compare.
//!
//! Two methods, each with its own baselines:
//! - `repeat`: one BPF_PROG_TEST_RUN with repeat = R (1,000,000) on one buffer; the kernel's
//!   duration is the average ns per run. Only valid where every run takes the same path on the
//!   buffer the previous run left: the frame keeps its length and the path does not change with
//!   the flow table's state (l2 established, pass, drop, the baselines).
//! - `loop`: N calls (200,000) with repeat = 1, each on a fresh copy of its frame, averaging the
//!   kernel's per-call durations. For what repeat > 1 would measure wrongly: a new flow needs a
//!   new 5-tuple on every run (the frames are built before the timed loop), and an encapsulation
//!   changes the frame's length, so the next run would see its own output. Every loop call also
//!   carries costs the repeat method amortises (two clock reads, the program called outside the
//!   XDP dispatcher), the same for every loop case: a loop figure is compared with the loop
//!   baselines only.
//!
//! Everything runs on one thread pinned to CPU 0 inside a network namespace set up by
//! [`xlb_tests::dpbed`], whose routes and neighbours answer the balancer's `bpf_fib_lookup` for
//! the encapsulating services; every frame arrives on its veth0 (ctx_in).
//!
//! Every case is first run once and its verdict and output frame checked, and every timed
//! measurement is checked again: the verdict and output of every call, the balancer's reason
//! counter and its flow-table event counter (each must have moved by exactly the number of
//! runs, and nothing else), so a figure always belongs to the path it names. New flows run with
//! the new-flow rate limit off, and their entries are deleted from the flow table after each
//! measurement (every deletion must find its entry: none was evicted).
//!
//! Also reports the flow table's kernel memory: the memlock of a 1,000,000-entry FLOWS map.
//!
//! Prints a markdown table on stdout and writes the same data as JSON to
//! `target/bench/pkt-cost-<unix time>.json` and `target/bench/pkt-cost-latest.json`.
//! Needs root (CAP_BPF, network namespaces).
use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, MapInfo},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_agent::{
    config::Forward,
    dataplane::{map_addr, Dataplane, LoadOptions},
    sys::if_index,
    tables::maglev::address_key,
    tables::maglev::{self, Member},
};
use lb_common::{
    limits::DEFAULT_MAGLEV_SIZE, map_names, program_names, Flow, FlowEvent, FlowKey, Reason, IPPROTO_TCP, IPPROTO_UDP,
    SCHED_LC, SCHED_MAGLEV, SCHED_RR, SCHED_SOURCE_HASH, SCHED_WLC, SCHED_WRR,
};
use xlb_tests::bench::{json_num, machine, machine_json, pin_to_cpu0, write_results};
use xlb_tests::{
    bed::{verdict_name, XDP_DROP, XDP_PASS, XDP_TX},
    dpbed::{self, DpBed, CLIENT4, CLIENT6, GW4_MAC, GW6_MAC, LB_MAC, PORT_IPIP, PORT_L2_TCP, PORT_L2_UDP, VIP4, VIP6},
    wire::Frame,
};

const NON_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
const SPORT: u16 = 40_000;
const UNKNOWN_PORT: u16 = 81;
/// Services with the other schedulers (L2 DSR, TCP, IPv4).
const PORT_RR: u16 = 8001;
const PORT_WRR: u16 = 8002;
const PORT_SH: u16 = 8003;
const PORT_LC: u16 = 8004;
const PORT_WLC: u16 = 8005;
/// Maglev table size of every service: the default.
const TABLE: u32 = DEFAULT_MAGLEV_SIZE;
/// Flow-table entries whose kernel memory is reported.
const MEMORY_ENTRIES: u32 = 1_000_000;
/// New flows: source ports 1024.. of successive client addresses (10.9.1.0.., fd00:9::1:0..),
/// never the established flows' client.
const PORTS_PER_CLIENT: u32 = 60_000;
/// Output buffer of a test run: the largest frame plus an outer header, with room to spare.
const OUT_BUF: usize = 512;
/// Per-call durations are histogrammed in whole ns up to this (the last bucket takes the rest).
const HIST_NS: usize = 8192;

/// Measures the per-packet cost of the XDP data path with BPF_PROG_TEST_RUN (needs root).
#[derive(clap::Parser, Debug)]
#[command(name = "xlb-bench")]
struct Cli {
    /// Repeat 100,000 and 20,000 calls instead of 1,000,000 and 200,000.
    #[arg(long)]
    quick: bool,
    /// Runs per measurement of the repeat method (BPF_PROG_TEST_RUN repeat).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: Option<u32>,
    /// Calls (repeat = 1, each on a fresh frame) per measurement of the loop method.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    calls: Option<u32>,
    /// Rounds, each measuring every case once in turn; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
}

#[derive(Clone, Debug)]
struct Args {
    quick: bool,
    repeat: u32,
    calls: u32,
    rounds: usize,
}

fn parse_args() -> Result<Args> {
    let cli = <Cli as clap::Parser>::parse();
    Ok(Args {
        quick: cli.quick,
        repeat: cli.repeat.unwrap_or(if cli.quick { 100_000 } else { 1_000_000 }),
        calls: cli.calls.unwrap_or(if cli.quick { 20_000 } else { 200_000 }),
        rounds: usize::try_from(cli.rounds)?,
    })
}

/// Possible CPUs (/sys/devices/system/cpu/possible, e.g. "0-1"): a per-CPU LRU hash map
/// gives each possible CPU max_entries / possible CPUs entries of its own.
fn possible_cpus() -> u32 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let count: u32 = text
        .trim()
        .split(',')
        .filter_map(|range| match range.split_once('-') {
            Some((a, b)) => Some(b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1),
            None => range.parse::<u32>().ok().map(|_| 1),
        })
        .sum();
    // SAFETY: sysconf only reads a system value.
    #[allow(unsafe_code)]
    let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as u32;
    if count > 0 {
        count
    } else {
        configured
    }
}

/// A 74-byte (IPv4) or 94-byte (IPv6) TCP SYN to the balancer as a Linux client sends it: 20
/// bytes of options (MSS, SACK permitted, timestamps, NOP, window scale).
fn syn(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Frame {
    let mut f = dpbed::tcp(src, sport, dst, dport);
    // MSS 1460 | SACK permitted | timestamps | NOP | window scale 7.
    f.payload = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 3, 3, 7];
    f
}

/// A 74-byte UDP datagram (32 bytes of payload) to the balancer.
fn datagram(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Frame {
    let mut f = dpbed::udp(src, sport, dst, dport);
    f.payload = vec![0x5a; 32];
    f
}

/// The frame's bytes; a SYN's options count as TCP header (data offset 10), not as payload.
fn build(f: &Frame) -> Vec<u8> {
    let mut bytes = f.build();
    if f.proto == IPPROTO_TCP {
        bytes[f.l4_offset() + 12] = 0xa0;
    }
    bytes
}

/// The flow-table key the data path builds for this frame.
fn flow_key(f: &Frame) -> FlowKey {
    let (src, family) = map_addr(f.src);
    let (dst, _) = map_addr(f.dst);
    let [s0, s1] = f.sport.to_be_bytes();
    let [d0, d1] = f.dport.to_be_bytes();
    FlowKey { src, dst, ports: u32::from_ne_bytes([s0, s1, d0, d1]), proto: f.proto, family, _pad: 0 }
}

/// The client of the k-th new flow: (address, source port).
fn new_flow_client(v6: bool, k: u32) -> (IpAddr, u16) {
    let (host, port) = (k / PORTS_PER_CLIENT, 1024 + (k % PORTS_PER_CLIENT) as u16);
    let addr = if v6 {
        IpAddr::V6(Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 1, 0)) + u128::from(host)))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 9, 1, 0)) + host))
    };
    (addr, port)
}

/// A service of the bench and its Maglev table, to compute every expected output.
struct Svc {
    vip: IpAddr,
    port: u16,
    proto: u8,
    forward: Forward,
    table: Vec<u32>,
}

/// What the data path was configured with.
struct Setup {
    services: Vec<Svc>,
    /// Backend id → address.
    backends: HashMap<u32, IpAddr>,
}

impl Setup {
    /// The exact frame the balancer must emit for `f` (built as `input`): L2 DSR rewrites the
    /// MACs towards the Maglev backend; ipip encapsulates towards it, with the outer source and
    /// (IPv6) flow label from the flow hash, the MACs from the FIB (gateway's, veth0's).
    fn forwarded(&self, f: &Frame, input: &[u8]) -> Result<Vec<u8>> {
        let svc = self
            .services
            .iter()
            .find(|s| s.vip == f.dst && s.port == f.dport && s.proto == f.proto)
            .with_context(|| format!("no service {} {}/{}", f.dst, f.proto, f.dport))?;
        let hash = dpbed::frame_hash(f);
        let id = svc.table[(hash % TABLE) as usize];
        let addr = self.backends[&id];
        Ok(match (svc.forward, addr) {
            (Forward::L2, _) => {
                let mut out = input.to_vec();
                out[..6].copy_from_slice(&dpbed::backend_mac(id));
                out[6..12].copy_from_slice(&LB_MAC);
                out
            }
            (Forward::Ipip, IpAddr::V4(a)) => {
                xlb_tests::wire::expect::expect_ipip_v4(input, GW4_MAC, LB_MAC, dpbed::outer_src_v4(hash), a)
            }
            (Forward::Ipip, IpAddr::V6(a)) => {
                xlb_tests::wire::expect::expect_ip6ip6(input, GW6_MAC, LB_MAC, dpbed::outer_src_v6(hash), a, hash)
            }
        })
    }
}

/// What the output frame must be.
enum Expect {
    /// Exactly these bytes.
    Exact(Vec<u8>),
    /// The Ethernet addresses swapped. The swap undoes itself when run again: after an even
    /// number of runs on one buffer the frame is the input again.
    MacsSwapped,
}

/// One frame of a case and what the program must make of it.
struct Input {
    frame: Vec<u8>,
    expect: Expect,
    key: FlowKey,
}

impl Input {
    fn untouched(f: &Frame) -> Self {
        let frame = build(f);
        Self { expect: Expect::Exact(frame.clone()), frame, key: flow_key(f) }
    }

    fn swapped(f: &Frame) -> Self {
        Self { frame: build(f), expect: Expect::MacsSwapped, key: flow_key(f) }
    }

    fn forwarded(setup: &Setup, f: &Frame) -> Result<Self> {
        let frame = build(f);
        Ok(Self { expect: Expect::Exact(setup.forwarded(f, &frame)?), frame, key: flow_key(f) })
    }

    /// Whether `out` is what the program must leave after `runs` runs on one buffer.
    fn output_ok(&self, out: &[u8], runs: u32) -> bool {
        let input = &self.frame;
        match &self.expect {
            Expect::Exact(want) => out == &want[..],
            Expect::MacsSwapped => {
                out.len() == input.len()
                    && out[12..] == input[12..]
                    && if runs.is_multiple_of(2) {
                        out[..12] == input[..12]
                    } else {
                        out[..6] == input[6..12] && out[6..12] == input[..6]
                    }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// One call, repeat = R, on one buffer.
    Repeat,
    /// N calls, repeat = 1, each on a fresh copy of its frame.
    Loop,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Repeat => "repeat",
            Method::Loop => "loop",
        }
    }
}

/// What the flow table does for a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flows {
    /// Not consulted (baselines, non-VIP, unknown service).
    Untouched,
    /// The case's one flow is pinned before timing: every run is a hit.
    Established,
    /// Every run is a flow never seen: Maglev and an insert.
    New,
}

struct Case {
    name: &'static str,
    method: Method,
    program: &'static str,
    verdict: u32,
    /// The balancer's reason counter this case must move, once per run; None for the baselines.
    reason: Option<Reason>,
    flows: Flows,
    /// One frame, or (new flows) one per call.
    inputs: Vec<Input>,
    frame_bytes: usize,
    /// Kernel-reported ns per run (repeat) or mean over the calls (loop), one per round.
    samples: Vec<f64>,
    /// Loop method: median of the per-call durations, one per round.
    call_medians: Vec<u64>,
    /// Loop method: the clock's step seen in the per-call durations, one per round.
    clock_steps: Vec<u64>,
}

impl Case {
    fn flow_event(&self) -> Option<FlowEvent> {
        match self.flows {
            Flows::Untouched => None,
            Flows::Established => Some(FlowEvent::Hit),
            Flows::New => Some(FlowEvent::New),
        }
    }

    fn label(&self) -> String {
        format!("{} ({})", self.name, self.method.name())
    }

    /// What the timed measurements check: verdict · reason · flow event.
    fn path(&self) -> String {
        let mut s = verdict_name(self.verdict).to_string();
        if let Some(r) = self.reason {
            let _ = write!(s, " · {}", r.name());
        }
        if let Some(e) = self.flow_event() {
            let _ = write!(s, " · flow {}", e.name());
        }
        s
    }
}

/// One BPF_PROG_TEST_RUN of `frame` arriving on `ifindex`: the verdict, the kernel's ns per run
/// and the output frame's length (in `out`).
///
/// Only the kernel's figure is usable: it leaves out the time the task was rescheduled and the
/// syscall's set-up (copying the frame in, and for repeat > 1 updating the XDP dispatcher: ~14
/// ms a call measured here).
fn test_run(prog: &Xdp, frame: &[u8], ifindex: u32, repeat: u32, out: &mut [u8]) -> Result<(u32, u64, usize)> {
    let ctx = xlb_tests::bed::xdp_md(frame.len(), ifindex);
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(out);
    opts.ctx_in = Some(&ctx);
    opts.repeat = repeat;
    let result = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    // aya 0.14 hands over the kernel's `attr.test.duration` unchanged, and the kernel
    // (bpf_test_timer_leave) stores there the time spent divided by the number of runs: the
    // duration already IS the average ns per run (truncated to whole ns), not a total.
    Ok((result.return_value, result.duration.as_nanos() as u64, result.data_size_out as usize))
}

/// The median of a histogram of `count` values in whole ns.
fn hist_median(hist: &[u32], count: u32) -> u64 {
    let half = u64::from(count).div_ceil(2);
    let mut seen = 0u64;
    for (ns, &n) in hist.iter().enumerate() {
        seen += u64::from(n);
        if seen >= half {
            return ns as u64;
        }
    }
    hist.len() as u64
}

/// The step of the clock the kernel timed the calls with, from a histogram of per-call
/// durations: the distance between the clusters of its well-populated buckets (each a step's
/// value and the next ns, from rounding). 1 when they form one cluster, i.e. a 1 ns clock.
fn clock_step(hist: &[u32], count: u32) -> u64 {
    let dense: Vec<usize> = (0..hist.len()).filter(|&ns| u64::from(hist[ns]) * 100 >= u64::from(count)).collect();
    let starts: Vec<usize> =
        dense.iter().enumerate().filter(|&(i, &ns)| i == 0 || ns > dense[i - 1] + 1).map(|(_, &ns)| ns).collect();
    starts.windows(2).map(|w| (w[1] - w[0]) as u64).min().unwrap_or(1)
}

/// One measurement: ns per packet, and for the loop method the median call and the clock step.
struct Sample {
    ns: f64,
    call_median: Option<u64>,
    clock_step: Option<u64>,
}

struct Bench {
    dp: Dataplane,
    /// The balancer's FLOWS map, to delete the new flows after each measurement.
    flows: BpfHashMap<MapData, FlowKey, Flow>,
    /// veth0 in the bed's namespace: every frame arrives there.
    ifindex: u32,
    out: Vec<u8>,
}

impl Bench {
    /// Runs `case` `count` times (repeat = count, or count calls), checks the verdict and output
    /// of every call and that exactly `reason` and `flow` moved, by `count`; then deletes the
    /// flows a new-flow case created.
    fn measure(&mut self, case: &Case, count: u32, flow: Option<FlowEvent>) -> Result<Sample> {
        let reasons_before = self.dp.reason_counters()?;
        let flows_before = self.dp.flow_counters()?;
        let ifindex = self.ifindex;
        let out = &mut self.out;
        let prog = self.dp.program(case.program)?;
        let check = |input: &Input, verdict: u32, out: &[u8], runs: u32| -> Result<()> {
            ensure!(
                verdict == case.verdict,
                "case {}: verdict {} ({verdict}), expected {}",
                case.label(),
                verdict_name(verdict),
                verdict_name(case.verdict)
            );
            ensure!(
                input.output_ok(out, runs),
                "case {}: unexpected output frame after {runs} run(s)\n  in  {:02x?}\n  out {out:02x?}",
                case.label(),
                input.frame
            );
            Ok(())
        };
        let sample = match case.method {
            Method::Repeat => {
                let input = &case.inputs[0];
                let (verdict, ns, len) = test_run(prog, &input.frame, ifindex, count, out)?;
                check(input, verdict, &out[..len], count)?;
                Sample { ns: ns as f64, call_median: None, clock_step: None }
            }
            Method::Loop => {
                ensure!(
                    case.flows != Flows::New || count as usize <= case.inputs.len(),
                    "case {}: {count} calls but only {} new flows built",
                    case.label(),
                    case.inputs.len()
                );
                let mut hist = vec![0u32; HIST_NS];
                let mut total = 0u64;
                for i in 0..count as usize {
                    let input = &case.inputs[i % case.inputs.len()];
                    let (verdict, ns, len) = test_run(prog, &input.frame, ifindex, 1, out)?;
                    check(input, verdict, &out[..len], 1)?;
                    total += ns;
                    hist[(ns as usize).min(HIST_NS - 1)] += 1;
                }
                Sample {
                    ns: total as f64 / f64::from(count),
                    call_median: Some(hist_median(&hist, count)),
                    clock_step: Some(clock_step(&hist, count)),
                }
            }
        };
        let reasons_after = self.dp.reason_counters()?;
        let flows_after = self.dp.flow_counters()?;
        let runs = u64::from(count);
        for ((r, b), (_, a)) in reasons_before.iter().zip(&reasons_after) {
            let moved = a.packets - b.packets;
            let want = if Some(*r) == case.reason { runs } else { 0 };
            ensure!(
                moved == want,
                "case {}: counter {} moved by {moved} in {count} run(s), expected {want}",
                case.label(),
                r.name()
            );
        }
        for ((e, b), (_, a)) in flows_before.iter().zip(&flows_after) {
            let moved = a - b;
            let want = if Some(*e) == flow { runs } else { 0 };
            ensure!(
                moved == want,
                "case {}: flow event {} moved by {moved} in {count} run(s), expected {want}",
                case.label(),
                e.name()
            );
        }
        if case.flows == Flows::New {
            for (i, input) in case.inputs[..count as usize].iter().enumerate() {
                self.flows.remove(&input.key).with_context(|| {
                    format!("case {}: new flow {i} is not in the flow table after the run (evicted?)", case.label())
                })?;
            }
        }
        Ok(sample)
    }
}

struct ProgStats {
    /// Instructions after the verifier (xlated bytes / 8).
    instructions: Option<u32>,
    jited_bytes: u32,
}

fn prog_stats(dp: &mut Dataplane, name: &str) -> Result<ProgStats> {
    let info = dp.program(name)?.info().with_context(|| format!("cannot read the info of program {name}"))?;
    Ok(ProgStats { instructions: info.size_translated().map(|b| b / 8), jited_bytes: info.size_jitted() })
}

/// The balancer's FLOWS map, found among the maps its program uses.
fn flows_map_info(dp: &mut Dataplane) -> Result<MapInfo> {
    let ids = dp.balancer().info()?.map_ids()?.context("the kernel does not list the program's maps")?;
    for id in ids {
        let info = MapInfo::from_id(id)?;
        if info.name_as_str() == Some(map_names::FLOWS) {
            return Ok(info);
        }
    }
    bail!("the balancer uses no map named {}", map_names::FLOWS)
}

/// The flow table's kernel memory.
struct FlowMemory {
    requested: u32,
    /// As the kernel sized it (a per-CPU LRU map rounds to a multiple of the possible CPUs).
    max_entries: u32,
    /// The map's "memlock:" in /proc/self/fdinfo: what the kernel charges for it.
    memlock: u64,
}

impl FlowMemory {
    fn bytes_per_entry(&self) -> f64 {
        self.memlock as f64 / f64::from(self.max_entries)
    }
}

fn flow_memory(info: &MapInfo, requested: u32) -> Result<FlowMemory> {
    let fd = info.fd()?;
    let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let memlock = text
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .with_context(|| format!("no memlock in {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("bad memlock in {path}"))?;
    Ok(FlowMemory { requested, max_entries: info.max_entries(), memlock })
}

/// Loads a data path with a flow table of `entries` and reads what its FLOWS map costs.
fn flow_table_memory(entries: u32) -> Result<FlowMemory> {
    let mut dp = Dataplane::load(&LoadOptions {
        hash_seed: dpbed::SEED,
        iface_mac: LB_MAC,
        maglev_capacity: 1,
        flow_table_size: entries,
    })?;
    let info = flows_map_info(&mut dp)?;
    flow_memory(&info, entries)
}

/// What the bench thread hands back.
struct Measured {
    cases: Vec<Case>,
    stats: Vec<ProgStats>,
    possible_cpus: u32,
    /// The bench's own flow table.
    bench_table: FlowMemory,
    /// The 1,000,000-entry table of the memory figure.
    memory: FlowMemory,
}

/// Loads the data path inside the bed's namespace, builds every case, checks it, measures the
/// rounds. Runs on the bed's thread.
fn run_bench(args: &Args) -> Result<Measured> {
    pin_to_cpu0()?;
    let started = Instant::now();
    let ifindex = if_index(dpbed::VETH).context("veth0 missing: not inside the bed's namespace?")?;
    let possible = possible_cpus();

    // The rr, wrr and source-hash services have one backend, so that the bench can predict
    // every output frame whatever the per-CPU cursor says; their new-flow path (the scheduler's
    // function, the cursor update) costs the same with more backends.
    let one_backend: &[u32] = &dpbed::L2_V4[..1];
    // (VIP, port, protocol, forward, backends, scheduler)
    type ServiceSpec<'a> = (IpAddr, u16, u8, Forward, &'a [u32], u8);
    let services: Vec<ServiceSpec> = vec![
        (VIP4.into(), PORT_L2_TCP, IPPROTO_TCP, Forward::L2, &dpbed::L2_V4, SCHED_MAGLEV),
        (VIP4.into(), PORT_L2_UDP, IPPROTO_UDP, Forward::L2, &dpbed::L2_V4, SCHED_MAGLEV),
        (VIP4.into(), PORT_IPIP, IPPROTO_TCP, Forward::Ipip, &dpbed::IPIP_V4, SCHED_MAGLEV),
        (VIP6.into(), PORT_L2_TCP, IPPROTO_TCP, Forward::L2, &dpbed::L2_V6, SCHED_MAGLEV),
        (VIP6.into(), PORT_IPIP, IPPROTO_TCP, Forward::Ipip, &dpbed::IPIP_V6, SCHED_MAGLEV),
        (VIP4.into(), PORT_RR, IPPROTO_TCP, Forward::L2, one_backend, SCHED_RR),
        (VIP4.into(), PORT_WRR, IPPROTO_TCP, Forward::L2, one_backend, SCHED_WRR),
        (VIP4.into(), PORT_SH, IPPROTO_TCP, Forward::L2, one_backend, SCHED_SOURCE_HASH),
        (VIP4.into(), PORT_LC, IPPROTO_TCP, Forward::L2, one_backend, SCHED_LC),
        (VIP4.into(), PORT_WLC, IPPROTO_TCP, Forward::L2, one_backend, SCHED_WLC),
    ];
    // The flow table: the default size, or more when one CPU's share of the per-CPU LRU would
    // not hold a loop's new flows twice over (then it would evict during the loop).
    let flow_table_size =
        lb_common::limits::DEFAULT_FLOW_TABLE_SIZE.max(possible.saturating_mul(args.calls.saturating_mul(2)));
    let mut dp = Dataplane::load(&LoadOptions {
        hash_seed: dpbed::SEED,
        iface_mac: LB_MAC,
        maglev_capacity: 2 * TABLE * services.len() as u32,
        flow_table_size,
    })
    .context("cannot load the data path (run as root: cargo xtask bench)")?;
    let settings = lb_common::Settings { new_flows_per_cpu_sec: 0, ..dpbed::default_settings() };
    dp.set_settings(settings)?;
    let mut setup = Setup { services: Vec::new(), backends: HashMap::new() };
    for (id, addr, mac) in dpbed::standard_backends() {
        if services.iter().any(|s| s.4.contains(&id)) {
            dp.set_backend(id, addr, mac, true)?;
            setup.backends.insert(id, addr);
        }
    }
    for (id, (vip, port, proto, forward, members, scheduler)) in services.iter().enumerate() {
        let members: Vec<Member> =
            members.iter().map(|&m| Member { id: m, key: address_key(setup.backends[&m]), weight: 1 }).collect();
        let table = match *scheduler {
            SCHED_RR | SCHED_WRR => lb_agent::tables::rr::table(&members, TABLE, *scheduler == SCHED_WRR),
            _ => maglev::build(&members, TABLE),
        };
        ensure!(table.len() == TABLE as usize, "the bench's tables are all {TABLE} entries");
        let mut slot = dp.add_service(*vip, *port, *proto, id as u32, TABLE, *forward)?;
        slot.set_scheduler(*scheduler);
        dp.publish_table(&mut slot, &table)?;
        setup.services.push(Svc { vip: *vip, port: *port, proto: *proto, forward: *forward, table });
    }
    let flows_info = flows_map_info(&mut dp)?;
    let bench_table = flow_memory(&flows_info, flow_table_size)?;
    let per_cpu = bench_table.max_entries / possible;
    ensure!(
        u64::from(per_cpu) >= 2 * u64::from(args.calls),
        "flow table of {} entries: {per_cpu} per CPU, too few for {} new flows",
        bench_table.max_entries,
        args.calls
    );
    let flows = BpfHashMap::try_from(Map::from_map_data(MapData::from_id(flows_info.id())?)?)
        .context("the FLOWS map is not a hash map")?;

    // Frames.
    let (c4, c6, vip4, vip6): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), CLIENT6.into(), VIP4.into(), VIP6.into());
    let syn_v4 = syn(c4, SPORT, NON_VIP.into(), PORT_L2_TCP);
    let new_flows = |v6: bool, port: u16| -> Result<Vec<Input>> {
        (0..args.calls)
            .map(|k| {
                let (client, sport) = new_flow_client(v6, k);
                Input::forwarded(&setup, &syn(client, sport, if v6 { vip6 } else { vip4 }, port))
            })
            .collect()
    };
    let case = |name, method, program, verdict, reason, flows, inputs: Vec<Input>| Case {
        name,
        method,
        program,
        verdict,
        reason,
        flows,
        frame_bytes: inputs[0].frame.len(),
        inputs,
        samples: Vec::new(),
        call_medians: Vec::new(),
        clock_steps: Vec::new(),
    };
    let (pass, swap, lb) = (program_names::PASS, program_names::MAC_SWAP, program_names::BALANCER);
    let (repeat, lp) = (Method::Repeat, Method::Loop);
    let (none, est, new) = (Flows::Untouched, Flows::Established, Flows::New);
    let (fwd, encap) = (Some(Reason::TxForwarded), Some(Reason::TxEncap));
    let one = |f: &Frame| -> Result<Vec<Input>> { Ok(vec![Input::forwarded(&setup, f)?]) };
    let mut cases = vec![
        // The baselines run on the non-VIP SYN; they never look past the MACs.
        case("empty", repeat, pass, XDP_PASS, None, none, vec![Input::untouched(&syn_v4)]),
        case("mac-swap", repeat, swap, XDP_TX, None, none, vec![Input::swapped(&syn_v4)]),
        case("non-vip pass", repeat, lb, XDP_PASS, Some(Reason::PassNotVip), none, vec![Input::untouched(&syn_v4)]),
        case(
            "vip unknown port (drop)",
            repeat,
            lb,
            XDP_DROP,
            Some(Reason::DropUnknownService),
            none,
            vec![Input::untouched(&syn(c4, SPORT, vip4, UNKNOWN_PORT))],
        ),
        // The L2 rewrite is idempotent: the second run writes the same MACs again and takes the
        // same path (a flow-table hit), so repeat > 1 on one buffer measures the named path.
        case("l2 established tcp v4", repeat, lb, XDP_TX, fwd, est, one(&syn(c4, SPORT, vip4, PORT_L2_TCP))?),
        case("l2 established tcp v6", repeat, lb, XDP_TX, fwd, est, one(&syn(c6, SPORT, vip6, PORT_L2_TCP))?),
        case("l2 established udp v4", repeat, lb, XDP_TX, fwd, est, one(&datagram(c4, SPORT, vip4, PORT_L2_UDP))?),
        case("empty", lp, pass, XDP_PASS, None, none, vec![Input::untouched(&syn_v4)]),
        case("mac-swap", lp, swap, XDP_TX, None, none, vec![Input::swapped(&syn_v4)]),
        // Cross-check of the two methods: the same path as the repeat case (another flow).
        case("l2 established tcp v4", lp, lb, XDP_TX, fwd, est, one(&syn(c4, SPORT + 1, vip4, PORT_L2_TCP))?),
        case("l2 new tcp v4", lp, lb, XDP_TX, fwd, new, new_flows(false, PORT_L2_TCP)?),
        case("l2 new tcp v6", lp, lb, XDP_TX, fwd, new, new_flows(true, PORT_L2_TCP)?),
        case("l2 new tcp v4, rr", lp, lb, XDP_TX, fwd, new, new_flows(false, PORT_RR)?),
        case("l2 new tcp v4, wrr", lp, lb, XDP_TX, fwd, new, new_flows(false, PORT_WRR)?),
        case("l2 new tcp v4, source-hash", lp, lb, XDP_TX, fwd, new, new_flows(false, PORT_SH)?),
        case("l2 new tcp v4, lc", lp, lb, XDP_TX, fwd, new, new_flows(false, PORT_LC)?),
        case("l2 new tcp v4, wlc", lp, lb, XDP_TX, fwd, new, new_flows(false, PORT_WLC)?),
        case("ipip established tcp v4 (ipip)", lp, lb, XDP_TX, encap, est, one(&syn(c4, SPORT, vip4, PORT_IPIP))?),
        case("ipip established tcp v6 (ip6ip6)", lp, lb, XDP_TX, encap, est, one(&syn(c6, SPORT, vip6, PORT_IPIP))?),
        case("ipip new tcp v4 (ipip)", lp, lb, XDP_TX, encap, new, new_flows(false, PORT_IPIP)?),
        case("ipip new tcp v6 (ip6ip6)", lp, lb, XDP_TX, encap, new, new_flows(true, PORT_IPIP)?),
    ];

    let mut bench = Bench { dp, flows, ifindex, out: vec![0u8; OUT_BUF] };
    // Load every program and check every case once before any timing. An established flow is
    // pinned by its first packet (a new flow), then hit.
    let mut stats = Vec::new();
    for c in &cases {
        stats.push(prog_stats(&mut bench.dp, c.program)?);
        if c.flows == Flows::Established {
            bench.measure(c, 1, Some(FlowEvent::New))?;
        }
        bench.measure(c, 1, c.flow_event())?;
    }
    // A new-flow key built here must be the data path's: its entry was found and deleted above.
    let runs = |c: &Case| if c.method == Method::Repeat { args.repeat } else { args.calls };
    eprintln!(
        "xlb-bench: {} cases × {} rounds (repeat {} / loop {} calls), flow table {} entries, pinned to CPU 0 \
         (setup {:.1?})",
        cases.len(),
        args.rounds,
        args.repeat,
        args.calls,
        bench_table.max_entries,
        started.elapsed()
    );
    for round in 0..args.rounds {
        let t = Instant::now();
        for c in cases.iter_mut() {
            let s = bench.measure(c, runs(c), c.flow_event())?;
            c.samples.push(s.ns);
            c.call_medians.extend(s.call_median);
            c.clock_steps.extend(s.clock_step);
        }
        eprintln!(
            "xlb-bench: round {}/{} ({:.1?}): {}",
            round + 1,
            args.rounds,
            t.elapsed(),
            cases.iter().map(|c| format!("{} {:.1} ns", c.label(), c.samples[round])).collect::<Vec<_>>().join(", ")
        );
    }
    for c in cases.iter_mut() {
        c.inputs = Vec::new();
    }
    drop(bench);
    let memory = flow_table_memory(MEMORY_ENTRIES).context("cannot measure the flow table's memory")?;
    Ok(Measured { cases, stats, possible_cpus: possible, bench_table, memory })
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn median_u64(values: &[u64]) -> Option<f64> {
    (!values.is_empty()).then(|| median(&values.iter().map(|&v| v as f64).collect::<Vec<_>>()))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let machine = machine();
    pin_to_cpu0()?;

    let bed = DpBed::new().context("cannot create the bench's network namespace (run as root: cargo xtask bench)")?;
    let bench_args = args.clone();
    let measured = bed.run_raw(move || run_bench(&bench_args))?;
    drop(bed);
    let Measured { cases, stats, possible_cpus, bench_table, memory } = measured;

    let medians: Vec<f64> = cases.iter().map(|c| median(&c.samples)).collect();
    let baseline = |method: Method, program: &str| {
        cases.iter().position(|c| c.method == method && c.program == program).map(|i| medians[i])
    };
    let empty: Vec<Option<f64>> = cases.iter().map(|c| baseline(c.method, program_names::PASS)).collect();
    let mac_swap: Vec<Option<f64>> = cases.iter().map(|c| baseline(c.method, program_names::MAC_SWAP)).collect();
    let minus_empty: Vec<Option<f64>> = medians.iter().zip(&empty).map(|(m, e)| e.map(|e| m - e)).collect();
    // Whole figures, not net ones: the mac-swap's net cost is a few ns, so a ratio of net
    // figures would mostly measure the rounding.
    let div_mac_swap: Vec<Option<f64>> =
        medians.iter().zip(&mac_swap).map(|(m, s)| s.filter(|&s| s > 0.0).map(|s| m / s)).collect();
    let unix_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // The clock's step as the loop measurements saw it: the most frequent estimate.
    let steps: Vec<u64> = cases.iter().flat_map(|c| c.clock_steps.iter().copied()).collect();
    let clock_step = steps.iter().copied().max_by_key(|s| (steps.iter().filter(|x| *x == s).count(), *s));

    // Markdown.
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Per-packet cost, BPF_PROG_TEST_RUN, median of {} rounds; repeat: {} runs on one buffer, loop: {} calls \
         of one run each (CPU 0)\n",
        args.rounds, args.repeat, args.calls
    );
    let _ = writeln!(
        md,
        "| case | method | bytes | ns/packet (median) | − empty | ÷ mac-swap | checked path | instructions |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---|---:|");
    let fmt = |v: Option<f64>, digits: usize| v.map_or_else(|| "—".to_string(), |v| format!("{v:.digits$}"));
    for (i, c) in cases.iter().enumerate() {
        let insns = stats[i].instructions.map_or_else(|| "?".to_string(), |n| n.to_string());
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {} | {} | {} | {insns} |",
            c.name,
            c.method.name(),
            c.frame_bytes,
            medians[i],
            fmt(minus_empty[i], 1),
            fmt(div_mac_swap[i], 2),
            c.path()
        );
    }
    let _ = writeln!(
        md,
        "\nmethod: repeat = one BPF_PROG_TEST_RUN with repeat {} on one buffer, the kernel's average per run \
         (whole ns, truncated); only where every run takes the same path on the buffer the previous run left \
         (the frame keeps its length; an established flow stays a hit). loop = {} calls with repeat 1, each on \
         a fresh copy of its frame (new flows: a new 5-tuple every call, built before the timed loop; ipip \
         established: the same frame every call), the mean of the kernel's per-call durations. With repeat 1 \
         the kernel reports whole ns per call, so each call's figure is rounded by ±1 ns{}; the mean over the \
         calls, which start at random phases of the clock, is shown to 0.1 ns. A loop call also carries costs \
         the repeat method spreads or avoids (the clock reads around a single run; with repeat 1 the kernel \
         does not put the program into the XDP dispatcher, so it is called indirectly), the same for every \
         loop case: compare a loop figure with the loop baselines only.",
        args.repeat,
        args.calls,
        match clock_step {
            Some(step) if step > 1 => format!(
                ", and on this machine the kernel's clock ({}) advances in steps of about {step} ns, so each \
                 call's figure is really ±{step} ns",
                machine.clocksource
            ),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        md,
        "ns/packet: harness included. − empty: net of the empty program measured with the same method. \
         ÷ mac-swap: ns/packet over the mac-swap's of the same method. checked path: the verdict, reason counter \
         and flow-table event every timed run was checked against (plus its exact output frame). \
         instructions: of the whole program after the verifier (xlated bytes / 8), not of the path."
    );
    let _ = writeln!(
        md,
        "flow table: {} entries, memlock {:.1} MB (per-CPU LRU: {} per CPU, {} possible CPUs), new-flow rate limit \
         off; each new-flow measurement's entries are deleted afterwards, every deletion finding its entry (no \
         eviction). Maglev table {TABLE} per service, 3 backends (rr, wrr, source-hash, lc, wlc: one backend, so that the \
         output is known whatever the cursor; the path costs the same); ipip routes and neighbours in a network \
         namespace (dpbed).",
        bench_table.max_entries,
        bench_table.memlock as f64 / 1e6,
        bench_table.max_entries / possible_cpus,
        possible_cpus
    );
    let _ = writeln!(
        md,
        "flow-table memory: {} entries requested → max_entries {}, memlock {} bytes = {:.1} bytes per entry \
         = {:.1} MB (10^6 bytes, {:.1} MiB) per million entries (fdinfo memlock of the FLOWS map; key 40 + \
         value 16 bytes, the rest hash-table overhead)",
        memory.requested,
        memory.max_entries,
        memory.memlock,
        memory.bytes_per_entry(),
        memory.bytes_per_entry(),
        memory.bytes_per_entry() * 1e6 / f64::from(1u32 << 20)
    );
    let _ = writeln!(
        md,
        "machine: kernel {}, CPU {}, {} cores, clocksource {}, load average {} at start; total {:.1?}",
        machine.kernel,
        machine.cpu,
        machine.cores,
        machine.clocksource,
        machine.loadavg,
        started.elapsed()
    );
    print!("{md}");

    let mut machine_json = machine_json(&machine);
    machine_json["possible_cpus"] = possible_cpus.into();
    machine_json["pinned_cpu"] = 0.into();
    let cases_json: Vec<serde_json::Value> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            serde_json::json!({
                "case": c.name,
                "method": c.method.name(),
                "runs": if c.method == Method::Repeat { args.repeat } else { args.calls },
                "program": c.program,
                "frame_bytes": c.frame_bytes,
                "verdict": verdict_name(c.verdict),
                "reason": c.reason.map(Reason::name),
                "flow_event": c.flow_event().map(FlowEvent::name),
                "ns_per_packet_median": json_num(Some(medians[i]), 3),
                "minus_empty": json_num(minus_empty[i], 3),
                "div_mac_swap": json_num(div_mac_swap[i], 3),
                "instructions": stats[i].instructions,
                "jited_bytes": stats[i].jited_bytes,
                "ns_per_packet_rounds": c.samples.iter().map(|&v| json_num(Some(v), 3)).collect::<Vec<_>>(),
                "call_median_ns": json_num(median_u64(&c.call_medians), 3),
                "call_median_ns_rounds": c.call_medians,
                "clock_step_ns_rounds": c.clock_steps,
            })
        })
        .collect();
    let results = serde_json::json!({
        "bench": "pkt-cost",
        "unix_time": unix_time,
        "machine": machine_json,
        "quick": args.quick,
        "repeat": args.repeat,
        "loop_calls": args.calls,
        "rounds": args.rounds,
        "maglev_table": TABLE,
        "loop_clock_step_ns": clock_step,
        "flow_table": {"max_entries": bench_table.max_entries, "memlock_bytes": bench_table.memlock},
        "flow_table_memory": {
            "requested_entries": memory.requested,
            "max_entries": memory.max_entries,
            "memlock_bytes": memory.memlock,
            "bytes_per_entry": json_num(Some(memory.bytes_per_entry()), 3),
            "mb_per_million_entries": json_num(Some(memory.bytes_per_entry()), 3),
        },
        "cases": cases_json,
    });
    let (stamped, latest) = write_results("pkt-cost", unix_time, &results)?;
    println!("\nresults: {} (and {})", stamped.display(), latest.display());
    Ok(())
}
