//! `cargo xtask bench` (end to end): HTTP and UDP throughput through xlb against the usual
//! alternatives, in network namespaces on this machine, all in one run:
//!
//! - (a) xlb, L2 DSR, native XDP (the L2 bed: client, balancer and backends on one bridge);
//! - (b) xlb, IPIP L3 DSR, `lb-agent decap` on the backends (the L3 bed: backends behind a router);
//! - (c) HAProxy, mode tcp, on the balancer's namespace of the L2 bed;
//! - (d) nginx's stream proxy (TCP, and UDP) on the balancer's namespace of the L2 bed;
//! - (e) the client straight to the backends of the L2 bed: the ceiling;
//! - (e') the client straight to the backends of the L3 bed, through the router: (b)'s ceiling.
//!
//! Backends run nginx serving a small static page (bound to every address: the VIP on `lo` for
//! DSR, their own address for the proxies and the direct case) and a UDP echo server (bound to
//! the VIP and to their own address). The client runs wrk with keep-alive and with
//! `Connection: close`, and a bounded UDP sender/receiver. Scenarios alternate within every
//! repetition (the order rotates), and the medians of the repetitions are reported: two vCPUs
//! carry client, balancer and backends at once, so single runs are noisy (see TOOLCHAIN.md).
//!
//! Installs haproxy, nginx, libnginx-mod-stream and wrk from Debian when missing, without
//! starting their system services; every process, namespace and file it creates is removed at
//! the end, also on failure or Ctrl-C. Prints a markdown table and writes
//! `target/bench/e2e-<unix time>.json` and `target/bench/e2e-latest.json`. Needs root.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context as _, Result};
use xlb_tests::bench::{json_num, loadavg, machine, machine_json, stat_cpu_ticks, write_results};
use xlb_tests::{
    agent::{AgentProcess, TempDir},
    loadgen::{
        dpkg_version, ensure_packages, http_get, run_udp, run_wrk, wait_tcp, wrk_spread_script, Daemon, UdpEcho,
        UdpOptions, UdpResult, WrkOptions, WrkResult, UDP_PAYLOAD,
    },
    netns::Netns,
    topology::{backend_addr, l3_backend_addr, L2Bed, L3Bed, IFACE, LB, VIP},
};

const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 5300;
const HAPROXY_PORT: u16 = 8001;
const STREAM_PORT: u16 = 8002;
const STREAM_UDP_PORT: u16 = 5302;
/// Bytes of the static page every backend serves.
const PAGE_BYTES: usize = 612;
/// What the benchmark runs, from Debian (the beds also need iproute2 and ethtool).
const PACKAGES: &[&str] = &["haproxy", "nginx", "libnginx-mod-stream", "wrk", "iproute2", "ethtool"];
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

struct Args {
    quick: bool,
    reps: usize,
    duration: Duration,
    udp_duration: Duration,
    connections: usize,
    threads: usize,
    backends: usize,
    udp_flows: usize,
    udp_rate: u64,
    only: Option<Vec<String>>,
    install: bool,
}

/// End-to-end throughput in network namespaces (needs root): xlb L2 DSR (a), xlb IPIP (b),
/// HAProxy (c), nginx stream (d) and the client straight to the backends (e; e' through the L3
/// bed's router), alternating in one run; medians over the repetitions.
#[derive(clap::Parser, Debug)]
#[command(name = "xlb-bench-e2e")]
struct Cli {
    /// 3 repetitions, 2 s per wrk run, 2 s of UDP (about 2 minutes); default 5 repetitions,
    /// 5 s per wrk run, 3 s of UDP (about 7 minutes).
    #[arg(long)]
    quick: bool,
    /// Repetitions of every scenario.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=20))]
    reps: Option<u64>,
    /// Seconds per wrk run.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=60))]
    duration: Option<u64>,
    /// Seconds of UDP sending per run (0: no UDP).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=60))]
    udp_duration: Option<u64>,
    /// wrk connections (threads..=4000).
    #[arg(long, default_value_t = 60)]
    connections: usize,
    /// wrk threads (default: the number of backends; in the direct cases thread i connects
    /// to backend i mod n).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: Option<u64>,
    /// Backends per bed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=8))]
    backends: u64,
    /// UDP client sockets, i.e. flows.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=1000))]
    udp_flows: u64,
    /// UDP datagrams per second over all flows (0: as fast as the sender can; the kernel runs
    /// most of a datagram's way through the veths and the bridge inside the sender's send(), so
    /// the rate follows the path).
    #[arg(long, value_name = "PPS", default_value_t = 0)]
    udp_rate: u64,
    /// Comma-separated subset of a,b,c,d,e,e' (default all).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Fail instead of installing missing Debian packages.
    #[arg(long)]
    no_install: bool,
}

