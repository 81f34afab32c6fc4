//! xlb's agent: configuration, Maglev tables, health checks and the facade over the data
//! path's maps. The `lb-agent` binary is a thin CLI over this library; tests use it too.
pub mod agent;
pub mod api;
pub mod config;
pub mod ctl;
pub mod dataplane;
pub mod decap;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod wrr;
