//! The `lb-agent` command line: exit codes, error messages, XDP modes. Needs root.
use std::{process::Command, time::Duration};

use xlb_tests::{
    agent::{agent_binary, AgentProcess, TempDir},
    netns::Netns,
};

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(agent_binary().unwrap()).args(args).output().unwrap()
}

fn write_config(dir: &TempDir, text: &str) -> String {
    let path = dir.0.join("xlb.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// A service whose backend has a fixed MAC and no health check: the agent needs no neighbour.
fn config(interface: &str) -> String {
    format!(
        r#"interface = "{interface}"

[[service]]
vip = "10.98.0.100"
port = 80
protocol = "tcp"
maglev_size = 251
[service.health]
enabled = false

[[service.backend]]
address = "10.98.0.11"
mac = "02:00:00:00:00:0b"
"#
    )
}

#[test]
fn check_prints_the_bird_config_of_the_bgp_section() {
    let dir = TempDir::new("cli").unwrap();
    let bgp = "\n[bgp]\nlocal_as = 65001\nrouter_id = \"10.0.0.2\"\n\n[[bgp.neighbor]]\naddress = \"10.0.0.1\"\npeer_as = 65000\n";
    let path = write_config(&dir, &format!("{}{bgp}", config("eth0")));
    let out = agent(&["check", "--config", &path, "--bird-config"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in
        ["neighbor 10.0.0.1 as 65000;", "protocol static xlb_vip4_0a620064 {", "route 10.98.0.100/32 blackhole;"]
    {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    // An operator's BIRD: the filter and the VIP protocols to add to its config.
    let path = write_config(&dir, &format!("{}\n[bgp]\nbird_socket = \"/run/bird/bird.ctl\"\n", config("eth0")));
    let out = agent(&["check", "--config", &path, "--bird-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("filter xlb_export") && text.contains("xlb_vip4_0a620064_drain"), "{text}");
    assert!(!text.contains("protocol bgp"), "{text}");
    // Without [bgp] there is nothing to print: say so.
    let path = write_config(&dir, &config("eth0"));
    let out = agent(&["check", "--config", &path, "--bird-config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no [bgp] section"), "{out:?}");
}

#[test]
fn check_accepts_a_good_config_and_explains_a_bad_one() {
    let dir = TempDir::new("cli").unwrap();
    let good = write_config(&dir, &config("eth0"));
    let out = agent(&["check", "--config", &good]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (1 services, 1 backends, interface eth0)"));

    let bad = write_config(&dir, &config("eth0").replace("10.98.0.11", "10.98.0.311").replace("251", "250"));
    let out = agent(&["check", "--config", &bad]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 7, column 15: service[0].maglev_size: expected a prime number"), "{stderr}");
    assert!(
        stderr.contains(
            "line 12, column 11: service[0].backend[0].address: expected an IPv4 or IPv6 address, got \"10.98.0.311\""
        ),
        "{stderr}"
    );

    let out = agent(&["check", "--config", "/nonexistent/xlb.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config /nonexistent/xlb.toml"));
}

#[test]
fn run_refuses_a_bad_config_and_an_unknown_interface() {
    let dir = TempDir::new("cli").unwrap();
    let bad = write_config(&dir, "interface = 3\n");
    let out = agent(&["run", "--config", &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid config"), "{out:?}");

    let ns = Netns::new("cli").unwrap();
    let path = write_config(&dir, &config("nosuchif0"));
    let out = ns.command(agent_binary().unwrap().to_str().unwrap()).args(["run", "--config", &path]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown interface \"nosuchif0\""), "{out:?}");
}

#[test]
fn logs_can_be_json_lines() {
    let dir = TempDir::new("cli").unwrap();
    let bad = write_config(&dir, "interface = 3\n");
    let out = agent(&["--log-format", "json", "run", "--config", &bad]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value = serde_json::from_str(stderr.lines().next().unwrap()).expect("a JSON log line");
    assert_eq!(line["level"], "ERROR");
    assert!(line["msg"].as_str().unwrap().contains("invalid config"), "{line}");
    assert!(line["ts"].as_str().unwrap().starts_with("20"), "{line}");
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["check", "--help"],
        &["decap", "--help"],
        &["ctl", "--help"],
        &["ctl", "drain", "--help"],
    ] {
        let out = agent(args);
        assert!(out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
    assert_eq!(agent(&["frobnicate"]).status.code(), Some(2), "clap's usage error");
}

/// Interfaces without native XDP (a bridge) fall back to generic mode; `--xdp-mode` forces one.
#[test]
fn native_falls_back_to_generic_and_modes_can_be_forced() {
    let ns = Netns::new("modes").unwrap();
    ns.exec(&["ip", "link", "add", "br0", "type", "bridge"]).unwrap();
    ns.exec(&["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"]).unwrap();
    for dev in ["br0", "veth0", "veth1"] {
        ns.exec(&["ip", "link", "set", dev, "up"]).unwrap();
    }

    let mut a = AgentProcess::start(&ns, &config("br0"), &[]).unwrap();
    let log = a.log_text();
    assert!(log.contains("falling back to generic mode") && log.contains("XDP Generic mode"), "{log}");
    assert!(String::from_utf8_lossy(&ns.exec(&["ip", "link", "show", "br0"]).unwrap().stdout).contains("xdpgeneric"));
    a.stop().unwrap();
    let link = ns.exec(&["ip", "link", "show", "br0"]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"), "detached on SIGTERM");

    let mut a = AgentProcess::start(&ns, &config("veth0"), &["--xdp-mode", "generic"]).unwrap();
    assert!(a.log_text().contains("XDP Generic mode"));
    a.stop().unwrap();

    let mut a = AgentProcess::start(&ns, &config("veth0"), &["--xdp-mode", "native"]).unwrap();
    assert!(a.log_text().contains("XDP Native mode"));
    assert!(String::from_utf8_lossy(&ns.exec(&["ip", "link", "show", "veth0"]).unwrap().stdout).contains("xdp"));
    // SIGINT detaches as SIGTERM does.
    a.signal(libc::SIGINT);
    a.wait_for_log("detached from veth0", Duration::from_secs(5)).unwrap();
}
