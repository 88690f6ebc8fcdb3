//! Fast raster sampling for convolutional autoregressive models (after Ramachandran et al.,
//! 2017, "Fast Generation for Convolutional Autoregressive Models"): every layer's activations
//! at the pixels already drawn are kept, so each new value costs one position of every layer
//! instead of a pass of the network over the image (or over the band of rows it can see,
//! [`crate::ar::sample_raster`]).
//!
//! A layer's output at `(i, j)` depends on its input at earlier positions only, and those
//! activations never change once their pixels are drawn. So a convolution is split into
//! - its taps on the rows above (`di < 0`): computed for the whole of row `i` at once, as one
//!   matrix product over the row, when row `i` starts (`RowTaps`);
//! - its taps on the current row (`di = 0, dj ≤ 0`): computed for one position when its pixel
//!   is drawn (`PixelTaps`), from the activations the same layer's input has at the earlier
//!   positions of the row.
//!
//! Colour images are drawn channel by channel; at colour `c` of a pixel every layer's output at
//! that pixel is recomputed (its colour groups `≤ c` are exact then, by the channel masks), and
//! the last colour's pass leaves every group exact, which is what the later pixels read.
//!
//! The samplers draw the same values in the same order from the same random numbers as
//! [`crate::ar::sample_raster`]; the tests check that the samples are equal and that the logits
//! each value was drawn from equal the network's own logits on the finished image.

use crate::ar::PixelOutput;
use crate::nn::bias_then;
use candle_core::{DType, Result, Tensor};
use gm_core::kernels::ops::Act;
use gm_core::GmRng;

/// The incremental state of one model's network during raster sampling ([`sample_cached`]).
pub(crate) trait CachedRaster {
    /// Row `i` starts: rows `< i` of the image are drawn and stored.
    fn start_row(&mut self, i: usize) -> Result<()>;
    /// The logits `(n, K)` of colour `ch` at column `j` of the current row, for the pixel values
    /// `(n, C)` whose colours `< ch` are drawn (the others zero). Keeps the activations it
    /// computes at this position.
    fn logits_at(&mut self, j: usize, pixel: &Tensor, ch: usize) -> Result<Tensor>;
    /// Pixel `j` of the current row is drawn in every colour: `(n, C)`.
    fn end_pixel(&mut self, j: usize, pixel: &Tensor) -> Result<()>;
    /// The current row is drawn.
    fn end_row(&mut self) -> Result<()>;
}

/// Draws `n` images of `shape` in raster order (pixel by pixel, colour by colour) through a
/// [`CachedRaster`] state, with the random numbers of [`crate::ar::sample_raster`] in the same
/// order. Returns the images `(n, C, H, W)` and, with `keep_logits`, the logits `(n, K, C·H·W)`
/// each value was drawn from.
pub(crate) fn sample_cached(
    shape: [usize; 3],
    n: usize,
    out: PixelOutput,
    like: &Tensor,
    rng: &mut GmRng,
    state: &mut dyn CachedRaster,
    keep_logits: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let [c, h, w] = shape;
    let (dtype, device) = (like.dtype(), like.device());
    let (plane, d, k) = (h * w, c * h * w, out.classes());
    let mut buf = vec![0f32; n * d];
    let mut logits = keep_logits.then(|| vec![0f32; n * k * d]);
    for i in 0..h {
        state.start_row(i)?;
        for j in 0..w {
            let mut px = vec![0f32; n * c];
            for ch in 0..c {
                let pixel = Tensor::from_slice(&px, (n, c), device)?.to_dtype(dtype)?;
                let l = state
                    .logits_at(j, &pixel, ch)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?;
                let at = ch * plane + i * w + j;
                if let Some(logits) = logits.as_mut() {
                    for (b, lb) in l.iter().enumerate() {
                        for (kk, v) in lb.iter().enumerate() {
                            logits[(b * k + kk) * d + at] = *v;
                        }
                    }
                }
                for (b, v) in out.draw(&l, rng).into_iter().enumerate() {
                    px[b * c + ch] = v;
                    buf[b * d + at] = v;
                }
            }
            let pixel = Tensor::from_slice(&px, (n, c), device)?.to_dtype(dtype)?;
            state.end_pixel(j, &pixel)?;
        }
        state.end_row()?;
    }
    let images = gm_core::traffic::upload(buf, (n, c, h, w), device)?.to_dtype(dtype)?;
    let logits = logits
        .map(|l| Tensor::from_vec(l, (n, k, d), device))
        .transpose()?;
    Ok((images, logits))
}

