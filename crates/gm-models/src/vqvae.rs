//! VQ-VAE (van den Oord et al., 2017, "Neural Discrete Representation Learning") with a K-way
//! Gated PixelCNN prior over its code grid: seed 001's route to sharp samples from a likelihood
//! model.
//!
//! - Stage one (`model.stage = "autoencoder"`): a convolutional encoder maps a `C×H×W` image to
//!   a `D × H/4 × W/4` grid `z_e`; each position takes its nearest of `K` codebook vectors
//!   (`z_q`); the decoder reads `z_q` through the straight-through estimator
//!   (`z_e + sg(z_q − z_e)`: the decoder's gradient reaches the encoder unchanged) and gives
//!   Bernoulli logits. Loss: `−log p(x | z_q) + β‖z_e − sg(z_q)‖²` per image. The codebook is not
//!   trained by gradient: after each optimizer step it moves by exponential moving averages of
//!   the encoder outputs assigned to each code (`N_k ← γN_k + (1−γ)n_k`, `m_k ← γm_k +
//!   (1−γ)Σ z_e`, `e_k = m_k / N̂_k` with Laplace-smoothed counts), and a code whose average
//!   count falls below `dead_code_threshold` restarts at the batch's worst-quantised encoder
//!   output.
//! - Stage two (`model.stage = "prior"`, started with `gm train --init-from` the stage-one run):
//!   the encoder, decoder and codebook are frozen and a Gated PixelCNN with `K`-way outputs,
//!   reading embedded codes, is fit by maximum likelihood on the code grids of the data. One
//!   checkpoint then holds both stages; sampling draws a code grid from the prior and decodes it.
//!
//! `gm eval` reports, in nats per image, the bound `−log p(x) ≤ −log p(x | z_q) − log p(z_q)`
//! (`bound_nats`: the deterministic encoder's posterior is a point mass on `z_q`, whose entropy is
//! 0), with the prior's `−log p(z_q)` (`prior_nats`; in stage one the uniform prior's
//! `(H/4)(W/4)·ln K`), the reconstruction's `recon_nats` and squared error `recon_mse`, and the
//! codebook's perplexity over each evaluation batch (`perplexity`; `K` = every code equally used)
//! and the number of codes that batch uses (`codes_used`); training logs both per batch.

use crate::gated_pixelcnn::{GatedPixelCnn, GatedPixelCnnConfig};
use crate::nn::{Conv2d, ConvTranspose2d};
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use gm_core::dist::Bernoulli;
use gm_core::kernels::conv::Conv2dParams;
use gm_core::kernels::ops::{self, Act};
use gm_core::{sum_per_sample, GmRng};
use serde::{Deserialize, Serialize};
use std::cell::Cell;

/// Which stage a VQ-VAE run trains.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Encoder, decoder and codebook.
    #[default]
    Autoencoder,
    /// The prior over code grids, on the frozen autoencoder.
    Prior,
}

/// The prior's Gated PixelCNN over the `H/4 × W/4` code grid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PriorConfig {
    /// Width of the code embedding the network reads.
    pub code_embedding: usize,
    pub channels: usize,
    pub layers: usize,
    pub first_kernel: usize,
    pub kernel: usize,
    pub head_channels: usize,
}

impl Default for PriorConfig {
    fn default() -> Self {
        Self {
            code_embedding: 16,
            channels: 32,
            layers: 4,
            first_kernel: 5,
            kernel: 3,
            head_channels: 32,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VqVaeConfig {
    /// `[C, H, W]` (C colour channels, 1 grey or 3 RGB), `H` and `W` divisible by 4.
    pub image_shape: [usize; 3],
    /// Channels of the convolutional encoder and decoder.
    pub hidden: usize,
    /// Residual blocks after the encoder's and before the decoder's resampling.
    pub res_blocks: usize,
    /// `D`, the width of a code vector.
    pub embedding_dim: usize,
    /// `K`, the number of codes.
    pub codebook_size: usize,
    /// Commitment weight `β`.
    pub beta: f64,
    /// `γ` of the codebook's moving averages.
    pub ema_decay: f64,
    /// Laplace smoothing `ε` of the averaged counts.
    pub ema_eps: f64,
    /// A code whose averaged count falls below this restarts (0 = never).
    pub dead_code_threshold: f64,
    pub stage: Stage,
    pub prior: PriorConfig,
}

impl Default for VqVaeConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            hidden: 32,
            res_blocks: 1,
            embedding_dim: 8,
            codebook_size: 32,
            beta: 0.25,
            ema_decay: 0.99,
            ema_eps: 1e-5,
            dead_code_threshold: 0.5,
            stage: Stage::Autoencoder,
            prior: PriorConfig::default(),
        }
    }
}

