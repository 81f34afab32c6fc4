//! The running balancer: services and backends from the config, their health, and the Maglev
//! tables that follow from them. Every change goes through the Dataplane facade; a reload
//! applies only the difference between the running state and the new config.
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use lb_common::Settings;
use log::{error, info, warn};
use tokio::{
    sync::{mpsc, Notify},
    task::JoinHandle,
};

use crate::{
    config::{format_mac, BackendConfig, Config, Forward, IpipConfig, Scheduler, ServiceConfig},
    dataplane::{self, Dataplane, ServiceSlot},
    health::{self, Event},
    maglev::{self, Member},
    neigh, wrr,
};

/// How long start-up waits for the kernel to resolve backends' MACs.
const NEIGHBOUR_WAIT: Duration = Duration::from_secs(1);

pub struct BackendState {
    /// Index into BACKENDS and BACKEND_STATS; also names the backend in health reports.
    pub id: u32,
    pub config: BackendConfig,
    pub up: bool,
    /// None until configured or resolved: an L2 backend without one takes no traffic.
    pub mac: Option<[u8; 6]>,
    health: Option<JoinHandle<()>>,
    /// Wakes the health task for a probe now (a passive alarm).
    pub poke: Arc<Notify>,
    /// Set by a passive alarm: out of the table until then, whatever the active checks say.
    pub held_until: Option<Instant>,
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
    pub config: ServiceConfig,
    pub slot: ServiceSlot,
    pub backends: Vec<BackendState>,
    /// Fewer than `health.min_healthy` backends are up: the failing ones stay in the table.
    pub fail_open: bool,
}

impl ServiceState {
    /// Whether the service's forwarding can reach the backend at all.
    fn reachable(&self, b: &BackendState) -> bool {
        self.config.forward == Forward::Ipip || b.mac.is_some()
    }

    /// Whether a backend can take packets: up (or the service fails open), and reachable.
    fn usable(&self, b: &BackendState) -> bool {
        (b.healthy() || self.fail_open) && self.reachable(b)
    }
}

pub struct Agent {
    pub dataplane: Dataplane,
    pub services: Vec<ServiceState>,
    /// The config in force: what a reload is compared with.
    config: Config,
    /// Where health tasks report; None when health checks are not run (tests).
    events: Option<mpsc::Sender<Event>>,
    free_backend_ids: Vec<u32>,
    next_backend_id: u32,
    free_service_ids: Vec<u32>,
    next_service_id: u32,
}

/// The stable identity of a backend for Maglev: an IPv4 address as its number, an IPv6
/// address folded to 64 bits. Never derived from config order, so every host agrees.
pub fn address_key(addr: IpAddr) -> u64 {
    match addr {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        IpAddr::V6(a) => {
            let n = u128::from(a);
            (n >> 64) as u64 ^ (n as u64).rotate_left(29)
        }
    }
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

/// What must not change without a restart: it is fixed when the program is loaded.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.interface != new.interface {
        changed.push("interface");
    }
    if old.hash_seed != new.hash_seed {
        changed.push("hash_seed");
    }
    if old.maglev_capacity != new.maglev_capacity {
        changed.push("maglev_capacity");
    }
    if old.flows.size != new.flows.size {
        changed.push("flows.size");
    }
    if old.egress_interfaces != new.egress_interfaces {
        changed.push("egress_interfaces");
    }
    changed
}

fn service_key(s: &ServiceConfig) -> (IpAddr, u16, crate::config::Protocol) {
    (s.vip, s.port, s.protocol)
}

impl Agent {
    /// Fills the maps from `config`: every backend starts up (health checks take it out), an L2
    /// backend with its MAC from the config or the neighbour table. With `events`, a health
    /// task per backend reports there (the caller must be inside a tokio runtime).
    pub fn new(mut dataplane: Dataplane, config: &Config, events: Option<mpsc::Sender<Event>>) -> Result<Self> {
        dataplane.set_settings(settings(config))?;
        for name in &config.egress_interfaces {
            let index = dataplane::if_index(name).ok_or_else(|| anyhow!("unknown egress interface {name:?}"))?;
            dataplane.add_tx_port(index)?;
        }
        let mut agent = Self {
            dataplane,
            services: Vec::new(),
            config: config.clone(),
            events,
            free_backend_ids: Vec::new(),
            next_backend_id: 0,
            free_service_ids: Vec::new(),
            next_service_id: 0,
        };
        let macs = resolve_macs(config.services.iter().collect(), &config.interface);
        for sc in &config.services {
            agent.add_service(sc, &macs)?;
        }
        if agent.events.is_some() {
            reconcile_active_flows(agent.dataplane.active_flow_maps()?, ACTIVE_FLOWS_PERIOD);
        }
        Ok(agent)
    }

