//! Variational autoencoder (Kingma & Welling, 2014), with β-VAE weighting (Higgins et al., 2017)
//! and the importance-weighted bound of Burda et al. (2016) for evaluation.
//!
//! Seed 001's reading: for one image, `log p(x) = ELBO(q) + KL(q(z|x) ‖ p(z|x))`, so maximising the
//! ELBO over the encoder tightens the bound (the variational E-step) and over the decoder raises
//! the likelihood (the M-step). The encoder amortises the E-step over all images.
//!
//! Architectures: `mlp` (fully connected) and `conv` (two stride-2 4×4 convolutions, mirrored by
//! transposed convolutions). Likelihoods: `bernoulli` on binarised pixels, `gaussian` on
//! dequantised pixels in `[0, 1]` with a fixed or learned per-pixel variance.
//!
//! Units: every metric is in nats per image. For the Gaussian decoder the continuous density on
//! `[0, 1]` is converted to the 256-level discrete scale by adding `D·ln 256` (uniform
//! dequantisation bound), so its numbers are comparable to other models on 8-bit images.
//!
//! Parameter names follow this PyTorch module (`scripts/vae_torch.py`):
//! `encoder.*` (Sequential), `fc_mu`, `fc_logvar`, `decoder.*` (Sequential), `decoder_log_var`.

use crate::nn::{Conv2d, ConvTranspose2d, Linear, Mlp};
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use gm_core::dist::{Bernoulli, DiagonalGaussian, StandardNormal};
use gm_core::kernels::conv::Conv2dParams;
use gm_core::kernels::ops::Act;
use gm_core::GmRng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    #[default]
    Mlp,
    Conv,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Likelihood {
    /// Independent Bernoulli pixels; the data must be binarised.
    #[default]
    Bernoulli,
    /// Independent Gaussian pixels on dequantised `[0, 1]` data.
    Gaussian,
}

/// VAE hyper-parameters. `Default` is a tiny smoke-test size; see `models/vae-*.toml`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VaeConfig {
    pub arch: Arch,
    /// `[C, H, W]`; `conv` needs H and W divisible by 4.
    pub image_shape: [usize; 3],
    pub latent_dim: usize,
    /// Hidden widths of the MLP encoder (the decoder mirrors them); for `conv`, the first entry
    /// is the width of the dense layer after the convolutions.
    pub hidden: Vec<usize>,
    /// Channels of the two convolutions (`conv` only).
    pub channels: [usize; 2],
    pub likelihood: Likelihood,
    /// Gaussian decoder: a fixed standard deviation, or `None` to learn a per-pixel log-variance.
    pub decoder_std: Option<f64>,
    /// Weight of the KL term (β-VAE); 1 is the ELBO.
    pub beta: f64,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            arch: Arch::Mlp,
            image_shape: [1, 28, 28],
            latent_dim: 8,
            hidden: vec![64],
            channels: [8, 16],
            likelihood: Likelihood::Bernoulli,
            decoder_std: None,
            beta: 1.0,
        }
    }
}

impl VaeConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let [c, h, w] = self.image_shape;
        if c == 0 || h == 0 || w == 0 {
            return Err(format!(
                "model.image_shape must be positive, got {:?}",
                self.image_shape
            ));
        }
        if self.latent_dim == 0 {
            return Err("model.latent_dim must be > 0".into());
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return Err(format!(
                "model.hidden must be non-empty and positive, got {:?}",
                self.hidden
            ));
        }
        if self.arch == Arch::Conv {
            if h % 4 != 0 || w % 4 != 0 {
                return Err(format!(
                    "model.image_shape: conv VAE needs H, W divisible by 4, got {h}x{w}"
                ));
            }
            if self.channels.contains(&0) {
                return Err("model.channels must be positive".into());
            }
        }
        if self.beta.is_nan() || self.beta < 0.0 {
            return Err(format!("model.beta must be >= 0, got {}", self.beta));
        }
        if let Some(s) = self.decoder_std {
            if s.is_nan() || s <= 0.0 {
                return Err(format!("model.decoder_std must be > 0, got {s}"));
            }
        }
        Ok(())
    }

    fn dims(&self) -> usize {
        self.image_shape.iter().product()
    }
}

