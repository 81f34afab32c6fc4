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
    let r = get(
        &s.bed.client,
        web(),
        "api.test",
        "/who",
        &["X-Forwarded-For: 6.6.6.6", "Connection: close, x-drop", "X-Drop: 1"],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let line =
        s.nginx[2].as_ref().unwrap().log().into_iter().find(|l| l[7] == "/who").expect("the request reached nginx-2");
    assert_eq!(line[1], CLIENT.to_string(), "X-Forwarded-For: {line:?}");
    assert_eq!((line[2].as_str(), line[3].as_str()), ("http", "api.test"), "{line:?}");
    // nginx logs a double quote as \x22.
    assert_eq!(line[5].replace("\\x22", "\""), format!("for={CLIENT};proto=http;host=\"api.test\""), "{line:?}");
    assert_ne!(line[6].to_ascii_lowercase(), "close, x-drop", "hop-by-hop headers reached the backend: {line:?}");

    // HTTP/2 without TLS (prior knowledge) from the client, HTTP/1.1 to the backend.
    let (ok, out, err) = curl(
        &s.bed.client,
        &["--http2-prior-knowledge", "-H", "Host: api.test", &format!("http://{LB}/h2c"), "-w", "|%{http_version}"],
    );
    assert!(ok && out.ends_with("|2") && out.starts_with(&backend_name(2)), "{out} {err}");

    // Backends drained and weighted through the control API, as L4 ones are.
    let (ok, out, err) =
        s.agent.ctl(&["drain", "web", &backend_addr(0).to_string(), "--port", &HTTP_PORT.to_string()]).unwrap();
    assert!(ok, "{out}{err}");
    assert_even(&tally(&s.bed.client, web(), "www.test", 30).unwrap(), &all[1..], 30);
    let (ok, list, _) = s.agent.ctl(&["list"]).unwrap();
    assert!(ok && list.contains("drain"), "{list}");
    let (ok, _, err) = s.agent.ctl(&["drain", "web", &backend_addr(0).to_string()]).unwrap();
    assert!(!ok && err.contains("--port"), "{err}");
    let (ok, out, err) = s
        .agent
        .ctl(&["set-weight", "web", &backend_addr(0).to_string(), "1", "--port", &HTTP_PORT.to_string()])
        .unwrap();
    assert!(ok, "{out}{err}");
    assert_even(&tally(&s.bed.client, web(), "www.test", 30).unwrap(), &all, 30);

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
    assert!(
        metrics.contains(
            "xlb_l7_requests_total{service=\"web\",backend=\"10.99.0.12:8080\",pool=\"default\",class=\"2xx\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("xlb_l7_request_duration_seconds_count{service=\"web\"}"), "{metrics}");
    let (ok, list, err) = s.agent.ctl(&["list"]).unwrap();
    assert!(ok, "{err}");
    assert!(list.contains("web (l7 http)") && list.contains("10.99.0.11:8080") && list.contains("down"), "{list}");

    // Shutdown drains: a download in progress (about 4 s) finishes, then the agent exits.
    let download = s
        .bed
        .client
        .command("curl")
        .args(["-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"])
        .arg(format!("http://{LB}/big.bin"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let log = s.agent.stop().unwrap();
    let done = download.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&done.stdout), "200 1048576", "the download was cut at shutdown:\n{log}");
}

/// curl in `ns` with `args`: (exit success, stdout, stderr).
fn curl(ns: &Netns, args: &[&str]) -> (bool, String, String) {
    let out = ns.command("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn https_picks_the_certificate_by_sni_speaks_h2_and_reloads_certificates_under_a_download() {
    let dir = TempDir::new("certs").unwrap();
    let ca = xlb_tests::certs::Ca::new(&dir.0, "ca1").unwrap();
    let (a_crt, a_key) = ca.issue(&dir.0, "a", &["a.test"]).unwrap();
    let (b_crt, b_key) = ca.issue(&dir.0, "b", &["b.test", "www.b.test"]).unwrap();
    let l7 = format!(
        "[[l7]]\nname = \"secure\"\nlisten = \"{LB}:443\"\nmode = \"https\"\n\n\
         [[l7.tls]]\ncert = \"{}\"\nkey = \"{}\"\n\n[[l7.tls]]\ncert = \"{}\"\nkey = \"{}\"\n\n{}",
        a_crt.display(),
        a_key.display(),
        b_crt.display(),
        b_key.display(),
        backends(None, &[0, 1, 2])
    );
    let mut s = start(&l7);
    let cacert = ca.pem.display().to_string();
    let resolve = |name: &str| format!("{name}:443:{LB}");
    for (name, cn) in [("a.test", "a.test"), ("b.test", "b.test"), ("www.b.test", "b.test")] {
        let url = format!("https://{name}/");
        let (ok, out, err) = curl(
            &s.bed.client,
            &["-v", "--http2", "--cacert", &cacert, "--resolve", &resolve(name), &url, "-w", "|%{http_version}"],
        );
        assert!(ok, "{name}: {err}");
        let (body, version) = out.rsplit_once('|').unwrap();
        assert!(body.trim().starts_with("nginx-"), "{out}");
        assert_eq!(version, "2", "HTTP/2 by ALPN for {name}");
        assert!(err.contains(&format!("CN={cn}")), "{name} was not served the {cn} certificate:\n{err}");
    }
    let (ok, out, err) = curl(
        &s.bed.client,
        &[
            "--http1.1",
            "--cacert",
            &cacert,
            "--resolve",
            &resolve("a.test"),
            "https://a.test/",
            "-w",
            "|%{http_version}",
        ],
    );
    assert!(ok && out.ends_with("|1.1"), "{out} {err}");
    // The backend is told the scheme.
    let seen_https = s.nginx.iter().flatten().any(|n| n.log().iter().any(|l| l[2] == "https"));
    assert!(seen_https, "no backend saw X-Forwarded-Proto: https");

    // A long download on a connection made with the first certificate…
    let big = s
        .bed
        .client
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            "--cacert",
            &cacert,
        ])
        .args(["--resolve", &resolve("a.test"), "https://a.test/big.bin"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    // …while a.test's certificate is replaced by one of another CA and the agent reloads.
    let ca2 = xlb_tests::certs::Ca::new(&dir.0, "ca2").unwrap();
    ca2.issue(&dir.0, "a", &["a.test"]).unwrap();
    let config = std::fs::read_to_string(s.agent.socket().with_file_name("xlb.toml")).unwrap();
    let line = s.agent.reload(&config).unwrap();
    assert!(line.contains("reloaded"), "{line}");
    let cacert2 = ca2.pem.display().to_string();
    let (ok, _, err) = curl(&s.bed.client, &["--cacert", &cacert2, "--resolve", &resolve("a.test"), "https://a.test/"]);
    assert!(ok, "the new certificate is not served: {err}");
    let (ok, _, _) = curl(&s.bed.client, &["--cacert", &cacert, "--resolve", &resolve("a.test"), "https://a.test/"]);
    assert!(!ok, "the old certificate is still served to new connections");
    let done = big.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&done.stdout),
        "200 1048576",
        "the download on the old connection: {}",
        String::from_utf8_lossy(&done.stderr)
    );

    // A client that gives up inside its handshake, and garbage instead of TLS, disturb nobody.
    for junk in [&b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..], b"GET / HTTP/1.1\r\n\r\n"] {
        let junk = junk.to_vec();
        s.bed
            .client
            .run(move || {
                let mut c = std::net::TcpStream::connect((LB, 443)).unwrap();
                let _ = c.write_all(&junk);
                let _ = c.shutdown(std::net::Shutdown::Write);
                let mut rest = Vec::new();
                let _ = c.read_to_end(&mut rest);
            })
            .unwrap();
    }
    let (ok, _, err) = curl(&s.bed.client, &["--cacert", &cacert, "--resolve", &resolve("b.test"), "https://b.test/"]);
    assert!(ok, "{err}");
    let metrics = AgentProcess::scrape(&s.bed.lb, METRICS).unwrap();
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("xlb_l7_tls_handshake_failures_total{service=\"secure\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    // The two junk clients and the old-CA client's refusal of the new certificate.
    assert!(failures >= 2, "{failures} TLS failures counted");
    s.agent.stop().unwrap();
}

