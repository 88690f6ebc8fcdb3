//! The fused Adam / AdamW update for the CPU: three in-place passes per parameter (first moment,
//! second moment, parameter) over candle's thread pool, no allocation.
//!
//! The optimizer that owns the moments (gm-train's `optim::Adam`) calls [`update_moment`] twice
//! and [`apply`] once per parameter; elsewhere it writes the same update with tensor ops.

use crate::kernels::cpu::Transcendental;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// The scalars of one Adam update of a parameter.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f64,
    /// Bias corrections `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    pub bc1: f64,
    pub bc2: f64,
    /// Added to `√v̂`.
    pub eps: f64,
    /// Decoupled weight decay (Loshchilov & Hutter); 0 is plain Adam.
    pub weight_decay: f64,
}

/// `s ← β·s + (1 − β)·g` (or `g²` when `square`), in place. `s` and `g` are contiguous CPU
/// tensors of one float dtype (f32 or f64) and one shape.
pub fn update_moment(s: &Tensor, g: &Tensor, beta: f64, square: bool) -> Result<()> {
    s.inplace_op2(g, &Moment { beta, square })
}

/// `p ← p − lr·(m̂ / (√v̂ + ε) + wd·p)` with `m̂ = m / bc1`, `v̂ = v / bc2`, in place.
pub fn apply(p: &Tensor, m: &Tensor, v: &Tensor, step: AdamStep) -> Result<()> {
    p.inplace_op3(m, v, &Apply(step))
}

struct Moment {
    beta: f64,
    square: bool,
}

struct Apply(AdamStep);

fn range<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("adam: non-contiguous operand"))?;
    Ok(&v[a..b])
}

fn range_mut<'a, T>(v: &'a mut [T], l: &Layout) -> Result<&'a mut [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("adam: non-contiguous state"))?;
    Ok(&mut v[a..b])
}

/// Elements per parallel task of the in-place updates.
const CHUNK: usize = 1 << 14;

/// `s ← β·s + (1 − β)·g` (or `g²`) over the thread pool.
fn moment<T: Transcendental>(op: &Moment, s: &mut [T], g: &[T]) {
    let (b, a) = (T::from_f64(op.beta), T::from_f64(1.0 - op.beta));
    let square = op.square;
    super::par::chunks_mut(s, CHUNK, move |i, s| {
        moment_chunk(s, &g[i * CHUNK..][..s.len()], (b, a), square)
    });
}

/// The parameter update over the thread pool.
fn apply_step<T: Transcendental>(op: &AdamStep, p: &mut [T], m: &[T], v: &[T]) {
    let step = T::from_f64(op.lr / op.bc1);
    let inv_bc2 = T::from_f64(1.0 / op.bc2);
    let eps = T::from_f64(op.eps);
    let decay = T::from_f64(1.0 - op.lr * op.weight_decay);
    super::par::chunks_mut(p, CHUNK, move |i, p| {
        let (m, v) = (&m[i * CHUNK..][..p.len()], &v[i * CHUNK..][..p.len()]);
        apply_chunk(p, m, v, [decay, step, inv_bc2, eps])
    });
}

crate::simd_fn! {
    /// `s ← b·s + a·g` (or `a·g²` when `square`) for `ba = (b, a)`.
    fn moment_chunk<T: Transcendental>(s: &mut [T], g: &[T], ba: (T, T), square: bool) {
        let (b, a) = ba;
        if square {
            s.iter_mut()
                .zip(g)
                .for_each(|(s, g)| *s = b * *s + a * *g * *g);
        } else {
            s.iter_mut().zip(g).for_each(|(s, g)| *s = b * *s + a * *g);
        }
    }
}

crate::simd_fn! {
    /// `p ← p·decay − step·m / (√(v·inv_bc2) + ε)` for `k = [decay, step, inv_bc2, ε]`.
    fn apply_chunk<T: Transcendental>(p: &mut [T], m: &[T], v: &[T], k: [T; 4]) {
        let [decay, step, inv_bc2, eps] = k;
        for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
            *p = *p * decay - step * *m / ((*v * inv_bc2).sqrt_() + eps);
        }
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "gm-adam-moment"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        match (s, g) {
            (CpuStorage::F32(s), CpuStorage::F32(g)) => {
                moment(self, range_mut(s, l)?, range(g, gl)?)
            }
            (CpuStorage::F64(s), CpuStorage::F64(g)) => {
                moment(self, range_mut(s, l)?, range(g, gl)?)
            }
            _ => candle_core::bail!("adam: f32 or f64 moments and gradients of one dtype"),
        }
        Ok(())
    }
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "gm-adam-apply"
    }
    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        pl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        match (p, m, v) {
            (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => {
                apply_step(&self.0, range_mut(p, pl)?, range(m, ml)?, range(v, vl)?)
            }
            (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => {
                apply_step(&self.0, range_mut(p, pl)?, range(m, ml)?, range(v, vl)?)
            }
            _ => candle_core::bail!("adam: f32 or f64 parameters and moments of one dtype"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The in-place passes equal the update written with tensor ops, in f64.
    #[test]
    fn fused_update_matches_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let n = 3 * CHUNK + 17; // several tasks and a ragged tail
        let ramp = |a: f64, b: f64| -> Result<Tensor> {
            (Tensor::arange(0u32, n as u32, &dev)?.to_dtype(DType::F64)? * a)?.sin()? * b
        };
        let (p0, g, m0) = (ramp(0.37, 1.5)?, ramp(1.3, 0.2)?, ramp(0.11, 0.05)?);
        let v0 = ramp(0.7, 0.3)?.sqr()?;
        let (b1, b2) = (0.9, 0.999);
        let step = AdamStep {
            lr: 1e-2,
            bc1: 1.0 - b1 * b1,
            bc2: 1.0 - b2 * b2,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let m = ((&m0 * b1)? + (&g * (1.0 - b1))?)?;
        let v = ((&v0 * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let upd = ((&m / step.bc1)? / ((&v / step.bc2)?.sqrt()? + step.eps)?)?;
        let want = ((&p0 - (upd * step.lr)?)? - (&p0 * (step.lr * step.weight_decay))?)?;

        let (p, mf, vf) = (p0.copy()?, m0.copy()?, v0.copy()?);
        update_moment(&mf, &g, b1, false)?;
        update_moment(&vf, &g, b2, true)?;
        apply(&p, &mf, &vf, step)?;
        for (got, want) in [(&mf, &m), (&vf, &v), (&p, &want)] {
            let d = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < 1e-14, "fused Adam differs by {d}");
        }
        Ok(())
    }
}
