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
pub fn plug(switch: &Netns, host: &Netns, port: &str, addr: Ipv4Addr) -> Result<()> {
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

/// The L3 DSR topology: the client, the balancer and a router on one bridge; the backends on
/// another subnet behind the router. The balancer encapsulates towards the backends; each
/// backend strips the outer header with `lb-agent decap` and answers the client directly
/// through the router.
///
/// ```text
///  client 10.99.0.2  fd99::2  ─┐                    ┌─ backend i 10.98.0.(11+i) fd98::(11+i)
///  lb     10.99.0.3  fd99::3  ─┤ bridge ─ router ───┤   (VIPs on lo)
///  router 10.99.0.1  fd99::1  ─┘   10.98.0.1 fd98::1 └─ (one veth each)
/// ```
pub struct L3Bed {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    pub router: Netns,
    _peer_xdp: aya::Ebpf,
    pub switch: Netns,
}

pub const VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0x100);
pub const CLIENT6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);

pub fn l3_backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 98, 0, 11 + i as u8)
}

pub fn l3_backend_addr6(i: usize) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, 0x11 + i as u16)
}

impl L3Bed {
    pub fn new(n_backends: usize) -> Result<Self> {
        let switch = Netns::new("sw")?;
        switch.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        switch.exec(&["ip", "link", "set", "br0", "up"])?;

        let router = Netns::new("router")?;
        plug(&switch, &router, "v-router", Ipv4Addr::new(10, 99, 0, 1))?;
        add6(&router, IFACE, "fd99::1/64")?;
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            router.exec(&["sysctl", "-qw", key])?;
        }

        let client = Netns::new("client")?;
        plug(&switch, &client, "v-client", CLIENT)?;
        add6(&client, IFACE, &format!("{CLIENT6}/64"))?;
        client.exec(&["ethtool", "-K", IFACE, "tx", "off"])?;
        route_via(&client, "10.99.0.1", "fd99::1")?;

        let lb = Netns::new("lb")?;
        plug(&switch, &lb, "v-lb", LB)?;
        add6(&lb, IFACE, "fd99::3/64")?;
        lb.exec(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", IFACE])?;
        // Deprecated, so that the balancer host never picks the VIP as the source of its own
        // connections (health checks): a backend would answer its own VIP, locally.
        lb.exec(&["ip", "-6", "addr", "add", &format!("{VIP6}/128"), "dev", IFACE, "nodad", "preferred_lft", "0"])?;
        route_via(&lb, "10.99.0.1", "fd99::1")?;
        // A packet whose next hop has no neighbour entry yet is handed to the stack, which
        // forwards it (and resolves the neighbour for the next ones).
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            lb.exec(&["sysctl", "-qw", key])?;
        }
        let peer_xdp = switch.run(|| lb_agent::dataplane::attach_pass_program("v-lb"))??;

        let mut backends = Vec::new();
        for i in 0..n_backends {
            let ns = Netns::new(&format!("b{i}"))?;
            let port = format!("r-b{i}");
            router.exec(&["ip", "link", "add", &port, "type", "veth", "peer", "name", IFACE, "netns", &ns.name])?;
            router.exec(&["ip", "addr", "add", "10.98.0.1/32", "dev", &port])?;
            router.exec(&["ip", "link", "set", &port, "up"])?;
            add6(&router, &port, "fd98::1/128")?;
            router.exec(&["ip", "route", "add", &format!("{}/32", l3_backend_addr(i)), "dev", &port])?;
            router.exec(&["ip", "-6", "route", "add", &format!("{}/128", l3_backend_addr6(i)), "dev", &port])?;
            ns.exec(&["ip", "addr", "add", &format!("{}/32", l3_backend_addr(i)), "dev", IFACE])?;
            add6(&ns, IFACE, &format!("{}/128", l3_backend_addr6(i)))?;
            ns.exec(&["ip", "link", "set", IFACE, "up"])?;
            ns.exec(&["ip", "route", "add", "10.98.0.1", "dev", IFACE])?;
            ns.exec(&["ip", "route", "add", "default", "via", "10.98.0.1"])?;
            ns.exec(&["ip", "-6", "route", "add", "fd98::1", "dev", IFACE])?;
            ns.exec(&["ip", "-6", "route", "add", "default", "via", "fd98::1"])?;
            ns.exec(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            add6(&ns, "lo", &format!("{VIP6}/128"))?;
            backends.push(ns);
        }
        Ok(Self { client, lb, backends, router, _peer_xdp: peer_xdp, switch })
    }
}

/// An IPv6 address without duplicate address detection, usable at once.
pub fn add6(ns: &Netns, dev: &str, cidr: &str) -> Result<()> {
    ns.exec(&["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"]).map(|_| ())
}

fn route_via(ns: &Netns, v4: &str, v6: &str) -> Result<()> {
    ns.exec(&["ip", "route", "add", "10.98.0.0/24", "via", v4])?;
    ns.exec(&["ip", "-6", "route", "add", "fd98::/64", "via", v6])?;
    Ok(())
}
