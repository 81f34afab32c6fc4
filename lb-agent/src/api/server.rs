//! The control socket: a Unix socket (mode 0600, so root only) whose task forwards each request
//! to the main loop, which owns the agent's state. A change is made on a copy of the running
//! config, which then goes through the same validator as the file (the whole config, every
//! limit) and is applied through the same difference-applying path as a reload: completely, or
//! not at all.
use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

use super::proto::{BackendView, L7BackendView, L7ServiceView, NewBackend, Request, Response, ServiceView};
use crate::{
    agent::Agent,
    config::{BackendConfig, Config, Forward, Protocol, ServiceConfig},
    error::ChangeError,
    net::mac::parse_mac,
};

/// A request waiting for the main loop's answer.
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// Carries out one request against the running agent; `config_path` serves `reload`.
pub fn handle(agent: &mut Agent, request: Request, config_path: &Path) -> Response {
    let result = match request {
        Request::List => list(agent).map(|services| Response {
            ok: true,
            services,
            bgp: agent.speaker().map(|s| s.view()),
            l7: l7_list(agent),
            ..Default::default()
        }),
        Request::DrainHost => drain_host(agent, true),
        Request::UndrainHost => drain_host(agent, false),
        Request::Fingerprint => Ok(Response { ok: true, message: Some(agent.fingerprint()), ..Default::default() }),
        Request::Reload => reload_file(agent, config_path)
            .map(|summary| message(format!("reloaded {}: {summary}", config_path.display()))),
        change => apply(agent, change).map(message).map_err(anyhow::Error::from),
    };
    result.unwrap_or_else(|e| Response { ok: false, error: Some(format!("{e:#}")), ..Default::default() })
}

/// `ctl drain-host` / `undrain-host`: only with `[bgp]`; not remembered across restarts (a
/// restarted agent announces what its health says).
fn drain_host(agent: &Agent, drain: bool) -> Result<Response> {
    let Some(speaker) = agent.speaker() else {
        anyhow::bail!("this agent announces nothing: the config has no [bgp]");
    };
    let changed = speaker.drain_host(drain);
    let text = match (drain, changed) {
        (true, true) => {
            "host draining: routes tagged GRACEFUL_SHUTDOWN with a worse MED, then withdrawn after bgp.drain_secs"
        }
        (true, false) => "host already draining",
        (false, true) => "host serving again: the VIPs are announced as their health says",
        (false, false) => "host was not draining",
    };
    Ok(message(text.to_string()))
}

fn message(text: String) -> Response {
    info!("api: {text}");
    Response { ok: true, message: Some(text), ..Default::default() }
}

/// A change: the running config with the change made, validated as a whole and applied as a
/// reload would (which refuses what the maps could not take before writing anything).
fn apply(agent: &mut Agent, change: Request) -> Result<String, ChangeError> {
    let mut config = agent.config().clone();
    let summary = edit(&mut config, change.clone())?;
    agent.reload(&config)?;
    agent.record_change(change);
    Ok(summary)
}

/// The config file at `path` with the recorded control-API changes made on it again, as the
/// running agent has them (SIGHUP, `ctl reload`): the file's config, then every change in
/// order. A change that no longer applies (its service left the file, say) is dropped, and
/// logged.
pub fn reload_file(agent: &mut Agent, path: &Path) -> Result<String> {
    let file = Config::load(path)?;
    let (config, kept) = replay(file, agent.runtime_changes());
    let summary = agent.reload(&config)?;
    agent.keep_changes(kept);
    Ok(summary)
}

/// `config` with `changes` made on it in order; returns it and the changes that applied.
pub fn replay(mut config: Config, changes: &[Request]) -> (Config, Vec<Request>) {
    let mut kept = Vec::new();
    for change in changes {
        let mut next = config.clone();
        match edit(&mut next, change.clone()) {
            Ok(summary) => {
                info!("runtime change kept: {summary}");
                config = next;
                kept.push(change.clone());
            }
            Err(e) => warn!("runtime change {change:?} no longer applies, dropped: {e}"),
        }
    }
    (config, kept)
}

/// Makes the change on `config` and validates the result with the file's validator.
fn edit(config: &mut Config, change: Request) -> Result<String, ChangeError> {
    let summary = change_config(config, change)?;
    let invalid = crate::config::validate(config);
    if !invalid.is_empty() {
        return Err(ChangeError::Invalid(invalid));
    }
    Ok(summary)
}

