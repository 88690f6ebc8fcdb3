//! Denoising diffusion (DDPM, Ho et al., 2020) on the shared [`crate::unet::UNet`]: training by the simple
//! (or min-SNR weighted) regression of `ε`, `x_0` or `v`; the variational bound `L_vlb` with the
//! discretised Gaussian decoder at `t = 0` as an upper bound on `−log p(x)` of 8-bit images
//! (`bpd_bound`); sampling through any [`gm_core::diffusion::DiffusionSampler`] (ancestral DDPM,
//! DDIM with `η`) with classifier-free guidance for the class-conditional model.
//!
//! The seed's route: DDPM is maximum likelihood on a latent chain `p(x_{0:T})`, trained through
//! its ELBO; `L_simple` is that ELBO with its per-step weights dropped.
//!
//! Data: the 256 grey levels, `x ∈ {0, 1/255, …, 1}` (`data.binarize = "none"`,
//! `data.dequantize = false`), mapped to `[-1, 1]` inside the model.

use crate::unet::{check_dropout, Denoiser, UNetConfig};
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;
use gm_core::diffusion::{
    discretized_gaussian_log_likelihood, loss_weights, normal_kl, per_sample, q_sample,
    sample_loop, split_prediction, target, BetaSchedule, LossWeighting, NoiseSchedule, Prediction,
    SamplerConfig, ScheduleConfig,
};
use gm_core::sde::{pf_ode_log_likelihood, vp_of_linear_ddpm, PfOdeConfig};
use gm_core::{sum_per_sample, GmRng};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DdpmConfig {
    pub image_shape: [usize; 3],
    pub unet: UNetConfig,
    /// Classes of the class-conditional model (0 = unconditional).
    pub num_classes: usize,
    /// Probability of replacing a label by "no label" in training (classifier-free guidance).
    pub label_dropout: f64,
    pub schedule: ScheduleConfig,
    pub prediction: Prediction,
    pub loss_weighting: LossWeighting,
    /// γ of the min-SNR weighting.
    pub min_snr_gamma: f64,
    /// How `gm sample`, sample grids and `--fid` draw images (also sets the variance the bound
    /// uses: `large_variance`).
    pub sampler: SamplerConfig,
    /// Terms `L_{t-1}` evaluated per image for the bound: `0` = all `T − 1` (exact sum),
    /// otherwise a stratified sample of that many steps, weighted to stay unbiased.
    pub bound_timesteps: usize,
    /// Also report the probability-flow ODE's likelihood (`ode_nll_nats`, `ode_bpd`) in full
    /// evaluations: the ε-model read as the score of the VP SDE that the linear schedule
    /// discretises ([`gm_core::sde::vp_of_linear_ddpm`]), on uniformly dequantised pixels.
    /// Absent (the default) = not computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ode_likelihood: Option<PfOdeConfig>,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            unet: UNetConfig::default(),
            num_classes: 0,
            label_dropout: 0.1,
            schedule: ScheduleConfig::default(),
            prediction: Prediction::Epsilon,
            loss_weighting: LossWeighting::Simple,
            min_snr_gamma: 5.0,
            sampler: SamplerConfig::default(),
            bound_timesteps: 100,
            ode_likelihood: None,
        }
    }
}

impl DdpmConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.unet.validate(self.image_shape)?;
        self.schedule
            .validate()
            .map_err(|e| format!("model.schedule: {e}"))?;
        self.sampler.validate().map_err(|e| format!("model.{e}"))?;
        // The step list itself (steps within T, an offset that stays inside the schedule).
        let schedule = NoiseSchedule::new(&self.schedule).map_err(|e| e.to_string())?;
        self.sampler
            .build(&schedule, self.prediction)
            .map_err(|e| format!("model.{e}"))?;
        check_dropout(self.label_dropout)?;
        if let Some(o) = &self.ode_likelihood {
            o.validate("model.ode_likelihood")?;
            if self.schedule.schedule != BetaSchedule::Linear {
                return Err(format!(
                    "model.ode_likelihood needs model.schedule.schedule = \"linear\" (the VP SDE a linear schedule discretises), got {:?}",
                    self.schedule.schedule
                ));
            }
        }
        if self.min_snr_gamma.is_nan() || self.min_snr_gamma <= 0.0 {
            return Err(format!(
                "model.min_snr_gamma must be > 0, got {}",
                self.min_snr_gamma
            ));
        }
        Ok(())
    }
}

