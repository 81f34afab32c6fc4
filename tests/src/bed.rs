//! THE data-path bed for BPF_PROG_TEST_RUN fixtures: a loaded [`Dataplane`] with the backends,
//! services and tables a test asks for, built with [`Builder`], and the runs and checks every
//! fixture test makes (`run`, `run_counted`, `run_flow`, `assert_untouched`, the backend a
//! flow must get). Tests that need real routes and neighbours (the L3 data path) build it
//! inside the namespace of [`crate::dpbed`], which adds the topology and its standard services.
use std::{collections::HashMap, net::IpAddr};

use anyhow::Result;
use lb_agent::{
    config::Forward,
    dataplane::{map_addr, Dataplane, LoadOptions, ServiceSlot},
    tables::maglev::{self, address_key, Member},
};
use lb_common::{hash::flow_hash, Counters, FlowEvent, Reason, Settings, XdpAction, SCHED_MAGLEV};

use crate::{testrun::assert_one_counted, wire::Frame};

/// What BPF_PROG_TEST_RUN reports a program returned, as the tests compare it.
pub const XDP_DROP: u32 = XdpAction::Drop.code();
pub const XDP_PASS: u32 = XdpAction::Pass.code();
pub const XDP_TX: u32 = XdpAction::Tx.code();
pub const XDP_REDIRECT: u32 = XdpAction::Redirect.code();

/// The name of a program's return value ("?" for none).
pub fn verdict_name(code: u32) -> &'static str {
    XdpAction::from_code(code).map_or("?", XdpAction::name)
}

/// A service of the bed and the table last published for it.
pub struct Svc {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub forward: Forward,
    pub slot: ServiceSlot,
    pub table: Vec<u32>,
}

/// What the bed last wrote to a backend slot.
#[derive(Clone, Copy, Debug)]
pub struct BackendInfo {
    pub addr: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub usable: bool,
}

/// The table a service starts with.
enum Table {
    /// Maglev over these backends, weight 1 each.
    Maglev(Vec<u32>),
    /// Exactly this (rr/wrr sequences, weighted tables).
    Given(Vec<u32>),
    /// None: every packet is drop_no_backend.
    Empty,
}

struct ServiceSpec {
    vip: IpAddr,
    port: u16,
    proto: u8,
    forward: Forward,
    scheduler: u8,
    table: Table,
}

/// What the bed is loaded with. Service ids follow the order services are added in.
pub struct Builder {
    seed: u32,
    mac: [u8; 6],
    table_size: u32,
    flow_table_size: u32,
    settings: Settings,
    ingress: Option<u32>,
    backends: Vec<(u32, IpAddr, Option<[u8; 6]>, u32)>,
    services: Vec<ServiceSpec>,
}

impl Builder {
    /// A bed with this hash seed and interface MAC; tables of `table_size` entries (a prime).
    pub fn new(seed: u32, mac: [u8; 6], table_size: u32) -> Self {
        Self {
            seed,
            mac,
            table_size,
            flow_table_size: 4096,
            settings: Settings { udp_idle_ns: 30_000_000_000, ..Settings::default() },
            ingress: None,
            backends: Vec::new(),
            services: Vec::new(),
        }
    }