fn parse_args() -> Result<Args> {
    let cli = <Cli as clap::Parser>::parse();
    let backends = usize::try_from(cli.backends)?;
    let a = Args {
        quick: cli.quick,
        reps: usize::try_from(cli.reps.unwrap_or(if cli.quick { 3 } else { 5 }))?,
        duration: Duration::from_secs(cli.duration.unwrap_or(if cli.quick { 2 } else { 5 })),
        udp_duration: Duration::from_secs(cli.udp_duration.unwrap_or(if cli.quick { 2 } else { 3 })),
        connections: cli.connections,
        threads: cli.threads.map_or(Ok(backends), usize::try_from)?,
        backends,
        udp_flows: usize::try_from(cli.udp_flows)?,
        udp_rate: cli.udp_rate,
        only: cli.only.map(|ids| ids.into_iter().map(|s| s.trim().to_string()).collect()),
        install: !cli.no_install,
    };
    ensure!(a.connections >= a.threads && a.connections <= 4000, "--connections must be threads..=4000");
    if let Some(only) = &a.only {
        for id in only {
            ensure!(SCENARIOS.iter().any(|s| s.id == id), "--only: unknown scenario {id:?}");
        }
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// Scenarios

#[derive(Clone, Copy, PartialEq, Eq)]
enum Bed {
    L2,
    L3,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    XlbL2,
    XlbIpip,
    /// The physical limit of an XDP L2 balancer on this bed: lb_common::forwarder.
    Forwarder,
    Haproxy,
    NginxStream,
    Direct,
}

struct Scenario {
    id: &'static str,
    key: &'static str,
    name: &'static str,
    kind: Kind,
    bed: Bed,
}

const SCENARIOS: &[Scenario] = &[
    Scenario { id: "a", key: "xlb_l2", name: "xlb L2 DSR (native XDP)", kind: Kind::XlbL2, bed: Bed::L2 },
    Scenario {
        id: "f",
        key: "forwarder",
        name: "minimal XDP forwarder (MAC rewrite, XDP_TX)",
        kind: Kind::Forwarder,
        bed: Bed::L2,
    },
    Scenario { id: "b", key: "xlb_ipip", name: "xlb IPIP L3 DSR + decap", kind: Kind::XlbIpip, bed: Bed::L3 },
    Scenario { id: "c", key: "haproxy", name: "HAProxy (mode tcp)", kind: Kind::Haproxy, bed: Bed::L2 },
    Scenario { id: "d", key: "nginx_stream", name: "nginx stream proxy", kind: Kind::NginxStream, bed: Bed::L2 },
    Scenario { id: "e", key: "direct", name: "direct to backends", kind: Kind::Direct, bed: Bed::L2 },
    Scenario { id: "e'", key: "direct_l3", name: "direct, via router (L3 bed)", kind: Kind::Direct, bed: Bed::L3 },
];

fn backend_ip(bed: Bed, i: usize) -> Ipv4Addr {
    match bed {
        Bed::L2 => backend_addr(i),
        Bed::L3 => l3_backend_addr(i),
    }
}

fn backend_name(bed: Bed, i: usize) -> String {
    format!("{}-backend-{i}", if bed == Bed::L2 { "l2" } else { "l3" })
}

impl Scenario {
    /// Where HTTP goes: one address, or (direct) every backend.
    fn http_targets(&self, n: usize) -> Vec<SocketAddr> {
        match self.kind {
            Kind::XlbL2 | Kind::XlbIpip | Kind::Forwarder => vec![(VIP, HTTP_PORT).into()],
            Kind::Haproxy => vec![(LB, HAPROXY_PORT).into()],
            Kind::NginxStream => vec![(LB, STREAM_PORT).into()],
            Kind::Direct => (0..n).map(|i| (backend_ip(self.bed, i), HTTP_PORT).into()).collect(),
        }
    }

    /// Where UDP goes; empty where the scenario has no UDP (HAProxy).
    fn udp_targets(&self, n: usize) -> Vec<SocketAddr> {
        match self.kind {
            Kind::XlbL2 | Kind::XlbIpip | Kind::Forwarder => vec![(VIP, UDP_PORT).into()],
            Kind::Haproxy => vec![],
            Kind::NginxStream => vec![(LB, STREAM_UDP_PORT).into()],
            Kind::Direct => (0..n).map(|i| (backend_ip(self.bed, i), UDP_PORT).into()).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The rig: both beds, their servers, the proxies and the agents

/// Everything the benchmark runs. Fields drop in order: agents and daemons first, the
/// namespaces last, so no process outlives its namespace.
struct Rig {
    /// The balancer's agent, on the L2 bed for (a) or the L3 bed for (b), runs only during
    /// its scenario: on the L2 bed its XDP program would otherwise sit on the receive path of
    /// the proxies (c) and (d), which share the balancer's interface; and one agent at a time
    /// never contends with another for the host-wide things an agent owns.
    agent: Option<AgentProcess>,
    /// The minimal forwarder on the L2 balancer's interface, during its scenario only.
    forwarder: Option<aya::Ebpf>,
    _decaps: Vec<AgentProcess>,
    haproxy: Daemon,
    stream: Daemon,
    web: Vec<Daemon>,
    echo_l2: Vec<UdpEcho>,
    echo_l3: Vec<UdpEcho>,
    dir: TempDir,
    l3: L3Bed,
    l2: L2Bed,
    backends: usize,
}

impl Rig {
    fn client(&self, bed: Bed) -> &Netns {
        match bed {
            Bed::L2 => &self.l2.client,
            Bed::L3 => &self.l3.client,
        }
    }

    fn echo(&self, bed: Bed) -> &[UdpEcho] {
        match bed {
            Bed::L2 => &self.echo_l2,
            Bed::L3 => &self.echo_l3,
        }
    }

    /// Starts the balancer's agent that scenario `s` needs, if any (native XDP, or it fails).
    fn start_agent(&mut self, s: &Scenario) -> Result<()> {
        let (ns, config) = match s.kind {
            Kind::XlbL2 => (&self.l2.lb, l2_agent_config(self.backends)),
            Kind::XlbIpip => (&self.l3.lb, l3_agent_config(self.backends)),
            Kind::Forwarder => {
                let macs = self.l2.backends.iter().map(ns_mac).collect::<Result<Vec<_>>>()?;
                let own = ns_mac(&self.l2.lb)?;
                let forwarder =
                    self.l2.lb.run(move || lb_agent::dataplane::attach_forwarder(IFACE, VIP, own, &macs))??;
                self.forwarder = Some(forwarder);
                return Ok(());
            }
            _ => return Ok(()),
        };
        let agent = AgentProcess::start(ns, &config, &["--xdp-mode", "native"])
            .with_context(|| format!("cannot start lb-agent for ({}) {}", s.id, s.name))?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Stops the agent, if one runs, and checks from its counters that it forwarded packets
    /// the way scenario `s` names.
    fn stop_agent(&mut self, s: &Scenario) -> Result<()> {
        // Detached when dropped (run_scenario counted its runs before).
        self.forwarder = None;
        let Some(mut agent) = self.agent.take() else { return Ok(()) };
        let log = agent.stop()?;
        let forwarded = match s.kind {
            Kind::XlbL2 => log.contains("tx_forwarded"),
            _ => log.contains("tx_encap") || log.contains("redirect_encap"),
        };
        ensure!(
            log.contains("Native mode") && forwarded,
            "({}) {}: lb-agent did not forward in native XDP mode:\n{log}",
            s.id,
            s.name
        );
        Ok(())
    }

    /// Every daemon still running, or an error naming the one that died.
    fn check_daemons(&mut self) -> Result<()> {
        self.haproxy.check_running()?;
        self.stream.check_running()?;
        for w in &mut self.web {
            w.check_running()?;
        }
        Ok(())
    }
}

/// The MAC of `ns`'s IFACE. Read through `ip netns exec`, which mounts the namespace's own
/// sysfs: a thread that only entered the namespace still sees the host's /sys.
fn ns_mac(ns: &Netns) -> Result<[u8; 6]> {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{IFACE}/address")])?;
    let text = String::from_utf8_lossy(&out.stdout);
    lb_agent::net::mac::parse_mac(text.trim()).with_context(|| format!("no MAC for {IFACE} in {}: {text:?}", ns.name))
}

fn sysctls(ns: &Netns, settings: &[&str]) -> Result<()> {
    for s in settings {
        ns.exec(&["sysctl", "-qw", s])?;
    }
    Ok(())
}

/// Short connections by the ten thousand: ports for them, and TIME_WAIT ports reused.
const CLIENT_SYSCTLS: &[&str] = &["net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"];

fn build_rig(backends: usize) -> Result<Rig> {
    let dir = TempDir::new("bench")?;
    let l2 = L2Bed::new(backends).context("cannot build the L2 bed")?;
    let l3 = L3Bed::new(backends).context("cannot build the L3 bed")?;
    for ns in [&l2.client, &l2.lb, &l3.client] {
        sysctls(ns, CLIENT_SYSCTLS)?;
    }

    // Backends: nginx on port 80 of every address, UDP echo on the VIP and the own address.
    let mut web = Vec::new();
    let (mut echo_l2, mut echo_l3) = (Vec::new(), Vec::new());
    for (bed, nss) in [(Bed::L2, &l2.backends), (Bed::L3, &l3.backends)] {
        for (i, ns) in nss.iter().enumerate() {
            let name = backend_name(bed, i);
            web.push(start_web(ns, &dir.0, &name)?);
            let echo = UdpEcho::start(ns, &[(VIP, UDP_PORT).into(), (backend_ip(bed, i), UDP_PORT).into()])?;
            match bed {
                Bed::L2 => echo_l2.push(echo),
                Bed::L3 => echo_l3.push(echo),
            }
        }
    }
    for (bed, nss) in [(Bed::L2, &l2.backends), (Bed::L3, &l3.backends)] {
        for (i, ns) in nss.iter().enumerate() {
            wait_tcp(ns, (backend_ip(bed, i), HTTP_PORT).into(), Duration::from_secs(10))?;
        }
    }

    // The proxies on the L2 balancer, to the L2 backends' own addresses.
    let haproxy = start_haproxy(&l2.lb, &dir.0, backends)?;
    let stream = start_stream(&l2.lb, &dir.0, backends)?;
    wait_tcp(&l2.client, (LB, HAPROXY_PORT).into(), Duration::from_secs(10)).context("HAProxy")?;
    wait_tcp(&l2.client, (LB, STREAM_PORT).into(), Duration::from_secs(10)).context("nginx stream")?;

    let _decaps = l3
        .backends
        .iter()
        .map(|ns| AgentProcess::spawn(ns, TempDir::new("decap")?, &["decap", "--iface", IFACE], "decapsulating on"))
        .collect::<Result<Vec<_>>>()
        .context("cannot start lb-agent decap on the L3 backends")?;

    Ok(Rig { agent: None, forwarder: None, _decaps, haproxy, stream, web, echo_l2, echo_l3, dir, l3, l2, backends })
}

fn health_section() -> &'static str {
    "[health]\ninterval_ms = 1000\ntimeout_ms = 500\n"
}

/// (a): a TCP service for HTTP and a UDP service for the echo on the VIP; UDP health checks
/// probe nginx's port.
fn l2_agent_config(n: usize) -> String {
    let mut c = format!("interface = \"{IFACE}\"\nhash_seed = 2026\n\n{}", health_section());
    for (name, port, proto) in [("web", HTTP_PORT, "tcp"), ("echo", UDP_PORT, "udp")] {
        c += &format!("\n[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"{proto}\"\n");
        c += &format!("[service.health]\nport = {HTTP_PORT}\n");
        for i in 0..n {
            c += &format!("[[service.backend]]\naddress = \"{}\"\n", backend_addr(i));
        }
    }
    c
}

/// (b): the same services, forwarded over IPIP to the backends behind the router.
fn l3_agent_config(n: usize) -> String {
    let mut c = format!(
        "interface = \"{IFACE}\"\nhash_seed = 2026\n\n[ipip]\nsource_v4 = \"10.97.0.0/24\"\n\n{}",
        health_section()
    );
    for (name, port, proto) in [("web", HTTP_PORT, "tcp"), ("echo", UDP_PORT, "udp")] {
        c += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"{proto}\"\nforward = \"ipip\"\n"
        );
        c += &format!("[service.health]\nport = {HTTP_PORT}\n");
        for i in 0..n {
            c += &format!("[[service.backend]]\naddress = \"{}\"\n", l3_backend_addr(i));
        }
    }
    c
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// nginx serving a static page naming the backend, one worker, on port 80 of every address.
fn start_web(ns: &Netns, base: &Path, name: &str) -> Result<Daemon> {
    let dir = base.join(name);
    std::fs::create_dir_all(dir.join("www"))?;
    let mut page = format!("<!DOCTYPE html>\n<html><head><title>{name}</title></head><body><h1>{name}</h1>\n<!-- ");
    let pad = PAGE_BYTES.saturating_sub(page.len() + "-->\n</body></html>\n".len());
    page += &"x".repeat(pad);
    page += "-->\n</body></html>\n";
    write(&dir.join("www/index.html"), &page)?;
    let d = dir.display();
    let conf = format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  default_type text/html;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n\
         \x20 keepalive_timeout 60s;\n  keepalive_requests 10000000;\n  open_file_cache max=16;\n\
         \x20 client_body_temp_path {d}/tmp-body;\n  proxy_temp_path {d}/tmp-proxy;\n  fastcgi_temp_path {d}/tmp-fastcgi;\n\
         \x20 uwsgi_temp_path {d}/tmp-uwsgi;\n  scgi_temp_path {d}/tmp-scgi;\n\
         \x20 server {{\n    listen {HTTP_PORT} backlog=4096;\n    root {d}/www;\n    index index.html;\n  }}\n}}\n"
    );
    start_nginx(ns, &dir, name, &conf)
}

fn start_nginx(ns: &Netns, dir: &Path, name: &str, conf: &str) -> Result<Daemon> {
    let conf_path = dir.join("nginx.conf");
    write(&conf_path, conf)?;
    let (prefix, conf_s, err) =
        (format!("{}/", dir.display()), conf_path.display().to_string(), dir.join("error.log").display().to_string());
    let args = ["-p", &prefix, "-e", &err, "-c", &conf_s];
    let test = ns.command("nginx").args(["-t", "-q"]).args(args).output().context("cannot run nginx")?;
    ensure!(test.status.success(), "nginx -t for {name}: {}", String::from_utf8_lossy(&test.stderr).trim());
    Daemon::spawn(ns, name, "nginx", &args, dir.join("stdout.log"))
}

fn start_haproxy(ns: &Netns, base: &Path, n: usize) -> Result<Daemon> {
    let dir = base.join("haproxy");
    std::fs::create_dir_all(&dir)?;
    let mut conf = format!(
        "global\n  nbthread 2\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n\
         \x20 timeout server 30s\n\nfrontend fe\n  bind {LB}:{HAPROXY_PORT}\n  default_backend be\n\n\
         backend be\n  balance roundrobin\n"
    );
    for i in 0..n {
        conf += &format!("  server b{i} {}:{HTTP_PORT}\n", backend_addr(i));
    }
    let path = dir.join("haproxy.cfg");
    write(&path, &conf)?;
    let path = path.display().to_string();
    let test = ns.command("haproxy").args(["-c", "-q", "-f", &path]).output().context("cannot run haproxy")?;
    ensure!(test.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&test.stderr).trim());
    Daemon::spawn(ns, "haproxy", "haproxy", &["-db", "-f", &path], dir.join("haproxy.log"))
}

fn start_stream(ns: &Netns, base: &Path, n: usize) -> Result<Daemon> {
    let dir = base.join("nginx-stream");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let servers = |port: u16| -> String {
        (0..n).map(|i| format!("    server {}:{port};\n", backend_addr(i))).collect::<String>()
    };
    let conf = format!(
        "load_module {NGINX_STREAM_MODULE};\nuser root;\nworker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 8192; }}\n\
         stream {{\n  upstream web {{\n{}  }}\n  upstream echo {{\n{}  }}\n\
         \x20 server {{\n    listen {LB}:{STREAM_PORT} backlog=4096;\n    proxy_pass web;\n  }}\n\
         \x20 server {{\n    listen {LB}:{STREAM_UDP_PORT} udp;\n    proxy_pass echo;\n    proxy_responses 1;\n\
         \x20   proxy_timeout 2s;\n  }}\n}}\n",
        servers(HTTP_PORT),
        servers(UDP_PORT)
    );
    start_nginx(ns, &dir, "nginx-stream", &conf)
}

// ---------------------------------------------------------------------------------------------
// Checks before measuring: every scenario reaches every backend

/// 10 HTTP requests per backend (each on a new connection) and as many UDP datagrams (each from
/// a new socket): all answered, every backend served some. Returns a one-line summary.
fn check_scenario(rig: &Rig, s: &Scenario) -> Result<String> {
    let n = rig.backends;
    let http = s.http_targets(n);
    let count = 10 * n / http.len();
    let bodies = rig
        .client(s.bed)
        .run(move || http.iter().flat_map(|&to| (0..count).map(move |_| http_get(to))).collect::<Vec<_>>())?;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for b in bodies {
        let key = match b {
            Ok(body) => (0..n).map(|i| backend_name(s.bed, i)).find(|name| body.contains(name.as_str())),
            Err(e) => Some(format!("error: {e}")),
        };
        *tally.entry(key.unwrap_or_else(|| "unknown page".into())).or_default() += 1;
    }
    let served = (0..n).filter(|&i| tally.contains_key(&backend_name(s.bed, i))).count();
    ensure!(
        served == n && tally.len() == n,
        "({}) {}: HTTP check failed (every request must succeed and every backend serve some): {tally:?}",
        s.id,
        s.name
    );
    let mut line = format!("HTTP {tally:?}");

    let udp = s.udp_targets(n);
    if !udp.is_empty() {
        let echo = rig.echo(s.bed);
        let before: Vec<u64> = echo.iter().map(|e| e.received.load(Ordering::Relaxed)).collect();
        let total = 10 * n;
        let answered = rig.client(s.bed).run(move || {
            (0..total)
                .filter(|i| {
                    let to = udp[i % udp.len()];
                    let Ok(sock) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else { return false };
                    let mut buf = [0u8; 256];
                    sock.set_read_timeout(Some(Duration::from_millis(500))).is_ok()
                        && sock.connect(to).is_ok()
                        && sock.send(b"xlbbench check").is_ok()
                        && sock.recv(&mut buf).is_ok()
                })
                .count()
        })?;
        let per_backend: Vec<u64> =
            echo.iter().zip(&before).map(|(e, b)| e.received.load(Ordering::Relaxed) - b).collect();
        ensure!(
            answered == total && per_backend.iter().all(|&c| c > 0),
            "({}) {}: UDP check failed: {answered} of {total} answered, per backend {per_backend:?}",
            s.id,
            s.name
        );
        let _ = write!(line, "; UDP {answered}/{total} answered, per backend {per_backend:?}");
    }
    Ok(line)
}

// ---------------------------------------------------------------------------------------------
// Measuring

#[derive(Default)]
struct Samples {
    keepalive: Vec<WrkResult>,
    close: Vec<WrkResult>,
    udp: Vec<UdpResult>,
    /// The balancer program's own cost under this traffic: run_time_ns / run_cnt, read with
    /// `kernel.bpf_stats_enabled` on for the measurement only (xlb scenarios).
    in_situ_ns: Vec<f64>,
    /// The agent's own CPU use while the scenario's traffic ran, in CPUs (1.0: one CPU busy).
    agent_cpu: Vec<f64>,
}

/// (run_time_ns, run_cnt) summed over the loaded programs named `name` (bpftool; needs
/// kernel.bpf_stats_enabled for the counts to move).
fn prog_stats(name: &str) -> (u64, u64) {
    let Ok(out) = std::process::Command::new("bpftool").args(["--json", "prog", "show"]).output() else {
        return (0, 0);
    };
    let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return (0, 0) };
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == name)
        .fold((0, 0), |(t, c), p| (t + p["run_time_ns"].as_u64().unwrap_or(0), c + p["run_cnt"].as_u64().unwrap_or(0)))
}

