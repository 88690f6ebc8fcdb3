//! Gated PixelCNN (van den Oord et al., 2016, "Conditional Image Generation with PixelCNN
//! Decoders"): two stacks that together see every earlier pixel — no blind spot.
//!
//! - The *vertical* stack at `(i, j)` sees only rows above `i` (any column within the kernel).
//!   Its convolution has a `(k/2 + 1) × k` kernel over rows `i − k/2 … i` of the previous vertical
//!   features (which themselves see only rows above); the first layer uses a `k/2 × k` kernel
//!   over rows `i − k/2 … i − 1` of the image. Padding and cropping replace the mask, so no
//!   multiply is wasted on zeroed weights.
//! - The *horizontal* stack at `(i, j)` sees pixels `(i, j' < j)` of row `i` and, through a 1×1
//!   link, the vertical features at `(i, j)`; its kernel is `1 × (k/2 + 1)` (the first layer
//!   `1 × k/2`, excluding the centre).
//! - Each layer is gated, `y = tanh(W_f ∗ x + V_f·e_y) ⊙ σ(W_g ∗ x + V_g·e_y)`, where `e_y` is the
//!   class embedding of a conditional model; the horizontal stack is residual after layer 0.
//!
//! Colour images (`image_shape = [C, H, W]`) split every horizontal-stack layer into C colour
//! groups as the plain PixelCNN does ([`crate::nn::channel_mask`]): the horizontal kernels then
//! include the centre column for every layer, masked by colour (A in layer 0, B after), and the
//! 1×1 convolutions of the horizontal stack and head keep the groups. The vertical stack sees
//! only rows above, so it needs no colour mask. `channels` must be a multiple of C (the gates
//! pair channel `i` with `channels + i`, which must share a colour).
//!
//! Parameter names: `layers.{i}.{v_conv,h_conv,v_to_h,h_out,cond_v,cond_h}`, `head.1`, `head.3`.

use crate::ar::{check_shape, PixelOutput, RasterModel};
use crate::ar_cache::{
    colour_logits, finish, per_row, CachedRaster, LayerCache, PixelTaps, Pointwise, RowTaps,
};
use crate::nn::{channel_mask, embed_labels, masked, Conv2d, MaskType, PointwiseConv};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use gm_core::kernels::conv::Conv2dParams;
use gm_core::kernels::ops::{self, gated_tanh, Act};
use gm_core::{grad_checkpoint, GmRng};
use serde::{Deserialize, Serialize};

/// The model's name in error messages.
const MODEL: &str = "Gated PixelCNN";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatedPixelCnnConfig {
    /// `[C, H, W]`: C colour channels (1 grey, 3 RGB), any size.
    pub image_shape: [usize; 3],
    /// Feature maps per stack (`h`; the gates use `2h`).
    pub channels: usize,
    /// Gated layers, the first included.
    pub layers: usize,
    /// Kernel size `k` of the first layer (odd).
    pub first_kernel: usize,
    /// Kernel size `k` of the other layers (odd).
    pub kernel: usize,
    pub head_channels: usize,
    pub output: PixelOutput,
    /// Number of classes for a class-conditional model (0 = unconditional).
    pub num_classes: usize,
}

impl Default for GatedPixelCnnConfig {
    fn default() -> Self {
        Self {
            image_shape: [1, 28, 28],
            channels: 16,
            layers: 3,
            first_kernel: 7,
            kernel: 3,
            head_channels: 16,
            output: PixelOutput::Bernoulli,
            num_classes: 0,
        }
    }
}

