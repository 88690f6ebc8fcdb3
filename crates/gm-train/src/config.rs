//! Run configuration: TOML presets under `models/`, dotted `--set key=value` overrides, and
//! validation whose errors name the offending key.

use anyhow::{anyhow, bail, Context, Result};
use gm_models::{ModelConfig, PixelData};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How pixels are turned into the values a model is trained on.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Binarize {
    /// Grey levels in `[0, 1]` as they are.
    #[default]
    None,
    /// A fresh Bernoulli(pixel) draw every time an image is used (Salakhutdinov & Murray, 2008).
    Dynamic,
    /// One Bernoulli draw per image, fixed for the whole run (seeded by `data.static_seed`).
    Static,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `mnist` or `fashion-mnist` (fetched into the cache), `toy:NAME` (a 2-D density),
    /// `folder:PATH` (PNG/JPEG images, class subfolders) or `npy:PATH` (a uint8 array); see
    /// [`crate::userdata`].
    pub dataset: String,
    /// A folder of IDX files (`train-images-idx3-ubyte[.gz]`, …); overrides `dataset`.
    pub dir: Option<String>,
    pub binarize: Binarize,
    /// Seed of the one draw used by static binarisation, and of evaluation's binarisation.
    pub static_seed: u64,
    /// Add `U(0, 1)` noise to the 256 grey levels and divide by 256 (for continuous densities).
    pub dequantize: bool,
    /// Use at most this many training images (0 = all).
    pub max_train: usize,
    /// Images of another size than the model's: `none` (an error naming the file), `resize`,
    /// or `center-crop` (then resize). Folder and array data sets only.
    #[serde(skip_serializing_if = "is_fit_none")]
    pub fit: String,
    /// Percent of a folder's (or array's) images in the test split, by a hash of each name,
    /// when it has no `train/` and `test/` subfolders.
    #[serde(skip_serializing_if = "is_ten")]
    pub test_percent: u32,
}

// Defaults are left out of saved configs, so earlier runs' checkpoints keep their bytes.
fn is_fit_none(v: &str) -> bool {
    v == "none"
}
fn is_ten(v: &u32) -> bool {
    *v == 10
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: "mnist".into(),
            dir: None,
            binarize: Binarize::None,
            static_seed: 1234,
            dequantize: false,
            max_train: 0,
            fit: "none".into(),
            test_percent: 10,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub steps: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 gives Adam.
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// `constant` or `cosine` (decays to `min_lr_ratio · lr` at the last step).
    pub schedule: String,
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this value (0 = no clipping).
    pub grad_clip: f64,
    /// EMA decay of the weights used for evaluation and sampling (0 = no EMA).
    pub ema_decay: f64,
    pub log_every: usize,
    pub eval_every: usize,
    /// Test images used by the periodic evaluation (0 = the whole split).
    pub eval_images: usize,
    pub sample_every: usize,
    /// Images in each sample grid (0 = no sample grids; autoregressive samplers run one network
    /// pass per pixel, so this sets their cost).
    pub sample_n: usize,
    pub checkpoint_every: usize,
    pub keep_last: usize,
    pub seed: u64,
    /// Micro-batches of `batch_size` whose gradients are averaged before one optimizer step:
    /// the update of one batch of `accumulate × batch_size`.
    #[serde(skip_serializing_if = "is_one")]
    pub accumulate: usize,
    /// `f32`, or `bf16` / `f16` mixed precision: matrix products and convolutions in the low
    /// precision, parameters, optimizer state and the rest in f32 ([`gm_core::precision`]).
    #[serde(skip_serializing_if = "is_f32")]
    pub precision: String,
    /// The initial dynamic loss scale of `f16` training (halved at each overflow, whose step is
    /// skipped; doubled after 2,000 steps without one).
    #[serde(skip_serializing_if = "is_default_loss_scale")]
    pub loss_scale: f64,
    /// The random-number design of training steps: `stream` (one sequence per run) or
    /// `per-sample` (each draw a function of seed, step and the sample's index in the step's
    /// batch: results independent of how the batch is cut into micro-batches or ranks; what
    /// data-parallel training uses). See [`gm_core::rng`].
    #[serde(skip_serializing_if = "is_stream")]
    pub rng: String,
    /// Also write TensorBoard event files in the run directory ([`crate::tensorboard`]): every
    /// logged scalar (`train/…`, `test/…`) and the sample grids. Can be switched on at resume.
    #[serde(skip_serializing_if = "is_false")]
    pub tensorboard: bool,
    /// Gradient checkpointing ([`gm_core::grad_checkpoint`]): the UNet's and the PixelCNNs'
    /// blocks keep only their inputs and outputs and run their forward again in the backward —
    /// less memory for one more forward. The same gradients; can be switched at resume.
    #[serde(skip_serializing_if = "is_false")]
    pub gradient_checkpointing: bool,
}

