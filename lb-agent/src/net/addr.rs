//! The addresses of the host's interfaces.
use std::net::IpAddr;

use anyhow::{bail, Result};

use crate::sys::{if_index, interface_addresses};

/// Every IPv4 and IPv6 address on `iface` except IPv6 link-local ones (fe80::/10), which no
/// balancer encapsulates to. Fails when the interface does not exist.
pub fn iface_addresses(iface: &str) -> Result<Vec<IpAddr>> {
    if if_index(iface).is_none() {
        bail!("unknown interface {iface:?}");
    }
    let mut addrs = Vec::new();
    for (name, addr) in interface_addresses()? {
        let link_local = matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
        if name == iface && !link_local && !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn loopback_addresses_are_found_and_unknown_interfaces_refused() {
        let addrs = iface_addresses("lo").unwrap();
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{addrs:?}");
        assert!(iface_addresses("nosuchif0").is_err());
    }
}
