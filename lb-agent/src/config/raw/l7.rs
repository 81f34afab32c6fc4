//! `[[l7]]` as written, and its reading: each value's syntax and range, with its place.
use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{merge_health, Errors, RawHealth};
use crate::config::{
    l7::{
        CertConfig, CookieConfig, HashOn, L7Backend, L7Limits, L7Mode, L7Scheduler, L7Service, L7Timeouts,
        ProxyVersion, Route, SameSite, DEFAULT_POOL,
    },
    InvalidKind,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawL7 {
    name: Option<String>,
    listen: Spanned<String>,
    mode: L7Mode,
    scheduler: Option<Spanned<String>>,
    proxy_protocol: Option<ProxyVersion>,
    #[serde(default)]
    accept_proxy: bool,
    trusted_hops: Option<Spanned<u32>>,
    #[serde(default)]
    forwarded: bool,
    #[serde(default)]
    access_log: bool,
    cookie: Option<Spanned<RawCookie>>,
    #[serde(default)]
    tls: Vec<Spanned<RawCert>>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    backend: Vec<Spanned<RawL7Backend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCookie {
    name: Option<Spanned<String>>,
    secret: Spanned<String>,
    same_site: Option<SameSite>,
    #[serde(default)]
    strict: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    cert: String,
    key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    header_read_ms: Option<Spanned<u64>>,
    idle_ms: Option<Spanned<u64>>,
    connect_ms: Option<Spanned<u64>>,
    response_ms: Option<Spanned<u64>>,
    drain_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<Spanned<u64>>,
    max_headers: Option<Spanned<u64>>,
    max_body_bytes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<String>,
    path_prefix: Option<Spanned<String>>,
    pool: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawL7Backend {
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
    pool: Option<String>,
}

/// A duration in ms within `range`, or `default`.
fn ms(
    value: &Option<Spanned<u64>>,
    field: String,
    range: std::ops::RangeInclusive<u64>,
    default: u64,
    errors: &mut Errors<'_>,
) -> Duration {
    match value {
        Some(v) if !range.contains(v.get_ref()) => {
            errors.at(
                v.span(),
                field,
                format!("expected {} to {} ms, got {}", range.start(), range.end(), v.get_ref()),
            );
            Duration::from_millis(default)
        }
        Some(v) => Duration::from_millis(*v.get_ref()),
        None => Duration::from_millis(default),
    }
}

fn count(
    value: &Option<Spanned<u64>>,
    field: String,
    range: std::ops::RangeInclusive<u64>,
    default: u64,
    errors: &mut Errors<'_>,
) -> u64 {
    match value {
        Some(v) if !range.contains(v.get_ref()) => {
            errors.at(v.span(), field, format!("expected {} to {}, got {}", range.start(), range.end(), v.get_ref()));
            default
        }
        Some(v) => *v.get_ref(),
        None => default,
    }
}

fn scheduler(value: &Option<Spanned<String>>, field: String, errors: &mut Errors<'_>) -> L7Scheduler {
    let Some(v) = value else { return L7Scheduler::RoundRobin };
    match v.get_ref().as_str() {
        "round-robin" => L7Scheduler::RoundRobin,
        "least-requests" => L7Scheduler::LeastRequests,
        "hash-client" => L7Scheduler::Hash(HashOn::Client),
        other => match other.strip_prefix("hash-header:") {
            Some(h) if !h.is_empty() && hyper::header::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
                L7Scheduler::Hash(HashOn::Header(h.to_ascii_lowercase()))
            }
            _ => {
                errors.at(
                    v.span(),
                    field,
                    format!("expected \"round-robin\", \"least-requests\", \"hash-client\" or \"hash-header:NAME\", got {other:?}"),
                );
                L7Scheduler::RoundRobin
            }
        },
    }
}

pub(super) fn read(i: usize, raw: &Spanned<RawL7>, defaults: &RawHealth, errors: &mut Errors<'_>) -> L7Service {
    let path = format!("l7[{i}]");
    let s = raw.get_ref();
    errors.span(path.clone(), raw.span());
    errors.span(format!("{path}.listen"), s.listen.span());
    let listen = s.listen.get_ref().parse::<SocketAddr>().unwrap_or_else(|_| {
        errors.at(
            s.listen.span(),
            format!("{path}.listen"),
            format!(
                "expected an address and port like \"10.0.0.100:80\" or \"[fd00::100]:443\", got {:?}",
                s.listen.get_ref()
            ),
        );
        SocketAddr::from(([0, 0, 0, 0], 0))
    });
    let mut health = merge_health(&path, defaults, &s.health, 0, errors);
    // Each backend's own port is probed unless [l7.health] port says otherwise (the file-wide
    // port is the L4 services').
    if s.health.port.is_none() {
        health.port = 0;
    }
    if s.health.kind.is_none() && s.mode != L7Mode::TcpProxy {
        // An L7 HTTP service's backends speak HTTP: a GET says more than a connect.
        health.check = crate::config::Check::Http { path: "/".into(), host: None, statuses: vec![200] };
    }
    let cookie = s.cookie.as_ref().map(|c| {
        errors.span(format!("{path}.cookie"), c.span());
        let rc = c.get_ref();
        let name = rc.name.as_ref().map_or_else(
            || "XLBSRV".to_string(),
            |n| {
                let valid = !n.get_ref().is_empty()
                    && n.get_ref().bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !valid {
                    errors.at(
                        n.span(),
                        format!("{path}.cookie.name"),
                        format!("expected a cookie name (letters, digits, !#$%&'*+-.^_`|~), got {:?}", n.get_ref()),
                    );
                }
                n.get_ref().clone()
            },
        );
        if rc.secret.get_ref().len() < 16 {
            errors.at(
                rc.secret.span(),
                format!("{path}.cookie.secret"),
                "expected a secret of at least 16 characters, the same on every host",
            );
        }
        CookieConfig {
            name,
            secret: rc.secret.get_ref().clone(),
            same_site: rc.same_site.unwrap_or(SameSite::Lax),
            strict: rc.strict,
        }
    });
    let tls = s
        .tls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            errors.span(format!("{path}.tls[{k}]"), c.span());
            CertConfig { cert: c.get_ref().cert.clone().into(), key: c.get_ref().key.clone().into() }
        })
        .collect();
    let t = &s.timeouts;
    let timeouts = L7Timeouts {
        header_read: ms(&t.header_read_ms, format!("{path}.timeouts.header_read_ms"), 100..=600_000, 10_000, errors),
        idle: ms(&t.idle_ms, format!("{path}.timeouts.idle_ms"), 100..=3_600_000, 60_000, errors),
        connect: ms(&t.connect_ms, format!("{path}.timeouts.connect_ms"), 10..=60_000, 2_000, errors),
        response: ms(&t.response_ms, format!("{path}.timeouts.response_ms"), 10..=3_600_000, 30_000, errors),
        drain: ms(&t.drain_ms, format!("{path}.timeouts.drain_ms"), 0..=600_000, 10_000, errors),
    };
    let l = &s.limits;
    let limits = L7Limits {
        max_header_bytes: count(
            &l.max_header_bytes,
            format!("{path}.limits.max_header_bytes"),
            8192..=1 << 20,
            16384,
            errors,
        ) as usize,
        max_headers: count(&l.max_headers, format!("{path}.limits.max_headers"), 1..=1000, 100, errors) as usize,
        max_body_bytes: count(
            &l.max_body_bytes,
            format!("{path}.limits.max_body_bytes"),
            0..=1 << 40,
            10 << 20,
            errors,
        ),
    };
    let routes = s
        .route
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let rpath = format!("{path}.route[{k}]");
            errors.span(rpath.clone(), r.span());
            let rr = r.get_ref();
            let path_prefix = rr.path_prefix.as_ref().map_or_else(
                || "/".to_string(),
                |p| {
                    if !p.get_ref().starts_with('/') {
                        errors.at(
                            p.span(),
                            format!("{rpath}.path_prefix"),
                            format!("expected a path starting with '/', got {:?}", p.get_ref()),
                        );
                    }
                    p.get_ref().clone()
                },
            );
            Route { host: rr.host.as_ref().map(|h| h.to_ascii_lowercase()), path_prefix, pool: rr.pool.clone() }
        })
        .collect();
    if s.backend.is_empty() {
        errors.at_kind(
            raw.span(),
            format!("{path}.backend"),
            InvalidKind::Missing,
            "expected at least one [[l7.backend]]",
        );
    }
    let backends = s
        .backend
        .iter()
        .enumerate()
        .map(|(k, b)| {
            let bpath = format!("{path}.backend[{k}]");
            errors.span(bpath.clone(), b.span());
            let rb = b.get_ref();
            errors.span(format!("{bpath}.address"), rb.address.span());
            let address = rb.address.get_ref().parse::<SocketAddr>().unwrap_or_else(|_| {
                errors.at(
                    rb.address.span(),
                    format!("{bpath}.address"),
                    format!("expected an address and port like \"10.0.0.11:8080\", got {:?}", rb.address.get_ref()),
                );
                SocketAddr::from(([0, 0, 0, 0], 0))
            });
            let weight = rb.weight.as_ref().map_or(1, |w| {
                errors.span(format!("{bpath}.weight"), w.span());
                *w.get_ref()
            });
            L7Backend { address, weight, pool: rb.pool.clone().unwrap_or_else(|| DEFAULT_POOL.to_string()) }
        })
        .collect();
    let trusted_hops = s.trusted_hops.as_ref().map_or(0, |h| {
        if *h.get_ref() > 16 {
            errors.at(h.span(), format!("{path}.trusted_hops"), format!("expected 0 to 16, got {}", h.get_ref()));
        }
        *h.get_ref()
    });
    L7Service {
        name: s.name.clone().unwrap_or_else(|| format!("{}/{}", s.listen.get_ref(), s.mode)),
        listen,
        mode: s.mode,
        scheduler: scheduler(&s.scheduler, format!("{path}.scheduler"), errors),
        proxy_protocol: s.proxy_protocol.unwrap_or(ProxyVersion::V2),
        accept_proxy: s.accept_proxy,
        trusted_hops,
        forwarded: s.forwarded,
        cookie,
        tls,
        timeouts,
        limits,
        routes,
        backends,
        health,
        access_log: s.access_log,
    }
}
