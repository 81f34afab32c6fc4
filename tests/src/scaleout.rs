//! The scale-out topology: a client behind a router that runs BIRD with ECMP, three balancer
//! hosts that each announce the VIP over BGP (lb-agent with its own BIRD child), and the
//! backends on the balancers' L2 segment (L2 DSR: they answer the client through the router).
//!
//! ```text
//!  client 10.97.0.2 ── router 10.97.0.1 │ 10.96.0.1 ─┐
//!                      (BIRD, ECMP)                   ├ bridge ─ lb i: 10.96.0.(2+i), AS 65001
//!                                                     └─────── ─ backend j: 10.96.0.(11+j), VIP on lo
//!  VIP 10.95.0.100, announced by every lb; the router is AS 65000
//!  IPv6 beside it: client fd97::2, router fd97::1 | fd96::1, lb i fd96::(2+i),
//!  backend j fd96::(11+j), VIP fd95::100 (sessions over IPv6)
//! ```
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    agent::{AgentProcess, TempDir},
    netns::{unique_name, Netns},
    scenario::backend_name,
    topology::{add6, plug, IFACE},
    traffic::Server,
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd97, 0, 0, 0, 0, 0, 0, 2);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd96, 0, 0, 0, 0, 0, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd95, 0, 0, 0, 0, 0, 0, 0x100);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 100);
pub const PORT: u16 = 80;
pub const HASH_SEED: u32 = 2026;
pub const ROUTER_AS: u32 = 65000;
pub const LB_AS: u32 = 65001;
/// BFD on every session: a silent failure is found within 3 × 100 ms.
pub const BFD_INTERVAL_MS: u32 = 100;
pub const DRAIN_SECS: u32 = 2;
/// Each agent's Prometheus endpoint, inside its balancer's namespace.
pub const METRICS: &str = "127.0.0.1:9100";

pub fn lb_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, 2 + i as u8)
}

pub fn backend_addr(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, 11 + j as u8)
}

pub fn lb_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd96, 0, 0, 0, 0, 0, 0, 2 + i as u16)
}

pub fn backend_addr6(j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd96, 0, 0, 0, 0, 0, 0, 0x11 + j as u16)
}

pub fn vip() -> SocketAddr {
    (VIP, PORT).into()
}

pub fn vip6() -> SocketAddr {
    (VIP6, PORT).into()
}

