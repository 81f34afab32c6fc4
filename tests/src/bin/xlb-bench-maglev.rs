//! `cargo xtask bench`, Maglev and agent part: what the control plane costs.
//!
//! 1. Maglev quality, in userspace with `lb_agent::tables::maglev::build` (no root needed): build time
//!    (median of several builds), memory (the table, 4 bytes an entry, and the builder's peak
//!    allocation on top of it, measured by a counting global allocator), balance (max/mean and
//!    min/mean entries per backend) and disruption (entries that change owner when one backend,
//!    or 10% of them, go away, against the ideal: only the departed backends' own entries).
//! 2. The agent at scale (root: it loads the data path's maps): the memory of its state for many
//!    services × backends, and the time from a config change to the maps being updated
//!    (`Config::parse` + `Agent::reload`), plus how publishing a table scales with its size:
//!    `Dataplane::publish_table` against one BPF_MAP_UPDATE_ELEM per entry and one
//!    BPF_MAP_UPDATE_BATCH, both written straight to a spare region of the MAGLEV map.
//!
//! Prints markdown tables on stdout and writes the same data as JSON to
//! `target/bench/maglev-<unix time>.json` and `target/bench/maglev-latest.json`.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashSet,
    fmt::Write as _,
    net::Ipv4Addr,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context as _, Result};
use lb_agent::{
    agent::Agent,
    config::Config,
    dataplane::{Dataplane, LoadOptions},
    tables::maglev::{self, Member},
};
use lb_common::limits::{DEFAULT_MAGLEV_SIZE, MAX_BACKENDS, MAX_MAGLEV_SIZE, MAX_SERVICES};
use xlb_tests::bench::{json_num, machine, machine_json, pin_to_cpu0, write_results, Machine};

/// Table sizes and backend counts of the userspace measurements.
const SIZES: [u32; 2] = [DEFAULT_MAGLEV_SIZE, MAX_MAGLEV_SIZE];
const COUNTS: [usize; 3] = [10, 100, 1000];
/// Table sizes of the publish measurement.
const PUBLISH_SIZES: [u32; 3] = [1021, DEFAULT_MAGLEV_SIZE, MAX_MAGLEV_SIZE];
/// Backends of the tables the publish measurement writes.
const PUBLISH_BACKENDS: usize = 100;

/// The paper's figures, printed beside ours: Eisenbud et al., "Maglev: A Fast and Reliable
/// Software Network Load Balancer", NSDI 2016. Only the balance rule is the paper's own words (as
/// others quote it); the build time is the figure and the disruption summary is from
/// memory of the paper's plot: both are to be checked against the paper.
const PAPER_BUILD: &str = "~1.8 ms at M = 65537 (as quoted in the issue; not re-checked against the paper's text)";
const PAPER_DISRUPTION: &str = "§5.3 plots the share of changed entries against k% of 1,000 backends failing at \
     once, for M = 65537 and 655373, the larger table changing fewer (a plot, no exact numbers; not re-checked)";
const PAPER_BALANCE: &str = "\"M is a prime number and M > 100 · N, which will ensure at most a 1% difference in hash \
     space assigned to backends\"";

// ---------------------------------------------------------------------------------------------
// A counting allocator: live heap bytes and their peak, to measure the builder's extra memory and
// the agent's state exactly (RSS only moves by pages, and the allocator keeps freed memory).

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

fn shrank(n: usize) {
    LIVE.fetch_sub(n, Relaxed);
}

// SAFETY: every call goes to the system allocator unchanged; the wrapper only counts bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds GlobalAlloc::alloc's contract, which System's shares.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for alloc.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for dealloc; new_size is the caller's, checked by the caller.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn heap_live() -> usize {
    LIVE.load(Relaxed)
}

/// Runs `f`; returns its value, the peak of live heap bytes above the start, and the bytes still
/// live at the end above the start.
fn with_peak<T>(f: impl FnOnce() -> T) -> (T, usize, isize) {
    let start = heap_live();
    PEAK.store(start, Relaxed);
    let value = f();
    let peak = PEAK.load(Relaxed).saturating_sub(start);
    (value, peak, heap_live() as isize - start as isize)
}

/// Hands the allocator's free memory back to the kernel, so that RSS shows what is live.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of glibc's allocator.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// VmRSS of this process, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

// ---------------------------------------------------------------------------------------------
// Arguments, machine, output helpers (as in xlb-bench).

/// Maglev table quality (userspace) and the agent's memory and reload latency at scale (root).
#[derive(clap::Parser, Debug)]
#[command(name = "xlb-bench-maglev")]
struct Cli {
    /// Fewer repetitions (under a minute).
    #[arg(long)]
    quick: bool,
    /// Timed builds per Maglev case (default 9, --quick 5); the median is reported.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    builds: Option<u64>,
    /// Only the userspace Maglev measurements (no root needed).
    #[arg(long)]
    no_agent: bool,
    /// Services of the agent measurement.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    services: u64,
    /// Backends per service of the agent measurement.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    backends: u64,
    /// Maglev table size (a prime) of every service in the agent measurement.
    #[arg(long, default_value_t = 1021)]
    agent_m: u32,
}

