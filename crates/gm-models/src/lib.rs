//! # gm-models
//!
//! gm's model families. Every model implements [`Model`]: it owns its loss (with named parts),
//! evaluates per-image metrics in the field's units, and samples. A model is described entirely
//! by its [`ModelConfig`], which is what checkpoints store, so a checkpoint alone rebuilds it.

pub mod ar;
pub mod classifier;
pub mod ddpm;
pub mod ffjord;
pub mod flow;
pub mod flow_matching;
pub mod fvsbn;
pub mod gan;
pub mod gated_pixelcnn;
pub mod made;
pub mod nn;
pub mod pixelcnn;
pub mod realnvp;
pub mod text;
pub mod unet;
pub mod vae;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

/// One batch of data as the models see it.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `(B, C, H, W)` f32 images, already pre-processed (binarised or dequantised in `[0, 1]`).
    pub x: Tensor,
    /// `(B,)` u32 class labels, where the data set has them.
    pub labels: Option<Tensor>,
}

/// A training objective: the scalar to minimise and its named parts (all batch means, nats).
#[derive(Clone, Debug)]
pub struct Loss {
    pub total: Tensor,
    pub parts: Vec<(&'static str, Tensor)>,
}

/// Options for evaluation-time estimators.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Importance samples per image for IWAE-style bounds.
    pub iwae_k: usize,
    /// Most (sample, image) pairs pushed through a decoder at once.
    pub max_pairs: usize,
    /// Run the expensive likelihood estimators (the diffusion bound, ODE likelihoods); training's
    /// periodic evaluations turn this off and report the cheap metrics only.
    pub full: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            iwae_k: 1000,
            max_pairs: 20_000,
            full: true,
        }
    }
}

/// Per-image metrics of one batch: `(name, (B,) tensor)`. Names end in their unit (`_nats`,
/// `_bits`) or are unit-less rates; the trainer averages them over the split.
pub type Metrics = Vec<(String, Tensor)>;

/// One optimiser of a model trained in alternating phases (a GAN's discriminator and generator):
/// it updates the parameters whose names start with `prefix`, at `lr_scale` times the run's
/// learning rate, `repeats` times per training step.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub prefix: &'static str,
    pub lr_scale: f64,
    pub repeats: usize,
}

/// What every gm model offers the trainer and the CLI.
pub trait Model {
    /// The `kind` string used in configs and checkpoints.
    fn kind(&self) -> &'static str;

    /// The training loss on one batch. Randomness (reparameterisation noise, …) comes from `rng`.
    fn loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss>;

    /// The optimisation phases of an adversarial model, in order; empty (the default) for models
    /// trained on one loss with one optimiser.
    fn phases(&self) -> Vec<Phase> {
        Vec::new()
    }

    /// The loss of phase `phase` (see [`Model::phases`]).
    fn phase_loss(&self, phase: usize, _batch: &Batch, _rng: &mut GmRng) -> Result<Loss> {
        candle_core::bail!("a '{}' model has no phase {phase}", self.kind())
    }

    /// Data-dependent initial values of parameters, by variable name (Glow's ActNorm
    /// initialisation), computed from a batch of training images. A fresh training run sets them
    /// before its first step; resumed runs and loaded checkpoints keep their saved values. The
    /// default asks for nothing.
    fn data_init(&self, _batch: &Batch) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// Per-image evaluation metrics.
    fn eval_metrics(&self, batch: &Batch, rng: &mut GmRng, opts: &EvalOptions) -> Result<Metrics>;

    /// The metric that selects the best checkpoint (lower is better), e.g. `elbo_nats`.
    fn primary_metric(&self) -> &'static str;

    /// The metric that best estimates `−log p(x)` in nats per image, from which `bits_per_dim`
    /// is derived; `None` for models that are not density models.
    fn likelihood_metric(&self) -> Option<&'static str>;

    /// `n` samples as `(n, C, H, W)` images in `[0, 1]`; `None` for models that do not sample.
    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>>;

    /// One sample per label `(len, C, H, W)` in `[0, 1]`, for class-conditional models; `None`
    /// for the others.
    fn sample_labels(&self, _labels: &[u32], _rng: &mut GmRng) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Reconstructions `(B, C, H, W)` in `[0, 1]`, for models that have them.
    fn reconstruct(&self, _batch: &Batch, _rng: &mut GmRng) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Penultimate features `(B, F)`, for models used as feature extractors (the FID classifier).
    fn features(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Class logits `(B, K)`, for classifiers.
    fn class_logits(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Every model gm can build, tagged by `kind` (TOML: `[model] kind = "vae"`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModelConfig {
    Vae(vae::VaeConfig),
    Classifier(classifier::ClassifierConfig),
    Fvsbn(fvsbn::FvsbnConfig),
    Made(made::MadeConfig),
    #[serde(rename = "pixelcnn")]
    PixelCnn(pixelcnn::PixelCnnConfig),
    #[serde(rename = "gated-pixelcnn")]
    GatedPixelCnn(gated_pixelcnn::GatedPixelCnnConfig),
    Ddpm(ddpm::DdpmConfig),
    FlowMatching(flow_matching::FlowMatchingConfig),
    #[serde(rename = "realnvp")]
    RealNvp(realnvp::RealNvpConfig),
    Cnf(ffjord::CnfConfig),
    Gan(gan::GanConfig),
    /// A language model on text (trained through `gm_train::text`, not the image trainer).
    TextAr(text::TextArConfig),
}

/// The pixel values a model is defined on, checked against the data pre-processing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelData {
    /// 0/1 pixels: `data.binarize` must be `dynamic` or `static`.
    Binary,
    /// The 256 grey levels as they are: no binarisation, no dequantisation.
    Levels,
    /// Uniformly dequantised grey levels (`data.dequantize = true`), for continuous densities.
    Dequantized,
    /// Whatever the pre-processing gives.
    Any,
}

impl ModelConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Vae(_) => "vae",
            Self::Classifier(_) => "classifier",
            Self::Fvsbn(_) => "fvsbn",
            Self::Made(_) => "made",
            Self::PixelCnn(_) => "pixelcnn",
            Self::GatedPixelCnn(_) => "gated-pixelcnn",
            Self::Ddpm(_) => "ddpm",
            Self::FlowMatching(_) => "flow-matching",
            Self::RealNvp(_) => "realnvp",
            Self::Cnf(_) => "cnf",
            Self::Gan(_) => "gan",
            Self::TextAr(_) => "text-ar",
        }
    }

