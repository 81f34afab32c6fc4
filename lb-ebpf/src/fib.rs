//! Next hop of an encapsulated packet from the kernel's FIB: egress interface, MACs, MTU.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{Addr, FAMILY_V4};

const FIB_WORDS: usize = 8;
const _: () = assert!(core::mem::size_of::<FibParams>() == FIB_WORDS * 8);
const _: () = assert!(core::mem::align_of::<FibParams>() <= 8);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

pub enum Route {
    /// Out of `ifindex`, from `smac` to `dmac` (as `lb_common::mac_words`).
    Via { ifindex: u32, smac: [u16; 3], dmac: [u16; 3] },
    /// Routable, but the next hop's MAC is not known yet.
    NoNeighbour,
    /// The packet of `tot_len` exceeds the egress MTU, given here.
    TooBig(u16),
    /// No route, blackhole, unreachable, prohibited...
    Unroutable,
}

/// Looks up the route from `src` to `dst` for a packet of `tot_len` bytes (IP header included),
/// as if it had arrived on the ingress interface.
#[inline(always)]
pub fn route(ctx: &XdpContext, family: u8, proto: u8, src: &Addr, dst: &Addr, tot_len: u16) -> Route {
    // Zeroed as eight 64-bit stores, volatile: `mem::zeroed()` of the struct, or a zeroed
    // array, compiles to a call of a byte-wise memset on every encapsulated packet.
    let mut words = core::mem::MaybeUninit::<[u64; FIB_WORDS]>::uninit();
    let base = words.as_mut_ptr().cast::<u64>();
    for i in 0..FIB_WORDS {
        // SAFETY: inside `words`.
        unsafe { base.add(i).write_volatile(0) };
    }
    // SAFETY: the words are as large as the request and at least as aligned, and all written;
    // all-zero is a valid (empty) request.
    let p: &mut FibParams = unsafe { &mut *base.cast::<FibParams>() };
    p.l4_protocol = proto;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_1.tot_len = tot_len;
    if family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = *src;
        p.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: the helper reads and writes `p` only, whose size we pass.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), p, core::mem::size_of::<FibParams>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            Route::Via { ifindex: p.ifindex, smac: lb_common::mac_words(p.smac), dmac: lb_common::mac_words(p.dmac) }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeighbour,
        // SAFETY: on FRAG_NEEDED the kernel stored the MTU in the union.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig(unsafe { p.__bindgen_anon_1.mtu_result }),
        _ => Route::Unroutable,
    }
}
