//! What every autoregressive image model shares: the per-pixel output distribution, the exact
//! negative log-likelihood, raster-order sampling and class labels.
//!
//! Seed 002: `p(x) = Π_d p(x_d | x_<d)`, so maximum likelihood is a classification problem per
//! pixel and `−log p(x)` is exact — the test metric, in nats per image.
//!
//! Every model here maps an image batch `(B, C, H, W)` to logits `(B, K, D)` over the flattened
//! pixels (`D = C·H·W`, `K = 1` for Bernoulli pixels, `K = 256` for 8-bit grey levels) such that
//! the logits of pixel `d` depend only on the pixels before `d` in the model's order.

pub use crate::nn::{check_labels, cycle_labels};
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Result, Tensor, D};
use gm_core::dist::{Bernoulli, Categorical};
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

/// The conditional distribution of one pixel given the previous ones.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PixelOutput {
    /// A Bernoulli on binarised pixels (one logit per pixel); needs `data.binarize`.
    #[default]
    Bernoulli,
    /// A 256-way softmax over the grey levels (256 logits per pixel); needs the raw levels
    /// (`data.binarize = "none"`, no dequantisation).
    Categorical,
}

impl PixelOutput {
    /// The pixel values a model with this output is defined on.
    pub fn pixel_data(self) -> crate::PixelData {
        match self {
            Self::Bernoulli => crate::PixelData::Binary,
            Self::Categorical => crate::PixelData::Levels,
        }
    }

    /// Logits per pixel.
    pub fn classes(self) -> usize {
        match self {
            Self::Bernoulli => 1,
            Self::Categorical => 256,
        }
    }

    /// `−log p(x)` per image, `(B,)` nats, for logits `(B, K, D)` and images `(B, C, H, W)`.
    pub fn nll(self, logits: &Tensor, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        match self {
            Self::Bernoulli => Bernoulli::new(logits.squeeze(1)?)
                .log_prob(&x.reshape((b, ()))?)?
                .neg(),
            Self::Categorical => Categorical::new(logits.clone(), 1)?
                .log_prob(&to_levels(&x.reshape((b, ()))?)?)?
                .neg(),
        }
    }

    /// Draws pixel values in `[0, 1]` (0/1, or level/255) from the logits `(N, K)` of one pixel.
    pub(crate) fn draw(self, logits: &[Vec<f32>], rng: &mut GmRng) -> Vec<f32> {
        logits
            .iter()
            .map(|l| match self {
                Self::Bernoulli => {
                    let p = 1.0 / (1.0 + (-l[0] as f64).exp());
                    f32::from(rng.uniform_f64() < p)
                }
                Self::Categorical => {
                    let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let w: Vec<f64> = l.iter().map(|&v| ((v - m) as f64).exp()).collect();
                    draw_index(&w, rng) as f32 / 255.0
                }
            })
            .collect()
    }
}

/// An index drawn with probability proportional to the non-negative weights `w` (one uniform).
pub(crate) fn draw_index(w: &[f64], rng: &mut GmRng) -> usize {
    let mut u = rng.uniform_f64() * w.iter().sum::<f64>();
    for (i, wi) in w.iter().enumerate() {
        if u < *wi {
            return i;
        }
        u -= wi;
    }
    w.len() - 1
}

/// Grey values in `[0, 1]` (multiples of 1/255) to `u32` levels `0..=255`.
pub fn to_levels(x: &Tensor) -> Result<Tensor> {
    (x.to_dtype(DType::F32)? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U32)
}

