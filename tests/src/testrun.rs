//! One frame through an XDP program with BPF_PROG_TEST_RUN: the verdict and the output frame.
use anyhow::Result;
use aya::programs::{TestRun, TestRunOptions, Xdp};

/// Room for what a program may add in front of the frame (encapsulation, ICMP answers).
const HEADROOM: usize = 256;

/// Runs `frame` through `prog`, with `ctx` as the xdp_md when given (see `dpbed::xdp_md`).
pub fn run_xdp(prog: &Xdp, frame: &[u8], ctx: Option<&[u8]>) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + HEADROOM];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = ctx;
    let result = prog.test_run(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// Asserts that, between two readings of per-reason counters, exactly `reason`'s moved, by one
/// frame of `len` bytes.
pub fn assert_one_counted<R: Copy + PartialEq + std::fmt::Debug>(
    before: &[(R, lb_common::Counters)],
    after: &[(R, lb_common::Counters)],
    reason: R,
    len: usize,
) {
    for ((r, b), (_, a)) in before.iter().zip(after) {
        let (dp, db) = (a.packets - b.packets, a.bytes - b.bytes);
        if *r == reason {
            assert_eq!((dp, db), (1, len as u64), "counter {r:?} after one frame");
        } else {
            assert_eq!(dp, 0, "counter {r:?} moved, expected only {reason:?}");
        }
    }
}
