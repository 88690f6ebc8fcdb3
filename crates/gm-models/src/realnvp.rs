//! RealNVP (Dinh, Sohl-Dickstein & Bengio, 2017): an invertible network `z = f(x)` built from
//! affine couplings, trained by exact maximum likelihood through the change of variables
//!
//! `log p(x) = log N(f(x); 0, I) + log |det ∂f/∂x|`.
//!
//! Images (`image_shape = [C, H, W]` with `H·W > 1`) go through the multi-scale architecture:
//! the logit pre-processing ([`crate::flow::Logit`]), then per scale three checkerboard couplings,
//! a squeeze, three channel-wise couplings and the factoring-out of half the channels; the last
//! scale has four checkerboard couplings. Vectors (`image_shape = [D, 1, 1]`, the 2-D toy
//! densities) use `num_couplings` channel-wise couplings that alternate halves. Every coupling
//! can be preceded by an ActNorm (per-channel affine with its log-determinant `H·W·Σ log s`).
//!
//! A coupling keeps one part `x_a` and transforms the other: `y_b = x_b ⊙ exp(s(x_a)) + t(x_a)`,
//! `log|det| = Σ s`, with the scale bounded as `s = scale ⊙ tanh(ŝ)` and `(ŝ, t)` from a ResNet whose
//! last convolution starts at zero (each coupling starts as the identity). Every Jacobian term —
//! the logit pre-processing included — enters `log p(x)`; `nll_nats` adds `D·ln 256` to put the
//! density of dequantised pixels on the 8-bit scale ([`crate::flow`]).

use crate::flow::{eight_bit_offset, squeeze, std_normal_log_prob, unsqueeze, Logit};
use crate::nn::Conv2d;
use crate::{Batch, EvalOptions, Loss, Metrics, Model};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use gm_core::kernels::conv::Conv2dParams;
use gm_core::kernels::ops::{self, Act};
use gm_core::{sum_per_sample, GmRng};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RealNvpConfig {
    /// `[C, H, W]` of images, or `[D, 1, 1]` for vectors (the 2-D toy densities).
    pub image_shape: [usize; 3],
    /// Scales of the multi-scale image flow (`H` and `W` must divide by `2^(num_scales − 1)`).
    pub num_scales: usize,
    /// Couplings of a vector flow.
    pub num_couplings: usize,
    /// Channels (images) or features (vectors) of the scale/translation ResNets.
    pub hidden: usize,
    /// Residual blocks per scale/translation ResNet.
    pub num_blocks: usize,
    /// An ActNorm before every coupling.
    pub actnorm: bool,
    /// α of the logit pre-processing of images.
    pub logit_alpha: f64,
    /// Standard deviation of the base density at sampling (1 = the model itself).
    pub temperature: f64,
}

impl Default for RealNvpConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            num_scales: 2,
            num_couplings: 8,
            hidden: 64,
            num_blocks: 4,
            actnorm: true,
            logit_alpha: 0.05,
            temperature: 1.0,
        }
    }
}

impl RealNvpConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let [c, h, w] = self.image_shape;
        if c == 0 || h == 0 || w == 0 {
            return Err(format!(
                "model.image_shape must be positive, got {:?}",
                self.image_shape
            ));
        }
        if self.hidden == 0 {
            return Err("model.hidden must be positive".into());
        }
        if self.is_vector() {
            if c < 2 {
                return Err("a vector RealNVP needs at least 2 dimensions".into());
            }
            if self.num_couplings == 0 {
                return Err("model.num_couplings must be positive".into());
            }
        } else {
            if self.num_scales == 0 {
                return Err("model.num_scales must be positive".into());
            }
            let f = 1usize << (self.num_scales - 1);
            if h % f != 0 || w % f != 0 {
                return Err(format!(
                    "model.num_scales = {} needs H and W divisible by {f}, got {h}×{w}",
                    self.num_scales
                ));
            }
            Logit {
                alpha: self.logit_alpha,
            }
            .validate()?;
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "model.temperature must be positive, got {}",
                self.temperature
            ));
        }
        Ok(())
    }

    /// `[D, 1, 1]`: a density on `R^D`, no pixel pre-processing.
    pub fn is_vector(&self) -> bool {
        self.image_shape[1] == 1 && self.image_shape[2] == 1
    }
}

