//! Announcing the VIPs over BGP through BIRD: the agent decides, per VIP, whether this host
//! should receive its traffic (the policy is the agent's: [`crate::agent::Agent::bgp_wants`]);
//! the speaker task here makes BIRD say so, watches the sessions, and keeps BIRD running.
//!
//! - `bird_conf`: the BIRD config the agent writes (sessions, and two static protocols per VIP);
//! - `birdc`: the control-socket client.
//!
//! A VIP is in one of three states towards BIRD: announced (its protocol enabled), draining
//! (its `_drain` twin enabled instead: GRACEFUL_SHUTDOWN, worse MED) or withdrawn (both
//! disabled). Nothing else is changed at run time; BIRD is reconfigured only when the set of
//! VIPs changes.
pub mod bird_conf;
pub mod birdc;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use log::{error, info, warn};
use tokio::{
    io::AsyncBufReadExt as _,
    process::{Child, Command},
    sync::watch,
    task::JoinHandle,
};

use self::birdc::Birdc;
use crate::{
    api::proto::{BgpView, SessionView, VipView},
    config::{BgpConfig, Bird, ManagedBird},
};

/// How often the sessions are read and BIRD's health is checked.
const POLL: Duration = Duration::from_millis(500);
/// How long a BIRD the agent starts may take to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// A BIRD that died is started again at most this often.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);

/// What the agent wants for one VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// This host can serve the VIP.
    pub serve: bool,
    /// Why, for the log and `ctl list`.
    pub reason: String,
}

/// What the agent wants BIRD to say.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Desired {
    pub vips: BTreeMap<IpAddr, Want>,
    /// `ctl drain-host`: new flows go elsewhere, then the routes go.
    pub drain_host: bool,
    /// Shutting down: every route goes, whatever the health.
    pub stopping: bool,
}

/// How a VIP stands towards BIRD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Announce {
    Normal,
    Drain,
    Withdrawn,
}

impl Announce {
    fn name(self) -> &'static str {
        match self {
            Announce::Normal => "announced",
            Announce::Drain => "draining",
            Announce::Withdrawn => "withdrawn",
        }
    }
}

/// The handle the agent keeps: it tells the task what it wants and reads what BIRD reports.
pub struct Speaker {
    desired: watch::Sender<Desired>,
    view: Arc<Mutex<BgpView>>,
    task: JoinHandle<()>,
    withdraw_wait: Duration,
}

impl Speaker {
    /// Starts BIRD (unless the operator runs it) with every VIP withdrawn, and the task that
    /// drives it. Call it from the main thread: a BIRD the agent starts dies with that thread.
    /// Fails, with BIRD's own words, when BIRD is missing, refuses its config or does not
    /// open its socket.
    pub async fn start(bgp: &BgpConfig, vips: Vec<IpAddr>) -> Result<Self> {
        let (socket, child) = match &bgp.bird {
            Bird::Managed(bird) => {
                let conf = write_config(bgp, bird, &vips)?;
                check_config(bird, &conf).await?;
                let (socket, child) = spawn_bird(bird, &conf).await?;
                info!("bgp: BIRD started (pid {}), control socket {}", child.id().unwrap_or(0), socket.display());
                (socket, Some(child))
            }
            Bird::External { socket } => (socket.clone(), None),
        };
        let conn = Birdc::connect(&socket).await?;
        let waiting = Want { serve: false, reason: "the data path is not attached yet".into() };
        let initial = vips.iter().map(|v| (*v, waiting.clone())).collect();
        let (desired, rx) = watch::channel(Desired { vips: initial, drain_host: false, stopping: false });
        let view = Arc::new(Mutex::new(BgpView { host: "serving".into(), ..Default::default() }));
        let mut task = Task {
            bgp: bgp.clone(),
            socket,
            child,
            last_start: Instant::now(),
            conn: Some(conn),
            configured: vips,
            applied: BTreeMap::new(),
            drain_since: None,
            sessions: BTreeMap::new(),
            view: view.clone(),
            last_error: None,
        };
        if let Bird::External { .. } = bgp.bird {
            task.check_external().await?;
        }
        let task = tokio::spawn(task.run(rx));
        Ok(Self { desired, view, task, withdraw_wait: bgp.withdraw_wait })
    }

    /// What the agent wants now; the task acts when it differs from the last want.
    pub fn want(&self, vips: BTreeMap<IpAddr, Want>) {
        self.desired.send_if_modified(|d| {
            let changed = d.vips != vips;
            d.vips = vips;
            changed
        });
    }

