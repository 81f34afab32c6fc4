//! `lb-agent`: loads the XDP balancer, keeps its maps in line with the config and the
//! backends' health, and detaches cleanly on SIGINT/SIGTERM.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use lb_agent::{
    agent::{
        state::{self, State},
        Agent, Starts,
    },
    api::{self, client as ctl},
    config::{Config, XdpMode},
    dataplane::{self, Dataplane, LoadOptions},
    metrics,
    net::mac::iface_mac,
};
use log::{error, info};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "xlb: an XDP L4 load balancer with Maglev hashing and direct server return"
)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log lines as text, or as one JSON object each (for log shippers).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the balancer, attach it to the config's interface and run until SIGINT/SIGTERM.
    /// SIGUSR1 logs the counters.
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        opts: RunOptions,
    },
    /// A live, refreshing table of services and backends: state, weight, packets, rates.
    Status {
        /// The agent's control socket.
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print the table once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Talk to a running agent through its control socket.
    Ctl {
        /// The agent's control socket.
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the agent's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: ctl::CtlCommand,
    },
    /// Validate a configuration file and exit: 0 when valid, 1 with every error otherwise.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Also print the BIRD config the agent would write for its [bgp] (with bird_socket:
        /// what to add to your BIRD's config).
        #[arg(long)]
        bird_config: bool,
    },
    /// Write the man pages (section 8) or a shell's completions into a directory: what the
    /// package installs.
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generated,
    },
    /// Strip the outer IPIP/IP6IP6 header of packets addressed to this host (run on each
    /// backend of an ipip service). Runs until SIGINT/SIGTERM; SIGUSR1 logs the counters.
    Decap {
        /// Interface the encapsulated packets arrive on; every address on it is accepted
        /// (IPv6 link-local ones aside).
        #[arg(long)]
        iface: String,
        /// Force an XDP mode; by default native, falling back to generic with a warning.
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpMode>,
        /// Also accept this outer destination (repeatable), e.g. an address on another interface.
        #[arg(long = "address", value_name = "ADDR")]
        addresses: Vec<std::net::IpAddr>,
    },
}

#[derive(Subcommand)]
enum Generated {
    /// lb-agent(8) and a page per subcommand.
    Man { dir: PathBuf },
    /// The completion script of a shell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        dir: PathBuf,
    },
}