// Settings at their defaults are left out of the saved config, so runs that do not use them
// write the same bytes as before they existed.
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn is_f32(v: &str) -> bool {
    v == "f32"
}
fn is_false(v: &bool) -> bool {
    !*v
}
fn is_stream(v: &str) -> bool {
    v == "stream"
}
fn is_default_loss_scale(v: &f64) -> bool {
    *v == DEFAULT_LOSS_SCALE
}

/// PyTorch's `GradScaler` default.
pub const DEFAULT_LOSS_SCALE: f64 = 65536.0;

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            steps: 100,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: "constant".into(),
            min_lr_ratio: 0.0,
            grad_clip: 0.0,
            ema_decay: 0.0,
            log_every: 10,
            eval_every: 0,
            eval_images: 1000,
            sample_every: 0,
            sample_n: 64,
            checkpoint_every: 0,
            keep_last: 2,
            seed: 0,
            accumulate: 1,
            precision: "f32".into(),
            loss_scale: DEFAULT_LOSS_SCALE,
            rng: "stream".into(),
            tensorboard: false,
            gradient_checkpointing: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Importance samples per image for `gm eval` (IWAE-k).
    pub iwae_k: usize,
    /// Importance samples per image during training's periodic evaluation.
    pub train_iwae_k: usize,
    pub batch_size: usize,
    /// Most (sample, image) pairs decoded at once, for 784-value images; images of D > 784
    /// values decode `max_pairs · 784 / D` at once (about the same memory).
    pub max_pairs: usize,
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            iwae_k: 1000,
            train_iwae_k: 10,
            batch_size: 100,
            max_pairs: 20_000,
            seed: 4321,
        }
    }
}

/// A whole run: what to build, on which data, how to train and evaluate it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalConfig,
}

/// Most images one sample grid (`gm sample`, `train.sample_n`) or one `--fid` set holds: a grid
/// of 65,536 28×28 images is already a 7,168-pixel square.
pub const MAX_SAMPLES: usize = 65_536;

/// Most importance samples per image (`--iwae-k`, `eval.iwae_k`): memory stays bounded at any
/// `k` (chunks of `eval.max_pairs`), but time grows with it — a million decoder passes per image.
pub const MAX_IWAE_K: usize = 1_000_000;

/// Refuses an `--iwae-k` outside `1..=MAX_IWAE_K`, naming the option and the limit.
pub fn check_iwae_k(k: usize) -> Result<()> {
    if k == 0 || k > MAX_IWAE_K {
        bail!("--iwae-k must be in 1..={MAX_IWAE_K} (memory is bounded at any k, time is not), got {k}");
    }
    Ok(())
}

