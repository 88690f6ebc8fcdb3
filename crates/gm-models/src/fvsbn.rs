//! Fully visible sigmoid belief network (Frey, 1998; seed 002's first autoregressive model): one
//! logistic regression per pixel on all previous pixels in raster order,
//! `p(x_d = 1 | x_<d) = σ(b_d + Σ_{j<d} W_dj x_j)`.
//!
//! One `D×D` weight with a strictly lower-triangular mask: `D(D+1)/2` effective parameters.
//! Parameter names: `linear.weight` `(D, D)` (its upper triangle and diagonal are never used),
//! `linear.bias` `(D,)`.

use crate::ar::{check_shape, sample_in_order, PixelOutput};
use crate::nn::Linear;
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use gm_core::kernels::ops::Act;
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FvsbnConfig {
    /// `[C, H, W]`; pixels are ordered by their flat index.
    pub image_shape: [usize; 3],
}

impl Default for FvsbnConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
        }
    }
}

impl FvsbnConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_shape(self.image_shape)
    }

    fn dims(&self) -> usize {
        self.image_shape.iter().product()
    }
}

impl crate::Family for FvsbnConfig {
    const KIND: &'static str = "fvsbn";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        FvsbnConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        crate::PixelData::Binary
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(Fvsbn::new(self.clone(), vb)?))
    }
}

#[derive(Clone, Debug)]
pub struct Fvsbn {
    cfg: FvsbnConfig,
    linear: Linear,
    /// `mask[d, j] = 1` iff `j < d`.
    mask: Tensor,
}

impl Fvsbn {
    pub fn new(cfg: FvsbnConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let d = cfg.dims();
        // A logistic regression per pixel: start from p = ½ everywhere (zero weights and biases).
        let zero = candle_nn::Init::Const(0.0);
        let linear = Linear::with_init(d, d, zero, zero, vb.pp("linear"))?;
        let m: Vec<f32> = (0..d * d).map(|k| f32::from(k % d < k / d)).collect();
        let mask = Tensor::from_vec(m, (d, d), vb.device())?.to_dtype(vb.dtype())?;
        Ok(Self { cfg, linear, mask })
    }

    /// Logits `(B, 1, D)` of every pixel given the previous ones.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let w = (self.linear.weight() * &self.mask)?;
        self.linear
            .forward_with_weight(&x.reshape((b, ()))?, &w, Act::Identity)?
            .unsqueeze(1)
    }
}

impl Model for Fvsbn {
    fn kind(&self) -> &'static str {
        "fvsbn"
    }

    fn loss(&self, batch: &Batch, _rng: &mut GmRng) -> Result<Loss> {
        let nll = PixelOutput::Bernoulli
            .nll(&self.logits(&batch.x)?, &batch.x)?
            .mean(0)?;
        Ok(Loss {
            total: nll.clone(),
            parts: vec![("nll", nll)],
        })
    }

    /// `nll_nats`: the exact `−log p(x)` per image.
    fn eval_metrics(&self, batch: &Batch, _rng: &mut GmRng, _o: &EvalOptions) -> Result<Metrics> {
        let nll = PixelOutput::Bernoulli.nll(&self.logits(&batch.x)?, &batch.x)?;
        Ok(vec![("nll_nats".into(), nll)])
    }

    fn primary_metric(&self) -> &'static str {
        "nll_nats"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_nats")
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let w = self.linear.weight();
        let order: Vec<usize> = (0..self.cfg.dims()).collect();
        let x = sample_in_order(
            self.cfg.image_shape,
            n,
            &order,
            PixelOutput::Bernoulli,
            w,
            rng,
            |x| self.logits(x),
        )?;
        Ok(Some(x))
    }
}
