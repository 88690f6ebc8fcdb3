//! Shared building blocks — layers (linear, convolutions, masked convolutions, GroupNorm,
//! BatchNorm), the
//! sinusoidal time embedding, class-label helpers. Names follow PyTorch's `nn.Sequential` numbering (activations take an
//! index too), so safetensors files line up with a PyTorch `state_dict`.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use gm_core::kernels::conv::{conv2d, conv2d_cropped, conv_transpose2d, Conv2dParams};
use gm_core::kernels::ops::{self, bias_act, Act};

/// A stack of linear layers with ReLU between them (not after the last), named
/// `0, 2, 4, …` like `nn.Sequential(Linear, ReLU, Linear, …)`.
#[derive(Clone, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    relu_last: bool,
}

impl Mlp {
    /// `dims = [in, h1, …, out]`. With `relu_last` a ReLU follows the last layer too.
    pub fn new(dims: &[usize], relu_last: bool, vb: VarBuilder) -> Result<Self> {
        let mut layers = Vec::new();
        for (i, w) in dims.windows(2).enumerate() {
            layers.push(Linear::new(w[0], w[1], vb.pp((2 * i).to_string()))?);
        }
        Ok(Self { layers, relu_last })
    }

    /// Index the next module would get in the PyTorch `Sequential`.
    pub fn next_index(&self) -> usize {
        2 * self.layers.len() - usize::from(!self.relu_last)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            let act = if i + 1 < n || self.relu_last {
                Act::Relu
            } else {
                Act::Identity
            };
            h = l.forward_act(&h, act)?;
        }
        Ok(h)
    }
}

/// A fully connected layer `act(x·Wᵀ + b)` with PyTorch's names (`weight` `(out, in)`, `bias`)
/// and candle's initialisation hints; bias and activation run fused ([`bias_act`]).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn new(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_init(
            c_in,
            c_out,
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
            uniform_fan_in(c_in),
            vb,
        )
    }

    /// A layer whose weight and bias start from the given initialisers (zeros for a logistic
    /// regression, say).
    pub fn with_init(
        c_in: usize,
        c_out: usize,
        weight: Init,
        bias: Init,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((c_out, c_in), "weight", weight)?;
        let bias = vb.get_with_hints(c_out, "bias", bias)?;
        Ok(Self { weight, bias })
    }

    /// `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `act(x·Wᵀ + b)` for `x` of shape `(N, in)` (or `(…, in)`).
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        self.forward_with_weight(x, &self.weight, act)
    }

    /// `act(x·weightᵀ + b)` with a weight other than the stored one (a masked weight, say).
    pub fn forward_with_weight(&self, x: &Tensor, weight: &Tensor, act: Act) -> Result<Tensor> {
        if x.rank() != 2 {
            let mut dims = x.dims().to_vec();
            let y = self.forward_with_weight(&x.flatten_to(x.rank() - 2)?, weight, act)?;
            *dims.last_mut().expect("rank > 0") = self.bias.dim(0)?;
            return y.reshape(dims);
        }
        bias_act(&gm_core::precision::matmul_nt(x, weight)?, &self.bias, act)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::Identity)
    }
}

/// A 2-D convolution layer on [`gm_core::kernels::conv::conv2d`] (gm's fast CPU kernels; candle's on
/// CUDA/Metal), with PyTorch's parameter names (`weight` `(C_out, C_in / groups, kH, kW)`, `bias`)
/// and PyTorch's default initialisation (`U(±1/√fan_in)` for both).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    params: Conv2dParams,
}

