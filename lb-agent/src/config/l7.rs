//! The L7 tier's configuration: services the agent itself proxies (`[[l7]]`), beside the XDP
//! tier's `[[service]]`s.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::HealthConfig;

/// What an L7 listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum L7Mode {
    /// HTTP/1.1 and HTTP/2 (h2c prior knowledge) in, HTTP/1.1 to the backends.
    Http,
    /// As http, behind TLS 1.2/1.3 terminated here (ALPN h2, http/1.1).
    Https,
    /// TCP relayed both ways, after a PROXY protocol header that carries the client's address.
    TcpProxy,
}

impl std::fmt::Display for L7Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            L7Mode::Http => "http",
            L7Mode::Https => "https",
            L7Mode::TcpProxy => "tcp-proxy",
        })
    }
}

/// How an L7 pool picks the backend of a request (or a tcp-proxy connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L7Scheduler {
    /// In turn, in proportion to the weights (smooth weighted round robin).
    RoundRobin,
    /// The backend with the fewest requests in progress, per unit of weight.
    LeastRequests,
    /// Maglev over the pool: the same key reaches the same backend while the pool stays.
    Hash(HashOn),
}

impl std::fmt::Display for L7Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            L7Scheduler::RoundRobin => f.write_str("round-robin"),
            L7Scheduler::LeastRequests => f.write_str("least-requests"),
            L7Scheduler::Hash(HashOn::Client) => f.write_str("hash(client)"),
            L7Scheduler::Hash(HashOn::Header(h)) => write!(f, "hash(header {h})"),
        }
    }
}

/// What a hashing pool hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    /// The client's address (after trusted PROXY headers).
    Client,
    /// A request header's value (the client's address when it is missing).
    Header(String),
}

/// The PROXY protocol version a tcp-proxy service sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    V1,
    V2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

/// Sticky sessions by cookie (HAProxy's `cookie insert indirect nocache`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieConfig {
    pub name: String,
    /// Keys the backend ids in the cookie: the same secret on every host and across restarts
    /// gives the same id to the same backend.
    pub secret: String,
    pub same_site: SameSite,
    /// The pinned backend is gone: 503 instead of another backend.
    pub strict: bool,
}

/// A certificate chain and its key (PEM files), served to the SNI names in the certificate
/// (the first one also to clients that send no name or an unknown one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L7Timeouts {
    /// A client must send a request's headers within this (slowloris).
    pub header_read: Duration,
    /// A connection without a request in progress is closed after this.
    pub idle: Duration,
    pub connect: Duration,
    /// The backend's response headers must arrive within this.
    pub response: Duration,
    /// On reload and shutdown: open connections get this long to finish.
    pub drain: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L7Limits {
    /// Request line and headers, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Headers per request (431 beyond).
    pub max_headers: usize,
    /// Request body, in bytes (413 beyond).
    pub max_body_bytes: u64,
}

/// Requests whose Host (without port) and path match go to `pool`; the first match wins, and
/// requests no route matches go to the pool "default".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// None: any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub pool: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Backend {
    pub address: SocketAddr,
    /// 0 drains: no new requests, its sticky sessions stay.
    pub weight: u32,
    pub pool: String,
}

/// The pool of backends without one named.
pub const DEFAULT_POOL: &str = "default";

#[derive(Clone, Debug, PartialEq)]
pub struct L7Service {
    pub name: String,
    pub listen: SocketAddr,
    pub mode: L7Mode,
    pub scheduler: L7Scheduler,
    /// tcp-proxy: the PROXY header sent to the backend.
    pub proxy_protocol: ProxyVersion,
    /// Expect a PROXY header from the client (the listener sits behind another proxy).
    pub accept_proxy: bool,
    /// X-Forwarded-For entries appended by proxies in front that are trusted: the client is
    /// the entry this many hops back (0: the peer of the connection).
    pub trusted_hops: u32,
    /// Also send an RFC 7239 `Forwarded` header.
    pub forwarded: bool,
    pub cookie: Option<CookieConfig>,
    pub tls: Vec<CertConfig>,
    pub timeouts: L7Timeouts,
    pub limits: L7Limits,
    pub routes: Vec<Route>,
    pub backends: Vec<L7Backend>,
    pub health: HealthConfig,
    /// A JSON line per request in the agent's log.
    pub access_log: bool,
}

impl L7Service {
    /// The pools its routes and backends name, each once, in order of first use.
    pub fn pools(&self) -> Vec<&str> {
        let mut pools: Vec<&str> = Vec::new();
        for p in self.backends.iter().map(|b| b.pool.as_str()).chain(self.routes.iter().map(|r| r.pool.as_str())) {
            if !pools.contains(&p) {
                pools.push(p);
            }
        }
        pools
    }
}
