//! The L2 DSR scenario that the end-to-end test checks and the demo shows: a bed, servers
//! on every backend and the agent configured for them.
use std::{net::SocketAddr, time::Duration};

use anyhow::Result;

use crate::{
    agent::AgentProcess,
    topology::{backend_addr, L2Bed, IFACE, VIP},
    traffic::Server,
};

/// Port of the TCP service and of the UDP service on the VIP.
pub const PORT: u16 = 80;
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(100);
pub const RISE: u32 = 2;
pub const FALL: u32 = 2;
/// The agent's Prometheus endpoint, inside the balancer's namespace.
pub const METRICS: &str = "127.0.0.1:9100";

pub struct Scenario {
    pub agent: AgentProcess,
    pub servers: Vec<Server>,
    pub bed: L2Bed,
}

pub fn vip() -> SocketAddr {
    (VIP, PORT).into()
}

pub fn backend_name(i: usize) -> String {
    format!("backend-{i}")
}

/// The agent's config for `n` backends of weight 1: a TCP and a UDP service on the VIP.
pub fn config(n: usize) -> String {
    config_for(&(0..n).map(|i| (i, 1)).collect::<Vec<_>>())
}

/// The agent's config for the given (backend index, weight) pairs.
pub fn config_for(backends: &[(usize, u32)]) -> String {
    let mut c = format!(
        "interface = \"{IFACE}\"\nhash_seed = 2026\n\n[metrics]\nlisten = \"{METRICS}\"\n\n[health]\ninterval_ms = {}\ntimeout_ms = {}\nrise = {RISE}\nfall = {FALL}\n",
        HEALTH_INTERVAL.as_millis(),
        HEALTH_TIMEOUT.as_millis()
    );
    for proto in ["tcp", "udp"] {
        c += &format!(
            "\n[[service]]\nname = \"demo-{proto}\"\nvip = \"{VIP}\"\nport = {PORT}\nprotocol = \"{proto}\"\n"
        );
        if proto == "udp" {
            c += &format!("[service.health]\nport = {PORT}\n");
        }
        for &(i, weight) in backends {
            c += &format!("\n[[service.backend]]\naddress = \"{}\"\nweight = {weight}\n", backend_addr(i));
        }
    }
    c
}

impl Scenario {
    /// `n` backends, all in the config.
    pub fn start(n: usize) -> Result<Self> {
        Self::start_with(n, &config(n))
    }

    /// `n` backends with servers, the agent started with `config`.
    pub fn start_with(n: usize, config: &str) -> Result<Self> {
        let bed = L2Bed::new(n)?;
        let servers = (0..n)
            .map(|i| Server::start(&bed.backends[i], &backend_name(i), &[VIP.into()], PORT))
            .collect::<Result<Vec<_>>>()?;
        let agent = AgentProcess::start(&bed.lb, config, &[])?;
        Ok(Self { agent, servers, bed })
    }

    /// Restarts backend `i`'s server.
    pub fn restart_server(&mut self, i: usize) -> Result<()> {
        self.servers[i] = Server::start(&self.bed.backends[i], &backend_name(i), &[VIP.into()], PORT)?;
        Ok(())
    }
}
