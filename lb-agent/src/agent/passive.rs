//! In-band (passive) health: what the balancer sees of a backend without seeing its replies.
//! The data path counts, per backend, new flows, SYNs sent again on pinned flows, and TCP flows
//! pinned on their SYN whose client went on to send the handshake's ACK (so the backend
//! answered). Every window this compares them: a backend whose clients resend their SYNs, or
//! whose handshakes do not complete while the service's other backends' do, is held out. Each
//! ejection in a row holds it out longer; a share of the pool at most is held out at once.
use std::time::Instant;

use anyhow::Result;
use lb_common::BackendFlows;
use log::{info, warn};

use super::Agent;
use crate::{config::PassiveConfig, dataplane::ServiceId};

/// One backend's counters over a window.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    new: u64,
    retransmits: u64,
    syn_pinned: u64,
    established: u64,
}

impl Window {
    fn between(before: BackendFlows, now: BackendFlows) -> Self {
        Self {
            new: now.new_flows.saturating_sub(before.new_flows),
            retransmits: now.syn_retransmits.saturating_sub(before.syn_retransmits),
            syn_pinned: now.syn_pinned.saturating_sub(before.syn_pinned),
            established: now.established.saturating_sub(before.established),
        }
    }

    /// Share of the handshakes pinned this window that completed (flows pinned near the end
    /// complete in the next one: capped at 1).
    fn completion(&self) -> f64 {
        (self.established as f64 / self.syn_pinned.max(1) as f64).min(1.0)
    }
}

/// Why a backend is suspect, in words for the log; None when its window looks healthy or says
/// too little. `others` is the rest of the service's window.
fn suspicion(cfg: &PassiveConfig, w: &Window, others: &Window) -> Option<String> {
    if w.new + w.retransmits >= cfg.min_flows && w.retransmits as f64 > cfg.ratio * w.new.max(1) as f64 {
        return Some(format!("{} SYN retransmissions for {} new flows", w.retransmits, w.new));
    }
    // A SYN flood (or clients that give up) lowers every backend's completion alike: only a
    // backend doing worse than the rest of its service is suspect.
    let others_fine = others.syn_pinned < cfg.min_flows || others.completion() >= cfg.min_completion;
    if w.syn_pinned >= cfg.min_flows && w.completion() < cfg.min_completion && others_fine {
        return Some(format!(
            "{} of {} handshakes completed ({:.0}%; the service's other backends: {:.0}%)",
            w.established,
            w.syn_pinned,
            100.0 * w.completion(),
            100.0 * others.completion()
        ));
    }
    None
}

/// Whether a window says anything (enough flows to judge).
fn informative(cfg: &PassiveConfig, w: &Window) -> bool {
    w.new + w.retransmits >= cfg.min_flows || w.syn_pinned >= cfg.min_flows
}

