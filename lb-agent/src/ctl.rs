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

use crate::api::{Request, Response};

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
    },
    /// Remove a backend; its pinned flows re-hash.
    RemoveBackend { service: String, address: IpAddr },
    /// Drain a backend: no new flows, pinned ones stay (weight 0).
    Drain { service: String, address: IpAddr },
    /// Set a backend's weight.
    SetWeight { service: String, address: IpAddr, weight: u32 },
    /// Remove a service.
    RemoveService { service: String },
    /// Re-read the config file (as SIGHUP does).
    Reload,
}

impl From<CtlCommand> for Request {
    fn from(c: CtlCommand) -> Self {
        match c {
            CtlCommand::List => Request::List,
            CtlCommand::AddBackend { service, address, weight, mac } => {
                Request::AddBackend { service, address, weight, mac }
            }
            CtlCommand::RemoveBackend { service, address } => Request::RemoveBackend { service, address },
            CtlCommand::Drain { service, address } => Request::SetWeight { service, address, weight: 0 },
            CtlCommand::SetWeight { service, address, weight } => Request::SetWeight { service, address, weight },
            CtlCommand::RemoveService { service } => Request::RemoveService { service },
            CtlCommand::Reload => Request::Reload,
        }
    }
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
    out
}
