//! gm's CPU kernels: the convolutions ([`conv`]), matrix products ([`matmul`]), fused
//! element-wise ops ([`ops`]), ×2 upsampling and its adjoint ([`resample`]), group,
//! layer and batch norms ([`norm`]), the fused Adam update ([`adam`]) and the loops that spread them over
//! candle's thread pool ([`par`]).
//!
//! Each is a candle custom op with a CPU implementation and, where candle has one, a fallback to
//! candle's own ops on other devices (or everywhere when [`crate::set_portable_kernels`] asks for
//! the portable path). The probabilistic parts of gm-core build on tensors and never on these
//! modules directly; the one exception is [`crate::dist::softplus`], which is [`ops::softplus`].

pub mod adam;
pub mod conv;
pub(crate) mod cpu;
pub mod matmul;
pub mod norm;
pub mod ops;
pub mod par;
pub mod resample;
pub(crate) mod reuse;
pub mod simd;

thread_local! {
    /// candle's own switch, read the way candle reads it (once per thread).
    static SECOND_ORDER: bool = std::env::var("CANDLE_GRAD_DO_NOT_DETACH")
        .is_ok_and(|s| !s.is_empty() && s != "0");
}

/// Whether second-order gradients are on (candle's `CANDLE_GRAD_DO_NOT_DETACH`): a backward must
/// then build its gradient from differentiable ops.
pub(crate) fn second_order() -> bool {
    SECOND_ORDER.with(|s| *s)
}

/// `t` as a backward pass should compute a gradient from it: detached, so the gradient an op
/// hands back carries no graph — unless second-order gradients are on (candle's
/// `CANDLE_GRAD_DO_NOT_DETACH`), where the graph is the point.
///
/// candle detaches the gradient flowing into each node, but a gradient computed from a saved
/// activation (a filter's gradient from the layer's input, a bias's from the activation's
/// derivative) still hangs on that activation and on the incoming gradient. A parameter's
/// gradient is never processed as a node, so through it every layer's output gradient and
/// activation stayed alive until the step's gradients were dropped: the DDPM UNet's step (batch
/// 64) peaked at 942 MB of live heap with them and at 640 MB without (`gm bench`'s
/// `peak_live_mb`).
pub(crate) fn for_grad(t: &candle_core::Tensor) -> candle_core::Tensor {
    if second_order() {
        t.clone()
    } else {
        t.detach()
    }
}
