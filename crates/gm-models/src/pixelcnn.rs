//! PixelCNN (van den Oord et al., 2016, "Pixel Recurrent Neural Networks", §3.5 and Fig. 5).
//!
//! A 7×7 convolution with mask A (the centre pixel and everything after it in raster order are
//! zeroed) reads the image; residual blocks `ReLU → 1×1 (2h→h) → ReLU → 3×3 mask B → ReLU →
//! 1×1 (h→2h)` (mask B keeps the centre) follow; a head `ReLU → 1×1 → ReLU → 1×1` gives one
//! Bernoulli logit or 256 level logits per pixel and channel.
//!
//! Colour images (`image_shape = [C, H, W]`, C = 3 for RGB) follow the paper's channel masks
//! (§3.4): every layer's channels are split into C colour groups (channel `i` has colour
//! `i % C`), and at the centre pixel colour `c` reads only the colours before it (mask A) or up
//! to it (mask B, also in every 1×1 convolution) — so within a pixel R comes first, then G given
//! R, then B given R and G; [`crate::nn::channel_mask`].
//!
//! The masks make the receptive field of pixel `(i, j)` a subset of the pixels before it, but
//! stacking them leaves a *blind spot* up and to the right: some earlier pixels never reach
//! `(i, j)` however deep the net is. `gated_pixelcnn` removes it; the causality tests show both.
//!
//! Class-conditional when `num_classes > 0`: a learned per-class vector is added to the input of
//! every residual block. Parameter names: `input_conv`, `blocks.{i}.conv{1,2,3}`,
//! `blocks.{i}.label_emb`, `head.1`, `head.3` (a PyTorch `Sequential` of `ReLU, Conv, ReLU, Conv`).

