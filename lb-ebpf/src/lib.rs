//! Empty on purpose: lb-agent has a build-dependency on this crate so that cargo rebuilds the
//! agent (which embeds the eBPF object) when anything here changes. The programs are in main.rs.
#![no_std]
