//! Backend MAC addresses from the kernel's neighbour tables (ARP for IPv4, NDP for IPv6), read
//! with one rtnetlink dump (RTM_GETNEIGH) for both families.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use log::debug;
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::sys::if_index;

/// Datagrams a dump may take before it is given up on: a table of ~100 entries per datagram.
const MAX_DUMP_DATAGRAMS: usize = 10_000;

/// Whether an entry in this state holds a usable link-layer address (what ARP calls complete).
fn complete(state: NeighbourState) -> bool {
    matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    )
}

/// The complete entries of every neighbour table on interface `ifindex`: address → MAC.
fn dump(ifindex: u32) -> Result<HashMap<IpAddr, [u8; 6]>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("cannot open a netlink socket")?;
    socket.bind_auto().context("cannot bind the netlink socket")?;
    socket.connect(&SocketAddr::new(0, 0)).context("cannot connect the netlink socket")?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default())),
    );
    request.finalize();
    let mut buf = vec![0; request.header.length as usize];
    request.serialize(&mut buf[..]);
    socket.send(&buf, 0).context("cannot ask for the neighbour tables")?;

    let mut found = HashMap::new();
    let mut datagram = vec![0u8; 64 * 1024];
    for _ in 0..MAX_DUMP_DATAGRAMS {
        let size = socket.recv(&mut &mut datagram[..], 0).context("cannot read the neighbour tables")?;
        let mut at = 0;
        while at < size {
            let message: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&datagram[at..size]).context("a malformed neighbour message")?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => bail!("the kernel refused the neighbour dump: {e:?}"),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(entry))
                    if entry.header.ifindex == ifindex && complete(entry.header.state) =>
                {
                    if let Some((addr, mac)) = entry_of(&entry) {
                        found.insert(addr, mac);
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            at += length;
        }
    }
    bail!("the neighbour dump did not end after {MAX_DUMP_DATAGRAMS} datagrams")
}

/// The address and the 6-byte link-layer address of an entry, if it has both.
fn entry_of(entry: &NeighbourMessage) -> Option<(IpAddr, [u8; 6])> {
    let mut addr = None;
    let mut mac = None;
    for attribute in &entry.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => addr = Some(IpAddr::V6(*a)),
            NeighbourAttribute::LinkLayerAddress(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => {}
        }
    }
    Some((addr?, mac?))
}

/// The complete neighbour entries of `addrs` on `iface`, in their order.
fn lookup_all(addrs: &[IpAddr], iface: &str) -> Vec<Option<[u8; 6]>> {
    let table = match if_index(iface).map(dump) {
        Some(Ok(table)) => table,
        Some(Err(e)) => {
            debug!("neighbours of {iface}: {e:#}");
            HashMap::new()
        }
        None => HashMap::new(),
    };
    addrs.iter().map(|a| table.get(a).copied()).collect()
}

/// The complete neighbour entry of `addr` on `iface`, if the kernel has one.
pub fn lookup(addr: IpAddr, iface: &str) -> Option<[u8; 6]> {
    lookup_all(&[addr], iface)[0]
}

/// Looks every address up and, for those missing, makes the kernel resolve them (one datagram
/// each to the discard port), then waits up to `wait` in all for the entries.
pub fn resolve_all(addrs: &[IpAddr], iface: &str, wait: Duration) -> Vec<Option<[u8; 6]>> {
    let mut macs = lookup_all(addrs, iface);
    if macs.iter().all(Option::is_some) {
        return macs;
    }
    let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0));
    let v6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0));
    for (addr, mac) in addrs.iter().zip(&macs) {
        let socket = if addr.is_ipv4() { &v4 } else { &v6 };
        if let (None, Ok(socket)) = (mac, socket) {
            let _ = socket.send_to(b"xlb neighbour probe", (*addr, 9));
        }
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline && macs.iter().any(Option::is_none) {
        std::thread::sleep(Duration::from_millis(20));
        for (mac, found) in macs.iter_mut().zip(lookup_all(addrs, iface)) {
            *mac = mac.or(found);
        }
    }
    macs
}