impl crate::Family for DdpmConfig {
    const KIND: &'static str = "ddpm";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        DdpmConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        crate::PixelData::Levels
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(Ddpm::new(self.clone(), vb)?))
    }
}

/// A DDPM on the shared UNet.
pub struct Ddpm {
    cfg: DdpmConfig,
    net: Denoiser,
    schedule: NoiseSchedule,
    device: Device,
}

impl Ddpm {
    pub fn new(cfg: DdpmConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let device = vb.device().clone();
        let net = Denoiser::new(cfg.image_shape, &cfg.unet, cfg.num_classes, vb)?;
        let schedule = NoiseSchedule::new(&cfg.schedule)?;
        Ok(Self {
            cfg,
            net,
            schedule,
            device,
        })
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The raw network output at integer steps `t` (one per sample).
    pub fn predict(
        &self,
        x_t: &Tensor,
        t: &[usize],
        labels: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        let t: Vec<f64> = t.iter().map(|&v| v as f64).collect();
        self.predict_at(x_t, &t, labels, w)
    }

    /// The raw network output at (possibly fractional) times `t` on the `0..T` scale.
    pub fn predict_at(
        &self,
        x_t: &Tensor,
        t: &[f64],
        labels: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        let tt: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let tt = gm_core::traffic::upload(tt, t.len(), x_t.device())?;
        self.net.guided(x_t, &tt, labels, w)
    }

    /// `−log p(y)` per image in nats on the 8-bit scale, by the probability-flow ODE of the VP
    /// SDE this model's linear schedule discretises, for pixels `x ∈ {0, 1/255, …, 1}`
    /// dequantised uniformly (`y = (k + u)/256`, as flow matching's data); with the ODE's
    /// network evaluations.
    pub fn ode_nll(
        &self,
        x: &Tensor,
        labels: Option<&Tensor>,
        o: &PfOdeConfig,
        rng: &mut GmRng,
    ) -> Result<(Tensor, usize)> {
        let s = &self.cfg.schedule;
        let sde = vp_of_linear_ddpm(s.timesteps, s.beta_start, s.beta_end);
        let steps = (s.timesteps - 1) as f64;
        let levels = (x * 255.0)?.round()?;
        let u = rng
            .uniform(x.shape(), 0.0, 1.0, x.device())?
            .to_dtype(x.dtype())?;
        let y = ((levels + u)? / 256.0)?;
        let xm = Denoiser::to_model(&y)?;
        let (logp, stats) =
            pf_ode_log_likelihood(&sde, &xm, o.t_min, &o.solver, o.divergence, rng, |x, t| {
                let (a, sd) = sde.marginal(t);
                let out = self.predict_at(x, &vec![t * steps; x.dim(0)?], labels, 1.0)?;
                let eps = match self.cfg.prediction {
                    Prediction::Epsilon => out,
                    Prediction::Sample => ((x - (out * a)?)? / sd)?,
                    Prediction::V => ((x * sd)? + (out * a)?)?,
                };
                eps / -sd
            })?;
        let d = y.elem_count() / y.dim(0)?;
        Ok((Denoiser::eight_bit_nll(&logp, d)?, stats.nfe))
    }

    fn random_steps(&self, b: usize, rng: &mut GmRng) -> Vec<usize> {
        let t = self.schedule.len() as u64;
        rng.per_sample_u64(b)
            .into_iter()
            .map(|r| (r % t) as usize)
            .collect()
    }

    /// Per-image weighted regression loss `(B,)` at random steps.
    fn per_image_loss(
        &self,
        x0: &Tensor,
        labels: Option<&Tensor>,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        let b = x0.dim(0)?;
        let t = self.random_steps(b, rng);
        let eps = rng.randn(x0.shape(), x0.device())?.to_dtype(x0.dtype())?;
        let x_t = q_sample(&self.schedule, x0, &t, &eps)?;
        let out = self.predict(&x_t, &t, labels, 1.0)?;
        let tgt = target(&self.schedule, self.cfg.prediction, x0, &eps, &t)?;
        let d = x0.elem_count() / b;
        let mse = (sum_per_sample(&(out - tgt)?.sqr()?)? / d as f64)?;
        let w = loss_weights(
            &self.schedule,
            self.cfg.loss_weighting,
            self.cfg.min_snr_gamma,
            self.cfg.prediction,
            &t,
            &mse,
        )?;
        mse * w
    }

    /// One bound term per image, `(B,)` nats, at per-image steps `t`: the decoder
    /// `−log p(x_0 | x_1)` where `t = 0`, else `KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t))`.
    fn bound_term(
        &self,
        x0: &Tensor,
        ts: &[usize],
        labels: Option<&Tensor>,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        let s = &self.schedule;
        let eps = rng.randn(x0.shape(), x0.device())?.to_dtype(x0.dtype())?;
        let x_t = q_sample(s, x0, ts, &eps)?;
        let out = self.predict(&x_t, ts, labels, 1.0)?;
        let (x0_hat, _) = split_prediction(s, self.cfg.prediction, &out, &x_t, ts)?;
        let x0_hat = x0_hat.clamp(-1.0, 1.0)?;
        let n = s.len();
        let post: Vec<(f64, f64, f64)> = (0..n).map(|t| s.posterior(t, t.checked_sub(1))).collect();
        let col = |f: &dyn Fn(usize) -> f64| -> Result<Tensor> {
            let v: Vec<f64> = (0..n).map(f).collect();
            per_sample(&v, ts, x0)?
                .broadcast_as(x0.shape())?
                .contiguous()
        };
        let cx0 = col(&|t| post[t].0)?;
        let cxt = col(&|t| post[t].1)?;
        let model_mean = ((&x0_hat * &cx0)? + (&x_t * &cxt)?)?;
        let lv_model = col(&|t| self.model_log_variance(t))?;
        // Decoder: a Gaussian on the 256 bins (its log-variance at t = 0 is the model's).
        let dec = sum_per_sample(&discretized_gaussian_log_likelihood(
            x0,
            &model_mean,
            &(&lv_model * 0.5)?,
        )?)?
        .neg()?;
        // KL between Gaussians (the posterior's variance at t = 0 is 0; those rows are masked).
        let true_mean = ((x0 * &cx0)? + (&x_t * &cxt)?)?;
        let lv_true = col(&|t| post[t].2.max(1e-20).ln())?;
        let kl = sum_per_sample(&normal_kl(&true_mean, &lv_true, &model_mean, &lv_model)?)?;
        let is_dec: Vec<u8> = ts.iter().map(|&t| u8::from(t == 0)).collect();
        let is_dec = gm_core::traffic::upload(is_dec, ts.len(), x0.device())?;
        is_dec.where_cond(&dec, &kl)
    }

    /// The reverse-process log-variance at step `t`: the posterior `β̃_t` (with `β̃_1` at
    /// `t = 0`, where `β̃_0 = 0`) or, with `sampler.large_variance`, `β_t`.
    fn model_log_variance(&self, t: usize) -> f64 {
        let s = &self.schedule;
        if self.cfg.sampler.large_variance {
            s.betas[t.max(1)].ln()
        } else {
            s.posterior(t.max(1), Some(t.max(1) - 1)).2.ln()
        }
    }

    /// `L_vlb` per image in nats `(B,)`: `L_T + Σ_{t ≥ 1} L_{t-1} + L_0`, the middle sum exact or
    /// estimated from `bound_timesteps` stratified steps.
    pub fn vlb(&self, x0: &Tensor, labels: Option<&Tensor>, rng: &mut GmRng) -> Result<Tensor> {
        let s = &self.schedule;
        let last = s.len() - 1;
        // L_T = KL(q(x_T | x_0) ‖ N(0, I)).
        let a = s.alphas_cumprod[last];
        let mean_t = (x0 * a.sqrt())?;
        let lv =
            Tensor::full((1.0 - a).ln() as f32, x0.shape(), x0.device())?.to_dtype(x0.dtype())?;
        let zeros = x0.zeros_like()?;
        let mut total = sum_per_sample(&normal_kl(&mean_t, &lv, &zeros, &zeros)?)?;
        let b = x0.dim(0)?;
        total = (total + self.bound_term(x0, &vec![0; b], labels, rng)?)?;
        let n = last; // steps 1..=last
        let k = if self.cfg.bound_timesteps == 0 {
            n
        } else {
            self.cfg.bound_timesteps.min(n)
        };
        for j in 0..k {
            // Stratum j covers steps [1 + j·n/k, 1 + (j+1)·n/k); each image draws its own step.
            let lo = j * n / k;
            let size = (j + 1) * n / k - lo;
            let ts: Vec<usize> = (0..b)
                .map(|_| 1 + lo + (rng.next_u64() % size as u64) as usize)
                .collect();
            let term = self.bound_term(x0, &ts, labels, rng)?.detach();
            total = (total + (term * size as f64)?)?;
        }
        Ok(total)
    }

    /// Samples `(n, C, H, W)` in `[0, 1]` with the configured sampler (labels: one per image).
    pub fn sample_with(
        &self,
        n: usize,
        labels: Option<&Tensor>,
        sampler: &SamplerConfig,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        let [c, h, w] = self.cfg.image_shape;
        Denoiser::chunked(n, labels, |k, labels| {
            let x_t = rng.randn((k, c, h, w), &self.device)?;
            self.sample_from(x_t, labels, sampler, rng)
        })
    }

    /// Runs `sampler` from the given `x_T ~ N(0, I)` `(n, C, H, W)`; images in `[0, 1]`.
    pub fn sample_from(
        &self,
        x_t: Tensor,
        labels: Option<&Tensor>,
        sampler: &SamplerConfig,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        let mut sm = sampler.build(&self.schedule, self.cfg.prediction)?;
        let k = x_t.dim(0)?;
        let x = sample_loop(sm.as_mut(), x_t, rng, |x, t| {
            self.predict_at(x, &vec![t; k], labels, sampler.guidance_scale)
        })?;
        Denoiser::to_pixels(&x)
    }
}

impl Model for Ddpm {
    fn kind(&self) -> &'static str {
        "ddpm"
    }

