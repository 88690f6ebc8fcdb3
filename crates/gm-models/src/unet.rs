//! The UNet that diffusion and flow-matching models share (Ho et al., 2020; the `diffusers`
//! `UNet2DModel` layout): residual blocks with GroupNorm and SiLU, a sinusoidal time embedding
//! through an MLP added in every block, single-head self-attention at chosen resolutions and in
//! the middle, strided-convolution downsampling, nearest-neighbour upsampling + convolution, skip
//! connections from every down-path activation, and an optional class embedding (with one extra
//! "no label" row for classifier-free guidance).
//!
//! Written around candle's gradient gaps (see the project's candle notes): attention uses
//! `candle_nn::ops::softmax` (the fused `softmax_last_dim` has no gradient), and upsampling is
//! gm's [`gm_core::kernels::resample::upsample_nearest2x`] (candle's `upsample_nearest2d` backward
//! overwrites gradients; off the CPU it is a reshape + broadcast, whose gradient candle gets
//! right).
//!
//! Parameter names follow a PyTorch module tree (`down.0.res.0.conv1.weight`, …), so a
//! safetensors checkpoint maps onto a PyTorch twin one to one.

pub use crate::nn::timestep_embedding;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::Batch;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use gm_core::kernels::conv::Conv2dParams;
use gm_core::kernels::ops::Act;
use gm_core::{grad_checkpoint, GmRng};
use serde::{Deserialize, Serialize};

/// A UNet's shape.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UNetConfig {
    /// Channels of the first level.
    pub base_channels: usize,
    /// Channel multiplier per level; level `l` works at resolution `H / 2^l`.
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more).
    pub num_res_blocks: usize,
    /// Levels (0-based) whose residual blocks are followed by self-attention.
    pub attention_levels: Vec<usize>,
    /// Self-attention between the two middle residual blocks.
    pub mid_attention: bool,
    /// GroupNorm groups (must divide every level's channels).
    pub groups: usize,
    /// Width of the time (and class) embedding; 0 = `4 · base_channels`.
    pub time_embed_dim: usize,
    /// Channels per attention head; 0 = one head over all channels (diffusers'
    /// `attention_head_dim`, whose `UNet2DModel` default is 8).
    #[serde(skip_serializing_if = "is_zero")]
    pub head_dim: usize,
    /// Time features ordered `[cos, sin]` (diffusers' `flip_sin_to_cos`) instead of `[sin, cos]`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub flip_sin_to_cos: bool,
    /// diffusers' `freq_shift`: time frequencies `exp(−ln 10⁴ · i / (base/2 − freq_shift))`.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub freq_shift: f64,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            base_channels: 32,
            channel_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            attention_levels: vec![2],
            mid_attention: true,
            groups: 8,
            time_embed_dim: 0,
            head_dim: 0,
            flip_sin_to_cos: false,
            freq_shift: 0.0,
        }
    }
}

impl UNetConfig {
    pub fn temb_dim(&self) -> usize {
        if self.time_embed_dim == 0 {
            4 * self.base_channels
        } else {
            self.time_embed_dim
        }
    }

