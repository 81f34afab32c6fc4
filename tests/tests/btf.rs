//! The kernel has the program's BTF: the object's type information loads (no "object BTF
//! couldn't be loaded" at start), and a map dumped by bpftool shows its keys and values field
//! by field. Needs root and bpftool (`cargo xtask setup` installs it).
use std::{net::Ipv4Addr, process::Command};

use lb_agent::{
    config::Forward,
    dataplane::{Dataplane, LoadOptions},
};

fn bpftool(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool").arg("--json").args(args).output().expect("bpftool (cargo xtask setup)");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("bpftool's JSON")
}

fn load() -> Dataplane {
    Dataplane::load(&LoadOptions {
        hash_seed: 1,
        iface_mac: [2, 0, 0, 0, 0, 1],
        maglev_capacity: 2 * 251,
        flow_table_size: 1024,
    })
    .expect("load the balancer (run the tests as root)")
}

#[test]
fn maps_and_program_carry_their_types() {
    let mut dp = load();
    dp.add_service(Ipv4Addr::new(10, 99, 0, 100).into(), 80, 6, 7, 251, Forward::L2).unwrap();
    let info = dp.balancer().info().unwrap();
    assert!(info.btf_id().is_some_and(|id| id > 0), "the program was loaded without its BTF");

    let prog = bpftool(&["prog", "show", "id", &info.id().to_string()]);
    let map_ids: Vec<u64> = prog["map_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let services = map_ids
        .iter()
        .map(|id| bpftool(&["map", "show", "id", &id.to_string()]))
        .find(|m| m["name"] == "SERVICES")
        .expect("the balancer uses SERVICES");
    assert!(services["btf_id"].as_u64().is_some_and(|id| id > 0), "{services}");
    let dump = bpftool(&["map", "dump", "id", &services["id"].to_string()]);
    // Typed: the buckets' entries by field name, in the data path's byte order; the service is
    // in one of its two buckets.
    let buckets = lb_common::service_buckets(&lb_common::ServiceKey {
        addr: lb_common::addr_v4([10, 99, 0, 100]),
        port: 80u16.to_be(),
        proto: 6,
        family: lb_common::FAMILY_V4,
    });
    let entry = dump
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["formatted"])
        .filter(|e| e["key"] == buckets.0 || e["key"] == buckets.1)
        .flat_map(|e| e["value"]["entries"].as_array().unwrap().iter())
        .find(|e| e["key"]["family"] != 0)
        .unwrap_or_else(|| panic!("the service in neither of its buckets {buckets:?}"));
    assert_eq!(entry["key"]["port"], u16::to_be(80), "{entry}");
    assert_eq!(entry["key"]["proto"], 6, "{entry}");
    assert_eq!(entry["service"]["id"], 7, "{entry}");
    assert_eq!(entry["service"]["table_size"], 251, "{entry}");
}

/// The loaded balancer calls no memset, memcpy or memmove: a struct zeroed, a key with padding
/// or an unaligned copy compiles to one of those (a byte loop in a subprogram) on every packet.
#[test]
fn the_data_path_copies_by_words() {
    let mut dp = load();
    {
        let name = lb_common::program_names::BALANCER;
        let id = dp.balancer().info().unwrap().id().to_string();
        let out = Command::new("bpftool").args(["prog", "dump", "xlated", "id", &id]).output().expect("bpftool");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let calls: Vec<&str> =
            text.lines().filter(|l| ["memset", "memcpy", "memmove"].iter().any(|f| l.contains(f))).collect();
        if !calls.is_empty() {
            let _ = std::fs::write(std::env::temp_dir().join("xlb-xlated.txt"), text.as_bytes());
        }
        assert!(calls.is_empty(), "{name} calls: {calls:#?} (the whole dump: $TMPDIR/xlb-xlated.txt)");
        assert!(text.lines().count() > 100, "{name}: no program text from bpftool:\n{text}");
    }
}
