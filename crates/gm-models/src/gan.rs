//! Generative adversarial networks (Goodfellow et al., 2014): a generator `G(z)` and a
//! discriminator `D(x)` trained in alternation, each with its own optimiser (the trainer's
//! [`crate::Phase`]s: `d` then `g`, `d_steps` discriminator updates per generator update, learning
//! rates `train.lr · lr_d_scale` and `train.lr · lr_g_scale` — the two-time-scale rule).
//!
//! Unlike every other gm model a GAN maximises no likelihood: with the optimal discriminator
//! `D*(x) = p_data/(p_data + p_g)` the minimax objective equals `2·JSD(p_data ‖ p_g) − log 4`, a
//! divergence whose minimisation tolerates dropped modes — what `gm eval --fid`'s mode coverage
//! makes visible.
//!
//! - Networks: the DCGAN pair for 28×28 images (generator: linear → 7×7 → transposed convolutions
//!   with BatchNorm and ReLU → tanh; discriminator: strided convolutions with LeakyReLU(0.2) →
//!   linear), or MLPs for `[D, 1, 1]` vectors (the 2-D toy densities). Class-conditional with
//!   `num_classes > 0`: a label embedding concatenated to `z`, and a projection discriminator
//!   (Miyato & Koyama, 2018).
//! - Losses ([`GanLoss`]): the original minimax, the non-saturating generator loss, hinge, and
//!   WGAN-GP. The gradient penalty `λ·(‖∇_x̂ D(x̂)‖ − 1)²` needs the gradient of a gradient: candle
//!   keeps the graph of a gradient only when `CANDLE_GRAD_DO_NOT_DETACH` is set before the thread's
//!   first backward pass ([`enable_second_order_gradients`]; the `gm` binary does it for WGAN-GP
//!   runs).
//! - Spectral normalisation of the discriminator's weights (one power iteration per training
//!   forward pass, the vector kept between steps).
//!
//! Images are modelled on `[-1, 1]` (`2x − 1` of the data in `[0, 1]`); samples come back in `[0, 1]`.

use crate::nn::{BatchNorm, Conv2d, ConvTranspose2d, Linear};
use crate::{Batch, EvalOptions, Loss, Metrics, Model, Phase};
use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::VarBuilder;
use gm_core::kernels::conv::Conv2dParams;
use gm_core::kernels::ops::Act;
use gm_core::GmRng;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// The adversarial objective.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum GanLoss {
    /// `min_G max_D E log D(x) + E log(1 − D(G(z)))`, the generator minimising `log(1 − D(G(z)))`.
    Minimax,
    /// The same discriminator; the generator maximises `log D(G(z))` (strong early gradients).
    #[default]
    NonSaturating,
    /// `D: E relu(1 − D(x)) + E relu(1 + D(G(z)))`, `G: −E D(G(z))`.
    Hinge,
    /// Wasserstein critic with the gradient penalty (Gulrajani et al., 2017).
    WganGp,
}

pub use gm_core::dist::softplus;

impl GanLoss {
    /// The discriminator's loss per sample, from its logits on real and on generated data
    /// (without the gradient penalty). For the minimax and non-saturating losses this is
    /// `−log σ(l_real) − log(1 − σ(l_fake))`, so its negative mean is the objective `V(D, G)`.
    pub fn discriminator(self, real: &Tensor, fake: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            GanLoss::Minimax | GanLoss::NonSaturating => {
                Ok((softplus(&real.neg()?)?, softplus(fake)?))
            }
            GanLoss::Hinge => Ok((
                real.affine(-1.0, 1.0)?.relu()?,
                fake.affine(1.0, 1.0)?.relu()?,
            )),
            GanLoss::WganGp => Ok((real.neg()?, fake.clone())),
        }
    }

    /// The generator's loss per sample from the discriminator's logits on generated data.
    pub fn generator(self, fake: &Tensor) -> Result<Tensor> {
        match self {
            GanLoss::Minimax => softplus(fake)?.neg(),
            GanLoss::NonSaturating => softplus(&fake.neg()?),
            GanLoss::Hinge | GanLoss::WganGp => fake.neg(),
        }
    }
}