    /// Checks the shape against images of `[C, H, W]`; errors name the key.
    pub fn validate(&self, image_shape: [usize; 3]) -> std::result::Result<(), String> {
        if self.base_channels == 0 || self.channel_mult.is_empty() {
            return Err(
                "model.unet.base_channels and model.unet.channel_mult must be non-empty".into(),
            );
        }
        if self.channel_mult.contains(&0) {
            return Err("model.unet.channel_mult entries must be > 0".into());
        }
        if self.groups == 0 {
            return Err("model.unet.groups must be > 0".into());
        }
        for m in &self.channel_mult {
            if (self.base_channels * m) % self.groups != 0 {
                return Err(format!(
                    "model.unet.groups = {} must divide every level's channels ({} = {} × {m})",
                    self.groups,
                    self.base_channels * m,
                    self.base_channels
                ));
            }
        }
        if let Some(l) = self
            .attention_levels
            .iter()
            .find(|&&l| l >= self.channel_mult.len())
        {
            return Err(format!(
                "model.unet.attention_levels: level {l} does not exist ({} levels)",
                self.channel_mult.len()
            ));
        }
        if self.head_dim > 0 {
            let mut att: Vec<usize> = self.attention_levels.clone();
            if self.mid_attention {
                att.push(self.channel_mult.len() - 1);
            }
            for l in att {
                let c = self.base_channels * self.channel_mult[l];
                if c % self.head_dim != 0 {
                    return Err(format!(
                        "model.unet.head_dim = {} must divide the attention channels ({c} at level {l})",
                        self.head_dim
                    ));
                }
            }
        }
        if !self.freq_shift.is_finite() || self.freq_shift >= (self.base_channels / 2) as f64 {
            return Err(format!(
                "model.unet.freq_shift = {} must be finite and below base_channels / 2",
                self.freq_shift
            ));
        }
        let f = 1usize << (self.channel_mult.len() - 1);
        let [c, h, w] = image_shape;
        if c == 0 || h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            return Err(format!(
                "model.image_shape {image_shape:?}: height and width must be multiples of {f} for {} UNet levels",
                self.channel_mult.len()
            ));
        }
        Ok(())
    }
}

/// `GroupNorm` then SiLU, fused.
fn norm_silu(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    norm.forward(x, true)
}

fn conv3(c_in: usize, c_out: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let p = Conv2dParams {
        stride: [stride, stride],
        padding: [1, 1],
        ..Default::default()
    };
    Conv2d::new(c_in, c_out, [3, 3], p, true, vb)
}

fn conv1(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::new(c_in, c_out, [1, 1], Conv2dParams::default(), true, vb)
}

/// `x + conv2(silu(gn2(conv1(silu(gn1(x))) + proj(silu(temb))))`, with a 1×1 skip when the
/// channels change.
#[derive(Clone, Debug)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    temb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    fn new(c_in: usize, c_out: usize, temb: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, c_in, vb.pp("norm1"))?,
            conv1: conv3(c_in, c_out, 1, vb.pp("conv1"))?,
            temb_proj: Linear::new(temb, c_out, vb.pp("temb_proj"))?,
            norm2: GroupNorm::new(groups, c_out, vb.pp("norm2"))?,
            conv2: conv3(c_out, c_out, 1, vb.pp("conv2"))?,
            skip: (c_in != c_out)
                .then(|| conv1(c_in, c_out, vb.pp("skip")))
                .transpose()?,
        })
    }

    /// `temb_act` is `silu(temb)`, `(B, T)`. One block of gradient checkpointing.
    fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        if !grad_checkpoint::enabled() {
            return self.forward_plain(x, temb_act);
        }
        let me = self.clone();
        grad_checkpoint::block1(&[x, temb_act], move |i| me.forward_plain(&i[0], &i[1]))
    }

    fn forward_plain(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let t = self.temb_proj.forward(temb_act)?;
        let h = self.conv1.forward_add(&norm_silu(&self.norm1, x)?, &t)?;
        let h = self.conv2.forward(&norm_silu(&self.norm2, &h)?)?;
        let s = match &self.skip {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        h + s
    }
}

/// Self-attention over the `H·W` positions, residual; `heads` heads of `C / heads` channels
/// each (head `h` on channels `h·d .. (h+1)·d`, as diffusers splits them).
#[derive(Clone, Debug)]
struct Attention {
    norm: GroupNorm,
    qkv: Conv2d,
    proj: Conv2d,
    channels: usize,
    heads: usize,
}

