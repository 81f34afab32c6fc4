//! Backend MAC addresses from the kernel's IPv4 neighbour (ARP) table.
use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use crate::config::parse_mac;

/// The complete neighbour entry of `addr` on `iface`, if the kernel has one.
pub fn lookup(addr: Ipv4Addr, iface: &str) -> Option<[u8; 6]> {
    let table = std::fs::read_to_string("/proc/net/arp").ok()?;
    parse_arp_table(&table, addr, iface)
}

/// Looks every address up and, for those missing, makes the kernel resolve them (one datagram
/// each to the discard port), then waits up to `wait` in all for the entries.
pub fn resolve_all(addrs: &[Ipv4Addr], iface: &str, wait: Duration) -> Vec<Option<[u8; 6]>> {
    let mut macs: Vec<_> = addrs.iter().map(|&a| lookup(a, iface)).collect();
    if macs.iter().all(Option::is_some) {
        return macs;
    }
    if let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        for (addr, mac) in addrs.iter().zip(&macs) {
            if mac.is_none() {
                let _ = socket.send_to(b"xlb neighbour probe", (*addr, 9));
            }
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
}