/// Makes candle keep the graph of gradients (needed by the WGAN-GP penalty). It must run before the
/// first backward pass of the thread that trains, and while no other thread reads the
/// environment; it costs memory in every later backward pass of the process.
pub fn enable_second_order_gradients() {
    // SAFETY: called at start-up by the single thread that owns the process at that point.
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
}

/// Whether [`enable_second_order_gradients`] (or the user) has set the flag.
pub fn second_order_gradients_enabled() -> bool {
    std::env::var("CANDLE_GRAD_DO_NOT_DETACH").is_ok_and(|v| v != "0")
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GanConfig {
    /// `[C, H, W]` of 28×28 images (H and W divisible by 4), or `[D, 1, 1]` for vectors.
    pub image_shape: [usize; 3],
    pub latent_dim: usize,
    /// Width of the networks: channels of the last generator / first discriminator layer (images),
    /// hidden units (vectors).
    pub width: usize,
    /// Hidden layers of the vector MLPs.
    pub depth: usize,
    pub num_classes: usize,
    pub loss: GanLoss,
    /// λ of the WGAN-GP penalty.
    pub gp_weight: f64,
    pub spectral_norm: bool,
    /// BatchNorm in the generator (DCGAN).
    pub batch_norm: bool,
    /// Discriminator updates per generator update.
    pub d_steps: usize,
    /// Learning rates as multiples of `train.lr` (TTUR: a faster discriminator).
    pub lr_g_scale: f64,
    pub lr_d_scale: f64,
}

impl Default for GanConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            latent_dim: 64,
            width: 64,
            depth: 3,
            num_classes: 0,
            loss: GanLoss::NonSaturating,
            gp_weight: 10.0,
            spectral_norm: false,
            batch_norm: true,
            d_steps: 1,
            lr_g_scale: 1.0,
            lr_d_scale: 1.0,
        }
    }
}

impl GanConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let [c, h, w] = self.image_shape;
        if c == 0 || h == 0 || w == 0 || self.latent_dim == 0 || self.width == 0 {
            return Err("model.image_shape, latent_dim and width must be positive".into());
        }
        if !self.is_vector() && (h % 4 != 0 || w % 4 != 0) {
            return Err(format!(
                "a convolutional GAN needs H and W divisible by 4, got {h}×{w}"
            ));
        }
        if self.is_vector() && self.depth == 0 {
            return Err("model.depth must be positive".into());
        }
        if self.d_steps == 0 {
            return Err("model.d_steps must be at least 1".into());
        }
        for (k, v) in [
            ("lr_g_scale", self.lr_g_scale),
            ("lr_d_scale", self.lr_d_scale),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("model.{k} must be positive, got {v}"));
            }
        }
        if !(self.gp_weight >= 0.0 && self.gp_weight.is_finite()) {
            return Err("model.gp_weight must be ≥ 0".into());
        }
        Ok(())
    }

    pub fn is_vector(&self) -> bool {
        self.image_shape[1] == 1 && self.image_shape[2] == 1
    }
}

impl crate::Family for GanConfig {
    const KIND: &'static str = "gan";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        GanConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        match self.is_vector() {
            true => crate::PixelData::Any,
            false => crate::PixelData::Levels,
        }
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn second_order(&self) -> bool {
        self.loss == GanLoss::WganGp && self.gp_weight > 0.0
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(Gan::new(self.clone(), vb)?))
    }
}

/// A weight with optional spectral normalisation `W / σ(W)`, `σ` from one power iteration per
/// training call on the `(out, in·k·k)` matrix.
#[derive(Debug)]
struct SpectralNorm {
    u: RefCell<Option<Tensor>>,
}

impl SpectralNorm {
    fn new() -> Self {
        Self {
            u: RefCell::new(None),
        }
    }

