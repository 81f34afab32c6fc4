//! Hitless restarts and upgrades: the agent pins its XDP link and its maps under
//! `--pin-dir/<interface>`; a crash (`kill -9`) leaves the data path forwarding, and the next
//! agent takes it over (same flow table, program swapped with bpf_link_update). Needs root.
//!
//! `ip netns exec` gives the agent a /sys of its own, without the host's bpffs: each test
//! mounts a private bpffs on a temporary directory (visible in the agent's mount namespace,
//! and outliving any agent), so pins of concurrent tests never meet.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use xlb_tests::{
    agent::{agent_binary, AgentProcess, TempDir},
    netns::Netns,
    scenario::{backend_name, config, vip, Scenario, METRICS, PORT},
    topology::{backend_addr, L2Bed, IFACE, VIP},
    traffic::{open_connections, Conn, Server},
};

const BACKENDS: usize = 3;
const LONG_LIVED: usize = 100;
/// The steady stream of short requests: one every 20 ms, at most this many.
const STREAM_EVERY: Duration = Duration::from_millis(20);
const STREAM_MAX: usize = 3000;

/// A bpf filesystem of our own, unmounted (its pins released) on drop.
struct BpfFs {
    dir: TempDir,
}

impl BpfFs {
    fn new() -> Self {
        let dir = TempDir::new("bpffs").unwrap();
        let target = std::ffi::CString::new(dir.0.to_str().unwrap()).unwrap();
        // SAFETY: mount(2) with NUL-terminated strings we own.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        assert_eq!(rc, 0, "mount -t bpf: {}", std::io::Error::last_os_error());
        Self { dir }
    }

    /// The agent's --pin-dir.
    fn pin_dir(&self) -> PathBuf {
        self.dir.0.join("xlb")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.0.to_str().unwrap()).unwrap();
        // SAFETY: umount2(2) on the directory we mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Nothing of ours left on the bpffs (the kernel's own `maps.debug` and `progs.debug` aside).
fn assert_no_pins(fs: &BpfFs) {
    let left: Vec<String> = listing(&fs.dir.0).into_iter().filter(|n| !n.ends_with(".debug")).collect();
    assert!(left.is_empty(), "pins left after a clean exit: {left:?}");
}

/// Names in a directory, sorted; empty when it does not exist.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn xdp_on(ns: &Netns, iface: &str) -> bool {
    let out = ns.exec(&["ip", "link", "show", iface]).unwrap();
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

/// The id of the XDP program attached to `iface` ("prog/xdp id N" in `ip link show`).
fn xdp_prog_id(ns: &Netns, iface: &str) -> u32 {
    let out = ns.exec(&["ip", "link", "show", iface]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = text.split("prog/xdp id ").nth(1).unwrap_or_else(|| panic!("no XDP program: {text}"));
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// The value of the sample named exactly `series` (name and labels).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

fn flow_hits(ns: &Netns) -> u64 {
    metric(&AgentProcess::scrape(ns, METRICS).unwrap(), "xlb_flow_events_total{event=\"hit\"}")
}

/// Every long-lived connection answers, from the backend it started on.
fn check_all(conns: &mut [Conn], when: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let now = c.ask().unwrap_or_else(|e| panic!("connection {i} to {} broke {when}: {e}", c.backend));
        assert_eq!(now, c.backend, "connection {i} moved {when}");
    }
}

/// Short TCP requests from the client, one every STREAM_EVERY, until stopped.
struct Stream {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Result<String, String>, Duration)>>,
}

impl Stream {
    fn start(client: &Netns, to: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = client
            .spawn(move || {
                let mut results = Vec::new();
                while !flag.load(Ordering::Relaxed) && results.len() < STREAM_MAX {
                    let start = Instant::now();
                    results.push((request(to), start.elapsed()));
                    std::thread::sleep(STREAM_EVERY.saturating_sub(start.elapsed()));
                }
                results
            })
            .unwrap();
        Self { stop, thread }
    }

