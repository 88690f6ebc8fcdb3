//! Nearest-neighbour ×2 upsampling of `(B, C, H, W)` images and its adjoint, the 2×2 block sum:
//! one pass each on the CPU, spread over the thread pool. As candle ops (a reshape, a broadcast
//! and a copy forward; a strided `sum_keepdim` over two axes backward) the pair was about 4% of the
//! DDPM UNet's train step. Each is the other's backward, so gradients of gradients stay correct;
//! the block sum adds each block's four values in candle's order (`((0 + x₀₀) + x₀₁) + x₁₀) + x₁₁`),
//! so gradients keep the bits candle's backward gave. candle's ops on other devices.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use gm_core::kernels::resample::{block_sum2x, upsample_nearest2x};
//! let x = Tensor::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &Device::Cpu)?; // (1, 1, 2, 2)
//! let y = upsample_nearest2x(&x)?;
//! assert_eq!(y.dims(), &[1, 1, 4, 4]);
//! assert_eq!(y.get(0)?.get(0)?.get(1)?.to_vec1::<f32>()?, vec![1.0, 1.0, 2.0, 2.0]);
//! assert_eq!(block_sum2x(&y)?.get(0)?.to_vec3::<f32>()?[0], vec![vec![4.0, 8.0], vec![12.0, 16.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::kernels::for_grad;
use crate::kernels::ops::native_float;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

/// Output elements per parallel task (whole rows).
const PAR_CHUNK: usize = 1 << 15;

/// The dimensions of a rank-4 `(B, C, H, W)` shape, or an error naming `what`.
fn dims4(shape: &Shape, what: &str) -> Result<(usize, usize, usize, usize)> {
    match *shape.dims() {
        [b, c, h, w] => Ok((b, c, h, w)),
        ref d => bail!("{what}: expected a (B, C, H, W) tensor, got shape {d:?}"),
    }
}

/// `out[p, 2i + a, 2j + b] = x[p, i, j]`.
struct Upsample2x;
/// `out[p, i, j] = Σ_{a, b ∈ {0, 1}} x[p, 2i + a, 2j + b]`.
struct BlockSum2x;

/// Rows of `w` input elements per task such that a task writes about [`PAR_CHUNK`] outputs of
/// `per_row` elements per input row.
fn rows_per_task(per_row: usize) -> usize {
    (PAR_CHUNK / per_row.max(1)).max(1)
}

#[allow(unsafe_code)]
fn upsample_kernel<T: WithDType>(x: &[T], w: usize) -> Vec<T> {
    let per_task = rows_per_task(4 * w);
    // SAFETY: each task's chunk is 4w outputs for each of its input rows, and every one is
    // written below.
    unsafe {
        crate::kernels::cpu::par_written(4 * x.len(), per_task * 4 * w, |t, out| {
            let src = &x[t * per_task * w..];
            for (o, r) in out.chunks_exact_mut(4 * w).zip(src.chunks_exact(w)) {
                let (top, bottom) = o.split_at_mut(2 * w);
                for (pair, &v) in top.chunks_exact_mut(2).zip(r) {
                    pair[0].write(v);
                    pair[1].write(v);
                }
                for (d, s) in bottom.iter_mut().zip(top.iter()) {
                    // SAFETY: `top` was written just above.
                    d.write(s.assume_init());
                }
            }
        })
    }
}

#[allow(unsafe_code)]
fn block_sum_kernel<T: WithDType>(x: &[T], w: usize) -> Vec<T> {
    // x: rows of 2w; pairs of rows make one output row of w.
    let out_rows = x.len() / (4 * w).max(1);
    let per_task = rows_per_task(w);
    // SAFETY: each task's chunk is w outputs per output row, every one written below.
    unsafe {
        crate::kernels::cpu::par_written(out_rows * w, per_task * w, |t, out| {
            let src = &x[t * per_task * 4 * w..];
            for (o, r) in out.chunks_exact_mut(w).zip(src.chunks_exact(4 * w)) {
                let (top, bottom) = r.split_at(2 * w);
                for ((d, a), b) in o
                    .iter_mut()
                    .zip(top.chunks_exact(2))
                    .zip(bottom.chunks_exact(2))
                {
                    d.write(block_sum(a[0], a[1], b[0], b[1]));
                }
            }
        })
    }
}

/// candle's reduction order for the block `[[a, b], [c, d]]`.
#[inline(always)]
fn block_sum<T: WithDType>(a: T, b: T, c: T, d: T) -> T {
    (((T::zero() + a) + b) + c) + d
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "gm-upsample-nearest2x"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims4(l.shape(), self.name())?;
        let out = crate::float1!(self.name(), s, l, |x| upsample_kernel(x, w));
        Ok((out, Shape::from((b, c, 2 * h, 2 * w))))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(block_sum2x(&for_grad(dy))?))
    }
}