    fn apply(&self, w: &Tensor, train: bool) -> Result<Tensor> {
        let out = w.dim(0)?;
        let m = w.reshape((out, ()))?;
        let md = m.detach();
        let normalize = |v: &Tensor| -> Result<Tensor> {
            v.broadcast_div(&(v.sqr()?.sum_all()?.sqrt()? + 1e-12)?)
        };
        let mut u = match self.u.borrow().clone() {
            Some(u) => u,
            None => normalize(&Tensor::ones(out, w.dtype(), w.device())?)?,
        };
        let mut v = normalize(&md.t()?.matmul(&u.unsqueeze(1)?)?.squeeze(1)?)?;
        if train {
            u = normalize(&md.matmul(&v.unsqueeze(1)?)?.squeeze(1)?)?;
            v = normalize(&md.t()?.matmul(&u.unsqueeze(1)?)?.squeeze(1)?)?;
            *self.u.borrow_mut() = Some(u.clone());
        }
        let sigma = u.unsqueeze(0)?.matmul(&m.matmul(&v.unsqueeze(1)?)?)?;
        w.broadcast_div(&sigma.reshape(())?)
    }
}

/// The discriminator's layers: convolutions (images) or linear layers (vectors), then a linear
/// head, with the spectral-norm state of each.
#[derive(Debug)]
struct Discriminator {
    convs: Vec<Conv2d>,
    linears: Vec<Linear>,
    head: Linear,
    embed: Option<Tensor>,
    sn: Vec<SpectralNorm>,
    spectral: bool,
}

impl Discriminator {
    fn new(cfg: &GanConfig, vb: VarBuilder) -> Result<Self> {
        let [c, h, w] = cfg.image_shape;
        let (mut convs, mut linears) = (Vec::new(), Vec::new());
        let feat = if cfg.is_vector() {
            let mut d = c;
            for i in 0..cfg.depth {
                linears.push(Linear::new(d, cfg.width, vb.pp(format!("layers.{i}")))?);
                d = cfg.width;
            }
            d
        } else {
            let p = Conv2dParams::default().stride(2).padding(1);
            convs.push(Conv2d::new(c, cfg.width, [4, 4], p, true, vb.pp("conv.0"))?);
            convs.push(Conv2d::new(
                cfg.width,
                2 * cfg.width,
                [4, 4],
                p,
                true,
                vb.pp("conv.1"),
            )?);
            2 * cfg.width * (h / 4) * (w / 4)
        };
        let head = Linear::new(feat, 1, vb.pp("head"))?;
        let embed = (cfg.num_classes > 0)
            .then(|| {
                vb.get_with_hints(
                    (cfg.num_classes, feat),
                    "embed.weight",
                    candle_nn::Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                )
            })
            .transpose()?;
        let n = convs.len() + linears.len() + 1;
        Ok(Self {
            convs,
            linears,
            head,
            embed,
            sn: (0..n).map(|_| SpectralNorm::new()).collect(),
            spectral: cfg.spectral_norm,
        })
    }

    fn weight(&self, i: usize, w: &Tensor, train: bool) -> Result<Tensor> {
        if self.spectral {
            self.sn[i].apply(w, train)
        } else {
            Ok(w.clone())
        }
    }

    /// Logits `(B,)` of `x` (model scale).
    fn forward(&self, x: &Tensor, labels: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let act = Act::LeakyRelu(0.2);
        let b = x.dim(0)?;
        let mut h = x.clone();
        let mut k = 0;
        for conv in &self.convs {
            let w = self.weight(k, conv.weight(), train)?;
            h = conv.forward_with_weight(&h, &w, act)?;
            k += 1;
        }
        let mut h = h.reshape((b, ()))?;
        for lin in &self.linears {
            let w = self.weight(k, lin.weight(), train)?;
            h = lin.forward_with_weight(&h, &w, act)?;
            k += 1;
        }
        let w = self.weight(k, self.head.weight(), train)?;
        let mut out = self
            .head
            .forward_with_weight(&h, &w, Act::Identity)?
            .squeeze(1)?;
        if let (Some(e), Some(y)) = (&self.embed, labels) {
            // Projection: ⟨embed(y), features⟩.
            let proj = (e.index_select(y, 0)? * &h)?.sum(D::Minus1)?;
            out = (out + proj)?;
        }
        Ok(out)
    }
}

#[derive(Debug)]
struct Generator {
    fc: Linear,
    bn0: Option<BatchNorm>,
    deconvs: Vec<ConvTranspose2d>,
    bns: Vec<BatchNorm>,
    linears: Vec<Linear>,
    embed: Option<Tensor>,
    shape: [usize; 3],
    width: usize,
}

