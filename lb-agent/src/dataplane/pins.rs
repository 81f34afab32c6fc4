//! Pinning: hitless restarts and upgrades.
//!
//! `<pin dir>/<interface>/` (on bpffs) holds:
//! - `link`: the XDP bpf_link. Pinned, it keeps the program attached without any process.
//! - the state maps (FLOWS, the counters, NEW_FLOW_RATE...): the next agent reuses them as they
//!   are, so connections keep their backend and counters keep counting.
//! - the config maps of the running program (VIPS, SERVICES, MAGLEV, BACKENDS, SETTINGS,
//!   TX_PORTS): a new agent fills fresh ones from its config (staged as `new-NAME`: bpffs
//!   forbids dots in names) and swaps them in together with its program: packets see the old
//!   program with the old tables or the new program with the new tables, never a half-written
//!   table, even when the config changed.
//! - symlinks, as bpffs holds no regular files: `owner` -> pid, `netns` -> the network
//!   namespace (`net:[inode]`), `xdp_mode` -> `Native` | `Generic`.
//!
//! The running agent holds flock(LOCK_EX) on the directory: the kernel releases it however the
//! process ends (kill -9 included), so a lock is never stale, and a second agent is refused.
use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::MapInfo,
    programs::links::{FdLink, PinnedLink},
};
use log::warn;

use lb_common::map_names;

use super::{
    flow_tables::pinned_tables_fit,
    object::{Shape, CONFIG_MAPS},
};
use crate::{
    config::XdpMode,
    sys::{if_index, is_bpffs, mount_bpffs, pinned_link_ifindex},
};

/// Where the agent pins its data path by default; a directory per interface below it.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";

pub(super) const LINK_PIN: &str = "link";
/// Prefix of the config maps staged for the next attach (bpffs forbids dots in names).
pub(super) const STAGED: &str = "new-";
const OWNER: &str = "owner";
const NETNS: &str = "netns";
const XDP_MODE: &str = "xdp_mode";
const SYS_BPF: &str = "/sys/fs/bpf";

/// The pinned state of one interface, locked by this agent.
pub(super) struct Pins {
    pub(super) dir: PathBuf,
    /// Holds the directory's flock until the process ends.
    _lock: File,
    /// The pinned link a previous agent left attached, until attach takes it over.
    pub(super) old_link: Option<PinnedLink>,
    /// The link this agent attached or took over.
    pub(super) link: Option<FdLink>,
    pub(super) adopted_link: bool,
    /// State maps found pinned and reused.
    pub(super) adopted: Vec<String>,
    /// Pins this start-up created: removed again when it fails before attaching.
    pub(super) created: Vec<PathBuf>,
    /// State maps that did not fit, staged like the config maps.
    pub(super) replaced: Vec<String>,
    pub(super) attached: bool,
    pub(super) removed: bool,
}

