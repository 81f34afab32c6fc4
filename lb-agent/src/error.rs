//! The errors a caller (or a test) branches on. Everything else is `anyhow` with context.
use std::net::IpAddr;

use crate::config::{Invalid, InvalidKind};

/// Why a change of the running balancer (a reload, or a control-API request) was refused.
/// Nothing was changed when one of these comes back, [`ChangeError::Dataplane`] aside.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("no service {0:?} (give its name or VIP:PORT/PROTOCOL)")]
    NoService(String),
    #[error("{address} is not a backend of {service}")]
    NotABackend { service: String, address: IpAddr },
    #[error("{0} is the last service; stop the agent instead")]
    LastService(String),
    #[error("{0:?} is not a unicast MAC address")]
    BadMac(String),
    /// The config the change leads to fails the validator.
    #[error("{}", join(.0))]
    Invalid(Vec<Invalid>),
    #[error("changing {} needs a restart; nothing was changed", .0.join(", "))]
    NeedsRestart(Vec<&'static str>),
    /// The MAGLEV map has the entries, but not in ranges long enough for the new tables.
    #[error(
        "the MAGLEV map has no room for the new services' tables ({needed} entries in ranges of each table's \
         size; {available} free): raise maglev_capacity and restart; nothing was changed"
    )]
    NoTableSpace { needed: u64, available: u64 },
    /// An L7 listener could not be bound or a certificate read: nothing was changed.
    #[error("{0:#}; nothing was changed")]
    L7(anyhow::Error),
    /// A map write failed half-way: the maps hold part of the change.
    #[error(transparent)]
    Dataplane(#[from] anyhow::Error),
}

impl ChangeError {
    /// The kinds of validation problems, for callers that branch on them.
    pub fn invalid_kinds(&self) -> Vec<InvalidKind> {
        match self {
            Self::Invalid(all) => all.iter().map(|i| i.kind).collect(),
            _ => Vec::new(),
        }
    }
}

fn join(all: &[Invalid]) -> String {
    all.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}
