//! The end-to-end bench's physical limit (program [`PROGRAM`]): the least an XDP program must
//! do to send a VIP's traffic to its backends over L2. IPv4 to the VIP gets a backend's MAC
//! (picked by source port, so that a flow stays on one backend) and goes out again with
//! XDP_TX; everything else passes. No flow table, no service lookup, no counters.

/// The forwarder program.
pub const PROGRAM: &str = "xlb_forward";
/// One [`Forwarder`].
pub const MAP: &str = "FORWARDER";
/// Backends the forwarder spreads over, at most.
pub const MAX_MACS: usize = 16;

/// The single entry of [`MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarder {
    /// The VIP, network byte order.
    pub vip: u32,
    /// Backends in `macs`, 1 to [`MAX_MACS`].
    pub count: u32,
    /// The interface's MAC, then each backend's (as [`crate::mac_words`] gives them).
    pub smac: [u16; 3],
    pub macs: [[u16; 3]; MAX_MACS],
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Forwarder>() == 8 + 6 + 6 * MAX_MACS + 2);