#[test]
fn cookies_pin_a_client_to_a_backend_and_move_it_when_the_backend_dies() {
    let l7 = format!(
        "[[l7]]\nname = \"shop\"\nlisten = \"{LB}:80\"\nmode = \"http\"\n\n\
         [l7.cookie]\nname = \"XLBSRV\"\nsecret = \"a test secret, long enough\"\n\n{}",
        backends(None, &[0, 1, 2])
    );
    let mut s = start(&l7);
    let dir = TempDir::new("jar").unwrap();
    let jar = dir.0.join("cookies.txt").display().to_string();
    let mut seen = BTreeMap::new();
    for _ in 0..50 {
        let (ok, out, err) = curl(&s.bed.client, &["-c", &jar, "-b", &jar, &format!("http://{LB}/")]);
        assert!(ok, "{err}");
        *seen.entry(out.trim().to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 1, "a client with its cookie reached several backends: {seen:?}");
    let pinned = seen.keys().next().unwrap().clone();
    // Without the cookie, the spread is even.
    let all: Vec<String> = (0..BACKENDS).map(backend_name).collect();
    assert_even(&tally(&s.bed.client, web(), "shop.test", 60).unwrap(), &all, 60);
    // The cookie: HttpOnly, opaque; it never reaches a backend, other cookies do.
    let r = get(&s.bed.client, web(), "shop.test", "/first", &[]).unwrap();
    let set = r.header("set-cookie").expect("a new client gets a cookie").to_string();
    assert!(set.starts_with("XLBSRV=") && set.contains("HttpOnly") && !set.contains("10.99"), "{set}");
    let id = set.trim_start_matches("XLBSRV=").split(';').next().unwrap().to_string();
    let r = get(&s.bed.client, web(), "shop.test", "/again", &[&format!("Cookie: a=1; XLBSRV={id}")]).unwrap();
    assert!(r.header("set-cookie").is_none(), "the cookie is set again though it is valid: {r:?}");
    for n in s.nginx.iter().flatten() {
        for l in n.log() {
            assert!(!l[4].contains("XLBSRV"), "the sticky cookie reached {}: {l:?}", n.name);
            if l[7] == "/again" {
                assert_eq!(l[4], "a=1", "{l:?}");
            }
        }
    }
    // The pinned backend dies: the next request lands elsewhere with a new cookie.
    let i: usize = pinned.trim_start_matches("nginx-").parse().unwrap();
    s.nginx[i].as_mut().unwrap().kill();
    s.agent
        .wait_for_log(&format!("l7 shop: backend {}:{HTTP_PORT} DOWN", backend_addr(i)), Duration::from_secs(5))
        .unwrap();
    let before = std::fs::read_to_string(&jar).unwrap();
    let (ok, out, err) = curl(&s.bed.client, &["-c", &jar, "-b", &jar, &format!("http://{LB}/")]);
    assert!(ok, "{err}");
    assert_ne!(out.trim(), pinned, "a request went to the dead backend");
    assert_ne!(std::fs::read_to_string(&jar).unwrap(), before, "no new cookie after the backend died");
    let (_, again, _) = curl(&s.bed.client, &["-c", &jar, "-b", &jar, &format!("http://{LB}/")]);
    assert_eq!(again, out, "the new cookie does not pin");
    s.agent.stop().unwrap();
}

#[test]
fn tcp_proxy_sends_the_client_address_in_proxy_headers_v1_and_v2_over_ipv4_and_ipv6() {
    let bed_l7 = |port: u16, version: &str, v6: bool| {
        let listen = if v6 { format!("[fd99::3]:{port}") } else { format!("{LB}:{port}") };
        let backend = |i: usize| {
            if v6 {
                format!("[fd99::{}]:{PROXY_PORT}", 11 + i)
            } else {
                format!("{}:{PROXY_PORT}", backend_addr(i))
            }
        };
        let mut c = format!(
            "[[l7]]\nname = \"pp-{version}-{}\"\nlisten = \"{listen}\"\nmode = \"tcp-proxy\"\nproxy_protocol = \"{version}\"\n[l7.health]\nkind = \"tcp\"\n\n",
            if v6 { "v6" } else { "v4" }
        );
        for i in 0..BACKENDS {
            c += &format!("[[l7.backend]]\naddress = \"{}\"\n\n", backend(i));
        }
        c
    };
    // An HTTP service behind another proxy: it reads the PROXY header the proxy in front sends.
    let behind = format!(
        "[[l7]]\nname = \"behind\"\nlisten = \"{LB}:8003\"\nmode = \"http\"\naccept_proxy = true\n\n{}",
        backends(None, &[0])
    );
    let l7 = [
        bed_l7(8001, "v1", false),
        bed_l7(8002, "v2", false),
        bed_l7(8001, "v1", true),
        bed_l7(8002, "v2", true),
        behind,
    ]
    .concat();
    let bed = L2Bed::new(BACKENDS).expect("test bed");
    let v6 = |ns: &Netns, addr: &str| ns.exec(&["ip", "-6", "addr", "add", addr, "dev", IFACE, "nodad"]).unwrap();
    v6(&bed.client, "fd99::2/64");
    v6(&bed.lb, "fd99::3/64");
    for (i, b) in bed.backends.iter().enumerate() {
        v6(b, &format!("fd99::{}/64", 11 + i));
    }
    let nginx: Vec<Nginx> = (0..BACKENDS).map(|i| Nginx::start(&bed.backends[i], &backend_name(i)).unwrap()).collect();
    let config =
        format!("interface = \"{IFACE}\"\n\n[health]\ninterval_ms = 200\ntimeout_ms = 100\nrise = 1\nfall = 2\n\n{l7}");
    let mut agent = AgentProcess::start(&bed.lb, &config, &[]).unwrap();
    for (url, client) in [
        (format!("http://{LB}:8001/"), CLIENT.to_string()),
        (format!("http://{LB}:8002/"), CLIENT.to_string()),
        ("http://[fd99::3]:8001/".to_string(), "fd99::2".to_string()),
        ("http://[fd99::3]:8002/".to_string(), "fd99::2".to_string()),
    ] {
        for _ in 0..3 {
            let (ok, out, err) = curl(&bed.client, &["-g", &url]);
            assert!(ok, "{url}: {err}");
            assert_eq!(out.trim(), client, "{url}: the backend saw another client address");
        }
    }
    // The HTTP service behind a proxy takes the client from the PROXY header.
    let r = bed
        .client
        .run(|| exchange((LB, 8003).into(), b"PROXY TCP4 192.0.2.9 10.99.0.3 5555 8003\r\nGET /behind HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let line = nginx[0].log().into_iter().find(|l| l[7] == "/behind").expect("the request reached nginx-0");
    assert_eq!(line[1], "192.0.2.9", "{line:?}");
    let (ok, list, _) = agent.ctl(&["list"]).unwrap();
    assert!(ok && list.contains("pp-v2-v6 (l7 tcp-proxy)"), "{list}");
    agent.stop().unwrap();
}

/// An upgrade-and-echo server in `ns` on `port`: answers any request with 101 Switching
/// Protocols, then sends back every byte it gets. Bounded: at most 8 connections.
fn echo_server(ns: &Netns, port: u16) {
    let listener = ns.run(move || std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(8).flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if conn.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                );
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn upgrades_are_tunnelled_and_bad_clients_are_cut() {
    let l7 = format!(
        "[[l7]]\nname = \"ws\"\nlisten = \"{LB}:80\"\nmode = \"http\"\n[l7.health]\nkind = \"tcp\"\n\
         [l7.timeouts]\nheader_read_ms = 1000\n\n[[l7.backend]]\naddress = \"{}:8090\"\n",
        backend_addr(0)
    );
    let bed = L2Bed::new(1).expect("test bed");
    echo_server(&bed.backends[0], 8090);
    let config =
        format!("interface = \"{IFACE}\"\n\n[health]\ninterval_ms = 200\ntimeout_ms = 100\nrise = 1\nfall = 2\n\n{l7}");
    let mut agent = AgentProcess::start(&bed.lb, &config, &[]).unwrap();

    // A WebSocket-style upgrade: 101 through the proxy, then bytes both ways.
    let upgrade = || {
        bed
        .client
        .run(|| -> std::io::Result<(String, String)> {
            let mut c = std::net::TcpStream::connect((LB, 80))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")?;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                c.read_exact(&mut byte)?;
                head.push(byte[0]);
            }
            c.write_all(b"hello through the tunnel")?;
            let mut back = [0u8; 24];
            c.read_exact(&mut back)?;
            Ok((String::from_utf8_lossy(&head).into_owned(), String::from_utf8_lossy(&back).into_owned()))
        })
        .unwrap()
        .unwrap()
    };
    let echoed = upgrade();
    assert!(echoed.0.starts_with("HTTP/1.1 101"), "{}", echoed.0);
    assert_eq!(echoed.1, "hello through the tunnel");

    // Slowloris: headers that never end are cut after header_read_ms.
    let cut_after = bed
        .client
        .run(|| {
            let mut c = std::net::TcpStream::connect((LB, 80)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let start = Instant::now();
            c.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\nX-A: ").unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
            start.elapsed()
        })
        .unwrap();
    eprintln!("a slowloris client was cut after {cut_after:?}");
    assert!(cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(3), "{cut_after:?}");

    // Oversize headers: 431. Garbage: 400. Neither disturbs the next client.
    let big = format!("X-Big: {}", "b".repeat(20_000));
    let r = get(&bed.client, web(), "ws.test", "/", &[&big]).unwrap();
    assert_eq!(r.status, 431, "{r:?}");
    let r = bed.client.run(|| exchange((LB, 80).into(), b"\x00\x01\x02 garbage\r\n\r\n")).unwrap();
    assert!(r.as_ref().map_or(true, |r| r.status == 400), "{r:?}");
    assert_eq!(upgrade().1, "hello through the tunnel", "the proxy no longer serves after bad clients");
    let log = agent.stop().unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

/// Katran in front of Proxygen, here: an L4 service of the XDP tier whose backends are hosts
/// running an L7 listener on the VIP (DSR to them); each L7 host proxies to its nginx. The L7
/// tier sees the real client (L2 DSR keeps the client's address) and answers it directly.
#[test]
fn the_xdp_tier_fronts_l7_hosts_by_dsr() {
    use xlb_tests::topology::VIP;
    let bed = L2Bed::new(2).expect("test bed");
    let mut hosts = Vec::new();
    for i in 0..2 {
        let nginx = Nginx::start(&bed.backends[i], &format!("l7host-{i}")).unwrap();
        let config = format!(
            "interface = \"{IFACE}\"\n\n[health]\ninterval_ms = 200\ntimeout_ms = 100\nrise = 1\nfall = 2\n\n\
             [[l7]]\nname = \"edge\"\nlisten = \"0.0.0.0:80\"\nmode = \"http\"\n\n[[l7.backend]]\naddress = \"127.0.0.1:{HTTP_PORT}\"\n"
        );
        let agent = AgentProcess::start(&bed.backends[i], &config, &[]).unwrap();
        hosts.push((nginx, agent));
    }
    let front = format!(
        "interface = \"{IFACE}\"\nhash_seed = 7\n\n[health]\ninterval_ms = 200\ntimeout_ms = 100\nrise = 1\nfall = 2\n\n\
         [[service]]\nname = \"front\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\n\
         [[service.backend]]\naddress = \"{}\"\n\n[[service.backend]]\naddress = \"{}\"\n",
        backend_addr(0),
        backend_addr(1)
    );
    let mut agent = AgentProcess::start(&bed.lb, &front, &[]).unwrap();
    let t = tally(&bed.client, (VIP, 80).into(), "edge.test", 100).unwrap();
    for i in 0..2 {
        let n = t.get(&format!("l7host-{i}")).copied().unwrap_or(0);
        assert!(n > 25, "l7host-{i} answered {n} of 100: {t:?}");
    }
    assert_eq!(t.values().sum::<usize>(), 100, "{t:?}");
    for (nginx, _) in &hosts {
        // The L7 host's own health checks carry no X-Forwarded-For; every proxied request does.
        let proxied: Vec<Vec<String>> = nginx.log().into_iter().filter(|l| l[1] != "-").collect();
        assert!(
            proxied.len() > 25 && proxied.iter().all(|l| l[1] == CLIENT.to_string()),
            "the L7 tier did not see the client: {proxied:?}"
        );
    }
    agent.stop().unwrap();
    for (_, mut a) in hosts {
        a.stop().unwrap();
    }
}
