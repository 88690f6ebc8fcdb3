//! An energy-based model trained by noise-contrastive estimation (Gutmann & Hyvärinen, 2010):
//! `p_θ(x) = exp(−E_θ(x) − c)` with the log-normaliser `c` a learned scalar (`log_z`), fitted by
//! telling data from `ν` times as many draws of a tractable noise density `q` with the logistic
//! loss on `G(x) = −E(x) − c − log q(x) − log ν`:
//!
//! `L = −E_data[log σ(G)] − ν·E_q[log σ(−G)]`,
//!
//! whose optimum is `p_θ = p_data` *with* `c` the true log-normaliser — no integral computed. So
//! far on vectors (`[D, 1, 1]`, the 2-D toys) with Gaussian noise `N(0, noise_std² I)`.
//!
//! Evaluation reports `nll_nats = E(x) + c` and, in full evaluations, an independent estimate of
//! `log Z = log ∫exp(−E)` by annealed importance sampling from the noise to the model
//! ([`gm_core::mcmc::ais`]) with its standard error, and `nll_ais_nats = E(x) + log Z_AIS`: how
//! far the learned `c` is from the truth. Sampling: MALA on the energy, started from the noise.

use crate::nn::Linear;
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use gm_core::dist::softplus;
use gm_core::kernels::ops::Act;
use gm_core::mcmc::{ais, mala_step};
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EbmConfig {
    /// `[D, 1, 1]` vectors.
    pub image_shape: [usize; 3],
    /// Hidden widths of the energy MLP (SiLU).
    pub hidden: Vec<usize>,
    /// The noise density `N(0, noise_std² I)`.
    pub noise_std: f64,
    /// Noise draws per data point (`ν`).
    pub noise_ratio: usize,
    /// MALA steps of sampling, started from the noise.
    pub sample_steps: usize,
    /// MALA's step size (sampling and AIS).
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
            noise_std: 2.0,
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
        if d == 0 || h != 1 || w != 1 {
            return Err(format!(
                "model.image_shape: an ebm-nce model takes vectors [D, 1, 1] so far, got {:?}",
                self.image_shape
            ));
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return Err(format!(
                "model.hidden must be non-empty and positive, got {:?}",
                self.hidden
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

    fn dims(&self) -> usize {
        self.image_shape[0]
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

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(Ebm::new(self.clone(), vb)?))
    }
}

pub struct Ebm {
    cfg: EbmConfig,
    layers: Vec<Linear>,
    log_z: Tensor,
    device: Device,
}

impl Ebm {
    pub fn new(cfg: EbmConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let mut dims = vec![cfg.dims()];
        dims.extend_from_slice(&cfg.hidden);
        dims.push(1);
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(w[0], w[1], vb.pp(format!("energy.{}", 2 * i))))
            .collect::<Result<_>>()?;
        // c starts at 0; the NCE loss moves it to the energy's log-normaliser.
        let log_z = vb.get_with_hints(1, "log_z", Init::Const(0.0))?;
        Ok(Self {
            device: vb.device().clone(),
            cfg,
            layers,
            log_z,
        })
    }

    /// The energy `E(x)` per sample `(B,)`.
    pub fn energy(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.flatten_from(1)?;
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward_act(&h, Act::Identity)?;
            if i + 1 < n {
                h = h.silu()?;
            }
        }
        h.squeeze(1)
    }

    /// The learned log-normaliser `c`.
    pub fn log_z(&self) -> Result<f64> {
        self.log_z
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()
    }

    /// `log q(x)` of the noise per sample `(B,)`.
    pub fn noise_log_prob(&self, x: &Tensor) -> Result<Tensor> {
        gm_core::cnf::normal_log_prob(x, self.cfg.noise_std)
    }

    fn noise(&self, n: usize, dtype: DType, rng: &mut GmRng) -> Result<Tensor> {
        let [d, h, w] = self.cfg.image_shape;
        rng.randn((n, d, h, w), &self.device)?.to_dtype(dtype)? * self.cfg.noise_std
    }

    /// The NCE loss per data point `(B,)`: its data term plus `ν` times the mean of its noise
    /// draws' term.
    pub fn nce_loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let nu = self.cfg.noise_ratio;
        let b = x.dim(0)?;
        let ln_nu = (nu as f64).ln();
        let g = |u: &Tensor| -> Result<Tensor> {
            let e = self.energy(u)?;
            let c = self.log_z.to_dtype(e.dtype())?;
            ((e.neg()?.broadcast_sub(&c))? - self.noise_log_prob(u)?)? - ln_nu
        };
        let data = softplus(&g(x)?.neg()?)?;
        let noise = softplus(&g(y)?)?.reshape((b, nu))?.sum(1)?;
        data + noise
    }

    /// `−log p(x) = E(x) + c` per sample.
    pub fn nll(&self, x: &Tensor) -> Result<Tensor> {
        let e = self.energy(x)?;
        e.broadcast_add(&self.log_z.to_dtype(e.dtype())?)
    }

    /// MALA on `−E` from `n` noise draws.
    pub fn sample_mcmc(&self, n: usize, steps: usize, rng: &mut GmRng) -> Result<Tensor> {
        let mut x = self.noise(n, DType::F32, rng)?;
        let mut f = |u: &Tensor| self.energy(u)?.neg();
        for _ in 0..steps {
            x = mala_step(&mut f, &x, self.cfg.mcmc_step, rng)?.0;
        }
        Ok(x)
    }

    /// `log Z` by AIS from the noise: `(estimate, standard error, acceptance)`.
    pub fn ais_log_z(&self, rng: &mut GmRng) -> Result<(f64, f64, f64)> {
        let x0 = self.noise(self.cfg.ais_chains, DType::F32, rng)?;
        let r = ais(
            |u| self.noise_log_prob(u),
            |u| self.energy(u)?.neg(),
            x0,
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
        let y = self.noise(b * self.cfg.noise_ratio, batch.x.dtype(), rng)?;
        let l = self.nce_loss(&batch.x, &y)?.mean_all()?;
        let c = self.log_z.sum_all()?.detach();
        Ok(Loss {
            total: l.clone(),
            parts: vec![("nce_loss", l), ("log_z", c)],
        })
    }

    /// `nce_loss`, `nll_nats = E + c`, `log_z` (the learned `c`); in full evaluations AIS's
    /// `log_z_ais` with `log_z_ais_se`, and `nll_ais_nats = E + log Z_AIS`.
    fn eval_metrics(&self, batch: &Batch, rng: &mut GmRng, opts: &EvalOptions) -> Result<Metrics> {
        let x = &batch.x;
        let b = x.dim(0)?;
        let y = self.noise(b * self.cfg.noise_ratio, x.dtype(), rng)?;
        let nll = self.nll(x)?;
        let full = |v: f64| Tensor::full(v as f32, b, x.device());
        let mut m = vec![
            ("nce_loss".to_string(), self.nce_loss(x, &y)?),
            ("nll_nats".to_string(), nll.clone()),
            ("log_z".to_string(), full(self.log_z()?)?),
        ];
        if opts.full {
            let (lz, se, acc) = self.ais_log_z(rng)?;
            let e = self.energy(x)?;
            m.push(("nll_ais_nats".into(), (e + lz)?));
            m.push(("log_z_ais".into(), full(lz)?));
            m.push(("log_z_ais_se".into(), full(se)?));
            m.push(("ais_acceptance".into(), full(acc)?));
        }
        Ok(m)
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
