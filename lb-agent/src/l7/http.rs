//! The HTTP proxy: one request in, routed by Host and path to a pool, a backend picked (or
//! the one the sticky cookie names), forwarded over a pooled HTTP/1.1 connection with the
//! forwarding headers set and the hop-by-hop ones stripped; upgrades (WebSocket) tunnelled.
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Empty, Full, Limited};
use hyper::{
    body::{Body as _, Incoming},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Request, Response, StatusCode, Version,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use log::{info, warn};

use super::{cookie, pool::Backend, Service};
use crate::config::l7::{L7Service, DEFAULT_POOL};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
pub type Upstream = Client<HttpConnector, Body>;

/// The upstream client of a service: pooled keep-alive HTTP/1.1 connections to its backends.
pub fn upstream(config: &L7Service) -> Upstream {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.timeouts.connect));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// Who is on the other side of a downstream connection.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The client (from a trusted PROXY header, else the connection's peer).
    pub client: SocketAddr,
    /// The address the client reached.
    pub local: SocketAddr,
    pub tls: bool,
}

fn full(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

/// Headers that concern one connection only (RFC 9110 7.6.1), plus those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// The host a request is for, lower case, without a port.
fn host_of(req: &Request<Incoming>) -> Option<String> {
    let raw = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().host())?;
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => raw.rsplit_once(':').map_or(raw, |(h, p)| if p.bytes().all(|b| b.is_ascii_digit()) { h } else { raw }),
    };
    Some(host.to_ascii_lowercase())
}

/// The pool of the first route matching host and path; "default" when none does.
fn route<'a>(config: &'a L7Service, host: Option<&str>, path: &str) -> &'a str {
    config
        .routes
        .iter()
        .find(|r| r.host.as_deref().is_none_or(|h| Some(h) == host) && path.starts_with(&r.path_prefix))
        .map_or(DEFAULT_POOL, |r| r.pool.as_str())
}

