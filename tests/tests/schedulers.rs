//! Schedulers per service (maglev, rr, wrr, source-hash, lc, wlc): the data path through
//! BPF_PROG_TEST_RUN on crafted frames, then end to end in network namespaces. Needs root.
use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_agent::{
    dataplane::map_addr,
    tables::{
        maglev::{self, Member},
        rr,
    },
};
use lb_common::{hash::source_hash, Settings, SCHED_LC, SCHED_RR, SCHED_SOURCE_HASH, SCHED_WLC, SCHED_WRR};
use xlb_tests::{
    bed::{Builder, XDP_TX},
    dpbed::ring_entry,
    scenario::{backend_name, config_for, vip, Scenario},
    traffic::{failures, open_connections, tcp_requests},
    wire::Frame,
};

const SEED: u32 = 0x5eed;
const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x03];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const TABLE: u32 = 251;
const RR_PORT: u16 = 80;
const WRR_PORT: u16 = 81;
const SH_PORT: u16 = 82;
const LC_PORT: u16 = 83;
const WLC_PORT: u16 = 84;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

fn backend_mac(i: u32) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, i as u8]
}

fn member(i: u32, weight: u32) -> Member {
    Member { id: i, key: u64::from(u32::from(Ipv4Addr::new(10, 99, 0, 11 + i as u8))), weight }
}

/// The per-CPU round-robin cursor only counts "in turn" on one CPU: keep this thread on one.
fn pin_to_one_cpu() {
    // SAFETY: plain syscalls on this thread's own affinity mask.
    unsafe {
        let cpu = libc::sched_getcpu().max(0) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
}

/// The shared data-path bed with the scheduler services, and the Maglev table of backends 0..3.
struct Bed {
    bed: xlb_tests::bed::Bed,
    maglev_table: Vec<u32>,
}

impl std::ops::Deref for Bed {
    type Target = xlb_tests::bed::Bed;
    fn deref(&self) -> &Self::Target {
        &self.bed
    }
}

impl std::ops::DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.bed
    }
}

/// Four backends (ids 0..4; 3 stays out of the tables at first); services rr (port 80,
/// backends 0..3), wrr (81, weights 1:2:3), source-hash (82), lc (83, the Maglev table of
/// backends 0..3) and wlc (84, weights 1:2:3) on one VIP.
fn bed() -> Bed {
    bed_with_flow_table(4096)
}

fn bed_with_flow_table(entries: u32) -> Bed {
    pin_to_one_cpu();
    let ones: Vec<Member> = (0..3).map(|i| member(i, 1)).collect();
    let weighted: Vec<Member> = (0..3).map(|i| member(i, i + 1)).collect();
    let maglev_table = maglev::build(&ones, TABLE);
    let mut builder = Builder::new(SEED, LB_MAC, TABLE).flow_table_size(entries);
    for i in 0..4u32 {
        builder =
            builder.weighted_backend(i, Ipv4Addr::new(10, 99, 0, 11 + i as u8).into(), Some(backend_mac(i)), i + 1);
    }
    let bed = builder
        .scheduled(VIP.into(), RR_PORT, 6, SCHED_RR, rr::table(&ones, TABLE, false))
        .scheduled(VIP.into(), WRR_PORT, 6, SCHED_WRR, rr::table(&weighted, TABLE, true))
        .scheduled(VIP.into(), SH_PORT, 6, SCHED_SOURCE_HASH, maglev_table.clone())
        .scheduled(VIP.into(), LC_PORT, 6, SCHED_LC, maglev_table.clone())
        .scheduled(VIP.into(), WLC_PORT, 6, SCHED_WLC, maglev::build(&weighted, TABLE))
        .build()
        .expect("load the balancer (run the tests as root)");
    Bed { bed, maglev_table }
}