impl Generator {
    fn new(cfg: &GanConfig, vb: VarBuilder) -> Result<Self> {
        let [c, h, w] = cfg.image_shape;
        let zin = cfg.latent_dim
            + if cfg.num_classes > 0 {
                cfg.latent_dim
            } else {
                0
            };
        let embed = (cfg.num_classes > 0)
            .then(|| {
                vb.get_with_hints(
                    (cfg.num_classes, cfg.latent_dim),
                    "embed.weight",
                    candle_nn::Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                )
            })
            .transpose()?;
        let bn = |n: usize, vb: VarBuilder| BatchNorm::new(n, vb);
        if cfg.is_vector() {
            let mut linears = Vec::new();
            let mut d = zin;
            for i in 0..cfg.depth {
                linears.push(Linear::new(d, cfg.width, vb.pp(format!("layers.{i}")))?);
                d = cfg.width;
            }
            let fc = Linear::new(d, c, vb.pp("out"))?;
            return Ok(Self {
                fc,
                bn0: None,
                deconvs: vec![],
                bns: vec![],
                linears,
                embed,
                shape: cfg.image_shape,
                width: cfg.width,
            });
        }
        let c0 = 2 * cfg.width;
        let fc = Linear::new(zin, c0 * (h / 4) * (w / 4), vb.pp("fc"))?;
        let p = Conv2dParams::default().stride(2).padding(1);
        let deconvs = vec![
            ConvTranspose2d::new(c0, cfg.width, [4, 4], p, [0, 0], vb.pp("deconv.0"))?,
            ConvTranspose2d::new(cfg.width, c, [4, 4], p, [0, 0], vb.pp("deconv.1"))?,
        ];
        let (bn0, bns) = if cfg.batch_norm {
            (
                Some(bn(c0, vb.pp("bn.0"))?),
                vec![bn(cfg.width, vb.pp("bn.1"))?],
            )
        } else {
            (None, vec![])
        };
        Ok(Self {
            fc,
            bn0,
            deconvs,
            bns,
            linears: vec![],
            embed,
            shape: cfg.image_shape,
            width: cfg.width,
        })
    }

    /// Images `(B, C, H, W)` in `[-1, 1]` (vectors unbounded) from `z` `(B, latent)`.
    fn forward(&self, z: &Tensor, labels: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let b = z.dim(0)?;
        let z = match (&self.embed, labels) {
            (Some(e), Some(y)) => Tensor::cat(&[z, &e.index_select(y, 0)?], 1)?,
            _ => z.clone(),
        };
        let [c, h, w] = self.shape;
        if !self.linears.is_empty() {
            let mut x = z;
            for l in &self.linears {
                x = l.forward_act(&x, Act::LeakyRelu(0.2))?;
            }
            return self
                .fc
                .forward_act(&x, Act::Identity)?
                .reshape((b, c, h, w));
        }
        // BatchNorm → ReLU fused; without BatchNorm the ReLU fuses into the layer before it.
        let relu_unless = |bn: Option<&BatchNorm>| match bn {
            Some(_) => Act::Identity,
            None => Act::Relu,
        };
        let bn0 = self.bn0.as_ref();
        let mut x = self.fc.forward_act(&z, relu_unless(bn0))?.reshape((
            b,
            2 * self.width,
            h / 4,
            w / 4,
        ))?;
        if let Some(bn) = bn0 {
            x = bn.forward(&x, train, true)?;
        }
        let bn1 = self.bns.first();
        x = self.deconvs[0].forward_act(&x, relu_unless(bn1))?;
        if let Some(bn) = bn1 {
            x = bn.forward(&x, train, true)?;
        }
        self.deconvs[1].forward_act(&x, Act::Identity)?.tanh()
    }
}

/// A GAN: generator parameters under `generator.`, discriminator's under `discriminator.`.
pub struct Gan {
    cfg: GanConfig,
    g: Generator,
    d: Discriminator,
    device: Device,
    dtype: DType,
}