/// Sets `a.b.c = value` in a TOML table; the value is parsed as TOML, else taken as a string.
pub fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("--set expects key=value, got '{assignment}'"))?;
    let key = key.trim();
    let raw = raw.trim();
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set: malformed key '{key}'");
    }
    let mut table = root;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| anyhow!("--set {key}: '{p}' is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl RunConfig {
    /// Parses TOML text (after applying overrides) and validates it.
    pub fn from_toml_str(text: &str, overrides: &[String], origin: &str) -> Result<Self> {
        let table: toml::Table =
            toml::from_str(text).with_context(|| format!("{origin}: not valid TOML"))?;
        let parse = |table: &toml::Table| -> std::result::Result<RunConfig, String> {
            let cfg = RunConfig::deserialize(toml::Value::Table(table.clone()))
                .map_err(|e| e.to_string())?;
            cfg.validate()?;
            Ok(cfg)
        };
        let mut set = table.clone();
        for o in overrides {
            apply_override(&mut set, o)?;
        }
        parse(&set).map_err(|e| {
            // Blame the --set values when the file alone is fine.
            if !overrides.is_empty() && parse(&table).is_ok() {
                let sets: Vec<String> = overrides.iter().map(|o| format!("--set {o}")).collect();
                anyhow!("{} (with {origin}): {e}", sets.join(" "))
            } else {
                anyhow!("{origin}: {e}")
            }
        })
    }

    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_toml_str(&text, overrides, &path.display().to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configs serialise")
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.model.validate()?;
        let t = &self.train;
        let positive = [
            ("train.batch_size", t.batch_size),
            ("train.steps", t.steps),
            ("eval.batch_size", self.eval.batch_size),
            ("eval.iwae_k", self.eval.iwae_k),
            ("eval.train_iwae_k", self.eval.train_iwae_k),
            ("eval.max_pairs", self.eval.max_pairs),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(format!("{k} must be > 0"));
            }
        }
        for (k, v, max) in [
            ("train.sample_n", t.sample_n, MAX_SAMPLES),
            ("eval.iwae_k", self.eval.iwae_k, MAX_IWAE_K),
            ("eval.train_iwae_k", self.eval.train_iwae_k, MAX_IWAE_K),
        ] {
            if v > max {
                return Err(format!("{k} = {v} is above gm's limit of {max}"));
            }
        }
        if !t.lr.is_finite() || t.lr <= 0.0 {
            return Err(format!("train.lr must be a positive number, got {}", t.lr));
        }
        for (k, v) in [
            ("train.beta1", t.beta1),
            ("train.beta2", t.beta2),
            ("train.ema_decay", t.ema_decay),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("{k} must be in [0, 1), got {v}"));
            }
        }
        if t.eps.is_nan() || t.eps <= 0.0 {
            return Err(format!("train.eps must be > 0, got {}", t.eps));
        }
        for (k, v) in [
            ("train.weight_decay", t.weight_decay),
            ("train.grad_clip", t.grad_clip),
            ("train.min_lr_ratio", t.min_lr_ratio),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{k} must be >= 0, got {v}"));
            }
        }
        if !["constant", "cosine"].contains(&t.schedule.as_str()) {
            return Err(format!(
                "train.schedule must be 'constant' or 'cosine', got '{}'",
                t.schedule
            ));
        }
        if t.accumulate == 0 {
            return Err("train.accumulate must be >= 1".into());
        }
        gm_core::precision::parse(&t.precision).map_err(|e| format!("train.precision: {e}"))?;
        if !t.loss_scale.is_finite() || t.loss_scale <= 0.0 {
            return Err(format!(
                "train.loss_scale must be a positive number, got {}",
                t.loss_scale
            ));
        }
        if !["stream", "per-sample"].contains(&t.rng.as_str()) {
            return Err(format!(
                "train.rng must be 'stream' or 'per-sample', got '{}'",
                t.rng
            ));
        }
        if t.keep_last == 0 {
            return Err("train.keep_last must be >= 1".into());
        }
        self.validate_data()
    }

    /// The data the model reads: a data set of its kind, pre-processed to its pixel values.
    fn validate_data(&self) -> std::result::Result<(), String> {
        if let Some(name) = toy_name(&self.data.dataset) {
            name.parse::<Toy2d>()
                .map_err(|e| format!("data.dataset: {e}"))?;
            if self.model.image_shape() != Some([2, 1, 1]) {
                return Err(format!(
                    "data.dataset = \"{}\" is a 2-D density: it needs model.image_shape = [2, 1, 1], got {:?}",
                    self.data.dataset,
                    self.model.data()
                ));
            }
            return Ok(());
        }
        match self.model.pixel_data() {
            PixelData::Binary if self.data.binarize == Binarize::None => {
                return Err(format!(
                    "a '{}' model with Bernoulli pixels needs data.binarize = \"dynamic\" or \"static\"",
                    self.model.kind()
                ))
            }
            PixelData::Levels if self.data.binarize != Binarize::None || self.data.dequantize => {
                return Err(format!(
                    "a '{}' model with 256-level pixels needs data.binarize = \"none\" and data.dequantize = false",
                    self.model.kind()
                ))
            }
            PixelData::Dequantized
                if self.data.binarize != Binarize::None || !self.data.dequantize =>
            {
                return Err(format!(
                    "a '{}' model is a continuous density: it needs data.binarize = \"none\" and data.dequantize = true",
                    self.model.kind()
                ))
            }
            _ => {}
        }
        let text = self.model.image_shape().is_none();
        if text && self.data.dir.is_none() && self.data.dataset != "fortunes" {
            return Err(format!(
                "data.dataset of a text model must be 'fortunes' (or give data.dir), got '{}'",
                self.data.dataset
            ));
        }
        self.data
            .fit
            .parse::<crate::userdata::Fit>()
            .map_err(|e| e.to_string())?;
        if self.data.test_percent == 0 || self.data.test_percent >= 100 {
            return Err(format!(
                "data.test_percent must be between 1 and 99, got {}",
                self.data.test_percent
            ));
        }
        let user = crate::userdata::source(&self.data.dataset, None).is_some();
        if user && text {
            return Err(format!(
                "data.dataset = \"{}\": a text model reads text, not images",
                self.data.dataset
            ));
        }
        if !text
            && !user
            && self.data.dir.is_none()
            && !["mnist", "fashion-mnist"].contains(&self.data.dataset.as_str())
        {
            return Err(format!(
                "data.dataset must be 'mnist', 'fashion-mnist', 'toy:NAME', 'folder:PATH' or 'npy:PATH' (or give data.dir), got '{}'",
                self.data.dataset
            ));
        }
        Ok(())
    }
}

