//! Bringing the running balancer to a new config, for a reload of the file and for every
//! control-API change alike: the config is validated as a whole and checked against what the
//! maps can take before anything is written, then only the difference is applied (flows to
//! backends that stay keep their backend).
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use log::{info, warn};

use super::{resolve_macs, settings, Agent};
use crate::{
    config::{Config, Protocol, ServiceConfig},
    dataplane::{ServiceId, ServiceSlot},
    error::ChangeError,
    health::Start,
};

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
    // BIRD's sessions are set up at start; the VIPs themselves follow the services.
    if old.bgp != new.bgp {
        changed.push("bgp");
    }
    changed
}

fn service_key(s: &ServiceConfig) -> (IpAddr, u16, Protocol) {
    (s.vip, s.port, s.protocol)
}

impl Agent {
    /// Brings the running state to `new`, changing only what differs. Refused, with nothing
    /// changed, when `new` fails the validator, changes what needs a restart, or has services
    /// whose tables the MAGLEV map cannot take. Returns a one-line summary.
    pub fn reload(&mut self, new: &Config) -> Result<String, ChangeError> {
        let fixed = restart_only_changes(&self.config, new);
        if !fixed.is_empty() {
            return Err(ChangeError::NeedsRestart(fixed));
        }
        let invalid = crate::config::validate(new);
        if !invalid.is_empty() {
            return Err(ChangeError::Invalid(invalid));
        }
        let wanted: HashMap<_, _> = new.services.iter().map(|s| (service_key(s), s)).collect();
        let going: Vec<ServiceId> =
            self.services.iter().filter(|s| !wanted.contains_key(&service_key(&s.config))).map(|s| s.id).collect();
        let staying: HashSet<_> = self.services.iter().map(|s| service_key(&s.config)).collect();
        let new_sizes: Vec<u32> =
            new.services.iter().filter(|s| !staying.contains(&service_key(s))).map(|s| s.maglev_size).collect();
        let freed: Vec<&ServiceSlot> =
            self.services.iter().filter(|s| going.contains(&s.id)).map(|s| &s.slot).collect();
        if !self.dataplane.tables_fit(&freed, &new_sizes) {
            let needed = new_sizes.iter().map(|&n| 2 * u64::from(n)).sum();
            return Err(ChangeError::NoTableSpace { needed, available: self.dataplane.tables_available(&freed) });
        }
        // Certificates read and new listeners bound before anything changes. Certificates are
        // read again on every reload, so that a reload picks up renewed files.
        let l7 = self.l7.prepare(&new.l7).map_err(ChangeError::L7)?;

        let (mut added, mut changed) = (0, 0);
        for &id in &going {
            let name = self.service(id).config.name.clone();
            self.remove_service(id)?;
            info!("service {name} removed");
        }
        self.dataplane.set_settings(settings(new))?;
        let macs = resolve_macs(new.services.iter().collect(), &new.interface);
        for sc in &new.services {
            match self.services.iter().find(|st| service_key(&st.config) == service_key(sc)).map(|s| s.id) {
                Some(id) => {
                    if self.update_service(id, sc, &macs)? {
                        changed += 1;
                    }
                }
                None => {
                    self.add_service(sc, &macs)?;
                    info!("service {} added with {} backends", sc.name, sc.backends.len());
                    added += 1;
                }
            }
        }
        // The config's order is the order services are listed in.
        let order: HashMap<_, usize> = new.services.iter().enumerate().map(|(i, s)| (service_key(s), i)).collect();
        self.services.sort_by_key(|s| order.get(&service_key(&s.config)).copied().unwrap_or(usize::MAX));
        self.l7.commit(l7);
        self.config = new.clone();
        // The state file is written by the caller, once it has recorded the change.
        self.log_ready();
        Ok(format!("{added} services added, {} removed, {changed} changed; {} L7 services", going.len(), new.l7.len()))
    }

    /// Applies a service's new config; true when anything changed.
    fn update_service(
        &mut self,
        s: ServiceId,
        sc: &ServiceConfig,
        macs: &HashMap<IpAddr, [u8; 6]>,
    ) -> anyhow::Result<bool> {
        let old = self.service(s).config.clone();
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
        if old.scheduler != sc.scheduler {
            info!("service {}: scheduler {} -> {}", sc.name, old.scheduler, sc.scheduler);
        }
        let service = self.service_mut(s);
        service.slot.set_forward(sc.forward);
        service.slot.set_scheduler(sc.scheduler.id());
        service.slot.set_affinity_timeout(sc.affinity_timeout_secs);
        service.config = config;

        let wanted: HashSet<IpAddr> = sc.backends.iter().map(|b| b.address).collect();
        // A backend with new health settings is replaced, which restarts its checks.
        let replaced: Vec<_> = self
            .service(s)
            .backends
            .iter()
            .filter(|b| !wanted.contains(&b.config.address) || health_changed)
            .map(|b| (b.id, b.config.address, b.checked.then_some(if b.up { Start::Up } else { Start::Down })))
            .collect();
        // What the replaced checks had found stays: a backend up stays up.
        let mut kept: HashMap<IpAddr, Option<Start>> = HashMap::new();
        for (b, addr, start) in replaced {
            kept.insert(addr, start);
            self.remove_backend(s, b)?;
            if !wanted.contains(&addr) {
                info!("service {}: backend {addr} removed", sc.name);
            }
        }
        for bc in &sc.backends {
            let existing = self.service(s).backends.iter().find(|st| st.config.address == bc.address).map(|b| b.id);
            match existing {
                Some(b) => {
                    let state = self.service_mut(s).backend_mut(b).expect("found above");
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
                    let start = kept.get(&bc.address).copied().flatten();
                    self.add_backend(s, bc, macs.get(&bc.address).copied(), start)?;
                    if old.backends.iter().all(|o| o.address != bc.address) {
                        info!("service {}: backend {} added", sc.name, bc.address);
                    }
                }
            }
        }
        self.refresh(s)?;
        Ok(true)
    }
}
