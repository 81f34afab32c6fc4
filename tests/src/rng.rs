//! The one PRNG of the tests and benches (fastrand, seeded, so a run reproduces), with the
//! draws the fuzzers and benches make.
pub struct Rng(fastrand::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    /// In 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        self.0.usize(..n)
    }

    /// In lo..=hi.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        self.0.usize(lo..=hi)
    }

    /// True with probability p %.
    pub fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    pub fn pick<T: Copy>(&mut self, s: &[T]) -> T {
        s[self.below(s.len())]
    }

    pub fn byte(&mut self) -> u8 {
        self.0.u8(..)
    }

    pub fn u16(&mut self) -> u16 {
        self.0.u16(..)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf);
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }

    pub fn shuffle<T>(&mut self, s: &mut [T]) {
        self.0.shuffle(s);
    }
}
