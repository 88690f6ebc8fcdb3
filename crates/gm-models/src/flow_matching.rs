//! Flow matching (Lipman et al., 2023) with the conditional optimal-transport path on the shared
//! [`crate::unet::UNet`]: noise `x_0 ~ N(0, I)` at `t = 0`, data `x_1` at `t = 1`,
//!
//! `x_t = (1 − (1 − σ_min)·t)·x_0 + t·x_1`, target velocity `u_t = x_1 − (1 − σ_min)·x_0`,
//!
//! trained by regressing `v_θ(x_t, t)` on `u_t`. Sampling integrates `dx/dt = v_θ` from noise with
//! any [`gm_core::ode`] solver, or with DPM-Solver++(2M) or UniPC on the Gaussian path
//! (`model.solver.method = "dpmpp-2m" | "unipc"`, [`gm_core::samplers::flow_multistep`]); the log-likelihood comes from the instantaneous change of variables
//! ([`gm_core::cnf::log_likelihood`]), exact divergence in small dimension, Hutchinson for images.
//!
//! Likelihood units: the model lives on `x = 2y − 1` for dequantised pixels `y ∈ [0, 1]`
//! (`data.dequantize = true`: `y = (k + u)/256`), so `−log p(y) = −log p(x) − D·ln 2`, and the
//! reported `nll_nats` adds `D·ln 256` to put it on the 8-bit scale (the uniform-dequantisation
//! bound on `−log P(k)`): `bits_per_dim` is comparable with the discrete models'.

use crate::flow::ot_path;
use crate::unet::UNetConfig;
use crate::unet::{check_dropout, Denoiser};
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;
use gm_core::cnf::{log_likelihood, Divergence};
use gm_core::ode::{solve, Method, OdeStats, SolverConfig};
use gm_core::samplers::{flow_multistep, SamplerKind};
use gm_core::{sum_per_sample, GmRng};
use serde::{Deserialize, Serialize};
use std::cell::Cell;

/// The network's time input is `TIME_SCALE · t`, so its sinusoidal embedding sees the same range
/// as a 1000-step DDPM's.
pub const TIME_SCALE: f64 = 1000.0;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FlowMatchingConfig {
    pub image_shape: [usize; 3],
    pub unet: UNetConfig,
    pub num_classes: usize,
    /// Probability of dropping a label in training (classifier-free guidance).
    pub label_dropout: f64,
    /// Width of the path at `t = 1`.
    pub sigma_min: f64,
    /// The sampling ODE solver (NFE = steps × evaluations per step, or adaptive).
    pub solver: SolverConfig,
    /// Classifier-free guidance scale at sampling (1 = none).
    pub guidance_scale: f64,
    /// The solver of the likelihood ODE.
    pub likelihood_solver: SolverConfig,
    /// Divergence estimator of the likelihood: `exact`, `rademacher` or `gaussian`.
    pub divergence: Divergence,
}

impl Default for FlowMatchingConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            unet: UNetConfig::default(),
            num_classes: 0,
            label_dropout: 0.1,
            sigma_min: 1e-4,
            solver: SolverConfig::heun(25),
            guidance_scale: 1.0,
            likelihood_solver: SolverConfig::rk4(10),
            divergence: Divergence::Rademacher,
        }
    }
}

impl FlowMatchingConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.unet.validate(self.image_shape)?;
        check_dropout(self.label_dropout)?;
        if !(0.0..1.0).contains(&self.sigma_min) {
            return Err(format!(
                "model.sigma_min must be in [0, 1), got {}",
                self.sigma_min
            ));
        }
        self.solver.validate().map_err(|e| format!("model.{e}"))?;
        self.likelihood_solver
            .validate_general("model.likelihood_")?;
        if !self.guidance_scale.is_finite() {
            return Err("model.guidance_scale must be finite".into());
        }
        Ok(())
    }

    fn dims(&self) -> usize {
        self.image_shape.iter().product()
    }
}

impl crate::Family for FlowMatchingConfig {
    const KIND: &'static str = "flow-matching";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        FlowMatchingConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        crate::PixelData::Dequantized
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(FlowMatching::new(self.clone(), vb)?))
    }
}

pub struct FlowMatching {
    cfg: FlowMatchingConfig,
    net: Denoiser,
    device: Device,
    last_stats: Cell<OdeStats>,
}

impl FlowMatching {
    pub fn new(cfg: FlowMatchingConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let device = vb.device().clone();
        let net = Denoiser::new(cfg.image_shape, &cfg.unet, cfg.num_classes, vb)?;
        Ok(Self {
            cfg,
            net,
            device,
            last_stats: Cell::new(OdeStats::default()),
        })
    }

    /// `v_θ(x, t)` for one time `t ∈ [0, 1]` shared by the batch.
    pub fn velocity(&self, x: &Tensor, t: f64, labels: Option<&Tensor>, w: f64) -> Result<Tensor> {
        let tt = Tensor::full(t * TIME_SCALE, x.dim(0)?, x.device())?.to_dtype(x.dtype())?;
        self.net.guided(x, &tt, labels, w)
    }

