//! 2-D convolution and transposed convolution with fast CPU kernels in both directions.
//!
//! candle 0.11.1 computes the CPU conv2d *input* gradient and all of conv_transpose2d with a direct
//! nested loop, 6–8× slower than PyTorch. gm's ops replace them on the CPU, with images split
//! into tasks over candle's thread pool ([`crate::kernels::par`]):
//! - f32 on x86-64 CPUs with AVX2 and FMA: register-tile kernels that never build the column
//!   matrix (the private `avx2` module: direct 6-pixel × 16-channel tiles — 32 channels in
//!   512-bit vectors where the CPU has AVX-512F, see [`TileWidth`] — that broadcast input
//!   values from zero-padded planes, for the forward and the filter gradient of deep enough
//!   convolutions; otherwise column panels that stay in L1 with 4 × 24 tiles, and 3 × 4 dot
//!   tiles for the filter gradient; the data gradient as sub-pixel convolutions through the
//!   forward kernels — col2im for few channels —; Winograd F(2×2, 3×3) for stride-1 3 × 3);
//! - otherwise (f64, other CPUs, or `GM_CONV=gemm` to compare): im2col/col2im around one `gemm`
//!   call per chunk of images.
//!
//! On CUDA and Metal the same public functions call candle's own kernels (the portable path,
//! which takes any stride, padding and dilation per axis); `GM_KERNELS=portable` runs that path on
//! the CPU too ([`crate::portable_kernels`]).
//!
//! Three custom ops share one geometry — the forward convolution, its data gradient (which *is*
//! the transposed convolution) and its filter gradient — and each op's backward is written with the
//! other two, so gradients of gradients (WGAN-GP, Hutchinson traces with
//! `CANDLE_GRAD_DO_NOT_DETACH`) work through them too.
//!
//! Layouts follow PyTorch: input `(N, C_in, H, W)`, conv weight `(C_out, C_in / groups, kH, kW)`,
//! transposed-conv weight `(C_in, C_out / groups, kH, kW)`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gm_core::kernels::conv::{conv2d, Conv2dParams};
//! let x = Tensor::ones((2, 3, 8, 8), candle_core::DType::F32, &Device::Cpu)?;
//! let w = Tensor::ones((4, 3, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
//! let y = conv2d(&x, &w, Conv2dParams::default().padding(1))?;
//! assert_eq!(y.dims(), &[2, 4, 8, 8]);
//! // An interior pixel sums 3 channels × 9 taps of ones.
//! assert_eq!(y.get(0)?.get(0)?.get(4)?.get(4)?.to_scalar::<f32>()?, 27.0);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::kernels::for_grad;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Width of the register tiles of gm's f32 convolution kernels on x86-64: the direct kernel's
/// (16 or 32 output channels per tile) and, with AVX-512F, the panel tiles' vectors (the panel
/// kernel, Winograd's products and the col2im data gradient: each row of 24 as a 512-bit and a
/// 256-bit vector instead of three 256-bit ones). The filter gradient's dot tiles and the
/// transforms stay 256-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileWidth {
    /// The widest this CPU runs: 32 output channels in 512-bit vectors with AVX-512F, else 16
    /// in 256-bit ones. The default; `GM_CONV=avx2` makes [`TileWidth::Narrow`] the default and
    /// `GM_CONV=wide` [`TileWidth::Wide`].
    Auto,
    /// 16 channels in 256-bit vectors (AVX2 + FMA), whatever the CPU.
    Narrow,
    /// 32 channels: in 512-bit vectors with AVX-512F, otherwise the same tiles in plain Rust
    /// (slow: for testing the wide layout on any CPU).
    Wide,
}

/// Runs `f` with the convolution kernels' tiles set to `width` for the convolutions this
/// thread calls (the setting in force before is restored afterwards). Both widths give the same
/// bits: every output is the same sequence of fused multiply-adds.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gm_core::kernels::conv::{conv2d, with_tile_width, Conv2dParams, TileWidth};
/// let x = Tensor::randn(0f32, 1.0, (1, 32, 6, 6), &Device::Cpu)?;
/// let w = Tensor::randn(0f32, 1.0, (32, 32, 3, 3), &Device::Cpu)?;
/// let p = Conv2dParams::default().stride(2);
/// let narrow = with_tile_width(TileWidth::Narrow, || conv2d(&x, &w, p))?;
/// let wide = with_tile_width(TileWidth::Wide, || conv2d(&x, &w, p))?;
/// assert_eq!(narrow.flatten_all()?.to_vec1::<f32>()?, wide.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn with_tile_width<R>(width: TileWidth, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        struct Restore(Option<TileWidth>);
        impl Drop for Restore {
            fn drop(&mut self) {
                avx2::set_width(self.0);
            }
        }
        let _restore = Restore(avx2::set_width(Some(width)));
        f()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = width;
        f()
    }
}

/// What runs f32 convolutions on this CPU's thread now: `"avx512"` (the 512-bit tiles of
/// [`TileWidth::Wide`]), `"avx2"`, `"wide-rust"` (the direct kernel's wide tiles in plain Rust,
/// the panel tiles AVX2), or `"gemm"` (im2col + gemm: other CPUs, or `GM_CONV=gemm`).
pub fn cpu_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return avx2::tiles_name();
    }
    "gemm"
}

/// Stride, padding, dilation (each `[along H, along W]`) and groups of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

