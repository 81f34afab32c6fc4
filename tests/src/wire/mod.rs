//! Frames on the wire, for tests: `build` makes input frames, `expect` makes the frames the data
//! path must emit, `view` reads the frames it did emit through checked accessors.
pub mod build;
pub mod expect;
pub mod view;

pub use build::{checksum, Frame};