impl crate::Family for RealNvpConfig {
    const KIND: &'static str = "realnvp";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        RealNvpConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        match self.is_vector() {
            true => crate::PixelData::Any,
            false => crate::PixelData::Dequantized,
        }
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(RealNvp::new(self.clone(), vb)?))
    }
}

/// A ResNet `x → (ŝ, t)`: `k×k` convolutions (`k = 1` on vectors), pre-activation residual blocks,
/// the last convolution initialised to zero.
#[derive(Clone, Debug)]
struct StNet {
    inp: Conv2d,
    blocks: Vec<(Conv2d, Conv2d)>,
    out: Conv2d,
}

impl StNet {
    fn new(
        c_in: usize,
        c_out: usize,
        hidden: usize,
        num_blocks: usize,
        k: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let p = Conv2dParams::default().padding(k / 2);
        let inp = Conv2d::new(c_in, hidden, [k, k], p, true, vb.pp("in_conv"))?;
        let mut blocks = Vec::with_capacity(num_blocks);
        for i in 0..num_blocks {
            let vbi = vb.pp(format!("blocks.{i}"));
            blocks.push((
                Conv2d::new(hidden, hidden, [k, k], p, true, vbi.pp("conv1"))?,
                Conv2d::new(hidden, hidden, [k, k], p, true, vbi.pp("conv2"))?,
            ));
        }
        let zero = Init::Const(0.0);
        let out = Conv2d::with_init(
            hidden,
            c_out,
            [k, k],
            p,
            zero,
            Some(zero),
            vb.pp("out_conv"),
        )?;
        Ok(Self { inp, blocks, out })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.inp.forward_act(x, Act::Identity)?;
        for (c1, c2) in &self.blocks {
            let r = c1.forward_act(&ops::act(&h, Act::Relu)?, Act::Relu)?;
            h = (h + c2.forward_act(&r, Act::Identity)?)?;
        }
        self.out
            .forward_act(&ops::act(&h, Act::Relu)?, Act::Identity)
    }
}

/// Which part of the input a coupling keeps.
#[derive(Clone, Debug)]
enum Mask {
    /// `b[i, j] = (i + j + parity) mod 2`, a `(1, 1, H, W)` 0/1 tensor.
    Checkerboard(Tensor),
    /// Keeps the first `keep` channels (`flip = false`) or the last ones.
    Channel { keep: usize, flip: bool },
}

#[derive(Clone, Debug)]
struct Coupling {
    mask: Mask,
    net: StNet,
    /// `(1, C_b, 1, 1)`, the bound of `s = scale ⊙ tanh(ŝ)`.
    scale: Tensor,
}

impl Coupling {
    /// `(s, t)` for the transformed part, from the kept part.
    fn s_t(&self, kept: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let input = match mask {
            Some(b) => {
                let (n, _, h, w) = kept.dims4()?;
                Tensor::cat(&[kept, &b.broadcast_as((n, 1, h, w))?], 1)?
            }
            None => kept.clone(),
        };
        let st = self.net.forward(&input)?;
        let c = st.dim(1)? / 2;
        // One pass each way (the bound's gradient a contiguous reduction, not candle's
        // broadcast reduce).
        let s = ops::channel_affine(&st.narrow(1, 0, c)?.tanh()?, &self.scale, None)?;
        Ok((s, st.narrow(1, c, c)?))
    }

    /// `(keep, transform)` halves of `x` in the order of the mask.
    fn split(x: &Tensor, keep: usize, flip: bool) -> Result<(Tensor, Tensor)> {
        let c = x.dim(1)?;
        Ok(if flip {
            (x.narrow(1, c - keep, keep)?, x.narrow(1, 0, c - keep)?)
        } else {
            (x.narrow(1, 0, keep)?, x.narrow(1, keep, c - keep)?)
        })
    }

    fn join(kept: &Tensor, other: &Tensor, flip: bool) -> Result<Tensor> {
        if flip {
            Tensor::cat(&[other, kept], 1)
        } else {
            Tensor::cat(&[kept, other], 1)
        }
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.mask {
            Mask::Checkerboard(b) => {
                let kept = x.broadcast_mul(b)?;
                let (s, t) = self.s_t(&kept, Some(b))?;
                let nb = b.affine(-1.0, 1.0)?;
                let (s, t) = (s.broadcast_mul(&nb)?, t.broadcast_mul(&nb)?);
                let y = ((x * s.exp()?)? + t)?;
                Ok((y, sum_per_sample(&s)?))
            }
            Mask::Channel { keep, flip } => {
                let (xa, xb) = Self::split(x, *keep, *flip)?;
                let (s, t) = self.s_t(&xa, None)?;
                let yb = ((xb * s.exp()?)? + t)?;
                Ok((Self::join(&xa, &yb, *flip)?, sum_per_sample(&s)?))
            }
        }
    }

