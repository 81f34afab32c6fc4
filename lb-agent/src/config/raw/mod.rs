//! The TOML file as written, and its reading into a [`Config`]: syntax, types and each value's
//! range, with every value's place in the file, so that the errors of the whole-config
//! validator point at a line and column too.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    ops::Range,
    time::Duration,
};

use lb_common::limits::{
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_CAPACITY, DEFAULT_MAGLEV_SIZE, DEFAULT_NEW_FLOWS_PER_CPU_SEC,
    DEFAULT_UDP_IDLE_SECS,
};
use serde::Deserialize;
use toml::Spanned;

use super::{
    BackendConfig, Check, CheckKind, Config, ConfigError, ConfigErrors, FlowConfig, Forward, HealthConfig,
    InitialState, InvalidKind, IpipConfig, PassiveConfig, Protocol, Scheduler, ServiceConfig, XdpMode,
};
use crate::net::mac::parse_mac;

mod bgp;
mod l7;

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
    bgp: Option<Spanned<bgp::RawBgp>>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    #[serde(default)]
    l7: Vec<Spanned<l7::RawL7>>,
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
    max_hold_ms: Option<Spanned<u64>>,
    min_completion: Option<Spanned<f64>>,
    max_ejected_percent: Option<Spanned<u32>>,
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
    initial_state: Option<InitialState>,
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
    initial_up: false,
};

/// Collects errors against the source text, turning byte spans into line and column, and the
/// span of every field the whole-config validator may name.
struct Errors<'a> {
    source: &'a str,
    errors: Vec<ConfigError>,
    spans: HashMap<String, Range<usize>>,
}

impl Errors<'_> {
    fn at(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        self.at_kind(span, field, InvalidKind::BadValue, message);
    }

    fn at_kind(&mut self, span: Range<usize>, field: impl Into<String>, kind: InvalidKind, message: impl Into<String>) {
        let start = span.start.min(self.source.len());
        let before = &self.source[..start];
        let line = before.matches('\n').count() + 1;
        let column = start - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        self.errors.push(ConfigError { line, column, field: field.into(), kind, message: message.into() });
    }

    fn span(&mut self, field: String, span: Range<usize>) {
        self.spans.insert(field, span);
    }

    /// The span of `field`, or of the nearest enclosing field that has one.
    fn span_of(&self, field: &str) -> Range<usize> {
        let mut f = field;
        loop {
            if let Some(span) = self.spans.get(f) {
                return span.clone();
            }
            match f.rfind(['.', '[']) {
                Some(i) => f = &f[..i],
                None => return 0..0,
            }
        }
    }
}

/// Parses `source` and validates the result as a whole ([`super::validate`]); on failure,
/// every error found, in file order. A field whose value could not be read is reported once.
pub(super) fn parse(source: &str) -> Result<Config, ConfigErrors> {
    let mut errors = Errors { source, errors: Vec::new(), spans: HashMap::new() };
    let raw: RawConfig = match toml::from_str(source) {
        Ok(raw) => raw,
        Err(e) => {
            errors.at_kind(e.span().unwrap_or(0..0), "", InvalidKind::Syntax, e.message().trim_end());
            return Err(ConfigErrors(errors.errors));
        }
    };
    let config = read(raw, &mut errors);
    for invalid in super::validate(&config) {
        if errors.errors.iter().any(|e| e.field == invalid.field) {
            continue;
        }
        let span = errors.span_of(&invalid.field);
        errors.at_kind(span, invalid.field, invalid.kind, invalid.message);
    }
    if errors.errors.is_empty() {
        Ok(config)
    } else {
        errors.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(errors.errors))
    }
}

