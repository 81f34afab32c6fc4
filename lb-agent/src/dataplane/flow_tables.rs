//! The flow tables: FLOWS is an array of maps with one LRU hash per possible CPU, each holding
//! that CPU's share of `flows.size` (Katran's layout: a CPU's inserts and evictions take only
//! its own table's lock). The object declares the array; the agent creates the tables, since
//! their size comes from the config, and a pinned FLOWS keeps them for the next agent.
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{ArrayOfMaps, Map, MapData, MapError};
use aya_obj::generated::bpf_map_type::{BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_LRU_HASH};
use lb_common::{limits::MAX_CPUS, Flow, FlowKey};

use super::object::Shape;

/// Possible CPUs (/sys/devices/system/cpu/possible): the CPU ids the data path may run on.
pub(crate) fn possible_cpus() -> Result<u32> {
    let n = aya::util::nr_cpus().map_err(|(path, e)| anyhow!("cannot read {path}: {e}"))? as u32;
    if n > MAX_CPUS {
        bail!("this host has {n} possible CPUs; the data path keeps flow tables for at most {MAX_CPUS}");
    }
    Ok(n)
}

/// How `total` entries are shared out: every CPU gets the same, rounded up.
pub(crate) fn per_cpu_entries(total: u32, cpus: u32) -> u32 {
    total.div_ceil(cpus.max(1)).max(1)
}

/// The shape of FLOWS itself: an entry per possible CPU.
pub(crate) fn outer_shape(cpus: u32) -> Shape {
    Shape { map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS as u32, key_size: 4, value_size: 4, max_entries: cpus, flags: 0 }
}

/// The shape of one CPU's table. Common LRU lists: one CPU inserts into it, so their lock is
/// that CPU's, and they refill and evict in batches.
pub(crate) fn table_shape(entries: u32) -> Shape {
    Shape {
        map_type: BPF_MAP_TYPE_LRU_HASH as u32,
        key_size: size_of::<FlowKey>() as u32,
        value_size: size_of::<Flow>() as u32,
        max_entries: entries,
        flags: 0,
    }
}

fn outer(data: MapData) -> Result<ArrayOfMaps<MapData, MapData>> {
    ArrayOfMaps::try_from(Map::ArrayOfMaps(data)).context("FLOWS is not an array of maps")
}

/// Every CPU's table, opened by the ids FLOWS holds; an error when one is missing.
pub(crate) fn tables(flows: &MapData) -> Result<Vec<MapData>> {
    let outer = outer(MapData::from_id(flows.info()?.id())?)?;
    (0..outer.len())
        .map(|cpu| outer.get(&cpu, 0).with_context(|| format!("the flow table of CPU {cpu} is missing")))
        .collect()
}

/// Whether the FLOWS pinned at `path` has a table of `entries` for each of its CPUs: what a new
/// agent may adopt as it is (its own shape is checked with the other state maps').
pub(crate) fn pinned_tables_fit(path: &Path, entries: u32) -> bool {
    let Ok(data) = MapData::from_pin(path) else { return false };
    tables(&data)
        .is_ok_and(|all| all.iter().all(|t| t.info().is_ok_and(|info| Shape::of(&info) == table_shape(entries))))
}

/// Gives each CPU of FLOWS (`flows`, just loaded) that has none a table of `entries`: all of
/// them for a fresh FLOWS, none for an adopted one. Returns how many were created.
pub(crate) fn fill(flows: &MapData, entries: u32) -> Result<u32> {
    let cpus = flows.info()?.max_entries();
    let mut outer = outer(MapData::from_id(flows.info()?.id())?)?;
    let mut created = 0;
    for cpu in 0..cpus {
        match outer.get(&cpu, 0) {
            Ok(_) => continue,
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read the flow table of CPU {cpu}")),
        }
        let Shape { map_type, key_size, value_size, max_entries, flags } = table_shape(entries);
        let obj = aya_obj::Map::new_from_params(map_type, key_size, value_size, max_entries, flags);
        let table = MapData::create(obj, &format!("FLOWS_{cpu}"), None)
            .with_context(|| format!("cannot create the flow table of CPU {cpu} ({entries} entries)"))?;
        outer.set(cpu, &table, 0).with_context(|| format!("cannot install the flow table of CPU {cpu}"))?;
        created += 1;
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_shared_out_rounding_up() {
        assert_eq!(per_cpu_entries(1 << 20, 2), 1 << 19);
        assert_eq!(per_cpu_entries(10, 3), 4);
        assert_eq!(per_cpu_entries(0, 4), 1);
        assert_eq!(per_cpu_entries(5, 0), 5);
    }
}
