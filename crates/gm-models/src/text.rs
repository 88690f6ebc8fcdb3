//! A causal language model over BPE tokens (seed 002's "language models" case): the same
//! factorisation as the image models, `p(x) = Π_t p(x_t | x_<t)`, trained by maximum likelihood.
//!
//! The network is a stack of gated, dilated causal 1-D convolutions (WaveNet-style): token
//! embeddings `(B, C, 1, T)`; each layer `h ← h + W_o · gate(causal_conv_d(h))` with dilation
//! `d = 2^(l mod cycle)`; a `ReLU → 1×1 → ReLU → 1×1` head gives `V` logits per position. A
//! causal convolution is [`gm_core::kernels::conv::conv2d_cropped`] with the padding on the left only, so
//! position `t` reads tokens `≤ t`; the receptive field is `1 + (k − 1) Σ_l d_l` tokens.
//!
//! Parameter names: `embedding.weight` `(V, C)`, `layers.{l}.conv`, `layers.{l}.out`, `head.1`,
//! `head.3`.

use crate::nn::Conv2d;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use gm_core::dist::Categorical;
use gm_core::kernels::conv::Conv2dParams;
use gm_core::kernels::ops::{self, gated_tanh, Act};
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TextArConfig {
    /// Vocabulary size of the BPE tokenizer trained on the corpus (the tokenizer may end up with
    /// fewer tokens on a small corpus; the model keeps this many logits).
    pub vocab_size: usize,
    /// Tokens per training window.
    pub context: usize,
    pub channels: usize,
    pub layers: usize,
    /// Kernel width of the causal convolutions.
    pub kernel: usize,
    /// Dilations cycle through `1, 2, …, 2^(cycle − 1)`.
    pub dilation_cycle: usize,
}

impl Default for TextArConfig {
    fn default() -> Self {
        Self {
            vocab_size: 512,
            context: 64,
            channels: 32,
            layers: 4,
            kernel: 3,
            dilation_cycle: 4,
        }
    }
}

impl TextArConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("context", self.context),
            ("channels", self.channels),
            ("layers", self.layers),
            ("dilation_cycle", self.dilation_cycle),
        ] {
            if v == 0 {
                return Err(format!("model.{k} must be > 0"));
            }
        }
        if self.vocab_size < 260 {
            return Err(format!(
                "model.vocab_size must be >= 260 (the 256 byte-level symbols and a few merges), got {}",
                self.vocab_size
            ));
        }
        if self.kernel < 2 {
            return Err(format!("model.kernel must be >= 2, got {}", self.kernel));
        }
        Ok(())
    }

    /// Tokens of left context each prediction sees.
    pub fn receptive_field(&self) -> usize {
        1 + (self.kernel - 1)
            * (0..self.layers)
                .map(|l| 1usize << (l % self.dilation_cycle))
                .sum::<usize>()
    }
}

impl crate::Family for TextArConfig {
    const KIND: &'static str = "text-ar";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Text {
            context: self.context,
        }
    }

    fn validate(&self) -> std::result::Result<(), String> {
        TextArConfig::validate(self)
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(TextAr::new(self.clone(), vb)?))
    }
}

#[derive(Clone, Debug)]
struct Layer {
    conv: Conv2d,
    out: Conv2d,
}

#[derive(Clone, Debug)]
pub struct TextAr {
    cfg: TextArConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    head1: Conv2d,
    head2: Conv2d,
}

impl TextAr {
    pub fn new(cfg: TextArConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let c = cfg.channels;
        let embedding = candle_nn::embedding(cfg.vocab_size, c, vb.pp("embedding"))?;
        let one = Conv2dParams::default();
        let mut layers = Vec::new();
        for l in 0..cfg.layers {
            let d = 1usize << (l % cfg.dilation_cycle);
            let p = Conv2dParams {
                padding: [0, (cfg.kernel - 1) * d],
                dilation: [1, d],
                ..Default::default()
            };
            let lv = vb.pp("layers").pp(l.to_string());
            layers.push(Layer {
                conv: Conv2d::new(c, 2 * c, [1, cfg.kernel], p, true, lv.pp("conv"))?,
                out: Conv2d::new(c, c, [1, 1], one, true, lv.pp("out"))?,
            });
        }
        let head1 = Conv2d::new(c, c, [1, 1], one, true, vb.pp("head.1"))?;
        let head2 = Conv2d::new(c, cfg.vocab_size, [1, 1], one, true, vb.pp("head.3"))?;
        Ok(Self {
            cfg,
            embedding,
            layers,
            head1,
            head2,
        })
    }

    pub fn config(&self) -> &TextArConfig {
        &self.cfg
    }

    /// The device of the parameters.
    pub fn device(&self) -> &candle_core::Device {
        self.head2.weight().device()
    }

