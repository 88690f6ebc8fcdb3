//! An energy-based model trained by noise-contrastive estimation (Gutmann & Hyvärinen, 2010):
//! `p_θ(x) = exp(−E_θ(x) − c)` with the log-normaliser `c` a learned scalar (`log_z`), fitted by
//! telling data from `ν` times as many draws of a tractable noise density `q` with the logistic
//! loss on `G(x) = −E(x) − c − log q(x) − log ν`:
//!
//! `L = −E_data[log σ(G)] − ν·E_q[log σ(−G)]`,
//!
//! whose optimum is `p_θ = p_data` *with* `c` the true log-normaliser — no integral computed.
//!
//! Two noise densities:
//! - `noise = "gaussian"`: `N(0, noise_std² I)`, for vectors (`[D, 1, 1]`, the 2-D toys); the
//!   energy is an MLP.
//! - `noise = "flow"`: a trained RealNVP (`[model.flow]`, the flow's own keys) on uniformly
//!   dequantised pixels in `[0, 1]^D`, frozen, its weights taken from a realnvp run with
//!   `gm train --init-from RUN` and kept in the EBM's checkpoints under `noise_flow.` (the
//!   "flow contrastive" set-up: the noise is already close to the data, so the classifier learns
//!   fine differences). The energy of images is a convolutional network.
//!
//! With `residual = true` the energy is a correction of the noise, `E(x) = −log q(x) + g_θ(x)`,
//! with `g`'s last layer starting at zero: the model starts as the noise with `c = 0` exact, and
//! `G = −g − c − log ν` — the classifier learns the log density ratio itself.
//!
//! Evaluation reports `nll_nats = E(x) + c` (on the 8-bit scale for images, as the flows) and, in
//! full evaluations, an independent estimate of `log Z = log ∫exp(−E)` by annealed importance
//! sampling from the noise to the model ([`gm_core::mcmc::ais`]) with its standard error, and
//! `nll_ais_nats = E(x) + log Z_AIS`: how far the learned `c` is from the truth. With the flow
//! noise, images also get `noise_nll_nats`, the flow's own `−log q(x)`. Sampling: MALA on the
//! energy started from the noise. With the flow, MALA and AIS run in the flow's latent space
//! `x = f⁻¹(z)`, where the model's density is `N(z; 0, I)·exp(−E(x) − log q(x))` up to `Z`
//! (the flow's Jacobian cancels against `q`): the same chains on `x`, better conditioned, and
//! never outside the flow's support.
//!
//! The flow's density lives on the box `(−α/(1 − 2α), (1 − α)/(1 − 2α))^D` of its logit
//! pre-processing, which holds the data's `[0, 1]^D`; so do the noise draws (unclamped: clamping
//! would put mass on the edges) and the EBM, whose density then integrates to at most 1 over
//! `[0, 1]^D`: its bits/dim, like the flow's, bound the dequantised data's from above.

use crate::flow::eight_bit_offset;
use crate::nn::{Conv2d, Linear};
use crate::realnvp::{RealNvp, RealNvpConfig};
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use gm_core::dist::softplus;
use gm_core::kernels::conv::Conv2dParams;
use gm_core::kernels::ops::Act;
use gm_core::mcmc::{ais, mala_step};
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

/// Where the flow noise's weights live in an EBM's variables and checkpoints.
pub const NOISE_FLOW_PREFIX: &str = "noise_flow.";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EbmConfig {
    /// `[D, 1, 1]` vectors, or `[C, H, W]` images (with `noise = "flow"`).
    pub image_shape: [usize; 3],
    /// Hidden widths of the energy MLP (SiLU); for images, of the MLP after the convolutions.
    pub hidden: Vec<usize>,
    /// Images: channels of the energy's 3×3 stride-2 convolutions (SiLU), one per entry.
    pub channels: Vec<usize>,
    /// The noise density: `"gaussian"` or `"flow"`.
    pub noise: String,
    /// The Gaussian noise `N(0, noise_std² I)`.
    pub noise_std: f64,
    /// The flow noise (`noise = "flow"`): a RealNVP with the keys of its own run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow: Option<RealNvpConfig>,
    /// `E = −log q + g`: the energy network learns a correction of the noise.
    pub residual: bool,
    /// Noise draws per data point (`ν`).
    pub noise_ratio: usize,
    /// MALA steps of sampling, started from the noise.
    pub sample_steps: usize,
    /// MALA's step size (sampling and AIS; in the flow's latent space with the flow noise).
    pub mcmc_step: f64,
    /// AIS: bridge levels, chains, MALA steps per level.
    pub ais_levels: usize,
    pub ais_chains: usize,
    pub ais_steps: usize,
}

