//! Entry points of the XDP programs. Each module holds one concern; this file only assembles them.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The atomic intrinsics: core::sync::atomic has no read-modify-write operations on this target,
// but LLVM lowers these to BPF_ATOMIC instructions (flow.rs: ACTIVE_FLOWS).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics), allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod balancer;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod decap;
#[cfg(target_arch = "bpf")]
mod encap;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod flow_cache;
#[cfg(target_arch = "bpf")]
mod forwarder;
#[cfg(target_arch = "bpf")]
mod frame;
#[cfg(target_arch = "bpf")]
mod harness;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod sched;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

    use crate::{balancer, decap, forwarder, frame, harness, parse, stats};

    /// The balancer: every frame is counted once, by the reason of its verdict.
    #[xdp]
    pub fn xlb_balancer(ctx: XdpContext) -> u32 {
        let reason = balancer::balance(&ctx);
        stats::count_reason(reason, frame::frame_len(&ctx));
        reason.action().code()
    }

    /// The backend side of L3 DSR: strips the outer header of IPIP/IP6IP6 packets sent to one
    /// of this host's addresses. Every frame is counted once (bytes as received) and passed.
    #[xdp]
    pub fn xlb_decap(ctx: XdpContext) -> u32 {
        let bytes = frame::frame_len(&ctx);
        let reason = decap::decap(&ctx);
        stats::count_decap(reason, bytes);
        reason.action().code()
    }

    /// XDP_PASS and nothing else: the peer of a native-XDP veth needs a program for XDP_TX frames
    /// to arrive (test beds only), and the empty-program baseline of the benchmarks.
    #[xdp]
    pub fn xlb_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// The benchmarks' restore harness: puts the frame back and tail-calls the program under test.
    #[xdp]
    pub fn xlb_harness(ctx: XdpContext) -> u32 {
        harness::run(&ctx)
    }

    /// The end-to-end bench's minimal L2 forwarder: a VIP's IPv4 to a backend's MAC, XDP_TX.
    #[xdp]
    pub fn xlb_forward(ctx: XdpContext) -> u32 {
        forwarder::forward(&ctx)
    }

    /// Swaps the Ethernet addresses and bounces the frame: the minimal XDP_TX baseline.
    #[xdp]
    pub fn xlb_mac_swap(ctx: XdpContext) -> u32 {
        match parse::swap_macs(&ctx) {
            Some(()) => xdp_action::XDP_TX,
            None => xdp_action::XDP_PASS,
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects programs that could reach a panic.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