impl Bed {
    /// Sends one frame; the backend it was forwarded to.
    fn backend_of(&mut self, f: &Frame) -> u32 {
        let (verdict, out) = self.run(&f.build());
        assert_eq!(verdict, XDP_TX, "{f:?}");
        let mac: [u8; 6] = out[0..6].try_into().unwrap();
        (0..4).find(|&i| backend_mac(i) == mac).unwrap_or_else(|| panic!("unknown destination MAC {mac:02x?}"))
    }

    fn new_flow(&mut self, src: Ipv4Addr, sport: u16, port: u16) -> u32 {
        self.backend_of(&Frame::tcp(src, sport, VIP, port))
    }

    fn active(&self) -> Vec<u64> {
        (0..4).map(|i| self.dp.active_flows(i).unwrap()).collect()
    }

    /// Overwrites a backend's active-flow count, as drift (or a racing reconciliation) would.
    fn set_active(&mut self, id: u32, count: u64) {
        self.dp.set_active_flows(id, count).unwrap();
    }

    /// Sets a service's affinity timeout and publishes `table` with it.
    fn set_affinity_timeout(&mut self, port: u16, secs: u32, table: &[u32]) {
        self.service_mut(VIP.into(), 6, port).slot.set_affinity_timeout(secs);
        self.publish(port, table);
    }

    fn publish(&mut self, port: u16, table: &[u32]) {
        self.bed.publish(VIP.into(), 6, port, table.to_vec()).unwrap();
    }
}

/// Positions of `seq` in the repeating `cycle`, if `seq` is a run of it from some offset.
fn follows_cycle(seq: &[u32], cycle: &[u32]) -> bool {
    (0..cycle.len()).any(|start| seq.iter().enumerate().all(|(i, &b)| cycle[(start + i) % cycle.len()] == b))
}

