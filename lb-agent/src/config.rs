//! The agent's TOML configuration: parsing, defaults and validation. A config that passes
//! [`Config::parse`] fits every limit of the data path, so applying it cannot half-fail on a
//! limit; every error names its line, column and field.
use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    time::Duration,
};

use lb_common::limits::{
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_SIZE, DEFAULT_NEW_FLOWS_PER_CPU_SEC, DEFAULT_UDP_IDLE_SECS, MAX_BACKENDS,
    MAX_MAGLEV_SIZE, MAX_SERVICES, MAX_TX_PORTS, MAX_VIPS,
};
use lb_common::MAX_AFFINITY_TIMEOUT_SECS;
use serde::Deserialize;
use toml::Spanned;

use crate::maglev::is_prime;

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
    /// The id the data path reads in the service's flags.
    pub const fn id(self) -> u32 {
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
    pub services: Vec<ServiceConfig>,
}

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
    /// How long a suspect backend stays out, whatever its active checks say.
    pub hold: Duration,
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

/// A config error at a place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending field, e.g. `service[1].backend[0].address`; empty for
    /// syntax errors.
    pub field: String,
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

// The file as written: every value keeps its span so that validation can point at it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: Spanned<String>,
    xdp_mode: Option<XdpMode>,
    hash_seed: Option<u32>,
    maglev_capacity: Option<Spanned<u32>>,
    #[serde(default)]
    multi_host: bool,
    #[serde(default)]
    egress_interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    passive: RawPassive,
    #[serde(default)]
    flows: RawFlows,
    #[serde(default)]
    ipip: RawIpip,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFlows {
    size: Option<Spanned<u32>>,
    udp_idle_secs: Option<Spanned<u32>>,
    new_flows_per_cpu_sec: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPassive {
    enabled: Option<bool>,
    window_ms: Option<Spanned<u64>>,
    min_flows: Option<u64>,
    ratio: Option<Spanned<f64>>,
    hold_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIpip {
    source_v4: Option<Spanned<String>>,
    source_v6: Option<Spanned<String>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    enabled: Option<bool>,
    kind: Option<CheckKind>,
    http_path: Option<Spanned<String>>,
    http_host: Option<String>,
    http_status: Option<Vec<u16>>,
    udp_payload: Option<String>,
    jitter: Option<Spanned<f64>>,
    min_healthy: Option<Spanned<u32>>,
    port: Option<Spanned<u16>>,
    interval_ms: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    vip: Spanned<String>,
    port: Spanned<u16>,
    protocol: Protocol,
    #[serde(default)]
    forward: Forward,
    #[serde(default)]
    scheduler: Scheduler,
    affinity_timeout_secs: Option<Spanned<u32>>,
    maglev_size: Option<Spanned<u32>>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
    mac: Option<Spanned<String>>,
}

const DEFAULT_HEALTH: HealthConfig = HealthConfig {
    enabled: true,
    check: Check::Tcp,
    port: 0,
    interval: Duration::from_millis(1000),
    timeout: Duration::from_millis(500),
    rise: 2,
    fall: 3,
    jitter: 0.1,
    min_healthy: 1,
};

/// Collects errors against the source text, turning byte spans into line and column.
struct Errors<'a> {
    source: &'a str,
    errors: Vec<ConfigError>,
}

impl Errors<'_> {
    fn at(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        let start = span.start.min(self.source.len());
        let before = &self.source[..start];
        let line = before.matches('\n').count() + 1;
        let column = start - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        self.errors.push(ConfigError { line, column, field: field.into(), message: message.into() });
    }
}

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
        if !self.multi_host {
            return Vec::new();
        }
        self.services
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.scheduler.same_on_every_host())
            .map(|(i, s)| {
                format!(
                    "service[{i}].scheduler: service {}: scheduler \"{}\" with multi_host = true: each balancer host \
                     keeps its own round-robin cursor, so a connection whose packets ECMP moves to another host \
                     (a host added or lost) lands on another backend; only \"maglev\" and \"source-hash\" give \
                     the same answer on every host",
                    s.name, s.scheduler
                )
            })
            .collect()
    }

    /// Parses and validates a config; on failure, every error found.
    pub fn parse(source: &str) -> Result<Self, ConfigErrors> {
        let mut errors = Errors { source, errors: Vec::new() };
        let raw: RawConfig = match toml::from_str(source) {
            Ok(raw) => raw,
            Err(e) => {
                errors.at(e.span().unwrap_or(0..0), "", e.message().trim_end());
                return Err(ConfigErrors(errors.errors));
            }
        };
        let config = validate(raw, &mut errors);
        if errors.errors.is_empty() {
            Ok(config)
        } else {
            errors.errors.sort_by_key(|e| (e.line, e.column));
            Err(ConfigErrors(errors.errors))
        }
    }
}