fn find(config: &Config, service: &str) -> Result<usize, ChangeError> {
    config
        .services
        .iter()
        .position(|s| s.name == service || format!("{}:{}/{}", s.vip, s.port, s.protocol) == service)
        .ok_or_else(|| ChangeError::NoService(service.to_string()))
}

fn find_backend<'a>(
    config: &'a mut Config,
    service: &str,
    address: IpAddr,
) -> Result<&'a mut BackendConfig, ChangeError> {
    let s = find(config, service)?;
    config.services[s]
        .backends
        .iter_mut()
        .find(|b| b.address == address)
        .ok_or_else(|| ChangeError::NotABackend { service: service.to_string(), address })
}

fn mac(text: Option<String>) -> Result<Option<[u8; 6]>, ChangeError> {
    text.map(|m| parse_mac(&m).ok_or(ChangeError::BadMac(m))).transpose()
}

/// A change of an L7 service's backends; None when `service` is not an L7 service.
fn change_l7(config: &mut Config, change: &Request) -> Option<Result<String, ChangeError>> {
    use crate::config::l7::{L7Backend, DEFAULT_POOL};
    let (service, address, port) = match change {
        Request::AddBackend { service, address, port, .. }
        | Request::RemoveBackend { service, address, port }
        | Request::SetWeight { service, address, port, .. } => (service, *address, *port),
        _ => return None,
    };
    let s = config.l7.iter().position(|s| s.name == *service)?;
    let Some(port) = port else {
        return Some(Err(ChangeError::Invalid(vec![crate::config::Invalid {
            field: "port".into(),
            kind: crate::config::InvalidKind::Missing,
            message: format!("{service} is an L7 service: give the backend's port (--port)"),
        }])));
    };
    let at = std::net::SocketAddr::new(address, port);
    let backends = &mut config.l7[s].backends;
    let not_one = || ChangeError::NotABackend { service: service.clone(), address };
    Some(match change {
        Request::AddBackend { weight, pool, .. } => {
            let weight = weight.unwrap_or(1);
            let pool = pool.clone().unwrap_or_else(|| DEFAULT_POOL.to_string());
            backends.push(L7Backend { address: at, weight, pool: pool.clone() });
            Ok(format!("{service}: backend {at} added to pool {pool} with weight {weight}"))
        }
        Request::RemoveBackend { .. } => {
            let before = backends.len();
            backends.retain(|b| b.address != at);
            if backends.len() == before {
                Err(not_one())
            } else {
                Ok(format!("{service}: backend {at} removed"))
            }
        }
        Request::SetWeight { weight, .. } => {
            let mut found = false;
            for b in backends.iter_mut().filter(|b| b.address == at) {
                b.weight = *weight;
                found = true;
            }
            let what = if *weight == 0 { "draining".to_string() } else { format!("weight {weight}") };
            if found {
                Ok(format!("{service}: backend {at} {what}"))
            } else {
                Err(not_one())
            }
        }
        _ => unreachable!("matched above"),
    })
}

/// The change itself; what it leads to is the validator's to judge.
fn change_config(config: &mut Config, change: Request) -> Result<String, ChangeError> {
    if let Some(result) = change_l7(config, &change) {
        return result;
    }
    match change {
        Request::AddBackend { service, address, weight, mac: m, .. } => {
            let s = find(config, &service)?;
            let weight = weight.unwrap_or(1);
            config.services[s].backends.push(BackendConfig { address, weight, mac: mac(m)? });
            Ok(format!("{service}: backend {address} added with weight {weight}"))
        }
        Request::RemoveBackend { service, address, .. } => {
            find_backend(config, &service, address)?;
            let s = find(config, &service)?;
            config.services[s].backends.retain(|b| b.address != address);
            Ok(format!("{service}: backend {address} removed"))
        }
        Request::SetWeight { service, address, weight, .. } => {
            find_backend(config, &service, address)?.weight = weight;
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
                return Err(ChangeError::LastService(service));
            }
            config.services.remove(s);
            Ok(format!("service {service} removed"))
        }
        Request::List | Request::Reload | Request::DrainHost | Request::UndrainHost | Request::Fingerprint => {
            unreachable!("not a change")
        }
    }
}

