//! Scale-out, in network namespaces: three balancer hosts announce one VIP over BGP (each
//! lb-agent with its BIRD child) to a router that runs BIRD with ECMP. Real TCP clients and
//! servers; hosts die (SIGKILL, a silent link failure), drain, rejoin, and every backend
//! fails. Needs root and bird2 (`cargo xtask setup`).
use std::time::{Duration, Instant};

use lb_agent::tables::maglev::{self, address_key, Member};
use std::net::IpAddr;

use lb_common::{addr_v4, addr_v6, hash::flow_hash, limits::DEFAULT_MAGLEV_SIZE};
use xlb_tests::{
    agent::AgentProcess,
    dpbed::ring_entry,
    scaleout::{
        backend_addr, backend_addr6, lb_config, vip, vip6, ScaleOutBed, CLIENT, CLIENT6, DRAIN_SECS, HASH_SEED,
        METRICS, PORT, VIP,
    },
    scenario::backend_name,
    traffic::{failures, open_connections, tcp_requests, Conn, Server},
};

const LBS: usize = 3;
const BACKENDS: usize = 3;
/// Long-lived connections to the IPv4 VIP, and to the IPv6 one.
const LONG_LIVED: usize = 90;
const LONG_LIVED6: usize = 30;

/// The backend every host's Maglev table gives the client's connection from `port`: the
/// lookup a single host makes, computed here from the seed and the backends' addresses.
fn expected_backend(c: &Conn) -> String {
    let v6 = c.peer_is_v6();
    let address = |j: usize| if v6 { IpAddr::from(backend_addr6(j)) } else { backend_addr(j).into() };
    let members: Vec<Member> =
        (0..BACKENDS).map(|j| Member { id: j as u32, key: address_key(address(j)), weight: 1 }).collect();
    let table = maglev::build(&members, DEFAULT_MAGLEV_SIZE);
    let [s0, s1] = c.local_port().to_be_bytes();
    let [d0, d1] = PORT.to_be_bytes();
    let ports = u32::from_ne_bytes([s0, s1, d0, d1]);
    let src = if v6 { addr_v6(CLIENT6.octets()) } else { addr_v4(CLIENT.octets()) };
    let hash = flow_hash(&src, ports, HASH_SEED);
    backend_name(ring_entry(&table, hash) as usize)
}

/// What asking every connection again, round after round for `time`, found.
#[derive(Debug, Default)]
struct Asked {
    rounds: usize,
    /// Resets, timeouts, closes.
    failed: usize,
    /// Answers from another backend than the connection's first.
    moved: usize,
}

fn ask_for(conns: &mut [Conn], time: Duration) -> Asked {
    let start = Instant::now();
    let mut asked = Asked::default();
    // Bounded in time and count.
    while asked.rounds < 1000 && (asked.rounds == 0 || start.elapsed() < time) {
        for c in conns.iter_mut() {
            match c.ask() {
                Ok(name) if name == c.backend => {}
                Ok(_) => asked.moved += 1,
                Err(_) => asked.failed += 1,
            }
        }
        asked.rounds += 1;
    }
    asked
}

