//! Who owns which slot of the data path: service ids (SERVICE_STATS, RR_CURSOR, the service's
//! entry), backend ids and their generations (BACKENDS and the per-backend maps), and the
//! ranges of MAGLEV that hold each service's two tables. Handed out here and nowhere else.
use std::{collections::HashMap, fmt, net::IpAddr};

/// A service's slot in the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub u32);

/// A backend's slot in the data path (one per service it belongs to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u32);

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service #{}", self.0)
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend #{}", self.0)
    }
}

/// Dense ids from 0, freed ids reused first.
#[derive(Debug, Default)]
struct Dense {
    free: Vec<u32>,
    next: u32,
}

impl Dense {
    fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn give_back(&mut self, id: u32) {
        if id < self.next && !self.free.contains(&id) {
            self.free.push(id);
        }
    }

    /// Takes `id` out of the free ids (or past the dense range).
    fn reserve(&mut self, id: u32) {
        if let Some(i) = self.free.iter().position(|&f| f == id) {
            self.free.swap_remove(i);
        }
        while self.next <= id {
            if self.next != id {
                self.free.push(self.next);
            }
            self.next += 1;
        }
    }
}

/// Backend ids, with the generation and address each slot was last written with.
#[derive(Debug, Default)]
pub struct IdPool {
    services: Dense,
    backends: Dense,
    /// Generation and address last written to each backend slot.
    slots: HashMap<u32, (u32, IpAddr)>,
    /// Slots a previous agent left holding an address, not yet handed out: a new backend with
    /// that address takes its old slot, so the flows pinned to it stay.
    adopted: HashMap<IpAddr, Vec<u32>>,
}

impl IdPool {
    pub fn service(&mut self) -> ServiceId {
        ServiceId(self.services.take())
    }

    pub fn free_service(&mut self, id: ServiceId) {
        self.services.give_back(id.0);
    }

    /// A slot for a backend at `addr`: the one a previous agent gave that address, if free,
    /// else the lowest free one.
    pub fn backend(&mut self, addr: IpAddr) -> BackendId {
        let adopted = self.adopted.get_mut(&addr).and_then(Vec::pop);
        match adopted {
            Some(id) => {
                self.backends.reserve(id);
                BackendId(id)
            }
            None => loop {
                let id = self.backends.take();
                // Not a slot still waiting for its own address.
                if !self.adopted.values().any(|ids| ids.contains(&id)) {
                    break BackendId(id);
                }
            },
        }
    }

    /// The slots a previous agent left that no backend of this one claimed become free.
    pub fn forget_adopted(&mut self) {
        for id in std::mem::take(&mut self.adopted).into_values().flatten() {
            self.backends.give_back(id);
        }
    }

    pub fn free_backend(&mut self, id: BackendId) {
        self.backends.give_back(id.0);
    }

    /// The generation to write for `addr` in slot `id`: the slot's own while it keeps its
    /// address, a newer one when it changes hands (so flows pinned to the former owner re-hash
    /// instead of following the slot).
    pub(crate) fn generation(&mut self, id: u32, addr: IpAddr) -> u32 {
        let generation = match self.slots.get(&id) {
            Some(&(generation, old)) if old == addr => generation,
            Some(&(generation, _)) => generation.wrapping_add(1).max(1),
            None => 1,
        };
        self.slots.insert(id, (generation, addr));
        generation
    }

    /// Records a slot a previous agent left (its generation and address): see [`IdPool::backend`].
    pub(crate) fn adopt(&mut self, id: u32, generation: u32, addr: IpAddr) {
        self.slots.insert(id, (generation, addr));
        let ids = self.adopted.entry(addr).or_default();
        ids.push(id);
        // Popped from the end: lowest slots first.
        ids.sort_unstable_by(|a, b| b.cmp(a));
    }
}

/// The MAGLEV map's entries, carved into ranges for the services' tables: first fit, freed
/// ranges merged with their neighbours and reused.
#[derive(Clone, Debug)]
pub struct TableSpace {
    capacity: u32,
    /// Free ranges (start, length), sorted by start, never adjacent.
    free: Vec<(u32, u32)>,
}

