//! # gm — deep generative models on Candle
//!
//! One import for research code: `use gm::...`. The crates underneath:
//! - [`gm_core`]: distributions, likelihood losses (NLL, MSE as Gaussian MLE, KL, ELBO, IWAE),
//!   bits per dimension, the seeded RNG, EM, ODE solvers, Gaussian diffusion schedules and
//!   samplers, continuous-flow likelihoods;
//! - [`gm_models`]: the model families behind one [`Model`] trait;
//! - [`gm_train`]: data, configs, the trainer, checkpoints, evaluation, the `gm` CLI.
//!
//! ```no_run
//! use gm::{train, RunConfig, TrainOptions};
//! let cfg = RunConfig::load("models/vae-tiny.toml".as_ref(), &[]).unwrap();
//! let opts = TrainOptions {
//!     out: "runs/my-vae".into(),
//!     device: gm::select_device(gm::DeviceChoice::Auto).unwrap().0,
//!     data_dir: None,
//!     resume: false,
//!     progress: true,
//!     init_from: None,
//! };
//! let summary = train(&cfg, &opts).unwrap();
//! println!("{:?}", summary.last_eval);
//! ```

pub use candle_core as candle;
pub use candle_nn;
pub use gm_core;
pub use gm_models;
pub use gm_train;

pub use gm_core::kernels::{self, conv, norm, ops};
pub use gm_core::{
    bits_per_dim, cnf, diffusion, dist, em, keep_freed_memory, ladder, loss, mcmc, native_kernels,
    ode, portable_kernels, precision, samplers, sde, select_device, set_portable_kernels,
    sum_per_sample, traffic, vbgmm, DeviceChoice, GmRng, RngState,
};
pub use gm_models::{
    ar, classifier, ddpm, ebm, family, ffjord, flow, flow_matching, fvsbn, gated_pixelcnn, kinds,
    made, nn, pixelcnn, realnvp, register, score, text, unet, vae, vqvae, Batch, DataShape,
    EvalOptions, Family, Loss, Metrics, Model, ModelConfig, PixelData,
};
pub use gm_train::{
    checkpoint, compare, config, data, diffusers, doctor, eval, export, fetch, hooks, images,
    opbench, optim, source, tensorboard, trainer,
};
pub use gm_train::{
    load_checkpoint, load_checkpoint_with, train, RunConfig, TrainOptions, TrainSummary,
};
