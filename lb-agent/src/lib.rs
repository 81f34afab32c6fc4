//! xlb's agent: configuration, the tables new flows are spread by, health checks, the control
//! API and the facade over the data path's maps. The `lb-agent` binary is a thin CLI over this
//! library; tests use it too. One folder or file per concern:
//!
//! - `config`: the file's reader and the one validator a config (file or API) goes through;
//! - `agent`: the running balancer's state, reloads and the in-band (passive) health signal;
//! - `dataplane`: the only code that touches a map (load, pin, attach, publish, count);
//! - `tables`: Maglev and round-robin tables, built here, looked up by the kernel;
//! - `health`: active checks; `api`: the control socket and `lb-agent ctl`; `metrics`;
//! - `bgp`: the VIPs announced through BIRD while this host can serve them;
//! - `l7`: the services the agent proxies itself (HTTP, HTTPS, TCP with PROXY headers);
//! - `net`: interface addresses, MACs, neighbours; `decap`: the backend side of L3 DSR;
//! - `sys`: every raw system call (the only `unsafe`); `error`: the errors callers branch on.
#![deny(unsafe_code)]

pub mod agent;
pub mod api;
pub mod bgp;
pub mod config;
pub mod dataplane;
pub mod decap;
pub mod error;
pub mod health;
pub mod l7;
pub mod metrics;
pub mod net;
pub mod sys;
pub mod tables;