impl Attention {
    fn new(c: usize, groups: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(groups, c, vb.pp("norm"))?,
            qkv: conv1(c, 3 * c, vb.pp("qkv"))?,
            proj: conv1(c, c, vb.pp("proj"))?,
            channels: c,
            heads: c.checked_div(head_dim).unwrap_or(1),
        })
    }

    /// One block of gradient checkpointing.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !grad_checkpoint::enabled() {
            return self.forward_plain(x);
        }
        let me = self.clone();
        grad_checkpoint::block1(&[x], move |i| me.forward_plain(&i[0]))
    }

    fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (nh, d) = (self.heads, self.channels / self.heads);
        let qkv = self
            .qkv
            .forward(&self.norm.forward(x, false)?)?
            .reshape((b, 3, c, h * w))?;
        let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1)?.reshape((b * nh, d, h * w));
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        // (B·heads, N, N): logits[i, j] = q_i · k_j / √d.
        let logits = (gm_core::precision::matmul(&q.transpose(1, 2)?, &k)? / (d as f64).sqrt())?;
        let attn = candle_nn::ops::softmax(&logits, D::Minus1)?;
        // out[:, :, i] = Σ_j attn[i, j] v[:, :, j]
        let out = gm_core::precision::matmul(&v, &attn.transpose(1, 2)?)?.reshape((b, c, h, w))?;
        x + self.proj.forward(&out)?
    }
}

/// Nearest-neighbour ×2 upsampling (one pass each way on the CPU; its backward the 2×2 block sum).
pub use gm_core::kernels::resample::upsample_nearest2x;

#[derive(Clone, Debug)]
struct Level {
    res: Vec<ResBlock>,
    attn: Vec<Attention>,
    /// Down path: strided conv; up path: conv after the upsampling.
    resample: Option<Conv2d>,
}

