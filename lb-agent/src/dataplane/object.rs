//! The eBPF object built from lb-ebpf: its bytes, which of its maps hold configuration and which
//! hold state that outlives an agent, and the shapes those maps are created with (read from the
//! object by aya-obj, so a pinned map can be checked against this build before it is reused).
use anyhow::{anyhow, Context as _, Result};
use aya::{maps::MapInfo, programs::Xdp, Ebpf, EbpfLoader};
use lb_common::map_names;

/// The eBPF object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

/// New with every program and swapped in with it: written whole by every agent from its
/// config, or (the next-hop cache) filled by the program itself.
pub(crate) const CONFIG_MAPS: [&str; 9] = [
    map_names::VIPS,
    map_names::VIP_BITS,
    map_names::SERVICES,
    map_names::MAGLEV,
    map_names::BACKENDS,
    map_names::BACKEND_WEIGHTS,
    map_names::SETTINGS,
    map_names::TX_PORTS,
    map_names::NEXT_HOPS,
];

/// Maps of the object the balancer does not use (the decap program's, the benches').
pub(crate) const UNUSED_MAPS: [&str; 6] = [
    map_names::DECAP_ADDRS,
    map_names::DECAP_STATS,
    lb_common::harness::FRAME_MAP,
    lb_common::harness::TARGET_MAP,
    lb_common::harness::SEQ_MAP,
    lb_common::forwarder::MAP,
];

/// The balancer's large maps: a program of the object other than the balancer creates them at
/// one entry (see [`load_object`]).
pub(crate) const BALANCER_ONLY_MAPS: [&str; 5] =
    [map_names::MAGLEV, map_names::FLOWS, map_names::NEXT_HOPS, map_names::FLOW_CACHE, map_names::PIN_VERSIONS];

/// Maps whose contents outlive an agent: every map of the balancer but the config maps and
/// global data (`.rodata`: the hash seed and the interface's MAC come from the new config).
pub(crate) fn is_state_map(name: &str) -> bool {
    !name.contains('.') && !CONFIG_MAPS.contains(&name) && !UNUSED_MAPS.contains(&name)
}

/// Loads the object for a program that leaves `unused` maps alone: they are created with one
/// entry instead of their full size.
pub(crate) fn load_object(unused: &[&str]) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for name in unused {
        loader.map_max_entries(name, 1);
    }
    loader.load(EBPF_OBJECT).context("cannot load the eBPF object (are you root, with BPF enabled in the kernel?)")
}

/// The object's XDP program `name`, loaded into the kernel (the verifier runs) on first use.
pub(crate) fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
    if prog.fd().is_err() {
        prog.load().with_context(|| format!("the kernel rejected program {name}"))?;
    }
    Ok(prog)
}

/// Takes a map of the loaded object out as its typed aya wrapper.
pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// What must match for a pinned map to be reused by this build and config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// enum bpf_map_type.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self { map_type, key_size, value_size, max_entries, flags } = self;
        write!(f, "type {map_type}, key {key_size} B, value {value_size} B, {max_entries} entries, flags {flags:#x}")
    }
}

impl Shape {
    /// The shape of a map the kernel holds.
    pub fn of(info: &MapInfo) -> Self {
        Self {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }
}

/// Every map the object declares, with its shape as declared.
pub(crate) fn declared_maps(elf: &[u8]) -> Result<Vec<(String, Shape)>> {
    let object = aya_obj::Object::parse(elf).context("cannot parse the eBPF object")?;
    Ok(object
        .maps
        .iter()
        .map(|(name, map)| {
            let shape = Shape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: map.max_entries(),
                flags: map.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

/// The shapes this build's state maps have on a host of `cpus` possible CPUs (FLOWS has an
/// entry per CPU; its tables are checked on their own: `flow_tables`).
pub(crate) fn state_map_shapes(cpus: u32) -> Result<Vec<(String, Shape)>> {
    Ok(declared_maps(EBPF_OBJECT)?
        .into_iter()
        .filter(|(name, _)| is_state_map(name))
        .map(|(name, shape)| {
            if name == map_names::FLOWS {
                return (name, super::flow_tables::outer_shape(cpus));
            }
            (name, shape)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use aya::{maps::Map, EbpfLoader};
    use lb_common::{limits, Reason};

    use super::*;

    #[test]
    fn the_object_declares_its_maps() {
        let maps = declared_maps(EBPF_OBJECT).unwrap();
        let shape = |name: &str| maps.iter().find(|(n, _)| n == name).map(|(_, s)| *s).expect(name);
        let flows = shape(map_names::FLOWS);
        assert_eq!((flows.key_size, flows.value_size), (4, 4), "an array of the per-CPU tables");
        assert_eq!(flows.max_entries, limits::MAX_CPUS);
        let reasons = shape(map_names::REASON_STATS);
        assert_eq!((reasons.key_size, reasons.value_size, reasons.max_entries), (4, 16, Reason::COUNT));
        for name in CONFIG_MAPS {
            shape(name);
        }
        assert!(!is_state_map(map_names::MAGLEV) && is_state_map(map_names::FLOWS));
    }

    #[rustfmt::skip]
    fn map_info(map: &Map) -> MapInfo {
        use Map::*;
        let data = match map {
            Array(m) | ArrayOfMaps(m) | BloomFilter(m) | CgroupArray(m) | CgroupStorage(m) | CgrpStorage(m)
            | CpuMap(m) | DevMap(m) | DevMapHash(m) | HashMap(m) | HashOfMaps(m) | InodeStorage(m) | LpmTrie(m)
            | LruHashMap(m) | PerCpuArray(m) | PerCpuCgroupStorage(m) | PerCpuHashMap(m) | PerCpuLruHashMap(m)
            | PerfEventArray(m) | ProgramArray(m) | Queue(m) | ReusePortSockArray(m) | RingBuf(m) | SockHash(m)
            | SockMap(m) | SkStorage(m) | Stack(m) | StackTraceMap(m) | Unsupported(m) | XskMap(m) => m,
        };
        data.info().unwrap()
    }

    /// What the object declares is what the kernel creates (root only: it creates the maps).
    #[test]
    fn declared_shapes_are_what_the_kernel_creates() {
        if !crate::sys::is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let mut loader = EbpfLoader::new();
        for name in CONFIG_MAPS.iter().chain(&UNUSED_MAPS) {
            loader.map_max_entries(name, 1);
        }
        let cpus = super::super::flow_tables::possible_cpus().unwrap();
        loader.map_max_entries(map_names::FLOWS, cpus);
        let ebpf = loader.load(EBPF_OBJECT).unwrap();
        let mut created: Vec<(String, Shape)> = ebpf
            .maps()
            .filter(|(name, _)| is_state_map(name))
            .map(|(name, map)| (name.to_string(), Shape::of(&map_info(map))))
            .collect();
        let mut declared = state_map_shapes(cpus).unwrap();
        declared.sort_by(|a, b| a.0.cmp(&b.0));
        created.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(declared, created);
        assert!(declared.iter().any(|(n, s)| n == map_names::FLOWS && s.max_entries == cpus));
    }
}