    /// `[C, H, W]` of the images the model reads (`[1, 1, context]` for a text model).
    pub fn image_shape(&self) -> [usize; 3] {
        match self {
            Self::Vae(c) => c.image_shape,
            Self::Classifier(c) => c.image_shape,
            Self::Fvsbn(c) => c.image_shape,
            Self::Made(c) => c.image_shape,
            Self::PixelCnn(c) => c.image_shape,
            Self::GatedPixelCnn(c) => c.image_shape,
            Self::Ddpm(c) => c.image_shape,
            Self::FlowMatching(c) => c.image_shape,
            Self::RealNvp(c) => c.image_shape,
            Self::Cnf(c) => c.image_shape,
            Self::Gan(c) => c.image_shape,
            Self::TextAr(c) => [1, 1, c.context],
        }
    }

    /// Checks values a deserialiser cannot (zero sizes, negative weights); errors name the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            Self::Vae(c) => c.validate(),
            Self::Classifier(c) => c.validate(),
            Self::Fvsbn(c) => c.validate(),
            Self::Made(c) => c.validate(),
            Self::PixelCnn(c) => c.validate(),
            Self::GatedPixelCnn(c) => c.validate(),
            Self::Ddpm(c) => c.validate(),
            Self::FlowMatching(c) => c.validate(),
            Self::RealNvp(c) => c.validate(),
            Self::Cnf(c) => c.validate(),
            Self::Gan(c) => c.validate(),
            Self::TextAr(c) => c.validate(),
        }
    }

    /// Builds the model; its parameters are created through `vb` under PyTorch `state_dict` names.
    pub fn build(&self, vb: VarBuilder) -> Result<Box<dyn Model>> {
        Ok(match self {
            Self::Vae(c) => Box::new(vae::Vae::new(c.clone(), vb)?),
            Self::Classifier(c) => Box::new(classifier::Classifier::new(c.clone(), vb)?),
            Self::Fvsbn(c) => Box::new(fvsbn::Fvsbn::new(c.clone(), vb)?),
            Self::Made(c) => Box::new(made::Made::new(c.clone(), vb)?),
            Self::PixelCnn(c) => Box::new(pixelcnn::PixelCnn::new(c.clone(), vb)?),
            Self::GatedPixelCnn(c) => Box::new(gated_pixelcnn::GatedPixelCnn::new(c.clone(), vb)?),
            Self::Ddpm(c) => Box::new(ddpm::Ddpm::new(c.clone(), vb)?),
            Self::FlowMatching(c) => Box::new(flow_matching::FlowMatching::new(c.clone(), vb)?),
            Self::RealNvp(c) => Box::new(realnvp::RealNvp::new(c.clone(), vb)?),
            Self::Cnf(c) => Box::new(ffjord::Cnf::new(c.clone(), vb)?),
            Self::Gan(c) => Box::new(gan::Gan::new(c.clone(), vb)?),
            Self::TextAr(_) => candle_core::bail!(
                "a 'text-ar' model is not an image model: build it with text::TextAr::new"
            ),
        })
    }

    /// The pixel values the model is defined on.
    pub fn pixel_data(&self) -> PixelData {
        use ar::PixelOutput as P;
        match self {
            Self::Fvsbn(_) | Self::Made(_) => PixelData::Binary,
            Self::PixelCnn(c) if c.output == P::Bernoulli => PixelData::Binary,
            Self::GatedPixelCnn(c) if c.output == P::Bernoulli => PixelData::Binary,
            Self::PixelCnn(_) | Self::GatedPixelCnn(_) | Self::Ddpm(_) => PixelData::Levels,
            Self::FlowMatching(_) => PixelData::Dequantized,
            Self::RealNvp(c) if !c.is_vector() => PixelData::Dequantized,
            Self::Cnf(c) if !c.is_vector() => PixelData::Dequantized,
            Self::Gan(c) if !c.is_vector() => PixelData::Levels,
            _ => PixelData::Any,
        }
    }

    /// The number of classes of a class-conditional model or classifier; 0 for the others.
    pub fn num_classes(&self) -> usize {
        match self {
            Self::Classifier(c) => c.num_classes,
            Self::PixelCnn(c) => c.num_classes,
            Self::GatedPixelCnn(c) => c.num_classes,
            Self::Ddpm(c) => c.num_classes,
            Self::FlowMatching(c) => c.num_classes,
            Self::Gan(c) => c.num_classes,
            _ => 0,
        }
    }

    /// Labels the model needs in every batch (class-conditional models and classifiers).
    pub fn needs_labels(&self) -> bool {
        match self {
            Self::Classifier(_) => true,
            Self::PixelCnn(c) => c.num_classes > 0,
            Self::GatedPixelCnn(c) => c.num_classes > 0,
            Self::Ddpm(c) => c.num_classes > 0,
            Self::FlowMatching(c) => c.num_classes > 0,
            Self::Gan(c) => c.num_classes > 0,
            _ => false,
        }
    }
}
