//! Backend MAC addresses from the kernel's neighbour tables (ARP for IPv4, NDP for IPv6).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use crate::net::mac::parse_mac;

/// The complete neighbour entry of `addr` on `iface`, if the kernel has one.
pub fn lookup(addr: IpAddr, iface: &str) -> Option<[u8; 6]> {
    match addr {
        IpAddr::V4(a) => parse_arp_table(&std::fs::read_to_string("/proc/net/arp").ok()?, a, iface),
        IpAddr::V6(a) => lookup_v6(a, iface),
    }
}

/// IPv6 has no /proc table: ask iproute2.
fn lookup_v6(addr: Ipv6Addr, iface: &str) -> Option<[u8; 6]> {
    let out = Command::new("ip").args(["-6", "neigh", "show", &addr.to_string(), "dev", iface]).output().ok()?;
    parse_ip_neigh(&String::from_utf8_lossy(&out.stdout))
}

/// `fd00::11 lladdr 02:00:00:00:00:0b REACHABLE` → the MAC, unless the entry failed.
fn parse_ip_neigh(text: &str) -> Option<[u8; 6]> {
    let line = text.lines().next()?;
    if line.contains("FAILED") || line.contains("INCOMPLETE") {
        return None;
    }
    let mut words = line.split_whitespace();
    words.by_ref().find(|w| *w == "lladdr")?;
    parse_mac(words.next()?)
}

/// Looks every address up and, for those missing, makes the kernel resolve them (one datagram
/// each to the discard port), then waits up to `wait` in all for the entries.
pub fn resolve_all(addrs: &[IpAddr], iface: &str, wait: Duration) -> Vec<Option<[u8; 6]>> {
    let mut macs: Vec<_> = addrs.iter().map(|&a| lookup(a, iface)).collect();
    if macs.iter().all(Option::is_some) {
        return macs;
    }
    let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0));
    let v6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0));
    for (addr, mac) in addrs.iter().zip(&macs) {
        let socket = if addr.is_ipv4() { &v4 } else { &v6 };
        if let (None, Ok(socket)) = (mac, socket) {
            let _ = socket.send_to(b"xlb neighbour probe", (*addr, 9));
        }
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline && macs.iter().any(Option::is_none) {
        std::thread::sleep(Duration::from_millis(20));
        for (addr, mac) in addrs.iter().zip(macs.iter_mut()) {
            if mac.is_none() {
                *mac = lookup(*addr, iface);
            }
        }
    }
    macs
}

const ATF_COM: u32 = 0x2;

fn parse_arp_table(table: &str, addr: Ipv4Addr, iface: &str) -> Option<[u8; 6]> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [ip, _hw_type, flags, mac, _mask, dev] = f[..] else { return None };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        (ip.parse() == Ok(addr) && dev == iface && flags & ATF_COM != 0).then(|| parse_mac(mac))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_complete_entries_on_the_interface_only() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device
10.0.0.11        0x1         0x2         02:00:00:00:00:0b     *        eth0
10.0.0.12        0x1         0x0         00:00:00:00:00:00     *        eth0
10.0.0.13        0x1         0x2         02:00:00:00:00:0d     *        eth1
";
        let a = |s: &str| s.parse().unwrap();
        assert_eq!(parse_arp_table(table, a("10.0.0.11"), "eth0"), Some([2, 0, 0, 0, 0, 0x0b]));
        assert_eq!(parse_arp_table(table, a("10.0.0.12"), "eth0"), None);
        assert_eq!(parse_arp_table(table, a("10.0.0.13"), "eth0"), None);
        assert_eq!(parse_arp_table(table, a("10.0.0.14"), "eth0"), None);
    }

    #[test]
    fn reads_iproute2_neighbour_lines() {
        assert_eq!(parse_ip_neigh("fd00::11 lladdr 02:00:00:00:00:0b REACHABLE\n"), Some([2, 0, 0, 0, 0, 0x0b]));
        assert_eq!(parse_ip_neigh("fd00::11 lladdr 02:00:00:00:00:0b router STALE\n"), Some([2, 0, 0, 0, 0, 0x0b]));
        assert_eq!(parse_ip_neigh("fd00::11  FAILED\n"), None);
        assert_eq!(parse_ip_neigh(""), None);
    }
}