impl Conv2d {
    /// `kernel = [kH, kW]`.
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: [usize; 2],
        params: Conv2dParams,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let init = uniform_fan_in(c_in / params.groups.max(1) * kernel[0] * kernel[1]);
        Self::with_init(c_in, c_out, kernel, params, init, bias.then_some(init), vb)
    }

    /// A layer whose weight and bias (if any) start from the given initialisers (zeros, say, for
    /// the last layer of a coupling network, so that the flow starts as the identity).
    pub fn with_init(
        c_in: usize,
        c_out: usize,
        kernel: [usize; 2],
        params: Conv2dParams,
        weight: Init,
        bias: Option<Init>,
        vb: VarBuilder,
    ) -> Result<Self> {
        if params.groups == 0 || c_in % params.groups != 0 || c_out % params.groups != 0 {
            candle_core::bail!(
                "conv {c_in}→{c_out}: channels not divisible by groups = {}",
                params.groups
            )
        }
        let weight = vb.get_with_hints(
            (c_out, c_in / params.groups, kernel[0], kernel[1]),
            "weight",
            weight,
        )?;
        let bias = bias
            .map(|b| vb.get_with_hints(c_out, "bias", b))
            .transpose()?;
        Ok(Self {
            weight,
            bias,
            params,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn params(&self) -> Conv2dParams {
        self.params
    }

    /// `act(conv(x, weight) + bias)` with a weight other than the stored one (a masked weight,
    /// say).
    pub fn forward_with_weight(&self, x: &Tensor, weight: &Tensor, act: Act) -> Result<Tensor> {
        self.bias_act(conv2d(x, weight, self.params)?, act)
    }

    /// `act(y + bias)` with this layer's bias, for a `y` computed some other way (the sum of
    /// convolutions by parts of the weight, say).
    pub fn bias_act(&self, y: Tensor, act: Act) -> Result<Tensor> {
        bias_then(y, self.bias.as_ref(), act)
    }

    /// `act(conv(x) + bias)`, bias and activation fused.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        self.forward_with_weight(x, &self.weight, act)
    }

    /// `conv(x) + bias + per_sample[n, c]` for `per_sample` of shape `(N, C_out)` — a time or
    /// class embedding projected to the channels — both added in one pass, their gradient one
    /// contiguous sum per (sample, channel) (a broadcast add of `(N, C, 1, 1)` is a further pass
    /// forward and candle's strided reduction backward).
    pub fn forward_add(&self, x: &Tensor, per_sample: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, self.params)?;
        let (n, c, h, w) = y.dims4()?;
        let shift = match &self.bias {
            Some(b) => per_sample.broadcast_add(b)?,
            None => per_sample.clone(),
        };
        bias_act(
            &y.reshape((1, n * c, h * w))?,
            &shift.flatten_all()?,
            Act::Identity,
        )?
        .reshape((n, c, h, w))
    }

    /// `act(conv(x) + bias)` on the top-left `out = [H', W']` corner of the output only
    /// ([`gm_core::kernels::conv::conv2d_cropped`]): with padding on one side, a causal convolution.
    pub fn forward_cropped(&self, x: &Tensor, out: [usize; 2], act: Act) -> Result<Tensor> {
        self.forward_cropped_with_weight(x, &self.weight, out, act)
    }

    /// [`Conv2d::forward_cropped`] with a weight other than the stored one (a masked weight, say).
    pub fn forward_cropped_with_weight(
        &self,
        x: &Tensor,
        weight: &Tensor,
        out: [usize; 2],
        act: Act,
    ) -> Result<Tensor> {
        self.bias_act(conv2d_cropped(x, weight, self.params, out)?, act)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::Identity)
    }
}

/// A 2-D transposed convolution layer on [`gm_core::kernels::conv::conv_transpose2d`], with PyTorch's
/// names (`weight` `(C_in, C_out / groups, kH, kW)`, `bias`) and default initialisation.
#[derive(Clone, Debug)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Option<Tensor>,
    params: Conv2dParams,
    output_padding: [usize; 2],
}

impl ConvTranspose2d {
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: [usize; 2],
        params: Conv2dParams,
        output_padding: [usize; 2],
        vb: VarBuilder,
    ) -> Result<Self> {
        if params.groups == 0 || c_in % params.groups != 0 || c_out % params.groups != 0 {
            candle_core::bail!(
                "transposed conv {c_in}→{c_out}: channels not divisible by groups = {}",
                params.groups
            )
        }
        // PyTorch computes fan_in from the weight's second dimension.
        let init = uniform_fan_in(c_out / params.groups * kernel[0] * kernel[1]);
        let weight = vb.get_with_hints(
            (c_in, c_out / params.groups, kernel[0], kernel[1]),
            "weight",
            init,
        )?;
        let bias = Some(vb.get_with_hints(c_out, "bias", init)?);
        Ok(Self {
            weight,
            bias,
            params,
            output_padding,
        })
    }
}

impl ConvTranspose2d {
    /// `act(conv_transpose(x) + bias)`, bias and activation fused.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let y = conv_transpose2d(x, &self.weight, self.params, self.output_padding)?;
        bias_then(y, self.bias.as_ref(), act)
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::Identity)
    }
}