struct Args {
    quick: bool,
    builds: usize,
    agent: bool,
    services: usize,
    backends: usize,
    agent_m: u32,
}

fn parse_args() -> Result<Args> {
    let cli = <Cli as clap::Parser>::parse();
    let args = Args {
        quick: cli.quick,
        builds: usize::try_from(cli.builds.unwrap_or(if cli.quick { 5 } else { 9 }))?,
        agent: !cli.no_agent,
        services: usize::try_from(cli.services)?,
        backends: usize::try_from(cli.backends)?,
        agent_m: cli.agent_m,
    };
    ensure!(
        maglev::is_prime(args.agent_m) && args.agent_m <= MAX_MAGLEV_SIZE && args.agent_m as usize > args.backends,
        "--agent-m must be a prime up to {MAX_MAGLEV_SIZE} and above --backends"
    );
    Ok(args)
}

fn json_list(values: &[f64]) -> Vec<serde_json::Value> {
    values.iter().map(|&v| json_num(Some(v), 6)).collect()
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Part 1: Maglev tables in userspace.

/// `n` backends of weight 1 keyed like the agent keys them (the IPv4 address as a number), on
/// consecutive addresses 10.1.0.1, 10.1.0.2, ...
fn members(n: usize) -> Vec<Member> {
    let base = u32::from(Ipv4Addr::new(10, 1, 0, 0));
    (0..n).map(|i| Member { id: i as u32, key: u64::from(base + i as u32 + 1), weight: 1 }).collect()
}

/// A backend-set change and what it did to the table, as fractions of the table.
struct Disruption {
    /// Backends taken out.
    removed: usize,
    /// Entries whose owner changed.
    changed: f64,
    /// Entries the removed backends owned: they must move; the ideal is that nothing else does.
    ideal: f64,
}

impl Disruption {
    fn beyond(&self) -> f64 {
        self.changed - self.ideal
    }

    fn measure(before: &[u32], set: &[Member], removed: &HashSet<u32>, size: u32) -> Self {
        let survivors: Vec<Member> = set.iter().copied().filter(|m| !removed.contains(&m.id)).collect();
        let after = maglev::build(&survivors, size);
        let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let own = before.iter().filter(|id| removed.contains(id)).count();
        Disruption {
            removed: removed.len(),
            changed: changed as f64 / f64::from(size),
            ideal: own as f64 / f64::from(size),
        }
    }
}

struct MaglevCase {
    size: u32,
    backends: usize,
    skipped: Option<String>,
    build_ms: Vec<f64>,
    table_bytes: usize,
    /// The builder's peak of live heap above its start, minus the table it returns.
    peak_extra_bytes: usize,
    max_over_mean: f64,
    min_over_mean: f64,
    remove_one: Vec<Disruption>,
    fail_tenth: Vec<Disruption>,
}

fn maglev_case(size: u32, n: usize, args: &Args) -> MaglevCase {
    let set = members(n);
    let mut case = MaglevCase {
        size,
        backends: n,
        skipped: None,
        build_ms: Vec::new(),
        table_bytes: size as usize * 4,
        peak_extra_bytes: 0,
        max_over_mean: f64::NAN,
        min_over_mean: f64::NAN,
        remove_one: Vec::new(),
        fail_tenth: Vec::new(),
    };
    // First build: warm-up, and the memory measurement.
    let started = Instant::now();
    let (table, peak, _) = with_peak(|| maglev::build(&set, size));
    let first = started.elapsed();
    case.peak_extra_bytes = peak.saturating_sub(table.len() * 4);
    if args.quick && first > Duration::from_secs(1) {
        case.skipped = Some(format!("--quick: one build took {:.0} ms", ms(first)));
        return case;
    }
    for _ in 0..args.builds {
        let t = Instant::now();
        let built = maglev::build(&set, size);
        case.build_ms.push(ms(t.elapsed()));
        std::hint::black_box(&built);
    }

    let mut owned = vec![0u64; n];
    for &id in &table {
        owned[id as usize] += 1;
    }
    let avg = f64::from(size) / n as f64;
    case.max_over_mean = *owned.iter().max().unwrap_or(&0) as f64 / avg;
    case.min_over_mean = *owned.iter().min().unwrap_or(&0) as f64 / avg;

    // One backend removed, at spread-out positions of the canonical order.
    let removals = if args.quick { 2 } else { 5 };
    for r in 0..removals {
        let gone = set[(2 * r + 1) * n / (2 * removals)].id;
        case.remove_one.push(Disruption::measure(&table, &set, &HashSet::from([gone]), size));
    }
    // 10% failing at once, drawn at random (fixed seeds).
    let failing = n.div_ceil(10).max(1);
    let draws = if args.quick { 1 } else { 3 };
    for seed in 0..draws {
        let mut ids: Vec<u32> = set.iter().map(|m| m.id).collect();
        xlb_tests::rng::Rng::new(0x0bad_5eed + seed as u64).shuffle(&mut ids);
        let gone: HashSet<u32> = ids[..failing].iter().copied().collect();
        case.fail_tenth.push(Disruption::measure(&table, &set, &gone, size));
    }
    case
}

// ---------------------------------------------------------------------------------------------
// Part 2: the agent, with the kernel's maps.

#[derive(Clone, Copy)]
struct Scale {
    services: usize,
    backends: usize,
}

/// A change to the generated config.
#[derive(Clone, Copy, PartialEq)]
enum Change {
    None,
    /// Backend 0 of this service gets this weight.
    Weight(usize, u32),
    /// Every service gets one more backend.
    AddOneEach,
}

fn backend_addr(scale: Scale, service: usize, j: usize) -> Ipv4Addr {
    // Stride backends + 1: the backend AddOneEach adds has an address of its own too.
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    Ipv4Addr::from(base + (service * (scale.backends + 1) + j + 1) as u32)
}

/// The config as an operator would write it: every backend with its MAC (no neighbour lookups),
/// health checks off (the measurement is of the tables, not of probes).
fn config_text(scale: Scale, size: u32, change: Change) -> String {
    let mut t = String::with_capacity(scale.services * scale.backends * 80 + 4096);
    let capacity = scale.services as u64 * 2 * u64::from(size);
    let _ = writeln!(t, "interface = \"lo\"\nhash_seed = 7\nmaglev_capacity = {capacity}\n");
    let _ = writeln!(t, "[flows]\nsize = 1024\n\n[health]\nenabled = false\n");
    let vip_base = u32::from(Ipv4Addr::new(172, 16, 0, 0));
    for s in 0..scale.services {
        let vip = Ipv4Addr::from(vip_base + s as u32 + 1);
        let _ = writeln!(t, "[[service]]\nname = \"s{s}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"");
        let _ = writeln!(t, "maglev_size = {size}\n");
        let n = scale.backends + usize::from(change == Change::AddOneEach);
        for j in 0..n {
            let addr = backend_addr(scale, s, j);
            let [a, b, c, d] = addr.octets();
            let _ = writeln!(
                t,
                "[[service.backend]]\naddress = \"{addr}\"\nmac = \"02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}\""
            );
            if let Change::Weight(ws, w) = change {
                if ws == s && j == 0 {
                    let _ = writeln!(t, "weight = {w}");
                }
            }
            t.push('\n');
        }
    }
    t
}

fn parse(text: &str) -> Result<Config> {
    Config::parse(text).map_err(|e| {
        let first: Vec<String> = e.0.iter().take(3).map(ToString::to_string).collect();
        anyhow::anyhow!("generated config rejected: {}", first.join("; "))
    })
}

/// A BPF map of this process, from /proc/self/fdinfo.
struct MapMem {
    id: u64,
    map_type: u64,
    max_entries: u64,
    value_size: u64,
    /// The kernel's account of the map's memory (since 6.4 its actual usage).
    memlock: u64,
    fd: i32,
}

fn bpf_maps() -> Vec<MapMem> {
    let mut maps: Vec<MapMem> = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return maps };
    for entry in dir.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let is_map = std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else { continue };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let map = MapMem {
            id: field("map_id"),
            map_type: field("map_type"),
            max_entries: field("max_entries"),
            value_size: field("value_size"),
            memlock: field("memlock"),
            fd,
        };
        if maps.iter().all(|m| m.id != map.id) {
            maps.push(map);
        }
    }
    maps
}

