//! Running child processes: every child gets the cargo bin directory first on PATH, and a failed
//! child becomes an error that remembers its exit status.

use std::env;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};

/// A child that ran and failed; `main` turns it into our own exit status.
#[derive(Debug)]
pub struct ChildFailed {
    command: String,
    status: ExitStatus,
    /// What the child said on stderr, when it was captured rather than shown.
    stderr: String,
}

impl ChildFailed {
    pub fn exit_code(&self) -> u8 {
        let code = match (self.status.code(), self.status.signal()) {
            (Some(code), _) => code,
            // Same convention as the shell for a child killed by a signal.
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        };
        u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1)
    }
}

impl fmt::Display for ChildFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed ({})", self.command, self.status)?;
        if !self.stderr.is_empty() {
            write!(f, ": {}", self.stderr)?;
        }
        Ok(())
    }
}

impl std::error::Error for ChildFailed {}

/// Where `cargo install` puts binaries: bpf-linker must be found there even when the caller's
/// PATH lacks it (fresh machines, CI, sudo).
pub fn cargo_bin_dir() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home).join("bin"));
    }
    Ok(home_dir()?.join(".cargo").join("bin"))
}

/// The workspace's root directory (xtask's parent): where target/ and the packaging files are.
pub fn workspace_root() -> Result<PathBuf> {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(here.parent().context("xtask has no parent directory")?.to_path_buf())
}

pub fn home_dir() -> Result<PathBuf> {
    env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).context("HOME is not set")
}

fn child_path() -> Result<OsString> {
    let bin = cargo_bin_dir()?;
    let rest = env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(bin.clone()).chain(env::split_paths(&rest).filter(|d| *d != bin));
    env::join_paths(dirs).context("cannot build PATH for child processes")
}

/// A command whose PATH (used for its own lookup too) starts with the cargo bin directory.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    match child_path() {
        Ok(path) => {
            cmd.env("PATH", path);
        }
        // Without HOME/CARGO_HOME the inherited PATH is the best we have.
        Err(err) => eprintln!("xtask: warning: {err:#}"),
    }
    cmd
}

/// The cargo that runs us (cargo sets $CARGO), so children use the same toolchain.
pub fn cargo() -> Command {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    command(&cargo)
}

pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn spawn_error(cmd: &Command, err: io::Error) -> anyhow::Error {
    let what = describe(cmd);
    if err.kind() == io::ErrorKind::NotFound {
        anyhow::Error::new(err).context(format!(
            "cannot run `{what}`: {} is not installed or not on PATH",
            cmd.get_program().to_string_lossy()
        ))
    } else {
        anyhow::Error::new(err).context(format!("cannot run `{what}`"))
    }
}

/// Runs `cmd` with inherited stdio, echoing it first so logs show what was run.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", describe(cmd));
    run_quiet(cmd)
}

/// Like [`run`] without the echo.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| spawn_error(cmd, e))?;
    if status.success() {
        Ok(())
    } else {
        Err(ChildFailed { command: describe(cmd), status, stderr: String::new() }.into())
    }
}

/// Runs `cmd` and returns its stdout; on failure the error carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| spawn_error(cmd, e))?;
    if !out.status.success() {
        return Err(ChildFailed {
            command: describe(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }
        .into());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

/// Whether `cmd` runs and exits successfully; for checks, so all output is swallowed.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    // `Uid:` is followed by the real, effective, saved and filesystem uids.
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .context("no effective uid in /proc/self/status")
}

/// Fails with a message saying why root is needed, so nobody has to decode an EPERM later.
pub fn require_root(why: &str) -> Result<()> {
    if effective_uid()? != 0 {
        bail!("this command must run as root: {why}");
    }
    Ok(())
}
