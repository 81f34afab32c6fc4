//! `cargo xtask bench`: the data path's per-packet cost, measured with BPF_PROG_TEST_RUN and
//! set against two baselines from the same run: an empty program (XDP_PASS only: the harness's
//! own cost) and a MAC swap (the cheapest XDP_TX program). Absolute figures drift from run to
//! run and machine to machine; the differences and ratios are what to compare.
//!
//! Every case is first run once and its verdict and output frame checked, and every timed run is
//! checked again (verdict, output, and for the balancer the per-reason counter, which must have
//! moved by exactly `repeat`), so a figure always belongs to the path it names.
//!
//! Prints a markdown table on stdout and writes the same data as JSON to
//! `target/bench/pkt-cost-<unix time>.json` and `target/bench/pkt-cost-latest.json`.
//! Needs root (CAP_BPF).
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{
    dataplane::{Dataplane, LoadOptions},
    maglev::{self, Member},
};
use lb_common::{limits::DEFAULT_MAGLEV_SIZE, program_names, Reason, IPPROTO_TCP, IPPROTO_UDP};
use xlb_tests::packet::Frame;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const SEED: u32 = 0x5eed;
const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x03];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
const NON_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const SPORT: u16 = 40_000;
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const UNKNOWN_PORT: u16 = 81;
const BACKENDS: u32 = 3;
const TABLE: u32 = DEFAULT_MAGLEV_SIZE;
const FRAME_LEN: usize = 74;

const USAGE: &str = "\
usage: xlb-bench [--quick] [--repeat N] [--rounds N]

Measures the per-packet cost of the XDP data path with BPF_PROG_TEST_RUN (needs root).
  --quick      100,000 runs per measurement instead of 1,000,000
  --repeat N   runs per measurement (BPF_PROG_TEST_RUN repeat)
  --rounds N   rounds, each measuring every case once in turn (default 5); the median is reported";

struct Args {
    quick: bool,
    repeat: u32,
    rounds: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { quick: false, repeat: 0, rounds: 5 };
    let mut repeat = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value\n\n{USAGE}"));
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--repeat" => repeat = Some(value("--repeat")?.parse::<u32>().context("--repeat")?),
            "--rounds" => args.rounds = value("--rounds")?.parse::<usize>().context("--rounds")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    args.repeat = repeat.unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
    ensure!(args.repeat > 0 && args.rounds > 0, "--repeat and --rounds must be at least 1");
    Ok(args)
}

/// Pins the process to CPU 0: BPF_PROG_TEST_RUN runs the program on the calling CPU, and a
/// migration in the middle of a measurement would mix two CPUs' caches into one figure.
fn pin_to_cpu0() -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it, and sched_setaffinity
    // reads exactly size_of::<cpu_set_t>() bytes of it.
    #[allow(unsafe_code)]
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot pin the process to CPU 0");
    }
    Ok(())
}

fn backend_mac(i: u32) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, i as u8]
}

/// A 74-byte TCP SYN as a Linux client sends it: 20 bytes of options (MSS, SACK permitted,
/// timestamps, NOP, window scale).
fn tcp_syn(dst: Ipv4Addr, dport: u16) -> Frame {
    let mut f = Frame::tcp(CLIENT, SPORT, dst, dport);
    // MSS 1460 | SACK permitted | timestamps | NOP | window scale 7.
    f.payload = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 3, 3, 7];
    f
}

/// Builds a SYN whose options count as TCP header (data offset 10), not as payload.
fn build_syn(f: &Frame) -> Vec<u8> {
    let mut bytes = f.build();
    bytes[f.l4_offset() + 12] = 0xa0;
    bytes
}

/// A 74-byte UDP datagram (32 bytes of payload).
fn udp_datagram(dst: Ipv4Addr, dport: u16) -> Frame {
    let mut f = Frame::udp(CLIENT, SPORT, dst, dport);
    f.payload = vec![0x5a; FRAME_LEN - 14 - 20 - 8];
    f
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        _ => "?",
    }
}

/// What the output frame must be.
enum Output {
    /// The input, untouched.
    Same,
    /// The Ethernet addresses swapped. The swap undoes itself when run again: after an even
    /// number of runs the frame is the input again.
    MacsSwapped,
    /// L2 DSR: destination MAC one of the backends', source MAC the balancer's, every byte
    /// after the 12 MAC bytes untouched.
    Forwarded,
}

