//! The agent as a real process inside the balancer's namespace, its log in a file.
use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;

/// The `lb-agent` binary that cargo built beside the running test or demo.
pub fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("lb-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("lb-agent binary not found near {}: build the workspace first (cargo xtask build)", exe.display())
}

pub struct AgentProcess {
    child: Child,
    pub log: PathBuf,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(crate::netns::unique_name(tag));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl AgentProcess {
    /// Starts `lb-agent run` with `config` (TOML text) in `ns` and waits until it is ready.
    pub fn start(ns: &Netns, config: &str, extra: &[&str]) -> Result<Self> {
        let dir = TempDir::new("agent")?;
        let config_path = dir.0.join("xlb.toml");
        std::fs::write(&config_path, config)?;
        let socket = dir.0.join("agent.sock");
        let socket = socket.to_str().context("path")?.to_string();
        let state = dir.0.join("state.json");
        let state = state.to_str().context("path")?.to_string();
        let mut args = vec!["run", "--config", config_path.to_str().context("path")?, "--api-socket", &socket];
        // A state file of the test's own, unless the test shares one between agents.
        if !extra.contains(&"--state-file") {
            args.extend(["--state-file", &state]);
        }
        args.extend_from_slice(extra);
        // Ready: attached, and every backend checked once (before that, backends never checked
        // take no traffic).
        Self::spawn(ns, dir, &args, "ready: every backend checked")
    }

    /// Starts `lb-agent args...` in `ns`, its log in `dir`, and waits for `ready` in the log.
    pub fn spawn(ns: &Netns, dir: TempDir, args: &[&str], ready: &str) -> Result<Self> {
        let log = dir.0.join("agent.log");
        let log_file = File::create(&log)?;
        let mut cmd = ns.command(agent_binary()?.to_str().context("path")?);
        cmd.args(args)
            .env("RUST_LOG_STYLE", "never")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = cmd.spawn().context("cannot start lb-agent")?;
        let mut agent = Self { child, log, _dir: dir };
        agent.wait_for_log(ready, Duration::from_secs(20))?;
        Ok(agent)
    }

    /// The agent's control socket.
    pub fn socket(&self) -> PathBuf {
        self._dir.0.join("agent.sock")
    }

    /// `lb-agent ctl --socket <this agent's socket> args...`: (success, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = std::process::Command::new(agent_binary()?)
            .arg("ctl")
            .arg("--socket")
            .arg(self._dir.0.join("agent.sock"))
            .args(args)
            .output()?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ok((out.status.success(), text(&out.stdout), text(&out.stderr)))
    }

    /// GET /metrics from `addr` inside `ns` (the agent's namespace).
    pub fn scrape(ns: &Netns, addr: &'static str) -> Result<String> {
        use std::io::{Read, Write};
        ns.run(move || -> Result<String> {
            let mut conn = std::net::TcpStream::connect(addr)?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            conn.read_to_string(&mut response)?;
            Ok(response)
        })?
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (returns how long it took), or fails with the log.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<Duration> {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Waits until `needle` appears at least `count` times in the log.
    pub fn wait_for_count(&mut self, needle: &str, count: usize, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.log_text().matches(needle).count() >= count {
                return Ok(start.elapsed());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("lb-agent exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("lb-agent did not log {needle:?} within {timeout:?}:\n{}", self.log_text())
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then waits for a clean exit; returns the whole log.
    pub fn stop(&mut self) -> Result<String> {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = self.log_text();
                if !status.success() {
                    bail!("lb-agent exited with {status}:\n{log}");
                }
                return Ok(log);
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("lb-agent ignored SIGTERM for 10 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the config file, sends SIGHUP and waits for the agent's verdict; returns its
    /// log line ("reloaded ..." or "reload ... rejected ...").
    pub fn reload(&mut self, config: &str) -> Result<String> {
        std::fs::write(self._dir.0.join("xlb.toml"), config)?;
        let done = |log: &str| log.matches("reloaded").count() + log.matches("rejected").count();
        let before = done(&self.log_text());
        self.signal(libc::SIGHUP);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let log = self.log_text();
            if done(&log) > before {
                let line = log.lines().rev().find(|l| l.contains("reloaded") || l.contains("rejected"));
                return Ok(line.unwrap_or_default().to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("lb-agent did not answer SIGHUP within 10 s:\n{}", self.log_text())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl AgentProcess {
    /// The agent's pid (`ip netns exec` execs it: the child is the agent itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The CPU time the agent has used so far, all its threads, user and system, in clock
    /// ticks (/proc/<pid>/stat); None once it is gone.
    pub fn cpu_ticks(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        crate::bench::stat_cpu_ticks(&stat, false)
    }

    /// SIGKILL, as a crash: the agent cleans nothing up. Waits until it is gone.
    pub fn kill9(&mut self) -> Result<()> {
        self.signal(libc::SIGKILL);
        let status = self.child.wait()?;
        if status.code().is_some() {
            bail!("lb-agent exited ({status}) before SIGKILL:\n{}", self.log_text());
        }
        Ok(())
    }
}