impl GatedPixelCnnConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_shape(self.image_shape)?;
        if self.channels == 0 || self.head_channels == 0 || self.layers == 0 {
            return Err("model.channels, model.head_channels and model.layers must be > 0".into());
        }
        let c = self.image_shape[0];
        if self.channels % c != 0 || self.head_channels < c {
            return Err(format!(
                "model.channels must be a multiple of C and model.head_channels >= C for {c} \
                 colour channels, got {} and {}",
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

impl crate::Family for GatedPixelCnnConfig {
    const KIND: &'static str = "gated-pixelcnn";

    fn data(&self) -> crate::DataShape {
        crate::DataShape::Image(self.image_shape)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        GatedPixelCnnConfig::validate(self)
    }

    fn pixel_data(&self) -> crate::PixelData {
        self.output.pixel_data()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder) -> Result<Box<dyn crate::Model>> {
        Ok(Box::new(GatedPixelCnn::new(self.clone(), vb)?))
    }
}

/// A convolution whose output is the top-left corner of the input's size: with a kernel of
/// `rows × cols` and padding `(pr, pc)`, output `(i, j)` reads input rows `i − pr … i − pr + rows
/// − 1` and columns `j − pc … j − pc + cols − 1`.
///
/// With a `mask` (the shape of the weight), the weight is multiplied by it on every use.
#[derive(Clone, Debug)]
struct ShiftedConv {
    conv: Conv2d,
    mask: Option<Tensor>,
}

impl ShiftedConv {
    fn new(
        c_in: usize,
        c_out: usize,
        kernel: [usize; 2],
        pad: [usize; 2],
        vb: VarBuilder,
    ) -> Result<Self> {
        let p = Conv2dParams {
            padding: pad,
            ..Default::default()
        };
        Ok(Self {
            conv: Conv2d::new(c_in, c_out, kernel, p, true, vb)?,
            mask: None,
        })
    }

    /// A `1 × (r + 1)` row kernel (padding `r` on the left) whose last, centre column is masked
    /// by colour ([`channel_mask`], `groups` colours).
    fn row_with_centre(
        c_in: usize,
        c_out: usize,
        r: usize,
        t: MaskType,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut s = Self::new(c_in, c_out, [1, r + 1], [0, r], vb)?;
        let cm = channel_mask(c_out, c_in, groups, t);
        let m: Vec<f32> = (0..c_out * c_in * (r + 1))
            .map(|n| {
                if n % (r + 1) == r {
                    cm[n / (r + 1)]
                } else {
                    1.0
                }
            })
            .collect();
        let w = s.conv.weight();
        s.mask =
            Some(Tensor::from_vec(m, (c_out, c_in, 1, r + 1), w.device())?.to_dtype(w.dtype())?);
        Ok(s)
    }

    /// The weight times its mask, if any.
    fn masked_weight(&self) -> Result<Tensor> {
        masked(self.conv.weight(), self.mask.as_ref())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv
            .forward_cropped_with_weight(x, &self.masked_weight()?, [h, w], Act::Identity)
    }
}

#[derive(Clone, Debug)]
struct GatedLayer {
    v_conv: ShiftedConv,
    h_conv: ShiftedConv,
    v_to_h: Conv2d,
    h_out: PointwiseConv,
    cond_v: Option<Embedding>,
    cond_h: Option<Embedding>,
    /// Layer 0: strictly-before kernels, no residual.
    first: bool,
    /// The last layer's vertical output feeds nothing: it is not computed (nor conditioned).
    last: bool,
}

impl GatedLayer {
    fn new(
        c_in: usize,
        h: usize,
        k: usize,
        [first, last]: [bool; 2],
        classes: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let r = k / 2;
        let (v_rows, h_cols) = if first { (r, r) } else { (r + 1, r + 1) };
        let one = Conv2dParams::default();
        let emb = |name: &str| -> Result<Option<Embedding>> {
            (classes > 0 && !(last && name == "cond_v"))
                .then(|| candle_nn::embedding(classes, 2 * h, vb.pp(name)))
                .transpose()
        };
        Ok(Self {
            v_conv: ShiftedConv::new(c_in, 2 * h, [v_rows, k], [r, r], vb.pp("v_conv"))?,
            h_conv: if groups > 1 {
                let t = if first { MaskType::A } else { MaskType::B };
                ShiftedConv::row_with_centre(c_in, 2 * h, r, t, groups, vb.pp("h_conv"))?
            } else {
                ShiftedConv::new(c_in, 2 * h, [1, h_cols], [0, r], vb.pp("h_conv"))?
            },
            v_to_h: Conv2d::new(2 * h, 2 * h, [1, 1], one, true, vb.pp("v_to_h"))?,
            h_out: PointwiseConv::new(h, h, groups, vb.pp("h_out"))?,
            cond_v: emb("cond_v")?,
            cond_h: emb("cond_h")?,
            first,
            last,
        })
    }

    /// `(v_out, h_out)`; the last layer's `v_out` is `None` (it feeds nothing). One block of
    /// gradient checkpointing.
    fn forward(
        &self,
        v: &Tensor,
        h: &Tensor,
        y: Option<&Tensor>,
    ) -> Result<(Option<Tensor>, Tensor)> {
        if !grad_checkpoint::enabled() {
            return self.forward_plain(v, h, y);
        }
        let (me, y) = (self.clone(), y.cloned());
        let mut outs = grad_checkpoint::block(&[v, h], move |i| {
            let (v_out, h_out) = me.forward_plain(&i[0], &i[1], y.as_ref())?;
            Ok(v_out.into_iter().chain([h_out]).collect())
        })?;
        let h_out = outs.pop().expect("the horizontal output");
        Ok((outs.pop(), h_out))
    }

    fn forward_plain(
        &self,
        v: &Tensor,
        h: &Tensor,
        y: Option<&Tensor>,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let cond = |e: &Option<Embedding>, t: Tensor| -> Result<Tensor> {
            match e {
                None => Ok(t),
                Some(e) => t.broadcast_add(&embed_labels(e, y, MODEL)?.unsqueeze(2)?.unsqueeze(3)?),
            }
        };
        let vf = self.v_conv.forward(v)?;
        let hf = (self.h_conv.forward(h)? + self.v_to_h.forward(&vf)?)?;
        let v_out = if self.last {
            None
        } else {
            Some(gated_tanh(&cond(&self.cond_v, vf)?)?)
        };
        let hg = self.h_out.forward(&gated_tanh(&cond(&self.cond_h, hf)?)?)?;
        let h_out = if self.first { hg } else { (h + hg)? };
        Ok((v_out, h_out))
    }
}

#[derive(Clone, Debug)]
pub struct GatedPixelCnn {
    cfg: GatedPixelCnnConfig,
    layers: Vec<GatedLayer>,
    head1: PointwiseConv,
    head2: PointwiseConv,
    /// Logits per position and channel.
    classes: usize,
    /// Input channels and colour groups.
    c_in: usize,
    groups: usize,
}

impl GatedPixelCnn {
    pub fn new(cfg: GatedPixelCnnConfig, vb: VarBuilder) -> Result<Self> {
        let (c, classes) = (cfg.image_shape[0], cfg.output.classes());
        Self::build(cfg, c, classes, c, vb)
    }

    /// The network on inputs of `c_in` channels with `classes` logits per position: a K-way
    /// categorical over discrete codes whose embeddings are the input (the VQ-VAE's prior);
    /// `cfg.image_shape[1..]` is the grid and `cfg.output` is not used.
    pub fn with_io(
        cfg: GatedPixelCnnConfig,
        c_in: usize,
        classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::build(cfg, c_in, classes, 1, vb)
    }

    /// `groups` colour groups (1 for grey images and embedded codes); `classes` logits per
    /// position and group.
    fn build(
        cfg: GatedPixelCnnConfig,
        c_in: usize,
        classes: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let h = cfg.channels;
        let mut layers = Vec::new();
        for i in 0..cfg.layers {
            let (c_in, k) = if i == 0 {
                (c_in, cfg.first_kernel)
            } else {
                (h, cfg.kernel)
            };
            layers.push(GatedLayer::new(
                c_in,
                h,
                k,
                [i == 0, i + 1 == cfg.layers],
                cfg.num_classes,
                groups,
                vb.pp("layers").pp(i.to_string()),
            )?);
        }
        let head1 = PointwiseConv::new(h, cfg.head_channels, groups, vb.pp("head.1"))?;
        let head2 =
            PointwiseConv::new(cfg.head_channels, classes * groups, groups, vb.pp("head.3"))?;
        Ok(Self {
            cfg,
            layers,
            head1,
            head2,
            classes,
            c_in,
            groups,
        })
    }

    pub fn config(&self) -> &GatedPixelCnnConfig {
        &self.cfg
    }

    /// Logits `(B, K, D)` (`D = C·H·W`) for images `(B, C, H, W)` (or embedded codes `(B, c_in, H, W)`) and,
    /// for a conditional model, labels `(B,)`.
    pub fn logits(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (mut v, mut h) = (x.clone(), x.clone());
        for l in &self.layers {
            let (v_out, h_out) = l.forward(&v, &h, labels)?;
            h = h_out;
            match v_out {
                Some(t) => v = t,
                None => break,
            }
        }
        let o = self
            .head1
            .forward_act(&ops::act(&h, Act::Relu)?, Act::Relu)?;
        let o = self.head2.forward(&o)?;
        o.reshape((b, self.classes, ()))
    }
}

/// One [`GatedLayer`] during cached raster sampling.
struct GatedLayerCache {
    v: RowTaps,
    v_bias: Option<Tensor>,
    h: PixelTaps,
    h_bias: Option<Tensor>,
    v_to_h: Pointwise,
    h_out: Pointwise,
    cond_v: Option<Tensor>,
    cond_h: Option<Tensor>,
    first: bool,
    last: bool,
    /// `v_to_h` of the vertical features of the current row, `(n, W, 2h)`.
    vh: Option<Tensor>,
}

/// [`GatedPixelCnn`] during cached raster sampling ([`crate::ar_cache`]): the vertical stack is
/// computed a row at a time when the row starts (it sees only the rows above), the horizontal
/// stack a position at a time.
struct GatedCache {
    layers: Vec<GatedLayerCache>,
    /// Each layer's vertical-stack input (layer 0: the image), finished rows.
    v_in: Vec<LayerCache>,
    /// Each layer's horizontal-stack input (layer 0: the image), the current row.
    h_in: Vec<LayerCache>,
    head1: Pointwise,
    head2: Pointwise,
    groups: usize,
    width: usize,
}

impl GatedCache {
    fn new(m: &GatedPixelCnn, labels: Option<&Tensor>, n: usize) -> Result<Self> {
        let [c, w] = [m.c_in, m.cfg.image_shape[2]];
        let like = m.head2.weight();
        let cond = |e: &Option<Embedding>| -> Result<Option<Tensor>> {
            e.as_ref()
                .map(|e| embed_labels(e, labels, MODEL).map(|v| v.detach()))
                .transpose()
        };
        let (mut layers, mut v_in, mut h_in) = (Vec::new(), Vec::new(), Vec::new());
        for (i, l) in m.layers.iter().enumerate() {
            let c_in = if i == 0 { c } else { m.cfg.channels };
            let v = RowTaps::new(
                &l.v_conv.masked_weight()?,
                l.v_conv.conv.params().padding,
                true,
            )?;
            v_in.push(LayerCache::new(n, c_in, w, v.pad(), like)?);
            h_in.push(LayerCache::new(n, c_in, w, 0, like)?);
            layers.push(GatedLayerCache {
                v,
                v_bias: l.v_conv.conv.bias().map(Tensor::detach),
                h: PixelTaps::new(&l.h_conv.masked_weight()?, l.h_conv.conv.params().padding)?,
                h_bias: l.h_conv.conv.bias().map(Tensor::detach),
                v_to_h: Pointwise::new(l.v_to_h.weight(), l.v_to_h.bias())?,
                h_out: Pointwise::new(&l.h_out.masked_weight()?, l.h_out.bias())?,
                cond_v: cond(&l.cond_v)?,
                cond_h: cond(&l.cond_h)?,
                first: l.first,
                last: l.last,
                vh: None,
            });
        }
        Ok(Self {
            layers,
            v_in,
            h_in,
            head1: Pointwise::new(&m.head1.masked_weight()?, m.head1.bias())?,
            head2: Pointwise::new(&m.head2.masked_weight()?, m.head2.bias())?,
            groups: m.groups,
            width: w,
        })
    }
}

impl CachedRaster for GatedCache {
    fn start_row(&mut self, i: usize) -> Result<()> {
        let w = self.width;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let vf = layer.v.row(&self.v_in[l], i, w)?;
            let vf = finish(vf, layer.v_bias.as_ref(), Act::Identity)?;
            layer.vh = Some(layer.v_to_h.apply(&vf, Act::Identity)?);
            if !layer.last {
                let vf = match &layer.cond_v {
                    Some(e) => vf.broadcast_add(&e.unsqueeze(1)?)?,
                    None => vf,
                };
                self.v_in[l + 1].push(per_row(&vf, gated_tanh)?)?;
            }
        }
        Ok(())
    }

    fn logits_at(&mut self, j: usize, pixel: &Tensor, ch: usize) -> Result<Tensor> {
        self.h_in[0].set(j, pixel.clone());
        let mut h = pixel.clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let vh = layer
                .vh
                .as_ref()
                .ok_or_else(|| candle_core::Error::msg("cached sampling: row not started"))?
                .narrow(1, j, 1)?
                .squeeze(1)?;
            let hf = finish(
                (layer.h.at(&self.h_in[l], j)? + vh)?,
                layer.h_bias.as_ref(),
                Act::Identity,
            )?;
            let hf = match &layer.cond_h {
                Some(e) => (hf + e)?,
                None => hf,
            };
            let hg = layer.h_out.apply(&gated_tanh(&hf)?, Act::Identity)?;
            h = if layer.first {
                hg
            } else {
                (self.h_in[l].get(j) + hg)?
            };
            if l + 1 < self.layers.len() {
                self.h_in[l + 1].set(j, h.clone());
            }
        }
        let o = self.head1.apply(&ops::act(&h, Act::Relu)?, Act::Relu)?;
        colour_logits(&self.head2.apply(&o, Act::Identity)?, self.groups, ch)
    }

    fn end_pixel(&mut self, j: usize, pixel: &Tensor) -> Result<()> {
        self.h_in[0].set(j, pixel.clone());
        self.v_in[0].set(j, pixel.clone());
        Ok(())
    }

    fn end_row(&mut self) -> Result<()> {
        self.v_in[0].push_row()?;
        self.h_in.iter_mut().for_each(LayerCache::clear_row);
        Ok(())
    }
}

impl RasterModel for GatedPixelCnn {
    fn kind_name(&self) -> &'static str {
        "gated-pixelcnn"
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
        self.cfg.first_kernel / 2 + (self.cfg.layers - 1) * (self.cfg.kernel / 2)
    }
    fn any_param(&self) -> &Tensor {
        self.head2.weight()
    }
    fn logits(&self, x: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        GatedPixelCnn::logits(self, x, labels)
    }
    fn draw_cached(
        &self,
        labels: Option<&Tensor>,
        n: usize,
        rng: &mut GmRng,
        keep_logits: bool,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        crate::ar_cache::draw(self, GatedCache::new(self, labels, n)?, n, rng, keep_logits)
    }
}
