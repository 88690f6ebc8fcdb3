//! # gm-core
//!
//! The probabilistic core of gm: distributions as values, the likelihood losses the rest of gm is
//! built from (NLL, MSE as Gaussian MLE, KL, ELBO, IWAE), a seeded random generator that makes
//! tensors on any device, and the textbook maximum-likelihood examples (biased coin, Gaussian
//! mixture by EM) as tested library code; ODE solvers, Gaussian diffusion schedules and samplers,
//! continuous-flow likelihoods, and mixed-precision autocasting.
//!
//! The CPU kernels the models run on (convolutions, fused ops, norms, the fused Adam update) live
//! apart in [`kernels`].
//!
//! Conventions, followed everywhere in gm:
//! - per-sample quantities are tensors of shape `[B]`; reducing them over the batch is a separate,
//!   visible step;
//! - log-likelihoods are in **nats**; [`bits_per_dim`] converts.

pub mod cnf;
pub mod device;
pub mod diffusion;
pub mod dist;
pub mod em;
pub mod grad_checkpoint;
pub mod kernels;
pub mod ladder;
pub mod loss;
pub mod mcmc;
pub mod ode;
pub mod precision;
pub mod rng;
pub mod samplers;
pub mod sde;
pub mod traffic;
pub mod vbgmm;

pub use device::{
    keep_freed_memory, native_kernels, portable_kernels, select_device, set_portable_kernels,
    DeviceChoice,
};
pub use dist::{Bernoulli, Categorical, DiagonalGaussian, StandardNormal};
pub use rng::{GmRng, RngState};

use candle_core::{Result, Tensor};

/// Sums every dimension but the first: `(B, ...) -> [B]`.
///
/// # Shapes
/// - `t`: `(B, d1, d2, ...)`; returns `(B,)`.
pub fn sum_per_sample(t: &Tensor) -> Result<Tensor> {
    if t.rank() <= 1 {
        return Ok(t.clone());
    }
    t.flatten_from(1)?.sum(1)
}

/// Converts a negative log-likelihood in nats per example into bits per dimension.
///
/// ```
/// // A uniform model over 256 grey levels costs exactly 8 bits per pixel.
/// let nats = 784.0 * (256f64).ln();
/// assert!((gm_core::bits_per_dim(nats, 784) - 8.0).abs() < 1e-12);
/// ```
pub fn bits_per_dim(nll_nats: f64, dims: usize) -> f64 {
    nll_nats / (dims as f64 * std::f64::consts::LN_2)
}
