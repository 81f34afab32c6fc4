//! Active health checks (TCP connect, HTTP GET, UDP request/answer) per backend, every
//! interval with jitter, with rise and fall. Each backend has its own task, so a slow backend
//! never delays another's verdict.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::{mpsc, Notify},
    time,
};

use crate::config::{Check, HealthConfig};

/// Which backend a report is about: its id, stable for the backend's life in the agent.
pub type Target = crate::dataplane::BackendId;

#[derive(Debug)]
pub enum Event {
    /// The backend crossed `rise` successes (`up`) or `fall` failures (not `up`).
    State { target: Target, up: bool, detail: String },
    /// A probe succeeded: the neighbour table now knows the backend, maybe with a new MAC.
    Reachable { target: Target },
}

/// What a backend's checks start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Up: `fall` failures take it out.
    Up,
    /// Down (as a state file remembers it): `rise` successes bring it in.
    Down,
    /// Never checked: the first result decides, at once.
    Unknown,
}

/// Counts consecutive results and says when the state flips.
#[derive(Debug)]
pub struct RiseFall {
    up: bool,
    unknown: bool,
    streak: u32,
    rise: u32,
    fall: u32,
}

impl RiseFall {
    pub fn new(start: Start, rise: u32, fall: u32) -> Self {
        Self { up: start == Start::Up, unknown: start == Start::Unknown, streak: 0, rise, fall }
    }

    /// Records one result; Some(new state) when it changes the backend's state (or is the
    /// first result of a backend never checked).
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if self.unknown {
            self.unknown = false;
            self.up = ok;
            return Some(ok);
        }
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// One probe of `addr`, within `timeout` as a whole: a late answer is a failure.
async fn probe(check: &Check, addr: IpAddr, port: u16, timeout: Duration) -> Result<(), String> {
    match time::timeout(timeout, probe_once(check, addr, port)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn probe_once(check: &Check, addr: IpAddr, port: u16) -> Result<(), String> {
    match check {
        Check::Tcp => TcpStream::connect((addr, port)).await.map(drop).map_err(|e| e.to_string()),
        Check::Http { path, host, statuses } => {
            let mut conn = TcpStream::connect((addr, port)).await.map_err(|e| e.to_string())?;
            let host = host.clone().unwrap_or_else(|| addr.to_string());
            let request =
                format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: xlb-health\r\nConnection: close\r\n\r\n");
            conn.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
            let mut head = [0u8; 64];
            let n = conn.read(&mut head).await.map_err(|e| e.to_string())?;
            let status = parse_status(&head[..n]).ok_or_else(|| "no HTTP status line".to_string())?;
            if statuses.contains(&status) {
                Ok(())
            } else {
                Err(format!("HTTP status {status}"))
            }
        }
        Check::Udp { payload } => {
            let any: IpAddr = if addr.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
            let socket = UdpSocket::bind((any, 0)).await.map_err(|e| e.to_string())?;
            socket.connect((addr, port)).await.map_err(|e| e.to_string())?;
            socket.send(payload).await.map_err(|e| e.to_string())?;
            let mut answer = [0u8; 512];
            socket.recv(&mut answer).await.map(drop).map_err(|e| e.to_string())
        }
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut words = line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/1."))?;
    words.next()?.parse().ok()
}

/// The probe jitter, seeded from the clock, the process and the backend, so that balancer
/// hosts do not share a schedule.
struct Jitter(fastrand::Rng);

impl Jitter {
    fn new(target: Target, addr: IpAddr) -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos
            ^ u64::from(std::process::id()) << 32
            ^ crate::tables::maglev::address_key(addr)
            ^ u64::from(target.0) << 17;
        Self(fastrand::Rng::with_seed(seed))
    }

    /// A duration within `base` × (1 ± `fraction`).
    fn around(&mut self, base: Duration, fraction: f64) -> Duration {
        let unit = self.0.f64();
        base.mul_f64((1.0 + fraction * (2.0 * unit - 1.0)).max(0.0))
    }
}

/// Probes `addr` forever, starting from `start`, and reports state changes and successes.
/// `poke` asks for a probe now (a passive alarm). Ends when the receiver is gone.
pub async fn run(
    target: Target,
    addr: IpAddr,
    cfg: HealthConfig,
    start: Start,
    events: mpsc::Sender<Event>,
    poke: Arc<Notify>,
) {
    let mut state = RiseFall::new(start, cfg.rise, cfg.fall);
    let mut jitter = Jitter::new(target, addr);
    // A backend never checked is probed at once: it takes no traffic until then. Otherwise the
    // first probe lands anywhere in the first interval.
    if start != Start::Unknown {
        time::sleep(jitter.around(cfg.interval / 2, 1.0)).await;
    }
    let mut first = start == Start::Unknown;
    loop {
        let result = probe(&cfg.check, addr, cfg.port, cfg.timeout).await;
        if result.is_ok() && events.send(Event::Reachable { target }).await.is_err() {
            return;
        }
        let detail = match (&result, std::mem::take(&mut first)) {
            (Ok(()), true) => "its first check".to_string(),
            (Err(e), true) => format!("its first check: {e}"),
            (Ok(()), false) => format!("{} successful checks", cfg.rise),
            (Err(e), false) => format!("{} failed checks, last: {e}", cfg.fall),
        };
        if let Some(up) = state.record(result.is_ok()) {
            if events.send(Event::State { target, up, detail }).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = time::sleep(jitter.around(cfg.interval, cfg.jitter)) => {}
            _ = poke.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut s = RiseFall::new(Start::Up, 2, 3);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(true), None, "a success resets the failure streak");
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), Some(false));
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(true), None);
        assert_eq!(s.record(false), None, "a failure resets the success streak");
        assert_eq!(s.record(true), None);
        assert_eq!(s.record(true), Some(true));
        assert_eq!(s.record(true), None);

        let mut s = RiseFall::new(Start::Unknown, 2, 3);
        assert_eq!(s.record(true), Some(true), "the first result decides at once");
        assert_eq!(s.record(false), None);
        let mut s = RiseFall::new(Start::Unknown, 2, 3);
        assert_eq!(s.record(false), Some(false));
        assert_eq!(s.record(true), None, "then rise as usual");
        assert_eq!(s.record(true), Some(true));
        let mut s = RiseFall::new(Start::Down, 2, 3);
        assert_eq!(s.record(true), None, "remembered down: rise successes");
        assert_eq!(s.record(true), Some(true));
    }

