//! `[bgp]` as written, and its reading: each value's syntax and range, with its place.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use super::{parse_address, Errors};
use crate::config::{BfdConfig, BgpConfig, Bird, Community, InvalidKind, ManagedBird, NeighborConfig};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBgp {
    local_as: Option<Spanned<u32>>,
    router_id: Option<Spanned<String>>,
    bird_socket: Option<Spanned<String>>,
    bird_binary: Option<Spanned<String>>,
    run_dir: Option<Spanned<String>>,
    drain_secs: Option<Spanned<u32>>,
    withdraw_wait_ms: Option<Spanned<u64>>,
    #[serde(default)]
    neighbor: Vec<Spanned<RawNeighbor>>,
    #[serde(default)]
    vip: Vec<Spanned<RawBgpVip>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNeighbor {
    address: Spanned<String>,
    peer_as: Spanned<u32>,
    password: Option<Spanned<String>>,
    hold_secs: Option<Spanned<u16>>,
    #[serde(default)]
    bfd: bool,
    bfd_interval_ms: Option<Spanned<u32>>,
    bfd_multiplier: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBgpVip {
    address: Spanned<String>,
    #[serde(default)]
    communities: Vec<Spanned<String>>,
}

/// Text that goes into BIRD's config between double quotes: no quote, backslash or line end
/// can end the string early and inject configuration.
fn bird_string(value: &Spanned<String>, field: &str, errors: &mut Errors<'_>) -> String {
    let text = value.get_ref();
    if text.is_empty() || text.contains(['"', '\\', '\n', '\r']) {
        errors.at(
            value.span(),
            field,
            format!("expected a non-empty value without quotes, backslashes or line breaks, got {text:?}"),
        );
    }
    text.clone()
}

pub(super) fn read(raw: &Spanned<RawBgp>, errors: &mut Errors<'_>) -> BgpConfig {
    let b = raw.get_ref();
    errors.span("bgp".into(), raw.span());
    let bird = match &b.bird_socket {
        Some(socket) => {
            let path = bird_string(socket, "bgp.bird_socket", errors);
            for (set, field) in [
                (b.local_as.is_some(), "local_as"),
                (b.router_id.is_some(), "router_id"),
                (!b.neighbor.is_empty(), "neighbor"),
                (b.run_dir.is_some(), "run_dir"),
                (b.bird_binary.is_some(), "bird_binary"),
            ] {
                if set {
                    errors.at(
                        socket.span(),
                        format!("bgp.{field}"),
                        format!("bgp.{field} configures the BIRD the agent runs; with bird_socket the operator's BIRD has its own"),
                    );
                }
            }
            Bird::External { socket: path.into() }
        }
        None => Bird::Managed(read_managed(raw, errors)),
    };
    let mut communities: Vec<(IpAddr, Vec<Community>)> = Vec::new();
    for (i, v) in b.vip.iter().enumerate() {
        let path = format!("bgp.vip[{i}]");
        let address = parse_address(&v.get_ref().address, &format!("{path}.address"), errors);
        if communities.iter().any(|(a, _)| *a == address) {
            errors.at_kind(
                v.span(),
                format!("{path}.address"),
                InvalidKind::Duplicate,
                format!("{address} has communities already"),
            );
        }
        let list = v
            .get_ref()
            .communities
            .iter()
            .enumerate()
            .filter_map(|(j, c)| {
                let parsed = c
                    .get_ref()
                    .split_once(':')
                    .and_then(|(a, v)| Some((a.parse::<u16>().ok()?, v.parse::<u16>().ok()?)));
                if parsed.is_none() {
                    errors.at(
                        c.span(),
                        format!("{path}.communities[{j}]"),
                        format!("expected ASN:VALUE with both up to 65535, like \"65001:100\", got {:?}", c.get_ref()),
                    );
                }
                parsed
            })
            .collect();
        communities.push((address, list));
    }
    let drain = b.drain_secs.as_ref().map_or(10, |d| {
        if *d.get_ref() > 3600 {
            errors.at(d.span(), "bgp.drain_secs", format!("expected 0 to 3600 seconds, got {}", d.get_ref()));
        }
        *d.get_ref()
    });
    let withdraw_wait = b.withdraw_wait_ms.as_ref().map_or(1000, |w| {
        if *w.get_ref() > 60_000 {
            errors.at(w.span(), "bgp.withdraw_wait_ms", format!("expected 0 to 60000 ms, got {}", w.get_ref()));
        }
        *w.get_ref()
    });
    BgpConfig {
        bird,
        communities,
        drain: Duration::from_secs(u64::from(drain)),
        withdraw_wait: Duration::from_millis(withdraw_wait),
    }
}

/// AS numbers a session can use: not 0, not AS_TRANS (23456), not the last one (reserved).
fn valid_asn(asn: u32) -> bool {
    asn != 0 && asn != 23_456 && asn != u32::MAX
}

fn read_managed(raw: &Spanned<RawBgp>, errors: &mut Errors<'_>) -> ManagedBird {
    let b = raw.get_ref();
    let local_as = match &b.local_as {
        Some(asn) if !valid_asn(*asn.get_ref()) => {
            errors.at(
                asn.span(),
                "bgp.local_as",
                format!("expected an AS number from 1 to 4294967294 other than 23456, got {}", asn.get_ref()),
            );
            1
        }
        Some(asn) => *asn.get_ref(),
        None => {
            errors.at_kind(
                raw.span(),
                "bgp.local_as",
                InvalidKind::Missing,
                "expected local_as (this host's AS number), or bird_socket for a BIRD you run",
            );
            1
        }
    };
    let router_id = match &b.router_id {
        Some(id) => id.get_ref().parse::<Ipv4Addr>().ok().filter(|a| !a.is_unspecified()).unwrap_or_else(|| {
            errors.at(
                id.span(),
                "bgp.router_id",
                format!(
                    "expected a non-zero IPv4 address unique to this host, like \"10.0.0.2\", got {:?}",
                    id.get_ref()
                ),
            );
            Ipv4Addr::UNSPECIFIED
        }),
        None => {
            errors.at_kind(
                raw.span(),
                "bgp.router_id",
                InvalidKind::Missing,
                "expected router_id (an IPv4 address unique to this host)",
            );
            Ipv4Addr::UNSPECIFIED
        }
    };
    if b.neighbor.is_empty() {
        errors.at_kind(raw.span(), "bgp.neighbor", InvalidKind::Missing, "expected at least one [[bgp.neighbor]]");
    }
    let mut neighbors: Vec<NeighborConfig> = Vec::new();
    for (i, n) in b.neighbor.iter().enumerate() {
        let path = format!("bgp.neighbor[{i}]");
        let rn = n.get_ref();
        let address = parse_address(&rn.address, &format!("{path}.address"), errors);
        if neighbors.iter().any(|x| x.address == address) {
            errors.at_kind(
                rn.address.span(),
                format!("{path}.address"),
                InvalidKind::Duplicate,
                format!("{address} is a neighbour already"),
            );
        }
        let peer_as = *rn.peer_as.get_ref();
        if !valid_asn(peer_as) {
            errors.at(
                rn.peer_as.span(),
                format!("{path}.peer_as"),
                format!("expected an AS number from 1 to 4294967294 other than 23456, got {peer_as}"),
            );
        }
        let hold_secs = rn.hold_secs.as_ref().map_or(3, |h| {
            if *h.get_ref() < 3 {
                errors.at(
                    h.span(),
                    format!("{path}.hold_secs"),
                    format!("expected 3 to 65535 seconds, got {}", h.get_ref()),
                );
            }
            *h.get_ref()
        });
        let password = rn.password.as_ref().map(|p| bird_string(p, &format!("{path}.password"), errors));
        let interval = rn.bfd_interval_ms.as_ref().map_or(100, |v| {
            if !(10..=10_000).contains(v.get_ref()) {
                errors.at(
                    v.span(),
                    format!("{path}.bfd_interval_ms"),
                    format!("expected 10 to 10000 ms, got {}", v.get_ref()),
                );
            }
            *v.get_ref()
        });
        let multiplier = rn.bfd_multiplier.as_ref().map_or(3, |v| {
            if !(1..=255).contains(v.get_ref()) {
                errors.at(
                    v.span(),
                    format!("{path}.bfd_multiplier"),
                    format!("expected 1 to 255, got {}", v.get_ref()),
                );
            }
            *v.get_ref()
        });
        let bfd = rn.bfd.then_some(BfdConfig { interval: Duration::from_millis(u64::from(interval)), multiplier });
        neighbors.push(NeighborConfig { address, peer_as, password, hold_secs, bfd });
    }
    let binary =
        b.bird_binary.as_ref().map_or_else(|| "bird".to_string(), |v| bird_string(v, "bgp.bird_binary", errors));
    let run_dir =
        b.run_dir.as_ref().map_or_else(|| "/run/xlb/bird".to_string(), |v| bird_string(v, "bgp.run_dir", errors));
    ManagedBird { local_as, router_id, binary: binary.into(), run_dir: run_dir.into(), neighbors }
}
