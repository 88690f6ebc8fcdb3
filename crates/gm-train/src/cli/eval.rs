//! `gm eval`.

use super::*;
use anyhow::{bail, Context, Result};
use gm_train::data::Split;
use gm_train::eval::{
    check_classifier_shape, evaluate_full, feature_space, load_classifier, quality_fields,
    sample_quality_of,
};
use gm_train::trainer::{load_checkpoint_with, load_data};
use std::path::{Path, PathBuf};

/// Evaluate a checkpoint on a split; prints one JSON object.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A run directory, a .safetensors checkpoint, or a diffusers model folder (UNet2DModel).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    pub split: Split,
    /// Importance samples per image (default: the config's eval.iwae_k).
    #[arg(long)]
    pub iwae_k: Option<usize>,
    /// Evaluate only the first N images (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_images: usize,
    /// Also report sample quality (fid_mnist, KID, precision/recall, class histogram) through
    /// gm's classifier; the distances are named after the classifier's data (`fid_photos32`).
    #[arg(long)]
    pub fid: bool,
    /// Number of generated images for --fid.
    #[arg(long, default_value_t = 1000)]
    pub fid_n: usize,
    /// The classifier checkpoint for --fid (train it with models/classifier-mnist.toml).
    #[arg(long, default_value = "runs/classifier-mnist")]
    pub classifier: PathBuf,
    /// Override a stored setting that leaves the weights alone, e.g.
    /// --set model.bound_timesteps=0 or --set model.likelihood_solver.steps=20 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let EvalArgs {
        checkpoint,
        data_dir,
        split,
        iwae_k,
        max_images,
        fid,
        fid_n,
        classifier,
        overrides,
        device: d,
    } = args;
    if fid {
        gm_train::eval::check_sample_count(&format!("--fid-n {fid_n}"), fid_n)?;
    }
    let dev = device(&d)?;
    if gm_train::text::is_text_checkpoint(&checkpoint)? {
        return eval_text(&checkpoint, data_dir.as_deref(), split, &dev);
    }
    let ck = load_checkpoint_with(&checkpoint, &dev, &overrides)?;
    let cfg = &ck.built.cfg;
    let (ds, source) = load_data(cfg, data_dir.as_deref(), split)?;
    let iwae = iwae_k.unwrap_or(cfg.eval.iwae_k);
    let model = ck.built.model.as_ref();
    let mut m = serde_json::Map::new();
    for (k, v) in evaluate_full(model, cfg, &ds, Some(iwae), max_images, &dev)? {
        m.insert(k, serde_json::json!(v));
    }
    if model.likelihood_metric().is_some() {
        if m.contains_key("nll_iwae_nats") {
            m.insert("iwae_k".into(), serde_json::json!(iwae));
        }
        m.insert(
            "binarization".into(),
            serde_json::to_value(cfg.data.binarize)?,
        );
    }
    if fid {
        if fid_n < 2 {
            bail!("--fid-n must be at least 2 (a covariance needs two samples), got {fid_n}");
        }
        let cls = load_classifier(&classifier, &dev).context("--fid")?;
        check_classifier_shape(&cls, cfg.model.image_shape(), "--fid")?;
        let (q, _, per_s) = sample_quality_of(
            model,
            cls.built.model.as_ref(),
            &ds,
            fid_n,
            cfg.eval.seed,
            &dev,
        )
        .with_context(|| format!("--fid --fid-n {fid_n}"))?;
        for (k, v) in quality_fields(&q, &feature_space(&cls))? {
            m.insert(k, v);
        }
        m.insert("fid_n".into(), serde_json::json!(fid_n));
        m.insert("sample_images_per_s".into(), serde_json::json!(per_s));
    }
    m.insert(
        "split".into(),
        serde_json::json!(format!("{split:?}").to_lowercase()),
    );
    m.insert("step".into(), serde_json::json!(ck.step));
    m.insert(
        "checkpoint".into(),
        serde_json::json!(ck.path.display().to_string()),
    );
    m.insert("data".into(), serde_json::json!(source));
    println!("{}", serde_json::Value::Object(m));
    Ok(())
}

/// `gm eval` of a text model: bits per byte and per token of a split of its corpus.
fn eval_text(checkpoint: &Path, data_dir: Option<&Path>, split: Split, dev: &Device) -> Result<()> {
    use gm_train::text;
    let ck = text::load_text_checkpoint(checkpoint, dev)?;
    let dir = text::corpus_dir(&ck.cfg, data_dir);
    let corpus = text::load_corpus(&dir)?;
    let docs = match split {
        Split::Test => &corpus.test,
        Split::Train => &corpus.train,
    };
    let (ids, bytes) = text::encode(&ck.tokenizer, docs)?;
    let mut m = text::evaluate_text(&ck.model, ck.model.config(), &ids, bytes, 64, dev)?
        .into_iter()
        .map(|(k, v)| (k, serde_json::json!(v)))
        .collect::<serde_json::Map<_, _>>();
    m.insert("split".into(), format!("{split:?}").to_lowercase().into());
    m.insert("step".into(), ck.step.into());
    m.insert("checkpoint".into(), ck.path.display().to_string().into());
    m.insert("data".into(), corpus.source.into());
    println!("{}", serde_json::Value::Object(m));
    Ok(())
}