/// A BIRD process in a namespace, killed on drop.
pub struct BirdProcess {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Drop for BirdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The router's BIRD: a session with every balancer (BFD, 3 s hold time), the VIP routes
/// merged into one multipath route in the kernel.
fn router_bird(ns: &Netns, dir: &TempDir, lbs: usize) -> Result<BirdProcess> {
    let mut conf = format!(
        "log \"{}\" all;\nrouter id {ROUTER};\nprotocol device {{ }}\nprotocol bfd {{ }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
         protocol kernel {{ ipv6 {{ import none; export all; }}; merge paths on; }}\n\
         template bgp lbs {{\n  local as {ROUTER_AS};\n  hold time 3; keepalive time 1;\n  \
         connect retry time 1; error wait time 1, 5;\n  \
         bfd {{ min rx interval {BFD_INTERVAL_MS} ms; min tx interval {BFD_INTERVAL_MS} ms; multiplier 3; }};\n  \
         ipv4 {{ import all; export none; }};\n  ipv6 {{ import all; export none; }};\n}}\n",
        dir.0.join("router-bird.log").display()
    );
    for i in 0..lbs {
        conf += &format!("protocol bgp lb{i} from lbs {{ neighbor {} as {LB_AS}; }}\n", lb_addr(i));
        conf += &format!("protocol bgp lb{i}v6 from lbs {{ neighbor {} as {LB_AS}; }}\n", lb_addr6(i));
    }
    let path = dir.0.join("router-bird.conf");
    std::fs::write(&path, conf)?;
    let socket = dir.0.join("router-bird.ctl");
    let child = ns
        .command("bird")
        .arg("-f")
        .arg("-c")
        .arg(&path)
        .arg("-s")
        .arg(&socket)
        .arg("-P")
        .arg(dir.0.join("router-bird.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the router's BIRD (is bird2 installed? cargo xtask setup)")?;
    Ok(BirdProcess { child, socket, log: dir.0.join("router-bird.log") })
}

/// The agent config of balancer `i`.
pub fn lb_config(i: usize, run_dir: &str, backends: usize) -> String {
    let mut c = format!(
        "interface = \"{IFACE}\"\nhash_seed = {HASH_SEED}\nmulti_host = true\n\n\
         [metrics]\nlisten = \"{METRICS}\"\n\n[health]\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\n\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = {PORT}\nprotocol = \"tcp\"\n"
    );
    for j in 0..backends {
        c += &format!("\n[[service.backend]]\naddress = \"{}\"\n", backend_addr(j));
    }
    c += &format!("\n[[service]]\nname = \"web6\"\nvip = \"{VIP6}\"\nport = {PORT}\nprotocol = \"tcp\"\n");
    for j in 0..backends {
        c += &format!("\n[[service.backend]]\naddress = \"{}\"\n", backend_addr6(j));
    }
    c += &format!(
        "\n[bgp]\nlocal_as = {LB_AS}\nrouter_id = \"{}\"\nrun_dir = \"{run_dir}\"\ndrain_secs = {DRAIN_SECS}\n\
         withdraw_wait_ms = 300\n\n[[bgp.neighbor]]\naddress = \"{ROUTER}\"\npeer_as = {ROUTER_AS}\nbfd = true\n\
         bfd_interval_ms = {BFD_INTERVAL_MS}\n\n[[bgp.neighbor]]\naddress = \"{ROUTER6}\"\npeer_as = {ROUTER_AS}\nbfd = true\n\
         bfd_interval_ms = {BFD_INTERVAL_MS}\n",
        lb_addr(i)
    );
    c
}

pub struct ScaleOutBed {
    pub client: Netns,
    pub router: Netns,
    pub lbs: Vec<Netns>,
    pub backends: Vec<Netns>,
    pub servers: Vec<Server>,
    pub router_bird: BirdProcess,
    /// One agent per balancer; None while a test has it stopped.
    pub agents: Vec<Option<AgentProcess>>,
    // Drop order: agents and BIRD above, then the pass programs, the namespaces, the dirs.
    _peer_xdp: Vec<aya::Ebpf>,
    pub switch: Netns,
    pub dir: TempDir,
    pins: Vec<PathBuf>,
}

impl Drop for ScaleOutBed {
    fn drop(&mut self) {
        self.agents.clear();
        for p in &self.pins {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

impl ScaleOutBed {
    /// The namespaces, the servers and the router's BIRD; no agent yet.
    pub fn new(lbs: usize, backends: usize) -> Result<Self> {
        let dir = TempDir::new("scaleout")?;
        let switch = Netns::new("sw")?;
        switch.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        switch.exec(&["ip", "link", "set", "br0", "up"])?;

        let router = Netns::new("router")?;
        plug(&switch, &router, "v-router", ROUTER)?;
        add6(&router, IFACE, &format!("{ROUTER6}/64"))?;
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            // ECMP by the 5-tuple, not by addresses alone: the connections of one client spread.
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ] {
            router.exec(&["sysctl", "-qw", key])?;
        }
        let client = Netns::new("client")?;
        router.exec(&["ip", "link", "add", "c0", "type", "veth", "peer", "name", IFACE, "netns", &client.name])?;
        router.exec(&["ip", "addr", "add", "10.97.0.1/24", "dev", "c0"])?;
        router.exec(&["ip", "link", "set", "c0", "up"])?;
        add6(&router, "c0", "fd97::1/64")?;
        client.exec(&["ip", "addr", "add", &format!("{CLIENT}/24"), "dev", IFACE])?;
        add6(&client, IFACE, &format!("{CLIENT6}/64"))?;
        client.exec(&["ip", "link", "set", IFACE, "up"])?;
        client.exec(&["ip", "route", "add", "default", "via", "10.97.0.1"])?;
        client.exec(&["ip", "-6", "route", "add", "default", "via", "fd97::1"])?;
        // The balancers run native XDP: checksums complete before the frame leaves the client.
        client.exec(&["ethtool", "-K", IFACE, "tx", "off"])?;
        // A retransmission keeps its flow's hash, so its path (TOOLCHAIN.md).
        client.exec(&["sysctl", "-qw", "net.core.txrehash=0"])?;

        let mut lbs_ns = Vec::new();
        let mut peer_xdp = Vec::new();
        for i in 0..lbs {
            let ns = Netns::new(&format!("lb{i}"))?;
            let port = format!("v-lb{i}");
            plug(&switch, &ns, &port, lb_addr(i))?;
            add6(&ns, IFACE, &format!("{}/64", lb_addr6(i)))?;
            let p = port.clone();
            peer_xdp.push(switch.run(move || lb_agent::dataplane::attach_pass_program(&p))??);
            lbs_ns.push(ns);
        }
        let mut backend_ns = Vec::new();
        let mut servers = Vec::new();
        for j in 0..backends {
            let ns = Netns::new(&format!("b{j}"))?;
            plug(&switch, &ns, &format!("v-b{j}"), backend_addr(j))?;
            add6(&ns, IFACE, &format!("{}/64", backend_addr6(j)))?;
            ns.exec(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            add6(&ns, "lo", &format!("{VIP6}/128"))?;
            ns.exec(&["ip", "route", "add", "default", "via", &ROUTER.to_string()])?;
            ns.exec(&["ip", "-6", "route", "add", "default", "via", &ROUTER6.to_string()])?;
            servers.push(Server::start(&ns, &backend_name(j), &[VIP.into(), VIP6.into()], PORT)?);
            backend_ns.push(ns);
        }
        let router_bird = router_bird(&router, &dir, lbs)?;
        let pins =
            (0..lbs).map(|i| PathBuf::from(format!("/sys/fs/bpf/{}", unique_name(&format!("pins-lb{i}"))))).collect();
        Ok(Self {
            client,
            router,
            lbs: lbs_ns,
            backends: backend_ns,
            servers,
            router_bird,
            agents: (0..lbs).map(|_| None).collect(),
            _peer_xdp: peer_xdp,
            switch,
            dir,
            pins,
        })
    }

    /// BIRD's run directory of balancer `i`.
    pub fn run_dir(&self, i: usize) -> String {
        self.dir.0.join(format!("bird-lb{i}")).display().to_string()
    }

    /// Starts balancer `i`'s agent (with `config`), waiting until its backends are checked.
    pub fn start_agent_with(&mut self, i: usize, config: &str) -> Result<()> {
        let pins = self.pins[i].display().to_string();
        let agent = AgentProcess::start(&self.lbs[i], config, &["--pin-dir", &pins])?;
        self.agents[i] = Some(agent);
        Ok(())
    }

    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let config = lb_config(i, &self.run_dir(i), self.backends.len());
        self.start_agent_with(i, &config)
    }

    pub fn agent(&mut self, i: usize) -> &mut AgentProcess {
        self.agents[i].as_mut().expect("the agent of this balancer runs")
    }

    /// The next hops of the router's route to the VIP, as its kernel holds them.
    pub fn next_hops(&self) -> Result<Vec<Ipv4Addr>> {
        let out = self.router.exec(&["ip", "-4", "route", "show", &format!("{VIP}/32")])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut hops: Vec<Ipv4Addr> = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect();
        hops.sort();
        Ok(hops)
    }

    /// How many next hops the router's route to the IPv6 VIP has (BIRD may install the
    /// balancers' link-local addresses: counted, not named).
    pub fn next_hops6(&self) -> Result<usize> {
        let out = self.router.exec(&["ip", "-6", "route", "show", &format!("{VIP6}/128")])?;
        Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().filter(|w| *w == "via").count())
    }

    /// Waits until the router's route to the IPv6 VIP has `n` next hops.
    pub fn wait_next_hops6(&self, n: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let hops = self.next_hops6()?;
            if hops == n {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("the router's route to {VIP6} has {hops} next hops, not {n}, after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until the router's next hops for the VIP are those of the balancers `lbs`;
    /// returns how long that took (polled every 2 ms).
    pub fn wait_next_hops(&self, lbs: &[usize], timeout: Duration) -> Result<Duration> {
        let mut want: Vec<Ipv4Addr> = lbs.iter().map(|&i| lb_addr(i)).collect();
        want.sort();
        let start = Instant::now();
        loop {
            let hops = self.next_hops()?;
            if hops == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                let bird = std::fs::read_to_string(&self.router_bird.log).unwrap_or_default();
                bail!("the router's next hops for {VIP} are {hops:?}, not {want:?}, after {timeout:?}; its BIRD log:\n{bird}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Cuts balancer `i`'s link on the switch side, silently for the router: its own link
    /// stays up, it just hears nothing more (`restore` undoes it).
    pub fn cut(&self, i: usize, restore: bool) -> Result<()> {
        let state = if restore { "up" } else { "down" };
        self.switch.exec(&["ip", "link", "set", &format!("v-lb{i}"), state]).map(|_| ())
    }
}
