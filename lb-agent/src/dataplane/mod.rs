//! A typed facade over the eBPF object and its maps: load, attach, add services and backends,
//! publish tables, read counters. The agent, the metrics and the tests all go through it;
//! nothing outside this folder touches a map.
//!
//! - `object`: the embedded eBPF object and the shapes of its maps;
//! - `ids`: who owns which service id, backend slot (and its generation) and MAGLEV range;
//! - `pins`: pinning under bpffs, adoption of a previous agent's data path, takeover;
//! - `attach`: attaching programs to interfaces;
//! - `flow_tables`: the per-CPU flow tables behind FLOWS;
//! - `flows`: the one walker of the flow tables (occupancy, active-flow reconciliation).
mod attach;
mod flow_tables;
pub mod flows;
pub mod ids;
pub mod object;
mod pins;
mod services;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, MapInfo, PerCpuArray},
    programs::{links::FdLink, xdp::XdpLink, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{
    addr_octets, addr_v4, addr_v6, global_names, limits, map_names, program_names, Addr, Backend, Counters, FlowEvent,
    Reason, Service, ServiceBucket, ServiceKey, Settings, Vip, VipKey, BACKEND_F_VALID, FAMILY_V4, FAMILY_V6,
    FORWARD_IPIP, FORWARD_L2, NO_BACKEND, SCHED_MAGLEV,
};
use log::{info, warn};

use self::{
    attach::attach_xdp_link,
    flows::FlowTableState,
    ids::TableSpace,
    object::{take_map, CONFIG_MAPS},
    pins::{Pins, LINK_PIN, STAGED},
};
pub use self::{
    attach::{attach_forwarder, attach_pass_program, attach_xdp},
    flows::{FlowWalker, Walk, FLOW_WALK_PERIOD},
    ids::{BackendId, IdPool, ServiceId},
    object::EBPF_OBJECT,
    pins::{ensure_bpffs, DEFAULT_PIN_DIR},
};
use crate::{
    config::{Forward, XdpMode},
    sys::{array_lookup_all, array_update_all},
};

/// The data path's id of a forwarding mode: decoded in the data path, encoded here only.
fn forward_id(forward: Forward) -> u8 {
    match forward {
        Forward::L2 => FORWARD_L2,
        Forward::Ipip => FORWARD_IPIP,
    }
}

/// An address as the maps hold it: its words and its family.
pub fn map_addr(addr: IpAddr) -> (Addr, u8) {
    match addr {
        IpAddr::V4(a) => (addr_v4(a.octets()), FAMILY_V4),
        IpAddr::V6(a) => (addr_v6(a.octets()), FAMILY_V6),
    }
}

/// The address a map holds as its words and family.
fn ip_of(addr: Addr, family: u8) -> IpAddr {
    let octets = addr_octets(addr);
    match family {
        FAMILY_V6 => IpAddr::from(octets),
        _ => IpAddr::from([octets[0], octets[1], octets[2], octets[3]]),
    }
}

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
    /// What the next table is written with: forwarding, scheduler, affinity timeout.
    pub forward: u8,
    pub scheduler: u8,
    pub affinity_timeout_secs: u16,
    bases: [u32; 2],
    active: usize,
    /// Entries of the active table (rr/wrr tables may use fewer than `table_size`).
    active_size: u32,
}

impl ServiceSlot {
    /// Where the service's two tables lie in MAGLEV: (first entry, entries).
    fn tables_range(&self) -> (u32, u32) {
        (self.bases[0].min(self.bases[1]), 2 * self.table_size)
    }

    /// Changes how the service forwards; written with its next table.
    pub fn set_forward(&mut self, forward: Forward) {
        self.forward = forward_id(forward);
    }

    /// Changes the service's scheduler (`lb_common::SCHED_*`); written with its next table.
    pub fn set_scheduler(&mut self, scheduler: u8) {
        self.scheduler = scheduler;
    }

