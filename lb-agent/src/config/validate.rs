//! The one validator of a whole [`Config`]: what the file and the control API must both
//! respect before anything reaches the data path. The file's reader checks each value's syntax
//! and range (it knows where the value is); this checks the config as a whole: services and
//! backends, how they relate, and every limit of the maps. A config that passes fits the maps,
//! so applying it cannot half-fail on a limit.
use std::collections::HashSet;

use lb_common::limits::{MAX_BACKENDS, MAX_MAGLEV_SIZE, MAX_SERVICES, MAX_TX_PORTS, MAX_VIPS};
use lb_common::MAX_AFFINITY_TIMEOUT_SECS;

use super::{Config, Forward, Invalid, InvalidKind, Scheduler, ServiceConfig, MAX_WEIGHT};
use crate::tables::maglev::is_prime;

/// Every problem of `config` as a whole, in the order of its fields; empty when it is valid.
pub fn validate(config: &Config) -> Vec<Invalid> {
    let mut out = Vec::new();
    let mut bad = |field: String, kind: InvalidKind, message: String| out.push(Invalid { field, kind, message });
    if config.services.is_empty() && config.l7.is_empty() {
        bad("service".into(), InvalidKind::Missing, "expected at least one [[service]] or [[l7]]".into());
    }
    if config.egress_interfaces.len() >= MAX_TX_PORTS as usize {
        bad("egress_interfaces".into(), InvalidKind::Limit, format!("at most {} interfaces", MAX_TX_PORTS - 1));
    }
    if config.services.len() > MAX_SERVICES as usize {
        let n = config.services.len();
        bad("service".into(), InvalidKind::Limit, format!("at most {MAX_SERVICES} services, got {n}"));
    }
    let (mut keys, mut names, mut vips) = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut backend_count = 0usize;
    for (i, s) in config.services.iter().enumerate() {
        let path = format!("service[{i}]");
        if !is_unicast(s.vip) {
            bad(format!("{path}.vip"), InvalidKind::BadValue, format!("expected a unicast address, got {}", s.vip));
        }
        if s.port == 0 {
            bad(format!("{path}.port"), InvalidKind::BadValue, "expected a port from 1 to 65535, got 0".into());
        }
        if !keys.insert((s.vip, s.port, s.protocol)) {
            let message = format!("{}:{}/{} is defined twice", s.vip, s.port, s.protocol);
            bad(path.clone(), InvalidKind::Duplicate, message);
        }
        if !names.insert(s.name.as_str()) {
            bad(format!("{path}.name"), InvalidKind::Duplicate, format!("a service is already named {:?}", s.name));
        }
        if !(s.maglev_size <= MAX_MAGLEV_SIZE && is_prime(s.maglev_size)) {
            let message =
                format!("expected a prime number up to {MAX_MAGLEV_SIZE} (e.g. 65537), got {}", s.maglev_size);
            bad(format!("{path}.maglev_size"), InvalidKind::BadValue, message);
        } else if (s.maglev_size as usize) < s.backends.len() {
            let message = format!(
                "must be larger than the number of backends ({}); 100 times larger keeps the shares even",
                s.backends.len()
            );
            bad(format!("{path}.maglev_size"), InvalidKind::Limit, message);
        }
        let field = format!("{path}.affinity_timeout_secs");
        if s.affinity_timeout_secs > MAX_AFFINITY_TIMEOUT_SECS {
            let message = format!("expected 0 to {MAX_AFFINITY_TIMEOUT_SECS} seconds, got {}", s.affinity_timeout_secs);
            bad(field, InvalidKind::BadValue, message);
        } else if s.affinity_timeout_secs > 0 && s.scheduler != Scheduler::SourceHash {
            let message =
                format!("only valid with scheduler = \"source-hash\" (this service's is \"{}\")", s.scheduler);
            bad(field, InvalidKind::OnlyWithSourceHash, message);
        }
        let has_source =
            if s.vip.is_ipv4() { config.ipip.source_v4.is_some() } else { config.ipip.source_v6.is_some() };
        if s.forward == Forward::Ipip && !has_source {
            let which = if s.vip.is_ipv4() { "source_v4" } else { "source_v6" };
            let message = format!("forward = \"ipip\" needs [ipip] {which}, the prefix of outer source addresses");
            bad(format!("{path}.forward"), InvalidKind::NeedsIpipSource, message);
        }
        let mut seen = HashSet::new();
        for (j, b) in s.backends.iter().enumerate() {
            let field = format!("{path}.backend[{j}].address");
            if !is_unicast(b.address) {
                bad(field, InvalidKind::BadValue, format!("expected a unicast address, got {}", b.address));
            } else if b.address.is_ipv4() != s.vip.is_ipv4() {
                let message = format!("{} is not of the VIP's family ({})", b.address, s.vip);
                bad(field, InvalidKind::WrongFamily, message);
            } else if !seen.insert(b.address) {
                let message = format!("{} is already a backend of this service", b.address);
                bad(field, InvalidKind::Duplicate, message);
            }
            if b.weight > MAX_WEIGHT {
                let message = format!("expected a weight from 0 to {MAX_WEIGHT}, got {}", b.weight);
                bad(format!("{path}.backend[{j}].weight"), InvalidKind::BadValue, message);
            }
        }
        vips.insert(s.vip);
        backend_count += s.backends.len();
    }
    if vips.len() > MAX_VIPS as usize {
        bad("service".into(), InvalidKind::Limit, format!("at most {MAX_VIPS} distinct VIPs, got {}", vips.len()));
    }
    if backend_count > MAX_BACKENDS as usize {
        let message = format!("at most {MAX_BACKENDS} backends over all services, got {backend_count}");
        bad("service".into(), InvalidKind::Limit, message);
    }
    let needed = maglev_entries_needed(&config.services);
    if u64::from(config.maglev_capacity) < needed {
        let message =
            format!("the services need {needed} entries (twice each maglev_size), got {}", config.maglev_capacity);
        bad("maglev_capacity".into(), InvalidKind::Limit, message);
    }
    let names: HashSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    out.extend(validate_l7(config, &names));
    out
}

