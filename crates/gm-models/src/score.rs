//! Score models (Song & Ermon, 2019; Song et al., 2021): a network learns the score
//! `∇ₓ log p_t(x)` of the data noised by a forward SDE ([`gm_core::sde`]), which sidesteps the
//! normalising constant a density network would need — the seed's first question answered by
//! score matching and Langevin dynamics.
//!
//! - The network predicts the noise, `ε̂(x_t, t)`, and the score is `−ε̂/s(t)`: denoising score
//!   matching weighted by `s(t)²` is `‖ε̂ − z‖²` (`objective = "dsm"`); sliced score matching
//!   on the noised data by central finite differences (`objective = "ssm"`, no second
//!   derivatives) is the option.
//! - Noise levels: continuous `t ~ U(t_min, 1)`, or NCSN's ladder of `levels` geometric noise
//!   levels (VE: `σ_i = σ_min (σ_max/σ_min)^{t_i}` at evenly spaced `t_i`).
//! - Sampling: annealed Langevin dynamics, the reverse SDE (Euler–Maruyama or
//!   predictor–corrector) or the probability-flow ODE ([`SdeSamplerConfig`]).
//! - Likelihood: the probability-flow ODE's, by the instantaneous change of variables, in nats and
//!   bits/dim on the same 8-bit scale as flow matching and DDPM's bound (see
//!   [`crate::flow_matching`] for the units).
//!
//! Images (`[C, H, W]`) use the shared UNet; vectors (`[D, 1, 1]`, the 2-D toys) an MLP on
//! `[x, embedding(t)]`.

use crate::nn::{timestep_embedding, Linear};
use crate::unet::{Denoiser, UNetConfig};
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;
use gm_core::cnf::{draw_probe, Divergence};
use gm_core::kernels::ops::Act;
use gm_core::ode::{OdeStats, SolverConfig};
use gm_core::sde::{
    fd_sliced_score_matching, perturb, pf_ode_log_likelihood, sample, Sde, SdeSamplerConfig,
};
use gm_core::{sum_per_sample, GmRng};
use serde::{Deserialize, Serialize};
use std::cell::Cell;

/// The score-matching objective.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Denoising score matching (Vincent, 2011).
    #[default]
    Dsm,
    /// Sliced score matching (Song et al., 2019) on the noised data, by finite differences.
    Ssm,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreConfig {
    /// `[C, H, W]` images, or `[D, 1, 1]` vectors (the 2-D toys).
    pub image_shape: [usize; 3],
    /// The forward SDE (`[model.sde] kind = "ve" | "vp"`).
    pub sde: Sde,
    /// The network of image models.
    pub unet: UNetConfig,
    /// Hidden widths of the MLP of vector models.
    pub hidden: Vec<usize>,
    pub objective: Objective,
    /// Noise levels of training: 0 = continuous `t ~ U(t_min, 1)`; `L ≥ 2` = NCSN's ladder of
    /// `L` levels at evenly spaced `t` (geometric `σ` for VE).
    pub levels: usize,
    /// The smallest training time.
    pub t_min: f64,
    /// The finite-difference step of sliced score matching, relative to the level's `s(t)`.
    pub ssm_step: f64,
    /// How `gm sample`, sample grids and `--fid` draw.
    pub sampler: SdeSamplerConfig,
    /// The probability-flow ODE's solver for the likelihood.
    pub likelihood_solver: SolverConfig,
    /// The time the data sits at in the likelihood (the score is singular at 0).
    pub likelihood_t_min: f64,
    /// Divergence estimator of the likelihood: `exact`, `rademacher` or `gaussian`.
    pub divergence: Divergence,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            sde: Sde::default(),
            unet: UNetConfig::default(),
            hidden: vec![128, 128, 128],
            objective: Objective::Dsm,
            levels: 0,
            t_min: 1e-5,
            ssm_step: 0.01,
            sampler: SdeSamplerConfig::default(),
            likelihood_solver: SolverConfig::rk4(10),
            likelihood_t_min: 1e-5,
            divergence: Divergence::Rademacher,
        }
    }
}

impl ScoreConfig {
    /// Vector data (`[D, 1, 1]`): the MLP network, no pixel mapping.
    pub fn is_vector(&self) -> bool {
        self.image_shape[1] == 1 && self.image_shape[2] == 1
    }

    fn dims(&self) -> usize {
        self.image_shape.iter().product()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.image_shape.contains(&0) {
            return Err(format!(
                "model.image_shape must be positive, got {:?}",
                self.image_shape
            ));
        }
        if self.is_vector() {
            if self.hidden.is_empty() || self.hidden.contains(&0) {
                return Err(format!(
                    "model.hidden must be non-empty and positive, got {:?}",
                    self.hidden
                ));
            }
        } else {
            self.unet.validate(self.image_shape)?;
        }
        self.sde.validate().map_err(|e| format!("model.{e}"))?;
        if self.levels == 1 {
            return Err("model.levels must be 0 (continuous) or >= 2, got 1".into());
        }
        for (key, v) in [
            ("t_min", self.t_min),
            ("likelihood_t_min", self.likelihood_t_min),
        ] {
            if !(v > 0.0 && v < 1.0) {
                return Err(format!("model.{key} must be in (0, 1), got {v}"));
            }
        }
        if !(self.ssm_step > 0.0 && self.ssm_step.is_finite()) {
            return Err(format!("model.ssm_step must be > 0, got {}", self.ssm_step));
        }
        self.sampler.validate().map_err(|e| format!("model.{e}"))?;
        self.likelihood_solver
            .validate_general("model.likelihood_")?;
        Ok(())
    }

