//! `cargo xtask bench --only l7`: the agent's L7 proxy against HAProxy (`mode http`) and
//! nginx (`proxy_pass`), and the client straight to the backends, in one run on the L2 bed:
//! every proxy in the balancer's namespace in front of the same two nginx backends.
//!
//! - wrk with keep-alive and with `Connection: close` (HTTP/1.1): req/s, p50/p99, and the
//!   proxy process's CPU seconds (utime + stime of all its threads and children), so req/s per
//!   proxy CPU-second;
//! - h2load over TLS with ALPN h2 (xlb and HAProxy);
//! - memory: the proxy's RSS growth with 10,000 idle keep-alive client connections (each has
//!   made one request), per connection, xlb against HAProxy.
//!
//! Scenarios alternate within each repetition; medians are reported. Prints a markdown table
//! and writes target/bench/l7-<time>.json and l7-latest.json. Needs root.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};
use xlb_tests::{
    agent::{AgentProcess, TempDir},
    bench::{machine, machine_json, write_results},
    certs::Ca,
    loadgen::{run_wrk, wait_tcp, wrk_spread_script, Daemon, WrkOptions},
    netns::Netns,
    nginx::{Nginx, HTTP_PORT},
    topology::{backend_addr, L2Bed, IFACE, LB},
};

const BACKENDS: usize = 2;
const XLB: u16 = 80;
const XLB_TLS: u16 = 443;
const HAPROXY: u16 = 81;
const HAPROXY_TLS: u16 = 444;
const NGINX: u16 = 82;
/// Idle keep-alive connections of the memory row: as many as the machine's descriptor limit
/// (20,000 here) leaves room for on the client and the proxy side.
const IDLE_CONNECTIONS: usize = 8_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proxy {
    Xlb,
    Haproxy,
    Nginx,
    Direct,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Xlb => "xlb L7",
            Proxy::Haproxy => "HAProxy (mode http)",
            Proxy::Nginx => "nginx (proxy_pass)",
            Proxy::Direct => "direct to the backends",
        }
    }
}

/// utime + stime, in seconds, of `pid` and its threads (and children when `children`).
fn cpu_seconds(pid: u32, children: bool) -> f64 {
    let ticks = 100.0;
    let of = |pid: u32| -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let f: Vec<&str> = after.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the name.
        (num(11) + num(12)) / ticks
    };
    let mut total = of(pid);
    if children {
        for kid in child_pids(pid) {
            total += of(kid);
        }
    }
    total
}

fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.split_whitespace().nth(1).map(str::to_string)))
                .flatten()
                .and_then(|pp| pp.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}

/// Resident memory of `pid` (and its children), in bytes.
fn rss(pid: u32, children: bool) -> u64 {
    let of = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().to_string()))
            })
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    let mut total = of(pid);
    if children {
        total += child_pids(pid).into_iter().map(of).sum::<u64>();
    }
    total
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn start_haproxy(ns: &Netns, dir: &Path, pem: &Path) -> Result<Daemon> {
    let servers: String = (0..BACKENDS).map(|i| format!("    server b{i} {}:{HTTP_PORT}\n", backend_addr(i))).collect();
    let conf = format!(
        "global\n    nbthread 2\n    maxconn 9900\n\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    \
         timeout server 30s\n    option http-keep-alive\n\nfrontend fe\n    bind {LB}:{HAPROXY}\n    \
         bind {LB}:{HAPROXY_TLS} ssl crt {} alpn h2,http/1.1\n    default_backend be\n\nbackend be\n    balance roundrobin\n    \
         http-reuse always\n{servers}",
        pem.display()
    );
    let path = dir.join("haproxy.cfg");
    write(&path, &conf)?;
    let p = path.display().to_string();
    Daemon::spawn(ns, "haproxy", "haproxy", &["-db", "-f", &p], dir.join("haproxy.log"))
}

