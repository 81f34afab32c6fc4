//! The L7 tier: services the agent proxies itself, beside the XDP tier, with the same config,
//! health checks, control API and metrics.
//!
//! - `http`: HTTP–HTTP and HTTPS–HTTP (routing, forwarding headers, upgrades, retries);
//! - `tcp`: TCP–PROXY (a PROXY protocol header, then bytes both ways);
//! - `listener`: accepting, TLS, timeouts, graceful drain;
//! - `pool`: backends, their health and the schedulers; `cookie`: sticky sessions;
//! - `tls`: certificates by SNI; `io`: PROXY headers and connection plumbing.
//!
//! Each listener reads its service through an `Arc` swapped on every change: a request in
//! progress finishes with the config it started with, the next one sees the new one.
//!
//! A listener is served by a thread per CPU, each with a single-threaded runtime of its own
//! accepting on the same socket and keeping its own upstream connections: a request is read,
//! proxied and answered on one thread, as HAProxy's and nginx's workers do, with no hand-off
//! between threads. Health checks, the API and metrics stay on the agent's main runtime.
pub mod cookie;
pub mod http;
pub mod io;
mod listener;
pub mod pool;
mod tcp;
pub mod tls;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{error, info, warn};
use tokio::{
    sync::{mpsc, watch, Notify},
    task::JoinHandle,
};

use self::pool::{Backend, Counts, Pool, Pools};
use crate::{
    config::l7::{L7Mode, L7Service},
    dataplane::BackendId,
    health::{self, Event, Start},
};

/// Health ids of L7 backends start here, far above the data path's backend slots, so that one
/// channel carries the reports of both tiers.
const FIRST_ID: u32 = 0x8000_0000;

/// Buckets of the request duration histogram, in seconds.
pub const DURATION_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A service's counters; they outlive reloads.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now.
    pub active: AtomicI64,
    pub connections: AtomicU64,
    pub tls_failures: AtomicU64,
    pub requests: Counts,
    /// Requests per duration bucket (the last: above every bound), and the sum in µs.
    pub durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    pub duration_sum_us: AtomicU64,
}