    /// `ctl drain-host` (true) and `undrain-host` (false); false when it was so already.
    pub fn drain_host(&self, drain: bool) -> bool {
        self.desired.send_if_modified(|d| std::mem::replace(&mut d.drain_host, drain) != drain)
    }

    pub fn view(&self) -> BgpView {
        self.view.lock().expect("the view's lock is never held across a panic").clone()
    }

    /// Withdraws every VIP and waits `withdraw_wait` for the router to move the flows away
    /// (the data path still balances meanwhile), then stops BIRD.
    pub async fn stop(self) {
        let Self { desired, task, withdraw_wait, .. } = self;
        desired.send_modify(|d| d.stopping = true);
        // The task withdraws everything (or gives up when BIRD cannot be reached), stops BIRD
        // and exits.
        if tokio::time::timeout(Duration::from_secs(10), task).await.is_err() {
            error!("bgp: BIRD did not withdraw the VIPs within 10 s; stopping anyway");
        }
        if !withdraw_wait.is_zero() {
            info!(
                "bgp: VIPs withdrawn; balancing {:.1} s more while the routers move the flows",
                withdraw_wait.as_secs_f64()
            );
            tokio::time::sleep(withdraw_wait).await;
        }
    }
}

/// Writes BIRD's config into its run directory; returns its path.
fn write_config(bgp: &BgpConfig, bird: &ManagedBird, vips: &[IpAddr]) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&bird.run_dir)
        .with_context(|| format!("cannot create BIRD's directory {}", bird.run_dir.display()))?;
    let path = bird.run_dir.join("bird.conf");
    let tmp = bird.run_dir.join("bird.conf.new");
    std::fs::write(&tmp, bird_conf::render(bgp, bird, vips))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// `bird -p`: BIRD's verdict on the config before it runs.