    /// Sets the affinity timeout of a source-hash service (seconds, at most
    /// `lb_common::MAX_AFFINITY_TIMEOUT_SECS`; 0: off): new flows of a client go to its pinned
    /// backend (`SOURCE_AFFINITY`) while it comes back within it. Written with its next table.
    pub fn set_affinity_timeout(&mut self, secs: u32) {
        self.affinity_timeout_secs = u16::try_from(secs).unwrap_or(u16::MAX);
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, Vip>,
    vip_bits: Array<MapData, u64>,
    services: Array<MapData, ServiceBucket>,
    /// What SERVICES holds, bucket by bucket.
    service_table: services::ServiceTable,
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
    /// The settings last written, with the route generation in force.
    current: Settings,
    /// Service ids, backend slots and their generations.
    ids: IdPool,
    /// MAGLEV's entries, carved into the services' tables.
    tables: TableSpace,
    /// Shared with the flow-table walker.
    flow_state: Arc<FlowTableState>,
    /// Pinned under a directory of bpffs (the agent), or not at all (tests, benchmarks).
    /// Declared last: dropped after the program, and its link last.
    pins: Option<Pins>,
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
        let cpus = flow_tables::possible_cpus()?;
        let shapes = object::state_map_shapes(cpus)?;
        let state = pins.prepare_state_maps(&shapes, flow_tables::per_cpu_entries(opts.flow_table_size, cpus))?;
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
        let cpus = flow_tables::possible_cpus()?;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(global_names::HASH_SEED, &seed, true)
            .override_global(global_names::IFACE_MAC, &mac, true)
            .map_max_entries(map_names::MAGLEV, opts.maglev_capacity.max(1))
            .map_max_entries(map_names::FLOWS, cpus);
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
        object::xdp_program(&mut ebpf, program_names::BALANCER)?;
        let Some(aya::maps::Map::ArrayOfMaps(flows)) = ebpf.map(map_names::FLOWS) else {
            bail!("map {} missing from the eBPF object", map_names::FLOWS);
        };
        flow_tables::fill(flows, flow_tables::per_cpu_entries(opts.flow_table_size, cpus))?;
        Ok(Self {
            vips: take_map(&mut ebpf, map_names::VIPS)?,
            vip_bits: take_map(&mut ebpf, map_names::VIP_BITS)?,
            services: take_map(&mut ebpf, map_names::SERVICES)?,
            service_table: services::ServiceTable::new(),
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
            // NEXT_HOPS is new with every program (a config map): the generation can start at
            // 0, and then counts the changes.
            current: Settings { flow_tables: cpus, ..Settings::default() },
            ids: IdPool::default(),
            tables: TableSpace::new(opts.maglev_capacity),
            flow_state: FlowTableState::new(),
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
            self.ids.adopt(id, b.generation, ip_of(b.addr, b.family));
            self.backends.set(id, Backend { flags: 0, ..b }, 0).context("cannot write a backend slot")?;
            seeded += 1;
        }
        Ok(seeded)
    }

    /// The directory the data path is pinned under, when it is.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.dir.as_path())
    }

    /// Whether a previous agent left its program attached: [`Dataplane::attach`] will take
    /// it over.
    pub fn takes_over(&self) -> bool {
        self.pins.as_ref().is_some_and(|p| p.old_link.is_some())
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
        object::xdp_program(&mut self.ebpf, name)
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
        let Some(base) = u32::try_from(needed).ok().and_then(|n| self.tables.allocate(n)) else {
            bail!(
                "MAGLEV map full: {} of {} entries free, the service needs {needed} in one range; raise \
                 maglev_capacity",
                self.tables.available(),
                self.tables.capacity()
            );
        };
        let bases = [base, base + table_size];
        let (addr, family) = map_addr(vip);
        let key = ServiceKey { addr, port: port.to_be(), proto, family };
        let mut slot = ServiceSlot {
            key,
            id,
            table_size,
            forward: forward_id(forward),
            scheduler: SCHED_MAGLEV,
            affinity_timeout_secs: 0,
            bases,
            active: 0,
            active_size: table_size,
        };
        let written = self.write_table(slot.bases[0], &vec![NO_BACKEND; table_size as usize]);
        if let Err(e) = written.and_then(|()| self.flip(&mut slot, 0)) {
            let (start, len) = slot.tables_range();
            self.tables.release(start, len);
            return Err(e);
        }
        let vip_key = VipKey { addr, family, _pad: [0; 3] };
        let services = self.vips.get(&vip_key, 0).map_or(0, |v| v.services);
        if services == 0 {
            self.set_vip_bit(&addr, true).with_context(|| format!("cannot add VIP {vip}"))?;
        }
        self.vips
            .insert(vip_key, Vip { services: services + 1 }, 0)
            .with_context(|| format!("cannot add VIP {vip}"))?;
        Ok(slot)
    }

