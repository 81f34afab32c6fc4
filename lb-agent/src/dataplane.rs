//! A typed facade over the eBPF object and its maps: load, attach, add services and backends,
//! publish Maglev tables, read counters. The CLI, the health loop and the tests all go through
//! it; nothing else touches a map.
use std::{
    fs::File,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode as AyaXdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    addr_v4, addr_v6, global_names, limits, map_names, program_names, Addr, Backend, Counters, FlowEvent, Reason,
    Service, ServiceKey, Settings, Vip, VipKey, AFFINITY_MASK, AFFINITY_SHIFT, BACKEND_F_VALID, FAMILY_V4, FAMILY_V6,
    NO_BACKEND, SCHED_MASK, SCHED_SHIFT, SERVICE_F_IPIP,
};
use log::{info, warn};

use crate::config::{Forward, XdpMode};

fn forward_flags(forward: Forward) -> u32 {
    match forward {
        Forward::L2 => 0,
        Forward::Ipip => SERVICE_F_IPIP,
    }
}

/// An address as the maps hold it: its words and its family.
pub fn map_addr(addr: IpAddr) -> (Addr, u8) {
    match addr {
        IpAddr::V4(a) => (addr_v4(a.octets()), FAMILY_V4),
        IpAddr::V6(a) => (addr_v6(a.octets()), FAMILY_V6),
    }
}

/// The eBPF object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

/// What the data path is loaded with; fixed until the program is reloaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub hash_seed: u32,
    /// MAC of the interface the balancer is attached to: the source of rewritten frames.
    pub iface_mac: [u8; 6],
    /// Entries of the MAGLEV map: the sum of twice every service's table size, plus headroom.
    pub maglev_capacity: u32,
    /// Entries of the flow table.
    pub flow_table_size: u32,
}

/// A service's place in the data path: its key and its two table copies.
#[derive(Clone, Debug)]
pub struct ServiceSlot {
    pub key: ServiceKey,
    pub id: u32,
    /// Entries allocated to each copy of the table.
    pub table_size: u32,
    pub flags: u32,
    bases: [u32; 2],
    active: usize,
    /// Entries of the active table (rr/wrr tables may use fewer than `table_size`).
    active_size: u32,
}

impl ServiceSlot {
    /// Changes how the service forwards; written with its next table.
    pub fn set_forward(&mut self, forward: Forward) {
        self.flags = (self.flags & (SCHED_MASK | AFFINITY_MASK)) | forward_flags(forward);
    }

    /// Changes the service's scheduler (`lb_common::SCHED_*`); written with its next table.
    pub fn set_scheduler(&mut self, scheduler: u32) {
        self.flags = (self.flags & !SCHED_MASK) | ((scheduler << SCHED_SHIFT) & SCHED_MASK);
    }

    /// Sets the affinity timeout of a source-hash service (seconds, at most
    /// `lb_common::MAX_AFFINITY_TIMEOUT_SECS`; 0: off): new flows of a client go to its pinned
    /// backend (`SOURCE_AFFINITY`) while it comes back within it. Written with its next table.
    pub fn set_affinity_timeout(&mut self, secs: u32) {
        let secs = secs.min(lb_common::MAX_AFFINITY_TIMEOUT_SECS);
        self.flags = (self.flags & !AFFINITY_MASK) | (secs << AFFINITY_SHIFT);
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, Vip>,
    services: HashMap<MapData, ServiceKey, Service>,
    maglev: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    backend_flows: PerCpuArray<MapData, lb_common::BackendFlows>,
    reason_stats: PerCpuArray<MapData, Counters>,
    flow_stats: PerCpuArray<MapData, Counters>,
    settings: Array<MapData, Settings>,
    active_flows: Array<MapData, u64>,
    backend_weights: Array<MapData, u32>,
    tx_ports: aya::maps::DevMapHash<MapData>,
    /// Generation and address last written to each backend slot.
    slots: std::collections::HashMap<u32, (u32, IpAddr)>,
    maglev_capacity: u32,
    /// First unused MAGLEV entry: tables are carved out in order and never moved.
    maglev_next: u32,
    /// Pinned under a directory of bpffs (the agent), or not at all (tests, benchmarks).
    /// Declared last: dropped after the program, and its link last.
    pins: Option<Pins>,
}

pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Sums a per-CPU counter.
pub(crate) fn sum(values: &aya::maps::PerCpuValues<Counters>) -> Counters {
    values
        .iter()
        .fold(Counters::default(), |acc, c| Counters { packets: acc.packets + c.packets, bytes: acc.bytes + c.bytes })
}

impl Dataplane {
    /// Loads the eBPF object and the balancer program (verifier included); attaches nothing.
    /// Nothing is pinned: the program and every map go when the Dataplane drops.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        Self::load_with(opts, &[], None)
    }

    /// As [`Dataplane::load`], for an agent that keeps its data path pinned under
    /// `<pin_root>/<iface>/` (bpffs) so that a restart or an upgrade is hitless. Takes the
    /// directory's lock, so that a second agent on the interface is refused. When a previous
    /// agent left pins there (a crash, a `kill -9` or `run --keep-on-exit`), they are adopted:
    /// the state maps (the flow table and the counters) are reused as they are, the config maps
    /// are loaded empty for the agent to fill, and [`Dataplane::attach`] then swaps program and
    /// config maps in at once by replacing the program of the pinned link (bpf_link_update).
    pub fn load_pinned(opts: &LoadOptions, pin_root: &Path, iface: &str) -> Result<Self> {
        let mut pins = Pins::open(pin_root, iface)?;
        let shapes = state_map_shapes(opts)?;
        let state = pins.prepare_state_maps(&shapes)?;
        let mut dp = Self::load_with(opts, &state, Some(&pins.dir))?;
        let seeded = dp.seed_backend_slots(&pins.dir.join(map_names::BACKENDS))?;
        if pins.old_link.is_some() || !pins.adopted.is_empty() {
            info!(
                "adopting the data path pinned under {}: {}; maps kept: {}; {seeded} backend slots carried over",
                pins.dir.display(),
                if pins.old_link.is_some() { "its program is still attached" } else { "no program attached" },
                if pins.adopted.is_empty() { "none".to_string() } else { pins.adopted.join(", ") },
            );
        }
        dp.pins = Some(pins);
        Ok(dp)
    }