/// [`sample_cached`] for a raster model from its cached-sampling `state`.
pub(crate) fn draw<M: crate::ar::RasterModel + ?Sized>(
    m: &M,
    mut state: impl CachedRaster,
    n: usize,
    rng: &mut GmRng,
    keep_logits: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let (shape, out, like) = (m.image_shape(), m.output(), m.any_param());
    sample_cached(shape, n, out, like, rng, &mut state, keep_logits).map(Some)
}

/// One layer input's activations during sampling: the finished rows `(n, W + 2·pad, C)`,
/// channels last (zero-padded left and right for the row taps that read them), and the current
/// row's positions `(n, C)`.
pub(crate) struct LayerCache {
    rows: Vec<Tensor>,
    cells: Vec<Tensor>,
    zero: Tensor,
    pad: usize,
}

impl LayerCache {
    /// A cache of `c` channels for `n` images `w` wide, whose rows are read with taps up to
    /// `pad` columns either side.
    pub(crate) fn new(n: usize, c: usize, w: usize, pad: usize, like: &Tensor) -> Result<Self> {
        let zero = Tensor::zeros((n, c), like.dtype(), like.device())?;
        Ok(Self {
            rows: Vec::new(),
            cells: vec![zero.clone(); w],
            zero,
            pad,
        })
    }

    /// The activations `(n, C)` at column `j` of the current row.
    pub(crate) fn set(&mut self, j: usize, v: Tensor) {
        self.cells[j] = v;
    }

    pub(crate) fn get(&self, j: usize) -> &Tensor {
        &self.cells[j]
    }

    /// Zeros `(n, dims…)` of the cache's dtype and device.
    fn zeros(&self, dims: &[usize]) -> Result<Tensor> {
        let mut shape = vec![self.zero.dim(0)?];
        shape.extend_from_slice(dims);
        Tensor::zeros(shape, self.zero.dtype(), self.zero.device())
    }

    /// Forgets the current row (an input whose rows nothing reads).
    pub(crate) fn clear_row(&mut self) {
        self.cells.fill(self.zero.clone());
    }

    /// Stores the current row as a finished one.
    pub(crate) fn push_row(&mut self) -> Result<()> {
        let row = Tensor::stack(&self.cells, 1)?;
        self.push(row)
    }

    /// Stores a finished row `(n, W, C)` computed as a whole.
    pub(crate) fn push(&mut self, row: Tensor) -> Result<()> {
        self.rows.push(row.pad_with_zeros(1, self.pad, self.pad)?);
        self.cells.fill(self.zero.clone());
        Ok(())
    }
}

/// The taps of a convolution weight, as `(di, dj)` offsets of the input position it reads from
/// the output position, with the weights of the taps stacked into one matrix.
struct Taps {
    offsets: Vec<(isize, isize)>,
    /// `(T·C_in, C_out)`, tap-major: row `t·C_in + c` holds input channel `c` of tap `t`.
    w: Tensor,
}