    /// Whether services with tables of these sizes could all be added once the services of
    /// `removed` are gone.
    pub fn tables_fit(&self, removed: &[&ServiceSlot], table_sizes: &[u32]) -> bool {
        let lengths: Option<Vec<u32>> = table_sizes.iter().map(|&n| n.checked_mul(2)).collect();
        lengths.is_some_and(|l| self.space_after(removed).fits(&l))
    }

    /// MAGLEV entries free once the services of `removed` are gone.
    pub fn tables_available(&self, removed: &[&ServiceSlot]) -> u64 {
        self.space_after(removed).available()
    }

    fn space_after(&self, removed: &[&ServiceSlot]) -> TableSpace {
        let mut space = self.tables.clone();
        for slot in removed {
            let (start, len) = slot.tables_range();
            space.release(start, len);
        }
        space
    }

    /// Removes a service: its packets become `drop_unknown_service` (or pass, when it was the
    /// VIP's last service). Its two tables go back to MAGLEV's free space.
    pub fn remove_service(&mut self, slot: &ServiceSlot) -> Result<()> {
        let writes = self.service_table.remove(&slot.key);
        self.write_services(writes).context("cannot remove the service")?;
        let (start, len) = slot.tables_range();
        self.tables.release(start, len);
        let vip_key = VipKey { addr: slot.key.addr, family: slot.key.family, _pad: [0; 3] };
        match self.vips.get(&vip_key, 0).map_or(0, |v| v.services) {
            0 | 1 => {
                self.vips.remove(&vip_key).context("cannot remove the VIP")?;
                // The bit stays while another VIP folds to it.
                let bit = lb_common::vip_bit(&vip_key.addr);
                let shared = self.vips.keys().filter_map(Result::ok).any(|k| lb_common::vip_bit(&k.addr) == bit);
                if !shared {
                    self.set_vip_bit(&vip_key.addr, false).context("cannot remove the VIP")?;
                }
            }
            n => self.vips.insert(vip_key, Vip { services: n - 1 }, 0).context("cannot update the VIP")?,
        }
        Ok(())
    }

    /// Sets or clears the VIP_BITS bit of `addr`.
    fn set_vip_bit(&mut self, addr: &lb_common::Addr, on: bool) -> Result<()> {
        let bit = lb_common::vip_bit(addr);
        let word = self.vip_bits.get(&(bit >> 6), 0).context("cannot read VIP_BITS")?;
        let mask = 1u64 << (bit & 63);
        let word = if on { word | mask } else { word & !mask };
        self.vip_bits.set(bit >> 6, word, 0).context("cannot write VIP_BITS")
    }

    /// Writes a backend's slot. `usable` false keeps the slot but makes the data path re-hash
    /// the flows pinned to it (a dead or removed backend); a draining backend stays usable and
    /// simply leaves the Maglev table. A slot that gets another address gets a new generation,
    /// so flows pinned to its former owner never follow it. `mac` is needed for L2 DSR only.
    pub fn set_backend(&mut self, id: u32, addr: IpAddr, mac: Option<[u8; 6]>, usable: bool) -> Result<()> {
        let generation = self.ids.generation(id, addr);
        let (words, family) = map_addr(addr);
        let backend = Backend {
            addr: words,
            mac: lb_common::mac_words(mac.unwrap_or_default()),
            flags: if usable { BACKEND_F_VALID } else { 0 },
            family,
            generation,
        };
        self.backends.set(id, backend, 0).with_context(|| format!("cannot write backend {id} ({addr})"))?;
        self.flow_state.backend_id_limit.fetch_max(id.saturating_add(1), Ordering::Relaxed);
        Ok(())
    }

    /// Writes a backend's weight, which wlc divides its active flows by.
    pub fn set_backend_weight(&mut self, id: u32, weight: u32) -> Result<()> {
        self.backend_weights.set(id, weight, 0).with_context(|| format!("cannot write the weight of backend {id}"))
    }

    /// Service ids and backend slots: the one place they are handed out.
    pub fn ids(&mut self) -> &mut IdPool {
        &mut self.ids
    }

    /// The active flows of a backend as the data path counts them (flows pinned to it and not
    /// closed; reconciled with the flow table by the [`FlowWalker`]).
    pub fn active_flows(&self, id: u32) -> Result<u64> {
        Ok(self.active_flows.get(&id, 0)?)
    }

