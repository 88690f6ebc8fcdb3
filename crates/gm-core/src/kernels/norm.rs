//! Group normalisation (Wu & He, 2018) with an optional fused SiLU — the UNet's `GroupNorm → SiLU`
//! pair — as one CPU pass forward and one backward, where candle's composed version runs about a
//! dozen passes and strided reductions over the batch for the affine parameters' gradients. On
//! CUDA and Metal it is candle's ops. First-order: the backward is not itself differentiable.
//!
//! `y = act(γ_c · (x − μ_{n,g}) / √(σ²_{n,g} + ε) + β_c)`, statistics per sample and channel group.
//!
//! Batch normalisation in training mode ([`batch_norm`], Ioffe & Szegedy, 2015) with an optional
//! fused ReLU — the DCGAN generator's `BatchNorm → ReLU` — statistics per channel over the batch
//! and every spatial position: one pass for the statistics and one for the output forward, one
//! reduction pass and one output pass backward, all on contiguous rows. candle's `BatchNorm`
//! transposes the batch into a copy, runs about eight element-wise passes and returns a transposed
//! view, which makes the next op's input strided.

use crate::kernels::cpu::{lane_sum, lane_sum2, Transcendental};
use crate::kernels::for_grad;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use std::mem::MaybeUninit;
use std::sync::Arc;

#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    c: usize,
    inner: usize,
    groups: usize,
}

impl Dims {
    fn of(shape: &Shape, groups: usize) -> Result<Self> {
        let d = shape.dims();
        if d.len() < 2 {
            bail!("group_norm: input of shape {d:?} has no channel axis")
        }
        let (n, c) = (d[0], d[1]);
        if groups == 0 || c % groups != 0 {
            bail!("group_norm: {groups} groups do not divide {c} channels")
        }
        Ok(Self {
            n,
            c,
            inner: d[2..].iter().product::<usize>().max(1),
            groups,
        })
    }

    /// Channels per group.
    fn cg(&self) -> usize {
        self.c / self.groups
    }