    /// `(x, log|det ∂x/∂y| = −Σ s)`.
    fn inverse(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.mask {
            Mask::Checkerboard(b) => {
                let kept = y.broadcast_mul(b)?;
                let (s, t) = self.s_t(&kept, Some(b))?;
                let nb = b.affine(-1.0, 1.0)?;
                let (s, t) = (s.broadcast_mul(&nb)?, t.broadcast_mul(&nb)?);
                let x = ((y - t)? * s.neg()?.exp()?)?;
                Ok((x, sum_per_sample(&s)?.neg()?))
            }
            Mask::Channel { keep, flip } => {
                let (ya, yb) = Self::split(y, *keep, *flip)?;
                let (s, t) = self.s_t(&ya, None)?;
                let xb = ((yb - t)? * s.neg()?.exp()?)?;
                Ok((Self::join(&ya, &xb, *flip)?, sum_per_sample(&s)?.neg()?))
            }
        }
    }
}

/// Per-channel `y = (x + bias) ⊙ exp(log_scale)`, `log|det| = H·W·Σ log_scale`. It starts as the
/// identity (no data-dependent initialisation: the trainer has no initialisation pass).
#[derive(Clone, Debug)]
struct ActNorm {
    bias: Tensor,
    log_scale: Tensor,
}

impl ActNorm {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            bias: vb.get_with_hints((1, c, 1, 1), "bias", Init::Const(0.0))?,
            log_scale: vb.get_with_hints((1, c, 1, 1), "log_scale", Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, _, h, w) = x.dims4()?;
        // (x + bias) ⊙ e as x ⊙ e + bias ⊙ e: one pass over x each way.
        let e = self.log_scale.exp()?;
        let y = ops::channel_affine(x, &e, Some(&(&self.bias * &e)?))?;
        let ld = (self.log_scale.sum_all()? * (h * w) as f64)?;
        Ok((y, ld.to_dtype(x.dtype())?.broadcast_as(b)?.contiguous()?))
    }

    /// `(x, log|det ∂x/∂y| = −H·W·Σ log_scale)`.
    fn inverse(&self, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, _, h, w) = y.dims4()?;
        let x = ops::channel_affine(y, &self.log_scale.neg()?.exp()?, Some(&self.bias.neg()?))?;
        let ld = (self.log_scale.sum_all()? * -((h * w) as f64))?;
        Ok((x, ld.to_dtype(y.dtype())?.broadcast_as(b)?.contiguous()?))
    }
}

#[derive(Clone, Debug)]
enum Step {
    ActNorm(ActNorm),
    Coupling(Coupling),
    Squeeze,
    /// Half the channels leave the flow as a latent of their own.
    FactorOut,
}

/// The multi-scale RealNVP.
pub struct RealNvp {
    cfg: RealNvpConfig,
    steps: Vec<Step>,
    /// `[C, H, W]` of each latent, in the order they leave the flow.
    latent_shapes: Vec<[usize; 3]>,
    logit: Option<Logit>,
    device: Device,
    dtype: DType,
}

fn checkerboard(h: usize, w: usize, parity: usize, vb: &VarBuilder) -> Result<Tensor> {
    let v: Vec<f32> = (0..h * w)
        .map(|k| ((k / w + k % w + parity) % 2) as f32)
        .collect();
    Tensor::from_vec(v, (1, 1, h, w), vb.device())?.to_dtype(vb.dtype())
}

