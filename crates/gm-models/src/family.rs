//! Model families and their registry: one [`Family`] impl on a model's config type, and one line
//! in the list of gm's families (or one [`register`] call from research code outside gm), is all a
//! new model needs for configs, checkpoints, training, evaluation and sampling to know it.
//!
//! A [`ModelConfig`] holds any registered family's config. It reads and writes the `[model]`
//! table of a run config (`kind = "…"` and the family's own keys) and answers the questions the
//! trainer and the CLI ask of every model (its data, its labels, how to build it).

use crate::{Model, PixelData};
use candle_core::Result;
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::fmt::Debug;
use std::sync::{Arc, RwLock};

/// What a model's data is: images of a shape, or token windows of a text corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataShape {
    /// `[C, H, W]` images (`[D, 1, 1]` for vector data such as the 2-D toys).
    Image([usize; 3]),
    /// Windows of `context + 1` tokens of a text corpus (the model predicts each from its past).
    Text { context: usize },
}

/// A model family, implemented on the config type its `[model]` table deserialises into.
///
/// ```ignore
/// impl Family for MyConfig {
///     const KIND: &'static str = "my-model";
///     fn data(&self) -> DataShape { DataShape::Image(self.image_shape) }
///     fn build(&self, vb: VarBuilder) -> Result<Box<dyn Model>> {
///         Ok(Box::new(MyModel::new(self.clone(), vb)?))
///     }
/// }
/// // then once, before configs are read: gm_models::register::<MyConfig>()
/// ```
pub trait Family:
    Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The `kind` of configs and checkpoints (`[model] kind = "vae"`).
    const KIND: &'static str;

    /// The data the model reads.
    fn data(&self) -> DataShape;

    /// Checks values a deserialiser cannot (zero sizes, negative weights); errors name the key.
    fn validate(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// The pixel values the model is defined on, checked against the data pre-processing.
    fn pixel_data(&self) -> PixelData {
        PixelData::Any
    }

    /// The number of classes of a class-conditional model or classifier; 0 for the others.
    fn num_classes(&self) -> usize {
        0
    }

    /// Labels the model needs in every batch (class-conditional models and classifiers).
    fn needs_labels(&self) -> bool {
        self.num_classes() > 0
    }

    /// Whether training differentiates a gradient (WGAN-GP's penalty): candle must then keep
    /// gradients' graphs, which the trainer switches on before the first backward pass.
    fn second_order(&self) -> bool {
        false
    }

    /// A trained model of another family this one holds frozen (an EBM's noise flow): its
    /// weights come from that family's run by `gm train --init-from RUN` and live in this
    /// model's checkpoints under a prefix. `None` (the default) for self-contained models.
    fn embeds(&self) -> Option<Embedded> {
        None
    }

    /// Builds the model; its parameters are created through `vb` under PyTorch `state_dict`
    /// names.
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Model>>;
}

/// A frozen model of another family inside a model ([`Family::embeds`]).
#[derive(Clone, Debug)]
pub struct Embedded {
    /// Its config, compared with the `--init-from` run's.
    pub config: ModelConfig,
    /// Where its variables live (`noise_flow.`).
    pub prefix: &'static str,
    /// The config key of its table (`model.flow`), for error messages.
    pub key: &'static str,
}

/// [`Family`] with the type erased, so that one [`ModelConfig`] holds any of them.
trait AnyFamily: erased_serde::Serialize + Debug + Send + Sync {
    fn kind(&self) -> &'static str;
    fn data(&self) -> DataShape;
    fn validate(&self) -> std::result::Result<(), String>;
    fn pixel_data(&self) -> PixelData;
    fn num_classes(&self) -> usize;
    fn needs_labels(&self) -> bool;
    fn second_order(&self) -> bool;
    fn embeds(&self) -> Option<Embedded>;
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Model>>;
    fn as_any(&self) -> &dyn Any;
    fn same(&self, other: &dyn AnyFamily) -> bool;
}

impl<F: Family> AnyFamily for F {
    fn kind(&self) -> &'static str {
        F::KIND
    }
    fn data(&self) -> DataShape {
        Family::data(self)
    }
    fn validate(&self) -> std::result::Result<(), String> {
        Family::validate(self)
    }
    fn pixel_data(&self) -> PixelData {
        Family::pixel_data(self)
    }
    fn num_classes(&self) -> usize {
        Family::num_classes(self)
    }
    fn needs_labels(&self) -> bool {
        Family::needs_labels(self)
    }
    fn second_order(&self) -> bool {
        Family::second_order(self)
    }
    fn embeds(&self) -> Option<Embedded> {
        Family::embeds(self)
    }
    fn build(&self, vb: VarBuilder) -> Result<Box<dyn Model>> {
        Family::build(self, vb)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn same(&self, other: &dyn AnyFamily) -> bool {
        other.as_any().downcast_ref::<F>() == Some(self)
    }
}

/// The config of any registered model family (TOML: the `[model]` table).
#[derive(Clone, Debug)]
pub struct ModelConfig(Arc<dyn AnyFamily>);

impl ModelConfig {
    /// Wraps a family's config.
    pub fn new<F: Family>(config: F) -> Self {
        Self(Arc::new(config))
    }

    /// The family's own config, when it is an `F`.
    pub fn get<F: Family>(&self) -> Option<&F> {
        self.0.as_any().downcast_ref::<F>()
    }