async fn check_config(bird: &ManagedBird, conf: &Path) -> Result<()> {
    let out = Command::new(&bird.binary)
        .arg("-p")
        .arg("-c")
        .arg(conf)
        .output()
        .await
        .with_context(|| format!("cannot run {} (install bird2, or set bgp.bird_binary)", bird.binary.display()))?;
    if !out.status.success() {
        bail!(
            "BIRD refused the config the agent wrote ({}): {}",
            conf.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `bird -f` with its own socket, pid file and config; its messages go to the agent's
/// log. Returns once its control socket answers.
async fn spawn_bird(bird: &ManagedBird, conf: &Path) -> Result<(PathBuf, Child)> {
    let socket = bird.run_dir.join("bird.ctl");
    let mut cmd = std::process::Command::new(&bird.binary);
    cmd.arg("-f")
        .arg("-c")
        .arg(conf)
        .arg("-s")
        .arg(&socket)
        .arg("-P")
        .arg(bird.run_dir.join("bird.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    crate::sys::die_with_parent(&mut cmd);
    let mut cmd = Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {}", bird.binary.display()))?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                info!("bird: {line}");
            }
        });
    }
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("BIRD exited at start ({status}); its messages are in the log above");
        }
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            return Ok((socket, child));
        }
        if Instant::now() > deadline {
            bail!("BIRD did not open its control socket {} within {START_TIMEOUT:?}", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Task {
    bgp: BgpConfig,
    socket: PathBuf,
    /// The BIRD the agent runs; None for the operator's.
    child: Option<Child>,
    last_start: Instant,
    conn: Option<Birdc>,
    /// The VIPs BIRD's config has protocols for.
    configured: Vec<IpAddr>,
    /// What BIRD has been told, per VIP; a VIP missing here is told again.
    applied: BTreeMap<IpAddr, Announce>,
    drain_since: Option<Instant>,
    /// Session protocol -> up, to log changes.
    sessions: BTreeMap<String, bool>,
    view: Arc<Mutex<BgpView>>,
    last_error: Option<String>,
}

impl Task {
    async fn run(mut self, mut desired: watch::Receiver<Desired>) {
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let want = desired.borrow_and_update().clone();
            let result = self.step(&want).await;
            self.record(result.err());
            if want.stopping && self.all_withdrawn(&want) {
                break;
            }
            if want.stopping && self.conn.is_none() {
                // Nothing can be withdrawn through BIRD: stopping it drops the sessions, and
                // the routers withdraw the routes themselves.
                break;
            }
            let wait = self.next_drain_step();
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { break },
                _ = poll.tick() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.shutdown().await;
    }

    fn all_withdrawn(&self, want: &Desired) -> bool {
        want.vips.keys().all(|v| self.applied.get(v) == Some(&Announce::Withdrawn))
    }

    /// How long until a drain turns into a withdrawal (or a long wait when not draining).
    fn next_drain_step(&self) -> Duration {
        match self.drain_since {
            Some(since) => self.bgp.drain.saturating_sub(since.elapsed()).max(Duration::from_millis(10)),
            None => Duration::from_secs(3600),
        }
    }

    fn record(&mut self, err: Option<anyhow::Error>) {
        let text = err.map(|e| format!("{e:#}"));
        if text != self.last_error {
            match &text {
                Some(t) => error!("bgp: {t}"),
                None if self.last_error.is_some() => info!("bgp: BIRD answers again"),
                None => {}
            }
            self.last_error = text.clone();
        }
        self.view.lock().expect("the view's lock is never held across a panic").error = text;
    }

    /// The state each VIP should be in.
    fn targets(&mut self, want: &Desired) -> BTreeMap<IpAddr, (Announce, String)> {
        match (want.drain_host, self.drain_since) {
            (true, None) => self.drain_since = Some(Instant::now()),
            (false, Some(_)) => self.drain_since = None,
            _ => {}
        }
        let drained = self.drain_since.is_some_and(|s| s.elapsed() >= self.bgp.drain);
        want.vips
            .iter()
            .map(|(vip, w)| {
                let target = if want.stopping {
                    (Announce::Withdrawn, "the agent is stopping".to_string())
                } else if !w.serve {
                    (Announce::Withdrawn, w.reason.clone())
                } else if drained {
                    (Announce::Withdrawn, "the host is drained (ctl drain-host)".to_string())
                } else if want.drain_host {
                    let left = self.bgp.drain.saturating_sub(self.drain_since.map_or(Duration::ZERO, |s| s.elapsed()));
                    (
                        Announce::Drain,
                        format!("the host is draining (ctl drain-host): withdrawn in {:.0} s", left.as_secs_f64()),
                    )
                } else {
                    (Announce::Normal, w.reason.clone())
                };
                (*vip, target)
            })
            .collect()
    }

    async fn step(&mut self, want: &Desired) -> Result<()> {
        self.keep_bird_running().await?;
        if self.conn.is_none() {
            self.conn = Some(Birdc::connect(&self.socket).await?);
            // A new connection may be to a new BIRD: tell it everything again.
            self.applied.clear();
        }
        let result = self.apply(want).await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn apply(&mut self, want: &Desired) -> Result<()> {
        let vips: Vec<IpAddr> = want.vips.keys().copied().collect();
        if let Bird::Managed(bird) = &self.bgp.bird {
            if vips != self.configured && !want.stopping {
                write_config(&self.bgp, bird, &vips)?;
                let conn = self.conn.as_mut().expect("connected above");
                let reply = conn.ok("configure").await?;
                info!("bgp: BIRD reconfigured for {} VIPs: {}", vips.len(), reply.text());
                self.configured = vips;
                self.applied.clear();
            }
        }
        let host = match (want.drain_host, self.drain_since.map(|s| s.elapsed() >= self.bgp.drain)) {
            (true, Some(true)) => "drained",
            (true, _) => "draining",
            _ => "serving",
        };
        let targets = self.targets(want);
        let conn = self.conn.as_mut().expect("connected above");
        for (vip, (target, reason)) in &targets {
            if self.applied.get(vip) == Some(target) {
                continue;
            }
            let (normal, drain) = (bird_conf::vip_protocol(*vip, false), bird_conf::vip_protocol(*vip, true));
            // Enable the new route before disabling the old: a drain never gaps the VIP.
            let (on, off): (Vec<&str>, Vec<&str>) = match target {
                Announce::Normal => (vec![&normal], vec![&drain]),
                Announce::Drain => (vec![&drain], vec![&normal]),
                Announce::Withdrawn => (vec![], vec![&normal, &drain]),
            };
            for p in on {
                conn.ok(&format!("enable \"{p}\"")).await?;
            }
            for p in off {
                conn.ok(&format!("disable \"{p}\"")).await?;
            }
            let before = self.applied.insert(*vip, *target);
            if before.is_some() || *target != Announce::Withdrawn {
                match target {
                    Announce::Withdrawn => warn!("bgp: VIP {vip} withdrawn: {reason}"),
                    _ => info!("bgp: VIP {vip} {}: {reason}", target.name()),
                }
            }
        }
        self.applied.retain(|v, _| targets.contains_key(v));
        let reply = conn.ok("show protocols").await?;
        let protocols = birdc::protocols(&reply);
        self.log_sessions(&protocols);
        let mut view = self.view.lock().expect("the view's lock is never held across a panic");
        view.host = host.into();
        view.vips = targets
            .iter()
            .map(|(vip, (_, reason))| {
                let up = |drain| protocols.iter().any(|p| p.name == bird_conf::vip_protocol(*vip, drain) && p.up());
                let state = match (up(false), up(true)) {
                    (true, _) => Announce::Normal,
                    (false, true) => Announce::Drain,
                    (false, false) => Announce::Withdrawn,
                };
                VipView { vip: *vip, state: state.name().into(), reason: reason.clone() }
            })
            .collect();
        view.sessions = self.session_views(&protocols);
        Ok(())
    }

    /// The BGP sessions: the agent's own (named by neighbour), or every BGP protocol of an
    /// operator's BIRD.
    fn session_views(&self, protocols: &[birdc::Protocol]) -> Vec<SessionView> {
        let neighbor_of = |name: &str| match &self.bgp.bird {
            Bird::Managed(bird) => bird
                .neighbors
                .iter()
                .enumerate()
                .find(|(i, _)| bird_conf::peer_protocol(*i) == name)
                .map(|(_, n)| n.address.to_string()),
            Bird::External { .. } => Some(name.to_string()),
        };
        protocols
            .iter()
            .filter(|p| p.proto == "BGP")
            .filter_map(|p| {
                Some(SessionView {
                    neighbor: neighbor_of(&p.name)?,
                    protocol: p.name.clone(),
                    up: p.up(),
                    state: p.info.clone(),
                })
            })
            .collect()
    }

    fn log_sessions(&mut self, protocols: &[birdc::Protocol]) {
        for view in self.session_views(protocols) {
            let before = self.sessions.insert(view.protocol.clone(), view.up);
            match (before, view.up) {
                (Some(false) | None, true) => info!("bgp: session with {} up ({})", view.neighbor, view.state),
                (Some(true), false) => warn!("bgp: session with {} DOWN ({})", view.neighbor, view.state),
                _ => {}
            }
        }
    }

    /// Starts a BIRD the agent runs again if it died (its VIP protocols start disabled; the
    /// next step announces what should be).
    async fn keep_bird_running(&mut self) -> Result<()> {
        let Bird::Managed(bird) = &self.bgp.bird else { return Ok(()) };
        let Some(child) = &mut self.child else { return Ok(()) };
        let Some(status) = child.try_wait()? else { return Ok(()) };
        self.conn = None;
        if self.last_start.elapsed() < RESTART_BACKOFF {
            bail!("BIRD exited ({status}); starting it again shortly");
        }
        error!("bgp: BIRD exited ({status}): starting it again; every VIP is withdrawn until then");
        self.last_start = Instant::now();
        let conf = write_config(&self.bgp, bird, &self.configured)?;
        let (_, child) = spawn_bird(bird, &conf).await?;
        self.child = Some(child);
        Ok(())
    }

    /// An operator's BIRD must have the VIP protocols the agent toggles.
    async fn check_external(&mut self) -> Result<()> {
        let conn = self.conn.as_mut().expect("connected at start");
        let reply = conn.ok("show protocols").await?;
        let names: Vec<String> = birdc::protocols(&reply).into_iter().map(|p| p.name).collect();
        let missing: Vec<String> = self
            .configured
            .iter()
            .flat_map(|v| [bird_conf::vip_protocol(*v, false), bird_conf::vip_protocol(*v, true)])
            .filter(|p| !names.contains(p))
            .collect();
        if !missing.is_empty() {
            bail!(
                "BIRD at {} has no protocol {}: add the VIP protocols `lb-agent check --bird-config` prints to its config",
                self.socket.display(),
                missing.join(", ")
            );
        }
        Ok(())
    }

    /// Stops a BIRD the agent runs: `down` (a Cease to every neighbour), then a signal.
    async fn shutdown(mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(conn) = &mut self.conn {
            let _ = conn.command("down").await;
        }
        match tokio::time::timeout(Duration::from_secs(3), child.wait()).await {
            Ok(_) => info!("bgp: BIRD stopped"),
            Err(_) => {
                warn!("bgp: BIRD did not stop within 3 s; killing it");
                let _ = child.kill().await;
            }
        }
    }
}
