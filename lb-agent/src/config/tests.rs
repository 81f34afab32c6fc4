//! The file's reader and the validator, on config text.
use std::time::Duration;

use lb_common::limits::DEFAULT_MAGLEV_SIZE;

use super::*;

/// A valid config: two services on one VIP (web, TCP 80, two backends; UDP 53, one).
pub(crate) const GOOD: &str = r#"
interface = "eth0"
hash_seed = 42

[health]
interval_ms = 200
timeout_ms = 100

[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"

[[service.backend]]
address = "10.0.0.11"

[[service.backend]]
address = "10.0.0.12"
weight = 3
mac = "02:00:00:00:00:12"

[[service]]
vip = "10.0.0.100"
port = 53
protocol = "udp"
maglev_size = 251
[service.health]
port = 5353
fall = 5

[[service.backend]]
address = "10.0.0.13"
"#;

fn errors(source: &str) -> Vec<ConfigError> {
    Config::parse(source).expect_err("config should be rejected").0
}

#[test]
fn parses_a_complete_config_with_defaults() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.interface, "eth0");
    assert_eq!(c.hash_seed, 42);
    assert_eq!(c.xdp_mode, None);
    assert_eq!(c.services.len(), 2);
    let web = &c.services[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.maglev_size, DEFAULT_MAGLEV_SIZE);
    assert_eq!(web.health.port, 80);
    assert_eq!(web.health.interval, Duration::from_millis(200));
    assert_eq!(web.health.timeout, Duration::from_millis(100));
    assert_eq!((web.health.rise, web.health.fall), (2, 3));
    assert_eq!(web.backends[0].weight, 1);
    assert_eq!(web.backends[1].weight, 3);
    assert_eq!(web.backends[1].mac, Some([2, 0, 0, 0, 0, 0x12]));
    let dns = &c.services[1];
    assert_eq!(dns.name, "10.0.0.100:53/udp");
    assert_eq!(dns.protocol, Protocol::Udp);
    assert_eq!(dns.maglev_size, 251);
    assert_eq!(dns.health.port, 5353);
    assert_eq!(dns.health.fall, 5);
    assert_eq!(dns.health.interval, Duration::from_millis(200));
    assert!(c.maglev_capacity >= 2 * (DEFAULT_MAGLEV_SIZE + 251));
}

#[test]
fn syntax_and_type_errors_point_at_the_value() {
    let e = errors(&GOOD.replace("port = 80", "port = 70000"));
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].line, e[0].column), (12, 8), "{e:?}");
    assert!(e[0].message.contains("70000") || e[0].message.contains("u16"), "{e:?}");

    let e = errors(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
    assert!(e[0].message.contains("tcp") && e[0].message.contains("udp"), "{e:?}");
    assert_eq!(e[0].line, 13);

    let e = errors(&GOOD.replace("hash_seed = 42", "hash_sed = 42"));
    assert!(e[0].message.contains("hash_sed"), "{e:?}");
    assert_eq!(e[0].line, 3);

    let e = errors("interface = ");
    assert_eq!(e[0].line, 1);
}

#[test]
fn semantic_errors_name_line_and_field() {
    let bad = GOOD
        .replace("\"10.0.0.11\"", "\"10.0.0.300\"")
        .replace("maglev_size = 251", "maglev_size = 250")
        .replace("02:00:00:00:00:12", "01:00:5e:00:00:01")
        .replace("weight = 3", "weight = 70000");
    let e = errors(&bad);
    let fields: Vec<_> = e.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        fields,
        [
            (16, "service[0].backend[0].address"),
            (20, "service[0].backend[1].weight"),
            (21, "service[0].backend[1].mac"),
            (27, "service[1].maglev_size"),
        ],
        "{e:#?}"
    );
    assert!(e[0].message.contains("10.0.0.300"));
    assert!(e[0].message.starts_with("expected an IPv4 or IPv6 address"));
    assert_eq!(e[3].kind, InvalidKind::BadValue);
    let shown = ConfigErrors(e).to_string();
    assert!(
        shown.starts_with("line 16, column 11: service[0].backend[0].address: expected an IPv4 or IPv6 address"),
        "{shown}"
    );
}

