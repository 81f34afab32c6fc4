//! L3 DSR end to end: IPv4 and IPv6 services over IPIP/IP6IP6 to backends on another subnet
//! behind a router; each backend strips the outer header with `lb-agent decap`. Needs root.
use std::net::{IpAddr, SocketAddr};

use xlb_tests::{
    agent::{AgentProcess, TempDir},
    capture::Capture,
    scenario::backend_name,
    topology::{l3_backend_addr, l3_backend_addr6, L3Bed, CLIENT, IFACE, VIP, VIP6},
    traffic::{failures, tcp_requests, udp_requests, Server, Tally},
};

const BACKENDS: usize = 3;
const FLOWS: usize = 300;
const PORT: u16 = 80;

fn config() -> String {
    let mut c = String::from(
        "interface = \"eth0\"\nhash_seed = 7\n\n[ipip]\nsource_v4 = \"10.97.0.0/24\"\nsource_v6 = \"fd97::/112\"\n\n[health]\ninterval_ms = 200\ntimeout_ms = 100\n",
    );
    for (vip, proto) in [(IpAddr::from(VIP), "tcp"), (VIP.into(), "udp"), (VIP6.into(), "tcp"), (VIP6.into(), "udp")] {
        c += &format!("\n[[service]]\nvip = \"{vip}\"\nport = {PORT}\nprotocol = \"{proto}\"\nforward = \"ipip\"\n");
        for i in 0..BACKENDS {
            let addr: IpAddr = if vip.is_ipv4() { l3_backend_addr(i).into() } else { l3_backend_addr6(i).into() };
            c += &format!("[[service.backend]]\naddress = \"{addr}\"\n");
        }
    }
    c
}

fn assert_even(what: &str, t: &Tally) {
    eprintln!("{what}: {t:?}");
    assert_eq!(failures(t), 0, "{what}: {t:?}");
    let share = FLOWS / BACKENDS;
    for i in 0..BACKENDS {
        let n = t.get(&backend_name(i)).copied().unwrap_or(0);
        assert!(n.abs_diff(share) * 10 <= share * 4, "{what}: backend {i} answered {n}: {t:?}");
    }
}

#[test]
fn ipip_services_reach_backends_behind_a_router_and_replies_bypass_the_balancer() {
    let bed = L3Bed::new(BACKENDS).expect("test bed");
    let _servers: Vec<Server> = (0..BACKENDS)
        .map(|i| Server::start(&bed.backends[i], &backend_name(i), &[VIP.into(), VIP6.into()], PORT).unwrap())
        .collect();
    let mut decaps: Vec<AgentProcess> = bed
        .backends
        .iter()
        .map(|ns| {
            AgentProcess::spawn(ns, TempDir::new("decap").unwrap(), &["decap", "--iface", IFACE], DECAP_READY).unwrap()
        })
        .collect();
    let mut agent = AgentProcess::start(&bed.lb, &config(), &[]).expect("agent");

    let capture = Capture::start(&bed.lb, IFACE, &[VIP.into(), VIP6.into()]).unwrap();
    let v4 = SocketAddr::from((VIP, PORT));
    let v6 = SocketAddr::from((VIP6, PORT));
    assert_even("tcp over ipip", &tcp_requests(&bed.client, v4, FLOWS).unwrap());
    assert_even("udp over ipip", &udp_requests(&bed.client, v4, FLOWS).unwrap());
    assert_even("tcp over ip6ip6", &tcp_requests(&bed.client, v6, FLOWS).unwrap());
    assert_even("udp over ip6ip6", &udp_requests(&bed.client, v6, FLOWS).unwrap());
    // The router is replaced by one with another MAC (a failover) and the hosts learn it: the
    // balancer's cached next hops go stale, the agent sees the neighbour change, and the next
    // packets go to the new MAC (the old one is nobody's: anything sent there is lost).
    let new_mac = "02:77:00:00:00:01";
    bed.router.exec(&["ip", "link", "set", "dev", IFACE, "address", new_mac]).unwrap();
    for ns in [&bed.lb, &bed.client] {
        for router in ["10.99.0.1", "fd99::1"] {
            ns.exec(&["ip", "neigh", "replace", router, "lladdr", new_mac, "dev", IFACE, "nud", "reachable"]).unwrap();
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_even("tcp over ipip, new router MAC", &tcp_requests(&bed.client, v4, FLOWS).unwrap());
    assert_even("tcp over ip6ip6, new router MAC", &tcp_requests(&bed.client, v6, FLOWS).unwrap());
    // Positive control: one datagram the balancer host itself sends from the VIP.
    bed.lb
        .run(|| std::net::UdpSocket::bind((VIP, 0)).unwrap().send_to(b"control", (CLIENT, 9)).map(|_| ()))
        .unwrap()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (from_vip, seen) = capture.finish();
    eprintln!("capture on the lb: {seen} frames, {from_vip} from a VIP");
    assert_eq!(from_vip, 1, "backend replies crossed the balancer (or the capture saw nothing)");

    let log = agent.stop().unwrap();
    assert!(log.contains("tx_encap"), "{log}");
    // Health checks to every backend passed from the start: a flap would have moved flows.
    assert!(!log.contains(" DOWN "), "{log}");
    for d in &mut decaps {
        let log = d.stop().unwrap();
        assert!(log.contains("decapsulated"), "{log}");
    }
}

/// What `lb-agent decap` logs once attached.
const DECAP_READY: &str = "decapsulating on";