    /// Loads the object with the maps of `pinned` opened from (or created and pinned at) their
    /// paths. With `stage`, the config maps are pinned there as `new-NAME` until attach.
    fn load_with(opts: &LoadOptions, pinned: &[(String, PathBuf)], stage: Option<&Path>) -> Result<Self> {
        let seed = opts.hash_seed;
        let mac = lb_common::mac_words(opts.iface_mac);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(global_names::HASH_SEED, &seed, true)
            .override_global(global_names::IFACE_MAC, &mac, true)
            .map_max_entries(map_names::MAGLEV, opts.maglev_capacity.max(1))
            .map_max_entries(map_names::FLOWS, opts.flow_table_size.max(1));
        for (name, path) in pinned {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("cannot load the eBPF object (are you root, with BPF enabled in the kernel?)")?;
        if let Some(dir) = stage {
            for name in CONFIG_MAPS {
                let map = ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
                let path = dir.join(format!("{STAGED}{name}"));
                map.pin(&path).with_context(|| format!("cannot pin map {name} at {}", path.display()))?;
            }
        }
        let prog: &mut Xdp = ebpf
            .program_mut(program_names::BALANCER)
            .ok_or_else(|| anyhow!("program {} missing", program_names::BALANCER))?
            .try_into()?;
        prog.load().context("the kernel rejected the balancer program")?;
        Ok(Self {
            vips: take_map(&mut ebpf, map_names::VIPS)?,
            services: take_map(&mut ebpf, map_names::SERVICES)?,
            maglev: take_map(&mut ebpf, map_names::MAGLEV)?,
            backends: take_map(&mut ebpf, map_names::BACKENDS)?,
            service_stats: take_map(&mut ebpf, map_names::SERVICE_STATS)?,
            backend_stats: take_map(&mut ebpf, map_names::BACKEND_STATS)?,
            backend_flows: take_map(&mut ebpf, map_names::BACKEND_FLOW_STATS)?,
            reason_stats: take_map(&mut ebpf, map_names::REASON_STATS)?,
            flow_stats: take_map(&mut ebpf, map_names::FLOW_STATS)?,
            settings: take_map(&mut ebpf, map_names::SETTINGS)?,
            active_flows: take_map(&mut ebpf, map_names::ACTIVE_FLOWS)?,
            backend_weights: take_map(&mut ebpf, map_names::BACKEND_WEIGHTS)?,
            tx_ports: take_map(&mut ebpf, map_names::TX_PORTS)?,
            slots: std::collections::HashMap::new(),
            maglev_capacity: opts.maglev_capacity,
            maglev_next: 0,
            pins: None,
            ebpf,
        })
    }

    /// Carries the backend slots of the pinned BACKENDS map (the previous agent's) over into
    /// ours, marked unusable: the flows pinned to a slot re-hash unless this agent gives the
    /// slot to the same address again, and a slot given to another address gets a newer
    /// generation, so an adopted flow never follows a slot to a backend it was not on.
    fn seed_backend_slots(&mut self, old: &Path) -> Result<usize> {
        let Ok(info) = MapInfo::from_pin(old) else { return Ok(0) };
        if info.key_size() != 4 || info.value_size() as usize != core::mem::size_of::<Backend>() {
            warn!("pinned map {} has another layout: backend slots not carried over", old.display());
            return Ok(0);
        }
        let data = MapData::from_pin(old).with_context(|| format!("cannot open {}", old.display()))?;
        // One BPF_MAP_LOOKUP_BATCH instead of a lookup per slot (131072 of them).
        let slots: Vec<(u32, Backend)> = array_lookup_all(&data, info.max_entries().min(self.backends.len()))
            .context("cannot read the pinned BACKENDS")?;
        let mut seeded = 0;
        for (id, b) in slots {
            if b.generation == 0 {
                continue;
            }
            let addr = match b.family {
                FAMILY_V6 => IpAddr::from(words_octets(b.addr)),
                _ => IpAddr::from(<[u8; 4]>::try_from(&words_octets(b.addr)[..4]).expect("4 bytes")),
            };
            self.slots.insert(id, (b.generation, addr));
            self.backends.set(id, Backend { flags: 0, ..b }, 0).context("cannot write a backend slot")?;
            seeded += 1;
        }
        Ok(seeded)
    }

    /// The directory the data path is pinned under, when it is.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.dir.as_path())
    }

    /// Whether [`Dataplane::attach`] took over a program a previous agent left attached.
    pub fn adopted_link(&self) -> bool {
        self.pins.as_ref().is_some_and(|p| p.adopted_link)
    }

    /// Clean exit: removes every pin of the interface and drops the link, which detaches the
    /// program (nothing else holds it). Without pins, nothing to do: the drop detaches.
    pub fn unpin(&mut self) -> Result<()> {
        match self.pins.as_mut() {
            Some(pins) => pins.remove_all(),
            None => Ok(()),
        }
    }

    /// The balancer program, e.g. for BPF_PROG_TEST_RUN.
    pub fn balancer(&mut self) -> &mut Xdp {
        self.program(program_names::BALANCER).expect("loaded in Dataplane::load")
    }

