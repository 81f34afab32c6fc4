//! Flow stickiness end to end: long-lived TCP connections keep their backend while backends
//! are added, removed and drained through config reloads (SIGHUP). Needs root.
use std::collections::BTreeMap;

use xlb_tests::{
    scenario::{backend_name, config_for, vip, Scenario},
    traffic::{failures, open_connections, tcp_requests},
};

const LONG_LIVED: usize = 100;

#[test]
fn pinned_connections_survive_added_removed_and_drained_backends() {
    // Five backends have servers; the agent starts with three of them.
    let mut s = Scenario::start_with(5, &config_for(&[(0, 1), (1, 1), (2, 1)])).expect("test bed");
    let mut conns = open_connections(&s.bed.client, vip(), LONG_LIVED).expect("100 connections");
    let mut spread = BTreeMap::new();
    for c in &conns {
        *spread.entry(c.backend.clone()).or_insert(0) += 1;
    }
    eprintln!("long-lived connections per backend: {spread:?}");
    assert_eq!(spread.len(), 3, "{spread:?}");

    let check_all = |conns: &mut Vec<xlb_tests::traffic::Conn>, when: &str| {
        for (i, c) in conns.iter_mut().enumerate() {
            let now = c.ask().unwrap_or_else(|e| panic!("connection {i} to {} broke {when}: {e}", c.backend));
            assert_eq!(now, c.backend, "connection {i} moved {when}");
        }
    };

    // Add two backends: Maglev hands them part of every table, the pinned flows stay.
    let line = s.agent.reload(&config_for(&[(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)])).unwrap();
    assert!(line.contains("reloaded"), "{line}\n{}", s.agent.log_text());
    check_all(&mut conns, "after adding backends 3 and 4");
    let fresh = tcp_requests(&s.bed.client, vip(), 200).unwrap();
    assert!(fresh.contains_key(&backend_name(3)) && fresh.contains_key(&backend_name(4)), "{fresh:?}");

    // Remove backend 4 and drain backend 0, which holds some of the long-lived connections.
    let line = s.agent.reload(&config_for(&[(0, 0), (1, 1), (2, 1), (3, 1)])).unwrap();
    assert!(line.contains("reloaded"), "{line}\n{}", s.agent.log_text());
    check_all(&mut conns, "after draining backend 0 and removing backend 4");
    assert!(conns.iter().any(|c| c.backend == backend_name(0)), "backend 0 held none of the long-lived connections");
    let fresh = tcp_requests(&s.bed.client, vip(), 300).unwrap();
    eprintln!("new connections after the drain: {fresh:?}");
    assert_eq!(failures(&fresh), 0, "{fresh:?}");
    assert!(!fresh.contains_key(&backend_name(0)), "a drained backend took new connections: {fresh:?}");
    assert!(!fresh.contains_key(&backend_name(4)), "a removed backend took new connections: {fresh:?}");

    // A reload that needs a restart is refused and changes nothing.
    let refused = s.agent.reload(&config_for(&[(1, 1)]).replace("hash_seed = 2026", "hash_seed = 7")).unwrap();
    assert!(refused.contains("rejected") && refused.contains("hash_seed"), "{refused}");
    check_all(&mut conns, "after a refused reload");
    let log = s.agent.stop().unwrap();
    assert!(log.contains("backend 10.99.0.15 removed"), "{log}");
}
