//! Connection plumbing of the L7 tier: the PROXY protocol (read from a client, written to a
//! backend, with the ppp crate), bytes read ahead given back to the reader, and the idle
//! watchdog's record of a connection's activity.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use crate::config::l7::ProxyVersion;

/// The longest PROXY header accepted (v2 with TLVs; v1 is at most 107 bytes).
const MAX_PROXY_HEADER: usize = 1024;

/// Reads a PROXY header (v1 or v2) from `stream`: the client and destination it names (None
/// for a LOCAL/UNKNOWN header: the connection's own addresses stand) and the bytes read past
/// it, which belong to the client's stream.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Duration,
) -> Result<(Option<(SocketAddr, SocketAddr)>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(256);
    let read = async {
        loop {
            let mut chunk = [0u8; 256];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the connection closed inside its PROXY header");
            }
            buf.extend_from_slice(&chunk[..n]);
            let header = HeaderResult::parse(&buf);
            if header.is_incomplete() {
                if buf.len() > MAX_PROXY_HEADER {
                    bail!("no complete PROXY header in the first {MAX_PROXY_HEADER} bytes");
                }
                continue;
            }
            return match header {
                HeaderResult::V1(Ok(h)) => {
                    let used = h.header.len();
                    let addrs = match h.addresses {
                        v1::Addresses::Tcp4(a) => Some((
                            (a.source_address, a.source_port).into(),
                            (a.destination_address, a.destination_port).into(),
                        )),
                        v1::Addresses::Tcp6(a) => Some((
                            (a.source_address, a.source_port).into(),
                            (a.destination_address, a.destination_port).into(),
                        )),
                        v1::Addresses::Unknown => None,
                    };
                    Ok((addrs, buf[used..].to_vec()))
                }
                HeaderResult::V2(Ok(h)) => {
                    let used = h.len();
                    let addrs = match (h.command, h.addresses) {
                        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some((
                            (a.source_address, a.source_port).into(),
                            (a.destination_address, a.destination_port).into(),
                        )),
                        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some((
                            (a.source_address, a.source_port).into(),
                            (a.destination_address, a.destination_port).into(),
                        )),
                        _ => None,
                    };
                    Ok((addrs, buf[used..].to_vec()))
                }
                HeaderResult::V1(Err(e)) => Err(anyhow!("bad PROXY v1 header: {e}")),
                HeaderResult::V2(Err(e)) => Err(anyhow!("bad PROXY v2 header: {e}")),
            };
        }
    };
    tokio::time::timeout(deadline, read).await.map_err(|_| anyhow!("no PROXY header within {deadline:?}"))?
}

/// The PROXY header that tells a backend who the client is and which address it reached.
pub fn proxy_header(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Result<Vec<u8>> {
    // A mixed pair (an IPv4 client on a dual-stack IPv6 listener) is written in one family.
    let (client, local) = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V6(l)) => match l.ip().to_ipv4_mapped() {
            Some(l4) => (SocketAddr::V4(c), SocketAddr::from((l4, l.port()))),
            None => (SocketAddr::from((c.ip().to_ipv6_mapped(), c.port())), SocketAddr::V6(l)),
        },
        (SocketAddr::V6(c), SocketAddr::V4(l)) => match c.ip().to_ipv4_mapped() {
            Some(c4) => (SocketAddr::from((c4, c.port())), SocketAddr::V4(l)),
            None => (SocketAddr::V6(c), SocketAddr::from((l.ip().to_ipv6_mapped(), l.port()))),
        },
        pair => pair,
    };
    match version {
        ProxyVersion::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            Ok(format!("PROXY {family} {} {} {} {}\r\n", client.ip(), local.ip(), client.port(), local.port())
                .into_bytes())
        }
        ProxyVersion::V2 => {
            let addresses: v2::Addresses = (client, local).into();
            v2::Builder::with_addresses(v2::Version::Two | v2::Command::Proxy, v2::Protocol::Stream, addresses)
                .build()
                .map_err(|e| anyhow!("cannot write a PROXY v2 header: {e}"))
        }
    }
}

/// A stream with bytes read ahead put back in front, and its activity recorded.
pub struct Conn<S> {
    inner: S,
    ahead: Vec<u8>,
    at: usize,
    activity: Arc<Activity>,
}

impl<S> Conn<S> {
    pub fn new(inner: S, ahead: Vec<u8>, activity: Arc<Activity>) -> Self {
        Self { inner, ahead, at: 0, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.ahead.len() {
            let n = buf.remaining().min(self.ahead.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.ahead[at..at + n]);
            self.at += n;
            self.activity.touch();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// When a connection last moved a byte, and how many of its requests are in progress.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    pub busy: AtomicU32,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { start: Instant::now(), last_ms: AtomicU64::new(0), busy: AtomicU32::new(0) })
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long until the connection has been idle for `idle` (zero: it has, and no request
    /// is in progress).
    pub fn idle_left(&self, idle: Duration) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        let left = (last + idle).saturating_sub(self.start.elapsed());
        if left.is_zero() && self.busy.load(Ordering::Relaxed) > 0 {
            idle
        } else {
            left
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn proxy_headers_round_trip() {
        let client: SocketAddr = "192.0.2.7:41000".parse().unwrap();
        let local: SocketAddr = "10.0.0.100:80".parse().unwrap();
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            let mut bytes = proxy_header(version, client, local).unwrap();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (addrs, rest) = read_proxy_header(&mut bytes.as_slice(), Duration::from_secs(1)).await.unwrap();
            assert_eq!(addrs, Some((client, local)), "{version:?}");
            assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        }
        let v1 =
            proxy_header(ProxyVersion::V1, "[fd00::7]:1".parse().unwrap(), "[fd00::100]:80".parse().unwrap()).unwrap();
        assert_eq!(v1, b"PROXY TCP6 fd00::7 fd00::100 1 80\r\n");
        // An IPv4 client seen on an IPv6 socket is written as IPv4.
        let mapped =
            proxy_header(ProxyVersion::V1, "[::ffff:192.0.2.7]:5".parse().unwrap(), "10.0.0.100:80".parse().unwrap())
                .unwrap();
        assert_eq!(mapped, b"PROXY TCP4 192.0.2.7 10.0.0.100 5 80\r\n");
    }

    #[tokio::test]
    async fn garbage_is_not_a_proxy_header() {
        let mut bytes: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(read_proxy_header(&mut bytes, Duration::from_secs(1)).await.is_err());
    }
}
