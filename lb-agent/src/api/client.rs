//! `lb-agent ctl`: the control API's client. One request per call; tables for humans, the
//! agent's JSON with `--json`.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Subcommand;

use super::proto::{NewBackend, Request, Response};
use crate::config::{Forward, Protocol, Scheduler};

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// List services and backends with state, weight and counters.
    List,
    /// Add a backend to a service (by name or VIP:PORT/PROTOCOL).
    AddBackend {
        service: String,
        address: IpAddr,
        #[arg(long)]
        weight: Option<u32>,
        /// For L2 services: the backend's MAC, instead of the neighbour table's.
        #[arg(long)]
        mac: Option<String>,
        /// For L7 services: the backend's port (required there).
        #[arg(long)]
        port: Option<u16>,
        /// For L7 services: the pool it joins (default "default").
        #[arg(long)]
        pool: Option<String>,
    },
    /// Remove a backend; its pinned flows re-hash.
    RemoveBackend {
        service: String,
        address: IpAddr,
        /// For L7 services: the backend's port.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Drain a backend: no new flows, pinned ones stay (weight 0).
    Drain {
        service: String,
        address: IpAddr,
        /// For L7 services: the backend's port.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Set a backend's weight.
    SetWeight {
        service: String,
        address: IpAddr,
        weight: u32,
        /// For L7 services: the backend's port.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Add a service; `--backend ADDR[=WEIGHT]` (repeatable) gives its backends.
    AddService {
        vip: IpAddr,
        port: u16,
        #[arg(value_enum)]
        protocol: Protocol,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_enum, default_value = "l2")]
        forward: Forward,
        #[arg(long, value_enum, default_value = "maglev")]
        scheduler: Scheduler,
        #[arg(long)]
        maglev_size: Option<u32>,
        #[arg(long = "backend", value_name = "ADDR[=WEIGHT]", value_parser = parse_backend)]
        backends: Vec<NewBackend>,
    },
    /// Remove a service.
    RemoveService { service: String },
    /// Re-read the config file (as SIGHUP does).
    Reload,
    /// Move new flows off this host: its routes are tagged GRACEFUL_SHUTDOWN with a worse MED
    /// for bgp.drain_secs, then withdrawn; established connections go on.
    DrainHost,
    /// Announce the VIPs again (as their health says) after drain-host.
    UndrainHost,
    /// A digest of the hash seed and every service's table: compare it between hosts that
    /// share VIPs (equal: a flow gets the same backend on either).
    Fingerprint,
}

impl From<CtlCommand> for Request {
    fn from(c: CtlCommand) -> Self {
        match c {
            CtlCommand::List => Request::List,
            CtlCommand::AddBackend { service, address, weight, mac, port, pool } => {
                Request::AddBackend { service, address, weight, mac, port, pool }
            }
            CtlCommand::RemoveBackend { service, address, port } => Request::RemoveBackend { service, address, port },
            CtlCommand::Drain { service, address, port } => Request::SetWeight { service, address, weight: 0, port },
            CtlCommand::SetWeight { service, address, weight, port } => {
                Request::SetWeight { service, address, weight, port }
            }
            CtlCommand::AddService { vip, port, protocol, name, forward, scheduler, maglev_size, backends } => {
                Request::AddService { name, vip, port, protocol, forward, scheduler, maglev_size, backends }
            }
            CtlCommand::RemoveService { service } => Request::RemoveService { service },
            CtlCommand::Reload => Request::Reload,
            CtlCommand::DrainHost => Request::DrainHost,
            CtlCommand::UndrainHost => Request::UndrainHost,
            CtlCommand::Fingerprint => Request::Fingerprint,
        }
    }
}

fn parse_backend(text: &str) -> Result<NewBackend, String> {
    let (address, weight) = match text.split_once('=') {
        Some((a, w)) => (a, Some(w.parse::<u32>().map_err(|e| format!("weight {w:?}: {e}"))?)),
        None => (text, None),
    };
    let address = address.parse().map_err(|e| format!("address {address:?}: {e}"))?;
    Ok(NewBackend { address, weight, mac: None })
}

/// Sends one request and prints the answer; Ok(false) when the agent refused it.
pub fn run(socket: &Path, json: bool, command: CtlCommand) -> Result<bool> {
    let response = call(socket, &command.into())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    } else if let Some(error) = &response.error {
        eprintln!("refused: {error}");
    } else if let Some(message) = &response.message {
        println!("{message}");
    } else {
        print!("{}", table(&response));
    }
    Ok(response.ok)
}