impl crate::Family for VaeConfig {
    const KIND: &'static str = "vae";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        VaeConfig::validate(self)
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(Vae::new(self.clone(), vb)?))
    }
}

#[derive(Clone, Debug)]
enum Encoder {
    Mlp(Mlp),
    Conv { c1: Conv2d, c2: Conv2d, fc: Linear },
}

#[derive(Clone, Debug)]
enum Decoder {
    Mlp(Mlp),
    Conv {
        fc1: Linear,
        fc2: Linear,
        t1: ConvTranspose2d,
        t2: ConvTranspose2d,
    },
}

/// The variational autoencoder.
#[derive(Clone, Debug)]
pub struct Vae {
    cfg: VaeConfig,
    encoder: Encoder,
    fc_mu: Linear,
    fc_logvar: Linear,
    decoder: Decoder,
    decoder_log_var: Option<Tensor>,
}

impl Vae {
    pub fn new(cfg: VaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let [c, h, w] = cfg.image_shape;
        let d = cfg.dims();
        let l = cfg.latent_dim;
        let s2 = Conv2dParams::default().stride(2).padding(1);
        let (encoder, enc_out, decoder) = match cfg.arch {
            Arch::Mlp => {
                let mut dims = vec![d];
                dims.extend(&cfg.hidden);
                let enc = Mlp::new(&dims, true, vb.pp("encoder"))?;
                let mut ddims = vec![l];
                ddims.extend(cfg.hidden.iter().rev());
                ddims.push(d);
                let dec = Mlp::new(&ddims, false, vb.pp("decoder"))?;
                (
                    Encoder::Mlp(enc),
                    *cfg.hidden.last().unwrap(),
                    Decoder::Mlp(dec),
                )
            }
            Arch::Conv => {
                let [c1, c2] = cfg.channels;
                let flat = c2 * (h / 4) * (w / 4);
                let hid = cfg.hidden[0];
                let e = vb.pp("encoder");
                let enc = Encoder::Conv {
                    c1: Conv2d::new(c, c1, [4, 4], s2, true, e.pp("0"))?,
                    c2: Conv2d::new(c1, c2, [4, 4], s2, true, e.pp("2"))?,
                    fc: Linear::new(flat, hid, e.pp("5"))?,
                };
                let dv = vb.pp("decoder");
                let dec = Decoder::Conv {
                    fc1: Linear::new(l, hid, dv.pp("0"))?,
                    fc2: Linear::new(hid, flat, dv.pp("2"))?,
                    t1: ConvTranspose2d::new(c2, c1, [4, 4], s2, [0, 0], dv.pp("5"))?,
                    t2: ConvTranspose2d::new(c1, c, [4, 4], s2, [0, 0], dv.pp("7"))?,
                };
                (enc, hid, dec)
            }
        };
        let fc_mu = Linear::new(enc_out, l, vb.pp("fc_mu"))?;
        let fc_logvar = Linear::new(enc_out, l, vb.pp("fc_logvar"))?;
        let decoder_log_var = match (cfg.likelihood, cfg.decoder_std) {
            (Likelihood::Gaussian, None) => Some(vb.get_with_hints(
                (c, h, w),
                "decoder_log_var",
                candle_nn::Init::Const(0.0),
            )?),
            _ => None,
        };
        Ok(Self {
            cfg,
            encoder,
            fc_mu,
            fc_logvar,
            decoder,
            decoder_log_var,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The approximate posterior `q(z | x)`.
    ///
    /// # Shapes
    /// - `x`: `(B, C, H, W)`; the returned mean and log-variance are `(B, latent_dim)`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let h = match &self.encoder {
            Encoder::Mlp(m) => m.forward(&x.flatten_from(1)?)?,
            Encoder::Conv { c1, c2, fc } => {
                let h = c1.forward_act(x, Act::Relu)?; // (b, c1, h/2, w/2)
                let h = c2.forward_act(&h, Act::Relu)?; // (b, c2, h/4, w/4)
                fc.forward_act(&h.flatten_from(1)?, Act::Relu)?
            }
        };
        Ok(DiagonalGaussian::new(
            self.fc_mu.forward(&h)?,
            self.fc_logvar.forward(&h)?,
        ))
    }

    /// The decoder's output (Bernoulli logits or Gaussian means) for latents `(N, latent_dim)`,
    /// shaped `(N, C, H, W)`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        let [c, h, w] = self.cfg.image_shape;
        match &self.decoder {
            Decoder::Mlp(m) => m.forward(z)?.reshape((n, c, h, w)),
            Decoder::Conv { fc1, fc2, t1, t2 } => {
                let x = fc1.forward_act(z, Act::Relu)?;
                let x = fc2.forward_act(&x, Act::Relu)?;
                let x = x.reshape((n, self.cfg.channels[1], h / 4, w / 4))?;
                let x = t1.forward_act(&x, Act::Relu)?; // (n, c1, h/2, w/2)
                t2.forward(&x) // (n, c, h, w)
            }
        }
    }

