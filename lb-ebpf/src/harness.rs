//! The benchmarks' restore harness (lb_common::harness says why): before every run of the
//! program under test, the frame is put back as it was (its length with bpf_xdp_adjust_head,
//! its bytes from HARNESS_FRAME), made a new flow if asked, and the program is tail-called.
//! Not part of the data path: the agent never loads it.
use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::bpf_xdp_adjust_head,
    macros::btf_map,
    programs::XdpContext,
};
use lb_common::harness::{new_flow, Frame, FRAME_MAX};

use crate::frame::{ptr_at, put_words, words_at};

#[btf_map]
pub static HARNESS_FRAME: Array<Frame, 1> = Array::new();

#[btf_map]
pub static HARNESS_TARGET: ProgramArray<1> = ProgramArray::new();

#[btf_map]
pub static HARNESS_SEQ: PerCpuArray<u32, 1> = PerCpuArray::new();

/// Restores the frame and tail-calls the program under test; XDP_ABORTED when the frame
/// cannot be restored or the tail call fails (a figure with that verdict is refused).
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    if restore(ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: a tail call only replaces this program's run with the target's on this context.
    unsafe { HARNESS_TARGET.tail_call(ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[inline(always)]
fn restore(ctx: &XdpContext) -> Option<()> {
    let f = HARNESS_FRAME.get(0)?;
    let len = f.len as usize;
    if len > FRAME_MAX || len % 2 != 0 {
        return None;
    }
    // Every run pays the helper call, the empty program's run too: delta 0 is allowed.
    let delta = (ctx.data_end() - ctx.data()) as i32 - len as i32;
    // SAFETY: the helper checks delta against the buffer's head and tail room.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return None;
    }
    // Back where BPF_PROG_TEST_RUN put it: XDP_PACKET_HEADROOM (256) into a page-aligned
    // buffer, so the 8-byte stores below are aligned (the verifier cannot be shown that: it
    // refuses arithmetic on packet pointers beyond adding offsets).
    if ctx.data() + len != ctx.data_end() {
        return None;
    }
    let words = len / 8;
    for i in 0..FRAME_MAX / 8 {
        if i >= words {
            break;
        }
        let p = ptr_at::<u64>(ctx, i * 8)?;
        // SAFETY: inside the frame (ptr_at) and 8-byte aligned (see above).
        unsafe { p.write_volatile(f.bytes[i]) };
    }
    // The last 0-7 bytes, by 16-bit words (the length is even). Only a frame shorter than
    // FRAME_MAX has them: the mask says so to the verifier.
    if len % 8 != 0 {
        let tail = f.bytes[words & (FRAME_MAX / 8 - 1)].to_ne_bytes();
        for j in 0..3 {
            let at = words * 8 + j * 2;
            if at + 2 > len {
                break;
            }
            put_words::<1>(ctx, at, [u16::from_ne_bytes([tail[j * 2], tail[j * 2 + 1]])])?;
        }
    }
    if f.src_word_at != 0 {
        let seq = HARNESS_SEQ.get_ptr_mut(0)?;
        // SAFETY: this CPU's own slot; a run is not preempted by another run on its CPU.
        let n = unsafe { *seq };
        unsafe { *seq = n.wrapping_add(1) };
        let (add, port) = new_flow(n);
        let (src_at, port_at) = (usize::from(f.src_word_at) & 0xff, usize::from(f.port_at) & 0xff);
        let [word] = words_at::<1>(ctx, src_at)?;
        put_words::<1>(ctx, src_at, [u16::from_be(word).wrapping_add(add).to_be()])?;
        put_words::<1>(ctx, port_at, [port.to_be()])?;
    }
    Some(())
}