const BPF_MAP_TYPE_ARRAY: u64 = 2;

/// The MAGLEV map among the process's maps: the largest array of u32 values.
fn maglev_map(maps: &[MapMem]) -> Option<&MapMem> {
    maps.iter().filter(|m| m.map_type == BPF_MAP_TYPE_ARRAY && m.value_size == 4).max_by_key(|m| m.max_entries)
}

fn map_bytes_per_entry(m: &MapMem) -> f64 {
    m.memlock as f64 / m.max_entries.max(1) as f64
}

/// bpf(2) with `attr` (a prefix of `union bpf_attr`).
fn bpf<T>(cmd: libc::c_long, attr: &mut T, what: &str) -> Result<()> {
    // SAFETY: attr is a valid bpf_attr prefix of the size passed; the pointers inside it are the
    // caller's, valid for the call (see update_each).
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

/// One BPF_MAP_UPDATE_ELEM per entry, at keys base, base + 1, ...: how the agent published a
/// table before it switched to batches.
fn update_each(fd: i32, base: u32, values: &[u32]) -> Result<()> {
    /// The map element member of `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    for (i, value) in values.iter().enumerate() {
        let key = base + i as u32;
        let mut attr = ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: value as *const u32 as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr, "BPF_MAP_UPDATE_ELEM")?;
    }
    Ok(())
}

