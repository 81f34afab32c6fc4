//! The layout of the SERVICES map: each service in one of the two buckets
//! `lb_common::service_buckets` names for its key, as the data path looks for it. The agent
//! keeps the whole table and says which buckets to write, in an order that keeps every
//! service findable by a packet at every moment.
use anyhow::{bail, Result};
use lb_common::{
    limits::{SERVICE_BUCKETS, SERVICE_BUCKET_ENTRIES},
    service_buckets, Service, ServiceBucket, ServiceEntry, ServiceKey,
};

/// The agent's copy of SERVICES.
pub(crate) struct ServiceTable {
    buckets: Vec<ServiceBucket>,
}

/// Buckets to write to the map, in this order.
pub(crate) type Writes = Vec<(u32, ServiceBucket)>;

fn is_free(e: &ServiceEntry) -> bool {
    e.key.family == 0
}

impl ServiceTable {
    pub(crate) fn new() -> Self {
        Self { buckets: vec![ServiceBucket::default(); SERVICE_BUCKETS as usize] }
    }

    /// Where `key`'s entry is: bucket and index (a key's family is never a free entry's 0).
    fn find(&self, key: &ServiceKey) -> Option<(u32, usize)> {
        let (first, second) = service_buckets(key);
        [first, second].into_iter().find_map(|b| {
            let entries = &self.buckets[b as usize].entries;
            entries.iter().position(|e| e.key == *key).map(|i| (b, i))
        })
    }

    fn free_slot(&self, b: u32) -> Option<usize> {
        self.buckets[b as usize].entries.iter().position(is_free)
    }

    fn set(&mut self, b: u32, i: usize, entry: ServiceEntry, writes: &mut Writes) {
        self.buckets[b as usize].entries[i] = entry;
        writes.push((b, self.buckets[b as usize]));
    }

    #[cfg(test)]
    pub(crate) fn get(&self, key: &ServiceKey) -> Option<Service> {
        self.find(key).map(|(b, i)| self.buckets[b as usize].entries[i].service)
    }

    /// Adds or replaces the service of `key`. A new one goes to the emptier of its buckets;
    /// when both are full, one of their entries moves to its own other bucket first (written
    /// there before it leaves, so a packet finds it in one or the other throughout).
    pub(crate) fn put(&mut self, key: ServiceKey, service: Service) -> Result<Writes> {
        debug_assert!(key.family != 0, "family 0 marks a free entry");
        let mut writes = Writes::new();
        let entry = ServiceEntry { key, service };
        if let Some((b, i)) = self.find(&key) {
            self.set(b, i, entry, &mut writes);
            return Ok(writes);
        }
        let (first, second) = service_buckets(&key);
        let load = |b: u32| self.buckets[b as usize].entries.iter().filter(|e| !is_free(e)).count();
        let (near, far) = if load(second) < load(first) { (second, first) } else { (first, second) };
        for b in [near, far] {
            if let Some(i) = self.free_slot(b) {
                self.set(b, i, entry, &mut writes);
                return Ok(writes);
            }
        }
        for b in [first, second] {
            for i in 0..SERVICE_BUCKET_ENTRIES {
                let resident = self.buckets[b as usize].entries[i];
                let (r1, r2) = service_buckets(&resident.key);
                let other = if r1 == b { r2 } else { r1 };
                if let Some(j) = self.free_slot(other) {
                    self.set(other, j, resident, &mut writes);
                    self.set(b, i, entry, &mut writes);
                    return Ok(writes);
                }
            }
        }
        bail!(
            "no room for the service in the SERVICES map: buckets {first} and {second} and their entries' other \
             buckets are full"
        )
    }

    /// Removes the service of `key`, if there is one.
    pub(crate) fn remove(&mut self, key: &ServiceKey) -> Writes {
        let mut writes = Writes::new();
        if let Some((b, i)) = self.find(key) {
            self.set(b, i, ServiceEntry::default(), &mut writes);
        }
        writes
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use lb_common::{addr_v4, addr_v6, limits::MAX_SERVICES, FAMILY_V4, FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    fn key(n: u32) -> ServiceKey {
        // Many services on few VIPs, ports in a row: the operator's usual shape.
        let vip = n / 64;
        let (addr, family) = if n.is_multiple_of(2) {
            (addr_v4([10, 0, (vip >> 8) as u8, vip as u8]), FAMILY_V4)
        } else {
            (addr_v6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (vip >> 8) as u8, vip as u8]), FAMILY_V6)
        };
        let proto = if n.is_multiple_of(3) { IPPROTO_UDP } else { IPPROTO_TCP };
        ServiceKey { addr, port: (8000 + (n % 64) as u16).to_be(), proto, family }
    }

    fn service(n: u32) -> Service {
        Service { id: n, table_base: 2 * n, table_size: 7, ..Service::default() }
    }