/// The client as far as trusted proxies in front say: `trusted_hops` entries back in
/// X-Forwarded-For, else the peer.
fn client_ip(config: &L7Service, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
    if config.trusted_hops == 0 {
        return peer;
    }
    let chain: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    chain.len().checked_sub(config.trusted_hops as usize).and_then(|i| chain.get(i)).copied().unwrap_or(peer)
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// What the access log and the metrics record of a request.
struct Outcome {
    status: StatusCode,
    backend: Option<Arc<Backend>>,
}

/// Serves one request; never fails (a failure is a 4xx/5xx answer).
pub async fn handle(
    service: Arc<Service>,
    upstream: Upstream,
    peer: Peer,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let version = req.version();
    let (response, outcome) = proxy(&service, &upstream, peer, req).await;
    let seconds = start.elapsed().as_secs_f64();
    service.stats.observe(outcome.status.as_u16(), seconds);
    if let Some(b) = &outcome.backend {
        b.counts.count_status(outcome.status.as_u16());
    }
    if service.config.access_log {
        let line = serde_json::json!({
            "service": service.config.name,
            "client": peer.client.to_string(),
            "method": method.as_str(),
            "uri": uri.to_string(),
            "version": format!("{version:?}"),
            "status": outcome.status.as_u16(),
            "backend": outcome.backend.as_ref().map(|b| b.address.to_string()),
            "ms": (seconds * 1e6).round() / 1e3,
        });
        info!(target: "access", "{line}");
    }
    Ok(response)
}

async fn proxy(
    service: &Service,
    upstream: &Upstream,
    peer: Peer,
    mut req: Request<Incoming>,
) -> (Response<Body>, Outcome) {
    let config = &service.config;
    let local = |status: StatusCode, text: &str| (full(status, text), Outcome { status, backend: None });
    if let Some(len) = req.body().size_hint().exact().filter(|&n| n > config.limits.max_body_bytes) {
        return local(StatusCode::PAYLOAD_TOO_LARGE, &format!("request body of {len} bytes is over the limit"));
    }
    if req.headers().len() > config.limits.max_headers {
        return local(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers");
    }
    let host = host_of(&req);
    let pool_name = route(config, host.as_deref(), req.uri().path());
    let Some(pool) = service.pools.get(pool_name) else {
        return local(StatusCode::NOT_FOUND, "no route for this host and path");
    };
    let client = client_ip(config, req.headers(), peer.client.ip());
    let upgrade = is_upgrade(&req);
    let on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    // The sticky backend, if the request names one that can take it.
    let mut set_cookie = false;
    let mut sticky: Option<Arc<Backend>> = None;
    if let Some(c) = &config.cookie {
        match cookie::take(req.headers_mut(), &c.name) {
            Some(id) => match pool.by_cookie(&id) {
                Some(b) => sticky = Some(b),
                None if c.strict => return local(StatusCode::SERVICE_UNAVAILABLE, "the session's server is gone"),
                None => set_cookie = true,
            },
            None => set_cookie = true,
        }
    }

    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, upgrade);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
    }
    add_forwarding(config, &mut headers, peer, host.as_deref());
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    // A request without a body can be sent again to another backend when the first cannot
    // be reached; one with a body is sent once (its bytes are streamed, not kept). A safe one
    // (GET, HEAD, OPTIONS) also on any other failure before an answer came (a pooled
    // connection whose backend was killed: closed or reset under the request).
    let replayable = body.is_end_stream();
    let safe = matches!(parts.method, hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS);
    let mut body = Some(body);
    let key = pool.hash_key(client, |name| headers.get(name).map(|v| cookie::digest(v.as_bytes())));
    let mut tried: Vec<u32> = Vec::new();
    let attempts = if replayable { pool.backends.len().clamp(1, 3) } else { 1 };
    for _ in 0..attempts {
        let backend = match sticky.take().or_else(|| pool.pick(key, &tried)) {
            Some(b) => b,
            None if tried.is_empty() => return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend"),
            None => break,
        };
        tried.push(backend.id);
        let upstream_body = match body.take() {
            Some(b) if !replayable => Limited::new(b, config.limits.max_body_bytes as usize).boxed(),
            _ => empty(),
        };
        let uri = match format!("http://{}{path}", backend.address).parse::<hyper::Uri>() {
            Ok(uri) => uri,
            Err(_) => return local(StatusCode::BAD_REQUEST, "bad request target"),
        };
        let mut up = Request::new(upstream_body);
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = headers.clone();
        let guard = backend.busy();
        let sent = tokio::time::timeout(config.timeouts.response, upstream.request(up)).await;
        drop(guard);
        let mut response = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.is_connect() || (replayable && safe) => {
                backend.counts.connect_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!("l7 {}: backend {} unreachable: {e:#}", config.name, backend.address);
                // The cookie's backend is gone for now: the next one gets the session.
                set_cookie = config.cookie.is_some();
                continue;
            }
            Ok(Err(e)) => {
                let too_large = std::iter::successors(std::error::Error::source(&e), |s| s.source())
                    .any(|s| s.is::<http_body_util::LengthLimitError>());
                if too_large {
                    return local(StatusCode::PAYLOAD_TOO_LARGE, "request body over the limit");
                }
                warn!("l7 {}: backend {}: {e}", config.name, backend.address);
                return (
                    full(StatusCode::BAD_GATEWAY, "bad gateway"),
                    Outcome { status: StatusCode::BAD_GATEWAY, backend: Some(backend) },
                );
            }
            Err(_) => {
                return (
                    full(StatusCode::GATEWAY_TIMEOUT, "the backend did not answer in time"),
                    Outcome { status: StatusCode::GATEWAY_TIMEOUT, backend: Some(backend) },
                )
            }
        };
        let status = response.status();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(on_client) = on_client_upgrade {
                let on_backend = hyper::upgrade::on(&mut response);
                let name = config.name.clone();
                let busy = backend.busy();
                tokio::spawn(async move {
                    let _busy = busy;
                    match tokio::try_join!(on_client, on_backend) {
                        Ok((a, b)) => {
                            let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                        }
                        Err(e) => warn!("l7 {name}: upgrade failed: {e}"),
                    }
                });
            }
            let (parts, _) = response.into_parts();
            return (Response::from_parts(parts, empty()), Outcome { status, backend: Some(backend) });
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        if set_cookie {
            if let Some(c) = &config.cookie {
                cookie::insert(&mut parts.headers, c, &backend.cookie_id, peer.tls);
            }
        }
        let body = body.map_err(BoxError::from).boxed();
        return (Response::from_parts(parts, body), Outcome { status, backend: Some(backend) });
    }
    (
        full(StatusCode::BAD_GATEWAY, "no backend could be reached"),
        Outcome { status: StatusCode::BAD_GATEWAY, backend: None },
    )
}

/// X-Forwarded-For (appended), -Proto and -Host, and RFC 7239 Forwarded when asked for.
fn add_forwarding(config: &L7Service, headers: &mut HeaderMap, peer: Peer, host: Option<&str>) {
    let ip = peer.client.ip().to_canonical();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(before) if config.trusted_hops > 0 => format!("{before}, {ip}"),
        _ => ip.to_string(),
    };
    let proto = if peer.tls { "https" } else { "http" };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Some(h) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert("x-forwarded-host", h);
    }
    if config.forwarded {
        let node = if ip.is_ipv6() { format!("\"[{ip}]\"") } else { ip.to_string() };
        let mut element = format!("for={node};proto={proto}");
        if let Some(h) = host {
            element += &format!(";host=\"{h}\"");
        }
        let value = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
            Some(before) if config.trusted_hops > 0 => format!("{before}, {element}"),
            _ => element,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(header::FORWARDED, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut up = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        strip_hop_by_hop(&mut up, true);
        assert!(up.contains_key(header::UPGRADE));
    }
}