fn bpf_stats(on: bool) {
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", if on { "1" } else { "0" });
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM end the run between two measurements, through the normal teardown.
fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_interrupted() -> Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::Relaxed), "interrupted");
    Ok(())
}

fn measure(rig: &mut Rig, s: &Scenario, a: &Args, out: &mut Samples) -> Result<()> {
    let n = rig.backends;
    let targets = s.http_targets(n);
    let url = format!("http://{}/", targets[0]);
    let script = if targets.len() > 1 {
        let path = rig.dir.0.join(format!("spread-{}.lua", s.key));
        let hosts: Vec<IpAddr> = targets.iter().map(|t| t.ip()).collect();
        write(&path, &wrk_spread_script(&hosts, HTTP_PORT))?;
        Some(path)
    } else {
        None
    };
    for close in [false, true] {
        check_interrupted()?;
        let o = WrkOptions {
            threads: a.threads,
            connections: a.connections,
            duration: a.duration,
            close,
            script: script.clone(),
        };
        let log = rig.dir.0.join(format!("wrk-{}-{}.log", s.key, if close { "close" } else { "ka" }));
        let r = run_wrk(rig.client(s.bed), &url, &o, log)?;
        if close { &mut out.close } else { &mut out.keepalive }.push(r);
    }
    let udp = s.udp_targets(n);
    if !udp.is_empty() && !a.udp_duration.is_zero() {
        check_interrupted()?;
        let o = UdpOptions {
            flows: a.udp_flows,
            duration: a.udp_duration,
            rate: a.udp_rate,
            grace: Duration::from_millis(300),
        };
        out.udp.push(run_udp(rig.client(s.bed), &udp, &o)?);
    }
    Ok(())
}