impl Default for EbmConfig {
    fn default() -> Self {
        Self {
            image_shape: [2, 1, 1],
            hidden: vec![128, 128, 128],
            channels: vec![32, 64],
            noise: "gaussian".into(),
            noise_std: 2.0,
            flow: None,
            residual: false,
            noise_ratio: 4,
            sample_steps: 500,
            mcmc_step: 0.01,
            ais_levels: 500,
            ais_chains: 1000,
            ais_steps: 1,
        }
    }
}

impl EbmConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let [d, h, w] = self.image_shape;
        if d == 0 || h == 0 || w == 0 {
            return Err(format!(
                "model.image_shape must be positive, got {:?}",
                self.image_shape
            ));
        }
        match (self.noise.as_str(), &self.flow) {
            ("gaussian", _) if !self.is_vector() => {
                return Err(format!(
                    "model.noise = \"gaussian\" takes vectors [D, 1, 1]; images {:?} need noise = \"flow\" with a [model.flow] table (a trained RealNVP)",
                    self.image_shape
                ))
            }
            ("gaussian", Some(_)) => {
                return Err("model.flow is set but model.noise = \"gaussian\": set noise = \"flow\" or remove [model.flow]".into())
            }
            ("gaussian", None) => {}
            ("flow", None) => {
                return Err("model.noise = \"flow\" needs a [model.flow] table: the RealNVP keys of the run given to --init-from".into())
            }
            ("flow", Some(f)) => {
                f.validate().map_err(|e| e.replace("model.", "model.flow."))?;
                if f.image_shape != self.image_shape {
                    return Err(format!(
                        "model.flow.image_shape {:?} differs from model.image_shape {:?}",
                        f.image_shape, self.image_shape
                    ));
                }
            }
            (other, _) => {
                return Err(format!(
                    "model.noise = \"{other}\": expected \"gaussian\" or \"flow\""
                ))
            }
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return Err(format!(
                "model.hidden must be non-empty and positive, got {:?}",
                self.hidden
            ));
        }
        if !self.is_vector() && (self.channels.is_empty() || self.channels.contains(&0)) {
            return Err(format!(
                "model.channels must be non-empty and positive for images, got {:?}",
                self.channels
            ));
        }
        for (k, v) in [("noise_std", self.noise_std), ("mcmc_step", self.mcmc_step)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("model.{k} must be > 0, got {v}"));
            }
        }
        for (k, v) in [
            ("noise_ratio", self.noise_ratio),
            ("ais_levels", self.ais_levels),
            ("ais_chains", self.ais_chains),
        ] {
            if v == 0 {
                return Err(format!("model.{k} must be >= 1"));
            }
        }
        Ok(())
    }

    /// `[D, 1, 1]`.
    pub fn is_vector(&self) -> bool {
        self.image_shape[1] == 1 && self.image_shape[2] == 1
    }

    fn dims(&self) -> usize {
        self.image_shape.iter().product()
    }
}

impl crate::Family for EbmConfig {
    const KIND: &'static str = "ebm-nce";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        EbmConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        match self.is_vector() {
            true => crate::PixelData::Any,
            false => crate::PixelData::Dequantized,
        }
    }

    fn embeds(&self) -> Option<crate::Embedded> {
        self.flow.as_ref().map(|f| crate::Embedded {
            config: crate::ModelConfig::new(f.clone()),
            prefix: NOISE_FLOW_PREFIX,
            key: "model.flow",
        })
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(Ebm::new(self.clone(), vb)?))
    }
}

pub struct Ebm {
    cfg: EbmConfig,
    convs: Vec<Conv2d>,
    layers: Vec<Linear>,
    log_z: Tensor,
    flow: Option<RealNvp>,
    device: Device,
}

