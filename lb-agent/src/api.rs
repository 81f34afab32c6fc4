//! The runtime control API: newline-delimited JSON on a local Unix socket (mode 0600, so root
//! only). The socket task forwards each request to the main loop, which owns the agent's
//! state; every change is validated first and applied through the same difference-applying
//! path as a reload, so the maps change atomically per service.
use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

use crate::{
    agent::Agent,
    config::{parse_mac, BackendConfig, Config, Forward, Protocol, Scheduler, ServiceConfig, MAX_WEIGHT},
};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/xlb/agent.sock";

/// A request, as `{"cmd": "...", ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Services and backends with state, weight and counters.
    List,
    /// Adds a backend to a service (weight 1 unless given).
    AddBackend { service: String, address: IpAddr, weight: Option<u32>, mac: Option<String> },
    /// Removes a backend: its pinned flows re-hash.
    RemoveBackend { service: String, address: IpAddr },
    /// Sets a backend's weight; 0 drains it (no new flows, pinned ones stay).
    SetWeight { service: String, address: IpAddr, weight: u32 },
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

/// A request waiting for the main loop's answer.
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// Carries out one request against the running agent; `config_path` serves `reload`.
pub fn handle(agent: &mut Agent, request: Request, config_path: &Path) -> Response {
    let result = match request {
        Request::List => list(agent).map(|services| Response { ok: true, services, ..Default::default() }),
        Request::Reload => Config::load(config_path)
            .and_then(|config| agent.reload(&config))
            .map(|summary| message(format!("reloaded {}: {summary}", config_path.display()))),
        change => apply(agent, change).map(message),
    };
    result.unwrap_or_else(|e| Response { ok: false, error: Some(format!("{e:#}")), ..Default::default() })
}

fn message(text: String) -> Response {
    info!("api: {text}");
    Response { ok: true, message: Some(text), ..Default::default() }
}

/// A change: the running config with the change made, applied as a reload would.
fn apply(agent: &mut Agent, change: Request) -> Result<String> {
    let mut config = agent.config().clone();
    let summary = edit(&mut config, change)?;
    agent.reload(&config)?;
    Ok(summary)
}

/// Makes the change on `config`, checking what the config validator would.
fn edit(config: &mut Config, change: Request) -> Result<String> {
    let find = |config: &Config, service: &str| -> Result<usize> {
        config
            .services
            .iter()
            .position(|s| s.name == service || format!("{}:{}/{}", s.vip, s.port, s.protocol) == service)
            .ok_or_else(|| anyhow!("no service {service:?} (give its name or VIP:PORT/PROTOCOL)"))
    };
    match change {
        Request::AddBackend { service, address, weight, mac } => {
            let s = find(config, &service)?;
            let total: usize = config.services.iter().map(|s| s.backends.len()).sum();
            let svc = &config.services[s];
            if address.is_ipv4() != svc.vip.is_ipv4() {
                bail!("{address} is not of the VIP's family ({})", svc.vip);
            }
            if address.is_unspecified() || address.is_multicast() {
                bail!("{address} is not a unicast address");
            }
            if svc.backends.iter().any(|b| b.address == address) {
                bail!("{address} is already a backend of {service}");
            }
            let weight = checked_weight(weight.unwrap_or(1))?;
            let mac = match mac {
                Some(m) => Some(parse_mac(&m).ok_or_else(|| anyhow!("{m:?} is not a unicast MAC address"))?),
                None => None,
            };
            if total >= lb_common::limits::MAX_BACKENDS as usize {
                bail!("at most {} backends over all services", lb_common::limits::MAX_BACKENDS);
            }
            if svc.backends.len() >= svc.maglev_size as usize {
                bail!("the service's Maglev table ({} entries) cannot take more backends", svc.maglev_size);
            }
            config.services[s].backends.push(BackendConfig { address, weight, mac });
            Ok(format!("{service}: backend {address} added with weight {weight}"))
        }
        Request::RemoveBackend { service, address } => {
            let s = find(config, &service)?;
            let backends = &mut config.services[s].backends;
            let before = backends.len();
            backends.retain(|b| b.address != address);
            if backends.len() == before {
                bail!("{address} is not a backend of {service}");
            }
            Ok(format!("{service}: backend {address} removed"))
        }
        Request::SetWeight { service, address, weight } => {
            let s = find(config, &service)?;
            let weight = checked_weight(weight)?;
            let backend = config.services[s]
                .backends
                .iter_mut()
                .find(|b| b.address == address)
                .ok_or_else(|| anyhow!("{address} is not a backend of {service}"))?;
            backend.weight = weight;
            let what = if weight == 0 { "draining".to_string() } else { format!("weight {weight}") };
            Ok(format!("{service}: backend {address} {what}"))
        }
        Request::AddService { name, vip, port, protocol, forward, scheduler, maglev_size, backends } => {
            let mut service = new_service(config, name, vip, port, protocol, forward, maglev_size, backends)?;
            service.scheduler = scheduler;
            let summary = format!("service {} added with {} backends", service.name, service.backends.len());
            config.services.push(service);
            Ok(summary)
        }
        Request::RemoveService { service } => {
            let s = find(config, &service)?;
            if config.services.len() == 1 {
                bail!("{service} is the last service; stop the agent instead");
            }
            config.services.remove(s);
            Ok(format!("service {service} removed"))
        }
        Request::List | Request::Reload => unreachable!("not a change"),
    }
}

