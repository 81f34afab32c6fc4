//! An L7 service's backends, grouped in pools, their health, and how a request picks one.
//! Backends are shared (`Arc`) between the pools the handlers read and the agent that updates
//! health and weights, so a rebuilt pool keeps every backend's counters and state.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use crate::{
    config::l7::{HashOn, L7Scheduler},
    tables::maglev::{self, address_key, Member},
};

/// Responses by status class (1xx … 5xx), and the proxy's own failures.
#[derive(Debug, Default)]
pub struct Counts {
    pub by_class: [AtomicU64; 5],
    /// No backend could be reached (502 or a tcp-proxy connection given up).
    pub connect_failures: AtomicU64,
}

impl Counts {
    pub fn count_status(&self, status: u16) {
        if let Some(c) = self.by_class.get(usize::from(status / 100).wrapping_sub(1)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn total(&self) -> u64 {
        self.by_class.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    pub pool: String,
    /// The id health reports name it by.
    pub id: u32,
    pub weight: AtomicU32,
    pub up: AtomicBool,
    /// A verdict of the checks exists (or checks are off).
    pub checked: AtomicBool,
    /// Requests (or tcp-proxy connections) in progress.
    pub in_flight: AtomicI64,
    pub counts: Counts,
    /// The opaque id the sticky cookie carries: stable across reloads and restarts.
    pub cookie_id: String,
}

impl Backend {
    pub fn new(address: SocketAddr, pool: &str, id: u32, weight: u32, up: bool, cookie_id: String) -> Self {
        Self {
            address,
            pool: pool.to_string(),
            id,
            weight: AtomicU32::new(weight),
            up: AtomicBool::new(up),
            checked: AtomicBool::new(up),
            in_flight: AtomicI64::new(0),
            counts: Counts::default(),
            cookie_id,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Up and not draining: takes new sessions.
    pub fn usable(&self) -> bool {
        self.is_up() && self.weight.load(Ordering::Relaxed) > 0
    }

    /// "up", "down" or "drain".
    pub fn state(&self) -> &'static str {
        match (self.is_up(), self.weight.load(Ordering::Relaxed)) {
            (false, _) => "down",
            (true, 0) => "drain",
            (true, _) => "up",
        }
    }

    /// Counts a request in progress until the guard drops.
    pub fn busy(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A request (or connection) in progress on a backend.
pub struct InFlight(pub Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends of one pool and the state its scheduler keeps.
#[derive(Debug)]
pub struct Pool {
    pub backends: Vec<Arc<Backend>>,
    scheduler: L7Scheduler,
    /// Smooth weighted round robin: each backend's current weight.
    current: Mutex<Vec<i64>>,
    /// Maglev over the usable backends (indexes into `backends`), rebuilt on every change.
    table: Mutex<Vec<u32>>,
}

/// Entries of a hashing pool's Maglev table: a prime, ample for pools of a few hundred.
const TABLE_SIZE: u32 = 4093;

impl Pool {
    pub fn new(backends: Vec<Arc<Backend>>, scheduler: L7Scheduler) -> Self {
        let pool =
            Self { current: Mutex::new(vec![0; backends.len()]), backends, scheduler, table: Mutex::new(Vec::new()) };
        pool.rebuild();
        pool
    }

    /// Health or weights changed: the hash table follows the usable backends.
    pub fn rebuild(&self) {
        if !matches!(self.scheduler, L7Scheduler::Hash(_)) {
            return;
        }
        let members: Vec<Member> = self
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.usable())
            .map(|(i, b)| Member {
                id: i as u32,
                key: address_key(b.address.ip()) ^ u64::from(b.address.port()) << 48,
                weight: b.weight.load(Ordering::Relaxed),
            })
            .collect();
        let table = if members.is_empty() { Vec::new() } else { maglev::build(&members, TABLE_SIZE) };
        *self.table.lock().expect("never poisoned: no panic while held") = table;
    }

    /// What a hashing pool hashes, from the request (`header`) and the client.
    pub fn hash_key(&self, client: std::net::IpAddr, header: impl Fn(&str) -> Option<u64>) -> Option<u64> {
        match &self.scheduler {
            L7Scheduler::Hash(HashOn::Client) => Some(address_key(client)),
            L7Scheduler::Hash(HashOn::Header(name)) => header(name).or(Some(address_key(client))),
            _ => None,
        }
    }

    /// A backend for a new session, none of `exclude` (those already failed); None when no
    /// backend is usable.
    pub fn pick(&self, key: Option<u64>, exclude: &[u32]) -> Option<Arc<Backend>> {
        let ok = |b: &Arc<Backend>| b.usable() && !exclude.contains(&b.id);
        if let (L7Scheduler::Hash(_), Some(key)) = (&self.scheduler, key) {
            let table = self.table.lock().expect("never poisoned: no panic while held");
            if !table.is_empty() {
                let b = &self.backends[table[(mix(key) % table.len() as u64) as usize] as usize];
                if ok(b) {
                    return Some(b.clone());
                }
            }
        }
        match self.scheduler {
            L7Scheduler::LeastRequests => self
                .backends
                .iter()
                .filter(|b| ok(b))
                // Fewest in flight per unit of weight: compare a/wa < b/wb as a*wb < b*wa.
                .min_by(|a, b| {
                    let (wa, wb) =
                        (i128::from(a.weight.load(Ordering::Relaxed)), i128::from(b.weight.load(Ordering::Relaxed)));
                    let (fa, fb) = (
                        i128::from(a.in_flight.load(Ordering::Relaxed)),
                        i128::from(b.in_flight.load(Ordering::Relaxed)),
                    );
                    (fa * wb).cmp(&(fb * wa))
                })
                .cloned(),
            // Round robin, and a hashing pool's fallback when its pick failed.
            _ => {
                let mut current = self.current.lock().expect("never poisoned: no panic while held");
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for (i, b) in self.backends.iter().enumerate() {
                    if !ok(b) {
                        continue;
                    }
                    let w = i64::from(b.weight.load(Ordering::Relaxed));
                    current[i] += w;
                    total += w;
                    if best.is_none_or(|j| current[i] > current[j]) {
                        best = Some(i);
                    }
                }
                let i = best?;
                current[i] -= total;
                Some(self.backends[i].clone())
            }
        }
    }

    /// The backend a sticky cookie names, if it is still in the pool and up (a draining one
    /// keeps its sessions).
    pub fn by_cookie(&self, id: &str) -> Option<Arc<Backend>> {
        self.backends.iter().find(|b| b.cookie_id == id && b.is_up()).cloned()
    }
}

/// Spreads a key over the table (keys of nearby addresses differ in few bits).
fn mix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// A service's pools by name.
pub type Pools = HashMap<String, Arc<Pool>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32], scheduler: L7Scheduler) -> Pool {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr: SocketAddr = format!("10.0.0.{}:80", 10 + i).parse().unwrap();
                Arc::new(Backend::new(addr, "default", i as u32, w, true, format!("id{i}")))
            })
            .collect();
        Pool::new(backends, scheduler)
    }

    #[test]
    fn round_robin_follows_the_weights() {
        let p = pool(&[1, 2, 3], L7Scheduler::RoundRobin);
        let mut counts = [0; 3];
        for _ in 0..60 {
            counts[p.pick(None, &[]).unwrap().id as usize] += 1;
        }
        assert_eq!(counts, [10, 20, 30]);
        p.backends[2].up.store(false, Ordering::Relaxed);
        assert!((0..30).all(|_| p.pick(None, &[]).unwrap().id != 2));
        assert_ne!(p.pick(None, &[0]).unwrap().id, 0);
        assert!(p.pick(None, &[0, 1]).is_none());
    }

    #[test]
    fn least_requests_takes_the_idlest() {
        let p = pool(&[1, 1, 2], L7Scheduler::LeastRequests);
        let _a = p.backends[0].busy();
        let _b = p.backends[1].busy();
        assert_eq!(p.pick(None, &[]).unwrap().id, 2);
        let _c = p.backends[2].busy();
        // 1 in flight per weight 2 beats 1 per weight 1.
        assert_eq!(p.pick(None, &[]).unwrap().id, 2);
    }

    #[test]
    fn hashing_is_stable_and_moves_only_what_it_must() {
        let p = pool(&[1, 1, 1, 1], L7Scheduler::Hash(HashOn::Client));
        let before: Vec<u32> = (0..400u64).map(|k| p.pick(Some(k), &[]).unwrap().id).collect();
        assert!((0..4).all(|i| before.iter().filter(|&&b| b == i).count() > 60), "{before:?}");
        p.backends[1].up.store(false, Ordering::Relaxed);
        p.rebuild();
        let after: Vec<u32> = (0..400u64).map(|k| p.pick(Some(k), &[]).unwrap().id).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 1 {
                assert_eq!(a, b, "a key of a surviving backend moved");
            } else {
                assert_ne!(*a, 1);
            }
        }
    }

    #[test]
    fn cookies_find_up_backends_even_draining() {
        let p = pool(&[1, 0], L7Scheduler::RoundRobin);
        assert_eq!(p.by_cookie("id1").unwrap().id, 1, "a draining backend keeps its sessions");
        p.backends[1].up.store(false, Ordering::Relaxed);
        assert!(p.by_cookie("id1").is_none());
        assert!(p.by_cookie("nope").is_none());
    }
}