impl Pins {
    pub(super) fn open(root: &Path, iface: &str) -> Result<Self> {
        let ifindex = if_index(iface).ok_or_else(|| anyhow!("unknown interface {iface:?}"))?;
        ensure_bpffs(root)?;
        // bpffs forbids dots in names (eth0.100); interface names never hold a colon.
        let dir = root.join(iface.replace('.', ":"));
        let lock = lock_dir(&dir, iface)?;
        let mut pins = Self {
            dir,
            _lock: lock,
            old_link: None,
            link: None,
            adopted_link: false,
            adopted: Vec::new(),
            created: Vec::new(),
            replaced: Vec::new(),
            attached: false,
            removed: false,
        };
        let ours = std::fs::read_link("/proc/self/ns/net").context("cannot read /proc/self/ns/net")?;
        let link_path = pins.dir.join(LINK_PIN);
        let link_ifindex = match link_path.symlink_metadata() {
            Ok(_) => Some(pinned_link_ifindex(&link_path).with_context(|| format!("{}", link_path.display()))?),
            Err(_) => None,
        };
        match std::fs::read_link(pins.dir.join(NETNS)) {
            Ok(theirs) if theirs != ours => {
                if link_ifindex.is_some_and(|i| i != 0) {
                    bail!(
                        "{} holds the data path of an interface {iface} in another network namespace ({}, this is {}): \
                         give this agent its own --pin-dir",
                        pins.dir.display(),
                        theirs.display(),
                        ours.display()
                    );
                }
                warn!(
                    "{} was left by an agent in another network namespace ({}) and nothing of it is attached \
                     any more: starting afresh",
                    pins.dir.display(),
                    theirs.display()
                );
                pins.clear()?;
            }
            _ => {}
        }
        set_symlink(&pins.dir.join(OWNER), &std::process::id().to_string())?;
        set_symlink(&pins.dir.join(NETNS), &ours.to_string_lossy())?;
        // What a start-up that died before attaching left behind.
        for entry in std::fs::read_dir(&pins.dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(STAGED) {
                std::fs::remove_file(entry.path())?;
            }
        }
        match link_ifindex {
            Some(i) if i == ifindex => {
                pins.old_link = Some(
                    PinnedLink::from_pin(&link_path)
                        .with_context(|| format!("cannot open the pinned link {}", link_path.display()))?,
                );
            }
            Some(0) => {
                warn!("the pinned link {} is defunct (its interface was deleted): removing it", link_path.display());
                std::fs::remove_file(&link_path)?;
            }
            Some(other) => bail!(
                "the pinned link {} is attached to interface index {other}, not to {iface} (index {ifindex}): \
                 remove it by hand (this detaches its program) or give this agent another --pin-dir",
                link_path.display()
            ),
            None => {}
        }
        Ok(pins)
    }

    /// Removes every pin (and symlink) of the directory.
    pub(super) fn clear(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Ok(())
    }

    /// Decides, map by map, between the pinned state map (same shape: reused) and a fresh one
    /// (none pinned, or another shape: flows.size changed, or an upgrade changed its layout; a
    /// fresh one replacing a pinned one is staged, and swapped in at attach like the config
    /// maps). FLOWS fits only when each of its per-CPU tables has `flow_entries`. Returns every
    /// state map's pin path for the loader.
    pub(super) fn prepare_state_maps(
        &mut self,
        shapes: &[(String, Shape)],
        flow_entries: u32,
    ) -> Result<Vec<(String, PathBuf)>> {
        let mut paths = Vec::new();
        for (name, want) in shapes {
            let path = self.dir.join(name);
            let path = if path.symlink_metadata().is_err() {
                self.created.push(path.clone());
                path
            } else {
                let flows = name == map_names::FLOWS;
                match MapInfo::from_pin(&path).map(|info| Shape::of(&info)) {
                    Ok(have) if have == *want && (!flows || pinned_tables_fit(&path, flow_entries)) => {
                        self.adopted.push(name.clone());
                        path
                    }
                    have => {
                        warn!(
                            "pinned map {name} does not fit ({}; this agent needs {want}{}): an empty one replaces it",
                            match have {
                                Ok(have) if have == *want => "its per-CPU tables differ".to_string(),
                                Ok(have) => format!("it has {have}"),
                                Err(e) => format!("{e}"),
                            },
                            if flows {
                                format!(", with a table of {flow_entries} entries per CPU")
                            } else {
                                String::new()
                            },
                        );
                        self.replaced.push(name.clone());
                        self.dir.join(format!("{STAGED}{name}"))
                    }
                }
            };
            paths.push((name.clone(), path));
        }
        Ok(paths)
    }

    pub(super) fn pinned_mode(&self) -> Option<XdpMode> {
        match std::fs::read_link(self.dir.join(XDP_MODE)).ok()?.to_str()? {
            "Native" => Some(XdpMode::Native),
            "Generic" => Some(XdpMode::Generic),
            _ => None,
        }
    }