    /// `log p(x | z)` per image for decoder output `out`, `(N,)`, in nats on the data's own scale.
    fn log_px_given_z(&self, out: &Tensor, x: &Tensor) -> Result<Tensor> {
        match self.cfg.likelihood {
            Likelihood::Bernoulli => Bernoulli::new(out.clone()).log_prob(x),
            Likelihood::Gaussian => {
                let log_var = match (&self.decoder_log_var, self.cfg.decoder_std) {
                    (Some(lv), _) => lv.unsqueeze(0)?.broadcast_as(out.shape())?,
                    (None, Some(s)) => out.ones_like()?.affine(0.0, 2.0 * s.ln())?,
                    (None, None) => unreachable!("validated: learned variance exists"),
                };
                DiagonalGaussian::new(out.clone(), log_var).log_prob(x)
            }
        }
    }

    /// Nats added to convert a density on `[0, 1]`-scaled data into a bound on the 8-bit
    /// discrete likelihood (zero for the Bernoulli decoder, which is already discrete).
    fn discrete_offset(&self) -> f64 {
        match self.cfg.likelihood {
            Likelihood::Bernoulli => 0.0,
            Likelihood::Gaussian => self.cfg.dims() as f64 * 256f64.ln(),
        }
    }

    fn to_image(&self, out: &Tensor) -> Result<Tensor> {
        match self.cfg.likelihood {
            Likelihood::Bernoulli => candle_nn::ops::sigmoid(out),
            Likelihood::Gaussian => out.clamp(0f32, 1f32),
        }
    }

    /// Log importance weights `log p(x, z_k) − log q(z_k | x)` for `k` posterior samples.
    ///
    /// # Shapes
    /// - `x`: `(B, C, H, W)`; returns `(k, B)`.
    pub fn log_weights(
        &self,
        x: &Tensor,
        k: usize,
        rng: &mut GmRng,
        max_pairs: usize,
    ) -> Result<Tensor> {
        let mut parts = Vec::new();
        self.for_log_weights(x, k, rng, max_pairs, |lw| {
            parts.push(lw);
            Ok(())
        })?;
        Tensor::cat(&parts, 0)
    }

    /// The mean and the log-mean-exp over `k` samples of [`Vae::log_weights`], per image `(B,)`
    /// f64, accumulated chunk by chunk: memory is bounded by `max_pairs` whatever `k` is. Not
    /// differentiable: each chunk's graph is dropped once its weights are summed (kept, the
    /// graphs of all chunks held every decoder activation of the evaluation, 4.3 GB for
    /// IWAE-1000 of 100 digits).
    pub fn log_weight_stats(
        &self,
        x: &Tensor,
        k: usize,
        rng: &mut GmRng,
        max_pairs: usize,
    ) -> Result<(Tensor, Tensor)> {
        // Σ lw, and log Σ exp(lw) as (running max m, Σ exp(lw − m)).
        let mut acc: Option<(Tensor, Tensor, Tensor)> = None;
        self.for_log_weights(x, k, rng, max_pairs, |lw| {
            let lw = lw.detach().to_dtype(DType::F64)?;
            let sum = lw.sum(0)?;
            let cm = lw.max(0)?;
            acc = Some(match acc.take() {
                None => {
                    let se = lw.broadcast_sub(&cm.unsqueeze(0)?)?.exp()?.sum(0)?;
                    (sum, cm, se)
                }
                Some((s0, m0, se0)) => {
                    let m = m0.maximum(&cm)?;
                    let se = ((se0 * (&m0 - &m)?.exp()?)?
                        + lw.broadcast_sub(&m.unsqueeze(0)?)?.exp()?.sum(0)?)?;
                    ((s0 + sum)?, m, se)
                }
            });
            Ok(())
        })?;
        let (sum, m, se) = acc.ok_or_else(|| candle_core::Error::Msg("k must be > 0".into()))?;
        let kf = k as f64;
        Ok(((sum / kf)?, ((m + se.log()?)? - kf.ln())?))
    }

