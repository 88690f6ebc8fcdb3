//! # gm-models
//!
//! gm's model families. Every model implements [`Model`]: it owns its loss (with named parts),
//! evaluates per-image metrics in the field's units, and samples. A model is described entirely
//! by its [`ModelConfig`], which is what checkpoints store, so a checkpoint alone rebuilds it.

pub mod ar;
pub mod ar_cache;
pub mod bernoulli_mixture;
pub mod classifier;
pub mod ddpm;
pub mod ebm;
pub mod family;
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
pub mod score;
pub mod text;
pub mod unet;
pub mod vae;
pub mod vqvae;

use candle_core::{Result, Tensor};
use gm_core::GmRng;

pub use family::{kinds, register, DataShape, Embedded, Family, ModelConfig};

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

    /// How [`Model::likelihood_metric`] stands to `−log p(x)`: `exact`, a `bound` (an upper
    /// bound on it, named), `ODE` (the exact density of the flow an ODE solver integrates, its
    /// log-determinant by a trace estimate), or `learned normaliser` (an EBM's fitted `c`).
    fn likelihood_estimate(&self) -> &'static str {
        "exact"
    }

    /// Whether the network's blocks recompute their activations in the backward under
    /// [`gm_core::grad_checkpoint::Enabled`] (`train.gradient_checkpointing`): the UNet's residual
    /// and attention blocks, the PixelCNNs' layers. Other models keep every activation.
    fn gradient_checkpointing(&self) -> bool {
        false
    }

    /// What the training loss measures, in words with its units (the loss plot's axis).
    fn loss_units(&self) -> &'static str {
        "negative log-likelihood, nats per image"
    }

    /// `n` samples as `(n, C, H, W)` images in `[0, 1]`; `None` for models that do not sample.
    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>>;

    /// One sample per label `(len, C, H, W)` in `[0, 1]`, for class-conditional models; `None`
    /// for the others.
    fn sample_labels(&self, _labels: &[u32], _rng: &mut GmRng) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The images that describe a mixture's components `(K, C, H, W)` in `[0, 1]` (a mixture of
    /// Bernoullis' prototypes), for models that have them; training draws them beside the
    /// samples.
    fn components(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Reconstructions `(B, C, H, W)` in `[0, 1]`, for models that have them.
    fn reconstruct(&self, _batch: &Batch, _rng: &mut GmRng) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// New parameter values computed in closed form from a batch, which the trainer sets in place
    /// of a gradient step (an EM iteration: the exact E-step and the closed-form M-step); `None`
    /// (the default) for models trained by gradient.
    fn closed_form_update(&self, _batch: &Batch) -> Result<Option<Vec<(String, Tensor)>>> {
        Ok(None)
    }

    /// Values set after each optimizer step from that step's batch, beside the gradient step (a
    /// VQ-VAE's codebook, moved by exponential moving averages); `None` (the default) otherwise.
    fn after_step_update(&self, _batch: &Batch) -> Result<Option<Vec<(String, Tensor)>>> {
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
