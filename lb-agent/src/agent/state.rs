//! The state file: what a new agent (a restart, an upgrade, a crash) must not lose. Each
//! backend's health as last checked, and the changes made through the control API, in order,
//! so that they are made again on top of the config file. Written whole on every change: a
//! temporary file, fsync, rename (a crash leaves the old file or the new one). A file that
//! cannot be read, is not ours, or belongs to another interface is reported and ignored.
use std::{
    collections::HashMap,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use log::warn;
use serde::{Deserialize, Serialize};

use crate::api::Request;

/// Where the agent keeps its state by default: a file per interface.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/xlb";

/// The layout this agent writes; a file of another version is ignored.
const VERSION: u32 = 1;

/// The state file of the agent on `interface` under the default directory.
pub fn default_path(interface: &str) -> PathBuf {
    Path::new(DEFAULT_STATE_DIR).join(format!("{interface}.state.json"))
}

/// A backend's health as last checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    /// The service as `VIP:PORT/PROTOCOL`: names may change, this does not.
    pub service: String,
    pub address: IpAddr,
    pub up: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub interface: String,
    /// Control-API changes, in the order they were made.
    pub changes: Vec<Request>,
    pub health: Vec<BackendHealth>,
}

impl State {
    pub fn new(interface: &str) -> Self {
        Self { version: VERSION, interface: interface.to_string(), ..Self::default() }
    }

    /// The health records by (service, address).
    pub fn health_by_backend(&self) -> HashMap<(String, IpAddr), bool> {
        self.health.iter().map(|h| ((h.service.clone(), h.address), h.up)).collect()
    }

    /// The state in `path` for `interface`, or None (nothing there yet, or a file that is
    /// unreadable, corrupt, of another version or another interface: each reported).
    pub fn load(path: &Path, interface: &str) -> Option<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn!("state file {}: cannot read it ({e}): starting without it", path.display());
                return None;
            }
        };
        let state: Self = match serde_json::from_str(&text) {
            Ok(state) => state,
            Err(e) => {
                warn!("state file {}: not a state file of this agent ({e}): ignored", path.display());
                return None;
            }
        };
        if state.version != VERSION {
            warn!("state file {}: version {} (this agent writes {VERSION}): ignored", path.display(), state.version);
            return None;
        }
        if state.interface != interface {
            warn!("state file {}: for interface {}, not {interface}: ignored", path.display(), state.interface);
            return None;
        }
        Some(state)
    }

    /// Writes the state to `path` atomically (the directory is created if missing).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(&serde_json::to_vec_pretty(self)?)?;
        file.write_all(b"\n")?;
        file.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "xlb-state-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_atomic_replace() {
        let d = dir();
        let path = d.join("eth0.state.json");
        assert_eq!(State::load(&path, "eth0"), None, "nothing there yet");
        let mut s = State::new("eth0");
        s.changes.push(Request::RemoveService { service: "web".into() });
        s.health.push(BackendHealth {
            service: "10.0.0.1:80/tcp".into(),
            address: "10.0.0.11".parse().unwrap(),
            up: false,
        });
        s.save(&path).unwrap();
        assert_eq!(State::load(&path, "eth0"), Some(s.clone()));
        s.health[0].up = true;
        s.save(&path).unwrap();
        assert!(State::load(&path, "eth0").unwrap().health[0].up);
        assert!(!path.with_extension("json.tmp").exists(), "no temporary file left");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn corrupt_foreign_or_other_version_files_are_ignored() {
        let d = dir();
        let path = d.join("s.json");
        std::fs::write(&path, "{ not json").unwrap();
        assert_eq!(State::load(&path, "eth0"), None);
        State::new("eth1").save(&path).unwrap();
        assert_eq!(State::load(&path, "eth0"), None, "another interface");
        let mut other = State::new("eth0");
        other.version = 99;
        other.save(&path).unwrap();
        assert_eq!(State::load(&path, "eth0"), None, "another version");
        std::fs::remove_dir_all(d).unwrap();
    }
}
