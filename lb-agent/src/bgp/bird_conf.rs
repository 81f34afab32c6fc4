//! The BIRD configuration the agent writes for the BIRD it runs: one BGP session per
//! neighbour, and two static protocols per VIP that the agent enables and disables through
//! BIRD's control socket: `xlb_vip…` (the announcement) and `xlb_vip…_drain` (the same route,
//! tagged GRACEFUL_SHUTDOWN with a worse MED). Both start disabled: BIRD announces nothing
//! the agent has not asked for, even when it starts before the data path is ready.
use std::{fmt::Write as _, net::IpAddr};

use crate::config::{BgpConfig, Community, ManagedBird};

/// RFC 8326's GRACEFUL_SHUTDOWN community.
pub const GRACEFUL_SHUTDOWN: Community = (65_535, 0);

/// The MED of every normal announcement: identical on every host, so that the router merges
/// the hosts' routes into one ECMP route.
pub const MED: u32 = 0;

/// The MED of a draining host's routes: any router prefers the other hosts' routes to it.
pub const DRAIN_MED: u32 = 1_000_000;

/// The static protocol announcing `vip` (`drain`: its draining twin). A name BIRD accepts
/// (letters, digits, underscores) that any host derives from the address alone, so an
/// operator's own BIRD config can carry the same protocols.
pub fn vip_protocol(vip: IpAddr, drain: bool) -> String {
    let mut name = match vip {
        IpAddr::V4(a) => format!("xlb_vip4_{:08x}", u32::from(a)),
        IpAddr::V6(a) => format!("xlb_vip6_{:032x}", u128::from(a)),
    };
    if drain {
        name += "_drain";
    }
    name
}

/// The BGP protocol of the `i`th neighbour.
pub fn peer_protocol(i: usize) -> String {
    format!("xlb_peer{i}")
}

fn communities(list: &[Community]) -> String {
    list.iter().map(|(a, v)| format!(" bgp_community.add(({a}, {v}));")).collect()
}

/// The static protocols of `vip`, both disabled; `extra` are the VIP's configured communities.
pub fn vip_protocols(vip: IpAddr, extra: &[Community]) -> String {
    let (channel, len) = if vip.is_ipv4() { ("ipv4", 32) } else { ("ipv6", 128) };
    let mut out = String::new();
    for drain in [false, true] {
        let mut tags = communities(extra);
        if drain {
            tags += &communities(&[GRACEFUL_SHUTDOWN]);
        }
        let _ = writeln!(
            out,
            "protocol static {} {{\n  disabled;\n  {channel} {{ import filter {{{tags} accept; }}; }};\n  route {vip}/{len} blackhole;\n}}",
            vip_protocol(vip, drain)
        );
    }
    out
}

/// The export filter every session must use: only the VIPs leave, with the attributes ECMP
/// needs identical on every host; the drain twin (tagged GRACEFUL_SHUTDOWN) with a MED every
/// router likes less.
pub fn export_filter() -> String {
    let (gs_a, gs_v) = GRACEFUL_SHUTDOWN;
    format!(
        "filter xlb_export {{\n  if source != RTS_STATIC || proto !~ \"xlb_vip*\" then reject;\n  bgp_origin = ORIGIN_IGP;\n  \
         if ({gs_a}, {gs_v}) ~ bgp_community then bgp_med = {DRAIN_MED}; else bgp_med = {MED};\n  accept;\n}}\n"
    )
}

/// What an operator who runs BIRD adds to its config (`lb-agent check --bird-config`): the
/// export filter for the sessions towards the routers, and the VIP protocols.
pub fn render_external(bgp: &BgpConfig, vips: &[IpAddr]) -> String {
    let mut out = String::from("# For the BIRD that lb-agent drives through bgp.bird_socket: export to the routers with\n# `export filter xlb_export;`.\n");
    out += &export_filter();
    for &vip in vips {
        out += &vip_protocols(vip, communities_of(bgp, vip));
    }
    out
}

fn communities_of(bgp: &BgpConfig, vip: IpAddr) -> &[Community] {
    bgp.communities.iter().find(|(a, _)| *a == vip).map_or(&[][..], |(_, c)| c.as_slice())
}

