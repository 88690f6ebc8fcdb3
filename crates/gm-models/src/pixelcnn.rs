//! PixelCNN (van den Oord et al., 2016, "Pixel Recurrent Neural Networks", §3.5 and Fig. 5).
//!
//! A 7×7 convolution with mask A (the centre pixel and everything after it in raster order are
//! zeroed) reads the image; residual blocks `ReLU → 1×1 (2h→h) → ReLU → 3×3 mask B → ReLU →
//! 1×1 (h→2h)` (mask B keeps the centre) follow; a head `ReLU → 1×1 → ReLU → 1×1` gives one
//! Bernoulli logit or 256 grey-level logits per pixel. Single-channel images only (the RGB
//! channel masks are not implemented).
//!
//! The masks make the receptive field of pixel `(i, j)` a subset of the pixels before it, but
//! stacking them leaves a *blind spot* up and to the right: some earlier pixels never reach
//! `(i, j)` however deep the net is. `gated_pixelcnn` removes it; the causality tests show both.
//!
//! Class-conditional when `num_classes > 0`: a learned per-class vector is added to the input of
//! every residual block. Parameter names: `input_conv`, `blocks.{i}.conv{1,2,3}`,
//! `blocks.{i}.label_emb`, `head.1`, `head.3` (a PyTorch `Sequential` of `ReLU, Conv, ReLU, Conv`).

use crate::ar::{check_shape, PixelOutput, RasterModel};
use crate::nn::Conv2d;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use gm_core::kernels::conv::{conv2d_cropped, Conv2dParams};
use gm_core::kernels::ops::Act;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PixelCnnConfig {
    /// `[1, H, W]`.
    pub image_shape: [usize; 3],
    /// Width of the residual stream (`2h` in the paper).
    pub channels: usize,
    pub res_blocks: usize,
    /// Kernel of the mask-A input convolution (odd).
    pub first_kernel: usize,
    /// Kernel of the mask-B convolutions in the blocks (odd).
    pub kernel: usize,
    /// Width of the output head.
    pub head_channels: usize,
    pub output: PixelOutput,
    /// Number of classes for a class-conditional model (0 = unconditional).
    pub num_classes: usize,
}

impl Default for PixelCnnConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            channels: 16,
            res_blocks: 2,
            first_kernel: 7,
            kernel: 3,
            head_channels: 16,
            output: PixelOutput::Bernoulli,
            num_classes: 0,
        }
    }
}

impl PixelCnnConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_shape(self.image_shape)?;
        if self.image_shape[0] != 1 {
            return Err(format!(
                "model.image_shape: PixelCNN supports single-channel images, got {} channels",
                self.image_shape[0]
            ));
        }
        if self.channels < 2 || self.channels % 2 != 0 || self.head_channels == 0 {
            return Err(format!(
                "model.channels must be even and >= 2 and model.head_channels > 0, got {} and {}",
                self.channels, self.head_channels
            ));
        }
        for (k, v) in [("first_kernel", self.first_kernel), ("kernel", self.kernel)] {
            if v % 2 == 0 || v < 3 {
                return Err(format!("model.{k} must be odd and >= 3, got {v}"));
            }
        }
        Ok(())
    }
}

impl crate::Family for PixelCnnConfig {
    const KIND: &'static str = "pixelcnn";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        PixelCnnConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        self.output.pixel_data()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(PixelCnn::new(self.clone(), vb)?))
    }
}

/// Which pixels a masked kernel may read: `A` strictly before the centre, `B` up to and
/// including it (raster order, single channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskType {
    A,
    B,
}

/// The `(kh, kw)` 0/1 mask of a raster-order masked kernel.
pub fn raster_mask(kh: usize, kw: usize, t: MaskType) -> Vec<f32> {
    let (ci, cj) = (kh / 2, kw / 2);
    (0..kh * kw)
        .map(|k| {
            let (i, j) = (k / kw, k % kw);
            f32::from(i < ci || (i == ci && (j < cj || (t == MaskType::B && j == cj))))
        })
        .collect()
}

/// A "same"-padded convolution whose weight is masked in raster order on every use (so the
/// masked entries get zero gradient and stay inert).
///
/// It is computed as the two convolutions its unmasked taps form — the `c = k/2` rows above the
/// centre (a `c × k` kernel, padding `c` on all sides, cropped to the input size) and the centre
/// row up to (mask A) or including (mask B) the centre (a `1 × m` kernel, padding `c` left and
/// right, cropped) — so the masked taps, about half of them, cost nothing. The function and the
/// gradients are those of the weight multiplied by [`raster_mask`]
/// ([`MaskedConv2d::forward_act_by_mask`], kept as the reference).
#[derive(Clone, Debug)]
pub struct MaskedConv2d {
    conv: Conv2d,
    mask: Tensor,
    k: usize,
    t: MaskType,
}

impl MaskedConv2d {
    pub fn new(c_in: usize, c_out: usize, k: usize, t: MaskType, vb: VarBuilder) -> Result<Self> {
        if k % 2 == 0 {
            candle_core::bail!("masked convolution: kernel size must be odd, got {k}")
        }
        let p = Conv2dParams::default().padding(k / 2);
        let conv = Conv2d::new(c_in, c_out, [k, k], p, true, vb)?;
        let mask = Tensor::from_vec(raster_mask(k, k, t), (1, 1, k, k), conv.weight().device())?
            .to_dtype(conv.weight().dtype())?;
        Ok(Self { conv, mask, k, t })
    }