fn start_nginx_proxy(ns: &Netns, dir: &Path) -> Result<Daemon> {
    let d = dir.join("nginx-proxy");
    std::fs::create_dir_all(&d)?;
    let servers: String = (0..BACKENDS).map(|i| format!("        server {}:{HTTP_PORT};\n", backend_addr(i))).collect();
    let dd = d.display();
    let conf = format!(
        "daemon off;\nworker_processes 2;\nuser root;\npid {dd}/nginx.pid;\nerror_log {dd}/error.log warn;\nworker_rlimit_nofile 19000;\n\
         events {{ worker_connections 9000; }}\nhttp {{\n    access_log off;\n    client_body_temp_path {dd}/body;\n    proxy_temp_path {dd}/proxy;\n    \
         fastcgi_temp_path {dd}/fastcgi;\n    uwsgi_temp_path {dd}/uwsgi;\n    scgi_temp_path {dd}/scgi;\n    keepalive_requests 1000000;\n    \
         upstream be {{\n{servers}        keepalive 256;\n    }}\n    server {{\n        listen {LB}:{NGINX};\n        location / {{\n            \
         proxy_pass http://be;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n        }}\n    }}\n}}\n"
    );
    let path = d.join("nginx.conf");
    write(&path, &conf)?;
    let (p, pd) = (path.display().to_string(), d.display().to_string());
    Daemon::spawn(ns, "nginx-proxy", "nginx", &["-c", &p, "-p", &pd], d.join("nginx.log"))
}

fn xlb_config(crt: &Path, key: &Path) -> String {
    let backends: String =
        (0..BACKENDS).map(|i| format!("[[l7.backend]]\naddress = \"{}:{HTTP_PORT}\"\n\n", backend_addr(i))).collect();
    format!(
        "interface = \"{IFACE}\"\n\n[health]\ninterval_ms = 1000\ntimeout_ms = 500\n\n\
         [[l7]]\nname = \"bench\"\nlisten = \"{LB}:{XLB}\"\nmode = \"http\"\n[l7.health]\nkind = \"tcp\"\n\n{backends}\
         [[l7]]\nname = \"bench-tls\"\nlisten = \"{LB}:{XLB_TLS}\"\nmode = \"https\"\n[l7.health]\nkind = \"tcp\"\n\
         [[l7.tls]]\ncert = \"{}\"\nkey = \"{}\"\n\n{backends}",
        crt.display(),
        key.display()
    )
}

