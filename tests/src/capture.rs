//! A packet capture on one interface (AF_PACKET), counting IPv4 and IPv6 frames by source
//! address: it proves that no backend reply crosses the balancer.
use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{bail, Result};

use crate::netns::Netns;

pub struct Capture {
    stop: Arc<AtomicBool>,
    matched: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

const ETH_P_ALL: u16 = 0x0003;

impl Capture {
    /// Counts TCP and UDP frames seen on `iface` in `ns` (both directions) whose IP source is one
    /// of `sources`.
    pub fn start(ns: &Netns, iface: &'static str, sources: &[IpAddr]) -> Result<Self> {
        let sources = sources.to_vec();
        let fd = ns.run(move || open(iface))??;
        let stop = Arc::new(AtomicBool::new(false));
        let matched = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let (s, m, t) = (stop.clone(), matched.clone(), total.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                // SAFETY: recv into our own buffer, at most its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 34 {
                    continue;
                }
                t.fetch_add(1, Ordering::Relaxed);
                // TCP and UDP only: the balancer host's own neighbour advertisements for an IPv6
                // VIP come from the VIP too.
                let (from, proto) = match (&buf[12..14], n) {
                    ([0x08, 0x00], _) => (IpAddr::from(<[u8; 4]>::try_from(&buf[26..30]).unwrap()), buf[23]),
                    ([0x86, 0xdd], 54..) => (IpAddr::from(<[u8; 16]>::try_from(&buf[22..38]).unwrap()), buf[20]),
                    _ => continue,
                };
                if matches!(proto, 6 | 17) && sources.contains(&from) {
                    m.fetch_add(1, Ordering::Relaxed);
                }
            }
            // SAFETY: our fd, closed once.
            unsafe { libc::close(fd) };
        });
        Ok(Self { stop, matched, total, thread: Some(thread) })
    }

    /// Stops and returns (frames from `source`, all frames).
    pub fn finish(mut self) -> (u64, u64) {
        self.halt();
        (self.matched.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

fn open(iface: &str) -> Result<i32> {
    let Some(index) = lb_agent::sys::if_index(iface) else {
        bail!("no interface {iface}");
    };
    // SAFETY: plain socket calls on values we own; errors are checked.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_ALL.to_be()));
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = index as i32;
        if libc::bind(fd, (&sll as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as u32) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            bail!("bind to {iface}: {e}");
        }
        Ok(fd)
    }
}
