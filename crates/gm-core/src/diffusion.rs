//! Gaussian diffusion (Ho et al., 2020) without any network: noise schedules computed in f64, the
//! forward process `q(x_t | x_0)`, the posterior `q(x_{t-1} | x_t, x_0)`, the terms of the
//! variational bound, and samplers behind one trait in the style of diffusers' schedulers
//! (`timesteps()` then `step(model_output, i, x)`), so any denoiser — a UNet, a closed form, a
//! test dummy — plugs in.
//!
//! Indexing: timesteps are `0..T` (0-based); `ᾱ_t = Π_{s ≤ t} (1 − β_s)`, so `x_0` is the data
//! and `t = 0` is the first noising step. Images live in `[-1, 1]`.

use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// How `β_t` is laid out over the `T` steps.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BetaSchedule {
    /// `β_t` linear from `beta_start` to `beta_end` (Ho et al.: 1e-4 … 0.02 for T = 1000).
    #[default]
    Linear,
    /// `ᾱ_t = f(t)/f(0)`, `f(t) = cos²(((t/T) + s)/(1 + s) · π/2)`, `β_t ≤ 0.999` (Nichol & Dhariwal).
    Cosine,
}

/// A noise schedule's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub schedule: BetaSchedule,
    /// Number of diffusion steps `T`.
    pub timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// The cosine schedule's offset `s`.
    pub cosine_s: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            schedule: BetaSchedule::Linear,
            timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            cosine_s: 0.008,
        }
    }
}

impl ScheduleConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.timesteps < 2 {
            return Err(format!("timesteps must be >= 2, got {}", self.timesteps));
        }
        if self.schedule == BetaSchedule::Linear
            && !(0.0 < self.beta_start && self.beta_start <= self.beta_end && self.beta_end < 1.0)
        {
            return Err(format!(
                "beta_start/beta_end must satisfy 0 < beta_start <= beta_end < 1, got {} / {}",
                self.beta_start, self.beta_end
            ));
        }
        if self.schedule == BetaSchedule::Cosine && (self.cosine_s.is_nan() || self.cosine_s < 0.0)
        {
            return Err(format!("cosine_s must be >= 0, got {}", self.cosine_s));
        }
        Ok(())
    }
}

/// The schedule's per-step quantities, in f64.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn new(cfg: &ScheduleConfig) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("{e}")
        }
        let t = cfg.timesteps;
        let betas: Vec<f64> = match cfg.schedule {
            BetaSchedule::Linear => (0..t)
                .map(|i| {
                    cfg.beta_start + (cfg.beta_end - cfg.beta_start) * i as f64 / (t - 1) as f64
                })
                .collect(),
            BetaSchedule::Cosine => {
                let f = |i: usize| {
                    let u = (i as f64 / t as f64 + cfg.cosine_s) / (1.0 + cfg.cosine_s);
                    (u * std::f64::consts::FRAC_PI_2).cos().powi(2)
                };
                (0..t).map(|i| (1.0 - f(i + 1) / f(i)).min(0.999)).collect()
            }
        };
        Ok(Self::from_betas(betas))
    }

    pub fn from_betas(betas: Vec<f64>) -> Self {
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        Self {
            betas,
            alphas_cumprod,
        }
    }

    /// A schedule given by its `ᾱ_t` (decreasing, in `(0, 1)`), e.g. another library's values
    /// as they are; `β_t = 1 − ᾱ_t/ᾱ_{t−1}`.
    pub fn from_alphas_cumprod(alphas_cumprod: Vec<f64>) -> Result<Self> {
        let ok = !alphas_cumprod.is_empty()
            && alphas_cumprod.iter().all(|&a| a > 0.0 && a < 1.0)
            && alphas_cumprod.windows(2).all(|w| w[1] < w[0]);
        if !ok {
            bail!("alphas_cumprod must be non-empty, in (0, 1) and decreasing")
        }
        let betas = alphas_cumprod
            .iter()
            .enumerate()
            .map(|(t, &a)| 1.0 - a / if t == 0 { 1.0 } else { alphas_cumprod[t - 1] })
            .collect();
        Ok(Self {
            betas,
            alphas_cumprod,
        })
    }

    /// `T`.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// `ᾱ_t`, with `ᾱ_{-1} = 1` for `t = None`.
    pub fn alpha_bar(&self, t: Option<usize>) -> f64 {
        t.map_or(1.0, |t| self.alphas_cumprod[t])
    }

    /// Signal-to-noise ratio `ᾱ_t / (1 − ᾱ_t)`.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// The posterior `q(x_prev | x_t, x_0)` between any two steps `prev < t` (`prev = None` is
    /// the data): `(coef_x0, coef_xt, variance)` with mean `coef_x0·x_0 + coef_xt·x_t`.
    pub fn posterior(&self, t: usize, prev: Option<usize>) -> (f64, f64, f64) {
        let a_t = self.alphas_cumprod[t];
        let a_p = self.alpha_bar(prev);
        let beta = 1.0 - a_t / a_p;
        let coef_x0 = a_p.sqrt() * beta / (1.0 - a_t);
        let coef_xt = (1.0 - beta).sqrt() * (1.0 - a_p) / (1.0 - a_t);
        let var = beta * (1.0 - a_p) / (1.0 - a_t);
        (coef_x0, coef_xt, var)
    }
}