/// The L7 services as a whole: names, listeners, what each mode takes, routes and pools.
fn validate_l7(config: &Config, l4_names: &HashSet<&str>) -> Vec<Invalid> {
    use super::l7::L7Mode;
    let mut out = Vec::new();
    let mut bad = |field: String, kind: InvalidKind, message: String| out.push(Invalid { field, kind, message });
    let (mut names, mut listens) = (HashSet::new(), HashSet::new());
    for (i, s) in config.l7.iter().enumerate() {
        let path = format!("l7[{i}]");
        if l4_names.contains(s.name.as_str()) || !names.insert(s.name.as_str()) {
            bad(format!("{path}.name"), InvalidKind::Duplicate, format!("a service is already named {:?}", s.name));
        }
        if s.listen.port() == 0 {
            bad(format!("{path}.listen"), InvalidKind::BadValue, "expected a port from 1 to 65535, got 0".into());
        } else if !listens.insert(s.listen) {
            bad(format!("{path}.listen"), InvalidKind::Duplicate, format!("another [[l7]] listens on {}", s.listen));
        }
        match (s.mode, s.tls.is_empty()) {
            (L7Mode::Https, true) => {
                bad(format!("{path}.tls"), InvalidKind::Missing, "mode \"https\" needs at least one [[l7.tls]]".into())
            }
            (L7Mode::Http | L7Mode::TcpProxy, false) => bad(
                format!("{path}.tls"),
                InvalidKind::BadValue,
                format!("[[l7.tls]] is for mode \"https\", not \"{}\"", s.mode),
            ),
            _ => {}
        }
        if s.mode == L7Mode::TcpProxy {
            if s.cookie.is_some() {
                let message = "cookies need HTTP: mode \"http\" or \"https\"".to_string();
                bad(format!("{path}.cookie"), InvalidKind::BadValue, message);
            }
            if !s.routes.is_empty() {
                let message = "routes need HTTP: mode \"http\" or \"https\"".to_string();
                bad(format!("{path}.route"), InvalidKind::BadValue, message);
            }
        }
        if matches!(s.health.check, super::Check::Udp { .. }) {
            bad(
                format!("{path}.health.kind"),
                InvalidKind::BadValue,
                "expected \"tcp\" or \"http\" for an L7 service".into(),
            );
        }
        let pools: HashSet<&str> = s.backends.iter().map(|b| b.pool.as_str()).collect();
        for (k, r) in s.routes.iter().enumerate() {
            if !pools.contains(r.pool.as_str()) {
                let message = format!("no [[l7.backend]] is in pool {:?}", r.pool);
                bad(format!("{path}.route[{k}].pool"), InvalidKind::Missing, message);
            }
        }
        let mut seen = HashSet::new();
        for (j, b) in s.backends.iter().enumerate() {
            let field = format!("{path}.backend[{j}].address");
            if !is_unicast(b.address.ip()) || b.address.port() == 0 {
                bad(field, InvalidKind::BadValue, format!("expected a unicast address and a port, got {}", b.address));
            } else if !seen.insert((b.address, b.pool.as_str())) {
                bad(field, InvalidKind::Duplicate, format!("{} is already in pool {:?}", b.address, b.pool));
            }
            if b.weight > MAX_WEIGHT {
                let message = format!("expected a weight from 0 to {MAX_WEIGHT}, got {}", b.weight);
                bad(format!("{path}.backend[{j}].weight"), InvalidKind::BadValue, message);
            }
        }
    }
    out
}