impl Agent {
    /// The in-band check, every `passive.window`: a suspect backend is held out for `hold`
    /// times its ejections in a row (at most `max_hold`) and probed at once; its active checks
    /// bring it back after the hold, and a window with the signal still bad takes it out again.
    /// A clean window forgets the ejections. At most `max_ejected_percent` of a service's
    /// backends are held out at once. Either signal can evict; fail open still applies.
    pub fn passive_check(&mut self, now: Instant) -> Result<()> {
        let cfg = self.config.passive.clone();
        let ids: Vec<ServiceId> = self.services.iter().map(|s| s.id).collect();
        for s in ids {
            let mut changed = false;
            let mut windows = Vec::new();
            for b in self.service(s).backends.iter().map(|b| b.id).collect::<Vec<_>>() {
                let flows = self.dataplane.backend_flows(b.0)?;
                let state = self.service_mut(s).backend_mut(b).expect("a backend of the service");
                windows.push((b, Window::between(state.last_flows, flows)));
                state.last_flows = flows;
            }
            let total = windows.iter().fold(Window::default(), |a, (_, w)| Window {
                new: a.new + w.new,
                retransmits: a.retransmits + w.retransmits,
                syn_pinned: a.syn_pinned + w.syn_pinned,
                established: a.established + w.established,
            });
            let service = self.service(s);
            let name = service.config.name.clone();
            let pool = service.backends.len();
            let mut held = service.backends.iter().filter(|b| b.held_until.is_some_and(|t| t > now)).count();
            for (b, w) in windows {
                let others = Window {
                    new: total.new - w.new,
                    retransmits: total.retransmits - w.retransmits,
                    syn_pinned: total.syn_pinned - w.syn_pinned,
                    established: total.established - w.established,
                };
                let state = self.service_mut(s).backend_mut(b).expect("a backend of the service");
                let addr = state.config.address;
                if let Some(until) = state.held_until {
                    if until <= now {
                        state.held_until = None;
                        changed = true;
                        info!(
                            "service {name}: backend {addr} released from its passive hold (ejection {} in a row); \
                             watched",
                            state.ejections
                        );
                    }
                    continue;
                }
                let Some(why) = suspicion(&cfg, &w, &others).filter(|_| cfg.enabled) else {
                    if informative(&cfg, &w) && state.ejections > 0 {
                        info!("service {name}: backend {addr} clean for a window: its ejections are forgotten");
                        state.ejections = 0;
                    }
                    continue;
                };
                // The cap: the signal alone never takes out more than its share of the pool.
                if (held + 1) * 100 > cfg.max_ejected_percent as usize * pool {
                    warn!(
                        "service {name}: backend {addr} suspect ({why}) but {held} of {pool} backends are held out \
                         already (max_ejected_percent {}): it stays in",
                        cfg.max_ejected_percent
                    );
                    continue;
                }
                state.ejections += 1;
                state.ejections_total += 1;
                let hold = cfg.hold.saturating_mul(state.ejections).min(cfg.max_hold);
                state.held_until = Some(now + hold);
                state.poke.notify_one();
                held += 1;
                changed = true;
                warn!(
                    "service {name}: backend {addr} DOWN by passive alarm: {why} in {} ms; held out for {} ms \
                     (ejection {} in a row)",
                    cfg.window.as_millis(),
                    hold.as_millis(),
                    state.ejections
                );
            }
            if changed {
                self.write_backends(s)?;
                self.refresh(s)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg() -> PassiveConfig {
        PassiveConfig {
            enabled: true,
            window: Duration::from_secs(2),
            min_flows: 10,
            ratio: 0.5,
            hold: Duration::from_secs(10),
            max_hold: Duration::from_secs(300),
            min_completion: 0.5,
            max_ejected_percent: 50,
        }
    }

    fn w(new: u64, retransmits: u64, syn_pinned: u64, established: u64) -> Window {
        Window { new, retransmits, syn_pinned, established }
    }

    #[test]
    fn retransmissions_or_handshakes_that_do_not_complete() {
        let c = cfg();
        let healthy = w(40, 0, 40, 40);
        assert_eq!(suspicion(&c, &w(20, 0, 20, 19), &healthy), None);
        assert!(suspicion(&c, &w(20, 15, 20, 20), &healthy).unwrap().contains("retransmissions"));
        assert!(suspicion(&c, &w(20, 0, 20, 2), &healthy).unwrap().contains("2 of 20 handshakes"));
        assert_eq!(suspicion(&c, &w(5, 0, 5, 0), &healthy), None, "too few flows to judge");
        // Every backend as bad (a SYN flood, clients that give up): nobody is singled out.
        assert_eq!(suspicion(&c, &w(20, 0, 20, 2), &w(40, 0, 40, 5)), None);
        // The service's only backend, or the others without traffic: judged on its own.
        assert!(suspicion(&c, &w(20, 0, 20, 2), &w(0, 0, 0, 0)).is_some());
    }

    #[test]
    fn completion_is_capped_by_late_handshakes() {
        assert_eq!(w(0, 0, 10, 12).completion(), 1.0);
        assert_eq!(w(0, 0, 0, 0).completion(), 0.0);
    }
}
