//! The running balancer: services and backends from the config, their health, and the tables
//! that follow from them. Every change goes through the Dataplane facade. Services and backends
//! are addressed by the ids the data path knows them by ([`ServiceId`], [`BackendId`]).
//!
//! - `reload`: bringing the running state to a new config (a file reload or an API change);
//! - `passive`: the in-band health signal;
//! - `announce`: which VIPs this host should announce, and the fingerprint hosts compare.
mod announce;
mod passive;
mod reload;
pub mod state;

use std::{collections::HashMap, fmt::Write as _, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{anyhow, Context as _, Result};
use lb_common::Settings;
use log::{error, info, warn};
use tokio::{
    sync::{mpsc, Notify},
    task::JoinHandle,
};

use self::state::{BackendHealth, State};
use crate::{
    api::Request,
    config::{BackendConfig, Config, Forward, IpipConfig, ServiceConfig},
    dataplane::{BackendId, Dataplane, ServiceId, ServiceSlot, FLOW_WALK_PERIOD},
    health::{self, Event, Start},
    net::{mac::format_mac, neigh},
    sys::if_index,
    tables::{self, maglev::address_key, Member},
};

/// How long start-up waits for the kernel to resolve backends' MACs.
const NEIGHBOUR_WAIT: Duration = Duration::from_secs(1);

pub struct BackendState {
    /// Its slot in BACKENDS and BACKEND_STATS; also names the backend in health reports.
    pub id: BackendId,
    pub config: BackendConfig,
    pub up: bool,
    /// A verdict of the checks exists (a first result, or one remembered): a backend never
    /// checked takes no traffic and does not make its service fail open.
    pub checked: bool,
    /// None until configured or resolved: an L2 backend without one takes no traffic.
    pub mac: Option<[u8; 6]>,
    health: Option<JoinHandle<()>>,
    /// Wakes the health task for a probe now (a passive alarm).
    pub poke: Arc<Notify>,
    /// Set by a passive alarm: out of the table until then, whatever the active checks say.
    pub held_until: Option<std::time::Instant>,
    /// Passive ejections in a row (each holds the backend out longer); a clean window resets it.
    pub ejections: u32,
    /// Passive ejections since the backend was added.
    pub ejections_total: u64,
    /// The in-band counters at the last passive check.
    last_flows: lb_common::BackendFlows,
}

impl BackendState {
    /// Up by the active checks and not held out by the passive signal.
    pub fn healthy(&self) -> bool {
        self.up && self.held_until.is_none()
    }
}

impl Drop for BackendState {
    fn drop(&mut self) {
        if let Some(task) = self.health.take() {
            task.abort();
        }
    }
}

pub struct ServiceState {
    pub id: ServiceId,
    pub config: ServiceConfig,
    pub slot: ServiceSlot,
    pub backends: Vec<BackendState>,
    /// Fewer than `health.min_healthy` backends are up: the failing ones stay in the table.
    pub fail_open: bool,
    /// The table last published (backend ids), for the fingerprint.
    table: Vec<u32>,
}

impl ServiceState {
    /// Whether the service's forwarding can reach the backend at all.
    fn reachable(&self, b: &BackendState) -> bool {
        self.config.forward == Forward::Ipip || b.mac.is_some()
    }

    /// Whether a backend can take packets: up (or checked and the service fails open), and
    /// reachable.
    fn usable(&self, b: &BackendState) -> bool {
        (b.healthy() || (self.fail_open && b.checked)) && self.reachable(b)
    }

    /// The service as the state file names it: `VIP:PORT/PROTOCOL`, whatever its name.
    pub fn key(&self) -> String {
        format!("{}:{}/{}", self.config.vip, self.config.port, self.config.protocol)
    }

    fn backend(&self, id: BackendId) -> Option<&BackendState> {
        self.backends.iter().find(|b| b.id == id)
    }

    fn backend_mut(&mut self, id: BackendId) -> Option<&mut BackendState> {
        self.backends.iter_mut().find(|b| b.id == id)
    }

    /// A backend's state in one word: "up", "down", "drain" (weight 0), "failopen" (down but
    /// kept in) or "nomac" (an L2 backend whose MAC is unknown).
    pub fn backend_state(&self, b: &BackendState) -> &'static str {
        match (b.healthy(), self.usable(b), b.config.weight) {
            (false, true, _) => "failopen",
            (false, _, _) => "down",
            (true, false, _) => "nomac",
            (true, true, 0) => "drain",
            (true, true, _) => "up",
        }
    }
}