/// A new service with the config's `[health]` settings (the port is the service's own unless
/// `[health] port` is set).
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
) -> Result<ServiceConfig, ChangeError> {
    let mut health = config.health_defaults.clone();
    if health.port == 0 {
        health.port = port;
    }
    let backends = backends
        .into_iter()
        .map(|b| Ok(BackendConfig { address: b.address, weight: b.weight.unwrap_or(1), mac: mac(b.mac)? }))
        .collect::<Result<Vec<_>, ChangeError>>()?;
    Ok(ServiceConfig {
        name: name.unwrap_or_else(|| format!("{vip}:{port}/{protocol}")),
        vip,
        port,
        protocol,
        forward,
        scheduler: Default::default(),
        affinity_timeout_secs: 0,
        maglev_size: maglev_size.unwrap_or(lb_common::limits::DEFAULT_MAGLEV_SIZE),
        health,
        backends,
    })
}

fn list(agent: &Agent) -> Result<Vec<ServiceView>> {
    agent
        .services()
        .map(|s| {
            let c = agent.dataplane.service_counters(s.id.0)?;
            let backends = s
                .backends
                .iter()
                .map(|b| {
                    let c = agent.dataplane.backend_counters(b.id.0)?;
                    Ok(BackendView {
                        address: b.config.address,
                        weight: b.config.weight,
                        state: s.backend_state(b).to_string(),
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

fn l7_list(agent: &Agent) -> Vec<L7ServiceView> {
    use std::sync::atomic::Ordering::Relaxed;
    agent
        .l7
        .services()
        .map(|(config, stats, backends)| L7ServiceView {
            name: config.name.clone(),
            listen: config.listen,
            mode: config.mode.to_string(),
            scheduler: config.scheduler.to_string(),
            active_connections: stats.active.load(Relaxed).max(0) as u64,
            requests: stats.requests.total(),
            backends: backends
                .iter()
                .map(|b| L7BackendView {
                    address: b.address,
                    pool: b.pool.clone(),
                    weight: b.weight.load(Relaxed),
                    state: b.state().to_string(),
                    in_flight: b.in_flight.load(Relaxed).max(0) as u64,
                    requests: b.counts.total(),
                })
                .collect(),
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
    use crate::config::{tests::GOOD, InvalidKind, Scheduler};

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn requests_are_tagged_json() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"set_weight","service":"web","address":"10.0.0.11","weight":0}"#).unwrap();
        assert_eq!(r, Request::SetWeight { service: "web".into(), address: addr("10.0.0.11"), weight: 0, port: None });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
    }

    /// Refuses `change`; a config is left edited only when the validator refused it (apply
    /// drops that copy).
    fn refused(c: &mut Config, change: Request) -> ChangeError {
        let before = c.clone();
        let err = edit(c, change).expect_err("refused");
        if !matches!(err, ChangeError::Invalid(_)) {
            assert_eq!(*c, before);
        }
        err
    }

    fn add_service(name: Option<&str>, vip: &str, forward: Forward) -> Request {
        Request::AddService {
            name: name.map(String::from),
            vip: addr(vip),
            port: 53,
            protocol: Protocol::Udp,
            forward,
            scheduler: Scheduler::Maglev,
            maglev_size: Some(251),
            backends: vec![NewBackend { address: addr("10.0.0.21"), weight: Some(2), mac: None }],
        }
    }

    #[test]
    fn l7_backends_are_changed_by_address_and_port() {
        let l7 = "\n[[l7]]\nname = \"www\"\nlisten = \"10.0.0.100:8080\"\nmode = \"http\"\n[[l7.backend]]\naddress = \"10.0.0.21:80\"\n";
        let mut c = Config::parse(&format!("{GOOD}{l7}")).unwrap();
        let add = |port: Option<u16>| Request::AddBackend {
            service: "www".into(),
            address: addr("10.0.0.22"),
            weight: Some(2),
            mac: None,
            port,
            pool: Some("api".into()),
        };
        let mut scratch = c.clone();
        assert_eq!(refused(&mut scratch, add(None)).invalid_kinds(), [InvalidKind::Missing]);
        assert!(edit(&mut c, add(Some(80))).is_ok());
        assert_eq!(c.l7[0].backends[1].address, "10.0.0.22:80".parse().unwrap());
        assert_eq!((c.l7[0].backends[1].weight, c.l7[0].backends[1].pool.as_str()), (2, "api"));
        let mut scratch = c.clone();
        assert_eq!(refused(&mut scratch, add(Some(80))).invalid_kinds(), [InvalidKind::Duplicate]);
        let drain = Request::SetWeight { service: "www".into(), address: addr("10.0.0.22"), weight: 0, port: Some(80) };
        assert!(edit(&mut c, drain).is_ok());
        assert_eq!(c.l7[0].backends[1].weight, 0);
        let rm = Request::RemoveBackend { service: "www".into(), address: addr("10.0.0.22"), port: Some(81) };
        assert!(matches!(refused(&mut c.clone(), rm), ChangeError::NotABackend { .. }));
        let rm = Request::RemoveBackend { service: "www".into(), address: addr("10.0.0.22"), port: Some(80) };
        assert!(edit(&mut c, rm).is_ok());
        assert_eq!(c.l7[0].backends.len(), 1);
    }

    #[test]
    fn edits_go_through_the_validator() {
        let mut c = Config::parse(GOOD).unwrap();
        let add = |service: &str, a: &str| Request::AddBackend {
            service: service.into(),
            address: addr(a),
            weight: None,
            mac: None,
            port: None,
            pool: None,
        };
        assert!(edit(&mut c, add("web", "10.0.0.14")).is_ok());
        assert_eq!(c.services[0].backends.len(), 3);
        let mut scratch = c.clone();
        assert_eq!(refused(&mut scratch, add("web", "10.0.0.14")).invalid_kinds(), [InvalidKind::Duplicate]);
        let mut scratch = c.clone();
        assert_eq!(refused(&mut scratch, add("web", "fd00::12")).invalid_kinds(), [InvalidKind::WrongFamily]);
        assert!(matches!(refused(&mut c, add("nope", "10.0.0.15")), ChangeError::NoService(s) if s == "nope"));
        assert!(
            edit(&mut c, add("10.0.0.100:53/udp", "10.0.0.15")).is_ok(),
            "services can be named by VIP:PORT/PROTOCOL"
        );
        let w = Request::SetWeight { service: "web".into(), address: addr("10.0.0.14"), weight: 70_000, port: None };
        let mut scratch = c.clone();
        assert_eq!(refused(&mut scratch, w).invalid_kinds(), [InvalidKind::BadValue]);
        let w = Request::SetWeight { service: "web".into(), address: addr("10.0.0.14"), weight: 0, port: None };
        assert!(edit(&mut c, w).unwrap().contains("draining"));
        let rm = Request::RemoveBackend { service: "web".into(), address: addr("10.0.0.99"), port: None };
        assert!(matches!(refused(&mut c, rm), ChangeError::NotABackend { .. }));
        let dns = add_service(Some("dns"), "10.0.0.53", Forward::L2);
        assert!(edit(&mut c, dns.clone()).unwrap().contains("service dns added with 1 backends"));
        assert_eq!(c.services.last().unwrap().health.port, 53);
        let mut scratch = c.clone();
        assert!(refused(&mut scratch, dns).invalid_kinds().contains(&InvalidKind::Duplicate));
        let mut scratch = c.clone();
        let ipip = add_service(None, "10.0.0.54", Forward::Ipip);
        assert_eq!(refused(&mut scratch, ipip).invalid_kinds(), [InvalidKind::NeedsIpipSource]);
        assert!(edit(&mut c, Request::RemoveService { service: "web".into() }).is_ok());
        assert!(edit(&mut c, Request::RemoveService { service: "dns".into() }).is_ok());
        let last = refused(&mut c, Request::RemoveService { service: "10.0.0.100:53/udp".into() });
        assert!(matches!(last, ChangeError::LastService(_)));
    }

    #[test]
    fn an_edit_past_a_limit_is_refused() {
        // Room for the two services' tables (65537 and 251 entries, twice each) and no more.
        let mut c = Config::parse(&format!("maglev_capacity = {}\n{GOOD}", 2 * (65_537 + 251))).unwrap();
        let err = refused(&mut c, add_service(None, "10.0.0.54", Forward::L2));
        assert_eq!(err.invalid_kinds(), [InvalidKind::Limit], "{err}");
        assert!(matches!(&err, ChangeError::Invalid(all) if all[0].field == "maglev_capacity"), "{err}");
    }
}
