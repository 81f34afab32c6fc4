//! The benchmarks' restore harness (program [`PROGRAM`]): BPF_PROG_TEST_RUN with repeat > 1
//! runs a program again on the buffer its previous run left, so a program that changes the
//! frame (an encapsulation, a new flow that must be new every time) would measure its own
//! output. The harness puts the original frame back before every run and tail-calls the
//! program under test; its own cost is measured by tail-calling an empty program the same way.

/// The harness program.
pub const PROGRAM: &str = "xlb_harness";
/// One [`Frame`]: what every run starts from.
pub const FRAME_MAP: &str = "HARNESS_FRAME";
/// Program array of one slot: the program under test.
pub const TARGET_MAP: &str = "HARNESS_TARGET";
/// Per-CPU `u32`: how many new flows this CPU made ([`new_flow`] of it is the next one).
pub const SEQ_MAP: &str = "HARNESS_SEQ";

/// The longest frame the harness restores.
pub const FRAME_MAX: usize = 256;
/// New flows take source ports `PORT_BASE..PORT_BASE + PORTS` of one client, then the next.
pub const PORT_BASE: u16 = 1024;
pub const PORTS: u32 = 60_000;

/// The single entry of [`FRAME_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Bytes of the frame, even and at most [`FRAME_MAX`].
    pub len: u32,
    /// 0: every run gets the same frame. Otherwise every run is a new flow: the 16-bit word of
    /// the source address at this offset is increased and the source port at `port_at` set,
    /// as [`new_flow`] says for the CPU's next sequence number (checksums are left as they
    /// were: no program under test reads them).
    pub src_word_at: u16,
    pub port_at: u16,
    /// The frame, in words so that it is restored by 8-byte stores.
    pub bytes: [u64; FRAME_MAX / 8],
}
const _: () = assert!(core::mem::size_of::<Frame>() == 8 + FRAME_MAX);

impl Frame {
    /// `frame` (even length, at most [`FRAME_MAX`] bytes), the same on every run, or a new
    /// flow on every run with `vary` = (offset of the source address's last 16-bit word,
    /// offset of the source port). None when the frame does not fit.
    pub fn new(frame: &[u8], vary: Option<(u16, u16)>) -> Option<Self> {
        if frame.len() > FRAME_MAX || !frame.len().is_multiple_of(2) {
            return None;
        }
        let mut bytes = [0u64; FRAME_MAX / 8];
        for (i, chunk) in frame.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            bytes[i] = u64::from_ne_bytes(word);
        }
        let (src_word_at, port_at) = vary.unwrap_or((0, 0));
        Some(Self { len: frame.len() as u32, src_word_at, port_at, bytes })
    }
}

/// The `n`-th new flow: (what is added to the source address's last 16-bit word, the source
/// port), both in host order.
#[inline(always)]
pub fn new_flow(n: u32) -> (u16, u16) {
    ((n / PORTS) as u16, PORT_BASE + (n % PORTS) as u16)
}

/// `frame` as the harness makes it for the `n`-th new flow.
pub fn patch(frame: &mut [u8], src_word_at: usize, port_at: usize, n: u32) {
    let (add, port) = new_flow(n);
    let word = u16::from_be_bytes([frame[src_word_at], frame[src_word_at + 1]]).wrapping_add(add);
    frame[src_word_at..src_word_at + 2].copy_from_slice(&word.to_be_bytes());
    frame[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_fit_or_are_refused() {
        assert!(Frame::new(&[0; FRAME_MAX + 2], None).is_none(), "too long");
        assert!(Frame::new(&[0; 9], None).is_none(), "odd");
        let bytes: [u8; 10] = core::array::from_fn(|i| i as u8 + 1);
        let f = Frame::new(&bytes, Some((2, 6))).unwrap();
        assert_eq!((f.len, f.src_word_at, f.port_at), (10, 2, 6));
        assert_eq!(f.bytes[0].to_ne_bytes(), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(f.bytes[1].to_ne_bytes(), [9, 10, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn every_new_flow_is_another_address_or_port() {
        assert_eq!(new_flow(0), (0, PORT_BASE));
        assert_eq!(new_flow(PORTS - 1), (0, PORT_BASE + (PORTS - 1) as u16));
        assert_eq!(new_flow(PORTS), (1, PORT_BASE));
        let mut frame = [0u8; 8];
        frame[2..4].copy_from_slice(&0x0100u16.to_be_bytes());
        patch(&mut frame, 2, 6, 2 * PORTS + 5);
        assert_eq!(frame, [0, 0, 0x01, 0x02, 0, 0, 0x04, 0x05]);
    }
}
