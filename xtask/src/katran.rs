//! `cargo xtask bench --katran-src DIR`: Katran's XDP balancer, built from a checkout of
//! github.com/facebookincubator/katran, for the pkt bench to measure beside xlb. Katran's own
//! build wants cmake and its C++ dependencies; its BPF object needs only clang and llc, run the
//! way its build_bpf_modules_opensource.sh runs them (clang emits bitcode for the host, llc
//! turns it into BPF, so the system's headers serve).
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _, Result};

use crate::{run, setup};

const PACKAGES: &[&str] = &["clang-19", "llvm-19"];

/// The bench runs hundreds of thousands of new flows a second; at Katran's default threshold
/// (125,000 a second per CPU) its free-slot and table-full runs would turn into its flood path
/// halfway. The bench puts Katran into its flood path itself where it measures that.
const DEFINES: &[&str] = &["-DMAX_CONN_RATE=4000000000U"];

/// Builds `src`'s balancer.bpf.c into `out_dir`; returns the object's path.
pub fn build(src: &Path, out_dir: &Path) -> Result<PathBuf> {
    let source = src.join("katran/lib/bpf/balancer.bpf.c");
    ensure!(source.is_file(), "{} is not a Katran checkout (no {})", src.display(), source.display());
    setup::install_packages(PACKAGES)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let (bitcode, object) = (out_dir.join("balancer.bc"), out_dir.join("balancer.bpf.o"));
    let includes = [src.to_path_buf(), src.join("katran/lib/linux_includes")];
    let mut clang = run::command("clang-19");
    for dir in &includes {
        clang.arg("-I").arg(dir);
    }
    clang
        .args(["-D__KERNEL__", "-O2", "-g", "-emit-llvm", "-c"])
        .args(DEFINES)
        .args(["-Wno-unused-value", "-Wno-pointer-sign", "-Wno-compare-distinct-pointer-types"])
        .arg(&source)
        .arg("-o")
        .arg(&bitcode);
    run::run(&mut clang)?;
    run::run(run::command("llc-19").args(["-march=bpf", "-filetype=obj"]).arg(&bitcode).arg("-o").arg(&object))?;
    println!("bench: Katran's balancer built: {}", object.display());
    Ok(object)
}