#[test]
fn datapath_schedulers_pick_new_flows_and_pins_never_move() {
    let mut bed = bed();

    // rr: consecutive new flows go to the backends in turn.
    let rr: Vec<u32> = (0..30).map(|i| bed.new_flow(CLIENT, 10_000 + i, RR_PORT)).collect();
    eprintln!("rr: {rr:?}");
    for pair in rr.windows(2) {
        assert_eq!(pair[1], (pair[0] + 1) % 3, "not in turn: {rr:?}");
    }
    // A pinned flow keeps its backend on its next packets.
    for (i, &b) in rr.iter().enumerate() {
        let again = bed.backend_of(&Frame::tcp(CLIENT, 10_000 + i as u16, VIP, RR_PORT).tcp_flags(ACK));
        assert_eq!(again, b, "rr flow {i} moved");
    }

    // wrr 1:2:3: each run of 60 new flows is ten cycles of the smooth sequence.
    let weighted: Vec<Member> = (0..3).map(|i| member(i, i + 1)).collect();
    let cycle = rr::cycle(&weighted, true);
    let seq: Vec<u32> = (0..60).map(|i| bed.new_flow(CLIENT, 20_000 + i, WRR_PORT)).collect();
    eprintln!("wrr: {seq:?}");
    let counts: Vec<usize> = (0..3).map(|b| seq.iter().filter(|&&x| x == b).count()).collect();
    assert_eq!(counts, [10, 20, 30], "{seq:?}");
    assert!(follows_cycle(&seq, &cycle), "{seq:?} does not follow {cycle:?}");

    // source-hash: every flow of a client to one backend, the one the client's hash names.
    let (addr, _) = map_addr(CLIENT.into());
    let expected = ring_entry(&bed.maglev_table, source_hash(&addr, SEED));
    for sport in 30_000..30_040 {
        assert_eq!(bed.new_flow(CLIENT, sport, SH_PORT), expected, "source port {sport}");
    }
    // ... and different clients spread over every backend.
    let mut spread = [0usize; 3];
    for c in 0..90u8 {
        let client = Ipv4Addr::new(10, 98, c, 7);
        let b = bed.new_flow(client, 40_000, SH_PORT);
        let b2 = bed.new_flow(client, 40_001, SH_PORT);
        assert_eq!(b, b2, "client {client}");
        let (a, _) = map_addr(client.into());
        assert_eq!(b, ring_entry(&bed.maglev_table, source_hash(&a, SEED)));
        spread[b as usize] += 1;
    }
    eprintln!("source-hash, 90 clients: {spread:?}");
    assert!(spread.iter().all(|&n| n >= 15), "{spread:?}");

    // A new sequence (rr with backend 3 added, wrr reweighted 3:2:1): established flows stay
    // where they were; new ones follow the new table.
    let four: Vec<Member> = (0..4).map(|i| member(i, 1)).collect();
    bed.publish(RR_PORT, &rr::table(&four, TABLE, false));
    let reweighted: Vec<Member> = (0..3).map(|i| member(i, 3 - i)).collect();
    bed.publish(WRR_PORT, &rr::table(&reweighted, TABLE, true));
    for (i, &b) in rr.iter().enumerate() {
        let again = bed.backend_of(&Frame::tcp(CLIENT, 10_000 + i as u16, VIP, RR_PORT).tcp_flags(ACK));
        assert_eq!(again, b, "rr flow {i} moved after a new sequence");
    }
    for (i, &b) in seq.iter().enumerate() {
        let again = bed.backend_of(&Frame::tcp(CLIENT, 20_000 + i as u16, VIP, WRR_PORT).tcp_flags(ACK));
        assert_eq!(again, b, "wrr flow {i} moved after a new sequence");
    }
    let rr4: Vec<u32> = (0..40).map(|i| bed.new_flow(CLIENT, 50_000 + i, RR_PORT)).collect();
    assert!(follows_cycle(&rr4, &[0, 1, 2, 3]), "{rr4:?}");
    let seq2: Vec<u32> = (0..60).map(|i| bed.new_flow(CLIENT, 51_000 + i, WRR_PORT)).collect();
    let counts: Vec<usize> = (0..3).map(|b| seq2.iter().filter(|&&x| x == b).count()).collect();
    assert_eq!(counts, [30, 20, 10], "{seq2:?}");

    // source-hash: a new Maglev table (backend 3 joins) leaves established flows alone.
    let before: Vec<u32> = (0..90u8).map(|c| bed.new_flow(Ipv4Addr::new(10, 97, c, 7), 40_000, SH_PORT)).collect();
    let table4 = maglev::build(&four, TABLE);
    bed.publish(SH_PORT, &table4);
    for (c, &b) in before.iter().enumerate() {
        let f = Frame::tcp(Ipv4Addr::new(10, 97, c as u8, 7), 40_000, VIP, SH_PORT).tcp_flags(ACK);
        assert_eq!(bed.backend_of(&f), b, "source-hash client {c} moved");
    }
}

/// source-hash with `affinity_timeout_secs`: a client's new flows keep their backend across a
/// table change while it comes back within the timeout; without the timeout, or once it has
/// passed, they follow the table (and are pinned anew).
#[test]
fn source_hash_affinity_keeps_a_client_on_its_backend_until_the_timeout() {
    let mut bed = bed();
    let table3 = bed.maglev_table.clone();
    let table4 = maglev::build(&(0..4).map(|i| member(i, 1)).collect::<Vec<_>>(), TABLE);
    let client = |c: u8| Ipv4Addr::new(10, 96, c, 9);
    let entry = |table: &[u32], c: u8| ring_entry(table, source_hash(&map_addr(client(c).into()).0, SEED));
    // The clients the new table (backend 3 joins) moves elsewhere.
    let moved: Vec<u8> = (0..=255u8).filter(|&c| entry(&table3, c) != entry(&table4, c)).collect();
    assert!(moved.len() >= 20, "only {} of 256 clients move", moved.len());
    let mut sport = 10_000u16;
    let mut new_flows = |bed: &mut Bed, table: &[u32], pinned: bool, what: &str| {
        for &c in &moved {
            sport += 1;
            let want = if pinned { entry(&table3, c) } else { entry(table, c) };
            assert_eq!(bed.new_flow(client(c), sport, SH_PORT), want, "{what}: client {c}");
        }
    };

    // A long timeout: the first flows pin the clients, the new table does not move them.
    bed.set_affinity_timeout(SH_PORT, 600, &table3);
    new_flows(&mut bed, &table3, false, "first flows");
    bed.publish(SH_PORT, &table4);
    new_flows(&mut bed, &table4, true, "pinned, new table");

    // No timeout: the table alone decides (the pins are still there, and ignored).
    bed.set_affinity_timeout(SH_PORT, 0, &table4);
    new_flows(&mut bed, &table4, false, "no timeout");

    // A timeout of 1 s: the pins (last refreshed above) hold, then expire; a client coming back
    // after the timeout follows the table and is pinned there.
    bed.set_affinity_timeout(SH_PORT, 1, &table4);
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    new_flows(&mut bed, &table4, false, "after the timeout");
    bed.publish(SH_PORT, &table3);
    for &c in &moved {
        sport += 1;
        assert_eq!(bed.new_flow(client(c), sport, SH_PORT), entry(&table4, c), "re-pinned: client {c}");
    }
}

