//! The mixture of Bernoullis (seed 001's EM on digits): `K` prototype images of pixel
//! probabilities, `p(x) = Σ_k π_k Π_d μ_kd^x_d (1 − μ_kd)^(1 − x_d)`, with an exact likelihood.
//!
//! Two ways to fit it (`model.fit`):
//! - `"em"`: every training step is one EM iteration on its batch — the exact posterior over the
//!   component (E-step), then the closed-form M-step `π_k = N_k / B`,
//!   `μ_kd = (Σ_n r_nk x_nd + c) / (N_k + 2c)` (MAP under a `Beta(1 + c, 1 + c)` prior,
//!   `c = model.pseudo_count`). With the batch the whole training set (the presets) this is
//!   batch EM: the training log-likelihood never decreases.
//! - `"gradient"`: Adam on the exact negative log-likelihood. By Fisher's identity
//!   `∇ log p(x) = ∇_θ Q(θ, q = p(z | x, θ))`, so each step is a generalized-EM step (one gradient
//!   step on `Q` after the exact E-step), in the unconstrained parameters.
//!
//! The same model, in f64 on the host with the whole ladder (MCEM, generalized EM with
//! backtracking), is [`gm_core::ladder::BernoulliMixture`].
//!
//! Parameter names: `logits` `(K, D)` (`μ = σ(logits)`), `weight_logits` `(K,)`
//! (`π = softmax(weight_logits)`).

use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use gm_core::dist::softplus;
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

/// How a [`BernoulliMixture`] is fitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MixtureFit {
    /// One closed-form EM iteration per training step.
    #[default]
    Em,
    /// Adam on the exact negative log-likelihood (generalized EM).
    Gradient,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BernoulliMixtureConfig {
    pub image_shape: [usize; 3],
    /// The number of components `K`.
    pub components: usize,
    pub fit: MixtureFit,
    /// `c` of the `Beta(1 + c, 1 + c)` prior on every pixel probability (EM only; 0 is maximum
    /// likelihood, which lets a pixel never on in a component's images cost infinitely many nats
    /// on a test image where it is).
    pub pseudo_count: f64,
    /// Stepwise EM for mini-batches (Cappé & Moulines, 2009) when `α > 0`: the sufficient
    /// statistics are a running average, `s ← (1 − ρ_t) s + ρ_t ŝ(batch)` with
    /// `ρ_t = (t + 1)^(−α)`, `α ∈ (0.5, 1]`, and the M-step reads them. `0` is batch EM: each
    /// step's M-step reads its batch alone (right when the batch is the whole training set).
    pub em_step_decay: f64,
}

impl Default for BernoulliMixtureConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            components: 20,
            fit: MixtureFit::Em,
            pseudo_count: 1.0,
            em_step_decay: 0.0,
        }
    }
}

impl BernoulliMixtureConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        crate::ar::check_shape(self.image_shape)?;
        if self.components == 0 {
            return Err("model.components must be > 0".into());
        }
        if !self.pseudo_count.is_finite() || self.pseudo_count < 0.0 {
            return Err(format!(
                "model.pseudo_count must be >= 0, got {}",
                self.pseudo_count
            ));
        }
        let a = self.em_step_decay;
        if !(a == 0.0 || (a > 0.5 && a <= 1.0)) {
            return Err(format!(
                "model.em_step_decay must be 0 (batch EM) or in (0.5, 1] (stepwise EM), got {a}"
            ));
        }
        Ok(())
    }
}

impl crate::Family for BernoulliMixtureConfig {
    const KIND: &'static str = "bernoulli-mixture";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        BernoulliMixtureConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        crate::PixelData::Binary
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Model>> {
        Ok(Box::new(BernoulliMixture::new(self.clone(), vb)?))
    }
}

pub struct BernoulliMixture {
    cfg: BernoulliMixtureConfig,
    logits: Tensor,
    weight_logits: Tensor,
    /// Stepwise EM's state: steps taken `(1,)`, the running averages of the responsibilities
    /// `(K,)` and of `r_k · x` `(K, D)` per image (variables, so checkpoints keep them).
    stats: Option<[Tensor; 3]>,
}