impl TableSpace {
    pub fn new(capacity: u32) -> Self {
        Self { capacity, free: if capacity > 0 { vec![(0, capacity)] } else { Vec::new() } }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries not allocated.
    pub fn available(&self) -> u64 {
        self.free.iter().map(|&(_, n)| u64::from(n)).sum()
    }

    /// Whether ranges of these lengths could all be allocated now, in this order.
    pub fn fits(&self, lengths: &[u32]) -> bool {
        let mut free = self.free.clone();
        lengths.iter().all(|&n| take_first_fit(&mut free, n).is_some())
    }

    /// The start of a free range of `n` entries, now allocated.
    pub fn allocate(&mut self, n: u32) -> Option<u32> {
        take_first_fit(&mut self.free, n)
    }

    /// Frees `n` entries at `start`.
    pub fn release(&mut self, start: u32, n: u32) {
        if n == 0 {
            return;
        }
        let at = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(at, (start, n));
        // Merge with the next range, then with the previous one.
        if at + 1 < self.free.len() && self.free[at].0 + self.free[at].1 == self.free[at + 1].0 {
            self.free[at].1 += self.free[at + 1].1;
            self.free.remove(at + 1);
        }
        if at > 0 && self.free[at - 1].0 + self.free[at - 1].1 == self.free[at].0 {
            self.free[at - 1].1 += self.free[at].1;
            self.free.remove(at);
        }
    }
}

fn take_first_fit(free: &mut Vec<(u32, u32)>, n: u32) -> Option<u32> {
    let i = free.iter().position(|&(_, len)| len >= n)?;
    let (start, len) = free[i];
    if len == n {
        free.remove(i);
    } else {
        free[i] = (start + n, len - n);
    }
    Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn backend_ids_are_dense_reused_and_generations_follow_addresses() {
        let mut pool = IdPool::default();
        let a = pool.backend(ip("10.0.0.1"));
        let b = pool.backend(ip("10.0.0.2"));
        assert_eq!((a, b), (BackendId(0), BackendId(1)));
        assert_eq!(pool.generation(a.0, ip("10.0.0.1")), 1);
        assert_eq!(pool.generation(a.0, ip("10.0.0.1")), 1, "same owner, same generation");
        pool.free_backend(a);
        let c = pool.backend(ip("10.0.0.3"));
        assert_eq!(c, a, "freed ids first");
        assert_eq!(pool.generation(c.0, ip("10.0.0.3")), 2, "a new owner, a new generation");
    }

    #[test]
    fn adopted_slots_go_back_to_their_address() {
        let mut pool = IdPool::default();
        pool.adopt(3, 7, ip("10.0.0.9"));
        pool.adopt(0, 2, ip("10.0.0.8"));
        let other = pool.backend(ip("10.0.0.1"));
        assert_eq!(other, BackendId(1), "slot 0 waits for its address");
        assert_eq!(pool.backend(ip("10.0.0.9")), BackendId(3));
        assert_eq!(pool.generation(3, ip("10.0.0.9")), 7, "flows pinned to it stay");
        assert_eq!(pool.backend(ip("10.0.0.8")), BackendId(0));
        assert_eq!(pool.backend(ip("10.0.0.2")), BackendId(2));
        assert_eq!(pool.backend(ip("10.0.0.3")), BackendId(4));

        let mut pool = IdPool::default();
        pool.adopt(0, 2, ip("10.0.0.8"));
        assert_eq!(pool.backend(ip("10.0.0.1")), BackendId(1));
        pool.forget_adopted();
        assert_eq!(pool.backend(ip("10.0.0.2")), BackendId(0), "unclaimed slots are free again");
    }

    #[test]
    fn table_space_reuses_and_merges_freed_ranges() {
        let mut space = TableSpace::new(100);
        let a = space.allocate(40).unwrap();
        let b = space.allocate(40).unwrap();
        assert_eq!((a, b), (0, 40));
        assert!(space.allocate(30).is_none() && space.fits(&[20]) && !space.fits(&[20, 1]));
        space.release(a, 40);
        space.release(b, 40);
        assert_eq!(space.available(), 100);
        assert_eq!(space.allocate(100), Some(0), "merged back into one range");
    }
}
