//! A test bed of network namespaces for xlb: hosts on one L2 segment (a bridge), real servers
//! and clients that run in those namespaces, a capture on the balancer's interface, and the
//! agent as a real process. Everything it creates is removed when its guard drops, panics
//! included. Shared by the integration tests and `cargo xtask demo`.
pub mod agent;
pub mod bed;
pub mod bench;
pub mod capture;
pub mod certs;
pub mod dpbed;
pub mod http;
pub mod loadgen;
pub mod netns;
pub mod nginx;
pub mod rng;
pub mod scaleout;
pub mod scenario;
pub mod testrun;
pub mod topology;
pub mod traffic;
pub mod wire;