/// `lb-agent status`: the services table, redrawn every `interval` until interrupted, with
/// packet rates since the previous drawing; `once` prints it a single time.
pub fn status(socket: &Path, interval: Duration, once: bool) -> Result<()> {
    let mut previous: Option<(std::time::Instant, Response)> = None;
    loop {
        let now = std::time::Instant::now();
        let response = call(socket, &Request::List)?;
        let mut out = String::new();
        if !once {
            // Clear the screen and go home, like watch(1).
            out += "\x1b[2J\x1b[H";
        }
        out += &format!(
            "{:<28} {:<40} {:>8} {:>6} {:>12} {:>10}\n",
            "SERVICE", "BACKEND", "STATE", "WEIGHT", "PACKETS", "PKT/S"
        );
        let rate = |key: &dyn Fn(&Response) -> Option<u64>, packets: u64| match &previous {
            Some((then, old)) => key(old).map_or("-".to_string(), |p| {
                format!("{:.0}", packets.saturating_sub(p) as f64 / now.duration_since(*then).as_secs_f64())
            }),
            None => "-".to_string(),
        };
        for svc in &response.services {
            let name = svc.name.clone();
            let find_service = move |r: &Response| r.services.iter().find(|x| x.name == name).map(|x| x.packets);
            let label = format!("{} ({} {})", svc.name, svc.forward, svc.protocol);
            let vip = format!("{}:{}", svc.vip, svc.port);
            let r = rate(&find_service, svc.packets);
            out += &format!("{label:<28} {vip:<40} {:>8} {:>6} {:>12} {r:>10}\n", "", "", svc.packets);
            for b in &svc.backends {
                let (name, addr) = (svc.name.clone(), b.address);
                let find_backend = move |r: &Response| {
                    r.services
                        .iter()
                        .find(|x| x.name == name)?
                        .backends
                        .iter()
                        .find(|x| x.address == addr)
                        .map(|x| x.packets)
                };
                let r = rate(&find_backend, b.packets);
                out +=
                    &format!("{:<28} {:<40} {:>8} {:>6} {:>12} {r:>10}\n", "", b.address, b.state, b.weight, b.packets);
            }
        }
        out += &l7_table(&response);
        out += &bgp_table(&response);
        print!("{out}");
        std::io::stdout().flush()?;
        if once {
            return Ok(());
        }
        previous = Some((now, response));
        std::thread::sleep(interval);
    }
}

/// One request/answer exchange with the agent.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let mut conn = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach the agent at {} (is it running? are you root?)", socket.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(conn).read_line(&mut answer).context("no answer from the agent")?;
    serde_json::from_str(&answer).with_context(|| format!("unexpected answer: {answer:?}"))
}

/// The L7 services and their backends, in the services table's columns.
fn l7_table(r: &Response) -> String {
    let mut out = String::new();
    for s in &r.l7 {
        let service = format!("{} (l7 {})", s.name, s.mode);
        out += &format!(
            "{service:<28} {:<40} {:>6} {:>6} {:>12} {:>14}\n",
            s.listen.to_string(),
            "",
            "",
            s.requests,
            format!("{} conns", s.active_connections)
        );
        for b in &s.backends {
            let addr = if b.pool == "default" { b.address.to_string() } else { format!("{} [{}]", b.address, b.pool) };
            out += &format!(
                "{:<28} {addr:<40} {:>6} {:>6} {:>12} {:>14}\n",
                "",
                b.state,
                b.weight,
                b.requests,
                format!("{} busy", b.in_flight)
            );
        }
    }
    out
}

/// The VIPs' announcements and the BGP sessions, when the agent has `[bgp]`.
fn bgp_table(r: &Response) -> String {
    let Some(bgp) = &r.bgp else { return String::new() };
    let mut out = format!("\nBGP: host {}", bgp.host);
    if let Some(e) = &bgp.error {
        out += &format!(" (BIRD: {e})");
    }
    out += &format!("\n{:<28} {:<10} {}\n", "VIP", "STATE", "REASON");
    for v in &bgp.vips {
        out += &format!("{:<28} {:<10} {}\n", v.vip, v.state, v.reason);
    }
    out += &format!("{:<28} {:<10} {}\n", "NEIGHBOR", "SESSION", "BIRD");
    for s in &bgp.sessions {
        out += &format!("{:<28} {:<10} {}\n", s.neighbor, if s.up { "up" } else { "down" }, s.state);
    }
    out
}

fn table(r: &Response) -> String {
    let mut out = format!(
        "{:<28} {:<40} {:>6} {:>6} {:>12} {:>14}\n",
        "SERVICE", "BACKEND", "STATE", "WEIGHT", "PACKETS", "BYTES"
    );
    for s in &r.services {
        let service = format!("{} ({} {})", s.name, s.forward, s.protocol);
        let vip = format!("{}:{}", s.vip, s.port);
        out += &format!("{service:<28} {vip:<40} {:>6} {:>6} {:>12} {:>14}\n", "", "", s.packets, s.bytes);
        for b in &s.backends {
            out += &format!(
                "{:<28} {:<40} {:>6} {:>6} {:>12} {:>14}\n",
                "", b.address, b.state, b.weight, b.packets, b.bytes
            );
        }
    }
    out + &l7_table(r) + &bgp_table(r)
}