impl CustomOp1 for BlockSum2x {
    fn name(&self) -> &'static str {
        "gm-block-sum2x"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims4(l.shape(), self.name())?;
        let out = crate::float1!(self.name(), s, l, |x| block_sum_kernel(x, w / 2));
        Ok((out, Shape::from((b, c, h / 2, w / 2))))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(upsample_nearest2x(&for_grad(dy))?))
    }
}

/// Nearest-neighbour ×2 upsampling: `(B, C, H, W)` → `(B, C, 2H, 2W)` with
/// `y[.., 2i + a, 2j + b] = x[.., i, j]`. Its backward is [`block_sum2x`].
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = dims4(x.shape(), "upsample_nearest2x")?;
    if !native_float(x) {
        return x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, 2 * h, 2 * w));
    }
    x.contiguous()?.apply_op1(Upsample2x)
}

/// The sum of each 2×2 block: `(B, C, 2H, 2W)` → `(B, C, H, W)`, the adjoint of
/// [`upsample_nearest2x`] (and its backward). Odd heights or widths are an error.
pub fn block_sum2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h2, w2) = dims4(x.shape(), "block_sum2x")?;
    if h2 % 2 != 0 || w2 % 2 != 0 {
        bail!("block_sum2x: height and width must be even, got {h2} × {w2}")
    }
    let (h, w) = (h2 / 2, w2 / 2);
    if !native_float(x) {
        return x
            .reshape((b, c, h, 2, w, 2))?
            .sum_keepdim((3, 5))?
            .reshape((b, c, h, w));
    }
    x.contiguous()?.apply_op1(BlockSum2x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The candle composition the ops replace (the UNet's former upsampling).
    fn reference_upsample(x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, 2 * h, 2 * w))
    }

    fn ramp(shape: (usize, usize, usize, usize), dtype: DType) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        // Irrational steps so sums round differently in different orders.
        let v: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.7).sin() * 3.3).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
    }

    #[test]
    fn forward_and_gradient_bits_match_candle() -> Result<()> {
        // Sizes span one task and several (a task is 2¹⁵ outputs), odd H and W included.
        for (shape, dtype) in [
            ((2, 3, 5, 7), DType::F32),
            ((3, 2, 4, 3), DType::F64),
            ((4, 16, 14, 14), DType::F32),
            ((2, 64, 33, 31), DType::F32),
        ] {
            let x = Var::from_tensor(&ramp(shape, dtype)?)?;
            let y = upsample_nearest2x(&x)?;
            let want = reference_upsample(&x)?;
            assert_eq!(y.dims(), want.dims());
            assert_eq!(
                y.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                want.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                "{shape:?}"
            );
            // A weighting that is not constant per block, so the four terms differ.
            let wgt = ramp((shape.0, shape.1, 2 * shape.2, 2 * shape.3), dtype)?.sin()?;
            let g = (y * &wgt)?.sum_all()?.backward()?;
            let g_want = (want * &wgt)?.sum_all()?.backward()?;
            let (a, b) = (g.get(&x).unwrap(), g_want.get(&x).unwrap());
            let bits = |t: &Tensor| -> Result<Vec<u64>> {
                Ok(t.flatten_all()?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?
                    .into_iter()
                    .map(f64::to_bits)
                    .collect())
            };
            assert_eq!(bits(a)?, bits(b)?, "gradient of {shape:?} {dtype:?}");
        }
        Ok(())
    }

    #[test]
    fn block_sum_is_the_adjoint_and_differentiable() -> Result<()> {
        // ⟨up(x), y⟩ = ⟨x, sum(y)⟩ in f64.
        let x = ramp((2, 3, 4, 5), DType::F64)?;
        let y = ramp((2, 3, 8, 10), DType::F64)?.cos()?;
        let lhs = (upsample_nearest2x(&x)? * &y)?
            .sum_all()?
            .to_scalar::<f64>()?;
        let rhs = (&x * block_sum2x(&y)?)?.sum_all()?.to_scalar::<f64>()?;
        assert!(
            (lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
        // The block sum's own gradient is the upsampling of the incoming gradient.
        let v = Var::from_tensor(&y)?;
        let s = block_sum2x(&v)?;
        let g = (&s * &x)?.sum_all()?.backward()?;
        let got = g.get(&v).unwrap().flatten_all()?.to_vec1::<f64>()?;
        let want = upsample_nearest2x(&x)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let e = upsample_nearest2x(&Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap());
        assert!(e.unwrap_err().to_string().contains("(B, C, H, W)"));
        let e = block_sum2x(&Tensor::zeros((1, 1, 3, 4), DType::F32, &dev).unwrap());
        assert!(e.unwrap_err().to_string().contains("must be even"));
    }
}
