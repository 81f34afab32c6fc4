//! The L7 tier end to end, in network namespaces: nginx backends that answer with their own
//! name and log what they received, lb-agent proxying HTTP, HTTPS and TCP with PROXY headers,
//! real clients (a plain socket, curl). Needs root, nginx and curl (`cargo xtask setup`).
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use xlb_tests::{
    agent::{AgentProcess, TempDir},
    http::{exchange, get, tally},
    netns::Netns,
    nginx::{Nginx, HTTP_PORT, PROXY_PORT},
    topology::{backend_addr, L2Bed, CLIENT, IFACE, LB},
};

const BACKENDS: usize = 3;
const METRICS: &str = "127.0.0.1:9100";

fn backend_name(i: usize) -> String {
    format!("nginx-{i}")
}

/// The bed, nginx on every backend, and the agent started with `l7` (TOML `[[l7]]` sections).
struct L7Bed {
    agent: AgentProcess,
    nginx: Vec<Option<Nginx>>,
    bed: L2Bed,
}

fn start(l7: &str) -> L7Bed {
    let bed = L2Bed::new(BACKENDS).expect("test bed");
    let nginx = (0..BACKENDS).map(|i| Some(Nginx::start(&bed.backends[i], &backend_name(i)).unwrap())).collect();
    let config = format!(
        "interface = \"{IFACE}\"\n\n[metrics]\nlisten = \"{METRICS}\"\n\n[health]\ninterval_ms = 200\ntimeout_ms = 100\nrise = 1\nfall = 2\n\n{l7}"
    );
    let agent = AgentProcess::start(&bed.lb, &config, &[]).unwrap();
    L7Bed { agent, nginx, bed }
}

fn backends(pool: Option<&str>, which: &[usize]) -> String {
    which
        .iter()
        .map(|&i| {
            let pool = pool.map_or(String::new(), |p| format!("pool = \"{p}\"\n"));
            format!("[[l7.backend]]\naddress = \"{}:{HTTP_PORT}\"\n{pool}\n", backend_addr(i))
        })
        .collect()
}

fn web() -> SocketAddr {
    (LB, 80).into()
}

/// Every answer came from one of `names`, about evenly (±40%), and none failed.
fn assert_even(t: &BTreeMap<String, usize>, names: &[String], total: usize) {
    let share = total / names.len();
    for n in names {
        let got = t.get(n).copied().unwrap_or(0);
        assert!(got.abs_diff(share) * 10 <= share * 4, "{n} answered {got} of {total}: {t:?}");
    }
    assert_eq!(t.values().sum::<usize>(), total, "other answers: {t:?}");
    assert_eq!(names.iter().map(|n| t.get(n).copied().unwrap_or(0)).sum::<usize>(), total, "{t:?}");
}

#[test]
fn http_routes_spreads_forwards_and_survives_a_dead_backend() {
    let l7 = format!(
        "[[l7]]\nname = \"web\"\nlisten = \"{LB}:80\"\nmode = \"http\"\nforwarded = true\n\n\
         [[l7.route]]\nhost = \"api.test\"\npool = \"api\"\n\n[[l7.route]]\npath_prefix = \"/static/\"\npool = \"static\"\n\n{}{}{}",
        backends(None, &[0, 1, 2]),
        backends(Some("api"), &[2]),
        backends(Some("static"), &[1])
    );
    let mut s = start(&l7);
    let all: Vec<String> = (0..BACKENDS).map(backend_name).collect();

    // Round robin over the default pool; Host and path pick the other pools.
    let t = tally(&s.bed.client, web(), "www.test", 60).unwrap();
    assert_even(&t, &all, 60);
    let t = tally(&s.bed.client, web(), "api.test", 10).unwrap();
    assert_eq!(t.get(&backend_name(2)), Some(&10), "{t:?}");
    let r = get(&s.bed.client, web(), "www.test", "/static/x.css", &[]).unwrap();
    assert_eq!((r.status, r.body.trim()), (200, backend_name(1).as_str()));

    // What the backend received: the client's address, the scheme, the host, RFC 7239, and no
    // hop-by-hop header (a client's X-Forwarded-For is not trusted by default).
    let r = get(&s.bed.client, web(), "api.test", "/who", &["X-Forwarded-For: 6.6.6.6", "Connection: close, x-drop", "X-Drop: 1"]).unwrap();
    assert_eq!(r.status, 200);
    let line = s.nginx[2].as_ref().unwrap().log().into_iter().find(|l| l[7] == "/who").expect("the request reached nginx-2");
    assert_eq!(line[1], CLIENT.to_string(), "X-Forwarded-For: {line:?}");
    assert_eq!((line[2].as_str(), line[3].as_str()), ("http", "api.test"), "{line:?}");
    // nginx logs a double quote as \x22.
    assert_eq!(line[5].replace("\\x22", "\""), format!("for={CLIENT};proto=http;host=\"api.test\""), "{line:?}");
    assert_ne!(line[6].to_ascii_lowercase(), "close, x-drop", "hop-by-hop headers reached the backend: {line:?}");

    // A backend killed mid-run: connect failures are retried on another backend, and once the
    // checks evict it, nothing reaches it.
    let before = Instant::now();
    let mut failures = 0;
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..20 {
        if round == 5 {
            s.nginx[0].as_mut().unwrap().kill();
        }
        let t = tally(&s.bed.client, web(), "www.test", 15).unwrap();
        for (k, v) in t {
            if k.starts_with("error") || k.starts_with("status") {
                failures += v;
            }
            *answered.entry(k).or_default() += v;
        }
    }
    eprintln!("with nginx-0 killed after 5 of 20 rounds ({:?}): {answered:?}", before.elapsed());
    assert_eq!(failures, 0, "{answered:?}");
    s.agent.wait_for_log("l7 web: backend 10.99.0.11:8080 DOWN", Duration::from_secs(5)).unwrap();
    let t = tally(&s.bed.client, web(), "www.test", 30).unwrap();
    assert_even(&t, &all[1..], 30);
    assert!(s.agent.log_text().contains("unreachable"), "no connect failure was retried");

    // Nothing healthy in a pool: 503.
    s.nginx[2].as_mut().unwrap().kill();
    s.agent.wait_for_log("l7 web: backend 10.99.0.13:8080 DOWN", Duration::from_secs(5)).unwrap();
    s.agent.wait_for_count("l7 web: backend 10.99.0.13:8080 DOWN", 2, Duration::from_secs(5)).unwrap();
    let r = get(&s.bed.client, web(), "api.test", "/", &[]).unwrap();
    assert_eq!(r.status, 503, "{r:?}");

    // The metrics and ctl list show the L7 service.
    let metrics = AgentProcess::scrape(&s.bed.lb, METRICS).unwrap();
    assert!(metrics.contains("xlb_l7_requests_total{service=\"web\",backend=\"10.99.0.12:8080\",pool=\"default\",class=\"2xx\"}"), "{metrics}");
    assert!(metrics.contains("xlb_l7_request_duration_seconds_count{service=\"web\"}"), "{metrics}");
    let (ok, list, err) = s.agent.ctl(&["list"]).unwrap();
    assert!(ok, "{err}");
    assert!(list.contains("web (l7 http)") && list.contains("10.99.0.11:8080") && list.contains("down"), "{list}");
    s.agent.stop().unwrap();
}
