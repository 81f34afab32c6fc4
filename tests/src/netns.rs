//! Network namespaces: an RAII guard, commands inside them, and threads that enter them.
use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{bail, Context as _, Result};

/// Prefix of every namespace the test bed creates; `cargo xtask clean-netns` removes leftovers.
pub const PREFIX: &str = "xlb-";

/// A network namespace that is deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `xlb-<pid>-<n>-<role>`.
pub fn unique_name(role: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}-{n}-{role}", std::process::id() % 100_000)
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        let name = unique_name(role);
        sh(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        // No duplicate address detection on interfaces created here or moved in: a link-local
        // address stays tentative for a second or more otherwise, and neighbour discovery over
        // it (the first packets to an IPv6 next hop) waits that long.
        for key in ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"] {
            ns.exec(&["sysctl", "-qw", key])?;
        }
        Ok(ns)
    }

    /// Runs a command inside the namespace and fails with its stderr if it fails.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it opens live there.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let handle = self.spawn(f)?;
        handle.join().map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))
    }

    /// Like `run`, without waiting.
    pub fn spawn<F, R>(&self, f: F) -> Result<thread::JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        Ok(thread::spawn(move || {
            enter(&file).expect("setns");
            f()
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn enter(file: &File) -> Result<()> {
    // SAFETY: setns on an fd we own; it changes only the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs a command and returns its output, or an error carrying its stderr.
pub fn sh(args: &[&str]) -> Result<Output> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}