#[test]
fn rr_flows_that_will_not_be_pinned_follow_their_hash() {
    // Past the new-flow rate a flow gets no pin: a cursor would send each of its packets to
    // another backend, so such flows are placed by their flow hash over the same table.
    let mut bed = bed();
    bed.dp
        .set_settings(Settings { udp_idle_ns: 30_000_000_000, new_flows_per_cpu_sec: 5, ..Settings::default() })
        .unwrap();
    for i in 0..5 {
        bed.new_flow(CLIENT, 60_000 + i, RR_PORT);
    }
    let table = rr::table(&(0..3).map(|i| member(i, 1)).collect::<Vec<_>>(), TABLE, false);
    for sport in 61_000..61_030u16 {
        let f = Frame::tcp(CLIENT, sport, VIP, RR_PORT);
        let first = bed.backend_of(&f);
        assert_eq!(bed.backend_of(&f), first, "an unpinned flow moved");
        let [s0, s1] = sport.to_be_bytes();
        let [d0, d1] = RR_PORT.to_be_bytes();
        let ports = u32::from_ne_bytes([s0, s1, d0, d1]);
        let h = lb_common::hash::flow_hash(&map_addr(CLIENT.into()).0, ports, SEED);
        assert_eq!(first, ring_entry(&table, h), "source port {sport}");
    }
}