    /// One of the object's programs, loaded on first use (the baselines of the benchmarks).
    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        let prog: &mut Xdp =
            self.ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
        if prog.fd().is_err() {
            prog.load().with_context(|| format!("the kernel rejected program {name}"))?;
        }
        Ok(prog)
    }

    /// Attaches the balancer to `iface`. `None` tries native mode and falls back to generic
    /// with a warning. Returns the mode in use. Detached when the Dataplane is dropped, unless
    /// it is pinned ([`Dataplane::load_pinned`]): then the link is pinned too and stays until
    /// [`Dataplane::unpin`]. A pinned link left by a previous agent is not detached: its
    /// program is replaced atomically (bpf_link_update), in the mode it was attached in.
    pub fn attach(&mut self, iface: &str, mode: Option<XdpMode>) -> Result<XdpMode> {
        let Some(mut pins) = self.pins.take() else {
            return attach_xdp(self.balancer(), iface, mode);
        };
        let result = self.attach_pinned(&mut pins, iface, mode);
        self.pins = Some(pins);
        result
    }

    fn attach_pinned(&mut self, pins: &mut Pins, iface: &str, want: Option<XdpMode>) -> Result<XdpMode> {
        let prog = self.balancer();
        let pinned_mode = pins.pinned_mode();
        let (mode, id, fresh) = match pins.old_link.take() {
            Some(old) if want.is_none() || want == pinned_mode => {
                let link = XdpLink::try_from(FdLink::from(old)).context("the pinned link is not an XDP link")?;
                let id = prog
                    .attach_to_link(link)
                    .context("cannot replace the program of the pinned XDP link (bpf_link_update)")?;
                pins.adopted_link = true;
                (pinned_mode.unwrap_or(XdpMode::Native), id, false)
            }
            old => {
                if let Some(old) = old {
                    warn!(
                        "the pinned program runs in {} mode, {want:?} was asked for: detaching it first (packets \
                         reach the stack unbalanced until the new program is attached)",
                        pinned_mode.map_or("an unknown".to_string(), |m| format!("{m:?}"))
                    );
                    old.unpin().context("cannot remove the pinned link")?;
                }
                let (mode, id) = attach_xdp_link(prog, iface, want)?;
                (mode, id, true)
            }
        };
        let link = FdLink::try_from(prog.take_link(id)?)
            .context("XDP was attached through netlink, not a bpf link, which cannot be pinned (kernel < 5.9?)")?;
        let link = if fresh {
            FdLink::from(link.pin(pins.dir.join(LINK_PIN)).context("cannot pin the XDP link")?)
        } else {
            link
        };
        pins.link = Some(link);
        pins.commit(mode)?;
        Ok(mode)
    }

    /// Adds a service with an empty table (its packets are dropped as `drop_no_backend` until
    /// a table is published). Fails when the MAGLEV map has no room for two more tables of
    /// `table_size`, or the service id is out of range.
    pub fn add_service(
        &mut self,
        vip: IpAddr,
        port: u16,
        proto: u8,
        id: u32,
        table_size: u32,
        forward: Forward,
    ) -> Result<ServiceSlot> {
        if id >= limits::MAX_SERVICES {
            bail!("service id {id} out of range (max {})", limits::MAX_SERVICES - 1);
        }
        let needed = 2 * u64::from(table_size);
        if u64::from(self.maglev_next) + needed > u64::from(self.maglev_capacity) {
            bail!(
                "MAGLEV map full: {} of {} entries used, the service needs {needed}; raise maglev_capacity",
                self.maglev_next,
                self.maglev_capacity
            );
        }
        let bases = [self.maglev_next, self.maglev_next + table_size];
        self.maglev_next += 2 * table_size;
        let (addr, family) = map_addr(vip);
        let key = ServiceKey { addr, port: port.to_be(), proto, family };
        let mut slot = ServiceSlot {
            key,
            id,
            table_size,
            flags: forward_flags(forward),
            bases,
            active: 0,
            active_size: table_size,
        };
        self.write_table(slot.bases[0], &vec![NO_BACKEND; table_size as usize])?;
        self.flip(&mut slot, 0)?;
        let vip_key = VipKey { addr, family, _pad: [0; 3] };
        let services = self.vips.get(&vip_key, 0).map_or(0, |v| v.services);
        self.vips
            .insert(vip_key, Vip { services: services + 1 }, 0)
            .with_context(|| format!("cannot add VIP {vip}"))?;
        Ok(slot)
    }

    /// Removes a service: its packets become `drop_unknown_service` (or pass, when it was the
    /// VIP's last service). Its two tables stay allocated: MAGLEV is carved out once.
    pub fn remove_service(&mut self, slot: &ServiceSlot) -> Result<()> {
        self.services.remove(&slot.key).context("cannot remove the service")?;
        let vip_key = VipKey { addr: slot.key.addr, family: slot.key.family, _pad: [0; 3] };
        match self.vips.get(&vip_key, 0).map_or(0, |v| v.services) {
            0 | 1 => self.vips.remove(&vip_key).context("cannot remove the VIP")?,
            n => self.vips.insert(vip_key, Vip { services: n - 1 }, 0).context("cannot update the VIP")?,
        }
        Ok(())
    }

    /// Writes a backend's slot. `usable` false keeps the slot but makes the data path re-hash
    /// the flows pinned to it (a dead or removed backend); a draining backend stays usable and
    /// simply leaves the Maglev table. A slot that gets another address gets a new generation,
    /// so flows pinned to its former owner never follow it. `mac` is needed for L2 DSR only.
    pub fn set_backend(&mut self, id: u32, addr: IpAddr, mac: Option<[u8; 6]>, usable: bool) -> Result<()> {
        let generation = match self.slots.get(&id) {
            Some(&(generation, old)) if old == addr => generation,
            Some(&(generation, _)) => generation.wrapping_add(1),
            None => 1,
        };
        self.slots.insert(id, (generation, addr));
        let (words, family) = map_addr(addr);
        let backend = Backend {
            addr: words,
            mac: lb_common::mac_words(mac.unwrap_or_default()),
            flags: if usable { BACKEND_F_VALID } else { 0 },
            family,
            generation,
        };
        self.backends.set(id, backend, 0).with_context(|| format!("cannot write backend {id} ({addr})"))?;
        BACKEND_ID_LIMIT.fetch_max(id.saturating_add(1), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Writes a backend's weight, which wlc divides its active flows by.
    pub fn set_backend_weight(&mut self, id: u32, weight: u32) -> Result<()> {
        self.backend_weights.set(id, weight, 0).with_context(|| format!("cannot write the weight of backend {id}"))
    }

    /// The active flows of a backend as the data path counts them (flows pinned to it and not
    /// closed; reconciled with the flow table every few seconds, see [`reconcile_active_flows`]).
    pub fn active_flows(&self, id: u32) -> Result<u64> {
        Ok(self.active_flows.get(&id, 0)?)
    }

    /// Ids of the maps [`reconcile_active_flows`] works on, for a thread of its own.
    pub fn active_flow_maps(&self) -> Result<ActiveFlowMaps> {
        use aya::maps::IterableMap as _;
        Ok(ActiveFlowMaps {
            flows: self.flow_table()?.0,
            backends: self.backends.map().info()?.id(),
            active_flows: self.active_flows.map().info()?.id(),
        })
    }

    /// Replaces the run-time settings (flow expiry, new-flow rate, encapsulation sources).
    pub fn set_settings(&mut self, settings: Settings) -> Result<()> {
        self.settings.set(0, settings, 0).context("cannot write the settings")
    }

    /// Lets the data path redirect encapsulated packets out of `ifindex` (XDP_REDIRECT).
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("cannot add interface {ifindex} to TX_PORTS"))
    }

    /// Makes `entries` the service's table: writes the inactive copy, then flips the service
    /// to it, so the data path sees the old table or the new one, never a mix. A table may be
    /// shorter than the allocated size (rr/wrr: whole cycles only), not empty.
    pub fn publish_table(&mut self, slot: &mut ServiceSlot, entries: &[u32]) -> Result<()> {
        if entries.is_empty() || entries.len() > slot.table_size as usize {
            bail!("table has {} entries, the service expects 1 to {}", entries.len(), slot.table_size);
        }
        let next = 1 - slot.active;
        self.write_table(slot.bases[next], entries)?;
        slot.active_size = entries.len() as u32;
        self.flip(slot, next)
    }

    fn write_table(&mut self, base: u32, entries: &[u32]) -> Result<()> {
        use aya::maps::IterableMap as _;
        // One BPF_MAP_UPDATE_BATCH rather than a syscall per entry (65537 of them by default):
        // it takes most of the time of a start-up, a reload or a takeover.
        if array_update_all(self.maglev.map(), base, entries).is_ok() {
            return Ok(());
        }
        for (i, &backend) in entries.iter().enumerate() {
            self.maglev.set(base + i as u32, backend, 0).context("cannot write the Maglev table")?;
        }
        Ok(())
    }

    fn flip(&mut self, slot: &mut ServiceSlot, to: usize) -> Result<()> {
        let service =
            Service { id: slot.id, flags: slot.flags, table_base: slot.bases[to], table_size: slot.active_size };
        self.services.insert(slot.key, service, 0).context("cannot write the service")?;
        slot.active = to;
        Ok(())
    }

    /// Frames and bytes per verdict reason, summed over CPUs.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, Counters)>> {
        Reason::ALL.iter().map(|&r| Ok((r, sum(&self.reason_stats.get(&(r as u32), 0)?)))).collect()
    }

    /// Flow-table events, summed over CPUs (packets only).
    pub fn flow_counters(&self) -> Result<Vec<(FlowEvent, u64)>> {
        FlowEvent::ALL.iter().map(|&e| Ok((e, sum(&self.flow_stats.get(&(e as u32), 0)?).packets))).collect()
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        Ok(sum(&self.service_stats.get(&id, 0)?))
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        Ok(sum(&self.backend_stats.get(&id, 0)?))
    }

    /// The flow table's map id and capacity, for a counter that walks it off the main loop.
    pub fn flow_table(&self) -> Result<(u32, u32)> {
        let Some(aya::maps::Map::LruHashMap(data)) = self.ebpf.map(map_names::FLOWS) else {
            bail!("map {} missing from the eBPF object", map_names::FLOWS);
        };
        let info = data.info()?;
        Ok((info.id(), info.max_entries()))
    }

    /// New flows and SYN retransmissions of a backend, summed over CPUs (since load).
    pub fn backend_flows(&self, id: u32) -> Result<lb_common::BackendFlows> {
        let values = self.backend_flows.get(&id, 0)?;
        Ok(values.iter().fold(lb_common::BackendFlows::default(), |a, c| lb_common::BackendFlows {
            new_flows: a.new_flows + c.new_flows,
            syn_retransmits: a.syn_retransmits + c.syn_retransmits,
        }))
    }
}

