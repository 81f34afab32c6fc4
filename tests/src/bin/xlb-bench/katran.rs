//! Katran's balancer beside xlb in the same run (`--katran OBJ`): the object that
//! `cargo xtask bench --katran-src DIR` builds from a Katran checkout, loaded with bpftool into a
//! bpffs directory of its own (removed on drop) and set up as its userspace would for this bed:
//! one IPv4 and one IPv6 VIP on the bench's IPIP port, the bed's three IPv4 / IPv6 IPIP backends
//! as reals, a 65,537-entry ring per VIP, the gateway's MAC, and CPU 0's LRU (Katran's per-core
//! LRU, no flags, as KatranLb::createLruMap makes it) as large as xlb's share of its flow table.
//! Katran forwards by IPIP / IP6IP6 only: its rows stand beside xlb's encapsulating ones.
//!
//! Its measurements go through the same harness and are checked by Katran's own counters (the
//! verdict's, the LRU's hits and misses), its output (the outer header towards one of its reals,
//! the pinned one for an established flow, the inner packet untouched) and its LRU (free slots:
//! every new flow is in it afterwards; over the rate: none is).
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::Xdp,
    Pod,
};
use aya_obj::programs::XdpAttachType;
use lb_agent::tables::maglev::{self, Member};
use xlb_tests::wire::Frame;

/// The name Katran's cases carry as their program.
pub const PROGRAM: &str = "katran balancer_ingress";
/// Katran's ring size (balancer_consts.h RING_SIZE).
const RING_SIZE: u32 = 65_537;
/// Katran's stats map: per-VIP entries first, then its global counters (balancer_consts.h).
const MAX_VIPS: u32 = 512;
const LRU_CNTRS: u32 = 0;
const LRU_MISS_CNTR: u32 = 1;
const NEW_CONN_RATE_CNTR: u32 = 2;
const XDP_TX_CNTR: u32 = 17;
const XDP_PASS_CNTR: u32 = 19;
/// real_definition.flags: the real is an IPv6 address.
const F_IPV6: u8 = 1;

/// struct vip_definition.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipDefinition {
    addr: [u32; 4],
    port: u16,
    proto: u8,
    _pad: u8,
}
/// struct real_definition.
#[repr(C)]
#[derive(Clone, Copy)]
struct RealDefinition {
    addr: [u32; 4],
    flags: u8,
    _pad: [u8; 3],
}
/// struct flow_key.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    src: [u32; 4],
    dst: [u32; 4],
    ports: u32,
    proto: u8,
    _pad: [u8; 3],
}
// SAFETY: #[repr(C)] structs of plain integers with explicit padding fields: every bit pattern
// is valid and there are no implicit padding bytes.
#[allow(unsafe_code)]
unsafe impl Pod for VipDefinition {}
#[allow(unsafe_code)]
unsafe impl Pod for RealDefinition {}
#[allow(unsafe_code)]
unsafe impl Pod for FlowKey {}

/// An address as Katran keys it: IPv4 in the first word, IPv6 in all four (network order).
fn words(addr: IpAddr) -> [u32; 4] {
    let bytes: [u8; 16] = match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    };
    std::array::from_fn(|i| u32::from_ne_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]))
}

/// Katran's flow key for a frame.
pub fn flow_key(f: &Frame) -> FlowKey {
    let [s0, s1] = f.sport.to_be_bytes();
    let [d0, d1] = f.dport.to_be_bytes();
    FlowKey {
        src: words(f.src),
        dst: words(f.dst),
        ports: u32::from_ne_bytes([s0, s1, d0, d1]),
        proto: f.proto,
        _pad: [0; 3],
    }
}

/// Katran's counters a measurement checks, summed over the CPUs: (v1, v2) of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub tx: u64,
    pub pass: u64,
    /// LRU_CNTRS: VIP packets (v1), LRU misses (v2).
    pub lru: (u64, u64),
    /// LRU_MISS_CNTR: misses of SYNs (v1), of other TCP packets (v2).
    pub lru_miss: (u64, u64),
}