    fn add_service(&mut self, sc: &ServiceConfig, macs: &HashMap<IpAddr, [u8; 6]>) -> Result<()> {
        let id = self.free_service_ids.pop().unwrap_or_else(|| {
            self.next_service_id += 1;
            self.next_service_id - 1
        });
        let mut slot = self
            .dataplane
            .add_service(sc.vip, sc.port, sc.protocol.number(), id, sc.maglev_size, sc.forward)
            .with_context(|| format!("cannot add service {}", sc.name))?;
        slot.set_scheduler(sc.scheduler.id());
        slot.set_affinity_timeout(sc.affinity_timeout_secs);
        self.services.push(ServiceState { config: sc.clone(), slot, backends: Vec::new(), fail_open: false });
        let s = self.services.len() - 1;
        for b in &sc.backends {
            self.add_backend(s, b, macs.get(&b.address).copied())?;
        }
        self.refresh(s)
    }

    fn add_backend(&mut self, s: usize, config: &BackendConfig, resolved: Option<[u8; 6]>) -> Result<()> {
        let id = self.free_backend_ids.pop().unwrap_or_else(|| {
            self.next_backend_id += 1;
            self.next_backend_id - 1
        });
        let service = &self.services[s];
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
                Some(tokio::spawn(health::run(id, config.address, cfg, true, events.clone(), poke.clone())))
            }
            _ => None,
        };
        let last_flows = self.dataplane.backend_flows(id).unwrap_or_default();
        let state =
            BackendState { id, config: config.clone(), up: true, mac, health, poke, held_until: None, last_flows };
        self.services[s].backends.push(state);
        self.write_backend(s, self.services[s].backends.len() - 1)
    }

    /// Takes a backend out: flows pinned to it re-hash; its id may serve another backend later
    /// (with a new generation).
    fn remove_backend(&mut self, s: usize, b: usize) -> Result<()> {
        let state = self.services[s].backends.remove(b);
        self.dataplane.set_backend(state.id, state.config.address, state.mac, false)?;
        self.free_backend_ids.push(state.id);
        Ok(())
    }

    fn write_backend(&mut self, s: usize, b: usize) -> Result<()> {
        let service = &self.services[s];
        let state = &service.backends[b];
        let usable = service.usable(state);
        self.dataplane.set_backend_weight(state.id, state.config.weight)?;
        self.dataplane.set_backend(state.id, state.config.address, state.mac, usable)
    }

    /// Re-decides whether the service fails open (rewriting every backend when that changes)
    /// and publishes its table.
    fn refresh(&mut self, s: usize) -> Result<()> {
        let service = &self.services[s];
        let up = service.backends.iter().filter(|b| b.healthy() && service.reachable(b)).count();
        let min = service.config.health.min_healthy as usize;
        let fail_open = !service.backends.is_empty() && up < min;
        if fail_open != service.fail_open {
            let name = &service.config.name;
            if fail_open {
                error!("service {name}: FAIL OPEN: only {up} backends healthy, fewer than min_healthy {min}: every backend stays in the table");
            } else {
                info!("service {name}: {up} backends healthy again; failing ones leave the table");
            }
            self.services[s].fail_open = fail_open;
            for b in 0..self.services[s].backends.len() {
                self.write_backend(s, b)?;
            }
        }
        self.publish(s)
    }

    /// Rebuilds the service's table from its usable backends and publishes it: a Maglev table
    /// (maglev, source-hash) or a round-robin sequence (rr, wrr).
    fn publish(&mut self, s: usize) -> Result<()> {
        let service = &mut self.services[s];
        let members: Vec<Member> = service
            .backends
            .iter()
            .filter(|b| service.usable(b))
            .map(|b| Member { id: b.id, key: address_key(b.config.address), weight: b.config.weight })
            .collect();
        let size = service.slot.table_size;
        let table = match service.config.scheduler {
            // lc/wlc draw their candidates from the Maglev table: weights and health shape it.
            Scheduler::Maglev | Scheduler::SourceHash | Scheduler::Lc | Scheduler::Wlc => maglev::build(&members, size),
            Scheduler::Rr => wrr::table(&members, size, false),
            Scheduler::Wrr => wrr::table(&members, size, true),
        };
        self.dataplane
            .publish_table(&mut service.slot, &table)
            .with_context(|| format!("cannot publish the table of service {}", service.config.name))?;
        if !members.iter().any(|m| m.weight > 0) {
            error!("service {}: no usable backend; its new flows are dropped", service.config.name);
        }
        Ok(())
    }

    /// The config in force (the file's, with API changes applied).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A backend's state in one word: "up", "down", "drain" (weight 0) or "nomac" (an L2
    /// backend whose MAC is unknown).
    pub fn backend_state(&self, service: &ServiceState, b: &BackendState) -> &'static str {
        match (b.healthy(), service.usable(b), b.config.weight) {
            (false, true, _) => "failopen",
            (false, _, _) => "down",
            (true, false, _) => "nomac",
            (true, true, 0) => "drain",
            (true, true, _) => "up",
        }
    }

    fn find(&self, id: u32) -> Option<(usize, usize)> {
        self.services
            .iter()
            .enumerate()
            .find_map(|(s, svc)| svc.backends.iter().position(|b| b.id == id).map(|b| (s, b)))
    }

    /// Applies a health report (one about a backend removed since is ignored).
    pub fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::State { target, up, detail } => {
                let Some((s, b)) = self.find(target) else { return Ok(()) };
                let interface = self.config.interface.clone();
                let state = &mut self.services[s].backends[b];
                state.up = up;
                if up && state.config.mac.is_none() {
                    // A replaced host keeps its address but not its MAC.
                    state.mac = neigh::lookup(state.config.address, &interface).or(state.mac);
                }
                // Down: flows pinned to it re-hash; up: it takes new flows again.
                self.write_backend(s, b)?;
                self.refresh(s)?;
                let service = &self.services[s];
                let n_up = service.backends.iter().filter(|b| b.up).count();
                let (addr, total) = (service.backends[b].config.address, service.backends.len());
                let name = &service.config.name;
                if up {
                    info!("service {name}: backend {addr} UP after {detail}; {n_up} of {total} backends up");
                } else {
                    warn!("service {name}: backend {addr} DOWN after {detail}; {n_up} of {total} backends up");
                }
            }
            Event::Reachable { target } => {
                let Some((s, b)) = self.find(target) else { return Ok(()) };
                // Only an L2 backend without a MAC looks at the neighbour table on a success.
                let service = &self.services[s];
                let state = &service.backends[b];
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
                    self.services[s].backends[b].mac = Some(mac);
                    self.write_backend(s, b)?;
                    self.refresh(s)?;
                }
            }
        }
        Ok(())
    }

    /// The in-band check, every `passive.window`: a backend whose new TCP flows had to resend
    /// their SYN more than `ratio` times per flow is held out of the table for `hold` and
    /// probed at once; its active checks bring it back after the hold. Either signal can
    /// evict; fail open still applies.
    pub fn passive_check(&mut self, now: Instant) -> Result<()> {
        let cfg = self.config.passive.clone();
        for s in 0..self.services.len() {
            let mut changed = false;
            let name = self.services[s].config.name.clone();
            for b in 0..self.services[s].backends.len() {
                let id = self.services[s].backends[b].id;
                let flows = self.dataplane.backend_flows(id)?;
                let state = &mut self.services[s].backends[b];
                let new = flows.new_flows.saturating_sub(state.last_flows.new_flows);
                let retx = flows.syn_retransmits.saturating_sub(state.last_flows.syn_retransmits);
                state.last_flows = flows;
                if state.held_until.is_some_and(|t| t <= now) {
                    state.held_until = None;
                    changed = true;
                    info!("service {name}: backend {} released from its passive hold", state.config.address);
                    continue;
                }
                let suspect = new + retx >= cfg.min_flows && retx as f64 > cfg.ratio * new.max(1) as f64;
                if cfg.enabled && suspect && state.held_until.is_none() {
                    state.held_until = Some(now + cfg.hold);
                    state.poke.notify_one();
                    changed = true;
                    warn!(
                        "service {name}: backend {} DOWN by passive alarm: {retx} SYN retransmissions for {new} new flows in {} ms; held out for {} ms",
                        state.config.address,
                        cfg.window.as_millis(),
                        cfg.hold.as_millis()
                    );
                }
            }
            if changed {
                for b in 0..self.services[s].backends.len() {
                    self.write_backend(s, b)?;
                }
                self.refresh(s)?;
            }
        }
        Ok(())
    }

    /// Brings the running state to `new` (already validated), changing only what differs:
    /// flows to backends that stay keep their backend. Settings fixed at load time must not
    /// change. Returns a one-line summary.
    pub fn reload(&mut self, new: &Config) -> Result<String> {
        let fixed = restart_only_changes(&self.config, new);
        if !fixed.is_empty() {
            bail!("changing {} needs a restart; nothing was changed", fixed.join(", "));
        }
        let wanted: HashMap<_, _> = new.services.iter().map(|s| (service_key(s), s)).collect();
        let (mut added, mut removed, mut changed) = (0, 0, 0);

        // Services that go.
        let mut s = 0;
        while s < self.services.len() {
            if wanted.contains_key(&service_key(&self.services[s].config)) {
                s += 1;
                continue;
            }
            let service = self.services.remove(s);
            self.dataplane.remove_service(&service.slot)?;
            for b in &service.backends {
                self.dataplane.set_backend(b.id, b.config.address, b.mac, false)?;
                self.free_backend_ids.push(b.id);
            }
            self.free_service_ids.push(service.slot.id);
            info!("service {} removed", service.config.name);
            removed += 1;
        }

        self.dataplane.set_settings(settings(new))?;
        let fresh: Vec<&ServiceConfig> = new.services.iter().collect();
        let macs = resolve_macs(fresh, &new.interface);
        for sc in &new.services {
            let Some(s) = self.services.iter().position(|st| service_key(&st.config) == service_key(sc)) else {
                self.add_service(sc, &macs)?;
                info!("service {} added with {} backends", sc.name, sc.backends.len());
                added += 1;
                continue;
            };
            if self.update_service(s, sc, &macs)? {
                changed += 1;
            }
        }
        self.config = new.clone();
        Ok(format!("{added} services added, {removed} removed, {changed} changed"))
    }

    /// Applies a service's new config; true when anything changed.
    fn update_service(&mut self, s: usize, sc: &ServiceConfig, macs: &HashMap<IpAddr, [u8; 6]>) -> Result<bool> {
        let old = self.services[s].config.clone();
        if old == *sc {
            return Ok(false);
        }
        if old.maglev_size != sc.maglev_size {
            warn!(
                "service {}: maglev_size stays {} until the service is removed and added again",
                sc.name, old.maglev_size
            );
        }
        let health_changed = old.health != sc.health;
        let mut config = sc.clone();
        config.maglev_size = old.maglev_size;
        self.services[s].slot.set_forward(sc.forward);
        if old.scheduler != sc.scheduler {
            info!("service {}: scheduler {} -> {}", sc.name, old.scheduler, sc.scheduler);
        }
        self.services[s].slot.set_scheduler(sc.scheduler.id());
        self.services[s].slot.set_affinity_timeout(sc.affinity_timeout_secs);
        self.services[s].config = config;

        let wanted: HashSet<IpAddr> = sc.backends.iter().map(|b| b.address).collect();
        let mut b = 0;
        while b < self.services[s].backends.len() {
            let addr = self.services[s].backends[b].config.address;
            if wanted.contains(&addr) && !health_changed {
                b += 1;
            } else {
                // A backend with new health settings is replaced, which restarts its checks.
                self.remove_backend(s, b)?;
                if !wanted.contains(&addr) {
                    info!("service {}: backend {addr} removed", sc.name);
                }
            }
        }
        for bc in &sc.backends {
            match self.services[s].backends.iter().position(|st| st.config.address == bc.address) {
                Some(b) => {
                    let state = &mut self.services[s].backends[b];
                    if state.config != *bc {
                        if state.config.weight != bc.weight {
                            info!(
                                "service {}: backend {} weight {} -> {}",
                                sc.name, bc.address, state.config.weight, bc.weight
                            );
                        }
                        state.mac = bc.mac.or(state.mac);
                        state.config = bc.clone();
                        self.write_backend(s, b)?;
                    }
                }
                None => {
                    self.add_backend(s, bc, macs.get(&bc.address).copied())?;
                    if old.backends.iter().all(|o| o.address != bc.address) {
                        info!("service {}: backend {} added", sc.name, bc.address);
                    }
                }
            }
        }
        self.refresh(s)?;
        Ok(true)
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
            let c = self.dataplane.service_counters(s.slot.id)?;
            writeln!(out, "{:<24} {:<26} {:>5} {:>12} {:>14}", s.config.name, "*", "", c.packets, c.bytes)?;
            for b in &s.backends {
                let c = self.dataplane.backend_counters(b.id)?;
                let label = self.backend_state(s, b);
                let addr = b.config.address.to_string();
                writeln!(out, "{:<24} {:<26} {:>5} {:>12} {:>14}", "", addr, label, c.packets, c.bytes)?;
            }
        }
        Ok(out)
    }
}

/// MACs of the L2 backends without a configured one, resolved all at once: start-up and
/// reloads wait at most NEIGHBOUR_WAIT.
/// How often the agent recounts the active flows of every backend from the flow table.
pub const ACTIVE_FLOWS_PERIOD: std::time::Duration = std::time::Duration::from_secs(3);

/// Reconciles the data path's active-flow counts with the flow table every `period`, on a
/// thread of its own (the walk takes a syscall per entry); ends when the maps are gone.
fn reconcile_active_flows(maps: dataplane::ActiveFlowMaps, period: std::time::Duration) {
    std::thread::spawn(move || loop {
        std::thread::sleep(period);
        match dataplane::reconcile_active_flows(maps) {
            Ok(n) if n > 0 => log::debug!("active flows: {n} backends reconciled with the flow table"),
            Ok(_) => {}
            Err(e) => {
                warn!("active flows: cannot reconcile with the flow table, stopping: {e:#}");
                return;
            }
        }
    });
}

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