fn validate(raw: RawConfig, errors: &mut Errors<'_>) -> Config {
    let interface = raw.interface.get_ref();
    if interface.is_empty() || interface.len() > 15 || interface.contains(|c: char| c == '/' || c.is_whitespace()) {
        errors.at(
            raw.interface.span(),
            "interface",
            format!("expected an interface name of 1 to 15 characters without '/' or spaces, got {interface:?}"),
        );
    }
    if raw.service.is_empty() {
        errors.at(0..0, "service", "expected at least one [[service]]");
    }
    let mut egress_interfaces = Vec::new();
    for (i, name) in raw.egress_interfaces.iter().enumerate() {
        if !valid_ifname(name.get_ref()) {
            errors.at(
                name.span(),
                format!("egress_interfaces[{i}]"),
                format!("expected an interface name, got {:?}", name.get_ref()),
            );
        }
        egress_interfaces.push(name.get_ref().clone());
    }
    if egress_interfaces.len() >= MAX_TX_PORTS as usize {
        errors.at(0..0, "egress_interfaces", format!("at most {} interfaces", MAX_TX_PORTS - 1));
    }
    let flows = FlowConfig {
        size: match &raw.flows.size {
            Some(n) if *n.get_ref() == 0 => {
                errors.at(n.span(), "flows.size", "expected at least 1 entry");
                1
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_FLOW_TABLE_SIZE,
        },
        udp_idle: Duration::from_secs(u64::from(match &raw.flows.udp_idle_secs {
            Some(n) if *n.get_ref() == 0 => {
                errors.at(n.span(), "flows.udp_idle_secs", "expected at least 1 second");
                1
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_UDP_IDLE_SECS,
        })),
        new_flows_per_cpu_sec: raw.flows.new_flows_per_cpu_sec.unwrap_or(DEFAULT_NEW_FLOWS_PER_CPU_SEC),
    };
    let metrics_listen = raw.metrics.listen.as_ref().and_then(|l| match l.get_ref().parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            let got = l.get_ref();
            errors.at(
                l.span(),
                "metrics.listen",
                format!("expected an address and port like \"127.0.0.1:9100\", got {got:?}"),
            );
            None
        }
    });
    let p = &raw.passive;
    let ms = |v: &Option<Spanned<u64>>, field: &str, default: u64, errors: &mut Errors<'_>| match v {
        Some(v) if !(100..=3_600_000).contains(v.get_ref()) => {
            errors.at(v.span(), format!("passive.{field}"), format!("expected 100 to 3600000 ms, got {}", v.get_ref()));
            Duration::from_millis(default)
        }
        Some(v) => Duration::from_millis(*v.get_ref()),
        None => Duration::from_millis(default),
    };
    let passive = PassiveConfig {
        enabled: p.enabled.unwrap_or(true),
        window: ms(&p.window_ms, "window_ms", 2000, errors),
        min_flows: p.min_flows.unwrap_or(10).max(1),
        ratio: match &p.ratio {
            Some(r) if !(*r.get_ref() > 0.0 && *r.get_ref() <= 10.0) => {
                errors.at(
                    r.span(),
                    "passive.ratio",
                    format!("expected a ratio above 0 and up to 10, got {}", r.get_ref()),
                );
                0.5
            }
            Some(r) => *r.get_ref(),
            None => 0.5,
        },
        hold: ms(&p.hold_ms, "hold_ms", 10_000, errors),
    };
    let ipip = IpipConfig {
        source_v4: raw.ipip.source_v4.as_ref().and_then(|p| parse_prefix(p, "ipip.source_v4", errors)),
        source_v6: raw.ipip.source_v6.as_ref().and_then(|p| parse_prefix(p, "ipip.source_v6", errors)),
    };
    if raw.service.len() > MAX_SERVICES as usize {
        errors.at(0..0, "service", format!("at most {MAX_SERVICES} services, got {}", raw.service.len()));
    }

    let mut services = Vec::new();
    let mut keys = HashSet::new();
    let mut vips = HashSet::new();
    let mut backend_count = 0usize;
    let health_defaults = merge_health("health", &raw.health, &RawHealth::default(), 0, errors);
    for (i, raw_service) in raw.service.iter().enumerate() {
        let service = validate_service(i, raw_service, &raw.health, errors);
        if service.forward == Forward::Ipip {
            let has_source = match service.vip {
                IpAddr::V4(_) => ipip.source_v4.is_some(),
                IpAddr::V6(_) => ipip.source_v6.is_some(),
            };
            if !has_source {
                let which = if service.vip.is_ipv4() { "source_v4" } else { "source_v6" };
                errors.at(
                    raw_service.span(),
                    format!("service[{i}].forward"),
                    format!("forward = \"ipip\" needs [ipip] {which}, the prefix of outer source addresses"),
                );
            }
        }
        if !keys.insert((service.vip, service.port, service.protocol)) {
            errors.at(
                raw_service.span(),
                format!("service[{i}]"),
                format!("{}:{}/{} is defined twice", service.vip, service.port, service.protocol),
            );
        }
        vips.insert(service.vip);
        backend_count += service.backends.len();
        services.push(service);
    }
    if vips.len() > MAX_VIPS as usize {
        errors.at(0..0, "service", format!("at most {MAX_VIPS} distinct VIPs, got {}", vips.len()));
    }
    if backend_count > MAX_BACKENDS as usize {
        errors.at(0..0, "service", format!("at most {MAX_BACKENDS} backends over all services, got {backend_count}"));
    }

    let needed: u64 = services.iter().map(|s| 2 * u64::from(s.maglev_size)).sum();
    let maglev_capacity = match &raw.maglev_capacity {
        Some(cap) => {
            if u64::from(*cap.get_ref()) < needed {
                errors.at(
                    cap.span(),
                    "maglev_capacity",
                    format!("the services need {needed} entries (twice each maglev_size), got {}", cap.get_ref()),
                );
            }
            *cap.get_ref()
        }
        // Headroom for services added at run time.
        None => needed.max(u64::from(lb_common::limits::DEFAULT_MAGLEV_CAPACITY)).min(u64::from(u32::MAX)) as u32,
    };

    Config {
        interface: interface.clone(),
        xdp_mode: raw.xdp_mode,
        hash_seed: raw.hash_seed.unwrap_or(0),
        maglev_capacity,
        flows,
        ipip,
        metrics_listen,
        passive,
        health_defaults,
        egress_interfaces,
        multi_host: raw.multi_host,
        services,
    }
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty() && name.len() <= 15 && !name.contains(|c: char| c == '/' || c.is_whitespace())
}

