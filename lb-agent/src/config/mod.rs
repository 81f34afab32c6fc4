//! The agent's configuration: the types the rest of the agent reads, the TOML file's reader
//! (`raw`: syntax, types and the range of each value, with its place in the file) and the one
//! validator of a whole config (`validate`), which the file and the control API share. A
//! config that passes fits every limit of the data path, so applying it cannot half-fail on a
//! limit; every error of a file names its line, column and field.
pub mod l7;
mod raw;
#[cfg(test)]
pub(crate) mod tests;
mod validate;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use serde::Deserialize;
pub use validate::{maglev_entries_needed, validate};

/// Largest backend weight; keeps the Maglev quota arithmetic far from overflow.
pub const MAX_WEIGHT: u32 = 65_535;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How a service's packets reach the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// L2 DSR: the frame's destination MAC becomes the backend's; same L2 segment.
    #[default]
    L2,
    /// L3 DSR: IPv4 in IPv4 or IPv6 in IPv6 to the backend, routed by the kernel's FIB.
    Ipip,
}

/// How a service picks the backend of a new flow (the flow table pins it afterwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Consistent hashing of the 5-tuple over the Maglev table: the same on every host.
    #[default]
    Maglev,
    /// Backends in turn (a per-CPU cursor over a table of them).
    Rr,
    /// Backends in turn in proportion to their weights (smooth weighted round robin).
    Wrr,
    /// Hash of the client address alone over the Maglev table: one backend per client, the
    /// same on every host.
    SourceHash,
    /// Least connections: of two backends drawn from the Maglev table, the one with fewer
    /// active flows (on this host).
    Lc,
    /// Weighted least connections: as lc, comparing active flows per unit of weight.
    Wlc,
}

impl Scheduler {
    /// The id the data path reads in the service's `scheduler` field.
    pub const fn id(self) -> u8 {
        match self {
            Scheduler::Maglev => lb_common::SCHED_MAGLEV,
            Scheduler::Rr => lb_common::SCHED_RR,
            Scheduler::Wrr => lb_common::SCHED_WRR,
            Scheduler::SourceHash => lb_common::SCHED_SOURCE_HASH,
            Scheduler::Lc => lb_common::SCHED_LC,
            Scheduler::Wlc => lb_common::SCHED_WLC,
        }
    }

    /// Whether every balancer host gives a new flow the same backend (a hash, not a cursor).
    pub const fn same_on_every_host(self) -> bool {
        matches!(self, Scheduler::Maglev | Scheduler::SourceHash)
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduler::Maglev => "maglev",
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::SourceHash => "source-hash",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
        })
    }
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (fastest); the NIC driver must support XDP.
    Native,
    /// In the kernel's generic path, after the skb is built: works everywhere, slower.
    Generic,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Interface the balancer attaches to; VIP traffic arrives and leaves there.
    pub interface: String,
    /// None: native, falling back to generic with a warning.
    pub xdp_mode: Option<XdpMode>,
    /// Flow hash seed; the same on every balancer host that shares a VIP.
    pub hash_seed: u32,
    /// `hash_seed` was written in the file (not left at its default of 0).
    pub hash_seed_set: bool,
    /// Entries of the MAGLEV map (every service needs twice its table size).
    pub maglev_capacity: u32,
    pub flows: FlowConfig,
    pub ipip: IpipConfig,
    /// Where the Prometheus endpoint listens; None: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub passive: PassiveConfig,
    /// The file-wide `[health]` settings, for services added at run time (the port is the
    /// service's own unless `[health] port` is set).
    pub health_defaults: HealthConfig,
    /// Interfaces other than `interface` that encapsulated packets may leave by (XDP_REDIRECT).
    pub egress_interfaces: Vec<String>,
    /// Several balancer hosts share the VIPs behind ECMP: schedulers that may answer
    /// differently on each host (rr, wrr) draw a warning.
    pub multi_host: bool,
    /// Announcing the VIPs over BGP (through BIRD); None: not announced.
    pub bgp: Option<BgpConfig>,
    pub services: Vec<ServiceConfig>,
    /// Services the agent proxies itself (HTTP, HTTPS, TCP with PROXY headers).
    pub l7: Vec<l7::L7Service>,
}