/// One past the highest backend id ever written (ids are dense from 0): how far
/// [`reconcile_active_flows`] looks.
static BACKEND_ID_LIMIT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Map ids of FLOWS, BACKENDS and ACTIVE_FLOWS.
#[derive(Clone, Copy, Debug)]
pub struct ActiveFlowMaps {
    pub flows: u32,
    pub backends: u32,
    pub active_flows: u32,
}

/// Recounts every backend's active flows from the flow table and writes the counts the data
/// path keeps where they drifted: entries the LRU evicted (or that a full table refused) never
/// gave their count back, and a TCP flow that ends without a FIN or RST reaching us (idle, or
/// its FIN on another path) stays counted until its entry goes. A flow counts for its backend
/// slot when pinned to the slot's current generation and not closed. Walking a large table
/// takes a syscall per entry: call it off the main loop. Flows pinned or closed during the walk
/// may be lost to the write (a few, fixed by the next round). Returns the backends rewritten.
pub fn reconcile_active_flows(maps: ActiveFlowMaps) -> Result<usize> {
    let flows: HashMap<MapData, lb_common::FlowKey, lb_common::Flow> =
        HashMap::try_from(Map::LruHashMap(MapData::from_id(maps.flows)?))?;
    let backends: Array<MapData, Backend> = Array::try_from(Map::Array(MapData::from_id(maps.backends)?))?;
    let mut active: Array<MapData, u64> = Array::try_from(Map::Array(MapData::from_id(maps.active_flows)?))?;
    let mut counts: std::collections::HashMap<(u32, u32), u64> = std::collections::HashMap::new();
    for (key, flow) in flows.iter().filter_map(Result::ok) {
        if flow.active(key.proto) {
            *counts.entry((flow.backend, flow.generation)).or_default() += 1;
        }
    }
    let limit = BACKEND_ID_LIMIT.load(std::sync::atomic::Ordering::Relaxed).min(backends.len());
    let mut rewritten = 0;
    for id in 0..limit {
        let generation = backends.get(&id, 0)?.generation;
        let count = counts.get(&(id, generation)).copied().unwrap_or(0);
        if active.get(&id, 0)? != count {
            active.set(id, count, 0)?;
            rewritten += 1;
        }
    }
    Ok(rewritten)
}

/// Attaches a loaded XDP program to `iface`. `None` tries native mode and falls back to
/// generic with a warning. Returns the mode in use. Detached when the program is dropped.
pub fn attach_xdp(prog: &mut Xdp, iface: &str, mode: Option<XdpMode>) -> Result<XdpMode> {
    attach_xdp_link(prog, iface, mode).map(|(mode, _)| mode)
}

/// As [`attach_xdp`], with the link's id.
fn attach_xdp_link(prog: &mut Xdp, iface: &str, mode: Option<XdpMode>) -> Result<(XdpMode, XdpLinkId)> {
    if if_index(iface).is_none() {
        bail!("unknown interface {iface:?}");
    }
    let try_attach = |prog: &mut Xdp, mode: XdpMode| {
        let flags = match mode {
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Generic => AyaXdpMode::Skb,
        };
        prog.attach(iface, flags).with_context(|| format!("cannot attach XDP in {mode:?} mode to {iface}"))
    };
    match mode {
        Some(mode) => try_attach(prog, mode).map(|id| (mode, id)),
        None => match try_attach(prog, XdpMode::Native) {
            Ok(id) => Ok((XdpMode::Native, id)),
            Err(e) => {
                warn!("{e:#}; falling back to generic mode (slower: runs after the skb is built)");
                try_attach(prog, XdpMode::Generic).map(|id| (XdpMode::Generic, id))
            }
        },
    }
}