/// A new service, checked against the running config as the config validator would.
#[allow(clippy::too_many_arguments, reason = "the fields of one request")]
fn new_service(
    config: &Config,
    name: Option<String>,
    vip: IpAddr,
    port: u16,
    protocol: Protocol,
    forward: Forward,
    maglev_size: Option<u32>,
    backends: Vec<NewBackend>,
) -> Result<ServiceConfig> {
    use lb_common::limits::{DEFAULT_MAGLEV_SIZE, MAX_MAGLEV_SIZE, MAX_SERVICES};
    if vip.is_unspecified() || vip.is_multicast() || port == 0 {
        bail!("expected a unicast VIP and a port from 1 to 65535");
    }
    if config.services.iter().any(|s| (s.vip, s.port, s.protocol) == (vip, port, protocol)) {
        bail!("{vip}:{port}/{protocol} is already a service");
    }
    if config.services.len() >= MAX_SERVICES as usize {
        bail!("at most {MAX_SERVICES} services");
    }
    let has_source = if vip.is_ipv4() { config.ipip.source_v4.is_some() } else { config.ipip.source_v6.is_some() };
    if forward == Forward::Ipip && !has_source {
        bail!("forward = \"ipip\" needs an [ipip] source prefix for the VIP's family in the config file");
    }
    let maglev_size = maglev_size.unwrap_or(DEFAULT_MAGLEV_SIZE);
    if !(maglev_size <= MAX_MAGLEV_SIZE && crate::maglev::is_prime(maglev_size))
        || (maglev_size as usize) < backends.len()
    {
        bail!("expected a prime maglev_size up to {MAX_MAGLEV_SIZE}, above the number of backends, got {maglev_size}");
    }
    let name = name.unwrap_or_else(|| format!("{vip}:{port}/{protocol}"));
    if config.services.iter().any(|s| s.name == name) {
        bail!("a service is already named {name:?}");
    }
    let mut health = config.health_defaults.clone();
    if health.port == 0 {
        health.port = port;
    }
    let mut service = ServiceConfig {
        name,
        vip,
        port,
        protocol,
        forward,
        scheduler: Default::default(),
        affinity_timeout_secs: 0,
        maglev_size,
        health,
        backends: Vec::new(),
    };
    for b in backends {
        let mut scratch = Config { services: vec![service.clone()], ..config.clone() };
        let request =
            Request::AddBackend { service: service.name.clone(), address: b.address, weight: b.weight, mac: b.mac };
        edit(&mut scratch, request)?;
        service = scratch.services.remove(0);
    }
    Ok(service)
}

fn checked_weight(weight: u32) -> Result<u32> {
    if weight > MAX_WEIGHT {
        bail!("expected a weight from 0 to {MAX_WEIGHT}, got {weight}");
    }
    Ok(weight)
}