    /// The statistics of the last sampling or likelihood solve.
    pub fn last_stats(&self) -> OdeStats {
        self.last_stats.get()
    }

    /// Samples with the given solver: `(n, C, H, W)` in `[0, 1]`.
    pub fn sample_with(
        &self,
        n: usize,
        labels: Option<&Tensor>,
        solver: &SolverConfig,
        w: f64,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        let [c, h, wd] = self.cfg.image_shape;
        let mut total = OdeStats::default();
        let out = Denoiser::chunked(n, labels, |k, labels| {
            let x0 = rng.randn((k, c, h, wd), &self.device)?;
            if solver.method.is_path_solver() {
                let kind = match solver.method {
                    Method::Unipc => SamplerKind::Unipc,
                    _ => SamplerKind::Dpmpp2m,
                };
                let x1 =
                    flow_multistep(kind, solver.steps, self.cfg.sigma_min, x0, rng, |x, t| {
                        self.velocity(x, t, labels, w)
                    })?;
                total.nfe = solver.steps;
                total.accepted = solver.steps;
                return Denoiser::to_pixels(&x1);
            }
            let (x1, stats) = solve(
                |t, x: &Tensor| self.velocity(x, t, labels, w).map(|v| v.detach()),
                x0,
                0.0,
                1.0,
                solver,
            )?;
            total = total.max(stats);
            Denoiser::to_pixels(&x1)
        })?;
        self.last_stats.set(total);
        Ok(out)
    }

    /// `−log p(y)` per image in nats on the 8-bit scale, `(B,)` (see the module docs).
    pub fn nll(&self, y: &Tensor, labels: Option<&Tensor>, rng: &mut GmRng) -> Result<Tensor> {
        let x = Denoiser::to_model(y)?;
        let (logp, stats) = log_likelihood(
            |t, x: &Tensor| self.velocity(x, t, labels, 1.0),
            &x,
            1.0,
            0.0,
            &self.cfg.likelihood_solver,
            self.cfg.divergence,
            rng,
        )?;
        self.last_stats.set(stats);
        Denoiser::eight_bit_nll(&logp, self.cfg.dims())
    }
}

impl Model for FlowMatching {
    fn kind(&self) -> &'static str {
        "flow-matching"
    }

    fn gradient_checkpointing(&self) -> bool {
        true
    }

    fn loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        let l = self.fm_loss(batch, rng, true)?.mean_all()?;
        Ok(Loss {
            total: l.clone(),
            parts: vec![("fm_loss", l)],
        })
    }

    fn eval_metrics(&self, batch: &Batch, rng: &mut GmRng, opts: &EvalOptions) -> Result<Metrics> {
        let mut m = vec![("fm_loss".to_string(), self.fm_loss(batch, rng, false)?)];
        if opts.full {
            let labels = self.net.eval_labels(batch)?;
            let nll = self.nll(&batch.x, labels.as_ref(), rng)?;
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
        "squared error of the velocity (per element)"
    }

    fn primary_metric(&self) -> &'static str {
        "fm_loss"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_nats")
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let labels = self.net.grid_labels(n, &self.device)?;
        Ok(Some(self.sample_with(
            n,
            labels.as_ref(),
            &self.cfg.solver,
            self.cfg.guidance_scale,
            rng,
        )?))
    }

    fn sample_labels(&self, labels: &[u32], rng: &mut GmRng) -> Result<Option<Tensor>> {
        match self.net.label_tensor(labels, &self.device)? {
            None => Ok(None),
            Some(y) => Ok(Some(self.sample_with(
                labels.len(),
                Some(&y),
                &self.cfg.solver,
                self.cfg.guidance_scale,
                rng,
            )?)),
        }
    }
}

impl FlowMatching {
    /// Per-image mean squared velocity error `(B,)` at uniform random times.
    fn fm_loss(&self, batch: &Batch, rng: &mut GmRng, train: bool) -> Result<Tensor> {
        let x1 = Denoiser::to_model(&batch.x)?;
        let b = x1.dim(0)?;
        let labels = if train {
            self.net.train_labels(batch, self.cfg.label_dropout, rng)?
        } else {
            self.net.eval_labels(batch)?
        };
        let x0 = rng.randn(x1.shape(), x1.device())?.to_dtype(x1.dtype())?;
        let t = rng.uniform(b, 0.0, 1.0, x1.device())?;
        let (x_t, u) = ot_path(&x0, &x1, &t, self.cfg.sigma_min)?;
        let tt = (t * TIME_SCALE)?;
        let v = self.net.unet.forward(&x_t, &tt, labels.as_ref())?;
        let d = x1.elem_count() / b;
        sum_per_sample(&(v - u)?.sqr()?)? / d as f64
    }
}