struct Case {
    name: &'static str,
    program: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    output: Output,
    /// The balancer's reason counter this case must move, once per run; None for the baselines.
    reason: Option<Reason>,
    /// Kernel-reported ns per run, one per round.
    samples: Vec<u64>,
}

impl Case {
    /// Whether `out` is what the program must leave after `runs` runs on the case's frame.
    fn output_ok(&self, out: &[u8], runs: u32) -> bool {
        let input = &self.frame;
        if out.len() != input.len() || out[12..] != input[12..] {
            return false;
        }
        match self.output {
            Output::Same => out[..12] == input[..12],
            Output::MacsSwapped if runs.is_multiple_of(2) => out[..12] == input[..12],
            Output::MacsSwapped => out[..6] == input[6..12] && out[6..12] == input[..6],
            Output::Forwarded => (0..BACKENDS).any(|i| out[..6] == backend_mac(i)) && out[6..12] == LB_MAC,
        }
    }
}

/// One BPF_PROG_TEST_RUN: the verdict, the kernel's ns per run and the output frame.
///
/// Only the kernel's figure is usable: it leaves out the time the task was rescheduled, and a
/// wall clock around the syscall also counts the kernel's set-up of every call (for XDP with
/// repeat > 1 it updates the XDP dispatcher): ~14 ms a call measured here, ~140 ns a run at
/// 100,000 runs, against ~21 ns for the empty program.
fn test_run(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<(u32, u64, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let result = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    // aya 0.14 hands over the kernel's `attr.test.duration` unchanged, and the kernel
    // (bpf_test_timer_leave) stores there the time spent divided by the number of runs: the
    // duration already IS the average ns per run (truncated to whole ns), not a total.
    Ok((result.return_value, result.duration.as_nanos() as u64, out))
}

/// Runs `case` `repeat` times and checks the verdict, the output frame and, for the balancer,
/// that exactly the expected reason counter moved, by `repeat` frames.
fn run_checked(dp: &mut Dataplane, case: &Case, repeat: u32) -> Result<u64> {
    let before = if case.reason.is_some() { Some(dp.reason_counters()?) } else { None };
    let (verdict, ns, out) = test_run(dp.program(case.program)?, &case.frame, repeat)?;
    ensure!(
        verdict == case.verdict,
        "case {:?}: verdict {} ({verdict}), expected {}",
        case.name,
        verdict_name(verdict),
        verdict_name(case.verdict)
    );
    ensure!(
        case.output_ok(&out, repeat),
        "case {:?}: unexpected output frame after {repeat} run(s)\n  in  {:02x?}\n  out {out:02x?}",
        case.name,
        case.frame
    );
    if let (Some(reason), Some(before)) = (case.reason, before) {
        let after = dp.reason_counters()?;
        for ((r, b), (_, a)) in before.iter().zip(&after) {
            let moved = a.packets - b.packets;
            let want = if *r == reason { u64::from(repeat) } else { 0 };
            ensure!(
                moved == want,
                "case {:?}: counter {} moved by {moved} in {repeat} run(s), expected {want}",
                case.name,
                r.name()
            );
        }
    }
    Ok(ns)
}

fn median(values: &[u64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
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

struct Machine {
    kernel: String,
    cpu: String,
    cores: i64,
    /// 1-minute load average: other work on the machine shows in the figures.
    loadavg: String,
}

fn machine() -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string());
    // Online CPUs of the machine; available_parallelism would say 1 once the process is pinned.
    // SAFETY: sysconf only reads a system value.
    #[allow(unsafe_code)]
    let cores = i64::from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as i32);
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    Machine { kernel, cpu, cores, loadavg }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.3}"),
        _ => "null".into(),
    }
}

