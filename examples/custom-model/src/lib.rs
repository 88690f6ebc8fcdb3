//! A model family written outside gm: independent Bernoulli pixels (`p(x) = Π_i σ(θ_i)^x_i
//! (1 − σ(θ_i))^(1 − x_i)`, the baseline every binarised-MNIST likelihood is compared with).
//!
//! All it takes: a config type implementing [`gm::Family`], a model implementing [`gm::Model`],
//! and one `gm::register::<PixelsConfig>()` before configs are read. gm's trainer, checkpoints,
//! resume and evaluation then work for `[model] kind = "independent-bernoulli"` as for gm's own
//! families.

use gm::candle::{Result, Tensor};
use gm::candle_nn::{Init, VarBuilder};
use gm::{Batch, DataShape, EvalOptions, Family, GmRng, Loss, Metrics, Model, PixelData};
use serde::{Deserialize, Serialize};

/// `[model] kind = "independent-bernoulli"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PixelsConfig {
    pub image_shape: [usize; 3],
}

impl Family for PixelsConfig {
    const KIND: &'static str = "independent-bernoulli";

    fn data(&self) -> DataShape {
        DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        match self.image_shape.contains(&0) {
            true => Err("model.image_shape must have no zero size".into()),
            false => Ok(()),
        }
    }

    fn pixel_data(&self) -> PixelData {
        PixelData::Binary
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Model>> {
        let [c, h, w] = self.image_shape;
        let logits = vb.get_with_hints((c, h, w), "logits", Init::Const(0.0))?;
        Ok(Box::new(Pixels { logits }))
    }
}

/// One logit per pixel, shared by every image.
pub struct Pixels {
    logits: Tensor,
}

impl Pixels {
    /// `−log p(x)` in nats, `(B,)`.
    fn nll(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.logits.unsqueeze(0)?.broadcast_as(x.shape())?;
        gm::loss::bernoulli_nll(&logits, x)
    }
}

impl Model for Pixels {
    fn kind(&self) -> &'static str {
        PixelsConfig::KIND
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

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let p = gm::candle_nn::ops::sigmoid(&self.logits)?;
        let p = p.unsqueeze(0)?.repeat((n, 1, 1, 1))?;
        Ok(Some(rng.bernoulli(&p)?))
    }
}
