//! The running balancer: services and backends from the config, their health, and the Maglev
//! tables that follow from them. Every change goes through the Dataplane facade.
use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result};
use log::{error, info, warn};

use crate::{
    config::{format_mac, Config, ServiceConfig},
    dataplane::{Dataplane, ServiceSlot},
    health::{Event, Target},
    maglev::{self, Member},
    neigh,
};

/// How long start-up waits for the kernel to resolve a backend's MAC.
const NEIGHBOUR_WAIT: Duration = Duration::from_secs(1);

pub struct BackendState {
    /// Index into BACKENDS and BACKEND_STATS.
    pub id: u32,
    pub up: bool,
    /// None until configured or resolved: such a backend takes no traffic.
    pub mac: Option<[u8; 6]>,
}

pub struct ServiceState {
    pub config: ServiceConfig,
    pub slot: ServiceSlot,
    pub backends: Vec<BackendState>,
}

pub struct Agent {
    pub dataplane: Dataplane,
    pub interface: String,
    pub services: Vec<ServiceState>,
}

impl Agent {
    /// Fills the maps from `config`: every backend starts up (health checks take it out), with
    /// its MAC from the config or the neighbour table.
    pub fn new(mut dataplane: Dataplane, config: &Config) -> Result<Self> {
        // Resolve every unconfigured MAC at once: start-up waits at most NEIGHBOUR_WAIT.
        let unknown: Vec<_> =
            config.services.iter().flat_map(|s| &s.backends).filter(|b| b.mac.is_none()).map(|b| b.address).collect();
        let resolved: std::collections::HashMap<_, _> =
            unknown.iter().copied().zip(neigh::resolve_all(&unknown, &config.interface, NEIGHBOUR_WAIT)).collect();

        let mut services = Vec::new();
        let mut next_backend = 0u32;
        for (id, sc) in config.services.iter().enumerate() {
            let slot = dataplane
                .add_service(sc.vip, sc.port, sc.protocol.number(), id as u32, sc.maglev_size)
                .with_context(|| format!("cannot add service {}", sc.name))?;
            let mut backends = Vec::new();
            for b in &sc.backends {
                let mac = b.mac.or_else(|| resolved.get(&b.address).copied().flatten());
                if mac.is_none() {
                    warn!(
                        "service {}: backend {}: no neighbour entry on {}; it takes no traffic until it answers a health check (or set its mac)",
                        sc.name, b.address, config.interface
                    );
                }
                backends.push(BackendState { id: next_backend, up: true, mac });
                next_backend += 1;
            }
            services.push(ServiceState { config: sc.clone(), slot, backends });
        }
        let mut agent = Self { dataplane, interface: config.interface.clone(), services };
        for s in 0..agent.services.len() {
            for b in 0..agent.services[s].backends.len() {
                agent.write_backend(s, b)?;
            }
            agent.publish(s)?;
        }
        Ok(agent)
    }

    fn write_backend(&mut self, s: usize, b: usize) -> Result<()> {
        let service = &self.services[s];
        let state = &service.backends[b];
        if let Some(mac) = state.mac {
            self.dataplane.set_backend(state.id, service.config.backends[b].address, mac)?;
        }
        Ok(())
    }

    /// Rebuilds the service's Maglev table from its usable backends and publishes it.
    fn publish(&mut self, s: usize) -> Result<()> {
        let service = &mut self.services[s];
        let members: Vec<Member> = service
            .backends
            .iter()
            .zip(&service.config.backends)
            .filter(|(state, _)| state.up && state.mac.is_some())
            .map(|(state, cfg)| Member { id: state.id, key: u64::from(u32::from(cfg.address)), weight: cfg.weight })
            .collect();
        let table = maglev::build(&members, service.slot.table_size);
        self.dataplane
            .publish_table(&mut service.slot, &table)
            .with_context(|| format!("cannot publish the table of service {}", service.config.name))?;
        let usable = members.iter().filter(|m| m.weight > 0).count();
        if usable == 0 {
            error!("service {}: no usable backend; its traffic is dropped", service.config.name);
        }
        Ok(())
    }

    /// Applies a health report.
    pub fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::State { target: Target { service: s, backend: b }, up, detail } => {
                self.services[s].backends[b].up = up;
                if up && self.services[s].config.backends[b].mac.is_none() {
                    let fresh = neigh::lookup(self.services[s].config.backends[b].address, &self.interface);
                    if fresh.is_some() && fresh != self.services[s].backends[b].mac {
                        self.services[s].backends[b].mac = fresh;
                        self.write_backend(s, b)?;
                    }
                }
                self.publish(s)?;
                let service = &self.services[s];
                let n_up = service.backends.iter().filter(|b| b.up).count();
                let (addr, total) = (service.config.backends[b].address, service.backends.len());
                let name = &service.config.name;
                if up {
                    info!("service {name}: backend {addr} UP after {detail}; {n_up} of {total} backends up");
                } else {
                    warn!("service {name}: backend {addr} DOWN after {detail}; {n_up} of {total} backends up");
                }
            }
            Event::Reachable { target: Target { service: s, backend: b } } => {
                // Only a backend without a MAC looks at the neighbour table on every success;
                // the others refresh theirs when they come back up (a replaced host).
                if self.services[s].config.backends[b].mac.is_some() || self.services[s].backends[b].mac.is_some() {
                    return Ok(());
                }
                let addr = self.services[s].config.backends[b].address;
                let mac = neigh::lookup(addr, &self.interface);
                if mac.is_some() && mac != self.services[s].backends[b].mac {
                    info!(
                        "service {}: backend {addr} is at {}",
                        self.services[s].config.name,
                        format_mac(mac.unwrap_or_default())
                    );
                    self.services[s].backends[b].mac = mac;
                    self.write_backend(s, b)?;
                    self.publish(s)?;
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
        writeln!(out, "{:<24} {:<18} {:>5} {:>12} {:>14}", "service", "backend", "state", "packets", "bytes")?;
        for s in &self.services {
            let c = self.dataplane.service_counters(s.slot.id)?;
            writeln!(out, "{:<24} {:<18} {:>5} {:>12} {:>14}", s.config.name, "*", "", c.packets, c.bytes)?;
            for (state, cfg) in s.backends.iter().zip(&s.config.backends) {
                let c = self.dataplane.backend_counters(state.id)?;
                let label = match (state.up, state.mac.is_some()) {
                    (true, true) => "up",
                    (true, false) => "nomac",
                    (false, _) => "down",
                };
                writeln!(
                    out,
                    "{:<24} {:<18} {:>5} {:>12} {:>14}",
                    "",
                    cfg.address.to_string(),
                    label,
                    c.packets,
                    c.bytes
                )?;
            }
        }
        Ok(out)
    }
}