    pub fn flow_table_size(mut self, entries: u32) -> Self {
        self.flow_table_size = entries;
        self
    }

    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Frames arrive on this interface (index in the calling thread's namespace) instead of
    /// without a context.
    pub fn ingress(mut self, ifindex: u32) -> Self {
        self.ingress = Some(ifindex);
        self
    }

    /// A usable backend of weight 1 (`mac` for L2 DSR).
    pub fn backend(self, id: u32, addr: IpAddr, mac: Option<[u8; 6]>) -> Self {
        self.weighted_backend(id, addr, mac, 1)
    }

    pub fn weighted_backend(mut self, id: u32, addr: IpAddr, mac: Option<[u8; 6]>, weight: u32) -> Self {
        self.backends.push((id, addr, mac, weight));
        self
    }

    /// A Maglev service over these backends (weight 1 each).
    pub fn service(mut self, vip: IpAddr, port: u16, proto: u8, forward: Forward, members: &[u32]) -> Self {
        let table = Table::Maglev(members.to_vec());
        self.services.push(ServiceSpec { vip, port, proto, forward, scheduler: SCHED_MAGLEV, table });
        self
    }

    /// An L2 service with this scheduler and exactly this table.
    pub fn scheduled(mut self, vip: IpAddr, port: u16, proto: u8, scheduler: u8, table: Vec<u32>) -> Self {
        let spec = ServiceSpec { vip, port, proto, forward: Forward::L2, scheduler, table: Table::Given(table) };
        self.services.push(spec);
        self
    }

    /// A service whose table stays empty: no usable backend.
    pub fn empty_service(mut self, vip: IpAddr, port: u16, proto: u8) -> Self {
        let spec = ServiceSpec { vip, port, proto, forward: Forward::L2, scheduler: SCHED_MAGLEV, table: Table::Empty };
        self.services.push(spec);
        self
    }

    /// Loads the data path and writes everything (root only).
    pub fn build(self) -> Result<Bed> {
        let dp = Dataplane::load(&LoadOptions {
            hash_seed: self.seed,
            iface_mac: self.mac,
            maglev_capacity: 2 * self.table_size * (self.services.len() as u32 + 4),
            flow_table_size: self.flow_table_size,
        })?;
        let mut bed = Bed {
            dp,
            seed: self.seed,
            table_size: self.table_size,
            ingress: self.ingress,
            services: Vec::new(),
            backends: HashMap::new(),
            settings: self.settings,
        };
        bed.set_settings(self.settings)?;
        for (id, addr, mac, weight) in self.backends {
            bed.set_backend(id, addr, mac, true)?;
            bed.dp.set_backend_weight(id, weight)?;
        }
        for (id, spec) in self.services.into_iter().enumerate() {
            let mut slot =
                bed.dp.add_service(spec.vip, spec.port, spec.proto, id as u32, self.table_size, spec.forward)?;
            slot.set_scheduler(spec.scheduler);
            let table = match spec.table {
                Table::Maglev(members) => Some(bed.table_of(&members)),
                Table::Given(table) => Some(table),
                Table::Empty => None,
            };
            if let Some(table) = &table {
                bed.dp.publish_table(&mut slot, table)?;
            }
            let (vip, port, proto, forward) = (spec.vip, spec.port, spec.proto, spec.forward);
            bed.services.push(Svc { vip, port, proto, forward, slot, table: table.unwrap_or_default() });
        }
        Ok(bed)
    }
}

/// A loaded data path and what the test wrote to it.
pub struct Bed {
    pub dp: Dataplane,
    pub seed: u32,
    pub table_size: u32,
    /// The interface frames arrive on; None: no context.
    pub ingress: Option<u32>,
    pub services: Vec<Svc>,
    pub backends: HashMap<u32, BackendInfo>,
    pub settings: Settings,
}

impl Bed {
    pub fn set_settings(&mut self, settings: Settings) -> Result<()> {
        self.settings = settings;
        self.dp.set_settings(settings)
    }

    /// Writes a backend slot through the facade and remembers it.
    pub fn set_backend(&mut self, id: u32, addr: IpAddr, mac: Option<[u8; 6]>, usable: bool) -> Result<()> {
        self.dp.set_backend(id, addr, mac, usable)?;
        self.backends.insert(id, BackendInfo { addr, mac, usable });
        Ok(())
    }

    pub fn backend(&self, id: u32) -> BackendInfo {
        self.backends[&id]
    }

    /// The Maglev table of these backends (weight 1 each, keyed by their current address).
    pub fn table_of(&self, ids: &[u32]) -> Vec<u32> {
        let members: Vec<Member> =
            ids.iter().map(|&id| Member { id, key: address_key(self.backends[&id].addr), weight: 1 }).collect();
        maglev::build(&members, self.table_size)
    }

    fn service_index(&self, vip: IpAddr, proto: u8, port: u16) -> usize {
        self.services
            .iter()
            .position(|s| s.vip == vip && s.proto == proto && s.port == port)
            .unwrap_or_else(|| panic!("no service {vip} {proto}/{port} in the bed"))
    }

    pub fn service(&self, vip: IpAddr, proto: u8, port: u16) -> &Svc {
        &self.services[self.service_index(vip, proto, port)]
    }

    pub fn service_mut(&mut self, vip: IpAddr, proto: u8, port: u16) -> &mut Svc {
        let i = self.service_index(vip, proto, port);
        &mut self.services[i]
    }

    /// Publishes `table` for the service and remembers it.
    pub fn publish(&mut self, vip: IpAddr, proto: u8, port: u16, table: Vec<u32>) -> Result<()> {
        let i = self.service_index(vip, proto, port);
        let svc = &mut self.services[i];
        self.dp.publish_table(&mut svc.slot, &table)?;
        svc.table = table;
        Ok(())
    }