impl BernoulliMixture {
    /// Equal weights; pixel probabilities drawn uniformly in `[0.25, 0.75]` (as logits).
    pub fn new(cfg: BernoulliMixtureConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let d: usize = cfg.image_shape.iter().product();
        let lo = (0.25f64 / 0.75).ln();
        let init = Init::Uniform { lo, up: -lo };
        let logits = vb.get_with_hints((cfg.components, d), "logits", init)?;
        let weight_logits = vb.get_with_hints(cfg.components, "weight_logits", Init::Const(0.0))?;
        let stats = match cfg.em_step_decay > 0.0 {
            true => {
                let s = vb.pp("em_stats");
                let zero = Init::Const(0.0);
                Some([
                    s.get_with_hints(1, "count", zero)?,
                    s.get_with_hints(cfg.components, "resp", zero)?,
                    s.get_with_hints((cfg.components, d), "on", zero)?,
                ])
            }
            false => None,
        };
        Ok(Self {
            cfg,
            logits,
            weight_logits,
            stats,
        })
    }

    /// `log π_k + log p(x_n | k)`, `(B, K)`: `x · logitsᵀ + Σ_d log(1 − μ_kd) + log π_k`.
    pub fn joint_log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.flatten_from(1)?.to_dtype(self.logits.dtype())?;
        // log(1 − σ(l)) = −softplus(l).
        let log1m = softplus(&self.logits)?.sum(1)?.neg()?; // (K,)
        let log_pi = candle_nn::ops::log_softmax(&self.weight_logits, 0)?;
        x.matmul(&self.logits.t()?)?
            .broadcast_add(&(log1m + log_pi)?.unsqueeze(0)?)
    }

    /// `−log p(x_n)` in nats, `(B,)`.
    pub fn nll(&self, x: &Tensor) -> Result<Tensor> {
        self.joint_log_prob(x)?.log_sum_exp(1)?.neg()
    }

    /// The component probabilities `(K, C, H, W)` (the prototypes), in `[0, 1]`.
    pub fn prototypes(&self) -> Result<Tensor> {
        let [c, h, w] = self.cfg.image_shape;
        candle_nn::ops::sigmoid(&self.logits)?.reshape((self.cfg.components, c, h, w))
    }

    /// The mixture weights `π`, `(K,)`.
    pub fn weights(&self) -> Result<Tensor> {
        candle_nn::ops::softmax(&self.weight_logits, 0)
    }
}