#[test]
fn duplicates_and_missing_parts_are_rejected() {
    let dup = GOOD.replace("port = 53", "port = 80").replace("\"udp\"", "\"tcp\"");
    let e = errors(&dup);
    assert!(e.iter().any(|e| e.field == "service[1]" && e.kind == InvalidKind::Duplicate), "{e:?}");

    let dup_backend = GOOD.replace("\"10.0.0.12\"", "\"10.0.0.11\"");
    let e = errors(&dup_backend);
    assert!(e.iter().any(|e| e.field == "service[0].backend[1].address" && e.kind == InvalidKind::Duplicate), "{e:?}");

    let e = errors("interface = \"eth0\"\n");
    assert!(e.iter().any(|e| e.field == "service" && e.kind == InvalidKind::Missing), "{e:?}");
    let no_backend = "interface = \"eth0\"\n[[service]]\nvip = \"10.0.0.1\"\nport = 1\nprotocol = \"udp\"\n";
    assert!(errors(no_backend).iter().any(|e| e.field == "service[0].backend"));

    let bad_if = GOOD.replace("\"eth0\"", "\"a/very/long/interface\"");
    assert_eq!(errors(&bad_if)[0].field, "interface");

    let bad_timeout = GOOD.replace("timeout_ms = 100", "timeout_ms = 300");
    let e = errors(&bad_timeout);
    assert!(e.iter().any(|e| e.field.ends_with("health.timeout_ms")), "{e:?}");
    assert!(e.iter().all(|e| !e.field.contains("health.health")), "a field named twice: {e:?}");

    let vip0 = GOOD.replace("vip = \"10.0.0.100\"\nport = 80", "vip = \"0.0.0.0\"\nport = 80");
    let e = errors(&vip0);
    assert_eq!((e[0].field.as_str(), e[0].kind), ("service[0].vip", InvalidKind::BadValue), "{e:?}");

    let small_cap = GOOD.replace("hash_seed = 42", "hash_seed = 42\nmaglev_capacity = 1000");
    assert_eq!(errors(&small_cap)[0].field, "maglev_capacity");
}

#[test]
fn schedulers_parse_and_rr_on_several_hosts_warns() {
    let c = Config::parse(GOOD).unwrap();
    assert!(c.services.iter().all(|s| s.scheduler == Scheduler::Maglev));
    assert!(!c.multi_host && c.warnings().is_empty());
    for (text, want) in [
        ("maglev", Scheduler::Maglev),
        ("rr", Scheduler::Rr),
        ("wrr", Scheduler::Wrr),
        ("source-hash", Scheduler::SourceHash),
        ("lc", Scheduler::Lc),
        ("wlc", Scheduler::Wlc),
    ] {
        let c = Config::parse(&GOOD.replace("port = 80\n", &format!("port = 80\nscheduler = \"{text}\"\n"))).unwrap();
        assert_eq!(c.services[0].scheduler, want);
        assert_eq!(want.to_string(), text);
        // One host: no warning, whatever the scheduler.
        assert!(c.warnings().is_empty());
    }
    let e = errors(&GOOD.replace("port = 80\n", "port = 80\nscheduler = \"lottery\"\n"));
    assert_eq!(e[0].line, 13, "{e:?}");
    assert!(e[0].message.contains("source-hash"), "{e:?}");

    let multi = GOOD.replace("hash_seed = 42", "hash_seed = 42\nmulti_host = true");
    assert!(Config::parse(&multi).unwrap().warnings().is_empty(), "maglev gives one answer everywhere");
    let sh = Config::parse(&multi.replace("port = 53\n", "port = 53\nscheduler = \"source-hash\"\n")).unwrap();
    assert!(sh.warnings().is_empty());
    let rr = Config::parse(&multi.replace("port = 53\n", "port = 53\nscheduler = \"wrr\"\n")).unwrap();
    let w = rr.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("service[1].scheduler: service 10.0.0.100:53/udp: scheduler \"wrr\""), "{w:?}");
}

