//! # gm-train
//!
//! Everything around a model: data ([`data`], [`fetch`]), configuration ([`config`]), the
//! optimizer ([`optim`]), the training loop ([`trainer`]), checkpoints ([`checkpoint`]),
//! evaluation and sample quality ([`eval`]), PNG output ([`images`]) and the `gm` command line.

pub mod alloc;
pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod data;
pub mod diffusers;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod hooks;
pub mod images;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod opbench;
pub mod optim;
pub mod parallel;
pub mod score;
pub mod source;
pub mod tensorboard;
pub mod text;
pub mod trainer;
pub mod userdata;

pub use config::RunConfig;
pub use trainer::{load_checkpoint, load_checkpoint_with, train, TrainOptions, TrainSummary};