fn run_scenario(rig: &mut Rig, s: &Scenario, a: &Args, out: &mut Samples) -> Result<()> {
    rig.start_agent(s)?;
    let program = match s.kind {
        Kind::XlbL2 | Kind::XlbIpip => Some(lb_common::program_names::BALANCER),
        Kind::Forwarder => Some(lb_common::forwarder::PROGRAM),
        _ => None,
    };
    // The kernel's per-program counters, on only while this scenario runs: they cost a clock
    // read per run themselves.
    if program.is_some() {
        bpf_stats(true);
    }
    let before = program.map(prog_stats).unwrap_or_default();
    let agent_before = rig.agent.as_ref().and_then(|agent| Some((Instant::now(), agent.cpu_ticks()?)));
    let result = measure(rig, s, a, out);
    let agent_after = rig.agent.as_ref().and_then(AgentProcess::cpu_ticks);
    if let (Some((at, ticks)), Some(after)) = (agent_before, agent_after) {
        let secs = at.elapsed().as_secs_f64();
        if secs > 0.0 {
            out.agent_cpu.push(after.saturating_sub(ticks) as f64 / ticks_per_sec() / secs);
        }
    }
    let after = program.map(prog_stats).unwrap_or_default();
    if program.is_some() {
        bpf_stats(false);
        let (ns, runs) = (after.0.saturating_sub(before.0), after.1.saturating_sub(before.1));
        if runs > 0 {
            out.in_situ_ns.push(ns as f64 / runs as f64);
        }
    }
    let stopped = rig.stop_agent(s);
    result?;
    stopped?;
    rig.check_daemons()
}

