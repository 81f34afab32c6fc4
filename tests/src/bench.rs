//! What the three benchmark binaries share: the machine they ran on, CPU pinning, where their
//! results go, and the few JSON encoders they need (their JSON is written by hand).
use std::path::PathBuf;

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
    pin_to_cpu(0)
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it, and sched_setaffinity
    // reads exactly size_of::<cpu_set_t>() bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot pin the thread to CPU {cpu}"));
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

/// A process's CPU time in clock ticks from its /proc/<pid>/stat text: user and system time,
/// and with `children` also that of its reaped children. Fields are counted from after the
/// command name (in parentheses, which may hold spaces): the state is field 3, utime 14,
/// stime 15, cutime 16, cstime 17.
pub fn stat_cpu_ticks(stat: &str, children: bool) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let own = field(14)? + field(15)?;
    Some(if children { own + field(16)? + field(17)? } else { own })
}

/// A number rounded to `decimals` digits after the point, or null when missing or not finite.
pub fn json_num(v: Option<f64>, decimals: i32) -> serde_json::Value {
    let scale = 10f64.powi(decimals);
    match v {
        Some(v) if v.is_finite() => serde_json::json!((v * scale).round() / scale),
        _ => serde_json::Value::Null,
    }
}

/// The machine as the results record it.
pub fn machine_json(machine: &Machine) -> serde_json::Value {
    serde_json::json!({
        "kernel": machine.kernel,
        "cpu": machine.cpu,
        "cores": machine.cores,
        "clocksource": machine.clocksource,
        "loadavg_1m": machine.loadavg,
    })
}

/// Writes `results` as `<dir>/<name>-<unix_time>.json` and `<dir>/<name>-latest.json`; returns
/// both paths.
pub fn write_results(name: &str, unix_time: u64, results: &serde_json::Value) -> anyhow::Result<(PathBuf, PathBuf)> {
    use anyhow::Context as _;
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let text = serde_json::to_string_pretty(results)? + "\n";
    let stamped = dir.join(format!("{name}-{unix_time}.json"));
    let latest = dir.join(format!("{name}-latest.json"));
    for path in [&stamped, &latest] {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok((stamped, latest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_rounded_or_null() {
        assert_eq!(json_num(Some(1.23456), 3), serde_json::json!(1.235));
        assert_eq!(json_num(Some(f64::NAN), 3), serde_json::Value::Null);
        assert_eq!(json_num(None, 3), serde_json::Value::Null);
    }

    #[test]
    fn cpu_ticks_are_read_past_the_state_and_a_name_with_spaces() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 3 2 20 0 4 0 100 0 0";
        assert_eq!(stat_cpu_ticks(stat, false), Some(12));
        assert_eq!(stat_cpu_ticks(stat, true), Some(17));
        assert_eq!(stat_cpu_ticks("garbage", false), None);
    }
}
