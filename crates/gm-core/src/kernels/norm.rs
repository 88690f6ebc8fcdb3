//! Group normalisation (Wu & He, 2018) with an optional fused SiLU — the UNet's `GroupNorm → SiLU`
//! pair — as one CPU pass forward and one backward, where candle's composed version runs about a
//! dozen passes and strided reductions over the batch for the affine parameters' gradients. On
//! CUDA and Metal it is candle's ops. First-order: the backward is not itself differentiable.
//!
//! `y = act(γ_c · (x − μ_{n,g}) / √(σ²_{n,g} + ε) + β_c)`, statistics per sample and channel group.

use crate::kernels::cpu::{lane_sum, lane_sum2, Transcendental};
use crate::kernels::for_grad;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

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

/// Mean and `1/√(var + ε)` of one group (two passes, blocks accumulated in f64).
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
        let g = k % d.groups;
        let xs = &x[k * span..][..span];
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
    });
    y
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
        let g = k % d.groups;
        let xs = &x[k * span..][..span];
        let gs = &dy[k * span..][..span];
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
        let (x, dy) = (&for_grad(x), &for_grad(dy));
        let (gamma, beta) = (&for_grad(gamma), &for_grad(beta));
        let c = gamma.dim(0)?;
        let gb = Tensor::cat(&[gamma, beta], 0)?;
        let all = x.apply_op3(
            &dy.contiguous()?,
            &gb,
            GroupNormGrad {
                groups: self.groups,
                eps: self.eps,
                silu: self.silu,
            },
        )?;
        let n = x.elem_count();
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        // Copies: views would keep the whole buffer (dx with them) alive as long as the
        // parameters' gradients live.
        let dg = all.narrow(0, n, c)?.copy()?;
        let db = all.narrow(0, n + c, c)?.copy()?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
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
