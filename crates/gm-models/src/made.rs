//! MADE: masked autoencoder for distribution estimation (Germain et al., 2015).
//!
//! An MLP whose weights are multiplied by binary masks so that output `d` depends only on the
//! inputs that come before `d` in an ordering: each unit gets a degree `m(k)`; a hidden unit may
//! read units of degree `≤ m(k)`, an output of degree `m(d)` only hidden units of degree `< m(d)`.
//!
//! With `num_masks > 1` the model trains over several connectivity patterns (and, with
//! `order_agnostic`, several input orderings), drawing one per step; evaluation averages the
//! probabilities of all of them, `p(x) = (1/K) Σ_k p_k(x)` — a mixture of exact autoregressive
//! models, hence still an exact likelihood. Masks are drawn from `mask_seed`, so the config alone
//! rebuilds them. Parameter names: `net.0`, `net.2`, … (PyTorch `Sequential` of masked linears).

use crate::ar::{check_shape, sample_in_order, PixelOutput};
use crate::nn::Linear;
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use gm_core::dist::log_mean_exp;
use gm_core::kernels::ops::Act;
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MadeConfig {
    pub image_shape: [usize; 3],
    /// Widths of the hidden layers.
    pub hidden: Vec<usize>,
    /// Connectivity patterns trained (and averaged at evaluation).
    pub num_masks: usize,
    /// Draw a fresh input ordering for every mask but the first (the first keeps raster order).
    pub order_agnostic: bool,
    /// Seed of the degrees and orderings.
    pub mask_seed: u64,
}

impl Default for MadeConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            hidden: vec![64],
            num_masks: 1,
            order_agnostic: false,
            mask_seed: 0,
        }
    }
}

impl MadeConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_shape(self.image_shape)?;
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return Err(format!(
                "model.hidden must be non-empty and positive, got {:?}",
                self.hidden
            ));
        }
        if self.num_masks == 0 {
            return Err("model.num_masks must be >= 1".into());
        }
        if self.dims() < 2 {
            return Err("model.image_shape: MADE needs at least 2 pixels".into());
        }
        Ok(())
    }

    fn dims(&self) -> usize {
        self.image_shape.iter().product()
    }
}

impl crate::Family for MadeConfig {
    const KIND: &'static str = "made";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        MadeConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        crate::PixelData::Binary
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(Made::new(self.clone(), vb)?))
    }
}

/// One connectivity pattern: the input ordering and a mask per layer (`(out, in)` like the weights).
#[derive(Clone, Debug)]
struct MaskSet {
    order: Vec<usize>,
    masks: Vec<Tensor>,
}

#[derive(Clone, Debug)]
pub struct Made {
    cfg: MadeConfig,
    layers: Vec<Linear>,
    sets: Vec<MaskSet>,
}

/// Degrees and masks of pattern `k`; `order[t]` is the pixel at position `t`.
fn degrees(cfg: &MadeConfig, k: usize, rng: &mut GmRng) -> (Vec<usize>, Vec<Vec<f32>>) {
    let d = cfg.dims();
    let order: Vec<usize> = if k > 0 && cfg.order_agnostic {
        rng.permutation(d)
    } else {
        (0..d).collect()
    };
    // m_in[pixel] = its position in the order, 1-based.
    let mut m_prev = vec![0usize; d];
    for (t, &p) in order.iter().enumerate() {
        m_prev[p] = t + 1;
    }
    let m_in = m_prev.clone();
    let mut masks = Vec::new();
    for &h in &cfg.hidden {
        let lo = m_prev.iter().copied().min().unwrap_or(1).min(d - 1);
        let m: Vec<usize> = (0..h)
            .map(|_| lo + (rng.next_u64() % (d - lo) as u64) as usize)
            .collect();
        masks.push(
            (0..h * m_prev.len())
                .map(|i| f32::from(m_prev[i % m_prev.len()] <= m[i / m_prev.len()]))
                .collect(),
        );
        m_prev = m;
    }
    let last = m_prev.len();
    masks.push(
        (0..d * last)
            .map(|i| f32::from(m_prev[i % last] < m_in[i / last]))
            .collect(),
    );
    (order, masks)
}