pub struct Katran {
    dir: PathBuf,
    pub prog: Xdp,
    stats: PerCpuArray<MapData, [u64; 2]>,
    pub lru: BpfHashMap<MapData, FlowKey, [u64; 2]>,
    /// The reals by family: IPv4 first, then IPv6 (Katran's real ids 1..).
    reals: Vec<IpAddr>,
    gw_mac: [u8; 6],
}

impl Drop for Katran {
    fn drop(&mut self) {
        // Unpinning is what unloads it: the bench holds the last other references.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bpftool(args: &[&str]) -> Result<()> {
    let out = Command::new("bpftool").args(args).output().context("cannot run bpftool (cargo xtask setup)")?;
    ensure!(out.status.success(), "bpftool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

fn pinned_map(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join("maps").join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("Katran's map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl Katran {
    /// Loads `object` and sets it up: `vips` are (address, port) pairs, each with its reals;
    /// CPU 0's LRU gets `lru_entries` entries.
    pub fn load(object: &Path, lru_entries: u32, gw_mac: [u8; 6], vips: &[(IpAddr, u16, Vec<IpAddr>)]) -> Result<Self> {
        ensure!(
            object.is_file(),
            "no Katran object at {} (cargo xtask bench --katran-src DIR builds it)",
            object.display()
        );
        let dir = PathBuf::from(format!("/sys/fs/bpf/xlb-bench-katran-{}", std::process::id()));
        // A fresh machine may have no bpffs there yet: the agent's own check mounts one.
        lb_agent::dataplane::ensure_bpffs(&dir)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Self::setup(dir.clone(), object, lru_entries, gw_mac, vips).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })
    }

    fn setup(
        dir: PathBuf,
        object: &Path,
        lru_entries: u32,
        gw_mac: [u8; 6],
        vips: &[(IpAddr, u16, Vec<IpAddr>)],
    ) -> Result<Self> {
        let (dir_s, object_s) = (dir.to_string_lossy().into_owned(), object.to_string_lossy());
        let (progs, maps, lru0) = (format!("{dir_s}/prog"), format!("{dir_s}/maps"), format!("{dir_s}/lru0"));
        bpftool(&["prog", "loadall", &object_s, &progs, "type", "xdp", "pinmaps", &maps])?;
        // Katran's per-core LRU: key struct flow_key (40 bytes), value struct real_pos_lru (16).
        let entries = lru_entries.to_string();
        bpftool(&[
            "map",
            "create",
            &lru0,
            "type",
            "lru_hash",
            "key",
            "40",
            "value",
            "16",
            "entries",
            &entries,
            "name",
            "katran_lru0",
        ])?;
        bpftool(&[
            "map",
            "update",
            "pinned",
            &format!("{maps}/lru_mapping"),
            "key",
            "0",
            "0",
            "0",
            "0",
            "value",
            "pinned",
            &lru0,
        ])?;
        let prog = Xdp::from_pin(format!("{progs}/balancer_ingress"), XdpAttachType::Interface)
            .context("Katran's program balancer_ingress")?;

        let mut ctl: Array<MapData, u64> = Array::try_from(pinned_map(&dir, "ctl_array")?)?;
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&gw_mac);
        ctl.set(0, u64::from_ne_bytes(mac), 0)?;

        let mut vip_map: BpfHashMap<MapData, VipDefinition, [u32; 2]> =
            BpfHashMap::try_from(pinned_map(&dir, "vip_map")?)?;
        let mut reals_map: Array<MapData, RealDefinition> = Array::try_from(pinned_map(&dir, "reals")?)?;
        let mut rings: Array<MapData, u32> = Array::try_from(pinned_map(&dir, "ch_rings")?)?;
        let mut reals = Vec::new();
        for (vip_num, (vip, port, members)) in vips.iter().enumerate() {
            let key = VipDefinition { addr: words(*vip), port: port.to_be(), proto: 6, _pad: 0 };
            vip_map.insert(key, [0, vip_num as u32], 0)?;
            let mut ids = Vec::new();
            for &real in members {
                reals.push(real);
                let id = reals.len() as u32;
                let flags = if real.is_ipv6() { F_IPV6 } else { 0 };
                reals_map.set(id, RealDefinition { addr: words(real), flags, _pad: [0; 3] }, 0)?;
                ids.push(Member { id, key: maglev::address_key(real), weight: 1 });
            }
            // The ring as Katran's userspace builds it: Maglev over the reals.
            for (i, id) in maglev::build(&ids, RING_SIZE).into_iter().enumerate() {
                rings.set(vip_num as u32 * RING_SIZE + i as u32, id, 0)?;
            }
        }
        let stats = PerCpuArray::try_from(pinned_map(&dir, "stats")?)?;
        let lru = BpfHashMap::try_from(Map::from_map_data(MapData::from_pin(&lru0)?)?)?;
        Ok(Self { dir, prog, stats, lru, reals, gw_mac })
    }

    /// Katran's counters, summed over the CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let sum = |index: u32| -> Result<(u64, u64)> {
            let values = self.stats.get(&(MAX_VIPS + index), 0)?;
            Ok(values.iter().fold((0, 0), |(a, b), v| (a + v[0], b + v[1])))
        };
        Ok(Counters {
            tx: sum(XDP_TX_CNTR)?.0,
            pass: sum(XDP_PASS_CNTR)?.0,
            lru: sum(LRU_CNTRS)?,
            lru_miss: sum(LRU_MISS_CNTR)?,
        })
    }

    /// Puts every CPU's new-connection window over Katran's flood threshold (or back to an
    /// empty window): `now` is CLOCK_MONOTONIC, Katran's clock.
    pub fn set_flood(&mut self, flood: bool, now: u64, cpus: u32) -> Result<()> {
        let window = if flood { [u64::MAX / 2, now] } else { [0, 0] };
        self.stats.set(MAX_VIPS + NEW_CONN_RATE_CNTR, PerCpuValues::try_from(vec![window; cpus as usize])?, 0)?;
        Ok(())
    }

    /// Empties CPU 0's LRU; returns how many entries it held.
    pub fn clear_lru(&mut self) -> Result<usize> {
        let keys = self.lru.keys().collect::<Result<Vec<_>, _>>()?;
        for k in &keys {
            let _ = self.lru.remove(k);
        }
        Ok(keys.len())
    }

    /// The real an output frame of Katran's goes to, after checking the frame: `input`
    /// encapsulated (IPIP for IPv4, IP6IP6 for IPv6) towards one of Katran's reals, the
    /// gateway's MAC as destination, the input's destination MAC as source.
    pub fn real_of(&self, input: &[u8], out: &[u8]) -> Result<IpAddr> {
        let v6 = input[12..14] == [0x86, 0xdd];
        let outer = if v6 { 40 } else { 20 };
        ensure!(out.len() == input.len() + outer, "Katran's output is {} bytes for {} in", out.len(), input.len());
        ensure!(out[..6] == self.gw_mac && out[6..12] == input[..6], "Katran's output MACs {:02x?}", &out[..12]);
        ensure!(out[12..14] == input[12..14], "Katran's outer EtherType {:02x?}", &out[12..14]);
        ensure!(out[14 + outer..] == input[14..], "Katran's inner packet differs from the input");
        let real: IpAddr = if v6 {
            ensure!(out[14 + 6] == 41, "Katran's outer next header {}", out[14 + 6]);
            <[u8; 16]>::try_from(&out[14 + 24..14 + 40])?.into()
        } else {
            ensure!(out[14 + 9] == 4, "Katran's outer protocol {}", out[14 + 9]);
            <[u8; 4]>::try_from(&out[14 + 16..14 + 20])?.into()
        };
        if !self.reals.contains(&real) {
            bail!("Katran sent the packet to {real}, not one of its reals");
        }
        Ok(real)
    }
}