struct ReloadSample {
    parse_ms: f64,
    reload_ms: f64,
}

fn sample_json(samples: &[ReloadSample]) -> serde_json::Value {
    let parse: Vec<f64> = samples.iter().map(|s| s.parse_ms).collect();
    let reload: Vec<f64> = samples.iter().map(|s| s.reload_ms).collect();
    serde_json::json!({
        "parse_ms": json_list(&parse),
        "reload_ms": json_list(&reload),
        "parse_ms_median": json_num(Some(median(&parse)), 6),
        "reload_ms_median": json_num(Some(median(&reload)), 6),
    })
}

fn timed_reload(agent: &mut Agent, scale: Scale, size: u32, change: Change) -> Result<ReloadSample> {
    let text = config_text(scale, size, change);
    let t = Instant::now();
    let config = parse(&text)?;
    let parse_ms = ms(t.elapsed());
    let t = Instant::now();
    agent.reload(&config).context("Agent::reload")?;
    Ok(ReloadSample { parse_ms, reload_ms: ms(t.elapsed()) })
}

struct AgentRun {
    scale: Scale,
    size: u32,
    config_bytes: usize,
    parse_ms: f64,
    /// Live heap of the parsed Config.
    config_heap: isize,
    load_ms: f64,
    new_ms: f64,
    rss_before_load: u64,
    rss_after_load: u64,
    rss_after_agent: u64,
    /// Live heap the Agent owns (its copy of the config, services, backends, slots).
    agent_heap: isize,
    /// Peak of live heap during Agent::new, above its start.
    agent_peak: usize,
    maps: Vec<MapMem>,
    weight: Vec<ReloadSample>,
    add: Vec<ReloadSample>,
    remove: Vec<ReloadSample>,
    add_skipped: Option<String>,
}

fn agent_run(scale: Scale, size: u32, args: &Args) -> Result<AgentRun> {
    let text = config_text(scale, size, Change::None);
    let t = Instant::now();
    let (config, _, config_heap) = with_peak(|| parse(&text));
    let parse_ms = ms(t.elapsed());
    let config = config?;
    let config_bytes = text.len();
    drop(text);

    trim_heap();
    let rss_before_load = rss_bytes();
    let t = Instant::now();
    let dataplane = Dataplane::load(&LoadOptions {
        hash_seed: config.hash_seed,
        iface_mac: [0x02, 0, 0, 0, 0, 1],
        maglev_capacity: config.maglev_capacity,
        flow_table_size: config.flows.size,
    })
    .context("cannot load the data path (run as root, or pass --no-agent)")?;
    let load_ms = ms(t.elapsed());
    trim_heap();
    let rss_after_load = rss_bytes();

    let t = Instant::now();
    let (agent, agent_peak, agent_heap) = with_peak(|| Agent::new(dataplane, &config, None));
    let new_ms = ms(t.elapsed());
    let mut agent = agent.context("Agent::new")?;
    trim_heap();
    let rss_after_agent = rss_bytes();
    let maps = bpf_maps();

    let mut run = AgentRun {
        scale,
        size,
        config_bytes,
        parse_ms,
        config_heap,
        load_ms,
        new_ms,
        rss_before_load,
        rss_after_load,
        rss_after_agent,
        agent_heap,
        agent_peak,
        maps,
        weight: Vec::new(),
        add: Vec::new(),
        remove: Vec::new(),
        add_skipped: None,
    };

    // Time from a config change to the maps being updated: parse + reload.
    let timed_reload = |agent: &mut Agent, change: Change| timed_reload(agent, scale, size, change);
    let reps = if args.quick { 2 } else { 5 };
    let target = scale.services / 2;
    for r in 0..reps {
        // Alternate 2, 1, 2, ...: every reload is a change.
        let weight = if r % 2 == 0 { 2 } else { 1 };
        run.weight.push(timed_reload(&mut agent, Change::Weight(target, weight))?);
    }
    if reps % 2 == 1 {
        timed_reload(&mut agent, Change::None)?; // back to the base config
    }
    if scale.services * (scale.backends + 1) > MAX_BACKENDS as usize {
        run.add_skipped =
            Some(format!("{} × {} backends exceed MAX_BACKENDS = {MAX_BACKENDS}", scale.services, scale.backends + 1));
    } else {
        let reps = if args.quick { 1 } else { 3 };
        for _ in 0..reps {
            run.add.push(timed_reload(&mut agent, Change::AddOneEach)?);
            run.remove.push(timed_reload(&mut agent, Change::None)?);
        }
    }
    drop(agent);
    Ok(run)
}

struct PublishRow {
    size: u32,
    build_ms: f64,
    /// Dataplane::publish_table, as the agent does it.
    publish_ms: Vec<f64>,
    /// The same entries written straight to a spare region of the MAGLEV map, one
    /// BPF_MAP_UPDATE_ELEM per entry: how tables were written before publish_table batched them.
    each_ms: Vec<f64>,
    raw_error: Option<String>,
}

