//! The control API through `lb-agent ctl`, against a running agent with real traffic: add,
//! drain and remove backends and services; bad requests are refused and change nothing.
//! Needs root.
use xlb_tests::{
    scenario::{backend_name, config_for, vip, Scenario, PORT},
    topology::{backend_addr, VIP},
    traffic::{failures, tcp_requests, udp_requests},
};

#[test]
fn ctl_changes_the_running_balancer() {
    let mut s = Scenario::start_with(4, &config_for(&[(0, 1), (1, 1), (2, 1)])).expect("test bed");
    let ctl = |s: &Scenario, args: &[&str]| s.agent.ctl(args).unwrap();

    let (ok, list, _) = ctl(&s, &["list"]);
    assert!(ok && list.contains("demo-tcp (l2 tcp)") && list.contains(&backend_addr(2).to_string()), "{list}");
    let (ok, json, _) = ctl(&s, &["--json", "list"]);
    assert!(ok, "{json}");
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["services"].as_array().unwrap().len(), 2, "{json}");

    let status = std::process::Command::new(xlb_tests::agent::agent_binary().unwrap())
        .arg("status")
        .arg("--once")
        .arg("--socket")
        .arg(s.agent.socket())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success() && text.contains("PKT/S") && text.contains("demo-udp (l2 udp)"), "{text}");

    // Add a fourth backend: new connections reach it.
    let b3 = backend_addr(3).to_string();
    let (ok, out, err) = ctl(&s, &["add-backend", "demo-tcp", &b3]);
    assert!(ok, "{out}{err}");
    let t = tcp_requests(&s.bed.client, vip(), 200).unwrap();
    assert!(t.contains_key(&backend_name(3)) && failures(&t) == 0, "{t:?}");

    // Drain backend 0: no new connections go there.
    let b0 = backend_addr(0).to_string();
    assert!(ctl(&s, &["drain", "demo-tcp", &b0]).0);
    let t = tcp_requests(&s.bed.client, vip(), 200).unwrap();
    assert!(!t.contains_key(&backend_name(0)) && failures(&t) == 0, "{t:?}");
    let (_, list, _) = ctl(&s, &["list"]);
    assert!(list.lines().any(|l| l.contains(&b0) && l.contains("drain")), "{list}");

    // Remove backend 1.
    assert!(ctl(&s, &["remove-backend", "demo-tcp", &backend_addr(1).to_string()]).0);
    let t = tcp_requests(&s.bed.client, vip(), 200).unwrap();
    assert!(!t.contains_key(&backend_name(1)) && failures(&t) == 0, "{t:?}");

    // Refused: unknown service, duplicate backend, wrong family, bad weight; nothing changes.
    for bad in [
        vec!["add-backend", "nope", "10.99.0.20"],
        vec!["add-backend", "demo-tcp", &b3],
        vec!["add-backend", "demo-tcp", "fd00::1"],
        vec!["set-weight", "demo-tcp", &b3, "70000"],
    ] {
        let (ok, _, err) = ctl(&s, &bad);
        assert!(!ok && err.starts_with("refused: "), "{bad:?}: {err}");
    }
    let after = tcp_requests(&s.bed.client, vip(), 100).unwrap();
    assert!(failures(&after) == 0 && !after.contains_key(&backend_name(0)), "{after:?}");

    // Past a limit: a service whose tables the MAGLEV map cannot hold is refused by the same
    // validator as the file, and nothing changes.
    let (_, before, _) = ctl(&s, &["--json", "list"]);
    let big = ["add-service", "10.99.0.100", "8080", "tcp", "--maglev-size", "655373", "--backend", &b3];
    let (ok, _, err) = ctl(&s, &big);
    assert!(!ok && err.contains("maglev_capacity"), "{err}");
    let (_, unchanged, _) = ctl(&s, &["--json", "list"]);
    // Services and their backends' addresses and weights (the counters move on).
    let shape = |json: &str| {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let services = v["services"].as_array().unwrap().iter();
        let backends = |s: &serde_json::Value| -> Vec<String> {
            s["backends"].as_array().unwrap().iter().map(|b| format!("{}={}", b["address"], b["weight"])).collect()
        };
        services.map(|s| (s["name"].to_string(), s["port"].to_string(), backends(s))).collect::<Vec<_>>()
    };
    assert_eq!(shape(&before), shape(&unchanged), "{unchanged}");

    // Remove the UDP service by VIP:PORT/PROTOCOL: its datagrams are dropped now.
    let udp = format!("{VIP}:{PORT}/udp");
    assert!(ctl(&s, &["remove-service", &udp]).0);
    let t = udp_requests(&s.bed.client, vip(), 5).unwrap();
    assert_eq!(failures(&t), 5, "{t:?}");

    // And back, through add-service, with its three backends.
    let backends: Vec<String> = (0..3).map(|i| format!("--backend={}", backend_addr(i))).collect();
    let mut args = vec![
        "add-service",
        "10.99.0.100",
        "80",
        "udp",
        "--name",
        "demo-udp-again",
        "--maglev-size",
        "251",
        "--scheduler",
        "source-hash",
    ];
    args.extend(backends.iter().map(String::as_str));
    let (ok, out, err) = ctl(&s, &args);
    assert!(ok, "{out}{err}");
    // Its backends start down (initial_state) and come in as their first checks pass: wait for
    // all three, or the table changes under the client mid-run.
    s.agent.wait_for_count("service demo-udp-again: backend", 3, std::time::Duration::from_secs(10)).unwrap();
    let t = udp_requests(&s.bed.client, vip(), 60).unwrap();
    assert_eq!(failures(&t), 0, "{t:?}");
    assert_eq!(t.len(), 1, "source-hash: one client, one backend: {t:?}");
    let (_, json, _) = ctl(&s, &["--json", "list"]);
    assert!(json.contains("\"scheduler\": \"source-hash\""), "{json}");

    // An unreachable socket is a clear error.
    let out = std::process::Command::new(xlb_tests::agent::agent_binary().unwrap())
        .args(["ctl", "--socket", "/nonexistent/agent.sock", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"));
    let log = s.agent.stop().unwrap();
    assert!(log.contains("api: demo-tcp: backend 10.99.0.14 added"), "{log}");
    // The kernel took the object's BTF: aya warns at load when it does not.
    assert!(!log.contains("BTF"), "{log}");
}
