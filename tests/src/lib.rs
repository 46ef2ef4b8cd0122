//! Shared by the integration tests, the demo and the benchmarks: a harness that runs the real
//! binaries and drives real sockets.

pub mod harness;
pub mod stack;
