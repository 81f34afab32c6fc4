//! Watches the kernel's routes, neighbours, addresses and links (rtnetlink multicast groups):
//! the data path caches the FIB's next hop per backend and CPU, and any such change may make a
//! cached one wrong. Each batch of notifications is one signal; the agent then moves the data
//! path to a new route generation, and every CPU asks the FIB again on its next packet.
use anyhow::{Context as _, Result};
use log::warn;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::sync::mpsc::{error::TrySendError, Sender};

/// The legacy rtnetlink groups (linux/rtnetlink.h): RTMGRP_LINK, RTMGRP_NEIGH,
/// RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE.
const GROUPS: u32 = 0x1 | 0x4 | 0x10 | 0x40 | 0x100 | 0x400;

/// Subscribes now (so that no change after this call is missed) and signals `changed` on a
/// thread of its own, once per datagram of notifications; a signal still pending absorbs the
/// next ones. The thread ends at the first signal after the receiver is gone.
pub fn watch(changed: Sender<()>) -> Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("cannot open a netlink socket")?;
    socket.bind(&SocketAddr::new(0, GROUPS)).context("cannot subscribe to route and neighbour changes")?;
    std::thread::Builder::new()
        .name("xlb-routes".into())
        .spawn(move || {
            let mut datagram = vec![0u8; 64 * 1024];
            loop {
                if let Err(e) = socket.recv(&mut &mut datagram[..], 0) {
                    match e.raw_os_error() {
                        // Notifications were lost (the socket overran): changed, whatever they were.
                        Some(libc::ENOBUFS) => {}
                        Some(libc::EINTR) => continue,
                        _ => {
                            warn!("route watcher: {e}; next hops are looked up again, watching goes on");
                            std::thread::sleep(std::time::Duration::from_secs(1));
                        }
                    }
                }
                match changed.try_send(()) {
                    Ok(()) | Err(TrySendError::Full(())) => {}
                    Err(TrySendError::Closed(())) => return,
                }
            }
        })
        .context("cannot start the route watcher")?;
    Ok(())
}
