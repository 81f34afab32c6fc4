//! What the three benchmark binaries share: the machine they ran on, CPU pinning, where their
//! results go, and the few JSON encoders they need (their JSON is written by hand).
use std::{fmt::Write as _, path::PathBuf};

use anyhow::{Context as _, Result};

pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    /// Online CPUs (available_parallelism would say 1 once the process is pinned).
    pub cores: i64,
    /// 1-minute load average: other work on the machine shows in the figures.
    pub loadavg: String,
    /// The clock the kernel times BPF_PROG_TEST_RUN with (ktime_get_ns).
    pub clocksource: String,
}

pub fn machine() -> Machine {
    let read = |path: &str| std::fs::read_to_string(path).map(|s| s.trim().to_string());
    let kernel = read("/proc/sys/kernel/osrelease").unwrap_or_else(|_| "unknown".into());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string());
    // SAFETY: sysconf only reads a system value.
    let cores = i64::from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as i32);
    let clocksource =
        read("/sys/devices/system/clocksource/clocksource0/current_clocksource").unwrap_or_else(|_| "unknown".into());
    Machine { kernel, cpu, cores, loadavg: loadavg(), clocksource }
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Pins the calling thread to CPU 0: BPF_PROG_TEST_RUN runs the program on the calling CPU, and
/// a migration in the middle of a measurement would mix two CPUs' caches into one figure.
pub fn pin_to_cpu0() -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it, and sched_setaffinity
    // reads exactly size_of::<cpu_set_t>() bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot pin the thread to CPU 0");
    }
    Ok(())
}

/// Where results go: `<target dir>/bench`, the target directory being the one the running
/// binary was built into (target/release/...), else `target` under the current directory.
pub fn bench_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).or_else(|| {
        let exe = std::env::current_exe().ok()?;
        let target = exe.parent()?.parent()?;
        (target.file_name()? == "target").then(|| target.to_path_buf())
    });
    target.unwrap_or_else(|| PathBuf::from("target")).join("bench")
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number with `decimals` digits after the point, or null when missing or not finite.
pub fn json_num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "null".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_encoders() {
        assert_eq!(json_str("a\"b\\c\n"), r#""a\"b\\c\u000a""#);
        assert_eq!(json_num(Some(1.23456), 3), "1.235");
        assert_eq!(json_num(Some(f64::NAN), 3), "null");
        assert_eq!(json_num(None, 3), "null");
    }
}
