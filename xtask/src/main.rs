//! Developer tasks for xlb: `cargo xtask <command>` (alias in .cargo/config.toml).

mod katran;
mod package;
mod run;
mod setup;

use std::process::ExitCode;

use anyhow::Context as _;
use anyhow::Result;
use clap::{Parser, Subcommand};

use run::ChildFailed;

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "Developer tasks for the xlb workspace")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (rust-src, bpf-linker, Debian packages); a no-op when present.
    Setup,
    /// Run setup, then build every crate and target of the workspace.
    Build {
        /// Extra arguments for `cargo build` (e.g. `-- --release`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run setup, then the workspace tests one at a time (needs root).
    ///
    /// Arguments go to `cargo test`; anything after a further `--` goes to the test harness:
    /// `cargo xtask test -- e2e`, `cargo xtask test -- -p xlb-tests e2e -- --nocapture`.
    Test {
        /// Arguments for `cargo test`, then optionally `--` and arguments for the test harness.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run setup, then the xlb-demo binary of the tests crate (needs root).
    Demo {
        /// Arguments for xlb-demo.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the data path's per-packet cost (BPF_PROG_TEST_RUN) against baselines from the same run.
    ///
    /// Runs the xlb-bench binary of the tests crate in release mode (needs root); `--quick` for a
    /// short run. pkt measures through a restore harness, net of an empty program run the same
    /// way, prints markdown tables and writes target/bench/pkt-cost-*.json and
    /// pkt-cost-latest.svg.
    Bench {
        /// Short runs of every part (under five minutes in all).
        #[arg(long)]
        quick: bool,
        /// Only these parts: pkt (per-packet cost), maglev (table quality, agent), e2e
        /// (throughput against HAProxy and nginx), l7 (the L7 proxy against HAProxy and nginx,
        /// HTTP/1.1, h2 over TLS, memory per idle connection). Comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "pkt,maglev,e2e,l7")]
        only: Vec<String>,
        /// A checkout of github.com/facebookincubator/katran: pkt also builds its balancer
        /// (with clang-19, installed if missing) and measures it beside xlb in the same run.
        #[arg(long, value_name = "DIR")]
        katran_src: Option<std::path::PathBuf>,
    },
    /// Build the Debian package (target/debian/xlb_*.deb): the agent, systemd units, the
    /// example config, man pages and completions.
    Package {
        /// Then install it (dpkg -i), check the agent, its man pages and its units, and purge it
        /// again (as root; what `cargo xtask test` does after the tests).
        #[arg(long)]
        check: bool,
    },
    /// Delete leftover `xlb-*` network namespaces, e.g. after a crashed test run.
    CleanNetns,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            // Scripts and CI should see the failing child's own status, not a generic 1.
            let code = err.downcast_ref::<ChildFailed>().map_or(1, |failed| failed.exit_code());
            ExitCode::from(code)
        }
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Setup => setup::setup(),
        Command::Build { args } => {
            setup::setup()?;
            let mut cmd = run::cargo();
            cmd.args(["build", "--workspace", "--all-targets"]).args(args);
            run::run(&mut cmd)
        }
        Command::Test { args } => {
            run::require_root("the tests need CAP_NET_ADMIN and CAP_BPF and create network namespaces")?;
            setup::setup()?;
            // `cargo test` builds only the tested package's own binaries; the namespace tests
            // run lb-agent as a process, so build it first.
            run::run(run::cargo().args(["build", "-p", "lb-agent", "--bins"]))?;
            let full = args.is_empty();
            run::run(&mut test_command(args))?;
            // The whole suite also installs the package, uses it and removes it again.
            if full {
                package::check()?;
            }
            Ok(())
        }
        Command::Package { check } => {
            setup::setup()?;
            if check {
                run::require_root("installing a package needs root")?;
                package::check()
            } else {
                package::package().map(drop)
            }
        }
        Command::Demo { args } => {
            run::require_root("the demo loads XDP programs and creates network namespaces")?;
            setup::setup()?;
            let mut cmd = run::cargo();
            cmd.args(["run", "-p", "xlb-tests", "--bin", "xlb-demo", "--"]).args(args);
            run::run(&mut cmd)
        }
        Command::Bench { quick, only, katran_src } => {
            run::require_root("the benchmark loads XDP programs and builds network namespaces")?;
            setup::setup()?;
            bench(quick, &only, katran_src.as_deref())
        }
        Command::CleanNetns => clean_netns(),
    }
}

