//! End to end, in network namespaces: a real client, the agent on the balancer, real servers
//! on three backends, L2 direct server return. Needs root.
use std::time::{Duration, Instant};

use xlb_tests::{
    agent::AgentProcess,
    capture::Capture,
    scenario::{backend_name, vip, Scenario, FALL, HEALTH_INTERVAL, HEALTH_TIMEOUT, METRICS, RISE},
    topology::{backend_addr, CLIENT, IFACE, VIP},
    traffic::{failures, tcp_requests, udp_requests, Tally},
};

const BACKENDS: usize = 3;
const FLOWS: usize = 300;

/// Every backend answered, each within ±40% of an even share, and nothing failed.
fn assert_even(t: &Tally, backends: &[usize], total: usize) {
    assert_eq!(failures(t), 0, "failed requests: {t:?}");
    let share = total / backends.len();
    for &i in backends {
        let n = t.get(&backend_name(i)).copied().unwrap_or(0);
        assert!(n.abs_diff(share) * 10 <= share * 4, "backend {i} answered {n} of {total}: {t:?}");
    }
    assert_eq!(t.values().sum::<usize>(), total, "answers from unknown backends: {t:?}");
}

/// The value of the sample named exactly `series` (name and labels).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[test]
fn l2_dsr_balances_tcp_and_udp_and_evicts_a_dead_backend() {
    let mut s = Scenario::start(BACKENDS).expect("test bed");
    assert!(s.agent.log_text().contains("Native mode"), "native XDP expected:\n{}", s.agent.log_text());

    // Spread: 300 TCP connections and 300 UDP exchanges, each from its own source port.
    let capture = Capture::start(&s.bed.lb, IFACE, &[VIP.into()]).unwrap();
    let tcp = tcp_requests(&s.bed.client, vip(), FLOWS).unwrap();
    let udp = udp_requests(&s.bed.client, vip(), FLOWS).unwrap();
    // Positive control: one datagram that the balancer host itself sends from the VIP.
    s.bed
        .lb
        .run(|| {
            let sock = std::net::UdpSocket::bind((VIP, 0)).unwrap();
            sock.send_to(b"control", (CLIENT, 9)).unwrap();
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (from_vip, frames_seen) = capture.finish();
    eprintln!("tcp: {tcp:?}\nudp: {udp:?}\ncapture on the lb: {frames_seen} frames, {from_vip} from the VIP");
    assert_even(&tcp, &[0, 1, 2], FLOWS);
    assert_even(&udp, &[0, 1, 2], FLOWS);
    // Direct server return: of 600 replies from the VIP, none crossed the balancer; the
    // capture did see the control datagram (XDP_TX frames never reach a capture).
    assert_eq!(from_vip, 1, "backend replies crossed the balancer (or the capture saw nothing)");

    // The counters as an operator scrapes them.
    let metrics = AgentProcess::scrape(&s.bed.lb, METRICS).unwrap();
    assert!(metrics.lines().next().is_some_and(|l| l.ends_with(" 200 OK")), "{metrics}");
    assert!(metrics.contains("application/openmetrics-text") && metrics.ends_with("# EOF\n"), "{metrics}");
    let forwarded = metric(&metrics, "xlb_frames_total{reason=\"tx_forwarded\"}");
    assert!(forwarded >= 4 * FLOWS as u64, "{metrics}");
    let per_backend: u64 = (0..BACKENDS)
        .map(|i| metric(&metrics, &format!("xlb_backend_packets_total{{service=\"demo-tcp\",vip=\"{VIP}\",port=\"80\",protocol=\"tcp\",backend=\"{}\"}}", backend_addr(i))))
        .sum();
    assert_eq!(
        per_backend,
        metric(
            &metrics,
            &format!("xlb_service_packets_total{{service=\"demo-tcp\",vip=\"{VIP}\",port=\"80\",protocol=\"tcp\"}}")
        )
    );
    assert!(metrics.contains(&format!("backend=\"{}\"}} 1\n", backend_addr(1))), "{metrics}");
    assert!(metric(&metrics, "xlb_flow_table_entries") <= metric(&metrics, "xlb_flow_table_size"), "{metrics}");
    let new_flows: u64 = (0..BACKENDS)
        .map(|i| metric(&metrics, &format!("xlb_backend_new_flows_total{{service=\"demo-tcp\",vip=\"{VIP}\",port=\"80\",protocol=\"tcp\",backend=\"{}\"}}", backend_addr(i))))
        .sum();
    assert_eq!(new_flows, FLOWS as u64, "one new flow per TCP connection");

    // Kill backend 1: evicted within fall × interval + timeout (plus scheduling slack).
    let dead = backend_addr(1);
    s.servers[1].stop();
    let killed = Instant::now();
    // Both services (TCP and UDP) have the backend.
    s.agent.wait_for_count(&format!("backend {dead} DOWN"), 2, Duration::from_secs(10)).unwrap();
    let detection = killed.elapsed();
    let bound = HEALTH_INTERVAL * FALL + HEALTH_TIMEOUT;
    eprintln!("eviction after {detection:?} (bound {bound:?})");
    assert!(detection <= bound + Duration::from_secs(1), "evicted after {detection:?}, bound {bound:?}");
    let after = tcp_requests(&s.bed.client, vip(), 150).unwrap();
    eprintln!("after eviction: {after:?}");
    assert_even(&after, &[0, 2], 150);
    let udp_after = udp_requests(&s.bed.client, vip(), 150).unwrap();
    assert_even(&udp_after, &[0, 2], 150);

    // Bring it back: in again after `rise` successes.
    s.restart_server(1).unwrap();
    let restarted = Instant::now();
    s.agent.wait_for_count(&format!("backend {dead} UP"), 2, Duration::from_secs(10)).unwrap();
    eprintln!("back after {:?} (rise {RISE} × {HEALTH_INTERVAL:?})", restarted.elapsed());
    let back = tcp_requests(&s.bed.client, vip(), FLOWS).unwrap();
    assert_even(&back, &[0, 1, 2], FLOWS);

    // SIGTERM detaches: no XDP program is left on the interface.
    let log = s.agent.stop().unwrap();
    assert!(log.contains("detached"), "{log}");
    let link = s.bed.lb.exec(&["ip", "link", "show", IFACE]).unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(!link.contains("xdp"), "XDP still attached after exit: {link}");
}