/// "addr/len" with the host bits clear; for IPv6 at most 32 host bits vary (the last word).
fn parse_prefix<A: std::str::FromStr + Copy + Into<IpAddr>>(
    value: &Spanned<String>,
    field: &str,
    errors: &mut Errors<'_>,
) -> Option<(A, u8)> {
    let text = value.get_ref();
    let parsed = text.split_once('/').and_then(|(a, l)| Some((a.parse::<A>().ok()?, l.parse::<u8>().ok()?)));
    let bits = |a: A| if a.into().is_ipv4() { 32 } else { 128 };
    match parsed {
        Some((addr, len)) if len <= bits(addr) && len > 0 => Some((addr, len)),
        _ => {
            errors.at(
                value.span(),
                field,
                format!("expected a prefix like \"10.1.0.0/24\" or \"fd00:1::/112\", got {text:?}"),
            );
            None
        }
    }
}

fn validate_service(
    i: usize,
    raw: &Spanned<RawService>,
    defaults: &RawHealth,
    errors: &mut Errors<'_>,
) -> ServiceConfig {
    let path = format!("service[{i}]");
    let s = raw.get_ref();
    let vip = parse_unicast(&s.vip, &format!("{path}.vip"), errors);
    let port = *s.port.get_ref();
    if port == 0 {
        errors.at(s.port.span(), format!("{path}.port"), "expected a port from 1 to 65535, got 0");
    }
    let maglev_size = match &s.maglev_size {
        Some(m) => {
            let size = *m.get_ref();
            if !(size <= MAX_MAGLEV_SIZE && is_prime(size)) {
                errors.at(
                    m.span(),
                    format!("{path}.maglev_size"),
                    format!("expected a prime number up to {MAX_MAGLEV_SIZE} (e.g. 65537), got {size}"),
                );
            } else if (size as usize) < s.backend.len() {
                errors.at(
                    m.span(),
                    format!("{path}.maglev_size"),
                    format!(
                        "must be larger than the number of backends ({}); 100 times larger keeps the shares even",
                        s.backend.len()
                    ),
                );
            }
            size
        }
        None => DEFAULT_MAGLEV_SIZE,
    };
    let affinity_timeout_secs = s.affinity_timeout_secs.as_ref().map_or(0, |t| {
        let secs = *t.get_ref();
        let field = format!("{path}.affinity_timeout_secs");
        if secs > MAX_AFFINITY_TIMEOUT_SECS {
            errors.at(t.span(), field, format!("expected 0 to {MAX_AFFINITY_TIMEOUT_SECS} seconds, got {secs}"));
        } else if secs > 0 && s.scheduler != Scheduler::SourceHash {
            errors.at(
                t.span(),
                field,
                format!("only valid with scheduler = \"source-hash\" (this service's is \"{}\")", s.scheduler),
            );
        }
        secs
    });
    let health = merge_health(&path, defaults, &s.health, port, errors);

    if s.backend.is_empty() {
        errors.at(raw.span(), format!("{path}.backend"), "expected at least one [[service.backend]]");
    }
    let mut backends = Vec::new();
    let mut seen = HashSet::new();
    for (j, b) in s.backend.iter().enumerate() {
        let bpath = format!("{path}.backend[{j}]");
        let rb = b.get_ref();
        let address = parse_unicast(&rb.address, &format!("{bpath}.address"), errors);
        if address.is_ipv4() != vip.is_ipv4() {
            errors.at(
                rb.address.span(),
                format!("{bpath}.address"),
                format!("{address} is not of the VIP's family ({vip})"),
            );
        }
        if !seen.insert(address) {
            errors.at(
                rb.address.span(),
                format!("{bpath}.address"),
                format!("{address} is already a backend of this service"),
            );
        }
        let weight = rb.weight.as_ref().map_or(1, |w| {
            if *w.get_ref() > MAX_WEIGHT {
                errors.at(
                    w.span(),
                    format!("{bpath}.weight"),
                    format!("expected a weight from 0 to {MAX_WEIGHT}, got {}", w.get_ref()),
                );
            }
            *w.get_ref()
        });
        let mac = rb.mac.as_ref().and_then(|m| match parse_mac(m.get_ref()) {
            Some(mac) => Some(mac),
            None => {
                errors.at(
                    m.span(),
                    format!("{bpath}.mac"),
                    format!("expected a unicast MAC address like \"02:00:00:00:00:01\", got {:?}", m.get_ref()),
                );
                None
            }
        });
        backends.push(BackendConfig { address, weight, mac });
    }

    ServiceConfig {
        name: s.name.clone().unwrap_or_else(|| format!("{vip}:{port}/{}", s.protocol)),
        vip,
        port,
        protocol: s.protocol,
        forward: s.forward,
        scheduler: s.scheduler,
        affinity_timeout_secs,
        maglev_size,
        health,
        backends,
    }
}

