//! Load generation for the end-to-end benchmark (`xlb-bench-e2e`): Debian packages installed on
//! demand without starting their system services, daemons (nginx, HAProxy) run as process
//! groups inside namespaces and killed on drop, wrk runs and its report parsed, and a bounded
//! UDP sender/receiver with echo servers on the backends. Every loop is bounded in count and
//! time.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::netns::Netns;

// ---------------------------------------------------------------------------------------------
// Debian packages

/// Whether dpkg has `package` installed.
pub fn dpkg_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("cannot run dpkg-query: the benchmark supports Debian-based systems only")?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// The installed version of `package`, or "?".
pub fn dpkg_version(package: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const POLICY_DENY: &str = "#!/bin/sh\n# xlb-bench-e2e: no service starts while it installs packages\nexit 101\n";

/// Keeps Debian's maintainer scripts from starting services while it lives: a `policy-rc.d`
/// that denies everything, put in place for the install and the previous state restored after.
struct PolicyGuard {
    /// The previous policy-rc.d's content, or None when there was none.
    previous: Option<Vec<u8>>,
    installed: bool,
}

impl PolicyGuard {
    fn deny_all() -> Result<Self> {
        let previous = std::fs::read(POLICY_RC_D).ok();
        if previous.as_deref().is_some_and(|p| String::from_utf8_lossy(p).lines().any(|l| l.trim() == "exit 101")) {
            // Already denies everything (Docker-style images ship one).
            return Ok(Self { previous, installed: false });
        }
        std::fs::write(POLICY_RC_D, POLICY_DENY).with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        set_mode(Path::new(POLICY_RC_D), 0o755)?;
        Ok(Self { previous, installed: true })
    }
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        if !self.installed {
            return;
        }
        let _ = match &self.previous {
            Some(content) => std::fs::write(POLICY_RC_D, content),
            None => std::fs::remove_file(POLICY_RC_D),
        };
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

/// Installs whichever of `packages` is missing with apt-get (update first), with a
/// `policy-rc.d` that keeps the packages' system services from starting; where systemd runs,
/// also disables and stops `services` afterwards. A no-op when everything is installed.
/// Returns the packages it installed.
pub fn ensure_packages(packages: &[&str], services: &[&str]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for &p in packages {
        if !dpkg_installed(p)? {
            missing.push(p.to_string());
        }
    }
    if missing.is_empty() {
        return Ok(missing);
    }
    eprintln!("bench-e2e: installing {} with apt-get (system services kept stopped)", missing.join(" "));
    {
        let _policy = PolicyGuard::deny_all()?;
        let quiet = |cmd: &mut Command| -> Result<()> {
            let out = cmd.env("DEBIAN_FRONTEND", "noninteractive").output().context("cannot run apt-get")?;
            if !out.status.success() {
                bail!(
                    "apt-get failed ({}):\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        };
        quiet(Command::new("apt-get").args(["update", "-q"]))?;
        quiet(Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends"]).args(&missing))?;
    }
    if Path::new("/run/systemd/system").exists() {
        for s in services {
            let _ = Command::new("systemctl").args(["disable", "--now", &format!("{s}.service")]).output();
        }
    }
    for p in &missing {
        ensure!(dpkg_installed(p)?, "apt-get reported success but {p} is still not installed");
    }
    Ok(missing)
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A process started in a namespace as the leader of its own process group (so that its
/// children, e.g. nginx's workers, can be signalled with it). On `stop` or drop: SIGTERM to the
/// group, up to `grace` to exit, then SIGKILL to whatever of the group is left.
pub struct Daemon {
    child: Child,
    pub name: String,
    pub log: PathBuf,
    reaped: bool,
}

impl Daemon {
    /// Starts `program args...` in `ns`, stdout and stderr appended to `log`.
    pub fn spawn(ns: &Netns, name: &str, program: &str, args: &[&str], log: PathBuf) -> Result<Self> {
        let file = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = ns.command(program);
        cmd.args(args).stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file).process_group(0);
        let child = cmd.spawn().with_context(|| format!("cannot start {program}"))?;
        Ok(Self { child, name: name.to_string(), log, reaped: false })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process's pid (`ip netns exec` execs the program: the child is the program).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log if the process has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(how) = self.exited() {
            bail!("{} ended ({how}):\n{}", self.name, self.log_text());
        }
        Ok(())
    }

    /// How the leader ended ("exit code N" or "signal N") if it has, without reaping it:
    /// while it is a zombie its pid, and so the group id, cannot be reused, and the group can
    /// still be signalled safely.
    fn exited(&mut self) -> Option<String> {
        if self.reaped {
            return Some("reaped".into());
        }
        // SAFETY: waitid on our own child with WNOWAIT only reads its state into `info`.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(libc::P_PID, self.child.id(), &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
        };
        // SAFETY: si_pid/si_status are valid to read after a successful waitid.
        if rc != 0 || unsafe { info.si_pid() } == 0 {
            return None;
        }
        let status = unsafe { info.si_status() };
        Some(if info.si_code == libc::CLD_EXITED { format!("exit code {status}") } else { format!("signal {status}") })
    }

    fn signal_group(&self, sig: i32) {
        // SAFETY: kill(2) on the process group our own child leads (it is not reaped yet).
        unsafe { libc::kill(-(self.child.id() as i32), sig) };
    }

    /// Stops the whole group; bounded by `grace` plus a second.
    pub fn stop(&mut self, grace: Duration) {
        if self.reaped {
            return;
        }
        self.signal_group(libc::SIGTERM);
        let start = Instant::now();
        while self.exited().is_none() && start.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Leftover members (or a leader that ignored SIGTERM) while the group id is still ours.
        self.signal_group(libc::SIGKILL);
        let start = Instant::now();
        while self.exited().is_none() && start.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Waits up to `timeout` for the process to end by itself, then stops it; returns how it
    /// ended if it did by itself ("exit code 0" for success).
    pub fn wait_bounded(&mut self, timeout: Duration) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(how) = self.exited() {
                self.stop(Duration::from_millis(100));
                return Some(how);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop(Duration::from_secs(1));
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Waits until a TCP connection to `addr` from `ns` succeeds (the daemon behind it listens),
/// for at most `timeout`.
pub fn wait_tcp(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let ok = ns.run(move || {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })?;
    ensure!(ok, "nothing listens on {addr} in {} after {timeout:?}", ns.name);
    Ok(())
}

/// One HTTP/1.0 GET of `/` on a new connection from the calling thread's namespace: the body
/// on 200, else an error.
pub fn http_get(to: SocketAddr) -> Result<String, String> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect: {}", e.kind()))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n").map_err(|e| format!("write: {}", e.kind()))?;
    let mut reply = Vec::new();
    // At most 64 KiB: the pages are small.
    s.take(1 << 16).read_to_end(&mut reply).map_err(|e| format!("read: {}", e.kind()))?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of headers")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("status {status:?}"));
    }
    Ok(body.to_string())
}

// ---------------------------------------------------------------------------------------------
// wrk

/// What one wrk run reports.
#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx responses.
    pub errors: u64,
}

/// Parses wrk's report (run with `--latency`).
pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut seen = (false, false, false);
    for line in out.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.requests_per_sec = v.trim().parse().with_context(|| format!("wrk: bad line {line:?}"))?;
            seen.0 = true;
        } else if let Some(v) = line.strip_prefix("50%") {
            r.p50_us = parse_wrk_time(v.trim())?;
            seen.1 = true;
        } else if let Some(v) = line.strip_prefix("99%") {
            r.p99_us = parse_wrk_time(v.trim())?;
            seen.2 = true;
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            r.requests = n.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.errors += v.split(',').filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok()).sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    ensure!(seen == (true, true, true), "wrk's report lacks Requests/sec or the latency distribution:\n{out}");
    Ok(r)
}

/// wrk's time format: "812.00us", "1.23ms", "2.01s", "1.50m".
fn parse_wrk_time(s: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600e6)
    } else {
        bail!("wrk: unknown time {s:?}")
    };
    Ok(num.trim().parse::<f64>().with_context(|| format!("wrk: bad time {s:?}"))? * scale)
}

