//! What a run trains on, as the trainer sees it: a source of batches ([`TrainData`]) that also
//! evaluates a model on its held-out part. Images ([`ImageData`]: IDX files, the 2-D toys) and
//! text ([`crate::text::TextData`]: token windows of a corpus) are the two kinds; the model's
//! [`DataShape`] picks one ([`load_run_data`]).

use crate::config::{DataConfig, RunConfig};
use crate::data::{check_split, load_data, make_batch, ImageDataset, Split};
use crate::eval::evaluate;
use anyhow::{bail, Result};
use candle_core::Device;
use gm_core::GmRng;
use gm_models::{Batch, DataShape, EvalOptions, Model};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A source of training batches with a held-out part to evaluate on.
pub trait TrainData {
    /// Where the data came from (the log, checkpoints' `gm.data`).
    fn source(&self) -> &str;

    /// One line for the log: the source and the size of each part.
    fn describe(&self) -> String;

    /// The number of training examples; the trainer's epochs permute `0..len()`.
    fn len(&self) -> usize;

    /// Whether there is nothing to train on.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch of training examples `idx` on `device`; pre-processing noise (dynamic
    /// binarisation, dequantisation) comes from `rng`.
    fn batch(&self, idx: &[usize], rng: &mut GmRng, device: &Device) -> Result<Batch>;

    /// The held-out metrics of `model` (`cfg.train.eval_images` of them where the data is
    /// images), or `None` without a held-out part.
    fn evaluate(
        &self,
        model: &dyn Model,
        cfg: &RunConfig,
        opts: &EvalOptions,
        device: &Device,
    ) -> Result<Option<BTreeMap<String, f64>>>;

    /// What a checkpoint's weights file must carry for its model to be used and its run
    /// resumed (the text model's tokenizer).
    fn checkpoint_meta(&self) -> Result<HashMap<String, String>> {
        Ok(HashMap::new())
    }

    /// The image splits, for what only images have (data-dependent initialisation,
    /// reconstructions, density pictures).
    fn images(&self) -> Option<&ImageData> {
        None
    }
}

/// Loads what `cfg`'s model reads: images, or a text corpus. `saved` is the metadata of the
/// checkpoint a resumed run continues from (a text run's tokenizer comes from there).
pub fn load_run_data(
    cfg: &RunConfig,
    data_dir: Option<&Path>,
    saved: Option<&HashMap<String, String>>,
) -> Result<Box<dyn TrainData>> {
    Ok(match cfg.model.data() {
        DataShape::Image(_) => Box::new(ImageData::load(cfg, data_dir)?),
        DataShape::Text { .. } => Box::new(crate::text::TextData::load(cfg, data_dir, saved)?),
    })
}

/// Images a run trains and evaluates on.
pub struct ImageData {
    pub train: ImageDataset,
    /// `None` when the data has no test split (periodic evaluation is then off).
    pub test: Option<ImageDataset>,
    pub source: String,
    /// The pre-processing of every batch.
    pub cfg: DataConfig,
}

impl ImageData {
    /// Loads and checks both splits against the model before any step.
    pub fn load(cfg: &RunConfig, data_dir: Option<&Path>) -> Result<Self> {
        let (mut train, source) = load_data(cfg, data_dir, Split::Train)?;
        train.truncate(cfg.data.max_train);
        check_split(&train, cfg, "training")?;
        if cfg.model.needs_labels() && train.labels.is_none() {
            bail!(
                "a '{}' model needs class labels, but {} has no train-labels file",
                cfg.model.kind(),
                train.source
            );
        }
        let test = match load_data(cfg, data_dir, Split::Test) {
            Ok((d, _)) => {
                // A test split the periodic evaluations cannot read must stop the run now, not
                // after the steps before the first evaluation.
                check_split(&d, cfg, "test")?;
                Some(d)
            }
            Err(e) => {
                eprintln!("gm: no test split ({e:#}); periodic evaluation is off");
                None
            }
        };
        Ok(Self {
            train,
            test,
            source,
            cfg: cfg.data.clone(),
        })
    }
}

impl TrainData for ImageData {
    fn source(&self) -> &str {
        &self.source
    }

    fn describe(&self) -> String {
        let unit = match crate::data::toy_name(&self.cfg.dataset) {
            Some(_) => "points",
            None => "images",
        };
        format!("{} — {} training {unit}", self.source, self.train.len())
    }

    fn len(&self) -> usize {
        self.train.len()
    }

    fn batch(&self, idx: &[usize], rng: &mut GmRng, device: &Device) -> Result<Batch> {
        make_batch(&self.train, idx, &self.cfg, rng, device)
    }

    fn evaluate(
        &self,
        model: &dyn Model,
        cfg: &RunConfig,
        opts: &EvalOptions,
        device: &Device,
    ) -> Result<Option<BTreeMap<String, f64>>> {
        let Some(test) = &self.test else {
            return Ok(None);
        };
        evaluate(
            model,
            test,
            &self.cfg,
            opts,
            cfg.eval.batch_size,
            cfg.train.eval_images,
            cfg.eval.seed,
            device,
        )
        .map(Some)
    }

    fn images(&self) -> Option<&ImageData> {
        Some(self)
    }
}