/// The UNet: `forward(x, t, labels)` → a tensor shaped like `x` (or with `out_channels`).
#[derive(Clone, Debug)]
pub struct UNet {
    cfg: UNetConfig,
    time_embed: [Linear; 2],
    label_embed: Option<Embedding>,
    num_classes: usize,
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: (ResBlock, Option<Attention>, ResBlock),
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// `num_classes > 0` adds a class embedding with `num_classes + 1` rows; the last row is the
    /// "no label" token of classifier-free guidance.
    pub fn new(
        cfg: &UNetConfig,
        in_channels: usize,
        out_channels: usize,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let temb = cfg.temb_dim();
        let base = cfg.base_channels;
        let g = cfg.groups;
        let time_embed = [
            Linear::new(base, temb, vb.pp("time_embed.0"))?,
            Linear::new(temb, temb, vb.pp("time_embed.2"))?,
        ];
        let label_embed = (num_classes > 0)
            .then(|| candle_nn::embedding(num_classes + 1, temb, vb.pp("label_embed")))
            .transpose()?;
        let conv_in = conv3(in_channels, base, 1, vb.pp("conv_in"))?;
        let levels = cfg.channel_mult.len();
        let mut skip_ch = vec![base];
        let mut ch = base;
        let mut down = Vec::new();
        for (l, m) in cfg.channel_mult.iter().enumerate() {
            let vbl = vb.pp(format!("down.{l}"));
            let out = base * m;
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for i in 0..cfg.num_res_blocks {
                res.push(ResBlock::new(ch, out, temb, g, vbl.pp(format!("res.{i}")))?);
                ch = out;
                if cfg.attention_levels.contains(&l) {
                    attn.push(Attention::new(
                        ch,
                        g,
                        cfg.head_dim,
                        vbl.pp(format!("attn.{i}")),
                    )?);
                }
                skip_ch.push(ch);
            }
            let resample = (l + 1 < levels)
                .then(|| conv3(ch, ch, 2, vbl.pp("downsample")))
                .transpose()?;
            if resample.is_some() {
                skip_ch.push(ch);
            }
            down.push(Level {
                res,
                attn,
                resample,
            });
        }
        let mid = (
            ResBlock::new(ch, ch, temb, g, vb.pp("mid.res1"))?,
            cfg.mid_attention
                .then(|| Attention::new(ch, g, cfg.head_dim, vb.pp("mid.attn")))
                .transpose()?,
            ResBlock::new(ch, ch, temb, g, vb.pp("mid.res2"))?,
        );
        let mut up = Vec::new();
        for (l, m) in cfg.channel_mult.iter().enumerate().rev() {
            let vbl = vb.pp(format!("up.{l}"));
            let out = base * m;
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for i in 0..=cfg.num_res_blocks {
                let skip = skip_ch.pop().expect("one skip per down activation");
                res.push(ResBlock::new(
                    ch + skip,
                    out,
                    temb,
                    g,
                    vbl.pp(format!("res.{i}")),
                )?);
                ch = out;
                if cfg.attention_levels.contains(&l) {
                    attn.push(Attention::new(
                        ch,
                        g,
                        cfg.head_dim,
                        vbl.pp(format!("attn.{i}")),
                    )?);
                }
            }
            let resample = (l > 0)
                .then(|| conv3(ch, ch, 1, vbl.pp("upsample")))
                .transpose()?;
            up.push(Level {
                res,
                attn,
                resample,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            time_embed,
            label_embed,
            num_classes,
            conv_in,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(g, ch, vb.pp("norm_out"))?,
            conv_out: conv3(ch, out_channels, 1, vb.pp("conv_out"))?,
        })
    }

    /// The class count (0 for an unconditional net); label `num_classes` means "no label".
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// `x`: `(B, C, H, W)`; `t`: `(B,)` times on the embedding's scale (DDPM: the step index;
    /// flow matching: `1000·t`); `labels`: `(B,)` u32 in `0..=num_classes`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let t = t.to_dtype(x.dtype())?;
        let e = crate::nn::timestep_embedding_with(
            &t,
            self.cfg.base_channels,
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift,
        )?;
        let e = self.time_embed[0].forward(&e)?.silu()?;
        let mut temb = self.time_embed[1].forward(&e)?;
        match (&self.label_embed, labels) {
            (Some(emb), Some(y)) => temb = (temb + emb.forward(&y.to_dtype(DType::U32)?)?)?,
            (Some(_), None) => candle_core::bail!("this UNet is class-conditional: pass labels"),
            (None, Some(_)) => candle_core::bail!("this UNet has no class embedding"),
            (None, None) => {}
        }
        let ta = temb.silu()?;
        let mut h = self.conv_in.forward(x)?;
        let mut skips = vec![h.clone()];
        for level in &self.down {
            for (i, r) in level.res.iter().enumerate() {
                h = r.forward(&h, &ta)?;
                if let Some(a) = level.attn.get(i) {
                    h = a.forward(&h)?;
                }
                skips.push(h.clone());
            }
            if let Some(d) = &level.resample {
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }
        h = self.mid.0.forward(&h, &ta)?;
        if let Some(a) = &self.mid.1 {
            h = a.forward(&h)?;
        }
        h = self.mid.2.forward(&h, &ta)?;
        for level in &self.up {
            for (i, r) in level.res.iter().enumerate() {
                let s = skips.pop().expect("matching skip");
                h = r.forward(&Tensor::cat(&[&h, &s], 1)?, &ta)?;
                if let Some(a) = level.attn.get(i) {
                    h = a.forward(&h)?;
                }
            }
            if let Some(u) = &level.resample {
                h = u.forward_act(&upsample_nearest2x(&h)?, Act::Identity)?;
            }
        }
        self.conv_out.forward(&norm_silu(&self.norm_out, &h)?)
    }
}

pub(crate) fn check_dropout(p: f64) -> std::result::Result<(), String> {
    if !(0.0..1.0).contains(&p) {
        return Err(format!("model.label_dropout must be in [0, 1), got {p}"));
    }
    Ok(())
}

/// Most images a sampler pushes through the network at once.
pub const SAMPLE_CHUNK: usize = 250;

/// What DDPM and flow matching share: the network, its labels, guidance, image scaling.
#[derive(Clone, Debug)]
pub(crate) struct Denoiser {
    pub unet: UNet,
    pub num_classes: usize,
}

impl Denoiser {
    pub fn new(
        shape: [usize; 3],
        unet: &UNetConfig,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let c = shape[0];
        Ok(Self {
            unet: UNet::new(unet, c, c, num_classes, vb)?,
            num_classes,
        })
    }

    /// `[0, 1]` pixels to `[-1, 1]`.
    pub fn to_model(x: &Tensor) -> Result<Tensor> {
        x.affine(2.0, -1.0)
    }