/// How to run wrk.
#[derive(Clone, Debug)]
pub struct WrkOptions {
    pub threads: usize,
    pub connections: usize,
    pub duration: Duration,
    /// Sends `Connection: close`: one request per connection.
    pub close: bool,
    /// A Lua script (path) for wrk's `-s`.
    pub script: Option<PathBuf>,
}

/// Runs wrk in `ns` against `url`; killed if it overruns its duration by 15 s.
pub fn run_wrk(ns: &Netns, url: &str, o: &WrkOptions, log: PathBuf) -> Result<WrkResult> {
    let (t, c, d) = (o.threads.to_string(), o.connections.to_string(), format!("{}s", o.duration.as_secs().max(1)));
    let mut args = vec!["-t", &t, "-c", &c, "-d", &d, "--timeout", "2s", "--latency"];
    if o.close {
        args.extend_from_slice(&["-H", "Connection: close"]);
    }
    let script = o.script.as_ref().map(|p| p.to_string_lossy().into_owned());
    if let Some(s) = &script {
        args.extend_from_slice(&["-s", s]);
    }
    args.push(url);
    let mut wrk = Daemon::spawn(ns, "wrk", "wrk", &args, log)?;
    let code = wrk.wait_bounded(o.duration + Duration::from_secs(15));
    let out = wrk.log_text();
    match code.as_deref() {
        Some("exit code 0") => parse_wrk(&out).with_context(|| format!("wrk {}", args.join(" "))),
        Some(how) => bail!("wrk {} ended ({how}):\n{out}", args.join(" ")),
        None => bail!("wrk {} did not finish in time:\n{out}", args.join(" ")),
    }
}

