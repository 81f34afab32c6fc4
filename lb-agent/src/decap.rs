//! The backend side of L3 DSR: a facade over the `xlb_decap` program, which strips the outer
//! IPv4/IPv6 header of IPIP/IP6IP6 packets sent to this host's addresses (the kernel here has no
//! tunnel device to do it), fed with the host's addresses (`net::addr`).
use std::net::IpAddr;

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::Xdp,
    Ebpf,
};
use lb_common::{limits::MAX_DECAP_ADDRS, map_names, program_names, reason::DecapReason, Counters, VipKey};

use crate::{
    config::XdpMode,
    dataplane::{
        attach_xdp, map_addr,
        object::{load_object, take_map, xdp_program, BALANCER_ONLY_MAPS},
        sum,
    },
};

/// The loaded decapsulating program and its maps. Detached when dropped.
pub struct Decap {
    ebpf: Ebpf,
    addrs: HashMap<MapData, VipKey, u32>,
    stats: PerCpuArray<MapData, Counters>,
}

impl Decap {
    /// Loads the eBPF object and the decap program (verifier included); attaches nothing and
    /// accepts no address yet. The object's balancer maps are created too, at their smallest.
    pub fn load() -> Result<Self> {
        let mut ebpf = load_object(&BALANCER_ONLY_MAPS)?;
        xdp_program(&mut ebpf, program_names::DECAP)?;
        Ok(Self {
            addrs: take_map(&mut ebpf, map_names::DECAP_ADDRS)?,
            stats: take_map(&mut ebpf, map_names::DECAP_STATS)?,
            ebpf,
        })
    }

    /// Accepts encapsulated packets whose outer destination is `addr`: the address the
    /// balancers know this backend by. Takes effect at once, attached or not. Fails when
    /// `MAX_DECAP_ADDRS` addresses are already accepted.
    pub fn add_address(&mut self, addr: IpAddr) -> Result<()> {
        let (addr_words, family) = map_addr(addr);
        self.addrs
            .insert(VipKey { addr: addr_words, family, _pad: [0; 3] }, 1, 0)
            .with_context(|| format!("cannot accept {addr} (at most {MAX_DECAP_ADDRS} addresses per host)"))
    }

    /// The decap program, e.g. for BPF_PROG_TEST_RUN.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(program_names::DECAP).expect("loaded in Decap::load").try_into().expect("an XDP program")
    }

    /// Attaches the program to `iface`, as [`crate::dataplane::Dataplane::attach`] does: `None`
    /// tries native mode and falls back to generic with a warning. Returns the mode in use.
    pub fn attach(&mut self, iface: &str, mode: Option<XdpMode>) -> Result<XdpMode> {
        attach_xdp(self.program(), iface, mode)
    }

    /// Frames and bytes (as received) per reason, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(DecapReason, Counters)>> {
        DecapReason::ALL.iter().map(|&r| Ok((r, sum(&self.stats.get(&(r as u32), 0)?)))).collect()
    }
}