fn uniform_fan_in(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `act(y + bias[c])` over `(N, C, H, W)` (any shape with channels on axis 1).
pub(crate) fn bias_then(y: Tensor, bias: Option<&Tensor>, act: Act) -> Result<Tensor> {
    match (bias, act) {
        (Some(b), act) => bias_act(&y, b, act),
        (None, Act::Identity) => Ok(y),
        (None, act) => bias_act(&y, &Tensor::zeros(y.dim(1)?, y.dtype(), y.device())?, act),
    }
}

/// A weight times its mask (same shape), or the weight itself without one.
pub(crate) fn masked(weight: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => Ok(weight.clone()),
        Some(m) => weight * m,
    }
}

/// The class embeddings `(B, C)` of a conditional layer for labels `(B,)`; an error naming
/// `model` when the labels are missing.
pub(crate) fn embed_labels(
    e: &candle_nn::Embedding,
    labels: Option<&Tensor>,
    model: &str,
) -> Result<Tensor> {
    let y = labels.ok_or_else(|| {
        candle_core::Error::msg(format!("a class-conditional {model} needs labels"))
    })?;
    e.forward(y)
}

/// Labels `0, 1, …` cycling through `num_classes` (what an unconditional `sample(n)` of a
/// class-conditional model draws), as a `(n,)` u32 tensor.
pub fn cycle_labels(n: usize, num_classes: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = (0..n).map(|i| (i % num_classes) as u32).collect();
    gm_core::traffic::upload(v, n, device)
}

/// Checks labels against the number of classes; the error names the bad label.
pub fn check_labels(labels: &[u32], num_classes: usize) -> Result<()> {
    if num_classes == 0 {
        candle_core::bail!("this model is not class-conditional (model.num_classes = 0)")
    }
    if let Some(l) = labels.iter().find(|&&l| l as usize >= num_classes) {
        candle_core::bail!("label {l} out of range: the model has {num_classes} classes")
    }
    Ok(())
}

/// GroupNorm with PyTorch's names (`weight`, `bias`) and initialisation (ones, zeros), on gm's
/// fused kernel ([`gm_core::kernels::norm::group_norm`]).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
            groups,
        })
    }

    /// `GroupNorm(x)`, followed by SiLU when `silu`.
    pub fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        gm_core::kernels::norm::group_norm(x, &self.weight, &self.bias, self.groups, 1e-5, silu)
    }
}

/// Batch normalisation over axis 1 — PyTorch's `BatchNorm1d`/`BatchNorm2d` with ε = 1e-5 and
/// momentum 0.1 — with PyTorch's (and candle-nn's) names and initialisation: `weight` (ones),
/// `bias` (zeros), `running_mean` (zeros), `running_var` (ones). Training normalises by the
/// batch's statistics on gm's fused kernel ([`gm_core::kernels::norm::batch_norm`]) and moves the
/// running ones, `r ← (1 − m)·r + m·s` with the unbiased variance; evaluation is one per-channel
/// affine pass ([`gm_core::kernels::ops::channel_affine`]) with the running statistics. Either
/// may end in a fused ReLU.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    running_mean: candle_core::Var,
    running_var: candle_core::Var,
    weight: Tensor,
    bias: Tensor,
}

impl BatchNorm {
    const EPS: f64 = 1e-5;
    const MOMENTUM: f64 = 0.1;

    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        // candle-nn's order of creation, so a fresh model's variables are the same.
        let mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            // The VarMap's own variables (`from_tensor` of a variable shares its storage), so
            // the running statistics move in the checkpointed model.
            running_mean: candle_core::Var::from_tensor(&mean)?,
            running_var: candle_core::Var::from_tensor(&var)?,
        })
    }

    /// The running mean and variance `(C,)`.
    pub fn running_stats(&self) -> (&Tensor, &Tensor) {
        (self.running_mean.as_tensor(), self.running_var.as_tensor())
    }

    /// `BatchNorm(x)` for `x` `(N, C, …)`, then ReLU when `relu`: with the batch's statistics
    /// (and a step of the running ones) when `train`, the running ones otherwise.
    pub fn forward(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        if x.rank() < 2 || x.dim(1)? != c {
            candle_core::bail!(
                "BatchNorm of {c} channels: input of shape {:?} (needs (N, {c}, …))",
                x.dims()
            )
        }
        if !train {
            let rm = self.running_mean.as_detached_tensor();
            let rv = self.running_var.as_detached_tensor();
            let scale = (&self.weight / (rv + Self::EPS)?.sqrt()?)?;
            let shift = (&self.bias - (rm * &scale)?)?;
            let y = ops::channel_affine(x, &scale, Some(&shift))?;
            return ops::act(&y, if relu { Act::Relu } else { Act::Identity });
        }
        let m = x.elem_count() / c;
        if m < 2 {
            candle_core::bail!(
                "BatchNorm in training needs more than one value per channel, got input of shape {:?}",
                x.dims()
            )
        }
        let (y, mean, var) =
            gm_core::kernels::norm::batch_norm(x, &self.weight, &self.bias, Self::EPS, relu)?;
        let (k, dt) = (Self::MOMENTUM, self.running_mean.dtype());
        let unbiased = m as f64 / (m as f64 - 1.0);
        let rm =
            ((self.running_mean.as_detached_tensor() * (1.0 - k))? + (mean.to_dtype(dt)? * k)?)?;
        let rv = ((self.running_var.as_detached_tensor() * (1.0 - k))?
            + (var.to_dtype(dt)? * (k * unbiased))?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok(y)
    }
}