impl Ebm {
    pub fn new(cfg: EbmConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let [c, mut h, mut w] = cfg.image_shape;
        let mut convs = Vec::new();
        let mut features = cfg.dims();
        if !cfg.is_vector() {
            let p = Conv2dParams::default().stride(2).padding(1);
            let mut c_in = c;
            for (i, &ch) in cfg.channels.iter().enumerate() {
                let vbi = vb.pp(format!("features.{}", 2 * i));
                convs.push(Conv2d::new(c_in, ch, [3, 3], p, true, vbi)?);
                (c_in, h, w) = (ch, h.div_ceil(2), w.div_ceil(2));
            }
            features = c_in * h * w;
        }
        let mut dims = vec![features];
        dims.extend_from_slice(&cfg.hidden);
        dims.push(1);
        let n = dims.len() - 1;
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, d)| {
                let vbi = vb.pp(format!("energy.{}", 2 * i));
                match cfg.residual && i + 1 == n {
                    // g starts at 0: the model starts as the noise.
                    true => Linear::with_init(d[0], d[1], Init::Const(0.0), Init::Const(0.0), vbi),
                    false => Linear::new(d[0], d[1], vbi),
                }
            })
            .collect::<Result<_>>()?;
        // c starts at 0: right for a residual model, moved by the NCE loss in every case.
        let log_z = vb.get_with_hints(1, "log_z", Init::Const(0.0))?;
        let flow = match &cfg.flow {
            Some(f) => Some(RealNvp::new(f.clone(), vb.pp("noise_flow"))?),
            None => None,
        };
        Ok(Self {
            device: vb.device().clone(),
            cfg,
            convs,
            layers,
            log_z,
            flow,
        })
    }

    /// The energy network's output per sample `(B,)`: `E` itself, or `g` of a residual model.
    pub fn net(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        if !self.convs.is_empty() {
            h = h.affine(2.0, -1.0)?;
            for c in &self.convs {
                h = c.forward_act(&h, Act::Identity)?.silu()?;
            }
        }
        h = h.flatten_from(1)?;
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward_act(&h, Act::Identity)?;
            if i + 1 < n {
                h = h.silu()?;
            }
        }
        h.squeeze(1)
    }

    /// The energy `E(x)` per sample `(B,)`.
    pub fn energy(&self, x: &Tensor) -> Result<Tensor> {
        self.energy_given(x, None)
    }

    /// [`Ebm::energy`] with `log q(x)` given when already computed.
    fn energy_given(&self, x: &Tensor, log_q: Option<&Tensor>) -> Result<Tensor> {
        let e = self.net(x)?;
        match (self.cfg.residual, log_q) {
            (true, Some(lq)) => e - lq,
            (true, None) => e - self.noise_log_prob(x)?,
            (false, _) => Ok(e),
        }
    }

    /// `−E(x) − log q(x)` per sample: the log density ratio of the model to the noise, up to `c`,
    /// with `log q(x)` from `log_q` when given (the flow's inverse pass, or a detached value). A
    /// residual model's ratio is `−g(x)`, with no call to the noise density.
    pub fn log_ratio(&self, x: &Tensor, log_q: Option<&Tensor>) -> Result<Tensor> {
        let r = self.net(x)?.neg()?;
        match (self.cfg.residual, log_q) {
            (true, _) => Ok(r),
            (false, Some(lq)) => r - lq,
            (false, None) => r - self.noise_log_prob(x)?,
        }
    }

    /// The learned log-normaliser `c`.
    pub fn log_z(&self) -> Result<f64> {
        self.log_z
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()
    }

    /// The noise flow, when `noise = "flow"`.
    pub fn noise_flow(&self) -> Option<&RealNvp> {
        self.flow.as_ref()
    }

    /// `log q(x)` of the noise per sample `(B,)`.
    pub fn noise_log_prob(&self, x: &Tensor) -> Result<Tensor> {
        match &self.flow {
            Some(f) => f.log_prob(x),
            None => gm_core::cnf::normal_log_prob(x, self.cfg.noise_std),
        }
    }

    /// `n` draws of the noise with their `log q` (the flow's from its inverse pass), detached.
    fn noise(&self, n: usize, dtype: DType, rng: &mut GmRng) -> Result<(Tensor, Tensor)> {
        let (y, lq) = match &self.flow {
            // The density q itself: base temperature 1 whatever the flow's sampling
            // temperature, and not clamped to [0, 1] (clamping would put mass on the edges).
            Some(_) => {
                let z = self.chain_start(n, rng)?;
                self.to_x_with_log_q(&z)?
            }
            None => {
                let [d, h, w] = self.cfg.image_shape;
                let y = (rng.randn((n, d, h, w), &self.device)? * self.cfg.noise_std)?;
                let lq = self.noise_log_prob(&y)?;
                (y, lq)
            }
        };
        Ok((y.to_dtype(dtype)?.detach(), lq.to_dtype(dtype)?.detach()))
    }

    /// The NCE loss per data point `(B,)`: its data term plus `ν` times the mean of its noise
    /// draws' term.
    pub fn nce_loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.nce_loss_given(x, None, y, None)
    }

    /// [`Ebm::nce_loss`] with `log q` of the data and of the noise draws when known (from the
    /// flow's inverse, or computed once for an evaluation batch).
    fn nce_loss_given(
        &self,
        x: &Tensor,
        log_q_x: Option<&Tensor>,
        y: &Tensor,
        log_q_y: Option<&Tensor>,
    ) -> Result<Tensor> {
        let nu = self.cfg.noise_ratio;
        let b = x.dim(0)?;
        let ln_nu = (nu as f64).ln();
        // The noise is frozen: its density enters the loss as a constant.
        let frozen = |u: &Tensor, lq: Option<&Tensor>| -> Result<Option<Tensor>> {
            Ok(match (self.cfg.residual, lq) {
                (true, _) => None,
                (false, Some(lq)) => Some(lq.detach()),
                (false, None) => Some(self.noise_log_prob(u)?.detach()),
            })
        };
        let g = |u: &Tensor, lq: Option<&Tensor>| -> Result<Tensor> {
            let r = self.log_ratio(u, frozen(u, lq)?.as_ref())?;
            let c = self.log_z.to_dtype(r.dtype())?;
            r.broadcast_sub(&c)? - ln_nu
        };
        let data = softplus(&g(x, log_q_x)?.neg()?)?;
        let noise = softplus(&g(y, log_q_y)?)?.reshape((b, nu))?.sum(1)?;
        data + noise
    }

    /// What moves a density of pixels in `[0, 1]^D` onto the 8-bit scale (0 for vectors).
    fn offset(&self) -> f64 {
        match self.cfg.is_vector() {
            true => 0.0,
            false => eight_bit_offset(self.cfg.dims()),
        }
    }

    /// The chains' space: `x` itself with the Gaussian noise; the flow's latent `z` (flattened,
    /// `(B, D)`) with the flow, `x = f⁻¹(z)`.
    fn to_x(&self, z: &Tensor) -> Result<Tensor> {
        match &self.flow {
            Some(f) => f.inverse_to_pixels(&self.latents(f, z)?),
            None => Ok(z.clone()),
        }
    }

    /// With the flow: `(x = f⁻¹(z), log q(x))` from the latent, through the inverse alone.
    fn to_x_with_log_q(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.flow {
            Some(f) => f.inverse_to_pixels_with_log_prob(&self.latents(f, z)?),
            None => Ok((z.clone(), self.noise_log_prob(z)?)),
        }
    }

    /// The flow's latents from their flattened concatenation `(B, D)`.
    fn latents(&self, f: &RealNvp, z: &Tensor) -> Result<Vec<Tensor>> {
        let n = z.dim(0)?;
        let mut at = 0;
        let mut zs = Vec::new();
        for &[c, h, w] in f.latent_shapes() {
            zs.push(z.narrow(1, at, c * h * w)?.reshape((n, c, h, w))?);
            at += c * h * w;
        }
        Ok(zs)
    }

    /// Starting states of chains: draws of the noise in the chains' space.
    fn chain_start(&self, n: usize, rng: &mut GmRng) -> Result<Tensor> {
        match &self.flow {
            Some(_) => rng.randn((n, self.cfg.dims()), &self.device),
            None => Ok(self.noise(n, DType::F32, rng)?.0),
        }
    }

    /// The noise's log-density in the chains' space.
    fn chain_noise_log_prob(&self, u: &Tensor) -> Result<Tensor> {
        match &self.flow {
            Some(_) => gm_core::cnf::normal_log_prob(u, 1.0),
            None => self.noise_log_prob(u),
        }
    }

    /// The model's unnormalised log-density in the chains' space: `−E(x)`, or with the flow
    /// `log N(z) − E(x) − log q(x)` (the Jacobian of `x = f⁻¹(z)` is `N(z) / q(x)`).
    fn chain_log_density(&self, u: &Tensor) -> Result<Tensor> {
        match (&self.flow, self.cfg.residual) {
            (Some(_), true) => {
                self.chain_noise_log_prob(u)? + self.log_ratio(&self.to_x(u)?, None)?
            }
            (Some(_), false) => {
                let (x, lq) = self.to_x_with_log_q(u)?;
                self.chain_noise_log_prob(u)? + self.log_ratio(&x, Some(&lq))?
            }
            (None, _) => self.energy(u)?.neg(),
        }
    }

    /// MALA on the model from `n` noise draws (in the flow's latent space with the flow noise).
    pub fn sample_mcmc(&self, n: usize, steps: usize, rng: &mut GmRng) -> Result<Tensor> {
        let mut u = self.chain_start(n, rng)?;
        let mut f = |v: &Tensor| self.chain_log_density(v);
        for _ in 0..steps {
            u = mala_step(&mut f, &u, self.cfg.mcmc_step, rng)?.0;
        }
        let x = self.to_x(&u)?.detach();
        match self.flow.is_some() {
            // Images to show: the flow's support is a little wider than [0, 1].
            true => x.clamp(0.0, 1.0),
            false => Ok(x),
        }
    }

    /// `log Z` by AIS from the noise: `(estimate, standard error, acceptance)`.
    pub fn ais_log_z(&self, rng: &mut GmRng) -> Result<(f64, f64, f64)> {
        let u0 = self.chain_start(self.cfg.ais_chains, rng)?;
        let r = ais(
            |u| self.chain_noise_log_prob(u),
            |u| self.chain_log_density(u),
            u0,
            self.cfg.ais_levels,
            self.cfg.ais_steps,
            self.cfg.mcmc_step,
            rng,
        )?;
        Ok((r.log_z, r.se, r.acceptance))
    }
}