// ---------------------------------------------------------------------------------------------
// Report

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

#[derive(Clone, Copy, Default)]
struct Http {
    rps: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    errors: u64,
    requests: u64,
}

fn summarize_http(runs: &[WrkResult]) -> Http {
    Http {
        rps: median(runs.iter().map(|r| r.requests_per_sec).collect()),
        p50: median(runs.iter().map(|r| r.p50_us).collect()),
        p99: median(runs.iter().map(|r| r.p99_us).collect()),
        errors: runs.iter().map(|r| r.errors).sum(),
        requests: runs.iter().map(|r| r.requests).sum(),
    }
}

#[derive(Clone, Copy, Default)]
struct Udp {
    pps: Option<f64>,
    loss: Option<f64>,
    sent_pps: Option<f64>,
}

fn summarize_udp(runs: &[UdpResult], secs: f64) -> Udp {
    Udp {
        pps: median(runs.iter().map(|r| r.answers_per_sec).collect()),
        loss: median(runs.iter().map(|r| r.loss).collect()),
        sent_pps: median(runs.iter().map(|r| r.sent as f64 / secs).collect()),
    }
}

fn fmt_rate(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.0}"))
}

fn fmt_us(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(us) if us < 1000.0 => format!("{us:.0} µs"),
        Some(us) if us < 1e6 => format!("{:.2} ms", us / 1e3),
        Some(us) => format!("{:.2} s", us / 1e6),
    }
}