#[test]
fn affinity_timeout_only_with_source_hash() {
    assert_eq!(Config::parse(GOOD).unwrap().services[0].affinity_timeout_secs, 0);
    let with = |extra: &str| GOOD.replace("port = 80\n", &format!("port = 80\n{extra}"));
    let c = Config::parse(&with("scheduler = \"source-hash\"\naffinity_timeout_secs = 600\n")).unwrap();
    assert_eq!((c.services[0].scheduler, c.services[0].affinity_timeout_secs), (Scheduler::SourceHash, 600));
    // 0 is off, whatever the scheduler.
    assert_eq!(Config::parse(&with("affinity_timeout_secs = 0\n")).unwrap().services[0].affinity_timeout_secs, 0);

    let e = errors(&with("affinity_timeout_secs = 60\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].line, e[0].field.as_str()), (13, "service[0].affinity_timeout_secs"), "{e:?}");
    assert_eq!(e[0].kind, InvalidKind::OnlyWithSourceHash, "{e:?}");
    let e = errors(&with("scheduler = \"rr\"\naffinity_timeout_secs = 60\n"));
    assert_eq!((e[0].line, e[0].field.as_str()), (14, "service[0].affinity_timeout_secs"), "{e:?}");

    let e = errors(&with("scheduler = \"source-hash\"\naffinity_timeout_secs = 65536\n"));
    assert_eq!((e[0].line, e[0].field.as_str()), (14, "service[0].affinity_timeout_secs"), "{e:?}");
    assert!(e[0].message.contains("65535"), "{e:?}");
}

const BGP: &str = r#"
[bgp]
local_as = 65001
router_id = "10.10.0.2"
drain_secs = 5

[[bgp.neighbor]]
address = "10.10.0.1"
peer_as = 65000
bfd = true
bfd_interval_ms = 50

[[bgp.neighbor]]
address = "fd10::1"
peer_as = 65000
hold_secs = 9

[[bgp.vip]]
address = "10.0.0.100"
communities = ["65001:100"]
"#;

#[test]
fn bgp_section() {
    let c = Config::parse(&format!("{GOOD}{BGP}")).unwrap();
    let bgp = c.bgp.as_ref().unwrap();
    assert_eq!(bgp.drain, Duration::from_secs(5));
    assert_eq!(bgp.withdraw_wait, Duration::from_secs(1));
    assert_eq!(bgp.communities, vec![("10.0.0.100".parse().unwrap(), vec![(65001, 100)])]);
    let Bird::Managed(bird) = &bgp.bird else { panic!("managed by default") };
    assert_eq!((bird.local_as, bird.router_id), (65001, "10.10.0.2".parse().unwrap()));
    assert_eq!(bird.neighbors[0].bfd, Some(BfdConfig { interval: Duration::from_millis(50), multiplier: 3 }));
    assert_eq!((bird.neighbors[1].hold_secs, bird.neighbors[1].bfd), (9, None));
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    assert!(Config::parse(GOOD).unwrap().bgp.is_none());

    let e = errors(&format!("{GOOD}{}", BGP.replace("local_as = 65001", "local_as = 0")));
    assert_eq!((e[0].field.as_str(), e[0].line), ("bgp.local_as", 36), "{e:?}");
    let e = errors(&format!("{GOOD}{}", BGP.replace("\"65001:100\"", "\"65001:x\"")));
    assert_eq!(e[0].field, "bgp.vip[0].communities[0]", "{e:?}");
    let e = errors(&format!("{GOOD}{}", BGP.replace("fd10::1", "10.10.0.1")));
    assert_eq!((e[0].field.as_str(), e[0].kind), ("bgp.neighbor[1].address", InvalidKind::Duplicate), "{e:?}");
    // A password goes between quotes in BIRD's config: nothing may end the string early.
    let e = errors(&format!("{GOOD}{}", BGP.replace("hold_secs = 9", "password = 'x\";}'")));
    assert_eq!(e[0].field, "bgp.neighbor[1].password", "{e:?}");
    let e = errors(&format!("{GOOD}\n[bgp]\nlocal_as = 65001\n"));
    let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["bgp.router_id", "bgp.neighbor"], "{e:?}");
    let e = errors(&format!("{GOOD}\n[bgp]\nbird_socket = \"/run/bird/bird.ctl\"\nlocal_as = 65001\n"));
    assert_eq!(e[0].field, "bgp.local_as", "{e:?}");
    let external = Config::parse(&format!("{GOOD}\n[bgp]\nbird_socket = \"/run/bird/bird.ctl\"\n")).unwrap();
    assert_eq!(external.bgp.unwrap().bird, Bird::External { socket: "/run/bird/bird.ctl".into() });

    let v4_only = BGP.replace("[[bgp.neighbor]]\naddress = \"fd10::1\"\npeer_as = 65000\nhold_secs = 9\n", "");
    let c = Config::parse(&format!("{GOOD}{}", v4_only.replace("10.0.0.100", "10.0.0.200"))).unwrap();
    assert_eq!(c.warnings(), ["bgp.vip[0].address: 10.0.0.200 is the VIP of no service"]);
}

#[test]
fn multi_host_wants_a_seed() {
    let c = Config::parse(&GOOD.replace("hash_seed = 42", "multi_host = true")).unwrap();
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("hash_seed: left at its default"), "{w:?}");
}