impl Model for Ebm {
    fn kind(&self) -> &'static str {
        "ebm-nce"
    }

    fn loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        let b = batch.x.dim(0)?;
        let (y, lq) = self.noise(b * self.cfg.noise_ratio, batch.x.dtype(), rng)?;
        let l = self
            .nce_loss_given(&batch.x, None, &y, Some(&lq))?
            .mean_all()?;
        let c = self.log_z.sum_all()?.detach();
        Ok(Loss {
            total: l.clone(),
            parts: vec![("nce_loss", l), ("log_z", c)],
        })
    }

    /// `nce_loss`, `nll_nats = E + c`, `log_z` (the learned `c`), with the flow noise
    /// `noise_nll_nats` (`−log q`); in full evaluations AIS's `log_z_ais` with `log_z_ais_se`, and
    /// `nll_ais_nats = E + log Z_AIS`. Images' likelihoods are on the 8-bit scale.
    fn eval_metrics(&self, batch: &Batch, rng: &mut GmRng, opts: &EvalOptions) -> Result<Metrics> {
        let x = &batch.x;
        let b = x.dim(0)?;
        let (y, lq) = self.noise(b * self.cfg.noise_ratio, x.dtype(), rng)?;
        // The noise's density of the batch, once: the energy, the loss and noise_nll_nats read it.
        let lq_x = self.noise_log_prob(x)?;
        let e = self.energy_given(x, Some(&lq_x))?;
        let off = self.offset();
        let full = |v: f64| Tensor::full(v as f32, b, x.device());
        let mut m = vec![
            (
                "nce_loss".to_string(),
                self.nce_loss_given(x, Some(&lq_x), &y, Some(&lq))?,
            ),
            ("nll_nats".to_string(), (&e + (self.log_z()? + off))?),
            ("log_z".to_string(), full(self.log_z()?)?),
        ];
        if self.flow.is_some() {
            m.push(("noise_nll_nats".into(), lq_x.affine(-1.0, off)?));
        }
        if opts.full {
            let (lz, se, acc) = self.ais_log_z(rng)?;
            m.push(("nll_ais_nats".into(), (&e + (lz + off))?));
            m.push(("log_z_ais".into(), full(lz)?));
            m.push(("log_z_ais_se".into(), full(se)?));
            m.push(("ais_acceptance".into(), full(acc)?));
        }
        Ok(m)
    }

    fn likelihood_estimate(&self) -> &'static str {
        "learned normaliser"
    }

    fn loss_units(&self) -> &'static str {
        "NCE logistic loss, nats per data point"
    }

    fn primary_metric(&self) -> &'static str {
        "nce_loss"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_nats")
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        Ok(Some(self.sample_mcmc(n, self.cfg.sample_steps, rng)?))
    }
}