    /// Overwrites a backend's active-flow count (what drift, or a racing reconciliation, does).
    pub fn set_active_flows(&mut self, id: u32, count: u64) -> Result<()> {
        self.active_flows.set(id, count, 0).with_context(|| format!("cannot write the active flows of backend {id}"))
    }

    /// The walker of the flow table, to run off the main loop ([`FlowWalker::spawn`]).
    pub fn flow_walker(&self) -> Result<FlowWalker> {
        use aya::maps::IterableMap as _;
        Ok(FlowWalker {
            flows: self.flows()?.info()?.id(),
            backends: self.backends.map().info()?.id(),
            active_flows: self.active_flows.map().info()?.id(),
            state: self.flow_state.clone(),
        })
    }

    /// Entries in the flow table at the walker's last walk; None before the first.
    pub fn flow_table_entries(&self) -> Option<u64> {
        self.flow_state.entries()
    }

    /// Replaces the run-time settings (flow expiry, new-flow rate, encapsulation sources); the
    /// route generation and the flow tables stay the data path's own
    /// ([`Dataplane::routes_changed`], [`Dataplane::load`]).
    pub fn set_settings(&mut self, settings: Settings) -> Result<()> {
        let Settings { route_generation, flow_tables, .. } = self.current;
        let settings = Settings { route_generation, flow_tables, ..settings };
        self.settings.set(0, settings, 0).context("cannot write the settings")?;
        self.current = settings;
        Ok(())
    }

    /// Routes, neighbours, addresses or links changed: every CPU's cached next hops are stale
    /// from here on, and the next packet to each encapsulating backend asks the FIB again.
    pub fn routes_changed(&mut self) -> Result<()> {
        let next = Settings { route_generation: self.current.route_generation.wrapping_add(1), ..self.current };
        self.settings.set(0, next, 0).context("cannot write the settings (route generation)")?;
        self.current = next;
        Ok(())
    }

    /// How many times [`Dataplane::routes_changed`] moved the route generation (modulo 2^32: a
    /// counter reset for a scraper).
    pub fn route_changes(&self) -> u64 {
        u64::from(self.current.route_generation)
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

    /// Writes SERVICES buckets in the order the service table gave them.
    fn write_services(&mut self, writes: services::Writes) -> Result<()> {
        for (b, bucket) in writes {
            self.services.set(b, bucket, 0)?;
        }
        Ok(())
    }

    fn flip(&mut self, slot: &mut ServiceSlot, to: usize) -> Result<()> {
        let service = Service {
            id: slot.id,
            table_base: slot.bases[to],
            table_size: slot.active_size,
            forward: slot.forward,
            scheduler: slot.scheduler,
            affinity_timeout_secs: slot.affinity_timeout_secs,
        };
        let writes = self.service_table.put(slot.key, service)?;
        self.write_services(writes).context("cannot write the service")?;
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

    /// The flow tables' capacity: every CPU's share of it together.
    pub fn flow_table_size(&self) -> Result<u32> {
        let mut size = 0u32;
        for table in self.flow_tables()? {
            size = size.saturating_add(table.info()?.max_entries());
        }
        Ok(size)
    }

    /// Each possible CPU's flow table, by CPU id (opened afresh: new descriptors).
    pub fn flow_tables(&self) -> Result<Vec<MapData>> {
        flow_tables::tables(self.flows()?)
    }

    fn flows(&self) -> Result<&MapData> {
        let Some(aya::maps::Map::ArrayOfMaps(data)) = self.ebpf.map(map_names::FLOWS) else {
            bail!("map {} missing from the eBPF object", map_names::FLOWS);
        };
        Ok(data)
    }

    /// New flows, SYN retransmissions and handshakes of a backend, summed over CPUs (since
    /// load).
    pub fn backend_flows(&self, id: u32) -> Result<lb_common::BackendFlows> {
        let values = self.backend_flows.get(&id, 0)?;
        Ok(values.iter().fold(lb_common::BackendFlows::default(), |a, c| lb_common::BackendFlows {
            new_flows: a.new_flows + c.new_flows,
            syn_retransmits: a.syn_retransmits + c.syn_retransmits,
            syn_pinned: a.syn_pinned + c.syn_pinned,
            established: a.established + c.established,
        }))
    }
}