/// A health field from the service, else from the file-wide section, with its span.
fn pick<T: Copy + Into<u64>>(own: &Option<Spanned<T>>, top: &Option<Spanned<T>>) -> Option<(Range<usize>, u64)> {
    own.as_ref().or(top.as_ref()).map(|v| (v.span(), (*v.get_ref()).into()))
}

/// The service's health settings over the file-wide ones over the defaults.
fn merge_health(
    path: &str,
    top: &RawHealth,
    own: &RawHealth,
    service_port: u16,
    errors: &mut Errors<'_>,
) -> HealthConfig {
    let mut h = DEFAULT_HEALTH;
    h.enabled = own.enabled.or(top.enabled).unwrap_or(true);
    h.port = service_port;
    h.check = match own.kind.or(top.kind).unwrap_or(CheckKind::Tcp) {
        CheckKind::Tcp => Check::Tcp,
        CheckKind::Http => {
            let http_path = own.http_path.as_ref().or(top.http_path.as_ref());
            if let Some(p) = http_path.filter(|p| !p.get_ref().starts_with('/')) {
                let got = p.get_ref();
                errors.at(
                    p.span(),
                    format!("{path}.health.http_path"),
                    format!("expected a path starting with '/', got {got:?}"),
                );
            }
            Check::Http {
                path: http_path.map_or_else(|| "/".to_string(), |p| p.get_ref().clone()),
                host: own.http_host.clone().or_else(|| top.http_host.clone()),
                statuses: own.http_status.clone().or_else(|| top.http_status.clone()).unwrap_or_else(|| vec![200]),
            }
        }
        CheckKind::Udp => Check::Udp {
            payload: own
                .udp_payload
                .clone()
                .or_else(|| top.udp_payload.clone())
                .unwrap_or_else(|| "ping".into())
                .into_bytes(),
        },
    };
    if let Some(j) = own.jitter.as_ref().or(top.jitter.as_ref()) {
        if !(0.0..=0.5).contains(j.get_ref()) {
            errors.at(
                j.span(),
                format!("{path}.health.jitter"),
                format!("expected a fraction from 0 to 0.5, got {}", j.get_ref()),
            );
        }
        h.jitter = *j.get_ref();
    }
    if let Some((span, n)) = pick(&own.min_healthy, &top.min_healthy) {
        if n > 100_000 {
            errors.at(span, format!("{path}.health.min_healthy"), format!("expected 0 to 100000, got {n}"));
        }
        h.min_healthy = n as u32;
    }
    if let Some((span, port)) = pick(&own.port, &top.port) {
        if port == 0 {
            errors.at(span, format!("{path}.health.port"), "expected a port from 1 to 65535, got 0");
        }
        h.port = port as u16;
    }
    if let Some((span, ms)) = pick(&own.interval_ms, &top.interval_ms) {
        if !(10..=3_600_000).contains(&ms) {
            errors.at(span, format!("{path}.health.interval_ms"), format!("expected 10 to 3600000 ms, got {ms}"));
        }
        h.interval = Duration::from_millis(ms);
    }
    if let Some((span, ms)) = pick(&own.timeout_ms, &top.timeout_ms) {
        h.timeout = Duration::from_millis(ms);
        if ms == 0 || h.timeout > h.interval {
            let limit = h.interval.as_millis();
            errors.at(
                span,
                format!("{path}.health.timeout_ms"),
                format!("expected 1 to interval_ms ({limit}) ms, got {ms}"),
            );
        }
    }
    for (name, field, value) in
        [("rise", &mut h.rise, pick(&own.rise, &top.rise)), ("fall", &mut h.fall, pick(&own.fall, &top.fall))]
    {
        if let Some((span, n)) = value {
            if !(1..=100).contains(&n) {
                errors.at(span, format!("{path}.health.{name}"), format!("expected 1 to 100, got {n}"));
            }
            *field = n as u32;
        }
    }
    h
}