impl Gan {
    pub fn new(cfg: GanConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        Ok(Self {
            g: Generator::new(&cfg, vb.pp("generator"))?,
            d: Discriminator::new(&cfg, vb.pp("discriminator"))?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            cfg,
        })
    }

    pub fn config(&self) -> &GanConfig {
        &self.cfg
    }

    fn to_model(&self, x: &Tensor) -> Result<Tensor> {
        if self.cfg.is_vector() {
            Ok(x.clone())
        } else {
            x.affine(2.0, -1.0)
        }
    }

    fn to_data(&self, x: &Tensor) -> Result<Tensor> {
        if self.cfg.is_vector() {
            Ok(x.clone())
        } else {
            x.affine(0.5, 0.5)?.clamp(0.0, 1.0)
        }
    }

    fn latent(&self, n: usize, rng: &mut GmRng) -> Result<Tensor> {
        rng.randn((n, self.cfg.latent_dim), &self.device)?
            .to_dtype(self.dtype)
    }

    /// Random labels for generated samples of a conditional model.
    fn fake_labels(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        if self.cfg.num_classes == 0 {
            return Ok(None);
        }
        let k = self.cfg.num_classes as u64;
        let v: Vec<u32> = rng
            .per_sample_u64(n)
            .into_iter()
            .map(|r| (r % k) as u32)
            .collect();
        Ok(Some(gm_core::traffic::upload(v, n, &self.device)?))
    }

    /// Generated samples on the model scale, `(n, C, H, W)`.
    pub fn generate(
        &self,
        n: usize,
        labels: Option<&Tensor>,
        rng: &mut GmRng,
        train: bool,
    ) -> Result<Tensor> {
        let z = self.latent(n, rng)?;
        self.g.forward(&z, labels, train)
    }

    /// Discriminator logits `(B,)` of model-scale inputs.
    pub fn discriminate(&self, x: &Tensor, labels: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.d.forward(x, labels, train)
    }

    /// `(‖∇_x̂ D(x̂)‖ − 1)²` per sample at random interpolates of `real` and `fake` (model scale):
    /// a graph of the parameters when second-order gradients are enabled.
    pub fn gradient_penalty(
        &self,
        real: &Tensor,
        fake: &Tensor,
        labels: Option<&Tensor>,
        rng: &mut GmRng,
    ) -> Result<Tensor> {
        let b = real.dim(0)?;
        let mut shape = vec![b];
        shape.extend(std::iter::repeat_n(1, real.rank() - 1));
        let eps = rng
            .uniform(shape.as_slice(), 0.0, 1.0, &self.device)?
            .to_dtype(real.dtype())?;
        let mix = (real.broadcast_mul(&eps)? + fake.broadcast_mul(&eps.affine(-1.0, 1.0)?)?)?;
        let xv = Var::from_tensor(&mix.detach())?;
        let out = self.d.forward(xv.as_tensor(), labels, true)?;
        let grads = out.sum_all()?.backward()?;
        let g = grads
            .get(xv.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("the critic ignores its input".into()))?;
        let norm = (g.flatten_from(1)?.sqr()?.sum(1)? + 1e-12)?.sqrt()?;
        (norm - 1.0)?.sqr()
    }

    fn d_loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        let real = self.to_model(&batch.x)?;
        let b = real.dim(0)?;
        let labels = batch.labels.as_ref().filter(|_| self.cfg.num_classes > 0);
        let fake = self.generate(b, labels, rng, true)?.detach();
        let lr = self.d.forward(&real, labels, true)?;
        let lf = self.d.forward(&fake, labels, true)?;
        let (a, c) = self.cfg.loss.discriminator(&lr, &lf)?;
        let mut total = (a.mean(0)? + c.mean(0)?)?;
        let mut parts = vec![
            ("d_loss", total.clone()),
            ("d_real", lr.mean(0)?),
            ("d_fake", lf.mean(0)?),
        ];
        if self.cfg.loss == GanLoss::WganGp && self.cfg.gp_weight > 0.0 {
            if !second_order_gradients_enabled() {
                candle_core::bail!(
                    "WGAN-GP needs second-order gradients: call gm_models::gan::enable_second_order_gradients() (or set CANDLE_GRAD_DO_NOT_DETACH=1) before training"
                )
            }
            let gp = self.gradient_penalty(&real, &fake, labels, rng)?.mean(0)?;
            total = (total + (&gp * self.cfg.gp_weight)?)?;
            parts.push(("gp", gp));
        }
        Ok(Loss { total, parts })
    }

    fn g_loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        let b = batch.x.dim(0)?;
        let labels = match batch.labels.as_ref().filter(|_| self.cfg.num_classes > 0) {
            Some(y) => Some(y.clone()),
            None => self.fake_labels(b, rng)?,
        };
        let fake = self.generate(b, labels.as_ref(), rng, true)?;
        let lf = self.d.forward(&fake, labels.as_ref(), true)?;
        let total = self.cfg.loss.generator(&lf)?.mean(0)?;
        Ok(Loss {
            total: total.clone(),
            parts: vec![("g_loss", total)],
        })
    }
}