/// The interface's index, or None when it does not exist in this network namespace.
pub fn if_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    #[allow(unsafe_code)]
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interface's MAC address, from sysfs.
pub fn iface_mac(iface: &str) -> Result<[u8; 6]> {
    if if_index(iface).is_none() {
        bail!("unknown interface {iface:?}");
    }
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    crate::config::parse_mac(text.trim())
        .ok_or_else(|| anyhow!("interface {iface} has no Ethernet unicast address ({:?})", text.trim()))
}

/// Attaches the XDP_PASS program to `iface`: a native-XDP veth only delivers XDP_TX frames to
/// a peer that runs an XDP program. For test beds; a real NIC needs nothing of the kind.
/// The program stays attached while the returned object lives.
pub fn attach_pass_program(iface: &str) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::MAGLEV, 1)
        .load(EBPF_OBJECT)
        .context("cannot load the eBPF object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(program_names::PASS)
        .ok_or_else(|| anyhow!("program {} missing", program_names::PASS))?
        .try_into()?;
    prog.load()?;
    prog.attach(iface, AyaXdpMode::Driver).with_context(|| format!("cannot attach the pass program to {iface}"))?;
    Ok(ebpf)
}

// Pinning: hitless restarts and upgrades.
//
// `<pin dir>/<interface>/` (on bpffs) holds:
// - `link`: the XDP bpf_link. Pinned, it keeps the program attached without any process.
// - the state maps (FLOWS, the counters, NEW_FLOW_RATE...): the next agent reuses them as they
//   are, so connections keep their backend and counters keep counting.
// - the config maps of the running program (VIPS, SERVICES, MAGLEV, BACKENDS, SETTINGS,
//   TX_PORTS): a new agent fills fresh ones from its config (staged as `new-NAME`: bpffs
//   forbids dots in names) and swaps them in together with its program: packets see the old
//   program with the old tables or the new program with the new tables, never a half-written
//   table, even when the config changed.
// - symlinks, as bpffs holds no regular files: `owner` -> pid, `netns` -> the network
//   namespace (`net:[inode]`), `xdp_mode` -> `Native` | `Generic`.
// The running agent holds flock(LOCK_EX) on the directory: the kernel releases it however the
// process ends (kill -9 included), so a lock is never stale, and a second agent is refused.

/// Where the agent pins its data path by default; a directory per interface below it.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";

/// Written whole by every agent from its config and swapped in with its program.
const CONFIG_MAPS: [&str; 7] = [
    map_names::VIPS,
    map_names::SERVICES,
    map_names::MAGLEV,
    map_names::BACKENDS,
    map_names::BACKEND_WEIGHTS,
    map_names::SETTINGS,
    map_names::TX_PORTS,
];

/// Maps of the object the balancer does not use (the decap program's).
const UNUSED_MAPS: [&str; 2] = [map_names::DECAP_ADDRS, map_names::DECAP_STATS];

const LINK_PIN: &str = "link";
/// Prefix of the config maps staged for the next attach (bpffs forbids dots in names).
const STAGED: &str = "new-";
const OWNER: &str = "owner";
const NETNS: &str = "netns";
const XDP_MODE: &str = "xdp_mode";
const SYS_BPF: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Maps whose contents outlive an agent: every map of the balancer but the config maps and
/// global data (`.rodata`: the hash seed and the interface's MAC come from the new config).
fn is_state_map(name: &str) -> bool {
    !name.contains('.') && !CONFIG_MAPS.contains(&name) && !UNUSED_MAPS.contains(&name)
}

/// What must match for a pinned map to be reused by this build and config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    /// enum bpf_map_type.
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self { map_type, key_size, value_size, max_entries, flags } = self;
        write!(f, "type {map_type}, key {key_size} B, value {value_size} B, {max_entries} entries, flags {flags:#x}")
    }
}