    /// `act(masked_conv(x) + bias)`, by the two convolutions of the unmasked taps.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let c = self.k / 2;
        let m = if self.t == MaskType::B { c + 1 } else { c };
        let weight = self.conv.weight();
        let pad = |padding: [usize; 2]| Conv2dParams {
            padding,
            ..Conv2dParams::default()
        };
        let mut y = None;
        if m > 0 {
            let centre = weight.narrow(2, c, 1)?.narrow(3, 0, m)?;
            y = Some(conv2d_cropped(x, &centre, pad([0, c]), [h, w])?);
        }
        if c > 0 {
            let above = conv2d_cropped(x, &weight.narrow(2, 0, c)?, pad([c, c]), [h, w])?;
            y = Some(match y {
                Some(y) => (above + y)?,
                None => above,
            });
        }
        match y {
            Some(y) => self.conv.bias_act(y, act),
            // A 1 × 1 mask A reads nothing: the output is the bias alone.
            None => self.forward_act_by_mask(x, act),
        }
    }

    /// The same as [`MaskedConv2d::forward_act`] by one convolution with the weight multiplied
    /// by the mask (every tap computed, the masked ones times zero).
    pub fn forward_act_by_mask(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let w = self.conv.weight().broadcast_mul(&self.mask)?;
        self.conv.forward_with_weight(x, &w, act)
    }
}

#[derive(Clone, Debug)]
struct Block {
    conv1: Conv2d,
    conv2: MaskedConv2d,
    conv3: Conv2d,
    label_emb: Option<Embedding>,
}

#[derive(Clone, Debug)]
pub struct PixelCnn {
    cfg: PixelCnnConfig,
    input_conv: MaskedConv2d,
    blocks: Vec<Block>,
    head1: Conv2d,
    head2: Conv2d,
}

impl PixelCnn {
    pub fn new(cfg: PixelCnnConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let c = cfg.channels;
        let one = Conv2dParams::default();
        let input_conv = MaskedConv2d::new(
            cfg.image_shape[0],
            c,
            cfg.first_kernel,
            MaskType::A,
            vb.pp("input_conv"),
        )?;
        let mut blocks = Vec::new();
        for i in 0..cfg.res_blocks {
            let b = vb.pp("blocks").pp(i.to_string());
            blocks.push(Block {
                conv1: Conv2d::new(c, c / 2, [1, 1], one, true, b.pp("conv1"))?,
                conv2: MaskedConv2d::new(c / 2, c / 2, cfg.kernel, MaskType::B, b.pp("conv2"))?,
                conv3: Conv2d::new(c / 2, c, [1, 1], one, true, b.pp("conv3"))?,
                label_emb: if cfg.num_classes > 0 {
                    Some(candle_nn::embedding(cfg.num_classes, c, b.pp("label_emb"))?)
                } else {
                    None
                },
            });
        }
        let k = cfg.output.classes() * cfg.image_shape[0];
        let head1 = Conv2d::new(c, cfg.head_channels, [1, 1], one, true, vb.pp("head.1"))?;
        let head2 = Conv2d::new(cfg.head_channels, k, [1, 1], one, true, vb.pp("head.3"))?;
        Ok(Self {
            cfg,
            input_conv,
            blocks,
            head1,
            head2,
        })
    }

    pub fn config(&self) -> &PixelCnnConfig {
        &self.cfg
    }

    /// Logits `(B, K, D)` for images `(B, 1, H, W)` and, for a conditional model, labels `(B,)`.
    pub fn logits(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let b = x.dim(0)?;
        let mut h = self.input_conv.forward_act(x, Act::Identity)?;
        for blk in &self.blocks {
            let mut inp = h.clone();
            if let Some(e) = &blk.label_emb {
                let y = labels.ok_or_else(|| {
                    candle_core::Error::msg("a class-conditional PixelCNN needs labels")
                })?;
                inp = inp.broadcast_add(&e.forward(y)?.unsqueeze(2)?.unsqueeze(3)?)?;
            }
            let r = blk.conv1.forward_act(&inp.relu()?, Act::Relu)?;
            let r = blk.conv2.forward_act(&r, Act::Relu)?;
            h = (inp + blk.conv3.forward(&r)?)?;
        }
        let o = self.head1.forward_act(&h.relu()?, Act::Relu)?;
        let o = self.head2.forward(&o)?;
        o.reshape((b, self.cfg.output.classes(), ()))
    }
}

impl RasterModel for PixelCnn {
    fn kind_name(&self) -> &'static str {
        "pixelcnn"
    }
    fn image_shape(&self) -> [usize; 3] {
        self.cfg.image_shape
    }
    fn output(&self) -> PixelOutput {
        self.cfg.output
    }
    fn num_classes(&self) -> usize {
        self.cfg.num_classes
    }
    fn rows_above(&self) -> usize {
        self.cfg.first_kernel / 2 + self.cfg.res_blocks * (self.cfg.kernel / 2)
    }
    fn any_param(&self) -> &Tensor {
        self.head2.weight()
    }
    fn logits(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        PixelCnn::logits(self, x, labels)
    }
}