    /// Elements per (sample, group).
    fn span(&self) -> usize {
        self.cg() * self.inner
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

struct GroupNormGrad {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Mean and `1/√(var + ε)` of one group (two passes, blocks accumulated in f64); inlined into
/// each vector width's copy of the norms' loops.
#[inline(always)]
fn stats<T: WithDType>(x: &[T], eps: f64) -> (f64, f64) {
    let m = x.len() as f64;
    let mean = lane_sum(x, |v| v) / m;
    let mt = T::from_f64(mean);
    let var = lane_sum(x, |v| (v - mt) * (v - mt)) / m;
    (mean, 1.0 / (var + eps).sqrt())
}

fn fwd_kernel<T: Transcendental>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    d: Dims,
    eps: f64,
    silu: bool,
) -> Vec<T> {
    let span = d.span();
    let mut y = vec![T::zero(); x.len()];
    crate::kernels::par::chunks_mut(&mut y, span, |k, out| {
        fwd_group(k, out, &x[k * span..][..span], gamma, beta, d, eps, silu)
    });
    y
}

crate::simd_fn! {
    /// The forward of (sample, group) `k`, whose elements are `xs`.
    fn fwd_group<T: Transcendental>(
        k: usize,
        out: &mut [T],
        xs: &[T],
        gamma: &[T],
        beta: &[T],
        d: Dims,
        eps: f64,
        silu: bool,
    ) {
        let g = k % d.groups;
        let (mean, rstd) = stats(xs, eps);
        let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
        for cc in 0..d.cg() {
            let ch = g * d.cg() + cc;
            let (ga, be) = (gamma[ch], beta[ch]);
            let row = cc * d.inner..(cc + 1) * d.inner;
            for (o, v) in out[row.clone()].iter_mut().zip(&xs[row]) {
                let z = (*v - mean) * rstd * ga + be;
                *o = if silu { z * z.sigmoid() } else { z };
            }
        }
    }
}

/// `[dx (x.len()), dγ (C), dβ (C)]` flattened into one vector.
fn bwd_kernel<T: Transcendental>(
    x: &[T],
    dy: &[T],
    gb: &[T],
    d: Dims,
    eps: f64,
    silu: bool,
) -> Vec<T> {
    let (gamma, beta) = gb.split_at(d.c);
    let span = d.span();
    let cg = d.cg();
    let mut dx = vec![T::zero(); x.len()];
    // Per (sample, channel) partial sums of dγ and dβ, reduced over samples afterwards.
    let mut part = vec![0f64; d.n * d.c * 2];
    crate::kernels::par::chunks2_mut(&mut dx, span, &mut part, cg * 2, |k, out, p| {
        let (xs, gs) = (&x[k * span..][..span], &dy[k * span..][..span]);
        bwd_group(k, out, p, xs, gs, gamma, beta, d, eps, silu)
    });
    let mut dgamma = vec![0f64; d.c];
    let mut dbeta = vec![0f64; d.c];
    for s in 0..d.n {
        for ch in 0..d.c {
            dgamma[ch] += part[(s * d.c + ch) * 2];
            dbeta[ch] += part[(s * d.c + ch) * 2 + 1];
        }
    }
    dx.extend(dgamma.into_iter().map(T::from_f64));
    dx.extend(dbeta.into_iter().map(T::from_f64));
    dx
}

crate::simd_fn! {
    /// The backward of (sample, group) `k`: `out` its `dx`, `p` its channels' `(dγ, dβ)` parts.
    fn bwd_group<T: Transcendental>(
        k: usize,
        out: &mut [T],
        p: &mut [f64],
        xs: &[T],
        gs: &[T],
        gamma: &[T],
        beta: &[T],
        d: Dims,
        eps: f64,
        silu: bool,
    ) {
        let (span, cg) = (d.span(), d.cg());
        let g = k % d.groups;
        let (mean, rstd) = stats(xs, eps);
        let (mean_t, rstd_t) = (T::from_f64(mean), T::from_f64(rstd));
        // Pass 1: dz, the sums for dγ, dβ, and the two group means of dx̂ = γ·dz.
        let (mut s1, mut s2) = (0f64, 0f64);
        for cc in 0..cg {
            let ch = g * cg + cc;
            let (ga, be) = (gamma[ch], beta[ch]);
            let row = cc * d.inner..(cc + 1) * d.inner;
            let (o, xr) = (&mut out[row.clone()], &xs[row.clone()]);
            if silu {
                for ((o, v), gy) in o.iter_mut().zip(xr).zip(&gs[row]) {
                    let z = (*v - mean_t) * rstd_t * ga + be;
                    let s = z.sigmoid();
                    *o = *gy * s * (T::one() + z * (T::one() - s));
                }
            } else {
                o.copy_from_slice(&gs[row]);
            }
            let db = lane_sum(o, |v| v);
            let dg = lane_sum2(o, xr, |dz, v| dz * ((v - mean_t) * rstd_t));
            p[cc * 2] = dg;
            p[cc * 2 + 1] = db;
            let gaf = ga.to_f64();
            s1 += gaf * db;
            s2 += gaf * dg;
            o.iter_mut().for_each(|v| *v *= ga); // dx̂ for now
        }
        let m = span as f64;
        let (m1, m2) = (T::from_f64(s1 / m), T::from_f64(s2 / m));
        // Pass 2: dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ ⊙ x̂)).
        for (o, v) in out.iter_mut().zip(xs) {
            let xh = (*v - mean_t) * rstd_t;
            *o = rstd_t * (*o - m1 - xh * m2);
        }
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "gm-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1.shape(), self.groups)?;
        let (eps, silu) = (self.eps, self.silu);
        let out = crate::float3!("gm-group-norm", s1, l1, s2, l2, s3, l3, |x, g, b| {
            fwd_kernel(x, g, b, d, eps, silu)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = GroupNormGrad {
            groups: self.groups,
            eps: self.eps,
            silu: self.silu,
        };
        norm_grads(x, gamma, beta, dy, grad)
    }
}

/// A norm's backward: `grad` on `(x, dy, [γ; β])` returns `[dx, dγ, dβ]` flattened, split here.
fn norm_grads(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    dy: &Tensor,
    grad: impl CustomOp3 + Send + Sync + 'static,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (x, dy) = (&for_grad(x), &for_grad(dy));
    let c = gamma.dim(0)?;
    let gb = Tensor::cat(&[&for_grad(gamma), &for_grad(beta)], 0)?;
    let all = x.apply_op3(&dy.contiguous()?, &gb, grad)?;
    let n = x.elem_count();
    let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
    // Copies of the C values: views would keep the whole buffer (dx with them) alive as long
    // as the parameters' gradients live. (`Tensor::copy` would not do: it clones the whole
    // storage under the view's layout.)
    let dg = all.narrow(0, n, c)?.force_contiguous()?;
    let db = all.narrow(0, n + c, c)?.force_contiguous()?;
    Ok((Some(dx), Some(dg), Some(db)))
}

impl CustomOp3 for GroupNormGrad {
    fn name(&self) -> &'static str {
        "gm-group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1.shape(), self.groups)?;
        let (eps, silu) = (self.eps, self.silu);
        let out = crate::float3!("gm-group-norm-grad", s1, l1, s2, l2, s3, l3, |x, dy, gb| {
            bwd_kernel(x, dy, gb, d, eps, silu)
        });
        let len = l1.shape().elem_count() + 2 * d.c;
        Ok((out, Shape::from(len)))
    }
}

/// `GroupNorm(groups, eps)` with affine `γ`, `β` of shape `(C,)`, then SiLU when `silu`.
///
/// # Shapes
/// - `x`: `(N, C, ...)`; returns the shape of `x`.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let d = Dims::of(x.shape(), groups)?;
    if gamma.dims() != [d.c] || beta.dims() != [d.c] {
        bail!(
            "group_norm: γ {:?} and β {:?} for {} channels",
            gamma.dims(),
            beta.dims(),
            d.c
        )
    }
    if !crate::native_kernels(x.device()) || !matches!(x.dtype(), DType::F32 | DType::F64) {
        let shape = x.shape().clone();
        let xs = x.reshape((d.n, groups, ()))?;
        let mean = xs.mean_keepdim(2)?;
        let xc = xs.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let xh = xc.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(&shape)?;
        let mut pshape = vec![1; x.rank()];
        pshape[1] = d.c;
        let z = xh
            .broadcast_mul(&gamma.reshape(pshape.clone())?)?
            .broadcast_add(&beta.reshape(pshape)?)?;
        return if silu { z.silu() } else { Ok(z) };
    }
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        GroupNormOp { groups, eps, silu },
    )
}

/// Per-channel mean and biased variance of `x` `(N, C, …)` over every axis but 1, as
/// `[mean₀ … mean_{C−1}, var₀ … var_{C−1}]` in f64 (two passes per channel, rows summed in f64).
struct BatchStats;

fn batch_stats_kernel<T: WithDType>(x: &[T], (n, c, inner): (usize, usize, usize)) -> Vec<f64> {
    let m = (n * inner).max(1) as f64;
    let per = crate::kernels::par::map(c, |ch| channel_stats(ch, x, (n, c, inner), m));
    let (mean, var): (Vec<f64>, Vec<f64>) = per.into_iter().unzip();
    mean.into_iter().chain(var).collect()
}

crate::simd_fn! {
    /// Mean and biased variance of channel `ch` over `m` elements.
    fn channel_stats<T: WithDType>(
        ch: usize,
        x: &[T],
        dims: (usize, usize, usize),
        m: f64,
    ) -> (f64, f64) {
        let (n, c, inner) = dims;
        // Plain loops: an iterator adapter's `fold` would be compiled apart from this copy. From
        // −0, as `Iterator::sum` of floats starts.
        let row = |s: usize| &x[(s * c + ch) * inner..][..inner];
        let mut sum = -0f64;
        for s in 0..n {
            sum += lane_sum(row(s), |v| v);
        }
        let mean = sum / m;
        let mt = T::from_f64(mean);
        let mut ss = -0f64;
        for s in 0..n {
            ss += lane_sum(row(s), |v| (v - mt) * (v - mt));
        }
        (mean, ss / m)
    }
}

impl CustomOp1 for BatchStats {
    fn name(&self) -> &'static str {
        "gm-batch-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage as _;
        let dims = super::ops::channel_dims(l.shape())?;
        let out = match s {
            CpuStorage::F32(_) => {
                batch_stats_kernel(super::cpu::slice::<f32>(s, l, "gm-batch-stats")?, dims)
            }
            CpuStorage::F64(_) => {
                batch_stats_kernel(super::cpu::slice::<f64>(s, l, "gm-batch-stats")?, dims)
            }
            s => bail!("gm-batch-stats: f32 or f64, got {:?}", s.dtype()),
        };
        Ok((CpuStorage::F64(out), Shape::from(2 * dims.1)))
    }
}

