//! `cargo xtask setup`: brings a Debian machine to the point where the workspace builds and its
//! tests run. Every step checks first, so a ready machine costs only a few quick commands.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::run::{self, command};

/// Debian packages the tests and the demo call at run time; extend here.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "bpftool",
    "tcpdump",
    "nftables",
    "prometheus",
    "man-db",
    "bird2",
    "nginx",
    "curl",
    "haproxy",
    "wrk",
    "nghttp2-client",
];

/// The bpf-linker release verified against this nightly's LLVM 22 (see TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// lb-agent's build.rs (aya-build) compiles the eBPF crate with `-Z build-std`, hence nightly.
const NIGHTLY: &str = "nightly";

pub fn setup() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    debian_packages()
}

fn rust_src() -> Result<()> {
    let installed =
        run::output(command("rustup").args(["component", "list", "--toolchain", NIGHTLY, "--installed"]))
            .with_context(|| format!("the {NIGHTLY} toolchain is needed to build the eBPF crate; is it installed?"))?;
    // Listed as `rust-src`, without a target suffix, since it is target-independent.
    if installed.lines().any(|l| l.trim() == "rust-src") {
        println!("setup: rust-src for {NIGHTLY}: present");
        return Ok(());
    }
    println!("setup: rust-src for {NIGHTLY}: missing, installing");
    run::run(command("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// bpf-linker must use the same LLVM as the rustc that emits the bitcode. Nightly ships its LLVM
/// as a shared library, so bpf-linker is built against that one through a prefix directory of
/// symlinks; the binary keeps an rpath to that directory.
fn bpf_linker() -> Result<()> {
    let sysroot = run::output(command("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let llvm_dir = PathBuf::from(sysroot.trim()).join("lib");
    let lib_name = nightly_libllvm(&llvm_dir)?;
    let llvm_lib = llvm_dir.join(&lib_name);
    let major = llvm_major(&lib_name)?;

    let prefix = run::home_dir()?.join(".local/share/xlb/llvm");
    let prefix_lib = prefix.join("lib");
    // llvm-sys links `libLLVM.so`; the binary then asks the loader for the versioned soname.
    let links = [prefix_lib.join("libLLVM.so"), prefix_lib.join(&lib_name)];
    let links_ok = links.iter().all(|link| resolves_to(link, &llvm_lib));
    let linker_ok = || run::succeeds(command("bpf-linker").arg("--version"));

    if links_ok && linker_ok() {
        println!("setup: bpf-linker (LLVM {major}, {lib_name}): present");
        return Ok(());
    }
    if !links_ok {
        println!("setup: bpf-linker: linking {} into {}", llvm_lib.display(), prefix_lib.display());
        fs::create_dir_all(&prefix_lib).with_context(|| format!("cannot create {}", prefix_lib.display()))?;
        for link in &links {
            replace_symlink(&llvm_lib, link)?;
        }
        // A bpf-linker whose library had merely gone missing works again now.
        if linker_ok() {
            println!("setup: bpf-linker: works with the restored library links");
            return Ok(());
        }
    }
    // --force: an installed but broken binary (e.g. built against a previous nightly's LLVM)
    // would otherwise count as installed.
    println!("setup: bpf-linker: missing or broken, building it against LLVM {major} (about a minute)");
    let mut install = run::cargo();
    install
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--force",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix);
    run::run(&mut install)?;
    if !linker_ok() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` still fails (looked in {} first)",
            run::cargo_bin_dir()?.display()
        );
    }
    Ok(())
}

/// The nightly sysroot holds exactly one `libLLVM.so.<version>-rust-<rustc version>`.
fn nightly_libllvm(dir: &Path) -> Result<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = entry?.file_name();
        if let Some(name) = name.to_str().filter(|n| n.starts_with("libLLVM.so.")) {
            found.push(name.to_owned());
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "no libLLVM.so.* in {}: this {NIGHTLY} toolchain ships no shared LLVM to build bpf-linker against",
            dir.display()
        ),
        _ => {
            bail!("several libLLVM.so.* in {} ({}); cannot tell which one rustc uses", dir.display(), found.join(", "))
        }
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> `22`, which selects bpf-linker's `llvm-22` feature.
fn llvm_major(lib_name: &str) -> Result<&str> {
    let version = lib_name.strip_prefix("libLLVM.so.").unwrap_or_default();
    let end = version.find(|c: char| !c.is_ascii_digit()).unwrap_or(version.len());
    match &version[..end] {
        "" => bail!("cannot read the LLVM major version from {lib_name}"),
        major => Ok(major),
    }
}

fn resolves_to(link: &Path, target: &Path) -> bool {
    match (fs::canonicalize(link), fs::canonicalize(target)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", link.display())),
    }
    symlink(target, link).with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

fn debian_packages() -> Result<()> {
    install_packages(DEBIAN_PACKAGES)
}

/// Installs those of `packages` that are missing (apt-get, as root).
pub fn install_packages(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for &package in packages {
        if !dpkg_installed(package)? {
            missing.push(package);
        }
    }
    let list = packages.join(" ");
    if missing.is_empty() {
        println!("setup: Debian packages ({list}): installed");
        return Ok(());
    }
    println!("setup: Debian packages: missing {}, installing with apt-get", missing.join(" "));
    run::require_root("apt-get must install the missing packages")?;
    run::run(command("apt-get").arg("update"))?;
    run::run(
        command("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    for package in missing {
        if !dpkg_installed(package)? {
            bail!("apt-get reported success but {package} is still not installed");
        }
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> Result<bool> {
    let out = command("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("cannot run dpkg-query: setup supports Debian-based systems only")?;
    // A package dpkg has never heard of makes dpkg-query fail: that simply means "not installed".
    // Otherwise the status reads `install ok installed` once the package is fully installed.
    let status = String::from_utf8_lossy(&out.stdout);
    Ok(out.status.success() && status.split_whitespace().nth(2) == Some("installed"))
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn reads_llvm_major() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly").unwrap(), "22");
        assert_eq!(llvm_major("libLLVM.so.23").unwrap(), "23");
        assert!(llvm_major("libLLVM.so.x").is_err());
        assert!(llvm_major("libLLVM-17-rust-1.75.0-nightly.so").is_err());
    }
}
