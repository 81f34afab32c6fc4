//! What this host tells the network and what the other hosts must agree with: whether each
//! VIP should be announced (the policy; `bgp` carries it out), and a fingerprint of everything
//! that decides a new flow's backend, for comparing balancer hosts.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use lb_common::NO_BACKEND;

use super::{Agent, ServiceState};
use crate::bgp::Want;

/// FNV-1a, 64 bits: a stable digest (the same on every host and release), not a secret.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

impl ServiceState {
    /// Backends that are up and reachable (not merely kept in by a fail-open).
    fn serving(&self) -> usize {
        self.backends.iter().filter(|b| b.healthy() && self.reachable(b)).count()
    }

    /// The digest of the service's table, by backend address: hosts with equal digests send
    /// a new flow to the same backend.
    fn table_digest(&self) -> u64 {
        let mut h = FNV_OFFSET;
        fnv1a(&mut h, self.key().as_bytes());
        fnv1a(&mut h, self.config.scheduler.to_string().as_bytes());
        for &id in &self.table {
            match self.backends.iter().find(|b| b.id.0 == id) {
                Some(b) if id != NO_BACKEND => fnv1a(&mut h, b.config.address.to_string().as_bytes()),
                _ => fnv1a(&mut h, b"-"),
            }
            fnv1a(&mut h, b",");
        }
        h
    }
}

impl Agent {
    /// Per VIP: this host serves it once every backend of its services has a first verdict
    /// (until then this host's tables may differ from the other hosts', and a connection the
    /// router moves here could land on another backend), and while at least one of its
    /// services has `min_healthy` (at least one) backends up. A service failing open
    /// forwards, but to backends that may be down: a host with healthy ones should take it.
    pub fn bgp_wants(&self) -> BTreeMap<IpAddr, Want> {
        self.config
            .vips()
            .into_iter()
            .map(|vip| {
                let services: Vec<&ServiceState> = self.services.iter().filter(|s| s.config.vip == vip).collect();
                let need = |s: &ServiceState| (s.config.health.min_healthy as usize).max(1);
                let counts = services
                    .iter()
                    .map(|s| format!("{} {} of {} up", s.config.name, s.serving(), s.backends.len()))
                    .collect::<Vec<_>>()
                    .join(", ");
                let checked = services.iter().all(|s| s.backends.iter().all(|b| b.checked));
                let healthy = services.iter().any(|s| s.serving() >= need(s));
                let (serve, reason) = match (checked, healthy) {
                    (false, _) => (false, format!("waiting for the first health checks ({counts})")),
                    (true, true) => (true, counts),
                    (true, false) => (false, format!("no service has min_healthy backends up ({counts})")),
                };
                (vip, Want { serve, reason })
            })
            .collect()
    }

    /// Tells the BGP speaker, if there is one, what the VIPs' health now says.
    pub fn announce(&self) {
        if let Some(speaker) = &self.speaker {
            speaker.want(self.bgp_wants());
        }
    }

    /// `ctl fingerprint`: a digest of the hash seed and every service's table (by backend
    /// address, not by this host's slot numbers), then a line per service. Two hosts with the
    /// same first line send every new flow of a Maglev or source-hash service to the same
    /// backend; the service lines say which service differs when they do not.
    pub fn fingerprint(&self) -> String {
        let mut services: Vec<&ServiceState> = self.services.iter().collect();
        services.sort_by_key(|s| s.key());
        let mut all = FNV_OFFSET;
        fnv1a(&mut all, &self.config.hash_seed.to_le_bytes());
        let mut lines = String::new();
        for s in &services {
            let d = s.table_digest();
            fnv1a(&mut all, &d.to_le_bytes());
            let _ = write!(lines, "\n{:<24} {:<32} {d:016x}", s.config.name, s.key());
        }
        format!("fingerprint {all:016x} (hash seed and {} service tables){lines}", services.len())
    }
}