const L7: &str = r#"
[[l7]]
name = "www"
listen = "10.0.0.100:443"
mode = "https"
scheduler = "hash-header:X-User"
[[l7.tls]]
cert = "/etc/xlb/www.crt"
key = "/etc/xlb/www.key"
[l7.cookie]
secret = "sixteen or more chars"
[l7.timeouts]
header_read_ms = 2000
[[l7.route]]
host = "API.example"
path_prefix = "/v1/"
pool = "api"
[[l7.backend]]
address = "10.0.0.21:8080"
[[l7.backend]]
address = "[fd00::22]:8080"
pool = "api"
weight = 0
"#;

#[test]
fn l7_services() {
    use super::l7::{HashOn, L7Mode, L7Scheduler};
    let c = Config::parse(&format!("{GOOD}{L7}")).unwrap();
    let s = &c.l7[0];
    assert_eq!((s.name.as_str(), s.mode, s.listen), ("www", L7Mode::Https, "10.0.0.100:443".parse().unwrap()));
    assert_eq!(s.scheduler, L7Scheduler::Hash(HashOn::Header("x-user".into())));
    assert_eq!(s.routes[0].host.as_deref(), Some("api.example"), "hosts compare in lower case");
    assert_eq!(s.timeouts.header_read, Duration::from_secs(2));
    assert_eq!(s.cookie.as_ref().unwrap().name, "XLBSRV");
    assert!(matches!(s.health.check, Check::Http { .. }), "an HTTP service is checked with GET by default");
    assert_eq!(s.health.port, 0, "each backend's own port");
    assert_eq!(s.pools(), ["default", "api"]);
    // An L7-only file is a config.
    let only = format!("interface = \"eth0\"\n{L7}");
    assert!(Config::parse(&only).unwrap().services.is_empty());

    let bad = |from: &str, to: &str| errors(&format!("{GOOD}{}", L7.replace(from, to)));
    let e = bad("mode = \"https\"", "mode = \"tcp-proxy\"");
    let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["l7[0].tls", "l7[0].route", "l7[0].cookie"], "{e:?}");
    let e = bad("secret = \"sixteen or more chars\"", "secret = \"short\"");
    assert_eq!(e[0].field, "l7[0].cookie.secret", "{e:?}");
    let e = bad("hash-header:X-User", "lottery");
    assert_eq!(e[0].field, "l7[0].scheduler", "{e:?}");
    let e = bad("pool = \"api\"\nweight", "pool = \"other\"\nweight");
    assert_eq!((e[0].field.as_str(), e[0].kind), ("l7[0].route[0].pool", InvalidKind::Missing), "{e:?}");
    let e = errors(&format!("{GOOD}{L7}{}", L7.replace("443", "444")));
    assert_eq!((e[0].field.as_str(), e[0].kind), ("l7[1].name", InvalidKind::Duplicate), "{e:?}");
    let e = errors(&format!("{GOOD}{L7}{}", L7.replace("\"www\"", "\"web\"")));
    assert_eq!(
        (e[0].field.as_str(), e[0].kind),
        ("l7[1].name", InvalidKind::Duplicate),
        "an L4 service is named web: {e:?}"
    );
}