/// Opens `n` keep-alive connections from `ns` to `to`, one request on each, and keeps them
/// open; returns them (closed on drop).
fn idle_connections(ns: &Netns, to: SocketAddr, n: usize) -> Result<Vec<std::net::TcpStream>> {
    ns.run(move || -> Result<Vec<std::net::TcpStream>> {
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .with_context(|| format!("connection {i}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
            let mut buf = [0u8; 1024];
            let got = s.read(&mut buf)?;
            ensure!(got > 12 && buf.starts_with(b"HTTP/1.1 200"), "connection {i}: no 200");
            conns.push(s);
        }
        Ok(conns)
    })?
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (reps, secs) = if quick { (2, 2) } else { (3, 5) };
    // The idle client sockets here, as many in the proxy (it inherits the limit): the soft
    // limit up to the hard one.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }

    let bed = L2Bed::new(BACKENDS)?;
    let _backends: Vec<Nginx> =
        (0..BACKENDS).map(|i| Nginx::start(&bed.backends[i], &format!("b{i}"))).collect::<Result<_>>()?;
    let dir = TempDir::new("bench-l7")?;
    let ca = Ca::new(&dir.0, "bench-ca")?;
    let (crt, key) = ca.issue(&dir.0, "bench", &["bench.test"])?;
    let pem = dir.0.join("haproxy.pem");
    write(&pem, &(std::fs::read_to_string(&crt)? + &std::fs::read_to_string(&key)?))?;
    let mut agent = AgentProcess::start(&bed.lb, &xlb_config(&crt, &key), &[])?;
    let mut haproxy = start_haproxy(&bed.lb, &dir.0, &pem)?;
    let mut nginx = start_nginx_proxy(&bed.lb, &dir.0)?;
    std::thread::sleep(Duration::from_millis(300));
    haproxy.check_running()?;
    nginx.check_running()?;
    for port in [XLB, HAPROXY, NGINX] {
        wait_tcp(&bed.client, (LB, port).into(), Duration::from_secs(5))?;
    }
    let nginx_pid = std::fs::read_to_string(dir.0.join("nginx-proxy/nginx.pid"))?.trim().parse::<u32>()?;
    let pid = |p: Proxy| match p {
        Proxy::Xlb => Some((agent.pid(), false)),
        Proxy::Haproxy => Some((haproxy.pid(), false)),
        Proxy::Nginx => Some((nginx_pid, true)),
        Proxy::Direct => None,
    };
    let script = dir.0.join("spread.lua");
    write(&script, &wrk_spread_script(&(0..BACKENDS).map(|i| backend_addr(i).into()).collect::<Vec<_>>(), HTTP_PORT))?;

    // (proxy, close) -> [(req/s, p50, p99, req per CPU-second)]
    let mut rows: BTreeMap<(usize, bool), Vec<(f64, f64, f64, f64)>> = BTreeMap::new();
    let order = [Proxy::Xlb, Proxy::Haproxy, Proxy::Nginx, Proxy::Direct];
    for rep in 0..reps {
        for k in 0..order.len() {
            let p = order[(k + rep) % order.len()];
            for close in [false, true] {
                let (url, script) = match p {
                    Proxy::Xlb => (format!("http://{LB}:{XLB}/"), None),
                    Proxy::Haproxy => (format!("http://{LB}:{HAPROXY}/"), None),
                    Proxy::Nginx => (format!("http://{LB}:{NGINX}/"), None),
                    Proxy::Direct => (format!("http://{}:{HTTP_PORT}/", backend_addr(0)), Some(script.clone())),
                };
                let o = WrkOptions { threads: 2, connections: 64, duration: Duration::from_secs(secs), close, script };
                let cpu0 = pid(p).map(|(pid, ch)| cpu_seconds(pid, ch));
                let r = run_wrk(&bed.client, &url, &o, dir.0.join("wrk.log"))?;
                let cpu = pid(p).map(|(pid, ch)| cpu_seconds(pid, ch)).zip(cpu0).map(|(a, b)| a - b);
                ensure!(
                    r.errors * 100 <= r.requests.max(1),
                    "{}: {} errors of {} requests",
                    p.name(),
                    r.errors,
                    r.requests
                );
                let per_cpu = cpu.filter(|&c| c > 0.0).map_or(0.0, |c| r.requests as f64 / c);
                eprintln!(
                    "rep {rep} {:<24} {:<10} {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us  {:>8.0} req/CPU-s",
                    p.name(),
                    if close { "close" } else { "keep-alive" },
                    r.requests_per_sec,
                    r.p50_us,
                    r.p99_us,
                    per_cpu
                );
                rows.entry((order.iter().position(|&q| q == p).unwrap_or(0), close)).or_default().push((
                    r.requests_per_sec,
                    r.p50_us,
                    r.p99_us,
                    per_cpu,
                ));
            }
        }
    }

    // HTTP/2 over TLS (ALPN h2): h2load, 2 threads, 32 clients, 10 streams each.
    let mut h2: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for rep in 0..reps {
        for (k, (p, port)) in [(Proxy::Xlb, XLB_TLS), (Proxy::Haproxy, HAPROXY_TLS)].into_iter().enumerate() {
            let (pid, ch) = pid(p).expect("a proxy");
            let cpu0 = cpu_seconds(pid, ch);
            let url = format!("https://{LB}:{port}/");
            let out = bed
                .client
                .command("h2load")
                .args(["-t", "2", "-c", "32", "-m", "10", "-D", &secs.to_string(), "--warm-up-time", "1", &url])
                .output()
                .context("cannot run h2load (nghttp2-client)")?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let cpu = cpu_seconds(pid, ch) - cpu0;
            let rps = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("finished in").and_then(|r| r.split(',').nth(1)))
                .and_then(|v| v.trim().split_whitespace().next()?.parse::<f64>().ok());
            let done = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("requests:"))
                .and_then(|r| r.split(',').find_map(|f| f.trim().strip_suffix(" succeeded")?.parse::<f64>().ok()));
            let (Some(rps), Some(done)) = (rps, done) else {
                bail!("h2load against {url}:\n{text}\n{}", String::from_utf8_lossy(&out.stderr))
            };
            eprintln!(
                "rep {rep} {:<24} h2 TLS     {rps:>9.0} req/s  {:>8.0} req/CPU-s",
                p.name(),
                done / cpu.max(1e-9)
            );
            h2.entry(k).or_default().push((rps, done / cpu.max(1e-9)));
        }
    }

    // Memory: idle keep-alive connections.
    let mut memory = Vec::new();
    for (p, port) in [(Proxy::Xlb, XLB), (Proxy::Haproxy, HAPROXY)] {
        let (pid, ch) = pid(p).expect("a proxy");
        std::thread::sleep(Duration::from_millis(500));
        let before = rss(pid, ch);
        let conns = idle_connections(&bed.client, (LB, port).into(), IDLE_CONNECTIONS)?;
        std::thread::sleep(Duration::from_millis(1000));
        let after = rss(pid, ch);
        drop(conns);
        let per = after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64;
        eprintln!(
            "{:<24} RSS {:.1} MB -> {:.1} MB with {IDLE_CONNECTIONS} idle connections: {per:.0} B each",
            p.name(),
            before as f64 / 1e6,
            after as f64 / 1e6
        );
        memory.push((p, before, after, per));
        std::thread::sleep(Duration::from_millis(500));
    }

    // The table.
    let mut out = String::new();
    let base = |close: bool, f: fn(&(f64, f64, f64, f64)) -> f64| {
        rows.get(&(1, close)).map_or(0.0, |v| median(v.iter().map(f).collect()))
    };
    writeln!(out, "| scenario | connections | req/s | p50 µs | p99 µs | req per proxy CPU-s | req/s ÷ HAProxy | req/CPU-s ÷ HAProxy |")?;
    writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|")?;
    for close in [false, true] {
        for (i, p) in order.iter().enumerate() {
            let Some(v) = rows.get(&(i, close)) else { continue };
            let rps = median(v.iter().map(|r| r.0).collect());
            let per = median(v.iter().map(|r| r.3).collect());
            let (b_rps, b_per) = (base(close, |r| r.0), base(close, |r| r.3));
            let per_text = if *p == Proxy::Direct { "-".to_string() } else { format!("{per:.0}") };
            let ratio_per =
                if *p == Proxy::Direct || b_per == 0.0 { "-".to_string() } else { format!("{:.2}", per / b_per) };
            writeln!(
                out,
                "| {} | {} | {rps:.0} | {:.0} | {:.0} | {per_text} | {:.2} | {ratio_per} |",
                p.name(),
                if close { "close" } else { "keep-alive" },
                median(v.iter().map(|r| r.1).collect()),
                median(v.iter().map(|r| r.2).collect()),
                rps / b_rps.max(1e-9)
            )?;
        }
    }
    let h2_of = |k: usize| {
        h2.get(&k)
            .map_or((0.0, 0.0), |v| (median(v.iter().map(|r| r.0).collect()), median(v.iter().map(|r| r.1).collect())))
    };
    let (x, h) = (h2_of(0), h2_of(1));
    writeln!(
        out,
        "| xlb L7 | h2 over TLS (h2load) | {:.0} | - | - | {:.0} | {:.2} | {:.2} |",
        x.0,
        x.1,
        x.0 / h.0.max(1e-9),
        x.1 / h.1.max(1e-9)
    )?;
    writeln!(out, "| HAProxy (mode http) | h2 over TLS (h2load) | {:.0} | - | - | {:.0} | 1.00 | 1.00 |", h.0, h.1)?;
    writeln!(out)?;
    writeln!(
        out,
        "| proxy | RSS before | RSS with {IDLE_CONNECTIONS} idle keep-alive connections | bytes per connection |"
    )?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (p, before, after, per) in &memory {
        writeln!(out, "| {} | {:.1} MB | {:.1} MB | {per:.0} |", p.name(), *before as f64 / 1e6, *after as f64 / 1e6)?;
    }
    print!("{out}");
    let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let results = serde_json::json!({
        "machine": machine_json(&machine()),
        "reps": reps,
        "seconds_per_run": secs,
        "table": out,
    });
    write_results("l7", unix, &results)?;
    let _ = agent.stop();
    Ok(())
}
