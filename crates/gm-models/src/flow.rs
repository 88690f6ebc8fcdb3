//! Pieces shared by the normalizing flows ([`crate::realnvp`], [`crate::ffjord`]): the logit
//! pre-processing with its Jacobian, squeezing, the standard-normal base density and the
//! conversion of a continuous density on dequantised pixels to the 8-bit scale.
//!
//! Units. Dequantised pixels `x = (k + u)/256 ∈ [0, 1]` (`data.dequantize = true`) have a density
//! `p(x)`; the probability of the grey levels `k` is bounded by `log P(k) ≥ E_u[log p(x)] − D·ln 256`
//! (Theis et al., 2016), so the models report `nll_nats = −log p(x) + D·ln 256` per image and
//! `bits_per_dim = nll_nats / (D·ln 2)` is on the same 8-bit scale as the discrete models: a model
//! that is uniform on `[0, 1]^D` scores exactly 8.

use candle_core::{DType, Result, Tensor};
use gm_core::dist::softplus;
use gm_core::sum_per_sample;
use serde::{Deserialize, Serialize};

/// `D·ln 256`: what moves `−log p(x)` of pixels in `[0, 1]` onto the 8-bit scale.
pub fn eight_bit_offset(dims: usize) -> f64 {
    dims as f64 * 256f64.ln()
}

/// The logit pre-processing of Dinh et al. (2017): `y = logit(α + (1 − 2α)·x)` for `x ∈ [0, 1]`,
/// which keeps `y` finite at the edges. Its log-Jacobian per image is
/// `Σ ln(1 − 2α) − ln s − ln(1 − s)` with `s = α + (1 − 2α)·x`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Logit {
    pub alpha: f64,
}

impl Default for Logit {
    fn default() -> Self {
        Self { alpha: 0.05 }
    }
}

impl Logit {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..0.5).contains(&self.alpha) {
            return Err(format!(
                "model.logit.alpha must be in [0, 0.5), got {}",
                self.alpha
            ));
        }
        Ok(())
    }

    /// `(y, log|det ∂y/∂x|)` with the log-determinant per image `(B,)`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let a = self.alpha;
        let s = x.affine(1.0 - 2.0 * a, a)?;
        let ls = s.log()?;
        let l1s = s.affine(-1.0, 1.0)?.log()?;
        let y = (&ls - &l1s)?;
        let d = x.elem_count() / x.dim(0)?.max(1);
        let ld = ((sum_per_sample(&(ls + l1s)?)? * -1.0)? + d as f64 * (1.0 - 2.0 * a).ln())?;
        Ok((y, ld))
    }

    /// `x` from `y`, clamped to `[0, 1]` (images to show).
    pub fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        self.inverse_unclamped(y)?.clamp(0.0, 1.0)
    }

    /// The exact inverse of [`Logit::forward`]: `x = (σ(y) − α) / (1 − 2α)`, in the open box
    /// `(−α/(1 − 2α), (1 − α)/(1 − 2α))` that holds `[0, 1]` — the support of a flow's density.
    pub fn inverse_unclamped(&self, y: &Tensor) -> Result<Tensor> {
        let a = self.alpha;
        candle_nn::ops::sigmoid(y)?.affine(1.0 / (1.0 - 2.0 * a), -a / (1.0 - 2.0 * a))
    }

    /// [`Logit::inverse_unclamped`] with `log|det ∂x/∂y|` per image `(B,)`:
    /// `Σ log σ(y) + log(1 − σ(y)) − log(1 − 2α)`, written with softplus so that it stays finite
    /// where `σ(y)` rounds to 0 or 1.
    pub fn inverse_with_logdet(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = y.elem_count() / y.dim(0)?.max(1);
        let per = (softplus(&y.neg()?)? + softplus(y)?)?;
        let ld = (sum_per_sample(&per)?.neg()? - d as f64 * (1.0 - 2.0 * self.alpha).ln())?;
        Ok((self.inverse_unclamped(y)?, ld))
    }

    /// The support of a flow with this pre-processing, per pixel: `(lo, hi)`.
    pub fn support(&self) -> (f64, f64) {
        let a = self.alpha;
        (-a / (1.0 - 2.0 * a), (1.0 - a) / (1.0 - 2.0 * a))
    }
}

/// `(B, C, H, W) → (B, 4C, H/2, W/2)`: each 2×2 patch becomes four channels (volume-preserving).
pub fn squeeze(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("squeeze needs even height and width, got {h}×{w}")
    }
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * 4, h / 2, w / 2))
}

/// The inverse of [`squeeze`].
pub fn unsqueeze(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if c % 4 != 0 {
        candle_core::bail!("unsqueeze needs channels divisible by 4, got {c}")
    }
    x.reshape((b, c / 4, 2, 2, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, c / 4, h * 2, w * 2))
}

/// `log N(z; 0, I)` per sample `(B,)`, accumulated in f64.
pub use gm_core::cnf::std_normal_log_prob;

/// `log N(z; 0, T²·I)` per sample: the base density of sampling at temperature `T`.
pub fn tempered_normal_log_prob(z: &Tensor, temperature: f64) -> Result<Tensor> {
    let d = z.elem_count() / z.dim(0)?.max(1);
    let scaled = (z / temperature)?;
    std_normal_log_prob(&scaled)? - d as f64 * temperature.ln()
}

/// Mean of a `(B,)` tensor as an f64.
pub fn mean_f64(x: &Tensor) -> Result<f64> {
    x.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()
}

/// `(x_t, u_t)` of the conditional OT path for noise `x0`, data `x1` and per-sample times `t`.
pub fn ot_path(x0: &Tensor, x1: &Tensor, t: &Tensor, sigma_min: f64) -> Result<(Tensor, Tensor)> {
    let mut shape = vec![t.dim(0)?];
    shape.extend(std::iter::repeat_n(1, x0.rank() - 1));
    let tb = t.reshape(shape)?.to_dtype(x0.dtype())?;
    let a = tb.affine(-(1.0 - sigma_min), 1.0)?;
    let x_t = (x0.broadcast_mul(&a)? + x1.broadcast_mul(&tb)?)?;
    let u = (x1 - (x0 * (1.0 - sigma_min))?)?;
    Ok((x_t, u))
}

/// The exact marginal velocity of the OT path when the data are `N(μ, s²I)`:
/// `u_t(x) = μ + (t·s² − (1 − σ)·a)/(a² + t²s²)·(x − tμ)`, `a = 1 − (1 − σ)t` (the regression of
/// `u_t` on `x_t`, both Gaussian).
pub fn gaussian_ot_velocity(x: &Tensor, t: f64, mu: f64, s: f64, sigma_min: f64) -> Result<Tensor> {
    let a = 1.0 - (1.0 - sigma_min) * t;
    let slope = (t * s * s - (1.0 - sigma_min) * a) / (a * a + t * t * s * s);
    ((x - t * mu)? * slope)? + mu
}