pub struct Agent {
    pub dataplane: Dataplane,
    services: Vec<ServiceState>,
    /// The config in force: what a reload is compared with.
    config: Config,
    /// Where health tasks report; None when health checks are not run (tests).
    events: Option<mpsc::Sender<Event>>,
    /// How backends start: as remembered, else as the config or the takeover says.
    start: Starts,
    /// The state file and what it holds; None when none is kept (tests).
    state: Option<(PathBuf, State)>,
    /// Every backend has been checked once: logged once.
    ready: bool,
    /// Announces the VIPs over BGP, once the data path is attached.
    speaker: Option<crate::bgp::Speaker>,
    /// The services proxied at L7.
    pub l7: crate::l7::L7,
}

/// How backends start.
#[derive(Clone, Debug, Default)]
pub struct Starts {
    /// Health remembered by the state file, by (service key, address).
    pub known: HashMap<(String, IpAddr), bool>,
    /// A data path is taken over: backends not remembered start up (they were serving).
    pub taking_over: bool,
}

/// The data path's run-time settings from the config.
pub fn settings(config: &Config) -> Settings {
    let IpipConfig { source_v4, source_v6 } = &config.ipip;
    let mut s = Settings {
        udp_idle_ns: config.flows.udp_idle.as_nanos() as u64,
        new_flows_per_cpu_sec: config.flows.new_flows_per_cpu_sec,
        ..Settings::default()
    };
    if let Some((addr, len)) = source_v4 {
        let host = u32::MAX.checked_shr(u32::from(*len)).unwrap_or(0);
        s.ipip_src_v4 = u32::from_ne_bytes(addr.octets()) & !host.to_be();
        s.ipip_src_v4_host = host.to_be();
    }
    if let Some((addr, len)) = source_v6 {
        let host = u32::MAX.checked_shr(u32::from(len.saturating_sub(96))).unwrap_or(0);
        let mut words = lb_common::addr_v6(addr.octets());
        words[3] &= !host.to_be();
        s.ipip_src_v6 = words;
        s.ipip_src_v6_host = host.to_be();
    }
    s
}

impl Agent {
    /// Fills the maps from `config`, an L2 backend with its MAC from the config or the neighbour
    /// table. With `events`, a health task per backend reports there (a backend starts as its
    /// `initial_state`) and the flow table's walker runs (the caller must be inside a tokio
    /// runtime); without, every backend is up.
    pub fn new(dataplane: Dataplane, config: &Config, events: Option<mpsc::Sender<Event>>) -> Result<Self> {
        Self::start(dataplane, config, events, Starts::default(), None)
    }