    /// The `kind` string used in configs and checkpoints.
    pub fn kind(&self) -> &'static str {
        self.0.kind()
    }

    /// The data the model reads.
    pub fn data(&self) -> DataShape {
        self.0.data()
    }

    /// `[C, H, W]` of the images an image model reads; `None` for a text model.
    pub fn image_shape(&self) -> Option<[usize; 3]> {
        match self.0.data() {
            DataShape::Image(s) => Some(s),
            DataShape::Text { .. } => None,
        }
    }

    /// Checks values a deserialiser cannot (zero sizes, negative weights); errors name the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.0.validate()
    }

    /// Builds the model; its parameters are created through `vb` under PyTorch `state_dict`
    /// names.
    pub fn build(&self, vb: VarBuilder) -> Result<Box<dyn Model>> {
        self.0.build(vb)
    }

    /// The pixel values the model is defined on.
    pub fn pixel_data(&self) -> PixelData {
        self.0.pixel_data()
    }

    /// The number of classes of a class-conditional model or classifier; 0 for the others.
    pub fn num_classes(&self) -> usize {
        self.0.num_classes()
    }

    /// Labels the model needs in every batch (class-conditional models and classifiers).
    pub fn needs_labels(&self) -> bool {
        self.0.needs_labels()
    }

    /// Whether training differentiates a gradient (see [`Family::second_order`]).
    pub fn second_order(&self) -> bool {
        self.0.second_order()
    }

    /// The frozen model of another family it holds (see [`Family::embeds`]).
    pub fn embeds(&self) -> Option<Embedded> {
        self.0.embeds()
    }
}

impl PartialEq for ModelConfig {
    fn eq(&self, other: &Self) -> bool {
        self.0.same(other.0.as_ref())
    }
}

impl Serialize for ModelConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Tagged<'a> {
            kind: &'static str,
            #[serde(flatten)]
            config: &'a dyn erased_serde::Serialize,
        }
        Tagged {
            kind: self.0.kind(),
            config: &*self.0 as &dyn erased_serde::Serialize,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let kind = match table.remove("kind") {
            Some(toml::Value::String(k)) => k,
            Some(v) => return Err(D::Error::custom(format!("kind = {v}: not a string"))),
            None => return Err(D::Error::custom("missing field `kind`")),
        };
        let parse = registry()
            .read()
            .expect("model registry lock")
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.parse);
        match parse {
            Some(parse) => parse(table).map_err(D::Error::custom),
            None => Err(D::Error::custom(format!(
                "unknown model kind '{kind}'; known kinds: {}",
                kinds().join(", ")
            ))),
        }
    }
}

/// One registered family: its kind and how its `[model]` table becomes a [`ModelConfig`].
#[derive(Clone, Copy)]
struct Entry {
    kind: &'static str,
    family: std::any::TypeId,
    parse: fn(toml::Table) -> std::result::Result<ModelConfig, String>,
}

/// Reads a family's table; an error names the key (`model.channels = 8: …`).
fn parse<F: Family>(table: toml::Table) -> std::result::Result<ModelConfig, String> {
    let value = toml::Value::Table(table.clone());
    match serde_path_to_error::deserialize::<_, F>(value) {
        Ok(c) => Ok(ModelConfig::new(c)),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // The path is said once, in front: drop the deserialiser's own "in `key`" lines.
            let inner = inner.split("\nin `").next().unwrap_or_default().trim_end();
            match table.get(&path) {
                Some(v) if path != "." => Err(format!("model.{path} = {v}: {inner}")),
                _ if path != "." => Err(format!("model.{path}: {inner}")),
                _ => Err(inner.to_string()),
            }
        }
    }
}

fn entry<F: Family>() -> Entry {
    Entry {
        kind: F::KIND,
        family: std::any::TypeId::of::<F>(),
        parse: parse::<F>,
    }
}

/// gm's own families: adding one is this one line (and the family's file).
fn builtin() -> Vec<Entry> {
    use crate::*;
    vec![
        entry::<vae::VaeConfig>(),
        entry::<classifier::ClassifierConfig>(),
        entry::<fvsbn::FvsbnConfig>(),
        entry::<made::MadeConfig>(),
        entry::<pixelcnn::PixelCnnConfig>(),
        entry::<gated_pixelcnn::GatedPixelCnnConfig>(),
        entry::<ddpm::DdpmConfig>(),
        entry::<flow_matching::FlowMatchingConfig>(),
        entry::<realnvp::RealNvpConfig>(),
        entry::<ffjord::CnfConfig>(),
        entry::<gan::GanConfig>(),
        entry::<text::TextArConfig>(),
        entry::<bernoulli_mixture::BernoulliMixtureConfig>(),
        entry::<vqvae::VqVaeConfig>(),
        entry::<score::ScoreConfig>(),
        entry::<ebm::EbmConfig>(),
    ]
}

fn registry() -> &'static RwLock<Vec<Entry>> {
    static REGISTRY: std::sync::OnceLock<RwLock<Vec<Entry>>> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| RwLock::new(builtin()))
}

/// Registers a family defined outside gm, so that configs and checkpoints with
/// `kind = F::KIND` build it (call it once, before reading such a config). A kind already taken
/// by another family is refused; registering the same family twice is harmless.
pub fn register<F: Family>() -> std::result::Result<(), String> {
    let mut r = registry().write().expect("model registry lock");
    if let Some(e) = r.iter().find(|e| e.kind == F::KIND) {
        if e.family == std::any::TypeId::of::<F>() {
            return Ok(());
        }
        return Err(format!("model kind '{}' is already registered", F::KIND));
    }
    r.push(entry::<F>());
    Ok(())
}

/// The kinds of every registered family, gm's first.
pub fn kinds() -> Vec<&'static str> {
    registry()
        .read()
        .expect("model registry lock")
        .iter()
        .map(|e| e.kind)
        .collect()
}