    #[tokio::test]
    async fn probe_tells_open_from_closed_ports() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = Duration::from_millis(500);
        assert!(probe(&Check::Tcp, Ipv4Addr::LOCALHOST.into(), port, t).await.is_ok());
        drop(listener);
        assert!(probe(&Check::Tcp, Ipv4Addr::LOCALHOST.into(), port, t).await.is_err());
    }

    #[tokio::test]
    async fn http_checks_read_the_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 512];
                let n = conn.read(&mut request).await.unwrap();
                assert!(request[..n].starts_with(b"GET /healthz HTTP/1.0\r\nHost: example\r\n"));
                conn.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes()).await.unwrap();
            }
        });
        let check = Check::Http { path: "/healthz".into(), host: Some("example".into()), statuses: vec![200, 204] };
        let t = Duration::from_millis(500);
        assert_eq!(probe(&check, Ipv4Addr::LOCALHOST.into(), port, t).await, Ok(()));
        assert_eq!(probe(&check, Ipv4Addr::LOCALHOST.into(), port, t).await, Err("HTTP status 503".into()));
        serve.await.unwrap();
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
    }

    #[tokio::test]
    async fn udp_checks_need_an_answer() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            server.send_to(&buf[..n], from).await.unwrap();
        });
        let check = Check::Udp { payload: b"ping".to_vec() };
        let t = Duration::from_millis(500);
        assert_eq!(probe(&check, Ipv4Addr::LOCALHOST.into(), port, t).await, Ok(()));
        echo.await.unwrap();
        // Nobody listens any more: the kernel's port-unreachable (or the timeout) fails it.
        assert!(probe(&check, Ipv4Addr::LOCALHOST.into(), port, t).await.is_err());
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let mut j = Jitter::new(crate::dataplane::BackendId(1), Ipv4Addr::LOCALHOST.into());
        let base = Duration::from_millis(1000);
        let samples: Vec<Duration> = (0..1000).map(|_| j.around(base, 0.1)).collect();
        assert!(samples.iter().all(|d| (900..=1100).contains(&d.as_millis())));
        assert!(samples.iter().any(|d| d.as_millis() < 950) && samples.iter().any(|d| d.as_millis() > 1050));
    }
}