/// The exit status of a command that talks to a human or a script in plain text: Ok(true)
/// succeeds, Ok(false) (refused) and errors (printed whole) fail.
fn plain(result: Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes what `lb-agent generate` is asked for; returns the files written.
fn generate(what: Generated) -> Result<Vec<PathBuf>> {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    cmd.build();
    match what {
        Generated::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let mut written = Vec::new();
            let mut stack = vec![cmd];
            while let Some(cmd) = stack.pop() {
                stack.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help").cloned());
                let man = clap_mangen::Man::new(cmd).section("8");
                written.push(man.generate_to(&dir).with_context(|| format!("cannot write into {}", dir.display()))?);
            }
            Ok(written)
        }
        Generated::Completions { shell, dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let path = clap_complete::generate_to(shell, &mut cmd, "lb-agent", &dir)
                .with_context(|| format!("cannot write into {}", dir.display()))?;
            Ok(vec![path])
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&cli.log_level));
    logger.format_target(false);
    if let LogFormat::Json = cli.log_format {
        logger.format(|buf, record| {
            use std::io::Write as _;
            let line = serde_json::json!({
                "ts": buf.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    logger.init();
    let result = match cli.command {
        // Plain text for a human or a deploy script: no log prefixes.
        Command::Check { config, bird_config } => return plain(check(&config, bird_config).map(|()| true)),
        Command::Run { config, opts } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(run(&config, opts))),
        Command::Status { socket, interval, once } => {
            let interval = Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
            return plain(ctl::status(&socket, interval, once).map(|()| true));
        }
        Command::Ctl { socket, json, command } => return plain(ctl::run(&socket, json, command)),
        Command::Generate { what } => {
            return plain(generate(what).map(|files| {
                for f in files {
                    println!("{}", f.display());
                }
                true
            }))
        }
        Command::Decap { iface, xdp_mode, addresses } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(decap(&iface, xdp_mode, &addresses))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path, bird_config: bool) -> Result<()> {
    use lb_agent::{bgp::bird_conf, config::Bird};
    let config = Config::load(path)?;
    let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
    let l7 = if config.l7.is_empty() {
        String::new()
    } else {
        let l7_backends: usize = config.l7.iter().map(|s| s.backends.len()).sum();
        format!(", {} L7 services with {l7_backends} backends", config.l7.len())
    };
    println!(
        "{}: valid ({} services, {backends} backends{l7}, interface {})",
        path.display(),
        config.services.len(),
        config.interface
    );
    for w in config.warnings() {
        println!("warning: {w}");
    }
    if bird_config {
        let Some(bgp) = &config.bgp else { anyhow::bail!("{}: has no [bgp] section", path.display()) };
        let vips = config.vips();
        match &bgp.bird {
            Bird::Managed(bird) => print!("{}", bird_conf::render(bgp, bird, &vips)),
            Bird::External { .. } => print!("{}", bird_conf::render_external(bgp, &vips)),
        }
    }
    Ok(())
}

/// SIGHUP: a bad config, or one that needs a restart, leaves the running state as it was.
/// The control-API changes in force are made again on the file's config.
fn reload(agent: &mut Agent, path: &std::path::Path) {
    match api::server::reload_file(agent, path) {
        Ok(summary) => info!("reloaded {}: {summary}", path.display()),
        Err(e) => error!("reload of {} rejected: {e:#}", path.display()),
    }
}

/// `lb-agent run`'s options besides the config.
#[derive(clap::Args)]
struct RunOptions {
    /// Force an XDP mode; by default native, falling back to generic with a warning.
    #[arg(long, value_enum)]
    xdp_mode: Option<XdpMode>,
    /// Log the counters every N seconds (0: only on SIGUSR1 and at exit).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
    /// Unix socket of the control API (`lb-agent ctl`); created with mode 0600.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// bpffs directory the program's link and maps are pinned under, in a directory per
    /// interface: a new agent adopts what a crashed one (or one stopped with
    /// --keep-on-exit) left there, without a packet going unbalanced.
    #[arg(long, default_value = dataplane::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// On SIGINT/SIGTERM leave the program attached and its maps pinned, for the next agent
    /// to take over (an upgrade); by default the agent detaches and removes its pins.
    #[arg(long)]
    keep_on_exit: bool,
    /// The state file: each backend's health and the control-API changes, carried across
    /// restarts and upgrades [default: /var/lib/xlb/<interface>.state.json].
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Start from the config file alone: drop the control-API changes the state file
    /// remembers (backend health is still remembered).
    #[arg(long)]
    forget_runtime_changes: bool,
}

async fn run(path: &std::path::Path, opts: RunOptions) -> Result<()> {
    let RunOptions { xdp_mode, stats_interval, api_socket, pin_dir, keep_on_exit, state_file, forget_runtime_changes } =
        opts;
    let pin_dir = pin_dir.as_path();
    let started = std::time::Instant::now();
    // Before anything else: a signal that arrives during start-up (e.g. right after the
    // "balancing" line) waits for the main loop instead of killing the process unhandled.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Nothing touches the kernel before the config is known to be good.
    let file_config = Config::load(path)?;
    for w in file_config.warnings() {
        log::warn!("{w}");
    }
    // What a previous agent left: backend health, and control-API changes made again here.
    let state_path = state_file.unwrap_or_else(|| state::default_path(&file_config.interface));
    let mut state =
        State::load(&state_path, &file_config.interface).unwrap_or_else(|| State::new(&file_config.interface));
    if forget_runtime_changes && !state.changes.is_empty() {
        info!("--forget-runtime-changes: {} control-API changes dropped", state.changes.len());
        state.changes.clear();
    }
    let (config, kept) = api::server::replay(file_config, &state.changes);
    state.changes = kept;
    let iface_mac = iface_mac(&config.interface)?;
    // BIRD starts with every VIP withdrawn; they are announced once the data path is attached
    // and their backends pass their checks. A BIRD that is missing or refuses its config stops
    // the start here, before the kernel is touched.
    let speaker = match &config.bgp {
        Some(bgp) => Some(lb_agent::bgp::Speaker::start(bgp, config.vips()).await?),
        None => None,
    };
    // Locks <pin_dir>/<interface> (a second agent is refused) and adopts what a previous agent
    // left there: the flow table and the counters; its program stays attached meanwhile.
    let dataplane = Dataplane::load_pinned(
        &LoadOptions {
            hash_seed: config.hash_seed,
            iface_mac,
            maglev_capacity: config.maglev_capacity,
            flow_table_size: config.flows.size,
        },
        pin_dir,
        &config.interface,
    )?;
    // Subscribed before anything is cached: a change from here on reaches the data path.
    let (routes_tx, mut routes) = mpsc::channel::<()>(1);
    lb_agent::net::routes::watch(routes_tx)?;
    let (tx, mut rx) = mpsc::channel(256);
    let starts = Starts { known: state.health_by_backend(), taking_over: dataplane.takes_over() };
    let mut agent = Agent::start(dataplane, &config, Some(tx), starts, Some((state_path, state)))?;
    // Attach last: the first packet already finds every table in place. A program left by a
    // previous agent is replaced atomically, with its tables: no packet goes unbalanced.
    let mode = agent.dataplane.attach(&config.interface, xdp_mode.or(config.xdp_mode))?;
    if agent.dataplane.adopted_link() {
        info!(
            "took over the pinned program on {} {:.1} ms after start (bpf_link_update: program and tables swapped at once)",
            config.interface,
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    info!("balancing {} services on {} (XDP {mode:?} mode)", config.services.len(), config.interface);
    agent.log_ready();
    if let Some(speaker) = speaker {
        agent.set_speaker(speaker);
    }

    let (scrape_tx, mut scrapes) = mpsc::channel::<metrics::Scrape>(16);
    if let Some(addr) = config.metrics_listen {
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, scrape_tx).await {
                error!("{e:#}");
            }
        });
    }

    let (call_tx, mut calls) = mpsc::channel::<api::Call>(16);
    let socket = api_socket.clone();
    tokio::spawn(async move {
        if let Err(e) = api::serve(socket, call_tx).await {
            error!("{e:#}");
        }
    });

    let mut passive_tick = tokio::time::interval(config.passive.window);
    passive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let period = Duration::from_secs(stats_interval.max(1));
    let mut stats_tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            // A failed map write must not take the balancer down with it: what is in the
            // maps keeps forwarding, and the next health report retries.
            Some(event) = rx.recv() => if let Err(e) = agent.handle(event) {
                error!("cannot apply a health change: {e:#}");
            },
            _ = term.recv() => { info!("SIGTERM: detaching"); break }
            _ = int.recv() => { info!("SIGINT: detaching"); break }
            _ = usr1.recv() => info!("counters:\n{}", agent.stats_table()?),
            _ = hup.recv() => reload(&mut agent, path),
            Some(()) = routes.recv() => if let Err(e) = agent.dataplane.routes_changed() {
                error!("cannot invalidate the cached next hops: {e:#}");
            },
            _ = passive_tick.tick() => if let Err(e) = agent.passive_check(std::time::Instant::now()) {
                error!("cannot apply the passive health check: {e:#}");
            },
            Some(api::Call { request, reply }) = calls.recv() => {
                let _ = reply.send(api::handle(&mut agent, request, path));
            }
            Some(metrics::Scrape(reply)) = scrapes.recv() => {
                let _ = reply.send(metrics::snapshot(&agent).map_err(|e| format!("{e:#}")));
            }
            _ = stats_tick.tick(), if stats_interval > 0 => info!("counters:\n{}", agent.stats_table()?),
        }
        // Whatever happened may change what the VIPs' health says (sent only when it does).
        agent.announce();
    }
    // The routes go first, while the data path still balances what is in flight.
    if let Some(speaker) = agent.take_speaker() {
        speaker.stop().await;
    }
    agent.l7.shutdown().await;
    info!("counters:\n{}", agent.stats_table()?);
    let pins = agent.dataplane.pin_dir().map(|d| d.display().to_string()).unwrap_or_default();
    if !keep_on_exit {
        // Even when this fails, the drop below detaches: the pins left would only hold maps.
        if let Err(e) = agent.dataplane.unpin() {
            error!("cannot remove the pins under {pins}: {e:#}");
        }
    }
    drop(agent);
    let _ = std::fs::remove_file(&api_socket);
    if keep_on_exit {
        info!("left attached to {} (pinned under {pins}) for the next agent; exiting", config.interface);
    } else {
        info!("detached from {}; exiting", config.interface);
    }
    Ok(())
}

/// `lb-agent decap`: accepts the interface's addresses and `extra`, attaches, and runs until
/// SIGINT/SIGTERM.
async fn decap(iface: &str, xdp_mode: Option<XdpMode>, extra: &[std::net::IpAddr]) -> Result<()> {
    use lb_agent::{decap::Decap, net::addr::iface_addresses};

    let mut addresses = iface_addresses(iface)?;
    for addr in extra {
        if !addresses.contains(addr) {
            addresses.push(*addr);
        }
    }
    if addresses.is_empty() {
        anyhow::bail!("{iface} has no IPv4 or global IPv6 address to accept: add one or give --address ADDR");
    }
    let mut decap = Decap::load()?;
    for &addr in &addresses {
        decap.add_address(addr)?;
    }
    let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    info!("accepting IPIP/IP6IP6 packets to {}", list.join(", "));
    let mode = decap.attach(iface, xdp_mode)?;
    info!("decapsulating on {iface} (XDP {mode:?} mode)");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: detaching"); break }
            _ = int.recv() => { info!("SIGINT: detaching"); break }
            _ = usr1.recv() => info!("counters:\n{}", decap_counters(&decap)?),
        }
    }
    info!("counters:\n{}", decap_counters(&decap)?);
    drop(decap);
    info!("detached from {iface}; exiting");
    Ok(())
}

fn decap_counters(decap: &lb_agent::decap::Decap) -> Result<String> {
    use std::fmt::Write as _;

    let mut out = format!("{:<24} {:>12} {:>14}\n", "verdict", "packets", "bytes");
    for (reason, c) in decap.counters()? {
        writeln!(out, "{:<24} {:>12} {:>14}", reason.name(), c.packets, c.bytes)?;
    }
    Ok(out)
}