impl Taps {
    /// The taps of `weight` `(C_out, C_in, kH, kW)` (a masked weight: all-zero taps are left
    /// out) with `padding = [pr, pc]`, i.e. output `(i, j)` reads input `(i − pr + a, j − pc + b)`,
    /// that `keep` accepts. `whole_rows`: the input's current row is computed as a whole before
    /// this layer runs (the taps may read any of its columns), else pixel by pixel (only
    /// columns up to the output's).
    fn new(
        weight: &Tensor,
        padding: [usize; 2],
        whole_rows: bool,
        keep: impl Fn(isize, isize) -> bool,
    ) -> Result<Option<Self>> {
        let (co, ci, kh, kw) = weight.dims4()?;
        let v = weight
            .detach()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let at = |o: usize, c: usize, a: usize, b: usize| v[((o * ci + c) * kh + a) * kw + b];
        let mut offsets = Vec::new();
        let mut rows: Vec<f64> = Vec::new();
        for a in 0..kh {
            for b in 0..kw {
                let (di, dj) = (
                    a as isize - padding[0] as isize,
                    b as isize - padding[1] as isize,
                );
                let used = (0..co).any(|o| (0..ci).any(|c| at(o, c, a, b) != 0.0));
                if !used || !keep(di, dj) {
                    continue;
                }
                if di > 0 || (di == 0 && dj > 0 && !whole_rows) {
                    candle_core::bail!("cached sampling: a tap at ({di}, {dj}) reads a later pixel")
                }
                offsets.push((di, dj));
                for c in 0..ci {
                    rows.extend((0..co).map(|o| at(o, c, a, b)));
                }
            }
        }
        if offsets.is_empty() {
            return Ok(None);
        }
        let t = offsets.len();
        let w = Tensor::from_vec(rows, (t * ci, co), weight.device())?.to_dtype(weight.dtype())?;
        Ok(Some(Self { offsets, w }))
    }
}

/// The taps of a convolution on finished rows, applied to a whole row at once.
pub(crate) struct RowTaps {
    taps: Option<Taps>,
    c_out: usize,
}

impl RowTaps {
    /// Every tap of `weight` with `di < 0` (`current_row`: `di ≤ 0`, for a layer whose input's
    /// current row is computed as a whole before it, as the Gated PixelCNN's vertical stack).
    pub(crate) fn new(weight: &Tensor, padding: [usize; 2], current_row: bool) -> Result<Self> {
        let top = if current_row { 0 } else { -1 };
        Ok(Self {
            taps: Taps::new(weight, padding, current_row, |di, _| di <= top)?,
            c_out: weight.dim(0)?,
        })
    }

    /// The widest column offset of the taps (the pad their input's rows need).
    pub(crate) fn pad(&self) -> usize {
        self.taps.as_ref().map_or(0, |t| {
            t.offsets
                .iter()
                .map(|o| o.1.unsigned_abs())
                .max()
                .unwrap_or(0)
        })
    }

    /// The taps' sum `(n, W, C_out)` at every position of row `i`, from the input's finished
    /// rows (zero above the image): one matrix product `(n·W, T·C_in) × (T·C_in, C_out)`.
    pub(crate) fn row(&self, input: &LayerCache, i: usize, w: usize) -> Result<Tensor> {
        let Some(t) = &self.taps else {
            return input.zeros(&[w, self.c_out]);
        };
        let mut parts = Vec::with_capacity(t.offsets.len());
        for &(di, dj) in &t.offsets {
            let r = i as isize + di;
            parts.push(if r < 0 {
                input.zeros(&[w, input.zero.dim(1)?])?
            } else {
                let row = input.rows.get(r as usize).ok_or_else(|| {
                    candle_core::Error::msg(format!("cached sampling: row {r} is not computed"))
                })?;
                // Contiguous first: each image's run of W·C values is one copy, and the
                // concatenation below is then a plain 2-D copy.
                row.narrow(1, (input.pad as isize + dj) as usize, w)?
                    .contiguous()?
            });
        }
        let n = input.zero.dim(0)?;
        let x = Tensor::cat(&parts, 2)?.reshape((n * w, ()))?;
        x.matmul(&t.w)?.reshape((n, w, self.c_out))
    }
}

/// The taps of a convolution on the current row (`di = 0`, `dj ≤ 0`), at one position.
pub(crate) struct PixelTaps {
    taps: Option<Taps>,
    c_out: usize,
}

impl PixelTaps {
    pub(crate) fn new(weight: &Tensor, padding: [usize; 2]) -> Result<Self> {
        Ok(Self {
            taps: Taps::new(weight, padding, false, |di, _| di == 0)?,
            c_out: weight.dim(0)?,
        })
    }