/// Publishes one table of each size into its own service, and writes the same entries straight
/// into a spare region of the MAGLEV map (which no service points at), one syscall per entry.
fn publish_scaling(args: &Args) -> Result<Vec<PublishRow>> {
    let tables: u64 = PUBLISH_SIZES.iter().map(|&m| 2 * u64::from(m)).sum();
    let spare = u64::from(*PUBLISH_SIZES.iter().max().unwrap_or(&0));
    let capacity = u32::try_from(tables + spare).context("MAGLEV capacity")?;
    let mut dp = Dataplane::load(&LoadOptions {
        hash_seed: 7,
        iface_mac: [0x02, 0, 0, 0, 0, 1],
        maglev_capacity: capacity,
        flow_table_size: 1024,
    })
    .context("cannot load the data path (run as root, or pass --no-agent)")?;
    let set = members(PUBLISH_BACKENDS);
    for m in &set {
        dp.set_backend(m.id, Ipv4Addr::from(m.key as u32).into(), Some([2, 0, 0, 0, 0, 1]), true)?;
    }
    let maglev_fd = bpf_maps()
        .into_iter()
        .find(|m| m.map_type == BPF_MAP_TYPE_ARRAY && m.value_size == 4 && m.max_entries == u64::from(capacity))
        .map(|m| m.fd);
    let reps = if args.quick { 2 } else { 5 };
    let mut rows = Vec::new();
    for (i, &size) in PUBLISH_SIZES.iter().enumerate() {
        let mut builds = Vec::new();
        let mut table = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            table = maglev::build(&set, size);
            builds.push(ms(t.elapsed()));
        }
        let mut slot = dp.add_service(
            Ipv4Addr::new(172, 31, 0, 1).into(),
            8000 + i as u16,
            lb_common::IPPROTO_TCP,
            i as u32,
            size,
            lb_agent::config::Forward::L2,
        )?;
        let mut row = PublishRow {
            size,
            build_ms: median(&builds),
            publish_ms: Vec::new(),
            each_ms: Vec::new(),
            raw_error: None,
        };
        for _ in 0..reps {
            let t = Instant::now();
            dp.publish_table(&mut slot, &table)?;
            row.publish_ms.push(ms(t.elapsed()));
        }
        match maglev_fd {
            Some(fd) => {
                let base = tables as u32;
                let result = (0..reps).try_for_each(|_| {
                    let t = Instant::now();
                    update_each(fd, base, &table)?;
                    row.each_ms.push(ms(t.elapsed()));
                    anyhow::Ok(())
                });
                row.raw_error = result.err().map(|e| format!("{e:#}"));
            }
            None => row.raw_error = Some("MAGLEV map fd not found".into()),
        }
        rows.push(row);
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let machine = machine();
    if args.agent {
        // SAFETY: geteuid has no preconditions.
        #[allow(unsafe_code)]
        let euid = unsafe { libc::geteuid() };
        ensure!(euid == 0, "the agent measurement loads BPF maps: run as root, or pass --no-agent");
    }
    pin_to_cpu0()?;

    // Part 1.
    let mut cases = Vec::new();
    for &size in &SIZES {
        for &n in &COUNTS {
            let case = maglev_case(size, n, &args);
            eprintln!(
                "xlb-bench-maglev: M = {size}, {n} backends: build {:.2} ms (median of {}){}",
                median(&case.build_ms),
                case.build_ms.len(),
                case.skipped.as_deref().map(|s| format!(", skipped: {s}")).unwrap_or_default()
            );
            cases.push(case);
        }
    }

    // Part 2.
    let requested = Scale { services: args.services, backends: args.backends };
    let mut scales = Vec::new();
    let mut limit_note = None;
    if args.agent {
        let fits = |s: Scale| s.services <= MAX_SERVICES as usize && s.services * s.backends <= MAX_BACKENDS as usize;
        if fits(requested) {
            scales.push(requested);
        } else {
            let max = MAX_BACKENDS as usize;
            let services = requested.services.min(MAX_SERVICES as usize);
            let note = format!(
                "{} services × {} backends = {} backends do not fit MAX_BACKENDS = {max} (lb_common::limits); \
                 raise it to at least {} (plus headroom for reloads that add backends) to run the requested scale",
                requested.services,
                requested.backends,
                requested.services * requested.backends,
                requested.services * requested.backends
            );
            eprintln!("xlb-bench-maglev: {note}");
            limit_note = Some(note);
            // The largest that fits, both ways, keeping room for the reload that adds one backend each.
            if max / services > 1 {
                scales.push(Scale { services, backends: (max / services - 1).min(requested.backends) });
            }
            scales
                .push(Scale { services: (max / (requested.backends + 1)).min(services), backends: requested.backends });
        }
    }
    let mut runs = Vec::new();
    for &scale in &scales {
        eprintln!(
            "xlb-bench-maglev: agent with {} services × {} backends, M = {} ...",
            scale.services, scale.backends, args.agent_m
        );
        let run = agent_run(scale, args.agent_m, &args)?;
        eprintln!(
            "xlb-bench-maglev: Agent::new {:.0} ms, weight reload {:.1} ms (+ parse {:.0} ms)",
            run.new_ms,
            median(&run.weight.iter().map(|s| s.reload_ms).collect::<Vec<_>>()),
            median(&run.weight.iter().map(|s| s.parse_ms).collect::<Vec<_>>())
        );
        runs.push(run);
        trim_heap();
    }
    let publish = if args.agent { publish_scaling(&args)? } else { Vec::new() };

    let unix_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let md = markdown(&args, &machine, &cases, &runs, &publish, limit_note.as_deref(), started.elapsed());
    print!("{md}");
    let json = to_json(&args, &machine, unix_time, &cases, &runs, &publish, limit_note.as_deref());
    let (stamped, latest) = write_results("maglev", unix_time, &json)?;
    println!("\nresults: {} (and {})", stamped.display(), latest.display());
    Ok(())
}

