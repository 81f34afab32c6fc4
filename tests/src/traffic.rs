//! Real servers and clients: each backend answers TCP connections and UDP datagrams with its
//! own name, so a client learns which backend served it. Every loop is bounded in count and
//! time.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;

use crate::netns::Netns;

const IO_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(5);

/// A server in a backend's namespace: TCP on 0.0.0.0:port, UDP on vip:port (a UDP server on
/// the wildcard address would answer from the host's own address, which the client drops).
/// A TCP connection gets the server's name as a line at once, and again for every line it
/// sends, until it closes. Stopped, and every socket closed, on `stop` or drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &Netns, name: &str, vips: &[IpAddr], port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let vips = vips.to_vec();
        let (tcp, udps) = ns.run(move || -> Result<(TcpListener, Vec<UdpSocket>)> {
            // [::] takes IPv4 connections too (dual stack).
            let tcp = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))?;
            tcp.set_nonblocking(true)?;
            let mut udps = Vec::new();
            for vip in vips {
                let udp = UdpSocket::bind((vip, port))?;
                udp.set_read_timeout(Some(POLL * 4))?;
                udps.push(udp);
            }
            Ok((tcp, udps))
        })??;
        let reply = format!("{name}\n").into_bytes();
        let (s1, r1) = (stop.clone(), reply.clone());
        let tcp_thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s1.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, _)) => {
                        let (stop, reply) = (s1.clone(), r1.clone());
                        conns.push(std::thread::spawn(move || serve(conn, &reply, &stop)));
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
                conns.retain(|c: &JoinHandle<()>| !c.is_finished());
            }
            for c in conns {
                let _ = c.join();
            }
        });
        let mut threads = vec![tcp_thread];
        for udp in udps {
            let (stop, reply) = (stop.clone(), reply.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&reply, from);
                    }
                }
            }));
        }
        Ok(Self { stop, threads })
    }

    /// Closes the sockets: new connections are refused, as if the process had died.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One TCP connection: the name at once, then one name per line received; ends on EOF, error
/// or stop.
fn serve(mut conn: TcpStream, reply: &[u8], stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(POLL * 10));
    if conn.write_all(reply).is_err() {
        return;
    }
    let Ok(clone) = conn.try_clone() else { return };
    let mut lines = BufReader::new(clone);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match lines.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                line.clear();
                if conn.write_all(reply).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A long-lived TCP connection to a server above.
pub struct Conn {
    lines: BufReader<TcpStream>,
    /// The backend that answered first.
    pub backend: String,
}

impl Conn {
    /// The client's port: with the addresses, the flow's 5-tuple.
    pub fn local_port(&self) -> u16 {
        self.lines.get_ref().local_addr().map_or(0, |a| a.port())
    }

    /// Whether the connection goes to an IPv6 address.
    pub fn peer_is_v6(&self) -> bool {
        self.lines.get_ref().peer_addr().is_ok_and(|a| a.is_ipv6())
    }

    /// Asks again: the name of the backend that answers now.
    pub fn ask(&mut self) -> Result<String, String> {
        self.lines.get_mut().write_all(b"again\n").map_err(|e| e.kind().to_string())?;
        read_name(&mut self.lines)
    }
}

fn read_name(lines: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut name = String::new();
    match lines.read_line(&mut name) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(name.trim().to_string()),
        Err(e) => Err(e.kind().to_string()),
    }
}

fn open(to: SocketAddr) -> Result<Conn, String> {
    let s = TcpStream::connect_timeout(&to, IO_TIMEOUT).map_err(|e| e.kind().to_string())?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(s);
    let backend = read_name(&mut lines)?;
    Ok(Conn { lines, backend })
}

/// `count` long-lived connections from `client`.
pub fn open_connections(client: &Netns, to: SocketAddr, count: usize) -> Result<Vec<Conn>> {
    client.run(move || (0..count).map(|_| open(to)).collect::<Result<Vec<_>, String>>())?.map_err(anyhow::Error::msg)
}

/// Answers per backend name, plus failures under the key "error: ...".
pub type Tally = BTreeMap<String, usize>;

fn tally(results: Vec<Result<String, String>>) -> Tally {
    let mut t = Tally::new();
    for r in results {
        let key = r.unwrap_or_else(|e| format!("error: {e}"));
        *t.entry(key).or_default() += 1;
    }
    t
}

pub fn failures(t: &Tally) -> usize {
    t.iter().filter(|(k, _)| k.starts_with("error")).map(|(_, n)| n).sum()
}

/// A short connection: connect, read the name, close.
fn tcp_request(to: SocketAddr) -> Result<String, String> {
    open(to).map(|c| c.backend)
}

fn udp_request(to: SocketAddr) -> Result<String, String> {
    // A new socket each time: a new source port, so a new flow.
    let any: IpAddr = if to.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    let s = UdpSocket::bind((any, 0)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
    s.send_to(b"who?", to).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf).map_err(|e| e.kind().to_string())?;
    if from != to {
        return Err(format!("answer from {from}, not {to}"));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// `count` TCP connections from `client`, one after the other, each from a new source port.
pub fn tcp_requests(client: &Netns, to: SocketAddr, count: usize) -> Result<Tally> {
    client.run(move || tally((0..count).map(|_| tcp_request(to)).collect()))
}

/// `count` UDP request/answer exchanges from `client`, each from a new source port.
pub fn udp_requests(client: &Netns, to: SocketAddr, count: usize) -> Result<Tally> {
    client.run(move || tally((0..count).map(|_| udp_request(to)).collect()))
}

/// A tiny HTTP health endpoint in a backend's namespace: every request gets the status set
/// with `set_status` (200 at first). Stopped on drop.
pub struct HttpHealth {
    status: Arc<std::sync::atomic::AtomicU16>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpHealth {
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let listener = ns.run(move || -> Result<TcpListener> {
            let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })??;
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (status.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(POLL);
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                let mut request = [0u8; 1024];
                let _ = std::io::Read::read(&mut conn, &mut request);
                let code = st.load(Ordering::Relaxed);
                let _ = conn.write_all(format!("HTTP/1.0 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes());
            }
        });
        Ok(Self { status, stop, thread: Some(thread) })
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::Relaxed);
    }
}

impl Drop for HttpHealth {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