impl VqVaeConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let [c, h, w] = self.image_shape;
        if c == 0 || h == 0 || w == 0 || h % 4 != 0 || w % 4 != 0 {
            return Err(format!(
                "model.image_shape must be [C, H, W] with H, W multiples of 4, got {:?}",
                self.image_shape
            ));
        }
        for (k, v) in [
            ("hidden", self.hidden),
            ("embedding_dim", self.embedding_dim),
            ("prior.code_embedding", self.prior.code_embedding),
        ] {
            if v == 0 {
                return Err(format!("model.{k} must be > 0"));
            }
        }
        if self.codebook_size < 2 {
            return Err(format!(
                "model.codebook_size must be >= 2, got {}",
                self.codebook_size
            ));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(format!("model.beta must be >= 0, got {}", self.beta));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(format!(
                "model.ema_decay must be in [0, 1), got {}",
                self.ema_decay
            ));
        }
        if !(self.ema_eps > 0.0 && self.ema_eps.is_finite()) {
            return Err(format!("model.ema_eps must be > 0, got {}", self.ema_eps));
        }
        if !(self.dead_code_threshold >= 0.0 && self.dead_code_threshold.is_finite()) {
            return Err(format!(
                "model.dead_code_threshold must be >= 0, got {}",
                self.dead_code_threshold
            ));
        }
        self.prior_net_config()
            .validate()
            .map_err(|e| e.replace("model.", "model.prior."))
    }

    /// The code grid `[H/4, W/4]`.
    pub fn grid(&self) -> [usize; 2] {
        [self.image_shape[1] / 4, self.image_shape[2] / 4]
    }

    fn prior_net_config(&self) -> GatedPixelCnnConfig {
        let [gh, gw] = self.grid();
        let p = &self.prior;
        GatedPixelCnnConfig {
            image_shape: [1, gh, gw],
            channels: p.channels,
            layers: p.layers,
            first_kernel: p.first_kernel,
            kernel: p.kernel,
            head_channels: p.head_channels,
            ..Default::default()
        }
    }
}

impl crate::Family for VqVaeConfig {
    const KIND: &'static str = "vqvae";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        VqVaeConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        crate::PixelData::Binary
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(VqVae::new(self.clone(), vb)?))
    }
}

/// `x + conv1×1(relu(conv3×3(relu(x))))`.
#[derive(Clone, Debug)]
struct ResBlock {
    c3: Conv2d,
    c1: Conv2d,
}

