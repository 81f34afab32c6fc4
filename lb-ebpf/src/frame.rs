//! The frame itself: the only module that turns offsets into pointers. Every accessor checks
//! that the whole value lies inside the frame; handlers get copies or byte-only references.
use aya_ebpf::programs::XdpContext;
use core::mem::size_of;

/// Pointer to a `T` at `offset` in the frame, or None when the frame is too short for it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A `T` at `offset`, copied out of the frame.
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T is inside the frame; unaligned read.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

/// `N` 16-bit words at the even `offset`, as `N` 16-bit loads: XDP frames start 2-byte
/// aligned. Volatile, word by word: a copy of the array would compile to a call of a
/// byte-wise memmove.
#[inline(always)]
pub fn words_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u16; N]> {
    let p = ptr_at::<[u16; N]>(ctx, offset)?.cast::<u16>();
    // SAFETY: ptr_at checked that the N words are inside the frame; 2-byte aligned as above.
    Some(core::array::from_fn(|i| unsafe { p.add(i).read_volatile() }))
}

/// Writes `N` 16-bit words at the even `offset`, as `N` 16-bit stores (see [`words_at`]).
#[inline(always)]
pub fn put_words<const N: usize>(ctx: &XdpContext, offset: usize, words: [u16; N]) -> Option<()> {
    let p = ptr_at::<[u16; N]>(ctx, offset)?.cast::<u16>();
    for (i, w) in words.iter().enumerate() {
        // SAFETY: inside the frame, checked by ptr_at; 2-byte aligned as the frame is.
        unsafe { p.add(i).write_volatile(*w) };
    }
    Some(())
}

/// A reference to a `T` at `offset` in the frame (for byte-array fields only: no alignment).
#[inline(always)]
pub fn ref_at<'a, T>(ctx: &'a XdpContext, offset: usize) -> Option<&'a T> {
    // SAFETY: inside the frame, which outlives the program's run; T is only made of bytes.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { &*p })
}

#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// Where the IP header of a frame starts (14: no VLAN tag, 18: one) as the verifier can see it
/// bounded. An offset that went through memory or across a call has lost its bounds; this
/// gives them back without a branch the data path could take otherwise.
#[inline(always)]
pub fn l3_bounded(l3: usize) -> usize {
    if l3 == 18 {
        18
    } else {
        14
    }
}