/// `y = act(γ_c · (x − μ_c) / √(σ²_c + ε) + β_c)` with the batch's statistics, computed before
/// the op (they are also the running statistics' update) and kept for the backward.
struct BatchNormOp {
    stats: Arc<Vec<f64>>,
    eps: f64,
    relu: bool,
}

/// `[dx (x.len()), dγ (C), dβ (C)]` flattened into one vector.
struct BatchNormGrad {
    stats: Arc<Vec<f64>>,
    eps: f64,
    relu: bool,
}

/// The per-channel `(scale, shift)` of the normalisation: `γ/√(σ² + ε)` and `β − μ·scale`, and
/// `1/√(σ² + ε)`.
fn bn_coeffs<T: WithDType>(
    stats: &[f64],
    gamma: &[T],
    beta: &[T],
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<f64>) {
    let c = gamma.len();
    let rstd: Vec<f64> = stats[c..].iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<f64> = gamma
        .iter()
        .zip(&rstd)
        .map(|(g, r)| g.to_f64() * r)
        .collect();
    let shift = beta
        .iter()
        .zip(&scale)
        .zip(&stats[..c])
        .map(|((b, a), m)| T::from_f64(b.to_f64() - m * a))
        .collect();
    (scale.into_iter().map(T::from_f64).collect(), shift, rstd)
}