impl Conv2dParams {
    /// The same stride along both axes.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = [s, s];
        self
    }
    /// The same zero padding on all four sides.
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = [p, p];
        self
    }
    /// The same dilation along both axes.
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = [d, d];
        self
    }
    /// Channel groups (`groups == C_in` is a depthwise convolution).
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
}

/// Everything the kernels need: input, weight and output sizes plus the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geom {
    n: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    p: Conv2dParams,
}

impl Geom {
    /// Geometry of `conv2d(x: (n, ci, h, w), weight: (co, ci / groups, kh, kw))`.
    fn new(
        n: usize,
        ci: usize,
        hw: [usize; 2],
        co: usize,
        k: [usize; 4],
        p: Conv2dParams,
    ) -> Result<Self> {
        let [h, w] = hw;
        let [kco, kci, kh, kw] = k;
        if p.groups == 0 || p.stride.contains(&0) || p.dilation.contains(&0) {
            bail!("conv2d: stride, dilation and groups must be positive, got {p:?}")
        }
        if ci % p.groups != 0 || co % p.groups != 0 {
            bail!(
                "conv2d: {ci} input and {co} output channels are not divisible by groups = {}",
                p.groups
            )
        }
        if kco != co || kci * p.groups != ci {
            bail!(
                "conv2d: weight {:?} does not fit {ci} input channels with groups = {} (expected ({co}, {}, kH, kW))",
                k,
                p.groups,
                ci / p.groups
            )
        }
        let out = |i: usize, size: usize, kernel: usize| -> Result<usize> {
            if kernel == 0 {
                bail!("conv2d: empty kernel {k:?}")
            }
            let span = p.dilation[i] * (kernel - 1) + 1;
            let padded = size + 2 * p.padding[i];
            if padded < span {
                bail!("conv2d: kernel span {span} exceeds the padded input size {padded}")
            }
            Ok((padded - span) / p.stride[i] + 1)
        };
        Ok(Self {
            n,
            ci,
            h,
            w,
            co,
            kh,
            kw,
            ho: out(0, h, kh)?,
            wo: out(1, w, kw)?,
            p,
        })
    }
    fn cig(&self) -> usize {
        self.ci / self.p.groups
    }
    fn cog(&self) -> usize {
        self.co / self.p.groups
    }
    /// Rows of the column matrix: one per (input channel of a group, ky, kx).
    fn k(&self) -> usize {
        self.cig() * self.kh * self.kw
    }
    /// Output pixels per image.
    fn pix(&self) -> usize {
        self.ho * self.wo
    }
    fn in_len(&self) -> usize {
        self.ci * self.h * self.w
    }
    fn out_len(&self) -> usize {
        self.co * self.pix()
    }
    fn weight_shape(&self) -> Shape {
        (self.co, self.cig(), self.kh, self.kw).into()
    }
    fn input_shape(&self) -> Shape {
        (self.n, self.ci, self.h, self.w).into()
    }
    fn output_shape(&self) -> Shape {
        (self.n, self.co, self.ho, self.wo).into()
    }
    /// Columns `[ox_lo, ox_hi)` whose input column `ox·s + kx·d − p` lies inside `[0, w)`.
    fn valid_cols(&self, kx: usize) -> (usize, usize, isize) {
        let [_, s] = self.p.stride;
        let off = (kx * self.p.dilation[1]) as isize - self.p.padding[1] as isize;
        let lo = if off >= 0 {
            0
        } else {
            ((-off) as usize).div_ceil(s)
        };
        let lim = self.w as isize - off; // need ox·s < lim
        let hi = if lim <= 0 {
            0
        } else {
            ((lim as usize).div_ceil(s)).min(self.wo)
        };
        (lo.min(hi), hi, off)
    }
    /// How images are grouped into gemm calls and into parallel tasks.
    fn plan(&self) -> Plan {
        let threads = crate::kernels::par::threads();
        let n = self.n.max(1);
        // Wide enough column blocks keep gemm efficient on small feature maps.
        let want = 512usize.div_ceil(self.pix());
        // With enough images, up to four tasks per thread (each reusing its buffers, none
        // smaller than one column block), so that a thread slowed by a noisy neighbour does not
        // hold the others up.
        let parallel = threads > 1 && n >= threads;
        let per_task = if parallel {
            n.div_ceil(4 * threads).max(want).min(n.div_ceil(threads))
        } else {
            n
        };
        let nb = want.clamp(1, per_task);
        Plan {
            nb,
            per_task,
            parallel,
            gemm_par: if threads > 1 && !parallel {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        }
    }
}

#[derive(Clone, Copy)]
struct Plan {
    /// Images per gemm call.
    nb: usize,
    /// Images per task (all of them when not parallel).
    per_task: usize,
    parallel: bool,
    gemm_par: gemm::Parallelism,
}

/// Element types with CPU kernels (f32 and f64).
trait Elem: WithDType + std::ops::AddAssign {
    /// The direction `dir` of `g` by a specialised kernel, or `None` for the generic im2col +
    /// gemm one.
    fn special(_dir: Dir, _g: &Geom, _plan: &Plan, _a: &[Self], _b: &[Self]) -> Option<Vec<Self>> {
        None
    }
}

impl Elem for f32 {
    /// AVX2 + FMA kernels ([`avx2`]) on x86-64 CPUs that have them, when the images are split
    /// over the threads (or there is one thread): their tasks are whole images.
    #[allow(unused_variables)]
    fn special(dir: Dir, g: &Geom, plan: &Plan, a: &[f32], b: &[f32]) -> Option<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() && (plan.parallel || matches!(plan.gemm_par, gemm::Parallelism::None))
        {
            return Some(match dir {
                Dir::Fwd => avx2::conv_fwd(g, plan, a, b),
                Dir::BwdData => avx2::conv_bwd_data(g, plan, a, b),
                Dir::BwdFilter => avx2::conv_bwd_filter(g, plan, a, b),
            });
        }
        None
    }
}
impl Elem for f64 {}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)` with explicit (row, column) strides.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) fn matmul<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(T::zero());
            }
        }
        return;
    }
    // Bounds of the strided views, checked so the unsafe call only reads and writes inside them.
    assert!((m - 1) * dst_rs + n <= dst.len());
    assert!((m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len());
    assert!((k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len());
    // SAFETY: the three views lie inside their slices (asserted above); dst is borrowed mutably
    // so it cannot alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// im2col / col2im for one task. Small or strided outputs go through a gather table over a
/// zero-padded copy of each channel plane (no bounds logic per element); wide stride-1 rows are
/// copied as runs by [`im2col`] / [`col2im`].
struct Unfold<T> {
    /// `table[r * pix + p]`: offset in the padded plane read by column row `r` (a (ky, kx) pair)
    /// at output pixel `p`.
    table: Vec<u32>,
    plane: Vec<T>,
    hp: usize,
    wp: usize,
}

impl<T: Elem> Unfold<T> {
    fn new(g: &Geom) -> Self {
        let gather = g.p.stride != [1, 1] || g.wo < 16;
        if !gather {
            return Self {
                table: Vec::new(),
                plane: Vec::new(),
                hp: 0,
                wp: 0,
            };
        }
        let (hp, wp) = (g.h + 2 * g.p.padding[0], g.w + 2 * g.p.padding[1]);
        let [sh, sw] = g.p.stride;
        let [dh, dw] = g.p.dilation;
        let mut table = Vec::with_capacity(g.kh * g.kw * g.pix());
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        table.push(((oy * sh + ky * dh) * wp + ox * sw + kx * dw) as u32);
                    }
                }
            }
        }
        Self {
            table,
            plane: vec![T::zero(); hp * wp],
            hp,
            wp,
        }
    }

    fn im2col(&mut self, g: &Geom, x: &[T], grp: usize, col: &mut [T], ncols: usize, c0: usize) {
        if self.table.is_empty() {
            return im2col(g, x, grp, col, ncols, c0);
        }
        let (h, w, pix, kk) = (g.h, g.w, g.pix(), g.kh * g.kw);
        let [ph, pw] = g.p.padding;
        for c in 0..g.cig() {
            let xc = &x[(grp * g.cig() + c) * h * w..][..h * w];
            // The border of the plane stays zero; only the interior is rewritten.
            for (y, src) in xc.chunks_exact(w).enumerate() {
                self.plane[(y + ph) * self.wp + pw..][..w].copy_from_slice(src);
            }
            let plane = &self.plane[..];
            for r in 0..kk {
                let row = &mut col[(c * kk + r) * ncols + c0..][..pix];
                if g.p.stride == [1, 1] {
                    // Each output row reads one contiguous run of the padded plane.
                    let start = self.table[r * pix] as usize;
                    for (oy, dst) in row.chunks_exact_mut(g.wo).enumerate() {
                        dst.copy_from_slice(&plane[start + oy * self.wp..][..g.wo]);
                    }
                    continue;
                }
                for (d, &i) in row.iter_mut().zip(&self.table[r * pix..][..pix]) {
                    *d = plane[i as usize];
                }
            }
        }
    }

    fn col2im(&mut self, g: &Geom, col: &[T], ncols: usize, c0: usize, grp: usize, x: &mut [T]) {
        if self.table.is_empty() {
            return col2im(g, col, ncols, c0, grp, x);
        }
        let (h, w, pix, kk) = (g.h, g.w, g.pix(), g.kh * g.kw);
        let [ph, pw] = g.p.padding;
        debug_assert_eq!(self.plane.len(), self.hp * self.wp);
        for c in 0..g.cig() {
            self.plane.fill(T::zero());
            for r in 0..kk {
                let row = &col[(c * kk + r) * ncols + c0..][..pix];
                if g.p.stride == [1, 1] {
                    let start = self.table[r * pix] as usize;
                    for (oy, src) in row.chunks_exact(g.wo).enumerate() {
                        let dst = &mut self.plane[start + oy * self.wp..][..g.wo];
                        for (d, s) in dst.iter_mut().zip(src) {
                            *d += *s;
                        }
                    }
                    continue;
                }
                for (s, &i) in row.iter().zip(&self.table[r * pix..][..pix]) {
                    self.plane[i as usize] += *s;
                }
            }
            let xc = &mut x[(grp * g.cig() + c) * h * w..][..h * w];
            for (y, dst) in xc.chunks_exact_mut(w).enumerate() {
                for (d, s) in dst
                    .iter_mut()
                    .zip(&self.plane[(y + ph) * self.wp + pw..][..w])
                {
                    *d += *s;
                }
            }
        }
    }
}

/// Writes the column matrix of one image and one group into `col[r * ncols + c0 + pixel]`.
fn im2col<T: Elem>(g: &Geom, x: &[T], grp: usize, col: &mut [T], ncols: usize, c0: usize) {
    let (h, w, ho, wo) = (g.h, g.w, g.ho, g.wo);
    let [sh, sw] = g.p.stride;
    let [dh, _] = g.p.dilation;
    let ph = g.p.padding[0] as isize;
    for c in 0..g.cig() {
        let xc = &x[(grp * g.cig() + c) * h * w..][..h * w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let r = (c * g.kh + ky) * g.kw + kx;
                let row = &mut col[r * ncols + c0..][..ho * wo];
                let (lo, hi, off) = g.valid_cols(kx);
                for oy in 0..ho {
                    let dst = &mut row[oy * wo..][..wo];
                    let iy = (oy * sh + ky * dh) as isize - ph;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(T::zero());
                        continue;
                    }
                    let src = &xc[iy as usize * w..][..w];
                    dst[..lo].fill(T::zero());
                    dst[hi..].fill(T::zero());
                    if sw == 1 {
                        let s0 = (lo as isize + off) as usize;
                        dst[lo..hi].copy_from_slice(&src[s0..s0 + hi - lo]);
                    } else {
                        let s0 = ((lo * sw) as isize + off) as usize;
                        for (d, s) in dst[lo..hi].iter_mut().zip(src[s0..].iter().step_by(sw)) {
                            *d = *s;
                        }
                    }
                }
            }
        }
    }
}

/// Adds the column matrix of one image and one group back onto the image (the adjoint of
/// [`im2col`]).
fn col2im<T: Elem>(g: &Geom, col: &[T], ncols: usize, c0: usize, grp: usize, x: &mut [T]) {
    let (h, w, ho, wo) = (g.h, g.w, g.ho, g.wo);
    let [sh, sw] = g.p.stride;
    let [dh, _] = g.p.dilation;
    let ph = g.p.padding[0] as isize;
    for c in 0..g.cig() {
        let xc = &mut x[(grp * g.cig() + c) * h * w..][..h * w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let r = (c * g.kh + ky) * g.kw + kx;
                let row = &col[r * ncols + c0..][..ho * wo];
                let (lo, hi, off) = g.valid_cols(kx);
                for oy in 0..ho {
                    let iy = (oy * sh + ky * dh) as isize - ph;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let src = &row[oy * wo..][..wo];
                    let dst = &mut xc[iy as usize * w..][..w];
                    if sw == 1 {
                        let d0 = (lo as isize + off) as usize;
                        for (d, s) in dst[d0..d0 + hi - lo].iter_mut().zip(&src[lo..hi]) {
                            *d += *s;
                        }
                    } else {
                        let d0 = ((lo * sw) as isize + off) as usize;
                        for (d, s) in dst[d0..].iter_mut().step_by(sw).zip(&src[lo..hi]) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    }
}

/// Calls `f(block, tensor)` for each `pix`-long row `r < rows` of each of `nb` images, given
/// `[C, ch0, rows, pix, nb]`: its offset in a `[rows, nb·pix]` block and in the `(nb, C, pix)`
/// tensor (channel `ch0 + r`).
fn channel_rows([c_total, ch0, rows, pix, nb]: [usize; 5], mut f: impl FnMut(usize, usize)) {
    for b in 0..nb {
        for r in 0..rows {
            f(r * nb * pix + b * pix, (b * c_total + ch0 + r) * pix);
        }
    }
}

/// Copies rows `[ch0, ch0 + rows)` of `nb` images `(nb, C, pix)` into a `[rows, nb·pix]` block
/// (`rows` as in [`channel_rows`]).
fn pack_channels<T: Elem>(src: &[T], rows: [usize; 5], dst: &mut [T]) {
    let pix = rows[3];
    channel_rows(rows, |d, s| {
        dst[d..][..pix].copy_from_slice(&src[s..][..pix])
    });
}

/// The inverse of [`pack_channels`].
fn unpack_channels<T: Elem>(src: &[T], rows: [usize; 5], dst: &mut [T]) {
    let pix = rows[3];
    channel_rows(rows, |s, d| {
        dst[d..][..pix].copy_from_slice(&src[s..][..pix])
    });
}

/// Runs `f(chunk_index, chunk)` over `data` split into chunks of `len`, in parallel if asked.
fn for_chunks<T: Elem, F>(data: &mut [T], len: usize, parallel: bool, f: F)
where
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    if parallel {
        crate::kernels::par::chunks_mut(data, len, f);
    } else {
        data.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// Runs `task(first, last)` over the plan's ranges of images (in parallel when planned) and
/// sums the results, each `len` long.
fn sum_tasks<T: Elem>(
    g: &Geom,
    plan: &Plan,
    len: usize,
    task: impl Fn(usize, usize) -> Vec<T> + Sync,
) -> Vec<T> {
    if !plan.parallel {
        return task(0, g.n);
    }
    let tasks = g.n.div_ceil(plan.per_task);
    let parts = crate::kernels::par::map(tasks, |t| {
        task(t * plan.per_task, ((t + 1) * plan.per_task).min(g.n))
    });
    let mut parts = parts.into_iter();
    let mut acc = parts.next().unwrap_or_else(|| vec![T::zero(); len]);
    for p in parts {
        acc.iter_mut().zip(&p).for_each(|(a, b)| *a += *b);
    }
    acc
}

/// `y = conv2d(x, w)`: `(n, ci, h, w) × (co, cig, kh, kw) → (n, co, ho, wo)`.
fn conv_fwd<T: Elem>(g: &Geom, x: &[T], wt: &[T]) -> Vec<T> {
    let plan = g.plan();
    if let Some(y) = T::special(Dir::Fwd, g, &plan, x, wt) {
        return y;
    }
    let (k, pix, cog, out_len) = (g.k(), g.pix(), g.cog(), g.out_len());
    let mut y = vec![T::zero(); g.n * out_len];
    for_chunks(
        &mut y,
        plan.per_task * out_len,
        plan.parallel,
        |task, ys| {
            let mut col = vec![T::zero(); k * plan.nb * pix];
            let mut unfold = Unfold::new(g);
            let mut tmp = vec![T::zero(); if plan.nb > 1 { cog * plan.nb * pix } else { 0 }];
            for (sub, ys) in ys.chunks_mut(plan.nb * out_len).enumerate() {
                let first = task * plan.per_task + sub * plan.nb;
                let nb = ys.len() / out_len;
                let ncols = nb * pix;
                let col = &mut col[..k * ncols];
                for grp in 0..g.p.groups {
                    for b in 0..nb {
                        unfold.im2col(
                            g,
                            &x[(first + b) * g.in_len()..][..g.in_len()],
                            grp,
                            col,
                            ncols,
                            b * pix,
                        );
                    }
                    let wg = &wt[grp * cog * k..][..cog * k];
                    if nb == 1 {
                        let dst = &mut ys[grp * cog * pix..][..cog * pix];
                        matmul(
                            cog,
                            pix,
                            k,
                            dst,
                            pix,
                            false,
                            wg,
                            (k, 1),
                            col,
                            (ncols, 1),
                            plan.gemm_par,
                        );
                    } else {
                        let tmp = &mut tmp[..cog * ncols];
                        matmul(
                            cog,
                            ncols,
                            k,
                            tmp,
                            ncols,
                            false,
                            wg,
                            (k, 1),
                            col,
                            (ncols, 1),
                            plan.gemm_par,
                        );
                        unpack_channels(tmp, [g.co, grp * cog, cog, pix, nb], ys);
                    }
                }
            }
        },
    );
    y
}

/// `dx = conv2d_backward_data(dy, w)`, also the transposed convolution of `dy` by `w`.
fn conv_bwd_data<T: Elem>(g: &Geom, dy: &[T], wt: &[T]) -> Vec<T> {
    let plan = g.plan();
    if let Some(dx) = T::special(Dir::BwdData, g, &plan, dy, wt) {
        return dx;
    }
    let (k, pix, cog, in_len, out_len) = (g.k(), g.pix(), g.cog(), g.in_len(), g.out_len());
    let mut dx = vec![T::zero(); g.n * in_len];
    for_chunks(
        &mut dx,
        plan.per_task * in_len,
        plan.parallel,
        |task, xs| {
            let mut col = vec![T::zero(); k * plan.nb * pix];
            let mut unfold = Unfold::<T>::new(g);
            let mut packed = vec![T::zero(); if plan.nb > 1 { cog * plan.nb * pix } else { 0 }];
            for (sub, xs) in xs.chunks_mut(plan.nb * in_len).enumerate() {
                let first = task * plan.per_task + sub * plan.nb;
                let nb = xs.len() / in_len;
                let ncols = nb * pix;
                let col = &mut col[..k * ncols];
                let dys = &dy[first * out_len..][..nb * out_len];
                for grp in 0..g.p.groups {
                    let wg = &wt[grp * cog * k..][..cog * k];
                    // col (k × ncols) = wgᵀ (k × cog) · dy_g (cog × ncols)
                    if nb == 1 {
                        let dyg = &dys[grp * cog * pix..][..cog * pix];
                        matmul(
                            k,
                            pix,
                            cog,
                            col,
                            ncols,
                            false,
                            wg,
                            (1, k),
                            dyg,
                            (pix, 1),
                            plan.gemm_par,
                        );
                    } else {
                        let packed = &mut packed[..cog * ncols];
                        pack_channels(dys, [g.co, grp * cog, cog, pix, nb], packed);
                        matmul(
                            k,
                            ncols,
                            cog,
                            col,
                            ncols,
                            false,
                            wg,
                            (1, k),
                            packed,
                            (ncols, 1),
                            plan.gemm_par,
                        );
                    }
                    for b in 0..nb {
                        unfold.col2im(g, col, ncols, b * pix, grp, &mut xs[b * in_len..][..in_len]);
                    }
                }
            }
        },
    );
    dx
}

/// `dw = conv2d_backward_filter(x, dy)`: `(co, cig, kh, kw)`, summed over the batch.
fn conv_bwd_filter<T: Elem>(g: &Geom, x: &[T], dy: &[T]) -> Vec<T> {
    let plan = g.plan();
    if let Some(dw) = T::special(Dir::BwdFilter, g, &plan, x, dy) {
        return dw;
    }
    let (k, pix, cog, in_len, out_len) = (g.k(), g.pix(), g.cog(), g.in_len(), g.out_len());
    let wlen = g.co * k;
    // Images [first, last) into acc.
    let task = |first: usize, last: usize| -> Vec<T> {
        let mut acc = vec![T::zero(); wlen];
        let mut col = vec![T::zero(); k * plan.nb * pix];
        let mut unfold = Unfold::<T>::new(g);
        let mut packed = vec![T::zero(); if plan.nb > 1 { cog * plan.nb * pix } else { 0 }];
        for first in (first..last).step_by(plan.nb) {
            let nb = plan.nb.min(last - first);
            let ncols = nb * pix;
            let col = &mut col[..k * ncols];
            let dys = &dy[first * out_len..][..nb * out_len];
            for grp in 0..g.p.groups {
                for b in 0..nb {
                    unfold.im2col(
                        g,
                        &x[(first + b) * in_len..][..in_len],
                        grp,
                        col,
                        ncols,
                        b * pix,
                    );
                }
                let dst = &mut acc[grp * cog * k..][..cog * k];
                // acc_g (cog × k) += dy_g (cog × ncols) · colᵀ (ncols × k)
                if nb == 1 {
                    let dyg = &dys[grp * cog * pix..][..cog * pix];
                    matmul(
                        cog,
                        k,
                        ncols,
                        dst,
                        k,
                        true,
                        dyg,
                        (pix, 1),
                        col,
                        (1, ncols),
                        plan.gemm_par,
                    );
                } else {
                    let packed = &mut packed[..cog * ncols];
                    pack_channels(dys, [g.co, grp * cog, cog, pix, nb], packed);
                    matmul(
                        cog,
                        k,
                        ncols,
                        dst,
                        k,
                        true,
                        packed,
                        (ncols, 1),
                        col,
                        (1, ncols),
                        plan.gemm_par,
                    );
                }
            }
        }
        acc
    };
    sum_tasks(g, &plan, wlen, task)
}

/// The three directions of one convolution geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// `conv2d(x, w)`.
    Fwd,
    /// `conv2d_backward_data(dy, w)` = `conv_transpose2d(dy, w)`.
    BwdData,
    /// `conv2d_backward_filter(x, dy)`.
    BwdFilter,
}

#[derive(Clone, Copy, Debug)]
struct ConvOp(Geom, Dir);

/// `op(a, b)` if `needed` (the argument it is the gradient of leads to a variable).
fn grad_if(needed: bool, a: &Tensor, b: &Tensor, g: Geom, dir: Dir) -> Result<Option<Tensor>> {
    needed.then(|| a.apply_op2(b, ConvOp(g, dir))).transpose()
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        match self.1 {
            Dir::Fwd => "gm-conv2d",
            Dir::BwdData => "gm-conv2d-backward-data",
            Dir::BwdFilter => "gm-conv2d-backward-filter",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let name = self.name();
        Ok(match self.1 {
            Dir::Fwd => (
                crate::float2!(name, s1, l1, s2, l2, |x, w| conv_fwd(g, x, w)),
                g.output_shape(),
            ),
            Dir::BwdData => (
                crate::float2!(name, s1, l1, s2, l2, |dy, w| conv_bwd_data(g, dy, w)),
                g.input_shape(),
            ),
            Dir::BwdFilter => (
                crate::float2!(name, s1, l1, s2, l2, |x, dy| conv_bwd_filter(g, x, dy)),
                g.weight_shape(),
            ),
        })
    }

    /// Each direction is bilinear in its two arguments, and the adjoint of each is one of the
    /// other two directions. Only arguments that lead to a variable get a gradient: an image batch
    /// fed to the first layer skips the data gradient, as in PyTorch.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ta, tb) = (a.track_op(), b.track_op());
        let (a, b) = (&for_grad(a), &for_grad(b));
        let (g, grad) = (self.0, for_grad(grad).contiguous()?);
        Ok(match self.1 {
            // y = conv(x, w): dx = bwd_data(dy, w), dw = bwd_filter(x, dy).
            Dir::Fwd => (
                grad_if(ta, &grad, b, g, Dir::BwdData)?,
                grad_if(tb, a, &grad, g, Dir::BwdFilter)?,
            ),
            // dx = bwd_data(dy, w): d(dy) = conv(gdx, w), dw = bwd_filter(gdx, dy).
            Dir::BwdData => (
                grad_if(ta, &grad, b, g, Dir::Fwd)?,
                grad_if(tb, &grad, a, g, Dir::BwdFilter)?,
            ),
            // dw = bwd_filter(x, dy): dx = bwd_data(dy, gdw), d(dy) = conv(x, gdw).
            Dir::BwdFilter => (
                grad_if(ta, b, &grad, g, Dir::BwdData)?,
                grad_if(tb, a, &grad, g, Dir::Fwd)?,
            ),
        })
    }
}

fn check_float(t: &Tensor, what: &str) -> Result<()> {
    if !matches!(t.dtype(), DType::F32 | DType::F64) && t.device().is_cpu() {
        bail!(
            "{what}: gm's CPU convolution takes f32 or f64, got {:?}",
            t.dtype()
        )
    }
    Ok(())
}

/// 2-D convolution (cross-correlation, as in PyTorch), differentiable in both arguments.
///
/// # Shapes
/// - `x`: `(N, C_in, H, W)`; `weight`: `(C_out, C_in / groups, kH, kW)`;
///   returns `(N, C_out, H_out, W_out)` with
///   `H_out = (H + 2·pad − dil·(kH − 1) − 1) / stride + 1`.
pub fn conv2d(x: &Tensor, weight: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    // A 1×1 kernel on 1×1 inputs (a vector model written as a convolution) is a matrix product.
    if let (Ok((n, c, 1, 1)), Ok((o, wc, 1, 1))) = (x.dims4(), weight.dims4()) {
        if p == Conv2dParams::default() && c == wc {
            return crate::precision::cast_op2("conv2d", x, weight, true, |x, w| {
                x.reshape((n, c))?
                    .matmul(&w.reshape((o, c))?.t()?)?
                    .reshape((n, o, 1, 1))
            });
        }
    }
    conv2d_upto(x, weight, p, None, "conv2d")
}

/// The top-left `out = [H', W']` corner of [`conv2d`]'s output (`H' ≤ H_out`, `W' ≤ W_out`),
/// computed without the rest: padding on one side only, as causal (masked) convolutions need.
/// With a `k×k` kernel and padding `k − 1`, output `(i, j)` reads input rows and columns
/// `i − k + 1 … i` and `j − k + 1 … j`.
///
/// # Shapes
/// - `x`: `(N, C_in, H, W)`; `weight`: `(C_out, C_in / groups, kH, kW)`;
///   returns `(N, C_out, min(H_out, H'), min(W_out, W'))`.
pub fn conv2d_cropped(
    x: &Tensor,
    weight: &Tensor,
    p: Conv2dParams,
    out: [usize; 2],
) -> Result<Tensor> {
    if out.contains(&0) {
        bail!("conv2d_cropped: empty output size {out:?}")
    }
    conv2d_upto(x, weight, p, Some(out), "conv2d_cropped")
}

/// Whether a convolution of `x` may run in the autocast precision: on the device path (candle's
/// kernels), except bf16 on the CPU, where candle's convolution has no bf16 matrix product; not
/// when `native` (gm's own CPU kernels run it: they take f32 and f64 only).
fn low_precision(x: &Tensor, native: bool) -> bool {
    let cpu_bf16 =
        x.device().is_cpu() && crate::precision::autocast() == Some(candle_core::DType::BF16);
    !native && !cpu_bf16
}

/// [`conv2d`], keeping only the top-left `out` corner of the output when given.
fn conv2d_upto(
    x: &Tensor,
    weight: &Tensor,
    p: Conv2dParams,
    out: Option<[usize; 2]>,
    what: &'static str,
) -> Result<Tensor> {
    let (n, ci, h, w) = x.dims4()?;
    let k = weight.dims4()?;
    let mut g = Geom::new(n, ci, [h, w], k.0, [k.0, k.1, k.2, k.3], p)?;
    if let Some([oh, ow]) = out {
        g.ho = g.ho.min(oh);
        g.wo = g.wo.min(ow);
    }
    check_float(x, what)?;
    // Under autocast the device path runs in the low precision; gm's CPU kernels take f32.
    let native = crate::native_kernels(x.device());
    crate::precision::cast_op2(what, x, weight, low_precision(x, native), |x, weight| {
        if !native {
            let y = device_conv2d(x, weight, p)?;
            return match out {
                None => Ok(y),
                Some(_) => y.narrow(2, 0, g.ho)?.narrow(3, 0, g.wo)?.contiguous(),
            };
        }
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, ConvOp(g, Dir::Fwd))
    })
}

/// 2-D transposed convolution (the adjoint of [`conv2d`]), as PyTorch's `conv_transpose2d`.
///
/// # Shapes
/// - `x`: `(N, C_in, H, W)`; `weight`: `(C_in, C_out / groups, kH, kW)`;
///   returns `(N, C_out, H_out, W_out)` with
///   `H_out = (H − 1)·stride − 2·pad + dil·(kH − 1) + output_padding + 1`.
pub fn conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    p: Conv2dParams,
    output_padding: [usize; 2],
) -> Result<Tensor> {
    let (n, ci, h, w) = x.dims4()?;
    let (wci, wco, kh, kw) = weight.dims4()?;
    if wci != ci {
        bail!(
            "conv_transpose2d: weight {:?} expects {wci} input channels, the input has {ci}",
            weight.dims()
        )
    }
    for i in 0..2 {
        if output_padding[i] >= p.stride[i].max(p.dilation[i]) {
            bail!("conv_transpose2d: output_padding {output_padding:?} must be smaller than stride or dilation")
        }
    }
    let size = |i: usize, s: usize, k: usize| -> Result<usize> {
        let full = (s - 1) * p.stride[i] + p.dilation[i] * (k - 1) + output_padding[i] + 1;
        if full <= 2 * p.padding[i] {
            bail!(
                "conv_transpose2d: padding {:?} leaves an empty output",
                p.padding
            )
        }
        Ok(full - 2 * p.padding[i])
    };
    let (oh, ow) = (size(0, h, kh)?, size(1, w, kw)?);
    // As a convolution, the output is the input (N, wco·groups, oh, ow) and x is its output.
    let g = Geom::new(n, wco * p.groups, [oh, ow], ci, [wci, wco, kh, kw], p)?;
    if (g.ho, g.wo) != (h, w) {
        bail!("conv_transpose2d: inconsistent geometry {g:?} for input {h}x{w}")
    }
    check_float(x, "conv_transpose2d")?;
    let native = crate::native_kernels(x.device());
    crate::precision::cast_op2(
        "conv_transpose2d",
        x,
        weight,
        low_precision(x, native),
        |x, weight| {
            if !native {
                return device_conv_transpose2d(x, weight, p, output_padding);
            }
            x.contiguous()?
                .apply_op2(&weight.contiguous()?, ConvOp(g, Dir::BwdData))
        },
    )
}

/// Inserts `f − 1` zeros between neighbouring elements along `axis` (`n → (n − 1)·f + 1`),
/// with candle ops only (differentiable, any device).
fn dilate_axis(t: &Tensor, axis: usize, f: usize) -> Result<Tensor> {
    if f == 1 {
        return Ok(t.clone());
    }
    let n = t.dim(axis)?;
    let mut parts = vec![t.clone()];
    parts.extend(std::iter::repeat_n(t.zeros_like()?, f - 1));
    let mut dims = t.dims().to_vec();
    dims[axis] = n * f;
    Tensor::stack(&parts, axis + 1)?
        .reshape(dims)?
        .narrow(axis, 0, (n - 1) * f + 1)
}

/// Every `s`-th element along `axis`, starting with the first, with candle ops only.
fn subsample_axis(t: &Tensor, axis: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(t.clone());
    }
    let n = t.dim(axis)?;
    let m = n.div_ceil(s);
    let t = t.pad_with_zeros(axis, 0, m * s - n)?;
    let mut dims = t.dims().to_vec();
    dims[axis] = m;
    dims.insert(axis + 1, s);
    t.reshape(dims)?.narrow(axis + 1, 0, 1)?.squeeze(axis + 1)
}

/// The kernel and parameters with equal dilations along H and W: an axis with a single tap
/// takes the other axis's dilation (it has no effect there), otherwise the kernel is dilated
/// explicitly with zeros.
fn equal_dilation(weight: &Tensor, mut p: Conv2dParams) -> Result<(Tensor, Conv2dParams)> {
    let (_, _, kh, kw) = weight.dims4()?;
    if kh == 1 {
        p.dilation[0] = p.dilation[1];
    } else if kw == 1 {
        p.dilation[1] = p.dilation[0];
    }
    if p.dilation[0] == p.dilation[1] {
        return Ok((weight.clone(), p));
    }
    let w = dilate_axis(&dilate_axis(weight, 2, p.dilation[0])?, 3, p.dilation[1])?;
    p.dilation = [1, 1];
    Ok((w, p))
}

/// The portable convolution: candle's own kernels, which take one stride, padding and dilation
/// for both axes; other parameters are reduced to those (zero padding first, a kernel dilated
/// with zeros, stride 1 followed by subsampling). This is what runs on CUDA and Metal, and on the
/// CPU in the portable mode ([`crate::portable_kernels`]).
fn device_conv2d(x: &Tensor, weight: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    let (weight, mut p) = equal_dilation(weight, p)?;
    let (_, _, kh, kw) = weight.dims4()?;
    let mut x = x.clone();
    // The padded rows (columns) that the last output row (column) reads up to; with a stride,
    // trailing ones may be read by no output. candle's backward rebuilds the input's size from
    // the output's and errors when they are there (a 9-row input at stride 2 with a 2-row
    // kernel), so the padding is then applied here and the unread tail cut off.
    let mut used = [0; 2];
    let mut tail = false;
    for (i, k) in [kh, kw].into_iter().enumerate() {
        let span = x.dim(2 + i)? + 2 * p.padding[i];
        let reach = p.dilation[i] * (k - 1) + 1;
        if span < reach {
            bail!(
                "conv2d: the kernel ({kh}x{kw}, dilation {:?}) is larger than the padded input",
                p.dilation
            )
        }
        used[i] = (span - reach) / p.stride[i] * p.stride[i] + reach;
        tail |= used[i] != span;
    }
    if p.padding[0] != p.padding[1] || tail {
        let [ph, pw] = p.padding;
        x = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
        if tail {
            x = x.narrow(2, 0, used[0])?.narrow(3, 0, used[1])?;
        }
        p.padding = [0, 0];
    }
    let y = if p.stride[0] == p.stride[1] {
        x.conv2d(&weight, p.padding[0], p.stride[0], p.dilation[0], p.groups)?
    } else {
        let y = x.conv2d(&weight, p.padding[0], 1, p.dilation[0], p.groups)?;
        subsample_axis(&subsample_axis(&y, 2, p.stride[0])?, 3, p.stride[1])?
    };
    if crate::device::planted_fault("conv") {
        return y.affine(1.0 + 1e-2, 0.0);
    }
    Ok(y)
}

/// The portable transposed convolution (see [`device_conv2d`]): unequal strides become zeros
/// inserted into the input, unequal padding or output padding a crop of the full output; groups
/// run one by one (candle's transposed convolution has none).
fn device_conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    p: Conv2dParams,
    op: [usize; 2],
) -> Result<Tensor> {
    let (weight, p) = equal_dilation(weight, p)?;
    let d = p.dilation[0];
    if p.stride[0] == p.stride[1] && p.padding[0] == p.padding[1] && op[0] == op[1] {
        return candle_conv_transpose2d(x, &weight, p.padding[0], op[0], p.stride[0], d, p.groups);
    }
    // The full output (stride 1 over the zero-inserted input, no padding), then the crop.
    let xs = dilate_axis(&dilate_axis(x, 2, p.stride[0])?, 3, p.stride[1])?;
    let mut y = candle_conv_transpose2d(&xs, &weight, 0, 0, 1, d, p.groups)?;
    for (i, axis) in [2, 3].into_iter().enumerate() {
        let full = y.dim(axis)?;
        y = y.pad_with_zeros(axis, 0, op[i])?.narrow(
            axis,
            p.padding[i],
            full + op[i] - 2 * p.padding[i],
        )?;
    }
    Ok(y)
}

/// candle's transposed convolution, groups one by one.
fn candle_conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    pad: usize,
    op: usize,
    s: usize,
    d: usize,
    groups: usize,
) -> Result<Tensor> {
    if groups == 1 {
        return x.conv_transpose2d(weight, pad, op, s, d);
    }
    let cig = x.dim(1)? / groups;
    let parts = (0..groups)
        .map(|g| {
            x.narrow(1, g * cig, cig)?.conv_transpose2d(
                &weight.narrow(0, g * cig, cig)?,
                pad,
                op,
                s,
                d,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1)
}