    /// As [`Agent::new`], with backends starting as `starts` says (a backend neither
    /// remembered nor taken over starts as its `initial_state`), and the state kept in
    /// `state` (its file written on every change).
    pub fn start(
        mut dataplane: Dataplane,
        config: &Config,
        events: Option<mpsc::Sender<Event>>,
        starts: Starts,
        state: Option<(PathBuf, State)>,
    ) -> Result<Self> {
        dataplane.set_settings(settings(config))?;
        for name in &config.egress_interfaces {
            let index = if_index(name).ok_or_else(|| anyhow!("unknown egress interface {name:?}"))?;
            dataplane.add_tx_port(index)?;
        }
        let events_for_l7 = events.clone();
        let mut agent = Self {
            dataplane,
            services: Vec::new(),
            config: config.clone(),
            events,
            start: starts,
            state,
            ready: false,
            speaker: None,
            l7: crate::l7::L7::new(events_for_l7),
        };
        let macs = resolve_macs(config.services.iter().collect(), &config.interface);
        for sc in &config.services {
            agent.add_service(sc, &macs)?;
        }
        let l7 = agent.l7.prepare(&config.l7)?;
        agent.l7.commit(l7);
        // Slots of a previous agent that no backend claimed are free from here on, and so are
        // remembered states: a backend added later starts as its initial_state.
        agent.dataplane.ids().forget_adopted();
        agent.start = Starts::default();
        agent.save_state();
        if agent.events.is_some() {
            agent.dataplane.flow_walker()?.spawn(FLOW_WALK_PERIOD);
        }
        Ok(agent)
    }

    /// Control-API changes in force, in order (what a reload makes again on the file's config).
    pub fn runtime_changes(&self) -> &[Request] {
        self.state.as_ref().map_or(&[], |(_, s)| s.changes.as_slice())
    }

    /// Records a control-API change that was applied and writes the state file.
    pub fn record_change(&mut self, change: Request) {
        if let Some((_, state)) = &mut self.state {
            state.changes.push(change);
        }
        self.save_state();
    }

    /// Keeps only these recorded changes (the others no longer apply to the file's config).
    pub fn keep_changes(&mut self, kept: Vec<Request>) {
        if let Some((_, state)) = &mut self.state {
            state.changes = kept;
        }
        self.save_state();
    }

    /// Writes the state file: the recorded changes and every checked backend's health. A
    /// failure is logged; the agent goes on. Called where the state changes: a health verdict,
    /// a recorded or dropped API change, the start.
    fn save_state(&mut self) {
        let health: Vec<BackendHealth> = self
            .services
            .iter()
            .flat_map(|s| {
                let key = s.key();
                s.backends.iter().filter(|b| b.checked).map(move |b| BackendHealth {
                    service: key.clone(),
                    address: b.config.address,
                    up: b.up,
                })
            })
            .collect();
        let Some((path, state)) = &mut self.state else { return };
        state.health = health;
        if let Err(e) = state.save(path) {
            error!("cannot write the state file {}: {e:#}", path.display());
        }
    }

    /// Whether every backend has a verdict of its checks.
    pub fn all_checked(&self) -> bool {
        self.services.iter().all(|s| s.backends.iter().all(|b| b.checked)) && self.l7.all_checked()
    }

    /// Logs, once, that every backend has been checked: from then on the tables say what the
    /// checks say.
    pub fn log_ready(&mut self) {
        if self.ready || !self.all_checked() {
            return;
        }
        self.ready = true;
        let (up, total) = self
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .fold((0, 0), |(u, t), b| (u + usize::from(b.healthy()), t + 1));
        let (l7_up, l7_total) = self.l7.counts();
        info!("ready: every backend checked, {} of {} up", up + l7_up, total + l7_total);
    }

    /// Hands the BGP speaker to the agent, which tells it of every health change from here on.
    pub fn set_speaker(&mut self, speaker: crate::bgp::Speaker) {
        self.speaker = Some(speaker);
        self.announce();
    }

    /// The BGP speaker, for status and `ctl drain-host`.
    pub fn speaker(&self) -> Option<&crate::bgp::Speaker> {
        self.speaker.as_ref()
    }

    /// Takes the speaker back, at shutdown: its VIPs are withdrawn before the data path goes.
    pub fn take_speaker(&mut self) -> Option<crate::bgp::Speaker> {
        self.speaker.take()
    }

