//! In-band (passive) health: what the balancer sees of a backend without seeing its replies.
//! A client whose SYN got no answer sends it again; the data path counts, per backend, new
//! flows and the SYNs of flows already pinned, and this compares the two every window.
use std::time::Instant;

use anyhow::Result;
use log::{info, warn};

use super::Agent;
use crate::dataplane::ServiceId;

impl Agent {
    /// The in-band check, every `passive.window`: a backend whose new TCP flows had to resend
    /// their SYN more than `ratio` times per flow is held out of the table for `hold` and
    /// probed at once; its active checks bring it back after the hold. Either signal can
    /// evict; fail open still applies.
    pub fn passive_check(&mut self, now: Instant) -> Result<()> {
        let cfg = self.config.passive.clone();
        let ids: Vec<ServiceId> = self.services.iter().map(|s| s.id).collect();
        for s in ids {
            let mut changed = false;
            let backends: Vec<_> = self.service(s).backends.iter().map(|b| b.id).collect();
            for b in backends {
                let flows = self.dataplane.backend_flows(b.0)?;
                let service = self.service_mut(s);
                let name = service.config.name.clone();
                let state = service.backend_mut(b).expect("a backend of the service");
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
                self.write_backends(s)?;
                self.refresh(s)?;
            }
        }
        Ok(())
    }
}