/// BIRD's whole config for these VIPs; `log` goes to BIRD's stderr, which the agent logs.
pub fn render(bgp: &BgpConfig, bird: &ManagedBird, vips: &[IpAddr]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Written by lb-agent at every start and VIP change: edit the agent's [bgp] instead.");
    let _ = writeln!(out, "log stderr {{ info, remote, warning, error, auth, fatal, bug }};");
    let _ = writeln!(out, "router id {};", bird.router_id);
    // Protocol times as seconds since the epoch: one token that `show protocols` can be split on.
    let _ = writeln!(out, "timeformat protocol \"%s\";");
    let _ = writeln!(out, "protocol device {{ }}");
    if bird.neighbors.iter().any(|n| n.bfd.is_some()) {
        let _ = writeln!(out, "protocol bfd xlb_bfd {{ }}");
    }
    out += &export_filter();
    for (i, n) in bird.neighbors.iter().enumerate() {
        let channel = if n.address.is_ipv4() { "ipv4" } else { "ipv6" };
        let _ = writeln!(out, "protocol bgp {} {{", peer_protocol(i));
        let _ = writeln!(out, "  local as {};\n  neighbor {} as {};", bird.local_as, n.address, n.peer_as);
        let keepalive = (n.hold_secs / 3).max(1);
        let _ = writeln!(out, "  hold time {}; keepalive time {keepalive};", n.hold_secs);
        // A router back after a failure is found again within seconds, not BIRD's minutes.
        let _ = writeln!(out, "  connect retry time 2; error wait time 1, 10;");
        if let Some(bfd) = n.bfd {
            let ms = bfd.interval.as_millis();
            let _ = writeln!(
                out,
                "  bfd {{ min rx interval {ms} ms; min tx interval {ms} ms; idle tx interval {} ms; multiplier {}; }};",
                ms.max(1000),
                bfd.multiplier
            );
        }
        if let Some(password) = &n.password {
            let _ = writeln!(out, "  password \"{password}\";");
        }
        let _ = writeln!(out, "  {channel} {{ import none; export filter xlb_export; }};\n}}");
    }
    for &vip in vips {
        out += &vip_protocols(vip, communities_of(bgp, vip));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{BfdConfig, Bird, NeighborConfig};

    fn config() -> (BgpConfig, ManagedBird) {
        let bird = ManagedBird {
            local_as: 65001,
            router_id: "10.10.0.2".parse().unwrap(),
            binary: "bird".into(),
            run_dir: "/tmp".into(),
            neighbors: vec![
                NeighborConfig {
                    address: "10.10.0.1".parse().unwrap(),
                    peer_as: 65000,
                    password: Some("s3cret".into()),
                    hold_secs: 3,
                    bfd: Some(BfdConfig { interval: Duration::from_millis(100), multiplier: 3 }),
                },
                NeighborConfig {
                    address: "fd10::1".parse().unwrap(),
                    peer_as: 65000,
                    password: None,
                    hold_secs: 9,
                    bfd: None,
                },
            ],
        };
        let bgp = BgpConfig {
            bird: Bird::Managed(bird.clone()),
            communities: vec![("10.0.0.100".parse().unwrap(), vec![(65001, 100)])],
            drain: Duration::from_secs(10),
            withdraw_wait: Duration::from_secs(1),
        };
        (bgp, bird)
    }

    #[test]
    fn protocol_names_come_from_the_address() {
        assert_eq!(vip_protocol("10.0.0.100".parse().unwrap(), false), "xlb_vip4_0a000064");
        assert_eq!(vip_protocol("10.0.0.100".parse().unwrap(), true), "xlb_vip4_0a000064_drain");
        let v6 = vip_protocol("fd00::100".parse().unwrap(), true);
        assert_eq!(v6, "xlb_vip6_fd000000000000000000000000000100_drain");
        assert!(v6.len() < 64, "BIRD's symbols are at most 64 characters");
    }

    #[test]
    fn config_has_sessions_and_disabled_vips() {
        let (bgp, bird) = config();
        let text = render(&bgp, &bird, &["10.0.0.100".parse().unwrap(), "fd00::100".parse().unwrap()]);
        assert!(text.contains("neighbor 10.10.0.1 as 65000;"));
        assert!(text.contains("password \"s3cret\";"));
        assert!(text.contains("bfd { min rx interval 100 ms;"));
        assert!(text.contains("protocol bfd xlb_bfd"));
        assert!(text.contains("hold time 9; keepalive time 3;"));
        assert!(text.contains("route 10.0.0.100/32 blackhole;"));
        assert!(text.contains("route fd00::100/128 blackhole;"));
        assert!(text.contains("bgp_community.add((65001, 100)); bgp_community.add((65535, 0)); accept;"));
        assert_eq!(text.matches("disabled;").count(), 4);
    }

    /// BIRD itself parses what we write (`bird -p`), when it is installed.
    #[test]
    fn bird_accepts_the_config() {
        let Ok(out) = std::process::Command::new("bird").arg("--version").output() else {
            eprintln!("skipped: bird is not installed");
            return;
        };
        let _ = out;
        let (bgp, bird) = config();
        let text = render(&bgp, &bird, &["10.0.0.100".parse().unwrap(), "fd00::100".parse().unwrap()]);
        let dir = std::env::temp_dir().join(format!("xlb-bird-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bird.conf");
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new("bird").arg("-p").arg("-c").arg(&path).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "bird -p refused:\n{}\n{text}", String::from_utf8_lossy(&out.stderr));
    }
}