impl Shape {
    fn of(info: &MapInfo) -> Self {
        Self {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }
}

#[rustfmt::skip]
fn map_data(map: &Map) -> &MapData {
    use Map::*;
    match map {
        Array(m) | ArrayOfMaps(m) | BloomFilter(m) | CgroupArray(m) | CgroupStorage(m) | CgrpStorage(m)
        | CpuMap(m) | DevMap(m) | DevMapHash(m) | HashMap(m) | HashOfMaps(m) | InodeStorage(m) | LpmTrie(m)
        | LruHashMap(m) | PerCpuArray(m) | PerCpuCgroupStorage(m) | PerCpuHashMap(m) | PerCpuLruHashMap(m)
        | PerfEventArray(m) | ProgramArray(m) | Queue(m) | ReusePortSockArray(m) | RingBuf(m) | SockHash(m)
        | SockMap(m) | SkStorage(m) | Stack(m) | StackTraceMap(m) | Unsupported(m) | XskMap(m) => m,
    }
}

/// The shapes this build's state maps have with `opts`: as the object declares them (its legacy
/// `maps` section), or else as the kernel creates them.
fn state_map_shapes(opts: &LoadOptions) -> Result<Vec<(String, Shape)>> {
    let Some(declared) = declared_maps(EBPF_OBJECT) else { return probe_state_maps(opts) };
    Ok(declared
        .into_iter()
        .filter(|(name, _)| is_state_map(name))
        .map(|(name, mut shape)| {
            if name == map_names::FLOWS {
                shape.max_entries = opts.flow_table_size.max(1);
            }
            (name, shape)
        })
        .collect())
}

/// The map definitions of an ELF64 little-endian BPF object's legacy `maps` section (what
/// aya-ebpf's `#[map]` emits: struct bpf_map_def, one symbol per map), or None.
fn declared_maps(elf: &[u8]) -> Option<Vec<(String, Shape)>> {
    let bytes = |at: usize, n: usize| elf.get(at..at.checked_add(n)?);
    let u16_at = |at: usize| Some(u16::from_le_bytes(bytes(at, 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(bytes(at, 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(bytes(at, 8)?.try_into().ok()?) as usize);
    let cstr = |at: usize| {
        let rest = elf.get(at..)?;
        std::str::from_utf8(&rest[..rest.iter().position(|&b| b == 0)?]).ok()
    };
    if bytes(0, 6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28)?, u16_at(0x3a)? as usize, u16_at(0x3c)?, u16_at(0x3e)?);
    let section = |i: u16| shoff.checked_add(usize::from(i) * shentsize);
    let (name_of, type_of, offset_of, size_in, link_of) = (
        |i: u16| u32_at(section(i)?),
        |i: u16| u32_at(section(i)? + 4),
        |i: u16| u64_at(section(i)? + 24),
        |i: u16| u64_at(section(i)? + 32),
        |i: u16| u32_at(section(i)? + 40),
    );
    let shstrtab = offset_of(shstrndx)?;
    let maps = (0..shnum).find(|&i| name_of(i).and_then(|n| cstr(shstrtab + n as usize)) == Some("maps"))?;
    const SHT_SYMTAB: u32 = 2;
    let symtab = (0..shnum).find(|&i| type_of(i) == Some(SHT_SYMTAB))?;
    let strtab = offset_of(u16::try_from(link_of(symtab)?).ok()?)?;
    let (maps_at, mut out) = (offset_of(maps)?, Vec::new());
    for sym in (0..size_in(symtab)? / 24).map(|k| offset_of(symtab).map(|o| o + 24 * k)) {
        let sym = sym?;
        if u16_at(sym + 6)? != maps || u64_at(sym + 16)? < 20 {
            continue;
        }
        let def = maps_at + u64_at(sym + 8)?;
        let shape = Shape {
            map_type: u32_at(def)?,
            key_size: u32_at(def + 4)?,
            value_size: u32_at(def + 8)?,
            max_entries: u32_at(def + 12)?,
            flags: u32_at(def + 16)?,
        };
        out.push((cstr(strtab + u32_at(sym)? as usize)?.to_string(), shape));
    }
    (!out.is_empty()).then_some(out)
}

/// The shapes this build's state maps have with `opts`, read from the kernel: the object is
/// loaded once more (maps only, no program; the config maps shrunk to one entry). Slower than
/// reading the object: only when it has no legacy `maps` section.
fn probe_state_maps(opts: &LoadOptions) -> Result<Vec<(String, Shape)>> {
    let mut loader = EbpfLoader::new();
    for name in CONFIG_MAPS.iter().chain(&UNUSED_MAPS).chain(&[map_names::FLOWS]) {
        loader.map_max_entries(name, 1);
    }
    let ebpf = loader
        .load(EBPF_OBJECT)
        .context("cannot load the eBPF object (are you root, with BPF enabled in the kernel?)")?;
    let mut shapes = Vec::new();
    for (name, map) in ebpf.maps().filter(|(name, _)| is_state_map(name)) {
        let mut shape = Shape::of(&map_data(map).info().with_context(|| format!("map {name}"))?);
        if name == map_names::FLOWS {
            shape.max_entries = opts.flow_table_size.max(1);
        }
        shapes.push((name.to_string(), shape));
    }
    Ok(shapes)
}

/// The pinned state of one interface, locked by this agent.
struct Pins {
    dir: PathBuf,
    /// Holds the directory's flock until the process ends.
    _lock: File,
    /// The pinned link a previous agent left attached, until attach takes it over.
    old_link: Option<PinnedLink>,
    /// The link this agent attached or took over.
    link: Option<FdLink>,
    adopted_link: bool,
    /// State maps found pinned and reused.
    adopted: Vec<String>,
    /// Pins this start-up created: removed again when it fails before attaching.
    created: Vec<PathBuf>,
    /// State maps that did not fit, staged like the config maps.
    replaced: Vec<String>,
    attached: bool,
    removed: bool,
}

impl Pins {
    fn open(root: &Path, iface: &str) -> Result<Self> {
        let ifindex = if_index(iface).ok_or_else(|| anyhow!("unknown interface {iface:?}"))?;
        ensure_bpffs(root)?;
        // bpffs forbids dots in names (eth0.100); interface names never hold a colon.
        let dir = root.join(iface.replace('.', ":"));
        let lock = lock_dir(&dir, iface)?;
        let mut pins = Self {
            dir,
            _lock: lock,
            old_link: None,
            link: None,
            adopted_link: false,
            adopted: Vec::new(),
            created: Vec::new(),
            replaced: Vec::new(),
            attached: false,
            removed: false,
        };
        let ours = std::fs::read_link("/proc/self/ns/net").context("cannot read /proc/self/ns/net")?;
        let link_path = pins.dir.join(LINK_PIN);
        let link_ifindex = match link_path.symlink_metadata() {
            Ok(_) => Some(pinned_link_ifindex(&link_path).with_context(|| format!("{}", link_path.display()))?),
            Err(_) => None,
        };
        match std::fs::read_link(pins.dir.join(NETNS)) {
            Ok(theirs) if theirs != ours => {
                if link_ifindex.is_some_and(|i| i != 0) {
                    bail!(
                        "{} holds the data path of an interface {iface} in another network namespace ({}, this is {}): \
                         give this agent its own --pin-dir",
                        pins.dir.display(),
                        theirs.display(),
                        ours.display()
                    );
                }
                warn!(
                    "{} was left by an agent in another network namespace ({}) and nothing of it is attached \
                     any more: starting afresh",
                    pins.dir.display(),
                    theirs.display()
                );
                pins.clear()?;
            }
            _ => {}
        }
        set_symlink(&pins.dir.join(OWNER), &std::process::id().to_string())?;
        set_symlink(&pins.dir.join(NETNS), &ours.to_string_lossy())?;
        // What a start-up that died before attaching left behind.
        for entry in std::fs::read_dir(&pins.dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(STAGED) {
                std::fs::remove_file(entry.path())?;
            }
        }
        match link_ifindex {
            Some(i) if i == ifindex => {
                pins.old_link = Some(
                    PinnedLink::from_pin(&link_path)
                        .with_context(|| format!("cannot open the pinned link {}", link_path.display()))?,
                );
            }
            Some(0) => {
                warn!("the pinned link {} is defunct (its interface was deleted): removing it", link_path.display());
                std::fs::remove_file(&link_path)?;
            }
            Some(other) => bail!(
                "the pinned link {} is attached to interface index {other}, not to {iface} (index {ifindex}): \
                 remove it by hand (this detaches its program) or give this agent another --pin-dir",
                link_path.display()
            ),
            None => {}
        }
        Ok(pins)
    }

    /// Removes every pin (and symlink) of the directory.
    fn clear(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Ok(())
    }

    /// Decides, map by map, between the pinned state map (same shape: reused) and a fresh one
    /// (none pinned, or another shape: flows.size changed, or an upgrade changed its layout; a
    /// fresh one replacing a pinned one is staged, and swapped in at attach like the config
    /// maps). Returns every state map's pin path for the loader.
    fn prepare_state_maps(&mut self, shapes: &[(String, Shape)]) -> Result<Vec<(String, PathBuf)>> {
        let mut paths = Vec::new();
        for (name, want) in shapes {
            let path = self.dir.join(name);
            let path = if path.symlink_metadata().is_err() {
                self.created.push(path.clone());
                path
            } else {
                match MapInfo::from_pin(&path).map(|info| Shape::of(&info)) {
                    Ok(have) if have == *want => {
                        self.adopted.push(name.clone());
                        path
                    }
                    have => {
                        warn!(
                            "pinned map {name} does not fit ({}; this agent needs {want}): an empty one replaces it",
                            match have {
                                Ok(have) => format!("it has {have}"),
                                Err(e) => format!("{e}"),
                            }
                        );
                        self.replaced.push(name.clone());
                        self.dir.join(format!("{STAGED}{name}"))
                    }
                }
            };
            paths.push((name.clone(), path));
        }
        Ok(paths)
    }

    fn pinned_mode(&self) -> Option<XdpMode> {
        match std::fs::read_link(self.dir.join(XDP_MODE)).ok()?.to_str()? {
            "Native" => Some(XdpMode::Native),
            "Generic" => Some(XdpMode::Generic),
            _ => None,
        }
    }

    /// After the program is attached or swapped: the staged config maps replace the pinned
    /// ones (rename(2) on bpffs: the old program's maps go once nothing holds them).
    fn commit(&mut self, mode: XdpMode) -> Result<()> {
        // From here on the attached program uses what was created: a failure below must not
        // remove it (the next agent adopts it).
        self.attached = true;
        self.created.clear();
        for name in CONFIG_MAPS.iter().copied().chain(self.replaced.iter().map(String::as_str)) {
            let staged = self.dir.join(format!("{STAGED}{name}"));
            let path = self.dir.join(name);
            std::fs::rename(&staged, &path)
                .with_context(|| format!("cannot rename {} to {}", staged.display(), path.display()))?;
        }
        set_symlink(&self.dir.join(XDP_MODE), &format!("{mode:?}"))
    }

    /// Clean exit: every pin goes, the directory too (and the root, when it is empty), and the
    /// link is dropped: the program is detached.
    fn remove_all(&mut self) -> Result<()> {
        self.clear()?;
        std::fs::remove_dir(&self.dir).with_context(|| format!("cannot remove {}", self.dir.display()))?;
        if let Some(root) = self.dir.parent() {
            let _ = std::fs::remove_dir(root);
        }
        self.removed = true;
        self.link = None;
        Ok(())
    }
}

impl Drop for Pins {
    /// A start-up that fails before attaching leaves the pins as it found them: what it created
    /// goes, what a previous agent left (and its program, still attached) stays.
    fn drop(&mut self) {
        if self.attached || self.removed {
            return;
        }
        for path in &self.created {
            let _ = std::fs::remove_file(path);
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(STAGED) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        // Nothing left but our symlinks: the directory goes too.
        let only_symlinks = std::fs::read_dir(&self.dir)
            .map(|entries| entries.flatten().all(|e| e.file_type().is_ok_and(|t| t.is_symlink())))
            .unwrap_or(false);
        if only_symlinks {
            let _ = self.clear();
            let _ = std::fs::remove_dir(&self.dir);
            if let Some(root) = self.dir.parent() {
                let _ = std::fs::remove_dir(root);
            }
        }
    }
}

/// Creates `dir` and takes its lock, or fails when another agent holds it.
fn lock_dir(dir: &Path, iface: &str) -> Result<File> {
    for _ in 0..3 {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the pin directory {}", dir.display()))?;
        let file = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let owner = std::fs::read_link(dir.join(OWNER))
                    .map_or_else(|_| "unknown pid".to_string(), |p| format!("pid {}", p.display()));
                bail!(
                    "another lb-agent ({owner}) is running on {iface}: its pin directory {} is locked. Stop it \
                     first (with --keep-on-exit for a hitless upgrade), or give this agent another --pin-dir",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", dir.display()));
            }
        }
        // The previous owner removes the directory on a clean exit: ours may be that one.
        if std::fs::metadata(dir).is_ok_and(|m| m.ino() == file.metadata().map_or(0, |f| f.ino())) {
            return Ok(file);
        }
    }
    bail!("the pin directory {} keeps being replaced", dir.display())
}

/// Replaces the symlink `path` with one to `target` (a value, not a path).
fn set_symlink(path: &Path, target: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink(target, path).with_context(|| format!("cannot create {}", path.display()))
}

/// `root` must be on bpffs. A pin directory under /sys/fs/bpf where nothing is mounted gets a
/// bpffs mounted there, as systemd does at boot. Under `ip netns exec`, which mounts a /sys
/// of its own, that bpffs belongs to the agent's private mount namespace and goes with it.
fn ensure_bpffs(root: &Path) -> Result<()> {
    if !root.is_absolute() {
        bail!("the pin directory {} must be an absolute path", root.display());
    }
    let existing = root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    let sys = Path::new(SYS_BPF);
    if root.starts_with(sys) && sys.is_dir() && !is_bpffs(sys)? {
        mount_bpffs(sys)?;
        warn!(
            "no bpf filesystem was mounted on {SYS_BPF}: mounted one. Pins live as long as this mount namespace \
             (under `ip netns exec`, only as long as this agent): for hitless restarts there, mount a bpffs in the \
             host's namespace and give its path as --pin-dir"
        );
        return Ok(());
    }
    bail!(
        "the pin directory {} is not on a bpf filesystem: mount one (mount -t bpf bpf DIR) and give a directory \
         in it as --pin-dir",
        root.display()
    )
}

fn c_path(path: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes()).with_context(|| format!("bad path {}", path.display()))
}

#[allow(unsafe_code)]
fn is_bpffs(path: &Path) -> Result<bool> {
    let c = c_path(path)?;
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", path.display()));
    }
    Ok(buf.f_type as u32 == BPF_FS_MAGIC)
}

#[allow(unsafe_code)]
fn mount_bpffs(path: &Path) -> Result<()> {
    let target = c_path(path)?;
    // SAFETY: mount(2) with NUL-terminated strings we own.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, c"mode=0700".as_ptr().cast()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot mount a bpf filesystem on {}", path.display()));
    }
    Ok(())
}

/// The interface index a pinned XDP link is attached to (0: defunct, its device is gone).
/// aya's LinkInfo does not expose it: BPF_OBJ_GET and BPF_OBJ_GET_INFO_BY_FD by hand.
#[allow(unsafe_code)]
fn pinned_link_ifindex(path: &Path) -> Result<u32> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let c = c_path(path)?;
    let get = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    // SAFETY: bpf(2) reads the attribute struct we own; the path outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &get, std::mem::size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_OBJ_GET");
    }
    // SAFETY: a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then a union (8-aligned) whose xdp member is
    // the ifindex, at byte 16.
    let mut info = [0u8; 256];
    let attr = InfoByFd { bpf_fd: fd.as_raw_fd() as u32, info_len: info.len() as u32, info: info.as_mut_ptr() as u64 };
    // SAFETY: the kernel writes at most info_len bytes into `info`, which outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr, std::mem::size_of::<InfoByFd>()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_OBJ_GET_INFO_BY_FD");
    }
    let word = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"));
    if word(0) != BPF_LINK_TYPE_XDP {
        bail!("pinned object is not an XDP link (link type {})", word(0));
    }
    Ok(word(16))
}