fn parse_unicast(value: &Spanned<String>, field: &str, errors: &mut Errors<'_>) -> IpAddr {
    match value.get_ref().parse::<IpAddr>() {
        Ok(a) if !(a.is_unspecified() || a.is_multicast() || a == IpAddr::V4(Ipv4Addr::BROADCAST)) => a,
        Ok(a) => {
            errors.at(value.span(), field, format!("expected a unicast address, got {a}"));
            a
        }
        Err(_) => {
            errors.at(value.span(), field, format!("expected an IPv4 or IPv6 address, got {:?}", value.get_ref()));
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
    }
}

/// "aa:bb:cc:dd:ee:ff" → bytes; None unless it is a unicast address.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    let unicast = mac[0] & 1 == 0 && mac != [0; 6];
    (parts.next().is_none() && unicast).then_some(mac)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface = "eth0"
hash_seed = 42

[health]
interval_ms = 200
timeout_ms = 100

[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"

[[service.backend]]
address = "10.0.0.11"

[[service.backend]]
address = "10.0.0.12"
weight = 3
mac = "02:00:00:00:00:12"

[[service]]
vip = "10.0.0.100"
port = 53
protocol = "udp"
maglev_size = 251
[service.health]
port = 5353
fall = 5

[[service.backend]]
address = "10.0.0.13"
"#;

    fn errors(source: &str) -> Vec<ConfigError> {
        Config::parse(source).expect_err("config should be rejected").0
    }

    #[test]
    fn parses_a_complete_config_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.interface, "eth0");
        assert_eq!(c.hash_seed, 42);
        assert_eq!(c.xdp_mode, None);
        assert_eq!(c.services.len(), 2);
        let web = &c.services[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.maglev_size, DEFAULT_MAGLEV_SIZE);
        assert_eq!(web.health.port, 80);
        assert_eq!(web.health.interval, Duration::from_millis(200));
        assert_eq!(web.health.timeout, Duration::from_millis(100));
        assert_eq!((web.health.rise, web.health.fall), (2, 3));
        assert_eq!(web.backends[0].weight, 1);
        assert_eq!(web.backends[1].weight, 3);
        assert_eq!(web.backends[1].mac, Some([2, 0, 0, 0, 0, 0x12]));
        let dns = &c.services[1];
        assert_eq!(dns.name, "10.0.0.100:53/udp");
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.maglev_size, 251);
        assert_eq!(dns.health.port, 5353);
        assert_eq!(dns.health.fall, 5);
        assert_eq!(dns.health.interval, Duration::from_millis(200));
        assert!(c.maglev_capacity >= 2 * (DEFAULT_MAGLEV_SIZE + 251));
    }

    #[test]
    fn syntax_and_type_errors_point_at_the_value() {
        let e = errors(&GOOD.replace("port = 80", "port = 70000"));
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].column), (12, 8), "{e:?}");
        assert!(e[0].message.contains("70000") || e[0].message.contains("u16"), "{e:?}");

        let e = errors(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
        assert!(e[0].message.contains("tcp") && e[0].message.contains("udp"), "{e:?}");
        assert_eq!(e[0].line, 13);

        let e = errors(&GOOD.replace("hash_seed = 42", "hash_sed = 42"));
        assert!(e[0].message.contains("hash_sed"), "{e:?}");
        assert_eq!(e[0].line, 3);

        let e = errors("interface = ");
        assert_eq!(e[0].line, 1);
    }

    #[test]
    fn semantic_errors_name_line_and_field() {
        let bad = GOOD
            .replace("\"10.0.0.11\"", "\"10.0.0.300\"")
            .replace("maglev_size = 251", "maglev_size = 250")
            .replace("02:00:00:00:00:12", "01:00:5e:00:00:01")
            .replace("weight = 3", "weight = 70000");
        let e = errors(&bad);
        let fields: Vec<_> = e.iter().map(|e| (e.line, e.field.as_str())).collect();
        assert_eq!(
            fields,
            [
                (16, "service[0].backend[0].address"),
                (20, "service[0].backend[1].weight"),
                (21, "service[0].backend[1].mac"),
                (27, "service[1].maglev_size"),
            ],
            "{e:#?}"
        );
        assert!(e[0].message.contains("10.0.0.300"));
        assert!(e[0].message.starts_with("expected an IPv4 or IPv6 address"));
        assert!(e[3].message.contains("prime"));
        let shown = ConfigErrors(e).to_string();
        assert!(
            shown.starts_with("line 16, column 11: service[0].backend[0].address: expected an IPv4 or IPv6 address"),
            "{shown}"
        );
    }

    #[test]
    fn duplicates_and_missing_parts_are_rejected() {
        let dup = GOOD.replace("port = 53", "port = 80").replace("\"udp\"", "\"tcp\"");
        let e = errors(&dup);
        assert!(e.iter().any(|e| e.message.contains("defined twice")), "{e:?}");

        let dup_backend = GOOD.replace("\"10.0.0.12\"", "\"10.0.0.11\"");
        assert!(errors(&dup_backend).iter().any(|e| e.message.contains("already a backend")));

        assert!(errors("interface = \"eth0\"\n").iter().any(|e| e.message.contains("at least one [[service]]")));
        let no_backend = "interface = \"eth0\"\n[[service]]\nvip = \"10.0.0.1\"\nport = 1\nprotocol = \"udp\"\n";
        assert!(errors(no_backend).iter().any(|e| e.field == "service[0].backend"));

        let bad_if = GOOD.replace("\"eth0\"", "\"a/very/long/interface\"");
        assert_eq!(errors(&bad_if)[0].field, "interface");

        let bad_timeout = GOOD.replace("timeout_ms = 100", "timeout_ms = 300");
        assert!(errors(&bad_timeout).iter().any(|e| e.field.ends_with("health.timeout_ms")));

        let vip0 = GOOD.replace("vip = \"10.0.0.100\"\nport = 80", "vip = \"0.0.0.0\"\nport = 80");
        assert!(errors(&vip0)[0].message.contains("unicast"));

        let small_cap = GOOD.replace("hash_seed = 42", "hash_seed = 42\nmaglev_capacity = 1000");
        assert_eq!(errors(&small_cap)[0].field, "maglev_capacity");
    }

    #[test]
    fn schedulers_parse_and_rr_on_several_hosts_warns() {
        let c = Config::parse(GOOD).unwrap();
        assert!(c.services.iter().all(|s| s.scheduler == Scheduler::Maglev));
        assert!(!c.multi_host && c.warnings().is_empty());
        for (text, want) in [
            ("maglev", Scheduler::Maglev),
            ("rr", Scheduler::Rr),
            ("wrr", Scheduler::Wrr),
            ("source-hash", Scheduler::SourceHash),
            ("lc", Scheduler::Lc),
            ("wlc", Scheduler::Wlc),
        ] {
            let c =
                Config::parse(&GOOD.replace("port = 80\n", &format!("port = 80\nscheduler = \"{text}\"\n"))).unwrap();
            assert_eq!(c.services[0].scheduler, want);
            assert_eq!(want.to_string(), text);
            // One host: no warning, whatever the scheduler.
            assert!(c.warnings().is_empty());
        }
        let e = errors(&GOOD.replace("port = 80\n", "port = 80\nscheduler = \"lottery\"\n"));
        assert_eq!(e[0].line, 13, "{e:?}");
        assert!(e[0].message.contains("source-hash"), "{e:?}");

        let multi = GOOD.replace("hash_seed = 42", "hash_seed = 42\nmulti_host = true");
        assert!(Config::parse(&multi).unwrap().warnings().is_empty(), "maglev gives one answer everywhere");
        let sh = Config::parse(&multi.replace("port = 53\n", "port = 53\nscheduler = \"source-hash\"\n")).unwrap();
        assert!(sh.warnings().is_empty());
        let rr = Config::parse(&multi.replace("port = 53\n", "port = 53\nscheduler = \"wrr\"\n")).unwrap();
        let w = rr.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("service[1].scheduler: service 10.0.0.100:53/udp: scheduler \"wrr\""), "{w:?}");
    }

    #[test]
    fn affinity_timeout_only_with_source_hash() {
        assert_eq!(Config::parse(GOOD).unwrap().services[0].affinity_timeout_secs, 0);
        let with = |extra: &str| GOOD.replace("port = 80\n", &format!("port = 80\n{extra}"));
        let c = Config::parse(&with("scheduler = \"source-hash\"\naffinity_timeout_secs = 600\n")).unwrap();
        assert_eq!((c.services[0].scheduler, c.services[0].affinity_timeout_secs), (Scheduler::SourceHash, 600));
        // 0 is off, whatever the scheduler.
        assert_eq!(Config::parse(&with("affinity_timeout_secs = 0\n")).unwrap().services[0].affinity_timeout_secs, 0);

        let e = errors(&with("affinity_timeout_secs = 60\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].line, e[0].field.as_str()), (13, "service[0].affinity_timeout_secs"), "{e:?}");
        assert!(e[0].message.contains("source-hash") && e[0].message.contains("\"maglev\""), "{e:?}");
        let e = errors(&with("scheduler = \"rr\"\naffinity_timeout_secs = 60\n"));
        assert_eq!((e[0].line, e[0].field.as_str()), (14, "service[0].affinity_timeout_secs"), "{e:?}");

        let e = errors(&with("scheduler = \"source-hash\"\naffinity_timeout_secs = 65536\n"));
        assert_eq!((e[0].line, e[0].field.as_str()), (14, "service[0].affinity_timeout_secs"), "{e:?}");
        assert!(e[0].message.contains("65535"), "{e:?}");
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:aa:BB:00:00:01"), Some([2, 0xaa, 0xbb, 0, 0, 1]));
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "0g:00:00:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "2:0:0:0:0:1",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(format_mac([2, 0xaa, 0, 0, 0, 1]), "02:aa:00:00:00:01");
    }
}