/// Samples `n` images pixel by pixel in `order` (indices into the flattened `C·H·W` image):
/// before pixel `order[t]` is drawn, the network sees every pixel drawn so far and zeros
/// elsewhere. `logits(x)` must return `(n, K, D)`. One network evaluation per pixel, batched
/// over the `n` images; images get the dtype and device of `like` (a parameter of the model).
pub fn sample_in_order(
    shape: [usize; 3],
    n: usize,
    order: &[usize],
    out: PixelOutput,
    like: &Tensor,
    rng: &mut GmRng,
    mut logits: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let [c, h, w] = shape;
    let (dtype, device) = (like.dtype(), like.device());
    let d = c * h * w;
    let mut buf = vec![0f32; n * d];
    for &pix in order {
        let x = Tensor::from_slice(&buf, (n, c, h, w), device)?.to_dtype(dtype)?;
        let l = logits(&x)?
            .narrow(D::Minus1, pix, 1)?
            .squeeze(D::Minus1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (i, v) in out.draw(&l, rng).into_iter().enumerate() {
            buf[i * d + pix] = v;
        }
    }
    gm_core::traffic::upload(buf, (n, c, h, w), device)?.to_dtype(dtype)
}

/// Samples `n` images in raster order — pixel by pixel, and within a pixel channel by channel
/// (R, then G, then B) — when the logits of row `i` depend only on rows `i − rows_above … i` (a
/// convolutional model's vertical receptive field): the network runs on that band of rows only,
/// so each value costs `rows_above + 1` rows of computation instead of `H`. Gives the same
/// logits as [`sample_in_order`] on the full image (tested).
pub fn sample_raster(
    shape: [usize; 3],
    n: usize,
    out: PixelOutput,
    like: &Tensor,
    rng: &mut GmRng,
    rows_above: usize,
    mut logits: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let [c, h, w] = shape;
    let (dtype, device) = (like.dtype(), like.device());
    let (plane, d) = (h * w, c * h * w);
    let mut buf = vec![0f32; n * d];
    for i in 0..h {
        let lo = i.saturating_sub(rows_above);
        let rows = i + 1 - lo;
        for j in 0..w {
            for ch in 0..c {
                let mut band = Vec::with_capacity(n * c * rows * w);
                for b in 0..n {
                    for k in 0..c {
                        let at = b * d + k * plane;
                        band.extend_from_slice(&buf[at + lo * w..at + (i + 1) * w]);
                    }
                }
                let x = gm_core::traffic::upload(band, (n, c, rows, w), device)?.to_dtype(dtype)?;
                let l = logits(&x)?
                    .narrow(D::Minus1, ch * rows * w + (i - lo) * w + j, 1)?
                    .squeeze(D::Minus1)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?;
                for (b, v) in out.draw(&l, rng).into_iter().enumerate() {
                    buf[b * d + ch * plane + i * w + j] = v;
                }
            }
        }
    }
    gm_core::traffic::upload(buf, (n, c, h, w), device)?.to_dtype(dtype)
}

/// Validation shared by the AR configs.
pub(crate) fn check_shape(shape: [usize; 3]) -> std::result::Result<(), String> {
    if shape.contains(&0) {
        return Err(format!("model.image_shape must be positive, got {shape:?}"));
    }
    Ok(())
}

/// A convolutional autoregressive image model in raster order (PixelCNN, Gated PixelCNN): it
/// supplies its logits, and gets the whole [`Model`] (exact NLL loss and metrics, sampling,
/// class-conditional sampling) from this trait.
pub trait RasterModel {
    /// The `kind` string of the config.
    fn kind_name(&self) -> &'static str;
    fn image_shape(&self) -> [usize; 3];
    fn output(&self) -> PixelOutput;
    /// Number of classes of a class-conditional model (0 = unconditional).
    fn num_classes(&self) -> usize;
    /// Any parameter, whose dtype and device the samples take.
    fn any_param(&self) -> &Tensor;
    /// Logits `(B, K, D)` for images `(B, C, H, W)` and, for a conditional model, labels `(B,)`.
    fn logits(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<Tensor>;
    /// How many rows above its own the logits of a row can see (the vertical receptive field).
    fn rows_above(&self) -> usize;

    /// Cached raster sampling ([`crate::ar_cache`]): each value costs one position of every
    /// layer. Returns the images and, with `keep_logits`, the logits `(n, K, D)` each value was
    /// drawn from; `None` for a model without it (the default), which then samples by
    /// [`RasterModel::draw_banded`].
    fn draw_cached(
        &self,
        _labels: Option<&Tensor>,
        _n: usize,
        _rng: &mut GmRng,
        _keep_logits: bool,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(None)
    }

    /// Raster-order samples running the network on the band of rows each pixel can see
    /// ([`sample_raster`]): the reference the cached sampler is tested against.
    fn draw_banded(&self, labels: Option<&Tensor>, n: usize, rng: &mut GmRng) -> Result<Tensor> {
        sample_raster(
            self.image_shape(),
            n,
            self.output(),
            self.any_param(),
            rng,
            self.rows_above(),
            |x| self.logits(x, labels),
        )
    }

    /// Raster-order samples, one per label (or unconditional when `labels` is `None`): cached
    /// where the model has it, else by the band of rows.
    fn draw(&self, labels: Option<Tensor>, n: usize, rng: &mut GmRng) -> Result<Tensor> {
        match self.draw_cached(labels.as_ref(), n, rng, false)? {
            Some((x, _)) => Ok(x),
            None => self.draw_banded(labels.as_ref(), n, rng),
        }
    }
}

impl<T: RasterModel> Model for T {
    fn kind(&self) -> &'static str {
        self.kind_name()
    }

    /// The raster nets (PixelCNN, Gated PixelCNN) checkpoint layer by layer.
    fn gradient_checkpointing(&self) -> bool {
        true
    }

    fn loss(&self, batch: &Batch, _rng: &mut GmRng) -> Result<Loss> {
        let logits = self.logits(&batch.x, batch.labels.as_ref())?;
        let nll = self.output().nll(&logits, &batch.x)?.mean(0)?;
        Ok(Loss {
            total: nll.clone(),
            parts: vec![("nll", nll)],
        })
    }

    /// `nll_nats`: the exact `−log p(x)` per image.
    fn eval_metrics(&self, batch: &Batch, _rng: &mut GmRng, _o: &EvalOptions) -> Result<Metrics> {
        let logits = self.logits(&batch.x, batch.labels.as_ref())?;
        Ok(vec![(
            "nll_nats".into(),
            self.output().nll(&logits, &batch.x)?,
        )])
    }

    fn primary_metric(&self) -> &'static str {
        "nll_nats"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_nats")
    }

    /// Raster-order samples; a conditional model cycles through the classes.
    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let labels = (self.num_classes() > 0)
            .then(|| cycle_labels(n, self.num_classes(), self.any_param().device()))
            .transpose()?;
        Ok(Some(self.draw(labels, n, rng)?))
    }

    fn sample_labels(&self, labels: &[u32], rng: &mut GmRng) -> Result<Option<Tensor>> {
        check_labels(labels, self.num_classes())?;
        let y = Tensor::from_slice(labels, labels.len(), self.any_param().device())?;
        Ok(Some(self.draw(Some(y), labels.len(), rng)?))
    }
}