/// The `batch` member of `union bpf_attr` (aya 0.14 has no batch operations).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Runs one batch command on `map` over the `u32` keys and `V` values at `keys` and `values`
/// (`count` of each); returns the syscall's result and the count the kernel wrote back.
///
/// # Safety
/// `keys` and `values` must point to buffers of at least `count` elements, writable for a
/// lookup, that outlive the call; `out_batch` (if not 0) must point to a `u32`.
#[allow(unsafe_code)]
unsafe fn map_batch<V>(
    cmd: libc::c_long,
    map: &MapData,
    keys: *const u32,
    values: *const V,
    count: u32,
    out_batch: u64,
) -> Result<(libc::c_long, u32)> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let info = map.info()?;
    if info.key_size() != 4 || info.value_size() as usize != std::mem::size_of::<V>() {
        bail!("unexpected key or value size");
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch,
        keys: keys as u64,
        values: values as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the caller vouches for the buffers; key and value sizes were checked above.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &mut attr, std::mem::size_of::<BatchAttr>()) };
    Ok((rc, attr.count))
}

/// Every entry of an array map whose values are `V`, in one BPF_MAP_LOOKUP_BATCH:
/// (index, value).
#[allow(unsafe_code)]
fn array_lookup_all<V: aya::Pod + Default>(map: &MapData, max_entries: u32) -> Result<Vec<(u32, V)>> {
    let n = max_entries as usize;
    let mut keys = vec![0u32; n];
    let mut values = vec![V::default(); n];
    let mut token = 0u32;
    // SAFETY: both buffers hold `max_entries` elements and outlive the call; the batch token
    // (the key size) goes into `token`.
    let (rc, got) = unsafe {
        map_batch(
            BPF_MAP_LOOKUP_BATCH,
            map,
            keys.as_mut_ptr(),
            values.as_mut_ptr(),
            max_entries,
            &mut token as *mut u32 as u64,
        )?
    };
    let err = std::io::Error::last_os_error();
    // ENOENT: the batch reached the end of the map, which it always does here.
    if rc != 0 && err.raw_os_error() != Some(libc::ENOENT) {
        return Err(err).context("BPF_MAP_LOOKUP_BATCH");
    }
    Ok(keys.into_iter().zip(values).take((got as usize).min(n)).collect())
}

