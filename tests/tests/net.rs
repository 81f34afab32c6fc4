//! What the agent reads of the host's network: neighbour entries over rtnetlink (both families,
//! complete ones only, on the asked interface only) and interface addresses. In a namespace of
//! its own, with entries put there by iproute2. Needs root.
use std::net::IpAddr;

use lb_agent::net::{addr::iface_addresses, neigh};
use xlb_tests::netns::Netns;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn neighbours_and_addresses_come_from_the_kernel() {
    let ns = Netns::new("net").unwrap();
    for cmd in [
        "ip link add v0 type veth peer name v1",
        "ip link set v0 up",
        "ip link set v1 up",
        "ip addr add 10.77.0.1/24 dev v0",
        "ip -6 addr add fd77::1/64 dev v0 nodad",
        "ip neigh add 10.77.0.2 lladdr 02:00:00:00:77:02 dev v0 nud permanent",
        "ip -6 neigh add fd77::2 lladdr 02:00:00:00:77:03 dev v0 nud reachable",
        "ip neigh add 10.77.0.4 lladdr 02:00:00:00:77:04 dev v0 nud stale",
        "ip neigh add 10.77.0.5 dev v0 nud incomplete",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>()).unwrap();
    }
    let (macs, addrs) = ns
        .run(|| {
            let macs: Vec<_> = [("10.77.0.2", "v0"), ("fd77::2", "v0"), ("10.77.0.4", "v0"), ("10.77.0.5", "v0")]
                .into_iter()
                .chain([("10.77.0.9", "v0"), ("10.77.0.2", "v1"), ("10.77.0.2", "nosuch0")])
                .map(|(a, dev)| neigh::lookup(ip(a), dev))
                .collect();
            (macs, iface_addresses("v0").unwrap())
        })
        .unwrap();
    assert_eq!(
        macs,
        [
            Some([2, 0, 0, 0, 0x77, 2]),
            Some([2, 0, 0, 0, 0x77, 3]),
            Some([2, 0, 0, 0, 0x77, 4]),
            None, // incomplete
            None, // no entry
            None, // another interface
            None, // no such interface
        ]
    );
    assert!(addrs.contains(&ip("10.77.0.1")) && addrs.contains(&ip("fd77::1")), "{addrs:?}");
    assert!(addrs.iter().all(|a| !matches!(a, IpAddr::V6(v6) if v6.segments()[0] == 0xfe80)), "{addrs:?}");
}