fn pct(f: f64) -> String {
    if f.is_finite() {
        format!("{:.3}%", 100.0 * f)
    } else {
        "—".into()
    }
}

fn markdown(
    args: &Args,
    machine: &Machine,
    cases: &[MaglevCase],
    runs: &[AgentRun],
    publish: &[PublishRow],
    limit_note: Option<&str>,
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Maglev table build, userspace (lb_agent::tables::maglev::build, release), median of {} builds\n",
        args.builds
    );
    let _ = writeln!(
        md,
        "| M | backends | build ms (median) | min–max ms | table bytes (4·M) | builder peak extra bytes |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|");
    for c in cases {
        if let Some(why) = &c.skipped {
            let _ = writeln!(
                md,
                "| {} | {} | skipped: {why} | | {} | {} |",
                c.size, c.backends, c.table_bytes, c.peak_extra_bytes
            );
            continue;
        }
        let lo = c.build_ms.iter().copied().fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.2}–{:.2} | {} | {} |",
            c.size,
            c.backends,
            median(&c.build_ms),
            lo,
            max(&c.build_ms),
            c.table_bytes,
            c.peak_extra_bytes
        );
    }
    let _ = writeln!(md, "\npaper: {PAPER_BUILD}\n");

    let _ = writeln!(md, "Balance and disruption (fractions of the M entries; beyond = changed − ideal, the entries of surviving backends that moved)\n");
    let _ = writeln!(
        md,
        "| M | N | max/mean | min/mean | remove 1: changed | ideal (its own) | beyond (mean) | beyond (max) | 10% fail: changed | ideal | beyond |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cases.iter().filter(|c| c.skipped.is_none()) {
        let one_changed: Vec<f64> = c.remove_one.iter().map(|d| d.changed).collect();
        let one_ideal: Vec<f64> = c.remove_one.iter().map(|d| d.ideal).collect();
        let one_beyond: Vec<f64> = c.remove_one.iter().map(Disruption::beyond).collect();
        let tenth_changed: Vec<f64> = c.fail_tenth.iter().map(|d| d.changed).collect();
        let tenth_ideal: Vec<f64> = c.fail_tenth.iter().map(|d| d.ideal).collect();
        let tenth_beyond: Vec<f64> = c.fail_tenth.iter().map(Disruption::beyond).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {:.4} | {} | {} | {} | {} | {} | {} | {} |",
            c.size,
            c.backends,
            c.max_over_mean,
            c.min_over_mean,
            pct(mean(&one_changed)),
            pct(mean(&one_ideal)),
            pct(mean(&one_beyond)),
            pct(max(&one_beyond)),
            pct(mean(&tenth_changed)),
            pct(mean(&tenth_ideal)),
            pct(mean(&tenth_beyond)),
        );
    }
    let removals = cases.first().map_or(0, |c| c.remove_one.len());
    let draws = cases.first().map_or(0, |c| c.fail_tenth.len());
    let _ = writeln!(
        md,
        "\nremove 1: mean over {removals} removals at spread-out positions (max: the worst). 10% fail: ceil(N/10) \
         backends at once, mean over {draws} random draws. Equal weights; keys are consecutive IPv4 addresses as the \
         agent keys backends."
    );
    let _ = writeln!(md, "paper (balance): {PAPER_BALANCE}");
    let _ = writeln!(md, "paper (disruption): {PAPER_DISRUPTION}\n");

    if let Some(note) = limit_note {
        let _ = writeln!(md, "**limit:** {note}\n");
    }
    if !runs.is_empty() {
        let _ = writeln!(md, "Agent state (kernel maps loaded, not attached; health checks off)\n");
        let _ = writeln!(
            md,
            "| services × backends | M | config | Config::parse | Dataplane::load | Agent::new | agent heap | config heap | RSS Δ agent | RSS Δ load | RSS total | kernel maps (memlock) | of which MAGLEV |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in runs {
            let maps_total: u64 = r.maps.iter().map(|m| m.memlock).sum();
            let maglev_bytes = maglev_map(&r.maps).map_or(0, |m| m.memlock);
            let _ = writeln!(
                md,
                "| {} × {} | {} | {:.1} MiB | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} MiB | {:.2} MiB | {:.2} MiB | {:.2} MiB | {:.2} MiB | {:.2} MiB | {:.2} MiB |",
                r.scale.services,
                r.scale.backends,
                r.size,
                mib(r.config_bytes as f64),
                r.parse_ms,
                r.load_ms,
                r.new_ms,
                mib(r.agent_heap as f64),
                mib(r.config_heap as f64),
                mib(r.rss_after_agent as f64 - r.rss_after_load as f64),
                mib(r.rss_after_load as f64 - r.rss_before_load as f64),
                mib(r.rss_after_agent as f64),
                mib(maps_total as f64),
                mib(maglev_bytes as f64),
            );
        }
        let _ = writeln!(
            md,
            "\nagent heap: live heap bytes the Agent owns after Agent::new (counting allocator), its copy of the config \
             included; config heap: the parsed Config the caller holds. RSS: VmRSS after malloc_trim; Δ agent: \
             across Agent::new, Δ load: across Dataplane::load. Kernel maps: sum of the maps' memlock in \
             /proc/self/fdinfo (kernel memory, not in RSS).\n"
        );

        if let Some(m) = runs.first().and_then(|r| maglev_map(&r.maps)) {
            let _ = writeln!(
                md,
                "MAGLEV map: {} entries, {:.1} B of kernel memory each (the kernel rounds array values up to 8 B).\n",
                m.max_entries,
                map_bytes_per_entry(m)
            );
        }
        let _ = writeln!(md, "Config change → maps updated (Config::parse of the new text + Agent::reload; median)\n");
        let _ = writeln!(
            md,
            "| services × backends | change | tables republished | parse ms | reload ms | total ms | runs |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
        for r in runs {
            let label = format!("{} × {}", r.scale.services, r.scale.backends);
            let mut row = |change: &str, tables: usize, samples: &[ReloadSample]| {
                let p = median(&samples.iter().map(|s| s.parse_ms).collect::<Vec<_>>());
                let l = median(&samples.iter().map(|s| s.reload_ms).collect::<Vec<_>>());
                let _ = writeln!(
                    md,
                    "| {label} | {change} | {tables} | {p:.1} | {l:.1} | {:.1} | {} |",
                    p + l,
                    samples.len()
                );
            };
            row("one backend's weight, one service", 1, &r.weight);
            if let Some(why) = &r.add_skipped {
                let _ = writeln!(md, "| {label} | add a backend to every service | — | skipped: {why} | | | |");
            } else {
                row("add a backend to every service", r.scale.services, &r.add);
                row("remove it again", r.scale.services, &r.remove);
            }
        }
        let _ = writeln!(
            md,
            "\nreload: from the parsed config to the last service flipped to its new table (maps updated). \
             Reading the file (SIGHUP) comes on top: a few ms for these sizes.\n"
        );
    }

    if !publish.is_empty() {
        let _ = writeln!(
            md,
            "Publishing one table of {PUBLISH_BACKENDS} backends (median): Dataplane::publish_table as the agent \
             does it (write the inactive copy in one BPF_MAP_UPDATE_BATCH, flip), and the same entries written \
             straight to the MAGLEV map with one BPF_MAP_UPDATE_ELEM per entry\n"
        );
        let _ = writeln!(md, "| M | build ms | publish_table ms | ns/entry | per-entry syscalls ms | ns/entry |");
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|");
        for p in publish {
            let cell = |samples: &[f64]| {
                if samples.is_empty() {
                    "— | —".to_string()
                } else {
                    let m = median(samples);
                    format!("{m:.2} | {:.0}", m * 1e6 / f64::from(p.size))
                }
            };
            let _ = writeln!(md, "| {} | {:.2} | {} | {} |", p.size, p.build_ms, cell(&p.publish_ms), cell(&p.each_ms));
            if let Some(e) = &p.raw_error {
                let _ = writeln!(md, "\n(M = {}: direct writes failed: {e})\n", p.size);
            }
        }
        if let Some(default) = publish.iter().find(|p| p.size == DEFAULT_MAGLEV_SIZE) {
            let per_entry_ns = median(&default.publish_ms) * 1e6 / f64::from(default.size);
            let services = runs.first().map_or(args.services, |r| r.scale.services);
            // The kernel rounds an array map's values up to 8 bytes: a u32 entry costs 8.
            let entry_bytes = runs.first().and_then(|r| maglev_map(&r.maps)).map_or(8.0, map_bytes_per_entry);
            // Agent::new writes each service's empty table, then its first one.
            let entries = services as f64 * 2.0 * f64::from(DEFAULT_MAGLEV_SIZE);
            let start_s = entries * per_entry_ns / 1e9;
            let _ = writeln!(
                md,
                "\nAt the default M = {DEFAULT_MAGLEV_SIZE}, {services} services would need {:.0} MiB of MAGLEV map \
                 (2 copies × M entries each, {entry_bytes:.1} B of kernel memory an entry as measured) and about \
                 {start_s:.0} s of map writes at start (2 tables each at {per_entry_ns:.0} ns/entry).",
                mib(entries * entry_bytes)
            );
        }
    }
    let _ = writeln!(
        md,
        "\nmachine: kernel {}, CPU {}, {} cores, load average {} at start; pinned to CPU 0; {}total {:.1?}",
        machine.kernel,
        machine.cpu,
        machine.cores,
        machine.loadavg,
        if args.quick { "--quick; " } else { "" },
        elapsed
    );
    md
}