/// Writes `values` at indexes `base..` of an array map of `V`s in one BPF_MAP_UPDATE_BATCH.
#[allow(unsafe_code)]
fn array_update_all<V: aya::Pod>(map: &MapData, base: u32, values: &[V]) -> Result<()> {
    let count = u32::try_from(values.len())?;
    if u64::from(base) + u64::from(count) > u64::from(map.info()?.max_entries()) {
        bail!("writing {count} entries at {base} goes past the end of the map");
    }
    let keys: Vec<u32> = (base..base + count).collect();
    // SAFETY: `keys` and `values` hold `count` elements each and outlive the call.
    let (rc, _) = unsafe { map_batch(BPF_MAP_UPDATE_BATCH, map, keys.as_ptr(), values.as_ptr(), count, 0)? };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_MAP_UPDATE_BATCH");
    }
    Ok(())
}

/// The bytes of an [`Addr`] (the inverse of [`addr_v6`]).
fn words_octets(words: Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_declares_its_maps() {
        let maps = declared_maps(EBPF_OBJECT).expect("a legacy maps section");
        let shape = |name: &str| maps.iter().find(|(n, _)| n == name).map(|(_, s)| *s).expect(name);
        let flows = shape(map_names::FLOWS);
        assert_eq!((flows.key_size, flows.value_size), (40, 16));
        assert_eq!(flows.max_entries, limits::DEFAULT_FLOW_TABLE_SIZE);
        let reasons = shape(map_names::REASON_STATS);
        assert_eq!((reasons.key_size, reasons.value_size, reasons.max_entries), (4, 16, Reason::COUNT));
        for name in CONFIG_MAPS {
            shape(name);
        }
        assert!(!is_state_map(map_names::MAGLEV) && is_state_map(map_names::FLOWS));
    }

    /// The ELF reader agrees with the kernel (root only: it creates the maps).
    #[test]
    fn declared_shapes_are_what_the_kernel_creates() {
        #[allow(unsafe_code)]
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let opts =
            LoadOptions { hash_seed: 0, iface_mac: [2, 0, 0, 0, 0, 1], maglev_capacity: 1, flow_table_size: 4096 };
        let mut declared = state_map_shapes(&opts).unwrap();
        let mut probed = probe_state_maps(&opts).unwrap();
        declared.sort_by(|a, b| a.0.cmp(&b.0));
        probed.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(declared, probed);
        assert!(declared.iter().any(|(n, s)| n == map_names::FLOWS && s.max_entries == 4096));
    }
}