    /// The flow hash the data path computes for this frame (TCP or UDP).
    pub fn frame_hash(&self, f: &Frame) -> u32 {
        let [s0, s1] = f.sport.to_be_bytes();
        let [d0, d1] = f.dport.to_be_bytes();
        let ports = u32::from_ne_bytes([s0, s1, d0, d1]);
        flow_hash(&map_addr(f.src).0, ports, self.seed)
    }

    /// The backend the service's current table gives this flow.
    pub fn expected_backend(&self, f: &Frame) -> u32 {
        let svc = self.service(f.dst, f.proto, f.dport);
        crate::dpbed::ring_entry(&svc.table, self.frame_hash(f))
    }

    /// Runs one frame: (verdict, output frame).
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        match self.ingress {
            Some(ifindex) => self.run_on(ifindex, frame),
            None => crate::testrun::run_xdp(self.dp.balancer(), frame, None).expect("BPF_PROG_TEST_RUN"),
        }
    }

    /// Runs one frame as if it arrived on `ifindex` (0: the namespace's loopback, as without a
    /// context). Panics if the kernel refuses the run.
    pub fn run_on(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run_on(ifindex, frame).expect("BPF_PROG_TEST_RUN")
    }

    pub fn try_run_on(&mut self, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let ctx = xdp_md(frame.len(), ifindex);
        crate::testrun::run_xdp(self.dp.balancer(), frame, Some(&ctx))
    }

    pub fn reasons(&self) -> Vec<(Reason, Counters)> {
        self.dp.reason_counters().expect("read REASON_STATS")
    }

    pub fn flows(&self) -> Vec<(FlowEvent, u64)> {
        self.dp.flow_counters().expect("read FLOW_STATS")
    }

    /// Runs `frame` and checks the verdict is `reason`'s and that only `reason`'s counter
    /// moved, by one frame of the output frame's size (the data path counts a frame at its
    /// exit). Returns the output frame.
    pub fn run_counted(&mut self, frame: &[u8], reason: Reason) -> Vec<u8> {
        let before = self.reasons();
        let (verdict, out) = self.run(frame);
        let after = self.reasons();
        // Counted at the exit: the bytes are the output frame's (grown by an encapsulation).
        assert_one_counted(&before, &after, reason, out.len());
        assert_eq!(verdict, reason.action().code(), "verdict for {}", reason.name());
        out
    }

    /// As [`Bed::run_counted`], and checks that the flow-table counters moved by exactly
    /// `events` (each listed once per packet it should count).
    pub fn run_flow(&mut self, frame: &[u8], reason: Reason, events: &[FlowEvent]) -> Vec<u8> {
        let before = self.flows();
        let out = self.run_counted(frame, reason);
        let after = self.flows();
        assert_flow_delta(&before, &after, events);
        out
    }

    /// Runs an untouched-frame case: `reason`, and the output equals the input.
    pub fn assert_untouched(&mut self, frame: &[u8], reason: Reason) {
        let out = self.run_counted(frame, reason);
        assert_eq!(out, frame, "{} leaves the frame as it was", reason.name());
    }
}

/// The xdp_md context of a test run (net/bpf/test_run.c, xdp_convert_md_to_buff): data and
/// data_meta 0, data_end the frame's length, egress_ifindex 0; a nonzero ingress_ifindex makes
/// the kernel take that device's RX queue (in the calling thread's namespace) as the frame's.
pub fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let fields = [0u32, len as u32, 0, ingress_ifindex, 0, 0];
    let mut ctx = [0u8; 24];
    for (i, v) in fields.iter().enumerate() {
        ctx[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    ctx
}

/// Asserts that the flow-event counters moved by exactly `events`.
pub fn assert_flow_delta(before: &[(FlowEvent, u64)], after: &[(FlowEvent, u64)], events: &[FlowEvent]) {
    let got: Vec<(FlowEvent, u64)> =
        before.iter().zip(after).map(|((e, b), (_, a))| (*e, a - b)).filter(|(_, d)| *d > 0).collect();
    let want: Vec<(FlowEvent, u64)> = FlowEvent::ALL
        .iter()
        .map(|e| (*e, events.iter().filter(|x| *x == e).count() as u64))
        .filter(|(_, d)| *d > 0)
        .collect();
    assert_eq!(got, want, "flow-table events");
}