fn disruption_json(ds: &[Disruption]) -> Vec<serde_json::Value> {
    ds.iter()
        .map(|d| {
            serde_json::json!({
                "removed": d.removed,
                "changed": json_num(Some(d.changed), 6),
                "ideal": json_num(Some(d.ideal), 6),
                "beyond": json_num(Some(d.beyond()), 6),
            })
        })
        .collect()
}

fn to_json(
    args: &Args,
    machine: &Machine,
    unix_time: u64,
    cases: &[MaglevCase],
    runs: &[AgentRun],
    publish: &[PublishRow],
    limit_note: Option<&str>,
) -> serde_json::Value {
    let mut machine = machine_json(machine);
    machine["pinned_cpu"] = 0.into();
    let maglev: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "m": c.size,
                "backends": c.backends,
                "skipped": c.skipped,
                "build_ms_median": json_num(Some(median(&c.build_ms)), 6),
                "build_ms": json_list(&c.build_ms),
                "table_bytes": c.table_bytes,
                "builder_peak_extra_bytes": c.peak_extra_bytes,
                "max_over_mean": json_num(Some(c.max_over_mean), 6),
                "min_over_mean": json_num(Some(c.min_over_mean), 6),
                "remove_one": disruption_json(&c.remove_one),
                "fail_10pct": disruption_json(&c.fail_tenth),
            })
        })
        .collect();
    let agent: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            let maps: Vec<serde_json::Value> = r
                .maps
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "map_id": m.id,
                        "map_type": m.map_type,
                        "max_entries": m.max_entries,
                        "value_size": m.value_size,
                        "memlock": m.memlock,
                    })
                })
                .collect();
            serde_json::json!({
                "services": r.scale.services,
                "backends_per_service": r.scale.backends,
                "m": r.size,
                "config_bytes": r.config_bytes,
                "parse_ms": json_num(Some(r.parse_ms), 6),
                "config_heap_bytes": r.config_heap,
                "dataplane_load_ms": json_num(Some(r.load_ms), 6),
                "agent_new_ms": json_num(Some(r.new_ms), 6),
                "agent_heap_bytes": r.agent_heap,
                "agent_new_peak_heap_bytes": r.agent_peak,
                "rss_before_load": r.rss_before_load,
                "rss_after_load": r.rss_after_load,
                "rss_after_agent": r.rss_after_agent,
                "kernel_maps_memlock": r.maps.iter().map(|m| m.memlock).sum::<u64>(),
                "maglev_map_memlock": maglev_map(&r.maps).map_or(0, |m| m.memlock),
                "maglev_map_bytes_per_entry": json_num(maglev_map(&r.maps).map(map_bytes_per_entry), 6),
                "maps": maps,
                "reload_weight": sample_json(&r.weight),
                "reload_add_one_each": sample_json(&r.add),
                "reload_remove_one_each": sample_json(&r.remove),
                "add_skipped": r.add_skipped,
            })
        })
        .collect();
    let publish: Vec<serde_json::Value> = publish
        .iter()
        .map(|p| {
            serde_json::json!({
                "m": p.size,
                "backends": PUBLISH_BACKENDS,
                "build_ms_median": json_num(Some(p.build_ms), 6),
                "publish_ms_median": json_num(Some(median(&p.publish_ms)), 6),
                "publish_ms": json_list(&p.publish_ms),
                "publish_ns_per_entry": json_num(Some(median(&p.publish_ms) * 1e6 / f64::from(p.size)), 6),
                "update_each_ms_median": json_num((!p.each_ms.is_empty()).then(|| median(&p.each_ms)), 6),
                "update_each_ms": json_list(&p.each_ms),
                "raw_error": p.raw_error,
            })
        })
        .collect();
    serde_json::json!({
        "bench": "maglev",
        "unix_time": unix_time,
        "machine": machine,
        "quick": args.quick,
        "builds": args.builds,
        "paper": {"build": PAPER_BUILD, "balance": PAPER_BALANCE, "disruption": PAPER_DISRUPTION},
        "maglev": maglev,
        "max_backends": MAX_BACKENDS,
        "limit_note": limit_note,
        "agent": agent,
        "publish": publish,
    })
}