    /// After the program is attached or swapped: the staged config maps replace the pinned
    /// ones (rename(2) on bpffs: the old program's maps go once nothing holds them).
    pub(super) fn commit(&mut self, mode: XdpMode) -> Result<()> {
        // From here on the attached program uses what was created: a failure below must not
        // remove it (the next agent adopts it).
        self.attached = true;
        self.created.clear();
        for name in CONFIG_MAPS.iter().copied().chain(self.replaced.iter().map(String::as_str)) {
            let staged = self.dir.join(format!("{STAGED}{name}"));
            let path = self.dir.join(name);
            std::fs::rename(&staged, &path)
                .with_context(|| format!("cannot rename {} to {}", staged.display(), path.display()))?;
        }
        set_symlink(&self.dir.join(XDP_MODE), &format!("{mode:?}"))
    }

    /// Clean exit: every pin goes, the directory too (and the root, when it is empty), and the
    /// link is dropped: the program is detached.
    pub(super) fn remove_all(&mut self) -> Result<()> {
        self.clear()?;
        std::fs::remove_dir(&self.dir).with_context(|| format!("cannot remove {}", self.dir.display()))?;
        if let Some(root) = self.dir.parent() {
            let _ = std::fs::remove_dir(root);
        }
        self.removed = true;
        self.link = None;
        Ok(())
    }
}

impl Drop for Pins {
    /// A start-up that fails before attaching leaves the pins as it found them: what it created
    /// goes, what a previous agent left (and its program, still attached) stays.
    fn drop(&mut self) {
        if self.attached || self.removed {
            return;
        }
        for path in &self.created {
            let _ = std::fs::remove_file(path);
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(STAGED) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        // Nothing left but our symlinks: the directory goes too.
        let only_symlinks = std::fs::read_dir(&self.dir)
            .map(|entries| entries.flatten().all(|e| e.file_type().is_ok_and(|t| t.is_symlink())))
            .unwrap_or(false);
        if only_symlinks {
            let _ = self.clear();
            let _ = std::fs::remove_dir(&self.dir);
            if let Some(root) = self.dir.parent() {
                let _ = std::fs::remove_dir(root);
            }
        }
    }
}

/// Creates `dir` and takes its lock, or fails when another agent holds it.
fn lock_dir(dir: &Path, iface: &str) -> Result<File> {
    for _ in 0..3 {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the pin directory {}", dir.display()))?;
        let file = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let owner = std::fs::read_link(dir.join(OWNER))
                    .map_or_else(|_| "unknown pid".to_string(), |p| format!("pid {}", p.display()));
                bail!(
                    "another lb-agent ({owner}) is running on {iface}: its pin directory {} is locked. Stop it \
                     first (with --keep-on-exit for a hitless upgrade), or give this agent another --pin-dir",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", dir.display()));
            }
        }
        // The previous owner removes the directory on a clean exit: ours may be that one.
        if std::fs::metadata(dir).is_ok_and(|m| m.ino() == file.metadata().map_or(0, |f| f.ino())) {
            return Ok(file);
        }
    }
    bail!("the pin directory {} keeps being replaced", dir.display())
}

/// Replaces the symlink `path` with one to `target` (a value, not a path).
fn set_symlink(path: &Path, target: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink(target, path).with_context(|| format!("cannot create {}", path.display()))
}

/// `root` must be on bpffs. A pin directory under /sys/fs/bpf where nothing is mounted gets a
/// bpffs mounted there, as systemd does at boot. Under `ip netns exec`, which mounts a /sys
/// of its own, that bpffs belongs to the agent's private mount namespace and goes with it.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    if !root.is_absolute() {
        bail!("the pin directory {} must be an absolute path", root.display());
    }
    let existing = root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    let sys = Path::new(SYS_BPF);
    if root.starts_with(sys) && sys.is_dir() && !is_bpffs(sys)? {
        mount_bpffs(sys)?;
        warn!(
            "no bpf filesystem was mounted on {SYS_BPF}: mounted one. Pins live as long as this mount namespace \
             (under `ip netns exec`, only as long as this agent): for hitless restarts there, mount a bpffs in the \
             host's namespace and give its path as --pin-dir"
        );
        return Ok(());
    }
    bail!(
        "the pin directory {} is not on a bpf filesystem: mount one (mount -t bpf bpf DIR) and give a directory \
         in it as --pin-dir",
        root.display()
    )
}