use crate::ar::{check_shape, PixelOutput, RasterModel};
use crate::ar_cache::{colour_logits, CachedRaster, CausalConv, LayerCache, Pointwise};
use crate::nn::embed_labels;
pub use crate::nn::{channel_mask, raster_mask, MaskType, MaskedConv2d, PointwiseConv};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use gm_core::kernels::ops::{self, Act};
use gm_core::{grad_checkpoint, GmRng};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PixelCnnConfig {
    /// `[C, H, W]`: C colour channels (1 grey, 3 RGB), any size.
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
        let c = self.image_shape[0];
        if self.channels < 2 * c || self.channels % 2 != 0 || self.head_channels < c {
            return Err(format!(
                "model.channels must be even and >= 2·C and model.head_channels >= C (every colour \
                 group needs a channel; C = {c}), got {} and {}",
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

#[derive(Clone, Debug)]
struct Block {
    conv1: PointwiseConv,
    conv2: MaskedConv2d,
    conv3: PointwiseConv,
    label_emb: Option<Embedding>,
}

impl Block {
    /// One block of gradient checkpointing.
    fn forward(&self, h: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        if !grad_checkpoint::enabled() {
            return self.forward_plain(h, labels);
        }
        let (me, labels) = (self.clone(), labels.cloned());
        grad_checkpoint::block1(&[h], move |i| me.forward_plain(&i[0], labels.as_ref()))
    }

    fn forward_plain(&self, h: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let mut inp = h.clone();
        if let Some(e) = &self.label_emb {
            let v = embed_labels(e, labels, "PixelCNN")?;
            inp = inp.broadcast_add(&v.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let r = self
            .conv1
            .forward_act(&ops::act(&inp, Act::Relu)?, Act::Relu)?;
        let r = self.conv2.forward_act(&r, Act::Relu)?;
        inp + self.conv3.forward(&r)?
    }
}

#[derive(Clone, Debug)]
pub struct PixelCnn {
    cfg: PixelCnnConfig,
    input_conv: MaskedConv2d,
    blocks: Vec<Block>,
    head1: PointwiseConv,
    head2: PointwiseConv,
}

impl PixelCnn {
    pub fn new(cfg: PixelCnnConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let (c, g) = (cfg.channels, cfg.image_shape[0]);
        let input_conv =
            MaskedConv2d::with_groups(g, c, cfg.first_kernel, MaskType::A, g, vb.pp("input_conv"))?;
        let mut blocks = Vec::new();
        for i in 0..cfg.res_blocks {
            let b = vb.pp("blocks").pp(i.to_string());
            blocks.push(Block {
                conv1: PointwiseConv::new(c, c / 2, g, b.pp("conv1"))?,
                conv2: MaskedConv2d::with_groups(
                    c / 2,
                    c / 2,
                    cfg.kernel,
                    MaskType::B,
                    g,
                    b.pp("conv2"),
                )?,
                conv3: PointwiseConv::new(c / 2, c, g, b.pp("conv3"))?,
                label_emb: if cfg.num_classes > 0 {
                    Some(candle_nn::embedding(cfg.num_classes, c, b.pp("label_emb"))?)
                } else {
                    None
                },
            });
        }
        let k = cfg.output.classes() * cfg.image_shape[0];
        let head1 = PointwiseConv::new(c, cfg.head_channels, g, vb.pp("head.1"))?;
        let head2 = PointwiseConv::new(cfg.head_channels, k, g, vb.pp("head.3"))?;
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

    /// Logits `(B, K, D)` (`D = C·H·W`) for images `(B, C, H, W)` and, for a conditional model, labels `(B,)`.
    pub fn logits(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let b = x.dim(0)?;
        let mut h = self.input_conv.forward_act(x, Act::Identity)?;
        for blk in &self.blocks {
            h = blk.forward(&h, labels)?;
        }
        let o = self
            .head1
            .forward_act(&ops::act(&h, Act::Relu)?, Act::Relu)?;
        let o = self.head2.forward(&o)?;
        o.reshape((b, self.cfg.output.classes(), ()))
    }
}

/// [`PixelCnn`] during cached raster sampling ([`crate::ar_cache`]): the masked convolutions'
/// inputs (the image, each block's `conv2` input) are cached; everything else is per position.
struct PixelCnnCache {
    input_conv: CausalConv,
    blocks: Vec<(Pointwise, CausalConv, Pointwise, Option<Tensor>)>,
    head1: Pointwise,
    head2: Pointwise,
    /// The image, then each block's `conv2` input.
    caches: Vec<LayerCache>,
    groups: usize,
    width: usize,
}

impl PixelCnnCache {
    fn new(m: &PixelCnn, labels: Option<&Tensor>, n: usize) -> Result<Self> {
        let [c, _, w] = m.cfg.image_shape;
        let masked = |l: &MaskedConv2d| -> Result<CausalConv> {
            CausalConv::new(
                &l.masked_weight()?,
                l.conv().bias(),
                l.conv().params().padding,
            )
        };
        let point = |l: &PointwiseConv| Pointwise::new(&l.masked_weight()?, l.bias());
        let like = m.head2.weight();
        let input_conv = masked(&m.input_conv)?;
        let mut caches = vec![LayerCache::new(n, c, w, input_conv.pad(), like)?];
        let mut blocks = Vec::new();
        for b in &m.blocks {
            let conv2 = masked(&b.conv2)?;
            caches.push(LayerCache::new(
                n,
                m.cfg.channels / 2,
                w,
                conv2.pad(),
                like,
            )?);
            let emb = b
                .label_emb
                .as_ref()
                .map(|e| embed_labels(e, labels, "PixelCNN").map(|v| v.detach()))
                .transpose()?;
            blocks.push((point(&b.conv1)?, conv2, point(&b.conv3)?, emb));
        }
        Ok(Self {
            input_conv,
            blocks,
            head1: point(&m.head1)?,
            head2: point(&m.head2)?,
            caches,
            groups: c,
            width: w,
        })
    }
}

impl CachedRaster for PixelCnnCache {
    fn start_row(&mut self, i: usize) -> Result<()> {
        let w = self.width;
        self.input_conv.start_row(&self.caches[0], i, w)?;
        for (b, blk) in self.blocks.iter_mut().enumerate() {
            blk.1.start_row(&self.caches[b + 1], i, w)?;
        }
        Ok(())
    }

    fn logits_at(&mut self, j: usize, pixel: &Tensor, ch: usize) -> Result<Tensor> {
        self.caches[0].set(j, pixel.clone());
        let mut h = self.input_conv.at(&self.caches[0], j, Act::Identity)?;
        for (b, (conv1, conv2, conv3, emb)) in self.blocks.iter().enumerate() {
            let inp = match emb {
                Some(e) => (h + e)?,
                None => h,
            };
            let r = conv1.apply(&ops::act(&inp, Act::Relu)?, Act::Relu)?;
            self.caches[b + 1].set(j, r);
            let r = conv2.at(&self.caches[b + 1], j, Act::Relu)?;
            h = (inp + conv3.apply(&r, Act::Identity)?)?;
        }
        let o = self.head1.apply(&ops::act(&h, Act::Relu)?, Act::Relu)?;
        colour_logits(&self.head2.apply(&o, Act::Identity)?, self.groups, ch)
    }

    fn end_pixel(&mut self, j: usize, pixel: &Tensor) -> Result<()> {
        self.caches[0].set(j, pixel.clone());
        Ok(())
    }

    fn end_row(&mut self) -> Result<()> {
        self.caches.iter_mut().try_for_each(LayerCache::push_row)
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
    fn draw_cached(
        &self,
        labels: Option<&Tensor>,
        n: usize,
        rng: &mut GmRng,
        keep_logits: bool,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        crate::ar_cache::draw(
            self,
            PixelCnnCache::new(self, labels, n)?,
            n,
            rng,
            keep_logits,
        )
    }
}