    fn gradient_checkpointing(&self) -> bool {
        true
    }

    fn loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        let x0 = Denoiser::to_model(&batch.x)?;
        let labels = self.net.train_labels(batch, self.cfg.label_dropout, rng)?;
        let l = self.per_image_loss(&x0, labels.as_ref(), rng)?.mean_all()?;
        Ok(Loss {
            total: l.clone(),
            parts: vec![("loss_simple", l)],
        })
    }

    fn eval_metrics(&self, batch: &Batch, rng: &mut GmRng, opts: &EvalOptions) -> Result<Metrics> {
        let x0 = Denoiser::to_model(&batch.x)?;
        let labels = self.net.eval_labels(batch)?;
        let mut m = vec![(
            "loss_simple".to_string(),
            self.per_image_loss(&x0, labels.as_ref(), rng)?,
        )];
        if opts.full {
            let vlb = self.vlb(&x0, labels.as_ref(), rng)?;
            let d = x0.elem_count() / x0.dim(0)?;
            let bpd = (&vlb / (d as f64 * std::f64::consts::LN_2))?;
            m.push(("vlb_nats".into(), vlb));
            m.push(("bpd_bound".into(), bpd));
            if let Some(o) = &self.cfg.ode_likelihood {
                let (nll, nfe) = self.ode_nll(&batch.x, labels.as_ref(), o, rng)?;
                let bpd = (&nll / (d as f64 * std::f64::consts::LN_2))?;
                let nfe = Tensor::full(nfe as f32, nll.dim(0)?, nll.device())?;
                m.push(("ode_nll_nats".into(), nll));
                m.push(("ode_bpd".into(), bpd));
                m.push(("ode_nfe".into(), nfe));
            }
        }
        Ok(m)
    }

    fn likelihood_estimate(&self) -> &'static str {
        "bound (variational)"
    }

    fn loss_units(&self) -> &'static str {
        "squared error of the predicted noise (per element)"
    }

    fn primary_metric(&self) -> &'static str {
        "loss_simple"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("vlb_nats")
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let labels = self.net.grid_labels(n, &self.device)?;
        Ok(Some(self.sample_with(
            n,
            labels.as_ref(),
            &self.cfg.sampler,
            rng,
        )?))
    }

    fn sample_labels(&self, labels: &[u32], rng: &mut GmRng) -> Result<Option<Tensor>> {
        match self.net.label_tensor(labels, &self.device)? {
            None => Ok(None),
            Some(y) => Ok(Some(self.sample_with(
                labels.len(),
                Some(&y),
                &self.cfg.sampler,
                rng,
            )?)),
        }
    }
}