    /// Training times for `b` samples: continuous, or one of the ladder's levels each.
    fn draw_times(&self, b: usize, rng: &mut GmRng) -> Vec<f64> {
        let u = rng.per_sample_f64(b);
        if self.levels >= 2 {
            let l = self.levels;
            u.into_iter()
                .map(|u| {
                    let i = ((u * l as f64) as usize).min(l - 1);
                    self.t_min + (1.0 - self.t_min) * i as f64 / (l - 1) as f64
                })
                .collect()
        } else {
            u.into_iter()
                .map(|u| self.t_min + (1.0 - self.t_min) * u)
                .collect()
        }
    }
}

impl crate::Family for ScoreConfig {
    const KIND: &'static str = "score";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        ScoreConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        if self.is_vector() {
            crate::PixelData::Any
        } else {
            crate::PixelData::Dequantized
        }
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(ScoreModel::new(self.clone(), vb)?))
    }
}

/// An MLP `ε̂(x, t)` on `[x, embedding(1000 t)]` with SiLU between layers (`net.0`, `net.2`, …).
struct VectorNet {
    layers: Vec<Linear>,
    embed: usize,
}

impl VectorNet {
    const EMBED: usize = 32;

    fn new(d: usize, hidden: &[usize], vb: VarBuilder) -> Result<Self> {
        let mut dims = vec![d + Self::EMBED];
        dims.extend_from_slice(hidden);
        dims.push(d);
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(w[0], w[1], vb.pp(format!("net.{}", 2 * i))))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            embed: Self::EMBED,
        })
    }

    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let shape = x.shape().clone();
        let e = timestep_embedding(t, self.embed)?.to_dtype(x.dtype())?;
        let mut h = Tensor::cat(&[&x.flatten_from(1)?, &e], 1)?;
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward_act(&h, Act::Identity)?;
            if i + 1 < n {
                h = h.silu()?;
            }
        }
        h.reshape(shape)
    }
}

enum Net {
    Image(Box<Denoiser>),
    Vector(VectorNet),
}

pub struct ScoreModel {
    cfg: ScoreConfig,
    net: Net,
    device: Device,
    last_stats: Cell<OdeStats>,
}

impl ScoreModel {
    pub fn new(cfg: ScoreConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let device = vb.device().clone();
        let net = if cfg.is_vector() {
            Net::Vector(VectorNet::new(cfg.dims(), &cfg.hidden, vb)?)
        } else {
            Net::Image(Box::new(Denoiser::new(cfg.image_shape, &cfg.unet, 0, vb)?))
        };
        Ok(Self {
            cfg,
            net,
            device,
            last_stats: Cell::new(OdeStats::default()),
        })
    }

    pub fn config(&self) -> &ScoreConfig {
        &self.cfg
    }

    /// The statistics of the last sampling or likelihood solve.
    pub fn last_stats(&self) -> OdeStats {
        self.last_stats.get()
    }

    /// `ε̂(x, t)` at per-sample times `t` (`(B,)`, in `[0, 1]`).
    pub fn epsilon(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let tt = (t * 1000.0)?.to_dtype(x.dtype())?;
        match &self.net {
            Net::Image(d) => d.unet.forward(x, &tt, None),
            Net::Vector(v) => v.forward(x, &tt),
        }
    }

    /// The score `∇ₓ log p_t(x) = −ε̂(x, t)/s(t)` at one time shared by the batch.
    pub fn score(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let tt = Tensor::full(t, x.dim(0)?, x.device())?;
        let s = self.cfg.sde.marginal(t).1;
        self.epsilon(x, &tt)? * (-1.0 / s)
    }

    /// Data to the model's space: `[-1, 1]` for images, as they are for vectors.
    fn to_model(&self, x: &Tensor) -> Result<Tensor> {
        if self.cfg.is_vector() {
            Ok(x.clone())
        } else {
            Denoiser::to_model(x)
        }
    }

    /// Samples with the given sampler: `(n, C, H, W)` (images in `[0, 1]`).
    pub fn sample_with(
        &self,
        n: usize,
        sampler: &SdeSamplerConfig,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        let [c, h, w] = self.cfg.image_shape;
        let mut total = OdeStats::default();
        let out = Denoiser::chunked(n, None, |k, _| {
            let x0 = self.cfg.sde.prior_sample(
                &[k, c, h, w],
                candle_core::DType::F32,
                &self.device,
                rng,
            )?;
            let (x, stats) = sample(&self.cfg.sde, sampler, x0, rng, |x, t| {
                self.score(x, t).map(|s| s.detach())
            })?;
            total = total.max(stats);
            if self.cfg.is_vector() {
                Ok(x)
            } else {
                Denoiser::to_pixels(&x)
            }
        })?;
        self.last_stats.set(total);
        Ok(out)
    }