fn list(agent: &Agent) -> Result<Vec<ServiceView>> {
    let dp = &agent.dataplane;
    agent
        .services
        .iter()
        .map(|s| {
            let c = dp.service_counters(s.slot.id)?;
            let backends = s
                .backends
                .iter()
                .map(|b| {
                    let c = dp.backend_counters(b.id)?;
                    let state = agent.backend_state(s, b).to_string();
                    Ok(BackendView {
                        address: b.config.address,
                        weight: b.config.weight,
                        state,
                        packets: c.packets,
                        bytes: c.bytes,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(ServiceView {
                name: s.config.name.clone(),
                vip: s.config.vip,
                port: s.config.port,
                protocol: s.config.protocol.to_string(),
                forward: format!("{:?}", s.config.forward).to_lowercase(),
                scheduler: s.config.scheduler,
                packets: c.packets,
                bytes: c.bytes,
                backends,
            })
        })
        .collect()
}

/// Serves the socket at `path` (replacing a stale one) until the main loop goes away.
pub async fn serve(path: PathBuf, calls: mpsc::Sender<Call>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A socket file left by a crashed agent would make bind fail.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    info!("control socket at {}", path.display());
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("api: accept failed: {e}");
                continue;
            }
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            let (read, mut write) = conn.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let response = match serde_json::from_str::<Request>(&line) {
                    Ok(request) => {
                        let (reply, answer) = oneshot::channel();
                        if calls.send(Call { request, reply }).await.is_err() {
                            return;
                        }
                        let Ok(response) = answer.await else { return };
                        response
                    }
                    Err(e) => Response { ok: false, error: Some(format!("bad request: {e}")), ..Default::default() },
                };
                let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
                text.push('\n');
                if write.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
interface = "eth0"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
[[service.backend]]
address = "10.0.0.11"
[[service]]
vip = "fd00::100"
port = 53
protocol = "udp"
[[service.backend]]
address = "fd00::11"
"#;

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn requests_are_tagged_json() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"set_weight","service":"web","address":"10.0.0.11","weight":0}"#).unwrap();
        assert_eq!(r, Request::SetWeight { service: "web".into(), address: addr("10.0.0.11"), weight: 0 });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
    }

    #[test]
    fn edits_are_validated() {
        let mut c = Config::parse(CONFIG).unwrap();
        let add = |service: &str, a: &str| Request::AddBackend {
            service: service.into(),
            address: addr(a),
            weight: None,
            mac: None,
        };
        assert!(edit(&mut c, add("web", "10.0.0.12")).is_ok());
        assert_eq!(c.services[0].backends.len(), 2);
        assert!(edit(&mut c, add("web", "10.0.0.12")).unwrap_err().to_string().contains("already"));
        assert!(edit(&mut c, add("web", "fd00::12")).unwrap_err().to_string().contains("family"));
        assert!(edit(&mut c, add("nope", "10.0.0.13")).unwrap_err().to_string().contains("no service"));
        assert!(
            edit(&mut c, add("fd00::100:53/udp", "fd00::12")).is_ok(),
            "services can be named by VIP:PORT/PROTOCOL"
        );
        let w = Request::SetWeight { service: "web".into(), address: addr("10.0.0.12"), weight: 70_000 };
        assert!(edit(&mut c, w).is_err());
        let w = Request::SetWeight { service: "web".into(), address: addr("10.0.0.12"), weight: 0 };
        assert!(edit(&mut c, w).unwrap().contains("draining"));
        let rm = Request::RemoveBackend { service: "web".into(), address: addr("10.0.0.99") };
        assert!(edit(&mut c, rm).is_err());
        let add_service = Request::AddService {
            name: Some("dns".into()),
            vip: addr("10.0.0.53"),
            port: 53,
            protocol: Protocol::Udp,
            forward: Forward::L2,
            scheduler: Scheduler::Maglev,
            maglev_size: Some(251),
            backends: vec![NewBackend { address: addr("10.0.0.21"), weight: Some(2), mac: None }],
        };
        assert!(edit(&mut c, add_service.clone()).unwrap().contains("service dns added with 1 backends"));
        assert_eq!(c.services.last().unwrap().health.port, 53);
        assert!(edit(&mut c, add_service).unwrap_err().to_string().contains("already a service"));
        let bad = Request::AddService {
            name: None,
            vip: addr("10.0.0.54"),
            port: 53,
            protocol: Protocol::Udp,
            forward: Forward::Ipip,
            scheduler: Scheduler::Maglev,
            maglev_size: None,
            backends: vec![],
        };
        assert!(edit(&mut c, bad).unwrap_err().to_string().contains("[ipip]"));
        assert!(edit(&mut c, Request::RemoveService { service: "web".into() }).is_ok());
        assert!(edit(&mut c, Request::RemoveService { service: "dns".into() }).is_ok());
        let last = edit(&mut c, Request::RemoveService { service: "fd00::100:53/udp".into() });
        assert!(last.unwrap_err().to_string().contains("last service"));
    }
}