impl Model for Gan {
    fn kind(&self) -> &'static str {
        "gan"
    }

    /// Both losses summed (the trainer uses [`Model::phase_loss`] instead).
    fn loss(&self, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        let d = self.d_loss(batch, rng)?;
        let g = self.g_loss(batch, rng)?;
        let mut parts = d.parts;
        parts.extend(g.parts);
        Ok(Loss {
            total: (d.total + g.total)?,
            parts,
        })
    }

    fn phases(&self) -> Vec<Phase> {
        vec![
            Phase {
                name: "d",
                prefix: "discriminator.",
                lr_scale: self.cfg.lr_d_scale,
                repeats: self.cfg.d_steps,
            },
            Phase {
                name: "g",
                prefix: "generator.",
                lr_scale: self.cfg.lr_g_scale,
                repeats: 1,
            },
        ]
    }

    fn phase_loss(&self, phase: usize, batch: &Batch, rng: &mut GmRng) -> Result<Loss> {
        match phase {
            0 => self.d_loss(batch, rng),
            1 => self.g_loss(batch, rng),
            p => candle_core::bail!("a GAN has phases 0 (d) and 1 (g), not {p}"),
        }
    }

    /// The discriminator's mean logits on real test images and on as many samples: a GAN has no
    /// likelihood (`gm eval --fid` measures it).
    fn eval_metrics(&self, batch: &Batch, rng: &mut GmRng, _o: &EvalOptions) -> Result<Metrics> {
        let real = self.to_model(&batch.x)?;
        let b = real.dim(0)?;
        let labels = batch.labels.as_ref().filter(|_| self.cfg.num_classes > 0);
        let fake = self.generate(b, labels, rng, false)?;
        let lr = self.d.forward(&real, labels, false)?.detach();
        let lf = self.d.forward(&fake, labels, false)?.detach();
        Ok(vec![
            ("d_gap_logit".into(), (&lr - &lf)?),
            ("d_real_logit".into(), lr),
            ("d_fake_logit".into(), lf),
        ])
    }

    /// How far the discriminator tells test images from samples (lower: harder to tell).
    fn loss_units(&self) -> &'static str {
        "discriminator + generator losses"
    }

    fn primary_metric(&self) -> &'static str {
        "d_gap_logit"
    }

    fn likelihood_metric(&self) -> Option<&'static str> {
        None
    }

    fn sample(&self, n: usize, rng: &mut GmRng) -> Result<Option<Tensor>> {
        let labels = if self.cfg.num_classes > 0 {
            let k = self.cfg.num_classes as u32;
            Some(Tensor::from_vec(
                (0..n as u32).map(|i| i % k).collect::<Vec<_>>(),
                n,
                &self.device,
            )?)
        } else {
            None
        };
        let x = self.generate(n, labels.as_ref(), rng, false)?.detach();
        Ok(Some(self.to_data(&x)?))
    }

    fn sample_labels(&self, labels: &[u32], rng: &mut GmRng) -> Result<Option<Tensor>> {
        if self.cfg.num_classes == 0 {
            return Ok(None);
        }
        let y = Tensor::new(labels, &self.device)?;
        let x = self.generate(labels.len(), Some(&y), rng, false)?.detach();
        Ok(Some(self.to_data(&x)?))
    }
}
