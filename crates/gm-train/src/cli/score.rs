//! `gm score`.

use super::*;
use anyhow::{bail, Result};
use gm_train::data::Split;
use gm_train::trainer::{load_checkpoint_with, load_data};
use std::path::PathBuf;

/// Per-image −log p(x) of a density model to a CSV; with --ood-data-dir, the AUROC of telling
/// a second data set from the first by likelihood and by two corrected scores (JSON).
#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// A run directory, a .safetensors checkpoint, or a diffusers model folder (UNet2DModel).of a density model.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The in-distribution data (default: the checkpoint's data set).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    pub split: Split,
    /// A second folder of IDX files (same split) to tell apart from the first.
    #[arg(long)]
    pub ood_data_dir: Option<PathBuf>,
    /// Images scored per set (0 = all).
    #[arg(long, default_value_t = 1000)]
    pub max_images: usize,
    /// Importance samples per image for the VAE (default: the config's eval.iwae_k).
    #[arg(long)]
    pub iwae_k: Option<usize>,
    /// Where the per-image CSV goes.
    #[arg(long, default_value = "scores.csv")]
    pub out: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let ScoreArgs {
        checkpoint,
        data_dir,
        split,
        ood_data_dir,
        max_images,
        iwae_k,
        out,
        overrides,
        device: d,
    } = args;
    let dev = device(&d)?;
    let ck = load_checkpoint_with(&checkpoint, &dev, &overrides)?;
    let cfg = &ck.built.cfg;
    let model = ck.built.model.as_ref();
    let opts = gm_train::eval::full_options(cfg, iwae_k)?;
    let score = |ds: &gm_train::data::ImageDataset| {
        gm_train::score::score_images(
            model,
            ds,
            &cfg.data,
            &opts,
            cfg.eval.batch_size,
            max_images,
            cfg.eval.seed,
            &dev,
        )
    };
    let (ds, source) = load_data(cfg, data_dir.as_deref(), split)?;
    let t0 = std::time::Instant::now();
    let in_scores = score(&ds)?;
    let mean = |v: &[gm_train::score::ImageScore]| {
        v.iter().map(|r| r.bits_per_dim).sum::<f64>() / v.len().max(1) as f64
    };
    let mut m = serde_json::Map::new();
    m.insert("checkpoint".into(), ck.path.display().to_string().into());
    m.insert("data".into(), source.into());
    m.insert("n_in".into(), in_scores.len().into());
    m.insert("bits_per_dim_in".into(), mean(&in_scores).into());
    let mut sets = vec![("in", in_scores.as_slice())];
    let (train_scores, ood_scores);
    if let Some(ood_dir) = &ood_data_dir {
        let ood_ds = gm_train::data::load_split(ood_dir, split)?;
        if ood_ds.shape != ds.shape {
            bail!(
                "{}: images of shape {:?}, the model's data has {:?}",
                ood_dir.display(),
                ood_ds.shape,
                ds.shape
            );
        }
        ood_scores = score(&ood_ds)?;
        // The typical set of the training data: its mean bits/dim.
        let (train_ds, _) = load_data(cfg, data_dir.as_deref(), Split::Train)?;
        train_scores = score(&train_ds)?;
        let train_mean = mean(&train_scores);
        m.insert("ood_data".into(), ood_dir.display().to_string().into());
        m.insert("n_ood".into(), ood_scores.len().into());
        m.insert("bits_per_dim_ood".into(), mean(&ood_scores).into());
        m.insert("bits_per_dim_train".into(), train_mean.into());
        for (k, v) in gm_train::score::ood_aurocs(&in_scores, &ood_scores, train_mean) {
            m.insert(k.into(), v.into());
        }
        sets.push(("ood", ood_scores.as_slice()));
        sets.push(("train", train_scores.as_slice()));
    }
    gm_train::score::write_csv(&out, &sets)?;
    m.insert("csv".into(), out.display().to_string().into());
    m.insert("seconds".into(), t0.elapsed().as_secs_f64().into());
    println!("{}", serde_json::Value::Object(m));
    Ok(())
}
