//! The control API's messages: one JSON object per line, `{"cmd": "...", ...}` in, one
//! [`Response`] out.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::{Forward, Protocol, Scheduler};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/xlb/agent.sock";

/// A request, as `{"cmd": "...", ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Services and backends with state, weight and counters.
    List,
    /// Adds a backend to a service (weight 1 unless given). An L7 service's backend needs its
    /// `port`, and may name its `pool`.
    AddBackend {
        service: String,
        address: IpAddr,
        weight: Option<u32>,
        mac: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
    },
    /// Removes a backend: its pinned flows re-hash.
    RemoveBackend {
        service: String,
        address: IpAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
    /// Sets a backend's weight; 0 drains it (no new flows, pinned ones and sticky sessions stay).
    SetWeight {
        service: String,
        address: IpAddr,
        weight: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
    /// Adds a service with its backends; health checks follow the config's `[health]`.
    AddService {
        name: Option<String>,
        vip: IpAddr,
        port: u16,
        protocol: Protocol,
        #[serde(default)]
        forward: Forward,
        #[serde(default)]
        scheduler: Scheduler,
        maglev_size: Option<u32>,
        #[serde(default)]
        backends: Vec<NewBackend>,
    },
    /// Removes a whole service.
    RemoveService { service: String },
    /// Re-reads the config file, as SIGHUP does.
    Reload,
    /// Moves new flows off this host: the VIPs' routes are tagged GRACEFUL_SHUTDOWN with a
    /// worse MED for `bgp.drain_secs`, then withdrawn.
    DrainHost,
    /// Announces the VIPs again after a drain-host.
    UndrainHost,
    /// A digest of the hash seed and every service's table: equal on hosts that send a
    /// flow to the same backend.
    Fingerprint,
}

/// A backend in an `add_service` request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NewBackend {
    pub address: IpAddr,
    pub weight: Option<u32>,
    pub mac: Option<String>,
}

/// The answer: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub services: Vec<ServiceView>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bgp: Option<BgpView>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub l7: Vec<L7ServiceView>,
}

/// An L7 service, as `ctl list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct L7ServiceView {
    pub name: String,
    pub listen: std::net::SocketAddr,
    /// "http", "https" or "tcp-proxy".
    pub mode: String,
    pub scheduler: String,
    pub active_connections: u64,
    /// Responses (tcp-proxy: relays) so far.
    pub requests: u64,
    pub backends: Vec<L7BackendView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct L7BackendView {
    pub address: std::net::SocketAddr,
    pub pool: String,
    pub weight: u32,
    /// "up", "down" or "drain".
    pub state: String,
    pub in_flight: u64,
    pub requests: u64,
}

/// The VIPs' announcements and the BGP sessions, as BIRD reports them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct BgpView {
    /// "serving", "draining" (routes tagged, until the drain time is over) or "drained".
    pub host: String,
    pub vips: Vec<VipView>,
    pub sessions: Vec<SessionView>,
    /// The last error talking to BIRD, while it lasts.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VipView {
    pub vip: IpAddr,
    /// "announced", "draining" (announced, tagged GRACEFUL_SHUTDOWN) or "withdrawn".
    pub state: String,
    /// Why, in the agent's words (the health of the VIP's services, a drain, a shutdown).
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionView {
    /// The neighbour's address (the protocol's name for a BIRD the operator runs).
    pub neighbor: String,
    pub protocol: String,
    pub up: bool,
    /// BIRD's words: "Established", "Active", "Connect", …
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub forward: String,
    pub scheduler: Scheduler,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendView {
    pub address: IpAddr,
    pub weight: u32,
    /// "up", "down", "drain" or "nomac".
    pub state: String,
    pub packets: u64,
    pub bytes: u64,
}
