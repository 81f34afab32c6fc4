//! Active health checks: a TCP connect per backend, every interval, with rise and fall.
//! Each backend has its own task, so a slow backend never delays another's verdict.
use std::{net::IpAddr, time::Duration};

use tokio::{net::TcpStream, sync::mpsc, time};

use crate::config::HealthConfig;

/// Which backend a report is about: its id, stable for the backend's life in the agent.
pub type Target = u32;

#[derive(Debug)]
pub enum Event {
    /// The backend crossed `rise` successes (`up`) or `fall` failures (not `up`).
    State { target: Target, up: bool, detail: String },
    /// A probe succeeded: the neighbour table now knows the backend, maybe with a new MAC.
    Reachable { target: Target },
}

/// Counts consecutive results and says when the state flips.
#[derive(Debug)]
pub struct RiseFall {
    up: bool,
    streak: u32,
    rise: u32,
    fall: u32,
}

impl RiseFall {
    pub fn new(up: bool, rise: u32, fall: u32) -> Self {
        Self { up, streak: 0, rise, fall }
    }

    /// Records one result; Some(new state) when it changes the backend's state.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

async fn probe(addr: IpAddr, port: u16, timeout: Duration) -> Result<(), String> {
    match time::timeout(timeout, TcpStream::connect((addr, port))).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// Probes `addr` forever, starting from `up`, and reports state changes and successes.
/// Ends when the receiver is gone.
pub async fn run(target: Target, addr: IpAddr, cfg: HealthConfig, up: bool, events: mpsc::Sender<Event>) {
    let mut state = RiseFall::new(up, cfg.rise, cfg.fall);
    // Spread the first probes over the interval so that backends (and balancer hosts) do
    // not probe in lockstep.
    let jitter = (crate::agent::address_key(addr) ^ u64::from(target) << 7) % cfg.interval.as_millis().max(1) as u64;
    time::sleep(Duration::from_millis(jitter)).await;
    let mut tick = time::interval(cfg.interval);
    tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe(addr, cfg.port, cfg.timeout).await;
        if result.is_ok() && events.send(Event::Reachable { target }).await.is_err() {
            return;
        }
        let detail = match &result {
            Ok(()) => format!("{} successful checks", cfg.rise),
            Err(e) => format!("{} failed checks, last: {e}", cfg.fall),
        };
        if let Some(up) = state.record(result.is_ok()) {
            if events.send(Event::State { target, up, detail }).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut s = RiseFall::new(true, 2, 3);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(true), None, "a success resets the failure streak");
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), Some(false));
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(true), None);
        assert_eq!(s.record(false), None, "a failure resets the success streak");
        assert_eq!(s.record(true), None);
        assert_eq!(s.record(true), Some(true));
        assert_eq!(s.record(true), None);
    }

    #[tokio::test]
    async fn probe_tells_open_from_closed_ports() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = Duration::from_millis(500);
        assert!(probe(std::net::Ipv4Addr::LOCALHOST.into(), port, t).await.is_ok());
        drop(listener);
        assert!(probe(std::net::Ipv4Addr::LOCALHOST.into(), port, t).await.is_err());
    }
}
