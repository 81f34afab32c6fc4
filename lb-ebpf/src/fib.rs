//! Next hop of an encapsulated packet: egress interface, MACs, MTU. From this CPU's cache of
//! the FIB's answers (NEXT_HOPS) while the agent's route generation holds; from the kernel's
//! FIB otherwise, and for any answer but a usable next hop (no neighbour yet, no route), which
//! is never cached: the FIB is asked again on every packet until it names one.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{limits::NEXT_HOP_SLOTS, Addr, Backend, NextHop, FAMILY_V4};

use crate::maps::NEXT_HOPS;

const FIB_WORDS: usize = 8;
const _: () = assert!(core::mem::size_of::<FibParams>() == FIB_WORDS * 8);
const _: () = assert!(core::mem::align_of::<FibParams>() <= 8);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// What the FIB says of a destination.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Out of [`Route::ifindex`], from [`Route::smac`] to [`Route::dmac`].
    Via,
    /// Routable, but the next hop's MAC is not known yet.
    NoNeighbour,
    /// The packet exceeds the egress MTU, [`Route::mtu`].
    TooBig,
    /// No route, blackhole, unreachable, prohibited...
    Unroutable,
}

/// The FIB's answer. A struct whose every field is always written, not an enum with data: a
/// copy of an enum variant whose payload was never written reads uninitialised registers,
/// which the verifier refuses.
#[derive(Clone, Copy)]
pub struct Route {
    pub verdict: Verdict,
    pub ifindex: u32,
    /// As `lb_common::mac_words` gives them.
    pub smac: [u16; 3],
    pub dmac: [u16; 3],
    /// The route's MTU (Via, TooBig).
    pub mtu: u16,
}

impl Route {
    fn only(verdict: Verdict, mtu: u16) -> Self {
        Self { verdict, ifindex: 0, smac: [0; 3], dmac: [0; 3], mtu }
    }
}

/// Looks up the route from `src` to `dst` for a packet of `tot_len` bytes (IP header included),
/// as if it had arrived on the ingress interface.
#[inline(always)]
fn route(ctx: &XdpContext, family: u8, proto: u8, src: &Addr, dst: &Addr, tot_len: u16) -> Route {
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
        // SAFETY: on success the kernel (5.12 on) stored the MTU it checked in the union; an
        // older one left tot_len there, which `next_hop` refuses to keep.
        BPF_FIB_LKUP_RET_SUCCESS => Route {
            verdict: Verdict::Via,
            ifindex: p.ifindex,
            smac: lb_common::mac_words(p.smac),
            dmac: lb_common::mac_words(p.dmac),
            mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::only(Verdict::NoNeighbour, 0),
        // SAFETY: on FRAG_NEEDED the kernel stored the MTU in the union.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::only(Verdict::TooBig, unsafe { p.__bindgen_anon_1.mtu_result }),
        _ => Route::only(Verdict::Unroutable, 0),
    }
}

/// The next hop towards backend `id` (`backend`, its slot) for a packet of `tot_len` bytes:
/// this CPU's cached answer while it is of `route_generation` and of the slot's generation,
/// else the FIB's, kept when it names a next hop. A cached next hop answers the MTU check as
/// the FIB would: too big past the route's MTU.
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    id: u32,
    backend: &Backend,
    route_generation: u32,
    family: u8,
    proto: u8,
    src: &Addr,
    tot_len: u16,
) -> Route {
    let slot = NEXT_HOPS.get_ptr_mut(id & (NEXT_HOP_SLOTS - 1));
    if let Some(hop) = slot {
        // SAFETY: this CPU's own slot, valid for the program's run; only this CPU writes it.
        let h = unsafe { &*hop };
        if h.tag == id.wrapping_add(1)
            && h.backend_generation == backend.generation
            && h.route_generation == route_generation
        {
            let verdict = if tot_len > h.mtu { Verdict::TooBig } else { Verdict::Via };
            return Route { verdict, ifindex: h.ifindex, smac: h.smac, dmac: h.dmac, mtu: h.mtu };
        }
    }
    let answer = route(ctx, family, proto, src, &backend.addr, tot_len);
    // An MTU equal to what was asked may be the request's own tot_len left by a kernel that
    // does not report the MTU: not kept (that packet only goes uncached).
    if let Some(hop) = slot.filter(|_| answer.verdict == Verdict::Via && answer.mtu != tot_len) {
        let entry = NextHop {
            tag: id.wrapping_add(1),
            backend_generation: backend.generation,
            route_generation,
            ifindex: answer.ifindex,
            mtu: answer.mtu,
            smac: answer.smac,
            dmac: answer.dmac,
            _pad: 0,
        };
        // SAFETY: as above.
        unsafe { hop.write(entry) };
    }
    answer
}