impl Stats {
    pub fn observe(&self, status: u16, seconds: f64) {
        self.requests.count_status(status);
        let bucket = DURATION_BUCKETS.iter().position(|&b| seconds <= b).unwrap_or(DURATION_BUCKETS.len());
        self.durations[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}

/// What a listener serves: one snapshot of the service.
pub struct Service {
    pub config: L7Service,
    pub pools: Pools,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub stats: Arc<Stats>,
}

struct HealthTask(JoinHandle<()>);

impl Drop for HealthTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running service: its listener, the current snapshot, its backends' health tasks.
struct Running {
    config: L7Service,
    current: Arc<RwLock<Arc<Service>>>,
    stop: watch::Sender<bool>,
    /// The threads serving the listener; each ends once its connections have.
    threads: Vec<std::thread::JoinHandle<()>>,
    backends: Vec<(Arc<Backend>, Option<HealthTask>)>,
    stats: Arc<Stats>,
}

pub struct L7 {
    running: Vec<Running>,
    /// Where health tasks report; None: no checks (every backend up), no runtime needed.
    events: Option<mpsc::Sender<Event>>,
    next_id: u32,
    /// Threads of listeners stopped by a reload, finishing their connections.
    draining: Vec<std::thread::JoinHandle<()>>,
}

/// What `prepare` made ready; `commit` puts it in place. Dropping it changes nothing.
pub struct Plan {
    services: Vec<L7Service>,
    tls: HashMap<String, Arc<rustls::ServerConfig>>,
    /// A listening socket per thread.
    listeners: HashMap<String, Vec<std::net::TcpListener>>,
}

impl L7 {
    pub fn new(events: Option<mpsc::Sender<Event>>) -> Self {
        Self { running: Vec::new(), events, next_id: FIRST_ID, draining: Vec::new() }
    }

    /// Everything that can fail before a change: certificates read, new listeners bound.
    pub fn prepare(&self, services: &[L7Service]) -> Result<Plan> {
        let mut plan = Plan { services: services.to_vec(), tls: HashMap::new(), listeners: HashMap::new() };
        for s in services {
            if s.mode == L7Mode::Https {
                let config = tls::server_config(&s.tls).with_context(|| format!("l7 service {}", s.name))?;
                plan.tls.insert(s.name.clone(), config);
            }
            let same_listener = self.running.iter().any(|r| r.config.name == s.name && r.config.listen == s.listen);
            if !same_listener {
                let sockets = (0..workers())
                    .map(|_| bind(s.listen))
                    .collect::<Result<Vec<_>>>()
                    .with_context(|| format!("l7 service {}: cannot listen on {}", s.name, s.listen))?;
                plan.listeners.insert(s.name.clone(), sockets);
            }
        }
        Ok(plan)
    }

    /// Puts a prepared change in place: services gone stop accepting and drain, new ones
    /// start, the others get their new snapshot (backends that stay keep their state).
    pub fn commit(&mut self, mut plan: Plan) {
        let wanted: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
        let mut kept = Vec::new();
        for r in self.running.drain(..) {
            let stays = plan.services.iter().any(|s| s.name == r.config.name && s.listen == r.config.listen);
            if stays {
                kept.push(r);
            } else {
                if !wanted.contains(&r.config.name.as_str()) {
                    info!("l7 {}: removed; draining its connections", r.config.name);
                }
                let _ = r.stop.send(true);
                self.draining.extend(r.threads);
            }
        }
        self.draining.retain(|t| !t.is_finished());
        self.running = kept;
        for s in &plan.services {
            let tls = plan.tls.remove(&s.name);
            match self.running.iter().position(|r| r.config.name == s.name) {
                Some(i) => self.update(i, s, tls),
                None => {
                    let listener = plan.listeners.remove(&s.name).expect("prepare bound every new listener");
                    self.start(s, listener, tls);
                }
            }
        }
    }

    fn new_backend(
        &mut self,
        s: &L7Service,
        address: SocketAddr,
        pool: &str,
        weight: u32,
    ) -> (Arc<Backend>, Option<HealthTask>) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(FIRST_ID);
        let checked = self.events.is_none() || !s.health.enabled;
        let start = if checked || s.health.initial_up { Start::Up } else { Start::Unknown };
        let cookie_id = s.cookie.as_ref().map_or_else(String::new, |c| cookie::backend_id(&c.secret, address));
        let backend = Arc::new(Backend::new(address, pool, id, weight, start == Start::Up, cookie_id));
        let task = match (&self.events, s.health.enabled) {
            (Some(events), true) => {
                let mut cfg = s.health.clone();
                if cfg.port == 0 {
                    cfg.port = address.port();
                }
                let poke = Arc::new(Notify::new());
                Some(HealthTask(tokio::spawn(health::run(
                    BackendId(id),
                    address.ip(),
                    cfg,
                    start,
                    events.clone(),
                    poke,
                ))))
            }
            _ => None,
        };
        (backend, task)
    }

    /// The backends of `s`: those of `old` that stay (weight updated), new ones started.
    fn backends_for(
        &mut self,
        s: &L7Service,
        mut old: Vec<(Arc<Backend>, Option<HealthTask>)>,
    ) -> Vec<(Arc<Backend>, Option<HealthTask>)> {
        let mut out = Vec::new();
        for b in &s.backends {
            match old.iter().position(|(o, _)| o.address == b.address && o.pool == b.pool) {
                Some(i) => {
                    let (backend, task) = old.swap_remove(i);
                    backend.weight.store(b.weight, Ordering::Relaxed);
                    out.push((backend, task));
                }
                None => out.push(self.new_backend(s, b.address, &b.pool, b.weight)),
            }
        }
        out
    }

    fn snapshot(
        s: &L7Service,
        backends: &[(Arc<Backend>, Option<HealthTask>)],
        tls: Option<Arc<rustls::ServerConfig>>,
        stats: &Arc<Stats>,
    ) -> Service {
        let mut pools = Pools::new();
        for name in s.pools() {
            let members: Vec<Arc<Backend>> =
                backends.iter().filter(|(b, _)| b.pool == name).map(|(b, _)| b.clone()).collect();
            pools.insert(name.to_string(), Arc::new(Pool::new(members, s.scheduler.clone())));
        }
        Service { config: s.clone(), pools, tls, stats: stats.clone() }
    }

    fn start(&mut self, s: &L7Service, listener: Vec<std::net::TcpListener>, tls: Option<Arc<rustls::ServerConfig>>) {
        let backends = self.backends_for(s, Vec::new());
        let stats = Arc::new(Stats::default());
        let current = Arc::new(RwLock::new(Arc::new(Self::snapshot(s, &backends, tls, &stats))));
        let (stop, stopped) = watch::channel(false);
        let mut threads = Vec::new();
        for (k, socket) in listener.into_iter().enumerate() {
            let (current, stopped, name) = (current.clone(), stopped.clone(), s.name.clone());
            let spawned = std::thread::Builder::new().name(format!("xlb-l7-{k}")).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt.block_on(listener::run(socket, current, stopped)),
                    Err(e) => error!("l7 {name}: cannot start a runtime for thread {k}: {e}"),
                }
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => warn!("l7 {}: cannot start thread {k}: {e}", s.name),
            }
        }
        info!(
            "l7 {}: {} on {} ({} backends, {}; {} threads)",
            s.name,
            s.mode,
            s.listen,
            s.backends.len(),
            s.scheduler,
            threads.len()
        );
        self.running.push(Running { config: s.clone(), current, stop, threads, backends, stats });
    }

    fn update(&mut self, i: usize, s: &L7Service, tls: Option<Arc<rustls::ServerConfig>>) {
        let old = std::mem::take(&mut self.running[i].backends);
        let backends = self.backends_for(s, old);
        let r = &mut self.running[i];
        let snapshot = Self::snapshot(s, &backends, tls, &r.stats);
        *r.current.write().expect("never poisoned: no panic while held") = Arc::new(snapshot);
        r.backends = backends;
        r.config = s.clone();
    }

    /// Applies a health report about an L7 backend; false when it is not one of ours.
    pub fn handle(&mut self, event: &Event) -> bool {
        let Event::State { target, up, detail } = event else {
            return self.owner(target_of(event)).is_some();
        };
        let Some((i, backend)) = self.owner(*target) else { return false };
        let first = !backend.checked.swap(true, Ordering::Relaxed);
        backend.up.store(*up, Ordering::Relaxed);
        let r = &self.running[i];
        for pool in r.current.read().expect("never poisoned: no panic while held").pools.values() {
            pool.rebuild();
        }
        let n_up = r.backends.iter().filter(|(b, _)| b.is_up()).count();
        let (name, total, addr) = (&r.config.name, r.backends.len(), backend.address);
        match (first, *up) {
            (true, _) => info!(
                "l7 {name}: backend {addr} is {} at {detail}; {n_up} of {total} backends up",
                if *up { "up" } else { "down" }
            ),
            (false, true) => info!("l7 {name}: backend {addr} UP after {detail}; {n_up} of {total} backends up"),
            (false, false) => warn!("l7 {name}: backend {addr} DOWN after {detail}; {n_up} of {total} backends up"),
        }
        true
    }

    fn owner(&self, id: BackendId) -> Option<(usize, Arc<Backend>)> {
        self.running
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.backends.iter().find(|(b, _)| b.id == id.0).map(|(b, _)| (i, b.clone())))
    }

    /// Every backend has a verdict (or is not checked).
    pub fn all_checked(&self) -> bool {
        self.running.iter().all(|r| r.backends.iter().all(|(b, _)| b.checked.load(Ordering::Relaxed)))
    }

    /// (up, total) backends.
    pub fn counts(&self) -> (usize, usize) {
        let all = self.running.iter().flat_map(|r| &r.backends);
        all.fold((0, 0), |(u, t), (b, _)| (u + usize::from(b.is_up()), t + 1))
    }

    /// The running services with their backends and counters, for the API and metrics.
    pub fn services(&self) -> impl Iterator<Item = (&L7Service, &Arc<Stats>, Vec<Arc<Backend>>)> {
        self.running.iter().map(|r| (&r.config, &r.stats, r.backends.iter().map(|(b, _)| b.clone()).collect()))
    }

    /// Stops accepting everywhere, asks open connections to finish (GOAWAY, `Connection:
    /// close`) and waits for them, at most each service's drain time.
    pub async fn shutdown(&mut self) {
        let deadline = self.running.iter().map(|r| r.config.timeouts.drain).max().unwrap_or(Duration::ZERO);
        for r in &self.running {
            let _ = r.stop.send(true);
        }
        let threads: Vec<std::thread::JoinHandle<()>> =
            self.running.drain(..).flat_map(|r| r.threads).chain(self.draining.drain(..)).collect();
        let end = std::time::Instant::now() + deadline + Duration::from_millis(100);
        while threads.iter().any(|t| !t.is_finished()) {
            if std::time::Instant::now() > end {
                warn!("l7: connections still open after the drain time; closing them");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn target_of(event: &Event) -> BackendId {
    match event {
        Event::State { target, .. } | Event::Reachable { target } => *target,
    }
}

/// Threads serving each listener: one per CPU (at most 8).
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
}

/// A listening socket with SO_REUSEADDR (a restarted agent binds at once) and SO_REUSEPORT
/// (one socket per thread; the kernel spreads new connections over them, no thread wakes for
/// a connection another takes), and, for `[::]`, IPv4 too. A port another program holds
/// without SO_REUSEPORT is refused.
fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(4096)?;
    Ok(listener.into_std()?)
}