    /// Calls `f` with each chunk `(kc, B)` of the `k` log-weights, in order.
    fn for_log_weights(
        &self,
        x: &Tensor,
        k: usize,
        rng: &mut GmRng,
        max_pairs: usize,
        mut f: impl FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let b = x.dim(0)?;
        let q = self.encode(x)?;
        let std = q.std()?;
        let l = self.cfg.latent_dim;
        // `max_pairs` is counted in 784-value (MNIST-sized) images: larger images decode
        // proportionally fewer pairs at once, so memory stays about the same.
        let d = self.cfg.dims();
        let pairs = if d > 784 {
            max_pairs * 784 / d
        } else {
            max_pairs
        };
        // And no chunk's decoder output over CHUNK_VALUES: larger buffers are mapped afresh by
        // glibc on every allocation (past its largest mmap threshold, 32 MiB) and faulted in page
        // by page — 30% of an IWAE-1000 evaluation's time at 20,000 pairs of 784 values. The
        // noise is drawn in order whatever the chunks, so the weights are the same.
        let pairs = pairs.min(CHUNK_VALUES / d.max(1));
        let chunk = (pairs / b.max(1)).clamp(1, k);
        let log2pi = (2.0 * std::f64::consts::PI).ln();
        // log q(z|x) = Σ −½(log 2π + log σ² + ε²), independent of the decoder.
        let lq_const = ((&q.log_var + log2pi)?.sum(1)? * -0.5)?; // (b,)
        let mut done = 0;
        while done < k {
            let kc = chunk.min(k - done);
            let eps = rng.randn((kc, b, l), x.device())?.to_dtype(x.dtype())?;
            let z = q
                .mean
                .unsqueeze(0)?
                .broadcast_add(&std.unsqueeze(0)?.broadcast_mul(&eps)?)?;
            let zf = z.reshape((kc * b, l))?;
            let out = self.decode(&zf)?;
            let mut xs_shape = vec![kc];
            xs_shape.extend(x.dims());
            let xs = x
                .unsqueeze(0)?
                .broadcast_as(xs_shape)?
                .reshape(out.shape())?;
            let lpx = self.log_px_given_z(&out, &xs)?.reshape((kc, b))?;
            let lpz = StandardNormal.log_prob(&zf)?.reshape((kc, b))?;
            let lq = ((eps.sqr()?.sum(2)? * -0.5)?.broadcast_add(&lq_const.unsqueeze(0)?))?;
            f(((lpx + lpz)? - lq)?)?;
            done += kc;
        }
        Ok(())
    }
}

/// Most values of one chunk's decoder output in [`Vae::log_weights`] (24 MiB of f32).
const CHUNK_VALUES: usize = 6 << 20;

impl Vae {
    /// The single-sample ELBO per image with the reparameterisation noise given, `(B,)` nats
    /// (on the data's own scale). Used to compare with other implementations bit for bit.
    ///
    /// # Shapes
    /// - `x`: `(B, C, H, W)`; `eps`: `(B, latent_dim)`.
    pub fn elbo_with_noise(&self, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let q = self.encode(x)?;
        let out = self.decode(&q.rsample(eps)?)?;
        gm_core::loss::elbo(
            &self.log_px_given_z(&out, x)?,
            &q.kl_std_normal()?,
            self.cfg.beta,
        )
    }
}