fn fmt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{:.1}%", v * 100.0))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.2}"))
}

/// Clock ticks per second, the unit of /proc's CPU times.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a system value.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// CPU time in clock ticks: the machine's busy time outside interrupts (/proc/stat), and this
/// process's with its reaped children (/proc/self/stat), which includes every process the
/// bench started once they are all stopped.
struct CpuTicks {
    at: Instant,
    machine_busy: u64,
    own: u64,
}

impl CpuTicks {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu  user nice system idle iowait irq softirq steal ...
        let f: Vec<u64> =
            stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let machine_busy = if f.len() >= 3 { f[0] + f[1] + f[2] } else { 0 };
        let own_stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let own = stat_cpu_ticks(&own_stat, true).unwrap_or(0);
        Self { at: Instant::now(), machine_busy, own }
    }

    /// The share of the machine's CPU time that other processes used (user and system time,
    /// interrupts left out: those are mostly the bench's own packets).
    fn other_share(&self, end: &CpuTicks, cores: i64) -> f64 {
        let hz = ticks_per_sec();
        let other = end.machine_busy.saturating_sub(self.machine_busy).saturating_sub(end.own.saturating_sub(self.own));
        let available = end.at.duration_since(self.at).as_secs_f64() * hz * cores.max(1) as f64;
        if available > 0.0 {
            other as f64 / available
        } else {
            0.0
        }
    }
}