/// The learning rate at `step` (0-based): linear warm-up, then constant or cosine decay.
pub fn lr_at(t: &TrainConfig, step: usize) -> f64 {
    if t.warmup_steps > 0 && step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    match t.schedule.as_str() {
        "cosine" => {
            let span = t.steps.saturating_sub(t.warmup_steps).max(1) as f64;
            let p = ((step - t.warmup_steps.min(step)) as f64 / span).min(1.0);
            let floor = t.lr * t.min_lr_ratio;
            floor + (t.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
        _ => t.lr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[model]\nkind = \"vae\"\nlatent_dim = 4\n[train]\nsteps = 10\n";

    /// Every preset shipped under `models/` parses, knows all its keys and validates.
    #[test]
    fn every_preset_loads_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                // `load` validates; its errors name the file and the key.
                RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e:#}"));
                n += 1;
            }
        }
        assert!(n >= 20, "only {n} presets found in {}", dir.display());
    }

    #[test]
    fn overrides_apply_and_unknown_keys_fail_with_their_name() {
        let c = RunConfig::from_toml_str(
            BASE,
            &["train.lr=3e-4".into(), "model.arch=conv".into()],
            "t",
        )
        .unwrap();
        assert_eq!(c.train.lr, 3e-4);
        let e = RunConfig::from_toml_str(BASE, &["train.lrr=1".into()], "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lrr"), "{e}");
        let e = RunConfig::from_toml_str(&format!("{BASE}bogus = 1\n"), &[], "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = RunConfig::from_toml_str(BASE, &["model.hiddn=[3]".into()], "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hiddn"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (o, key) in [
            ("train.batch_size=0", "train.batch_size"),
            ("train.lr=-1e-3", "train.lr"),
            ("model.latent_dim=0", "model.latent_dim"),
            ("train.schedule=\"linear\"", "train.schedule"),
        ] {
            let e = RunConfig::from_toml_str(BASE, &[o.into()], "t")
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{o}: {e}");
        }
        let e = RunConfig::from_toml_str("[model]\nkind = \"nope\"\n", &[], "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = RunConfig::from_toml_str(BASE, &[], "t").unwrap();
        let back = RunConfig::from_toml_str(&c.to_toml(), &[], "t").unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn schedule_warms_up_and_decays() {
        let t = TrainConfig {
            lr: 1.0,
            steps: 110,
            warmup_steps: 10,
            schedule: "cosine".into(),
            ..Default::default()
        };
        assert!((lr_at(&t, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(&t, 9) - 1.0).abs() < 1e-12);
        assert!((lr_at(&t, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(&t, 60) - 0.5).abs() < 1e-12);
        assert!(lr_at(&t, 109) < 0.01);
    }
}

/// 2-D toy densities for flows and CNFs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toy2d {
    TwoMoons,
    EightGaussians,
    Checkerboard,
    Spirals,
}

impl std::str::FromStr for Toy2d {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "two-moons" | "moons" => Ok(Self::TwoMoons),
            "8gaussians" | "eight-gaussians" => Ok(Self::EightGaussians),
            "checkerboard" => Ok(Self::Checkerboard),
            "spirals" | "2spirals" => Ok(Self::Spirals),
            o => Err(format!(
                "unknown toy density '{o}' (two-moons, 8gaussians, checkerboard, spirals)"
            )),
        }
    }
}

/// The toy density named by `data.dataset = "toy:NAME"`, if it is one.
pub fn toy_name(dataset: &str) -> Option<&str> {
    dataset.strip_prefix("toy:")
}