fn bn_fwd_kernel<T: WithDType>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    dims: (usize, usize, usize),
    op: (&[f64], f64, bool),
) -> Vec<T> {
    let (stats, eps, relu) = op;
    let (a, b, _) = bn_coeffs(stats, gamma, beta, eps);
    if relu {
        super::ops::channel_map(x, &a, &b, dims, |v, a, b| {
            let z = v * a + b;
            if z > T::zero() {
                z
            } else {
                T::zero()
            }
        })
    } else {
        super::ops::channel_map(x, &a, &b, dims, |v, a, b| v * a + b)
    }
}

#[allow(unsafe_code)]
fn bn_bwd_kernel<T: WithDType>(
    x: &[T],
    dy: &[T],
    gb: &[T],
    (n, c, inner): (usize, usize, usize),
    op: (&[f64], f64, bool),
) -> Vec<T> {
    let (stats, eps, relu) = op;
    let (gamma, beta) = gb.split_at(c);
    let (a, b, rstd) = bn_coeffs(stats, gamma, beta, eps);
    // Pass 1, per channel: Σ dz and Σ dz·(x − μ), where dz is the normalisation's output gradient.
    let sums = crate::kernels::par::map(c, |ch| {
        bn_sums(ch, x, dy, (a[ch], b[ch]), stats[ch], (n, c, inner), relu)
    });
    let m = (n * inner).max(1) as f64;
    // dx = γ·r·(dz − Σdz/M − x̂·Σ(dz·x̂)/M) with x̂ = (x − μ)·r: k1·dz − k2·(x − μ) − k3.
    let k: Vec<[T; 4]> = (0..c)
        .map(|ch| {
            let (g, r) = (gamma[ch].to_f64(), rstd[ch]);
            let (s0, s1) = sums[ch];
            [
                T::from_f64(g * r),
                T::from_f64(g * r * r * r * s1 / m),
                T::from_f64(g * r * s0 / m),
                T::from_f64(stats[ch]),
            ]
        })
        .collect();
    let row = inner.max(1);
    let rows_per_task = (1usize << 15).div_ceil(row);
    // SAFETY: every task writes each element of its chunk (whole rows, zipped with x's and dy's).
    let mut out = unsafe {
        crate::kernels::cpu::par_written(x.len(), rows_per_task * row, |t, out| {
            let at = t * rows_per_task * row..;
            bn_bwd_rows(
                t * rows_per_task,
                out,
                &x[at.clone()],
                &dy[at],
                &k,
                (&a, &b),
                row,
                relu,
            )
        })
    };
    // dγ = Σ dz·x̂ = r·Σ dz·(x − μ), dβ = Σ dz.
    out.extend((0..c).map(|ch| T::from_f64(rstd[ch] * sums[ch].1)));
    out.extend(sums.iter().map(|s| T::from_f64(s.0)));
    out
}