/// Entries of the MAGLEV map these services take: two copies of each table.
pub fn maglev_entries_needed(services: &[ServiceConfig]) -> u64 {
    services.iter().map(|s| 2 * u64::from(s.maglev_size)).sum()
}

fn is_unicast(a: std::net::IpAddr) -> bool {
    !(a.is_unspecified() || a.is_multicast() || a == std::net::IpAddr::V4(std::net::Ipv4Addr::BROADCAST))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::config::{BackendConfig, Protocol};

    fn config_with_vips(n: u32) -> Config {
        let mut c = Config::parse(
            "interface = \"eth0\"\n[[service]]\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\nmaglev_size = 251\n\
             [[service.backend]]\naddress = \"10.1.0.1\"\n",
        )
        .unwrap();
        let template = c.services[0].clone();
        c.services = (0..n)
            .map(|i| {
                let mut s = template.clone();
                s.vip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i + 1));
                s.name = format!("s{i}");
                s
            })
            .collect();
        c.maglev_capacity = u32::MAX;
        c
    }

    #[test]
    fn limits_hold_for_a_config_built_in_memory() {
        assert!(validate(&config_with_vips(MAX_VIPS)).is_empty());
        let over = validate(&config_with_vips(MAX_VIPS + 1));
        assert!(over.iter().any(|e| e.field == "service" && e.kind == InvalidKind::Limit), "{over:?}");

        let mut c = config_with_vips(2);
        c.maglev_capacity = 4 * 251 - 1;
        assert_eq!(
            validate(&c).iter().map(|e| (e.field.as_str(), e.kind)).collect::<Vec<_>>(),
            [("maglev_capacity", InvalidKind::Limit)]
        );

        let mut c = config_with_vips(2);
        c.services[1].name = "s0".into();
        c.services[0].backends.push(BackendConfig { address: "fd00::1".parse().unwrap(), weight: 1, mac: None });
        c.services[1].protocol = Protocol::Udp;
        let kinds: Vec<_> = validate(&c).into_iter().map(|e| (e.field, e.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("service[0].backend[1].address".to_string(), InvalidKind::WrongFamily),
                ("service[1].name".to_string(), InvalidKind::Duplicate),
            ]
        );
    }
}