/// Which pixels a masked kernel may read: `A` strictly before the centre, `B` up to and
/// including it (raster order). With several colour channels the centre pixel is split by
/// colour ([`channel_mask`]): `A` reads the earlier colours of the centre, `B` also its own.
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

/// The `(c_out, c_in)` 0/1 mask of the centre tap when the channels are split into `groups`
/// colours (the PixelCNN paper's RGB masks, §3.4): channel `i` of every layer has colour
/// `i % groups`, and output colour `o` reads input colour `i < o` (mask A) or `i ≤ o` (mask B).
/// So the logits of colour `c` at a pixel see that pixel's colours before `c` only: R, then G
/// given R, then B given R and G. All ones for mask B and one group.
pub fn channel_mask(c_out: usize, c_in: usize, groups: usize, t: MaskType) -> Vec<f32> {
    let g = groups.max(1);
    (0..c_out * c_in)
        .map(|k| {
            let (o, i) = ((k / c_in) % g, (k % c_in) % g);
            f32::from(i < o || (t == MaskType::B && i == o))
        })
        .collect()
}

/// A 1×1 convolution that keeps the colour groups of [`channel_mask`] (mask B): output colour
/// `o` reads input colours `≤ o`. A plain 1×1 convolution for one group.
#[derive(Clone, Debug)]
pub struct PointwiseConv {
    conv: Conv2d,
    mask: Option<Tensor>,
}

impl PointwiseConv {
    pub fn new(c_in: usize, c_out: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let conv = Conv2d::new(c_in, c_out, [1, 1], Conv2dParams::default(), true, vb)?;
        let mask = (groups > 1)
            .then(|| {
                Tensor::from_vec(
                    channel_mask(c_out, c_in, groups, MaskType::B),
                    (c_out, c_in, 1, 1),
                    conv.weight().device(),
                )?
                .to_dtype(conv.weight().dtype())
            })
            .transpose()?;
        Ok(Self { conv, mask })
    }

    pub fn weight(&self) -> &Tensor {
        self.conv.weight()
    }

    /// The weight times its colour mask, `(C_out, C_in, 1, 1)`.
    pub fn masked_weight(&self) -> Result<Tensor> {
        masked(self.conv.weight(), self.mask.as_ref())
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.conv.bias()
    }

    /// `act(conv(x) + bias)` with the masked weight.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        self.conv
            .forward_with_weight(x, &self.masked_weight()?, act)
    }
}

impl Module for PointwiseConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::Identity)
    }
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
///
/// With `groups > 1` colour channels ([`MaskedConv2d::with_groups`]) the centre tap is masked by
/// [`channel_mask`] and computed as a third, 1×1 convolution; the centre row's part then stops
/// left of the centre for both mask types.
#[derive(Clone, Debug)]
pub struct MaskedConv2d {
    conv: Conv2d,
    mask: Tensor,
    /// The `(c_out, c_in, 1, 1)` colour mask of the centre tap, with several groups.
    centre_mask: Option<Tensor>,
    k: usize,
    t: MaskType,
}

impl MaskedConv2d {
    pub fn new(c_in: usize, c_out: usize, k: usize, t: MaskType, vb: VarBuilder) -> Result<Self> {
        Self::with_groups(c_in, c_out, k, t, 1, vb)
    }

