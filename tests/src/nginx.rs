//! nginx as a real backend in a namespace: it answers with its own name, logs what the
//! proxy sent it (X-Forwarded-For, the Cookie header, the PROXY protocol's client address),
//! and serves a slow large file for long downloads. Stopped on drop.
use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{agent::TempDir, netns::Netns};

/// Ports every nginx backend listens on.
pub const HTTP_PORT: u16 = 8080;
/// `listen ... proxy_protocol`: answers with the client address the PROXY header carried.
pub const PROXY_PORT: u16 = 8081;

pub struct Nginx {
    child: Child,
    killed: bool,
    pub dir: TempDir,
    pub name: String,
}

impl Nginx {
    /// nginx in `ns` on every address (IPv4 and IPv6), answering `name`.
    pub fn start(ns: &Netns, name: &str) -> Result<Self> {
        let dir = TempDir::new("nginx")?;
        let d = dir.0.display();
        // 1 MB served at 256 kB/s: a download of about 4 s.
        std::fs::write(dir.0.join("big.bin"), vec![b'x'; 1 << 20])?;
        let conf = format!(
            r#"daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format xlb '$remote_addr|$http_x_forwarded_for|$http_x_forwarded_proto|$http_x_forwarded_host|$http_cookie|$http_forwarded|$http_connection|$request_uri|$proxy_protocol_addr';
    access_log {d}/access.log xlb;
    keepalive_requests 100000;
    server {{
        listen {HTTP_PORT} reuseport;
        listen [::]:{HTTP_PORT} reuseport;
        location / {{ default_type text/plain; return 200 "{name}\n"; }}
        location /health {{ default_type text/plain; return 200 "ok\n"; }}
        location /big.bin {{ root {d}; limit_rate 256k; }}
    }}
    server {{
        listen {PROXY_PORT} proxy_protocol;
        listen [::]:{PROXY_PORT} proxy_protocol;
        location / {{ default_type text/plain; return 200 "$proxy_protocol_addr\n"; }}
    }}
}}
"#
        );
        let path = dir.0.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let child = ns
            .command("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nginx (cargo xtask setup installs it)")?;
        let nginx = Self { child, killed: false, dir, name: name.to_string() };
        // Ready once its pid file is written (the sockets are bound before).
        let start = Instant::now();
        while !nginx.dir.0.join("nginx.pid").exists() {
            if start.elapsed() > Duration::from_secs(5) {
                bail!(
                    "nginx did not start: {}",
                    std::fs::read_to_string(nginx.dir.0.join("error.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        Ok(nginx)
    }

    /// Its access log: a line per request, fields split on '|'.
    pub fn log(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.0.join("access.log")
    }

    /// Kills it at once: the master stopped first (it would start new workers), then its
    /// workers, then the master.
    pub fn kill(&mut self) {
        if std::mem::replace(&mut self.killed, true) {
            return;
        }
        let master = self.child.id().to_string();
        let quiet = |cmd: &mut std::process::Command| {
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        quiet(std::process::Command::new("kill").args(["-STOP", &master]));
        quiet(std::process::Command::new("pkill").args(["-9", "-P", &master]));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}