#[test]
fn lc_prefers_the_backend_with_fewer_active_flows_and_fin_rst_give_flows_back() {
    // The bounds below come from the exact distribution of power of two choices over this
    // table (three even backends): each fails once in more than a million runs, and random
    // placement (one draw) would fail the first two nearly always.
    const PINNED: u16 = 200;
    const LC_FLOWS: u16 = 270;
    let mut bed = bed();
    // PINNED flows of one client over source-hash: all on one backend, which lc then avoids.
    let (addr, _) = map_addr(CLIENT.into());
    let loaded = ring_entry(&bed.maglev_table, source_hash(&addr, SEED));
    let pinned = 1_000..1_000 + PINNED;
    for sport in pinned.clone() {
        assert_eq!(bed.new_flow(CLIENT, sport, SH_PORT), loaded);
    }
    let mut want = vec![0u64; 4];
    want[loaded as usize] = PINNED.into();
    assert_eq!(bed.active(), want, "every new pinned flow counts, whatever the scheduler");
    // Packets of pinned flows and SYN retransmissions do not count again.
    for sport in 1_000..1_010 {
        bed.backend_of(&Frame::tcp(CLIENT, sport, VIP, SH_PORT).tcp_flags(ACK));
        bed.backend_of(&Frame::tcp(CLIENT, sport, VIP, SH_PORT));
    }
    assert_eq!(bed.active(), want);

    // lc: of two random entries of the table, the one with fewer active flows. The loaded
    // backend, far ahead throughout, only wins when both draws are it (1/9 of new flows: 30
    // expected, one draw would give it 90); the two others share the rest evenly.
    let lc: Vec<u32> = (0..LC_FLOWS).map(|i| bed.new_flow(CLIENT, 2_000 + i, LC_PORT)).collect();
    let counts: Vec<usize> = (0..3).map(|b| lc.iter().filter(|&&x| x == b).count()).collect();
    eprintln!("lc, {LC_FLOWS} new flows with backend {loaded} holding {PINNED}: {counts:?}, active {:?}", bed.active());
    assert!(counts[loaded as usize] <= 60, "the loaded backend got {counts:?} (1/9 of {LC_FLOWS} = 30 expected)");
    for b in (0..3).filter(|&b| b != loaded) {
        assert!(counts[b as usize] >= 96, "{counts:?} (120 each expected)");
    }
    let active = bed.active();
    assert_eq!(active.iter().sum::<u64>(), u64::from(PINNED + LC_FLOWS));
    // The two light ones stay close: each new flow drawn between them goes to the lighter.
    let light: Vec<u64> = (0..3).filter(|&b| b != loaded).map(|b| active[b as usize]).collect();
    assert!(light[0].abs_diff(light[1]) <= 30, "{active:?}");

    // FIN: one fewer, once; a second FIN and the last ACK change nothing; the pin stays.
    let before = bed.active();
    for sport in pinned {
        let f = Frame::tcp(CLIENT, sport, VIP, SH_PORT);
        assert_eq!(bed.backend_of(&f.clone().tcp_flags(FIN | ACK)), loaded);
        assert_eq!(bed.backend_of(&f.clone().tcp_flags(FIN | ACK)), loaded);
        assert_eq!(bed.backend_of(&f.tcp_flags(ACK)), loaded);
    }
    let mut want = before.clone();
    want[loaded as usize] -= u64::from(PINNED);
    assert_eq!(bed.active(), want, "FIN gives each flow back once");
    // RST on a closed flow: nothing more. RST on an open one: one fewer.
    bed.backend_of(&Frame::tcp(CLIENT, 1_000, VIP, SH_PORT).tcp_flags(RST));
    assert_eq!(bed.active(), want);
    let (sport, b) = (2_000, lc[0]);
    bed.backend_of(&Frame::tcp(CLIENT, sport, VIP, LC_PORT).tcp_flags(RST | ACK));
    want[b as usize] -= 1;
    assert_eq!(bed.active(), want, "RST gives the flow back");
    bed.backend_of(&Frame::tcp(CLIENT, sport, VIP, LC_PORT).tcp_flags(RST | ACK));
    assert_eq!(bed.active(), want, "a second RST finds no pin (and no count to give back)");
    // A new SYN on a closed pin (the 5-tuple reused) counts again.
    bed.new_flow(CLIENT, 1_001, SH_PORT);
    want[loaded as usize] += 1;
    assert_eq!(bed.active(), want, "a reopened pin counts again");

    // Never below zero: a count that drifted low stays at 0 when its flows close.
    bed.set_active(loaded, 0);
    for sport in 1_001..1_003 {
        bed.backend_of(&Frame::tcp(CLIENT, sport, VIP, SH_PORT).tcp_flags(FIN | ACK));
        bed.backend_of(&Frame::tcp(CLIENT, sport, VIP, SH_PORT).tcp_flags(RST));
    }
    let rr = bed.new_flow(CLIENT, 3_000, RR_PORT);
    bed.set_active(rr, 0);
    bed.backend_of(&Frame::tcp(CLIENT, 3_000, VIP, RR_PORT).tcp_flags(RST));
    assert_eq!(bed.dp.active_flows(loaded).unwrap(), 0, "underflow");
    assert_eq!(bed.dp.active_flows(rr).unwrap(), 0, "underflow");

    // Reconciliation recounts from the flow table: open pins per backend slot.
    bed.set_active(3, 1_000);
    bed.set_active(loaded, 77);
    bed.dp.flow_walker().unwrap().walk().unwrap();
    let mut want = vec![0u64; 4];
    for &b in &lc[1..] {
        want[b as usize] += 1;
    }
    assert_eq!(bed.active(), want, "reconciled: the lc flows still open, nothing else");
}