/// `[bgp]`: each VIP announced while this host can serve it, through a BIRD the agent runs
/// (or one the operator runs, `bird_socket`).
#[derive(Clone, Debug, PartialEq)]
pub struct BgpConfig {
    pub bird: Bird,
    /// Communities added to a VIP's announcement, by VIP.
    pub communities: Vec<(IpAddr, Vec<Community>)>,
    /// `ctl drain-host`: how long the routes stay, tagged GRACEFUL_SHUTDOWN with a worse MED,
    /// before they are withdrawn.
    pub drain: Duration,
    /// At shutdown: how long the data path keeps balancing after the withdrawal, while the
    /// router moves the flows elsewhere.
    pub withdraw_wait: Duration,
}

/// Who runs BIRD.
#[derive(Clone, Debug, PartialEq)]
pub enum Bird {
    /// The agent writes BIRD's config and runs it as a child that dies with the agent.
    Managed(ManagedBird),
    /// The operator runs BIRD with the agent's VIP protocols in its config; the agent only
    /// enables and disables them through this control socket.
    External { socket: std::path::PathBuf },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ManagedBird {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// The `bird` executable.
    pub binary: std::path::PathBuf,
    /// Where BIRD's config, control socket and pid file are kept.
    pub run_dir: std::path::PathBuf,
    pub neighbors: Vec<NeighborConfig>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NeighborConfig {
    pub address: IpAddr,
    pub peer_as: u32,
    /// TCP MD5 signature of the session.
    pub password: Option<String>,
    /// BGP hold time; keepalives go at a third of it.
    pub hold_secs: u16,
    pub bfd: Option<BfdConfig>,
}

/// BFD on a session: the session drops after `multiplier` missed packets at `interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BfdConfig {
    pub interval: Duration,
    pub multiplier: u32,
}

/// A standard BGP community, `ASN:VALUE`.
pub type Community = (u16, u16);

#[derive(Clone, Debug, PartialEq)]
pub struct FlowConfig {
    /// Entries of the flow table.
    pub size: u32,
    pub udp_idle: Duration,
    /// New flows per second and CPU that are pinned; 0: no limit.
    pub new_flows_per_cpu_sec: u32,
}

/// In-band health: the share of new TCP flows whose SYN had to be sent again.
#[derive(Clone, Debug, PartialEq)]
pub struct PassiveConfig {
    pub enabled: bool,
    /// How often the counters are compared.
    pub window: Duration,
    /// Fewer new flows than this in a window say nothing.
    pub min_flows: u64,
    /// SYN retransmissions per new flow above which the backend is suspect.
    pub ratio: f64,
    /// How long a suspect backend stays out the first time, whatever its active checks say;
    /// each consecutive ejection holds it out once more as long.
    pub hold: Duration,
    /// The longest hold, however many ejections in a row.
    pub max_hold: Duration,
    /// Share of a service's new TCP flows whose handshake completes (the client's ACK seen)
    /// below which the backend is suspect, when the service's other backends do better.
    pub min_completion: f64,
    /// At most this share of a service's backends (percent) is held out by the in-band signal
    /// at once: the signal alone never empties a pool.
    pub max_ejected_percent: u32,
}

/// Outer source addresses of encapsulated packets: the prefix, with the host part varying per
/// flow so that backends spread flows over their receive queues.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct IpipConfig {
    pub source_v4: Option<(Ipv4Addr, u8)>,
    pub source_v6: Option<(Ipv6Addr, u8)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forward: Forward,
    pub scheduler: Scheduler,
    /// source-hash only: a client's new flows keep the backend of its earlier ones while it
    /// comes back within this many seconds, even when the table moves its address elsewhere.
    /// 0: off (the table alone decides).
    pub affinity_timeout_secs: u32,
    pub maglev_size: u32,
    pub health: HealthConfig,
    pub backends: Vec<BackendConfig>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthConfig {
    /// false: backends are always considered up.
    pub enabled: bool,
    /// What a probe does.
    pub check: Check,
    /// Port probed on each backend; the service port unless set.
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend back.
    pub rise: u32,
    /// Consecutive failures that take an up backend out.
    pub fall: u32,
    /// Each interval is stretched or shrunk by up to this fraction at random, so balancer
    /// hosts sharing backends do not probe in lockstep.
    pub jitter: f64,
    /// Fewest backends the service keeps in its table: below it, failing backends stay in
    /// (fail open) rather than leaving the survivors every flow, or no backend at all.
    pub min_healthy: u32,
    /// How a backend starts when nothing is known of it (no state file entry, no data path
    /// to take over): false (the default) keeps it out until its first successful check.
    pub initial_up: bool,
}

/// `initial_state` in a `[health]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum InitialState {
    Down,
    Up,
}