    /// `−log p(y)` in nats on the 8-bit scale of dequantised pixels `y ∈ [0, 1]` from `log p(x)`
    /// `(B,)` of the model's `x = 2y − 1`: `−log p(x) − D ln 2` (the scaling) `+ D ln 256`
    /// (dequantisation), i.e. `−log p(x) + D ln 128`.
    pub fn eight_bit_nll(logp_model: &Tensor, dims: usize) -> Result<Tensor> {
        logp_model.neg()? + dims as f64 * 128f64.ln()
    }

    /// `[-1, 1]` back to `[0, 1]`, clamped.
    pub fn to_pixels(x: &Tensor) -> Result<Tensor> {
        x.affine(0.5, 0.5)?.clamp(0.0, 1.0)
    }

    /// Training labels: each replaced by the "no label" token with probability `p`.
    pub fn train_labels(&self, batch: &Batch, p: f64, rng: &mut GmRng) -> Result<Option<Tensor>> {
        if self.num_classes == 0 {
            return Ok(None);
        }
        let y = batch.labels.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("a class-conditional model needs labels".into())
        })?;
        gm_core::traffic::record_readback(gm_core::traffic::bytes_of(y));
        let v: Vec<u32> = y.to_dtype(DType::U32)?.to_vec1()?;
        // One uniform per label (drawn only when labels are dropped at all).
        let u = match p > 0.0 {
            true => rng.per_sample_f64(v.len()),
            false => vec![1.0; v.len()],
        };
        let out: Vec<u32> = v
            .into_iter()
            .zip(u)
            .map(|(l, u)| {
                if p > 0.0 && u < p {
                    self.num_classes as u32
                } else {
                    l
                }
            })
            .collect();
        Ok(Some(gm_core::traffic::upload(out, y.dim(0)?, y.device())?))
    }

    /// Labels for evaluation: the data's own labels (conditional likelihood).
    pub fn eval_labels(&self, batch: &Batch) -> Result<Option<Tensor>> {
        if self.num_classes == 0 {
            return Ok(None);
        }
        match &batch.labels {
            Some(y) => Ok(Some(y.to_dtype(DType::U32)?)),
            None => candle_core::bail!("a class-conditional model needs labels"),
        }
    }

    /// The network output at time `t` (`(B,)` on the embedding's scale), with classifier-free
    /// guidance `out_u + w·(out_c − out_u)` when `labels` are given and `w ≠ 1`.
    pub fn guided(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        match labels {
            Some(y) if w != 1.0 => {
                let b = x.dim(0)?;
                let null = Tensor::full(self.num_classes as u32, b, x.device())?;
                let xx = Tensor::cat(&[x, x], 0)?;
                let tt = Tensor::cat(&[t, t], 0)?;
                let yy = Tensor::cat(&[y, &null], 0)?;
                let out = self.unet.forward(&xx, &tt, Some(&yy))?;
                let c = out.narrow(0, 0, b)?;
                let u = out.narrow(0, b, b)?;
                &u + ((c - &u)? * w)?
            }
            _ => self.unet.forward(x, t, labels),
        }
    }

    /// Runs `f(count, labels)` over chunks of at most [`SAMPLE_CHUNK`] images and concatenates the
    /// results, so that memory stays bounded however many samples are asked for.
    pub fn chunked(
        n: usize,
        labels: Option<&Tensor>,
        mut f: impl FnMut(usize, Option<&Tensor>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let k = SAMPLE_CHUNK.min(n - start);
            let y = labels.map(|y| y.narrow(0, start, k)).transpose()?;
            parts.push(f(k, y.as_ref())?);
            start += k;
        }
        Tensor::cat(&parts, 0)
    }

    /// Labels of an unconditional grid of `n` (cycling through the classes), or `None`.
    pub fn grid_labels(&self, n: usize, device: &Device) -> Result<Option<Tensor>> {
        if self.num_classes == 0 {
            return Ok(None);
        }
        Ok(Some(crate::nn::cycle_labels(n, self.num_classes, device)?))
    }

    pub fn label_tensor(&self, labels: &[u32], device: &Device) -> Result<Option<Tensor>> {
        if self.num_classes == 0 {
            return Ok(None);
        }
        crate::nn::check_labels(labels, self.num_classes)?;
        Ok(Some(Tensor::new(labels, device)?))
    }
}
