//! A typed facade over the eBPF object and its maps: load, attach, add services and backends,
//! publish Maglev tables, read counters. The CLI, the health loop and the tests all go through
//! it; nothing else touches a map.
use std::net::IpAddr;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode as AyaXdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    addr_v4, addr_v6, global_names, limits, map_names, program_names, Addr, Backend, Counters, FlowEvent, Reason,
    Service, ServiceKey, Settings, Vip, VipKey, BACKEND_F_VALID, FAMILY_V4, FAMILY_V6, NO_BACKEND, SERVICE_F_IPIP,
};
use log::warn;

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
    pub table_size: u32,
    pub flags: u32,
    bases: [u32; 2],
    active: usize,
}

impl ServiceSlot {
    /// Changes how the service forwards; written with its next table.
    pub fn set_forward(&mut self, forward: Forward) {
        self.flags = forward_flags(forward);
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
    tx_ports: aya::maps::DevMapHash<MapData>,
    /// Generation and address last written to each backend slot.
    slots: std::collections::HashMap<u32, (u32, IpAddr)>,
    maglev_capacity: u32,
    /// First unused MAGLEV entry: tables are carved out in order and never moved.
    maglev_next: u32,
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
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let seed = opts.hash_seed;
        let mac = lb_common::mac_words(opts.iface_mac);
        let mut ebpf = EbpfLoader::new()
            .override_global(global_names::HASH_SEED, &seed, true)
            .override_global(global_names::IFACE_MAC, &mac, true)
            .map_max_entries(map_names::MAGLEV, opts.maglev_capacity.max(1))
            .map_max_entries(map_names::FLOWS, opts.flow_table_size.max(1))
            .load(EBPF_OBJECT)
            .context("cannot load the eBPF object (are you root, with BPF enabled in the kernel?)")?;
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
            tx_ports: take_map(&mut ebpf, map_names::TX_PORTS)?,
            slots: std::collections::HashMap::new(),
            maglev_capacity: opts.maglev_capacity,
            maglev_next: 0,
            ebpf,
        })
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
    /// with a warning. Returns the mode in use. Detached when the Dataplane is dropped.
    pub fn attach(&mut self, iface: &str, mode: Option<XdpMode>) -> Result<XdpMode> {
        attach_xdp(self.balancer(), iface, mode)
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
        let mut slot = ServiceSlot { key, id, table_size, flags: forward_flags(forward), bases, active: 0 };
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
        self.backends.set(id, backend, 0).with_context(|| format!("cannot write backend {id} ({addr})"))
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
    /// to it, so the data path sees the old table or the new one, never a mix.
    pub fn publish_table(&mut self, slot: &mut ServiceSlot, entries: &[u32]) -> Result<()> {
        if entries.len() != slot.table_size as usize {
            bail!("table has {} entries, the service expects {}", entries.len(), slot.table_size);
        }
        let next = 1 - slot.active;
        self.write_table(slot.bases[next], entries)?;
        self.flip(slot, next)
    }

    fn write_table(&mut self, base: u32, entries: &[u32]) -> Result<()> {
        for (i, &backend) in entries.iter().enumerate() {
            self.maglev.set(base + i as u32, backend, 0).context("cannot write the Maglev table")?;
        }
        Ok(())
    }

    fn flip(&mut self, slot: &mut ServiceSlot, to: usize) -> Result<()> {
        let service =
            Service { id: slot.id, flags: slot.flags, table_base: slot.bases[to], table_size: slot.table_size };
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

    /// New flows and SYN retransmissions of a backend, summed over CPUs (since load).
    pub fn backend_flows(&self, id: u32) -> Result<lb_common::BackendFlows> {
        let values = self.backend_flows.get(&id, 0)?;
        Ok(values.iter().fold(lb_common::BackendFlows::default(), |a, c| lb_common::BackendFlows {
            new_flows: a.new_flows + c.new_flows,
            syn_retransmits: a.syn_retransmits + c.syn_retransmits,
        }))
    }
}

/// Attaches a loaded XDP program to `iface`. `None` tries native mode and falls back to
/// generic with a warning. Returns the mode in use. Detached when the program is dropped.
pub fn attach_xdp(prog: &mut Xdp, iface: &str, mode: Option<XdpMode>) -> Result<XdpMode> {
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
        Some(mode) => try_attach(prog, mode).map(|_| mode),
        None => match try_attach(prog, XdpMode::Native) {
            Ok(_) => Ok(XdpMode::Native),
            Err(e) => {
                warn!("{e:#}; falling back to generic mode (slower: runs after the skb is built)");
                try_attach(prog, XdpMode::Generic).map(|_| XdpMode::Generic)
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
