//! Active health checks of every kind, and the eviction policy, against real servers in
//! network namespaces. Needs root.
use std::time::Duration;

use xlb_tests::{
    agent::AgentProcess,
    scenario::{backend_name, config_for, vip, Scenario, METRICS, PORT},
    topology::{backend_addr, VIP},
    traffic::{failures, tcp_requests, HttpHealth, Server},
};

const WAIT: Duration = Duration::from_secs(10);

/// Waits until every backend of `service` is up, as `lb-agent ctl list` says.
fn wait_all_up(s: &Scenario, service: &str) {
    let all_up = || {
        let (_, json, _) = s.agent.ctl(&["--json", "list"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let svc = v["services"].as_array().unwrap().iter().find(|x| x["name"] == service).cloned().unwrap();
        svc["backends"].as_array().unwrap().iter().all(|b| b["state"] == "up")
    };
    let start = std::time::Instant::now();
    while !all_up() {
        assert!(start.elapsed() < WAIT, "{service}: not every backend came up:\n{}", s.agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn http_checks_follow_the_status_code() {
    let config = config_for(&[(0, 1), (1, 1), (2, 1)]).replace(
        "[health]\n",
        "[health]\nkind = \"http\"\nport = 8080\nhttp_path = \"/healthz\"\nhttp_status = [200, 204]\n",
    );
    // The UDP service's own [service.health] sets port 80: make it an HTTP check on 8080 too.
    let config = config.replace("[service.health]\nport = 80\n", "[service.health]\nport = 8080\n");
    let bed_servers = Scenario::start_with(3, &config);
    let mut s = bed_servers.expect("test bed");
    let health: Vec<HttpHealth> = (0..3).map(|i| HttpHealth::start(&s.bed.backends[i], 8080).unwrap()).collect();
    // The endpoints started after the agent (whose first checks found them down): wait until
    // its checks see them all, in both services.
    wait_all_up(&s, "demo-tcp");
    wait_all_up(&s, "demo-udp");
    let down = format!("backend {} DOWN after", backend_addr(0));
    let before = s.agent.log_text().matches(&down).count();
    health[0].set_status(503);
    s.agent.wait_for_count(&down, before + 2, WAIT).unwrap();
    assert!(s.agent.log_text().contains("last: HTTP status 503"), "{}", s.agent.log_text());
    let t = tcp_requests(&s.bed.client, vip(), 150).unwrap();
    assert!(failures(&t) == 0 && !t.contains_key(&backend_name(0)), "{t:?}");
    health[0].set_status(204);
    wait_all_up(&s, "demo-tcp");
    drop(health);
    s.agent.stop().unwrap();
}

#[test]
fn udp_checks_need_an_answer() {
    let config = config_for(&[(0, 1), (1, 1), (2, 1)])
        .replace("[service.health]\nport = 80\n", "[service.health]\nkind = \"udp\"\nudp_payload = \"health?\"\n");
    let mut s = Scenario::start_with(3, &config).expect("test bed");
    // Answer UDP on the backends' own addresses too, where the checks go.
    for i in 0..3 {
        s.servers[i].stop();
        s.servers[i] =
            Server::start(&s.bed.backends[i], &backend_name(i), &[VIP.into(), backend_addr(i).into()], PORT).unwrap();
    }
    wait_all_up(&s, "demo-udp");
    s.servers[2].stop();
    s.agent.wait_for_log(&format!("service demo-udp: backend {} DOWN", backend_addr(2)), WAIT).unwrap();
    s.agent.stop().unwrap();
}

#[test]
fn below_min_healthy_the_service_fails_open() {
    let config = config_for(&[(0, 1), (1, 1), (2, 1)]).replace("[health]\n", "[health]\nmin_healthy = 2\n");
    let mut s = Scenario::start_with(3, &config).expect("test bed");
    s.servers[0].stop();
    s.agent.wait_for_count(&format!("backend {} DOWN", backend_addr(0)), 2, WAIT).unwrap();
    assert!(!s.agent.log_text().contains("FAIL OPEN"));
    s.servers[1].stop();
    s.agent.wait_for_count("FAIL OPEN", 2, WAIT).unwrap();
    let metrics = AgentProcess::scrape(&s.bed.lb, METRICS).unwrap();
    assert!(metrics.contains("xlb_service_fail_open{service=\"demo-tcp\""), "{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("xlb_service_fail_open{service=\"demo-tcp\"") && l.ends_with(" 1")),
        "{metrics}"
    );
    // The failing backends are back in the table: some connections reach them (and fail).
    let t = tcp_requests(&s.bed.client, vip(), 60).unwrap();
    assert!(failures(&t) > 0 && t.contains_key(&backend_name(2)), "{t:?}");
    s.restart_server(0).unwrap();
    s.agent.wait_for_count("healthy again", 2, WAIT).unwrap();
    s.agent.stop().unwrap();
}

/// Makes `backend` drop every SYN to the service (nftables; `delete table inet xlbtest` lifts
/// it). Its health port, on its own address, still answers.
fn blackhole_syns(backend: &xlb_tests::netns::Netns) {
    for rule in [
        "add table inet xlbtest".to_string(),
        "add chain inet xlbtest in { type filter hook input priority 0 ; }".to_string(),
        format!("add rule inet xlbtest in ip daddr {VIP} tcp dport {PORT} tcp flags syn drop"),
    ] {
        backend.exec(&["nft", &rule]).expect("nftables");
    }
}

/// A backend that silently drops SYNs to the service while its health port still answers:
/// only the in-band signal (SYN retransmissions) can find it.
#[test]
fn a_backend_that_blackholes_syns_is_evicted_by_the_passive_signal() {
    // The health checks go to the backends' own addresses, which nftables leaves alone.
    let config = config_for(&[(0, 1), (1, 1), (2, 1)])
        .replace("[health]\n", "[passive]\nwindow_ms = 500\nmin_flows = 3\nratio = 0.5\nhold_ms = 60000\n\n[health]\n");
    let mut s = Scenario::start_with(3, &config).expect("test bed");
    let victim = backend_addr(1);
    blackhole_syns(&s.bed.backends[1]);

    // Clients in parallel: those sent to the victim resend their SYN after a second.
    let started = std::time::Instant::now();
    let client = &s.bed.client;
    let agent = &mut s.agent;
    let detection = std::thread::scope(|scope| {
        for _ in 0..6 {
            scope.spawn(|| tcp_requests(client, vip(), 8).unwrap());
        }
        agent.wait_for_log(&format!("backend {victim} DOWN by passive alarm"), Duration::from_secs(30)).unwrap();
        started.elapsed()
    });
    eprintln!("passive detection after {detection:?}");
    let log = s.agent.log_text();
    assert!(!log.contains(&format!("backend {victim} DOWN after")), "the active checks must not see it:\n{log}");
    // Evicted: every new connection succeeds, none on the victim.
    let t = tcp_requests(&s.bed.client, vip(), 120).unwrap();
    assert!(failures(&t) == 0 && !t.contains_key(&backend_name(1)), "{t:?}");
    s.agent.stop().unwrap();
}

/// One request with a client that gives up after a second and never retries: its SYN is never
/// sent again, so SYN retransmissions say nothing of a blackhole; the handshake that never
/// completes does.
fn impatient_request(to: std::net::SocketAddr) -> Result<String, String> {
    use std::io::{BufRead as _, BufReader};
    let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).map_err(|e| e.kind().to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1))).map_err(|e| e.to_string())?;
    let mut name = String::new();
    match BufReader::new(s).read_line(&mut name) {
        Ok(n) if n > 0 => Ok(name.trim().to_string()),
        Ok(_) => Err("closed".into()),
        Err(e) => Err(e.kind().to_string()),
    }
}

/// A SYN blackhole found with impatient clients (the handshake signal), held out for as long
/// as it lasts (each ejection longer, not a flap every hold), back once it is lifted.
#[test]
fn a_blackhole_is_found_with_impatient_clients_and_stays_out() {
    const BLACKHOLE: Duration = Duration::from_secs(12);
    let config = config_for(&[(0, 1), (1, 1), (2, 1)]).replace(
        "[health]\n",
        "[passive]\nwindow_ms = 500\nmin_flows = 3\nhold_ms = 1000\nmax_hold_ms = 8000\n\n[health]\n",
    );
    let mut s = Scenario::start_with(3, &config).expect("test bed");
    let victim = backend_addr(1);
    blackhole_syns(&s.bed.backends[1]);
    // Six clients, each a request every 50 ms at most, for the blackhole's duration.
    let started = std::time::Instant::now();
    let client = &s.bed.client;
    let results: Vec<(Duration, Result<String, String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(move || {
                    client
                        .run(move || {
                            let mut out = Vec::new();
                            while started.elapsed() < BLACKHOLE && out.len() < 1000 {
                                let t = started.elapsed();
                                out.push((t, impatient_request(vip())));
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            out
                        })
                        .unwrap()
                })
            })
            .collect();
        // Meanwhile: when does `ctl list` first show the victim out?
        let mut detected_at = None;
        while started.elapsed() < BLACKHOLE && detected_at.is_none() {
            let (_, list, _) = s.agent.ctl(&["list"]).unwrap();
            if list.lines().any(|l| l.contains(&victim.to_string()) && l.contains("down")) {
                detected_at = Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("blackhole: the victim was out {detected_at:?} after the clients started");
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let log = s.agent.log_text();
    let alarm = format!("backend {victim} DOWN by passive alarm");
    assert!(log.contains(&alarm), "never ejected:\n{log}");
    assert!(log.contains("handshakes completed"), "found by the handshake signal:\n{log}");
    assert!(!log.contains(&format!("backend {victim} DOWN after")), "the active checks must not see it:\n{log}");
    let first_failure = results.iter().filter(|(_, r)| r.is_err()).map(|(t, _)| *t).min().unwrap_or_default();
    let ejections = log.matches(&alarm).count();
    // Failures after the first ejection: only requests that met the backend between a hold's
    // end and the next window's verdict.
    let detected = first_failure + Duration::from_secs(3);
    let later = results.iter().filter(|(t, _)| *t > detected).collect::<Vec<_>>();
    let later_failed = later.iter().filter(|(_, r)| r.is_err()).count();
    eprintln!(
        "blackhole: first failure at {first_failure:?}, {ejections} ejections in {BLACKHOLE:?}; after {detected:?}: \
         {later_failed} of {} requests failed",
        later.len()
    );
    assert!((2..=5).contains(&ejections), "held out with a growing hold, not flapping every second:\n{log}");
    assert!(later_failed * 20 <= later.len(), "{later_failed} of {} failed after detection", later.len());

    // Lifted: the backend is back after its hold and rise.
    s.bed.backends[1].exec(&["nft", "delete table inet xlbtest"]).unwrap();
    let back = std::time::Instant::now();
    let mut seen = false;
    while back.elapsed() < Duration::from_secs(20) && !seen {
        seen = tcp_requests(&s.bed.client, vip(), 30).unwrap().contains_key(&backend_name(1));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("back {:?} after the blackhole was lifted", back.elapsed());
    assert!(seen, "the backend never came back:\n{}", s.agent.log_text());
    s.agent.stop().unwrap();
}

/// Every backend blackholed: the in-band signal alone never empties the pool. At most
/// max_ejected_percent of it is held out; the rest stays in, with a log of why.
#[test]
fn a_pool_that_blackholes_everywhere_is_not_emptied_by_the_passive_signal() {
    let config = config_for(&[(0, 1), (1, 1), (2, 1)]).replace(
        "[health]\n",
        "[passive]\nwindow_ms = 500\nmin_flows = 2\nhold_ms = 60000\nmax_ejected_percent = 50\n\n[health]\n",
    );
    let mut s = Scenario::start_with(3, &config).expect("test bed");
    for b in &s.bed.backends {
        blackhole_syns(b);
    }
    // Patient clients: their SYNs are sent again, every backend's signal is bad.
    let client = &s.bed.client;
    std::thread::scope(|scope| {
        for _ in 0..6 {
            scope.spawn(|| tcp_requests(client, vip(), 4).unwrap());
        }
    });
    std::thread::sleep(Duration::from_millis(1200));
    let log = s.agent.log_text();
    let ejected =
        (0..3).filter(|&i| log.contains(&format!("backend {} DOWN by passive alarm", backend_addr(i)))).count();
    eprintln!("{ejected} of 3 backends ejected");
    assert!(ejected <= 1, "more than half the pool held out:\n{log}");
    assert!(log.contains("max_ejected_percent"), "the cap was not what kept them in:\n{log}");
    s.agent.stop().unwrap();
}
