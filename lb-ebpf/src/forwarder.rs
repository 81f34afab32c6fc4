//! The end-to-end bench's minimal XDP forwarder (lb_common::forwarder says what it is for).
//! Not part of the data path: the agent never loads it.
use aya_ebpf::{bindings::xdp_action, btf_maps::Array, macros::btf_map, programs::XdpContext};
use lb_common::{forwarder::Forwarder, ETH_P_IP};

use crate::{frame, parse};

#[btf_map]
pub static FORWARDER: Array<Forwarder, 1> = Array::new();

#[inline(always)]
pub fn forward(ctx: &XdpContext) -> u32 {
    to_backend(ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn to_backend(ctx: &XdpContext) -> Option<u32> {
    let f = FORWARDER.get(0)?;
    let [ether_type] = frame::words_at::<1>(ctx, 12)?;
    let dst = frame::words_at::<2>(ctx, 30)?;
    let vip = f.vip.to_ne_bytes();
    if ether_type != ETH_P_IP.to_be()
        || dst != [u16::from_ne_bytes([vip[0], vip[1]]), u16::from_ne_bytes([vip[2], vip[3]])]
    {
        return None;
    }
    let ihl = usize::from(*frame::ref_at::<u8>(ctx, 14)? & 0x0f);
    let [sport] = frame::words_at::<1>(ctx, 14 + ihl * 4)?;
    let count = f.count.max(1);
    let i = (u32::from(u16::from_be(sport)) % count) as usize;
    let mac = f.macs[i & (lb_common::forwarder::MAX_MACS - 1)];
    parse::set_macs(ctx, mac, f.smac)?;
    Some(xdp_action::XDP_TX)
}