/// The walker reads the flow table a batch at a time: a table of several batches is counted
/// whole, and every backend's count is recounted from all of it.
#[test]
fn reconciliation_recounts_a_table_of_many_batches() {
    const FLOWS: u16 = 20_000;
    let mut bed = bed_with_flow_table(1 << 16);
    let mut want = vec![0u64; 4];
    for i in 0..FLOWS {
        let client = Ipv4Addr::new(10, 98, (i >> 8) as u8, i as u8);
        let b = bed.new_flow(client, 1_000 + (i & 0xff), RR_PORT);
        // One flow in four closes: no longer active, still in the table.
        if i % 4 == 0 {
            bed.backend_of(&Frame::tcp(client, 1_000 + (i & 0xff), VIP, RR_PORT).tcp_flags(FIN | ACK));
        } else {
            want[b as usize] += 1;
        }
    }
    for id in 0..4 {
        bed.set_active(id, 1_000_000);
    }
    let walk = bed.dp.flow_walker().unwrap().walk().unwrap();
    assert_eq!(walk.entries, u64::from(FLOWS), "every entry counted, across batches");
    assert_eq!(bed.active(), want, "every open flow recounted, none twice");
    assert_eq!(walk.rewritten, 4);
}

#[test]
fn wlc_compares_active_flows_per_weight() {
    let mut bed = bed();
    // Weights 1:2:3 (backends 0..3): the table draws in proportion, the comparison divides.
    let wlc: Vec<u32> = (0..300).map(|i| bed.new_flow(CLIENT, 4_000 + i, WLC_PORT)).collect();
    let counts: Vec<usize> = (0..3).map(|b| wlc.iter().filter(|&&x| x == b).count()).collect();
    eprintln!("wlc 1:2:3, 300 new flows: {counts:?}");
    for (b, expected) in [(0, 50), (1, 100), (2, 150)] {
        assert!(counts[b].abs_diff(expected) <= 20, "backend {b}: expected {expected} ± 20: {counts:?}");
    }
}

fn with_scheduler(config: &str, scheduler: &str) -> String {
    config.replace("protocol = \"tcp\"\n", &format!("protocol = \"tcp\"\nscheduler = \"{scheduler}\"\n"))
}

fn share(t: &BTreeMap<String, usize>, i: usize) -> usize {
    t.get(&backend_name(i)).copied().unwrap_or(0)
}

#[test]
fn rr_spreads_connections_evenly() {
    let s = Scenario::start_with(3, &with_scheduler(&config_for(&[(0, 1), (1, 1), (2, 1)]), "rr")).expect("bed");
    let t = tcp_requests(&s.bed.client, vip(), 300).unwrap();
    eprintln!("rr, 300 connections: {t:?}");
    assert_eq!(failures(&t), 0, "{t:?}");
    // One cursor per CPU, each walking the backends in turn: every CPU's share is even to
    // within one connection per backend, so the total is within a few of 100 each. Allow ±10.
    for i in 0..3 {
        assert!(share(&t, i).abs_diff(100) <= 10, "backend {i}: {t:?}");
    }
}

#[test]
fn wrr_follows_the_weights() {
    let s = Scenario::start_with(3, &with_scheduler(&config_for(&[(0, 1), (1, 2), (2, 3)]), "wrr")).expect("bed");
    let t = tcp_requests(&s.bed.client, vip(), 300).unwrap();
    eprintln!("wrr 1:2:3, 300 connections: {t:?}");
    assert_eq!(failures(&t), 0, "{t:?}");
    for (i, expected) in [(0, 50), (1, 100), (2, 150)] {
        assert!(share(&t, i).abs_diff(expected) <= 10, "backend {i}: expected {expected} ± 10: {t:?}");
    }
}

