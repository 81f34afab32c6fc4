//! MAC addresses: parsing and printing them, and an interface's own.
use anyhow::{anyhow, bail, Context as _, Result};

use crate::sys::if_index;

/// The interface's MAC address, from sysfs.
pub fn iface_mac(iface: &str) -> Result<[u8; 6]> {
    if if_index(iface).is_none() {
        bail!("unknown interface {iface:?}");
    }
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_mac(text.trim())
        .ok_or_else(|| anyhow!("interface {iface} has no Ethernet unicast address ({:?})", text.trim()))
}

/// "aa:bb:cc:dd:ee:ff" → bytes; None unless it is a unicast address.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    let unicast = mac[0] & 1 == 0 && mac != [0; 6];
    (parts.next().is_none() && unicast).then_some(mac)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:aa:BB:00:00:01"), Some([2, 0xaa, 0xbb, 0, 0, 1]));
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "0g:00:00:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "2:0:0:0:0:1",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(format_mac([2, 0xaa, 0, 0, 0, 1]), "02:aa:00:00:00:01");
    }
}
