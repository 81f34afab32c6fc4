//! `cargo xtask package`: the Debian package (cargo-deb) with the agent, its systemd units, the
//! example config (a conffile), man pages and shell completions generated from the CLI; and the
//! check `cargo xtask test` runs on it: install, use, verify the units, purge, nothing left.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::run::{self, command};

/// The cargo-deb release checked to build with this toolchain.
const CARGO_DEB: &str = "3.8.0";
const PACKAGE: &str = "xlb";

fn ensure_cargo_deb() -> Result<()> {
    let installed = run::output(run::cargo().args(["deb", "--version"])).unwrap_or_default();
    if installed.contains(CARGO_DEB) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB} (a few minutes, once)");
    run::run(run::cargo().args(["install", "cargo-deb", "--version", CARGO_DEB, "--locked"]))
}

/// Builds the .deb; returns its path.
pub fn package() -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let root = run::workspace_root()?;
    run::run(run::cargo().args(["build", "--release", "-p", "lb-agent"]))?;
    let agent = root.join("target/release/lb-agent");
    let out = root.join("target/package");
    let _ = std::fs::remove_dir_all(&out);
    run::run(command(agent.to_str().context("path")?).arg("generate").arg("man").arg(out.join("man")))?;
    for shell in ["bash", "zsh", "fish"] {
        run::run(
            command(agent.to_str().context("path")?)
                .args(["generate", "completions", shell])
                .arg(out.join("completions")),
        )?;
    }
    let printed = run::output(run::cargo().args(["deb", "-p", "lb-agent", "--no-build"]))?;
    let deb =
        printed.lines().rev().map(str::trim).find(|l| l.ends_with(".deb")).context("cargo deb printed no .deb")?;
    let deb = PathBuf::from(deb);
    let size = std::fs::metadata(&deb).with_context(|| format!("{}", deb.display()))?.len();
    eprintln!("xtask: {} ({:.1} MB)", deb.display(), size as f64 / 1e6);
    Ok(deb)
}

/// Purges the package when dropped, whatever happened in between.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::process::Command::new("dpkg").args(["--purge", PACKAGE]).output();
    }
}

/// Builds the package, installs it with dpkg, checks what an operator would use, removes it
/// again and checks that none of its files is left.
pub fn check() -> Result<()> {
    let deb = package()?;
    let listing = run::output(command("dpkg-deb").arg("-c").arg(&deb))?;
    // Files only (the last field; directories end with '/').
    let files: Vec<String> = listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    eprintln!("xtask: the package holds {} files:\n  {}", files.len(), files.join("\n  "));
    for want in ["/usr/sbin/lb-agent", "/lib/systemd/system/xlb.service", "/lib/systemd/system/xlb-decap@.service"] {
        if !files.iter().any(|f| f == want) {
            bail!("the package lacks {want}");
        }
    }
    if run::output(command("dpkg-query").args(["-W", PACKAGE])).is_ok() {
        bail!("{PACKAGE} is already installed on this machine: not touching it");
    }
    let installed = Installed;
    run::run(command("dpkg").arg("-i").arg(&deb))?;
    let version = run::output(command("/usr/sbin/lb-agent").arg("--version"))?;
    if !version.contains(env!("CARGO_PKG_VERSION")) {
        bail!("lb-agent --version says {version:?}");
    }
    let page = run::output(command("man").args(["-w", "lb-agent"]))?;
    if !page.trim().ends_with("lb-agent.8.gz") && !page.trim().ends_with("lb-agent.8") {
        bail!("man -w lb-agent found {page:?}");
    }
    run::output(command("man").args(["-w", "8", "lb-agent-run"]))?;
    let check = run::output(command("/usr/sbin/lb-agent").args(["check", "--config", "/etc/xlb/xlb.toml"]))?;
    eprintln!("xtask: {}", check.trim());
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let out = command("systemd-analyze")
            .args(["verify", "/lib/systemd/system/xlb.service", "/lib/systemd/system/xlb-decap@eth0.service"])
            .output()?;
        let said = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || said.lines().any(|l| l.contains("xlb")) {
            bail!("systemd-analyze verify of the units:\n{said}");
        }
        eprintln!("xtask: systemd-analyze verify: the units are clean");
    } else {
        eprintln!("xtask: no systemd-analyze here: units not verified");
    }
    drop(installed);
    let left: Vec<&String> = files.iter().filter(|f| Path::new(f.as_str()).exists()).collect();
    if !left.is_empty() {
        bail!("dpkg --purge left {left:?}");
    }
    eprintln!("xtask: installed, used and purged {}: nothing left", deb.display());
    Ok(())
}