impl RealNvp {
    pub fn new(cfg: RealNvpConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let mut steps = Vec::new();
        let mut latent_shapes = Vec::new();
        let [mut c, mut h, mut w] = cfg.image_shape;
        let mut n = 0usize;
        let (hid, nb) = (cfg.hidden, cfg.num_blocks);
        let mut push = |steps: &mut Vec<Step>, c: usize, mask: Mask, k: usize| -> Result<()> {
            let vbn = vb.pp(format!("flow.{n}"));
            n += 1;
            if cfg.actnorm {
                steps.push(Step::ActNorm(ActNorm::new(c, vbn.pp("actnorm"))?));
            }
            let (c_in, c_out) = match &mask {
                Mask::Checkerboard(_) => (c + 1, c),
                Mask::Channel { keep, .. } => (*keep, c - keep),
            };
            let net = StNet::new(c_in, 2 * c_out, hid, nb, k, vbn.pp("net"))?;
            let scale = vbn.get_with_hints((1, c_out, 1, 1), "scale", Init::Const(1.0))?;
            steps.push(Step::Coupling(Coupling { mask, net, scale }));
            Ok(())
        };
        if cfg.is_vector() {
            for i in 0..cfg.num_couplings {
                let mask = Mask::Channel {
                    keep: if i % 2 == 0 { c / 2 } else { c - c / 2 },
                    flip: i % 2 == 1,
                };
                push(&mut steps, c, mask, 1)?;
            }
            latent_shapes.push([c, 1, 1]);
        } else {
            for scale in 0..cfg.num_scales {
                let last = scale + 1 == cfg.num_scales;
                for p in 0..if last { 4 } else { 3 } {
                    push(
                        &mut steps,
                        c,
                        Mask::Checkerboard(checkerboard(h, w, p % 2, &vb)?),
                        3,
                    )?;
                }
                if last {
                    break;
                }
                steps.push(Step::Squeeze);
                (c, h, w) = (4 * c, h / 2, w / 2);
                for p in 0..3 {
                    let mask = Mask::Channel {
                        keep: c / 2,
                        flip: p % 2 == 1,
                    };
                    push(&mut steps, c, mask, 3)?;
                }
                steps.push(Step::FactorOut);
                latent_shapes.push([c / 2, h, w]);
                c -= c / 2;
            }
            latent_shapes.push([c, h, w]);
        }
        let logit = (!cfg.is_vector()).then_some(Logit {
            alpha: cfg.logit_alpha,
        });
        Ok(Self {
            cfg,
            steps,
            latent_shapes,
            logit,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &RealNvpConfig {
        &self.cfg
    }

    /// The flow on pre-processed input: `(latents in order of leaving, log|det| (B,))`.
    pub fn forward(&self, y: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
        let mut x = y.clone();
        let mut ld = Tensor::zeros(y.dim(0)?, y.dtype(), y.device())?;
        let mut zs = Vec::new();
        for step in &self.steps {
            match step {
                Step::ActNorm(a) => {
                    let (nx, l) = a.forward(&x)?;
                    x = nx;
                    ld = (ld + l)?;
                }
                Step::Coupling(cp) => {
                    let (nx, l) = cp.forward(&x)?;
                    x = nx;
                    ld = (ld + l)?;
                }
                Step::Squeeze => x = squeeze(&x)?,
                Step::FactorOut => {
                    let c = x.dim(1)?;
                    zs.push(x.narrow(1, 0, c / 2)?);
                    x = x.narrow(1, c / 2, c - c / 2)?;
                }
            }
        }
        zs.push(x);
        Ok((zs, ld))
    }

    /// The inverse of [`RealNvp::forward`]: pre-processed input from the latents.
    pub fn inverse(&self, zs: &[Tensor]) -> Result<Tensor> {
        Ok(self.inverse_with_logdet(zs)?.0)
    }

    /// [`RealNvp::inverse`] with its `log|det ∂y/∂z|` per sample `(B,)`: `log q(y) = log N(z)
    /// − log|det ∂y/∂z|` without running the flow forward again.
    pub fn inverse_with_logdet(&self, zs: &[Tensor]) -> Result<(Tensor, Tensor)> {
        if zs.len() != self.latent_shapes.len() {
            candle_core::bail!(
                "RealNVP inverse: expected {} latents, got {}",
                self.latent_shapes.len(),
                zs.len()
            )
        }
        let mut k = zs.len() - 1;
        let mut x = zs[k].clone();
        let mut ld = Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?;
        for step in self.steps.iter().rev() {
            x = match step {
                Step::ActNorm(a) => {
                    let (nx, l) = a.inverse(&x)?;
                    ld = (ld + l)?;
                    nx
                }
                Step::Coupling(cp) => {
                    let (nx, l) = cp.inverse(&x)?;
                    ld = (ld + l)?;
                    nx
                }
                Step::Squeeze => unsqueeze(&x)?,
                Step::FactorOut => {
                    k -= 1;
                    Tensor::cat(&[&zs[k], &x], 1)?
                }
            };
        }
        Ok((x, ld))
    }

    /// `[C, H, W]` of each latent.
    pub fn latent_shapes(&self) -> &[[usize; 3]] {
        &self.latent_shapes
    }

    /// `log p(x)` per image `(B,)` in nats: of pixels in `[0, 1]^D` for images (logit Jacobian
    /// included), of points in `R^D` for vectors.
    pub fn log_prob(&self, x: &Tensor) -> Result<Tensor> {
        let (y, ld0) = match &self.logit {
            Some(l) => l.forward(x)?,
            None => (x.clone(), Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?),
        };
        let (zs, ld) = self.forward(&y)?;
        let mut lp = (ld + ld0)?;
        for z in &zs {
            lp = (lp + std_normal_log_prob(z)?)?;
        }
        Ok(lp)
    }

    /// `−log p(x)` per image on the 8-bit scale for images ([`crate::flow`]), plain for vectors.
    pub fn nll_nats(&self, x: &Tensor) -> Result<Tensor> {
        let offset = if self.logit.is_some() {
            eight_bit_offset(self.cfg.image_shape.iter().product())
        } else {
            0.0
        };
        self.log_prob(x)?.affine(-1.0, offset)
    }

    /// `n` samples with base standard deviation `temperature`.
    pub fn sample_with(&self, n: usize, temperature: f64, rng: &mut GmRng) -> Result<Tensor> {
        let zs = self
            .latent_shapes
            .iter()
            .map(|&[c, h, w]| {
                rng.randn((n, c, h, w), &self.device)?
                    .affine(temperature, 0.0)?
                    .to_dtype(self.dtype)
            })
            .collect::<Result<Vec<_>>>()?;
        let x = self.inverse_to_pixels(&zs)?;
        match &self.logit {
            Some(_) => x.clamp(0.0, 1.0),
            None => Ok(x),
        }
    }

    /// [`RealNvp::inverse`] followed by the exact inverse of the logit pre-processing: draws of
    /// the density itself, unclamped, in the flow's support ([`Logit::support`]; `R^D` for
    /// vectors), differentiable in the latents.
    pub fn inverse_to_pixels(&self, zs: &[Tensor]) -> Result<Tensor> {
        let y = self.inverse(zs)?;
        match &self.logit {
            Some(l) => l.inverse_unclamped(&y),
            None => Ok(y),
        }
    }

    /// [`RealNvp::inverse_to_pixels`] with `log q(x)` per sample `(B,)`, from the latents'
    /// density and the inverse's log-determinant (stable where the pixels near the support's
    /// edge, which a forward pass through the logit would not be).
    pub fn inverse_to_pixels_with_log_prob(&self, zs: &[Tensor]) -> Result<(Tensor, Tensor)> {
        let (y, ld) = self.inverse_with_logdet(zs)?;
        let mut lp = ld.neg()?;
        for z in zs {
            lp = (lp + std_normal_log_prob(z)?)?;
        }
        match &self.logit {
            Some(l) => {
                let (x, ld0) = l.inverse_with_logdet(&y)?;
                Ok((x, (lp - ld0)?))
            }
            None => Ok((y, lp)),
        }
    }

    /// The logit pre-processing of an image flow.
    pub fn logit(&self) -> Option<&Logit> {
        self.logit.as_ref()
    }
}

impl Model for RealNvp {
    fn kind(&self) -> &'static str {
        "realnvp"
    }

    fn loss(&self, batch: &Batch, _rng: &mut GmRng) -> Result<Loss> {
        let nll = self.nll_nats(&batch.x)?.mean(0)?;
        Ok(Loss {
            total: nll.clone(),
            parts: vec![("nll", nll)],
        })
    }

    /// `nll_nats`: the exact `−log p(x)` per image.
    fn eval_metrics(&self, batch: &Batch, _rng: &mut GmRng, _o: &EvalOptions) -> Result<Metrics> {
        Ok(vec![("nll_nats".into(), self.nll_nats(&batch.x)?)])
    }

    fn primary_metric(&self) -> &'static str {
        "nll_nats"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        Some("nll_nats")
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let x = self.sample_with(n, self.cfg.temperature, rng)?.detach();
        Ok(Some(x))
    }
}
