//! The one walker of the flow tables (FLOWS, a table per CPU): every few seconds, off the main
//! loop, it counts the entries (the occupancy metric) and recounts each backend's active flows
//! (what lc/wlc compare), correcting the counts the data path keeps where they drifted.
use std::{
    collections::HashMap as StdHashMap,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{Array, Map, MapData};
use lb_common::{Backend, Flow, FlowKey};
use log::{debug, warn};

use crate::sys::hash_for_each;

/// What the walker shares with the data path's facade.
#[derive(Debug, Default)]
pub(crate) struct FlowTableState {
    /// Entries in the flow table at the last walk; u64::MAX before the first.
    entries: AtomicU64,
    /// One past the highest backend id ever written (ids are dense from 0): how far the
    /// active-flow recount looks.
    pub(crate) backend_id_limit: AtomicU32,
}

impl FlowTableState {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self { entries: AtomicU64::new(u64::MAX), backend_id_limit: AtomicU32::new(0) })
    }

    /// Entries at the last walk, if there was one.
    pub(crate) fn entries(&self) -> Option<u64> {
        Some(self.entries.load(Ordering::Relaxed)).filter(|&n| n != u64::MAX)
    }
}

/// How often the agent walks the flow table, at most.
pub const FLOW_WALK_PERIOD: Duration = Duration::from_secs(3);

/// After a walk, the walker rests at least this many times as long as the walk took: at most
/// a twentieth of a CPU, whatever the table's size (a million entries take a few hundred
/// milliseconds even in batches).
const REST_PER_WALK: u32 = 19;

/// What one walk found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// Entries in the flow table.
    pub entries: u64,
    /// Backends whose active-flow count was rewritten.
    pub rewritten: usize,
}

/// The walker, by map ids: it opens the maps afresh on every walk and stops when they are gone.
#[derive(Clone, Debug)]
pub struct FlowWalker {
    /// FLOWS, the array of the per-CPU tables.
    pub(crate) flows: u32,
    pub(crate) backends: u32,
    pub(crate) active_flows: u32,
    pub(crate) state: Arc<FlowTableState>,
}

impl FlowWalker {
    /// Walks the flow table once: counts its entries and recounts every backend's active flows,
    /// writing the counts that drifted. Entries the LRU evicted (or that a full table refused)
    /// never gave their count back, and a TCP flow that ends without a FIN or RST reaching us
    /// (idle, or its FIN on another path) stays counted until its entry goes. A flow counts for
    /// its backend slot when pinned to the slot's current generation and not closed. Batched
    /// lookups, a few thousand entries per syscall, but still a pass over the whole table: call
    /// it off the main loop. Flows pinned or closed during the walk may be lost to the write (a
    /// few, fixed by the next walk).
    pub fn walk(&self) -> Result<Walk> {
        let tables = super::flow_tables::tables(&MapData::from_id(self.flows)?)?;
        let backends: Array<MapData, Backend> = Array::try_from(Map::Array(MapData::from_id(self.backends)?))?;
        let mut active: Array<MapData, u64> = Array::try_from(Map::Array(MapData::from_id(self.active_flows)?))?;
        let mut counts: StdHashMap<(u32, u32), u64> = StdHashMap::new();
        let mut entries = 0;
        // A flow has one entry, in one CPU's table (a packet on another CPU uses it there or
        // moves it, never copies it), so the tables' counts add up.
        for table in &tables {
            entries += hash_for_each(table, |key: &FlowKey, flow: &Flow| {
                if flow.active(key.proto) {
                    *counts.entry((flow.backend, flow.generation)).or_default() += 1;
                }
            })?;
        }
        self.state.entries.store(entries, Ordering::Relaxed);
        let limit = self.state.backend_id_limit.load(Ordering::Relaxed).min(backends.len());
        let mut rewritten = 0;
        for id in 0..limit {
            let generation = backends.get(&id, 0)?.generation;
            let count = counts.get(&(id, generation)).copied().unwrap_or(0);
            if active.get(&id, 0)? != count {
                active.set(id, count, 0)?;
                rewritten += 1;
            }
        }
        Ok(Walk { entries, rewritten })
    }

    /// Walks every `period` (or less often: see [`REST_PER_WALK`]) on a thread of its own,
    /// until the maps are gone.
    pub fn spawn(self, period: Duration) {
        std::thread::spawn(move || loop {
            let started = Instant::now();
            match self.walk() {
                Ok(Walk { entries, rewritten }) => {
                    let took = started.elapsed();
                    if rewritten > 0 {
                        debug!(
                            "active flows: {rewritten} backends reconciled with the flow table ({entries} entries, \
                             walked in {took:.1?})"
                        );
                    }
                    std::thread::sleep(period.max(took * REST_PER_WALK));
                }
                Err(e) => {
                    warn!("flow table: cannot walk it any more, stopping: {e:#}");
                    return;
                }
            }
        });
    }
}