/// Balancer `i`'s `ctl --json list`.
fn list(bed: &mut ScaleOutBed, i: usize) -> serde_json::Value {
    let (ok, out, err) = bed.agent(i).ctl(&["--json", "list"]).unwrap();
    assert!(ok, "ctl list on lb{i}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Packets balancer `i` forwarded for the IPv4 service.
fn forwarded(bed: &mut ScaleOutBed, i: usize) -> u64 {
    list(bed, i)["services"][0]["packets"].as_u64().unwrap()
}

/// The same for the IPv6 service.
fn forwarded6(bed: &mut ScaleOutBed, i: usize) -> u64 {
    list(bed, i)["services"][1]["packets"].as_u64().unwrap()
}

fn bgp_view(bed: &mut ScaleOutBed, i: usize) -> serde_json::Value {
    list(bed, i)["bgp"].clone()
}

/// Balancer `i`'s BGP view once `ok` holds for it (BIRD is polled twice a second), or the
/// last one after 5 s.
fn wait_bgp(bed: &mut ScaleOutBed, i: usize, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let view = bgp_view(bed, i);
        if ok(&view) || start.elapsed() > Duration::from_secs(5) {
            return view;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_hosts_share_the_vip_and_no_connection_breaks_when_one_fails() {
    let mut bed = ScaleOutBed::new(LBS, BACKENDS).expect("test bed");
    for i in 0..LBS {
        bed.start_agent(i).unwrap();
    }
    let converged = bed.wait_next_hops(&[0, 1, 2], Duration::from_secs(30)).unwrap();
    bed.wait_next_hops6(3, Duration::from_secs(10)).unwrap();
    eprintln!("router: 3 ECMP next hops {converged:?} after the last agent was ready (IPv4 and IPv6)");
    for i in 0..LBS {
        bed.agent(i).wait_for_log(&format!("bgp: VIP {VIP} announced: web 3 of 3 up"), Duration::from_secs(5)).unwrap();
        let bgp = wait_bgp(&mut bed, i, |v| v["sessions"][0]["up"] == true && v["sessions"][1]["up"] == true);
        for k in 0..2 {
            assert_eq!(bgp["vips"][k]["state"], "announced", "lb{i}: {bgp}");
            assert_eq!(bgp["sessions"][k]["up"], true, "lb{i}: {bgp}");
            assert_eq!(bgp["sessions"][k]["state"], "Established", "lb{i}: {bgp}");
        }
    }
    // Every host builds the same tables from the same seed: one fingerprint.
    let prints: Vec<String> = (0..LBS).map(|i| bed.agent(i).ctl(&["fingerprint"]).unwrap().1).collect();
    assert!(prints[0].starts_with("fingerprint "), "{prints:?}");
    assert!(prints.iter().all(|p| *p == prints[0]), "hosts disagree: {prints:?}");
    let metrics = AgentProcess::scrape(&bed.lbs[0], METRICS).unwrap();
    for series in
        [format!("xlb_vip_announced{{vip=\"{VIP}\"}} 1"), "xlb_bgp_session_up{neighbor=\"10.96.0.1\"} 1".into()]
    {
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
    }
    let (_, table, _) = bed.agent(0).ctl(&["list"]).unwrap();
    assert!(table.contains("BGP: host serving") && table.contains("Established"), "{table}");

    // ECMP spreads connections over every host, and each reaches the backend one host's
    // lookup gives it.
    let before: Vec<u64> = (0..LBS).map(|i| forwarded(&mut bed, i)).collect();
    let mut conns = open_connections(&bed.client, vip(), LONG_LIVED).unwrap();
    let after: Vec<u64> = (0..LBS).map(|i| forwarded(&mut bed, i)).collect();
    for i in 0..LBS {
        assert!(
            after[i] > before[i] + 10,
            "lb{i} forwarded {} packets of {LONG_LIVED} connections",
            after[i] - before[i]
        );
    }
    let before6: Vec<u64> = (0..LBS).map(|i| forwarded6(&mut bed, i)).collect();
    conns.extend(open_connections(&bed.client, vip6(), LONG_LIVED6).unwrap());
    for i in 0..LBS {
        let n = forwarded6(&mut bed, i) - before6[i];
        assert!(n > 3, "lb{i} forwarded {n} packets of {LONG_LIVED6} IPv6 connections");
    }
    let wrong: Vec<(u16, String, String)> = conns
        .iter()
        .filter(|c| c.backend != expected_backend(c))
        .map(|c| (c.local_port(), c.backend.clone(), expected_backend(c)))
        .collect();
    assert!(wrong.is_empty(), "connections on another backend than the lookup's: {wrong:?}");
    let spread: std::collections::BTreeMap<&str, usize> = conns.iter().fold(Default::default(), |mut m, c| {
        *m.entry(c.backend.as_str()).or_default() += 1;
        m
    });
    eprintln!("{} connections over the backends: {spread:?}; IPv4 packets per host {:?}", conns.len(), {
        (0..LBS).map(|i| after[i] - before[i]).collect::<Vec<_>>()
    });

    // A host dies (SIGKILL): the kernel signals its BIRD, whose session ends; traffic keeps
    // flowing meanwhile, and the connections the router moves find their backend elsewhere.
    let asker = std::thread::spawn(move || {
        let asked = ask_for(&mut conns, Duration::from_millis(1500));
        (conns, asked)
    });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    bed.agent(1).kill9().unwrap();
    bed.wait_next_hops(&[0, 2], Duration::from_secs(5)).unwrap();
    let withdraw_kill = t0.elapsed();
    bed.wait_next_hops6(2, Duration::from_secs(5)).unwrap();
    let withdraw_kill6 = t0.elapsed();
    let (c, asked) = asker.join().unwrap();
    conns = c;
    eprintln!(
        "SIGKILL of lb1: withdrawn from the router's FIB in {withdraw_kill:?} (IPv6 {withdraw_kill6:?}); {asked:?}"
    );
    assert!(withdraw_kill < Duration::from_secs(1), "withdrawal took {withdraw_kill:?}");
    assert_eq!((asked.failed, asked.moved), (0, 0), "{asked:?}");

    // It rejoins (a new agent takes over the pinned data path) and takes its share.
    let t0 = Instant::now();
    bed.start_agent(1).unwrap();
    bed.wait_next_hops(&[0, 1, 2], Duration::from_secs(30)).unwrap();
    bed.wait_next_hops6(3, Duration::from_secs(30)).unwrap();
    let rejoin = t0.elapsed();
    let asked = ask_for(&mut conns, Duration::from_millis(500));
    eprintln!("lb1 back: announced again {rejoin:?} after its agent started; {asked:?}");
    assert_eq!((asked.failed, asked.moved), (0, 0), "{asked:?}");
    let before = forwarded(&mut bed, 1);
    let t = tcp_requests(&bed.client, vip(), 60).unwrap();
    assert_eq!(failures(&t), 0, "{t:?}");
    assert!(forwarded(&mut bed, 1) > before, "lb1 took no new connection after rejoining");

    // A silent failure: lb2's switch port goes down; the router's own link stays up, so
    // only BFD tells it.
    let asker = std::thread::spawn(move || {
        let asked = ask_for(&mut conns, Duration::from_millis(2000));
        (conns, asked)
    });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    bed.cut(2, false).unwrap();
    bed.wait_next_hops(&[0, 1], Duration::from_secs(10)).unwrap();
    let withdraw_silent = t0.elapsed();
    bed.wait_next_hops6(2, Duration::from_secs(10)).unwrap();
    let withdraw_silent6 = t0.elapsed();
    let (c, asked) = asker.join().unwrap();
    conns = c;
    eprintln!("lb2's link cut: withdrawn from the router's FIB in {withdraw_silent:?} (IPv6 {withdraw_silent6:?}; BFD); {asked:?}");
    assert!(withdraw_silent < Duration::from_secs(1), "withdrawal took {withdraw_silent:?}");
    assert_eq!((asked.failed, asked.moved), (0, 0), "{asked:?}");

    // Drain lb0: its routes get GRACEFUL_SHUTDOWN and a worse MED, the router prefers lb1 for
    // every flow; connections go on (they find their backend on lb1); then the routes go.
    let (ok, out, err) = bed.agent(0).ctl(&["drain-host"]).unwrap();
    assert!(ok, "{out}{err}");
    let t0 = Instant::now();
    bed.wait_next_hops(&[1], Duration::from_secs(5)).unwrap();
    let moved_away = t0.elapsed();
    bed.wait_next_hops6(1, Duration::from_secs(5)).unwrap();
    assert_eq!(wait_bgp(&mut bed, 0, |v| v["host"] == "draining")["host"], "draining");
    let asked = ask_for(&mut conns, Duration::from_millis(300));
    assert_eq!((asked.failed, asked.moved), (0, 0), "{asked:?}");
    let before = forwarded(&mut bed, 0);
    let t = tcp_requests(&bed.client, vip(), 30).unwrap();
    assert_eq!(failures(&t), 0, "{t:?}");
    assert_eq!(forwarded(&mut bed, 0), before, "a draining host still takes new connections");
    bed.agent(0)
        .wait_for_log(&format!("bgp: VIP {VIP} withdrawn: the host is drained"), Duration::from_secs(10))
        .unwrap();
    assert_eq!(wait_bgp(&mut bed, 0, |v| v["host"] == "drained")["host"], "drained");
    eprintln!(
        "drain-host on lb0: the router moved every flow to lb1 in {moved_away:?}; withdrawn after {DRAIN_SECS} s"
    );
    let (ok, _, err) = bed.agent(0).ctl(&["undrain-host"]).unwrap();
    assert!(ok, "{err}");
    bed.wait_next_hops(&[0, 1], Duration::from_secs(5)).unwrap();

    // lb2's link back: its sessions come up again and it announces again.
    let t0 = Instant::now();
    bed.cut(2, true).unwrap();
    bed.wait_next_hops(&[0, 1, 2], Duration::from_secs(30)).unwrap();
    bed.wait_next_hops6(3, Duration::from_secs(30)).unwrap();
    eprintln!("lb2's link back: announced again after {:?}", t0.elapsed());
    let asked = ask_for(&mut conns, Duration::from_millis(300));
    assert_eq!((asked.failed, asked.moved), (0, 0), "{asked:?}");
    drop(conns);

    // Every backend fails: every host withdraws; they come back with the backends.
    for s in &mut bed.servers {
        s.stop();
    }
    bed.wait_next_hops(&[], Duration::from_secs(10)).unwrap();
    bed.wait_next_hops6(0, Duration::from_secs(10)).unwrap();
    for i in 0..LBS {
        bed.agent(i)
            .wait_for_log(
                &format!("bgp: VIP {VIP} withdrawn: no service has min_healthy backends up"),
                Duration::from_secs(5),
            )
            .unwrap();
    }
    for j in 0..BACKENDS {
        bed.servers[j] = Server::start(&bed.backends[j], &backend_name(j), &[VIP.into()], PORT).unwrap();
    }
    bed.wait_next_hops(&[0, 1, 2], Duration::from_secs(10)).unwrap();
    let t = tcp_requests(&bed.client, vip(), 30).unwrap();
    assert_eq!(failures(&t), 0, "{t:?}");

    // A clean stop withdraws before the data path goes.
    let log = bed.agent(2).stop().unwrap();
    bed.agents[2] = None;
    assert!(log.contains(&format!("bgp: VIP {VIP} withdrawn: the agent is stopping")), "{log}");
    assert!(log.contains("bgp: BIRD stopped"), "{log}");
    bed.wait_next_hops(&[0, 1], Duration::from_secs(2)).unwrap();
    eprintln!(
        "withdraw times: SIGKILL {withdraw_kill:?} (IPv6 {withdraw_kill6:?}), silent link failure {withdraw_silent:?} \
         (IPv6 {withdraw_silent6:?}); connections broken: 0 of {}",
        LONG_LIVED + LONG_LIVED6
    );
}

#[test]
fn bird_trouble_is_reported_not_fatal_at_run_time() {
    let mut bed = ScaleOutBed::new(1, 1).expect("test bed");
    let config = lb_config(0, &bed.run_dir(0), 1);

    // BIRD missing, or refusing its config: a clear error at start, nothing attached.
    for (binary, expect) in [
        ("/nonexistent/bird", "cannot run /nonexistent/bird (install bird2, or set bgp.bird_binary)"),
        ("/bin/false", "BIRD refused the config the agent wrote"),
    ] {
        let bad = config.replace("[bgp]\n", &format!("[bgp]\nbird_binary = \"{binary}\"\n"));
        let err = bed.start_agent_with(0, &bad).err().expect("the agent must not start");
        let text = format!("{err:#}");
        assert!(text.contains(expect), "{text}");
    }

    // A neighbour that never answers: the agent runs, the VIP is configured, the session is
    // reported down.
    let lonely = config.replace("address = \"10.96.0.1\"", "address = \"10.96.0.250\"");
    bed.start_agent_with(0, &lonely).unwrap();
    bed.agent(0).wait_for_log(&format!("bgp: VIP {VIP} announced"), Duration::from_secs(5)).unwrap();
    let bgp = wait_bgp(&mut bed, 0, |v| v["sessions"][0]["neighbor"] == "10.96.0.250");
    assert_eq!(bgp["sessions"][0]["neighbor"], "10.96.0.250", "{bgp}");
    assert_eq!(bgp["sessions"][0]["up"], false, "{bgp}");
    let table = bed.agent(0).ctl(&["list"]).unwrap().1;
    assert!(table.contains("10.96.0.250"), "{table}");

    // BIRD dies under the agent: started again, the VIP announced again.
    let pid: i32 = std::fs::read_to_string(format!("{}/bird.pid", bed.run_dir(0))).unwrap().trim().parse().unwrap();
    // SAFETY: kill(2) of the BIRD this test's agent started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    bed.agent(0).wait_for_log("bgp: BIRD exited", Duration::from_secs(5)).unwrap();
    bed.agent(0).wait_for_count(&format!("bgp: VIP {VIP} announced"), 2, Duration::from_secs(10)).unwrap();
    let log = bed.agent(0).stop().unwrap();
    assert!(!log.contains("panicked"), "{log}");
}
