//! Attaching XDP programs to interfaces: native mode with a fallback to generic, and the
//! XDP_PASS program a native-XDP veth peer needs in test beds.
use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{xdp::XdpLinkId, Xdp, XdpMode as AyaXdpMode},
    Ebpf,
};
use lb_common::program_names;
use log::warn;

use super::object::{load_object, xdp_program, BALANCER_ONLY_MAPS};
use crate::{config::XdpMode, sys::if_index};

/// Attaches a loaded XDP program to `iface`. `None` tries native mode and falls back to
/// generic with a warning. Returns the mode in use. Detached when the program is dropped.
pub fn attach_xdp(prog: &mut Xdp, iface: &str, mode: Option<XdpMode>) -> Result<XdpMode> {
    attach_xdp_link(prog, iface, mode).map(|(mode, _)| mode)
}

/// As [`attach_xdp`], with the link's id.
pub(super) fn attach_xdp_link(prog: &mut Xdp, iface: &str, mode: Option<XdpMode>) -> Result<(XdpMode, XdpLinkId)> {
    if if_index(iface).is_none() {
        bail!("unknown interface {iface:?}");
    }
    let try_attach = |prog: &mut Xdp, mode: XdpMode| {
        let flags = match mode {
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Generic => AyaXdpMode::Skb,
        };
        prog.attach(iface, flags).with_context(|| format!("cannot attach XDP in {mode:?} mode to {iface}"))
    };
    match mode {
        Some(mode) => try_attach(prog, mode).map(|id| (mode, id)),
        None => match try_attach(prog, XdpMode::Native) {
            Ok(id) => Ok((XdpMode::Native, id)),
            Err(e) => {
                warn!("{e:#}; falling back to generic mode (slower: runs after the skb is built)");
                try_attach(prog, XdpMode::Generic).map(|id| (XdpMode::Generic, id))
            }
        },
    }
}

/// Attaches the XDP_PASS program to `iface`: a native-XDP veth only delivers XDP_TX frames to
/// a peer that runs an XDP program. For test beds; a real NIC needs nothing of the kind.
/// The program stays attached while the returned object lives.
pub fn attach_pass_program(iface: &str) -> Result<Ebpf> {
    let mut ebpf = load_object(&BALANCER_ONLY_MAPS)?;
    let prog = xdp_program(&mut ebpf, program_names::PASS)?;
    prog.attach(iface, AyaXdpMode::Driver).with_context(|| format!("cannot attach the pass program to {iface}"))?;
    Ok(ebpf)
}

/// Attaches the end-to-end bench's minimal forwarder (lb_common::forwarder) to `iface` in
/// native mode: IPv4 to `vip` goes to one of `backends` (by source port) from `iface_mac`.
/// The program stays attached while the returned object lives.
pub fn attach_forwarder(
    iface: &str,
    vip: std::net::Ipv4Addr,
    iface_mac: [u8; 6],
    backends: &[[u8; 6]],
) -> Result<Ebpf> {
    use lb_common::forwarder::{Forwarder, MAP, MAX_MACS, PROGRAM};
    anyhow::ensure!(
        (1..=MAX_MACS).contains(&backends.len()),
        "the forwarder takes 1 to {MAX_MACS} backends, not {}",
        backends.len()
    );
    let mut ebpf = load_object(&BALANCER_ONLY_MAPS)?;
    let mut macs = [[0u16; 3]; MAX_MACS];
    for (slot, mac) in macs.iter_mut().zip(backends) {
        *slot = lb_common::mac_words(*mac);
    }
    let value = Forwarder {
        vip: u32::from_ne_bytes(vip.octets()),
        count: backends.len() as u32,
        smac: lb_common::mac_words(iface_mac),
        macs,
        _pad: 0,
    };
    let mut map: aya::maps::Array<_, Forwarder> = super::object::take_map(&mut ebpf, MAP)?;
    map.set(0, value, 0).context("cannot configure the forwarder")?;
    let prog = xdp_program(&mut ebpf, PROGRAM)?;
    prog.attach(iface, AyaXdpMode::Driver).with_context(|| format!("cannot attach the forwarder to {iface}"))?;
    Ok(ebpf)
}
