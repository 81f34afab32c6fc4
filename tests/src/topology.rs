//! The L2 DSR topology: a client, the balancer and N backends, each in its own namespace, on
//! one bridge (in a namespace of its own).
//!
//! ```text
//!  client 10.99.0.2 ─┐
//!  lb     10.99.0.3 ─┤ bridge ├─ backend i: 10.99.0.(11+i), VIP on lo
//!  (VIP 10.99.0.100 on the lb's eth0: it answers ARP for it)
//! ```
use std::net::Ipv4Addr;

use anyhow::Result;

use crate::netns::Netns;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const LB: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
/// Every host's interface in its namespace.
pub const IFACE: &str = "eth0";

pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 11 + i as u8)
}

pub struct L2Bed {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    // Fields drop in order: the pass program before its namespace, the switch last.
    _peer_xdp: aya::Ebpf,
    pub switch: Netns,
}

impl L2Bed {
    pub fn new(n_backends: usize) -> Result<Self> {
        let switch = Netns::new("sw")?;
        switch.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        switch.exec(&["ip", "link", "set", "br0", "up"])?;

        let client = Netns::new("client")?;
        plug(&switch, &client, "v-client", CLIENT)?;
        // The balancer runs native XDP: the client's partial checksums would not survive the
        // frame becoming an XDP frame (see TOOLCHAIN.md), so it computes them itself.
        client.exec(&["ethtool", "-K", IFACE, "tx", "off"])?;

        let lb = Netns::new("lb")?;
        plug(&switch, &lb, "v-lb", LB)?;
        lb.exec(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", IFACE])?;
        // A native-XDP veth delivers XDP_TX frames only if its peer runs an XDP program.
        let peer_xdp = switch.run(|| lb_agent::dataplane::attach_pass_program("v-lb"))??;

        let mut backends = Vec::new();
        for i in 0..n_backends {
            let ns = Netns::new(&format!("b{i}"))?;
            plug(&switch, &ns, &format!("v-b{i}"), backend_addr(i))?;
            make_dsr_backend(&ns)?;
            backends.push(ns);
        }
        Ok(Self { client, lb, backends, _peer_xdp: peer_xdp, switch })
    }
}

/// Connects `host` to the bridge with a veth pair: `eth0` in the host, `port` on the switch.
fn plug(switch: &Netns, host: &Netns, port: &str, addr: Ipv4Addr) -> Result<()> {
    switch.exec(&["ip", "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", &host.name])?;
    switch.exec(&["ip", "link", "set", port, "master", "br0", "up"])?;
    host.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", IFACE])?;
    host.exec(&["ip", "link", "set", IFACE, "up"])?;
    Ok(())
}

/// The VIP on loopback, hidden from ARP: the backend accepts the VIP's traffic and answers the
/// client directly from the VIP, while only the balancer answers ARP for it.
fn make_dsr_backend(ns: &Netns) -> Result<()> {
    ns.exec(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        for dev in ["all", IFACE] {
            ns.exec(&["sysctl", "-qw", &format!("net.ipv4.conf.{dev}.{key}={value}")])?;
        }
    }
    Ok(())
}