    /// What the data path does: the first entry with the key in either bucket, from the map's
    /// contents as the writes left them.
    fn lookup(map: &HashMap<u32, ServiceBucket>, key: &ServiceKey) -> Option<Service> {
        let (first, second) = service_buckets(key);
        [first, second].iter().find_map(|b| {
            map.get(b).and_then(|bucket| bucket.entries.iter().find(|e| e.key == *key).map(|e| e.service))
        })
    }

    #[test]
    fn buckets_are_two_different_ones_in_range() {
        for n in 0..10_000 {
            let (a, b) = service_buckets(&key(n));
            assert!(a < SERVICE_BUCKETS && b < SERVICE_BUCKETS && a != b);
        }
    }

    #[test]
    fn every_service_stays_findable_while_the_table_fills_and_empties() {
        let mut table = ServiceTable::new();
        let mut map: HashMap<u32, ServiceBucket> = HashMap::new();
        for n in 0..MAX_SERVICES {
            for (b, bucket) in table.put(key(n), service(n)).expect("room for MAX_SERVICES") {
                map.insert(b, bucket);
                // After every single write, not only at the end.
                for m in 0..n {
                    assert_eq!(lookup(&map, &key(m)), Some(service(m)), "service {m} lost while adding {n}");
                }
            }
            assert_eq!(lookup(&map, &key(n)), Some(service(n)));
        }
        // Replacing keeps the place; removing frees it.
        let replaced = Service { table_base: 99, ..service(5) };
        let writes = table.put(key(5), replaced).unwrap();
        assert_eq!(writes.len(), 1);
        map.extend(writes);
        assert_eq!(lookup(&map, &key(5)), Some(replaced));
        for n in (0..MAX_SERVICES).step_by(2) {
            map.extend(table.remove(&key(n)));
            assert_eq!(lookup(&map, &key(n)), None);
            assert_eq!(table.get(&key(n)), None);
        }
        assert!(table.remove(&key(0)).is_empty(), "nothing to remove twice");
        for n in (1..MAX_SERVICES).step_by(2) {
            assert_eq!(lookup(&map, &key(n)).map(|s| s.id), Some(n));
        }
        assert_eq!(lookup(&map, &key(MAX_SERVICES + 1)), None);
    }

    #[test]
    fn a_full_pair_of_buckets_moves_a_resident_or_says_so() {
        let mut table = ServiceTable::new();
        let mut map: HashMap<u32, ServiceBucket> = HashMap::new();
        let newcomer = key_n(0);
        let (first, second) = service_buckets(&newcomer);
        // Fill both of the newcomer's buckets with keys that have them as one of their two.
        let mut residents = Vec::new();
        for b in [first, second] {
            let found = (1..4_000_000u32)
                .filter(|&n| {
                    let (x, y) = service_buckets(&key_n(n));
                    x == b || y == b
                })
                .filter(|n| !residents.contains(n))
                .take(SERVICE_BUCKET_ENTRIES)
                .collect::<Vec<_>>();
            for (i, n) in found.into_iter().enumerate() {
                let mut writes = Writes::new();
                table.set(b, i, ServiceEntry { key: key_n(n), service: service(n) }, &mut writes);
                map.extend(writes);
                residents.push(n);
            }
        }
        assert_eq!(residents.len(), 2 * SERVICE_BUCKET_ENTRIES, "the search finds residents");
        let writes = table.put(newcomer, service(0)).expect("a resident moves to its other bucket");
        assert_eq!(writes.len(), 2, "the resident's new place, then the newcomer in its old one");
        let (moved_to, bucket) = writes[0];
        let mut partial = map.clone();
        partial.insert(moved_to, bucket);
        for &n in &residents {
            assert_eq!(lookup(&partial, &key_n(n)).map(|s| s.id), Some(n), "findable between the two writes");
        }
        map.extend(writes);
        for n in residents.iter().copied().chain([0]) {
            assert_eq!(lookup(&map, &key_n(n)).map(|s| s.id), Some(n));
        }
        // Every entry of the newcomer's buckets and their other buckets full: refused, nothing
        // changed.
        for b in 0..SERVICE_BUCKETS {
            for i in 0..SERVICE_BUCKET_ENTRIES {
                if is_free(&table.buckets[b as usize].entries[i]) {
                    let filler = ServiceEntry { key: key_n(5_000_000 + b * 8 + i as u32), service: service(1) };
                    table.buckets[b as usize].entries[i] = filler;
                }
            }
        }
        let err = table.put(key_n(9_000_000), service(2)).unwrap_err();
        assert!(err.to_string().contains("no room for the service"), "{err}");
    }

    /// Distinct keys beyond `key`'s shape: every port of every IPv4 VIP in a /16.
    fn key_n(n: u32) -> ServiceKey {
        ServiceKey {
            addr: addr_v4([10, 1, (n >> 16) as u8, (n >> 8) as u8]),
            port: (n as u16).to_be(),
            proto: IPPROTO_TCP,
            family: FAMILY_V4,
        }
    }
}