struct Row<'a> {
    s: &'a Scenario,
    ka: Http,
    close: Http,
    udp: Option<Udp>,
    samples: &'a Samples,
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let started = Instant::now();
    // SAFETY: geteuid only reads the process's credentials.
    ensure!(unsafe { libc::geteuid() } == 0, "run as root: the benchmark creates network namespaces and loads XDP");
    catch_signals();
    let machine = machine();

    let installed = if a.install {
        ensure_packages(PACKAGES, &["nginx", "haproxy"])?
    } else {
        for p in PACKAGES {
            ensure!(xlb_tests::loadgen::dpkg_installed(p)?, "{p} is not installed (--no-install)");
        }
        Vec::new()
    };
    let versions: Vec<(&str, String)> = ["nginx", "haproxy", "wrk"].iter().map(|&p| (p, dpkg_version(p))).collect();
    xlb_tests::agent::agent_binary()?;

    let scenarios: Vec<&Scenario> =
        SCENARIOS.iter().filter(|s| a.only.as_ref().is_none_or(|o| o.iter().any(|id| id == s.id))).collect();
    eprintln!(
        "bench-e2e: {} scenarios × {} repetitions; wrk -t{} -c{} {}s keep-alive and close; UDP {}s, {} flows, {}",
        scenarios.len(),
        a.reps,
        a.threads,
        a.connections,
        a.duration.as_secs(),
        a.udp_duration.as_secs(),
        a.udp_flows,
        if a.udp_rate == 0 { "as fast as possible".to_string() } else { format!("{} datagrams/s", a.udp_rate) }
    );
    let setup_started = Instant::now();
    let cpu_before = CpuTicks::now();
    let mut rig = build_rig(a.backends)?;
    eprintln!("bench-e2e: beds, backends and proxies up in {:.1?}", setup_started.elapsed());

    for s in &scenarios {
        check_interrupted()?;
        rig.start_agent(s)?;
        let line = check_scenario(&rig, s);
        let stopped = rig.stop_agent(s);
        eprintln!("check ({}) {}: {}", s.id, s.name, line?);
        stopped?;
    }

    let mut samples: Vec<Samples> = scenarios.iter().map(|_| Samples::default()).collect();
    for rep in 0..a.reps {
        for k in 0..scenarios.len() {
            // The order rotates: no scenario always runs first, or right after the same one.
            let i = (k + rep) % scenarios.len();
            let s = scenarios[i];
            run_scenario(&mut rig, s, &a, &mut samples[i])
                .with_context(|| format!("repetition {}, ({}) {}", rep + 1, s.id, s.name))?;
            let sm = &samples[i];
            let (ka, cl) = (sm.keepalive.last().unwrap(), sm.close.last().unwrap());
            let udp = sm.udp.last().filter(|_| sm.udp.len() == rep + 1).map_or_else(String::new, |u| {
                format!(" | UDP {:.0}/s, loss {:.1}%", u.answers_per_sec, u.loss * 100.0)
            });
            eprintln!(
                "rep {}/{} ({}) {:<28} keep-alive {:>8.0} req/s p50 {} p99 {} | close {:>7.0} req/s p50 {} p99 {}{udp}",
                rep + 1,
                a.reps,
                s.id,
                s.name,
                ka.requests_per_sec,
                fmt_us(Some(ka.p50_us)),
                fmt_us(Some(ka.p99_us)),
                cl.requests_per_sec,
                fmt_us(Some(cl.p50_us)),
                fmt_us(Some(cl.p99_us)),
            );
        }
    }
    drop(rig);
    let other_cpu = cpu_before.other_share(&CpuTicks::now(), machine.cores);

    let udp_secs = a.udp_duration.as_secs_f64();
    let rows: Vec<Row> = scenarios
        .iter()
        .zip(&samples)
        .map(|(s, sm)| Row {
            s,
            ka: summarize_http(&sm.keepalive),
            close: summarize_http(&sm.close),
            udp: (!sm.udp.is_empty()).then(|| summarize_udp(&sm.udp, udp_secs)),
            samples: sm,
        })
        .collect();
    let find = |key: &str| rows.iter().find(|r| r.s.key == key);
    let direct = find("direct").map(|r| (r.ka, r.close, r.udp));
    let haproxy = find("haproxy").map(|r| (r.ka, r.close));

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| scenario | req/s keep-alive | p50 | p99 | req/s close | p50 | p99 | UDP pkt/s | UDP loss \
         | keep-alive ÷ (e) | close ÷ (e) | UDP ÷ (e) | keep-alive ÷ (c) | close ÷ (c) |"
    );
    let _ = writeln!(table, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mut ratios = Vec::new();
    for r in &rows {
        let vs_e = (
            ratio(r.ka.rps, direct.and_then(|d| d.0.rps)),
            ratio(r.close.rps, direct.and_then(|d| d.1.rps)),
            ratio(r.udp.and_then(|u| u.pps), direct.and_then(|d| d.2).and_then(|u| u.pps)),
        );
        let vs_c = (ratio(r.ka.rps, haproxy.and_then(|h| h.0.rps)), ratio(r.close.rps, haproxy.and_then(|h| h.1.rps)));
        let flag = |h: &Http| if h.errors * 100 > h.requests { " ⚠" } else { "" };
        let _ = writeln!(
            table,
            "| ({}) {} | {}{} | {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.s.id,
            r.s.name,
            fmt_rate(r.ka.rps),
            flag(&r.ka),
            fmt_us(r.ka.p50),
            fmt_us(r.ka.p99),
            fmt_rate(r.close.rps),
            flag(&r.close),
            fmt_us(r.close.p50),
            fmt_us(r.close.p99),
            fmt_rate(r.udp.and_then(|u| u.pps)),
            fmt_pct(r.udp.and_then(|u| u.loss)),
            fmt_ratio(vs_e.0),
            fmt_ratio(vs_e.1),
            fmt_ratio(vs_e.2),
            fmt_ratio(vs_c.0),
            fmt_ratio(vs_c.1),
        );
        ratios.push((vs_e, vs_c));
    }
    let m = &machine;
    let unix_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let version_line: Vec<String> = versions.iter().map(|(p, v)| format!("{p} {v}")).collect();
    println!(
        "\nEnd to end, {} backends per bed; medians of {} repetitions; wrk -t{} -c{} {}s per run \
         (keep-alive, and `Connection: close`), {PAGE_BYTES}-byte page; UDP: {} flows, {UDP_PAYLOAD}-byte \
         datagrams, {}s per run, {}.\n",
        a.backends,
        a.reps,
        a.threads,
        a.connections,
        a.duration.as_secs(),
        a.udp_flows,
        a.udp_duration.as_secs(),
        if a.udp_rate == 0 { "sent as fast as possible".to_string() } else { format!("{} datagrams/s", a.udp_rate) }
    );
    print!("{table}");
    if let (Some(b), Some(e3)) = (find("xlb_ipip"), find("direct_l3")) {
        println!(
            "\n(b) against its own bed's ceiling (e'): keep-alive {}, close {}, UDP {}.",
            fmt_ratio(ratio(b.ka.rps, e3.ka.rps)),
            fmt_ratio(ratio(b.close.rps, e3.close.rps)),
            fmt_ratio(ratio(b.udp.and_then(|u| u.pps), e3.udp.and_then(|u| u.pps)))
        );
    }
    let forwarder = find("forwarder").map(|f| (f.ka.rps, f.close.rps, f.udp.and_then(|u| u.pps)));
    let vs_forwarder = find("xlb_l2")
        .zip(forwarder)
        .map(|(x, f)| (ratio(x.ka.rps, f.0), ratio(x.close.rps, f.1), ratio(x.udp.and_then(|u| u.pps), f.2)));
    if let Some((ka, close, udp)) = vs_forwarder {
        println!(
            "\n(a) against the minimal forwarder (f), the most an XDP L2 balancer can do on this bed: keep-alive {}, \
             close {}, UDP {}.",
            fmt_ratio(ka),
            fmt_ratio(close),
            fmt_ratio(udp)
        );
    }
    for r in rows.iter().filter(|r| !r.samples.in_situ_ns.is_empty()) {
        println!(
            "\n({}) {}: the program's own cost under this traffic, {} ns per packet (run_time_ns / run_cnt with \
             kernel.bpf_stats_enabled during the runs, median of {}).",
            r.s.id,
            r.s.name,
            median(r.samples.in_situ_ns.clone()).map_or_else(|| "—".into(), |v| format!("{v:.0}")),
            r.samples.in_situ_ns.len()
        );
    }
    for r in rows.iter().filter(|r| !r.samples.agent_cpu.is_empty()) {
        println!(
            "\n({}) {}: the agent itself used {} of a CPU while the traffic ran (user and system time of its \
             process, median of {}).",
            r.s.id,
            r.s.name,
            median(r.samples.agent_cpu.clone()).map_or_else(|| "—".into(), |v| format!("{:.1}%", v * 100.0)),
            r.samples.agent_cpu.len()
        );
    }
    if rows.iter().any(|r| r.ka.errors * 100 > r.ka.requests || r.close.errors * 100 > r.close.requests) {
        println!("⚠: more than 1% of the requests failed (socket errors or non-2xx answers); see the JSON.");
    }
    let load_end = loadavg();
    println!(
        "\nmachine: kernel {}, CPU {}, {} cores, load average {} at start and {load_end} at the end; {}; total {:.0?}",
        m.kernel,
        m.cpu,
        m.cores,
        m.loadavg,
        version_line.join(", "),
        started.elapsed()
    );
    println!(
        "other processes on the machine used {:.0}% of its CPU time during the run{}",
        other_cpu * 100.0,
        if other_cpu > 0.05 { ": the figures are noisier than usual" } else { "" }
    );

    let mut machine = machine_json(m);
    machine["loadavg_1m_end"] = load_end.into();
    let http_json = |h: &Http, runs: &[WrkResult]| {
        let runs: Vec<serde_json::Value> = runs
            .iter()
            .map(|w| {
                serde_json::json!({
                    "rps": json_num(Some(w.requests_per_sec), 4),
                    "p50_us": json_num(Some(w.p50_us), 4),
                    "p99_us": json_num(Some(w.p99_us), 4),
                    "requests": w.requests,
                    "errors": w.errors,
                })
            })
            .collect();
        serde_json::json!({
            "rps": json_num(h.rps, 4),
            "p50_us": json_num(h.p50, 4),
            "p99_us": json_num(h.p99, 4),
            "requests": h.requests,
            "errors": h.errors,
            "runs": runs,
        })
    };
    let scenarios: Vec<serde_json::Value> = rows
        .iter()
        .zip(&ratios)
        .map(|(r, (vs_e, vs_c))| {
            let udp = r.udp.as_ref().map(|u| {
                let runs: Vec<serde_json::Value> = r
                    .samples
                    .udp
                    .iter()
                    .map(|x| {
                        serde_json::json!({
                            "sent": x.sent,
                            "answered": x.answered,
                            "send_errors": x.send_errors,
                            "pps": json_num(Some(x.answers_per_sec), 4),
                            "loss": json_num(Some(x.loss), 4),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "pps": json_num(u.pps, 4),
                    "loss": json_num(u.loss, 4),
                    "sent_pps": json_num(u.sent_pps, 4),
                    "runs": runs,
                })
            });
            serde_json::json!({
                "id": r.s.id,
                "key": r.s.key,
                "name": r.s.name,
                "keepalive": http_json(&r.ka, &r.samples.keepalive),
                "close": http_json(&r.close, &r.samples.close),
                "udp": udp,
                "vs_direct": {"keepalive": json_num(vs_e.0, 4), "close": json_num(vs_e.1, 4), "udp": json_num(vs_e.2, 4)},
                "vs_haproxy": {"keepalive": json_num(vs_c.0, 4), "close": json_num(vs_c.1, 4)},
                "in_situ_ns_per_packet": json_num(median(r.samples.in_situ_ns.clone()), 1),
                "agent_cpu": json_num(median(r.samples.agent_cpu.clone()), 4),
            })
        })
        .collect();
    let results = serde_json::json!({
        "bench": "e2e",
        "unix_time": unix_time,
        "machine": machine,
        "versions": versions.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "installed_now": installed,
        "settings": {
            "quick": a.quick,
            "reps": a.reps,
            "wrk_seconds": a.duration.as_secs(),
            "wrk_threads": a.threads,
            "wrk_connections": a.connections,
            "backends": a.backends,
            "page_bytes": PAGE_BYTES,
            "udp_seconds": a.udp_duration.as_secs(),
            "udp_flows": a.udp_flows,
            "udp_rate": a.udp_rate,
            "udp_payload_bytes": UDP_PAYLOAD,
        },
        "total_seconds": json_num(Some(started.elapsed().as_secs_f64()), 1),
        "other_processes_cpu_share": json_num(Some(other_cpu), 4),
        "xlb_l2_vs_forwarder": vs_forwarder.map(|(ka, close, udp)| serde_json::json!({
            "keepalive": json_num(ka, 4), "close": json_num(close, 4), "udp": json_num(udp, 4),
        })),
        "scenarios": scenarios,
    });
    let (stamped, _) = write_results("e2e", unix_time, &results)?;
    println!("wrote {}", stamped.display());
    Ok(())
}
