//! The running balancer: services and backends from the config, their health, and the Maglev
//! tables that follow from them. Every change goes through the Dataplane facade.
use std::{collections::HashMap, fmt::Write as _, net::IpAddr, time::Duration};

use anyhow::{anyhow, Context as _, Result};
use lb_common::Settings;
use log::{error, info, warn};

use crate::{
    config::{format_mac, Config, Forward, IpipConfig, ServiceConfig},
    dataplane::{self, Dataplane, ServiceSlot},
    health::{Event, Target},
    maglev::{self, Member},
    neigh,
};

/// How long start-up waits for the kernel to resolve backends' MACs.
const NEIGHBOUR_WAIT: Duration = Duration::from_secs(1);

pub struct BackendState {
    /// Index into BACKENDS and BACKEND_STATS.
    pub id: u32,
    pub up: bool,
    /// None until configured or resolved: an L2 backend without one takes no traffic.
    pub mac: Option<[u8; 6]>,
}

pub struct ServiceState {
    pub config: ServiceConfig,
    pub slot: ServiceSlot,
    pub backends: Vec<BackendState>,
}

impl ServiceState {
    /// Whether backend `b` can take packets: up, and reachable by the service's forwarding.
    fn usable(&self, b: usize) -> bool {
        let state = &self.backends[b];
        state.up && (self.config.forward == Forward::Ipip || state.mac.is_some())
    }
}

pub struct Agent {
    pub dataplane: Dataplane,
    pub interface: String,
    pub services: Vec<ServiceState>,
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

impl Agent {
    /// Fills the maps from `config`: every backend starts up (health checks take it out), an L2
    /// backend with its MAC from the config or the neighbour table.
    pub fn new(mut dataplane: Dataplane, config: &Config) -> Result<Self> {
        dataplane.set_settings(settings(config))?;
        for name in &config.egress_interfaces {
            let index = dataplane::if_index(name).ok_or_else(|| anyhow!("unknown egress interface {name:?}"))?;
            dataplane.add_tx_port(index)?;
        }
        // Resolve every unconfigured L2 MAC at once: start-up waits at most NEIGHBOUR_WAIT.
        let unknown: Vec<IpAddr> = config
            .services
            .iter()
            .filter(|s| s.forward == Forward::L2)
            .flat_map(|s| &s.backends)
            .filter(|b| b.mac.is_none())
            .map(|b| b.address)
            .collect();
        let resolved: HashMap<_, _> =
            unknown.iter().copied().zip(neigh::resolve_all(&unknown, &config.interface, NEIGHBOUR_WAIT)).collect();

        let mut services = Vec::new();
        let mut next_backend = 0u32;
        for (id, sc) in config.services.iter().enumerate() {
            let slot = dataplane
                .add_service(sc.vip, sc.port, sc.protocol.number(), id as u32, sc.maglev_size, sc.forward)
                .with_context(|| format!("cannot add service {}", sc.name))?;
            let mut backends = Vec::new();
            for b in &sc.backends {
                let mac = b.mac.or_else(|| resolved.get(&b.address).copied().flatten());
                if mac.is_none() && sc.forward == Forward::L2 {
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
        let usable = service.usable(b);
        self.dataplane.set_backend(state.id, service.config.backends[b].address, state.mac, usable)
    }

    /// Rebuilds the service's Maglev table from its usable backends and publishes it.
    fn publish(&mut self, s: usize) -> Result<()> {
        let service = &mut self.services[s];
        let members: Vec<Member> = (0..service.backends.len())
            .filter(|&b| service.usable(b))
            .map(|b| Member {
                id: service.backends[b].id,
                key: address_key(service.config.backends[b].address),
                weight: service.config.backends[b].weight,
            })
            .collect();
        let table = maglev::build(&members, service.slot.table_size);
        self.dataplane
            .publish_table(&mut service.slot, &table)
            .with_context(|| format!("cannot publish the table of service {}", service.config.name))?;
        if !members.iter().any(|m| m.weight > 0) {
            error!("service {}: no usable backend; its new flows are dropped", service.config.name);
        }
        Ok(())
    }

    /// Applies a health report.
    pub fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::State { target: Target { service: s, backend: b }, up, detail } => {
                self.services[s].backends[b].up = up;
                if up && self.services[s].config.backends[b].mac.is_none() {
                    // A replaced host keeps its address but not its MAC.
                    let fresh = neigh::lookup(self.services[s].config.backends[b].address, &self.interface);
                    self.services[s].backends[b].mac = fresh.or(self.services[s].backends[b].mac);
                }
                // Down: flows pinned to it re-hash; up: it takes new flows again.
                self.write_backend(s, b)?;
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
                // Only an L2 backend without a MAC looks at the neighbour table on a success.
                let service = &self.services[s];
                if service.config.forward != Forward::L2 || service.backends[b].mac.is_some() {
                    return Ok(());
                }
                let addr = service.config.backends[b].address;
                if let Some(mac) = neigh::lookup(addr, &self.interface) {
                    info!("service {}: backend {addr} is at {}", service.config.name, format_mac(mac));
                    self.services[s].backends[b].mac = Some(mac);
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
            for (b, (state, cfg)) in s.backends.iter().zip(&s.config.backends).enumerate() {
                let c = self.dataplane.backend_counters(state.id)?;
                let label = match (state.up, s.usable(b), cfg.weight) {
                    (false, _, _) => "down",
                    (true, false, _) => "nomac",
                    (true, true, 0) => "drain",
                    (true, true, _) => "up",
                };
                writeln!(
                    out,
                    "{:<24} {:<26} {:>5} {:>12} {:>14}",
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
