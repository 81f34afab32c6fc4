//! `aya::Pod` for every map type, so the agent can read and write the maps. The one place with
//! `unsafe` in this crate.
#![cfg(feature = "user")]
#![allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]

use crate::{
    Affinity, AffinityKey, Backend, BackendFlows, Counters, Flow, FlowKey, RateWindow, Service, ServiceKey, Settings,
    Vip, VipKey,
};

// SAFETY: each type is #[repr(C)], Copy, has explicit padding fields and no invalid bit patterns.
unsafe impl aya::Pod for Vip {}
unsafe impl aya::Pod for VipKey {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for Flow {}
unsafe impl aya::Pod for Settings {}
unsafe impl aya::Pod for RateWindow {}
unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for Service {}
unsafe impl aya::Pod for crate::ServiceEntry {}
unsafe impl aya::Pod for crate::ServiceBucket {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for Counters {}
unsafe impl aya::Pod for BackendFlows {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for Affinity {}
unsafe impl aya::Pod for crate::NextHop {}
unsafe impl aya::Pod for crate::harness::Frame {}
unsafe impl aya::Pod for crate::forwarder::Forwarder {}
