//! Types shared by the XDP data path (lb-ebpf) and the agent (lb-agent): map names, keys and
//! values, the verdict vocabulary and every limit. Addresses and ports are kept in network byte
//! order, exactly as they sit in the packet, so the data path never swaps bytes.
#![no_std]
#![deny(unsafe_code)]

pub mod addr;
pub mod forwarder;
pub mod harness;
pub mod hash;
pub mod limits;
pub mod maps;
mod pod;
pub mod proto;
pub mod reason;

pub use addr::*;
pub use maps::*;
pub use proto::*;
pub use reason::{FlowEvent, Reason};