/// A wrk script that gives thread i the address of `hosts[i % n]`: one wrk run spreads its
/// connections evenly over several servers (the direct client→backend case).
pub fn wrk_spread_script(hosts: &[std::net::IpAddr], port: u16) -> String {
    let list: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "-- Written by xlb-bench-e2e: thread i connects to host i mod n.\n\
         local hosts = {{{}}}\n\
         local n = 0\n\
         function setup(thread)\n\
         \x20 n = n + 1\n\
         \x20 local host = hosts[((n - 1) % #hosts) + 1]\n\
         \x20 thread.addr = wrk.lookup(host, \"{port}\")[1]\n\
         end\n",
        list.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// UDP

const UDP_MAGIC: &[u8; 8] = b"xlbbench";
/// Payload of every datagram: the magic, a sequence number, padding.
pub const UDP_PAYLOAD: usize = 64;

/// UDP echo servers in one namespace: one thread per bound address, each answering every
/// datagram to its sender from the address it was bound to. Stopped on drop.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    pub received: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(ns: &Netns, addrs: &[SocketAddr]) -> Result<Self> {
        let addrs = addrs.to_vec();
        let socks = ns.run(move || -> Result<Vec<UdpSocket>> {
            addrs
                .iter()
                .map(|a| {
                    let s = UdpSocket::bind(a).with_context(|| format!("cannot bind {a}"))?;
                    s.set_read_timeout(Some(Duration::from_millis(50)))?;
                    set_buffers(&s, 4 << 20);
                    Ok(s)
                })
                .collect()
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let threads = socks
            .into_iter()
            .map(|s| {
                let (stop, received) = (stop.clone(), received.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            received.fetch_add(1, Ordering::Relaxed);
                            let _ = s.send_to(&buf[..n], from);
                        }
                    }
                })
            })
            .collect();
        Ok(Self { stop, received, threads })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn set_buffers(s: &UdpSocket, bytes: i32) {
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt on our own socket with an int of the right size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
    }
}