fn read(raw: RawConfig, errors: &mut Errors<'_>) -> Config {
    let interface = raw.interface.get_ref();
    if !valid_ifname(interface) {
        errors.at(
            raw.interface.span(),
            "interface",
            format!("expected an interface name of 1 to 15 characters without '/' or spaces, got {interface:?}"),
        );
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
        max_hold: ms(&p.max_hold_ms, "max_hold_ms", 300_000, errors),
        min_completion: match &p.min_completion {
            Some(r) if !(0.0..=1.0).contains(r.get_ref()) => {
                errors.at(r.span(), "passive.min_completion", format!("expected 0 to 1, got {}", r.get_ref()));
                0.5
            }
            Some(r) => *r.get_ref(),
            None => 0.5,
        },
        max_ejected_percent: match &p.max_ejected_percent {
            Some(n) if *n.get_ref() > 100 => {
                errors.at(n.span(), "passive.max_ejected_percent", format!("expected 0 to 100, got {}", n.get_ref()));
                50
            }
            Some(n) => *n.get_ref(),
            None => 50,
        },
    };
    let ipip = IpipConfig {
        source_v4: raw.ipip.source_v4.as_ref().and_then(|p| parse_prefix(p, "ipip.source_v4", errors)),
        source_v6: raw.ipip.source_v6.as_ref().and_then(|p| parse_prefix(p, "ipip.source_v6", errors)),
    };
    let health_defaults = merge_health("", &raw.health, &RawHealth::default(), 0, errors);
    let services: Vec<ServiceConfig> =
        raw.service.iter().enumerate().map(|(i, s)| read_service(i, s, &raw.health, errors)).collect();
    let maglev_capacity = match &raw.maglev_capacity {
        Some(cap) => {
            errors.span("maglev_capacity".into(), cap.span());
            *cap.get_ref()
        }
        // Headroom for services added at run time.
        None => {
            let needed = super::maglev_entries_needed(&services);
            needed.max(u64::from(DEFAULT_MAGLEV_CAPACITY)).min(u64::from(u32::MAX)) as u32
        }
    };
    let bgp = raw.bgp.as_ref().map(|b| bgp::read(b, errors));
    let l7 = raw.l7.iter().enumerate().map(|(i, s)| l7::read(i, s, &raw.health, errors)).collect();
    Config {
        interface: interface.clone(),
        xdp_mode: raw.xdp_mode,
        hash_seed: raw.hash_seed.unwrap_or(0),
        hash_seed_set: raw.hash_seed.is_some(),
        bgp,
        maglev_capacity,
        flows,
        ipip,
        metrics_listen,
        passive,
        health_defaults,
        egress_interfaces,
        multi_host: raw.multi_host,
        services,
        l7,
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

fn read_service(i: usize, raw: &Spanned<RawService>, defaults: &RawHealth, errors: &mut Errors<'_>) -> ServiceConfig {
    let path = format!("service[{i}]");
    let s = raw.get_ref();
    errors.span(path.clone(), raw.span());
    errors.span(format!("{path}.vip"), s.vip.span());
    errors.span(format!("{path}.port"), s.port.span());
    let vip = parse_address(&s.vip, &format!("{path}.vip"), errors);
    let port = *s.port.get_ref();
    let maglev_size = s.maglev_size.as_ref().map_or(DEFAULT_MAGLEV_SIZE, |m| {
        errors.span(format!("{path}.maglev_size"), m.span());
        *m.get_ref()
    });
    let affinity_timeout_secs = s.affinity_timeout_secs.as_ref().map_or(0, |t| {
        errors.span(format!("{path}.affinity_timeout_secs"), t.span());
        *t.get_ref()
    });
    let health = merge_health(&path, defaults, &s.health, port, errors);
    if s.backend.is_empty() {
        errors.at_kind(
            raw.span(),
            format!("{path}.backend"),
            InvalidKind::Missing,
            "expected at least one [[service.backend]]",
        );
    }
    let mut backends = Vec::new();
    for (j, b) in s.backend.iter().enumerate() {
        let bpath = format!("{path}.backend[{j}]");
        let rb = b.get_ref();
        errors.span(bpath.clone(), b.span());
        errors.span(format!("{bpath}.address"), rb.address.span());
        let address = parse_address(&rb.address, &format!("{bpath}.address"), errors);
        let weight = rb.weight.as_ref().map_or(1, |w| {
            errors.span(format!("{bpath}.weight"), w.span());
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
    // Where the fields sit: `health.x` at the top, `service[0].health.x` in a service.
    let at = if path.is_empty() { "health.".to_string() } else { format!("{path}.health.") };
    let mut h = DEFAULT_HEALTH;
    h.enabled = own.enabled.or(top.enabled).unwrap_or(true);
    h.initial_up = own.initial_state.or(top.initial_state) == Some(InitialState::Up);
    h.port = service_port;
    h.check = match own.kind.or(top.kind).unwrap_or(CheckKind::Tcp) {
        CheckKind::Tcp => Check::Tcp,
        CheckKind::Http => {
            let http_path = own.http_path.as_ref().or(top.http_path.as_ref());
            if let Some(p) = http_path.filter(|p| !p.get_ref().starts_with('/')) {
                let got = p.get_ref();
                errors.at(
                    p.span(),
                    format!("{at}http_path"),
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
                format!("{at}jitter"),
                format!("expected a fraction from 0 to 0.5, got {}", j.get_ref()),
            );
        }
        h.jitter = *j.get_ref();
    }
    if let Some((span, n)) = pick(&own.min_healthy, &top.min_healthy) {
        if n > 100_000 {
            errors.at(span, format!("{at}min_healthy"), format!("expected 0 to 100000, got {n}"));
        }
        h.min_healthy = n as u32;
    }
    if let Some((span, port)) = pick(&own.port, &top.port) {
        if port == 0 {
            errors.at(span, format!("{at}port"), "expected a port from 1 to 65535, got 0");
        }
        h.port = port as u16;
    }
    if let Some((span, ms)) = pick(&own.interval_ms, &top.interval_ms) {
        if !(10..=3_600_000).contains(&ms) {
            errors.at(span, format!("{at}interval_ms"), format!("expected 10 to 3600000 ms, got {ms}"));
        }
        h.interval = Duration::from_millis(ms);
    }
    if let Some((span, ms)) = pick(&own.timeout_ms, &top.timeout_ms) {
        h.timeout = Duration::from_millis(ms);
        if ms == 0 || h.timeout > h.interval {
            let limit = h.interval.as_millis();
            errors.at(span, format!("{at}timeout_ms"), format!("expected 1 to interval_ms ({limit}) ms, got {ms}"));
        }
    }
    for (name, field, value) in
        [("rise", &mut h.rise, pick(&own.rise, &top.rise)), ("fall", &mut h.fall, pick(&own.fall, &top.fall))]
    {
        if let Some((span, n)) = value {
            if !(1..=100).contains(&n) {
                errors.at(span, format!("{at}{name}"), format!("expected 1 to 100, got {n}"));
            }
            *field = n as u32;
        }
    }
    h
}

/// An address, or the unspecified one (reported) when the value is none; whether it may be
/// used where it stands is the validator's question.
fn parse_address(value: &Spanned<String>, field: &str, errors: &mut Errors<'_>) -> IpAddr {
    value.get_ref().parse::<IpAddr>().unwrap_or_else(|_| {
        errors.at(value.span(), field, format!("expected an IPv4 or IPv6 address, got {:?}", value.get_ref()));
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    })
}