/// What the network predicts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Prediction {
    /// The noise `ε` (Ho et al.).
    #[default]
    Epsilon,
    /// The clean image `x_0`.
    Sample,
    /// The velocity `v = √ᾱ·ε − √(1−ᾱ)·x_0` (Salimans & Ho).
    V,
}

/// A `(B, 1, …, 1)` tensor of per-sample coefficients `values[t_b]`, shaped to broadcast on `like`.
pub fn per_sample(values: &[f64], t: &[usize], like: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = t.iter().map(|&i| values[i]).collect();
    per_sample_values(v, like)
}

/// A `(B, 1, …, 1)` tensor holding `values[b]` for sample `b`, shaped to broadcast on `like`.
pub fn per_sample_values(values: Vec<f64>, like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![values.len()];
    shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
    crate::traffic::upload(values, shape, like.device())?.to_dtype(like.dtype())
}

fn map_per_sample(
    s: &NoiseSchedule,
    t: &[usize],
    like: &Tensor,
    f: impl Fn(f64) -> f64,
) -> Result<Tensor> {
    let v: Vec<f64> = s.alphas_cumprod.iter().map(|&a| f(a)).collect();
    per_sample(&v, t, like)
}

/// `x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε`, with a timestep per sample.
pub fn q_sample(s: &NoiseSchedule, x0: &Tensor, t: &[usize], eps: &Tensor) -> Result<Tensor> {
    let a = map_per_sample(s, t, x0, f64::sqrt)?;
    let b = map_per_sample(s, t, x0, |a| (1.0 - a).sqrt())?;
    x0.broadcast_mul(&a)? + eps.broadcast_mul(&b)?
}

/// The regression target of `prediction` for `(x_0, ε)` at steps `t`.
pub fn target(
    s: &NoiseSchedule,
    prediction: Prediction,
    x0: &Tensor,
    eps: &Tensor,
    t: &[usize],
) -> Result<Tensor> {
    match prediction {
        Prediction::Epsilon => Ok(eps.clone()),
        Prediction::Sample => Ok(x0.clone()),
        Prediction::V => {
            let a = map_per_sample(s, t, x0, f64::sqrt)?;
            let b = map_per_sample(s, t, x0, |a| (1.0 - a).sqrt())?;
            eps.broadcast_mul(&a)? - x0.broadcast_mul(&b)?
        }
    }
}