    /// `−log p(x)` per example in nats through the probability-flow ODE: on the 8-bit scale for
    /// dequantised images (see the module docs), as it is for vectors. `(B,)`.
    pub fn nll(&self, y: &Tensor, rng: &mut GmRng) -> Result<Tensor> {
        let x = self.to_model(y)?;
        let (logp, stats) = pf_ode_log_likelihood(
            &self.cfg.sde,
            &x,
            self.cfg.likelihood_t_min,
            &self.cfg.likelihood_solver,
            self.cfg.divergence,
            rng,
            |x, t| self.score(x, t),
        )?;
        self.last_stats.set(stats);
        if self.cfg.is_vector() {
            logp.neg()
        } else {
            Denoiser::eight_bit_nll(&logp, self.cfg.dims())
        }
    }

    /// The training objective per example `(B,)`, per dimension, at random times.
    fn objective(&self, batch: &Batch, rng: &mut GmRng) -> Result<Tensor> {
        let x0 = self.to_model(&batch.x)?;
        let b = x0.dim(0)?;
        let d = (x0.elem_count() / b) as f64;
        let t = self.cfg.draw_times(b, rng);
        let z = rng.randn(x0.shape(), x0.device())?.to_dtype(x0.dtype())?;
        let (xt, s) = perturb(&self.cfg.sde, &x0, &t, &z)?;
        let tt = Tensor::new(t.as_slice(), x0.device())?;
        match self.cfg.objective {
            Objective::Dsm => {
                let eps = self.epsilon(&xt, &tt)?;
                sum_per_sample(&(eps - z)?.sqr()?)? / d
            }
            Objective::Ssm => {
                // J(s) weighted by s(t)², with the score −ε̂/s: s²·J = s·vᵀ∇(−ε̂)v + ½ (vᵀε̂)².
                let v = draw_probe(Divergence::Gaussian, &xt, rng)?
                    .ok_or_else(|| candle_core::Error::Msg("no probe".into()))?;
                let h: Vec<f64> = s.iter().map(|s| self.cfg.ssm_step * s).collect();
                let inv_s: Vec<f64> = s.iter().map(|s| -1.0 / s).collect();
                let inv_s = gm_core::diffusion::per_sample_values(inv_s, &xt)?;
                let j = fd_sliced_score_matching(&xt, &v, &h, |x| {
                    self.epsilon(x, &tt)?.broadcast_mul(&inv_s)
                })?;
                let s2 = Tensor::new(
                    s.iter().map(|s| s * s).collect::<Vec<_>>().as_slice(),
                    x0.device(),
                )?
                .to_dtype(j.dtype())?;
                (j * s2)? / d
            }
        }
    }

    fn loss_name(&self) -> &'static str {
        match self.cfg.objective {
            Objective::Dsm => "dsm_loss",
            Objective::Ssm => "ssm_loss",
        }
    }
}

impl Model for ScoreModel {
    fn kind(&self) -> &'static str {
        "score"
    }

    /// The UNet of image data checkpoints; the small MLP of 2-D data does not.
    fn gradient_checkpointing(&self) -> bool {
        matches!(self.net, Net::Image(_))
    }

    fn loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        let l = self.objective(batch, rng)?.mean_all()?;
        Ok(Loss {
            total: l.clone(),
            parts: vec![(self.loss_name(), l)],
        })
    }

    /// The training objective; with `full` (and always for vectors, where it is cheap) the
    /// probability-flow ODE's `nll_nats` and its network evaluations.
    fn eval_metrics(&self, batch: &Batch, rng: &mut GmRng, opts: &EvalOptions) -> Result<Metrics> {
        let mut m = vec![(self.loss_name().to_string(), self.objective(batch, rng)?)];
        if opts.full || self.cfg.is_vector() {
            let nll = self.nll(&batch.x, rng)?;
            let nfe = Tensor::full(self.last_stats().nfe as f32, nll.dim(0)?, nll.device())?;
            m.push(("nll_nats".into(), nll));
            m.push(("likelihood_nfe".into(), nfe));
        }
        Ok(m)
    }

    fn likelihood_estimate(&self) -> &'static str {
        "ODE"
    }

    fn loss_units(&self) -> &'static str {
        match self.cfg.objective {
            Objective::Dsm => "denoising score matching, weighted squared error",
            Objective::Ssm => "sliced score matching",
        }
    }

    fn primary_metric(&self) -> &'static str {
        self.loss_name()
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_nats")
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        Ok(Some(self.sample_with(n, &self.cfg.sampler, rng)?))
    }
}