    /// A masked convolution over `groups` colour groups ([`channel_mask`]).
    pub fn with_groups(
        c_in: usize,
        c_out: usize,
        k: usize,
        t: MaskType,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if k % 2 == 0 {
            candle_core::bail!("masked convolution: kernel size must be odd, got {k}")
        }
        let p = Conv2dParams::default().padding(k / 2);
        let conv = Conv2d::new(c_in, c_out, [k, k], p, true, vb)?;
        let (dev, dt) = (conv.weight().device().clone(), conv.weight().dtype());
        let spatial = raster_mask(k, k, t);
        let (mask, centre_mask) = if groups > 1 {
            let cm = channel_mask(c_out, c_in, groups, t);
            let centre = (k / 2) * k + k / 2;
            let full: Vec<f32> = (0..c_out * c_in * k * k)
                .map(|n| {
                    let (oi, tap) = (n / (k * k), n % (k * k));
                    if tap == centre {
                        cm[oi]
                    } else {
                        spatial[tap]
                    }
                })
                .collect();
            let mask = Tensor::from_vec(full, (c_out, c_in, k, k), &dev)?.to_dtype(dt)?;
            let cm = Tensor::from_vec(cm, (c_out, c_in, 1, 1), &dev)?.to_dtype(dt)?;
            (mask, Some(cm))
        } else {
            let mask = Tensor::from_vec(spatial, (1, 1, k, k), &dev)?.to_dtype(dt)?;
            (mask, None)
        };
        Ok(Self {
            conv,
            mask,
            centre_mask,
            k,
            t,
        })
    }

    /// `act(masked_conv(x) + bias)`, by the convolutions of the unmasked taps.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let c = self.k / 2;
        let m = if self.t == MaskType::B && self.centre_mask.is_none() {
            c + 1
        } else {
            c
        };
        let weight = self.conv.weight();
        let pad = |padding: [usize; 2]| Conv2dParams {
            padding,
            ..Conv2dParams::default()
        };
        let mut y = None;
        let mut add = |t: Tensor| -> Result<()> {
            y = Some(match y.take() {
                Some(y) => (t + y)?,
                None => t,
            });
            Ok(())
        };
        if m > 0 {
            let centre = weight.narrow(2, c, 1)?.narrow(3, 0, m)?;
            add(conv2d_cropped(x, &centre, pad([0, c]), [h, w])?)?;
        }
        if c > 0 {
            add(conv2d_cropped(
                x,
                &weight.narrow(2, 0, c)?,
                pad([c, c]),
                [h, w],
            )?)?;
        }
        if let Some(cm) = &self.centre_mask {
            let tap = (weight.narrow(2, c, 1)?.narrow(3, c, 1)? * cm)?;
            add(conv2d(x, &tap, Conv2dParams::default())?)?;
        }
        match y {
            Some(y) => self.conv.bias_act(y, act),
            // A 1 × 1 mask A reads nothing: the output is the bias alone.
            None => self.forward_act_by_mask(x, act),
        }
    }

    /// The weight times its mask, `(C_out, C_in, k, k)`.
    pub fn masked_weight(&self) -> Result<Tensor> {
        self.conv.weight().broadcast_mul(&self.mask)
    }

    /// The convolution under the mask (its bias and padding).
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }

    /// The same as [`MaskedConv2d::forward_act`] by one convolution with the weight multiplied
    /// by the mask (every tap computed, the masked ones times zero).
    pub fn forward_act_by_mask(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let w = self.conv.weight().broadcast_mul(&self.mask)?;
        self.conv.forward_with_weight(x, &w, act)
    }
}

/// Sinusoidal embedding `[sin(t·f_i), cos(t·f_i)]`, `f_i = 10000^{-i/(dim/2)}`, of `(B,)` times.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    timestep_embedding_with(t, dim, false, 0.0)
}

/// [`timestep_embedding`] with diffusers' options: `flip` puts the cosines first
/// (`flip_sin_to_cos`), and the frequencies are `exp(−ln 10⁴ · i / (dim/2 − shift))`
/// (`freq_shift`).
pub fn timestep_embedding_with(t: &Tensor, dim: usize, flip: bool, shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp())
        .collect();
    let freqs = gm_core::traffic::upload(freqs, (1, half), t.device())?.to_dtype(t.dtype())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let e = if flip {
        Tensor::cat(&[args.cos()?, args.sin()?], 1)?
    } else {
        Tensor::cat(&[args.sin()?, args.cos()?], 1)?
    };
    if dim % 2 == 1 {
        e.pad_with_zeros(1, 0, 1)
    } else {
        Ok(e)
    }
}