    /// The services, in the config's order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceState> {
        self.services.iter()
    }

    /// The config in force (the file's, with API changes applied).
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn service(&self, id: ServiceId) -> &ServiceState {
        self.services.iter().find(|s| s.id == id).expect("a service id the agent handed out")
    }

    fn service_mut(&mut self, id: ServiceId) -> &mut ServiceState {
        self.services.iter_mut().find(|s| s.id == id).expect("a service id the agent handed out")
    }

    /// The service a backend belongs to, if it is still there.
    fn owner(&self, backend: BackendId) -> Option<ServiceId> {
        self.services.iter().find(|s| s.backend(backend).is_some()).map(|s| s.id)
    }

    fn add_service(&mut self, sc: &ServiceConfig, macs: &HashMap<IpAddr, [u8; 6]>) -> Result<ServiceId> {
        let id = self.dataplane.ids().service();
        let slot = self.dataplane.add_service(sc.vip, sc.port, sc.protocol.number(), id.0, sc.maglev_size, sc.forward);
        let mut slot = match slot {
            Ok(slot) => slot,
            Err(e) => {
                self.dataplane.ids().free_service(id);
                return Err(e.context(format!("cannot add service {}", sc.name)));
            }
        };
        slot.set_scheduler(sc.scheduler.id());
        slot.set_affinity_timeout(sc.affinity_timeout_secs);
        self.services.push(ServiceState {
            id,
            config: sc.clone(),
            slot,
            backends: Vec::new(),
            fail_open: false,
            table: Vec::new(),
        });
        for b in &sc.backends {
            self.add_backend(id, b, macs.get(&b.address).copied(), None)?;
        }
        self.refresh(id)?;
        Ok(id)
    }

    /// Removes a whole service; its backends' flows re-hash, its slots are free again.
    fn remove_service(&mut self, id: ServiceId) -> Result<()> {
        let at = self.services.iter().position(|s| s.id == id).expect("a service id the agent handed out");
        let service = self.services.remove(at);
        self.dataplane.remove_service(&service.slot)?;
        for b in &service.backends {
            self.dataplane.set_backend(b.id.0, b.config.address, b.mac, false)?;
            self.dataplane.ids().free_backend(b.id);
        }
        self.dataplane.ids().free_service(id);
        Ok(())
    }

    /// How a backend of `service` at `addr` starts its checks when nothing says otherwise.
    fn start_of(&self, service: &ServiceState, addr: IpAddr) -> Start {
        if self.events.is_none() || !service.config.health.enabled {
            return Start::Up;
        }
        match self.start.known.get(&(service.key(), addr)) {
            Some(true) => Start::Up,
            Some(false) => Start::Down,
            None if self.start.taking_over || service.config.health.initial_up => Start::Up,
            None => Start::Unknown,
        }
    }

    /// Adds a backend; `start` overrides how its checks start (a backend replaced by a reload
    /// keeps its state).
    fn add_backend(
        &mut self,
        s: ServiceId,
        config: &BackendConfig,
        resolved: Option<[u8; 6]>,
        start: Option<Start>,
    ) -> Result<()> {
        let id = self.dataplane.ids().backend(config.address);
        let service = self.service(s);
        let start = start.unwrap_or_else(|| self.start_of(service, config.address));
        let mac = config.mac.or(resolved);
        if mac.is_none() && service.config.forward == Forward::L2 {
            warn!(
                "service {}: backend {}: no neighbour entry on {}; it takes no traffic until it answers a health check (or set its mac)",
                service.config.name, config.address, self.config.interface
            );
        }
        let poke = Arc::new(Notify::new());
        let health = match (&self.events, service.config.health.enabled) {
            (Some(events), true) => {
                let cfg = service.config.health.clone();
                Some(tokio::spawn(health::run(id, config.address, cfg, start, events.clone(), poke.clone())))
            }
            _ => None,
        };
        let last_flows = self.dataplane.backend_flows(id.0).unwrap_or_default();
        let (up, checked) = (start == Start::Up, start != Start::Unknown);
        let state = BackendState {
            id,
            config: config.clone(),
            up,
            checked,
            mac,
            health,
            poke,
            held_until: None,
            ejections: 0,
            ejections_total: 0,
            last_flows,
        };
        self.service_mut(s).backends.push(state);
        self.write_backend(s, id)
    }

    /// Takes a backend out: flows pinned to it re-hash; its slot may serve another backend
    /// later (with a new generation).
    fn remove_backend(&mut self, s: ServiceId, b: BackendId) -> Result<()> {
        let service = self.service_mut(s);
        let at = service.backends.iter().position(|x| x.id == b).expect("a backend of the service");
        let state = service.backends.remove(at);
        self.dataplane.set_backend(b.0, state.config.address, state.mac, false)?;
        self.dataplane.ids().free_backend(b);
        Ok(())
    }

    fn write_backend(&mut self, s: ServiceId, b: BackendId) -> Result<()> {
        let service = self.services.iter().find(|x| x.id == s).expect("a service id the agent handed out");
        let state = service.backend(b).expect("a backend of the service");
        let usable = service.usable(state);
        self.dataplane.set_backend_weight(b.0, state.config.weight)?;
        self.dataplane.set_backend(b.0, state.config.address, state.mac, usable)
    }

    fn write_backends(&mut self, s: ServiceId) -> Result<()> {
        let ids: Vec<BackendId> = self.service(s).backends.iter().map(|b| b.id).collect();
        ids.into_iter().try_for_each(|b| self.write_backend(s, b))
    }

    /// Re-decides whether the service fails open (rewriting every backend when that changes)
    /// and publishes its table.
    fn refresh(&mut self, s: ServiceId) -> Result<()> {
        let service = self.service(s);
        let up = service.backends.iter().filter(|b| b.healthy() && service.reachable(b)).count();
        let min = service.config.health.min_healthy as usize;
        // Until every backend has a verdict, the ones not checked yet are not failing.
        let all_checked = service.backends.iter().all(|b| b.checked);
        let fail_open = !service.backends.is_empty() && up < min && all_checked;
        if fail_open != service.fail_open {
            let name = &service.config.name;
            if fail_open {
                error!("service {name}: FAIL OPEN: only {up} backends healthy, fewer than min_healthy {min}: every backend stays in the table");
            } else {
                info!("service {name}: {up} backends healthy again; failing ones leave the table");
            }
            self.service_mut(s).fail_open = fail_open;
            self.write_backends(s)?;
        }
        self.publish(s)
    }

    /// Rebuilds the service's table from its usable backends and publishes it.
    fn publish(&mut self, s: ServiceId) -> Result<()> {
        let service = self.services.iter_mut().find(|x| x.id == s).expect("a service id the agent handed out");
        let members: Vec<Member> = service
            .backends
            .iter()
            .filter(|b| service.usable(b))
            .map(|b| Member { id: b.id.0, key: address_key(b.config.address), weight: b.config.weight })
            .collect();
        let table = tables::build(service.config.scheduler, &members, service.slot.table_size);
        self.dataplane
            .publish_table(&mut service.slot, &table)
            .with_context(|| format!("cannot publish the table of service {}", service.config.name))?;
        service.table = table;
        if !members.iter().any(|m| m.weight > 0) {
            error!("service {}: no usable backend; its new flows are dropped", service.config.name);
        }
        Ok(())
    }

    /// Applies a health report (one about a backend removed since is ignored).
    pub fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::State { target, .. } if self.owner(target).is_none() => {
                if self.l7.handle(&event) {
                    self.log_ready();
                }
            }
            Event::State { target, up, detail } => {
                let Some(s) = self.owner(target) else { return Ok(()) };
                let interface = self.config.interface.clone();
                let state = self.service_mut(s).backend_mut(target).expect("its owner holds it");
                let first = !state.checked;
                state.up = up;
                state.checked = true;
                if up && state.config.mac.is_none() {
                    // A replaced host keeps its address but not its MAC.
                    state.mac = neigh::lookup(state.config.address, &interface).or(state.mac);
                }
                // Down: flows pinned to it re-hash; up: it takes new flows again.
                self.write_backend(s, target)?;
                self.refresh(s)?;
                let service = self.service(s);
                let n_up = service.backends.iter().filter(|b| b.up).count();
                let addr = service.backend(target).expect("its owner holds it").config.address;
                let (name, total) = (&service.config.name, service.backends.len());
                if first {
                    let verdict = if up { "up" } else { "down" };
                    info!("service {name}: backend {addr} is {verdict} at {detail}; {n_up} of {total} backends up");
                } else if up {
                    info!("service {name}: backend {addr} UP after {detail}; {n_up} of {total} backends up");
                } else {
                    warn!("service {name}: backend {addr} DOWN after {detail}; {n_up} of {total} backends up");
                }
                self.save_state();
                self.log_ready();
            }
            Event::Reachable { target } => {
                let Some(s) = self.owner(target) else { return Ok(()) };
                // Only an L2 backend without a MAC looks at the neighbour table on a success.
                let service = self.service(s);
                let state = service.backend(target).expect("its owner holds it");
                if service.config.forward != Forward::L2 || state.mac.is_some() {
                    return Ok(());
                }
                if let Some(mac) = neigh::lookup(state.config.address, &self.config.interface) {
                    info!(
                        "service {}: backend {} is at {}",
                        service.config.name,
                        state.config.address,
                        format_mac(mac)
                    );
                    self.service_mut(s).backend_mut(target).expect("its owner holds it").mac = Some(mac);
                    self.write_backend(s, target)?;
                    self.refresh(s)?;
                }
            }
        }
        Ok(())
    }

    /// Counters of the data path as a text table, for logs and the terminal.
    pub fn stats_table(&self) -> Result<String> {
        let mut out = String::new();
        writeln!(out, "{:<24} {:>12} {:>14}", "verdict", "packets", "bytes")?;
        for (reason, c) in self.dataplane.reason_counters()? {
            if c.packets > 0 {
                writeln!(out, "{:<24} {:>12} {:>14}", reason.name(), c.packets, c.bytes)?;
            }
        }
        let flows: Vec<String> = self
            .dataplane
            .flow_counters()?
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(e, n)| format!("{} {n}", e.name()))
            .collect();
        writeln!(out, "flow table: {}", if flows.is_empty() { "-".to_string() } else { flows.join(", ") })?;
        writeln!(out, "{:<24} {:<26} {:>5} {:>12} {:>14}", "service", "backend", "state", "packets", "bytes")?;
        for s in &self.services {
            let c = self.dataplane.service_counters(s.id.0)?;
            writeln!(out, "{:<24} {:<26} {:>5} {:>12} {:>14}", s.config.name, "*", "", c.packets, c.bytes)?;
            for b in &s.backends {
                let c = self.dataplane.backend_counters(b.id.0)?;
                let label = s.backend_state(b);
                let addr = b.config.address.to_string();
                writeln!(out, "{:<24} {:<26} {:>5} {:>12} {:>14}", "", addr, label, c.packets, c.bytes)?;
            }
        }
        Ok(out)
    }
}

/// MACs of the L2 backends without a configured one, resolved all at once: start-up and
/// reloads wait at most NEIGHBOUR_WAIT.
fn resolve_macs(services: Vec<&ServiceConfig>, interface: &str) -> HashMap<IpAddr, [u8; 6]> {
    let unknown: Vec<IpAddr> = services
        .iter()
        .filter(|s| s.forward == Forward::L2)
        .flat_map(|s| &s.backends)
        .filter(|b| b.mac.is_none())
        .map(|b| b.address)
        .collect();
    unknown
        .iter()
        .zip(neigh::resolve_all(&unknown, interface, NEIGHBOUR_WAIT))
        .filter_map(|(addr, mac)| Some((*addr, mac?)))
        .collect()
}