/// `(x̂_0, ε̂)` from a network output, at steps `t` (one per sample).
pub fn split_prediction(
    s: &NoiseSchedule,
    prediction: Prediction,
    output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
) -> Result<(Tensor, Tensor)> {
    let sa = map_per_sample(s, t, x_t, f64::sqrt)?;
    let sb = map_per_sample(s, t, x_t, |a| (1.0 - a).sqrt())?;
    Ok(match prediction {
        Prediction::Epsilon => {
            let x0 = (x_t - output.broadcast_mul(&sb)?)?.broadcast_div(&sa)?;
            (x0, output.clone())
        }
        Prediction::Sample => {
            let eps = (x_t - output.broadcast_mul(&sa)?)?.broadcast_div(&sb)?;
            (output.clone(), eps)
        }
        Prediction::V => {
            let x0 = (x_t.broadcast_mul(&sa)? - output.broadcast_mul(&sb)?)?;
            let eps = (x_t.broadcast_mul(&sb)? + output.broadcast_mul(&sa)?)?;
            (x0, eps)
        }
    })
}

/// How the per-timestep squared errors are weighted in training.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LossWeighting {
    /// Ho et al.'s `L_simple`: the plain mean squared error of the target.
    #[default]
    Simple,
    /// Min-SNR-γ (Hang et al., 2023): the ε-space weight `min(SNR, γ)/SNR`, expressed for the
    /// chosen target (`min(SNR, γ)` for `x_0`, `min(SNR, γ)/(SNR + 1)` for `v`).
    MinSnr,
}

/// Per-sample loss weights `(B,)`.
pub fn loss_weights(
    s: &NoiseSchedule,
    weighting: LossWeighting,
    gamma: f64,
    prediction: Prediction,
    t: &[usize],
    like: &Tensor,
) -> Result<Tensor> {
    let w: Vec<f64> = t
        .iter()
        .map(|&i| match weighting {
            LossWeighting::Simple => 1.0,
            LossWeighting::MinSnr => {
                let snr = s.snr(i);
                let m = snr.min(gamma);
                match prediction {
                    Prediction::Epsilon => m / snr,
                    Prediction::Sample => m,
                    Prediction::V => m / (snr + 1.0),
                }
            }
        })
        .collect();
    crate::traffic::upload(w, t.len(), like.device())?.to_dtype(like.dtype())
}

/// Elementwise `KL(N(μ₁, e^{lv₁}) ‖ N(μ₂, e^{lv₂}))` in nats.
pub fn normal_kl(mu1: &Tensor, logvar1: &Tensor, mu2: &Tensor, logvar2: &Tensor) -> Result<Tensor> {
    let d = (mu1 - mu2)?;
    let t = ((logvar2 - logvar1)? + (logvar1 - logvar2)?.exp()?)?;
    let q = (d.sqr()? * logvar2.neg()?.exp()?)?;
    ((t + q)? - 1.0)? * 0.5
}

/// Standard normal CDF `Φ(z)`, elementwise.
pub fn std_normal_cdf(z: &Tensor) -> Result<Tensor> {
    ((z / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5
}

/// The log-probability (nats, elementwise) of 8-bit pixels `x ∈ {-1, -1 + 2/255, …, 1}` under a
/// Gaussian discretised to the 256 bins of width `2/255` (Ho et al.'s decoder `p(x_0 | x_1)`); the
/// edge bins extend to `±∞`, so the 256 probabilities sum to 1.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    mean: &Tensor,
    log_scale: &Tensor,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F64)?;
    let mean = mean.to_dtype(DType::F64)?;
    let inv = log_scale.to_dtype(DType::F64)?.neg()?.exp()?;
    let c = (&x - &mean)?;
    let half = 1.0 / 255.0;
    let upper = std_normal_cdf(&((&c + half)? * &inv)?)?;
    let lower = std_normal_cdf(&((&c - half)? * &inv)?)?;
    // Upper tail through the complement for accuracy: 1 − Φ(z) = Φ(−z).
    let upper_tail = std_normal_cdf(&((&c - half)? * &inv)?.neg()?)?;
    let mid = (&upper - &lower)?;
    let top = x.ge(0.999)?;
    let bottom = x.le(-0.999)?;
    let p = top.where_cond(&upper_tail, &bottom.where_cond(&upper, &mid)?)?;
    p.maximum(1e-12)?.log()?.to_dtype(dtype)
}

pub use crate::samplers::{
    sample_loop, spaced_timesteps, DiffusionSampler, SamplerConfig, SamplerKind, Spacing,
};