    fn finish(self) -> Vec<(Result<String, String>, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Connect, read the backend's name, close.
fn request(to: SocketAddr) -> Result<String, String> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.kind().to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    let mut name = String::new();
    match BufReader::new(s).read_line(&mut name) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(name.trim().to_string()),
        Err(e) => Err(e.kind().to_string()),
    }
}

/// The "took over ... N ms after start" figure of an agent's log.
fn takeover_ms(log: &str) -> f64 {
    let line = log.lines().find(|l| l.contains("took over the pinned program")).unwrap_or_else(|| panic!("{log}"));
    let before = line.split(" ms after start").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn connections_and_requests_survive_kill_9_and_an_upgrade() {
    let fs = BpfFs::new();
    let pins = fs.pin_dir();
    let pin_arg = pins.to_str().unwrap().to_string();
    let bed = L2Bed::new(BACKENDS).expect("test bed");
    let servers = (0..BACKENDS)
        .map(|i| Server::start(&bed.backends[i], &backend_name(i), &[VIP.into()], PORT))
        .collect::<anyhow::Result<Vec<_>>>()
        .unwrap();
    let agent = AgentProcess::start(&bed.lb, &config(BACKENDS), &["--pin-dir", &pin_arg]).unwrap();
    let mut s = Scenario { agent, servers, bed };
    let iface_pins = pins.join(IFACE);
    let pinned = listing(&iface_pins);
    eprintln!("pinned under {}: {pinned:?}", iface_pins.display());
    for name in ["link", "FLOWS", "FLOW_STATS", "BACKENDS", "MAGLEV", "owner"] {
        assert!(pinned.iter().any(|p| p == name), "{name} not pinned: {pinned:?}");
    }

    let mut conns = open_connections(&s.bed.client, vip(), LONG_LIVED).expect("100 connections");
    let mut spread = BTreeMap::new();
    for c in &conns {
        *spread.entry(c.backend.clone()).or_insert(0) += 1;
    }
    eprintln!("long-lived connections per backend: {spread:?}");
    assert_eq!(spread.len(), BACKENDS, "{spread:?}");
    check_all(&mut conns, "before the crash");
    let hits_before = flow_hits(&s.bed.lb);

    let stream = Stream::start(&s.bed.client, vip());
    std::thread::sleep(Duration::from_millis(300));

    // A crash: the pinned link keeps the program attached, the maps stay.
    let first_prog = xdp_prog_id(&s.bed.lb, IFACE);
    s.agent.kill9().unwrap();
    assert_eq!(xdp_prog_id(&s.bed.lb, IFACE), first_prog, "the program went with the agent");
    assert_eq!(listing(&iface_pins), pinned, "pins changed with the crash");
    check_all(&mut conns, "with no agent running");
    std::thread::sleep(Duration::from_millis(500));

    // A new agent (same config) takes the data path over; this one keeps it on exit.
    let t0 = Instant::now();
    s.agent = AgentProcess::start(&s.bed.lb, &config(BACKENDS), &["--pin-dir", &pin_arg, "--keep-on-exit"]).unwrap();
    let start_to_ready = t0.elapsed();
    let log = s.agent.log_text();
    let takeover = takeover_ms(&log);
    eprintln!("second agent: took over {takeover} ms after its start; 'balancing' seen after {start_to_ready:?}");
    assert!(log.contains("adopting the data path pinned under"), "{log}");
    let second_prog = xdp_prog_id(&s.bed.lb, IFACE);
    assert_ne!(second_prog, first_prog, "the program was not replaced");
    check_all(&mut conns, "after the new agent took over");
    let hits_after_crash = flow_hits(&s.bed.lb);
    eprintln!("flow-table hits: {hits_before} before the crash, {hits_after_crash} after the restart");
    // Counters adopted, not reset: every ask above was a hit.
    assert!(hits_after_crash >= hits_before + 3 * LONG_LIVED as u64, "{hits_before} -> {hits_after_crash}");

    // An upgrade: stop with --keep-on-exit, start the next one.
    let log = s.agent.stop().unwrap();
    assert!(log.contains("left attached to eth0"), "{log}");
    assert!(xdp_on(&s.bed.lb, IFACE), "--keep-on-exit detached");
    assert!(listing(&iface_pins).iter().any(|p| p == "link"), "{:?}", listing(&iface_pins));
    check_all(&mut conns, "between the two agents of an upgrade");
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    s.agent = AgentProcess::start(&s.bed.lb, &config(BACKENDS), &["--pin-dir", &pin_arg]).unwrap();
    let start_to_ready_2 = t0.elapsed();
    let takeover_2 = takeover_ms(&s.agent.log_text());
    eprintln!("third agent: took over {takeover_2} ms after its start; 'balancing' seen after {start_to_ready_2:?}");
    assert_ne!(xdp_prog_id(&s.bed.lb, IFACE), second_prog, "the program was not replaced");
    check_all(&mut conns, "after the upgrade");
    let hits_after_upgrade = flow_hits(&s.bed.lb);
    assert!(
        hits_after_upgrade >= hits_after_crash + 2 * LONG_LIVED as u64,
        "{hits_after_crash} -> {hits_after_upgrade}"
    );
    std::thread::sleep(Duration::from_millis(300));

    let results = stream.finish();
    let failed: Vec<_> = results.iter().filter(|(r, _)| r.is_err()).collect();
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap_or_default();
    let mut per_backend = BTreeMap::new();
    for (r, _) in &results {
        *per_backend.entry(r.clone().unwrap_or_else(|e| format!("error: {e}"))).or_insert(0) += 1;
    }
    eprintln!(
        "short requests during the restarts: {} sent, {} failed, slowest {slowest:?}: {per_backend:?}",
        results.len(),
        failed.len()
    );
    assert!(results.len() >= 50, "the stream hardly ran: {}", results.len());
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    // A SYN lost while no program (or half a table) was in place costs a 1 s retransmission.
    assert!(slowest < Duration::from_secs(1), "a request took {slowest:?}: a SYN was lost");

    // A clean stop without --keep-on-exit: no program, no pins.
    let log = s.agent.stop().unwrap();
    assert!(log.contains("detached from eth0"), "{log}");
    assert!(!xdp_on(&s.bed.lb, IFACE), "XDP still attached after a clean exit");
    assert_no_pins(&fs);
}

/// A service whose backend has a fixed MAC and no health check: the agent needs no neighbour.
fn plain_config(interface: &str) -> String {
    format!(
        "interface = \"{interface}\"\n\n[[service]]\nvip = \"10.98.0.100\"\nport = 80\nprotocol = \"tcp\"\n\
         maglev_size = 251\n[service.health]\nenabled = false\n\n[[service.backend]]\naddress = \"10.98.0.11\"\n\
         mac = \"02:00:00:00:00:0b\"\n"
    )
}

fn veth_ns(role: &str) -> Netns {
    let ns = Netns::new(role).unwrap();
    ns.exec(&["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"]).unwrap();
    for dev in ["veth0", "veth1"] {
        ns.exec(&["ip", "link", "set", dev, "up"]).unwrap();
    }
    ns
}

/// `lb-agent run` with `config` in `ns` with `--pin-dir pins`, to completion: (exit code, stderr).
fn run_to_exit(ns: &Netns, pins: &str, config: &str) -> (Option<i32>, String) {
    let dir = TempDir::new("agent").unwrap();
    let path = dir.0.join("xlb.toml");
    std::fs::write(&path, config).unwrap();
    let socket = dir.0.join("agent.sock");
    let out = ns
        .command(agent_binary().unwrap().to_str().unwrap())
        .args(["run", "--config", path.to_str().unwrap(), "--api-socket", socket.to_str().unwrap()])
        .args(["--pin-dir", pins, "--state-file", dir.0.join("state.json").to_str().unwrap()])
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The pin directory's lock: one agent per interface. The state is tied to its network
/// namespace: an agent elsewhere with the same interface name cannot take it over.
#[test]
fn a_second_agent_is_refused_and_pins_belong_to_their_namespace() {
    let fs = BpfFs::new();
    let pins = fs.pin_dir();
    let pin_arg = pins.to_str().unwrap().to_string();
    let ns = veth_ns("dup");
    let mut first = AgentProcess::start(&ns, &plain_config("veth0"), &["--pin-dir", &pin_arg]).unwrap();

    let (code, stderr) = run_to_exit(&ns, &pin_arg, &plain_config("veth0"));
    eprintln!("second agent: {stderr}");
    assert_eq!(code, Some(1), "{stderr}");
    let expected = format!("another lb-agent (pid {}) is running on veth0", first.pid());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(xdp_on(&ns, "veth0"), "the refused agent touched the running one");
    assert!(first.log_text().contains("balancing"));

    // After a crash, an agent in another namespace with an interface of the same name may
    // not take over the link (it is not its interface).
    first.kill9().unwrap();
    let other = veth_ns("other");
    let (code, stderr) = run_to_exit(&other, &pin_arg, &plain_config("veth0"));
    eprintln!("agent in another namespace: {stderr}");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("in another network namespace"), "{stderr}");
    assert!(xdp_on(&ns, "veth0") && !xdp_on(&other, "veth0"));

    // The interface's own namespace takes it over, and a clean exit removes everything.
    let mut next = AgentProcess::start(&ns, &plain_config("veth0"), &["--pin-dir", &pin_arg]).unwrap();
    assert!(next.log_text().contains("took over the pinned program on veth0"), "{}", next.log_text());
    next.stop().unwrap();
    assert!(!xdp_on(&ns, "veth0"));
    assert_no_pins(&fs);
}

/// A start-up that fails leaves the running data path as it was; a restart with another flow
/// table size gets an empty flow table of that size, swapped in with its program.
#[test]
fn a_failed_start_changes_nothing_and_a_new_flow_table_size_is_taken() {
    let fs = BpfFs::new();
    let pins = fs.pin_dir();
    let pin_arg = pins.to_str().unwrap().to_string();
    let ns = veth_ns("size");
    let mut first = AgentProcess::start(&ns, &plain_config("veth0"), &["--pin-dir", &pin_arg]).unwrap();
    first.kill9().unwrap();
    let prog = xdp_prog_id(&ns, "veth0");
    let pinned = listing(&pins.join("veth0"));

    // Fails in Agent::new, after the pinned state was opened.
    let bad = plain_config("veth0")
        .replace("interface = \"veth0\"\n", "interface = \"veth0\"\negress_interfaces = [\"nosuch0\"]\n");
    let (code, stderr) = run_to_exit(&ns, &pin_arg, &bad);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("unknown egress interface \"nosuch0\""), "{stderr}");
    assert_eq!(xdp_prog_id(&ns, "veth0"), prog, "a failed start touched the program");
    assert_eq!(listing(&pins.join("veth0")), pinned, "a failed start touched the pins");

    let resized =
        plain_config("veth0").replace("interface = \"veth0\"\n", "interface = \"veth0\"\n[flows]\nsize = 4096\n");
    let mut next = AgentProcess::start(&ns, &resized, &["--pin-dir", &pin_arg]).unwrap();
    let log = next.log_text();
    assert!(log.contains("pinned map FLOWS does not fit"), "{log}");
    assert!(log.contains("took over the pinned program on veth0"), "{log}");
    assert_ne!(xdp_prog_id(&ns, "veth0"), prog);
    // A table per possible CPU, of its share.
    let flows = aya::maps::MapData::from_pin(pins.join("veth0").join("FLOWS")).unwrap();
    let flows: aya::maps::ArrayOfMaps<_, aya::maps::MapData> =
        aya::maps::ArrayOfMaps::try_from(aya::maps::Map::ArrayOfMaps(flows)).unwrap();
    let sizes: Vec<u32> =
        (0..flows.len()).map(|cpu| flows.get(&cpu, 0).unwrap().info().unwrap().max_entries()).collect();
    let cpus = sizes.len() as u32;
    assert!(cpus >= 1 && sizes.iter().all(|&n| n == 4096u32.div_ceil(cpus)), "{sizes:?}");
    assert_eq!(listing(&pins.join("veth0")), pinned, "staged pins left behind");
    next.stop().unwrap();
    assert!(!xdp_on(&ns, "veth0"));
    assert_no_pins(&fs);
}

/// What a new agent must not lose: with one backend dead and evicted, one added and one
/// drained through the control API, a `kill -9` and a new agent (sharing the state file)
/// change nothing for the clients: the dead one stays out (no retry of its `rise` checks with
/// clients on it), the API changes are made again on the file's config.
#[test]
fn health_and_runtime_changes_survive_kill_9() {
    let fs = BpfFs::new();
    let pin_arg = fs.pin_dir().to_str().unwrap().to_string();
    let state_dir = TempDir::new("state").unwrap();
    let state_file = state_dir.0.join("eth0.state.json");
    let state_arg = state_file.to_str().unwrap().to_string();
    let bed = L2Bed::new(BACKENDS + 1).expect("test bed");
    let mut servers: Vec<Server> = (0..=BACKENDS)
        .map(|i| Server::start(&bed.backends[i], &backend_name(i), &[VIP.into()], PORT))
        .collect::<anyhow::Result<Vec<_>>>()
        .unwrap();
    let args = ["--pin-dir", pin_arg.as_str(), "--state-file", state_arg.as_str()];
    // What is compared is the remembered state, not the checks' next verdicts: probes timing
    // out on a loaded CI machine (two in a row at 100 ms) would flip a live backend to down
    // right after a start. The dead backend's checks still fail at once (refused).
    let config = config(BACKENDS)
        .replace("interval_ms = 200\n", "interval_ms = 400\n")
        .replace("timeout_ms = 100\n", "timeout_ms = 400\n");
    assert!(config.contains("interval_ms = 400\n") && config.contains("timeout_ms = 400\n"));
    let mut agent = AgentProcess::start(&bed.lb, &config, &args).unwrap();

    // Backend 2 dies and is evicted (both services); backend 3 joins, backend 0 drains.
    let (dead, added, drained) =
        (backend_addr(2).to_string(), backend_addr(3).to_string(), backend_addr(0).to_string());
    servers[2].stop();
    agent.wait_for_count(&format!("backend {dead} DOWN"), 2, Duration::from_secs(10)).unwrap();
    for cmd in [["add-backend", "demo-tcp", &added], ["drain", "demo-tcp", &drained]] {
        let (ok, out, err) = agent.ctl(&cmd).unwrap();
        assert!(ok, "{cmd:?}: {out}{err}");
    }
    let before = agent.ctl(&["list"]).unwrap().1;

    let stream = Stream::start(&bed.client, vip());
    std::thread::sleep(Duration::from_millis(300));
    agent.kill9().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let mut agent = AgentProcess::start(&bed.lb, &config, &args).unwrap();
    eprintln!("new agent ready after {:?}", t0.elapsed());
    // Longer than fall + rise checks: a dead backend let back in would have failed requests.
    std::thread::sleep(Duration::from_millis(2000));
    let results = stream.finish();
    let failed: Vec<_> = results.iter().filter(|(r, _)| r.is_err()).collect();
    let mut per_backend = BTreeMap::new();
    for (r, _) in &results {
        *per_backend.entry(r.clone().unwrap_or_else(|e| format!("error: {e}"))).or_insert(0) += 1;
    }
    eprintln!("requests across the restart: {} sent, {} failed: {per_backend:?}", results.len(), failed.len());
    assert!(results.len() >= 50, "the stream hardly ran: {}", results.len());
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(!per_backend.contains_key(&backend_name(2)) && !per_backend.contains_key(&backend_name(0)));
    assert!(per_backend.contains_key(&backend_name(3)), "the added backend is still in: {per_backend:?}");

    let after = agent.ctl(&["list"]).unwrap().1;
    eprintln!("before:\n{before}\nafter:\n{after}");
    let state_of = |list: &str, addr: &str| -> Vec<String> {
        list.lines()
            .filter(|l| l.contains(addr))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
            .collect()
    };
    for addr in [&dead, &added, &drained] {
        assert_eq!(state_of(&before, addr), state_of(&after, addr), "{addr}:\n{before}\n{after}");
    }
    let log = agent.stop().unwrap();
    assert!(log.contains("runtime change kept"), "{log}");
    assert!(!log.contains(&format!("backend {dead} UP")), "the dead backend came back:\n{log}");

    // A cold start (the clean stop detached and removed the pins) from the same state file.
    let mut agent = AgentProcess::start(&bed.lb, &config, &args).unwrap();
    let cold = agent.ctl(&["list"]).unwrap().1;
    for addr in [&dead, &added, &drained] {
        assert_eq!(
            state_of(&before, addr),
            state_of(&cold, addr),
            "cold start, {addr}:\n{before}\n{cold}\nlog:\n{}",
            agent.log_text()
        );
    }
    let t = xlb_tests::traffic::tcp_requests(&bed.client, vip(), 60).unwrap();
    assert!(xlb_tests::traffic::failures(&t) == 0 && !t.contains_key(&backend_name(2)), "{t:?}");
    agent.stop().unwrap();
    drop(servers);
}
