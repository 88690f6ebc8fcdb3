//! A small convolutional MNIST classifier. gm trains it (`models/classifier-mnist.toml`) and uses
//! its penultimate features for `fid_mnist` and its predictions for mode coverage: a
//! Fréchet distance in *this* network's feature space, not Inception-FID, so numbers are
//! comparable between gm models but not with papers' FID.

use crate::nn::{Conv2d, Linear};
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use gm_core::kernels::conv::Conv2dParams;
use gm_core::kernels::ops::Act;
use gm_core::loss::categorical_nll;
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifierConfig {
    /// `[C, H, W]`, H and W divisible by 4.
    pub image_shape: [usize; 3],
    /// Channels of the two stride-2 5×5 convolutions.
    pub channels: [usize; 2],
    /// Width of the penultimate (feature) layer.
    pub features: usize,
    pub num_classes: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            channels: [8, 16],
            features: 32,
            num_classes: 10,
        }
    }
}

impl ClassifierConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let [c, h, w] = self.image_shape;
        if c == 0 || h % 4 != 0 || w % 4 != 0 || h == 0 || w == 0 {
            return Err(format!(
                "model.image_shape must be positive with H, W divisible by 4, got {:?}",
                self.image_shape
            ));
        }
        if self.channels.contains(&0) || self.features == 0 || self.num_classes < 2 {
            return Err(
                "model.channels and model.features must be > 0, model.num_classes >= 2".into(),
            );
        }
        Ok(())
    }
}

impl crate::Family for ClassifierConfig {
    const KIND: &'static str = "classifier";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        ClassifierConfig::validate(self)
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn needs_labels(&self) -> bool {
        true
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(Classifier::new(self.clone(), vb)?))
    }
}

/// `conv(5, s2) → ReLU → conv(5, s2) → ReLU → flatten → linear → ReLU (features) → linear`.
#[derive(Clone, Debug)]
pub struct Classifier {
    c1: Conv2d,
    c2: Conv2d,
    fc: Linear,
    head: Linear,
}

impl Classifier {
    pub fn new(cfg: ClassifierConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let [c, h, w] = cfg.image_shape;
        let conv = Conv2dParams::default().stride(2).padding(2);
        let [c1, c2] = cfg.channels;
        let v = vb.pp("net");
        Ok(Self {
            c1: Conv2d::new(c, c1, [5, 5], conv, true, v.pp("0"))?,
            c2: Conv2d::new(c1, c2, [5, 5], conv, true, v.pp("2"))?,
            fc: Linear::new(cfg.channels[1] * (h / 4) * (w / 4), cfg.features, v.pp("5"))?,
            head: Linear::new(cfg.features, cfg.num_classes, vb.pp("head"))?,
        })
    }

    fn feats(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c1.forward_act(x, Act::Relu)?; // (b, c1, h/2, w/2)
        let h = self.c2.forward_act(&h, Act::Relu)?; // (b, c2, h/4, w/4)
        self.fc.forward_act(&h.flatten_from(1)?, Act::Relu)
    }

    fn labels<'a>(&self, batch: &'a Batch) -> Result<&'a Tensor> {
        batch
            .labels
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("the classifier needs labelled data"))
    }
}

impl Model for Classifier {
    fn kind(&self) -> &'static str {
        "classifier"
    }

    fn loss(&self, batch: &Batch, _rng: &mut GmRng) -> Result<Loss> {
        let logits = self.head.forward(&self.feats(&batch.x)?)?;
        let nll = categorical_nll(&logits, self.labels(batch)?, 1)?.mean(0)?;
        Ok(Loss {
            total: nll.clone(),
            parts: vec![("nll", nll)],
        })
    }

    fn eval_metrics(&self, batch: &Batch, _rng: &mut GmRng, _o: &EvalOptions) -> Result<Metrics> {
        let y = self.labels(batch)?;
        let logits = self.head.forward(&self.feats(&batch.x)?)?;
        let nll = categorical_nll(&logits, y, 1)?.to_dtype(DType::F64)?;
        let wrong = logits
            .argmax(1)?
            .ne(&y.to_dtype(DType::U32)?)?
            .to_dtype(DType::F64)?;
        Ok(vec![("nll_nats".into(), nll), ("error_rate".into(), wrong)])
    }

    fn loss_units(&self) -> &'static str {
        "cross-entropy, nats per image"
    }

    fn primary_metric(&self) -> &'static str {
        "nll_nats"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        None
    }

    fn sample(&self, _n: usize, _rng: &mut GmRng) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn features(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.feats(x)?))
    }

    fn class_logits(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.head.forward(&self.feats(x)?)?))
    }
}
