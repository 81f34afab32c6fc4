//! The backend side of L3 DSR: a facade over the `xlb_decap` program, which strips the outer
//! IPv4/IPv6 header of IPIP/IP6IP6 packets sent to this host's addresses (the kernel here has no
//! tunnel device to do it), and the interface-address lookup that feeds it.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use lb_common::{limits::MAX_DECAP_ADDRS, map_names, program_names, reason::DecapReason, Counters, VipKey};

use crate::{
    config::XdpMode,
    dataplane::{attach_xdp, if_index, map_addr, sum, take_map, EBPF_OBJECT},
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
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::MAGLEV, 1)
            .map_max_entries(map_names::FLOWS, 1)
            .load(EBPF_OBJECT)
            .context("cannot load the eBPF object (are you root, with BPF enabled in the kernel?)")?;
        let prog: &mut Xdp = ebpf
            .program_mut(program_names::DECAP)
            .ok_or_else(|| anyhow!("program {} missing", program_names::DECAP))?
            .try_into()?;
        prog.load().context("the kernel rejected the decap program")?;
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

/// Every IPv4 and IPv6 address on `iface` except IPv6 link-local ones (fe80::/10), which no
/// balancer encapsulates to. Fails when the interface does not exist.
pub fn iface_addresses(iface: &str) -> Result<Vec<IpAddr>> {
    if if_index(iface).is_none() {
        bail!("unknown interface {iface:?}");
    }
    let mut addrs = Vec::new();
    for (name, addr) in all_addresses()? {
        let link_local = matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
        if name == iface && !link_local && !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    Ok(addrs)
}

/// (interface name, address) of every IPv4 and IPv6 address in this network namespace.
#[allow(unsafe_code, reason = "getifaddrs(3) and the sockaddr casts it needs")]
fn all_addresses() -> Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below, once, whatever happens.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family tells its real type; ifa_name is
        // a NUL-terminated string.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: as above.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        out.push((name.to_string_lossy().into_owned(), addr));
    }
    // SAFETY: the list from getifaddrs, freed once; nothing points into it any more.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_found_and_unknown_interfaces_refused() {
        let addrs = iface_addresses("lo").unwrap();
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{addrs:?}");
        let err = iface_addresses("nosuchif0").unwrap_err();
        assert!(err.to_string().contains("unknown interface \"nosuchif0\""), "{err:#}");
    }
}