impl ResBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let p3 = Conv2dParams::default().padding(1);
        Ok(Self {
            c3: Conv2d::new(c, c, [3, 3], p3, true, vb.pp("conv3"))?,
            c1: Conv2d::new(c, c, [1, 1], Conv2dParams::default(), true, vb.pp("conv1"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c3.forward_act(&ops::act(x, Act::Relu)?, Act::Relu)?;
        x + self.c1.forward(&h)?
    }
}

/// The straight-through estimator: the value of `z_q`, the gradient of `z_e`.
pub fn straight_through(z_e: &Tensor, z_q: &Tensor) -> Result<Tensor> {
    z_e + (z_q - z_e)?.detach()
}

/// The codebook's state after one moving-average step, and which codes restarted.
#[derive(Debug)]
pub struct EmaStep {
    pub count: Tensor,
    pub sum: Tensor,
    pub codebook: Tensor,
    pub restarted: usize,
}

/// One moving-average step of a codebook `(K, D)` with averaged counts `count (K,)` and sums
/// `sum (K, D)`, from encoder outputs `z (N, D)` with nearest codes `codes (N,)` and their squared
/// quantisation errors `err (N,)`: `N_k ← γN_k + (1−γ)n_k`, `m_k ← γm_k + (1−γ)Σ_{i→k} z_i`,
/// `e_k = m_k / N̂_k`, `N̂_k = (N_k + ε)/(ΣN + Kε)·ΣN`. Codes with `N_k < threshold` restart at
/// the encoder outputs with the largest errors (`N_k = 1`, `m_k = e_k = z`).
pub fn ema_step(
    count: &Tensor,
    sum: &Tensor,
    z: &Tensor,
    codes: &Tensor,
    err: &Tensor,
    [decay, eps, threshold]: [f64; 3],
) -> Result<EmaStep> {
    let k = count.dim(0)?;
    let onehot = one_hot(codes, k, z.dtype())?; // (N, K)
    let n = onehot.sum(0)?;
    let s = onehot.t()?.matmul(z)?; // (K, D)
    let count = ((count * decay)? + (n * (1.0 - decay))?)?;
    let sum = ((sum * decay)? + (s * (1.0 - decay))?)?;
    let total = count.sum_all()?;
    let denom = total.affine(1.0, k as f64 * eps)?;
    let smoothed = (&count + eps)?
        .broadcast_div(&denom)?
        .broadcast_mul(&total)?;
    let codebook = sum.broadcast_div(&smoothed.unsqueeze(1)?)?;
    // Dead codes restart at the worst-quantised outputs, one each.
    let counts: Vec<f64> = count.to_dtype(DType::F64)?.to_vec1()?;
    let dead: Vec<usize> = (0..k).filter(|&j| counts[j] < threshold).collect();
    if dead.is_empty() {
        return Ok(EmaStep {
            count,
            sum,
            codebook,
            restarted: 0,
        });
    }
    let errs: Vec<f64> = err.to_dtype(DType::F64)?.to_vec1()?;
    let mut order: Vec<usize> = (0..errs.len()).collect();
    order.sort_by(|&a, &b| errs[b].total_cmp(&errs[a]).then(a.cmp(&b)));
    let (mut cv, mut sv, mut ev) = (counts, to_rows(&sum)?, to_rows(&codebook)?);
    let zs = to_rows(z)?;
    let mut restarted = 0;
    for (j, &i) in dead.iter().zip(order.iter()) {
        cv[*j] = 1.0;
        sv[*j] = zs[i].clone();
        ev[*j] = zs[i].clone();
        restarted += 1;
    }
    let (dev, dt) = (z.device(), z.dtype());
    let d = z.dim(1)?;
    let rows = |v: Vec<Vec<f64>>| -> Result<Tensor> {
        Tensor::from_vec(v.concat(), (k, d), dev)?.to_dtype(dt)
    };
    Ok(EmaStep {
        count: Tensor::from_vec(cv, k, dev)?.to_dtype(dt)?,
        sum: rows(sv)?,
        codebook: rows(ev)?,
        restarted,
    })
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    t.to_dtype(DType::F64)?.to_vec2()
}

/// `(N,)` u32 indices to a `(N, K)` one-hot matrix.
fn one_hot(codes: &Tensor, k: usize, dtype: DType) -> Result<Tensor> {
    let n = codes.dim(0)?;
    let ids = Tensor::arange(0u32, k as u32, codes.device())?
        .unsqueeze(0)?
        .broadcast_as((n, k))?;
    codes
        .unsqueeze(1)?
        .broadcast_as((n, k))?
        .eq(&ids)?
        .to_dtype(dtype)
}

/// The codes' perplexity `exp(H(p̄))` of the mean assignment `p̄` over `codes`, and how many
/// distinct codes they use.
fn usage(codes: &Tensor, k: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let p = one_hot(codes, k, dtype)?.mean(0)?;
    let h = (&p * (&p + 1e-10)?.log()?)?.sum_all()?.neg()?;
    let used = p.gt(0.0)?.to_dtype(dtype)?.sum_all()?;
    Ok((h.exp()?, used))
}

pub struct VqVae {
    cfg: VqVaeConfig,
    enc1: Conv2d,
    enc2: Conv2d,
    enc_res: Vec<ResBlock>,
    enc_out: Conv2d,
    dec_in: Conv2d,
    dec_res: Vec<ResBlock>,
    dec1: ConvTranspose2d,
    dec2: ConvTranspose2d,
    codebook: Tensor,
    ema_count: Tensor,
    ema_sum: Tensor,
    code_embed: Embedding,
    prior: GatedPixelCnn,
    /// Stage two has checked once that it starts from a trained codebook.
    checked: Cell<bool>,
    /// The averaged sums have left their all-zero start (see [`VqVae::ema_sum_or_init`]).
    ema_started: Cell<bool>,
}

impl VqVae {
    pub fn new(cfg: VqVaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let (h, d, k) = (cfg.hidden, cfg.embedding_dim, cfg.codebook_size);
        let c = cfg.image_shape[0];
        let s2 = Conv2dParams::default().stride(2).padding(1);
        let one = Conv2dParams::default();
        let e = vb.pp("encoder");
        let dv = vb.pp("decoder");
        let q = vb.pp("quantizer");
        let codebook = q.get_with_hints(
            (k, d),
            "codebook",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        // The averages start as one assignment per code at its initial vector, so e = m / N.
        let ema_count = q.get_with_hints(k, "ema_count", candle_nn::Init::Const(1.0))?;
        let ema_sum = q.get_with_hints((k, d), "ema_sum", candle_nn::Init::Const(0.0))?;
        let p = vb.pp("prior");
        Ok(Self {
            enc1: Conv2d::new(c, h, [4, 4], s2, true, e.pp("conv1"))?,
            enc2: Conv2d::new(h, h, [4, 4], s2, true, e.pp("conv2"))?,
            enc_res: (0..cfg.res_blocks)
                .map(|i| ResBlock::new(h, e.pp(format!("res.{i}"))))
                .collect::<Result<_>>()?,
            enc_out: Conv2d::new(h, d, [1, 1], one, true, e.pp("out"))?,
            dec_in: Conv2d::new(d, h, [3, 3], one.padding(1), true, dv.pp("in"))?,
            dec_res: (0..cfg.res_blocks)
                .map(|i| ResBlock::new(h, dv.pp(format!("res.{i}"))))
                .collect::<Result<_>>()?,
            dec1: ConvTranspose2d::new(h, h, [4, 4], s2, [0, 0], dv.pp("up1"))?,
            dec2: ConvTranspose2d::new(h, c, [4, 4], s2, [0, 0], dv.pp("up2"))?,
            codebook,
            ema_count,
            ema_sum,
            code_embed: candle_nn::embedding(k, cfg.prior.code_embedding, p.pp("code_embed"))?,
            prior: GatedPixelCnn::with_io(
                cfg.prior_net_config(),
                cfg.prior.code_embedding,
                k,
                p.pp("net"),
            )?,
            checked: Cell::new(false),
            ema_started: Cell::new(false),
            cfg,
        })
    }

    pub fn config(&self) -> &VqVaeConfig {
        &self.cfg
    }

    /// `z_e`, `(B, D, H/4, W/4)`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.enc1.forward_act(x, Act::Relu)?;
        h = self.enc2.forward_act(&h, Act::Relu)?;
        for r in &self.enc_res {
            h = r.forward(&h)?;
        }
        self.enc_out.forward(&ops::act(&h, Act::Relu)?)
    }

    /// Bernoulli logits `(B, C, H, W)` from a code-vector grid `(B, D, H/4, W/4)`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.dec_in.forward(z)?;
        for r in &self.dec_res {
            h = r.forward(&h)?;
        }
        let h = self
            .dec1
            .forward_act(&ops::act(&h, Act::Relu)?, Act::Relu)?;
        self.dec2.forward(&h)
    }

    /// Nearest codes of `z_e` `(B, D, h, w)`: indices `(B·h·w,)` in raster order per image, the
    /// encoder outputs as rows `(B·h·w, D)`, and the squared distances to their codes.
    pub fn quantize(&self, z_e: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, d, h, w) = z_e.dims4()?;
        let z = z_e.permute((0, 2, 3, 1))?.reshape((b * h * w, d))?;
        let e = &self.codebook;
        // ‖z − e‖² = ‖z‖² − 2 z·e + ‖e‖².
        let dist = z
            .sqr()?
            .sum_keepdim(1)?
            .broadcast_sub(&(z.matmul(&e.t()?)? * 2.0)?)?
            .broadcast_add(&e.sqr()?.sum(1)?.unsqueeze(0)?)?;
        let codes = dist.argmin(D::Minus1)?;
        let err = dist.min(D::Minus1)?;
        Ok((codes, z, err))
    }

    /// Code vectors `(B, D, h, w)` of code indices `(B·h·w,)`.
    pub fn lookup(&self, codes: &Tensor, b: usize) -> Result<Tensor> {
        let [gh, gw] = self.cfg.grid();
        self.codebook
            .index_select(codes, 0)?
            .reshape((b, gh, gw, self.cfg.embedding_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// `−log p(codes)` per image under the prior, `(B,)` nats; `codes` `(B·h·w,)`.
    pub fn prior_nll(&self, codes: &Tensor, b: usize) -> Result<Tensor> {
        let [gh, gw] = self.cfg.grid();
        let emb = self
            .code_embed
            .forward(codes)?
            .reshape((b, gh, gw, self.cfg.prior.code_embedding))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let logits = self.prior.logits(&emb, None)?; // (B, K, h·w)
        let logp = candle_nn::ops::log_softmax(&logits, 1)?;
        let idx = codes.reshape((b, 1, gh * gw))?;
        logp.gather(&idx, 1)?.squeeze(1)?.sum(1)?.neg()
    }

    /// Per image: reconstruction `−log p(x | z_q)`, the commitment `‖z_e − sg(z_q)‖²`, the codes.
    fn forward_parts(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let b = x.dim(0)?;
        let z_e = self.encode(x)?;
        let (codes, _, _) = self.quantize(&z_e.detach())?;
        let z_q = self.lookup(&codes, b)?;
        let logits = self.decode(&straight_through(&z_e, &z_q)?)?;
        let recon = Bernoulli::new(logits.reshape((b, ()))?)
            .log_prob(&x.reshape((b, ()))?)?
            .neg()?;
        let commit = sum_per_sample(&(&z_e - z_q.detach())?.sqr()?)?;
        Ok((recon, commit, codes, logits))
    }

    fn check_trained(&self) -> Result<()> {
        if self.checked.get() {
            return Ok(());
        }
        let k = self.cfg.codebook_size as f64;
        let total = gm_core::traffic::read_f64(&self.ema_count.sum_all()?)?;
        if (total - k).abs() < 1e-6 {
            candle_core::bail!(
                "model.stage = \"prior\" fits the prior of a trained VQ-VAE, but this codebook is untrained: start it with `gm train --init-from RUN` of the autoencoder's run"
            )
        }
        self.checked.set(true);
        Ok(())
    }

    /// Draws `n` code grids from the prior in raster order, `(n·h·w,)` u32.
    pub fn sample_codes(&self, n: usize, rng: &mut GmRng) -> Result<Tensor> {
        let [gh, gw] = self.cfg.grid();
        let dev = self.codebook.device();
        let mut codes = vec![0u32; n * gh * gw];
        for pos in 0..gh * gw {
            let c = Tensor::from_slice(&codes, n * gh * gw, dev)?;
            let emb = self
                .code_embed
                .forward(&c)?
                .reshape((n, gh, gw, self.cfg.prior.code_embedding))?
                .permute((0, 3, 1, 2))?
                .contiguous()?;
            let p = candle_nn::ops::softmax(&self.prior.logits(&emb, None)?, 1)?
                .narrow(2, pos, 1)?
                .squeeze(2)?
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?;
            for (i, row) in p.iter().enumerate() {
                codes[i * gh * gw + pos] = crate::ar::draw_index(row, rng) as u32;
            }
        }
        Tensor::from_slice(&codes, n * gh * gw, dev)
    }
}

impl Model for VqVae {
    fn kind(&self) -> &'static str {
        "vqvae"
    }

    /// Stage two's prior (a Gated PixelCNN) checkpoints; stage one's autoencoder does not.
    fn gradient_checkpointing(&self) -> bool {
        self.cfg.stage == Stage::Prior
    }

    fn loss(&self, batch: &Batch, _rng: &mut GmRng) -> Result<Loss> {
        let b = batch.x.dim(0)?;
        match self.cfg.stage {
            Stage::Autoencoder => {
                let (recon, commit, codes, _) = self.forward_parts(&batch.x)?;
                let recon = recon.mean(0)?;
                let commit = (commit.mean(0)? * self.cfg.beta)?;
                let (ppl, used) = usage(&codes, self.cfg.codebook_size, batch.x.dtype())?;
                Ok(Loss {
                    total: (&recon + &commit)?,
                    parts: vec![
                        ("recon", recon),
                        ("commit", commit),
                        ("perplexity", ppl),
                        ("codes_used", used),
                    ],
                })
            }
            Stage::Prior => {
                self.check_trained()?;
                let z_e = self.encode(&batch.x)?.detach();
                let (codes, _, _) = self.quantize(&z_e)?;
                let nll = self.prior_nll(&codes, b)?.mean(0)?;
                Ok(Loss {
                    total: nll.clone(),
                    parts: vec![("prior_nll", nll)],
                })
            }
        }
    }

    fn eval_metrics(&self, batch: &Batch, _rng: &mut GmRng, _o: &EvalOptions) -> Result<Metrics> {
        let x = &batch.x;
        let b = x.dim(0)?;
        let (recon, _, codes, logits) = self.forward_parts(x)?;
        let prior = match self.cfg.stage {
            Stage::Prior => self.prior_nll(&codes, b)?,
            Stage::Autoencoder => {
                let [gh, gw] = self.cfg.grid();
                let u = (gh * gw) as f64 * (self.cfg.codebook_size as f64).ln();
                Tensor::full(u, b, x.device())?.to_dtype(recon.dtype())?
            }
        };
        let bound = (&recon + &prior)?;
        let d = x.elem_count() / b;
        let probs = candle_nn::ops::sigmoid(&logits)?;
        let mse = (sum_per_sample(&(probs - x)?.sqr()?)? / d as f64)?;
        let (ppl, used) = usage(&codes, self.cfg.codebook_size, recon.dtype())?;
        Ok(vec![
            (
                "bits_per_dim".into(),
                (&bound / (d as f64 * std::f64::consts::LN_2))?,
            ),
            ("bound_nats".into(), bound),
            ("recon_nats".into(), recon),
            ("prior_nats".into(), prior),
            ("recon_mse".into(), mse),
            ("perplexity".into(), ppl.broadcast_as(b)?.contiguous()?),
            ("codes_used".into(), used.broadcast_as(b)?.contiguous()?),
        ])
    }

    fn likelihood_estimate(&self) -> &'static str {
        "bound (codes' prior + decoder)"
    }

    fn loss_units(&self) -> &'static str {
        match self.cfg.stage {
            Stage::Autoencoder => "reconstruction nats per image + beta x commitment",
            _ => "negative log-likelihood of the codes, nats per image",
        }
    }

    fn primary_metric(&self) -> &'static str {
        "bound_nats"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("bound_nats")
    }

    /// Stage two: a code grid from the prior, decoded (Bernoulli means). Stage one: uniformly
    /// drawn codes, decoded.
    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let [gh, gw] = self.cfg.grid();
        let codes = match self.cfg.stage {
            Stage::Prior => self.sample_codes(n, rng)?,
            Stage::Autoencoder => {
                let k = self.cfg.codebook_size as u64;
                let v: Vec<u32> = (0..n * gh * gw)
                    .map(|_| (rng.next_u64() % k) as u32)
                    .collect();
                Tensor::from_vec(v, n * gh * gw, self.codebook.device())?
            }
        };
        let logits = self.decode(&self.lookup(&codes, n)?)?;
        Ok(Some(candle_nn::ops::sigmoid(&logits)?.detach()))
    }

    fn reconstruct(&self, batch: &Batch, _rng: &mut GmRng) -> Result<Option<Tensor>> {
        let (_, _, _, logits) = self.forward_parts(&batch.x)?;
        Ok(Some(candle_nn::ops::sigmoid(&logits)?.detach()))
    }

    /// Stage one: the codebook's moving-average step on this batch's encoder outputs.
    fn after_step_update(&self, batch: &Batch) -> Result<Option<Vec<(String, Tensor)>>> {
        if self.cfg.stage != Stage::Autoencoder {
            return Ok(None);
        }
        let z_e = self.encode(&batch.x)?.detach();
        let (codes, z, err) = self.quantize(&z_e)?;
        let c = &self.cfg;
        let s = ema_step(
            &self.ema_count,
            &self.ema_sum_or_init()?,
            &z,
            &codes,
            &err,
            [c.ema_decay, c.ema_eps, c.dead_code_threshold],
        )?;
        Ok(Some(vec![
            ("quantizer.ema_count".into(), s.count),
            ("quantizer.ema_sum".into(), s.sum),
            ("quantizer.codebook".into(), s.codebook),
        ]))
    }
}

impl VqVae {
    /// The averaged sums; before the first step (all zero) the initial codebook, so that
    /// `e = m / N` holds from the start with `N = 1`.
    fn ema_sum_or_init(&self) -> Result<Tensor> {
        if !self.ema_started.get() {
            let zero = gm_core::traffic::read_f64(&self.ema_sum.abs()?.sum_all()?)? == 0.0;
            if zero {
                return Ok(self.codebook.clone());
            }
            self.ema_started.set(true);
        }
        Ok(self.ema_sum.clone())
    }
}
