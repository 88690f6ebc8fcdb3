//! gm's CPU kernels: the convolutions ([`conv`]), matrix products ([`matmul`]), fused
//! element-wise ops ([`ops`]), group and
//! layer norms ([`norm`]), the fused Adam update ([`adam`]) and the loops that spread them over
//! candle's thread pool ([`par`]).
//!
//! Each is a candle custom op with a CPU implementation and, where candle has one, a fallback to
//! candle's own ops on other devices (or everywhere when [`crate::set_portable_kernels`] asks for
//! the portable path). The probabilistic parts of gm-core build on tensors and never on these
//! modules directly.

pub mod adam;
pub mod conv;
pub(crate) mod cpu;
pub mod matmul;
pub mod norm;
pub mod ops;
pub mod par;