/// How to run the UDP load.
#[derive(Clone, Debug)]
pub struct UdpOptions {
    /// Client sockets (source ports), each connected to one target in turn: the flows.
    pub flows: usize,
    pub duration: Duration,
    /// Datagrams per second over all flows; 0: as fast as the sender can.
    pub rate: u64,
    /// How long answers are still counted after the last datagram went out.
    pub grace: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct UdpResult {
    pub sent: u64,
    pub answered: u64,
    /// Sends that failed (e.g. an ICMP error reported on the connected socket).
    pub send_errors: u64,
    /// Answers per second of sending time.
    pub answers_per_sec: f64,
    /// Share of sent datagrams without an answer.
    pub loss: f64,
}

/// Sends datagrams from `ns` to `targets` (flow i to `targets[i % n]`) for `o.duration`, on one
/// sender thread, while a receiver thread counts the answers (a connected socket takes answers
/// only from the address it sent to: a reply from the wrong source counts as lost).
pub fn run_udp(ns: &Netns, targets: &[SocketAddr], o: &UdpOptions) -> Result<UdpResult> {
    ensure!(!targets.is_empty() && o.flows > 0, "no UDP targets or flows");
    let targets = targets.to_vec();
    let flows = o.flows;
    let socks = ns.run(move || -> Result<Vec<UdpSocket>> {
        (0..flows)
            .map(|i| {
                let to = targets[i % targets.len()];
                let any: SocketAddr =
                    if to.is_ipv4() { (std::net::Ipv4Addr::UNSPECIFIED, 0).into() } else { "[::]:0".parse()? };
                let s = UdpSocket::bind(any)?;
                s.connect(to)?;
                s.set_nonblocking(true)?;
                set_buffers(&s, 1 << 20);
                Ok(s)
            })
            .collect()
    })??;
    let socks = Arc::new(socks);
    let sending = Arc::new(AtomicBool::new(true));
    let answered = Arc::new(AtomicU64::new(0));

    let (rx_socks, rx_sending, rx_answered, grace) = (socks.clone(), sending.clone(), answered.clone(), o.grace);
    let receiver = std::thread::spawn(move || {
        let mut fds: Vec<libc::pollfd> =
            rx_socks.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        let mut buf = [0u8; 2048];
        let mut stopped_at: Option<Instant> = None;
        // Bounded: ends `grace` after the sender stops (the sender itself is bounded in time).
        loop {
            if stopped_at.is_none() && !rx_sending.load(Ordering::Acquire) {
                stopped_at = Some(Instant::now());
            }
            if stopped_at.is_some_and(|t| t.elapsed() >= grace) {
                break;
            }
            // SAFETY: poll on our own array of pollfds, its true length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
            if n <= 0 {
                continue;
            }
            for (i, pfd) in fds.iter_mut().enumerate() {
                if pfd.revents == 0 {
                    continue;
                }
                pfd.revents = 0;
                // Drain, at most 256 at a time so that no flow starves the others.
                for _ in 0..256 {
                    match rx_socks[i].recv(&mut buf) {
                        Ok(len) if len >= 8 && &buf[..8] == UDP_MAGIC => {
                            rx_answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        // ECONNREFUSED and the like: an ICMP error on this flow.
                        Err(_) => break,
                    }
                }
            }
        }
    });

    // The sender, on this thread: round robin over the flows; paced in 1 ms steps when a rate
    // is set.
    let mut payload = [0u8; UDP_PAYLOAD];
    payload[..8].copy_from_slice(UDP_MAGIC);
    let (mut sent, mut errors, mut seq) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut flow = 0;
    while start.elapsed() < o.duration {
        let budget = if o.rate == 0 {
            64
        } else {
            let due = (start.elapsed().as_secs_f64() * o.rate as f64) as u64;
            let owed = (due + 1).saturating_sub(sent + errors);
            if owed == 0 {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            owed.min(4096)
        };
        for _ in 0..budget {
            seq += 1;
            payload[8..16].copy_from_slice(&seq.to_be_bytes());
            match socks[flow].send(&payload) {
                Ok(_) => sent += 1,
                // A full socket buffer: drop this one, as an overloaded sender would.
                Err(_) => errors += 1,
            }
            flow = (flow + 1) % socks.len();
        }
    }
    let elapsed = start.elapsed();
    sending.store(false, Ordering::Release);
    receiver.join().map_err(|_| anyhow::anyhow!("UDP receiver panicked"))?;
    let answered = answered.load(Ordering::Relaxed);
    Ok(UdpResult {
        sent,
        answered,
        send_errors: errors,
        answers_per_sec: answered as f64 / elapsed.as_secs_f64(),
        loss: if sent == 0 { 1.0 } else { 1.0 - (answered.min(sent) as f64 / sent as f64) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 2s test @ http://10.99.0.100/
  3 threads and 60 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms    1.20ms  30.00ms   90.00%
    Req/Sec     9.50k   500.00     10.20k    70.00%
  Latency Distribution
     50%  812.00us
     75%    2.50ms
     90%    3.10ms
     99%    1.02s
  57000 requests in 2.00s, 40.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:  28500.12
Transfer/sec:     20.00MB
";

    #[test]
    fn parses_a_wrk_report() {
        let r = parse_wrk(REPORT).unwrap();
        assert_eq!(r.requests_per_sec, 28500.12);
        assert_eq!(r.p50_us, 812.0);
        assert_eq!(r.p99_us, 1.02e6);
        assert_eq!(r.requests, 57000);
        assert_eq!(r.errors, 10);
        assert!(parse_wrk("Requests/sec: 5").is_err());
    }

    #[test]
    fn parses_wrk_times() {
        assert_eq!(parse_wrk_time("1.50ms").unwrap(), 1500.0);
        assert_eq!(parse_wrk_time("2.00m").unwrap(), 120e6);
        assert!(parse_wrk_time("3x").is_err());
    }
}