impl Made {
    pub fn new(cfg: MadeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let d = cfg.dims();
        let mut widths = vec![d];
        widths.extend(&cfg.hidden);
        widths.push(d);
        let net = vb.pp("net");
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(w[0], w[1], net.pp((2 * i).to_string())))
            .collect::<Result<Vec<_>>>()?;
        let mut rng = GmRng::new(cfg.mask_seed);
        let mut sets = Vec::new();
        for k in 0..cfg.num_masks {
            let (order, raw) = degrees(&cfg, k, &mut rng);
            let masks = raw
                .into_iter()
                .zip(widths.windows(2))
                .map(|(m, w)| Tensor::from_vec(m, (w[1], w[0]), vb.device())?.to_dtype(vb.dtype()))
                .collect::<Result<Vec<_>>>()?;
            sets.push(MaskSet { order, masks });
        }
        Ok(Self { cfg, layers, sets })
    }

    /// Logits `(B, 1, D)` under connectivity pattern `k`.
    pub fn logits(&self, x: &Tensor, k: usize) -> Result<Tensor> {
        let b = x.dim(0)?;
        let mut h = x.reshape((b, ()))?;
        let n = self.layers.len();
        for (i, (l, m)) in self.layers.iter().zip(&self.sets[k].masks).enumerate() {
            let act = if i + 1 < n { Act::Relu } else { Act::Identity };
            h = l.forward_with_weight(&h, &(l.weight() * m)?, act)?;
        }
        h.unsqueeze(1)
    }

    /// The ordering of pattern `k` (`order[t]` is the pixel generated at step `t`).
    pub fn order(&self, k: usize) -> &[usize] {
        &self.sets[k].order
    }

    /// `−log p(x)` per image, averaging the probabilities of every pattern.
    fn nll(&self, x: &Tensor) -> Result<Tensor> {
        let per: Vec<Tensor> = (0..self.sets.len())
            .map(|k| PixelOutput::Bernoulli.nll(&self.logits(x, k)?, x))
            .collect::<Result<_>>()?;
        if per.len() == 1 {
            return per[0].to_dtype(DType::F64);
        }
        let lp = Tensor::stack(&per, 0)?.to_dtype(DType::F64)?.neg()?;
        log_mean_exp(&lp, 0)?.neg()
    }
}

impl Model for Made {
    fn kind(&self) -> &'static str {
        "made"
    }

    fn loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        let k = if self.sets.len() > 1 {
            (rng.next_u64() % self.sets.len() as u64) as usize
        } else {
            0
        };
        let nll = PixelOutput::Bernoulli
            .nll(&self.logits(&batch.x, k)?, &batch.x)?
            .mean(0)?;
        Ok(Loss {
            total: nll.clone(),
            parts: vec![("nll", nll)],
        })
    }

    /// `nll_nats`: the exact `−log p(x)` per image (of the mixture over all patterns).
    fn eval_metrics(&self, batch: &Batch, _rng: &mut GmRng, _o: &EvalOptions) -> Result<Metrics> {
        Ok(vec![("nll_nats".into(), self.nll(&batch.x)?)])
    }

    fn primary_metric(&self) -> &'static str {
        "nll_nats"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_nats")
    }

    /// Samples from the mixture: each batch of images picks pattern `k` at random and follows
    /// its ordering.
    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let w = self.layers[0].weight();
        let k = (rng.next_u64() % self.sets.len() as u64) as usize;
        let x = sample_in_order(
            self.cfg.image_shape,
            n,
            &self.sets[k].order,
            PixelOutput::Bernoulli,
            w,
            rng,
            |x| self.logits(x, k),
        )?;
        Ok(Some(x))
    }
}