/// The kind of active health check.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    /// A TCP connection is accepted.
    Tcp,
    /// GET `path` answers with one of `statuses`.
    Http { path: String, host: Option<String>, statuses: Vec<u16> },
    /// A datagram carrying `payload` gets any answer.
    Udp { payload: Vec<u8> },
}

/// `kind` in a `[health]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CheckKind {
    Tcp,
    Http,
    Udp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    pub address: IpAddr,
    /// Share of new flows relative to the service's other backends; 0 drains: no new flows,
    /// pinned ones continue.
    pub weight: u32,
    /// None: resolved from the kernel's neighbour table (L2 DSR only).
    pub mac: Option<[u8; 6]>,
}

/// What kind of problem a config has: what a caller or a test branches on (the message says
/// it for a human).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvalidKind {
    /// Not TOML, an unknown field or a value of the wrong type.
    Syntax,
    /// A value out of its range or of the wrong form.
    BadValue,
    /// Something required is missing.
    Missing,
    /// Defined twice (a service, a service name, a backend of a service).
    Duplicate,
    /// A limit of the data path would be exceeded.
    Limit,
    /// A backend of another address family than its VIP.
    WrongFamily,
    /// `forward = "ipip"` without an `[ipip]` source prefix for the VIP's family.
    NeedsIpipSource,
    /// A setting that only a source-hash service takes.
    OnlyWithSourceHash,
}

/// A problem of a config, by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted path of the offending field, e.g. `service[1].backend[0].address`; empty for
    /// syntax errors.
    pub field: String,
    pub kind: InvalidKind,
    pub message: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// A config error at a place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending field, e.g. `service[1].backend[0].address`; empty for
    /// syntax errors.
    pub field: String,
    pub kind: InvalidKind,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: ", self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// All errors found in one config, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: invalid config:\n{e}", path.display()))
    }

    /// What is valid but probably not meant: services whose scheduler answers differently on
    /// each balancer host while `multi_host` says several hosts share the VIPs.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.bgp_warnings();
        if !self.multi_host {
            return out;
        }
        if !self.hash_seed_set {
            out.push(
                "hash_seed: left at its default with multi_host = true: set the same random seed on every host \
                 that shares the VIPs (a seed nobody else uses keeps clients from predicting the spread)"
                    .into(),
            );
        }
        out.extend(self.services.iter().enumerate().filter(|(_, s)| !s.scheduler.same_on_every_host()).map(
            |(i, s)| {
                format!(
                    "service[{i}].scheduler: service {}: scheduler \"{}\" with multi_host = true: each balancer host \
                     keeps its own round-robin cursor, so a connection whose packets ECMP moves to another host \
                     (a host added or lost) lands on another backend; only \"maglev\" and \"source-hash\" give \
                     the same answer on every host",
                    s.name, s.scheduler
                )
            },
        ));
        out
    }

    /// The VIPs of the services, each once, in order.
    pub fn vips(&self) -> Vec<IpAddr> {
        let mut vips: Vec<IpAddr> = self.services.iter().map(|s| s.vip).collect();
        vips.sort();
        vips.dedup();
        vips
    }

    /// VIPs no neighbour can carry, communities for addresses that are no VIP.
    fn bgp_warnings(&self) -> Vec<String> {
        let Some(bgp) = &self.bgp else { return Vec::new() };
        let mut out = Vec::new();
        if let Bird::Managed(m) = &bgp.bird {
            for vip in self.vips() {
                if !m.neighbors.iter().any(|n| n.address.is_ipv4() == vip.is_ipv4()) {
                    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
                    out.push(format!(
                        "bgp.neighbor: VIP {vip} is {family} but no {family} neighbour is configured: it is not announced"
                    ));
                }
            }
        }
        for (i, (vip, _)) in bgp.communities.iter().enumerate() {
            if !self.services.iter().any(|s| s.vip == *vip) {
                out.push(format!("bgp.vip[{i}].address: {vip} is the VIP of no service"));
            }
        }
        out
    }

    /// Parses and validates a config; on failure, every error found.
    pub fn parse(source: &str) -> Result<Self, ConfigErrors> {
        raw::parse(source)
    }
}
