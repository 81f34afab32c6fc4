//! A minimal HTTP/1.1 client over a plain socket, for tests that must see exactly what goes
//! over the wire (statuses, headers, a connection cut); curl covers TLS, HTTP/2 and cookies.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends `request` (whole, as bytes) on a new connection and reads the answer to the end.
pub fn exchange(to: SocketAddr, request: &[u8]) -> Result<Reply> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("reading the answer")?;
    parse(&raw)
}

pub fn parse(raw: &[u8]) -> Result<Reply> {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("no complete answer: {text:?}") };
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
    let Some(status) = status else { bail!("no status line: {text:?}") };
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    Ok(Reply { status, headers, body: body.to_string() })
}

/// GET `path` with `Host: host` and extra header lines, `Connection: close`, from `ns`.
pub fn get(ns: &Netns, to: SocketAddr, host: &str, path: &str, extra: &[&str]) -> Result<Reply> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in extra {
        req += h;
        req += "\r\n";
    }
    req += "\r\n";
    ns.run(move || exchange(to, req.as_bytes()))?
}

/// `count` GETs of `/`, each on its own connection: the answers' bodies, tallied.
pub fn tally(
    ns: &Netns,
    to: SocketAddr,
    host: &'static str,
    count: usize,
) -> Result<std::collections::BTreeMap<String, usize>> {
    ns.run(move || {
        let mut t = std::collections::BTreeMap::new();
        for _ in 0..count {
            let key =
                match exchange(to, format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()) {
                    Ok(r) if r.status == 200 => r.body.trim().to_string(),
                    Ok(r) => format!("status {}", r.status),
                    Err(e) => format!("error: {e}"),
                };
            *t.entry(key).or_default() += 1;
        }
        t
    })
}
