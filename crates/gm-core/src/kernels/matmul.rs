//! Matrix products on candle's thread pool ([`crate::kernels::par`]).
//!
//! candle's CPU matmul hands every product to `gemm` with `Parallelism::Rayon(threads)`, so a
//! large product runs on rayon's pool while candle's own workers spin after the element-wise op
//! before it — two pools on the same cores (the contention gm's convolutions already avoid).
//! [`matmul`] runs `gemm` single-threaded on one block of rows per thread of candle's pool
//! instead, and keeps a small product on the calling thread. Each block is the same
//! single-threaded `gemm` call on fewer rows (whole multiples of 64), and an output row's bits do
//! not depend on the rows computed beside it (tested: every 64-row tile alone gives the bits it
//! has inside the whole; columns do not have that property, so they are never split), so the
//! result is the same on any number of threads. Products agree with f64 ones to 1e-5 (f32).

use crate::kernels::for_grad;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

/// Products below this many multiply-adds stay on the calling thread (`gemm`'s own threading
/// threshold).
const PAR_WORK: usize = 48 * 48 * 256;

/// Parallel blocks are whole multiples of this many rows (`gemm`'s largest f32 register tile on
/// AVX-512: 4 vectors of 16 lanes).
const TILE: usize = 64;

/// `a · b` for 2-D `a (m×k)` and `b (k×n)`, any strides: gm's pool on the CPU for f32/f64,
/// candle's matmul elsewhere (and for other ranks or dtypes). Differentiable to any order (its
/// backward is two more of these products).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !native(a, b) {
        return a.matmul(b);
    }
    let (m, k) = a.dims2()?;
    let (k2, n) = b.dims2()?;
    if k != k2 {
        candle_core::bail!("matmul: ({m}, {k}) · ({k2}, {n}) do not chain")
    }
    a.apply_op2(b, MatMul { bt: false })
}

/// `a · bᵀ` for 2-D `a (m×k)` and `b (n×k)` — a linear layer's `x · Wᵀ` with `W` stored
/// `(out, in)` — with the same product and bits as `matmul(a, &b.t()?)`, but a backward that
/// computes `b`'s gradient `gᵀ·a` in `b`'s own layout `(n×k)`. Through the transposed view the
/// gradient comes back transposed, and candle's gradient accumulation adds that strided view
/// one element at a time (an eighth of the MLP VAE's train step). Differentiable to any order.
pub fn matmul_nt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !native(a, b) {
        return a.matmul(&b.t()?);
    }
    let (m, k) = a.dims2()?;
    let (n, k2) = b.dims2()?;
    if k != k2 {
        candle_core::bail!("matmul_nt: ({m}, {k}) · ({n}, {k2})ᵀ do not chain")
    }
    a.apply_op2(b, MatMul { bt: true })
}

/// Whether gm's product takes `a` and `b`: 2-D, one dtype, f32 or f64, on the CPU.
fn native(a: &Tensor, b: &Tensor) -> bool {
    crate::native_kernels(a.device())
        && a.rank() == 2
        && b.rank() == 2
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::F64)
}

/// `a · b`, or `a · bᵀ` when `bt`.
struct MatMul {
    bt: bool,
}

/// `(rows, cols)` strides and offset of a 2-D layout.
fn strides(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.stride() {
        [rs, cs] => Ok((*rs, *cs, l.start_offset())),
        s => candle_core::bail!("matmul: a 2-D operand has strides {s:?}"),
    }
}

fn product<T: WithDType>(
    (m, k, n): (usize, usize, usize),
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    bt: bool,
) -> Result<Vec<T>> {
    let (ars, acs, aoff) = strides(la)?;
    let (brs, bcs, boff) = strides(lb)?;
    // bᵀ is b with its strides swapped.
    let (brs, bcs) = if bt { (bcs, brs) } else { (brs, bcs) };
    let (a, b) = (&a[aoff..], &b[boff..]);
    let mut out = vec![T::zero(); m * n];
    let threads = crate::kernels::par::threads();
    let work = m.saturating_mul(n).saturating_mul(k);
    // One block of whole row tiles per thread: every block packs all of `b` again, so more
    // blocks would cost more packing.
    if threads == 1 || work < PAR_WORK || m < 2 * TILE {
        gemm(m, n, k, &mut out, a, (ars, acs), b, (brs, bcs));
        return Ok(out);
    }
    let rows = m.div_ceil(TILE).div_ceil(threads) * TILE;
    crate::kernels::par::chunks_mut(&mut out, rows * n, |t, chunk| {
        let mr = chunk.len() / n;
        gemm(
            mr,
            n,
            k,
            chunk,
            &a[t * rows * ars..],
            (ars, acs),
            b,
            (brs, bcs),
        );
    });
    Ok(out)
}

/// `dst (m×n, contiguous) = a (m×k) · b (k×n)` by one single-threaded `gemm` call.
#[allow(clippy::too_many_arguments)]
fn gemm<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
) {
    let par = gemm::Parallelism::None;
    super::conv::matmul(m, n, k, dst, n, false, a, a_strides, b, b_strides, par);
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "gm-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (r, c) = l2.shape().dims2()?;
        let n = if self.bt { r } else { c };
        let bt = self.bt;
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(product((m, k, n), a, l1, b, l2, bt)?)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(product((m, k, n), a, l1, b, l2, bt)?)
            }
            (a, b) => candle_core::bail!(
                "gm-matmul: f32 or f64 operands of one dtype, got {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (a, b, g) = (&for_grad(a), &for_grad(b), &for_grad(g));
        if self.bt {
            // y = a·bᵀ: da = g·b, db = gᵀ·a (n×k, b's layout).
            return Ok((Some(matmul(g, b)?), Some(matmul(&g.t()?, a)?)));
        }
        Ok((Some(matmul(g, &b.t()?)?), Some(matmul(&a.t()?, g)?)))
    }
}