/// The namespace tests are heavy and the machines have two cores, so the harness runs one test at
/// a time; `--no-fail-fast` so that one broken crate does not hide the others' results.
fn test_command(args: Vec<String>) -> std::process::Command {
    let (cargo_args, harness_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (&args[..], &[][..]),
    };
    // `--workspace` would override a package selection the caller asked for.
    let selects_packages = cargo_args.iter().any(|a| a.starts_with("-p") || a.starts_with("--package"));
    let mut cmd = run::cargo();
    cmd.arg("test");
    if !selects_packages {
        cmd.arg("--workspace");
    }
    cmd.arg("--no-fail-fast").args(cargo_args).args(["--", "--test-threads=1"]).args(harness_args);
    cmd
}

/// The benchmark binaries, in the order they run, with the part name that selects them.
const BENCHES: [(&str, &str); 4] =
    [("pkt", "xlb-bench"), ("maglev", "xlb-bench-maglev"), ("e2e", "xlb-bench-e2e"), ("l7", "xlb-bench-l7")];

/// Builds the release binaries (the end-to-end part runs the release lb-agent), runs each
/// selected part, and writes their tables together to target/bench/summary-latest.md.
fn bench(quick: bool, only: &[String], katran_src: Option<&std::path::Path>) -> Result<()> {
    if let Some(unknown) = only.iter().find(|o| !BENCHES.iter().any(|(part, _)| part == o)) {
        anyhow::bail!("unknown bench part {unknown:?}: expected pkt, maglev, e2e or l7");
    }
    if katran_src.is_some() && !only.iter().any(|o| o == "pkt") {
        anyhow::bail!("--katran-src is for the pkt part, which --only leaves out");
    }
    run::run(run::cargo().args(["build", "--release", "-p", "lb-agent", "-p", "xlb-tests", "--bins"]))?;
    let root = run::workspace_root()?;
    let katran = katran_src.map(|src| katran::build(src, &root.join("target/bench/katran"))).transpose()?;
    let mut summary = String::new();
    for (part, bin) in BENCHES.iter().filter(|(part, _)| only.iter().any(|o| o == part)) {
        let mut cmd = std::process::Command::new(root.join("target/release").join(bin));
        if quick {
            cmd.arg("--quick");
        }
        if let (Some(object), "pkt") = (&katran, *part) {
            cmd.arg("--katran").arg(object);
        }
        eprintln!("$ {bin}{}", if quick { " --quick" } else { "" });
        // Tables on stdout (kept), progress on stderr (shown as it comes).
        let out = cmd.stderr(std::process::Stdio::inherit()).output().with_context(|| format!("cannot run {bin}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        if !out.status.success() {
            anyhow::bail!("bench part {part} ({bin}) failed with {}", out.status);
        }
        summary += &format!("## {part}\n\n{text}\n");
    }
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("summary-latest.md"), &summary)?;
    eprintln!("bench: tables in {}", dir.join("summary-latest.md").display());
    Ok(())
}

fn clean_netns() -> Result<()> {
    let listing = run::output(run::command("ip").args(["netns", "list"]))?;
    // Lines look like `xlb-lb (id: 3)` or just `xlb-lb`.
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with("xlb-"))
        .collect();
    if names.is_empty() {
        println!("clean-netns: no xlb-* network namespaces left");
        return Ok(());
    }
    // Keep going after a failure so one stuck namespace does not leave the rest behind.
    let mut failed = Vec::new();
    for name in names {
        match run::run_quiet(run::command("ip").args(["netns", "del", name])) {
            Ok(()) => println!("clean-netns: removed {name}"),
            Err(err) => {
                eprintln!("clean-netns: could not remove {name}: {err:#}");
                failed.push(name);
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("could not remove: {}", failed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::test_command;

    fn args_of(args: &[&str]) -> Vec<String> {
        let cmd = test_command(args.iter().map(|s| s.to_string()).collect());
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn test_args_pass_through() {
        assert_eq!(args_of(&[]), ["test", "--workspace", "--no-fail-fast", "--", "--test-threads=1"]);
        assert_eq!(args_of(&["e2e"]), ["test", "--workspace", "--no-fail-fast", "e2e", "--", "--test-threads=1"]);
        assert_eq!(
            args_of(&["-p", "xlb-tests", "e2e", "--", "--nocapture"]),
            ["test", "--no-fail-fast", "-p", "xlb-tests", "e2e", "--", "--test-threads=1", "--nocapture"]
        );
    }
}
