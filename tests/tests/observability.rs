//! The dashboard and the alert rules in packaging/ against the real thing: promtool's own tests
//! of the rules, and a real Prometheus (Debian's package, installed by `cargo xtask setup`)
//! scraping a running agent under traffic in the balancer's namespace: every metric the
//! dashboard and the rules name is one the agent exports, and every panel's and rule's
//! expression returns series. Needs root.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use xlb_tests::{
    agent::TempDir,
    netns::Netns,
    scenario::{vip, Scenario},
    traffic::{tcp_requests, udp_requests},
};

fn packaging(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging").join(file)
}

#[test]
fn the_rules_pass_promtool() {
    for args in [vec!["check", "rules", "xlb-rules.yml"], vec!["test", "rules", "xlb-rules.test.yml"]] {
        let out = Command::new("promtool").args(&args).current_dir(packaging("")).output().expect("promtool");
        let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "promtool {args:?}:\n{said}");
    }
}

/// Prometheus in a namespace, killed on drop.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const PROMETHEUS: &str = "127.0.0.1:9090";

/// GET `path` from the Prometheus inside `ns`: (status line, body).
fn get(ns: &Netns, path: String) -> Result<(String, String), String> {
    ns.run(move || -> Result<(String, String), String> {
        let mut s = std::net::TcpStream::connect(PROMETHEUS).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP body")?;
        Ok((head.lines().next().unwrap_or("").to_string(), body.to_string()))
    })
    .map_err(|e| e.to_string())?
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The result of an instant query.
fn query(ns: &Netns, expr: &str) -> serde_json::Value {
    let (status, body) = get(ns, format!("/api/v1/query?query={}", encode(expr))).expect("query Prometheus");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status}: {e}: {body}"));
    assert_eq!(v["status"], "success", "{expr}: {body}");
    v["data"]["result"].clone()
}

/// The expression a rule alerts on without its threshold: what must return series even while
/// nothing is wrong.
fn signal_of(expr: &str) -> &str {
    [" == ", " > "].iter().filter_map(|op| expr.rfind(op)).max().map_or(expr, |i| &expr[..i])
}

#[test]
fn a_real_prometheus_scrapes_every_series_the_dashboard_and_the_rules_use() {
    let mut s = Scenario::start(3).expect("test bed");
    let dir = TempDir::new("prometheus").unwrap();
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: xlb\n    static_configs:\n      - targets: ['{}']\n",
            packaging("xlb-rules.yml").display(),
            xlb_tests::scenario::METRICS
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
    let child = s
        .bed
        .lb
        .command("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus (cargo xtask setup installs it)");
    let _prometheus = Prometheus(child);

    // Traffic, while Prometheus comes up and scrapes.
    let started = Instant::now();
    let ns = &s.bed.lb;
    let mut scraped = false;
    while started.elapsed() < Duration::from_secs(60) && !scraped {
        tcp_requests(&s.bed.client, vip(), 30).unwrap();
        udp_requests(&s.bed.client, vip(), 10).unwrap();
        scraped = get(ns, "/-/ready".into()).is_ok_and(|(status, _)| status.contains("200"))
            && query(ns, "count_over_time(xlb_frames_total{reason=\"tx_forwarded\"}[1m])")
                .as_array()
                .and_then(|r| r.first())
                .and_then(|r| r["value"][1].as_str().map(|v| v.parse::<f64>().unwrap_or(0.0) >= 3.0))
                .unwrap_or(false);
    }
    assert!(
        scraped,
        "Prometheus never had three scrapes:\n{}",
        std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default()
    );
    let up = query(ns, "up{job=\"xlb\"}");
    assert_eq!(up[0]["value"][1], "1", "the scrape failed: {up}");

    // What the agent exports, as Prometheus parsed it.
    let (_, names) = get(ns, "/api/v1/label/__name__/values".into()).unwrap();
    let names: serde_json::Value = serde_json::from_str(&names).unwrap();
    let exported: BTreeSet<String> =
        names["data"].as_array().unwrap().iter().filter_map(|n| n.as_str().map(String::from)).collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(packaging("xlb-dashboard.json")).unwrap()).unwrap();
    let mut exprs: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_string();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_string()))
        })
        .collect();
    let rules = std::fs::read_to_string(packaging("xlb-rules.yml")).unwrap();
    for line in rules.lines().filter_map(|l| l.trim().strip_prefix("expr: ")) {
        exprs.push((format!("rule {line}"), signal_of(line).to_string()));
    }
    assert!(exprs.len() >= 20, "{exprs:?}");
    for (what, expr) in &exprs {
        for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("xlb_")) {
            assert!(exported.contains(name), "{what}: {name} is not exported; the agent has {exported:?}");
        }
        let result = query(ns, expr);
        assert!(result.as_array().is_some_and(|r| !r.is_empty()), "{what}: {expr} returned no series: {result}");
    }
    eprintln!("{} expressions returned series; the agent exports {} metrics", exprs.len(), exported.len());
    s.agent.stop().unwrap();
}