/// Where the JSON goes: `<target dir>/bench`, the target directory being the one this binary
/// was built into (target/release/xlb-bench), else `target` under the current directory.
fn bench_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).or_else(|| {
        let exe = std::env::current_exe().ok()?;
        let profile_dir = exe.parent()?;
        let target = profile_dir.parent()?;
        (target.file_name()? == "target").then(|| target.to_path_buf())
    });
    target.unwrap_or_else(|| PathBuf::from("target")).join("bench")
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let machine = machine();
    pin_to_cpu0()?;

    // Room for the two services' tables, each with its two copies.
    let mut dp = Dataplane::load(&LoadOptions {
        hash_seed: SEED,
        iface_mac: LB_MAC,
        maglev_capacity: 4 * TABLE,
        flow_table_size: 1 << 16,
    })
    .context("cannot load the data path (run as root: cargo xtask bench)")?;
    dp.set_settings(lb_common::Settings { udp_idle_ns: 30_000_000_000, ..Default::default() })?;
    let mut members = Vec::new();
    for i in 0..BACKENDS {
        let addr = Ipv4Addr::new(10, 99, 0, 11 + i as u8);
        dp.set_backend(i, addr.into(), Some(backend_mac(i)), true)?;
        members.push(Member { id: i, key: u64::from(u32::from(addr)), weight: 1 });
    }
    let table = maglev::build(&members, TABLE);
    for (id, (port, proto)) in [(TCP_PORT, IPPROTO_TCP), (UDP_PORT, IPPROTO_UDP)].into_iter().enumerate() {
        let mut slot = dp.add_service(VIP.into(), port, proto, id as u32, TABLE, lb_agent::config::Forward::L2)?;
        dp.publish_table(&mut slot, &table)?;
    }

    // The baselines run on the same SYN as the non-VIP case; they never look past the MACs.
    let non_vip = build_syn(&tcp_syn(NON_VIP, TCP_PORT));
    let syn_bytes = non_vip.clone();
    let hit_tcp_bytes = build_syn(&tcp_syn(VIP, TCP_PORT));
    let hit_udp_bytes = udp_datagram(VIP, UDP_PORT).build();
    let unknown = build_syn(&tcp_syn(VIP, UNKNOWN_PORT));
    for f in [&non_vip, &hit_tcp_bytes, &hit_udp_bytes, &unknown] {
        ensure!(f.len() == FRAME_LEN, "test frame of {} bytes, expected {FRAME_LEN}", f.len());
    }

    let case = |name, program, frame: &Vec<u8>, verdict, output, reason| Case {
        name,
        program,
        frame: frame.clone(),
        verdict,
        output,
        reason,
        samples: Vec::new(),
    };
    // The balancer's L2 rewrite is idempotent (the second run writes the same MACs again and takes
    // the same path), so repeat > 1 on one buffer measures the named path on every run. The MAC
    // swap undoes itself on every other run, but each run does the same work either way.
    let mut cases = vec![
        case("empty", program_names::PASS, &syn_bytes, XDP_PASS, Output::Same, None),
        case("mac-swap", program_names::MAC_SWAP, &syn_bytes, XDP_TX, Output::MacsSwapped, None),
        case("non-vip pass", program_names::BALANCER, &non_vip, XDP_PASS, Output::Same, Some(Reason::PassNotVip)),
        case(
            "vip hit tcp (l2 dsr)",
            program_names::BALANCER,
            &hit_tcp_bytes,
            XDP_TX,
            Output::Forwarded,
            Some(Reason::TxForwarded),
        ),
        case(
            "vip hit udp",
            program_names::BALANCER,
            &hit_udp_bytes,
            XDP_TX,
            Output::Forwarded,
            Some(Reason::TxForwarded),
        ),
        case(
            "vip unknown port (drop)",
            program_names::BALANCER,
            &unknown,
            XDP_DROP,
            Output::Same,
            Some(Reason::DropUnknownService),
        ),
    ];

    // Load every program and check every case once before any timing.
    let mut stats = Vec::new();
    for c in &cases {
        stats.push(prog_stats(&mut dp, c.program)?);
        run_checked(&mut dp, c, 1)?;
    }

    eprintln!(
        "xlb-bench: {} cases × {} rounds × {} runs, pinned to CPU 0 (setup {:.1?})",
        cases.len(),
        args.rounds,
        args.repeat,
        started.elapsed()
    );
    for round in 0..args.rounds {
        for c in cases.iter_mut() {
            let ns = run_checked(&mut dp, c, args.repeat)?;
            c.samples.push(ns);
        }
        eprintln!(
            "xlb-bench: round {}/{}: {}",
            round + 1,
            args.rounds,
            cases.iter().map(|c| format!("{} {} ns", c.name, c.samples[round])).collect::<Vec<_>>().join(", ")
        );
    }

    let medians: Vec<f64> = cases.iter().map(|c| median(&c.samples)).collect();
    let empty = medians[0];
    let mac_swap = medians[1];
    let minus_empty: Vec<f64> = medians.iter().map(|m| m - empty).collect();
    // Whole figures, not net ones: the mac-swap's net cost is a nanosecond or two, in whole ns,
    // so a ratio of net figures would mostly measure the rounding.
    let div_mac_swap: Vec<Option<f64>> = medians.iter().map(|&m| (mac_swap > 0.0).then(|| m / mac_swap)).collect();
    let unix_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());

    // Markdown.
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Per-packet cost, BPF_PROG_TEST_RUN on a {FRAME_LEN}-byte frame, median of {} rounds × {} runs (CPU 0)\n",
        args.rounds, args.repeat
    );
    let _ = writeln!(md, "| case | ns/packet (median) | − empty | ÷ mac-swap | instructions |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (i, c) in cases.iter().enumerate() {
        let ratio = div_mac_swap[i].map_or_else(|| "—".to_string(), |r| format!("{r:.2}"));
        let insns = stats[i].instructions.map_or_else(|| "?".to_string(), |n| n.to_string());
        let _ = writeln!(md, "| {} | {:.1} | {:.1} | {ratio} | {insns} |", c.name, medians[i], minus_empty[i]);
    }
    let _ = writeln!(
        md,
        "\nns/packet: the kernel's average per run (whole ns), harness included. − empty: net of the empty \
         program, i.e. of the harness. ÷ mac-swap: ns/packet over the mac-swap's. instructions: of the whole \
         program after the verifier (xlated bytes / 8), not of the path."
    );
    let _ = writeln!(
        md,
        "machine: kernel {}, CPU {}, {} cores, load average {} at start; total {:.1?}",
        machine.kernel,
        machine.cpu,
        machine.cores,
        machine.loadavg,
        started.elapsed()
    );
    print!("{md}");

    // JSON, formatted by hand: it is small and flat.
    let mut json = String::new();
    let _ = writeln!(json, "{{");
    let _ = writeln!(json, "  \"bench\": \"pkt-cost\",");
    let _ = writeln!(json, "  \"unix_time\": {unix_time},");
    let _ = writeln!(
        json,
        "  \"machine\": {{\"kernel\": {}, \"cpu\": {}, \"cores\": {}, \"pinned_cpu\": 0, \"loadavg_1m\": {}}},",
        json_str(&machine.kernel),
        json_str(&machine.cpu),
        machine.cores,
        json_str(&machine.loadavg)
    );
    let _ = writeln!(json, "  \"quick\": {},", args.quick);
    let _ = writeln!(json, "  \"repeat\": {},", args.repeat);
    let _ = writeln!(json, "  \"rounds\": {},", args.rounds);
    let _ = writeln!(json, "  \"frame_bytes\": {FRAME_LEN},");
    let _ = writeln!(json, "  \"cases\": [");
    for (i, c) in cases.iter().enumerate() {
        let samples = c.samples.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        let _ = write!(
            json,
            "    {{\"case\": {}, \"program\": {}, \"verdict\": {}, \"ns_per_packet_median\": {}, \
             \"minus_empty\": {}, \"div_mac_swap\": {}, \"instructions\": {}, \"jited_bytes\": {}, \
             \"ns_per_packet_rounds\": [{samples}]}}",
            json_str(c.name),
            json_str(c.program),
            json_str(verdict_name(c.verdict)),
            json_num(Some(medians[i])),
            json_num(Some(minus_empty[i])),
            json_num(div_mac_swap[i]),
            stats[i].instructions.map_or_else(|| "null".to_string(), |n| n.to_string()),
            stats[i].jited_bytes,
        );
        let _ = writeln!(json, "{}", if i + 1 < cases.len() { "," } else { "" });
    }
    let _ = writeln!(json, "  ]");
    let _ = writeln!(json, "}}");

    let dir = bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stamped = dir.join(format!("pkt-cost-{unix_time}.json"));
    let latest = dir.join("pkt-cost-latest.json");
    for path in [&stamped, &latest] {
        std::fs::write(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("\nresults: {} (and {})", stamped.display(), latest.display());
    Ok(())
}