impl Model for BernoulliMixture {
    fn kind(&self) -> &'static str {
        "bernoulli-mixture"
    }

    fn loss(&self, batch: &Batch, _rng: &mut GmRng) -> Result<Loss> {
        Ok(Loss {
            total: self.nll(&batch.x)?.mean_all()?,
            parts: Vec::new(),
        })
    }

    fn eval_metrics(&self, batch: &Batch, _rng: &mut GmRng, _o: &EvalOptions) -> Result<Metrics> {
        Ok(vec![("nll_nats".into(), self.nll(&batch.x)?)])
    }

    fn primary_metric(&self) -> &'static str {
        "nll_nats"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_nats")
    }

    /// Ancestral sampling: a component from `π`, then its pixels.
    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let pi = self.weights()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        gm_core::traffic::record_readback(8 * pi.len());
        let z: Vec<u32> = (0..n)
            .map(|_| {
                let u = rng.uniform_f64();
                let mut acc = 0.0;
                pi.iter()
                    .position(|p| {
                        acc += p;
                        u < acc
                    })
                    .unwrap_or(pi.len() - 1) as u32
            })
            .collect();
        let z = gm_core::traffic::upload(z, n, self.logits.device())?;
        let p = self.prototypes()?.index_select(&z, 0)?;
        Ok(Some(rng.bernoulli(&p)?))
    }

    /// The prototypes `μ_k`, heaviest component first.
    fn components(&self) -> Result<Option<Tensor>> {
        let w = self.weights()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        gm_core::traffic::record_readback(8 * w.len());
        let mut order: Vec<u32> = (0..w.len() as u32).collect();
        order.sort_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]));
        let order = gm_core::traffic::upload(order, w.len(), self.logits.device())?;
        Ok(Some(self.prototypes()?.index_select(&order, 0)?))
    }

    /// With `fit = "em"`: the E-step on the batch and the closed-form M-step.
    fn closed_form_update(&self, batch: &Batch) -> Result<Option<Vec<(String, Tensor)>>> {
        if self.cfg.fit != MixtureFit::Em {
            return Ok(None);
        }
        let x = batch.x.flatten_from(1)?.to_dtype(DType::F32)?;
        let resp = candle_nn::ops::softmax(&self.joint_log_prob(&x)?.detach(), D::Minus1)?;
        let mut nk = resp.sum(0)?; // (K,)
        let c = self.cfg.pseudo_count;
        let mut sums = resp.t()?.matmul(&x)?; // (K, D)
        let b = x.dim(0)? as f64;
        let mut out = Vec::new();
        if let Some([count, s_n, s_x]) = &self.stats {
            // Stepwise EM: blend this batch's per-image statistics into the running averages,
            // then read them back at the batch's scale, so the prior weighs as in batch EM.
            let t = count.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
            gm_core::traffic::record_readback(4);
            let rho = (t + 1.0).powf(-self.cfg.em_step_decay);
            let s_n = ((s_n * (1.0 - rho))? + ((&nk / b)? * rho)?)?;
            let s_x = ((s_x * (1.0 - rho))? + ((&sums / b)? * rho)?)?;
            nk = (&s_n * b)?;
            sums = (&s_x * b)?;
            out.push(("em_stats.count".to_string(), (count + 1.0)?));
            out.push(("em_stats.resp".to_string(), s_n));
            out.push(("em_stats.on".to_string(), s_x));
        }
        let mu = (sums + c)?.broadcast_div(&(&nk + 2.0 * c)?.unsqueeze(1)?)?;
        // Keep the probabilities inside (0, 1) in f32: an empty component or c = 0 may touch the
        // ends, where the logit is infinite.
        let mu = mu.clamp(1e-6f32, 1.0 - 1e-6f32)?;
        let logits = (mu.log()? - mu.affine(-1.0, 1.0)?.log()?)?;
        let weight_logits = (nk / b)?.clamp(1e-30f32, 1.0f32)?.log()?;
        out.push(("logits".into(), logits));
        out.push(("weight_logits".into(), weight_logits));
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;
    use gm_core::ladder::{self, LatentMixture};
    use nalgebra::DMatrix;

    /// 50 binary 3×4 images and a mixture of 3 on them, as candle tensors and as the f64 host
    /// model of `gm_core::ladder`.
    fn setup(
        c: f64,
    ) -> (
        BernoulliMixture,
        VarMap,
        Tensor,
        ladder::BernoulliMixture,
        DMatrix<f64>,
    ) {
        let dev = Device::Cpu;
        let cfg = BernoulliMixtureConfig {
            image_shape: [1, 3, 4],
            components: 3,
            fit: MixtureFit::Em,
            pseudo_count: c,
            em_step_decay: 0.0,
        };
        let vm = VarMap::new();
        let vb = gm_core::rng::seeded_var_builder(&vm, 3, DType::F32, &dev);
        let m = BernoulliMixture::new(cfg, vb).unwrap();
        vm.data().lock().unwrap()["weight_logits"]
            .set(&Tensor::new(&[0.3f32, -0.2, 0.1], &dev).unwrap())
            .unwrap();
        let mut rng = GmRng::new(8);
        let xv: Vec<f32> = (0..50 * 12)
            .map(|i| f32::from(rng.uniform_f64() < 0.2 + 0.6 * ((i % 12) as f64 / 11.0)))
            .collect();
        let x = Tensor::from_vec(xv.clone(), (50, 1, 3, 4), &dev).unwrap();
        let probs = m.prototypes().unwrap().flatten_from(1).unwrap();
        let probs: Vec<f64> = probs
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let weights: Vec<f64> = m
            .weights()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let host =
            ladder::BernoulliMixture::new(weights, DMatrix::from_row_slice(3, 12, &probs), c)
                .unwrap();
        let hx = DMatrix::from_row_slice(50, 12, &xv.iter().map(|&v| v as f64).collect::<Vec<_>>());
        (m, vm, x, host, hx)
    }

    /// The likelihood and the EM update agree with the f64 host implementation.
    #[test]
    fn nll_and_em_update_match_the_host_ladder() {
        for c in [0.0, 0.5] {
            let (m, _vm, x, mut host, hx) = setup(c);
            let nll: Vec<f32> = m.nll(&x).unwrap().to_vec1().unwrap();
            let (ll, log_resp) = ladder::posterior(&host.joint_log_prob(&hx).unwrap());
            for (a, b) in nll.iter().zip(ll.iter()) {
                assert!((*a as f64 + b).abs() < 1e-4, "{a} vs {}", -b);
            }
            let batch = Batch { x, labels: None };
            let update = m.closed_form_update(&batch).unwrap().expect("fit = em");
            host.m_step(&hx, &log_resp.map(f64::exp)).unwrap();
            let get = |name: &str| -> Vec<f64> {
                let t = &update.iter().find(|(n, _)| n == name).unwrap().1;
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let probs: Vec<f64> = get("logits")
                .iter()
                .map(|l| 1.0 / (1.0 + (-l).exp()))
                .collect();
            let want: Vec<f64> = host.probs.transpose().iter().copied().collect(); // row-major
            for (a, b) in probs.iter().zip(&want) {
                // c = 0 can reach 0 or 1, which the update clamps to 1e-6 from the ends.
                assert!((a - b.clamp(1e-6, 1.0 - 1e-6)).abs() < 1e-5, "{a} vs {b}");
            }
            let wl = get("weight_logits");
            for (a, b) in wl.iter().zip(&host.weights) {
                assert!((a.exp() - b).abs() < 1e-6, "{} vs {b}", a.exp());
            }
        }
    }

    /// Stepwise EM: its first step is batch EM on that batch (ρ₀ = 1), and cycling through
    /// mini-batches it reaches the likelihood batch EM reaches on the whole set.
    #[test]
    fn stepwise_em_starts_as_batch_em_and_reaches_its_optimum() {
        let dev = Device::Cpu;
        let build = |decay: f64| {
            let cfg = BernoulliMixtureConfig {
                image_shape: [1, 3, 4],
                components: 3,
                fit: MixtureFit::Em,
                // Small: stepwise EM weighs the prior at its batch's scale (10 images here),
                // batch EM at the whole set's (50).
                pseudo_count: 0.01,
                em_step_decay: decay,
            };
            let vm = VarMap::new();
            let vb = gm_core::rng::seeded_var_builder(&vm, 3, DType::F32, &dev);
            (BernoulliMixture::new(cfg, vb).unwrap(), vm)
        };
        let (_, _, x, _, _) = setup(0.5);
        let all = Batch {
            x: x.clone(),
            labels: None,
        };
        let (batch_em, bvm) = build(0.0);
        let (stepwise, svm) = build(0.6);
        let first = |m: &BernoulliMixture| m.closed_form_update(&all).unwrap().unwrap();
        let (a, b) = (first(&batch_em), first(&stepwise));
        for name in ["logits", "weight_logits"] {
            let get = |u: &Vec<(String, Tensor)>| -> Vec<f32> {
                let t = &u.iter().find(|(n, _)| n == name).unwrap().1;
                t.flatten_all().unwrap().to_vec1().unwrap()
            };
            for (p, q) in get(&a).iter().zip(get(&b)) {
                assert!((p - q).abs() < 1e-5, "{name}: {p} vs {q}");
            }
        }
        let set = |vm: &VarMap, u: Vec<(String, Tensor)>| {
            for (name, value) in u {
                vm.data().lock().unwrap()[name.as_str()]
                    .set(&value)
                    .unwrap();
            }
        };
        for _ in 0..100 {
            set(&bvm, batch_em.closed_form_update(&all).unwrap().unwrap());
        }
        for step in 0..400 {
            let part = Batch {
                x: x.narrow(0, (step % 5) * 10, 10).unwrap(),
                labels: None,
            };
            set(&svm, stepwise.closed_form_update(&part).unwrap().unwrap());
        }
        let nll = |m: &BernoulliMixture| -> f32 {
            m.nll(&x).unwrap().mean_all().unwrap().to_scalar().unwrap()
        };
        let (full, step) = (nll(&batch_em), nll(&stepwise));
        assert!(
            (step - full).abs() < 0.005 * full,
            "batch EM {full} vs stepwise {step}"
        );
    }

    /// Batch EM through the updates never raises the (penalised) training NLL.
    #[test]
    fn em_steps_never_lower_the_penalised_likelihood() {
        let (m, vm, x, _, _) = setup(0.5);
        let batch = Batch { x, labels: None };
        let objective = |m: &BernoulliMixture| -> f64 {
            let nll = m
                .nll(&batch.x)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let p: Vec<f32> = m
                .prototypes()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let prior: f64 = p
                .iter()
                .map(|&p| 0.5 * ((p as f64).ln() + (1.0 - p as f64).ln()))
                .sum();
            nll - prior
        };
        let mut last = objective(&m);
        for _ in 0..20 {
            for (name, value) in m.closed_form_update(&batch).unwrap().unwrap() {
                vm.data().lock().unwrap()[name.as_str()]
                    .set(&value)
                    .unwrap();
            }
            let now = objective(&m);
            assert!(now <= last + 1e-3, "{last} -> {now}");
            last = now;
        }
    }
}
