//! `cargo xtask demo`: builds a client, the balancer and three backends in network
//! namespaces, sends real traffic through xlb, kills a backend and shows the eviction.
//! Everything is torn down at the end, also on failure.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use xlb_tests::{
    scenario::{backend_name, config, vip, Scenario, FALL, HEALTH_INTERVAL, HEALTH_TIMEOUT, RISE},
    topology::{backend_addr, CLIENT, LB, VIP},
    traffic::{failures, tcp_requests, udp_requests, Tally},
};

const BACKENDS: usize = 3;
const FLOWS: usize = 300;

fn say(s: &str) {
    println!("\n==> {s}");
}

fn table(title: &str, tcp: &Tally, udp: &Tally) {
    let keys: BTreeSet<&String> = tcp.keys().chain(udp.keys()).collect();
    println!("    {title}");
    println!("    {:<28} {:>6} {:>6}", "answered by", "tcp", "udp");
    for k in keys {
        let n = |t: &Tally| t.get(k).copied().unwrap_or(0);
        println!("    {:<28} {:>6} {:>6}", k, n(tcp), n(udp));
    }
}

/// Prints what the agent logged since `from`, indented; returns the new length.
fn show_log(s: &Scenario, from: usize) -> usize {
    let log = s.agent.log_text();
    for line in log[from.min(log.len())..].lines() {
        println!("    | {line}");
    }
    log.len()
}

fn main() -> Result<()> {
    let started = Instant::now();
    say(&format!(
        "building the test bed: client {CLIENT}, balancer {LB} (VIP {VIP}), backends {}..{} on one bridge",
        backend_addr(0),
        backend_addr(BACKENDS - 1)
    ));
    println!(
        "    agent config:\n{}",
        config(BACKENDS).lines().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n")
    );
    let mut s = Scenario::start(BACKENDS).context("cannot build the demo (run as root: cargo xtask demo)")?;
    let mut seen = show_log(&s, 0);

    say(&format!(
        "{FLOWS} TCP connections and {FLOWS} UDP datagrams from the client to {}, each from a new source port",
        vip()
    ));
    let tcp = tcp_requests(&s.bed.client, vip(), FLOWS)?;
    let udp = udp_requests(&s.bed.client, vip(), FLOWS)?;
    table("answers per backend (Maglev, three healthy backends):", &tcp, &udp);

    say("the agent's counters (SIGUSR1)");
    s.agent.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    seen = show_log(&s, seen);

    say(&format!(
        "killing {} ({}); health checks every {:?}, timeout {:?}, fall {FALL}",
        backend_name(1),
        backend_addr(1),
        HEALTH_INTERVAL,
        HEALTH_TIMEOUT
    ));
    s.servers[1].stop();
    let killed = Instant::now();
    s.agent.wait_for_count(&format!("backend {} DOWN", backend_addr(1)), 2, Duration::from_secs(10))?;
    println!("    evicted after {:?}", killed.elapsed());
    seen = show_log(&s, seen);

    say(&format!("{FLOWS} TCP connections and {FLOWS} UDP datagrams again"));
    let tcp = tcp_requests(&s.bed.client, vip(), FLOWS)?;
    let udp = udp_requests(&s.bed.client, vip(), FLOWS)?;
    table("answers per backend (backend-1 evicted: its share went to the others):", &tcp, &udp);
    println!("    failed: {} tcp, {} udp", failures(&tcp), failures(&udp));

    say(&format!("restarting {}: it returns after {RISE} successful checks", backend_name(1)));
    s.restart_server(1)?;
    let restarted = Instant::now();
    s.agent.wait_for_count(&format!("backend {} UP", backend_addr(1)), 2, Duration::from_secs(10))?;
    println!("    back after {:?}", restarted.elapsed());
    seen = show_log(&s, seen);
    let tcp = tcp_requests(&s.bed.client, vip(), FLOWS)?;
    let udp = udp_requests(&s.bed.client, vip(), FLOWS)?;
    table("answers per backend (backend-1 back: Maglev gives it the same share as before):", &tcp, &udp);

    say("stopping the agent (SIGTERM): it detaches and prints its counters");
    s.agent.stop()?;
    show_log(&s, seen);

    say(&format!("tearing the test bed down (demo took {:.1?})", started.elapsed()));
    drop(s);
    Ok(())
}