/// Whether the ReLU after a batch norm (scale and shift `(a, b)` of `v`'s channel) passes `v`:
/// the forward's own arithmetic, so that the backward's mask is the forward's bit for bit.
#[inline(always)]
fn relu_on<T: WithDType>(v: T, (a, b): (T, T)) -> bool {
    v * a + b > T::zero()
}

crate::simd_fn! {
    /// `(Σ dz, Σ dz·(x − μ))` of channel `ch` (scale and shift `ab`, mean `mean`).
    fn bn_sums<T: WithDType>(
        ch: usize,
        x: &[T],
        dy: &[T],
        ab: (T, T),
        mean: f64,
        dims: (usize, usize, usize),
        relu: bool,
    ) -> (f64, f64) {
        let (n, c, inner) = dims;
        let mt = T::from_f64(mean);
        let (mut s0, mut s1) = (0f64, 0f64);
        for s in 0..n {
            let at = (s * c + ch) * inner..(s * c + ch + 1) * inner;
            let (xr, gr) = (&x[at.clone()], &dy[at]);
            if relu {
                s0 += lane_sum2(gr, xr, |g, v| if relu_on(v, ab) { g } else { T::zero() });
                s1 += lane_sum2(gr, xr, |g, v| {
                    if relu_on(v, ab) {
                        g * (v - mt)
                    } else {
                        T::zero()
                    }
                });
            } else {
                s0 += lane_sum(gr, |g| g);
                s1 += lane_sum2(gr, xr, |g, v| g * (v - mt));
            }
        }
        (s0, s1)
    }
}

crate::simd_fn! {
    /// `dx = k1·dz − k2·(x − μ) − k3` over whole rows of `row` elements, the first being row
    /// `row0` of the tensor; `k[ch] = [k1, k2, k3, μ]`.
    fn bn_bwd_rows<T: WithDType>(
        row0: usize,
        out: &mut [MaybeUninit<T>],
        x: &[T],
        dy: &[T],
        k: &[[T; 4]],
        ab: (&[T], &[T]),
        row: usize,
        relu: bool,
    ) {
        let (c, (a, b)) = (k.len(), ab);
        for (r, (or, (xr, gr))) in out
            .chunks_mut(row)
            .zip(x.chunks(row).zip(dy.chunks(row)))
            .enumerate()
        {
            let ch = (row0 + r) % c;
            let [k1, k2, k3, mt] = k[ch];
            if relu {
                let ab = (a[ch], b[ch]);
                for ((o, v), g) in or.iter_mut().zip(xr).zip(gr) {
                    let dz = if relu_on(*v, ab) { *g } else { T::zero() };
                    o.write(k1 * dz - k2 * (*v - mt) - k3);
                }
            } else {
                for ((o, v), g) in or.iter_mut().zip(xr).zip(gr) {
                    o.write(k1 * *g - k2 * (*v - mt) - k3);
                }
            }
        }
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "gm-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = super::ops::channel_dims(l1.shape())?;
        let op = (self.stats.as_slice(), self.eps, self.relu);
        let out = crate::float3!("gm-batch-norm", s1, l1, s2, l2, s3, l3, |x, g, b| {
            bn_fwd_kernel(x, g, b, dims, op)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = BatchNormGrad {
            stats: self.stats.clone(),
            eps: self.eps,
            relu: self.relu,
        };
        norm_grads(x, gamma, beta, dy, grad)
    }
}

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "gm-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = super::ops::channel_dims(l1.shape())?;
        let op = (self.stats.as_slice(), self.eps, self.relu);
        let out = crate::float3!("gm-batch-norm-grad", s1, l1, s2, l2, s3, l3, |x, dy, gb| {
            bn_bwd_kernel(x, dy, gb, dims, op)
        });
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * dims.1)))
    }
}