    /// The taps' sum `(n, C_out)` at column `j`, from the input's activations at the earlier
    /// columns of the current row (and at `j` itself for a centre tap).
    pub(crate) fn at(&self, input: &LayerCache, j: usize) -> Result<Tensor> {
        let Some(t) = &self.taps else {
            return input.zeros(&[self.c_out]);
        };
        let parts: Vec<&Tensor> = t
            .offsets
            .iter()
            .map(|&(_, dj)| {
                let c = j as isize + dj;
                if c < 0 {
                    &input.zero
                } else {
                    input.get(c as usize)
                }
            })
            .collect();
        Tensor::cat(&parts, 1)?.matmul(&t.w)
    }
}

/// A convolution evaluated at one position: the row part computed when the row starts, the
/// current-row part per pixel, the bias.
pub(crate) struct CausalConv {
    above: RowTaps,
    here: PixelTaps,
    bias: Option<Tensor>,
    /// The row part of the current row, `(n, W, C_out)`.
    row: Option<Tensor>,
}

impl CausalConv {
    pub(crate) fn new(weight: &Tensor, bias: Option<&Tensor>, padding: [usize; 2]) -> Result<Self> {
        Ok(Self {
            above: RowTaps::new(weight, padding, false)?,
            here: PixelTaps::new(weight, padding)?,
            bias: bias.map(Tensor::detach),
            row: None,
        })
    }

    /// The pad the rows of this layer's input need.
    pub(crate) fn pad(&self) -> usize {
        self.above.pad()
    }

    /// Computes the row part of row `i` from the input's finished rows.
    pub(crate) fn start_row(&mut self, input: &LayerCache, i: usize, w: usize) -> Result<()> {
        self.row = Some(self.above.row(input, i, w)?);
        Ok(())
    }

    /// `act(conv + bias)` at column `j`, `(n, C_out)`.
    pub(crate) fn at(&self, input: &LayerCache, j: usize, act: Act) -> Result<Tensor> {
        let row = self
            .row
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("cached sampling: row not started"))?;
        let y = (self.here.at(input, j)? + row.narrow(1, j, 1)?.squeeze(1)?)?;
        finish(y, self.bias.as_ref(), act)
    }
}

/// A 1×1 convolution (colour-masked weight) on `(n, C_in)` positions or `(n, W, C_in)` rows.
pub(crate) struct Pointwise {
    /// `(C_in, C_out)`.
    w: Tensor,
    bias: Option<Tensor>,
}

impl Pointwise {
    /// From a `(C_out, C_in, 1, 1)` weight.
    pub(crate) fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (co, ci, _, _) = weight.dims4()?;
        Ok(Self {
            w: weight.detach().reshape((co, ci))?.t()?.contiguous()?,
            bias: bias.map(Tensor::detach),
        })
    }

    pub(crate) fn apply(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        per_row(x, |x| finish(x.matmul(&self.w)?, self.bias.as_ref(), act))
    }
}

/// `f` on `(n, C)` positions, or on `(n, W, C)` rows as `(n·W, C)`.
pub(crate) fn per_row(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dims() {
        &[_, _] => f(x),
        &[n, w, _] => {
            let y = f(&x.reshape((n * w, ()))?)?;
            y.reshape((n, w, ()))
        }
        d => candle_core::bail!("cached sampling: activations of shape {d:?}"),
    }
}

/// `act(y + bias)` on `(n, C)` positions or `(n, W, C)` rows.
pub(crate) fn finish(y: Tensor, bias: Option<&Tensor>, act: Act) -> Result<Tensor> {
    per_row(&y, |y| bias_then(y.clone(), bias, act))
}

/// The logits `(n, K)` of colour `ch` from a head output `(n, K·G)` whose channel `k·G + g`
/// holds class `k` of colour `g` (the layout of the models' `(B, K·G, H, W) → (B, K, G·H·W)`
/// reshape).
pub(crate) fn colour_logits(o: &Tensor, groups: usize, ch: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(o.clone());
    }
    let (n, kg) = o.dims2()?;
    o.reshape((n, kg / groups, groups))?
        .narrow(2, ch, 1)?
        .squeeze(2)
}