    /// Logits `(B, V, T)` of the next token at every position of `tokens` `(B, T)` (u32).
    pub fn logits(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let mut h = self
            .embedding
            .forward(tokens)?
            .transpose(1, 2)?
            .unsqueeze(2)?; // (B, C, 1, T)
        for l in &self.layers {
            let g = l
                .conv
                .forward_cropped(&h.contiguous()?, [1, t], Act::Identity)?;
            h = (h + l.out.forward(&gated_tanh(&g)?)?)?;
        }
        let o = self
            .head1
            .forward_act(&ops::act(&h, Act::Relu)?, Act::Relu)?;
        self.head2.forward(&o)?.reshape((b, self.cfg.vocab_size, t))
    }

    /// `−log p(x_t | x_<t)` in nats for `t = 1 … T`, `(B, T)`, from windows `(B, T + 1)`.
    pub fn token_nll(&self, windows: &Tensor) -> Result<Tensor> {
        let t = windows.dim(1)? - 1;
        let logits = self.logits(&windows.narrow(1, 0, t)?)?;
        let target = windows.narrow(1, 1, t)?.contiguous()?;
        Categorical::new(logits, 1)?
            .log_prob_elementwise(&target)?
            .neg()
    }

    /// Continues each row of `prompt` `(B, T0)` by `n` tokens, drawing from the softmax at
    /// `temperature`, restricted to the `top_k` most likely tokens (0 = all). Only the last
    /// `context` tokens are fed back.
    pub fn generate(
        &self,
        prompt: &Tensor,
        n: usize,
        temperature: f64,
        top_k: usize,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        if temperature.is_nan() || temperature <= 0.0 {
            candle_core::bail!("temperature must be > 0, got {temperature}")
        }
        let (b, _) = prompt.dims2()?;
        let mut rows: Vec<Vec<u32>> = prompt.to_vec2::<u32>()?;
        for _ in 0..n {
            let start = rows[0].len().saturating_sub(self.cfg.context);
            let ctx: Vec<u32> = rows.iter().flat_map(|r| r[start..].to_vec()).collect();
            let len = rows[0].len() - start;
            let x = gm_core::traffic::upload(ctx, (b, len), prompt.device())?;
            let last = self
                .logits(&x)?
                .narrow(2, len - 1, 1)?
                .squeeze(2)?
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?;
            for (row, l) in rows.iter_mut().zip(last) {
                row.push(sample_top_k(&l, temperature, top_k, rng));
            }
        }
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        gm_core::traffic::upload(flat, (b, rows[0].len()), prompt.device())
    }
}

/// One draw from `softmax(logits / temperature)` over the `top_k` largest logits (0 = all).
pub fn sample_top_k(logits: &[f64], temperature: f64, top_k: usize, rng: &mut GmRng) -> u32 {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if top_k > 0 && top_k < idx.len() {
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(top_k);
    }
    let m = idx
        .iter()
        .map(|&i| logits[i])
        .fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] - m) / temperature).exp())
        .collect();
    let mut u = rng.uniform_f64() * w.iter().sum::<f64>();
    for (k, wk) in w.iter().enumerate() {
        if u < *wk {
            return idx[k] as u32;
        }
        u -= wk;
    }
    idx[idx.len() - 1] as u32
}

/// Trained through gm's trainer like the image models: a batch is `x` = token windows
/// `(B, context + 1)` (u32), each token predicted from those before it in its window.
impl crate::Model for TextAr {
    fn kind(&self) -> &'static str {
        "text-ar"
    }

    /// The mean `−log p(x_t | x_<t)` over the batch's predicted tokens (nats per token).
    fn loss(&self, batch: &crate::Batch, _rng: &mut GmRng) -> Result<crate::Loss> {
        let total = self.token_nll(&batch.x)?.mean_all()?;
        let bits = (&total / std::f64::consts::LN_2)?;
        Ok(crate::Loss {
            total,
            parts: vec![("bits_per_token", bits)],
        })
    }

    /// `nll_nats`: the summed `−log p(x_t | x_<t)` of each window's predicted tokens, from which
    /// the held-out stream's bits per token and per byte are formed.
    fn eval_metrics(
        &self,
        batch: &crate::Batch,
        _rng: &mut GmRng,
        _opts: &crate::EvalOptions,
    ) -> Result<crate::Metrics> {
        let nll = self.token_nll(&batch.x)?.to_dtype(DType::F64)?.sum(1)?;
        Ok(vec![("nll_nats".to_string(), nll)])
    }

    fn loss_units(&self) -> &'static str {
        "negative log-likelihood, nats per token"
    }

    fn primary_metric(&self) -> &'static str {
        "bits_per_byte"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        None
    }

    /// Text is generated from a prompt through the run's tokenizer (`gm sample`), not here.
    fn sample(&self, _n: usize, _rng: &mut GmRng) -> Result<Option<Tensor>> {
        Ok(None)
    }
}