impl Model for Vae {
    fn kind(&self) -> &'static str {
        "vae"
    }

    /// `mean_B[−log p(x|z) + β KL(q(z|x) ‖ N(0, I))]` with one reparameterised sample.
    fn loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        let x = &batch.x;
        let q = self.encode(x)?;
        let eps = rng.randn(q.mean.shape(), x.device())?.to_dtype(x.dtype())?;
        let z = q.rsample(&eps)?;
        let out = self.decode(&z)?;
        let rec = self.log_px_given_z(&out, x)?.neg()?.mean(0)?;
        let kl = q.kl_std_normal()?.mean(0)?;
        let total = (&rec + (&kl * self.cfg.beta)?)?;
        Ok(Loss {
            total,
            parts: vec![("rec", rec), ("kl", kl)],
        })
    }

    /// `elbo_nats` (−ELBO, averaged over the `k` samples), `nll_iwae_nats` (−IWAE-k bound, an
    /// estimate of −log p(x) from above) with its `iwae_k`, `kl_nats` and `rec_nats` of one
    /// sample — per image.
    fn eval_metrics(&self, batch: &Batch, rng: &mut GmRng, opts: &EvalOptions) -> Result<Metrics> {
        let x = &batch.x;
        let k = opts.iwae_k.max(1);
        let (mean_lw, lme_lw) = self.log_weight_stats(x, k, rng, opts.max_pairs)?;
        let off = self.discrete_offset();
        let elbo = (mean_lw.neg()? + off)?;
        let iwae = (lme_lw.neg()? + off)?;
        let q = self.encode(x)?;
        let kl = q.kl_std_normal()?.to_dtype(DType::F64)?;
        // The estimator's k beside its value: IWAE-10 and IWAE-1000 are different bounds.
        let ks = Tensor::full(k as f64, x.dim(0)?, x.device())?;
        Ok(vec![
            ("elbo_nats".into(), elbo.clone()),
            ("nll_iwae_nats".into(), iwae),
            ("iwae_k".into(), ks),
            ("kl_nats".into(), kl.clone()),
            ("rec_nats".into(), (elbo - kl)?),
        ])
    }

    fn likelihood_estimate(&self) -> &'static str {
        "bound (IWAE-k)"
    }

    fn loss_units(&self) -> &'static str {
        "negative ELBO (beta-weighted), nats per image"
    }

    fn primary_metric(&self) -> &'static str {
        "elbo_nats"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_iwae_nats")
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let dev = self.fc_mu.weight().device();
        let dtype = self.fc_mu.weight().dtype();
        let z = rng.randn((n, self.cfg.latent_dim), dev)?.to_dtype(dtype)?;
        Ok(Some(self.to_image(&self.decode(&z)?)?.detach()))
    }

    fn reconstruct(&self, batch: &Batch, _rng: &mut GmRng) -> Result<Option<Tensor>> {
        let q = self.encode(&batch.x)?;
        Ok(Some(self.to_image(&self.decode(q.mode())?)?.detach()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    fn tiny(arch: Arch, likelihood: Likelihood) -> (VarMap, Vae) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = VaeConfig {
            arch,
            likelihood,
            hidden: vec![32],
            latent_dim: 4,
            ..Default::default()
        };
        let v = Vae::new(cfg, vb).unwrap();
        (vm, v)
    }

    fn batch(rng: &mut GmRng) -> Batch {
        let p = rng.uniform((3, 1, 28, 28), 0.0, 1.0, &Device::Cpu).unwrap();
        Batch {
            x: rng.bernoulli(&p).unwrap(),
            labels: None,
        }
    }

    #[test]
    fn streamed_iwae_statistics_equal_the_full_ones() {
        let (_vm, v) = tiny(Arch::Mlp, Likelihood::Bernoulli);
        let b = batch(&mut GmRng::new(0));
        // 37 samples in chunks of 1 (max_pairs below the batch), 2 and all at once.
        for max_pairs in [1, 2 * b.x.dim(0).unwrap(), 100_000] {
            let lw = v
                .log_weights(&b.x, 37, &mut GmRng::new(5), max_pairs)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let (mean, lme) = v
                .log_weight_stats(&b.x, 37, &mut GmRng::new(5), max_pairs)
                .unwrap();
            let want_mean = lw.mean(0).unwrap().to_vec1::<f64>().unwrap();
            let want_lme = gm_core::dist::log_mean_exp(&lw, 0)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (a, w) in [(mean, want_mean), (lme, want_lme)] {
                for (a, w) in a.to_vec1::<f64>().unwrap().iter().zip(&w) {
                    assert!((a - w).abs() < 1e-9 * w.abs().max(1.0), "{a} vs {w}");
                }
            }
        }
    }

    #[test]
    fn shapes_and_iwae_ordering() {
        for arch in [Arch::Mlp, Arch::Conv] {
            for lik in [Likelihood::Bernoulli, Likelihood::Gaussian] {
                let (_vm, v) = tiny(arch, lik);
                let mut rng = GmRng::new(0);
                let b = batch(&mut rng);
                let loss = v.loss(&b, &mut rng).unwrap();
                assert!(loss.total.to_scalar::<f32>().unwrap().is_finite());
                let s = v.sample(5, &mut rng).unwrap().unwrap();
                assert_eq!(s.dims(), &[5, 1, 28, 28]);
                let m = v
                    .eval_metrics(
                        &b,
                        &mut rng,
                        &EvalOptions {
                            iwae_k: 50,
                            max_pairs: 40,
                            full: true,
                        },
                    )
                    .unwrap();
                let get = |n: &str| {
                    m.iter()
                        .find(|(k, _)| k == n)
                        .unwrap()
                        .1
                        .to_vec1::<f64>()
                        .unwrap()
                };
                for (e, i) in get("elbo_nats").iter().zip(get("nll_iwae_nats")) {
                    assert!(i <= *e + 1e-9, "{arch:?}/{lik:?}: IWAE {i} above ELBO {e}");
                }
            }
        }
    }

    /// IWAE-1 is the single-sample ELBO; the bound tightens (the NLL estimate falls) as k grows.
    #[test]
    fn iwae_bound_tightens_with_k() {
        let (_vm, v) = tiny(Arch::Mlp, Likelihood::Bernoulli);
        let mut rng = GmRng::new(3);
        let p = rng
            .uniform((20, 1, 28, 28), 0.0, 1.0, &Device::Cpu)
            .unwrap();
        let b = Batch {
            x: rng.bernoulli(&p).unwrap(),
            labels: None,
        };
        let nll = |k: usize, rng: &mut GmRng| {
            let m = v
                .eval_metrics(
                    &b,
                    rng,
                    &EvalOptions {
                        iwae_k: k,
                        max_pairs: 4000,
                        full: true,
                    },
                )
                .unwrap();
            let get = |n: &str| {
                let t = &m.iter().find(|(name, _)| name == n).unwrap().1;
                t.mean_all().unwrap().to_scalar::<f64>().unwrap()
            };
            (get("elbo_nats"), get("nll_iwae_nats"))
        };
        let (e1, i1) = nll(1, &mut rng);
        assert!(
            (e1 - i1).abs() < 1e-9,
            "IWAE-1 {i1} must equal the ELBO {e1}"
        );
        let mut prev = i1;
        for k in [10, 100, 1000] {
            let (_, ik) = nll(k, &mut rng);
            assert!(ik < prev, "IWAE-{k} NLL {ik} not below the previous {prev}");
            prev = ik;
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for arch in [Arch::Mlp, Arch::Conv] {
            let (vm, v) = tiny(arch, Likelihood::Gaussian);
            let mut rng = GmRng::new(1);
            let b = batch(&mut rng);
            let g = v.loss(&b, &mut rng).unwrap().total.backward().unwrap();
            let data = vm.data().lock().unwrap();
            for (name, var) in data.iter() {
                let gv: &Var = var;
                let gr = g
                    .get(gv.as_tensor())
                    .unwrap_or_else(|| panic!("{arch:?}: no grad for {name}"));
                let n = gr
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n > 0.0, "{arch:?}: zero grad for {name}");
            }
        }
    }
}