/// Training-mode batch normalisation of `x` `(N, C, …)` with affine `γ`, `β` of shape `(C,)`,
/// then ReLU when `relu`: `y = act(γ_c · (x − μ_c) / √(σ²_c + ε) + β_c)`, `μ_c` and `σ²_c` the
/// mean and biased variance of channel `c` over the batch and every other axis. Returns `y` and
/// the batch's `μ` and `σ²` (`(C,)`, detached), from which a caller updates its running
/// statistics.
///
/// Gradients flow into `x` (through the statistics too), `γ` and `β`. On the CPU in f32/f64 it
/// is gm's kernels (first-order); off the CPU, in half precision (statistics in f32) and with
/// second-order gradients on it is candle's ops.
///
/// # Shapes
/// - `x`: `(N, C, ...)`; returns the shape of `x` and two `(C,)` tensors.
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, c, _) = super::ops::channel_dims(x.shape()).map_err(|_| {
        candle_core::Error::Msg(format!(
            "batch_norm: input {:?} has no channel axis",
            x.dims()
        ))
    })?;
    if gamma.dims() != [c] || beta.dims() != [c] {
        bail!(
            "batch_norm: γ {:?} and β {:?} for {c} channels",
            gamma.dims(),
            beta.dims()
        )
    }
    let native = crate::native_kernels(x.device())
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && !super::second_order();
    if !native {
        return batch_norm_candle(x, gamma, beta, eps, relu);
    }
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&BatchStats)?;
    let stats = Arc::new(stats.to_vec1::<f64>()?);
    let mean = Tensor::from_slice(&stats[..c], c, x.device())?.to_dtype(x.dtype())?;
    let var = Tensor::from_slice(&stats[c..], c, x.device())?.to_dtype(x.dtype())?;
    let y = x.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        BatchNormOp { stats, eps, relu },
    )?;
    Ok((y, mean, var))
}

/// [`batch_norm`] from candle's ops (differentiable to any order).
fn batch_norm_candle(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = x.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let c = x.dim(1)?;
    let axes: Vec<usize> = std::iter::once(0).chain(2..x.rank()).collect();
    let m = (x.elem_count() / c.max(1)) as f64;
    let mut pshape = vec![1; x.rank()];
    pshape[1] = c;
    let xs = x.to_dtype(internal)?;
    let mean = (xs.sum_keepdim(axes.as_slice())? / m)?;
    let xc = xs.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(axes.as_slice())? / m)?;
    let scale = (gamma.to_dtype(internal)?.reshape(pshape.as_slice())? / (&var + eps)?.sqrt()?)?;
    let shift = beta.to_dtype(internal)?.reshape(pshape.as_slice())?;
    let mut y = xc.broadcast_mul(&scale)?.broadcast_add(&shift)?;
    if relu {
        y = y.relu()?;
    }
    Ok((
        y.to_dtype(dtype)?,
        mean.flatten_all()?.detach().to_dtype(dtype)?,
        var.flatten_all()?.detach().to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// How many values a CPU tensor's storage holds (a view may hold a larger buffer).
    fn storage_len(t: &Tensor) -> usize {
        match &*t.storage_and_layout().0 {
            candle_core::Storage::Cpu(s) => s.as_slice::<f32>().map_or(0, |v| v.len()),
            _ => 0,
        }
    }

    /// The parameters' gradients hold their C values, not the buffer they were computed in
    /// (which has dx's size).
    #[test]
    fn parameter_gradients_hold_only_their_own_values() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 3, 5, 5), &dev)?;
        let dy = Tensor::randn(0f32, 1.0, (4, 3, 5, 5), &dev)?;
        let g = Tensor::ones(3, DType::F32, &dev)?;
        let b = Tensor::zeros(3, DType::F32, &dev)?;
        let grad = GroupNormGrad {
            groups: 3,
            eps: 1e-5,
            silu: false,
        };
        let (dx, dg, db) = norm_grads(&x, &g, &b, &dy, grad)?;
        assert_eq!(dx.expect("dx").dims(), x.dims());
        for t in [dg.expect("dγ"), db.expect("dβ")] {
            assert_eq!((t.dims(), storage_len(&t)), (&[3][..], 3));
        }
        Ok(())
    }
}