#[test]
fn source_hash_keeps_a_client_on_one_backend() {
    let s =
        Scenario::start_with(3, &with_scheduler(&config_for(&[(0, 1), (1, 1), (2, 1)]), "source-hash")).expect("bed");
    let t = tcp_requests(&s.bed.client, vip(), 300).unwrap();
    eprintln!("source-hash, 300 connections of one client: {t:?}");
    assert_eq!(failures(&t), 0, "{t:?}");
    assert_eq!(t.len(), 1, "one client, one backend: {t:?}");
    // Long-lived ones too.
    let conns = open_connections(&s.bed.client, vip(), 20).unwrap();
    assert!(conns.iter().all(|c| t.contains_key(&c.backend)), "{t:?}");
}

fn active_flows_metric(s: &Scenario, i: usize) -> u64 {
    let text = xlb_tests::agent::AgentProcess::scrape(&s.bed.lb, xlb_tests::scenario::METRICS).unwrap();
    let needle = format!("protocol=\"tcp\",backend=\"{}\"}} ", xlb_tests::topology::backend_addr(i));
    text.lines()
        .find(|l| l.starts_with("xlb_backend_active_flows{") && l.contains(&needle))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no xlb_backend_active_flows for backend {i}:\n{text}"))
}

#[test]
fn lc_steers_new_connections_away_from_a_backend_holding_long_ones() {
    // Backends 1 and 2 drained at first: 30 long-lived connections all land on backend 0.
    let drained = with_scheduler(&config_for(&[(0, 1), (1, 0), (2, 0)]), "lc");
    let mut s = Scenario::start_with(3, &drained).expect("bed");
    let conns = open_connections(&s.bed.client, vip(), 30).unwrap();
    assert!(conns.iter().all(|c| c.backend == backend_name(0)));
    assert_eq!(active_flows_metric(&s, 0), 30);
    let line = s.agent.reload(&with_scheduler(&config_for(&[(0, 1), (1, 1), (2, 1)]), "lc")).unwrap();
    assert!(line.contains("reloaded"), "{line}");
    // 180 short connections: each closes (its FIN gives its count back), so backends 1 and 2
    // stay near 0 active flows while backend 0 holds 30. Backend 0 only gets a new one when
    // both draws name it: 1/9, about 20 of 180; rr or maglev would give it about 60. The
    // others get 4/9 each (a tie goes to the first draw). Each bound fails once in a million.
    let t = tcp_requests(&s.bed.client, vip(), 180).unwrap();
    eprintln!("lc, 180 short connections while backend 0 holds 30 long ones: {t:?}");
    assert_eq!(failures(&t), 0, "{t:?}");
    assert!(share(&t, 0) <= 42, "backend 0 got too many: {t:?}");
    assert!(share(&t, 1) >= 48 && share(&t, 2) >= 48, "{t:?}");
    assert_eq!(active_flows_metric(&s, 0), 30, "the long ones are still counted");
    drop(conns);
}

#[test]
fn check_warns_about_rr_on_several_hosts() {
    let dir = xlb_tests::agent::TempDir::new("sched-check").unwrap();
    let path = dir.0.join("xlb.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(xlb_tests::agent::agent_binary().unwrap())
            .args(["check", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "a warning is not an error: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let rr = with_scheduler(&config_for(&[(0, 1), (1, 1)]), "rr");
    assert!(!check(&rr).contains("warning"), "one host: no warning");
    let multi = rr.replace("hash_seed = 2026\n", "hash_seed = 2026\nmulti_host = true\n");
    let out = check(&multi);
    assert!(out.contains("valid (2 services"), "{out}");
    assert!(out.contains("warning: service[0].scheduler: service demo-tcp: scheduler \"rr\" with multi_host"), "{out}");
    let sh = with_scheduler(&config_for(&[(0, 1), (1, 1)]), "source-hash")
        .replace("hash_seed = 2026\n", "hash_seed = 2026\nmulti_host = true\n");
    assert!(!check(&sh).contains("warning"));
}
